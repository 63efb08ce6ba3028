//! Federated training at the node: feature extraction and the node's side
//! of secure-aggregation rounds.
//!
//! Features and the label are read through the aggregate engine, one query
//! per numeric feature plus one for the label ([`TrainingSpec::queries`]),
//! so consent, sensitive-category exclusions and the consent context are
//! exactly those of an aggregate query. Patients missing a feature are left
//! out (complete cases) and counted. Each patient is held out for
//! evaluation or not by a hash of the training and its id, so the split is
//! stable across rounds and runs.
//!
//! Step 1 admits a one-off round (moments, or an evaluation) and reads the
//! training's rows (once per run); at step 3 the round's contribution is
//! computed, masked and sent; nothing of it is stored. The round's secrets
//! stay in memory until step 4. A training run's rounds go through a
//! session instead (`ghx_secagg::session`): admitted and keyed once, then
//! one request per round (round 0 the moments), each checked against
//! revocation and the capability's expiry, each computed from the model
//! the node's own lineage gives (`crate::lineage`); the session's secret
//! stays in memory while the run uses it. Patient rows stay in this module's cache for the
//! length of a run and never leave the node.

use crate::classify::{Classify, Code};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use ghx_learn::federated::Phase;
use ghx_learn::federated::{self, EvaluationSums, Metrics};
use ghx_learn::{Dataset, Standardiser, TrainConfig};
use ghx_secagg::{
    Advertise, Client, EncryptedShare, MaskedInput, RoundParams, SessionClient, SessionKeys,
    Unmasking,
};
use ghx_study::training::{Algorithm, ModelDocument, TrainingSpec};
use sha2::{Digest, Sha256};

use crate::consent::SensitiveCodes;
use crate::engine;
use crate::store::Store;

/// Why a round step failed at this node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the training's features: {0}")]
    Extract(#[from] crate::views::Error),
    #[error("unknown round phase `{0}`; expected moments, train or evaluate")]
    Phase(String),
    #[error("this node is not a participant of round {0}")]
    NotParticipant(String),
    #[error("round {round} sums {got} values; a {phase} round of this training sums {expected}")]
    Dimension {
        round: String,
        phase: String,
        got: usize,
        expected: usize,
    },
    /// Which groups are small is said, never how small: a count below the
    /// cell size must not leave the node, not even in an error.
    #[error(
        "too few patients here for this training: {} below the minimum cell size {min}",
        short.join(", ")
    )]
    TooFew { short: Vec<&'static str>, min: u32 },
    #[error("the model sent with the round: {0}")]
    Model(#[from] ghx_study::training::Error),
    #[error("the model sent with a training round is not of the kind and size the training trains")]
    ModelShape,
    #[error("training: {0}")]
    Learn(#[from] ghx_learn::Error),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] ghx_secagg::Error),
    #[error("round {0} is unknown here or has expired")]
    NoSuchRound(String),
    #[error("round {0} was already started here")]
    RoundExists(String),
    #[error("round {0} already computed its masked input here")]
    AlreadyComputed(String),
    #[error("round {round}: the keys advertised as {node}'s are refused: {reason}")]
    UnvouchedKeys {
        round: String,
        node: String,
        reason: ghx_pki::signed::Refusal,
    },
    #[error("this node has no certificate key to sign its round keys with")]
    NoSigningKey,
    #[error("signing this node's round keys: {0}")]
    Signing(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("consent evaluation: {0}")]
    Consent(#[from] crate::consent::eligibility::Error),
    #[error("a session trains; `{0}` rounds are run one at a time")]
    SessionPhase(String),
    #[error("session {0}: its capability has expired; the coordinator must open a new session")]
    CapabilityExpired(String),
    #[error(transparent)]
    Participants(#[from] crate::participants::Error),
    #[error(
        "study {study} has had the {limit} model evaluations this node allows a study \
         (max_evaluations_per_study)"
    )]
    Evaluations { study: String, limit: u32 },
    #[error(
        "every evaluation (a run's or an external validation) is noised at each node: \
         training `{0}` must declare validation.epsilon in the study's manifest"
    )]
    ValidationUndeclared(String),
    #[error(
        "a training round is computed only in a run's session, from the model this node \
         computes itself"
    )]
    TrainOutsideRun,
    #[error("a session trains a run: the request names none")]
    SessionWithoutRun,
    #[error(
        "the moments are a run's round 0, computed in the run's session; a one-off moments \
         round is refused"
    )]
    MomentsOutsideRun,
    #[error("session {0} has not agreed its keys yet")]
    NotAgreed(String),
    #[error(
        "session {session}: {node} did not confirm the keys this node agreed ({reason}); \
         nothing is masked"
    )]
    Unconfirmed {
        session: String,
        node: String,
        reason: String,
    },
    #[error(
        "only a run's final model is evaluated in the run: the evidence is of round {got}; \
         the training has {rounds} rounds"
    )]
    NotFinal { got: u32, rounds: u32 },
    #[error("lineage: {0}")]
    Lineage(#[from] crate::lineage::Error),
    #[error("round {round} is past the training's last round ({rounds})")]
    PastLastRound { round: u32, rounds: u32 },
    #[error(
        "this node's rows for the training changed since run {0} started here (an import or a \
         consent change): a run computes on one set of rows; start a new run"
    )]
    RowsChanged(String),
    #[error("run {0} has no stored lineage to seal here")]
    Unsealed(String),
    #[error(
        "a new run's noised rounds and evaluation cost epsilon {epsilon:.4}; {left:.4} is left \
         of the privacy budget here"
    )]
    RunUnaffordable { epsilon: f64, left: f64 },
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Extract(e) => e.code(),
            Error::Lineage(e) => e.code(),
            Error::Participants(e) => e.code(),
            Error::TooFew { .. }
            | Error::ValidationUndeclared(_)
            | Error::NotFinal { .. }
            | Error::PastLastRound { .. }
            | Error::RowsChanged(_)
            | Error::NotAgreed(_) => Code::FailedPrecondition,
            Error::Evaluations { .. } | Error::RunUnaffordable { .. } => Code::ResourceExhausted,
            Error::NoSuchRound(_) => Code::NotFound,
            Error::RoundExists(_) | Error::AlreadyComputed(_) => Code::AlreadyExists,
            Error::UnvouchedKeys { .. }
            | Error::Unconfirmed { .. }
            | Error::CapabilityExpired(_) => Code::PermissionDenied,
            Error::Phase(_)
            | Error::SessionPhase(_)
            | Error::TrainOutsideRun
            | Error::SessionWithoutRun
            | Error::MomentsOutsideRun
            | Error::NotParticipant(_)
            | Error::Dimension { .. }
            | Error::Model(_)
            | Error::ModelShape
            | Error::SecAgg(_) => Code::InvalidArgument,
            Error::Learn(_)
            | Error::NoSigningKey
            | Error::Unsealed(_)
            | Error::Signing(_)
            | Error::Random(_)
            | Error::Consent(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::Extract(e) => e.kind(),
            Error::Lineage(e) => e.kind(),
            Error::Participants(e) => e.kind(),
            Error::TooFew { .. } => "too_few",
            _ => match self.code() {
                Code::ResourceExhausted => "budget",
                Code::Internal => "internal",
                _ => "training",
            },
        }
    }
}

