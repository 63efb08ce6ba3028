//! Study manifests (`ghx.manifest/v1`): everything a study may do, as the
//! steering committee approves it and as every node checks it.
//!
//! A manifest names the requester, the coded purpose, the ethics approval,
//! the data it touches (resource types and codes), the exact queries, the
//! minimum cell size per node, the privacy budget and the validity period.
//! The coordinator approves a manifest, not a query; each capability binds
//! the SHA-256 of the canonical manifest and of one of its queries, and a
//! node re-checks the manifest itself, so work outside it is refused at the
//! node even if the coordinator were not trustworthy.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::Date;

use crate::query::{self, CodeCriterion, CodeMatch, QuerySpec};
use crate::training::{self, TrainingSpec};

/// The manifest version this crate speaks.
pub const VERSION: &str = "ghx.manifest/v1";

/// Most queries one manifest may hold.
const MAX_QUERIES: usize = 64;

/// The most days `valid_until` may be after `valid_from`: under the audit
/// log's minimum retention (730 days), with a day to spare for time zones.
/// What a node counts per study from its audit log (the study's evaluation
/// rounds) then stays counted for as long as the study can run: no entry
/// it counts expires before the study does.
pub const MAX_VALIDITY_DAYS: i64 = 728;

/// A manifest that is malformed, or work it does not cover.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("manifest is not valid JSON for {VERSION}: {0}")]
    Syntax(String),
    #[error("unsupported manifest version `{0}`; expected {VERSION}")]
    Version(String),
    #[error("manifest `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    #[error("manifest query `{name}`: {source}")]
    Query { name: String, source: query::Error },
    #[error("query `{name}` reads {what}, which the manifest's `data` does not declare")]
    Undeclared { name: String, what: String },
    #[error("the query is not one of the manifest's queries")]
    QueryNotInManifest,
    #[error("manifest training `{name}`: {source}")]
    Training {
        name: String,
        source: training::Error,
    },
    #[error("the training is not one of the manifest's trainings")]
    TrainingNotInManifest,
    #[error("the manifest is valid from {from} until {until}; today is {today}")]
    OutsideValidity {
        from: String,
        until: String,
        today: String,
    },
}

/// Who asked: set by the coordinator from the requester's certificate,
/// never taken from the file they submit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requester {
    pub organisation: String,
    pub user: String,
}

/// The research-ethics approval the study rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EthicsApproval {
    /// The IRB or data review committee.
    pub committee: String,
    /// Its approval number.
    pub reference: String,
    #[serde(with = "crate::query::iso_date")]
    pub approved_on: Date,
}

/// The data a study declares it touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDeclaration {
    /// FHIR resource types read.
    pub resource_types: BTreeSet<String>,
    /// Codes the queries may select on; a prefix covers every code under it.
    pub codes: Vec<CodeCriterion>,
}

/// One named query of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedQuery {
    pub name: String,
    pub query: QuerySpec,
}

/// Minimum cell sizes: a default and per-node overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellSizes {
    pub default: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, u32>,
}

