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

use ghx_learn::{Hidden, Model};

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
    /// Logistic regression.
    #[default]
    Logistic,
    /// A small multilayer perceptron: one hidden layer of
    /// `hidden_units` tanh units, a sigmoid output.
    Mlp,
}

/// The hidden layer's activation; tanh is the only one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Tanh,
}

/// A model document's hidden layer (an MLP's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HiddenLayer {
    pub activation: Activation,
    /// One row per unit, one weight per feature in feature order.
    pub weights: Vec<Vec<f64>>,
    /// One per unit.
    pub bias: Vec<f64>,
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

/// Differential privacy for a training's model updates: in each training
/// round a node sends the sum of its patients' gradients at the global
/// model, each clipped to L2 norm `clip`, with their count, plus Gaussian
/// noise of standard deviation `noise_multiplier * sqrt(clip^2 + 1)` on
/// every value (one patient changes that vector by at most that norm); the
/// coordinator takes one gradient step with the federation's noisy sum
/// (DP-FedSGD, full batch). Each round is a Gaussian mechanism of
/// zero-concentrated DP `rho = 1 / (2 noise_multiplier^2)`; rounds add up
/// (`rho * t` after t rounds), and the cost is stated as
/// `epsilon = rho t + 2 sqrt(rho t ln(1/delta))` at `delta` (Bun & Steinke
/// 2016, Prop. 1.3).
///
/// Covered: the model (what the requester receives). The standardisation
/// moments and the evaluation sums rounds also carry are federation
/// totals under secure aggregation and the cell-size rule, not noised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPrivacy {
    /// Largest L2 norm of one patient's gradient.
    pub clip: f64,
    /// Noise standard deviation over the sensitivity.
    pub noise_multiplier: f64,
    /// The delta the stated epsilon holds at, charged once per training.
    pub delta: f64,
}

impl TrainingPrivacy {
    /// Sensitivity of a round's (gradient sum, count) vector.
    pub fn sensitivity(&self) -> f64 {
        (self.clip * self.clip + 1.0).sqrt()
    }

    /// The noise standard deviation on every value of a round's vector.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.sensitivity()
    }

    /// zCDP of one round.
    pub fn rho_per_round(&self) -> f64 {
        1.0 / (2.0 * self.noise_multiplier * self.noise_multiplier)
    }

    /// The epsilon (at [`Self::delta`]) of `rounds` noised rounds.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        if rounds == 0 {
            return 0.0;
        }
        let rho = self.rho_per_round() * rounds as f64;
        rho + 2.0 * (rho * (1.0 / self.delta).ln()).sqrt()
    }

    /// What round `t` (1-based, counted over every run of the training)
    /// adds to the ledger: the growth of the stated epsilon, and the delta
    /// once, so that a training's charges sum to its cost.
    pub fn round_charge(&self, t: u64) -> (f64, f64) {
        let t = t.max(1);
        let epsilon = self.epsilon_after(t) - self.epsilon_after(t - 1);
        (epsilon, if t == 1 { self.delta } else { 0.0 })
    }

    fn validate(&self) -> Result<(), Error> {
        if !(self.clip > 0.0 && self.clip.is_finite()) {
            return Err(invalid("privacy.clip", "must be a positive number"));
        }
        if !(self.noise_multiplier >= 0.3 && self.noise_multiplier <= 1000.0) {
            return Err(invalid("privacy.noise_multiplier", "must be 0.3 to 1000"));
        }
        if !(self.delta > 0.0 && self.delta < 1e-3) {
            return Err(invalid("privacy.delta", "must be above 0 and below 0.001"));
        }
        Ok(())
    }
}

/// Most epsilon one evaluation (a run's, or an external validation) may
/// spend.
pub const MAX_VALIDATION_EPSILON: f64 = 2.0;

/// How every evaluation is noised, a run's final one and each external
/// validation of a model the requester supplies: each node adds two-sided
/// geometric noise of `epsilon` to each count of its score histogram
/// (positives and negatives per [`ghx_learn::evaluation::NOISED_SCORE_BINS`]
/// bins; one held-out patient moves one count by one) before masking, and
/// charges `epsilon` to the study's privacy budget. Without it, nodes
/// refuse every evaluation and runs end unevaluated: a model the requester
/// chose can single out one held-out patient, and a run's exact histogram
/// reaches the coordinator before its bins are merged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationNoise {
    /// Charged per evaluation at each node.
    pub epsilon: f64,
}