/// What one node holds for a training: complete-case rows, split.
#[derive(Debug)]
pub struct Extracted {
    pub train: Dataset,
    pub holdout: Dataset,
    /// Cohort members left out because a feature had no value.
    pub incomplete: u64,
    /// Who the rows are: the patients' hashes
    /// ([`crate::differencing::patient_hash`]), compared as released sets
    /// when a run is sealed to them.
    pub patients: RowPatients,
}

/// Who and what a training's rows are, as hashes: compared like released
/// sets when a run is sealed to them (its moments are exact sums over the
/// training rows).
#[derive(Debug, Default)]
pub struct RowPatients {
    /// The training rows' patients ([`crate::differencing::patient_hash`]).
    pub train: Vec<u64>,
    /// One set per column of the training rows (each feature, then the
    /// label): each patient's value, hashed with the patient and what the
    /// column reads (its variable, not its name). The same patients with a
    /// value changed (an import, another `as_of` moving ages) differ in
    /// that column by two per changed patient, whatever else either
    /// training reads.
    pub columns: Vec<Vec<u64>>,
}

/// What a column of a training's rows reads, as a hash key: a feature's
/// variable (or sex), or the label's event; never its name.
fn column_keys(spec: &TrainingSpec) -> Vec<[u8; 32]> {
    let key = |what: serde_json::Value| -> [u8; 32] {
        Sha256::new()
            .chain_update(b"ghx training column\0")
            .chain_update(what.to_string().as_bytes())
            .finalize()
            .into()
    };
    spec.features
        .iter()
        .map(|f| key(serde_json::json!({"variable": f.variable, "sex_is": f.sex_is})))
        .chain(std::iter::once(key(
            serde_json::json!({"label": spec.label}),
        )))
        .collect()
}

/// One value of a column for a patient, hashed.
fn column_entry(key: &[u8; 32], patient: &str, value: f64) -> u64 {
    let h = Sha256::new()
        .chain_update(key)
        .chain_update(patient.as_bytes())
        .chain_update(value.to_bits().to_be_bytes())
        .finalize();
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

impl Extracted {
    /// A digest of the training and held-out rows (features and labels,
    /// in order): what a run is bound to at this node.
    pub fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for rows in [&self.train, &self.holdout] {
            hash.update((rows.len() as u64).to_be_bytes());
            for i in 0..rows.len() {
                for v in rows.row(i) {
                    hash.update(v.to_bits().to_be_bytes());
                }
                hash.update([u8::from(rows.labels()[i] > 0.5)]);
            }
        }
        hash.finalize().into()
    }

    fn positives(&self) -> usize {
        self.train.labels().iter().filter(|y| **y > 0.5).count()
    }
}

