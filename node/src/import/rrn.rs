//! Resident registration numbers (주민등록번호) never enter the store.
//!
//! A node has no use for them: patients are identified by hospital-local
//! ids. Every resource is screened before it is stored. An identifier that is
//! an RRN (KR Core's RRN identifier system, identifier type `NNKOR`, or a
//! value that is one) is stripped with a warning, or the resource is
//! rejected, as the node's policy says; this holds for `identifier` wherever
//! it stands (a reference's identifier, a contained resource's). An RRN in
//! any other string (a note, a narrative) cannot be removed safely, so that
//! resource is always rejected. Reports name the element, never the value.
//!
//! What counts as an RRN (issue 40: decimals were taken for them):
//! - JSON strings and object keys are read, and whole JSON numbers (13
//!   digits, no fraction) as unhyphenated ones. Digits that are part of a
//!   decimal (`323.0707114835185`, as a number or a string) are not an
//!   RRN; a hyphenated one is never taken for a decimal.
//! - 13 digits `YYMMDD-GNNNNNN`, hyphen optional, not part of a longer run,
//!   where G (1-8) gives sex and century and YYMMDD in that century is a
//!   real date not in the future.
//! - Without the hyphen, the check digit must hold too, unless the number is
//!   of a birth since October 2020 (numbers issued since then end in random
//!   digits). Foreigner registration numbers (G 5-8) may carry either
//!   formula's check digit. With the hyphen, the way RRNs are written, a real date is
//!   enough: a mistyped RRN is still a person's number.

use serde_json::Value;

/// The KR Core identifier system for resident registration numbers.
pub const RRN_SYSTEM: &str = "http://www.hl7korea.or.kr/Identifier/rrn";

/// What to do with an RRN found in `identifier`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RrnPolicy {
    /// Remove the identifier, keep the resource, and warn.
    #[default]
    Strip,
    /// Reject the whole resource.
    Reject,
}

impl std::str::FromStr for RrnPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strip" => Ok(RrnPolicy::Strip),
            "reject" => Ok(RrnPolicy::Reject),
            other => Err(format!(
                "unknown RRN policy `{other}`; expected strip or reject"
            )),
        }
    }
}

/// The result of screening one resource's text (tests).
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Screened {
    /// Nothing RRN-like: store the JSON as it is.
    Clean,
    /// The resource was screened as decoded JSON: store `json` (re-serialised)
    /// instead. `removed` names each RRN identifier taken out.
    Stripped { json: String, removed: Vec<String> },
    /// The resource must not be stored; the reason names the element.
    Rejected(String),
}

/// Screens one resource's JSON text (import parses once and calls
/// [`screen_value`]; tests use this). Detection works on decoded values: a
/// document with an escape anywhere (`\u0039` could spell a digit, `\u002d`
/// a hyphen, `\/` a slash of the RRN system) is parsed and screened as
/// decoded, as is one whose raw text holds a candidate.
#[cfg(test)]
pub(crate) fn screen(json: &str, policy: RrnPolicy) -> Screened {
    if !suspicious(json) {
        return Screened::Clean;
    }
    let Ok(mut value) = serde_json::from_str::<Value>(json) else {
        // Invalid JSON is rejected by validation with its own reason.
        return Screened::Clean;
    };
    match screen_value(&mut value, policy) {
        Err(reason) => Screened::Rejected(reason),
        // What was screened is what is stored: the decoded, re-serialised
        // text (where the raw text and its parse could differ, duplicate
        // keys say, the raw text was not what was checked).
        Ok(removed) => Screened::Stripped {
            json: serde_json::to_string(&value).expect("a parsed value serializes"),
            removed,
        },
    }
}

/// Whether the raw text could hold an RRN anywhere the parse might not
/// show as the text does: a candidate number (any run of 11 digits or
/// more, whatever surrounds it), the RRN system or type, or any escape.
pub(crate) fn suspicious(json: &str) -> bool {
    let bytes = json.as_bytes();
    // One pass for escapes and long digit runs (every candidate number has
    // a run of six or more digits; 11 catch whole numbers too).
    let mut run = 0;
    let mut six = false;
    for &b in bytes {
        if b.is_ascii_digit() {
            run += 1;
            if run >= 11 {
                return true;
            }
            six |= run >= 6;
        } else {
            if b == b'\\' {
                return true;
            }
            run = 0;
        }
    }
    (six && contains_rrn(bytes)) || json.contains(RRN_SYSTEM) || json.contains("NNKOR")
}

