//! The gRPC face of the node: converts wire messages to domain types, runs
//! gate -> engine -> release, records every decision in the audit log, and
//! maps errors to gRPC statuses in exactly one place ([`status`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use ghx_study::capability::Verifier;
use ghx_study::query;
use ghx_study::result::{AggregateResult, CellValue};
use tonic::{Request, Response, Status};

use crate::consent::eligibility::{self, Eligibility};
use crate::policy::PolicyDir;
use crate::store::{AuditEntry, Store};
use crate::{differencing, engine, gate, release, store};

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
    /// Serialises check-then-record of released cohorts.
    releasing: std::sync::Mutex<()>,
    /// Most epsilon one organisation may spend here over all studies.
    organisation_epsilon: Option<f64>,
}

/// Everything that can stop a request, before mapping to a status.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("client identity: {0}")]
    Identity(#[from] ghx_pki::Error),
    #[error(transparent)]
    Gate(#[from] gate::Error),
    #[error("storage: {0}")]
    Store(#[from] store::Error),
    #[error("consent evaluation: {0}")]
    Consent(#[from] eligibility::Error),
    #[error(transparent)]
    Differencing(#[from] differencing::Error),
    #[error("materialising the query's view: {0}")]
    View(#[from] crate::views::Error),
    #[error(
        "privacy budget {scope}: {spent:.4} of {limit:.4} {quantity} already spent, this query asks {asked:.4}"
    )]
    BudgetSpent {
        scope: String,
        quantity: &'static str,
        spent: f64,
        limit: f64,
        asked: f64,
    },
    #[error("the audit log could not record this request: {0}")]
    Audit(store::Error),
    #[error("internal task failed: {0}")]
    Task(String),
}

/// The one mapping from domain errors to gRPC statuses. Storage details stay
/// in the node's log; the caller learns only that the node failed.
fn status(error: &ApiError) -> Status {
    match error {
        ApiError::Identity(e) => Status::unauthenticated(e.to_string()),
        ApiError::Gate(gate::Error::NotCoordinator { .. }) => {
            Status::permission_denied(error.to_string())
        }
        ApiError::Gate(gate::Error::Capability(e)) => Status::permission_denied(e.to_string()),
        ApiError::Gate(gate::Error::Forbidden { .. }) => {
            Status::permission_denied(error.to_string())
        }
        ApiError::Gate(gate::Error::Query(e)) => Status::invalid_argument(e.to_string()),
        ApiError::Gate(
            gate::Error::Replayed { .. }
            | gate::Error::Revoked { .. }
            | gate::Error::ManifestMismatch
            | gate::Error::Manifest(_)
            | gate::Error::ClaimsDisagree { .. },
        ) => Status::permission_denied(error.to_string()),
        ApiError::Differencing(differencing::Error::TooClose { .. }) => {
            Status::permission_denied(error.to_string())
        }
        ApiError::BudgetSpent { .. } => Status::resource_exhausted(error.to_string()),
        ApiError::View(crate::views::Error::View(e)) => Status::invalid_argument(e.to_string()),
        ApiError::Differencing(differencing::Error::Store(_))
        | ApiError::View(crate::views::Error::Store(_))
        | ApiError::Gate(gate::Error::Policy(_) | gate::Error::Ledger(_))
        | ApiError::Store(_)
        | ApiError::Consent(_)
        | ApiError::Audit(_)
        | ApiError::Task(_) => {
            tracing::error!(error = %error, "request failed inside the node");
            Status::internal(
                "the node failed to answer; its administrator can see why in the node log",
            )
        }
    }
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
        NodeApi {
            inner: Arc::new(Inner {
                node_id: node_id.to_owned(),
                display_name: display_name.to_owned(),
                min_cell_size,
                store,
                verifier: RwLock::new(verifier),
                keys_dir,
                policy,
                eligibility,
                releasing: std::sync::Mutex::new(()),
                organisation_epsilon: None,
            }),
        }
    }

    /// Caps what one organisation may spend at this node over all studies.
    pub fn with_organisation_budget(mut self, epsilon: Option<f64>) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .organisation_epsilon = epsilon;
        self
    }

    /// Makes sure the key a token names is trusted if the operator has
    /// installed it: a rotated coordinator key placed in the keys directory
    /// as `<kid>.pub.pem` is picked up without a restart.
    fn load_rotated_key(&self, token: &str) {
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
        self.load_rotated_key(token);
        let inner = &self.inner;
        let mut entry = AuditEntry {
            at: now_rfc3339(),
            caller: caller.name.clone(),
            caller_role: caller.role.to_string(),
            caller_org: caller.organisation.clone(),
            study_id: String::new(),
            capability_id: String::new(),
            action: "aggregate".to_owned(),
            decision: String::new(),
            reason: String::new(),
            query_sha256: query::digest(query_json),
            result_cells: 0,
            purpose: String::new(),
            policy_reasons: String::new(),
            consent_excluded: 0,
        };
        let facts = gate::NodeFacts {
            node_id: &inner.node_id,
            min_cell_size: inner.min_cell_size,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let outcome = (|| -> Result<AggregateResult, ApiError> {
            let verifier = inner
                .verifier
                .read()
                .map_err(|_| ApiError::Task("verifier lock poisoned".to_owned()))?;
            let admitted = gate::admit(
                &verifier,
                &inner.store,
                &inner.policy,
                facts,
                gate::Request {
                    caller,
                    token,
                    query_json,
                    manifest_json,
                },
            )
            .inspect_err(|e| {
                if let gate::Error::Forbidden { decision, .. } = e {
                    entry.policy_reasons = decision.summary();
                }
            })?;
            entry.study_id = admitted.claims.sub.clone();
            entry.capability_id = admitted.claims.jti.clone();
            entry.purpose = admitted.claims.purpose.clone();
            entry.policy_reasons = admitted.access.summary();
            let prepared = inner.eligibility.prepare(&inner.store, &admitted.consent)?;
            entry.consent_excluded =
                i64::try_from(prepared.summary.excluded_total()).unwrap_or(i64::MAX);
            // Refuse a cohort a few patients away from one already
            // released to the same organisation.
            let members = engine::cohort_members(
                &inner.store,
                &admitted.spec,
                &prepared.context,
                &inner.policy.consent.sensitive,
            )?;
            // One SQL pass: the members give both the cells and the
            // cohort print.
            let spec = &admitted.spec;
            let analysed = engine::analyse(spec, &members, spec.noise.is_some());
            let ids: Vec<String> = members.into_iter().map(|m| m.id).collect();
            let cohort = differencing::CohortPrint::of(&ids);
            let _releasing = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
            differencing::check(
                &inner.store,
                &admitted.claims.org,
                &cohort,
                admitted.min_cell_size,
            )?;
            // Noise is paid for before anything is released.
            let (candidates, noise, budget_note) = match &spec.noise {
                None => (
                    analysed
                        .cells
                        .iter()
                        .map(|c| release::Candidate::exact(c, admitted.min_cell_size))
                        .collect(),
                    None,
                    None,
                ),
                Some(noise) => {
                    let note = self.charge(&admitted, noise)?;
                    let (candidates, statement) =
                        crate::noise::perturb(spec, noise, &analysed.cells, &mut rand::rngs::OsRng);
                    (candidates, Some(statement), Some(note))
                }
            };
            differencing::record(
                &inner.store,
                &admitted.claims.org,
                &admitted.claims.sub,
                &entry.query_sha256,
                &cohort,
            )?;
            let mut result = release::release(
                &inner.node_id,
                spec,
                analysed.cells,
                candidates,
                admitted.min_cell_size,
            );
            if let Some(statement) = &noise {
                result.notes.push(format!(
                    "noise: {} mechanism, epsilon {}{} ({})",
                    statement.mechanism,
                    statement.epsilon,
                    if statement.delta > 0.0 {
                        format!(", delta {:e}", statement.delta)
                    } else {
                        String::new()
                    },
                    statement.detail
                ));
            }
            result.notes.extend(budget_note);
            result.notes.extend(release::analysis_notes(
                spec,
                analysed.without_value,
                admitted.min_cell_size,
                noise.is_some(),
            ));
            result.noise = noise;
            result
                .notes
                .insert(0, format!("access: {}", admitted.access.summary()));
            result.notes.insert(
                1,
                release::consent_note(&prepared.summary, admitted.min_cell_size),
            );
            Ok(result)
        })();
        match &outcome {
            Ok(result) => {
                entry.decision = "answered".to_owned();
                entry.result_cells = result.cells.len() as i64;
                let suppressed = result
                    .cells
                    .iter()
                    .filter(|c| matches!(c.value, CellValue::Suppressed { .. }))
                    .count();
                entry.reason = format!("{suppressed} cells suppressed");
            }
            Err(e) => {
                entry.decision = "refused".to_owned();
                entry.reason = e.to_string();
            }
        }
        inner.store.append_audit(&entry).map_err(ApiError::Audit)?;
        tracing::info!(
            caller = %entry.caller, study = %entry.study_id, decision = %entry.decision,
            cells = entry.result_cells, "aggregate request"
        );
        outcome
    }
}

impl NodeApi {
    /// Charges a noised query to its organisation's privacy budget for the
    /// study (from the manifest) and at this node overall; refuses when
    /// either would be exceeded. Returns the budget note for the result.
    fn charge(&self, admitted: &gate::Admitted, noise: &query::Noise) -> Result<String, ApiError> {
        let manifest = &admitted.manifest;
        let charge = store::PrivacyCharge {
            organisation: &admitted.claims.org,
            study_id: &admitted.claims.sub,
            capability_id: &admitted.claims.jti,
            epsilon: noise.epsilon,
            delta: noise.delta,
            study_epsilon: manifest.privacy_budget,
            study_delta: manifest.privacy_delta,
            organisation_epsilon: self.inner.organisation_epsilon,
        };
        match self.inner.store.charge_privacy(&charge)? {
            store::ChargeOutcome::Charged { study } => Ok(format!(
                "privacy budget: this study has now spent epsilon {:.4} of {:.4}{} over {} noised queries at this node",
                study.epsilon,
                manifest.privacy_budget,
                if manifest.privacy_delta > 0.0 {
                    format!(
                        " and delta {:e} of {:e}",
                        study.delta, manifest.privacy_delta
                    )
                } else {
                    String::new()
                },
                study.queries
            )),
            store::ChargeOutcome::Refused {
                scope: which,
                spent,
            } => {
                let (scope, limit) = match which {
                    store::BudgetScope::Study => (
                        format!(
                            "of study {} for {}",
                            admitted.claims.sub, admitted.claims.org
                        ),
                        manifest.privacy_budget,
                    ),
                    store::BudgetScope::Organisation => (
                        format!("of {} at this node over all studies", admitted.claims.org),
                        self.inner.organisation_epsilon.unwrap_or(0.0),
                    ),
                };
                // Only a study's budget has a delta limit.
                let delta_spent = which == store::BudgetScope::Study
                    && spent.delta + noise.delta > manifest.privacy_delta;
                Err(if delta_spent {
                    ApiError::BudgetSpent {
                        scope,
                        quantity: "delta",
                        spent: spent.delta,
                        limit: manifest.privacy_delta,
                        asked: noise.delta,
                    }
                } else {
                    ApiError::BudgetSpent {
                        scope,
                        quantity: "epsilon",
                        spent: spent.epsilon,
                        limit,
                        asked: noise.epsilon,
                    }
                })
            }
        }
    }

    /// Records a coordinator-signed revocation, and audits it.
    fn revoke(&self, caller: &PeerIdentity, token: &str) -> Result<(), ApiError> {
        let inner = &self.inner;
        self.load_rotated_key(token);
        let mut entry = AuditEntry {
            at: now_rfc3339(),
            caller: caller.name.clone(),
            caller_role: caller.role.to_string(),
            caller_org: caller.organisation.clone(),
            study_id: String::new(),
            capability_id: String::new(),
            action: "revoke".to_owned(),
            decision: String::new(),
            reason: String::new(),
            query_sha256: String::new(),
            result_cells: 0,
            purpose: String::new(),
            policy_reasons: String::new(),
            consent_excluded: 0,
        };
        let outcome = (|| -> Result<(), ApiError> {
            if caller.role != ghx_pki::Role::Coordinator {
                return Err(gate::Error::NotCoordinator {
                    name: caller.name.clone(),
                    role: caller.role,
                }
                .into());
            }
            let revocation = inner
                .verifier
                .read()
                .map_err(|_| ApiError::Task("verifier lock poisoned".to_owned()))?
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
            Ok(()) => "revoked".to_owned(),
            Err(e) => {
                entry.reason = e.to_string();
                "refused".to_owned()
            }
        };
        inner.store.append_audit(&entry).map_err(ApiError::Audit)?;
        tracing::info!(study = %entry.study_id, decision = %entry.decision, "revocation");
        outcome
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of now")
}

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
        PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        let store = self.inner.store.clone();
        let counts = tokio::task::spawn_blocking(move || store.resource_counts())
            .await
            .map_err(|e| status(&ApiError::Task(e.to_string())))?
            .map_err(|e| status(&e.into()))?;
        Ok(Response::new(pb::NodeInfo {
            node_id: self.inner.node_id.clone(),
            display_name: self.inner.display_name.clone(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            min_cell_size: self.inner.min_cell_size,
            resource_counts: counts.into_iter().collect(),
        }))
    }

    async fn run_aggregate(
        &self,
        request: Request<pb::RunAggregateRequest>,
    ) -> Result<Response<pb::RunAggregateResponse>, Status> {
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        let message = request.into_inner();
        let query_json = message.query.map(|q| q.json).unwrap_or_default();
        let api = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            api.answer(
                &caller,
                &message.capability,
                &query_json,
                &message.manifest_json,
            )
        })
        .await
        .map_err(|e| status(&ApiError::Task(e.to_string())))?
        .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RunAggregateResponse {
            result: Some(ghx_proto::convert::result_to_wire(result)),
        }))
    }

    async fn revoke_study(
        &self,
        request: Request<pb::RevokeStudyNodeRequest>,
    ) -> Result<Response<pb::RevokeStudyNodeResponse>, Status> {
        let caller = PeerIdentity::from_request(&request).map_err(|e| status(&e.into()))?;
        let token = request.into_inner().revocation;
        let api = self.clone();
        tokio::task::spawn_blocking(move || api.revoke(&caller, &token))
            .await
            .map_err(|e| status(&ApiError::Task(e.to_string())))?
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::RevokeStudyNodeResponse {}))
    }
}