/// Reads the training's rows for the cohort's consenting patients.
pub fn extract(
    store: &Store,
    spec: &TrainingSpec,
    consent_context: &str,
    sensitive: &SensitiveCodes,
) -> Result<Extracted, Error> {
    let label_members =
        engine::cohort_members(store, &spec.label_query(), consent_context, sensitive)?;
    let mut values: Vec<HashMap<String, f64>> = Vec::new();
    for (_, q) in spec.feature_queries() {
        let members = engine::cohort_members(store, &q, consent_context, sensitive)?;
        values.push(
            members
                .into_iter()
                .filter_map(|m| engine::member_value(&q, &m).map(|v| (m.id, v)))
                .collect(),
        );
    }
    let salt = Sha256::digest(spec.canonical_json());
    let dim = spec.features.len();
    let mut train = Dataset::new(dim);
    let mut holdout = Dataset::new(dim);
    let mut incomplete = 0;
    let keys = column_keys(spec);
    let mut patients = RowPatients {
        train: Vec::new(),
        columns: vec![Vec::new(); keys.len()],
    };
    // Sorted by id, so the rows' order is the same every time.
    let members: BTreeMap<String, engine::Member> = label_members
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    let mut row = vec![0.0; dim];
    'patients: for (id, member) in &members {
        let mut numeric = values.iter();
        for (slot, feature) in row.iter_mut().zip(&spec.features) {
            *slot = match (&feature.variable, feature.sex_is) {
                (Some(_), _) => match numeric.next().and_then(|v| v.get(id)) {
                    Some(v) => *v,
                    None => {
                        incomplete += 1;
                        continue 'patients;
                    }
                },
                (None, Some(sex)) => f64::from(u8::from(member.gender == sex.code())),
                (None, None) => 0.0,
            };
        }
        let held = held_out(&salt, id, spec.holdout);
        let target = if held { &mut holdout } else { &mut train };
        let label = member.event != 0;
        if target.push(&row, label).is_err() {
            incomplete += 1;
        } else if !held {
            patients.train.push(crate::differencing::patient_hash(id));
            let values = row.iter().copied().chain([f64::from(u8::from(label))]);
            for ((column, key), value) in patients.columns.iter_mut().zip(&keys).zip(values) {
                column.push(column_entry(key, id, value));
            }
        }
    }
    Ok(Extracted {
        train,
        holdout,
        incomplete,
        patients,
    })
}

/// Extracts a training's rows exactly as this node would for a round of a
/// study with `purpose` now, under its own consent policy: for benchmarks
/// and tests that compare federated with pooled training. The rows never
/// leave the process.
pub fn extract_under_policy(
    store: &Store,
    policy: &crate::policy::PolicyDir,
    purpose: &str,
    spec: &TrainingSpec,
) -> Result<Extracted, Error> {
    let request = crate::gate::training_consent(
        purpose,
        spec,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    );
    let prepared = crate::consent::eligibility::Eligibility::new(policy.consent.clone())
        .prepare(store, &request)?;
    extract(store, spec, &prepared.context, &policy.consent.sensitive)
}

fn held_out(salt: &[u8], id: &str, share: f64) -> bool {
    let h = Sha256::new().chain_update(salt).chain_update(id).finalize();
    let x = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (x as f64 / u64::MAX as f64) < share
}

/// The node's optimiser settings for a training.
pub fn train_config(spec: &TrainingSpec) -> TrainConfig {
    let o = &spec.optimiser;
    TrainConfig {
        epochs: o.epochs,
        batch_size: o.batch_size as usize,
        learning_rate: o.learning_rate,
        proximal_mu: match o.algorithm {
            Algorithm::FedAvg => 0.0,
            Algorithm::FedProx => o.mu,
        },
        l2: o.l2,
    }
}

/// Rows standardised by some means and SDs, with those means and SDs.
type Slot = Mutex<Option<(Vec<f64>, Vec<f64>, Arc<Dataset>)>>;

/// A round's (or session's) training and held-out rows, standardised by
/// the model sent and kept for as long as the models sent keep the same
/// means and SDs (every round of a run after its moments round), so a
/// session's rounds standardise the rows once.
#[derive(Default)]
pub struct Standardised {
    train: Slot,
    holdout: Slot,
}

impl Standardised {
    fn get(slot: &Slot, data: &Dataset, model: &ModelDocument) -> Arc<Dataset> {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((mean, sd, rows)) = slot.as_ref()
            && *mean == model.mean
            && *sd == model.sd
        {
            return rows.clone();
        }
        let mut rows = data.clone();
        Standardiser {
            mean: model.mean.clone(),
            sd: model.sd.clone(),
        }
        .apply(&mut rows);
        let rows = Arc::new(rows);
        *slot = Some((model.mean.clone(), model.sd.clone(), rows.clone()));
        rows
    }

    fn train(&self, data: &Extracted, model: &ModelDocument) -> Arc<Dataset> {
        Self::get(&self.train, &data.train, model)
    }

    fn holdout(&self, data: &Extracted, model: &ModelDocument) -> Arc<Dataset> {
        Self::get(&self.holdout, &data.holdout, model)
    }
}

/// What step 3 computed.
pub struct Contribution {
    pub values: Vec<f64>,
    /// This node's own metrics, for an evaluation with enough held out.
    pub metrics: Option<Metrics>,
}

/// Refuses rows too few for the cell size: training or held-out rows, or
/// either class of the training rows.
pub fn check_enough(data: &Extracted, min_cell_size: u32) -> Result<(), Error> {
    let min = min_cell_size as usize;
    let positives = data.positives();
    let short: Vec<&'static str> = [
        ("training rows", data.train.len()),
        ("held-out rows", data.holdout.len()),
        ("training rows with the label", positives),
        ("training rows without it", data.train.len() - positives),
    ]
    .into_iter()
    .filter(|(_, n)| *n < min)
    .map(|(what, _)| what)
    .collect();
    if !short.is_empty() {
        return Err(Error::TooFew {
            short,
            min: min_cell_size,
        });
    }
    Ok(())
}

