//! The coordinator's gRPC face: role checks, wire conversion, and the one
//! mapping from coordinator errors to gRPC statuses ([`status`]).

use ghx_audit::Decision;
use ghx_audit::now_rfc3339;
use std::sync::Arc;
use std::time::Duration;

use ghx_pki::{PeerIdentity, Role};
use ghx_proto::v1 as pb;
use ghx_study::capability::{self, Signer};
use ghx_study::manifest::{self, StudyManifest};
use ghx_study::query;
use ghx_study::result::{AggregateResult, CellValue, combine, histogram_quantiles};
use tonic::{Request, Response, Status};

use crate::dispatch;
use crate::fanout::{self, NodeRegistry};
use crate::store::CoordinatorStore;
use crate::studies::{self, Committee, StudyBook, StudyResult};
use crate::training::{self, Federation, TrainingRecord, driver};
use ghx_audit::Entry as AuditRecord;
use ghx_db::audit::AuditLog;

#[derive(Clone)]
pub struct CoordinatorApi {
    inner: Arc<Inner>,
}

struct Inner {
    registry: NodeRegistry,
    studies: StudyBook,
    signer: Signer,
    capability_valid_for: Duration,
    /// Training runs being driven by this process.
    driving: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Serialises issuing training run ids.
    starting: std::sync::Mutex<()>,
    /// The audit log, signing checkpoints when a key is configured.
    audit: AuditLog,
    /// The CA that renews nodes' certificates, and for how long, when this
    /// coordinator issues them.
    issuer: Option<(ghx_pki::CertificateAuthority, time::Duration)>,
    /// Whether node-admins may register node ids not registered yet
    /// (`registration.new_nodes`).
    new_nodes: bool,
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("client identity: {0}")]
    Identity(#[from] ghx_pki::Error),
    #[error("role {actual} may not {action}; it needs role {needed}")]
    Role {
        actual: Role,
        action: &'static str,
        needed: &'static str,
    },
    #[error("study `{0}` belongs to another requester")]
    NotOwner(String),
    /// A node-admin registers or redirects its own organisation's nodes
    /// only.
    #[error("a node-admin of {organisation} registers only {organisation}'s nodes: {problem}")]
    OtherOrganisation {
        organisation: String,
        problem: String,
    },
    /// A node id not registered yet, where the configuration adds nodes.
    #[error(
        "node `{0}` is not one of this federation's nodes; new nodes are added to the \
         coordinator's configuration ([[nodes]]) unless its registration.new_nodes allows \
         node-admins to"
    )]
    NewNode(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error(transparent)]
    Study(#[from] studies::Error),
    #[error(transparent)]
    Registry(#[from] fanout::Error),
    #[error("cannot issue a capability: {0}")]
    Capability(#[from] capability::Error),
    #[error("no nodes are registered")]
    NoNodes,
    #[error("this coordinator does not issue certificates (no [issuer] configured)")]
    NotIssuing,
    #[error("the audit log could not record this step: {0}")]
    Audit(ghx_db::audit::Error),
    #[error(transparent)]
    Training(#[from] training::Error),
    #[error("no training run `{0}`")]
    NoSuchRun(String),
    #[error("study `{id}` has no training named `{name}`")]
    NoSuchTraining { id: String, name: String },
    #[error(transparent)]
    Exchange(#[from] crate::exchange::Error),
}

impl From<driver::Error> for ApiError {
    fn from(e: driver::Error) -> Self {
        match e {
            driver::Error::Study(e) => ApiError::Study(e),
            driver::Error::Training(e) => ApiError::Training(e),
            driver::Error::NoSuchRun(run) => ApiError::NoSuchRun(run),
            driver::Error::NoSuchTraining { id, name } => ApiError::NoSuchTraining { id, name },
        }
    }
}

impl ApiError {
    /// What kind of refusal this is, for metrics (never free text).
    fn kind(&self) -> &'static str {
        match self {
            ApiError::Identity(_) => "identity",
            ApiError::Role { .. }
            | ApiError::NotOwner(_)
            | ApiError::OtherOrganisation { .. }
            | ApiError::NewNode(_) => "permission",
            ApiError::Invalid(_) | ApiError::Manifest(_) | ApiError::Registry(_) => "invalid",
            ApiError::Study(_) => "study_state",
            ApiError::Capability(_) => "capability",
            ApiError::NoNodes => "no_nodes",
            ApiError::NotIssuing => "not_issuing",
            ApiError::Audit(_) => "audit",
            ApiError::Training(_) => "training",
            ApiError::NoSuchRun(_) | ApiError::NoSuchTraining { .. } => "not_found",
            ApiError::Exchange(_) => "exchange",
        }
    }
}

/// The one mapping from coordinator errors to gRPC statuses.
fn status(error: ApiError) -> Status {
    let message = error.to_string();
    match error {
        ApiError::Identity(_) => Status::unauthenticated(message),
        ApiError::Exchange(crate::exchange::Error::Audit(_)) => Status::internal(message),
        ApiError::Exchange(crate::exchange::Error::Role(_))
        | ApiError::Exchange(crate::exchange::Error::OtherRecipient { .. }) => {
            Status::permission_denied(message)
        }
        ApiError::Exchange(_) => Status::invalid_argument(message),
        ApiError::Role { .. }
        | ApiError::NotOwner(_)
        | ApiError::OtherOrganisation { .. }
        | ApiError::NewNode(_) => Status::permission_denied(message),
        ApiError::Invalid(_) | ApiError::Manifest(_) | ApiError::Registry(_) => {
            Status::invalid_argument(message)
        }
        ApiError::Study(studies::Error::NotFound(_)) => Status::not_found(message),
        ApiError::Study(studies::Error::Store(_)) | ApiError::Audit(_) => {
            tracing::error!(error = %message, "coordinator database failure");
            Status::internal("the coordinator failed; its operator can see why in its log")
        }
        ApiError::Study(_) | ApiError::NoNodes | ApiError::NotIssuing | ApiError::Training(_) => {
            Status::failed_precondition(message)
        }
        ApiError::NoSuchRun(_) | ApiError::NoSuchTraining { .. } => Status::not_found(message),
        ApiError::Capability(_) => {
            tracing::error!(error = %message, "capability issuance failed");
            Status::internal("the coordinator could not sign a capability")
        }
    }
}

fn require(
    caller: &PeerIdentity,
    allowed: &[Role],
    action: &'static str,
    needed: &'static str,
) -> Result<(), ApiError> {
    if allowed.contains(&caller.role) {
        Ok(())
    } else {
        Err(ApiError::Role {
            actual: caller.role,
            action,
            needed,
        })
    }
}

impl CoordinatorApi {
    /// The nodes and the connection to each.
    pub(crate) fn registry(&self) -> &NodeRegistry {
        &self.inner.registry
    }

    /// Nodes registered as outbound that have not dialled in yet.
    pub fn awaiting_dial_in(&self) -> Vec<String> {
        self.inner.registry.awaiting_dial_in()
    }

    pub fn new(
        registry: NodeRegistry,
        signer: Signer,
        capability_valid_for: Duration,
        committee: Committee,
        store: CoordinatorStore,
    ) -> Self {
        registry.witness_with(store.audit_log().clone());
        CoordinatorApi {
            inner: Arc::new(Inner {
                registry,
                audit: store.audit_log().clone(),
                studies: StudyBook::new(committee, store),
                signer,
                capability_valid_for,
                driving: std::sync::Mutex::new(std::collections::BTreeSet::new()),
                starting: std::sync::Mutex::new(()),
                issuer: None,
                new_nodes: false,
            }),
        }
    }

    /// Lets node-admins register node ids not registered yet.
    pub fn with_new_nodes(mut self, allowed: bool) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.new_nodes = allowed;
        self
    }

    /// Renews registered nodes' certificates with `ca`, valid for
    /// `valid_for` (`RenewCertificate`).
    pub fn with_issuer(
        mut self,
        ca: ghx_pki::CertificateAuthority,
        valid_for: time::Duration,
    ) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.issuer = Some((ca, valid_for));
        self
    }

    /// Signs an audit checkpoint every `every` entries with the
    /// coordinator's certificate key.
    pub fn with_audit_signer(mut self, signer: ghx_audit::checkpoint::Signer, every: i64) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it is shared");
        inner.audit = inner.audit.clone().signed_by(signer, every);
        inner.registry.witness_with(inner.audit.clone());
        self
    }

    /// The audit log (signing), for requests sent to nodes.
    pub fn audit_log(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// Records one step in the audit trail, done or refused, and passes the
    /// outcome through.
    fn audited<T>(
        &self,
        caller: &PeerIdentity,
        action: &str,
        study_id: &str,
        detail: &str,
        outcome: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (result, detail) = match &outcome {
            Ok(_) => (Decision::Done, detail.to_owned()),
            Err(e) => {
                ghx_telemetry::metrics::coordinator_refusal(action, e.kind());
                (Decision::Refused, e.to_string())
            }
        };
        // No step without its audit record: if it cannot be written, the
        // caller gets an error (the step itself may already be stored).
        self.inner
            .audit
            .append(&AuditRecord {
                at: now_rfc3339(),
                caller: caller.name.clone(),
                caller_role: caller.role.to_string(),
                caller_org: caller.organisation.clone(),
                source: caller.source.map(|a| a.to_string()).unwrap_or_default(),
                action: action.to_owned(),
                study_id: study_id.to_owned(),
                decision: result.into(),
                reason: detail,
                ..AuditRecord::default()
            })
            .map_err(ApiError::Audit)?;
        outcome
    }

    /// Audits a committee decision and answers with the study as it now stands.
    fn decided(
        &self,
        caller: &PeerIdentity,
        action: &str,
        study_id: &str,
        note: &str,
        outcome: Result<studies::Study, ApiError>,
    ) -> Result<Response<pb::StudySummary>, Status> {
        let study = self
            .audited(caller, action, study_id, note, outcome)
            .map_err(status)?;
        Ok(Response::new(summary_to_wire(
            &study,
            self.inner.studies.committee().quorum,
        )))
    }

    /// The coordinator's audit trail (for tests and auditors).
    pub fn audit_trail(&self) -> Result<Vec<AuditRecord>, ghx_db::Error> {
        self.inner.audit.entries()
    }

    async fn run_study(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
        query_name: &str,
    ) -> Result<StudyResult, ApiError> {
        let inner = &self.inner;
        let study = inner.studies.get(study_id)?;
        check_run(caller, &study)?;
        let study = inner.studies.runnable(study_id)?;
        let named = if query_name.is_empty() {
            study
                .manifest
                .queries
                .first()
                .ok_or_else(|| studies::Error::NoSuchQuery {
                    id: study.id.clone(),
                    name: "(first)".to_owned(),
                })?
        } else {
            study
                .manifest
                .query_named(query_name)
                .ok_or_else(|| studies::Error::NoSuchQuery {
                    id: study.id.clone(),
                    name: query_name.to_owned(),
                })?
        };
        let today = time::OffsetDateTime::now_utc().date();
        study.manifest.check_valid_on(today)?;
        let nodes = inner.registry.list();
        if nodes.is_empty() {
            return Err(ApiError::NoNodes);
        }
        let query_json = named.query.canonical_json();
        let claims = capability::claims_for(
            &study.manifest,
            &study.id,
            nodes.iter().map(|n| n.id.clone()).collect(),
            &query_json,
            time::Duration::try_from(inner.capability_valid_for)
                .unwrap_or(time::Duration::minutes(5)),
        );
        let token = inner.signer.sign(&claims)?;
        tracing::info!(study = %study.id, query = %named.name, nodes = nodes.len(), capability = %claims.jti, "running study");
        let sent = dispatch::Sent {
            action: ghx_audit::action::AGGREGATE,
            study_id: &study.id,
            capability_id: &claims.jti,
            request_sha256: query::digest(&query_json),
            requester: &claims.requester,
            requester_org: &claims.org,
            purpose: &claims.purpose,
            epsilon: named.query.noise.as_ref().map_or(0.0, |n| n.epsilon),
        };
        if named.query.release == query::Release::Pooled {
            let result = crate::pooled::run(
                &inner.registry,
                &inner.audit,
                nodes,
                crate::pooled::Request {
                    study_id: &study.id,
                    named,
                    manifest: &study.manifest,
                    manifest_json: &study.manifest_json,
                    query_json: &query_json,
                    capability: &token,
                    sent,
                },
            )
            .await
            .map_err(ApiError::Audit)?;
            inner.studies.record_result(&study.id, &result)?;
            return Ok(result);
        }
        let (per_node, failures) = inner
            .registry
            .run_aggregate(&token, &query_json, &study.manifest_json)
            .await;
        let spec = &named.query;
        dispatch::record(
            &inner.audit,
            &sent,
            per_node
                .iter()
                .map(|r| (r.node_id.clone(), dispatch::Answer::of_result(r))),
            &failures,
        )
        .map_err(ApiError::Audit)?;
        let dimensions = spec.key_names();
        let (per_node, mut failures) = check_shape(per_node, failures, spec);
        failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut total = combine(&per_node);
        total.sort_by_cached_key(|t| spec.key_order(&t.key));
        let (quantiles, rate_per) = match &spec.analysis {
            query::Analysis::Histogram {
                bins, quantiles, ..
            } => (histogram_quantiles(&total, bins, quantiles), 0),
            query::Analysis::Rate { per, .. } => (Vec::new(), *per),
            _ => (Vec::new(), 0),
        };
        let result = StudyResult {
            query: named.name.clone(),
            total,
            dimensions,
            per_node,
            failures,
            quantiles,
            rate_per,
            pooled: None,
        };
        inner.studies.record_result(&study.id, &result)?;
        Ok(result)
    }

    /// Revokes a study and tells every node, which then refuse its
    /// capabilities even before they expire.
    async fn revoke_study(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
        reason: &str,
    ) -> Result<studies::Study, ApiError> {
        require(caller, &[Role::Committee], "revoke studies", "committee")?;
        let study = self.inner.studies.revoke(study_id, &caller.name, reason)?;
        let nodes: Vec<String> = self
            .inner
            .registry
            .list()
            .iter()
            .map(|n| n.id.clone())
            .collect();
        let revocation = capability::revocation_for(study_id, nodes.clone(), reason);
        let revocation_id = revocation.jti.clone();
        let token = self.inner.signer.sign(&revocation)?;
        let failures = self.inner.registry.revoke(&token).await;
        for failure in &failures {
            // The study is revoked at the coordinator regardless; a node that
            // missed it still holds only short-lived, single-use capabilities.
            tracing::warn!(node = %failure.node_id, reason = %failure.reason, "node not told of revocation");
        }
        dispatch::record(
            &self.inner.audit,
            &dispatch::Sent {
                action: ghx_audit::action::REVOKE,
                study_id,
                capability_id: &revocation_id,
                request_sha256: ghx_audit::digest(token.as_bytes()),
                requester: &caller.name,
                requester_org: &caller.organisation,
                ..dispatch::Sent::default()
            },
            nodes
                .iter()
                .filter(|n| !failures.iter().any(|f| &f.node_id == *n))
                .map(|n| (n.clone(), dispatch::Answer::default())),
            &failures,
        )
        .map_err(ApiError::Audit)?;
        Ok(study)
    }
}

impl driver::Host for CoordinatorApi {
    fn studies(&self) -> &StudyBook {
        &self.inner.studies
    }

    fn federation<'a>(
        &'a self,
        study: &'a studies::Study,
        spec: &'a ghx_study::training::TrainingSpec,
        run: Option<&'a str>,
    ) -> Federation<'a> {
        CoordinatorApi::federation(self, study, spec, run)
    }

    fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    fn driving(&self) -> &std::sync::Mutex<std::collections::BTreeSet<String>> {
        &self.inner.driving
    }
}

