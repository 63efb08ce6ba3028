//! Resident registration numbers (주민등록번호) never enter the store.
//!
//! A node has no use for them: patients are identified by hospital-local
//! ids. Every resource is screened before it is stored. An identifier that is
//! an RRN (KR Core's RRN identifier system, identifier type `NNKOR`, or a
//! value shaped like one) is stripped from `identifier` with a warning, or the
//! resource is rejected, as the node's policy says. A value shaped like an
//! RRN anywhere else (a note, a narrative) cannot be removed safely, so that
//! resource is always rejected.
//!
//! Shape: `YYMMDD-GNNNNNN` or the 13 digits without the hyphen, where YYMMDD
//! is a plausible date and G (1-8) encodes sex and century. Check digits are
//! not used: numbers issued since October 2020 do not have them.

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

/// The result of screening one resource.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Screened {
    /// Nothing RRN-like: store the JSON as it is.
    Clean,
    /// The resource was parsed and screened: store this JSON (decoded and
    /// re-serialised) instead; `removed` RRN identifiers were taken out.
    Stripped { json: String, removed: usize },
    /// The resource must not be stored.
    Rejected(String),
}

/// Screens one resource's JSON. Detection works on decoded values: a
/// document with an escape anywhere (`\u0039` could spell a digit, `\u002d`
/// a hyphen, `\/` a slash of the RRN system) is parsed and screened as
/// decoded, as is one whose raw text looks suspicious.
pub(crate) fn screen(json: &str, policy: RrnPolicy) -> Screened {
    let suspicious = contains_rrn_shape(json.as_bytes())
        || json.contains(RRN_SYSTEM)
        || json.contains("NNKOR")
        || json.contains('\\');
    if !suspicious {
        return Screened::Clean;
    }
    let Ok(mut value) = serde_json::from_str::<Value>(json) else {
        // Invalid JSON is rejected by validation with its own reason.
        return Screened::Clean;
    };
    let mut removed = 0;
    if let Some(Value::Array(identifiers)) = value.get_mut("identifier") {
        let before = identifiers.len();
        identifiers.retain(|identifier| !is_rrn_identifier(identifier));
        removed = before - identifiers.len();
        if identifiers.is_empty() {
            value.as_object_mut().map(|o| o.remove("identifier"));
        }
    }
    if removed > 0 && policy == RrnPolicy::Reject {
        return Screened::Rejected(format!(
            "identifier carries a resident registration number ({removed} found); this node's policy rejects such resources"
        ));
    }
    let json = serde_json::to_string(&value).expect("a parsed value serializes");
    // serde_json writes no escapes for digits, hyphens or letters, so the
    // text checked here is the decoded one.
    if contains_rrn_shape(json.as_bytes()) || json.contains(RRN_SYSTEM) {
        return Screened::Rejected(
            "contains a value shaped like a resident registration number outside identifier; remove it at the source"
                .to_owned(),
        );
    }
    // What was screened is what is stored: the decoded, re-serialised text
    // (where the raw text and its parse could differ, duplicate keys say,
    // the raw text was not what was checked).
    Screened::Stripped { json, removed }
}

fn is_rrn_identifier(identifier: &Value) -> bool {
    let by_system = identifier.get("system").and_then(Value::as_str) == Some(RRN_SYSTEM);
    let by_type = identifier
        .pointer("/type/coding")
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings
                .iter()
                .any(|c| c.get("code").and_then(Value::as_str) == Some("NNKOR"))
        });
    let by_value = identifier
        .get("value")
        .and_then(Value::as_str)
        .is_some_and(|v| contains_rrn_shape(v.as_bytes()));
    by_system || by_type || by_value
}

/// Whether `bytes` contain 13 digits shaped like an RRN, with or without the
/// hyphen, not part of a longer run of digits.
pub(crate) fn contains_rrn_shape(bytes: &[u8]) -> bool {
    let digit = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let mut i = 0;
    while i + 13 <= bytes.len() {
        if !bytes[i].is_ascii_digit() || (i > 0 && digit(i - 1)) {
            i += 1;
            continue;
        }
        let six = (0..6).all(|k| digit(i + k));
        if six {
            let rest = if bytes.get(i + 6) == Some(&b'-') {
                i + 7
            } else {
                i + 6
            };
            let seven = (0..7).all(|k| digit(rest + k)) && !digit(rest + 7);
            if seven && plausible(&bytes[i..i + 6], bytes[rest]) {
                return true;
            }
        }
        i += 1;
    }
    false
}

