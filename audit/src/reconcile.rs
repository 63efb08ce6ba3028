//! Reconciliation: the coordinator's record of every request it sent to each
//! node against each node's own record of what it answered.
//!
//! A request is identified by the node, the action, the request digest and
//! the capability it was made under; both sides record all four. A node entry
//! with no coordinator counterpart is an alarm: the node answered something
//! the coordinator never sent. A coordinator entry with no node counterpart
//! is an alarm when the coordinator got an answer (the node's log lost it)
//! and a warning when the request failed (it may never have arrived).

use std::collections::BTreeMap;

use crate::{Decision, Entry};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Alarm,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Alarm => "ALARM",
        }
    }
}

/// One mismatch between the coordinator's and a node's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub node: String,
    /// Which log the entry is in: `coordinator` or the node id.
    pub log: String,
    pub seq: i64,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} entry {}: {}",
            self.severity.name(),
            self.log,
            self.seq,
            self.what
        )
    }
}

/// The outcome of reconciling.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reconciliation {
    /// Requests both sides recorded alike.
    pub matched: usize,
    pub findings: Vec<Finding>,
    /// Nodes the coordinator sent requests to whose logs were not given.
    pub nodes_without_log: Vec<(String, usize)>,
}

impl Reconciliation {
    pub fn alarms(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Alarm)
            .count()
    }
}

/// Decisions under which the coordinator holds an answer from the node.
fn coordinator_got_answer(decision: &str) -> bool {
    matches!(
        Decision::parse(decision),
        Some(Decision::Answered | Decision::Refused)
    )
}

type Key = (String, String, String);

fn key(node: &str, e: &Entry) -> Key {
    (node.to_owned(), e.action.clone(), e.query_sha256.clone())
}

/// Reconciles the coordinator's entries against each `(node id, entries)`.
/// Both sides should already be limited to the same period.
pub fn reconcile(coordinator: &[Entry], nodes: &[(String, Vec<Entry>)]) -> Reconciliation {
    let mut out = Reconciliation::default();
    let given: std::collections::BTreeSet<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();

    // What the coordinator sent, by node, action and request digest; each
    // list in log order, consumed as node entries match.
    let mut sent: BTreeMap<Key, Vec<&Entry>> = BTreeMap::new();
    let mut without_log: BTreeMap<String, usize> = BTreeMap::new();
    for e in coordinator.iter().filter(|e| !e.peer.is_empty()) {
        if given.contains(e.peer.as_str()) {
            sent.entry(key(&e.peer, e)).or_default().push(e);
        } else {
            *without_log.entry(e.peer.clone()).or_default() += 1;
        }
    }
    out.nodes_without_log = without_log.into_iter().collect();

    for (node, entries) in nodes {
        for n in entries
            .iter()
            .filter(|e| crate::action::is_dispatched(&e.action))
        {
            let candidates = sent.get_mut(&key(node, n));
            // Same capability when the node read it; a request refused
            // before its capability was read matches on the digest alone.
            let position = candidates.as_ref().and_then(|c| {
                c.iter()
                    .position(|s| s.capability_id == n.capability_id)
                    .or_else(|| (n.capability_id.is_empty() && !c.is_empty()).then_some(0))
            });
            let Some(position) = position else {
                out.findings.push(Finding {
                    severity: Severity::Alarm,
                    node: node.clone(),
                    log: node.clone(),
                    seq: n.seq,
                    what: format!(
                        "{node} {} a {} request{} from {} the coordinator never sent",
                        n.decision,
                        n.action,
                        study_phrase(n),
                        n.caller
                    ),
                });
                continue;
            };
            let s = candidates
                .expect("a position implies candidates")
                .remove(position);
            if !s.result_sha256.is_empty()
                && !n.result_sha256.is_empty()
                && s.result_sha256 != n.result_sha256
            {
                out.findings.push(Finding {
                    severity: Severity::Alarm,
                    node: node.clone(),
                    log: node.clone(),
                    seq: n.seq,
                    what: format!(
                        "{node} released a different {} result{} than the coordinator received (coordinator entry {})",
                        n.action,
                        study_phrase(n),
                        s.seq
                    ),
                });
            } else {
                out.matched += 1;
            }
        }
    }

    let mut unanswered: Vec<&Entry> = sent.into_values().flatten().collect();
    unanswered.sort_by_key(|e| e.seq);
    for s in unanswered {
        let (severity, what) = if coordinator_got_answer(&s.decision) {
            (
                Severity::Alarm,
                format!(
                    "{} has no record of the {} request{} it answered ({})",
                    s.peer,
                    s.action,
                    study_phrase(s),
                    s.decision
                ),
            )
        } else {
            (
                Severity::Warning,
                format!(
                    "{} has no record of the {} request{}, which failed: {}",
                    s.peer,
                    s.action,
                    study_phrase(s),
                    s.reason
                ),
            )
        };
        out.findings.push(Finding {
            severity,
            node: s.peer.clone(),
            log: "coordinator".to_owned(),
            seq: s.seq,
            what,
        });
    }
    out.findings
        .sort_by(|a, b| b.severity.cmp(&a.severity).then(a.seq.cmp(&b.seq)));
    out
}