impl CoordinatorApi {
    /// A stored training run.
    fn training_run(&self, run_id: &str) -> Result<TrainingRecord, ApiError> {
        Ok(driver::load(self.inner.studies.store(), run_id)?)
    }

    /// What a round of `spec` in `study` runs with.
    fn federation<'a>(
        &'a self,
        study: &'a studies::Study,
        spec: &'a ghx_study::training::TrainingSpec,
        run: Option<&'a str>,
    ) -> Federation<'a> {
        Federation {
            registry: &self.inner.registry,
            signer: &self.inner.signer,
            capability_valid_for: self.inner.capability_valid_for,
            study_id: &study.id,
            manifest: &study.manifest,
            manifest_json: &study.manifest_json,
            spec,
            audit: &self.inner.audit,
            run,
        }
    }

    /// The approved study and its training, checked for the caller.
    fn training_of(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
        name: &str,
    ) -> Result<(studies::Study, ghx_study::training::TrainingSpec), ApiError> {
        let study = self.inner.studies.get(study_id)?;
        check_run(caller, &study)?;
        let study = self.inner.studies.runnable(study_id)?;
        study
            .manifest
            .check_valid_on(time::OffsetDateTime::now_utc().date())?;
        let spec = if name.is_empty() {
            study.manifest.trainings.first()
        } else {
            study.manifest.training_named(name)
        }
        .cloned()
        .ok_or_else(|| ApiError::NoSuchTraining {
            id: study_id.to_owned(),
            name: name.to_owned(),
        })?;
        Ok((study, spec))
    }

    async fn start_training(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
        name: &str,
    ) -> Result<TrainingRecord, ApiError> {
        let (study, spec) = self.training_of(caller, study_id, name)?;
        let registered = self.inner.registry.list().len();
        if registered < usize::from(spec.quorum) {
            return Err(ApiError::Invalid(format!(
                "training `{}` needs a quorum of {} nodes; {registered} are registered",
                spec.name, spec.quorum
            )));
        }
        let record = {
            // Two starts at once must not get the same run id.
            let _starting = self
                .inner
                .starting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let runs = self
                .inner
                .studies
                .store()
                .training_run_count()
                .map_err(|e| ApiError::Study(e.into()))?;
            let run_id = format!("run-{:04}", runs + 1);
            let mut record = TrainingRecord::new(&run_id, &study.id, &spec, &now_rfc3339());
            driver::saver(self.inner.studies.store(), &mut record, 0)()?;
            record
        };
        driver::spawn(self, record.clone());
        Ok(record)
    }

    /// Resumes every run a previous coordinator process left running, from
    /// its last completed round. Returns the runs resumed.
    pub fn resume_training(&self) -> Result<Vec<String>, String> {
        driver::resume(self).map_err(|e| e.to_string())
    }

    async fn validate_model(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
        name: &str,
        model_json: &[u8],
    ) -> Result<training::Evaluation, ApiError> {
        let (study, spec) = self.training_of(caller, study_id, name)?;
        let model = ghx_study::training::ModelDocument::parse_for(model_json, &spec)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok(training::validate(&self.federation(&study, &spec, None), &model).await?)
    }
}

