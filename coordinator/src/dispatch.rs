//! The coordinator's record of what it sent: one audit entry per request per
//! node, with the request digest, the capability and what came back. `ghx
//! audit reconcile` compares these entries with each node's own log.

use ghx_audit::{Decision, Entry};
use ghx_db::audit::{AuditLog, Error};
use ghx_study::result::{AggregateResult, NodeFailure};

use crate::fanout::node_decided;

/// One request as sent to every node it went to.
#[derive(Debug, Clone, Default)]
pub struct Sent<'a> {
    /// The action as the node records it (`ghx_audit::action`).
    pub action: &'a str,
    pub study_id: &'a str,
    pub capability_id: &'a str,
    /// Hex SHA-256 of the request as the node digests it.
    pub request_sha256: String,
    pub requester: &'a str,
    pub requester_org: &'a str,
    pub purpose: &'a str,
    /// Privacy budget each answering node charges for it.
    pub epsilon: f64,
}

/// What a node that answered sent back: nothing to digest (a revocation
/// acknowledged, keys advertised) or a release.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub result_sha256: String,
    pub cells: i64,
}

impl Answer {
    /// A node's released aggregate result.
    pub fn of_result(result: &AggregateResult) -> Self {
        Answer {
            result_sha256: result.digest(),
            cells: i64::try_from(result.cells.len()).unwrap_or(i64::MAX),
        }
    }

    /// A node's masked training contribution.
    pub fn of_masked(values: &[u64]) -> Self {
        Answer {
            result_sha256: ghx_audit::digest_words(values),
            cells: i64::try_from(values.len()).unwrap_or(i64::MAX),
        }
    }
}

/// Appends one entry per node, answered or failed, in one transaction.
pub fn record(
    log: &AuditLog,
    sent: &Sent<'_>,
    answered: impl IntoIterator<Item = (String, Answer)>,
    failures: &[NodeFailure],
) -> Result<(), Error> {
    log.append_all(&entries(sent, answered, failures))?;
    Ok(())
}

/// A write of entries started earlier, to be waited for before the next.
pub type Behind = tokio::task::JoinHandle<Result<(), Error>>;

/// As [`record`] for masked training contributions (node, values),
/// written by a blocking task started now, which also digests them (off
/// the round's path); a failed write is logged as well as returned, so it
/// is never lost unseen.
pub fn record_masked_behind(
    log: &AuditLog,
    sent: &Sent<'_>,
    answered: Vec<(String, Vec<u64>)>,
    failures: &[NodeFailure],
) -> Behind {
    let mut entries = entries(
        sent,
        answered
            .iter()
            .map(|(node, _)| (node.clone(), Answer::default())),
        failures,
    );
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        // Answered entries come first, in order.
        for (entry, (_, values)) in entries.iter_mut().zip(&answered) {
            let answer = Answer::of_masked(values);
            entry.result_sha256 = answer.result_sha256;
            entry.result_cells = answer.cells;
        }
        log.append_all(&entries).map(|_| ()).inspect_err(|e| {
            tracing::error!(error = %e, "the audit log could not record a round's requests");
        })
    })
}

/// One entry per node, answered or failed.
fn entries(
    sent: &Sent<'_>,
    answered: impl IntoIterator<Item = (String, Answer)>,
    failures: &[NodeFailure],
) -> Vec<Entry> {
    let at = ghx_audit::now_rfc3339();
    let entry = |node: &str, decision: Decision| Entry {
        at: at.clone(),
        caller: "coordinator".to_owned(),
        caller_role: "coordinator".to_owned(),
        requester: sent.requester.to_owned(),
        requester_org: sent.requester_org.to_owned(),
        study_id: sent.study_id.to_owned(),
        capability_id: sent.capability_id.to_owned(),
        action: sent.action.to_owned(),
        peer: node.to_owned(),
        decision: decision.into(),
        purpose: sent.purpose.to_owned(),
        query_sha256: sent.request_sha256.clone(),
        ..Entry::default()
    };
    let mut entries: Vec<Entry> = answered
        .into_iter()
        .map(|(node, answer)| Entry {
            result_sha256: answer.result_sha256,
            result_cells: answer.cells,
            epsilon: sent.epsilon,
            ..entry(&node, Decision::Answered)
        })
        .collect();
    entries.extend(failures.iter().map(|f| {
        let decision = if node_decided(&f.reason) {
            Decision::Refused
        } else {
            Decision::Failed
        };
        Entry {
            reason: f.reason.clone(),
            ..entry(&f.node_id, decision)
        }
    }));
    entries
}
