//! The audit log a node and the coordinator each keep, and what the steering
//! committee does with it: verify it, export it as FHIR AuditEvents,
//! reconcile the coordinator's record against the nodes', and review it.
//!
//! Key decision: one [`Entry`] type for both sides, hash-chained. Each entry
//! carries the SHA-256 of its own canonical form, and that form includes the
//! previous entry's hash and the entry's sequence number, so editing,
//! deleting, reordering or inserting an entry breaks the chain at that entry.
//! A chain alone can be rebuilt by whoever can write the database, so every
//! so often the keeper signs a [`checkpoint::Checkpoint`] (the hash at a
//! sequence number) with the private key of its mTLS certificate; anyone with
//! the certificate can check it, and nobody without the key can forge it.
//! Expiry after the retention period deletes entries only up to a signed
//! checkpoint, which then anchors the rest of the chain.
//!
//! This crate knows nothing of databases or the network: the stores hand it
//! rows, it hands back verdicts and documents.

#![forbid(unsafe_code)]

pub mod checkpoint;
#[cfg(feature = "fhir")]
pub mod fhir;
pub mod reconcile;
pub mod report;
pub mod verify;
pub mod witness;

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};
pub use time::OffsetDateTime;

/// The coordinator's name as a keeper: its checkpoints' `iss`, and the
/// common name of the certificate that verifies them.
pub const COORDINATOR: &str = "coordinator";

/// The `prev_hash` of the first entry of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a keeper decided about one request, or how one of its steps ended:
/// an [`Entry`]'s `decision`, stored as [`Decision::as_str`] (the log's
/// format is text, so entries written before this type read the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Something left the keeper: a node's answer, a coordinator's
    /// request a node answered.
    Answered,
    /// The keeper, or the node asked, refused the request.
    Refused,
    /// The request failed without a decision (a node down, a timeout).
    Failed,
    /// A coordinator step that completed (a committee vote, a run).
    Done,
    /// A node applied a study's revocation.
    Revoked,
}

impl Decision {
    pub const ALL: [Decision; 5] = [
        Decision::Answered,
        Decision::Refused,
        Decision::Failed,
        Decision::Done,
        Decision::Revoked,
    ];

    /// The text an entry stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Answered => "answered",
            Decision::Refused => "refused",
            Decision::Failed => "failed",
            Decision::Done => "done",
            Decision::Revoked => "revoked",
        }
    }

    /// The decision an entry's text names, if it is one.
    pub fn parse(text: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|d| d.as_str() == text)
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Decision> for String {
    fn from(d: Decision) -> String {
        d.as_str().to_owned()
    }
}

/// One line of an audit log. The node writes one per request it decides;
/// the coordinator one per step it takes and one per request it sends to
/// each node (`peer` names the node), which is what reconciliation compares.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 1; assigned by the store.
    pub seq: i64,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The account that asked: its certificate's common name.
    pub caller: String,
    pub caller_role: String,
    /// The caller's organisation, as its certificate names it.
    pub caller_org: String,
    /// The network address the request came from, when known.
    pub source: String,
    /// The requester the capability was issued to, when a capability was used.
    pub requester: String,
    pub requester_org: String,
    pub study_id: String,
    /// The capability (its `jti`) the request was made under.
    pub capability_id: String,
    /// What was asked: `aggregate`, `revoke`, `round:<phase>`, `submit`, ...
    pub action: String,
    /// On the coordinator, the node a request was sent to; empty otherwise.
    pub peer: String,
    /// `answered`, `refused`, `revoked`, `done`, `sent`, `failed`, ...
    pub decision: String,
    /// Why: the refusal, the suppression summary, the failure.
    pub reason: String,
    /// Purpose of use the capability carried (HL7 v3 ActReason).
    pub purpose: String,
    /// Which access policies decided, with their stated reasons.
    pub policy_reasons: String,
    /// Hex SHA-256 of the request (query, training spec, revocation).
    pub query_sha256: String,
    /// Hex SHA-256 of what was released, empty when nothing was.
    pub result_sha256: String,
    /// Cells (or values) released.
    pub result_cells: i64,
    /// Patients consent excluded from the computation.
    pub consent_excluded: i64,
    /// Privacy budget (epsilon) charged by this request.
    pub epsilon: f64,
    /// The hash of the entry before this one ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// The hash of this entry: [`Entry::compute_hash`].
    pub hash: String,
}