fn training_status(record: &TrainingRecord) -> pb::TrainingStatus {
    pb::TrainingStatus {
        run_id: record.run_id.clone(),
        study_id: record.study_id.clone(),
        training: record.training.clone(),
        status: record.status.name().to_owned(),
        rounds_done: record.rounds.len() as u32,
        rounds_total: record.rounds_total,
        detail: record.detail.clone(),
        record_json: serde_json::to_vec(record).expect("records serialize"),
    }
}

/// A node whose dimensions differ from the query's cannot be combined.
fn check_shape(
    per_node: Vec<AggregateResult>,
    mut failures: Vec<ghx_study::result::NodeFailure>,
    spec: &query::QuerySpec,
) -> (Vec<AggregateResult>, Vec<ghx_study::result::NodeFailure>) {
    let dimensions = spec.key_names();
    let kind = spec.kind();
    let mut kept = Vec::new();
    for result in per_node {
        let values_fit = result.cells.iter().all(|c| {
            matches!(
                (&c.value, kind),
                (CellValue::Suppressed { .. }, _)
                    | (CellValue::Count(_), "count" | "histogram")
                    | (CellValue::Summary(_), "summary")
                    | (CellValue::Rate(_), "rate")
            )
        });
        let problem = if result.dimensions != dimensions {
            Some("answered with different dimensions than the query asked for")
        } else if result.analysis != kind || !values_fit {
            Some("answered with a different analysis than the query asked for")
        } else {
            None
        };
        match problem {
            None => kept.push(result),
            Some(reason) => failures.push(ghx_study::result::NodeFailure {
                node_id: result.node_id,
                reason: reason.to_owned(),
            }),
        }
    }
    (kept, failures)
}