impl CellSizes {
    pub fn for_node(&self, node: &str) -> u32 {
        self.nodes.get(node).copied().unwrap_or(self.default)
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A study manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyManifest {
    pub version: String,
    pub title: String,
    #[serde(default)]
    pub requester: Requester,
    /// HL7 v3 ActReason code.
    pub purpose: String,
    pub ethics: EthicsApproval,
    pub data: DataDeclaration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<NamedQuery>,
    /// Federated model trainings the study may run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trainings: Vec<TrainingSpec>,
    pub min_cell_size: CellSizes,
    /// Differential-privacy budget (total epsilon) the study may spend at
    /// each node.
    pub privacy_budget: f64,
    /// Total delta the study may spend at each node (Gaussian noise);
    /// zero admits only pure-epsilon (Laplace) noise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub privacy_delta: f64,
    #[serde(with = "crate::query::iso_date")]
    pub valid_from: Date,
    #[serde(with = "crate::query::iso_date")]
    pub valid_until: Date,
}

/// Checks the name of a query, training or feature.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err("must be 1-64 letters, digits, '-' or '_'")
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

impl StudyManifest {
    /// Parses and validates a manifest document.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        match query::declared_version(json).map_err(Error::Syntax)? {
            Some(v) if v == VERSION => {}
            Some(other) => return Err(Error::Version(other)),
            None => return Err(Error::Syntax("missing field `version`".to_owned())),
        }
        let manifest: StudyManifest =
            serde_json::from_slice(json).map_err(|e| Error::Syntax(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.title.trim().is_empty() {
            return Err(invalid("title", "must not be empty"));
        }
        crate::purpose::check(&self.purpose).map_err(|e| invalid("purpose", e.to_string()))?;
        if self.ethics.reference.trim().is_empty() || self.ethics.committee.trim().is_empty() {
            return Err(invalid(
                "ethics",
                "needs the approving committee and its reference number",
            ));
        }
        if self.valid_until < self.valid_from {
            return Err(invalid("valid_until", "is before valid_from"));
        }
        if self.min_cell_size.default == 0 || self.min_cell_size.nodes.values().any(|n| *n == 0) {
            return Err(invalid("min_cell_size", "every size must be at least 1"));
        }
        if !(self.privacy_budget.is_finite() && self.privacy_budget >= 0.0) {
            return Err(invalid(
                "privacy_budget",
                "must be a finite, non-negative epsilon",
            ));
        }
        if !(self.privacy_delta.is_finite() && (0.0..1e-3).contains(&self.privacy_delta)) {
            return Err(invalid(
                "privacy_delta",
                "must be at least 0 and below 0.001",
            ));
        }
        let work = self.queries.len() + self.trainings.len();
        if work == 0 || work > MAX_QUERIES {
            return Err(invalid(
                "queries",
                format!("queries and trainings together must number 1 to {MAX_QUERIES}"),
            ));
        }
        for (i, q) in self.queries.iter().enumerate() {
            check_name(&q.name).map_err(|p| invalid(&format!("queries[{i}].name"), p))?;
            if self.queries[..i].iter().any(|other| other.name == q.name) {
                return Err(invalid(
                    &format!("queries[{i}].name"),
                    format!("`{}` is used twice", q.name),
                ));
            }
            // Re-parse the canonical form so a manifest's queries obey
            // exactly the rules of a query sent on its own.
            QuerySpec::parse(&q.query.canonical_json()).map_err(|source| Error::Query {
                name: q.name.clone(),
                source,
            })?;
            self.check_declared(&q.name, &q.query)?;
        }
        self.check_fixed_bounds()?;
        for (i, t) in self.trainings.iter().enumerate() {
            if self.trainings[..i].iter().any(|other| other.name == t.name) {
                return Err(invalid(
                    &format!("trainings[{i}].name"),
                    format!("`{}` is used twice", t.name),
                ));
            }
            t.validate().map_err(|source| Error::Training {
                name: t.name.clone(),
                source,
            })?;
            for q in t.queries() {
                self.check_declared(&t.name, &q)?;
            }
            // A noised training must be affordable in full: its rounds are
            // charged one by one at each node, and one refused halfway
            // leaves a half-trained model.
            let training_epsilon = match &t.privacy {
                Some(privacy) => {
                    let epsilon = privacy.epsilon_after(u64::from(t.rounds));
                    // The nodes' ledgers allow the same rounding slack.
                    if epsilon > self.privacy_budget + 1e-9 || privacy.delta > self.privacy_delta {
                        return Err(invalid(
                            &format!("trainings[{i}].privacy"),
                            format!(
                                "{} rounds cost epsilon {epsilon:.3} at delta {:e}; the study's \
                                 budget is epsilon {} and delta {:e}",
                                t.rounds, privacy.delta, self.privacy_budget, self.privacy_delta
                            ),
                        ));
                    }
                    epsilon
                }
                None => 0.0,
            };
            // A whole run must be affordable with its evaluation.
            if let Some(validation) = &t.validation
                && training_epsilon + validation.epsilon > self.privacy_budget + 1e-9
            {
                return Err(invalid(
                    &format!("trainings[{i}].validation"),
                    format!(
                        "an evaluation costs epsilon {}{}; the study's budget is epsilon {}",
                        validation.epsilon,
                        if training_epsilon > 0.0 {
                            format!(" after the training's {training_epsilon:.3}")
                        } else {
                            String::new()
                        },
                        self.privacy_budget
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Exact summaries of one measurement share one clip range, and exact
    /// histograms one set of bins: nodes fix them per organisation at the
    /// first release and refuse others, so a manifest that mixes them
    /// could not run all its queries.
    fn check_fixed_bounds(&self) -> Result<(), Error> {
        let mut seen: Vec<(String, &str, String, &str)> = Vec::new();
        for q in self.queries.iter().filter(|q| q.query.noise.is_none()) {
            let (variable, kind, bounds) = match &q.query.analysis {
                query::Analysis::Summary { variable, clip, .. } => {
                    (variable, "clip range", format!("{clip:?}"))
                }
                query::Analysis::Histogram { variable, bins, .. } => {
                    (variable, "bins", format!("{bins:?}"))
                }
                _ => continue,
            };
            if matches!(variable, query::Variable::View { .. }) {
                return Err(invalid(
                    "queries",
                    format!(
                        "`{}`: an exact summary or histogram of a view column is not released (a view computes its column, so no clip range bounds it); add noise",
                        q.name
                    ),
                ));
            }
            let measurement = variable.measurement();
            let earlier = seen
                .iter()
                .find(|(m, k, b, _)| *m == measurement && *k == kind && *b != bounds);
            if let Some((_, _, _, other)) = earlier {
                return Err(invalid(
                    "queries",
                    format!(
                        "`{other}` and `{}`: exact analyses of {measurement} must share one {kind} (two give, by difference, what the patients between them hold)",
                        q.name
                    ),
                ));
            }
            seen.push((measurement, kind, bounds, &q.name));
        }
        Ok(())
    }

    /// Every resource type and code a query reads must be declared.
    fn check_declared(&self, name: &str, query: &QuerySpec) -> Result<(), Error> {
        let undeclared = |what: String| Error::Undeclared {
            name: name.to_owned(),
            what,
        };
        for ty in query.resource_types() {
            if !self.data.resource_types.contains(&ty) {
                return Err(undeclared(format!("resource type {ty}")));
            }
        }
        let criteria = query
            .codes_read()
            .into_iter()
            .map(|r| (r.system, r.code, r.matching));
        for (system, code, matching) in criteria {
            let covered = self.data.codes.iter().any(|d| {
                d.system == system
                    && match d.matching {
                        CodeMatch::Exact => matching == CodeMatch::Exact && d.code == code,
                        CodeMatch::Prefix => code.starts_with(d.code.as_str()),
                    }
            });
            if !covered {
                let star = if matching == CodeMatch::Prefix {
                    "*"
                } else {
                    ""
                };
                return Err(undeclared(format!("code {system}|{code}{star}")));
            }
        }
        Ok(())
    }

    /// The canonical encoding, whose digest capabilities bind.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    /// Hex SHA-256 of the canonical encoding.
    pub fn digest(&self) -> String {
        query::digest(&self.canonical_json())
    }

    /// The manifest's query whose canonical bytes are `query_json`.
    pub fn query_for(&self, query_json: &[u8]) -> Result<&NamedQuery, Error> {
        let wanted = query::digest(query_json);
        self.queries
            .iter()
            .find(|q| query::digest(&q.query.canonical_json()) == wanted)
            .ok_or(Error::QueryNotInManifest)
    }

    /// The manifest's training whose canonical bytes are `training_json`.
    pub fn training_for(&self, training_json: &[u8]) -> Result<&TrainingSpec, Error> {
        let wanted = query::digest(training_json);
        self.trainings
            .iter()
            .find(|t| query::digest(&t.canonical_json()) == wanted)
            .ok_or(Error::TrainingNotInManifest)
    }

    /// The manifest's training named `name`.
    pub fn training_named(&self, name: &str) -> Option<&TrainingSpec> {
        self.trainings.iter().find(|t| t.name == name)
    }

    /// The manifest's query named `name`.
    pub fn query_named(&self, name: &str) -> Option<&NamedQuery> {
        self.queries.iter().find(|q| q.name == name)
    }

    /// Whether the validity period is at most [`MAX_VALIDITY_DAYS`]: checked
    /// where a study is submitted and where a node admits a request, not on
    /// every parse, so that a stored study from before still reads.
    pub fn check_validity_span(&self) -> Result<(), Error> {
        if (self.valid_until - self.valid_from).whole_days() > MAX_VALIDITY_DAYS {
            return Err(invalid(
                "valid_until",
                format!(
                    "is more than {MAX_VALIDITY_DAYS} days after valid_from: a study is approved for under two years (a node counts a study's evaluations from its audit log, which keeps two years); submit it again for the years after"
                ),
            ));
        }
        Ok(())
    }

    /// Whether `today` is inside the validity period.
    pub fn check_valid_on(&self, today: Date) -> Result<(), Error> {
        if today < self.valid_from || today > self.valid_until {
            return Err(Error::OutsideValidity {
                from: self.valid_from.to_string(),
                until: self.valid_until.to_string(),
                today: today.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../deploy/examples/study-e11.json");

    #[test]
    fn the_example_manifest_parses_and_round_trips() {
        let m = StudyManifest::parse(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(m.min_cell_size.for_node("chosun"), 10);
        let again = StudyManifest::parse(&m.canonical_json()).unwrap();
        assert_eq!(again, m);
        let q = &m.queries[0];
        assert_eq!(m.query_for(&q.query.canonical_json()).unwrap().name, q.name);
        assert_eq!(m.query_for(b"{}").unwrap_err(), Error::QueryNotInManifest);
    }

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        edit(&mut v);
        StudyManifest::parse(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_manifests_name_the_problem() {
        let e = edited(|v| v["purpose"] = "research".into());
        assert!(
            e.starts_with("manifest `purpose`: unknown purpose `research`"),
            "{e}"
        );
        let e = edited(|v| v["valid_until"] = "2020-01-01".into());
        assert_eq!(e, "manifest `valid_until`: is before valid_from");
        // valid_from 2026-11-01: 728 days on is the last day allowed.
        let span = |until: &str| {
            let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
            v["valid_until"] = until.into();
            StudyManifest::parse(v.to_string().as_bytes())
                .unwrap()
                .check_validity_span()
                .map_err(|e| e.to_string())
        };
        assert!(span("2028-10-29").is_ok());
        let e = span("2028-10-30").unwrap_err();
        assert!(e.contains("is more than 728 days after valid_from"), "{e}");
        let e = edited(|v| v["data"]["resource_types"] = serde_json::json!(["Patient"]));
        assert!(e.contains("reads resource type Condition"), "{e}");
        let e = edited(|v| v["data"]["codes"][0]["code"] = "E10".into());
        assert!(
            e.contains("reads code http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8|E11*"),
            "{e}"
        );
        let e = edited(|v| v["queries"][0]["query"]["analysis"]["kind"] = "median".into());
        assert!(e.contains("unknown variant `median`"), "{e}");
        let e = edited(|v| v["ethics"]["reference"] = "".into());
        assert!(e.contains("`ethics`"), "{e}");
        let e = edited(|v| v["version"] = "ghx.manifest/v0".into());
        assert!(e.contains("unsupported manifest version"), "{e}");
        let e = edited(|v| v["privacy_delta"] = 0.01.into());
        assert_eq!(
            e,
            "manifest `privacy_delta`: must be at least 0 and below 0.001"
        );
    }

    #[test]
    fn exact_analyses_of_one_measurement_share_their_clip_range_and_bins() {
        let statistics = include_str!("../../deploy/examples/study-e11-statistics.json");
        let mut v: serde_json::Value = serde_json::from_str(statistics).unwrap();
        assert!(StudyManifest::parse(v.to_string().as_bytes()).is_ok());
        let mut second = v["queries"][0].clone();
        second["name"] = "hba1c-clipped".into();
        second["query"]["analysis"]["clip"] = serde_json::json!({"min": 4, "max": 12});
        v["queries"].as_array_mut().unwrap().push(second.clone());
        let e = StudyManifest::parse(v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "manifest `queries`: `hba1c-by-sex` and `hba1c-clipped`: exact analyses of observation http://loinc.org|4548-4 must share one clip range (two give, by difference, what the patients between them hold)"
        );
        // Noised, the clip range calibrates the noise and may differ.
        let last = v["queries"].as_array().unwrap().len() - 1;
        v["queries"][last]["query"]["noise"] =
            serde_json::json!({"mechanism": "laplace", "epsilon": 0.1});
        assert!(StudyManifest::parse(v.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn validity_is_checked_by_day() {
        let m = StudyManifest::parse(EXAMPLE.as_bytes()).unwrap();
        assert!(m.check_valid_on(m.valid_from).is_ok());
        assert!(m.check_valid_on(m.valid_until).is_ok());
        let after = m.valid_until.next_day().unwrap();
        assert!(matches!(
            m.check_valid_on(after),
            Err(Error::OutsideValidity { .. })
        ));
    }
}
