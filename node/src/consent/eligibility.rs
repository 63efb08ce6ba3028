//! Materialised consent decisions: for one request context, which patients
//! take part and which sensitive categories of theirs may be used, stored
//! with each included patient's sex, birth date and cohort-print hash so a
//! query reads one row per candidate.
//!
//! Evaluating every patient's provisions for every query would make each
//! query cost a pass over all consents, so decisions are stored in
//! `consent_eligibility` under a context key: a digest of the consent
//! generation, the request's purpose, resource types, codes and hour, and
//! the hospital's consent rules. Import bumps the generation in the same
//! transaction that changes any Patient or Consent, so a withdrawal takes
//! effect for every request that starts after its import commits: such a
//! request computes a new key and re-evaluates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ConsentRecord, ConsentRequest, ConsentRules, Exclusion, Outcome, Provision, Rule};
use crate::store::{self, Store};

/// A failure preparing consent decisions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("stored consent provisions of {consent_id} are unreadable: {message}")]
    Corrupt { consent_id: String, message: String },
}

/// How many patients one context considered and why some were excluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub patients: u64,
    pub included: u64,
    pub excluded: BTreeMap<Exclusion, u64>,
}

impl Summary {
    pub fn excluded_total(&self) -> u64 {
        self.excluded.values().sum()
    }
}

/// A context whose decisions are stored and ready for the engine to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub context: String,
    pub summary: Summary,
}

/// Prepares consent contexts; one at a time, so concurrent queries with
/// the same context evaluate it once.
#[derive(Debug)]
pub struct Eligibility {
    rules: ConsentRules,
    building: Mutex<()>,
}

impl Eligibility {
    pub fn new(rules: ConsentRules) -> Self {
        Eligibility {
            rules,
            building: Mutex::new(()),
        }
    }

    pub fn rules(&self) -> &ConsentRules {
        &self.rules
    }

    /// Makes sure decisions for `request` at the current consent generation
    /// are stored, and returns their context key and summary.
    pub fn prepare(&self, store: &Store, request: &ConsentRequest) -> Result<Prepared, Error> {
        let _guard = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let generation = store.consent_generation()?;
        let context = self.context_key(generation, request);
        if let Some(summary) = store.consent_context(&context)? {
            let summary = serde_json::from_str(&summary).map_err(|e| Error::Corrupt {
                consent_id: format!("(context {context})"),
                message: e.to_string(),
            })?;
            return Ok(Prepared { context, summary });
        }
        let inputs = store.consent_inputs()?;
        let by_patient = by_patient(&inputs)?;
        let mut summary = Summary::default();
        let mut rows = Vec::new();
        for patient in &inputs.patients {
            summary.patients += 1;
            let consents = by_patient
                .get(patient.id.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            match super::evaluate(&self.rules, consents, request) {
                Outcome::Included { sensitive } => {
                    summary.included += 1;
                    rows.push(store::Decision {
                        patient,
                        sensitive_mask: sensitive.0,
                        print: crate::differencing::patient_hash(&patient.id) as i64,
                    });
                }
                Outcome::Excluded(why) => *summary.excluded.entry(why).or_default() += 1,
            }
        }
        let summary_json = serde_json::to_string(&summary).expect("summary serialises");
        store.save_consent_context(&context, generation, &summary_json, &rows)?;
        tracing::info!(
            context = %context, patients = summary.patients, included = summary.included,
            "consent decisions prepared"
        );
        Ok(Prepared { context, summary })
    }

    fn context_key(&self, generation: i64, request: &ConsentRequest) -> String {
        let mut hasher = Sha256::new();
        hasher.update(format!("{generation}\n{request:?}\n{:?}", self.rules));
        hex::encode(&hasher.finalize()[..16])
    }
}

/// The consent picture of a node at a glance: for a research request now
/// (purpose HRESCH, every class the node indexes, no sensitive code), how
/// many patients take part and why the others do not; and how many
/// patients have any Consent at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub default: super::DefaultConsent,
    pub with_consent: u64,
    pub research: Summary,
}

/// Computes the [`Picture`] at unix second `at` (nothing is stored).
pub fn picture(store: &Store, rules: &ConsentRules, at: i64) -> Result<Picture, Error> {
    let inputs = store.consent_inputs()?;
    let by_patient = by_patient(&inputs)?;
    let request = ConsentRequest {
        recipient: None,
        purpose: "HRESCH".to_owned(),
        classes: [
            "Patient",
            "Condition",
            "Observation",
            "MedicationRequest",
            "Encounter",
        ]
        .map(str::to_owned)
        .to_vec(),
        codes: Vec::new(),
        at,
        last: at,
    };
    let mut research = Summary::default();
    for patient in &inputs.patients {
        research.patients += 1;
        let consents = by_patient
            .get(patient.id.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        match super::evaluate(rules, consents, &request) {
            Outcome::Included { .. } => research.included += 1,
            Outcome::Excluded(why) => *research.excluded.entry(why).or_default() += 1,
        }
    }
    let with_consent = inputs
        .patients
        .iter()
        .filter(|p| by_patient.contains_key(p.id.as_str()))
        .count() as u64;
    Ok(Picture {
        default: rules.default,
        with_consent,
        research,
    })
}

/// Each patient's consents, read from their rows.
fn by_patient(inputs: &store::ConsentInputs) -> Result<HashMap<&str, Vec<ConsentRecord>>, Error> {
    let mut by_patient: HashMap<&str, Vec<ConsentRecord>> = HashMap::new();
    for row in &inputs.consents {
        by_patient
            .entry(row.patient_id.as_str())
            .or_default()
            .push(record_of_row(row)?);
    }
    Ok(by_patient)
}

pub fn record_of_row(row: &store::ConsentRow) -> Result<ConsentRecord, Error> {
    // Rows written before provisions were indexed hold only the root rule.
    let provision = if row.provision.is_empty() {
        Some(Provision {
            rule: Some(if row.decision == "permit" {
                Rule::Permit
            } else {
                Rule::Deny
            }),
            from: None,
            until: None,
            purposes: Vec::new(),
            classes: Vec::new(),
            codes: Vec::new(),
            labels: Vec::new(),
            actors: Vec::new(),
            unsupported: false,
            provisions: Vec::new(),
        })
    } else {
        serde_json::from_str::<Option<Provision>>(&row.provision).map_err(|e| Error::Corrupt {
            consent_id: row.consent_id.clone(),
            message: e.to_string(),
        })?
    };
    Ok(ConsentRecord {
        scope: row.scope.clone(),
        status: row.status.clone(),
        recorded_at: row.recorded_at,
        provision,
    })
}
