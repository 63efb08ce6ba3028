//! The node's side of a pooled query, as gRPC handlers: admission under
//! the query's capability (as `RunAggregate`), the set of nodes checked by
//! the sum rules, this node's vector computed by the pipeline
//! ([`crate::pipeline::Pipeline::pooled`]) and kept with a fresh session
//! key; then the members' keys checked against their signers and the
//! vector answered masked, bound to the query and manifest. Both steps are
//! audited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ghx_audit::Decision;
use ghx_disclosure::linkage::QueryKey;
use ghx_pki::PeerIdentity;
use ghx_proto::v1 as pb;
use ghx_secagg::session::SessionClient;
use ghx_study::query::{self, Release};
use sha2::{Digest, Sha256};

use super::{ApiError, NodeApi, audit_entry, note_capability};
use crate::classify::{Classify, Code};
use crate::config::ReleaseSettings;
use crate::gate;
use crate::pipeline::Recorded;
use crate::store::AuditEntry;

/// How long a pooled session waits for its second step.
const PENDING_FOR: Duration = Duration::from_secs(120);
/// Most pooled sessions waiting for their second step at once.
const MAX_PENDING: usize = 64;

/// Why this node does not take part in a release the way it was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error(
        "query `{query}` is approved for pooled release only: this node releases no cells of its own for it"
    )]
    PooledOnly { query: String },
    #[error(
        "this hospital does not release its own cells (release.per_hospital = false); ask for the query's pooled release"
    )]
    PerHospitalOff,
    #[error("query `{query}` is approved for release per hospital, not pooled")]
    NotPooled { query: String },
    #[error("this hospital does not contribute to pooled tables (release.pooled = false)")]
    PooledOff,
    #[error(
        "a pooled table without noise is refused here (release.pooled_without_noise = false): the coordinator would see the federation's small totals"
    )]
    WithoutNoise,
    #[error("pooled session {session}: {problem}")]
    Session { session: String, problem: String },
    #[error(
        "this hospital has no link key ([linkage] key_file), so it cannot count each patient once"
    )]
    NoLinkKey,
    #[error(
        "this node pools only with configured members (secure_aggregation.members): made-up members would shrink its noise share and know their pair secrets with it"
    )]
    NoMembers,
}

impl Classify for Refusal {
    fn code(&self) -> Code {
        match self {
            Refusal::Session { .. } => Code::FailedPrecondition,
            _ => Code::PermissionDenied,
        }
    }

    fn kind(&self) -> &'static str {
        "release"
    }
}

/// Checks a request's release against the approved query's and this
/// node's settings.
pub(super) fn check_release(
    settings: &ReleaseSettings,
    admitted: &gate::Admitted,
    asked: Release,
) -> Result<(), Refusal> {
    let query = admitted.query_name.clone();
    match (asked, admitted.spec.release) {
        (Release::PerHospital, Release::Pooled) => Err(Refusal::PooledOnly { query }),
        (Release::PerHospital, _) if !settings.per_hospital => Err(Refusal::PerHospitalOff),
        (Release::Pooled, Release::PerHospital) => Err(Refusal::NotPooled { query }),
        (Release::Pooled, _) if !settings.pooled => Err(Refusal::PooledOff),
        (Release::Pooled, _) if admitted.spec.noise.is_none() && !settings.pooled_without_noise => {
            Err(Refusal::WithoutNoise)
        }
        _ => Ok(()),
    }
}

/// A pooled session between its two steps.
pub(crate) struct Pending {
    client: SessionClient,
    vector: Vec<u64>,
    /// What every member must have computed from: the query, the manifest
    /// and the session.
    bound: [u8; 32],
    study: String,
    participants: Vec<String>,
    claims: ghx_study::capability::Claims,
    request_sha256: String,
}

/// Pooled sessions waiting for their second step.
pub(crate) type PooledSessions = Sessions<Pending>;

/// Sessions between their two steps, each reserved at admission, filled
/// once its first step's audit entry is written (dropped if it is not) and
/// taken once by its second step, within a lifetime.
pub(crate) struct Sessions<T> {
    pending: Mutex<HashMap<String, (Instant, Option<T>)>>,
    lifetime: Duration,
}

