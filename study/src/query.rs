//! The ghx query language, version `ghx.query/v1`: a cohort of patients and an
//! aggregate analysis over it.
//!
//! A query travels as canonical JSON (see [`QuerySpec::canonical_json`]); the
//! capability for a study binds the SHA-256 of exactly those bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::Date;

/// The language version this crate speaks.
pub const VERSION: &str = "ghx.query/v1";

/// The KCD-8 code system as KR Core names it.
pub const KCD8_SYSTEM: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
/// ICD-10 (WHO), which KCD-8 extends.
pub const ICD10_SYSTEM: &str = "http://hl7.org/fhir/sid/icd-10";
/// LOINC.
pub const LOINC_SYSTEM: &str = "http://loinc.org";

/// Most grouping dimensions one query may ask for; more would make cells too
/// small to release anyway.
const MAX_DIMENSIONS: usize = 3;

/// A query that failed validation; the message names the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("query is not valid JSON for {VERSION}: {0}")]
    Syntax(String),
    #[error("unsupported query version `{0}`; this node speaks {VERSION}")]
    Version(String),
    #[error("cohort.conditions[{index}]: {problem}")]
    Condition { index: usize, problem: String },
    #[error("analysis.group_by: {0}")]
    GroupBy(String),
    #[error("cohort.observations[{index}]: {problem}")]
    Observation { index: usize, problem: String },
    #[error("cohort.age: {0}")]
    Age(String),
}

/// A versioned aggregate query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    pub version: String,
    pub cohort: Cohort,
    pub analysis: Analysis,
}

/// Which patients the analysis counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    /// The date ages are computed at; fixed in the query so that every node
    /// and every rerun computes the same ages.
    #[serde(with = "iso_date")]
    pub as_of: Date,
    /// Every listed condition must be recorded for the patient.
    #[serde(default)]
    pub conditions: Vec<CodeCriterion>,
    /// Every listed observation must be recorded for the patient, with a
    /// value in the range when one is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<ObservationCriterion>,
    /// Optional age range at `as_of`, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<AgeRange>,
}

/// An observation criterion: a code (LOINC, or a local code the node maps to
/// LOINC) and an optional inclusive value range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationCriterion {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// A coded criterion: a code system and a code or code prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeCriterion {
    pub system: String,
    pub code: String,
    #[serde(default, rename = "match")]
    pub matching: CodeMatch,
}

/// How a criterion's code is compared with recorded codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodeMatch {
    /// The recorded code equals the criterion's code.
    #[default]
    Exact,
    /// The recorded code starts with the criterion's code (E11 matches E11.9).
    Prefix,
}

/// Inclusive age bounds in whole years.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeRange {
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
}

/// What is computed over the cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Analysis {
    /// Number of distinct patients, optionally cross-tabulated.
    Count {
        #[serde(default)]
        group_by: Vec<Dimension>,
    },
}

/// A grouping dimension of a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// FHIR administrative gender: female, male, other, unknown.
    Sex,
    /// Ten-year age band at `as_of`: 0-9, 10-19, ..., 80-89, 90+.
    AgeBand,
}

impl Dimension {
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Sex => "sex",
            Dimension::AgeBand => "age_band",
        }
    }
}

/// The label of the ten-year age band with index `band` (age / 10, capped at 9).
pub fn age_band_label(band: i64) -> String {
    match band {
        b if b >= 9 => "90+".to_owned(),
        b if b < 0 => "unknown".to_owned(),
        b => format!("{}-{}", b * 10, b * 10 + 9),
    }
}

impl QuerySpec {
    /// Parses and validates a query document.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        // Check the version first so an old or new document gets a version
        // error rather than a confusing field error.
        match declared_version(json).map_err(Error::Syntax)? {
            Some(v) if v == VERSION => {}
            Some(other) => return Err(Error::Version(other)),
            None => return Err(Error::Syntax("missing field `version`".to_owned())),
        }
        let spec: QuerySpec =
            serde_json::from_slice(json).map_err(|e| Error::Syntax(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), Error> {
        for (index, criterion) in self.cohort.conditions.iter().enumerate() {
            let problem = |p: &str| Error::Condition {
                index,
                problem: p.to_owned(),
            };
            if !(criterion.system.starts_with("http://")
                || criterion.system.starts_with("https://")
                || criterion.system.starts_with("urn:"))
            {
                return Err(problem(
                    "system must be an absolute URI such as http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8",
                ));
            }
            let code_ok = !criterion.code.is_empty()
                && criterion.code.len() <= 32
                && criterion
                    .code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !code_ok {
                return Err(problem(
                    "code must be 1-32 characters of letters, digits, '.' and '-'",
                ));
            }
        }
        for (index, criterion) in self.cohort.observations.iter().enumerate() {
            let problem = |p: String| Error::Observation { index, problem: p };
            check_code(&criterion.system, &criterion.code).map_err(|p| problem(p.to_owned()))?;
            for bound in [criterion.min, criterion.max].into_iter().flatten() {
                if !bound.is_finite() {
                    return Err(problem("min and max must be finite numbers".to_owned()));
                }
            }
            if let (Some(min), Some(max)) = (criterion.min, criterion.max)
                && min > max
            {
                return Err(problem(format!("min {min} is greater than max {max}")));
            }
        }
        let Analysis::Count { group_by } = &self.analysis;
        if group_by.len() > MAX_DIMENSIONS {
            return Err(Error::GroupBy(format!(
                "at most {MAX_DIMENSIONS} dimensions, got {}",
                group_by.len()
            )));
        }
        for (i, d) in group_by.iter().enumerate() {
            if group_by[..i].contains(d) {
                return Err(Error::GroupBy(format!("`{}` is listed twice", d.name())));
            }
        }
        if let Some(AgeRange {
            min: Some(min),
            max: Some(max),
        }) = self.cohort.age
            && min > max
        {
            return Err(Error::Age(format!("min {min} is greater than max {max}")));
        }
        Ok(())
    }

    /// The canonical encoding: what travels and what the capability binds.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a query spec always serializes")
    }

