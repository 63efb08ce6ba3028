//! Operating a federation: a hospital restarts its node while the
//! coordinator keeps running; the coordinator reconnects on its next call,
//! the node answers again, and its audit log continues the same chain.

use ghx::local_federation::{LocalFederation, LocalFederationOptions, REQUESTER, manifest_for};
use ghx_proto::v1 as pb;

const E11: &str = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},"analysis":{"kind":"count"}}"#;

async fn run(federation: &LocalFederation, study: &str) -> pb::StudyResult {
    federation
        .client(REQUESTER)
        .await
        .unwrap()
        .run_study(pb::RunStudyRequest {
            study_id: study.to_owned(),
            query: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_the_coordinator_runs_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 300,
        seed: 21,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: Some(4),
    })
    .await
    .unwrap();
    let study = federation
        .approved_study(REQUESTER, manifest_for("ops", "HRESCH", &[("e11", E11)]))
        .await
        .unwrap();
    let before = run(&federation, &study).await;
    assert_eq!((before.per_node.len(), before.failures.len()), (3, 0));

    federation.restart_node("chosun").await.unwrap();
    let after = run(&federation, &study).await;
    assert!(
        after.failures.is_empty(),
        "every node answers after the restart: {:?}",
        after.failures
    );
    assert_eq!(after.per_node.len(), 3);
    assert_eq!(after.total, before.total, "same data, same answer");

    // The restarted node's log is one chain across both runs, signed at
    // start-up, shutdown and every four entries.
    let logs = federation.audit_keepers().read().unwrap();
    let chosun = logs.iter().find(|l| l.keeper == "chosun").unwrap();
    let verifier =
        ghx_audit::checkpoint::Verifier::from_certificate_pem(&chosun.certificate_pem).unwrap();
    let v = ghx_audit::verify::verify(&chosun.entries, &chosun.checkpoints, Some(&verifier));
    assert!(v.is_intact(), "{:?}", v.broken);
    assert_eq!(v.entries, 2);
    assert!(v.checkpoints_checked >= 1);
    federation.shutdown().await;
}
