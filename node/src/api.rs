//! The gRPC face of the node: converts wire messages to domain types, runs
//! gate -> engine -> release for queries and gate -> training for the
//! steps of a training round, records every decision in the audit log, and
//! maps errors to gRPC statuses in exactly one place ([`status`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use ghx_study::capability::Verifier;
use ghx_study::query;
use ghx_study::result::{AggregateResult, CellValue};
use ghx_study::training::ModelDocument;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::cohort_index::CohortIndex;
use crate::consent::eligibility::{self, Eligibility};
use crate::policy::PolicyDir;
use crate::store::{AuditEntry, Store};
use crate::training::{self, Phase, Rounds};
use crate::{differencing, engine, gate, release, store};
use ghx_db::audit::AuditLog;

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
        "privacy budget {scope}: {spent:.4} of {limit:.4} {quantity} already spent, this request asks {asked:.4}"
    )]
    BudgetSpent {
        scope: String,
        quantity: &'static str,
        spent: f64,
        limit: f64,
        asked: f64,
    },
    #[error("the audit log could not record this request: {0}")]
    Audit(ghx_db::audit::Error),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Training(#[from] training::Error),
    #[error("malformed round message: {0}")]
    Malformed(String),
}

impl ApiError {
    /// What kind of refusal this is, for metrics (never free text).
    fn kind(&self) -> &'static str {
        match self {
            ApiError::Identity(_) => "identity",
            ApiError::Gate(gate::Error::NotCoordinator { .. }) => "not_coordinator",
            ApiError::Gate(gate::Error::Capability(_)) => "capability",
            ApiError::Gate(gate::Error::Forbidden { .. }) => "policy",
            ApiError::Gate(gate::Error::Query(_)) => "query",
            ApiError::Gate(gate::Error::Replayed { .. }) => "replayed",
            ApiError::Gate(gate::Error::Revoked { .. }) => "revoked",
            ApiError::Gate(_) => "manifest",
            ApiError::Differencing(differencing::Error::TooClose { .. }) => "differencing",
            ApiError::Differencing(
                differencing::Error::BoundsFixed { .. } | differencing::Error::ExactView,
            ) => "bounds",
            ApiError::BudgetSpent { .. } => "budget",
            ApiError::Training(training::Error::TooFew { .. }) => "too_few",
            ApiError::Training(training::Error::Participants(
                crate::participants::Error::Store(_),
            )) => "internal",
            ApiError::Training(training::Error::Participants(_)) => "participants",
            ApiError::Training(training::Error::Evaluations { .. }) => "budget",
            ApiError::Training(training::Error::Lineage(crate::lineage::Error::Store(_))) => {
                "internal"
            }
            ApiError::Training(training::Error::Lineage(crate::lineage::Error::Runs {
                ..
            })) => "budget",
            ApiError::Training(training::Error::Lineage(_)) => "lineage",
            ApiError::Training(_) | ApiError::Malformed(_) => "training",
            ApiError::View(crate::views::Error::View(_)) => "view",
            ApiError::Differencing(_)
            | ApiError::View(_)
            | ApiError::Store(_)
            | ApiError::Consent(_)
            | ApiError::Audit(_)
            | ApiError::Task(_) => "internal",
        }
    }
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
        ApiError::Differencing(
            differencing::Error::TooClose { .. }
            | differencing::Error::BoundsFixed { .. }
            | differencing::Error::ExactView,
        ) => Status::permission_denied(error.to_string()),
        ApiError::BudgetSpent { .. } | ApiError::Training(training::Error::Evaluations { .. }) => {
            Status::resource_exhausted(error.to_string())
        }
        ApiError::Training(training::Error::Lineage(crate::lineage::Error::Signature {
            ..
        })) => Status::permission_denied(error.to_string()),
        ApiError::Training(training::Error::Lineage(crate::lineage::Error::Runs { .. })) => {
            Status::resource_exhausted(error.to_string())
        }
        ApiError::Training(training::Error::Lineage(crate::lineage::Error::Store(_))) => {
            tracing::error!(error = %error, "request failed inside the node");
            Status::internal(
                "the node failed to answer; its administrator can see why in the node log",
            )
        }
        ApiError::Training(
            training::Error::TooFew { .. }
            | training::Error::ValidationUndeclared(_)
            | training::Error::Lineage(_)
            | training::Error::NotFinal { .. }
            | training::Error::NotAgreed(_)
            | training::Error::Participants(
                crate::participants::Error::TooFew { .. }
                | crate::participants::Error::NotMember { .. }
                | crate::participants::Error::OtherSet { .. }
                | crate::participants::Error::Threshold { .. }
                | crate::participants::Error::Survivors { .. },
            ),
        ) => Status::failed_precondition(error.to_string()),
        ApiError::Training(training::Error::NoSuchRound(_)) => Status::not_found(error.to_string()),
        ApiError::Training(
            training::Error::RoundExists(_) | training::Error::AlreadyComputed(_),
        ) => Status::already_exists(error.to_string()),
        ApiError::Training(
            training::Error::UnvouchedKeys { .. } | training::Error::CapabilityExpired(_),
        ) => Status::permission_denied(error.to_string()),
        ApiError::Malformed(_)
        | ApiError::Training(
            training::Error::Phase(_)
            | training::Error::SessionPhase(_)
            | training::Error::TrainOutsideRun
            | training::Error::SessionWithoutRun
            | training::Error::NotParticipant(_)
            | training::Error::Dimension { .. }
            | training::Error::Model(_)
            | training::Error::ModelShape
            | training::Error::SecAgg(_)
            | training::Error::Extract(crate::views::Error::View(_)),
        ) => Status::invalid_argument(error.to_string()),
        ApiError::View(crate::views::Error::View(e)) => Status::invalid_argument(e.to_string()),
        ApiError::Differencing(
            differencing::Error::Store(_) | differencing::Error::CorruptRecord,
        )
        | ApiError::View(crate::views::Error::Store(_))
        | ApiError::Gate(gate::Error::Policy(_) | gate::Error::Ledger(_))
        | ApiError::Store(_)
        | ApiError::Consent(_)
        | ApiError::Training(
            training::Error::Learn(_)
            | training::Error::NoSigningKey
            | training::Error::Signing(_)
            | training::Error::Random(_)
            | training::Error::Consent(_)
            | training::Error::Participants(crate::participants::Error::Store(_))
            | training::Error::Extract(crate::views::Error::Store(_)),
        )
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
                organisation_epsilon: Some(crate::config::DEFAULT_ORGANISATION_EPSILON),
                rounds: Rounds::default(),
                sums: crate::participants::SumRule::new(&Default::default()),
                evaluations: crate::evaluations::EvaluationLimit::new(
                    crate::config::DEFAULT_MAX_EVALUATIONS,
                ),
                max_runs: crate::config::DEFAULT_MAX_TRAINING_RUNS,
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
        pins: std::collections::BTreeMap<String, String>,
    ) -> Self {
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
        let facts = gate::NodeFacts {
            node_id: &inner.node_id,
            min_cell_size: inner.min_cell_size,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        let outcome = (|| -> Result<AggregateResult, ApiError> {
            let verifier = self.verifier()?;
            let admitted = tracing::info_span!("gate")
                .in_scope(|| {
                    gate::admit(
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
                })
                .inspect_err(|e| {
                    if let gate::Error::Forbidden { decision, .. } = e {
                        entry.policy_reasons = decision.summary();
                    }
                })?;
            note_capability(&mut entry, &admitted.claims);
            entry.policy_reasons = admitted.access.summary();
            let prepared = tracing::info_span!("consent")
                .in_scope(|| inner.eligibility.prepare(&inner.store, &admitted.consent))?;
            entry.consent_excluded =
                i64::try_from(prepared.summary.excluded_total()).unwrap_or(i64::MAX);
            // One SQL pass: the members give both the cells and the
            // cohort print.
            let spec = &admitted.spec;
            let (members, analysed) = tracing::info_span!("engine").in_scope(|| {
                let members = inner.cohorts.members(
                    &inner.store,
                    spec,
                    &prepared.context,
                    &inner.policy.consent.sensitive,
                )?;
                // Every cell of the table's domain, empty or not: which
                // cells exist must say nothing of the data, or a small cell
                // listed would be known to hold at least one patient.
                let analysed = engine::analyse(spec, &members, true);
                Ok::<_, ApiError>((members, analysed))
            })?;
            let cohort = differencing::CohortPrint::of_members(&members);
            drop(members);
            let org = &admitted.claims.org;
            let mut result = match &spec.noise {
                // An exact table is worked out first: which of its cells are
                // released decides the sets of patients compared with what
                // the organisation has had before.
                None => {
                    let candidates = analysed
                        .cells
                        .iter()
                        .zip(&analysed.members)
                        .map(|(c, who)| {
                            release::Candidate::exact(c, admitted.min_cell_size)
                                .lacking((who.patients.len() - who.events.len()) as u64)
                        })
                        .collect();
                    let (result, lines) = tracing::info_span!("release").in_scope(|| {
                        release::release_with_lines(
                            &inner.node_id,
                            spec,
                            analysed.cells,
                            candidates,
                            admitted.min_cell_size,
                        )
                    });
                    let released: Vec<bool> = result
                        .cells
                        .iter()
                        .map(|c| c.value.patients().is_some())
                        .collect();
                    let sets = differencing::cells::TableSets::of(
                        spec,
                        &cohort,
                        &analysed.members,
                        &released,
                        &lines,
                        admitted.min_cell_size,
                    );
                    let bounds = differencing::bounds::Bounds::of(spec)?;
                    let _releasing = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
                    let _differencing = tracing::info_span!("differencing").entered();
                    // Refuse a cohort, or a set of patients behind any of
                    // the table's numbers, a few patients away from one
                    // already released to the same organisation, and
                    // bounds other than the variable's fixed ones.
                    if let Some(bounds) = &bounds {
                        bounds.check(&inner.store, org)?;
                    }
                    differencing::check(&inner.store, org, &cohort, admitted.min_cell_size)?;
                    differencing::cells::check(&inner.store, org, &sets, admitted.min_cell_size)?;
                    let study = &admitted.claims.sub;
                    differencing::record(&inner.store, org, study, &entry.query_sha256, &cohort)?;
                    differencing::cells::record(
                        &inner.store,
                        org,
                        study,
                        &entry.query_sha256,
                        &sets,
                    )?;
                    if let Some(bounds) = &bounds {
                        bounds.fix(&inner.store, org, study)?;
                    }
                    result
                }
                Some(noise) => {
                    let _releasing = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
                    let differencing_span = tracing::info_span!("differencing").entered();
                    // Refuse a cohort a few patients away from one already
                    // released to the same organisation.
                    differencing::check(&inner.store, org, &cohort, admitted.min_cell_size)?;
                    // Noise is paid for before anything is released.
                    let note = self.charge(
                        &admitted.claims.jti,
                        &admitted.claims,
                        &admitted.manifest,
                        &entry.query_sha256,
                        (noise.epsilon, noise.delta),
                    )?;
                    entry.epsilon = noise.epsilon;
                    let (candidates, statement) =
                        crate::noise::perturb(spec, noise, &analysed.cells, &mut rand::rngs::OsRng);
                    differencing::record(
                        &inner.store,
                        org,
                        &admitted.claims.sub,
                        &entry.query_sha256,
                        &cohort,
                    )?;
                    drop(differencing_span);
                    // Suppression is computation on this answer alone:
                    // other answers need not wait for its linear programmes.
                    drop(_releasing);
                    let _release = tracing::info_span!("release").entered();
                    let mut result = release::release(
                        &inner.node_id,
                        spec,
                        analysed.cells,
                        candidates,
                        admitted.min_cell_size,
                    );
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
                    result.notes.push(note);
                    result.noise = Some(statement);
                    result
                }
            };
            let with_value = analysed
                .members
                .iter()
                .map(|m| match spec.analysis {
                    ghx_study::query::Analysis::Summary { .. } => m.events.len(),
                    _ => m.patients.len(),
                } as u64)
                .sum();
            result.notes.extend(release::analysis_notes(
                spec,
                (with_value, analysed.without_value),
                admitted.min_cell_size,
            ));
            result
                .notes
                .insert(0, format!("access: {}", admitted.access.summary()));
            result.notes.insert(
                1,
                release::consent_note(
                    &prepared.summary,
                    admitted.min_cell_size,
                    release::Values::of(spec),
                ),
            );
            Ok(result)
        })();
        match &outcome {
            Ok(result) => {
                entry.decision = ghx_audit::ANSWERED.to_owned();
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
                entry.decision = "refused".to_owned();
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
    /// Charges a noised query to its organisation's privacy budget for the
    /// study (from the manifest) and at this node overall; refuses when
    /// either would be exceeded. Returns the budget note for the result.
    /// `charge_id` names the charge in the ledger, once: the capability's
    /// id, or for a session's round the capability's id and the round.
    fn charge(
        &self,
        charge_id: &str,
        claims: &ghx_study::capability::Claims,
        manifest: &ghx_study::manifest::StudyManifest,
        request_sha256: &str,
        (epsilon, delta): (f64, f64),
    ) -> Result<String, ApiError> {
        let charge = store::PrivacyCharge {
            organisation: &claims.org,
            study_id: &claims.sub,
            capability_id: charge_id,
            request_sha256,
            epsilon,
            delta,
            study_epsilon: manifest.privacy_budget,
            study_delta: manifest.privacy_delta,
            organisation_epsilon: self.inner.organisation_epsilon,
        };
        match self.inner.store.charge_privacy(&charge)? {
            store::ChargeOutcome::Charged { study } => Ok(format!(
                "privacy budget: this study has now spent epsilon {:.4} of {:.4}{} over {} noised queries and training rounds at this node",
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
                        format!("of study {} for {}", claims.sub, claims.org),
                        manifest.privacy_budget,
                    ),
                    store::BudgetScope::Organisation => (
                        format!("of {} at this node over all studies", claims.org),
                        self.inner.organisation_epsilon.unwrap_or(0.0),
                    ),
                };
                // Only a study's budget has a delta limit.
                let delta_spent = which == store::BudgetScope::Study
                    && spent.delta + delta > manifest.privacy_delta;
                Err(if delta_spent {
                    ApiError::BudgetSpent {
                        scope,
                        quantity: "delta",
                        spent: spent.delta,
                        limit: manifest.privacy_delta,
                        asked: delta,
                    }
                } else {
                    ApiError::BudgetSpent {
                        scope,
                        quantity: "epsilon",
                        spent: spent.epsilon,
                        limit,
                        asked: epsilon,
                    }
                })
            }
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
            Ok(()) => "revoked".to_owned(),
            Err(e) => {
                entry.reason = e.to_string();
                "refused".to_owned()
            }
        };
        self.settle("revoke", started, &entry, &outcome)?;
        tracing::info!(study = %entry.study_id, decision = %entry.decision, "revocation");
        outcome
    }
}

impl NodeApi {
    /// Step 1 of a round: admits it under its capability, reads the
    /// training's rows (once per run) and starts secure aggregation with
    /// keys signed by this node; the contribution is computed at step 3.
    /// Audited.
    fn round_advertise(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
    ) -> Result<pb::RoundAdvertiseResponse, ApiError> {
        self.admitted_round(caller, message, false, |api, admitted| {
            let round = admitted.params.round.clone();
            let advertise = api.inner.rounds.start(
                admitted.params,
                &api.inner.node_id,
                &admitted.origin,
                admitted.work,
                admitted.lifetime,
            )?;
            let (signature, certificate_pem) = api.sign_keys(&advertise.statement(&round))?;
            Ok(pb::RoundAdvertiseResponse {
                keys: Some(pb::AdvertisedKeys {
                    signature,
                    certificate_pem,
                    ..ghx_proto::round::advertise_to_wire(&advertise)
                }),
            })
        })
    }

    /// Opens a training run's session: admitted as a round's step 1 (a
    /// training phase only), refused up front when this node's rows are
    /// too few for the cell size, keyed once for the run. Audited.
    fn session_open(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
    ) -> Result<pb::SessionOpenResponse, ApiError> {
        self.admitted_round(caller, message, true, |api, admitted| {
            training::check_enough(&admitted.work.data, admitted.work.min_cell_size)?;
            let session = admitted.params.round.clone();
            let keys = api.inner.rounds.open_session(
                admitted.params,
                &api.inner.node_id,
                &admitted.origin,
                admitted.work,
                admitted.lifetime,
            )?;
            let (signature, certificate_pem) = api.sign_keys(&keys.statement(&session))?;
            Ok(pb::SessionOpenResponse {
                keys: Some(pb::SessionKeys {
                    signature,
                    certificate_pem,
                    ..ghx_proto::round::session_keys_to_wire(&keys)
                }),
            })
        })
    }

    /// Signs a statement of this node's round or session keys with its
    /// certificate key: (signature, certificate PEM).
    fn sign_keys(&self, statement: &[u8]) -> Result<(Vec<u8>, String), ApiError> {
        let (identity, _) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let current = identity.current_pem();
        let signature = ghx_pki::signed::sign(&current.key_pem, statement)
            .map_err(|e| training::Error::Signing(e.to_string()))?;
        Ok((signature, current.cert_pem))
    }

    /// Admits a round or (`session`) a run's session under its capability
    /// and reads the training's rows (once per run), then `start`s it;
    /// audits the outcome either way. A training round is computed only in
    /// a run's session, whose vectors hold the moments (round 0) or a
    /// training round's; a one-off round is moments or an evaluation.
    fn admitted_round<T>(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundAdvertiseRequest,
        session: bool,
        start: impl FnOnce(&NodeApi, AdmittedRound) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let started = std::time::Instant::now();
        self.load_rotated_key(caller, &message.capability);
        let inner = &self.inner;
        let phase_name = message.phase.clone();
        let mut entry = AuditEntry {
            query_sha256: query::digest(&message.training_json),
            ..audit_entry(caller, ghx_audit::action::round(&phase_name))
        };
        let facts = gate::NodeFacts {
            node_id: &inner.node_id,
            min_cell_size: inner.min_cell_size,
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        // An admitted evaluation counts against the study's limit until its
        // audit entry is written.
        let mut reservation = None;
        let outcome = (|| -> Result<T, ApiError> {
            // The caller's role before anything it sent is read.
            Self::require_coordinator(caller)?;
            let phase = Phase::parse(&message.phase)
                .ok_or_else(|| training::Error::Phase(message.phase.clone()))?;
            match (session, phase) {
                (true, Phase::Train) if message.run.is_empty() => {
                    return Err(training::Error::SessionWithoutRun.into());
                }
                (true, Phase::Train) => {}
                (true, other) => {
                    return Err(training::Error::SessionPhase(other.name().to_owned()).into());
                }
                (false, Phase::Train) => return Err(training::Error::TrainOutsideRun.into()),
                (false, _) => {}
            }
            let params = ghx_proto::round::params_from_wire(message.params.unwrap_or_default())
                .map_err(ApiError::Malformed)?;
            let action = if phase == Phase::Evaluate {
                crate::policy::Action::Evaluation
            } else {
                crate::policy::Action::Training
            };
            let admitted = {
                let verifier = self.verifier()?;
                tracing::info_span!("gate")
                    .in_scope(|| {
                        gate::admit_training(
                            &verifier,
                            &inner.store,
                            &inner.policy,
                            facts,
                            gate::Request {
                                caller,
                                token: &message.capability,
                                query_json: &message.training_json,
                                manifest_json: &message.manifest_json,
                            },
                            action,
                        )
                    })
                    .inspect_err(|e| {
                        if let gate::Error::Forbidden { decision, .. } = e {
                            entry.policy_reasons = decision.summary();
                        }
                    })?
            };
            note_capability(&mut entry, &admitted.claims);
            entry.policy_reasons = admitted.access.summary();
            let spec = &admitted.training;
            let expected = if session {
                ghx_learn::federated::session_len(spec.features.len(), spec.param_count())
            } else {
                phase.len(spec.features.len(), spec.param_count())
            };
            if params.dim != expected {
                return Err(training::Error::Dimension {
                    round: params.round.clone(),
                    phase: phase.name().to_owned(),
                    got: params.dim,
                    expected,
                }
                .into());
            }
            inner
                .sums
                .check(
                    &inner.store,
                    &admitted.claims.sub,
                    &params.round,
                    &params.participants,
                )
                .and_then(|()| {
                    crate::participants::check_threshold(
                        &params.round,
                        params.threshold,
                        params.participants.len(),
                    )
                })
                .map_err(training::Error::from)?;
            // An evaluation outside a run scores the held-out patients with
            // a model the requester chose: it is noised, at the epsilon the
            // training declares for it.
            let validation = match phase {
                Phase::Evaluate if message.run.is_empty() => Some(
                    spec.validation
                        .ok_or_else(|| training::Error::ValidationUndeclared(spec.name.clone()))?
                        .epsilon,
                ),
                _ => None,
            };
            // Each evaluation scores the held-out patients with a model
            // someone chose: a study has a limited number of them here.
            if phase == Phase::Evaluate {
                let study = &admitted.claims.sub;
                let action = ghx_audit::action::round(Phase::Evaluate.name());
                let admitted_one = inner
                    .evaluations
                    .reserve(study, || {
                        inner.audit.count(study, &action, ghx_audit::ANSWERED)
                    })
                    .map_err(|refusal| match refusal {
                        crate::evaluations::Refusal::Spent { study, limit } => {
                            ApiError::from(training::Error::Evaluations { study, limit })
                        }
                        crate::evaluations::Refusal::Count(e) => ApiError::from(e),
                    })?;
                reservation = Some(admitted_one);
            }
            let prepared = tracing::info_span!("consent")
                .in_scope(|| inner.eligibility.prepare(&inner.store, &admitted.consent))?;
            entry.consent_excluded =
                i64::try_from(prepared.summary.excluded_total()).unwrap_or(i64::MAX);
            let key = format!(
                "{}/{}/{}",
                admitted.claims.sub, entry.query_sha256, prepared.context
            );
            let data = {
                let _engine = tracing::info_span!("engine").entered();
                inner.rounds.data(&key, || {
                    training::extract(
                        &inner.store,
                        spec,
                        &prepared.context,
                        &inner.policy.consent.sensitive,
                    )
                })?
            };
            // Steps 2 to 4 must all happen within the round's deadline.
            let lifetime =
                std::time::Duration::from_secs(u64::from(spec.round_deadline_seconds) * 4 + 30);
            entry.reason = format!(
                "round {}: admitted over [{}]; {} training and {} held-out patients, {} left out for missing features",
                params.round,
                params.participants.join(", "),
                data.train.len(),
                data.holdout.len(),
                data.incomplete,
            );
            let participants = params.participants.clone();
            start(
                self,
                AdmittedRound {
                    params,
                    origin: training::RoundOrigin {
                        study: admitted.claims.sub.clone(),
                        capability: admitted.claims.jti.clone(),
                        request_sha256: entry.query_sha256.clone(),
                        participants,
                    },
                    work: Arc::new(training::RoundWork {
                        phase,
                        spec: admitted.training,
                        data,
                        standardised: Default::default(),
                        min_cell_size: admitted.min_cell_size,
                        claims: admitted.claims,
                        manifest: Arc::new(admitted.manifest),
                        validation,
                        run: message.run.clone(),
                    }),
                    lifetime,
                },
            )
        })();
        entry.decision = match &outcome {
            Ok(_) => "answered".to_owned(),
            Err(e) => {
                entry.reason = e.to_string();
                "refused".to_owned()
            }
        };
        let settled = self.settle("training", started, &entry, &outcome);
        drop(reservation);
        settled?;
        tracing::info!(
            study = %entry.study_id, phase = %phase_name, decision = %entry.decision,
            "training round"
        );
        outcome
    }

    /// Step 2: every advertised key must be signed by its node's
    /// certificate key (so the coordinator relaying them cannot substitute
    /// its own); then this node's shares, encrypted to each node.
    fn round_share_keys(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundShareKeysRequest,
    ) -> Result<pb::RoundShareKeysResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let round = &message.round;
        let advertised = self.vouched(
            round,
            message.advertised,
            |w| {
                let signed = (w.certificate_pem.clone(), w.signature.clone());
                Ok((ghx_proto::round::advertise_from_wire(w)?, signed))
            },
            |k| (k.node.clone(), k.statement(round)),
        )?;
        let shares = self.inner.rounds.share_keys(&message.round, &advertised)?;
        Ok(pb::RoundShareKeysResponse {
            shares: shares
                .into_iter()
                .map(ghx_proto::round::share_to_wire)
                .collect(),
        })
    }

    fn require_coordinator(caller: &PeerIdentity) -> Result<(), ApiError> {
        if caller.role == ghx_pki::Role::Coordinator {
            Ok(())
        } else {
            Err(gate::Error::NotCoordinator {
                name: caller.name.clone(),
                role: caller.role,
            }
            .into())
        }
    }

    /// Step 3, the only step that computes and releases the contribution
    /// (masked). Audited.
    fn round_masked(
        &self,
        caller: &PeerIdentity,
        message: pb::RoundMaskedInputRequest,
        received: std::time::Instant,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let (origin, work) = self.inner.rounds.begin_masked(&message.round)?;
        // A run's evaluation scores the model this node computed for the
        // run's last round, whatever model is sent; an external validation
        // the sender's, noised.
        let source = if work.run.is_empty() {
            Source::Supplied(&message.model_json)
        } else {
            let previous = message
                .previous
                .map(ghx_proto::round::evidence_from_wire)
                .transpose()
                .map_err(ApiError::Malformed)?;
            Source::Evaluated(previous)
        };
        let release = Release {
            label: &message.round,
            charge_id: &work.claims.jti,
            origin: &origin,
            work: &work,
            phase: work.phase,
            source,
            in_session: false,
            received,
        };
        self.release_masked(
            caller,
            release,
            || Ok(()),
            |values| {
                let shares: Vec<_> = message
                    .shares
                    .into_iter()
                    .map(ghx_proto::round::share_from_wire)
                    .collect();
                Ok(self
                    .inner
                    .rounds
                    .masked_input(&message.round, &shares, values)?)
            },
        )
    }

    /// Round n of a training run's session: the model it computes from is
    /// this node's own, moved along the run's lineage by the evidence of
    /// the round before (checked before the round number is claimed, so a
    /// refused request burns none); the number is claimed (never masked
    /// twice), the capability must be unexpired, then as step 3, and the
    /// masked input is signed for the lineage. Audited.
    fn session_input(
        &self,
        caller: &PeerIdentity,
        message: pb::SessionInputRequest,
        received: std::time::Instant,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let (origin, work, keys_sha256) = self.inner.rounds.session_work(&message.session)?;
        let previous = message
            .previous
            .map(ghx_proto::round::evidence_from_wire)
            .transpose()
            .map_err(ApiError::Malformed)?;
        let label = format!("{} round {}", message.session, message.round);
        let charge_id = format!("{}/round-{}", work.claims.jti, message.round);
        let release = Release {
            label: &label,
            charge_id: &charge_id,
            origin: &origin,
            work: &work,
            // The moments are a run's round 0.
            phase: if message.round == 0 {
                Phase::Moments
            } else {
                Phase::Train
            },
            source: Source::Lineage(LineageRound {
                session: &message.session,
                round: message.round,
                previous,
                keys_sha256,
            }),
            in_session: true,
            received,
        };
        self.release_masked(
            caller,
            release,
            || {
                self.inner
                    .rounds
                    .begin_session_round(&message.session, message.round)?;
                Ok(())
            },
            |values| {
                let len = ghx_learn::federated::session_len(
                    work.spec.features.len(),
                    work.spec.param_count(),
                );
                let padded = ghx_learn::federated::padded(values, len);
                Ok(self.inner.rounds.session_masked_input(
                    &message.session,
                    message.round,
                    &padded,
                )?)
            },
        )
    }

    /// Relays a session's keys: every member's key must be signed by its
    /// node's certificate key, as at a round's step 2; nothing is dealt.
    fn session_agree(
        &self,
        caller: &PeerIdentity,
        message: pb::SessionAgreeRequest,
    ) -> Result<pb::SessionAgreeResponse, ApiError> {
        Self::require_coordinator(caller)?;
        let session = &message.session;
        let keys = self.vouched(
            session,
            message.keys,
            |w| {
                let signed = (w.certificate_pem.clone(), w.signature.clone());
                Ok((ghx_proto::round::session_keys_from_wire(w)?, signed))
            },
            |k| (k.node.clone(), k.statement(session)),
        )?;
        let inner = &self.inner;
        inner
            .rounds
            .agree_session(session, &keys, |origin, members| {
                Ok(inner
                    .sums
                    .check(&inner.store, &origin.study, session, members)?)
            })?;
        Ok(pb::SessionAgreeResponse {})
    }

    /// Reads the keys of `round` (a round or a session) the coordinator
    /// relayed, each with (certificate PEM, signature), and checks that
    /// every other node's were signed by that node: `statement` says whose
    /// keys they are and what was signed. This node's own keys are checked
    /// against what it made, by its secagg client.
    fn vouched<W, K>(
        &self,
        round: &str,
        wires: Vec<W>,
        read: impl Fn(W) -> Result<(K, (String, Vec<u8>)), String>,
        statement: impl Fn(&K) -> (String, Vec<u8>),
    ) -> Result<Vec<K>, ApiError> {
        let (_, members) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let mut out = Vec::with_capacity(wires.len());
        for wire in wires {
            let (keys, (certificate, signature)) = read(wire).map_err(ApiError::Malformed)?;
            let (node, signed) = statement(&keys);
            if node != self.inner.node_id {
                training::check_keys(members, round, &node, &signed, (&certificate, &signature))?;
            }
            out.push(keys);
        }
        Ok(out)
    }

    /// The model a round computes from, and for a run's round the lineage
    /// step it was reached by (the session round, when it is one, and the
    /// head its input is signed over). A run's rounds never read a model
    /// the coordinator sends.
    fn model_for<'s>(
        &self,
        origin: &training::RoundOrigin,
        work: &training::RoundWork,
        source: &'s Source<'s>,
    ) -> Result<RoundModel<'s>, ApiError> {
        let spec = &work.spec;
        let (at, previous) = match source {
            Source::Supplied(json) if work.phase == Phase::Evaluate => {
                return Ok((
                    Some(ModelDocument::parse_for(json, spec).map_err(training::Error::from)?),
                    None,
                ));
            }
            Source::Supplied(_) => return Ok((None, None)),
            Source::Lineage(at) => (Some(at), at.previous.as_ref()),
            Source::Evaluated(previous) => {
                let got = previous.as_ref().map_or(0, |e| e.round);
                if previous.is_some() && got != spec.rounds {
                    return Err(training::Error::NotFinal {
                        got,
                        rounds: spec.rounds,
                    }
                    .into());
                }
                (None, previous.as_ref())
            }
        };
        let (_, keys) = self
            .inner
            .round_keys
            .as_ref()
            .ok_or(training::Error::NoSigningKey)?;
        let run = crate::store::RunKey {
            study_id: &origin.study,
            training_sha256: &origin.request_sha256,
            run_id: &work.run,
        };
        let round = at.map_or(spec.rounds.saturating_add(1), |at| at.round);
        let step = crate::lineage::advance(
            &self.inner.store,
            keys,
            crate::lineage::At {
                run,
                round,
                members: &origin.participants,
                max_runs: self.inner.max_runs,
            },
            previous,
            spec,
        )
        .map_err(training::Error::from)?;
        Ok((step.model, Some((at, step.parent))))
    }

    /// Computes and releases a round's masked contribution: the study must
    /// still stand (and, in a session, the capability be unexpired), and a
    /// noised training round is charged to the budget ledger before
    /// anything leaves; `mask` masks the contribution. Audited.
    fn release_masked(
        &self,
        caller: &PeerIdentity,
        release: Release<'_>,
        claim: impl FnOnce() -> Result<(), ApiError>,
        mask: impl FnOnce(&[f64]) -> Result<ghx_secagg::MaskedInput, ApiError>,
    ) -> Result<pb::RoundMaskedInputResponse, ApiError> {
        let Release {
            label,
            charge_id,
            origin,
            work,
            phase,
            source,
            in_session,
            received,
        } = release;
        let started = std::time::Instant::now();
        let inner = &self.inner;
        let mut entry = AuditEntry {
            query_sha256: origin.request_sha256.clone(),
            ..audit_entry(caller, ghx_audit::action::MASKED_INPUT)
        };
        note_capability(&mut entry, &work.claims);
        let (mut checked_at, mut computed_at) = (None, None);
        let outcome = (|| -> Result<pb::RoundMaskedInputResponse, ApiError> {
            if inner.store.is_revoked(&origin.study)? {
                return Err(gate::Error::Revoked {
                    study: origin.study.clone(),
                }
                .into());
            }
            if in_session && time::OffsetDateTime::now_utc().unix_timestamp() >= work.claims.exp {
                return Err(training::Error::CapabilityExpired(label.to_owned()).into());
            }
            // A session round's sum is over its nodes as soon as every one
            // has sent its input: the study is bound to them from now on.
            // A one-off round binds when it is unmasked.
            let sums = &inner.sums;
            let (study, nodes) = (&origin.study, &origin.participants);
            if in_session {
                sums.bind(&inner.store, study, label, nodes)
            } else {
                sums.check(&inner.store, study, label, nodes)
            }
            .map_err(training::Error::from)?;
            let (model, lineage) = self.model_for(origin, work, &source)?;
            claim()?;
            let computing = std::time::Instant::now();
            checked_at = Some(computing);
            let contribution = {
                let _engine = tracing::info_span!("engine").entered();
                training::contribution(
                    phase,
                    &work.spec,
                    (&work.data, &work.standardised),
                    model.as_ref(),
                    work.min_cell_size,
                    work.validation,
                )?
            };
            computed_at = Some(std::time::Instant::now());
            let local_micros = micros(computing.elapsed());
            let local_started_micros = micros(computing.saturating_duration_since(received));
            // A noised training round is paid for before it is released:
            // the growth of the training's epsilon from the rounds this
            // node already charged for it (over every run) to one more.
            let budget_note = match (&work.spec.privacy, phase, work.validation) {
                (Some(privacy), Phase::Train, _) => {
                    let _charging = inner.releasing.lock().unwrap_or_else(|e| e.into_inner());
                    let charged = inner.store.privacy_charges_for(
                        &work.claims.org,
                        &work.claims.sub,
                        &origin.request_sha256,
                    )?;
                    let cost = privacy.round_charge(charged + 1);
                    let note = self.charge(
                        charge_id,
                        &work.claims,
                        &work.manifest,
                        &origin.request_sha256,
                        cost,
                    )?;
                    entry.epsilon = cost.0;
                    Some(format!(
                        "{note}; this training's noised rounds here: {} (epsilon {:.4} at delta {:e})",
                        charged + 1,
                        privacy.epsilon_after(charged + 1),
                        privacy.delta
                    ))
                }
                // An external validation, under its own digest: the ledger
                // counts a training's noised rounds by the training's.
                // One charge, atomic in the ledger: no lock needed (a DP
                // round's lock keeps its count and charge together).
                (_, Phase::Evaluate, Some(epsilon)) => {
                    let note = self.charge(
                        charge_id,
                        &work.claims,
                        &work.manifest,
                        &ghx_audit::digest(source.supplied()),
                        (epsilon, 0.0),
                    )?;
                    entry.epsilon = epsilon;
                    Some(format!(
                        "{note}; the validation's counts noised at epsilon {epsilon}"
                    ))
                }
                _ => None,
            };
            let masked = mask(&contribution.values)?;
            entry.result_sha256 = ghx_audit::digest_words(&masked.values);
            entry.result_cells = i64::try_from(masked.values.len()).unwrap_or(i64::MAX);
            // A run's round: the masked input signed for the lineage, so
            // every member can check the sum the next round is read from.
            let (lineage_signature, lineage_parent) = match &lineage {
                Some((Some(at), parent)) => {
                    let statement = ghx_study::lineage::InputStatement {
                        study: &origin.study,
                        training_sha256: &origin.request_sha256,
                        run: &work.run,
                        session: at.session,
                        round: at.round,
                        parent,
                        keys_sha256: &at.keys_sha256,
                        members: &origin.participants,
                        node: &inner.node_id,
                        masked: &masked.values,
                    };
                    let (signature, _) = self.sign_keys(&statement.bytes())?;
                    (signature, parent.to_vec())
                }
                _ => (Vec::new(), Vec::new()),
            };
            entry.reason = format!(
                "round {}: sent the masked contribution ({} values){}{}",
                label,
                masked.values.len(),
                lineage
                    .as_ref()
                    .map(|(_, parent)| format!(
                        "; computed from lineage head {}",
                        hex::encode(parent)
                    ))
                    .unwrap_or_default(),
                budget_note.map(|n| format!("; {n}")).unwrap_or_default()
            );
            let node_metrics_json = match &contribution.metrics {
                Some(m) => serde_json::to_vec(m).map_err(|e| ApiError::Task(e.to_string()))?,
                None => Vec::new(),
            };
            Ok(pb::RoundMaskedInputResponse {
                local_micros,
                local_started_micros,
                node_metrics_json,
                lineage_signature,
                lineage_parent,
                ..ghx_proto::round::masked_to_wire(masked)
            })
        })();
        entry.decision = match &outcome {
            Ok(_) => ghx_audit::ANSWERED.to_owned(),
            Err(e) => {
                entry.reason = e.to_string();
                "refused".to_owned()
            }
        };
        let masked_at = std::time::Instant::now();
        self.settle("masked input", started, &entry, &outcome)?;
        // Where the handler's time went, µs from receiving the request
        // (GHX_LOG=ghx_node::api=debug).
        let us = |at: std::time::Instant| micros(at.saturating_duration_since(received));
        tracing::debug!(
            label,
            started = us(started),
            checked = us(checked_at.unwrap_or(started)),
            computed = us(computed_at.unwrap_or(started)),
            masked = us(masked_at),
            audited = us(std::time::Instant::now()),
            "masked input timeline"
        );
        outcome
    }
}

/// A round or session admitted at step 1, to be started.
struct AdmittedRound {
    params: ghx_secagg::RoundParams,
    origin: training::RoundOrigin,
    work: Arc<training::RoundWork>,
    /// How long the round (or session, past its last use) is kept.
    lifetime: std::time::Duration,
}

/// What a masked contribution is computed for.
struct Release<'a> {
    /// The round, as the audit entry names it.
    label: &'a str,
    /// The round's charge in the privacy ledger, if it is noised.
    charge_id: &'a str,
    origin: &'a training::RoundOrigin,
    work: &'a training::RoundWork,
    /// What the round computes: the moments, a training round or an
    /// evaluation.
    phase: Phase,
    source: Source<'a>,
    /// A session round: the capability must still be unexpired.
    in_session: bool,
    /// When the node's handler received the request.
    received: std::time::Instant,
}

/// Where a round's model comes from.
enum Source<'a> {
    /// The sender's (an external validation, or a one-off moments round,
    /// which reads none).
    Supplied(&'a [u8]),
    /// A run's session round: the node's own lineage, moved by the
    /// evidence of the round before.
    Lineage(LineageRound<'a>),
    /// A run's evaluation: the model after the run's last round, by its
    /// evidence.
    Evaluated(Option<ghx_study::lineage::Evidence>),
}

impl Source<'_> {
    /// The model the sender supplied (empty when the node computes it).
    fn supplied(&self) -> &[u8] {
        match self {
            Source::Supplied(json) => json,
            _ => &[],
        }
    }
}

/// The model a round computes from and, for a run's round, the lineage
/// step it was reached by: the session round, when it is one, and the head
/// its input is signed over.
type RoundModel<'s> = (
    Option<ModelDocument>,
    Option<(Option<&'s LineageRound<'s>>, ghx_study::lineage::Head)>,
);

/// A session round of a run.
struct LineageRound<'a> {
    session: &'a str,
    round: u32,
    /// The evidence of round `round - 1`; none for round 0.
    previous: Option<ghx_study::lineage::Evidence>,
    keys_sha256: ghx_study::lineage::Head,
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

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of now")
}

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
