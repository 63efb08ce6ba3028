//! The coordinator's gRPC face: role checks, wire conversion, and the one
//! mapping from coordinator errors to gRPC statuses ([`status`]).

use std::sync::Arc;
use std::time::Duration;

use ghx_pki::{PeerIdentity, Role};
use ghx_proto::v1 as pb;
use ghx_study::capability::{self, Signer};
use ghx_study::query::{self, QuerySpec};
use ghx_study::result::{AggregateResult, CellValue, combine};
use tonic::{Request, Response, Status};

use crate::fanout::{self, NodeRegistry};
use crate::studies::{self, StudyBook, StudyResult};

#[derive(Clone)]
pub struct CoordinatorApi {
    inner: Arc<Inner>,
}

struct Inner {
    registry: NodeRegistry,
    studies: StudyBook,
    signer: Signer,
    capability_valid_for: Duration,
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
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Query(#[from] query::Error),
    #[error(transparent)]
    Study(#[from] studies::Error),
    #[error(transparent)]
    Registry(#[from] fanout::Error),
    #[error("cannot issue a capability: {0}")]
    Capability(#[from] capability::Error),
    #[error("no nodes are registered")]
    NoNodes,
}

/// The one mapping from coordinator errors to gRPC statuses.
fn status(error: ApiError) -> Status {
    let message = error.to_string();
    match error {
        ApiError::Identity(_) => Status::unauthenticated(message),
        ApiError::Role { .. } | ApiError::NotOwner(_) => Status::permission_denied(message),
        ApiError::Invalid(_) | ApiError::Query(_) | ApiError::Registry(_) => {
            Status::invalid_argument(message)
        }
        ApiError::Study(studies::Error::NotFound(_)) => Status::not_found(message),
        ApiError::Study(_) | ApiError::NoNodes => Status::failed_precondition(message),
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
    pub fn new(registry: NodeRegistry, signer: Signer, capability_valid_for: Duration) -> Self {
        CoordinatorApi {
            inner: Arc::new(Inner {
                registry,
                studies: StudyBook::default(),
                signer,
                capability_valid_for,
            }),
        }
    }

    async fn run_study(
        &self,
        caller: &PeerIdentity,
        study_id: &str,
    ) -> Result<StudyResult, ApiError> {
        let inner = &self.inner;
        let study = inner.studies.get(study_id)?;
        check_access(caller, &study)?;
        let study = inner.studies.runnable(study_id)?;
        let nodes = inner.registry.list();
        if nodes.is_empty() {
            return Err(ApiError::NoNodes);
        }
        let claims = capability::claims_for(
            &study.id,
            nodes.iter().map(|n| n.id.clone()).collect(),
            &study.query_json,
            &study.requester,
            &study.requester_org,
            &study.purpose,
            time::Duration::try_from(inner.capability_valid_for)
                .unwrap_or(time::Duration::minutes(5)),
        );
        let token = inner.signer.sign(&claims)?;
        tracing::info!(study = %study.id, nodes = nodes.len(), capability = %claims.jti, "running study");
        let (per_node, failures) = inner
            .registry
            .run_aggregate(&token, &study.query_json)
            .await;
        let spec = QuerySpec::parse(&study.query_json)?;
        let dimensions: Vec<String> = spec
            .dimensions()
            .iter()
            .map(|d| d.name().to_owned())
            .collect();
        let (per_node, mut failures) = check_dimensions(per_node, failures, &dimensions);
        failures.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let result = StudyResult {
            total: combine(&per_node),
            dimensions,
            per_node,
            failures,
        };
        inner.studies.record_result(&study.id, result.clone())?;
        Ok(result)
    }
}

/// A node whose dimensions differ from the query's cannot be combined.
fn check_dimensions(
    per_node: Vec<AggregateResult>,
    mut failures: Vec<ghx_study::result::NodeFailure>,
    dimensions: &[String],
) -> (Vec<AggregateResult>, Vec<ghx_study::result::NodeFailure>) {
    let mut kept = Vec::new();
    for result in per_node {
        if result.dimensions == dimensions {
            kept.push(result);
        } else {
            failures.push(ghx_study::result::NodeFailure {
                node_id: result.node_id,
                reason: "answered with different dimensions than the query asked for".to_owned(),
            });
        }
    }
    (kept, failures)
}

/// Requesters see only their own studies; the committee sees all.
fn check_access(caller: &PeerIdentity, study: &studies::Study) -> Result<(), ApiError> {
    match caller.role {
        Role::Committee | Role::Auditor => Ok(()),
        Role::Requester if caller.name == study.requester => Ok(()),
        Role::Requester => Err(ApiError::NotOwner(study.id.clone())),
        _ => Err(ApiError::Role {
            actual: caller.role,
            action: "access studies",
            needed: "requester or committee",
        }),
    }
}

fn result_to_wire(study_id: &str, result: StudyResult) -> pb::StudyResult {
    pb::StudyResult {
        study_id: study_id.to_owned(),
        dimensions: result.dimensions,
        per_node: result
            .per_node
            .into_iter()
            .map(|r| pb::AggregateResult {
                node_id: r.node_id,
                dimensions: r.dimensions,
                min_cell_size: r.min_cell_size,
                notes: r.notes,
                cells: r
                    .cells
                    .into_iter()
                    .map(|c| pb::Cell {
                        key: c.key,
                        value: Some(match c.value {
                            CellValue::Count(n) => pb::cell::Value::Count(n),
                            CellValue::Suppressed { reason } => {
                                pb::cell::Value::Suppressed(pb::Suppressed { reason })
                            }
                        }),
                    })
                    .collect(),
            })
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
            .map(|t| pb::TotalCell {
                key: t.key,
                count: t.count,
                suppressed_at: t.suppressed_at,
            })
            .collect(),
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
        self.inner
            .registry
            .register(&node.node_id, &node.endpoint, &node.display_name)
            .map_err(|e| status(e.into()))?;
        tracing::info!(node = %node.node_id, by = %caller.name, "node registered");
        Ok(Response::new(pb::RegisterNodeResponse {}))
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
        require(&caller, &[Role::Requester], "submit studies", "requester").map_err(status)?;
        let message = request.into_inner();
        if message.title.trim().is_empty() {
            return Err(status(ApiError::Invalid(
                "a study needs a title".to_owned(),
            )));
        }
        ghx_study::purpose::check(&message.purpose)
            .map_err(|e| status(ApiError::Invalid(e.to_string())))?;
        let json = message.query.map(|q| q.json).unwrap_or_default();
        // Store the canonical form: it is what the capability will bind.
        let spec = QuerySpec::parse(&json).map_err(|e| status(e.into()))?;
        let id = self.inner.studies.submit(
            &message.title,
            &message.purpose,
            &caller.name,
            &caller.organisation,
            spec.canonical_json(),
        );
        tracing::info!(study = %id, requester = %caller.name, "study submitted");
        Ok(Response::new(pb::SubmitStudyResponse { study_id: id }))
    }

    async fn approve_study(
        &self,
        request: Request<pb::ApproveStudyRequest>,
    ) -> Result<Response<pb::ApproveStudyResponse>, Status> {
        let caller = identity(&request)?;
        require(&caller, &[Role::Committee], "approve studies", "committee").map_err(status)?;
        let message = request.into_inner();
        self.inner
            .studies
            .approve(&message.study_id, &caller.name, &message.note)
            .map_err(|e| status(e.into()))?;
        tracing::info!(study = %message.study_id, by = %caller.name, "study approved");
        Ok(Response::new(pb::ApproveStudyResponse {}))
    }

    async fn run_study(
        &self,
        request: Request<pb::RunStudyRequest>,
    ) -> Result<Response<pb::RunStudyResponse>, Status> {
        let caller = identity(&request)?;
        let study_id = request.into_inner().study_id;
        let result = CoordinatorApi::run_study(self, &caller, &study_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RunStudyResponse {
            result: Some(result_to_wire(&study_id, result)),
        }))
    }

    async fn get_study_result(
        &self,
        request: Request<pb::GetStudyResultRequest>,
    ) -> Result<Response<pb::GetStudyResultResponse>, Status> {
        let caller = identity(&request)?;
        let study_id = request.into_inner().study_id;
        let study = self
            .inner
            .studies
            .get(&study_id)
            .map_err(|e| status(e.into()))?;
        check_access(&caller, &study).map_err(status)?;
        let result = study
            .result
            .ok_or_else(|| status(studies::Error::NoResult(study_id.clone()).into()))?;
        Ok(Response::new(pb::GetStudyResultResponse {
            result: Some(result_to_wire(&study_id, result)),
        }))
    }
}