impl ValidationNoise {
    fn validate(&self) -> Result<(), Error> {
        let min = crate::query::MIN_EPSILON;
        if !(self.epsilon >= min && self.epsilon <= MAX_VALIDATION_EPSILON) {
            return Err(invalid(
                "validation.epsilon",
                format!("must be at least {min} and at most {MAX_VALIDATION_EPSILON}"),
            ));
        }
        Ok(())
    }
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
    /// Hidden units of an MLP (1 to [`ghx_learn::MAX_HIDDEN_UNITS`]);
    /// only for `mlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_units: Option<u32>,
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
    /// Clipping and Gaussian noise of the model updates, charged to the
    /// study's privacy budget at each node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<TrainingPrivacy>,
    /// Noise of every evaluation (a run's and external validations); none:
    /// nodes refuse them, and runs end unevaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationNoise>,
    /// Seed of an MLP's starting weights
    /// ([`TrainingSpec::declared_initial_model`]); none: derived from the
    /// training itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_seed: Option<u64>,
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
        match (self.model, self.hidden_units) {
            (ModelKind::Logistic, Some(_)) => {
                return Err(invalid("hidden_units", "is only for model `mlp`"));
            }
            (ModelKind::Mlp, None) => {
                return Err(invalid("hidden_units", "model `mlp` needs hidden_units"));
            }
            (ModelKind::Mlp, Some(h)) if h == 0 || h as usize > ghx_learn::MAX_HIDDEN_UNITS => {
                return Err(invalid(
                    "hidden_units",
                    format!("must be 1 to {}", ghx_learn::MAX_HIDDEN_UNITS),
                ));
            }
            _ => {}
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
        if let Some(privacy) = &self.privacy {
            privacy.validate()?;
            if o.algorithm != Algorithm::FedAvg || o.epochs != 1 {
                return Err(invalid(
                    "privacy",
                    "noised training takes one full-batch gradient step per round: \
                     use fedavg with epochs 1",
                ));
            }
        }
        if let Some(validation) = &self.validation {
            validation.validate()?;
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
            release: Default::default(),
            each_patient_once: false,
            linkage_slots: None,
        }
    }

    /// Names of the features, in model order.
    pub fn feature_names(&self) -> Vec<String> {
        self.features.iter().map(|f| f.name.clone()).collect()
    }

    /// How many parameters the trained model has.
    pub fn param_count(&self) -> usize {
        let units = match self.model {
            ModelKind::Logistic => 0,
            ModelKind::Mlp => self.hidden_units.unwrap_or(0) as usize,
        };
        ghx_learn::param_count(self.features.len(), units)
    }

    /// The model every run of this training starts from, the same wherever
    /// it is computed: [`Self::initial_model`] drawn from ChaCha20 seeded
    /// with SHA-256 of a tag and `init_seed`, or when none is declared the
    /// first 8 bytes of SHA-256 of the training's canonical JSON. A run's
    /// id plays no part, so no one can pick a start by choosing run ids;
    /// nodes that know the training know the start.
    pub fn declared_initial_model(&self) -> Result<Model, Error> {
        use rand::SeedableRng;
        use sha2::{Digest, Sha256};
        let seed = self.init_seed.unwrap_or_else(|| {
            let digest = Sha256::digest(self.canonical_json());
            u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
        });
        let mut tagged = Sha256::new();
        tagged.update(b"ghx-init/v1");
        tagged.update(seed.to_be_bytes());
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(tagged.finalize().into());
        self.initial_model(&mut rng)
    }

