//! Training specifications (part of a `ghx.manifest/v1` study) and the
//! model document a training run produces.
//!
//! A training names a cohort, features and a label in the query language's
//! own terms: each numeric feature is a query [`Variable`] (age, an
//! observation, a SQL-on-FHIR view column), a sex feature is an indicator,
//! and the label is an [`Event`] like a rate's. Each feature and the label
//! compile to an ordinary query over the same cohort
//! ([`TrainingSpec::feature_queries`], [`TrainingSpec::label_query`]), so a
//! node extracts them with the same engine, consent rules and sensitive-
//! category exclusions as any aggregate query, and the manifest's data
//! declaration covers them the same way.

use serde::{Deserialize, Serialize};

use crate::query::{self, Analysis, Cohort, Event, QuerySpec, Sex, Variable};

/// Most features one model may use.
pub const MAX_FEATURES: usize = 64;
/// Most rounds one training may run.
pub const MAX_ROUNDS: u32 = 1000;

/// What is wrong with a training specification.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("training `{field}`: {problem}")]
    Invalid { field: String, problem: String },
    #[error("training feature `{feature}`: {source}")]
    Feature {
        feature: String,
        source: query::Error,
    },
    #[error("training label: {0}")]
    Label(query::Error),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// One input of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub name: String,
    /// A numeric variable of the query language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variable: Option<Variable>,
    /// Or: 1 when the patient's administrative sex is this one, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex_is: Option<Sex>,
}

/// The model family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    #[default]
    Logistic,
}

/// How local updates are combined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Sample-weighted average of the local models.
    #[default]
    FedAvg,
    /// FedAvg with a proximal term `mu` keeping local steps near the
    /// global model.
    FedProx,
}

/// Local optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Optimiser {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// FedProx's proximal weight; must be 0 for FedAvg.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mu: f64,
    pub learning_rate: f64,
    pub epochs: u32,
    pub batch_size: u32,
    /// L2 penalty on the weights.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub l2: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_deadline() -> u32 {
    120
}

fn default_holdout() -> f64 {
    0.2
}

/// One approved training of a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub name: String,
    pub cohort: Cohort,
    pub features: Vec<Feature>,
    /// The outcome predicted: 1 when the patient has the event.
    pub label: Event,
    #[serde(default)]
    pub model: ModelKind,
    pub optimiser: Optimiser,
    pub rounds: u32,
    /// Fewest nodes that must take part in every step of a round (and hold
    /// shares to unmask it); at least 2.
    pub quorum: u8,
    /// How long each step of a round waits for nodes.
    #[serde(default = "default_deadline")]
    pub round_deadline_seconds: u32,
    /// Share of each node's patients held out for evaluation.
    #[serde(default = "default_holdout")]
    pub holdout: f64,
}

impl TrainingSpec {
    /// Checks everything but the data declaration (the manifest does that).
    pub fn validate(&self) -> Result<(), Error> {
        crate::manifest::check_name(&self.name).map_err(|p| invalid("name", p))?;
        if self.features.is_empty() || self.features.len() > MAX_FEATURES {
            return Err(invalid(
                "features",
                format!("must hold 1 to {MAX_FEATURES} features"),
            ));
        }
        for (i, f) in self.features.iter().enumerate() {
            crate::manifest::check_name(&f.name)
                .map_err(|p| invalid(format!("features[{i}].name"), p))?;
            if self.features[..i].iter().any(|o| o.name == f.name) {
                return Err(invalid(
                    format!("features[{i}].name"),
                    format!("`{}` is used twice", f.name),
                ));
            }
            if f.variable.is_some() == f.sex_is.is_some() {
                return Err(invalid(
                    format!("features[{i}]"),
                    "needs exactly one of `variable` and `sex_is`",
                ));
            }
        }
        if self.label == Event::default() {
            return Err(invalid("label", "needs at least one criterion"));
        }
        let o = &self.optimiser;
        if !(o.learning_rate > 0.0 && o.learning_rate <= 10.0) {
            return Err(invalid("optimiser.learning_rate", "must be in (0, 10]"));
        }
        if o.epochs == 0 || o.epochs > 100 {
            return Err(invalid("optimiser.epochs", "must be 1 to 100"));
        }
        if o.batch_size == 0 {
            return Err(invalid("optimiser.batch_size", "must be at least 1"));
        }
        if !(o.l2 >= 0.0 && o.l2.is_finite()) {
            return Err(invalid("optimiser.l2", "must be 0 or more"));
        }
        match o.algorithm {
            Algorithm::FedAvg if o.mu != 0.0 => {
                return Err(invalid("optimiser.mu", "is only for fedprox"));
            }
            Algorithm::FedProx if !(o.mu > 0.0 && o.mu.is_finite()) => {
                return Err(invalid("optimiser.mu", "fedprox needs a positive mu"));
            }
            _ => {}
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(invalid("rounds", format!("must be 1 to {MAX_ROUNDS}")));
        }
        if self.quorum < 2 {
            return Err(invalid(
                "quorum",
                "must be at least 2: secure aggregation needs two nodes to hide one",
            ));
        }
        if self.round_deadline_seconds == 0 || self.round_deadline_seconds > 3600 {
            return Err(invalid("round_deadline_seconds", "must be 1 to 3600"));
        }
        if !(self.holdout > 0.0 && self.holdout < 0.9) {
            return Err(invalid("holdout", "must be above 0 and below 0.9"));
        }
        for (feature, q) in self.feature_queries() {
            QuerySpec::parse(&q.canonical_json()).map_err(|source| Error::Feature {
                feature: feature.to_owned(),
                source,
            })?;
        }
        QuerySpec::parse(&self.label_query().canonical_json()).map_err(Error::Label)?;
        Ok(())
    }

