//! Runs that stop: a hospital going offline, an audit write failing, a
//! revocation heard late or at once.

use super::*;

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
                e.action == ghx_audit::action::MASKED_INPUT
                    && e.decision == ghx_audit::Decision::Answered.as_str()
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