/// Computes this node's contribution to a round from `model` (none for
/// the moments), standardising rows through `standardised` (kept with the
/// round or session). A run's round draws its randomness (the shuffle, a
/// noised round's noise) from `seed` ([`round_seed`]), so a round redone
/// from the same lineage step gives the same contribution and a
/// coordinator that redoes it learns nothing new; other rounds draw from
/// the operating system.
pub fn contribution(
    phase: Phase,
    spec: &TrainingSpec,
    (data, standardised): (&Extracted, &Standardised),
    (model, seed): (Option<&ModelDocument>, Option<[u8; 32]>),
    min_cell_size: u32,
    validation: Option<f64>,
) -> Result<Contribution, Error> {
    // A noised validation needs no floor: a refusal that turned on exact
    // counts would say, near the floor, what the noise hides.
    if validation.is_none() {
        check_enough(data, min_cell_size)?;
    }
    if phase == Phase::Moments {
        return Ok(Contribution {
            values: federated::moments_contribution(&data.train),
            metrics: None,
        });
    }
    let model = model.ok_or(Error::ModelShape)?;
    let global = model.model();
    if phase == Phase::Evaluate {
        let holdout = standardised.holdout(data, model);
        let mut sums = EvaluationSums::of(&global, &holdout);
        // Each count noised here (sensitivity 1), before masking: an
        // external validation's model is the requester's to choose, and a
        // run's is summed in bins the coordinator sees before merging. A
        // run's evaluation draws from the run's seed, so a redo releases
        // the same noised counts (charged once).
        if let Some(epsilon) = validation {
            let mut rng = match seed {
                Some(seed) => {
                    use rand::SeedableRng;
                    rand::rngs::StdRng::from_seed(seed)
                }
                None => os_seeded()?,
            };
            sums = sums.noised(ghx_learn::evaluation::NOISED_SCORE_BINS, || {
                ghx_learn::noise::two_sided_geometric(epsilon, &mut rng) as f64
            });
        }
        // No metrics of this node's own beside the sum: the pooled figures
        // less the other nodes' would be this node's, in bins the pooled
        // merge made for more patients than it holds (a crafted model can
        // line every node's bins up), so a bin of a few of its patients.
        return Ok(Contribution {
            values: sums.to_vec(),
            metrics: None,
        });
    }
    // Nodes sum parameter vectors of the training's shape.
    if !model.is_shaped_for(spec) {
        return Err(Error::ModelShape);
    }
    let train = standardised.train(data, model);
    // One generator per round: a cryptographic generator (ChaCha12) for
    // the noise, and no system call per shuffled row, which drawing from
    // the OS directly cost.
    let mut rng = match seed {
        Some(seed) => {
            use rand::SeedableRng;
            rand::rngs::StdRng::from_seed(seed)
        }
        None => os_seeded()?,
    };
    let values = match &spec.privacy {
        // Clipped, noised gradients; the node charges the round before
        // releasing it.
        Some(privacy) => federated::private_training_contribution(
            &global,
            &train,
            privacy.clip,
            privacy.noise_std(),
            &mut rng,
        )?,
        None => federated::training_contribution(&global, &train, &train_config(spec), &mut rng)?,
    };
    Ok(Contribution {
        values,
        metrics: None,
    })
}

/// The seed of a run's round at this node: a keyed hash of the lineage
/// head the round computes from, its number and the digest of the rows it
/// trains on ([`Extracted::digest`]), under the run's `secret`, drawn here
/// from the operating system and kept in the node's database (not the
/// node's private key, which whoever issued it may hold). The coordinator
/// can neither predict nor vary it: a redo from the same step draws the
/// same, so gives the same sum, across restarts too.
pub fn round_seed(
    secret: &[u8; 32],
    parent: &ghx_study::lineage::Head,
    round: u32,
    rows: &[u8; 32],
) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"ghx-round-seed/v2\0")
        .chain_update(secret)
        .chain_update(parent)
        .chain_update(round.to_be_bytes())
        .chain_update(rows)
        .finalize()
        .into()
}

/// Checks that keys advertised as `node`'s in `round` (a round or a
/// session), whose signed form is `statement`, were signed by that node
/// with the key of `certificate_pem`, a node certificate of the federation
/// valid now.
pub fn check_keys(
    members: &ghx_pki::signed::MemberKeys,
    round: &str,
    node: &str,
    statement: &[u8],
    (certificate_pem, signature): (&str, &[u8]),
) -> Result<(), Error> {
    members
        .verify_node(node, certificate_pem, statement, signature)
        .map_err(|reason| Error::UnvouchedKeys {
            round: round.to_owned(),
            node: node.to_owned(),
            reason,
        })
}

struct Session {
    client: Client,
    origin: RoundOrigin,
    work: Arc<RoundWork>,
    /// Set when step 3 begins: a round computes and releases once.
    computing: bool,
    expires: Instant,
}

/// What step 1 admitted a round to compute, for step 3: the round's phase,
/// the training and its rows, and what a noised round is charged under.
pub struct RoundWork {
    pub phase: Phase,
    pub spec: TrainingSpec,
    pub data: Arc<Extracted>,
    /// The rows standardised for the models sent, kept across a session's
    /// rounds.
    pub standardised: Standardised,
    pub min_cell_size: u32,
    pub claims: ghx_study::capability::Claims,
    pub manifest: Arc<ghx_study::manifest::StudyManifest>,
    /// An evaluation (a run's or an external validation): the epsilon its
    /// counts are noised at and charged.
    pub validation: Option<f64>,
    /// The run the round or session belongs to; empty outside a run.
    pub run: String,
}

/// A generator seeded from the operating system: a cryptographic one
/// (ChaCha12), with no system call per draw.
fn os_seeded() -> Result<rand::rngs::StdRng, Error> {
    use rand::SeedableRng;
    rand::rngs::StdRng::from_rng(rand::rngs::OsRng).map_err(|e| Error::Random(e.to_string()))
}