impl<T> Default for Sessions<T> {
    fn default() -> Self {
        Sessions::new(PENDING_FOR)
    }
}

impl<T> Sessions<T> {
    fn new(lifetime: Duration) -> Self {
        Sessions {
            pending: Mutex::default(),
            lifetime,
        }
    }

    /// Reserves `session` before anything is computed or charged.
    fn reserve(&self, session: &str) -> Result<(), Refusal> {
        let session = session.to_owned();
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, (expires, _)| *expires > now);
        if map.contains_key(&session) {
            return Err(Refusal::Session {
                session,
                problem: "already open".to_owned(),
            });
        }
        if map.len() >= MAX_PENDING {
            return Err(Refusal::Session {
                session,
                problem: format!("{MAX_PENDING} pooled sessions are already waiting here"),
            });
        }
        map.insert(session, (now + self.lifetime, None));
        Ok(())
    }

    /// Fills a reserved session, once its first step is audited; its
    /// second step may come for the lifetime from now.
    fn fill(&self, session: &str, pending: T) {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(session) {
            Some(slot) => *slot = (Instant::now() + self.lifetime, Some(pending)),
            None => tracing::warn!(
                session,
                "a pooled session's reservation lapsed while it was computed: its second step will be refused"
            ),
        }
    }

    /// Drops a reservation whose first step failed.
    fn release(&self, session: &str) {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(session);
    }

    /// A filled session, removed: each masks once. One still being
    /// opened is left as it is.
    fn take(&self, session: &str) -> Result<T, Refusal> {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(map.get(session), Some((_, None))) {
            return Err(Refusal::Session {
                session: session.to_owned(),
                problem: "still being opened".to_owned(),
            });
        }
        match map.remove(session) {
            Some((expires, Some(p))) if expires > Instant::now() => Ok(p),
            _ => Err(Refusal::Session {
                session: session.to_owned(),
                problem: "not open here (never, expired or already masked)".to_owned(),
            }),
        }
    }
}

/// The value every member's masks are bound to.
/// Counting each patient once, also to the query key's check value: nodes
/// holding different link keys then give a sum that does not cancel.
fn binding(
    query_sha256: &str,
    manifest_json: &[u8],
    session: &str,
    linkage: Option<&QueryKey>,
) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"ghx pooled/v1\0")
        .chain_update(query_sha256.as_bytes())
        .chain_update([0])
        .chain_update(Sha256::digest(manifest_json))
        .chain_update(session.as_bytes())
        .chain_update(linkage.map(QueryKey::check).unwrap_or_default())
        .finalize()
        .into()
}

