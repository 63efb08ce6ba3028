//! Noised (DP-FedSGD) training: charged round by round, stopped when the
//! budget is spent, and a node refusing a round is not charged.

use super::*;

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

    // A second run continues the same training's account at each site:
    // two more rounds fit, not a whole run, so it is refused at its round 0
    // (rather than failing after two charged rounds), saying why, with
    // nothing more charged. The ledger's own refusal of a round past the
    // budget stays the backstop (`tests/tests/store.rs`).
    let run_id = start().await;
    let record = finished(&federation, RESEARCHER, &run_id).await;
    assert_eq!(record.status, RunStatus::Failed);
    assert!(
        record
            .detail
            .contains("a new run's noised rounds and evaluation cost epsilon"),
        "{}",
        record.detail
    );
    assert!(record.rounds.is_empty(), "{}", record.detail);
    for node in &federation.nodes {
        let spent = node.store.privacy_spent(org, &record.study_id).unwrap();
        assert!((spent.epsilon - cost).abs() < 1e-9);
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
