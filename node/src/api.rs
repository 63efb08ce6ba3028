//! The gRPC face of the node: converts wire messages to domain types,
//! admits each request through the gate, hands an admitted query to the
//! pipeline ([`crate::pipeline`]: consent -> engine -> differencing ->
//! noise -> release) and a training round's steps to `api/rounds`, records
//! every decision in the audit log, and answers errors with the status
//! their own classification gives ([`crate::classify`]).
use crate::classify::{Classify, Code};
use ghx_audit::Decision;
use ghx_audit::now_rfc3339;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use ghx_study::capability::Verifier;
use ghx_study::query;
use ghx_study::result::{AggregateResult, CellValue};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::budget::Budget;
use crate::cohort_index::CohortIndex;
use crate::consent::eligibility::{self, Eligibility};
use crate::pipeline::{Pipeline, Recorded};
use crate::policy::PolicyDir;
use crate::store::{AuditEntry, Store};
use crate::training::{self, Rounds};
use crate::{differencing, gate, store};
use ghx_db::audit::AuditLog;

mod exchange;
mod pooled;
mod rounds;
mod runs;

/// The node service, shared by all connections.
#[derive(Clone)]
pub struct NodeApi {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: String,
    display_name: String,
    min_cell_size: u32,
    store: Store,
    verifier: RwLock<Verifier>,
    /// Where rotated coordinator keys appear as `<kid>.pub.pem`.
    keys_dir: Option<PathBuf>,
    policy: PolicyDir,
    eligibility: Eligibility,
    /// Cohorts by code, sex and age answered from memory.
    cohorts: CohortIndex,
    /// Serialises check-then-record of released cohorts.
    releasing: std::sync::Mutex<()>,
    /// The code systems the data is in, for coding notes.
    coding: crate::coding::HeldSystems,
    /// Most epsilon one organisation may spend here over all studies.
    organisation_epsilon: Option<f64>,
    /// Training rounds in progress.
    rounds: Rounds,
    /// Which sets of nodes this node sums with.
    sums: crate::participants::SumRule,
    /// Most evaluation rounds one study may have here, and those admitted
    /// but not yet in the audit log.
    evaluations: crate::evaluations::EvaluationLimit,
    /// Most runs of one training of a study this node starts.
    max_runs: u32,
    /// Which ways of releasing results this hospital takes part in.
    release: crate::config::ReleaseSettings,
    /// The federation's link key, for pooled counts of each patient once.
    link_key: Option<ghx_disclosure::linkage::LinkKey>,
    /// Pooled queries between their two steps.
    pooled: pooled::PooledSessions,
    /// Residents' own records to the services they choose.
    exchange: crate::config::ExchangeSettings,
    /// The platform identity service's keys the exchange's requests are
    /// checked against; none: the exchange is off.
    identity_keys: ghx_exchange::request::IdentityKeys,

