//! Operating a federation: a hospital restarts its node while the
//! coordinator keeps running; the coordinator reconnects on its next call,
//! the node answers again, and its audit log continues the same chain.

use ghx::local_federation::{LocalFederation, LocalFederationOptions, REQUESTER, manifest_for};
use ghx_proto::v1 as pb;

const E11: &str = ghx_federation_tests::E11_COUNT;

async fn run(federation: &LocalFederation, study: &str) -> pb::StudyResult {
    federation.run_study(study, "").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_the_coordinator_runs_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut federation = LocalFederation::start(&LocalFederationOptions {
        audit_checkpoint_every: Some(4),
        ..LocalFederationOptions::new(dir.path(), 300, 21)
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
    let federation = LocalFederation::start(&LocalFederationOptions::new(dir.path(), 200, 22))
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
                    let mut client = ghx::client::connect_coordinator(&coordinator, &requester)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renews_its_short_lived_certificate_through_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions::new(dir.path(), 100, 23))
        .await
        .unwrap();
    let files = federation.pki.tls_files("chosun");
    let key_before = std::fs::read_to_string(&files.key).unwrap();
    // Chosun's certificate now has two minutes left: the last third of its
    // life, so the node asks the coordinator for a new one on its own.
    let ca = federation.pki.load_ca().unwrap();
    federation
        .pki
        .renew(&ca, "chosun", time::Duration::minutes(2), false)
        .unwrap();
    let started = std::time::Instant::now();
    let renewed = loop {
        let pem = std::fs::read_to_string(&files.cert).unwrap();
        let expires = ghx_pki::readiness::expires_at(&pem).unwrap();
        if expires - time::OffsetDateTime::now_utc() > time::Duration::days(6) {
            break pem;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "chosun did not renew its certificate"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // Seven days (the coordinator's default), the same key, presented now.
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), key_before);
    let who =
        ghx_pki::verify_member(&std::fs::read_to_string(&files.ca).unwrap(), &renewed).unwrap();
    assert_eq!(
        (who.name.as_str(), who.role),
        ("chosun", ghx_pki::Role::Node)
    );
    tokio::time::sleep(ghx_pki::transport::LiveIdentity::CHECK_EVERY).await;
    let chosun = federation
        .nodes
        .iter()
        .find(|n| n.profile.id == "chosun")
        .unwrap();
    assert_eq!(
        presented(&federation, chosun.addr().port(), "chosun").await,
        file_der(&files.cert)
    );
    let audit = federation.coordinator_audit();
    let renewal = audit
        .iter()
        .find(|e| e.action == "renew-certificate")
        .expect("the coordinator audited the renewal");
    assert_eq!(
        (renewal.caller.as_str(), renewal.decision.as_str()),
        ("chosun", "done")
    );

    // Only a node renews, and only with a real signing request.
    let csr = ghx_pki::signing_request("chosun", &key_before).unwrap();
    let refused = federation
        .client(REQUESTER)
        .await
        .unwrap()
        .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let garbage = federation
        .client("chosun")
        .await
        .unwrap()
        .renew_certificate(pb::RenewCertificateRequest {
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");
    assert!(
        garbage.message().contains("certificate signing request"),
        "{}",
        garbage.message()
    );

    let study = federation
        .approved_study(
            REQUESTER,
            manifest_for("renewed", "HRESCH", &[("e11", E11)]),
        )
        .await
        .unwrap();
    assert_eq!(run(&federation, &study).await.per_node.len(), 3);
    federation.shutdown().await;
}