    /// The model training starts from: logistic regression at zero, or an
    /// MLP with random weights (drawn from `rng`) so its units differ.
    pub fn initial_model(&self, rng: &mut impl rand::Rng) -> Result<Model, Error> {
        let d = self.features.len();
        match (self.model, self.hidden_units) {
            (ModelKind::Mlp, Some(h)) => {
                Model::mlp(d, h as usize, rng).map_err(|e| invalid("hidden_units", e.to_string()))
            }
            _ => Ok(Model::zeros(d)),
        }
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
    /// An MLP's hidden layer, which reads the standardised features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<HiddenLayer>,
    /// Output weights: one per feature, or for an MLP one per hidden unit.
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl ModelDocument {
    /// The document of `model`, trained for `spec` on features
    /// standardised with `mean` and `sd`.
    pub fn new(spec: &TrainingSpec, mean: &[f64], sd: &[f64], model: &Model) -> Self {
        ModelDocument {
            version: MODEL_VERSION.to_owned(),
            model: if model.hidden.is_some() {
                ModelKind::Mlp
            } else {
                ModelKind::Logistic
            },
            features: spec.features.clone(),
            label: spec.label.clone(),
            mean: mean.to_vec(),
            sd: sd.to_vec(),
            hidden: model.hidden.as_ref().map(|h| HiddenLayer {
                activation: Activation::Tanh,
                weights: h
                    .weights
                    .chunks(model.dim().max(1))
                    .map(<[f64]>::to_vec)
                    .collect(),
                bias: h.bias.clone(),
            }),
            weights: model.weights.clone(),
            bias: model.bias,
        }
    }

    /// The model to compute with (on standardised features).
    pub fn model(&self) -> Model {
        Model {
            hidden: self.hidden.as_ref().map(|h| Hidden {
                weights: h.weights.concat(),
                bias: h.bias.clone(),
            }),
            weights: self.weights.clone(),
            bias: self.bias,
        }
    }

    /// Whether this model has the shape `spec` trains (kind and hidden
    /// units): a training round's model must, a model sent for external
    /// validation need not.
    pub fn is_shaped_for(&self, spec: &TrainingSpec) -> bool {
        let units = self.hidden.as_ref().map(|h| h.bias.len() as u32);
        self.model == spec.model && units == spec.hidden_units
    }

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
        if doc.mean.len() != d || doc.sd.len() != d {
            return Err(invalid(
                "model",
                format!("mean and sd must each hold {d} values"),
            ));
        }
        let outputs = match (doc.model, &doc.hidden) {
            (ModelKind::Logistic, None) => d,
            (ModelKind::Mlp, Some(h)) => {
                let units = h.bias.len();
                if units == 0 || units > ghx_learn::MAX_HIDDEN_UNITS {
                    return Err(invalid(
                        "model.hidden.bias",
                        format!(
                            "must hold one value per hidden unit, 1 to {}",
                            ghx_learn::MAX_HIDDEN_UNITS
                        ),
                    ));
                }
                if h.weights.len() != units || h.weights.iter().any(|row| row.len() != d) {
                    return Err(invalid(
                        "model.hidden.weights",
                        format!("must hold {units} rows (one per unit) of {d} values"),
                    ));
                }
                units
            }
            (ModelKind::Logistic, Some(_)) => {
                return Err(invalid("model.hidden", "is only for model `mlp`"));
            }
            (ModelKind::Mlp, None) => {
                return Err(invalid(
                    "model.hidden",
                    "model `mlp` needs its hidden layer",
                ));
            }
        };
        if doc.weights.len() != outputs {
            return Err(invalid(
                "model.weights",
                format!("must hold {outputs} values (one per feature or hidden unit)"),
            ));
        }
        let hidden_values = doc
            .hidden
            .iter()
            .flat_map(|h| h.weights.iter().flatten().chain(&h.bias));
        let finite = doc
            .mean
            .iter()
            .chain(&doc.sd)
            .chain(&doc.weights)
            .chain(std::iter::once(&doc.bias))
            .chain(hidden_values)
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
    fn noised_training_costs_add_up_in_zcdp_and_are_charged_by_their_growth() {
        let p = TrainingPrivacy {
            clip: 1.0,
            noise_multiplier: 2.0,
            delta: 1e-5,
        };
        assert_eq!(p.rho_per_round(), 0.125);
        assert!((p.noise_std() - 2.0 * 2f64.sqrt()).abs() < 1e-12);
        // 8 rounds: rho 1, epsilon 1 + 2 sqrt(ln 1e5) = 7.7861...
        assert!((p.epsilon_after(8) - (1.0 + 2.0 * (1e5f64).ln().sqrt())).abs() < 1e-12);
        assert!((p.epsilon_after(8) - 7.786_140).abs() < 1e-6);
        assert_eq!(p.epsilon_after(0), 0.0);
        // Round charges telescope to the stated cost; delta is paid once.
        let charges: Vec<(f64, f64)> = (1..=8).map(|t| p.round_charge(t)).collect();
        let epsilon: f64 = charges.iter().map(|c| c.0).sum();
        assert!((epsilon - p.epsilon_after(8)).abs() < 1e-12);
        assert_eq!(charges.iter().map(|c| c.1).sum::<f64>(), 1e-5);
        // Composition in zCDP is far cheaper than adding per-round epsilons.
        assert!(p.epsilon_after(8) < 8.0 * p.epsilon_after(1));
    }

    #[test]
    fn the_noised_example_states_its_cost_within_its_budget() {
        let m = crate::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model-dp.json"
        ))
        .unwrap();
        let t = &m.trainings[0];
        let p = t.privacy.unwrap();
        // 30 rounds at noise multiplier 60: rho 30/7200, epsilon 0.484 at
        // 1e-6, within the 0.5 every example hospital policy allows.
        assert!((p.epsilon_after(u64::from(t.rounds)) - 0.484_019).abs() < 1e-6);
        assert!(p.epsilon_after(u64::from(t.rounds)) <= m.privacy_budget);
    }