/// The hashed form of an entry: every field but the hash, in a fixed order.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    prev_hash: &'a str,
    at: &'a str,
    caller: &'a str,
    caller_role: &'a str,
    caller_org: &'a str,
    source: &'a str,
    requester: &'a str,
    requester_org: &'a str,
    study_id: &'a str,
    capability_id: &'a str,
    action: &'a str,
    peer: &'a str,
    decision: &'a str,
    reason: &'a str,
    purpose: &'a str,
    policy_reasons: &'a str,
    query_sha256: &'a str,
    result_sha256: &'a str,
    result_cells: i64,
    consent_excluded: i64,
    epsilon: f64,
}

impl Entry {
    /// The hex SHA-256 of this entry's canonical form (its `hash` excluded).
    pub fn compute_hash(&self) -> String {
        let canonical = Canonical {
            seq: self.seq,
            prev_hash: &self.prev_hash,
            at: &self.at,
            caller: &self.caller,
            caller_role: &self.caller_role,
            caller_org: &self.caller_org,
            source: &self.source,
            requester: &self.requester,
            requester_org: &self.requester_org,
            study_id: &self.study_id,
            capability_id: &self.capability_id,
            action: &self.action,
            peer: &self.peer,
            decision: &self.decision,
            reason: &self.reason,
            purpose: &self.purpose,
            policy_reasons: &self.policy_reasons,
            query_sha256: &self.query_sha256,
            result_sha256: &self.result_sha256,
            result_cells: self.result_cells,
            consent_excluded: self.consent_excluded,
            epsilon: self.epsilon,
        };
        let bytes = serde_json::to_vec(&canonical).expect("an entry always serialises");
        hex::encode(Sha256::digest(bytes))
    }

    /// Links this entry after `prev_hash` at `seq`: sets both and the hash.
    pub fn chain(&mut self, seq: i64, prev_hash: &str) {
        self.seq = seq;
        self.prev_hash = prev_hash.to_owned();
        self.hash = self.compute_hash();
    }
}

/// Hex SHA-256 of `bytes`: the digest recorded for requests and results.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of 64-bit words (little-endian): the digest recorded for a
/// masked training contribution.
pub fn digest_words(words: &[u64]) -> String {
    let mut hasher = Sha256::new();
    for w in words {
        hasher.update(w.to_le_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The current time as the log writes it.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The `[audit]` table of a node's or the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Sign a checkpoint every this many entries.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: i64,
    /// Keep entries this many days; older ones expire up to a checkpoint.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
}

/// Korean rules on access to medical records: logs kept at least 2 years.
pub const MIN_RETENTION_DAYS: u32 = 730;

fn default_checkpoint_every() -> i64 {
    64
}

fn default_retention_days() -> u32 {
    MIN_RETENTION_DAYS
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            checkpoint_every: default_checkpoint_every(),
            retention_days: default_retention_days(),
        }
    }
}

impl Settings {
    /// The offending key (under `audit.`) and what it must be.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=100_000).contains(&self.checkpoint_every) {
            return Err((
                "audit.checkpoint_every",
                format!(
                    "must be between 1 and 100000 entries, got {}",
                    self.checkpoint_every
                ),
            ));
        }
        if self.retention_days < MIN_RETENTION_DAYS {
            return Err((
                "audit.retention_days",
                format!(
                    "must be at least {MIN_RETENTION_DAYS} (access logs are kept at least 2 years), got {}",
                    self.retention_days
                ),
            ));
        }
        Ok(())
    }

    /// The instant before which entries expire, as the log writes times.
    pub fn cutoff(&self, now: time::OffsetDateTime) -> String {
        (now - time::Duration::days(i64::from(self.retention_days)))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }
}

