//! What a resident asks for, in FHIR search parameters and their
//! semantics: `_type` (resource types, comma-separated), `date` (the
//! resource's clinical date, with the prefixes `ge`, `gt`, `le`, `lt`, `eq`
//! and the precision of the value written), `code` (tokens `system|code`,
//! `code` or `system|`, comma-separated, any of them) and `_lastUpdated`
//! (when the hospital's copy last changed). A date without a time zone is
//! Korean time (+09:00), as the hospitals' records are.

use serde_json::Value;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Why a scope is not understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "unknown search parameter `{0}` (the exchange takes _type, date, code and _lastUpdated)"
    )]
    UnknownParameter(String),
    #[error("search parameter `{0}` has no value")]
    Empty(String),
    #[error(
        "`{name}` value `{value}` is not a FHIR date with an optional prefix (ge, gt, le, lt, eq)"
    )]
    Date { name: String, value: String },
    #[error(
        "the scope names no resource types: `_type` is required (e.g. _type=Observation,Condition)"
    )]
    NoTypes,
    #[error("`{0}` is not a FHIR resource type name")]
    Type(String),
    #[error("`_type` appears more than once; list the types in one, comma-separated")]
    RepeatedTypes,
}

/// A half-open interval of Unix seconds; an open end is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interval {
    pub from: Option<i64>,
    /// Exclusive.
    pub to: Option<i64>,
}

impl Interval {
    fn narrow(&mut self, from: Option<i64>, to: Option<i64>) {
        if let Some(f) = from {
            self.from = Some(self.from.map_or(f, |x| x.max(f)));
        }
        if let Some(t) = to {
            self.to = Some(self.to.map_or(t, |x| x.min(t)));
        }
    }

    pub fn is_open(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    /// Whether the instant range `[start, end)` (a value of some
    /// precision) overlaps the interval, as FHIR date search matches.
    pub fn overlaps(&self, start: i64, end: i64) -> bool {
        self.from.is_none_or(|f| end > f) && self.to.is_none_or(|t| start < t)
    }
}

/// One `code` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeToken {
    /// `None`: any system.
    pub system: Option<String>,
    /// `None`: any code of the system (`system|`).
    pub code: Option<String>,
}

/// A parsed scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub types: Vec<String>,
    pub date: Interval,
    pub last_updated: Interval,
    /// Any of them matches; empty: no restriction.
    pub codes: Vec<CodeToken>,
}

/// Korean time, the hospitals' own.
const KST: i32 = 9 * 3600;

