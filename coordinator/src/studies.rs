//! Studies, the steering committee's decisions on them, their results, and
//! the coordinator's audit trail of every step.
//!
//! A study moves Submitted -> Approved (once a quorum of distinct committee
//! members approved) -> Revoked, or Submitted -> Rejected. Only an approved,
//! unrevoked study gets capabilities. Every step, including refused ones, is
//! appended to the audit trail with who did it and why.
//!
//! The book is in memory: a coordinator restart forgets studies (durable
//! state in diesel is the remaining part of issue 5).

use std::collections::BTreeMap;
use std::sync::Mutex;

use ghx_study::manifest::StudyManifest;
use ghx_study::result::{AggregateResult, NodeFailure, TotalCell};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no study `{0}`")]
    NotFound(String),
    #[error("study `{id}` is {status}; {action} needs a {needed} study")]
    WrongState {
        id: String,
        status: &'static str,
        action: &'static str,
        needed: &'static str,
    },
    #[error("study `{0}` is not approved yet: it has {1} of the {2} approvals it needs")]
    AwaitingQuorum(String, usize, usize),
    #[error("`{member}` has already voted on study `{id}`")]
    AlreadyVoted { id: String, member: String },
    #[error("`{0}` is not a member of the steering committee in the coordinator's configuration")]
    NotAMember(String),
    #[error("a {0} needs a reason")]
    NoReason(&'static str),
    #[error("study `{0}` has no result yet; run it first")]
    NoResult(String),
    #[error("study `{id}` has no query named `{name}`")]
    NoSuchQuery { id: String, name: String },
}

/// Where a study stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StudyStatus {
    Submitted,
    Approved,
    Rejected,
    Revoked,
}

impl StudyStatus {
    pub fn name(self) -> &'static str {
        match self {
            StudyStatus::Submitted => "submitted",
            StudyStatus::Approved => "approved",
            StudyStatus::Rejected => "rejected",
            StudyStatus::Revoked => "revoked",
        }
    }
}

/// One committee member's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    pub member: String,
    /// approve, reject or revoke.
    pub decision: &'static str,
    pub note: String,
    pub at: String,
}

#[derive(Debug, Clone)]
pub struct Study {
    pub id: String,
    pub manifest: StudyManifest,
    /// Canonical manifest JSON, as capabilities bind it.
    pub manifest_json: Vec<u8>,
    pub submitted_at: String,
    pub status: StudyStatus,
    pub votes: Vec<Vote>,
    /// Latest result per manifest query.
    pub results: BTreeMap<String, StudyResult>,
    /// The query run last.
    pub last_run: Option<String>,
}

impl Study {
    pub fn requester(&self) -> &str {
        &self.manifest.requester.user
    }

    fn approvals(&self) -> usize {
        self.votes
            .iter()
            .filter(|v| v.decision == "approve")
            .count()
    }
}

/// The combined answer of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyResult {
    pub query: String,
    pub dimensions: Vec<String>,
    pub per_node: Vec<AggregateResult>,
    pub failures: Vec<NodeFailure>,
    pub total: Vec<TotalCell>,
}

/// One line of the coordinator's audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: String,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub study_id: String,
    /// "done" or "refused".
    pub outcome: String,
    pub detail: String,
}

/// Who may decide, and how many must approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committee {
    /// Approvals needed (m of n).
    pub quorum: usize,
    /// The members (certificate names); empty means any holder of a
    /// committee certificate.
    pub members: Vec<String>,
}