    /// Parses and validates a training document on its own.
    pub fn parse(json: &[u8]) -> Result<Self, Error> {
        let spec: TrainingSpec =
            serde_json::from_slice(json).map_err(|e| invalid("document", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The canonical encoding, whose digest capabilities bind.
    pub fn canonical_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a training spec always serializes")
    }

    /// The query whose analysis variable is each numeric feature; sex
    /// indicators need none (the cohort rows carry the sex).
    pub fn feature_queries(&self) -> Vec<(&str, QuerySpec)> {
        self.features
            .iter()
            .filter_map(|f| {
                f.variable.as_ref().map(|variable| {
                    (
                        f.name.as_str(),
                        self.query(Analysis::Summary {
                            variable: variable.clone(),
                            group_by: Vec::new(),
                            clip: None,
                        }),
                    )
                })
            })
            .collect()
    }

    /// The query whose event is the label.
    pub fn label_query(&self) -> QuerySpec {
        self.query(Analysis::Rate {
            event: self.label.clone(),
            per: 1000,
            group_by: Vec::new(),
        })
    }

    /// Every query the training reads through, label last.
    pub fn queries(&self) -> Vec<QuerySpec> {
        let mut out: Vec<QuerySpec> = self.feature_queries().into_iter().map(|(_, q)| q).collect();
        out.push(self.label_query());
        out
    }

    fn query(&self, analysis: Analysis) -> QuerySpec {
        QuerySpec {
            version: query::VERSION.to_owned(),
            cohort: self.cohort.clone(),
            analysis,
            noise: None,
        }
    }

    /// Names of the features, in model order.
    pub fn feature_names(&self) -> Vec<String> {
        self.features.iter().map(|f| f.name.clone()).collect()
    }
}

/// The version of [`ModelDocument`].
pub const MODEL_VERSION: &str = "ghx.model/v1";

/// A trained model as plain JSON: what it reads, how it scales it and its
/// weights. Enough to score a patient anywhere, and what external
/// validation takes back in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDocument {
    pub version: String,
    pub model: ModelKind,
    /// Feature definitions in weight order.
    pub features: Vec<Feature>,
    pub label: Event,
    /// Features are standardised as (x - mean) / sd before weighting.
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl ModelDocument {
    /// Parses a model and checks it is usable with `spec`'s features.
    pub fn parse_for(json: &[u8], spec: &TrainingSpec) -> Result<Self, Error> {
        let doc: ModelDocument =
            serde_json::from_slice(json).map_err(|e| invalid("model", e.to_string()))?;
        if doc.version != MODEL_VERSION {
            return Err(invalid(
                "model.version",
                format!("is `{}`; expected {MODEL_VERSION}", doc.version),
            ));
        }
        if doc.features != spec.features {
            return Err(invalid(
                "model.features",
                "differ from the approved training's features",
            ));
        }
        let d = spec.features.len();
        if doc.mean.len() != d || doc.sd.len() != d || doc.weights.len() != d {
            return Err(invalid(
                "model",
                format!("mean, sd and weights must each hold {d} values"),
            ));
        }
        let finite = doc
            .mean
            .iter()
            .chain(&doc.sd)
            .chain(&doc.weights)
            .chain(std::iter::once(&doc.bias))
            .all(|x| x.is_finite());
        if !finite || doc.sd.iter().any(|s| *s <= 0.0) {
            return Err(invalid(
                "model",
                "values must be finite and every sd positive",
            ));
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../deploy/examples/study-t2d-model.json");

    fn training() -> TrainingSpec {
        let m = crate::manifest::StudyManifest::parse(EXAMPLE.as_bytes()).unwrap();
        m.trainings[0].clone()
    }

    #[test]
    fn the_example_training_compiles_to_one_query_per_numeric_feature() {
        let t = training();
        let numeric = t.features.iter().filter(|f| f.variable.is_some()).count();
        assert_eq!(t.feature_queries().len(), numeric);
        assert_eq!(t.queries().len(), numeric + 1);
        assert_eq!(TrainingSpec::parse(&t.canonical_json()).unwrap(), t);
    }

    #[test]
    fn bad_trainings_name_the_problem() {
        let mut t = training();
        t.quorum = 1;
        assert!(t.validate().unwrap_err().to_string().contains("quorum"));
        let mut t = training();
        t.features[0].sex_is = Some(Sex::Male);
        assert!(
            t.validate()
                .unwrap_err()
                .to_string()
                .contains("exactly one of")
        );
        let mut t = training();
        t.optimiser.algorithm = Algorithm::FedProx;
        t.optimiser.mu = 0.0;
        assert!(
            t.validate()
                .unwrap_err()
                .to_string()
                .contains("positive mu")
        );
        let mut t = training();
        t.features.push(t.features[0].clone());
        assert!(t.validate().unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn a_model_must_match_the_training_features() {
        let t = training();
        let d = t.features.len();
        let doc = ModelDocument {
            version: MODEL_VERSION.to_owned(),
            model: ModelKind::Logistic,
            features: t.features.clone(),
            label: t.label.clone(),
            mean: vec![0.0; d],
            sd: vec![1.0; d],
            weights: vec![0.5; d],
            bias: -1.0,
        };
        let json = serde_json::to_vec(&doc).unwrap();
        assert_eq!(ModelDocument::parse_for(&json, &t).unwrap(), doc);
        let mut short = doc.clone();
        short.weights.pop();
        let e = ModelDocument::parse_for(&serde_json::to_vec(&short).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("must each hold"), "{e}");
        let mut other = doc;
        other.features.reverse();
        let e = ModelDocument::parse_for(&serde_json::to_vec(&other).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("differ"), "{e}");
    }
}
