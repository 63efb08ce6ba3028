//! Federated training end to end: three hospital nodes and a coordinator in
//! this process over gRPC with mutual TLS, secure aggregation every round,
//! compared with the same model trained on the pooled rows. One test
//! binary; its files by concern: honest runs, interruptions, noised
//! training, and a compromised coordinator's attacks (the harness, the
//! lineage and the participant sets).

mod harness;
mod interruptions;
mod lineage_attacks;
mod participant_attacks;
mod privacy;
mod runs;

use std::time::Duration;

use ghx::local_federation::{LocalFederation, LocalFederationOptions, RESEARCHER};
use ghx_coordinator::store::{CoordinatorStore, TrainingRunRow};
use ghx_coordinator::training::{Evaluation, RunStatus, TrainingRecord};
use ghx_learn::metrics;
use ghx_learn::{Dataset, Model, Standardiser};
use ghx_node::policy::PolicyDir;
use ghx_node::training::{self, Extracted, Phase};
use ghx_proto::v1 as pb;
use ghx_study::lineage::{Evidence, SignedInput};
use ghx_study::manifest::StudyManifest;
use ghx_study::training::{ModelDocument, TrainingSpec};
use rand::SeedableRng;

const MANIFEST: &str = include_str!("../../../deploy/examples/study-t2d-model.json");
const DP_MANIFEST: &str = include_str!("../../../deploy/examples/study-t2d-model-dp.json");
const MLP_MANIFEST: &str = include_str!("../../../deploy/examples/study-t2d-mlp.json");
const PATIENTS: usize = 1500;

async fn start() -> (LocalFederation, tempfile::TempDir) {
    start_with(PATIENTS, ghx_node::config::DEFAULT_MIN_PARTICIPANTS).await
}

/// A federation of `patients` per hospital whose nodes sum over at least
/// `min_sum_participants` of them.
async fn start_with(
    patients: usize,
    min_sum_participants: u32,
) -> (LocalFederation, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: patients,
        seed: 77,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .expect("the local federation starts");
    (federation, dir)
}

/// Waits for a run to stop running and returns its record.
async fn finished(federation: &LocalFederation, member: &str, run_id: &str) -> TrainingRecord {
    let mut client = federation.client(member).await.unwrap();
    for _ in 0..1200 {
        let status = client
            .get_training(pb::GetTrainingRequest {
                run_id: run_id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        if status.status != "running" {
            return serde_json::from_slice(&status.record_json).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("training run {run_id} did not finish in 5 minutes");
}

/// Starts the researcher's run of `training` (empty: the study's first)
/// and waits for it to stop.
async fn run_to_end(
    federation: &LocalFederation,
    study_id: &str,
    training: &str,
) -> TrainingRecord {
    let status = federation
        .client(RESEARCHER)
        .await
        .unwrap()
        .start_training(pb::StartTrainingRequest {
            study_id: study_id.to_owned(),
            training: training.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    finished(federation, RESEARCHER, &status.run_id).await
}

/// External validation of `model` as the researcher uploads it.
async fn validate(
    federation: &LocalFederation,
    study_id: &str,
    training: &str,
    model: &ModelDocument,
) -> Result<Evaluation, tonic::Status> {
    let report = federation
        .client(RESEARCHER)
        .await
        .unwrap()
        .validate_model(pb::ValidateModelRequest {
            study_id: study_id.to_owned(),
            training: training.to_owned(),
            model_json: serde_json::to_vec(model).unwrap(),
        })
        .await?
        .into_inner();
    Ok(serde_json::from_slice(&report.report_json).unwrap())
}

/// Each node's rows, read as the node reads them (same consent context).
fn rows_at(federation: &LocalFederation, spec: &TrainingSpec, purpose: &str) -> Vec<Extracted> {
    federation
        .nodes
        .iter()
        .map(|node| {
            let policy =
                PolicyDir::load(&federation.dir.join("policies").join(node.profile.id)).unwrap();
            training::extract_under_policy(&node.store, &policy, purpose, spec).unwrap()
        })
        .collect()
}

/// Imports a research-consent withdrawal for each of `patients` at node
/// `index`.
async fn withdraw(federation: &LocalFederation, index: usize, patients: &[String]) {
    let lines = patients.iter().map(|id| {
        serde_json::json!({
            "resourceType": "Consent",
            "id": format!("{id}-withdrawal"),
            "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "patient": {"reference": format!("Patient/{id}")},
            "dateTime": "2026-12-01T09:00:00+09:00",
            "provision": {"type": "deny"},
        })
    });
    import_at(federation, index, "Consent", lines).await;
}

/// Imports a later body-mass index of `value` for `patient` at node
/// `index` (the latest before the example's `as_of`).
async fn measure_bmi(federation: &LocalFederation, index: usize, patient: &str, value: f64) {
    let observation = serde_json::json!({
        "resourceType": "Observation",
        "id": format!("{patient}-bmi-remeasured"),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": "2025-12-31T09:10:00+09:00",
        "valueQuantity": {"value": value, "unit": "kg/m2", "system": "http://unitsofmeasure.org", "code": "kg/m2"},
    });
    import_at(federation, index, "Observation", [observation]).await;
}

/// Imports `resources` of `kind` at node `index`, whole.
async fn import_at(
    federation: &LocalFederation,
    index: usize,
    kind: &str,
    resources: impl IntoIterator<Item = serde_json::Value>,
) {
    let lines: Vec<String> = resources.into_iter().map(|r| r.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(format!("{kind}.ndjson")), lines.join("\n")).unwrap();
    let store = federation.nodes[index].store.clone();
    let report = tokio::task::spawn_blocking(move || {
        ghx_node::import::import_path(&store, dir.path(), &Default::default())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
}

fn pooled(parts: impl Iterator<Item = Dataset>, dim: usize) -> Dataset {
    let mut out = Dataset::new(dim);
    for part in parts {
        for i in 0..part.len() {
            out.push(part.row(i), part.label(i) > 0.5).unwrap();
        }
    }
    out
}