/// Only the study's own requester runs it (queries, trainings, external
/// validations): they spend its privacy budget and what is released is
/// theirs. The committee and auditors approve and read; they do not run.
/// Other requesters of the same organisation do not run it either: a study
/// is one requester's, as its manifest and audit entries name them.
fn check_run(caller: &PeerIdentity, study: &studies::Study) -> Result<(), ApiError> {
    match caller.role {
        Role::Requester if caller.name == study.requester() => Ok(()),
        Role::Requester => Err(ApiError::NotOwner(study.id.clone())),
        _ => Err(ApiError::Role {
            actual: caller.role,
            action: "run a study's queries, trainings or validations",
            needed: "requester (the study's own)",
        }),
    }
}

/// Requesters see only their own studies; the committee sees all.
fn check_access(caller: &PeerIdentity, study: &studies::Study) -> Result<(), ApiError> {
    match caller.role {
        Role::Committee | Role::Auditor => Ok(()),
        Role::Requester if caller.name == study.requester() => Ok(()),
        Role::Requester => Err(ApiError::NotOwner(study.id.clone())),
        _ => Err(ApiError::Role {
            actual: caller.role,
            action: "access studies",
            needed: "requester or committee",
        }),
    }
}

fn summary_to_wire(study: &studies::Study, quorum: usize) -> pb::StudySummary {
    pb::StudySummary {
        study_id: study.id.clone(),
        title: study.manifest.title.clone(),
        purpose: study.manifest.purpose.clone(),
        requester: study.manifest.requester.user.clone(),
        organisation: study.manifest.requester.organisation.clone(),
        status: study.status.name().to_owned(),
        votes: study
            .votes
            .iter()
            .map(|v| pb::CommitteeVote {
                member: v.member.clone(),
                decision: v.decision.to_owned(),
                note: v.note.clone(),
                at: v.at.clone(),
            })
            .collect(),
        quorum: u32::try_from(quorum).unwrap_or(u32::MAX),
        manifest_sha256: study.manifest.digest(),
        manifest_json: study.manifest_json.clone(),
        submitted_at: study.submitted_at.clone(),
        query_names: study
            .manifest
            .queries
            .iter()
            .map(|q| q.name.clone())
            .collect(),
    }
}