fn study_phrase(e: &Entry) -> String {
    match (e.study_id.as_str(), e.capability_id.as_str()) {
        ("", "") => String::new(),
        (study, "") => format!(" for study {study}"),
        ("", cap) => format!(" under capability {cap}"),
        (study, cap) => format!(" for study {study} under capability {cap}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(seq: i64, node: &str, cap: &str, decision: &str) -> Entry {
        Entry {
            seq,
            peer: node.into(),
            action: "aggregate".into(),
            capability_id: cap.into(),
            query_sha256: "q".into(),
            study_id: "s".into(),
            result_sha256: "r".into(),
            decision: decision.into(),
            ..Entry::default()
        }
    }

    fn answered(seq: i64, cap: &str) -> Entry {
        Entry {
            seq,
            caller: "coordinator".into(),
            action: "aggregate".into(),
            capability_id: cap.into(),
            query_sha256: "q".into(),
            study_id: "s".into(),
            result_sha256: "r".into(),
            decision: "answered".into(),
            ..Entry::default()
        }
    }

    #[test]
    fn matching_records_reconcile() {
        let coordinator = vec![
            sent(1, "chonnam", "c1", "answered"),
            sent(2, "chosun", "c1", "answered"),
        ];
        let nodes = vec![
            ("chonnam".to_owned(), vec![answered(1, "c1")]),
            ("chosun".to_owned(), vec![answered(1, "c1")]),
        ];
        let r = reconcile(&coordinator, &nodes);
        assert_eq!((r.matched, r.findings.len()), (2, 0), "{:?}", r.findings);
    }

    #[test]
    fn an_answer_the_coordinator_never_sent_is_an_alarm() {
        let coordinator = vec![sent(1, "chonnam", "c1", "answered")];
        let nodes = vec![(
            "chonnam".to_owned(),
            vec![answered(1, "c1"), answered(2, "c9")],
        )];
        let r = reconcile(&coordinator, &nodes);
        assert_eq!(r.alarms(), 1);
        assert_eq!(r.findings[0].log, "chonnam");
        assert_eq!(r.findings[0].seq, 2);
        assert!(
            r.findings[0].what.contains("never sent"),
            "{}",
            r.findings[0]
        );
    }

    #[test]
    fn lost_and_undelivered_requests_differ_in_severity() {
        let coordinator = vec![
            sent(1, "chonnam", "c1", "answered"),
            sent(2, "chonnam", "c2", "failed"),
        ];
        let nodes = vec![("chonnam".to_owned(), vec![])];
        let r = reconcile(&coordinator, &nodes);
        assert_eq!(r.findings.len(), 2);
        assert_eq!(
            (r.findings[0].severity, r.findings[0].seq),
            (Severity::Alarm, 1)
        );
        assert_eq!(
            (r.findings[1].severity, r.findings[1].seq),
            (Severity::Warning, 2)
        );
    }

    #[test]
    fn a_different_result_is_an_alarm_and_missing_logs_are_named() {
        let coordinator = vec![
            sent(1, "chonnam", "c1", "answered"),
            sent(2, "christian", "c1", "answered"),
        ];
        let mut changed = answered(1, "c1");
        changed.result_sha256 = "other".into();
        let nodes = vec![("chonnam".to_owned(), vec![changed])];
        let r = reconcile(&coordinator, &nodes);
        assert_eq!(r.alarms(), 1);
        assert!(r.findings[0].what.contains("different"));
        assert_eq!(r.nodes_without_log, vec![("christian".to_owned(), 1)]);
    }
}
