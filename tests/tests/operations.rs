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
        node_link: Default::default(),
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

/// The certificate a service presents to a new connection now.
async fn presented(federation: &LocalFederation, port: u16, server: &str) -> Vec<u8> {
    let monitor =
        ghx_pki::transport::Transport::load(&federation.pki.tls_files("demo-auditor")).unwrap();
    let tls = monitor
        .dial(&format!("127.0.0.1:{port}"), server)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn file_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    let (_, doc) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    doc.contents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_during_traffic_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 200,
        seed: 22,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: None,
        node_link: Default::default(),
    })
    .await
    .unwrap();
    let study = federation
        .approved_study(REQUESTER, manifest_for("rotate", "HRESCH", &[("e11", E11)]))
        .await
        .unwrap();
    let expected = run(&federation, &study).await.total;
    let services: Vec<(String, u16)> = federation
        .nodes
        .iter()
        .map(|n| (n.profile.id.to_owned(), n.addr().port()))
        .chain([("coordinator".to_owned(), federation.coordinator_addr.port())])
        .collect();
    let mut before = Vec::new();
    for (name, port) in &services {
        before.push(presented(&federation, *port, name).await);
    }

    // Requests keep coming, each on a new connection to the coordinator.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = format!("https://localhost:{}", federation.coordinator_addr.port());
    let requester = federation.pki.tls_files(REQUESTER);
    let traffic = tokio::spawn({
        let study = study.clone();
        async move {
            let mut outcomes = Vec::new();
            loop {
                let outcome = async {
                    let mut client =
                        ghx::local_federation::connect_coordinator(&coordinator, &requester)
                            .await
                            .map_err(|e| e.to_string())?;
                    let result = client
                        .run_study(pb::RunStudyRequest {
                            study_id: study.clone(),
                            query: String::new(),
                        })
                        .await
                        .map_err(|s| s.to_string())?
                        .into_inner()
                        .result
                        .ok_or("no result")?;
                    if result.failures.is_empty() {
                        Ok(result.total)
                    } else {
                        Err(format!("{:?}", result.failures))
                    }
                }
                .await;
                outcomes.push(outcome);
                if stopped.try_recv().is_ok() {
                    return outcomes;
                }
            }
        }
    });

    // Every service's certificate is renewed while they run; chosun's with
    // a new key pair.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ca = federation.pki.load_ca().unwrap();
    for (name, _) in &services {
        federation
            .pki
            .renew(&ca, name, time::Duration::hours(12), name == "chosun")
            .unwrap();
    }
    // Each service looks at its files at most every two seconds.
    tokio::time::sleep(
        ghx_pki::transport::LiveIdentity::CHECK_EVERY + std::time::Duration::from_millis(500),
    )
    .await;
    let mut after = Vec::new();
    for (name, port) in &services {
        after.push(presented(&federation, *port, name).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.send(()).unwrap();
    let outcomes = traffic.await.unwrap();

    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "requests failed during rotation: {failed:?}"
    );
    assert!(
        outcomes.len() >= 3,
        "traffic ran throughout: {}",
        outcomes.len()
    );
    assert!(outcomes.iter().all(|o| o.as_ref().ok() == Some(&expected)));
    for (((name, _), old), new) in services.iter().zip(&before).zip(&after) {
        assert_ne!(old, new, "{name} presents its renewed certificate");
        assert_eq!(
            new,
            &file_der(&federation.pki.tls_files(name).cert),
            "{name} presents the certificate now on disk"
        );
    }
    // After the renewal, requests still run end to end.
    assert_eq!(run(&federation, &study).await.total, expected);
    federation.shutdown().await;
}