/// What a round was admitted under at step 1, for the steps after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundOrigin {
    pub study: String,
    /// The capability (`jti`) of step 1.
    pub capability: String,
    /// Hex SHA-256 of the training spec the round trains.
    pub request_sha256: String,
    /// The nodes the round or session was keyed over, sorted.
    pub participants: Vec<String>,
}

/// A training run's secure-aggregation session at this node.
struct RunSession {
    client: SessionClient,
    origin: RoundOrigin,
    work: Arc<RoundWork>,
    /// The digest of the agreed keys, every member's lineage input names.
    keys_sha256: Option<ghx_study::lineage::Head>,
    /// Each member's certificate, as it vouched for its key at agreement:
    /// its confirmation is checked against it.
    certificates: BTreeMap<String, String>,
    /// Whether every member confirmed the keys this node agreed: nothing
    /// is masked before.
    confirmed: bool,
    /// How long the session lives past its last use.
    lifetime: Duration,
    expires: Instant,
}

/// Refuses a round or session this node is not a participant of.
fn check_participant(params: &RoundParams, node: &str) -> Result<(), Error> {
    if params.participants.iter().any(|p| p == node) {
        Ok(())
    } else {
        Err(Error::NotParticipant(params.round.clone()))
    }
}

/// Adds `entry` as round (or session) `id` to `map`, first dropping the
/// entries no longer `live`; refuses an id already there.
fn insert_new<S>(
    map: &Mutex<HashMap<String, S>>,
    id: String,
    entry: S,
    live: impl Fn(&S) -> bool,
) -> Result<(), Error> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, s| live(s));
    if map.contains_key(&id) {
        return Err(Error::RoundExists(id));
    }
    map.insert(id, entry);
    Ok(())
}

/// Rounds in progress and the rows of trainings being run.
#[derive(Default)]
pub struct Rounds {
    sessions: Mutex<HashMap<String, Session>>,
    runs: Mutex<HashMap<String, RunSession>>,
    data: Mutex<HashMap<String, (Arc<Extracted>, Instant)>>,
}

/// How long extracted rows are kept after their last use.
const DATA_KEPT: Duration = Duration::from_secs(30 * 60);

impl Rounds {
    /// The training's rows under this consent context, extracted once per
    /// run and kept while rounds keep using them.
    pub fn data(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<Extracted, Error>,
    ) -> Result<Arc<Extracted>, Error> {
        let now = Instant::now();
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.retain(|_, (_, used)| now.duration_since(*used) < DATA_KEPT);
        if let Some((rows, used)) = data.get_mut(key) {
            *used = now;
            return Ok(rows.clone());
        }
        let rows = Arc::new(load()?);
        data.insert(key.to_owned(), (rows.clone(), now));
        Ok(rows)
    }

    /// Step 1: starts the round: its keys, and what step 3 will compute.
    pub fn start(
        &self,
        params: RoundParams,
        node: &str,
        origin: &RoundOrigin,
        work: Arc<RoundWork>,
        lifetime: Duration,
    ) -> Result<Advertise, Error> {
        check_participant(&params, node)?;
        let round = params.round.clone();
        let (client, advertise) = Client::new(params, node)?;
        let now = Instant::now();
        insert_new(
            &self.sessions,
            round,
            Session {
                client,
                origin: origin.clone(),
                work,
                computing: false,
                expires: now + lifetime,
            },
            |s| s.expires > now,
        )?;
        Ok(advertise)
    }

    fn with<T>(
        &self,
        round: &str,
        step: impl FnOnce(&mut Session) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get_mut(round) {
            Some(s) if s.expires > Instant::now() => step(s),
            _ => {
                sessions.remove(round);
                Err(Error::NoSuchRound(round.to_owned()))
            }
        }
    }

    /// Step 2.
    pub fn share_keys(
        &self,
        round: &str,
        advertised: &[Advertise],
    ) -> Result<Vec<EncryptedShare>, Error> {
        self.with(round, |s| Ok(s.client.share_keys(advertised)?))
    }

    /// Step 3 begins: what the round computes, once. The caller computes
    /// without holding the rounds' lock, then calls [`Rounds::masked_input`].
    pub fn begin_masked(&self, round: &str) -> Result<(RoundOrigin, Arc<RoundWork>), Error> {
        self.with(round, |s| {
            if s.computing {
                return Err(Error::AlreadyComputed(round.to_owned()));
            }
            s.computing = true;
            Ok((s.origin.clone(), s.work.clone()))
        })
    }

    /// Step 3: the contribution `values`, encoded and masked.
    pub fn masked_input(
        &self,
        round: &str,
        shares: &[EncryptedShare],
        values: &[f64],
    ) -> Result<MaskedInput, Error> {
        let input = ghx_secagg::encode(values)?;
        self.with(round, |s| Ok(s.client.mask_input(shares, &input)?))
    }

    /// Opens a training run's session (admitted as a round's step 1):
    /// returns this node's key to sign and advertise.
    pub fn open_session(
        &self,
        params: RoundParams,
        node: &str,
        origin: &RoundOrigin,
        work: Arc<RoundWork>,
        lifetime: Duration,
    ) -> Result<SessionKeys, Error> {
        check_participant(&params, node)?;
        let session = params.round.clone();
        let (client, keys) = SessionClient::new(params, node)?;
        let now = Instant::now();
        insert_new(
            &self.runs,
            session,
            RunSession {
                client,
                origin: origin.clone(),
                work,
                keys_sha256: None,
                certificates: BTreeMap::new(),
                confirmed: false,
                lifetime,
                expires: now + lifetime,
            },
            |s| s.expires > now,
        )?;
        Ok(keys)
    }

