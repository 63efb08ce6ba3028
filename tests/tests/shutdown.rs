//! Graceful shutdown under load: a node told to stop while the coordinator
//! has queries in flight at it finishes them. Every answer the node recorded
//! reached the coordinator as that same answer (its digest matches), the
//! node's audit log ends with a checkpoint signed at shutdown, and queries
//! after the stop report the node by name instead of losing it.

use ghx::local_federation::{LocalFederation, LocalFederationOptions, REQUESTER, manifest_for};
use ghx_proto::v1 as pb;

const BY_SEX: &str = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},"analysis":{"kind":"count","group_by":["sex"]}}"#;

async fn run(
    client: &mut pb::coordinator_service_client::CoordinatorServiceClient<
        tonic::transport::Channel,
    >,
    study: &str,
) -> pb::StudyResult {
    client
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
async fn a_node_stopped_under_load_finishes_what_it_was_answering() {
    let dir = tempfile::tempdir().unwrap();
    let mut federation = LocalFederation::start(&LocalFederationOptions::new(dir.path(), 2000, 41))
        .await
        .unwrap();
    let study = federation
        .approved_study(
            REQUESTER,
            manifest_for("load", "HRESCH", &[("by_sex", BY_SEX)]),
        )
        .await
        .unwrap();
    let client = federation.client(REQUESTER).await.unwrap();
    let expected = run(&mut client.clone(), &study).await;
    assert_eq!(expected.per_node.len(), 3);

    // A burst of queries, and chosun told to stop while they run.
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            let study = study.clone();
            tokio::spawn(async move { run(&mut client, &study).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    federation.stop_node("chosun").await;
    let mut answered_by_chosun = 0;
    for request in burst {
        let result = request.await.unwrap();
        assert_eq!(result.per_node.len() + result.failures.len(), 3);
        if result.per_node.iter().any(|r| r.node_id == "chosun") {
            answered_by_chosun += 1;
            assert_eq!(result.total, expected.total, "a complete answer");
        } else {
            let failure = result.failures.iter().find(|f| f.node_id == "chosun");
            assert!(failure.is_some(), "chosun is named: {:?}", result.failures);
        }
    }

    // Stopped: the next query names chosun, the others answer.
    let after = run(&mut client.clone(), &study).await;
    assert_eq!(after.per_node.len(), 2);
    assert_eq!(after.failures[0].node_id, "chosun");

    // Whatever chosun recorded as answered reached the coordinator as
    // answered, with the same result.
    let logs = federation.audit_keepers().read().unwrap();
    let chosun = logs.iter().find(|l| l.keeper == "chosun").unwrap();
    let coordinator = federation.coordinator_audit();
    let recorded: Vec<_> = chosun
        .entries
        .iter()
        .filter(|e| {
            e.action == ghx_audit::action::AGGREGATE
                && e.decision == ghx_audit::Decision::Answered.as_str()
        })
        .collect();
    assert_eq!(
        recorded.len(),
        1 + answered_by_chosun,
        "the first query and the burst's"
    );
    for entry in &recorded {
        let sent = coordinator
            .iter()
            .find(|c| c.peer == "chosun" && c.capability_id == entry.capability_id)
            .expect("the coordinator recorded the request");
        assert_eq!(
            sent.decision,
            ghx_audit::Decision::Answered.as_str(),
            "answer delivered"
        );
        assert_eq!(sent.result_sha256, entry.result_sha256, "the same answer");
    }
    // The log was signed at shutdown, up to its last entry.
    let verifier =
        ghx_audit::checkpoint::Verifier::from_certificate_pem(&chosun.certificate_pem).unwrap();
    let verdict = ghx_audit::verify::verify(&chosun.entries, &chosun.checkpoints, Some(&verifier));
    assert!(verdict.is_intact(), "{:?}", verdict.broken);
    assert_eq!(
        chosun.checkpoints.last().map(|c| c.seq),
        chosun.entries.last().map(|e| e.seq)
    );
    federation.shutdown().await;
}