impl Scope {
    /// Parses `_type=...&date=ge...&code=...`.
    pub fn parse(text: &str) -> Result<Scope, Error> {
        let mut scope = Scope::default();
        let mut typed = false;
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            if value.is_empty() {
                return Err(Error::Empty(name.to_owned()));
            }
            match name {
                "_type" => {
                    if typed {
                        return Err(Error::RepeatedTypes);
                    }
                    typed = true;
                    for t in value.split(',') {
                        let valid = t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                            && t.chars().all(|c| c.is_ascii_alphanumeric());
                        if !valid {
                            return Err(Error::Type(t.to_owned()));
                        }
                        if !scope.types.iter().any(|x| x == t) {
                            scope.types.push(t.to_owned());
                        }
                    }
                }
                "date" | "_lastUpdated" => {
                    let (from, to) = date_bound(&value).ok_or_else(|| Error::Date {
                        name: name.to_owned(),
                        value: value.clone(),
                    })?;
                    let interval = if name == "date" {
                        &mut scope.date
                    } else {
                        &mut scope.last_updated
                    };
                    interval.narrow(from, to);
                }
                "code" => {
                    for token in value.split(',') {
                        scope.codes.push(match token.split_once('|') {
                            Some((system, code)) => CodeToken {
                                system: (!system.is_empty()).then(|| system.to_owned()),
                                code: (!code.is_empty()).then(|| code.to_owned()),
                            },
                            None => CodeToken {
                                system: None,
                                code: Some(token.to_owned()),
                            },
                        });
                    }
                }
                other => return Err(Error::UnknownParameter(other.to_owned())),
            }
        }
        if scope.types.is_empty() {
            return Err(Error::NoTypes);
        }
        Ok(scope)
    }

    /// Whether a resource of a type the scope names falls in its `date`
    /// and `code` (the Patient itself always does).
    pub fn selects(&self, resource: &Value, last_updated: Option<i64>) -> bool {
        let kind = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if kind == "Patient" {
            return true;
        }
        if !self.types.iter().any(|t| t == kind) {
            return false;
        }
        if !self.last_updated.is_open() {
            let stamp = resource
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(instant_range)
                .map(|(s, _)| s)
                .or(last_updated);
            match stamp {
                Some(s) if self.last_updated.overlaps(s, s + 1) => {}
                _ => return false,
            }
        }
        if !self.date.is_open() {
            match clinical_date(resource) {
                Some((start, end)) if self.date.overlaps(start, end) => {}
                _ => return false,
            }
        }
        if !self.codes.is_empty() {
            let codings = main_codings(resource);
            let hit = self.codes.iter().any(|token| {
                codings.iter().any(|(system, code)| {
                    token.system.as_deref().is_none_or(|s| s == system)
                        && token.code.as_deref().is_none_or(|c| same_code(c, code))
                })
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// Codes compare ignoring case and the dot KCD-8 and ICD-10 codes may be
/// written with.
fn same_code(a: &str, b: &str) -> bool {
    let strip = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '.')
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    a == b || strip(a) == strip(b)
}

/// The (system, code) pairs of a resource's main code element.
pub fn main_codings(resource: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for field in ["code", "medicationCodeableConcept", "vaccineCode", "type"] {
        if let Some(codings) = resource
            .get(field)
            .and_then(|c| c.get("coding"))
            .and_then(Value::as_array)
        {
            for coding in codings {
                if let Some(code) = coding.get("code").and_then(Value::as_str) {
                    let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
                    out.push((system.to_owned(), code.to_owned()));
                }
            }
            break;
        }
    }
    out
}

/// The elements FHIR's `date` search parameter reads, per resource type,
/// in order of preference.
fn date_elements(kind: &str) -> &'static [&'static str] {
    match kind {
        "Observation" | "DiagnosticReport" => &[
            "effectiveDateTime",
            "effectivePeriod",
            "effectiveInstant",
            "issued",
        ],
        "Condition" => &["onsetDateTime", "onsetPeriod", "recordedDate"],
        "Encounter" => &["period"],
        "MedicationRequest" => &["authoredOn"],
        "Procedure" => &["performedDateTime", "performedPeriod"],
        "Immunization" => &["occurrenceDateTime"],
        "AllergyIntolerance" => &["recordedDate", "onsetDateTime"],
        "Consent" => &["dateTime"],
        "CarePlan" => &["period"],
        _ => &["date", "effectiveDateTime", "period"],
    }
}

/// The `[start, end)` Unix seconds of a resource's clinical date, at the
/// precision it is written with.
pub fn clinical_date(resource: &Value) -> Option<(i64, i64)> {
    let kind = resource.get("resourceType")?.as_str()?;
    for element in date_elements(kind) {
        match resource.get(*element) {
            Some(Value::String(s)) => return instant_range(s),
            Some(Value::Object(period)) => {
                let start = period
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(instant_range);
                let end = period
                    .get("end")
                    .and_then(Value::as_str)
                    .and_then(instant_range);
                return match (start, end) {
                    (Some((s, _)), Some((_, e))) => Some((s, e.max(s + 1))),
                    (Some((s, _)), None) => Some((s, i64::MAX)),
                    (None, Some((_, e))) => Some((i64::MIN, e)),
                    (None, None) => None,
                };
            }
            _ => {}
        }
    }
    None
}

/// A prefixed search value as (from, to): `ge` and `gt` bound from below,
/// `le` and `lt` from above, `eq` (or none) both.
fn date_bound(value: &str) -> Option<(Option<i64>, Option<i64>)> {
    let (prefix, date) = match value.get(..2) {
        Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &value[2..]),
        _ => ("eq", value),
    };
    let (start, end) = instant_range(date)?;
    Some(match prefix {
        "ge" => (Some(start), None),
        "gt" => (Some(end), None),
        "le" => (None, Some(end)),
        "lt" => (None, Some(start)),
        _ => (Some(start), Some(end)),
    })
}

/// A FHIR date, dateTime or instant as the `[start, end)` of its
/// precision, in Unix seconds.
pub fn instant_range(text: &str) -> Option<(i64, i64)> {
    let kst = UtcOffset::from_whole_seconds(KST).ok()?;
    let day = |y: i32, m: u8, d: u8| -> Option<i64> {
        let date = Date::from_calendar_date(y, Month::try_from(m).ok()?, d).ok()?;
        Some(
            PrimitiveDateTime::new(date, time::Time::MIDNIGHT)
                .assume_offset(kst)
                .unix_timestamp(),
        )
    };
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    match text.len() {
        4 => {
            let y = num(text)? as i32;
            Some((day(y, 1, 1)?, day(y + 1, 1, 1)?))
        }
        7 if text.as_bytes()[4] == b'-' => {
            let y = num(&text[..4])? as i32;
            let m = num(&text[5..])? as u8;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Some((day(y, m, 1)?, day(ny, nm, 1)?))
        }
        10 if text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-' => {
            let s = day(
                num(&text[..4])? as i32,
                num(&text[5..7])? as u8,
                num(&text[8..])? as u8,
            )?;
            Some((s, s + 86_400))
        }
        _ => {
            let at = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .ok()?
                .unix_timestamp();
            Some((at, at + 1))
        }
    }
}