    fn with_session<T>(
        &self,
        session: &str,
        step: impl FnOnce(&mut RunSession) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match runs.get_mut(session) {
            Some(s) if s.expires > now => {
                s.expires = now + s.lifetime;
                step(s)
            }
            _ => {
                runs.remove(session);
                Err(Error::NoSuchRound(session.to_owned()))
            }
        }
    }

    /// The members' keys (checked by the caller, with the `certificates`
    /// that vouched for them), once per session. The session's sums are
    /// over the nodes whose keys these are, which `check` must accept; they
    /// are the session's participants from now on. Returns what this node
    /// confirms to the others: the statement of the study, the session and
    /// the agreed keys' digest, to be signed.
    pub fn agree_session(
        &self,
        session: &str,
        keys: &[SessionKeys],
        certificates: BTreeMap<String, String>,
        check: impl FnOnce(&RoundOrigin, &[String]) -> Result<(), Error>,
    ) -> Result<Vec<u8>, Error> {
        self.with_session(session, |s| {
            let mut members: Vec<String> = keys.iter().map(|k| k.node.clone()).collect();
            members.sort();
            members.dedup();
            check(&s.origin, &members)?;
            s.client.agree(keys)?;
            s.origin.participants = members;
            let agreed: Vec<(String, Vec<u8>)> = keys
                .iter()
                .map(|k| (k.node.clone(), k.mask_key.to_vec()))
                .collect();
            let digest = ghx_study::lineage::keys_sha256(&agreed);
            s.keys_sha256 = Some(digest);
            s.certificates = certificates;
            Ok(ghx_study::lineage::agreement_statement(
                &s.origin.study,
                session,
                &digest,
            ))
        })
    }

    /// Checks, once per session, that every other member confirmed the
    /// keys this node agreed: its signature in `confirmations` (node,
    /// signature) verifies over this node's statement under the
    /// certificate that vouched for its key (pinned where configured). A
    /// coordinator that relayed different key sets to different members
    /// gets no masked input from any of them.
    pub fn confirm_session(
        &self,
        session: &str,
        this_node: &str,
        confirmations: &[(String, Vec<u8>)],
        members: &ghx_pki::signed::MemberKeys,
    ) -> Result<(), Error> {
        self.with_session(session, |s| {
            if s.confirmed {
                return Ok(());
            }
            let digest = s
                .keys_sha256
                .ok_or_else(|| Error::NotAgreed(session.to_owned()))?;
            let statement =
                ghx_study::lineage::agreement_statement(&s.origin.study, session, &digest);
            let unconfirmed = |node: &str, reason: String| Error::Unconfirmed {
                session: session.to_owned(),
                node: node.to_owned(),
                reason,
            };
            for member in s.origin.participants.iter().filter(|m| *m != this_node) {
                let signature = confirmations
                    .iter()
                    .find(|(node, _)| node == member)
                    .map(|(_, signature)| signature)
                    .ok_or_else(|| unconfirmed(member, "no confirmation was relayed".to_owned()))?;
                let certificate = s.certificates.get(member).ok_or_else(|| {
                    unconfirmed(member, "no certificate vouched for its key".to_owned())
                })?;
                members
                    .verify_node(member, certificate, &statement, signature)
                    .map_err(|reason| unconfirmed(member, reason.to_string()))?;
            }
            s.confirmed = true;
            Ok(())
        })
    }

    /// What a session's rounds compute, read without claiming a round (its
    /// lineage is checked first, so a refused request burns no number),
    /// with the digest of its agreed keys.
    pub fn session_work(
        &self,
        session: &str,
    ) -> Result<(RoundOrigin, Arc<RoundWork>, ghx_study::lineage::Head), Error> {
        self.with_session(session, |s| {
            let keys = s
                .keys_sha256
                .ok_or_else(|| Error::NotAgreed(session.to_owned()))?;
            Ok((s.origin.clone(), s.work.clone(), keys))
        })
    }

    /// Round `number` of a session begins: the number is claimed (never
    /// masked again, even if computing fails); returns what it computes.
    pub fn begin_session_round(
        &self,
        session: &str,
        number: u32,
    ) -> Result<(RoundOrigin, Arc<RoundWork>), Error> {
        self.with_session(session, |s| {
            s.client.claim(number)?;
            Ok((s.origin.clone(), s.work.clone()))
        })
    }

    /// Round `number` of a session: the contribution `values`, encoded and
    /// masked, bound to `head` (the lineage step it was computed from):
    /// members that computed from different steps never sum to anything
    /// readable.
    pub fn session_masked_input(
        &self,
        session: &str,
        number: u32,
        head: &ghx_study::lineage::Head,
        values: &[f64],
    ) -> Result<MaskedInput, Error> {
        let input = ghx_secagg::encode(values)?;
        self.with_session(session, |s| {
            Ok(s.client.mask_bound(number, head, &input)?)
        })
    }

    /// Computes the mask of a session's round `number` ahead of it, while
    /// the coordinator sums the round before: that round then only adds it.
    pub fn prepare_session_round(&self, session: &str, number: u32) {
        let _ = self.with_session(session, |s| {
            s.client.prepare(number);
            Ok(())
        });
    }