impl NodeApi {
    /// Step 1 of a pooled query: admitted like any query, its release
    /// checked, the set of nodes checked, this node's vector computed (its
    /// noise share paid for) and kept with a fresh key, which is answered
    /// signed. Audited.
    pub(super) fn pooled_open(
        &self,
        caller: &PeerIdentity,
        message: pb::PooledOpenRequest,
    ) -> Result<pb::SessionOpenResponse, ApiError> {
        let started = Instant::now();
        self.load_rotated_key(caller, &message.capability);
        let inner = &self.inner;
        let query_json = message.query.map(|q| q.json).unwrap_or_default();
        let mut entry = AuditEntry {
            query_sha256: query::digest(&query_json),
            ..audit_entry(caller, ghx_audit::action::POOLED)
        };
        // The session reserved here is filled only once this step's audit
        // entry is written, and dropped otherwise.
        let mut reserved = None;
        let outcome = (|| -> Result<(pb::SessionOpenResponse, Pending), ApiError> {
            Self::require_coordinator(caller)?;
            let params = ghx_proto::round::params_from_wire(message.params.unwrap_or_default())
                .map_err(ApiError::Malformed)?;
            let admitted = self.admit_query(
                gate::Request {
                    caller,
                    token: &message.capability,
                    query_json: &query_json,
                    manifest_json: &message.manifest_json,
                },
                &mut entry,
            )?;
            check_release(&inner.release, &admitted, Release::Pooled)?;
            if !inner.sums.has_members() {
                return Err(Refusal::NoMembers.into());
            }
            let session = params.round.clone();
            let pooled_k =
                ghx_disclosure::pooled::cell_size(&admitted.manifest, &params.participants);
            if pooled_k < admitted.min_cell_size {
                return Err(Refusal::Session {
                    session,
                    problem: format!(
                        "the pooled table would be held to a cell size of {pooled_k}; this hospital holds every release to {}",
                        admitted.min_cell_size
                    ),
                }
                .into());
            }
            let expected = ghx_disclosure::pooled::Layout::of(&admitted.spec).dim();
            if params.dim != expected {
                return Err(Refusal::Session {
                    session,
                    problem: format!(
                        "keyed for {} numbers; the query's table has {expected}",
                        params.dim
                    ),
                }
                .into());
            }
            let linkage = match (&inner.link_key, admitted.spec.each_patient_once) {
                (Some(key), true) => Some((
                    key,
                    QueryKey::derive(
                        key,
                        &session,
                        &query::digest(message.capability.as_bytes()),
                        &entry.query_sha256,
                    ),
                )),
                (None, true) => return Err(Refusal::NoLinkKey.into()),
                (_, false) => None,
            };
            inner
                .sums
                .check(
                    &inner.store,
                    &admitted.claims.sub,
                    &session,
                    &params.participants,
                )
                .and_then(|()| {
                    crate::participants::check_threshold(
                        &session,
                        params.threshold,
                        params.participants.len(),
                    )
                })
                .map_err(training_error)?;
            // Reserved before anything is computed or charged: a refusal
            // for a session already open or too many waiting costs nothing.
            inner.pooled.reserve(&session)?;
            reserved = Some(session.clone());
            let (client, keys) = SessionClient::new(params.clone(), &inner.node_id)
                .map_err(|e| ApiError::Malformed(e.to_string()))?;
            let mut recorded = Recorded::default();
            let vector = self.pipeline().pooled(
                &admitted,
                &entry.query_sha256,
                params.participants.len(),
                linkage.as_ref().map(|(link, key)| (*link, key)),
                &mut recorded,
            );
            entry.consent_excluded = recorded.consent_excluded;
            entry.epsilon = recorded.epsilon;
            let vector = vector?;
            entry.reason = format!(
                "pooled session {session} over [{}]: {} numbers",
                params.participants.join(", "),
                vector.len()
            );
            let (signature, certificate_pem) = self.sign_keys(&keys.statement(&session))?;
            let pending = Pending {
                client,
                vector: ghx_disclosure::pooled::to_ring(&vector),
                bound: binding(
                    &entry.query_sha256,
                    &message.manifest_json,
                    &session,
                    linkage.as_ref().map(|(_, key)| key),
                ),
                study: admitted.claims.sub.clone(),
                participants: params.participants,
                request_sha256: entry.query_sha256.clone(),
                claims: admitted.claims,
            };
            let response = pb::SessionOpenResponse {
                keys: Some(pb::SessionKeys {
                    signature,
                    certificate_pem,
                    ..ghx_proto::round::session_keys_to_wire(&keys)
                }),
            };
            Ok((response, pending))
        })();
        entry.decision = match &outcome {
            Ok(_) => Decision::Answered.into(),
            Err(e) => {
                entry.reason = e.to_string();
                Decision::Refused.into()
            }
        };
        let settled = self.settle("pooled", started, &entry, &outcome);
        tracing::info!(study = %entry.study_id, decision = %entry.decision, "pooled open");
        match (settled, outcome, reserved) {
            (Ok(()), Ok((response, pending)), Some(session)) => {
                inner.pooled.fill(&session, pending);
                Ok(response)
            }
            (settled, outcome, session) => {
                if let Some(session) = session {
                    inner.pooled.release(&session);
                }
                settled?;
                outcome.map(|(response, _)| response)
            }
        }
    }

