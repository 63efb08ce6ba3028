//! Honest runs: logistic regression and an MLP trained across the three
//! hospitals match the same model trained on the pooled rows; their
//! evaluations and external validations are noised and charged.

use super::*;

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
            round.last_answer_ms.to_array().iter().all(|ms| *ms > 0.0),
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
            .contains("a new run's noised rounds and evaluation cost epsilon 0.2500"),
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