    /// Step 4, for every node the round was keyed with and no fewer, once
    /// `bind` (which binds the round's study to them) agrees; the round is
    /// over for this node afterwards.
    pub fn unmask(
        &self,
        round: &str,
        survivors: &[String],
        bind: impl FnOnce(&RoundOrigin) -> Result<(), Error>,
    ) -> Result<Unmasking, Error> {
        let out = self.with(round, |s| {
            crate::participants::check_survivors(round, &s.origin.participants, survivors)?;
            bind(&s.origin)?;
            Ok(s.client.unmask(survivors)?)
        });
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(round);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holdout_split_is_stable_and_near_its_share() {
        let salt = [7u8; 32];
        let held = (0..10_000)
            .filter(|i| held_out(&salt, &format!("p{i}"), 0.2))
            .count();
        assert!((1_800..2_200).contains(&held), "{held}");
        assert_eq!(held_out(&salt, "p1", 0.2), held_out(&salt, "p1", 0.2));
    }

    #[test]
    fn a_rounds_seed_follows_its_step_rows_and_the_nodes_secret_only() {
        let (head, other) = ([1u8; 32], [2u8; 32]);
        let (a, b, rows, more) = ([3u8; 32], [4u8; 32], [5u8; 32], [6u8; 32]);
        let seed = round_seed(&a, &head, 3, &rows);
        assert_eq!(seed, round_seed(&a, &head, 3, &rows));
        assert_ne!(seed, round_seed(&a, &other, 3, &rows));
        assert_ne!(seed, round_seed(&a, &head, 4, &rows));
        assert_ne!(seed, round_seed(&b, &head, 3, &rows));
        assert_ne!(seed, round_seed(&a, &head, 3, &more));
        // Rows that differ in one label differ in digest.
        let mut data = Extracted {
            train: Dataset::new(2),
            holdout: Dataset::new(2),
            incomplete: 0,
            patients: Default::default(),
        };
        data.train.push(&[1.0, 2.0], true).unwrap();
        let before = data.digest();
        data.train.push(&[1.0, 2.0], false).unwrap();
        assert_ne!(before, data.digest());
    }

    #[test]
    fn rows_are_standardised_once_per_mean_and_sd() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let dim = spec.features.len();
        let mut data = Extracted {
            train: Dataset::new(dim),
            holdout: Dataset::new(dim),
            incomplete: 0,
            patients: Default::default(),
        };
        data.train.push(&vec![3.0; dim], true).unwrap();
        data.holdout.push(&vec![5.0; dim], false).unwrap();
        let model = |mean: f64| {
            ModelDocument::new(
                spec,
                &vec![mean; dim],
                &vec![2.0; dim],
                &ghx_learn::Model::zeros(dim),
            )
        };
        let cache = Standardised::default();
        let first = cache.train(&data, &model(1.0));
        assert_eq!(first.row(0), vec![1.0; dim].as_slice());
        assert!(Arc::ptr_eq(&first, &cache.train(&data, &model(1.0))));
        assert_eq!(
            cache.holdout(&data, &model(1.0)).row(0),
            vec![2.0; dim].as_slice()
        );
        // Other means: standardised again.
        let other = cache.train(&data, &model(3.0));
        assert_eq!(other.row(0), vec![0.0; dim].as_slice());
        assert!(!Arc::ptr_eq(&first, &other));
    }

