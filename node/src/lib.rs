//! The ghx hospital node.
//!
//! Data flow is one-way: `api` (gRPC and wire conversion) -> `gate`
//! (caller, capability, query validity, access `policy`), then `pipeline`:
//! `consent` (which patients take part, and which sensitive categories) ->
//! `engine` (SQL over the index tables) -> `store` (diesel). Disclosure
//! control sits between engine and api: `differencing` refuses releases a
//! few patients away from earlier ones, `noise` is paid for by `budget`, and
//! `release` suppresses small cells and writes every note. The engine,
//! cohort index, differencing, noise and release are private to this crate
//! (tests and benchmarks reach them through [`testing`]), so raw counts
//! exist only inside the node and only released results reach the api.
//! Errors say their own status ([`classify`]). `import` fills the store from
//! EHR exports.
//!
//! Key decision: queries never read resource JSON. Import derives index rows
//! (patients, condition codes, observation values, consents) from each
//! validated resource, and every query compiles to SQL over those rows.

#![forbid(unsafe_code)]

pub mod api;
mod budget;
pub mod classify;
mod coding;
pub(crate) mod cohort_index;
pub mod config;
pub mod consent;
pub(crate) mod differencing;
pub(crate) mod engine;
mod evaluations;
pub mod exchange;
pub mod export;
pub mod gate;
pub mod import;
pub mod lineage;
pub(crate) mod noise;
pub mod participants;
mod pipeline;
pub mod policy;
pub mod priority;
pub(crate) mod release;
pub mod renewal;
pub mod store;
pub mod terminology;
pub mod training;
pub mod views;
pub mod witness;

use std::future::Future;

use ghx_pki::TlsFiles;
use ghx_pki::transport::Transport;
use ghx_proto::v1::node_service_server::NodeServiceServer;
use ghx_study::capability::Verifier;
use tonic::transport::Server;