    #[test]
    fn noised_trainings_are_checked_and_must_fit_the_study_budget() {
        let mut t = training();
        t.validation = None;
        t.privacy = Some(TrainingPrivacy {
            clip: 1.0,
            noise_multiplier: 2.0,
            delta: 1e-6,
        });
        t.validate().unwrap();
        let mut bad = t.clone();
        bad.optimiser.epochs = 2;
        assert!(bad.validate().unwrap_err().to_string().contains("epochs 1"));
        for (clip, multiplier, delta, field) in [
            (0.0, 2.0, 1e-6, "privacy.clip"),
            (1.0, 0.1, 1e-6, "privacy.noise_multiplier"),
            (1.0, 2.0, 0.0, "privacy.delta"),
        ] {
            let mut bad = t.clone();
            bad.privacy = Some(TrainingPrivacy {
                clip,
                noise_multiplier: multiplier,
                delta,
            });
            assert!(bad.validate().unwrap_err().to_string().contains(field));
        }
        // In a manifest its whole cost must fit the study's budget.
        let mut m: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        m["trainings"][0] = serde_json::to_value(&t).unwrap();
        m["privacy_delta"] = 1e-5.into();
        let cost = t.privacy.unwrap().epsilon_after(u64::from(t.rounds));
        m["privacy_budget"] = (cost * 0.99).into();
        let err = crate::manifest::StudyManifest::parse(&serde_json::to_vec(&m).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("trainings[0].privacy"), "{err}");
        assert!(err.contains(&format!("cost epsilon {cost:.3}")), "{err}");
        m["privacy_budget"] = cost.into();
        crate::manifest::StudyManifest::parse(&serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn validations_are_noised_at_a_declared_epsilon_the_budget_affords() {
        let mut t = training();
        // 1e-20 would round the noise away: exact counts.
        for bad in [0.0, -1.0, 1e-20, 0.009, 2.5, f64::NAN] {
            t.validation = Some(ValidationNoise { epsilon: bad });
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains("validation.epsilon"), "{e}");
        }
        t.validation = Some(ValidationNoise { epsilon: 0.25 });
        t.validate().unwrap();
        // In a manifest, one validation after the whole training must fit.
        let mut m: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        m["trainings"][0] = serde_json::to_value(&t).unwrap();
        m["privacy_budget"] = 0.2.into();
        let err = crate::manifest::StudyManifest::parse(&serde_json::to_vec(&m).unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "manifest `trainings[0].validation`: an evaluation costs epsilon 0.25; the study's budget is epsilon 0.2"
        );
        t.privacy = Some(TrainingPrivacy {
            clip: 1.0,
            noise_multiplier: 60.0,
            delta: 1e-6,
        });
        m["trainings"][0] = serde_json::to_value(&t).unwrap();
        m["privacy_delta"] = 1e-5.into();
        let cost = t.privacy.unwrap().epsilon_after(u64::from(t.rounds));
        m["privacy_budget"] = (cost + 0.2).into();
        let err = crate::manifest::StudyManifest::parse(&serde_json::to_vec(&m).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("after the training's {cost:.3}")),
            "{err}"
        );
        m["privacy_budget"] = (cost + 0.25).into();
        crate::manifest::StudyManifest::parse(&serde_json::to_vec(&m).unwrap()).unwrap();
        // Undeclared, the field is absent, so older digests hold.
        let mut plain = training();
        plain.validation = None;
        assert!(
            !String::from_utf8(plain.canonical_json())
                .unwrap()
                .contains("validation")
        );
    }