/// The actions a node records for what the coordinator sends it, and the
/// coordinator records sending: reconciliation matches on them, so both
/// sides take them from here.
pub mod action {
    pub const AGGREGATE: &str = "aggregate";
    pub const REVOKE: &str = "revoke";
    /// Step 3 of a training round, which releases the masked contribution.
    pub const MASKED_INPUT: &str = "round:masked-input";
    const ROUND: &str = "round:";
    /// A pooled query's first step: admitted, the vector computed, keys
    /// made.
    pub const POOLED: &str = "pooled";
    /// A pooled query's second step, which releases the masked vector.
    pub const POOLED_INPUT: &str = "pooled:masked-input";
    /// A resident's records (or disclosure history) sent, sealed, to the
    /// recipient they chose.
    pub const EXCHANGE: &str = "exchange";

    /// Step 1 of a training round in `phase` (moments, train, evaluate).
    pub fn round(phase: &str) -> String {
        format!("{ROUND}{phase}")
    }

    /// Whether a node records `action` for a request the coordinator sends.
    pub fn is_dispatched(action: &str) -> bool {
        action == AGGREGATE
            || action == REVOKE
            || action == EXCHANGE
            || action.starts_with(ROUND)
            || is_pooled(action)
    }

    /// Whether `action` is a step of a pooled query.
    pub fn is_pooled(action: &str) -> bool {
        action == POOLED || action == POOLED_INPUT
    }

    /// Whether `action` asks for data (a query or a training step).
    pub fn is_query(action: &str) -> bool {
        action == AGGREGATE || action.starts_with(ROUND) || is_pooled(action)
    }
}

/// A whole log as exported for the committee: the entries of a period, the
/// signed checkpoints, and who kept it. `ghx audit export --format chain`
/// writes it; verify and reconcile read it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LogExport {
    /// `ghx.audit/v1`.
    pub format: String,
    /// The keeper: a node id or `coordinator`.
    pub keeper: String,
    /// The keeper's certificate (PEM), whose key signs the checkpoints.
    pub certificate_pem: String,
    pub entries: Vec<Entry>,
    pub checkpoints: Vec<checkpoint::Checkpoint>,
    /// When the log was read (RFC 3339): heads of it that others hold are
    /// compared only if signed before this. Empty in exports from before.
    #[serde(default)]
    pub exported_at: String,
    /// The heads of other keepers' logs this keeper holds.
    #[serde(default)]
    pub witnessed: Vec<WitnessedHead>,
}

/// Another keeper's signed head, as a witness received it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WitnessedHead {
    /// Whose head it is (the token's `iss`): a node id or `coordinator`.
    pub keeper: String,
    /// The checkpoint token as received.
    pub token: String,
    /// The witness's clock, RFC 3339.
    pub received_at: String,
}

/// The `format` of a [`LogExport`].
pub const EXPORT_FORMAT: &str = "ghx.audit/v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_covers_every_field_and_the_link() {
        let mut e = Entry {
            action: "aggregate".into(),
            ..Entry::default()
        };
        e.chain(1, GENESIS);
        let base = e.hash.clone();
        assert_eq!(base.len(), 64);
        let variants: [fn(&mut Entry); 9] = [
            |e| e.seq = 2,
            |e| e.prev_hash = "1".repeat(64),
            |e| e.caller = "x".into(),
            |e| e.peer = "x".into(),
            |e| e.decision = "x".into(),
            |e| e.result_sha256 = "x".into(),
            |e| e.result_cells = 1,
            |e| e.consent_excluded = 1,
            |e| e.epsilon = 0.5,
        ];
        for change in variants {
            let mut changed = e.clone();
            change(&mut changed);
            assert_ne!(changed.compute_hash(), base);
        }
    }
}