fn plausible(yymmdd: &[u8], sex_digit: u8) -> bool {
    let n = |a: usize| u32::from(yymmdd[a] - b'0') * 10 + u32::from(yymmdd[a + 1] - b'0');
    let (month, day) = (n(2), n(4));
    (1..=12).contains(&month) && (1..=31).contains(&day) && (b'1'..=b'8').contains(&sex_digit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_rrn_shapes_and_not_other_numbers() {
        for yes in [
            "900101-1234567",
            "9001011234567",
            "x 851231-2000000 y",
            "\"0303154000001\"",
        ] {
            assert!(contains_rrn_shape(yes.as_bytes()), "{yes}");
        }
        for no in [
            "900101-9234567",      // sex digit 9
            "901301-1234567",      // month 13
            "19001011234567",      // 14 digits
            "1700000000000",       // epoch milliseconds: month 00
            "010-1234-5678",       // phone number
            "2025-03-01T09:00:00", // a date
        ] {
            assert!(!contains_rrn_shape(no.as_bytes()), "{no}");
        }
    }

    const WITH_RRN: &str = r#"{"resourceType":"Patient","id":"p1","identifier":[
        {"system":"urn:ghx:chosun:mrn","value":"MRN1"},
        {"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"900101-1******"}],"gender":"male"}"#;

    #[test]
    fn rrn_identifiers_are_stripped_or_rejected_by_policy() {
        match screen(WITH_RRN, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } => {
                assert_eq!(removed, 1);
                assert!(json.contains("MRN1") && !json.contains("900101"), "{json}");
            }
            other => panic!("expected stripped, got {other:?}"),
        }
        assert!(matches!(
            screen(WITH_RRN, RrnPolicy::Reject),
            Screened::Rejected(_)
        ));
        let clean = r#"{"resourceType":"Patient","id":"p1","gender":"male"}"#;
        assert_eq!(screen(clean, RrnPolicy::Strip), Screened::Clean);
    }

    #[test]
    fn an_rrn_spelled_with_json_escapes_is_found_decoded() {
        // Issue 38 (8): a \u002d hyphen, or escaped digits, hide nothing.
        let hyphen = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"urn:ghx:chosun:mrn","value":"MRN1"},
            {"system":"urn:other","value":"900101\u002d1234567"}],"gender":"male"}"#;
        match screen(hyphen, RrnPolicy::Strip) {
            Screened::Stripped { json, removed } => {
                assert_eq!(removed, 1);
                assert!(
                    !json.contains("900101") && !json.contains("1234567"),
                    "{json}"
                );
            }
            other => panic!("expected stripped, got {other:?}"),
        }
        let digits = r#"{"resourceType":"Condition","id":"c1","note":[{"text":"RRN \u0039\u0030\u00301011234567"}]}"#;
        assert!(matches!(
            screen(digits, RrnPolicy::Strip),
            Screened::Rejected(_)
        ));
        let system = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"http://www.hl7korea.or.kr/Identifier/rr\u006e","value":"masked"}]}"#;
        assert!(matches!(
            screen(system, RrnPolicy::Strip),
            Screened::Stripped { removed: 1, .. }
        ));
        let slashes = r#"{"resourceType":"Patient","id":"p1","identifier":[
            {"system":"http:\/\/www.hl7korea.or.kr\/Identifier\/rrn","value":"900101-1******"}]}"#;
        assert!(matches!(
            screen(slashes, RrnPolicy::Strip),
            Screened::Stripped { removed: 1, .. }
        ));
        // An escape that spells nothing of the kind is kept, decoded.
        let korean =
            r#"{"resourceType":"Patient","id":"p1","name":[{"text":"\ud64d\uae38\ub3d9"}]}"#;
        match screen(korean, RrnPolicy::Strip) {
            Screened::Stripped { json, removed: 0 } => assert!(json.contains("홍길동"), "{json}"),
            other => panic!("expected the decoded text, got {other:?}"),
        }
    }

    #[test]
    fn an_rrn_outside_identifier_always_rejects() {
        let note =
            r#"{"resourceType":"Condition","id":"c1","note":[{"text":"RRN 900101-1234567"}]}"#;
        assert!(matches!(
            screen(note, RrnPolicy::Strip),
            Screened::Rejected(_)
        ));
    }
}