    /// Step 2: every member's key signed by its node; then this node's
    /// vector masked with a pair secret per member, bound to the query.
    /// The study is bound to the set of nodes from now on. Audited.
    pub(super) fn pooled_input(
        &self,
        caller: &PeerIdentity,
        message: pb::PooledInputRequest,
    ) -> Result<pb::PooledInputResponse, ApiError> {
        let started = Instant::now();
        let inner = &self.inner;
        let mut entry = audit_entry(caller, ghx_audit::action::POOLED_INPUT);
        let outcome = (|| -> Result<pb::PooledInputResponse, ApiError> {
            Self::require_coordinator(caller)?;
            let session = &message.session;
            let mut pending = inner.pooled.take(session)?;
            entry.query_sha256 = pending.request_sha256.clone();
            note_capability(&mut entry, &pending.claims);
            if inner.store.is_revoked(&pending.study)? {
                return Err(gate::Error::Revoked {
                    study: pending.study.clone(),
                }
                .into());
            }
            let keys = self.vouched_session_keys(session, message.keys)?;
            let refused = |e: ghx_secagg::Error| Refusal::Session {
                session: session.clone(),
                problem: e.to_string(),
            };
            pending.client.agree(&keys).map_err(refused)?;
            inner
                .sums
                .bind(&inner.store, &pending.study, session, &pending.participants)
                .map_err(training_error)?;
            pending.client.claim(0).map_err(refused)?;
            let masked = pending
                .client
                .mask_bound(0, &pending.bound, &pending.vector)
                .map_err(refused)?;
            entry.result_sha256 = ghx_audit::digest_words(&masked.values);
            entry.result_cells = i64::try_from(masked.values.len()).unwrap_or(i64::MAX);
            entry.reason = format!("pooled session {session}: masked input released");
            Ok(pb::PooledInputResponse {
                node: masked.node,
                values: masked.values,
            })
        })();
        entry.decision = match &outcome {
            Ok(_) => Decision::Answered.into(),
            Err(e) => {
                entry.reason = e.to_string();
                Decision::Refused.into()
            }
        };
        self.settle("pooled", started, &entry, &outcome)?;
        outcome
    }
}

fn training_error(e: crate::participants::Error) -> ApiError {
    ApiError::Training(crate::training::Error::from(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(r: Result<impl std::fmt::Debug, Refusal>) -> String {
        match r.unwrap_err() {
            Refusal::Session { problem, .. } => problem,
            other => panic!("{other}"),
        }
    }

    /// A session is reserved once, taken only once filled and only once,
    /// dropped when its first step fails, and gone after its lifetime; at
    /// most MAX_PENDING wait at once.
    #[test]
    fn sessions_are_reserved_filled_and_taken_once() {
        let sessions: Sessions<u32> = Sessions::default();
        sessions.reserve("a").unwrap();
        assert_eq!(problem(sessions.reserve("a")), "already open");
        assert_eq!(problem(sessions.take("a")), "still being opened");
        sessions.fill("a", 7);
        assert_eq!(sessions.take("a").unwrap(), 7);
        assert!(problem(sessions.take("a")).starts_with("not open here"));
        // A failed first step frees its name; a fill after it is dropped.
        sessions.reserve("b").unwrap();
        sessions.release("b");
        sessions.fill("b", 1);
        assert!(problem(sessions.take("b")).starts_with("not open here"));
        for i in 0..MAX_PENDING {
            sessions.reserve(&format!("s{i}")).unwrap();
        }
        assert!(problem(sessions.reserve("one more")).contains("already waiting"));
        // Past its lifetime a session is neither taken nor counted.
        let short: Sessions<u32> = Sessions::new(Duration::from_millis(20));
        short.reserve("c").unwrap();
        short.fill("c", 3);
        std::thread::sleep(Duration::from_millis(40));
        assert!(problem(short.take("c")).starts_with("not open here"));
        for i in 0..MAX_PENDING {
            short.reserve(&format!("t{i}")).unwrap();
        }
        std::thread::sleep(Duration::from_millis(40));
        short.reserve("after").unwrap();
    }
}