    /// The audit log, signing checkpoints when a key is configured.
    audit: AuditLog,
    /// This node's certificate and key, to sign the keys it advertises in
    /// training rounds, and the federation's certificates that vouch for
    /// the other nodes' keys.
    round_keys: Option<(
        Arc<ghx_pki::transport::LiveIdentity>,
        ghx_pki::signed::MemberKeys,
    )>,
    /// Set when the node shuts down: session streams end then, rather
    /// than keeping the server's graceful shutdown waiting on them.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// Everything that can stop a request, before mapping to a status.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error(transparent)]
    Identity(#[from] ghx_pki::Error),
    #[error(transparent)]
    Gate(#[from] gate::Error),
    #[error("storage: {0}")]
    Store(#[from] store::Error),
    #[error("consent evaluation: {0}")]
    Consent(#[from] eligibility::Error),
    #[error(transparent)]
    Differencing(#[from] differencing::Error),
    #[error(transparent)]
    Budget(#[from] crate::budget::Error),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
    #[error("the audit log could not record this request: {0}")]
    Audit(ghx_db::audit::Error),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Training(#[from] training::Error),
    #[error("malformed round message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Release(#[from] pooled::Refusal),
    #[error(transparent)]
    Exchange(crate::exchange::Refusal),
}

impl Classify for ApiError {
    fn code(&self) -> Code {
        match self {
            ApiError::Identity(_) => Code::Unauthenticated,
            ApiError::Gate(e) => e.code(),
            ApiError::Differencing(e) => e.code(),
            ApiError::Training(e) => e.code(),
            ApiError::Budget(e) => e.code(),
            ApiError::Pipeline(e) => e.code(),
            ApiError::Malformed(_) => Code::InvalidArgument,
            ApiError::Release(e) => e.code(),
            ApiError::Exchange(e) => e.code(),
            ApiError::Store(_) | ApiError::Consent(_) | ApiError::Audit(_) | ApiError::Task(_) => {
                Code::Internal
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::Identity(_) => "identity",
            ApiError::Gate(e) => e.kind(),
            ApiError::Differencing(e) => e.kind(),
            ApiError::Training(e) => e.kind(),
            ApiError::Budget(e) => e.kind(),
            ApiError::Pipeline(e) => e.kind(),
            ApiError::Malformed(_) => "training",
            ApiError::Release(e) => e.kind(),
            ApiError::Exchange(e) => e.kind(),
            ApiError::Store(_) | ApiError::Consent(_) | ApiError::Audit(_) | ApiError::Task(_) => {
                "internal"
            }
        }
    }
}

/// The one mapping from domain errors to gRPC statuses
/// ([`crate::classify::status`]).
fn status(error: &ApiError) -> Status {
    crate::classify::status(error)
}

impl NodeApi {
    pub fn new(
        node_id: &str,
        display_name: &str,
        min_cell_size: u32,
        store: Store,
        verifier: Verifier,
        keys_dir: Option<PathBuf>,
        policy: PolicyDir,
    ) -> Self {
        let eligibility = Eligibility::new(policy.consent.clone());
        // Found out (and logged, when it cannot) at start-up, not at the
        // first training round.
        crate::priority::may_lower();
        NodeApi {
            inner: Arc::new(Inner {
                node_id: node_id.to_owned(),
                display_name: display_name.to_owned(),
                min_cell_size,
                verifier: RwLock::new(verifier),
                keys_dir,
                policy,
                eligibility,
                cohorts: CohortIndex::new(),
                releasing: std::sync::Mutex::new(()),
                coding: crate::coding::HeldSystems::default(),
                organisation_epsilon: Some(crate::config::DEFAULT_ORGANISATION_EPSILON),
                rounds: Rounds::default(),
                sums: crate::participants::SumRule::new(&Default::default()),
                evaluations: crate::evaluations::EvaluationLimit::new(
                    crate::config::DEFAULT_MAX_EVALUATIONS,
                ),
                max_runs: crate::config::DEFAULT_MAX_TRAINING_RUNS,
                release: Default::default(),
                link_key: None,
                pooled: Default::default(),
                exchange: Default::default(),
                identity_keys: ghx_exchange::request::IdentityKeys::new([])
                    .expect("no keys are valid keys"),

                audit: store.audit_log().clone(),
                round_keys: None,
                stopping: tokio::sync::watch::Sender::new(false),
                store,
            }),
        }
    }

    /// Ends every session stream (each with `UNAVAILABLE`, naming the
    /// shutdown) once its round in progress is answered, and any opened
    /// later at once: what the node does when it is shut down, since the
    /// server's graceful shutdown waits for open streams to end.
    pub fn stop_sessions(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Caps what one organisation may spend at this node over all studies.
    pub fn with_organisation_budget(mut self, epsilon: Option<f64>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .organisation_epsilon = epsilon;
        self
    }

    /// Which sets of nodes this node sums its values with.
    pub fn with_sum_rule(mut self, settings: &crate::config::SumSettings) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .sums = crate::participants::SumRule::new(settings);
        self
    }

    /// Most evaluation rounds one study may have here.
    pub fn with_evaluation_limit(mut self, max: u32) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .evaluations = crate::evaluations::EvaluationLimit::new(max);
        self
    }

    /// Which ways of releasing query results this hospital takes part in.
    pub fn with_release(mut self, settings: &crate::config::ReleaseSettings) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .release = settings.clone();
        self
    }

    /// The exchange's settings and the identity service's keys
    /// (`[exchange]`).
    pub fn with_exchange(
        mut self,
        settings: crate::config::ExchangeSettings,
        identity_keys: ghx_exchange::request::IdentityKeys,
    ) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.exchange = settings;
        inner.identity_keys = identity_keys;
        self
    }

    /// The federation's link key (`[linkage] key_file`).
    pub fn with_link_key(mut self, key: Option<ghx_disclosure::linkage::LinkKey>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .link_key = key;
        self
    }

    /// Most runs of one training of a study this node starts.
    pub fn with_run_limit(mut self, max: u32) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .max_runs = max;
        self
    }

    /// Signs an audit checkpoint every `every` entries with the node's own
    /// (certificate) key.
    pub fn with_audit_signer(mut self, signer: ghx_audit::checkpoint::Signer, every: i64) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.audit = inner.audit.clone().signed_by(signer, every);
        self
    }

    /// Signs the keys this node advertises in training rounds with its
    /// certificate key, and checks the other nodes' against the federation
    /// CA and, for the nodes `pins` names, their pinned keys; without it
    /// the node takes part in no round.
    pub fn with_round_keys(
        mut self,
        identity: Arc<ghx_pki::transport::LiveIdentity>,
        mut pins: std::collections::BTreeMap<String, String>,
    ) -> Self {
        // This node's own inputs, relayed back in a run's evidence, are
        // taken only under its own key: a certificate in its name for
        // another key (from whoever can issue them) vouches for nothing
        // here, pinned or not elsewhere.
        // A new key (`ghx pki renew --new-key`) takes a restart, as for
        // every pin.
        match ghx_pki::signed::key_pin(&identity.current_pem().cert_pem) {
            Ok(own) => {
                let configured = pins
                    .entry(self.inner.node_id.clone())
                    .or_insert(own.clone());
                if !configured.eq_ignore_ascii_case(&own) {
                    tracing::warn!(
                        node = %self.inner.node_id,
                        "secure_aggregation.member_keys pins this node to a key that is not its certificate's: its own round inputs will be refused"
                    );
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "this node's certificate key could not be read: its own round inputs are checked under the CA only"
            ),
        }
        let members = ghx_pki::signed::MemberKeys::new(identity.ca_pem()).pinned(pins);
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .round_keys = Some((identity, members));
        self
    }

    /// The audit log this api appends to.
    pub fn audit_log(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Makes sure the key a token names is trusted if the operator has
    /// installed it: a rotated coordinator key placed in the keys directory
    /// as `<kid>.pub.pem` is picked up without a restart.
    /// The capability verifier, for one request.
    fn verifier(&self) -> Result<std::sync::RwLockReadGuard<'_, Verifier>, ApiError> {
        self.inner
            .verifier
            .read()
            .map_err(|_| ApiError::Task("verifier lock poisoned".to_owned()))
    }

    /// Only for a coordinator's request: nothing another member sends
    /// makes the node read its keys directory.
    fn load_rotated_key(&self, caller: &PeerIdentity, token: &str) {
        if caller.role != ghx_pki::Role::Coordinator {
            return;
        }
        let (Some(dir), Some(kid)) = (&self.inner.keys_dir, Verifier::key_id(token)) else {
            return;
        };
        let known = self
            .inner
            .verifier
            .read()
            .map(|v| v.knows_key(&kid))
            .unwrap_or(true);
        // A kid becomes a file name only if it cannot leave the directory.
        let safe = !kid.is_empty()
            && kid.len() <= 64
            && kid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !kid.starts_with('.');
        if known || !safe {
            return;
        }
        let path = dir.join(format!("{kid}.pub.pem"));
        let Ok(pem) = std::fs::read_to_string(&path) else {
            return;
        };
        match self.inner.verifier.write() {
            Ok(mut verifier) => match verifier.add_key(&kid, &pem) {
                Ok(()) => {
                    tracing::info!(kid = %kid, path = %path.display(), "trusting rotated coordinator key")
                }
                Err(e) => {
                    tracing::warn!(kid = %kid, error = %e, "rotated coordinator key is unusable")
                }
            },
            Err(_) => tracing::error!("verifier lock poisoned"),
        }
    }

    /// Runs one request through the gate, engine and release, and audits the
    /// outcome. If the audit entry cannot be written, nothing is released.
    fn answer(
        &self,
        caller: &PeerIdentity,
        token: &str,
        query_json: &[u8],
        manifest_json: &[u8],
    ) -> Result<AggregateResult, ApiError> {
        let started = std::time::Instant::now();
        self.load_rotated_key(caller, token);
        let inner = &self.inner;
        let mut entry = AuditEntry {
            query_sha256: query::digest(query_json),
            ..audit_entry(caller, ghx_audit::action::AGGREGATE)
        };
        let outcome = (|| -> Result<AggregateResult, ApiError> {
            let admitted = self.admit_query(
                gate::Request {
                    caller,
                    token,
                    query_json,
                    manifest_json,
                },
                &mut entry,
            )?;
            pooled::check_release(&inner.release, &admitted, query::Release::PerHospital)?;
            let mut recorded = Recorded::default();
            let answer = self
                .pipeline()
                .answer(&admitted, &entry.query_sha256, &mut recorded);
            entry.consent_excluded = recorded.consent_excluded;
            entry.epsilon = recorded.epsilon;
            Ok(answer?)
        })();
        match &outcome {
            Ok(result) => {
                entry.decision = Decision::Answered.into();
                entry.result_cells = result.cells.len() as i64;
                entry.result_sha256 = result.digest();
                let suppressed = result
                    .cells
                    .iter()
                    .filter(|c| matches!(c.value, CellValue::Suppressed { .. }))
                    .count();
                entry.reason = format!("{suppressed} cells suppressed");
            }
            Err(e) => {
                entry.decision = Decision::Refused.into();
                entry.reason = e.to_string();
            }
        }
        self.settle("aggregate", started, &entry, &outcome)?;
        tracing::info!(
            caller = %entry.caller, study = %entry.study_id, decision = %entry.decision,
            cells = entry.result_cells, "aggregate request"
        );
        outcome
    }
}

impl NodeApi {
    /// Admits a query through the gate, noting on `entry` the policy's
    /// reasons (refused or permitted) and the capability's claims.
    fn admit_query(
        &self,
        request: gate::Request<'_>,
        entry: &mut AuditEntry,
    ) -> Result<gate::Admitted, ApiError> {
        let inner = &self.inner;
        let facts = gate::NodeFacts {
            node_id: &inner.node_id,
            min_cell_size: inner.min_cell_size,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let verifier = self.verifier()?;
        let admitted = tracing::info_span!("gate")
            .in_scope(|| gate::admit(&verifier, &inner.store, &inner.policy, facts, request))
            .inspect_err(|e| {
                if let gate::Error::Forbidden { decision, .. } = e {
                    entry.policy_reasons = decision.summary();
                }
            })?;
        note_capability(entry, &admitted.claims);
        entry.policy_reasons = admitted.access.summary();
        Ok(admitted)
    }

    /// Where noise is paid for.
    fn budget(&self) -> Budget<'_> {
        Budget {
            store: &self.inner.store,
            organisation_epsilon: self.inner.organisation_epsilon,
        }
    }

    /// The query pipeline over this node's data.
    fn pipeline(&self) -> Pipeline<'_> {
        let inner = &self.inner;
        Pipeline {
            node_id: &inner.node_id,
            store: &inner.store,
            eligibility: &inner.eligibility,
            cohorts: &inner.cohorts,
            sensitive: &inner.policy.consent.sensitive,
            releasing: &inner.releasing,
            coding: &inner.coding,
            budget: self.budget(),
        }
    }

    /// Records a coordinator-signed revocation, and audits it.
    fn revoke(&self, caller: &PeerIdentity, token: &str) -> Result<(), ApiError> {
        let started = std::time::Instant::now();
        let inner = &self.inner;
        self.load_rotated_key(caller, token);
        let mut entry = AuditEntry {
            query_sha256: ghx_audit::digest(token.as_bytes()),
            ..audit_entry(caller, ghx_audit::action::REVOKE)
        };
        let outcome = (|| -> Result<(), ApiError> {
            if caller.role != ghx_pki::Role::Coordinator {
                return Err(gate::Error::NotCoordinator {
                    name: caller.name.clone(),
                    role: caller.role,
                }
                .into());
            }
            let revocation = self
                .verifier()?
                .verify_revocation(token)
                .map_err(gate::Error::from)?;
            entry.study_id = revocation.sub.clone();
            entry.capability_id = revocation.jti.clone();
            entry.reason = revocation.reason.clone();
            inner
                .store
                .revoke_study(&revocation.sub, &revocation.reason)?;
            Ok(())
        })();
        entry.decision = match &outcome {
            Ok(()) => Decision::Revoked.into(),
            Err(e) => {
                entry.reason = e.to_string();
                Decision::Refused.into()
            }
        };
        self.settle("revoke", started, &entry, &outcome)?;
        tracing::info!(study = %entry.study_id, decision = %entry.decision, "revocation");
        outcome
    }
}

/// An audit entry for `caller` doing `action`, to be filled in.
fn audit_entry(caller: &PeerIdentity, action: impl Into<String>) -> AuditEntry {
    AuditEntry {
        at: now_rfc3339(),
        caller: caller.name.clone(),
        caller_role: caller.role.to_string(),
        caller_org: caller.organisation.clone(),
        source: caller.source.map(|a| a.to_string()).unwrap_or_default(),
        action: action.into(),
        ..AuditEntry::default()
    }
}

/// Records on `entry` what the capability a request came under says.
fn note_capability(entry: &mut AuditEntry, claims: &ghx_study::capability::Claims) {
    entry.study_id = claims.sub.clone();
    entry.capability_id = claims.jti.clone();
    entry.purpose = claims.purpose.clone();
    entry.requester = claims.requester.clone();
    entry.requester_org = claims.org.clone();
}

impl NodeApi {
    /// Writes a decided request's audit entry, in its own span, and counts
    /// the decision in the node's metrics.
    fn settle<T>(
        &self,
        kind: &str,
        started: std::time::Instant,
        entry: &AuditEntry,
        outcome: &Result<T, ApiError>,
    ) -> Result<(), ApiError> {
        tracing::info_span!("audit")
            .in_scope(|| self.inner.audit.append(entry))
            .map_err(ApiError::Audit)?;
        ghx_telemetry::metrics::node_request(
            kind,
            outcome.as_ref().err().map(ApiError::kind),
            started.elapsed().as_secs_f64(),
        );
        Ok(())
    }

    /// Runs `work` for the request's caller on the blocking pool (it reads
    /// the store), in the request's span, and maps its error to a status.
    async fn blocking<M: Send + 'static, T: Send + 'static>(
        &self,
        request: Request<M>,
        work: impl FnOnce(&NodeApi, &PeerIdentity, M) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status> {
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        self.on_blocking_pool(Arc::new(caller), request.into_inner(), work)
            .await
    }

    /// [`Self::blocking`] for a caller already read (a stream's, read once).
    async fn on_blocking_pool<M: Send + 'static, T: Send + 'static>(
        &self,
        caller: Arc<PeerIdentity>,
        message: M,
        work: impl FnOnce(&NodeApi, &PeerIdentity, M) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status> {
        let api = self.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| work(&api, &caller, message)))
            .await
            .map_err(|e| status(&ApiError::Task(e.to_string())))?
            .map_err(|e| status(&e))
    }

    /// Expands round `next`'s mask of `session` on the blocking pool, off
    /// that round's path (after answering the round before).
    fn prepare_ahead(&self, session: String, next: u32) {
        let api = self.clone();
        tokio::task::spawn_blocking(move || {
            api.inner.rounds.prepare_session_round(&session, next);
        });
    }
}

/// [`pb::NodeInfo::resource_counts`] are rounded down to a multiple of
/// this.
const COUNT_GRAIN: u64 = 100;

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `response` stamped with how long the handler held its request, from
/// `received`.
fn handled(
    mut response: pb::RoundMaskedInputResponse,
    received: std::time::Instant,
) -> pb::RoundMaskedInputResponse {
    response.handled_micros = micros(received.elapsed());
    response
}

/// The frames of a [`pb::node_service_server::NodeService::exchange`]
/// answer.
pub type ExchangeFrames =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ExchangeFrame, Status>> + Send>>;

/// The answers of a [`pb::node_service_server::NodeService::session_rounds`]
/// stream, in the order of its requests.
pub type SessionAnswers = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::RoundMaskedInputResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let store = self.inner.store.clone();
        let ok = tokio::task::spawn_blocking(move || store.resource_counts().is_ok())
            .await
            .unwrap_or(false);
        let (status, detail) = if ok {
            (pb::health_response::Status::Serving, "store reachable")
        } else {
            (pb::health_response::Status::NotServing, "store unreachable")
        };
        Ok(Response::new(pb::HealthResponse {
            status: status as i32,
            detail: detail.to_owned(),
        }))
    }

    async fn get_node_info(
        &self,
        request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        // How much a hospital holds is the coordinator's business (it plans
        // fan-out and quorums), not any federation member's, and even it
        // gets the counts in hundreds: a count that moves by one tells who
        // was just imported.
        let counts = if caller.role == ghx_pki::Role::Coordinator {
            let store = self.inner.store.clone();
            tokio::task::spawn_blocking(move || store.resource_counts())
                .await
                .map_err(|e| status(&ApiError::Task(e.to_string())))?
                .map_err(|e| status(&e.into()))?
                .into_iter()
                .map(|(kind, n)| (kind, n / COUNT_GRAIN * COUNT_GRAIN))
                .collect()
        } else {
            Default::default()
        };
        Ok(Response::new(pb::NodeInfo {
            node_id: self.inner.node_id.clone(),
            display_name: self.inner.display_name.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            min_cell_size: self.inner.min_cell_size,
            resource_counts: counts,
        }))
    }

    async fn run_aggregate(
        &self,
        request: Request<pb::RunAggregateRequest>,
    ) -> Result<Response<pb::RunAggregateResponse>, Status> {
        let result = self
            .blocking(request, |api, caller, message| {
                let query_json = message.query.map(|q| q.json).unwrap_or_default();
                api.answer(
                    caller,
                    &message.capability,
                    &query_json,
                    &message.manifest_json,
                )
            })
            .await?;
        Ok(Response::new(pb::RunAggregateResponse {
            result: Some(ghx_proto::convert::result_to_wire(result)),
        }))
    }

    async fn round_advertise(
        &self,
        request: Request<pb::RoundAdvertiseRequest>,
    ) -> Result<Response<pb::RoundAdvertiseResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.round_advertise(caller, message)
        })
        .await
        .map(Response::new)
    }

    async fn round_share_keys(
        &self,
        request: Request<pb::RoundShareKeysRequest>,
    ) -> Result<Response<pb::RoundShareKeysResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.round_share_keys(caller, message)
        })
        .await
        .map(Response::new)
    }

    async fn round_masked_input(
        &self,
        request: Request<pb::RoundMaskedInputRequest>,
    ) -> Result<Response<pb::RoundMaskedInputResponse>, Status> {
        let received = std::time::Instant::now();
        self.blocking(request, move |api, caller, message| {
            api.round_masked(caller, message, received)
        })
        .await
        .map(|r| Response::new(handled(r, received)))
    }

    async fn round_unmask(
        &self,
        request: Request<pb::RoundUnmaskRequest>,
    ) -> Result<Response<pb::RoundUnmaskResponse>, Status> {
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        NodeApi::require_coordinator(&caller).map_err(|e| status(&e))?;
        let message = request.into_inner();
        let inner = &self.inner;
        // Unmasking reveals the sum over the round's nodes: the study is
        // bound to them from now on.
        let unmasking = inner
            .rounds
            .unmask(&message.round, &message.survivors, |origin| {
                Ok(inner.sums.bind(
                    &inner.store,
                    &origin.study,
                    &message.round,
                    &origin.participants,
                )?)
            })
            .map_err(|e| status(&e.into()))?;
        Ok(Response::new(ghx_proto::round::unmasking_to_wire(
            unmasking,
        )))
    }

    async fn session_open(
        &self,
        request: Request<pb::RoundAdvertiseRequest>,
    ) -> Result<Response<pb::SessionOpenResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.session_open(caller, message)
        })
        .await
        .map(Response::new)
    }

    async fn session_agree(
        &self,
        request: Request<pb::SessionAgreeRequest>,
    ) -> Result<Response<pb::SessionAgreeResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.session_agree(caller, message)
        })
        .await
        .map(Response::new)
    }

    async fn session_input(
        &self,
        request: Request<pb::SessionInputRequest>,
    ) -> Result<Response<pb::RoundMaskedInputResponse>, Status> {
        let received = std::time::Instant::now();
        let (session, next) = (
            request.get_ref().session.clone(),
            request.get_ref().round.saturating_add(1),
        );
        let answer = self
            .blocking(request, move |api, caller, message| {
                api.session_input(caller, message, received)
            })
            .await
            .map(|r| Response::new(handled(r, received)))?;
        self.prepare_ahead(session, next);
        Ok(answer)
    }

    type SessionRoundsStream = SessionAnswers;

    async fn session_rounds(
        &self,
        request: Request<tonic::Streaming<pb::SessionInputRequest>>,
    ) -> Result<Response<Self::SessionRoundsStream>, Status> {
        // The caller is read and checked once, for the whole stream.
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        Self::require_coordinator(&caller).map_err(|e| status(&e))?;
        let caller = Arc::new(caller);
        let mut requests = request.into_inner();
        // One answer in flight per request: the coordinator sends a round
        // only once it has the answer to the one before.
        let (answers, answered) = tokio::sync::mpsc::channel(1);
        let api = self.clone();
        let mut stopping = self.inner.stopping.subscribe();
        tokio::spawn(
            async move {
                loop {
                    let message = tokio::select! {
                        // No round starts once the node is stopping.
                        biased;
                        _ = async { stopping.wait_for(|stop| *stop).await.is_ok() } => {
                            let shutting = Status::unavailable("the node is shutting down");
                            let _ = answers.send(Err(shutting)).await;
                            break;
                        }
                        message = requests.message() => match message {
                            Ok(Some(message)) => message,
                            // The coordinator closed the stream (the session
                            // is over) or the connection went.
                            Ok(None) | Err(_) => break,
                        },
                    };
                    let received = std::time::Instant::now();
                    let (session, next) =
                        (message.session.clone(), message.round.saturating_add(1));
                    let answer = api
                        .on_blocking_pool(caller.clone(), message, move |api, caller, message| {
                            // Computed below the priority of the threads
                            // carrying messages (`crate::priority`).
                            crate::priority::lowered(|| {
                                api.session_input(caller, message, received)
                            })
                        })
                        .await
                        .map(|r| handled(r, received));
                    let refused = answer.is_err();
                    if answers.send(answer).await.is_err() || refused {
                        break;
                    }
                    api.prepare_ahead(session, next);
                }
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(futures::stream::unfold(
            answered,
            |mut answered| async move { answered.recv().await.map(|a| (a, answered)) },
        ))))
    }

    async fn pooled_open(
        &self,
        request: Request<pb::PooledOpenRequest>,
    ) -> Result<Response<pb::SessionOpenResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.pooled_open(caller, message)
        })
        .await
        .map(Response::new)
    }

    async fn pooled_input(
        &self,
        request: Request<pb::PooledInputRequest>,
    ) -> Result<Response<pb::PooledInputResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.pooled_input(caller, message)
        })
        .await
        .map(Response::new)
    }

    type ExchangeStream = ExchangeFrames;

    async fn exchange(
        &self,
        request: Request<pb::ExchangeRequest>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let transfer = self
            .blocking(request, |api, caller, message| {
                api.exchange_open(caller, message)
            })
            .await?;
        // One part in flight: each is sealed when the one before has gone,
        // so consent is asked again close to each part's sending.
        let (frames, sent) = tokio::sync::mpsc::channel(1);
        let api = self.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| api.exchange_send(transfer, frames)));
        Ok(Response::new(Box::pin(futures::stream::unfold(
            sent,
            |mut sent| async move { sent.recv().await.map(|f| (f, sent)) },
        ))))
    }

    async fn revoke_study(
        &self,
        request: Request<pb::RevokeStudyNodeRequest>,
    ) -> Result<Response<pb::RevokeStudyNodeResponse>, Status> {
        self.blocking(request, |api, caller, message| {
            api.revoke(caller, &message.revocation)
        })
        .await?;
        Ok(Response::new(pb::RevokeStudyNodeResponse {}))
    }
}
