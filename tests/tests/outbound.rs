//! Outbound-only nodes: the hospitals' networks allow outbound connections
//! only, so no node listens; each dials the coordinator's tunnel port over
//! mTLS (here through a relay standing for the network) and serves the
//! coordinator's requests over that connection. When the link is cut, every
//! node dials again with backoff and answers as before. The tunnel takes only
//! node certificates of nodes registered as outbound.

use std::time::{Duration, Instant};

use ghx::local_federation::{
    LocalFederation, LocalFederationOptions, NodeLink, REQUESTER, manifest_for,
};
use ghx_federation_tests::proxy::Relay;
use ghx_proto::v1 as pb;
use tokio::io::AsyncReadExt;

const E11: &str = ghx_federation_tests::E11_COUNT;

async fn run(federation: &LocalFederation, study: &str) -> pb::StudyResult {
    federation.run_study(study, "").await.unwrap()
}

/// Runs the study until all three nodes answer (they dial in on their own
/// schedule), for at most a minute.
async fn until_all_answer(federation: &LocalFederation, study: &str) -> pb::StudyResult {
    let started = Instant::now();
    loop {
        let result = run(federation, study).await;
        if result.per_node.len() == 3 {
            return result;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nodes did not all dial in: {:?}",
            result.failures
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_only_dial_out_answer_and_dial_again_after_a_cut() {
    let relay = Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        node_link: NodeLink::Outbound {
            via: Some(relay.addr),
        },
        ..LocalFederationOptions::new(dir.path(), 200, 31)
    })
    .await
    .unwrap();
    assert!(
        federation.nodes.iter().all(|n| n.listen.is_none()),
        "no node listens"
    );
    let tunnel = federation.tunnel_addr.unwrap();
    // Until now the relay had nowhere to send them: the nodes were retrying.
    relay.forward_to(tunnel);

    let study = federation
        .approved_study(
            REQUESTER,
            manifest_for("outbound", "HRESCH", &[("e11", E11)]),
        )
        .await
        .unwrap();
    let first = until_all_answer(&federation, &study).await;
    assert!(first.failures.is_empty());
    let dialled = relay.accepted();
    assert!(dialled >= 3);

    // The same answer as a federation whose nodes listen.
    let direct_dir = tempfile::tempdir().unwrap();
    let direct = LocalFederation::start(&LocalFederationOptions::new(direct_dir.path(), 200, 31))
        .await
        .unwrap();
    let direct_study = direct
        .approved_study(REQUESTER, manifest_for("direct", "HRESCH", &[("e11", E11)]))
        .await
        .unwrap();
    assert_eq!(run(&direct, &direct_study).await.total, first.total);
    direct.shutdown().await;

    // The link is cut: every tunnel drops. A query now reports the nodes it
    // could not reach by name; the nodes dial again and answer as before.
    relay.cut();
    let during = run(&federation, &study).await;
    for failure in &during.failures {
        assert!(
            ["chonnam", "chosun", "christian"].contains(&failure.node_id.as_str()),
            "{failure:?}"
        );
    }
    let again = until_all_answer(&federation, &study).await;
    assert_eq!(again.total, first.total);
    assert!(
        relay.accepted() >= dialled + 3,
        "every node dialled again: {} then {}",
        dialled,
        relay.accepted()
    );

    // The tunnel port takes node certificates only: a requester's
    // connection is closed by the coordinator.
    let requester =
        ghx_pki::transport::Transport::load(&federation.pki.tls_files(REQUESTER)).unwrap();
    let mut stray = requester
        .dial(&tunnel.to_string(), "coordinator")
        .await
        .unwrap();
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stray.read(&mut buffer))
        .await
        .expect("the coordinator closes a non-node tunnel");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not served: {read:?}"
    );

    federation.shutdown().await;
}

/// Dialling the coordinator directly, a local federation is ready when
/// `start` returns: every node has dialled in and the first query reaches
/// all three (what `ghx bench --outbound` relies on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_federation_answers_as_soon_as_it_has_started() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        node_link: NodeLink::Outbound { via: None },
        ..LocalFederationOptions::new(dir.path(), 100, 32)
    })
    .await
    .unwrap();
    let study = federation
        .approved_study(REQUESTER, manifest_for("ready", "HRESCH", &[("e11", E11)]))
        .await
        .unwrap();
    let first = run(&federation, &study).await;
    assert_eq!(first.per_node.len(), 3, "{:?}", first.failures);
    federation.shutdown().await;
}