    #[test]
    fn too_few_patients_says_which_groups_but_not_their_counts() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let mut train = Dataset::new(5);
        for i in 0..30 {
            train.push(&[1.0, 0.0, 2.0, 3.0, 4.0], i < 3).unwrap();
        }
        let mut holdout = Dataset::new(5);
        for i in 0..12 {
            holdout.push(&[1.0, 1.0, 2.0, 3.0, 4.0], i < 6).unwrap();
        }
        let data = Extracted {
            train,
            holdout,
            incomplete: 0,
            patients: Default::default(),
        };
        let e = contribution(
            Phase::Moments,
            spec,
            (&data, &Standardised::default()),
            (None, None),
            10,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            "too few patients here for this training: training rows with the label \
             below the minimum cell size 10"
        );
        assert!(!e.contains('3'), "{e}");
        let ok = contribution(
            Phase::Moments,
            spec,
            (&data, &Standardised::default()),
            (None, None),
            3,
            None,
        )
        .unwrap();
        assert_eq!(ok.values.len(), Phase::Moments.len(5, 6));
        assert_eq!(ok.values[0], 30.0);
    }

    #[test]
    fn a_validation_is_noised_here_before_it_leaves() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let mut data = Extracted {
            train: Dataset::new(5),
            holdout: Dataset::new(5),
            incomplete: 0,
            patients: Default::default(),
        };
        for i in 0..400 {
            let x = f64::from(i) / 40.0 - 5.0;
            data.train
                .push(&[x, 0.0, 1.0, 1.0, 1.0], i % 3 == 0)
                .unwrap();
            data.holdout
                .push(&[x, 1.0, 1.0, 1.0, 1.0], i % 4 == 0)
                .unwrap();
        }
        let mut weights = vec![0.0; 5];
        weights[0] = 1.0;
        let model = ModelDocument::new(
            spec,
            &[0.0; 5],
            &[1.0; 5],
            &ghx_learn::Model {
                hidden: None,
                weights,
                bias: 0.0,
            },
        );
        let seeded = |validation, seed| {
            contribution(
                Phase::Evaluate,
                spec,
                (&data, &Standardised::default()),
                (Some(&model), seed),
                10,
                validation,
            )
            .unwrap()
            .values
        };
        let run = |validation| seeded(validation, None);
        let exact = EvaluationSums::from_vec(&run(None)).unwrap();
        let noised = EvaluationSums::from_vec(&run(Some(0.25))).unwrap();
        // A run's evaluation draws from the run's seed: redone, the same
        // noised counts (so it is charged once); an external validation
        // (no seed) draws afresh.
        assert_eq!(
            seeded(Some(0.25), Some([7; 32])),
            seeded(Some(0.25), Some([7; 32]))
        );
        assert_ne!(
            seeded(Some(0.25), Some([7; 32])),
            seeded(Some(0.25), Some([8; 32]))
        );
        assert_ne!(run(Some(0.25)), run(Some(0.25)));
        // The exact counts in twentieths of score, against the noised ones.
        let coarse = exact.noised(ghx_learn::evaluation::NOISED_SCORE_BINS, || 0.0);
        let cells = |s: &EvaluationSums| {
            s.positive_scores
                .iter()
                .chain(&s.negative_scores)
                .copied()
                .collect::<Vec<f64>>()
        };
        let (truth, seen) = (cells(&coarse), cells(&noised));
        let differ = truth.iter().zip(&seen).filter(|(a, b)| a != b).count();
        // sd 5.6 per count: P(unchanged) = (1 - a) / (1 + a) = 0.12.
        assert!(differ >= 30, "{differ} of 40 counts noised");
        let zero = (0..seen.len()).filter(|i| i % 5 != 4);
        assert!(zero.clone().all(|i| seen[i] == 0.0 && truth[i] == 0.0));
        assert_eq!(noised.rows, seen.iter().sum::<f64>());
        assert_eq!(noised.positives, noised.positive_scores.iter().sum::<f64>());
        // Without an epsilon the histogram is exact, at full resolution
        // (nodes give every evaluation one).
        assert_eq!(exact.rows, 400.0);
        assert_eq!(exact.positives, 100.0);
    }

    fn example_work() -> Arc<RoundWork> {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        Arc::new(RoundWork {
            phase: Phase::Moments,
            spec: manifest.trainings[0].clone(),
            data: Arc::new(Extracted {
                train: Dataset::new(5),
                holdout: Dataset::new(5),
                incomplete: 0,
                patients: Default::default(),
            }),
            standardised: Standardised::default(),
            min_cell_size: 10,
            claims: ghx_study::capability::claims_for(
                &manifest,
                "study-0001",
                vec!["a".to_owned()],
                b"{}",
                time::Duration::minutes(5),
            ),
            manifest: Arc::new(manifest),
            validation: None,
            run: String::new(),
        })
    }

    #[test]
    fn a_node_outside_the_round_cannot_start_it() {
        let rounds = Rounds::default();
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        let start = |node: &str| {
            rounds.start(
                params.clone(),
                node,
                &RoundOrigin::default(),
                example_work(),
                Duration::from_secs(5),
            )
        };
        assert!(matches!(start("c"), Err(Error::NotParticipant(_))));
        start("a").unwrap();
        assert!(matches!(start("a"), Err(Error::RoundExists(_))));
        assert!(matches!(
            rounds.share_keys("r2", &[]),
            Err(Error::NoSuchRound(_))
        ));
    }

    #[test]
    fn keys_the_coordinator_substituted_or_replayed_are_refused() {
        use ghx_pki::{CertificateAuthority, CertificateRequest, Role};
        let ca = CertificateAuthority::create("test").unwrap();
        let a = ca
            .issue(&CertificateRequest::new("a", Role::Node, "A Hospital"))
            .unwrap();
        let members = ghx_pki::signed::MemberKeys::new(ca.cert_pem());
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        let (_, keys) = Client::new(params.clone(), "a").unwrap();
        let signature = ghx_pki::signed::sign(&a.key_pem, &keys.statement("r1")).unwrap();
        let check = |round: &str, keys: &Advertise| {
            check_keys(
                &members,
                round,
                &keys.node,
                &keys.statement(round),
                (&a.cert_pem, &signature),
            )
        };
        check("r1", &keys).unwrap();
        // A coordinator that swaps in keys of its own under a's name (it has
        // no key of a's to sign them with) is refused by name.
        let (_, own) = Client::new(params.clone(), "a").unwrap();
        let e = check("r1", &own).unwrap_err();
        assert_eq!(
            e.to_string(),
            "round r1: the keys advertised as a's are refused: its signature does not verify"
        );
        // a's keys of round r1, replayed in another round, are refused too.
        assert!(matches!(
            check("r2", &keys),
            Err(Error::UnvouchedKeys { .. })
        ));
        // A session key is vouched for by a signature over its own
        // statement, never by a round's.
        let (_, session_keys) = SessionClient::new(params, "a").unwrap();
        let session_signature =
            ghx_pki::signed::sign(&a.key_pem, &session_keys.statement("r1")).unwrap();
        let session_check = |signature: &[u8]| {
            check_keys(
                &members,
                "r1",
                "a",
                &session_keys.statement("r1"),
                (&a.cert_pem, signature),
            )
        };
        session_check(&session_signature).unwrap();
        assert!(matches!(
            session_check(&signature),
            Err(Error::UnvouchedKeys { .. })
        ));
    }

    #[test]
    fn a_round_is_computed_once() {
        let rounds = Rounds::default();
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        rounds
            .start(
                params,
                "a",
                &RoundOrigin::default(),
                example_work(),
                Duration::from_secs(5),
            )
            .unwrap();
        let (_, work) = rounds.begin_masked("r1").unwrap();
        assert_eq!(work.phase, Phase::Moments);
        assert!(matches!(
            rounds.begin_masked("r1"),
            Err(Error::AlreadyComputed(_))
        ));
        assert!(matches!(
            rounds.begin_masked("r2"),
            Err(Error::NoSuchRound(_))
        ));
    }
}