impl Default for Committee {
    fn default() -> Self {
        Committee {
            quorum: 1,
            members: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Book {
    studies: BTreeMap<String, Study>,
    audit: Vec<AuditRecord>,
}

#[derive(Debug, Default)]
pub struct StudyBook {
    committee: Committee,
    inner: Mutex<Book>,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of now")
}

impl StudyBook {
    pub fn new(committee: Committee) -> Self {
        StudyBook {
            committee,
            inner: Mutex::default(),
        }
    }

    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends to the audit trail.
    pub fn audit(&self, record: AuditRecord) {
        self.lock().audit.push(record);
    }

    /// The whole audit trail, oldest first.
    pub fn audit_trail(&self) -> Vec<AuditRecord> {
        self.lock().audit.clone()
    }

    /// Records a new submitted study and returns its id. The manifest's
    /// requester must already be set from the caller's certificate.
    pub fn submit(&self, manifest: StudyManifest) -> String {
        let mut book = self.lock();
        let id = format!("study-{:04}", book.studies.len() + 1);
        let manifest_json = manifest.canonical_json();
        book.studies.insert(
            id.clone(),
            Study {
                id: id.clone(),
                manifest,
                manifest_json,
                submitted_at: now_rfc3339(),
                status: StudyStatus::Submitted,
                votes: Vec::new(),
                results: BTreeMap::new(),
                last_run: None,
            },
        );
        id
    }

    fn decide(
        &self,
        id: &str,
        member: &str,
        decision: &'static str,
        note: &str,
    ) -> Result<Study, Error> {
        if !self.committee.members.is_empty() && !self.committee.members.iter().any(|m| m == member)
        {
            return Err(Error::NotAMember(member.to_owned()));
        }
        let mut book = self.lock();
        let study = book
            .studies
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let (needed, name) = match decision {
            "revoke" => (StudyStatus::Approved, "approved"),
            _ => (StudyStatus::Submitted, "submitted"),
        };
        if study.status != needed {
            return Err(Error::WrongState {
                id: id.to_owned(),
                status: study.status.name(),
                action: decision,
                needed: name,
            });
        }
        if decision == "approve" && study.votes.iter().any(|v| v.member == member) {
            return Err(Error::AlreadyVoted {
                id: id.to_owned(),
                member: member.to_owned(),
            });
        }
        study.votes.push(Vote {
            member: member.to_owned(),
            decision,
            note: note.to_owned(),
            at: now_rfc3339(),
        });
        study.status = match decision {
            "approve" if study.approvals() >= self.committee.quorum => StudyStatus::Approved,
            "approve" => StudyStatus::Submitted,
            "reject" => StudyStatus::Rejected,
            _ => StudyStatus::Revoked,
        };
        Ok(study.clone())
    }

    /// One member's approval; the study is approved at quorum.
    pub fn approve(&self, id: &str, member: &str, note: &str) -> Result<Study, Error> {
        self.decide(id, member, "approve", note)
    }

    pub fn reject(&self, id: &str, member: &str, reason: &str) -> Result<Study, Error> {
        if reason.trim().is_empty() {
            return Err(Error::NoReason("rejection"));
        }
        self.decide(id, member, "reject", reason)
    }

    pub fn revoke(&self, id: &str, member: &str, reason: &str) -> Result<Study, Error> {
        if reason.trim().is_empty() {
            return Err(Error::NoReason("revocation"));
        }
        self.decide(id, member, "revoke", reason)
    }

    pub fn get(&self, id: &str) -> Result<Study, Error> {
        self.lock()
            .studies
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    pub fn list(&self) -> Vec<Study> {
        self.lock().studies.values().cloned().collect()
    }

    /// The study, if it may be run now.
    pub fn runnable(&self, id: &str) -> Result<Study, Error> {
        let study = self.get(id)?;
        match study.status {
            StudyStatus::Approved => Ok(study),
            StudyStatus::Submitted => Err(Error::AwaitingQuorum(
                id.to_owned(),
                study.approvals(),
                self.committee.quorum,
            )),
            other => Err(Error::WrongState {
                id: id.to_owned(),
                status: other.name(),
                action: "running",
                needed: "approved",
            }),
        }
    }

    pub fn record_result(&self, id: &str, result: StudyResult) -> Result<(), Error> {
        let mut book = self.lock();
        let study = book
            .studies
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        study.last_run = Some(result.query.clone());
        study.results.insert(result.query.clone(), result);
        Ok(())
    }

    /// The latest result of `query`, or of the last run when `query` is empty.
    pub fn result(&self, id: &str, query: &str) -> Result<StudyResult, Error> {
        let study = self.get(id)?;
        let name = if query.is_empty() {
            study
                .last_run
                .clone()
                .ok_or_else(|| Error::NoResult(id.to_owned()))?
        } else {
            if study.manifest.query_named(query).is_none() {
                return Err(Error::NoSuchQuery {
                    id: id.to_owned(),
                    name: query.to_owned(),
                });
            }
            query.to_owned()
        };
        study
            .results
            .get(&name)
            .cloned()
            .ok_or_else(|| Error::NoResult(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> StudyManifest {
        let mut m =
            StudyManifest::parse(include_str!("../../deploy/examples/study-e11.json").as_bytes())
                .unwrap();
        m.requester.user = "alice".into();
        m.requester.organisation = "Acme".into();
        m
    }

    #[test]
    fn a_study_needs_a_quorum_of_distinct_members_then_can_be_revoked() {
        let book = StudyBook::new(Committee {
            quorum: 2,
            members: vec!["kim".into(), "lee".into(), "park".into()],
        });
        let id = book.submit(manifest());
        assert_eq!(
            book.runnable(&id).unwrap_err(),
            Error::AwaitingQuorum(id.clone(), 0, 2)
        );
        assert_eq!(
            book.approve(&id, "mallory", "").unwrap_err(),
            Error::NotAMember("mallory".into())
        );
        assert_eq!(
            book.approve(&id, "kim", "ok").unwrap().status,
            StudyStatus::Submitted
        );
        assert_eq!(
            book.approve(&id, "kim", "again").unwrap_err(),
            Error::AlreadyVoted {
                id: id.clone(),
                member: "kim".into()
            }
        );
        assert_eq!(
            book.runnable(&id).unwrap_err(),
            Error::AwaitingQuorum(id.clone(), 1, 2)
        );
        assert_eq!(
            book.approve(&id, "lee", "").unwrap().status,
            StudyStatus::Approved
        );
        assert!(book.runnable(&id).is_ok());
        assert_eq!(
            book.revoke(&id, "park", " ").unwrap_err(),
            Error::NoReason("revocation")
        );
        let revoked = book
            .revoke(&id, "park", "consent form was withdrawn")
            .unwrap();
        assert_eq!(revoked.status, StudyStatus::Revoked);
        assert!(matches!(
            book.runnable(&id).unwrap_err(),
            Error::WrongState {
                status: "revoked",
                ..
            }
        ));
        assert_eq!(revoked.votes.len(), 3);
    }

    #[test]
    fn a_rejected_study_cannot_be_approved_later() {
        let book = StudyBook::default();
        let id = book.submit(manifest());
        book.reject(&id, "kim", "no IRB approval for this purpose")
            .unwrap();
        assert!(matches!(
            book.approve(&id, "lee", "").unwrap_err(),
            Error::WrongState {
                status: "rejected",
                ..
            }
        ));
        assert_eq!(
            book.get("study-9999").unwrap_err(),
            Error::NotFound("study-9999".into())
        );
    }
}