pub use config::NodeConfig;
pub use store::Store;

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("TLS material: {0}")]
    Pki(#[from] ghx_pki::Error),
    #[error("cannot read coordinator key {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("coordinator key: {0}")]
    Key(#[from] ghx_study::capability::Error),
    #[error("policy: {0}")]
    Policy(#[from] policy::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("audit log: {0}")]
    Audit(#[from] ghx_db::audit::Error),
}

/// A configured node, ready to serve.
pub struct Node {
    config: NodeConfig,
    store: Store,
    verifier: Verifier,
    tls: Transport,
    policy: policy::PolicyDir,
}

impl Node {
    /// Opens the store (applying migrations) and loads keys and certificates.
    pub fn build(config: NodeConfig) -> Result<Node, Error> {
        // Policies first: a node with unusable policies must not start.
        let policy = policy::PolicyDir::load(&config.policy_dir)?;
        let store = Store::open(&config.database_url)?;
        let tls = Transport::load(&TlsFiles {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
        })?;
        let keys = config
            .coordinator_keys
            .iter()
            .map(|k| {
                std::fs::read_to_string(&k.public_key)
                    .map(|pem| (k.kid.clone(), pem))
                    .map_err(|source| Error::KeyFile {
                        path: k.public_key.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let verifier = Verifier::new(
            &config.id,
            keys.iter().map(|(k, p)| (k.as_str(), p.as_str())),
        )?;
        tracing::info!(
            dir = %policy.dir.display(), rules = policy.rule_count,
            default = %policy.consent.default, "policies loaded"
        );
        Ok(Node {
            config,
            store,
            verifier,
            tls,
            policy,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Serves gRPC over mTLS until `shutdown` completes, then finishes
    /// in-flight requests and returns: on `listener` (direct mode), and
    /// over the connection it keeps dialling to the coordinator when the
    /// configuration has `[outbound]`.
    pub async fn serve(
        self,
        listener: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let api = api::NodeApi::new(
            &self.config.id,
            &self.config.display_name,
            self.config.min_cell_size,
            self.store,
            self.verifier,
            self.config.coordinator_keys_dir.clone(),
            self.policy,
        )
        .with_organisation_budget(self.config.max_epsilon_per_organisation)
        .with_sum_rule(&self.config.secure_aggregation)
        .with_release(&self.config.release)
        .with_link_key(self.config.linkage.key()?)
        .with_exchange(
            self.config.exchange.clone(),
            self.config.exchange.identity_keys()?,
        )
        .with_evaluation_limit(self.config.max_evaluations_per_study)
        .with_run_limit(self.config.max_training_runs_per_study)
        .with_audit_signer(
            ghx_audit::checkpoint::Signer::from_pem(
                &self.config.id,
                &self.tls.identity().current_pem().key_pem,
            )
            .map_err(ghx_db::audit::Error::from)?,
            self.config.audit.checkpoint_every,
        )
        .with_round_keys(
            self.tls.identity().clone(),
            self.config.secure_aggregation.member_keys.clone(),
        );
        let audit = api.audit_log().clone();
        // Session streams end when shutdown begins, so that the graceful
        // shutdown below, which waits for open streams, can finish.
        let stopping = api.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.stop_sessions();
        };
        let upkeep = ghx_db::audit::spawn_upkeep(audit.clone(), self.config.audit.clone());
        // grpc.health.v1: serving while the database answers and the
        // certificate is valid.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<NodeServiceServer<api::NodeApi>>()
            .await;
        let readiness = ghx_pki::readiness::spawn(
            health,
            "ghx.v1.NodeService",
            self.tls.identity().clone(),
            move || store.ping().map_err(|e| e.to_string()),
        );
        let (connections, incoming) = tokio::sync::mpsc::channel(16);
        let mut feeders = Vec::new();
        if let Some(listener) = listener {
            tracing::info!(node = %self.config.id, addr = ?listener.local_addr().ok(), "node listening");
            feeders.push(self.tls.accept(listener, connections.clone()));
        }
        if let Some(outbound) = &self.config.outbound {
            tracing::info!(node = %self.config.id, coordinator = %outbound.coordinator, "node dialling the coordinator");
            feeders.push(tokio::spawn(ghx_pki::transport::dial_out(
                self.tls.clone(),
                outbound.coordinator.clone(),
                outbound.server_name.clone(),
                connections.clone(),
            )));
        }
        drop(connections);
        let renewing = self.config.tls.renew_from.as_ref().map(|coordinator| {
            tracing::info!(%coordinator, "renewing this node's certificate through the coordinator when due");
            tokio::spawn(renewal::keep_renewed(
                renewal::Renewal {
                    node_id: self.config.id.clone(),
                    coordinator: coordinator.clone(),
                    server_name: self
                        .config
                        .outbound
                        .as_ref()
                        .map_or_else(|| "coordinator".to_owned(), |o| o.server_name.clone()),
                    cert_path: self.config.tls.cert.clone(),
                    every: std::time::Duration::from_secs(self.config.tls.renew_check_secs),
                },
                self.tls.clone(),
            ))
        });
        // mTLS by `Transport::incoming` (certificates renewed on disk are
        // used without a restart; TCP_NODELAY: small messages).
        Server::builder()
            // An outbound connection is found dead by HTTP/2 pings, and
            // dialled again.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(15)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(15)))
            // Each request runs in a span that continues the caller's trace.
            .trace_fn(ghx_telemetry::propagation::server_span)
            .add_service(health_service)
            // Responses carry the node's signed audit head; the
            // coordinator's head on requests is kept (audit witnesses).
            .add_service(witness::Witnessing::new(
                NodeServiceServer::new(api),
                audit.clone(),
            ))
            .serve_with_incoming_shutdown(ghx_pki::transport::Connections::new(incoming), shutdown)
            .await?;
        for feeder in feeders {
            feeder.abort();
        }
        if let Some(renewing) = renewing {
            renewing.abort();
        }
        upkeep.abort();
        readiness.abort();
        ghx_db::audit::sign_on_shutdown(audit).await;
        Ok(())
    }
}

/// What tests and benchmarks reach below the api for, and nothing else
/// does: raw counts, cohort members and suppression on their own. The
/// modules they come from are private to the node, so that outside this
/// crate raw numbers are only ever computed here, never by a service.
pub mod testing {
    pub use crate::cohort_index::CohortIndex;
    pub use crate::engine::{
        Analysed, Member, Raw, RawCell, analyse, cohort_for_analysis, cohort_members, count,
    };
    pub use crate::release::{Candidate, release};

    /// Differencing control's check and record of released cohorts.
    pub mod differencing {
        pub use crate::differencing::{CohortPrint, Error, check, patient_hash, record};
    }
}