    /// The FHIR resource types the query reads.
    pub fn resource_types(&self) -> std::collections::BTreeSet<String> {
        let mut types = std::collections::BTreeSet::from(["Patient".to_owned()]);
        if !self.cohort.conditions.is_empty() {
            types.insert("Condition".to_owned());
        }
        if !self.cohort.observations.is_empty() {
            types.insert("Observation".to_owned());
        }
        types
    }

    /// The grouping dimensions, in cell-key order.
    pub fn dimensions(&self) -> &[Dimension] {
        let Analysis::Count { group_by } = &self.analysis;
        group_by
    }
}

/// Checks a coded criterion's system and code.
fn check_code(system: &str, code: &str) -> Result<(), &'static str> {
    if !(system.starts_with("http://")
        || system.starts_with("https://")
        || system.starts_with("urn:"))
    {
        return Err(
            "system must be an absolute URI such as http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8",
        );
    }
    let code_ok = !code.is_empty()
        && code.len() <= 32
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !code_ok {
        return Err("code must be 1-32 characters of letters, digits, '.' and '-'");
    }
    Ok(())
}

/// The `version` a versioned JSON document declares, read before the rest
/// so that a document of another version gets a version error rather than
/// a confusing field error.
pub(crate) fn declared_version(json: &[u8]) -> Result<Option<String>, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<String>,
    }
    serde_json::from_slice::<Versioned>(json)
        .map(|v| v.version)
        .map_err(|e| e.to_string())
}

/// Hex SHA-256 of query bytes, as bound in a capability.
pub fn digest(json: &[u8]) -> String {
    hex::encode(Sha256::digest(json))
}

pub(crate) mod iso_date {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::{Date, format_description::well_known::Iso8601, macros::format_description};

    pub(crate) fn serialize<S: Serializer>(date: &Date, s: S) -> Result<S::Ok, S::Error> {
        let f = format_description!("[year]-[month]-[day]");
        s.serialize_str(&date.format(f).map_err(serde::ser::Error::custom)?)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = String::deserialize(d)?;
        Date::parse(&s, &Iso8601::DATE)
            .map_err(|_| D::Error::custom(format!("`{s}` is not a date of the form YYYY-MM-DD")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E11_BY_SEX_AGE: &str = r#"{
        "version": "ghx.query/v1",
        "cohort": {"as_of": "2026-01-01",
                   "conditions": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E11", "match": "prefix"}]},
        "analysis": {"kind": "count", "group_by": ["sex", "age_band"]}
    }"#;

    #[test]
    fn parses_and_round_trips_canonically() {
        let spec = QuerySpec::parse(E11_BY_SEX_AGE.as_bytes()).unwrap();
        assert_eq!(spec.dimensions(), &[Dimension::Sex, Dimension::AgeBand]);
        let canonical = spec.canonical_json();
        assert_eq!(QuerySpec::parse(&canonical).unwrap(), spec);
        assert_eq!(
            QuerySpec::parse(&canonical).unwrap().canonical_json(),
            canonical
        );
    }

    #[test]
    fn bad_queries_get_errors_that_name_the_problem() {
        let cases = [
            (
                r#"{"version":"ghx.query/v9"}"#,
                "unsupported query version `ghx.query/v9`",
            ),
            (r#"not json"#, "query is not valid JSON"),
            (r#"{"cohort":{}}"#, "missing field `version`"),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-13-01"},"analysis":{"kind":"count"}}"#,
                "`2026-13-01` is not a date",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"kcd","code":"E11"}]},"analysis":{"kind":"count"}}"#,
                "cohort.conditions[0]: system must be an absolute URI",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"urn:x","code":"E1%"}]},"analysis":{"kind":"count"}}"#,
                "cohort.conditions[0]: code must be",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex","sex"]}}"#,
                "analysis.group_by: `sex` is listed twice",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"mean"}}"#,
                "unknown variant `mean`",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","age":{"min":50,"max":40}},"analysis":{"kind":"count"}}"#,
                "cohort.age: min 50 is greater than max 40",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","observations":[{"system":"http://loinc.org","code":"4548-4","min":7,"max":6.5}]},"analysis":{"kind":"count"}}"#,
                "cohort.observations[0]: min 7 is greater than max 6.5",
            ),
            (
                r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","colour":"red"},"analysis":{"kind":"count"}}"#,
                "unknown field `colour`",
            ),
        ];
        for (json, expected) in cases {
            let err = QuerySpec::parse(json.as_bytes()).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{json}: got `{err}`, expected `{expected}`"
            );
        }
    }

    #[test]
    fn age_bands_are_ten_years_wide_and_open_at_ninety() {
        let labels: Vec<_> = [0, 4, 8, 9, 12].into_iter().map(age_band_label).collect();
        assert_eq!(labels, ["0-9", "40-49", "80-89", "90+", "90+"]);
    }
}