/// Decodes the few percent escapes a query string may carry (`%7C` for `|`,
/// `%3A`, `%2C`, `%2B`), leaving anything else as written.
fn percent_decode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(byte) = u8::from_str_radix(hex, 16)
            && byte.is_ascii()
        {
            out.push(byte as char);
            i += 3;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_scope_reads_types_dates_and_codes_as_fhir_search_does() {
        let scope = Scope::parse(
            "_type=Observation,Condition&date=ge2021-01-01&date=lt2026&code=http://loinc.org%7C4548-4,E11.9",
        )
        .unwrap();
        assert_eq!(scope.types, ["Observation", "Condition"]);
        let a1c = json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "effectiveDateTime": "2023-05-01T09:10:00+09:00"});
        assert!(scope.selects(&a1c, None));
        let old = json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "effectiveDateTime": "2020-12-31T23:59:00+09:00"});
        assert!(!scope.selects(&old, None));
        let kcd = json!({"resourceType": "Condition", "code": {"coding": [{"system": "x", "code": "E119"}]}, "onsetDateTime": "2025-12-31"});
        assert!(
            scope.selects(&kcd, None),
            "E11.9 matches E119, 2025 is before 2026"
        );
        let other = json!({"resourceType": "Condition", "code": {"coding": [{"system": "x", "code": "I10"}]}, "onsetDateTime": "2024"});
        assert!(!scope.selects(&other, None));
        let encounter = json!({"resourceType": "Encounter", "period": {"start": "2023-01-01"}});
        assert!(!scope.selects(&encounter, None), "a type not named");
        let undated = json!({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}});
        assert!(
            !scope.selects(&undated, None),
            "no date does not match a date filter"
        );
        let patient = json!({"resourceType": "Patient"});
        assert!(scope.selects(&patient, None));
    }

    #[test]
    fn bad_scopes_are_refused_by_name() {
        assert_eq!(Scope::parse("date=ge2020"), Err(Error::NoTypes));
        assert_eq!(
            Scope::parse("_type=Observation&subject=Patient/1"),
            Err(Error::UnknownParameter("subject".into()))
        );
        assert!(matches!(
            Scope::parse("_type=Observation&date=ge20-01"),
            Err(Error::Date { .. })
        ));
        assert_eq!(
            Scope::parse("_type=observation"),
            Err(Error::Type("observation".into()))
        );
        assert_eq!(Scope::parse("_type="), Err(Error::Empty("_type".into())));
    }

    #[test]
    fn dates_keep_their_precision() {
        let (s, e) = instant_range("2024-02").unwrap();
        assert_eq!(e - s, 29 * 86_400);
        let scope = Scope::parse("_type=Observation&date=eq2024-02-10").unwrap();
        assert_eq!(
            scope.date.to.zip(scope.date.from).map(|(t, f)| t - f),
            Some(86_400)
        );
        let scope =
            Scope::parse("_type=Observation&date=gt2024-02-10&_lastUpdated=ge2026-01-01").unwrap();
        assert_eq!(scope.date.from, instant_range("2024-02-11").map(|r| r.0));
        let obs = json!({"resourceType": "Observation", "effectiveDateTime": "2025-01-01"});
        let stored = instant_range("2026-03-01T00:00:00Z").unwrap().0;
        assert!(scope.selects(&obs, Some(stored)));
        assert!(!scope.selects(&obs, Some(stored - 100 * 86_400)));
    }
}
