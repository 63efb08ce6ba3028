//! Validation as strict as the FHIR R4 JSON format: what fhir-model's
//! deserialisation lets pass but the standard does not.
//!
//! fhir-model, like serde generally, ignores elements it does not know, so
//! `brithDate` or `MedicationAdministration.dosage.timing` would be stored
//! unseen. The check here compares the input with what the typed resource
//! serialises back to: an element of the input missing from the round trip
//! was not understood, and is reported with its path. Values the format
//! forbids are found on the input itself: empty strings, arrays and objects,
//! `null` outside arrays, and dates, date-times and instants not in FHIR's
//! form (the typed parse already refuses impossible calendar dates in the
//! elements it types; the form check also covers years like `20251`).
//!
//! Key decision: the check is structural, so it needs no schema of its own
//! and follows fhir-model's R4B types; where R4 and R4B differ (a handful of
//! resources ghx does not index) an R4 element unknown to R4B is reported.

use serde_json::Value;

/// One place where a resource departs from the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    /// FHIRPath-like location, e.g. `Patient.identifier[0].value`.
    pub(crate) path: String,
    pub(crate) rule: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.rule)
    }
}

pub(crate) const UNKNOWN: &str = "unknown element (not defined here in FHIR R4)";
pub(crate) const EMPTY: &str = "empty value (FHIR values are never empty)";
pub(crate) const NULL: &str = "null is not allowed here";
pub(crate) const DATE_FORM: &str =
    "not a FHIR date, dateTime or instant (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz)";

/// Compares a resource's input with its typed round trip.
pub(crate) fn check(resource_type: &str, input: &Value, round_trip: &Value) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut path = resource_type.to_owned();
    walk(input, Some(round_trip), &mut path, &mut findings);
    findings
}

/// A short reason naming at most three findings.
pub(crate) fn reason(findings: &[Finding]) -> String {
    let mut text = findings
        .iter()
        .take(3)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if findings.len() > 3 {
        text.push_str(&format!(" (and {} more)", findings.len() - 3));
    }
    text
}

fn walk(input: &Value, output: Option<&Value>, path: &mut String, findings: &mut Vec<Finding>) {
    let len = path.len();
    match input {
        Value::Object(map) => {
            for (key, value) in map {
                path.push('.');
                path.push_str(super::rrn::element_name(key));
                let known = output.and_then(|o| o.get(key));
                let rule = match value {
                    Value::Null => Some(NULL),
                    Value::String(s) if s.is_empty() => Some(EMPTY),
                    Value::Array(a) if a.is_empty() => Some(EMPTY),
                    Value::Object(o) if o.is_empty() => Some(EMPTY),
                    Value::String(s) if date_like(key) && !fhir_date_form(s) => Some(DATE_FORM),
                    _ if known.is_none() && output.is_some() => Some(UNKNOWN),
                    _ => None,
                };
                match rule {
                    Some(rule) => findings.push(Finding {
                        path: path.clone(),
                        rule,
                    }),
                    None => walk(value, known, path, findings),
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                // `null` holds a place in a primitive array whose `_name`
                // twin carries extensions; it is allowed there.
                if let Value::String(s) = item
                    && s.is_empty()
                {
                    findings.push(Finding {
                        path: path.clone(),
                        rule: EMPTY,
                    });
                } else if !item.is_null() {
                    walk(item, output.and_then(|o| o.get(i)), path, findings);
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Element names whose values are dates, date-times or instants in every
/// resource that has them.
fn date_like(key: &str) -> bool {
    key.ends_with("Date")
        || key.ends_with("DateTime")
        || key.ends_with("Instant")
        || matches!(
            key,
            "date" | "start" | "end" | "issued" | "authoredOn" | "lastUpdated" | "dateTime"
        )
}

/// FHIR's date / dateTime / instant form: `YYYY`, `YYYY-MM`, `YYYY-MM-DD`,
/// or a full date with `Thh:mm:ss`, optional fraction and a zone.
pub(crate) fn fhir_date_form(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|d| d.len() == range.len() && d.iter().all(u8::is_ascii_digit))
    };
    let two = |at: usize| -> Option<u8> {
        digits(at..at + 2).then(|| (b[at] - b'0') * 10 + (b[at + 1] - b'0'))
    };
    if !digits(0..4) || &b[..4] == b"0000" {
        return false;
    }
    if b.len() == 4 {
        return true;
    }
    if b.get(4) != Some(&b'-') || !two(5).is_some_and(|m| (1..=12).contains(&m)) {
        return false;
    }
    if b.len() == 7 {
        return true;
    }
    if b.get(7) != Some(&b'-') || !two(8).is_some_and(|d| (1..=31).contains(&d)) {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    let time_ok = b.get(10) == Some(&b'T')
        && two(11).is_some_and(|h| h <= 23)
        && b.get(13) == Some(&b':')
        && two(14).is_some_and(|m| m <= 59)
        && b.get(16) == Some(&b':')
        && two(17).is_some_and(|s| s <= 60);
    if !time_ok {
        return false;
    }
    let mut at = 19;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return false;
        }
    }
    match b.get(at) {
        Some(b'Z') => at + 1 == b.len(),
        Some(b'+' | b'-') => {
            at + 6 == b.len()
                && two(at + 1).is_some_and(|h| h <= 14)
                && b[at + 3] == b':'
                && two(at + 4).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_date_forms() {
        for ok in [
            "2025",
            "2025-03",
            "2025-03-01",
            "2025-03-01T09:00:00+09:00",
            "2025-03-01T09:00:00.123Z",
        ] {
            assert!(fhir_date_form(ok), "{ok}");
        }
        for bad in [
            "20251",
            "2025-13-45",
            "2025-3-1",
            "2025-03-01T09:00",
            "2025-03-01T09:00:00",
            "2025-03-01 09:00:00Z",
            "0000",
            "+2025-01-01",
        ] {
            assert!(!fhir_date_form(bad), "{bad}");
        }
    }

    #[test]
    fn unknown_and_empty_elements_are_found_by_path() {
        let input: Value = serde_json::from_str(
            r#"{"resourceType":"Patient","id":"p","brithDate":"1970","name":[{"family":"","given":["A",null]}],
                "identifier":[{"identifer":"x"}],"gender":null,"address":[]}"#,
        )
        .unwrap();
        let output: Value = serde_json::from_str(
            r#"{"resourceType":"Patient","id":"p","name":[{"given":["A"]}],"identifier":[{}]}"#,
        )
        .unwrap();
        let mut got: Vec<String> = check("Patient", &input, &output)
            .iter()
            .map(ToString::to_string)
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                format!("Patient.address: {EMPTY}"),
                format!("Patient.brithDate: {UNKNOWN}"),
                format!("Patient.gender: {NULL}"),
                format!("Patient.identifier[0].identifer: {UNKNOWN}"),
                format!("Patient.name[0].family: {EMPTY}"),
            ]
        );
    }
}