/// Screens a parsed resource in place: RRN identifiers are removed (their
/// element paths returned) or, by policy, reject it; an RRN in any other
/// string rejects it.
pub(crate) fn screen_value(value: &mut Value, policy: RrnPolicy) -> Result<Vec<String>, String> {
    let root = element_name(
        value
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("resource"),
    )
    .to_owned();
    let mut removed = Vec::new();
    strip_identifiers(value, &mut root.clone(), &mut removed);
    if !removed.is_empty() && policy == RrnPolicy::Reject {
        return Err(format!(
            "{} carries a resident registration number; this node's policy rejects such resources",
            removed.join(", ")
        ));
    }
    if let Some(path) = first_string_with_rrn(value, &mut root.clone()) {
        return Err(format!(
            "{path} contains a value shaped like a resident registration number; remove it at the source"
        ));
    }
    Ok(removed)
}

fn strip_identifiers(value: &mut Value, path: &mut String, removed: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let len = path.len();
            match map.get_mut("identifier") {
                Some(Value::Array(identifiers)) => {
                    let mut index = 0;
                    identifiers.retain(|identifier| {
                        let rrn = is_rrn_identifier(identifier);
                        if rrn {
                            removed.push(format!("{path}.identifier[{index}]"));
                        }
                        index += 1;
                        !rrn
                    });
                    if identifiers.is_empty() {
                        map.remove("identifier");
                    }
                }
                Some(identifier @ Value::Object(_)) if is_rrn_identifier(identifier) => {
                    removed.push(format!("{path}.identifier"));
                    map.remove("identifier");
                }
                _ => {}
            }
            for (key, child) in map.iter_mut() {
                path.push('.');
                path.push_str(element_name(key));
                strip_identifiers(child, path, removed);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            let len = path.len();
            for (i, item) in items.iter_mut().enumerate() {
                path.push_str(&format!("[{i}]"));
                strip_identifiers(item, path, removed);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The path of the first string, key or whole number holding an RRN.
fn first_string_with_rrn(value: &Value, path: &mut String) -> Option<String> {
    let len = path.len();
    match value {
        Value::String(s) => contains_rrn(s.as_bytes()).then(|| path.clone()),
        Value::Number(n) => whole_number_text(n)
            .is_some_and(|digits| contains_rrn(digits.as_bytes()))
            .then(|| path.clone()),
        Value::Object(map) => map.iter().find_map(|(key, child)| {
            path.push('.');
            path.push_str(element_name(key));
            let found = if contains_rrn(key.as_bytes()) {
                Some(path.clone())
            } else {
                first_string_with_rrn(child, path)
            };
            path.truncate(len);
            found
        }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            path.push_str(&format!("[{i}]"));
            let found = first_string_with_rrn(item, path);
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// A JSON number without a fraction, as the 13 digits it would be as an
/// RRN (`9001011234568.0` included); `None` for a decimal. A number drops
/// an RRN's leading zeros (births 2000-2009), so 11 or 12 digits are padded
/// to 13; ten or fewer fit FHIR's 32-bit integers and are left alone.
fn whole_number_text(n: &serde_json::Number) -> Option<String> {
    let digits = if let Some(i) = n.as_u64() {
        i.to_string()
    } else if let Some(i) = n.as_i64() {
        i.unsigned_abs().to_string()
    } else {
        let f = n.as_f64()?;
        if f.fract() != 0.0 || f.abs() >= 1e15 {
            return None;
        }
        format!("{:.0}", f.abs())
    };
    Some(if (11..13).contains(&digits.len()) {
        format!("{digits:0>13}")
    } else {
        digits
    })
}

/// An object key as it may appear in a report: a FHIR element name as it
/// is, anything else (which could be data) as `…`.
pub(crate) fn element_name(key: &str) -> &str {
    let element = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if element { key } else { "…" }
}

/// The 13 digits of a Patient's resident registration number, from its
/// first identifier that says it is one (the KR Core RRN system, or type
/// NNKOR) and whose value is one (hyphen optional, valid date and check
/// digit); what its linkage token is made of. A value that only looks like
/// an RRN is stripped but links no one: another number that happens to
/// pass the check would link two people.
pub(crate) fn patient_rrn(patient: &Value) -> Option<String> {
    let identifiers = match patient.get("identifier")? {
        Value::Array(items) => items.iter().collect::<Vec<_>>(),
        one @ Value::Object(_) => vec![one],
        _ => return None,
    };
    identifiers
        .into_iter()
        .filter(|i| says_rrn(i))
        .filter_map(|i| i.get("value")?.as_str())
        .find_map(|v| {
            let v = v.trim();
            let digits: String = v.chars().filter(|c| *c != '-').collect();
            (digits.len() == 13
                && digits.bytes().all(|b| b.is_ascii_digit())
                && contains_rrn(v.as_bytes()))
            .then_some(digits)
        })
}

/// Whether an identifier says it is an RRN, by its system or type.
fn says_rrn(identifier: &Value) -> bool {
    let by_system = identifier.get("system").and_then(Value::as_str) == Some(RRN_SYSTEM);
    let by_type = identifier
        .pointer("/type/coding")
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings
                .iter()
                .any(|c| c.get("code").and_then(Value::as_str) == Some("NNKOR"))
        });
    by_system || by_type
}

fn is_rrn_identifier(identifier: &Value) -> bool {
    let by_value = identifier
        .get("value")
        .and_then(Value::as_str)
        .is_some_and(|v| contains_rrn(v.as_bytes()));
    says_rrn(identifier) || by_value
}

/// Whether `bytes` hold a resident registration number: 13 digits, hyphen
/// optional after the sixth, not part of a longer run or of a decimal, with
/// a real birth date and (unhyphenated) a valid check digit.
pub(crate) fn contains_rrn(bytes: &[u8]) -> bool {
    let digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let mut i = 0;
    while i + 13 <= bytes.len() {
        if !bytes[i].is_ascii_digit() || (i > 0 && digit(i - 1)) {
            i += 1;
            continue;
        }
        let hyphen = bytes.get(i + 6) == Some(&b'-');
        let rest = if hyphen { i + 7 } else { i + 6 };
        let end = rest + 7;
        // Thirteen digits running into or out of a decimal point are a
        // decimal's (an RRN written with a hyphen never is).
        let decimal = !hyphen
            && ((i >= 2 && bytes[i - 1] == b'.' && digit(i - 2))
                || (bytes.get(end) == Some(&b'.') && digit(end + 1)));
        let shaped = (0..6).all(|k| digit(i + k))
            && (0..7).all(|k| digit(rest + k))
            && !digit(end)
            && !decimal;
        if shaped {
            let digits: Vec<u8> = bytes[i..i + 6]
                .iter()
                .chain(&bytes[rest..end])
                .map(|b| b - b'0')
                .collect();
            if is_rrn(&digits, hyphen) {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether 13 digits are an RRN (see the module doc).
fn is_rrn(d: &[u8], hyphen: bool) -> bool {
    let century = match d[6] {
        1 | 2 | 5 | 6 => 1900,
        3 | 4 | 7 | 8 => 2000,
        _ => return false,
    };
    let year = century + i32::from(d[0]) * 10 + i32::from(d[1]);
    let Ok(month) = time::Month::try_from(d[2] * 10 + d[3]) else {
        return false;
    };
    let Ok(born) = time::Date::from_calendar_date(year, month, d[4] * 10 + d[5]) else {
        return false;
    };
    if born > time::OffsetDateTime::now_utc().date() {
        return false;
    }
    if hyphen {
        return true;
    }
    let new_scheme =
        time::Date::from_calendar_date(2020, time::Month::October, 1).expect("a real date");
    let (citizen, foreigner) = check_digits(d);
    born >= new_scheme || citizen == d[12] || (d[6] >= 5 && foreigner == d[12])
}

/// The check digits of numbers issued before October 2020: a citizen's,
/// and the one some foreigner registration numbers carry.
fn check_digits(d: &[u8]) -> (u8, u8) {
    const WEIGHTS: [u32; 12] = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5];
    let sum: u32 = d.iter().zip(WEIGHTS).map(|(&x, w)| u32::from(x) * w).sum();
    (((11 - sum % 11) % 10) as u8, ((13 - sum % 11) % 10) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patients_rrn_is_read_from_its_identifiers_only() {
        let patient = |identifier: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"resourceType":"Patient","id":"p","identifier":{identifier}}}"#
            ))
            .unwrap()
        };
        let hyphenated = patient(&format!(
            r#"[{{"system":"urn:local","value":"A-1"}},{{"system":"{RRN_SYSTEM}","value":"900101-1234567"}}]"#
        ));
        assert_eq!(patient_rrn(&hyphenated).as_deref(), Some("9001011234567"));
        let by_type = patient(r#"{"type":{"coding":[{"code":"NNKOR"}]},"value":"9001011234568"}"#);
        assert_eq!(patient_rrn(&by_type).as_deref(), Some("9001011234568"));
        // A value shaped like one under another system links no one.
        let by_value = patient(r#"{"system":"urn:mrn","value":"9001011234568"}"#);
        assert_eq!(patient_rrn(&by_value), None);
        // A system that says RRN over a value that is not one: no token.
        let bad = patient(&format!(
            r#"[{{"system":"{RRN_SYSTEM}","value":"901301-1234567"}}]"#
        ));
        assert_eq!(patient_rrn(&bad), None);
        assert_eq!(
            patient_rrn(&patient(r#"[{"system":"urn:local","value":"A-1"}]"#)),
            None
        );
    }

    #[test]
    fn recognises_rrns_and_not_other_numbers() {
        for yes in [
            "900101-1234567",     // hyphenated: a real date is enough
            "1.900101-1234567",   // hyphenated beside a point: not a decimal
            "9001011234568",      // unhyphenated, valid check digit
            "x 851231-2000000 y", // inside text
            "\"0303154000002\"",  // 2003, valid check digit
            "2103013123456",      // born 2021: no check digit since 2020-10
        ] {
            assert!(contains_rrn(yes.as_bytes()), "{yes}");
        }
        for no in [
            "900101-9234567",      // sex digit 9
            "901301-1234567",      // month 13
            "900230-1234567",      // 30 February
            "9001011234567",       // unhyphenated, wrong check digit
            "19001011234567",      // 14 digits
            "1700000000000",       // epoch milliseconds: month 00
            "010-1234-5678",       // phone number
            "2025-03-01T09:00:00", // a date
            "323.0707114835185",   // a decimal's fraction (issue 40)
            "0707114835185.25",    // a decimal's integer part
            "990101-3123456",      // born 2099: in the future
        ] {
            assert!(!contains_rrn(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn long_decimals_are_not_rrns_as_numbers_or_strings() {
        // Issue 40: a lab value with many decimals dropped whole patients.
        for value in ["323.0707114835185", "0.4012183120000003"] {
            let number = format!(
                r#"{{"resourceType":"Observation","id":"o1","valueQuantity":{{"value":{value}}}}}"#
            );
            let string =
                format!(r#"{{"resourceType":"Observation","id":"o1","valueString":"{value}"}}"#);
            for json in [number, string] {
                // Looked at decoded (the digits are a candidate), and kept.
                match screen(&json, RrnPolicy::Reject) {
                    Screened::Stripped { removed, .. } => assert!(removed.is_empty()),
                    other => panic!("{json}: expected kept, got {other:?}"),
                }
            }
        }
        // A whole number that is an RRN is one (review of issue 40), as
        // are RRNs beside a comma, and an RRN used as a key.
        for json in [
            r#"{"resourceType":"Observation","id":"o1","valueDecimal":9001011234568}"#,
            r#"{"resourceType":"Observation","id":"o1","note":[{"text":"9001011234568,9001011234568"}]}"#,
            r#"{"resourceType":"Observation","id":"o1","note":[{"text":"1,900101-1234567"}]}"#,
            r#"{"resourceType":"Observation","id":"o1","x":{"9001011234568":"y"}}"#,
            r#"{"resourceType":"Observation","id":"o1","valueDecimal":9001011234568.0}"#,
            r#"{"resourceType":"Observation","id":"o1","valueDecimal":303154000002}"#,
            r#"{"resourceType":"900101-1234567","id":"o1"}"#,
        ] {
            match screen(json, RrnPolicy::Strip) {
                Screened::Rejected(reason) => assert!(!reason.contains("900101"), "{reason}"),
                other => panic!("{json}: expected rejected, got {other:?}"),
            }
        }
    }

    const WITH_RRN: &str = r#"{"resourceType":"Patient","id":"p1","identifier":[
        {"system":"urn:ghx:chosun:mrn","value":"MRN1"},
        {"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"900101-1******"}],"gender":"male"}"#;

    #[test]
    fn rrn_identifiers_are_stripped_or_rejected_by_policy_and_named_by_path() {
        match screen(WITH_RRN, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } => {
                assert_eq!(removed, ["Patient.identifier[1]"]);
                assert!(json.contains("MRN1") && !json.contains("900101"), "{json}");
            }
            other => panic!("expected stripped, got {other:?}"),
        }
        match screen(WITH_RRN, RrnPolicy::Reject) {
            Screened::Rejected(reason) => {
                assert!(
                    reason.starts_with("Patient.identifier[1] carries"),
                    "{reason}"
                );
                assert!(!reason.contains("900101"), "{reason}");
            }
            other => panic!("expected rejected, got {other:?}"),
        }
        let clean = r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#;
        assert_eq!(screen(clean, RrnPolicy::Strip), Screened::Clean);
        // A reference's identifier is an identifier too.
        let reference = r#"{"resourceType":"Encounter","id":"e1","subject":{
            "identifier":{"system":"urn:x","value":"9001011234568"}}}"#;
        match screen(reference, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } => {
                assert_eq!(removed, ["Encounter.subject.identifier"]);
                assert!(!json.contains("9001011234568"), "{json}");
            }
            other => panic!("expected stripped, got {other:?}"),
        }
    }

    #[test]
    fn an_rrn_spelled_with_json_escapes_is_found_decoded() {
        // Issue 38 (8): a \u002d hyphen, or escaped digits, hide nothing.
        let hyphen = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"urn:ghx:chosun:mrn","value":"MRN1"},
            {"system":"urn:other","value":"900101\u002d1234567"}],"gender":"male"}"#;
        match screen(hyphen, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } => {
                assert_eq!(removed.len(), 1);
                assert!(
                    !json.contains("900101") && !json.contains("1234567"),
                    "{json}"
                );
            }
            other => panic!("expected stripped, got {other:?}"),
        }
        let digits = r#"{"resourceType":"Condition","id":"c1","note":[{"text":"RRN \u0039\u0030\u00301011234568"}]}"#;
        assert!(matches!(
            screen(digits, RrnPolicy::Strip),
            Screened::Rejected(_)
        ));
        let system = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"http://www.hl7korea.or.kr/Identifier/rr\u006e","value":"masked"}]}"#;
        assert!(matches!(
            screen(system, RrnPolicy::Strip),
            Screened::Stripped { ref removed, .. } if removed.len() == 1
        ));
        let slashes = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"http:\/\/www.hl7korea.or.kr\/Identifier\/rrn","value":"900101-1******"}]}"#;
        assert!(matches!(
            screen(slashes, RrnPolicy::Strip),
            Screened::Stripped { ref removed, .. } if removed.len() == 1
        ));
        // An escape that spells nothing of the kind is kept, decoded.
        let korean =
            r#"{"resourceType":"Patient","id":"p1","name":[{"text":"\ud64d\uae38\ub3d9"}]}"#;
        match screen(korean, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } if removed.is_empty() => {
                assert!(json.contains("홍길동"), "{json}")
            }
            other => panic!("expected the decoded text, got {other:?}"),
        }
    }

    #[test]
    fn an_rrn_outside_identifier_always_rejects_naming_the_element() {
        let note =
            r#"{"resourceType":"Condition","id":"c1","note":[{"text":"RRN 900101-1234567"}]}"#;
        match screen(note, RrnPolicy::Strip) {
            Screened::Rejected(reason) => {
                assert!(
                    reason.starts_with("Condition.note[0].text contains"),
                    "{reason}"
                );
                assert!(!reason.contains("900101"), "{reason}");
            }
            other => panic!("expected rejected, got {other:?}"),
        }
    }
}
