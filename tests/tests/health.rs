//! grpc.health.v1 on every member's own mTLS port: a monitor holding any
//! federation certificate sees the node and coordinator services SERVING
//! (their databases answer, their certificates are valid); a caller
//! without a certificate is not answered at all.

use ghx::local_federation::{LocalFederation, LocalFederationOptions};
use ghx_pki::TlsMaterial;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn monitor(federation: &LocalFederation, port: u16, server: &str) -> HealthClient<Channel> {
    let tls = TlsMaterial::load(&federation.pki.tls_files("demo-auditor")).unwrap();
    let channel = Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls.client_config(server))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn status(client: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Code> {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_report_their_health_to_a_federation_monitor() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 50,
        seed: 3,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .unwrap();
    let serving = Ok(ServingStatus::Serving as i32);

    for node in &federation.nodes {
        let mut client = monitor(&federation, node.addr().port(), node.profile.id).await;
        assert_eq!(status(&mut client, "ghx.v1.NodeService").await, serving);
        assert_eq!(status(&mut client, "").await, serving);
        assert_eq!(
            status(&mut client, "ghx.v1.CoordinatorService").await,
            Err(tonic::Code::NotFound)
        );
    }
    let mut client = monitor(
        &federation,
        federation.coordinator_addr.port(),
        "coordinator",
    )
    .await;
    assert_eq!(
        status(&mut client, "ghx.v1.CoordinatorService").await,
        serving
    );

    // Without a client certificate the TLS handshake is refused.
    let ca = std::fs::read_to_string(federation.pki.tls_files("coordinator").ca).unwrap();
    let anonymous = Endpoint::from_shared(format!(
        "https://localhost:{}",
        federation.nodes[0].addr().port()
    ))
    .unwrap()
    .tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(federation.nodes[0].profile.id),
    )
    .unwrap();
    let refused = match anonymous.connect().await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "an anonymous caller must not get an answer");
    federation.shutdown().await;
}
