//! Federated training end to end: three hospital nodes and a coordinator in
//! this process over gRPC with mutual TLS, secure aggregation every round,
//! compared with the same model trained on the pooled rows.

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

const MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-model.json");
const DP_MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-model-dp.json");
const MLP_MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-mlp.json");
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
    let lines: Vec<String> = patients
        .iter()
        .map(|id| {
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
            .to_string()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Consent.ndjson"), lines.join("\n")).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_logistic_regression_matches_pooled_training_and_resumes() {
    let (federation, _dir) = start().await;
    let manifest = StudyManifest::parse(MANIFEST.as_bytes()).unwrap();
    let spec = manifest.trainings[0].clone();
    let study_id = federation
        .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();

    // A startup may not train here: the hospitals' policies allow
    // training only to academic organisations, and each node says so.
    let industry = federation
        .approved_study(
            ghx::local_federation::REQUESTER,
            MANIFEST.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    let status = federation
        .client(ghx::local_federation::REQUESTER)
        .await
        .unwrap()
        .start_training(pb::StartTrainingRequest {
            study_id: industry.clone(),
            training: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = finished(
        &federation,
        ghx::local_federation::REQUESTER,
        &status.run_id,
    )
    .await;
    assert_eq!(refused.status, RunStatus::Failed);
    assert!(
        refused.detail.contains("access policy") && refused.detail.contains("refuses"),
        "{}",
        refused.detail
    );
    assert!(refused.model.is_none());

    let record = run_to_end(&federation, &study_id, "t2d-risk").await;
    assert_eq!(record.status, RunStatus::Completed, "{}", record.detail);
    assert_eq!(record.rounds.len(), spec.rounds as usize);
    let nodes: Vec<String> = federation
        .nodes
        .iter()
        .map(|n| n.profile.id.to_owned())
        .collect();
    for round in &record.rounds {
        assert_eq!(round.contributors, nodes, "round {}", round.round);
        assert!(round.failures.is_empty());
        // Every round's keys were agreed while the step before it (the
        // moments round, then the round before) computed.
        assert!(round.keys_ahead, "round {}", round.round);
        // Every round was a session round: where the answer that ended it
        // spent its time (outside the node's handler, before and after its
        // computation) is kept.
        assert!(
            round.last_answer_ms.iter().all(|ms| *ms > 0.0),
            "round {}: {:?}",
            round.round,
            round.last_answer_ms
        );
    }
    // Rounds sum the local models and nothing that evaluates the model the
    // coordinator sent (a loss would give a crafted model's patient's
    // label): the run's one evaluation is its last.
    assert!(
        record
            .rounds
            .iter()
            .all(|r| r.train_loss.is_none() && r.holdout.is_none())
    );

    // The same rows, pooled, with the same standardisation and the same
    // optimiser run for as many epochs as there were rounds.
    let parts = rows_at(&federation, &spec, &manifest.purpose);
    let dim = spec.features.len();
    let train = pooled(parts.iter().map(|p| p.train.clone()), dim);
    let holdout = pooled(parts.iter().map(|p| p.holdout.clone()), dim);
    assert_eq!(
        record.moments_rows,
        train.len() as u64,
        "the moments round pooled every node's training rows"
    );
    let model = record.model.clone().unwrap();
    let standardiser = Standardiser::from_sums(&Standardiser::local_sums(&train)).unwrap();
    for (a, b) in standardiser.mean.iter().zip(&model.mean) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    let (mut train_s, mut holdout_s) = (train.clone(), holdout.clone());
    standardiser.apply(&mut train_s);
    standardiser.apply(&mut holdout_s);
    let config = training::train_config(&spec);
    let mut central = Model::zeros(dim);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..spec.rounds {
        central = central.train(&train_s, &config, &mut rng).unwrap();
    }
    let federated = model.model();
    let pooled_auc =
        metrics::auc(&central.predict_all(&holdout_s), holdout_s.labels()).expect("both classes");
    let federated_auc =
        metrics::auc(&federated.predict_all(&holdout_s), holdout_s.labels()).expect("both classes");
    assert!(pooled_auc > 0.7, "pooled AUC {pooled_auc}");
    assert!(
        (federated_auc - pooled_auc).abs() < 0.005,
        "federated AUC {federated_auc} vs pooled {pooled_auc}"
    );
    // The run's evaluation, of the model each node's lineage reached,
    // noised at each node at the epsilon the training declares for
    // evaluations (the coordinator sees the summed histogram before it is
    // merged: exact, its tails would hold a few patients) and charged.
    let evaluation = record.evaluation.clone().unwrap();
    let declared = spec.validation.unwrap().epsilon;
    let noise = evaluation
        .noise
        .clone()
        .expect("a run's evaluation is noised");
    assert_eq!((noise.epsilon, noise.bins), (declared, 20));
    let pooled_metrics = evaluation.pooled.as_ref().unwrap();
    // The rows are read off 40 noised counts.
    let rows_off = (pooled_metrics.rows as f64 - holdout.len() as f64).abs();
    assert!(
        rows_off <= 5.0 * noise.pooled_sd * 40f64.sqrt(),
        "{} rows released, {} held out",
        pooled_metrics.rows,
        holdout.len()
    );
    let reported = pooled_metrics.auc.unwrap();
    assert!(
        (reported - federated_auc).abs() < 0.3,
        "reported {reported} vs exact {federated_auc}"
    );
    eprintln!(
        "the run's noised AUC {reported:.4} vs exact {federated_auc:.4} (epsilon {declared})"
    );
    // No node's own figures beside the pooled ones: the pooled less the
    // others' would be one node's in bins of a few of its patients.
    assert!(evaluation.per_node.is_empty(), "{:?}", evaluation.per_node);
    assert_eq!(evaluation.contributors, nodes);
    eprintln!(
        "pooled AUC {pooled_auc:.4}, federated AUC {federated_auc:.4} (reported {reported:.4}), \
         {} training rows, {} held out",
        train.len(),
        holdout.len()
    );

    // Every node audited the run: one session opened for every training
    // round (admitted once), and one masked contribution released per
    // round (moments, each training round, evaluation).
    for node in &federation.nodes {
        let audit = node.store.audit_entries().unwrap();
        let answered = |action: &str| {
            audit
                .iter()
                .filter(|e| e.action == action && e.decision == "answered")
                .count()
        };
        assert_eq!(answered("round:train"), 1, "{}", node.profile.id);
        assert_eq!(
            answered(ghx_audit::action::MASKED_INPUT),
            spec.rounds as usize + 2,
            "{}",
            node.profile.id
        );
    }
    // The coordinator recorded every masked contribution it received, one
    // entry per node per round, the session rounds' entries written while
    // the next round computed (the last one's before the evaluation), each
    // with the digest the node recorded of what it sent.
    let coordinator_db = federation.dir.join("ghx-coordinator.db");
    let cert = std::fs::read_to_string(federation.pki.tls_files("coordinator").cert).unwrap();
    let log = ghx::audit_files::read_database(coordinator_db.to_str().unwrap(), &cert).unwrap();
    let received: Vec<_> = log
        .entries
        .iter()
        .filter(|e| e.action == ghx_audit::action::MASKED_INPUT && e.decision == "answered")
        .collect();
    assert_eq!(received.len(), 3 * (spec.rounds as usize + 2));
    for node in &federation.nodes {
        let sent: std::collections::BTreeSet<String> = node
            .store
            .audit_entries()
            .unwrap()
            .into_iter()
            .filter(|e| e.action == ghx_audit::action::MASKED_INPUT)
            .map(|e| e.result_sha256)
            .collect();
        let got: std::collections::BTreeSet<String> = received
            .iter()
            .filter(|e| e.peer == node.profile.id)
            .map(|e| e.result_sha256.clone())
            .collect();
        assert_eq!(got, sent, "{}", node.profile.id);
    }

    assert!(noise.pooled_sd > 1.0, "{noise:?}");
    let org = "Chonnam National University Medical School";
    let spent = |expected: f64| {
        for node in &federation.nodes {
            let spent = node.store.privacy_spent(org, &study_id).unwrap();
            assert!(
                (spent.epsilon - expected).abs() < 1e-9,
                "{}: spent {} of {expected}",
                node.profile.id,
                spent.epsilon
            );
        }
    };
    // The run's evaluation was charged.
    spent(declared);
    // External validation of a model as a requester would upload it: every
    // node noises its counts at the epsilon the training declares and
    // charges it to the study's budget (issue 38 (3)). A model for other
    // features is refused before anything is charged.
    let mut wrong = model.clone();
    wrong.weights.pop();
    let bad = validate(&federation, &study_id, &spec.name, &wrong)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("one per feature"),
        "{}",
        bad.message()
    );

    // Issue 38 (3): a model crafted so that one held-out patient alone
    // scores in the top bin, whose positives would be that patient's
    // label. Every count it is read from was noised at each node (the
    // node's own test shows the noise), and every bin released holds at
    // least k noisy patients, in whole twentieths of score.
    let (feature, top, second) = (0..dim)
        .find_map(|j| {
            let mut values: Vec<f64> = parts
                .iter()
                .flat_map(|p| (0..p.holdout.len()).map(move |i| p.holdout.row(i)[j]))
                .collect();
            values.sort_by(f64::total_cmp);
            let (top, second) = (values[values.len() - 1], values[values.len() - 2]);
            (top > second).then_some((j, top, second))
        })
        .expect("a feature whose largest held-out value is one patient's");
    let mut params = vec![0.0; dim + 1];
    let weight = 40.0 / (top - second);
    params[feature] = weight;
    params[dim] = -weight * (top + second) / 2.0;
    let singled_out = Model::zeros(dim).with_params(&params).unwrap();
    let alone: usize = parts
        .iter()
        .map(|p| {
            let scores = singled_out.predict_all(&p.holdout);
            scores.iter().filter(|s| **s >= 0.9).count()
        })
        .sum();
    assert_eq!(
        alone, 1,
        "the crafted model puts one patient in the top bin"
    );
    let crafted = ModelDocument::new(&spec, &vec![0.0; dim], &vec![1.0; dim], &singled_out);
    let seen = validate(&federation, &study_id, &spec.name, &crafted)
        .await
        .unwrap();
    assert_eq!(seen.noise.as_ref().map(|n| n.epsilon), Some(declared));
    let k = u64::from(manifest.min_cell_size.default);
    let pooled = seen
        .pooled
        .expect("both classes pooled reach the cell size");
    assert!(seen.per_node.is_empty());
    let bins = &pooled.calibration;
    assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), pooled.rows);
    assert!(bins.iter().all(|b| b.count >= k), "{bins:?}");
    for edge in bins.iter().flat_map(|b| [b.lower, b.upper]) {
        assert!(
            ((edge * 20.0) - (edge * 20.0).round()).abs() < 1e-9,
            "{bins:?}"
        );
    }
    spent(2.0 * declared);
    // The budget holds the run's evaluation and one validation: another
    // is refused at every node, saying why, and nothing more is charged.
    let refused = validate(&federation, &study_id, &spec.name, &model)
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("privacy budget"),
        "{}",
        refused.message()
    );
    spent(2.0 * declared);

    // A run recorded before nodes kept lineage (no evidence with its
    // rounds) cannot resume: the nodes take no model from the coordinator.
    let store = CoordinatorStore::open(
        federation
            .dir
            .join("ghx-coordinator.db")
            .to_str()
            .expect("UTF-8 path"),
    )
    .unwrap();
    let mut interrupted = record.clone();
    interrupted.run_id = "run-0099".to_owned();
    interrupted.status = RunStatus::Running;
    interrupted.rounds.truncate(3);
    interrupted.evaluation = None;
    interrupted.lineage = None;
    store
        .save_training_run(
            &TrainingRunRow {
                id: interrupted.run_id.clone(),
                study_id: study_id.clone(),
                training: spec.name.clone(),
                status: "running".to_owned(),
                record_json: serde_json::to_string(&interrupted).unwrap(),
                updated_at: "2026-11-29T00:00:00Z".to_owned(),
            },
            &[],
        )
        .unwrap();
    let resumed = federation.coordinator_api().resume_training().unwrap();
    assert_eq!(resumed, vec!["run-0099".to_owned()]);
    let record = finished(&federation, RESEARCHER, "run-0099").await;
    assert_eq!(record.status, RunStatus::Failed, "{}", record.detail);
    assert!(
        record
            .detail
            .contains("round 4 of run run-0099 needs the evidence of the round before"),
        "{}",
        record.detail
    );
    assert_eq!(record.rounds.len(), 3);

    // The budget is spent: a new run, whose evaluation it could not pay,
    // is refused at its round 0 rather than failing after its last.
    let refused = run_to_end(&federation, &study_id, "").await;
    assert_eq!(refused.status, RunStatus::Failed);
    assert!(
        refused
            .detail
            .contains("a new run's evaluation costs epsilon 0.25"),
        "{}",
        refused.detail
    );
    assert!(refused.rounds.is_empty(), "{:?}", refused.rounds.len());
    spent(2.0 * declared);

    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_mlp_trains_evaluates_and_validates_like_one_trained_on_pooled_rows() {
    let (federation, _dir) = start().await;
    let manifest = StudyManifest::parse(MLP_MANIFEST.as_bytes()).unwrap();
    let spec = manifest.trainings[0].clone();
    let units = spec.hidden_units.unwrap() as usize;
    let study_id = federation
        .approved_study(RESEARCHER, MLP_MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();
    let record = run_to_end(&federation, &study_id, "").await;
    assert_eq!(record.status, RunStatus::Completed, "{}", record.detail);
    assert_eq!(record.rounds.len(), spec.rounds as usize);
    let model = record.model.clone().unwrap();
    let dim = spec.features.len();
    assert_eq!(model.model, ghx_study::training::ModelKind::Mlp);
    let hidden = model
        .hidden
        .as_ref()
        .expect("an MLP document has its hidden layer");
    assert_eq!(hidden.bias.len(), units);
    assert!(hidden.weights.iter().all(|row| row.len() == dim));
    assert_eq!(model.weights.len(), units);
    for round in &record.rounds {
        assert_eq!(round.contributors.len(), 3, "round {}", round.round);
        // Only the latest MLP is kept (the record is saved every round).
        assert!(round.weights.is_empty());
    }
    assert!(
        record
            .rounds
            .iter()
            .all(|r| r.train_loss.is_none() && r.holdout.is_none())
    );

    // The same rows pooled, the same optimiser as many epochs as rounds,
    // from an MLP of the same size.
    let parts = rows_at(&federation, &spec, &manifest.purpose);
    let mut train = pooled(parts.iter().map(|p| p.train.clone()), dim);
    let mut holdout = pooled(parts.iter().map(|p| p.holdout.clone()), dim);
    let standardiser = Standardiser {
        mean: model.mean.clone(),
        sd: model.sd.clone(),
    };
    standardiser.apply(&mut train);
    standardiser.apply(&mut holdout);
    // From the start the training declares, as the federation's run did.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut central = spec.declared_initial_model().unwrap();
    let config = training::train_config(&spec);
    for _ in 0..spec.rounds {
        central = central.train(&train, &config, &mut rng).unwrap();
    }
    let auc = |m: &Model| metrics::auc(&m.predict_all(&holdout), holdout.labels()).unwrap();
    let (pooled_auc, federated_auc) = (auc(&central), auc(&model.model()));
    let reported = record
        .evaluation
        .as_ref()
        .unwrap()
        .pooled
        .as_ref()
        .unwrap()
        .auc
        .unwrap();
    eprintln!(
        "MLP: pooled AUC {pooled_auc:.4}, federated AUC {federated_auc:.4} (reported {reported:.4})"
    );
    assert!(pooled_auc > 0.7, "pooled MLP AUC {pooled_auc}");
    assert!(
        (federated_auc - pooled_auc).abs() < 0.01,
        "federated MLP AUC {federated_auc} vs pooled {pooled_auc}"
    );
    // The nodes evaluated the MLP as it is computed here, up to the noise
    // each added.
    assert!(
        (reported - federated_auc).abs() < 0.3,
        "reported {reported} vs exact {federated_auc}"
    );

    // External validation takes the MLP document back; a malformed hidden
    // layer is refused with the field named.
    // Noised at each node (epsilon 0.25 in this example), as the run's own
    // evaluation was.
    let validation = validate(&federation, &study_id, &spec.name, &model)
        .await
        .unwrap();
    assert_eq!(validation.noise.as_ref().unwrap().epsilon, 0.25);
    let noisy_auc = validation.pooled.unwrap().auc.unwrap();
    assert!(
        (noisy_auc - federated_auc).abs() < 0.3,
        "validation AUC {noisy_auc} vs exact {federated_auc}"
    );
    let mut ragged = model.clone();
    ragged.hidden.as_mut().unwrap().weights[0].pop();
    let bad = validate(&federation, &study_id, &spec.name, &ragged)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("model.hidden.weights"),
        "{}",
        bad.message()
    );
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hospital_going_offline_stops_the_training_rather_than_summing_over_two() {
    // Issue 38 (4): nodes sum over at least three hospitals and a study
    // over one set of them, so the coordinator cannot carry on among the
    // other two when one drops out (a dropout it could fake, to subtract
    // the two's sum from the three's). The study runs again once the
    // hospital is back.
    let (mut federation, _dir) = start().await;
    let mut manifest: serde_json::Value = serde_json::from_str(MANIFEST).unwrap();
    manifest["trainings"][0]["rounds"] = 100.into();
    let study_id = federation
        .approved_study(RESEARCHER, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    let mut client = federation.client(RESEARCHER).await.unwrap();
    let status = client
        .start_training(pb::StartTrainingRequest {
            study_id: study_id.clone(),
            training: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Let a few rounds complete with every hospital, then take one away.
    loop {
        let now = client
            .get_training(pb::GetTrainingRequest {
                run_id: status.run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if now.rounds_done >= 3 || now.status != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    federation.stop_node("christian").await;
    let record = finished(&federation, RESEARCHER, &status.run_id).await;
    assert_eq!(record.status, RunStatus::Failed, "{}", record.detail);
    let all = ["chonnam", "chosun", "christian"];
    assert!(
        record.rounds.len() >= 3 && record.rounds.len() < 100,
        "{} rounds: {}",
        record.rounds.len(),
        record.detail
    );
    assert!(
        record.rounds.iter().all(|r| r.contributors == all),
        "{:?}",
        record
            .rounds
            .iter()
            .map(|r| &r.contributors)
            .collect::<Vec<_>>()
    );
    assert!(record.evaluation.is_none());
    assert!(record.detail.contains("christian"), "{}", record.detail);
    assert!(
        record
            .detail
            .contains("this node sums only over at least 3"),
        "{}",
        record.detail
    );
    // Back online: the run resumes where it stopped, over the three
    // again, from the lineage each node keeps (and the coordinator's
    // evidence of the last round it summed; a node that applied it
    // already just goes on).
    federation.restart_node("christian").await.unwrap();
    in_coordinator_db(
        &federation,
        &format!(
            "UPDATE training_runs SET status = 'running', \
             record_json = json_set(record_json, '$.status', 'running') \
             WHERE id = '{}';",
            status.run_id
        ),
    );
    let resumed = federation.coordinator_api().resume_training().unwrap();
    assert_eq!(resumed, vec![status.run_id.clone()]);
    let again = finished(&federation, RESEARCHER, &status.run_id).await;
    assert_eq!(again.status, RunStatus::Completed, "{}", again.detail);
    assert_eq!(again.resumed, 1);
    assert_eq!(again.rounds.len(), 100);
    assert_eq!(again.rounds[..record.rounds.len()], record.rounds[..]);
    assert!(again.rounds.iter().all(|r| r.contributors == all));
    assert_eq!(again.evaluation.unwrap().contributors, all);
    federation.shutdown().await;
}

/// A run of the example training with `rounds` rounds, started and past
/// its second round: (study id, run id).
async fn training_under_way(federation: &LocalFederation, rounds: u32) -> (String, String) {
    let mut manifest: serde_json::Value = serde_json::from_str(MANIFEST).unwrap();
    manifest["trainings"][0]["rounds"] = rounds.into();
    let study_id = federation
        .approved_study(RESEARCHER, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    let mut client = federation.client(RESEARCHER).await.unwrap();
    let run_id = client
        .start_training(pb::StartTrainingRequest {
            study_id: study_id.clone(),
            training: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    loop {
        let now = client
            .get_training(pb::GetTrainingRequest {
                run_id: run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if now.rounds_done >= 2 || now.status != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (study_id, run_id)
}

/// Runs `sql` on the coordinator's database behind its back (what an
/// operator or a failure could do to it).
fn in_coordinator_db(federation: &LocalFederation, sql: &str) {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    let db = federation.dir.join("ghx-coordinator.db");
    SqliteConnection::establish(db.to_str().unwrap())
        .unwrap()
        .batch_execute(&format!("PRAGMA busy_timeout = 10000; {sql}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_the_coordinator_cannot_audit_stops_the_training() {
    let (federation, _dir) = start().await;
    let (_, run_id) = training_under_way(&federation, 500).await;
    // From now on the coordinator's audit log takes no entry. A session
    // round's entries are written while the next round computes; that
    // round must not be taken once the write failed.
    in_coordinator_db(
        &federation,
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log \
         BEGIN SELECT RAISE(ABORT, 'audit volume full'); END;",
    );
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Failed);
    assert!(
        record.detail.contains("audit log could not record")
            && record.detail.contains("audit volume full"),
        "{}",
        record.detail
    );
    assert!(record.rounds.len() < 500, "{} rounds", record.rounds.len());
    assert!(record.evaluation.is_none());
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_nodes_never_heard_of_still_stops_the_training() {
    let (federation, _dir) = start().await;
    let (study_id, run_id) = training_under_way(&federation, 500).await;
    // Revoked in the coordinator's store only, as when delivering the
    // revocation to the nodes failed: the nodes keep answering, so only the
    // coordinator's own check, made while each step runs, stops the run.
    in_coordinator_db(
        &federation,
        &format!("UPDATE studies SET status = 'revoked' WHERE id = '{study_id}';"),
    );
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Failed);
    assert!(record.detail.contains("revoked"), "{}", record.detail);
    assert!(record.rounds.len() < 500, "{} rounds", record.rounds.len());
    // The step whose check failed was computed (every node released its
    // masked contribution: the moments round, the rounds kept and that
    // one) but is not in the record the requester reads.
    for node in &federation.nodes {
        let released = node
            .store
            .audit_entries()
            .unwrap()
            .iter()
            .filter(|e| {
                e.action == ghx_audit::action::MASKED_INPUT && e.decision == ghx_audit::ANSWERED
            })
            .count();
        assert_eq!(released, 1 + record.rounds.len() + 1, "{}", node.profile.id);
    }
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_study_stops_a_running_training() {
    let (federation, _dir) = start().await;
    let (study_id, run_id) = training_under_way(&federation, 500).await;
    federation
        .client(ghx::local_federation::COMMITTEE)
        .await
        .unwrap()
        .revoke_study(pb::RevokeStudyRequest {
            study_id,
            reason: "consent process under review".to_owned(),
        })
        .await
        .unwrap();
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Failed);
    assert!(record.detail.contains("revoked"), "{}", record.detail);
    assert!(record.rounds.len() < 500);
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noised_training_is_charged_round_by_round_and_stops_when_the_budget_is_spent() {
    // Noise of the example's size (epsilon under 0.5, what the hospitals'
    // policies allow a study) needs a few thousand patients to learn from.
    let (federation, _dir) = start_with(4000, ghx_node::config::DEFAULT_MIN_PARTICIPANTS).await;
    // The example's DP-FedSGD training: one clipped, noised full-batch
    // gradient per round; fewer rounds here.
    let mut manifest: serde_json::Value = serde_json::from_str(DP_MANIFEST).unwrap();
    let rounds: u64 = 12;
    manifest["trainings"][0]["rounds"] = rounds.into();
    let privacy: ghx_study::training::TrainingPrivacy =
        serde_json::from_value(manifest["trainings"][0]["privacy"].clone()).unwrap();
    let cost = privacy.epsilon_after(rounds);
    // Room for the run and two rounds more, not for a second run.
    manifest["privacy_budget"] = (privacy.epsilon_after(rounds + 2) + 1e-6).into();
    let study_id = federation
        .approved_study(RESEARCHER, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    let client = federation.client(RESEARCHER).await.unwrap();
    let start = || {
        let mut client = client.clone();
        let request = pb::StartTrainingRequest {
            study_id: study_id.clone(),
            training: String::new(),
        };
        async move {
            client
                .start_training(request)
                .await
                .unwrap()
                .into_inner()
                .run_id
        }
    };
    let run_id = start().await;
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Completed, "{}", record.detail);
    assert_eq!(record.rounds.len(), rounds as usize);
    // The noise (sd 85 per value per site) is small against gradients
    // summed over thousands of patients: the model still learns. The
    // training declares no evaluation epsilon, so the run is not evaluated:
    // the model is scored here, on the nodes' held-out rows.
    assert!(record.evaluation.is_none());
    let spec: TrainingSpec = serde_json::from_value(manifest["trainings"][0].clone()).unwrap();
    let purpose = manifest["purpose"].as_str().unwrap();
    let parts = rows_at(&federation, &spec, purpose);
    let mut holdout = pooled(parts.iter().map(|p| p.holdout.clone()), spec.features.len());
    let model = record.model.clone().unwrap();
    Standardiser {
        mean: model.mean.clone(),
        sd: model.sd.clone(),
    }
    .apply(&mut holdout);
    let auc = metrics::auc(&model.model().predict_all(&holdout), holdout.labels()).unwrap();
    eprintln!("noised training: {rounds} rounds, epsilon {cost:.4}, pooled held-out AUC {auc:.4}");
    assert!(auc > 0.7, "AUC {auc}");
    // Each site charged every round: the charges add up to the stated
    // cost of the whole training, with delta once.
    let org = "Chonnam National University Medical School";
    for node in &federation.nodes {
        let spent = node.store.privacy_spent(org, &record.study_id).unwrap();
        assert!(
            (spent.epsilon - cost).abs() < 1e-9,
            "{}: spent {} of {cost}",
            node.profile.id,
            spent.epsilon
        );
        assert!((spent.delta - privacy.delta).abs() < 1e-15);
        assert_eq!(spent.queries, rounds as i64);
        // Every round charged within the one session the run opened.
        let opened = node
            .store
            .audit_entries()
            .unwrap()
            .iter()
            .filter(|e| e.action == "round:train" && e.decision == "answered")
            .count();
        assert_eq!(opened, 1, "{}", node.profile.id);
    }
    let card = ghx::training_report::model_card(
        &record,
        &StudyManifest::parse(&serde_json::to_vec(&manifest).unwrap()).unwrap(),
    );
    assert!(
        card.contains(&format!(
            "{rounds} rounds cost epsilon {cost:.4} at delta 1e-6"
        )),
        "{card}"
    );

    // A second run continues the same training's account at each site: two
    // more rounds fit, the third is refused everywhere and the run fails
    // saying why, with nothing charged beyond the budget.
    let run_id = start().await;
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Failed);
    assert!(
        record.detail.contains("privacy budget"),
        "{}",
        record.detail
    );
    assert_eq!(record.rounds.len(), 2, "{}", record.detail);
    for node in &federation.nodes {
        let spent = node.store.privacy_spent(org, &record.study_id).unwrap();
        assert!((spent.epsilon - privacy.epsilon_after(rounds + 2)).abs() < 1e-9);
    }
    // This training declares no validation noise: the nodes refuse to
    // evaluate a model the requester supplies.
    let spec: TrainingSpec = serde_json::from_value(manifest["trainings"][0].clone()).unwrap();
    let crafted = ModelDocument::new(
        &spec,
        &vec![0.0; spec.features.len()],
        &vec![1.0; spec.features.len()],
        &Model::zeros(spec.features.len()),
    );
    let refused = validate(&federation, &record.study_id, &spec.name, &crafted)
        .await
        .unwrap_err();
    assert!(
        refused
            .message()
            .contains("must declare validation.epsilon in the study's manifest"),
        "{}",
        refused.message()
    );
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusing_a_noised_round_for_too_few_patients_is_not_charged() {
    // Nodes that accept sums over two hospitals, so that the other two can
    // carry the run.
    let (federation, _dir) = start_with(PATIENTS, 2).await;
    // Christian's cell size for this study is above its patient count: it
    // refuses every round; the other two carry the quorum.
    let mut manifest: serde_json::Value = serde_json::from_str(DP_MANIFEST).unwrap();
    let rounds: u64 = 3;
    manifest["trainings"][0]["rounds"] = rounds.into();
    manifest["min_cell_size"]["nodes"] = serde_json::json!({"christian": 100_000});
    let study_id = federation
        .approved_study(RESEARCHER, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    let record = run_to_end(&federation, &study_id, "").await;
    assert_eq!(record.status, RunStatus::Completed, "{}", record.detail);
    assert_eq!(record.rounds.len(), rounds as usize);
    // Christian refused the run's session for too few patients; the run's
    // rounds are summed by the other two (nodes sum a study over one set).
    for round in &record.rounds {
        assert_eq!(round.contributors, ["chonnam", "chosun"]);
        assert!(
            round
                .failures
                .iter()
                .all(|f| f.node_id == "christian" && f.reason.contains("too few patients")),
            "{:?}",
            round.failures
        );
    }
    let org = "Chonnam National University Medical School";
    for node in &federation.nodes {
        let spent = node.store.privacy_spent(org, &record.study_id).unwrap();
        let charged = if node.profile.id == "christian" {
            0
        } else {
            rounds as i64
        };
        assert_eq!(spent.queries, charged, "{}", node.profile.id);
        assert_eq!(spent.epsilon == 0.0, charged == 0, "{}", node.profile.id);
    }
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_round_keys_not_signed_by_the_node_they_name() {
    use ghx_proto::v1::node_service_client::NodeServiceClient;
    use ghx_study::capability::{Signer, claims_for};

    // Rounds among two of the hospitals: nodes that accept sums over two.
    let (federation, _dir) = start_with(PATIENTS, 2).await;
    let study_id = federation
        .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();
    // The manifest as the coordinator keeps it (requester filled in).
    let manifest_json = federation
        .client(RESEARCHER)
        .await
        .unwrap()
        .get_study(pb::GetStudyRequest {
            study_id: study_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .manifest_json;
    let manifest = StudyManifest::parse(&manifest_json).unwrap();
    let spec = &manifest.trainings[0];
    let training_json = spec.canonical_json();
    // As if the coordinator host were compromised: its certificate and
    // capability key, driving a round itself.
    let key =
        std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
    let signer = Signer::from_pem(ghx::local_federation::SIGNING_KID, &key).unwrap();
    let nodes = &federation.nodes[..2];
    let ids: Vec<String> = nodes.iter().map(|n| n.profile.id.to_owned()).collect();
    // Capabilities are single-use at each node: one per opening.
    let fresh_token = || {
        signer
            .sign(&claims_for(
                &manifest,
                &study_id,
                ids.clone(),
                &training_json,
                time::Duration::minutes(5),
            ))
            .unwrap()
    };
    let token = fresh_token();
    let round = "attack/validation".to_owned();
    let mut clients = Vec::new();
    let mut advertised = Vec::new();
    // A one-off round over the keys the nodes advertise: an external
    // validation (the moments are a run's round 0 only).
    let one_off = |phase: Phase, round: &str, capability: String| pb::RoundAdvertiseRequest {
        capability,
        manifest_json: manifest_json.clone(),
        training_json: training_json.clone(),
        params: Some(pb::RoundParams {
            round: round.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: phase.len(spec.features.len(), spec.param_count()) as u32,
        }),
        phase: phase.name().to_owned(),
        run: String::new(),
    };
    for node in nodes {
        let tls = ghx_pki::TlsMaterial::load(&federation.pki.tls_files("coordinator")).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "https://localhost:{}",
            node.addr().port()
        ))
        .unwrap()
        .tls_config(tls.client_config(node.profile.id))
        .unwrap()
        .connect()
        .await
        .unwrap();
        let mut client = NodeServiceClient::new(channel);
        // The moments outside a run, exact and over rows no run is sealed
        // to, are refused.
        let err = client
            .round_advertise(one_off(Phase::Moments, "attack/moments", fresh_token()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("a one-off moments round is refused"),
            "{}",
            err.message()
        );
        let keys = client
            .round_advertise(one_off(Phase::Evaluate, &round, token.clone()))
            .await
            .unwrap()
            .into_inner()
            .keys
            .unwrap();
        assert_eq!(keys.node, node.profile.id);
        assert!(!keys.signature.is_empty() && keys.certificate_pem.contains("CERTIFICATE"));
        clients.push(client);
        advertised.push(keys);
    }
    let share = |keys: Vec<pb::AdvertisedKeys>| pb::RoundShareKeysRequest {
        round: round.clone(),
        advertised: keys,
    };
    // The second node's keys swapped for others under its signature, or
    // vouched for by the first node's certificate: the first node refuses
    // to deal shares, naming whose keys and why.
    let mut swapped = advertised.clone();
    swapped[1].mask_key = advertised[0].mask_key.clone();
    let err = clients[0]
        .round_share_keys(share(swapped))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "round {round}: the keys advertised as {}'s are refused: its signature does not verify",
            ids[1]
        )
    );
    let mut borrowed = advertised.clone();
    borrowed[1].signature = advertised[0].signature.clone();
    borrowed[1].certificate_pem = advertised[0].certificate_pem.clone();
    let err = clients[0]
        .round_share_keys(share(borrowed))
        .await
        .unwrap_err();
    assert!(
        err.message().contains(&format!(
            "its certificate names `{}`, not `{}`",
            ids[0], ids[1]
        )),
        "{}",
        err.message()
    );
    // A coordinator that can issue certificates makes one in the second
    // node's name for a key of its own and vouches for keys with it: every
    // node pins its members' keys (`secure_aggregation.member_keys`) and
    // refuses it (issue 38 (4)(b)).
    let ca = federation.pki.load_ca().unwrap();
    let impostor = ca
        .issue(&ghx_pki::CertificateRequest::new(
            &ids[1],
            ghx_pki::Role::Node,
            "Impostor",
        ))
        .unwrap();
    let theirs = ghx_proto::round::advertise_from_wire(advertised[1].clone()).unwrap();
    let mut forged = advertised.clone();
    forged[1].signature =
        ghx_pki::signed::sign(&impostor.key_pem, &theirs.statement(&round)).unwrap();
    forged[1].certificate_pem = impostor.cert_pem.clone();
    let err = clients[0]
        .round_share_keys(share(forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains(&format!(
            "its certificate's key is not the one pinned for `{}`",
            ids[1]
        )),
        "{}",
        err.message()
    );
    // The keys as the nodes signed them are taken.
    let shares = clients[0]
        .round_share_keys(share(advertised.clone()))
        .await
        .unwrap()
        .into_inner()
        .shares;
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].to, ids[1]);

    // A session for the run's rounds: a moments phase, or no run, is
    // refused; the members' keys must be signed by their nodes; each round
    // number is masked once, in order.
    let session = "attack/session".to_owned();
    let session_len = ghx_learn::federated::session_len(spec.features.len(), spec.param_count());
    let open = |phase: &str, session: &str| pb::RoundAdvertiseRequest {
        capability: fresh_token(),
        manifest_json: manifest_json.clone(),
        training_json: training_json.clone(),
        params: Some(pb::RoundParams {
            round: session.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: session_len as u32,
        }),
        phase: phase.to_owned(),
        run: "run-attack".to_owned(),
    };
    let err = clients[0]
        .session_open(open("moments", "attack/other"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("a session trains"),
        "{}",
        err.message()
    );
    let err = clients[0]
        .session_open(pb::RoundAdvertiseRequest {
            run: String::new(),
            ..open("train", "attack/other")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("a session trains a run"),
        "{}",
        err.message()
    );
    // Nor is a training round outside a session: its model would be the
    // coordinator's.
    let err = clients[0]
        .round_advertise(pb::RoundAdvertiseRequest {
            run: String::new(),
            ..open("train", "attack/one-off")
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("only in a run's session"),
        "{}",
        err.message()
    );
    let mut keys = Vec::new();
    for client in &mut clients {
        let k = client
            .session_open(open("train", &session))
            .await
            .unwrap()
            .into_inner()
            .keys
            .unwrap();
        assert!(!k.signature.is_empty());
        keys.push(k);
    }
    let agree = |keys: Vec<pb::SessionKeys>| pb::SessionAgreeRequest {
        session: session.clone(),
        keys,
    };
    let mut swapped = keys.clone();
    swapped[1].mask_key = keys[0].mask_key.clone();
    let err = clients[0].session_agree(agree(swapped)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains(&format!("the keys advertised as {}'s are refused", ids[1])),
        "{}",
        err.message()
    );
    // A round's signature over the same bytes does not vouch for them.
    let mut round_signed = keys.clone();
    round_signed[1].signature = advertised[1].signature.clone();
    assert!(clients[0].session_agree(agree(round_signed)).await.is_err());
    let confirmations = agreed(&mut clients, &session, &keys).await;
    // Issue 38 (3), lineage: the model a round computes from is the node's
    // own, moved by the members' signed inputs of the round before; the
    // coordinator sends none. A model sent along is ignored.
    let dim = spec.features.len();
    let ignored = ModelDocument::new(spec, &vec![0.0; dim], &vec![1.0; dim], &Model::zeros(dim));
    let input = |round: u32, previous: Option<&Evidence>| pb::SessionInputRequest {
        session: session.clone(),
        round,
        model_json: serde_json::to_vec(&ignored).unwrap(),
        previous: previous.map(ghx_proto::round::evidence_to_wire),
        confirmations: confirmations.clone(),
    };
    let certificates: Vec<String> = keys.iter().map(|k| k.certificate_pem.clone()).collect();
    let agreed: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.node.clone(), k.mask_key.clone()))
        .collect();
    let mut members = ids.clone();
    members.sort();
    // The evidence of a round, as an honest coordinator builds it.
    let evidence = |round: u32, answers: &[pb::RoundMaskedInputResponse]| Evidence {
        session: session.clone(),
        round,
        members: members.clone(),
        keys_sha256: ghx_study::lineage::keys_sha256(&agreed),
        parent: answers[0].lineage_parent.as_slice().try_into().unwrap(),
        inputs: answers
            .iter()
            .zip(&certificates)
            .map(|(a, certificate_pem)| SignedInput {
                node: a.node.clone(),
                values: a.values.clone(),
                signature: a.lineage_signature.clone(),
                certificate_pem: certificate_pem.clone(),
            })
            .collect(),
    };
    // Nothing is masked before every other member confirmed the keys this
    // node agreed (issue 38 (4)(c)): without the confirmations, or with
    // one signed by another member, round 0 is refused, and no round
    // number is used up.
    let mut forged = confirmations.clone();
    forged[1].signature = confirmations[0].signature.clone();
    for relayed in [Vec::new(), forged] {
        let err = clients[0]
            .session_input(pb::SessionInputRequest {
                confirmations: relayed,
                ..input(0, None)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains(&format!(
                "{} did not confirm the keys this node agreed",
                ids[1]
            )),
            "{}",
            err.message()
        );
    }
    // Round 1 before the moments: nothing to compute it from.
    let err = clients[0].session_input(input(1, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("needs the evidence of the round before"),
        "{}",
        err.message()
    );
    // Round 0, the moments, starts the run's lineage.
    let mut moments = Vec::new();
    for client in &mut clients {
        moments.push(
            client
                .session_input(input(0, None))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_eq!(moments[0].lineage_parent, moments[1].lineage_parent);
    assert!(moments.iter().all(|m| !m.lineage_signature.is_empty()));
    let honest = evidence(0, &moments);
    // Forged evidence of round 0 is refused, and burns no round number.
    let mut changed = honest.clone();
    changed.inputs[1].values[0] = changed.inputs[1].values[0].wrapping_add(1);
    let err = clients[0]
        .session_input(input(1, Some(&changed)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "input of {} for round 0 is refused: its signature does not verify",
            changed.inputs[1].node
        )),
        "{}",
        err.message()
    );
    let mut missing = honest.clone();
    missing.inputs.pop();
    let err = clients[0]
        .session_input(input(1, Some(&missing)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("holds no input of"),
        "{}",
        err.message()
    );
    let mut other_parent = honest.clone();
    other_parent.parent = [7; 32];
    let err = clients[0]
        .session_input(input(1, Some(&other_parent)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    let mut masked = Vec::new();
    for client in &mut clients {
        masked.push(
            client
                .session_input(input(1, Some(&honest)))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_ne!(masked[0].values, masked[1].values);
    assert_eq!(masked[0].values.len(), session_len);
    // The round redone from the same step, in a new session (as after a
    // dropped member): each node draws the same randomness from the step
    // it computes from, so the sum is the same and the coordinator learns
    // nothing new from a redo.
    let redo = "attack/session-redo".to_owned();
    let redo_confirmations = keyed_session(&mut clients, &redo, || open("train", &redo)).await;
    let mut redone = Vec::new();
    for client in &mut clients {
        redone.push(
            client
                .session_input(pb::SessionInputRequest {
                    session: redo.clone(),
                    confirmations: redo_confirmations.clone(),
                    ..input(1, Some(&honest))
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    assert_ne!(redone[0].values, masked[0].values, "masked afresh");
    assert_eq!(
        evidence(1, &redone).sum(session_len).unwrap(),
        evidence(1, &masked).sum(session_len).unwrap()
    );
    for (again, previous) in [(1, Some(&honest)), (0, None)] {
        let err = clients[0]
            .session_input(input(again, previous))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains(&format!("round {again} was asked for after round 1")),
            "{}",
            err.message()
        );
    }
    let first = evidence(1, &masked);
    let err = clients[0]
        .session_input(pb::SessionInputRequest {
            session: "attack/unknown".to_owned(),
            ..input(2, Some(&first))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // On a session's stream the same: round 2 is answered, masked like
    // a call's; asked again, it is refused and the stream ends there.
    let mut answers = clients[0]
        .session_rounds(futures::stream::iter([
            input(2, Some(&first)),
            input(2, Some(&first)),
            input(3, None),
        ]))
        .await
        .unwrap()
        .into_inner();
    let streamed = answers.message().await.unwrap().unwrap();
    assert_eq!(streamed.node, masked[0].node);
    assert_eq!(streamed.values.len(), masked[0].values.len());
    assert_ne!(streamed.values, masked[0].values);
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("round 2 was asked for after round 2"),
        "{}",
        err.message()
    );
    assert!(matches!(answers.message().await, Ok(None) | Err(_)));
    // A run has the rounds its training declares and no more: past them,
    // honest evidence is refused too.
    let second = clients[1]
        .session_input(input(2, Some(&first)))
        .await
        .unwrap()
        .into_inner();
    let mut last = evidence(2, &[streamed, second]);
    for round in 3..=spec.rounds {
        let mut answers = Vec::new();
        for client in &mut clients {
            answers.push(
                client
                    .session_input(input(round, Some(&last)))
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        last = evidence(round, &answers);
    }
    let past = spec.rounds + 1;
    let err = clients[0]
        .session_input(input(past, Some(&last)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "round {past} is past the training's last round ({})",
            spec.rounds
        )),
        "{}",
        err.message()
    );
    // A run's evaluation scores the model the node's lineage reached with
    // the run's last round, never one sent along; evidence of an earlier
    // round is refused.
    let evaluate = |round: &str| pb::RoundAdvertiseRequest {
        params: Some(pb::RoundParams {
            round: round.to_owned(),
            participants: ids.clone(),
            threshold: 2,
            dim: training::Phase::Evaluate.len(spec.features.len(), spec.param_count()) as u32,
        }),
        phase: "evaluate".to_owned(),
        ..open("train", round)
    };
    for (round, previous, says) in [
        (
            "attack/evaluate-early",
            Some(&first),
            "only a run's final model is evaluated",
        ),
        (
            "attack/evaluate-bare",
            None,
            "needs the evidence of the round before",
        ),
    ] {
        clients[0].round_advertise(evaluate(round)).await.unwrap();
        let err = clients[0]
            .round_masked_input(pb::RoundMaskedInputRequest {
                round: round.to_owned(),
                shares: Vec::new(),
                model_json: serde_json::to_vec(&ignored).unwrap(),
                previous: previous.map(ghx_proto::round::evidence_to_wire),
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            err.message()
        );
        assert!(err.message().contains(says), "{}", err.message());
    }
    // Only the coordinator opens one: another node's certificate is
    // refused before any round is read.
    let tls = ghx_pki::TlsMaterial::load(&federation.pki.tls_files(&ids[1])).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        nodes[0].addr().port()
    ))
    .unwrap()
    .tls_config(tls.client_config(nodes[0].profile.id))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let err = NodeServiceClient::new(channel)
        .session_rounds(futures::stream::iter([input(4, None)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Once the session's capability has expired, its rounds are refused.
    let short = signer
        .sign(&claims_for(
            &manifest,
            &study_id,
            ids.clone(),
            &training_json,
            time::Duration::seconds(2),
        ))
        .unwrap();
    let expiring = "attack/expiring".to_owned();
    let expiring_confirmations =
        keyed_session(&mut clients, &expiring, || pb::RoundAdvertiseRequest {
            capability: short.clone(),
            ..open("train", &expiring)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = clients[0]
        .session_input(pb::SessionInputRequest {
            session: expiring.clone(),
            confirmations: expiring_confirmations,
            ..input(1, Some(&first))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("its capability has expired"),
        "{}",
        err.message()
    );
    // The first node's rows change (patients withdraw consent): the run
    // computes on one set of rows there, so the run is refused there from
    // step 1 on: its rounds redone over the new rows would differ from the
    // first by the withdrawn patients' data.
    let patients = nodes[0]
        .store
        .resources_page(Some("Patient"), None, 200)
        .unwrap();
    let first_ids: Vec<String> = patients.iter().map(|p| p.key.id.clone()).collect();
    withdraw(&federation, 0, &first_ids).await;
    let changed = "attack/session-changed".to_owned();
    let err = clients[0]
        .session_open(open("train", &changed))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        err.message()
    );
    assert!(
        err.message()
            .contains("rows for the training changed since run run-attack started"),
        "{}",
        err.message()
    );
    // A new run is sealed to the rows as they are now: its moments and
    // evaluation are exact sums over its training and held-out patients,
    // compared like released sets with the run's before. Two hundred
    // patients fewer: a new run opens.
    let again = |session: &str| pb::RoundAdvertiseRequest {
        run: "run-again".to_owned(),
        ..open("train", session)
    };
    clients[0]
        .session_open(again("attack/again-0"))
        .await
        .unwrap();
    // One patient fewer at the second node (the first whose withdrawal
    // changes its training rows): a new run there would difference that
    // patient's values from the first run's moments, and is refused.
    let rows =
        |federation: &LocalFederation| rows_at(federation, spec, &manifest.purpose)[1].train.len();
    let before = rows(&federation);
    let candidates = nodes[1]
        .store
        .resources_page(Some("Patient"), None, 20)
        .unwrap();
    for patient in candidates {
        withdraw(&federation, 1, std::slice::from_ref(&patient.key.id)).await;
        if rows(&federation) < before {
            break;
        }
    }
    assert_eq!(rows(&federation), before - 1);
    let err = clients[1]
        .session_open(again("attack/again-1"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("refused by differencing control"),
        "{}",
        err.message()
    );
    assert!(
        !err.message().chars().any(|c| c.is_ascii_digit()),
        "no distance: {}",
        err.message()
    );
    federation.shutdown().await;
}

/// A compromised coordinator host: its certificate and capability key,
/// driving one study's rounds at the nodes itself.
struct Compromised<'a> {
    federation: &'a LocalFederation,
    signer: ghx_study::capability::Signer,
    study_id: String,
    manifest: StudyManifest,
    manifest_json: Vec<u8>,
    training_json: Vec<u8>,
}

type NodeClient = ghx_proto::v1::node_service_client::NodeServiceClient<tonic::transport::Channel>;

/// Opens `session` at every client (each with a request from `request`)
/// and relays the members' keys to all: a session ready for its rounds,
/// with the members' confirmations of the keys they agreed.
async fn keyed_session(
    clients: &mut [NodeClient],
    session: &str,
    request: impl Fn() -> pb::RoundAdvertiseRequest,
) -> Vec<pb::SessionConfirmation> {
    let mut keys = Vec::new();
    for client in clients.iter_mut() {
        let opened = client.session_open(request()).await.unwrap().into_inner();
        keys.push(opened.keys.unwrap());
    }
    agreed(clients, session, &keys).await
}

/// Relays `keys` to every client for `session`: each member's confirmation.
async fn agreed(
    clients: &mut [NodeClient],
    session: &str,
    keys: &[pb::SessionKeys],
) -> Vec<pb::SessionConfirmation> {
    let mut confirmations = Vec::new();
    for (client, k) in clients.iter_mut().zip(keys) {
        let agreed = client
            .session_agree(pb::SessionAgreeRequest {
                session: session.to_owned(),
                keys: keys.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        confirmations.push(pb::SessionConfirmation {
            node: k.node.clone(),
            signature: agreed.confirmation,
        });
    }
    confirmations
}

impl<'a> Compromised<'a> {
    /// Approves the example training study and takes the coordinator's
    /// keys.
    async fn new(federation: &'a LocalFederation) -> Compromised<'a> {
        let study_id = federation
            .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
            .await
            .unwrap();
        let manifest_json = federation
            .client(RESEARCHER)
            .await
            .unwrap()
            .get_study(pb::GetStudyRequest {
                study_id: study_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .manifest_json;
        let manifest = StudyManifest::parse(&manifest_json).unwrap();
        let training_json = manifest.trainings[0].canonical_json();
        let key =
            std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
        Compromised {
            federation,
            signer: ghx_study::capability::Signer::from_pem(
                ghx::local_federation::SIGNING_KID,
                &key,
            )
            .unwrap(),
            study_id,
            manifest,
            manifest_json,
            training_json,
        }
    }

    /// Node `index`'s id.
    fn id(&self, index: usize) -> String {
        self.federation.nodes[index].profile.id.to_owned()
    }

    async fn client(&self, index: usize) -> NodeClient {
        let node = &self.federation.nodes[index];
        let tls =
            ghx_pki::TlsMaterial::load(&self.federation.pki.tls_files("coordinator")).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "https://localhost:{}",
            node.addr().port()
        ))
        .unwrap()
        .tls_config(tls.client_config(node.profile.id))
        .unwrap()
        .connect()
        .await
        .unwrap();
        NodeClient::new(channel)
    }

    /// Step 1 of `round` (or, for `train`, a run's session) over `ids`,
    /// with a fresh capability naming them.
    fn advertise(&self, round: &str, ids: &[String], phase: Phase) -> pb::RoundAdvertiseRequest {
        let spec = &self.manifest.trainings[0];
        let (dim, run) = match phase {
            Phase::Train => (
                ghx_learn::federated::session_len(spec.features.len(), spec.param_count()),
                "run-attack",
            ),
            _ => (phase.len(spec.features.len(), spec.param_count()), ""),
        };
        let token = self
            .signer
            .sign(&ghx_study::capability::claims_for(
                &self.manifest,
                &self.study_id,
                ids.to_vec(),
                &self.training_json,
                time::Duration::minutes(5),
            ))
            .unwrap();
        pb::RoundAdvertiseRequest {
            capability: token,
            manifest_json: self.manifest_json.clone(),
            training_json: self.training_json.clone(),
            params: Some(pb::RoundParams {
                round: round.to_owned(),
                participants: ids.to_vec(),
                threshold: ids.len() as u32,
                dim: dim as u32,
            }),
            phase: phase.name().to_owned(),
            run: run.to_owned(),
        }
    }

    /// Steps 1 to 3 of an external validation over nodes `members` (of a
    /// model scoring everyone alike), each node sending its masked input:
    /// their clients, for step 4.
    async fn masked_validation(&self, round: &str, members: &[usize]) -> Vec<NodeClient> {
        let ids: Vec<String> = members.iter().map(|i| self.id(*i)).collect();
        let mut clients = Vec::new();
        let mut advertised = Vec::new();
        for index in members {
            let mut client = self.client(*index).await;
            let keys = client
                .round_advertise(self.advertise(round, &ids, Phase::Evaluate))
                .await
                .unwrap()
                .into_inner()
                .keys
                .unwrap();
            advertised.push(keys);
            clients.push(client);
        }
        let mut shares = Vec::new();
        for client in &mut clients {
            shares.extend(
                client
                    .round_share_keys(pb::RoundShareKeysRequest {
                        round: round.to_owned(),
                        advertised: advertised.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .shares,
            );
        }
        let spec = &self.manifest.trainings[0];
        let dim = spec.features.len();
        let model = ModelDocument::new(spec, &vec![0.0; dim], &vec![1.0; dim], &Model::zeros(dim));
        for (client, id) in clients.iter_mut().zip(&ids) {
            let mine = shares.iter().filter(|s| &s.to == id).cloned().collect();
            client
                .round_masked_input(pb::RoundMaskedInputRequest {
                    round: round.to_owned(),
                    shares: mine,
                    model_json: serde_json::to_vec(&model).unwrap(),
                    previous: None,
                })
                .await
                .unwrap();
        }
        clients
    }
}

/// Issue 38 (4): a coordinator that runs one quantity over {A, B}, {A, C}
/// and {B, C}, claims a node dropped out to unmask the rest, or opens a
/// session among fewer nodes, to solve for one hospital's values, is
/// refused by the nodes, even nodes that accept sums over two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cannot_choose_who_sums_a_study_to_isolate_a_hospital() {
    let (federation, _dir) = start_with(PATIENTS, 2).await;
    let attacker = Compromised::new(&federation).await;
    let (a, b, c) = (attacker.id(0), attacker.id(1), attacker.id(2));
    let refused = |err: tonic::Status, says: &str| {
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{}",
            err.message()
        );
        assert!(err.message().contains(says), "{}", err.message());
    };

    // A round that fewer than all its nodes could unmask: some would
    // never bind the study (unmasking at the others only).
    let mut partial = attacker.advertise(
        "subset/partial",
        &[a.clone(), b.clone(), c.clone()],
        Phase::Evaluate,
    );
    partial.params.as_mut().unwrap().threshold = 2;
    let err = attacker
        .client(0)
        .await
        .round_advertise(partial)
        .await
        .unwrap_err();
    refused(
        err,
        "this node takes part only in rounds that need every node's",
    );
    // Three subsets of one quantity (a validation of one model). {A, B}: a
    // whole round, unmasked, so the study is bound to the two at both.
    let mut ab = attacker.masked_validation("subset/ab", &[0, 1]).await;
    for client in &mut ab {
        client
            .round_unmask(pb::RoundUnmaskRequest {
                round: "subset/ab".to_owned(),
                survivors: vec![a.clone(), b.clone()],
            })
            .await
            .unwrap();
    }
    // Each node's audit log says over which nodes it was asked to sum.
    let admitted = format!("round subset/ab: admitted over [{a}, {b}]");
    for node in &federation.nodes[..2] {
        let entries = node.store.audit_entries().unwrap();
        assert!(
            entries.iter().any(|e| e.reason.starts_with(&admitted)),
            "{}",
            node.profile.id
        );
    }
    // {A, C} and {B, C}: refused at step 1 by A and by B, before anything
    // is computed: the sums that would isolate C (and A, and B) never exist.
    let bound = format!("the study are over [{a}, {b}]");
    for (index, pair) in [(0, [a.clone(), c.clone()]), (1, [b.clone(), c.clone()])] {
        let round = format!("subset/{}", pair.join("-"));
        let err = attacker
            .client(index)
            .await
            .round_advertise(attacker.advertise(&round, &pair, Phase::Evaluate))
            .await
            .unwrap_err();
        refused(err, &bound);
    }
    // A node certificate made up by whoever runs the CA is not a member.
    let made_up = [c.clone(), "madeup".to_owned()];
    let err = attacker
        .client(2)
        .await
        .round_advertise(attacker.advertise("subset/madeup", &made_up, Phase::Evaluate))
        .await
        .unwrap_err();
    refused(
        err,
        "names `madeup`, which is not one of this node's federation members",
    );

    // Another study: a round over all three, unmasked. In a second one,
    // every input sent, claiming that C dropped out to unmask A and B's sum
    // is refused (and ends the round at the node that refused).
    let attacker = Compromised::new(&federation).await;
    let all = [a.clone(), b.clone(), c.clone()];
    let unmask = |round: &str, survivors: &[String]| pb::RoundUnmaskRequest {
        round: round.to_owned(),
        survivors: survivors.to_vec(),
    };
    for mut client in attacker.masked_validation("drop/abc", &[0, 1, 2]).await {
        client.round_unmask(unmask("drop/abc", &all)).await.unwrap();
    }
    let mut again = attacker.masked_validation("drop/again", &[0, 1, 2]).await;
    for client in &mut again[..2] {
        let err = client
            .round_unmask(unmask("drop/again", &[a.clone(), b.clone()]))
            .await
            .unwrap_err();
        refused(
            err,
            &format!("unmasking for [{a}, {b}] rather than every node"),
        );
        let err = client
            .round_unmask(unmask("drop/again", &all))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
    }
    // Re-keying among the two that are left, for the same values or any
    // other of the study's: refused at opening.
    for index in [0, 1] {
        let err = attacker
            .client(index)
            .await
            .session_open(attacker.advertise("drop/session", &[a.clone(), b.clone()], Phase::Train))
            .await
            .unwrap_err();
        refused(err, &format!("the study are over [{a}, {b}, {c}]"));
    }

    // Issue 38 (4)(c): a coordinator relaying different key sets to
    // different members of a session (B keyed over {A, B}, A and C over
    // all three) gets no masked input from any: each masks only once every
    // other member's confirmation verifies over the keys it agreed itself.
    let attacker = Compromised::new(&federation).await;
    let split = "split/session";
    let mut clients = Vec::new();
    for index in 0..3 {
        clients.push(attacker.client(index).await);
    }
    let sets = [all.to_vec(), vec![a.clone(), b.clone()], all.to_vec()];
    let mut keys = Vec::new();
    for (client, set) in clients.iter_mut().zip(&sets) {
        let opened = client
            .session_open(attacker.advertise(split, set, Phase::Train))
            .await
            .unwrap()
            .into_inner();
        keys.push(opened.keys.unwrap());
    }
    let mut confirmations = Vec::new();
    for (index, client) in clients.iter_mut().enumerate() {
        let relayed = if index == 1 {
            keys[..2].to_vec()
        } else {
            keys.clone()
        };
        let agreed = client
            .session_agree(pb::SessionAgreeRequest {
                session: split.to_owned(),
                keys: relayed,
            })
            .await
            .unwrap()
            .into_inner();
        confirmations.push(pb::SessionConfirmation {
            node: attacker.id(index),
            signature: agreed.confirmation,
        });
    }
    for client in &mut clients {
        let err = client
            .session_input(pb::SessionInputRequest {
                session: split.to_owned(),
                round: 0,
                model_json: Vec::new(),
                previous: None,
                confirmations: confirmations.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message()
                .contains("did not confirm the keys this node agreed"),
            "{}",
            err.message()
        );
    }

    // Issue 38 (3): each evaluation scores the held-out patients with a
    // model someone chose; a study has a limited number at each node.
    let attacker = Compromised::new(&federation).await;
    let mut client = attacker.client(0).await;
    let limit = ghx_node::config::DEFAULT_MAX_EVALUATIONS;
    for n in 0..limit {
        let round = format!("evaluate/{n}");
        client
            .round_advertise(attacker.advertise(&round, &all, Phase::Evaluate))
            .await
            .unwrap();
    }
    let err = client
        .round_advertise(attacker.advertise("evaluate/more", &all, Phase::Evaluate))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&format!(
            "has had the {limit} model evaluations this node allows"
        )),
        "{}",
        err.message()
    );
    federation.shutdown().await;
}
