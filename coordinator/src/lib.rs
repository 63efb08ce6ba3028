//! The ghx coordinator, run by G-Health.
//!
//! It registers nodes, takes study requests, holds them until the steering
//! committee approves, then signs a capability for the approved query and
//! fans it out to every node over mTLS, combining what the nodes released.
//!
//! Key decision: the coordinator is not trusted with anything a node would
//! not release. It receives only disclosure-controlled aggregates, and its
//! authority over nodes is limited to what it signs: each node checks the
//! capability itself against the exact query bytes.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod dispatch;
pub mod exchange;
pub mod fanout;
mod pooled;
pub mod store;
pub mod studies;
pub mod training;
pub mod witness;

use std::future::Future;
use std::time::Duration;

use ghx_pki::TlsFiles;
use ghx_pki::transport::Transport;
use ghx_proto::v1::coordinator_service_server::CoordinatorServiceServer;
use ghx_study::capability::Signer;
use tonic::transport::Server;
use tonic::transport::server::Connected;

pub use config::CoordinatorConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("TLS material: {0}")]
    Pki(#[from] ghx_pki::Error),
    #[error("cannot read signing key {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("signing key: {0}")]
    Key(#[from] ghx_study::capability::Error),
    #[error(transparent)]
    Registry(#[from] fanout::Error),
    #[error("coordinator database: {0}")]
    Store(#[from] store::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("audit log: {0}")]
    Audit(#[from] ghx_db::audit::Error),
}

/// A configured coordinator, ready to serve.
pub struct Coordinator {
    api: api::CoordinatorApi,
    tls: Transport,
    tunnel: Option<tokio::net::TcpListener>,
    audit: ghx_audit::Settings,
    /// How often every node's audit head is asked for.
    heads_every: Duration,
    store: store::CoordinatorStore,
}

impl Coordinator {
    pub fn build(config: CoordinatorConfig) -> Result<Coordinator, Error> {
        let tls = Transport::load(&TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        })?;
        let pem = std::fs::read_to_string(&config.signing_key.private_key).map_err(|source| {
            Error::KeyFile {
                path: config.signing_key.private_key.clone(),
                source,
            }
        })?;
        let signer = Signer::from_pem(&config.signing_key.kid, &pem)?;
        let registry = fanout::NodeRegistry::new(tls.clone(), config.node_deadline());
        for node in &config.nodes {
            registry.register(&node.id, &node.endpoint, &node.display_name)?;
        }
        let store = store::CoordinatorStore::open(&config.database_url)?;
        let api = api::CoordinatorApi::new(
            registry,
            signer,
            Duration::from_secs(config.capability_valid_for_secs),
            studies::Committee {
                quorum: config.committee.quorum,
                members: config.committee.members.clone(),
            },
            store.clone(),
        )
        .with_new_nodes(config.registration.new_nodes)
        .with_audit_signer(
            ghx_audit::checkpoint::Signer::from_pem(
                ghx_audit::COORDINATOR,
                &tls.identity().current_pem().key_pem,
            )
            .map_err(ghx_db::audit::Error::from)?,
            config.audit.checkpoint_every,
        );
        let api = match &config.issuer {
            None => api,
            Some(issuer) => {
                let read = |path: &std::path::PathBuf| {
                    std::fs::read_to_string(path).map_err(|source| Error::KeyFile {
                        path: path.clone(),
                        source,
                    })
                };
                let ca = ghx_pki::CertificateAuthority::from_pem(ghx_pki::CertifiedKey {
                    cert_pem: read(&issuer.ca_cert)?,
                    key_pem: read(&issuer.ca_key)?,
                })?;
                api.with_issuer(
                    ca,
                    time::Duration::hours(i64::from(issuer.node_valid_for_hours)),
                )
            }
        };
        Ok(Coordinator {
            api,
            tls,
            tunnel: None,
            audit: config.audit.clone(),
            heads_every: config.exchange_heads_every(),
            store,
        })
    }

    /// Also accept nodes that dial in (outbound-only hospital networks) on
    /// `listener`: mTLS, node certificates of nodes registered as
    /// `outbound` only.
    pub fn with_tunnel(mut self, listener: tokio::net::TcpListener) -> Self {
        self.tunnel = Some(listener);
        self
    }

    /// A handle on the running service, e.g. to read its audit trail.
    pub fn api(&self) -> api::CoordinatorApi {
        self.api.clone()
    }

    /// Serves gRPC over mTLS on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        tracing::info!(addr = ?listener.local_addr().ok(), "coordinator serving");
        // Training runs a previous process left running continue from their
        // last completed round.
        match self.api.resume_training() {
            Ok(runs) if !runs.is_empty() => tracing::info!(?runs, "resumed training runs"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot resume training runs"),
        }
        let audit = self.api.audit_log().clone();
        let upkeep = ghx_db::audit::spawn_upkeep(audit.clone(), self.audit);
        let heads = {
            let api = self.api.clone();
            let every = self.heads_every;
            tokio::spawn(async move {
                // Not at once: nodes that dial in need a moment first.
                let first = tokio::time::Instant::now() + every.min(Duration::from_secs(5));
                let mut ticks = tokio::time::interval_at(first, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    api.registry().exchange_heads().await;
                }
            })
        };
        // grpc.health.v1: serving while the database answers and the
        // certificate is valid.
        let tunnels = self.tunnel.map(|listener| {
            tracing::info!(addr = ?listener.local_addr().ok(), "accepting nodes that dial in");
            let connections = self.tls.incoming(listener);
            let api = self.api.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut connections = std::pin::pin!(connections);
                while let Some(Ok(conn)) = connections.next().await {
                    let api = api.clone();
                    tokio::spawn(async move {
                        let from = conn.connect_info().addr;
                        match api.registry().attach(conn).await {
                            Ok(node) => tracing::info!(%node, ?from, "node connected outbound"),
                            Err(e) => tracing::warn!(error = %e, ?from, "tunnel refused"),
                        }
                    });
                }
            })
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<CoordinatorServiceServer<api::CoordinatorApi>>()
            .await;
        let store = self.store;
        let readiness = ghx_pki::readiness::spawn(
            health,
            "ghx.v1.CoordinatorService",
            self.tls.identity().clone(),
            move || store.ping().map_err(|e| e.to_string()),
        );
        // mTLS by `Transport::incoming` (certificates renewed on disk are
        // used without a restart; TCP_NODELAY: small messages).
        Server::builder()
            // Each request runs in a span that continues the caller's trace.
            .trace_fn(ghx_telemetry::propagation::server_span)
            .add_service(health_service)
            .add_service(CoordinatorServiceServer::new(self.api))
            .serve_with_incoming_shutdown(self.tls.incoming(listener), shutdown)
            .await?;
        upkeep.abort();
        heads.abort();
        readiness.abort();
        if let Some(tunnels) = tunnels {
            tunnels.abort();
        }
        ghx_db::audit::sign_on_shutdown(audit).await;
        Ok(())
    }
}
