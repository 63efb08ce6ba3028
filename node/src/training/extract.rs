//! A training's rows: features and label read through the aggregate
//! engine under consent, complete cases only, each patient held out or not
//! by a stable hash; and their standardisation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use ghx_learn::{Dataset, Standardiser, TrainConfig};
use ghx_study::training::{Algorithm, ModelDocument, TrainingSpec};
use sha2::{Digest, Sha256};

use super::Error;
use crate::consent::SensitiveCodes;
use crate::engine;
use crate::store::Store;

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

    pub(super) fn positives(&self) -> usize {
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

pub(super) fn held_out(salt: &[u8], id: &str, share: f64) -> bool {
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

    pub(super) fn train(&self, data: &Extracted, model: &ModelDocument) -> Arc<Dataset> {
        Self::get(&self.train, &data.train, model)
    }

    pub(super) fn holdout(&self, data: &Extracted, model: &ModelDocument) -> Arc<Dataset> {
        Self::get(&self.holdout, &data.holdout, model)
    }
}