    #[test]
    fn the_declared_start_is_the_same_everywhere_and_moves_with_the_seed() {
        let m = crate::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-mlp.json"
        ))
        .unwrap();
        let mut t = m.trainings[0].clone();
        let start = t.declared_initial_model().unwrap();
        assert_eq!(start, t.declared_initial_model().unwrap());
        assert!(
            start
                .hidden
                .as_ref()
                .unwrap()
                .weights
                .iter()
                .any(|w| *w != 0.0)
        );
        // Fixed across builds of this version (rand 0.8's uniform sampler
        // over ChaCha20): the first hidden weight of the example.
        let first = start.hidden.as_ref().unwrap().weights[0];
        expect_test::expect!["-0.4635212146106906"].assert_eq(&first.to_string());
        // Any change to the training moves it (its digest seeds it), and a
        // declared seed replaces the digest.
        t.rounds += 1;
        assert_ne!(t.declared_initial_model().unwrap(), start);
        t.init_seed = Some(7);
        let seeded = t.declared_initial_model().unwrap();
        t.rounds -= 1;
        assert_eq!(t.declared_initial_model().unwrap(), seeded);
        t.init_seed = Some(8);
        assert_ne!(t.declared_initial_model().unwrap(), seeded);
        // Logistic regression starts at zero whatever the seed.
        let logistic = training().declared_initial_model().unwrap();
        assert_eq!(logistic, Model::zeros(5));
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
            hidden: None,
            weights: vec![0.5; d],
            bias: -1.0,
        };
        let json = serde_json::to_vec(&doc).unwrap();
        assert_eq!(ModelDocument::parse_for(&json, &t).unwrap(), doc);
        assert!(doc.is_shaped_for(&t));
        let mut short = doc.clone();
        short.weights.pop();
        let e = ModelDocument::parse_for(&serde_json::to_vec(&short).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("one per feature"), "{e}");
        let mut other = doc;
        other.features.reverse();
        let e = ModelDocument::parse_for(&serde_json::to_vec(&other).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("differ"), "{e}");
    }

    #[test]
    fn an_mlp_training_names_its_hidden_units_and_its_model_carries_them() {
        let mut t = training();
        t.model = ModelKind::Mlp;
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("needs hidden_units"), "{e}");
        t.hidden_units = Some(0);
        assert!(t.validate().unwrap_err().to_string().contains("1 to 64"));
        t.hidden_units = Some(4);
        t.validate().unwrap();
        let d = t.features.len();
        assert_eq!(t.param_count(), 4 * d + 4 + 4 + 1);
        let mut logistic = training();
        logistic.hidden_units = Some(4);
        assert!(
            logistic
                .validate()
                .unwrap_err()
                .to_string()
                .contains("only for model `mlp`")
        );
        // A logistic training's canonical form has no hidden_units, so
        // manifests approved before MLPs keep their digest.
        assert!(
            !String::from_utf8(training().canonical_json())
                .unwrap()
                .contains("hidden")
        );

        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let model = t.initial_model(&mut rng).unwrap();
        assert_eq!(model.param_count(), t.param_count());
        let doc = ModelDocument::new(&t, &vec![0.0; d], &vec![1.0; d], &model);
        assert_eq!(doc.model, ModelKind::Mlp);
        assert!(doc.is_shaped_for(&t) && !doc.is_shaped_for(&training()));
        let json = serde_json::to_vec(&doc).unwrap();
        let back = ModelDocument::parse_for(&json, &t).unwrap();
        // (JSON numbers read back to within an ulp.)
        let read = back.model().params();
        assert_eq!(read.len(), model.param_count());
        assert!(
            read.iter()
                .zip(model.params())
                .all(|(a, b)| (a - b).abs() < 1e-15)
        );
        // An MLP may be sent for validation under a logistic training.
        ModelDocument::parse_for(&json, &training()).unwrap();

        let mut ragged = doc.clone();
        ragged.hidden.as_mut().unwrap().weights[2].pop();
        let e = ModelDocument::parse_for(&serde_json::to_vec(&ragged).unwrap(), &t).unwrap_err();
        assert!(
            e.to_string().contains("4 rows (one per unit) of 5 values"),
            "{e}"
        );
        let mut headless = doc;
        headless.hidden = None;
        let e = ModelDocument::parse_for(&serde_json::to_vec(&headless).unwrap(), &t).unwrap_err();
        assert!(e.to_string().contains("needs its hidden layer"), "{e}");
    }
}