fn result_to_wire(study_id: &str, result: StudyResult) -> pb::StudyResult {
    use ghx_proto::convert;
    pb::StudyResult {
        pooled: result.pooled.map(|p| pb::PooledRelease {
            contributors: p.contributors,
            notes: p.notes,
            noise: p.noise.map(convert::noise_to_wire),
            min_cell_size: p.min_cell_size,
            linkage: p.linkage.map(|l| pb::PooledLinkage {
                slots: l.slots,
                unlinked: l.unlinked,
                standard_error: l.standard_error,
                unlinked_withheld: l.unlinked_withheld,
            }),
        }),
        study_id: study_id.to_owned(),
        query: result.query,
        dimensions: result.dimensions,
        per_node: result
            .per_node
            .into_iter()
            .map(convert::result_to_wire)
            .collect(),
        failures: result
            .failures
            .into_iter()
            .map(|f| pb::NodeFailure {
                node_id: f.node_id,
                reason: f.reason,
            })
            .collect(),
        total: result
            .total
            .into_iter()
            .map(convert::total_to_wire)
            .collect(),
        quantiles: result
            .quantiles
            .into_iter()
            .map(convert::quantile_to_wire)
            .collect(),
        rate_per: result.rate_per,
    }
}

fn identity<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    PeerIdentity::from_request(request).map_err(|e| status(e.into()))
}

