//! The coordinator's record of what it sent: one audit entry per request per
//! node, with the request digest, the capability and what came back. `ghx
//! audit reconcile` compares these entries with each node's own log.

use ghx_audit::{ANSWERED, Entry, REFUSED};
use ghx_db::audit::{AuditLog, Error};
use ghx_study::result::NodeFailure;

/// One request as sent to every node it went to.
#[derive(Debug, Clone, Default)]
pub struct Sent<'a> {
    /// The action as the node records it: `aggregate`, `revoke`,
    /// `round:<phase>`, `round:masked-input`.
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

/// What one node did with it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// It answered; the digest of what it released and how many cells.
    Answered { result_sha256: String, cells: i64 },
    /// It did not answer, or answered with an error.
    Failed(NodeFailure),
}

/// Whether a failure reason (as `fanout::describe` words it) means the node
/// received and decided the request, rather than never answering.
fn node_decided(reason: &str) -> bool {
    !(reason.starts_with("unreachable")
        || reason.starts_with("no answer within")
        || reason.starts_with("deadline exceeded"))
}

/// Appends one entry per node, in one transaction.
pub fn record(
    log: &AuditLog,
    sent: &Sent<'_>,
    outcomes: &[(String, Outcome)],
) -> Result<(), Error> {
    let at = ghx_audit::now_rfc3339();
    let entries: Vec<Entry> = outcomes
        .iter()
        .map(|(node, outcome)| {
            let (decision, reason, result_sha256, result_cells, epsilon) = match outcome {
                Outcome::Answered {
                    result_sha256,
                    cells,
                } => (
                    ANSWERED,
                    String::new(),
                    result_sha256.clone(),
                    *cells,
                    sent.epsilon,
                ),
                Outcome::Failed(f) if node_decided(&f.reason) => {
                    (REFUSED, f.reason.clone(), String::new(), 0, 0.0)
                }
                Outcome::Failed(f) => ("failed", f.reason.clone(), String::new(), 0, 0.0),
            };
            Entry {
                at: at.clone(),
                caller: "coordinator".to_owned(),
                caller_role: "coordinator".to_owned(),
                requester: sent.requester.to_owned(),
                requester_org: sent.requester_org.to_owned(),
                study_id: sent.study_id.to_owned(),
                capability_id: sent.capability_id.to_owned(),
                action: sent.action.to_owned(),
                peer: node.clone(),
                decision: decision.to_owned(),
                reason,
                purpose: sent.purpose.to_owned(),
                query_sha256: sent.request_sha256.clone(),
                result_sha256,
                result_cells,
                epsilon,
                ..Entry::default()
            }
        })
        .collect();
    log.append_all(&entries)?;
    Ok(())
}