#[tonic::async_trait]
impl pb::coordinator_service_server::CoordinatorService for CoordinatorApi {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let caller = identity(&request)?;
        require(&caller, &[Role::NodeAdmin], "register nodes", "node-admin").map_err(status)?;
        let node = request
            .into_inner()
            .node
            .ok_or_else(|| status(ApiError::Invalid("request has no node".to_owned())))?;
        // A node is its hospital's: its display name is the organisation,
        // and an id registered to one hospital is not redirected by
        // another's administrator.
        let other = |problem: String| {
            status(ApiError::OtherOrganisation {
                organisation: caller.organisation.clone(),
                problem,
            })
        };
        if node.display_name != caller.organisation {
            return Err(other(format!(
                "the node's display name must be `{}`, not `{}`",
                caller.organisation, node.display_name
            )));
        }
        let existing = self
            .inner
            .registry
            .list()
            .into_iter()
            .find(|n| n.id == node.node_id);
        match existing {
            Some(existing) if existing.display_name != caller.organisation => {
                return Err(other(format!(
                    "node `{}` is registered to {}",
                    existing.id, existing.display_name
                )));
            }
            // A new id with a node certificate would receive every query
            // and manifest and join rounds: added in the configuration
            // unless it allows node-admins to.
            None if !self.inner.new_nodes => {
                return Err(status(ApiError::NewNode(node.node_id)));
            }
            _ => {}
        }
        self.inner
            .registry
            .register(&node.node_id, &node.endpoint, &node.display_name)
            .map_err(|e| status(e.into()))?;
        tracing::info!(node = %node.node_id, by = %caller.name, "node registered");
        Ok(Response::new(pb::RegisterNodeResponse {}))
    }

    type RelayExchangeStream = crate::exchange::Relayed;

    async fn relay_exchange(
        &self,
        request: Request<pb::ExchangeRequest>,
    ) -> Result<Response<Self::RelayExchangeStream>, Status> {
        let caller = identity(&request)?;
        let relayed = crate::exchange::relay(
            &self.inner.registry,
            &self.inner.audit,
            &caller,
            request.into_inner(),
        )
        .map_err(|e| status(e.into()))?;
        tracing::info!(by = %caller.name, "exchange relayed");
        Ok(Response::new(relayed))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let caller = identity(&request)?;
        // The certificate the node called with: renewed for the same
        // holder and hosts.
        let current = request
            .extensions()
            .get::<ghx_pki::transport::Peer>()
            .and_then(|p| p.certs.first())
            .map(|der| ghx_pki::certificate_pem(der));
        let csr_pem = request.into_inner().csr_pem;
        let outcome = (|| {
            require(&caller, &[Role::Node], "renew a node certificate", "node")?;
            if !self
                .inner
                .registry
                .list()
                .iter()
                .any(|n| n.id == caller.name)
            {
                return Err(ApiError::Invalid(format!(
                    "node `{}` is not registered with this coordinator",
                    caller.name
                )));
            }
            let (ca, valid_for) = self.inner.issuer.as_ref().ok_or(ApiError::NotIssuing)?;
            let current = current.ok_or(ApiError::Identity(ghx_pki::Error::NoPeerCertificate))?;
            let cert_pem =
                ca.renew_request(&current, &csr_pem, *valid_for)
                    .map_err(|e| match e {
                        ghx_pki::Error::Request(why) => {
                            ApiError::Invalid(format!("certificate signing request: {why}"))
                        }
                        other => ApiError::Identity(other),
                    })?;
            let expires = ghx_pki::readiness::expires_at(&cert_pem)?;
            Ok((cert_pem, expires))
        })();
        let detail = match &outcome {
            Ok((_, expires)) => format!("certificate renewed until {expires}"),
            Err(_) => String::new(),
        };
        let (cert_pem, expires) = self
            .audited(&caller, "renew-certificate", "", &detail, outcome)
            .map_err(status)?;
        tracing::info!(node = %caller.name, %expires, "renewed a node certificate");
        Ok(Response::new(pb::RenewCertificateResponse {
            cert_pem,
            expires_at: expires
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        identity(&request)?;
        let nodes = self
            .inner
            .registry
            .list()
            .into_iter()
            .map(|n| pb::NodeRecord {
                node_id: n.id,
                endpoint: n.endpoint,
                display_name: n.display_name,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn submit_study(
        &self,
        request: Request<pb::SubmitStudyRequest>,
    ) -> Result<Response<pb::SubmitStudyResponse>, Status> {
        let caller = identity(&request)?;
        let json = request.into_inner().manifest_json;
        let outcome = (|| -> Result<String, ApiError> {
            require(&caller, &[Role::Requester], "submit studies", "requester")?;
            // Parse, then stamp the requester from the certificate: what the
            // file says about who is asking is never trusted.
            let mut manifest = StudyManifest::parse(&json)?;
            manifest.check_validity_span()?;
            manifest.requester.user = caller.name.clone();
            manifest.requester.organisation = caller.organisation.clone();
            Ok(self.inner.studies.submit(manifest)?)
        })();
        let id = outcome.as_ref().cloned().unwrap_or_default();
        let id = self
            .audited(&caller, "submit", &id, "", outcome)
            .map_err(status)?;
        tracing::info!(study = %id, requester = %caller.name, "study submitted");
        Ok(Response::new(pb::SubmitStudyResponse { study_id: id }))
    }

    async fn list_studies(
        &self,
        request: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        let caller = identity(&request)?;
        require(
            &caller,
            &[Role::Requester, Role::Committee, Role::Auditor],
            "list studies",
            "requester, committee or auditor",
        )
        .map_err(status)?;
        let quorum = self.inner.studies.committee().quorum;
        let studies = self
            .inner
            .studies
            .list()
            .map_err(|e| status(e.into()))?
            .iter()
            .filter(|s| check_access(&caller, s).is_ok())
            .map(|s| summary_to_wire(s, quorum))
            .collect();
        Ok(Response::new(pb::ListStudiesResponse { studies }))
    }

    async fn get_study(
        &self,
        request: Request<pb::GetStudyRequest>,
    ) -> Result<Response<pb::StudySummary>, Status> {
        let caller = identity(&request)?;
        let id = request.into_inner().study_id;
        let study = self.inner.studies.get(&id).map_err(|e| status(e.into()))?;
        check_access(&caller, &study).map_err(status)?;
        Ok(Response::new(summary_to_wire(
            &study,
            self.inner.studies.committee().quorum,
        )))
    }

    async fn approve_study(
        &self,
        request: Request<pb::ApproveStudyRequest>,
    ) -> Result<Response<pb::StudySummary>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let outcome = require(&caller, &[Role::Committee], "approve studies", "committee")
            .and_then(|()| {
                Ok(self
                    .inner
                    .studies
                    .approve(&message.study_id, &caller.name, &message.note)?)
            });
        self.decided(
            &caller,
            "approve",
            &message.study_id,
            &message.note,
            outcome,
        )
    }

    async fn reject_study(
        &self,
        request: Request<pb::RejectStudyRequest>,
    ) -> Result<Response<pb::StudySummary>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let outcome =
            require(&caller, &[Role::Committee], "reject studies", "committee").and_then(|()| {
                Ok(self
                    .inner
                    .studies
                    .reject(&message.study_id, &caller.name, &message.reason)?)
            });
        self.decided(
            &caller,
            "reject",
            &message.study_id,
            &message.reason,
            outcome,
        )
    }

    async fn revoke_study(
        &self,
        request: Request<pb::RevokeStudyRequest>,
    ) -> Result<Response<pb::StudySummary>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let outcome =
            CoordinatorApi::revoke_study(self, &caller, &message.study_id, &message.reason).await;
        self.decided(
            &caller,
            "revoke",
            &message.study_id,
            &message.reason,
            outcome,
        )
    }

    async fn run_study(
        &self,
        request: Request<pb::RunStudyRequest>,
    ) -> Result<Response<pb::RunStudyResponse>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let started = std::time::Instant::now();
        let outcome =
            CoordinatorApi::run_study(self, &caller, &message.study_id, &message.query).await;
        ghx_telemetry::metrics::federated_query(
            match &outcome {
                // A pooled run that made no table is not complete.
                Ok(r) if r.pooled.is_some() && r.total.is_empty() => "partial",
                Ok(r) if r.failures.is_empty() => "complete",
                Ok(_) => "partial",
                Err(_) => "failed",
            },
            started.elapsed().as_secs_f64(),
        );
        let detail = outcome
            .as_ref()
            .map(|r| match &r.pooled {
                // The table released is the coordinator's own work: its
                // digest is in the entry.
                Some(p) => format!(
                    "query {}; pooled over {} hospitals, {} failed; released table sha256 {}",
                    r.query,
                    p.contributors.len(),
                    r.failures.len(),
                    ghx_audit::digest(
                        &serde_json::to_vec(&(&r.total, &r.quantiles, p))
                            .expect("a result serialises")
                    )
                ),
                None => format!(
                    "query {}; {} nodes answered, {} failed",
                    r.query,
                    r.per_node.len(),
                    r.failures.len()
                ),
            })
            .unwrap_or_default();
        let result = self
            .audited(&caller, "run", &message.study_id, &detail, outcome)
            .map_err(status)?;
        Ok(Response::new(pb::RunStudyResponse {
            result: Some(result_to_wire(&message.study_id, result)),
        }))
    }

    async fn start_training(
        &self,
        request: Request<pb::StartTrainingRequest>,
    ) -> Result<Response<pb::TrainingStatus>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let outcome =
            CoordinatorApi::start_training(self, &caller, &message.study_id, &message.training)
                .await;
        let detail = outcome
            .as_ref()
            .map(|r| format!("training {} started as {}", r.training, r.run_id))
            .unwrap_or_default();
        let record = self
            .audited(&caller, "train", &message.study_id, &detail, outcome)
            .map_err(status)?;
        Ok(Response::new(training_status(&record)))
    }

    async fn get_training(
        &self,
        request: Request<pb::GetTrainingRequest>,
    ) -> Result<Response<pb::TrainingStatus>, Status> {
        let caller = identity(&request)?;
        let run_id = request.into_inner().run_id;
        // Reading a long run's record is database work and parsing: off the
        // runtime's workers, which drive the rounds (a requester following
        // progress must not slow the training it follows).
        let api = self.clone();
        tokio::task::spawn_blocking(move || {
            let record = api.training_run(&run_id).map_err(status)?;
            let study = api
                .inner
                .studies
                .get(&record.study_id)
                .map_err(|e| status(e.into()))?;
            check_access(&caller, &study).map_err(status)?;
            Ok(Response::new(training_status(&record)))
        })
        .await
        .map_err(|e| Status::internal(format!("reading the training run failed: {e}")))?
    }

    async fn validate_model(
        &self,
        request: Request<pb::ValidateModelRequest>,
    ) -> Result<Response<pb::ValidateModelResponse>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let outcome = CoordinatorApi::validate_model(
            self,
            &caller,
            &message.study_id,
            &message.training,
            &message.model_json,
        )
        .await;
        let detail = outcome
            .as_ref()
            .map(|e| {
                format!(
                    "external validation of a model for {}: {} nodes",
                    message.training,
                    e.contributors.len()
                )
            })
            .unwrap_or_default();
        let evaluation = self
            .audited(
                &caller,
                "validate-model",
                &message.study_id,
                &detail,
                outcome,
            )
            .map_err(status)?;
        Ok(Response::new(pb::ValidateModelResponse {
            report_json: serde_json::to_vec(&evaluation).expect("evaluations serialize"),
        }))
    }

    async fn get_study_result(
        &self,
        request: Request<pb::GetStudyResultRequest>,
    ) -> Result<Response<pb::GetStudyResultResponse>, Status> {
        let caller = identity(&request)?;
        let message = request.into_inner();
        let study = self
            .inner
            .studies
            .get(&message.study_id)
            .map_err(|e| status(e.into()))?;
        check_access(&caller, &study).map_err(status)?;
        let result = self
            .inner
            .studies
            .result(&message.study_id, &message.query)
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::GetStudyResultResponse {
            result: Some(result_to_wire(&message.study_id, result)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghx_study::result::{Cell, Moments};

    fn answer(
        node: &str,
        analysis: &str,
        dimensions: &[&str],
        value: CellValue,
    ) -> AggregateResult {
        AggregateResult {
            node_id: node.into(),
            dimensions: dimensions.iter().map(|d| (*d).to_owned()).collect(),
            cells: vec![Cell {
                key: dimensions.iter().map(|_| "x".to_owned()).collect(),
                value,
            }],
            min_cell_size: 10,
            notes: vec![],
            analysis: analysis.into(),
            noise: None,
        }
    }

    /// A node whose answer does not have the shape the query asked for is
    /// left out of the total and reported, not summed in.
    #[test]
    fn answers_of_another_shape_are_failures() {
        let spec = query::QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
                 "analysis":{"kind":"summary","variable":{"kind":"age"},"group_by":["sex"]}}"#,
        )
        .unwrap();
        let summary = CellValue::Summary(Moments::of(&[40.0; 12]));
        let (kept, failures) = check_shape(
            vec![
                answer("chonnam", "summary", &["sex"], summary.clone()),
                answer("chosun", "count", &["sex"], CellValue::Count(12)),
                answer("christian", "summary", &["sex"], CellValue::Count(12)),
                answer("other", "summary", &["age_band"], summary),
            ],
            Vec::new(),
            &spec,
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].node_id, "chonnam");
        let reasons: Vec<(&str, &str)> = failures
            .iter()
            .map(|f| (f.node_id.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "chosun",
                    "answered with a different analysis than the query asked for"
                ),
                (
                    "christian",
                    "answered with a different analysis than the query asked for"
                ),
                (
                    "other",
                    "answered with different dimensions than the query asked for"
                ),
            ]
        );
    }
}
