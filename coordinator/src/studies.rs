//! Studies, the steering committee's decisions on them, and their results.
//!
//! A study moves Submitted -> Approved (once a quorum of distinct committee
//! members approved) -> Revoked, or Submitted -> Rejected. Only an approved,
//! unrevoked study gets capabilities. Every step, including refused ones, is
//! appended to the audit log by the api (`CoordinatorApi::audited`) with who
//! did it and why.
//!
//! The book lives in the coordinator's database ([`crate::store`]), so a
//! restart loses nothing. Decisions are serialised in this process: a
//! coordinator runs as one process per federation.

use ghx_audit::now_rfc3339;
use std::sync::Mutex;

use ghx_study::manifest::StudyManifest;
use ghx_study::result::{AggregateResult, NodeFailure, Quantile, TotalCell};
use serde::{Deserialize, Serialize};

use crate::store::{self, CoordinatorStore, StudyRecord, VoteRecord};

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
    #[error("study `{0}` changed while this decision was made; try again")]
    Conflict(String),
    #[error("coordinator database: {0}")]
    Store(String),
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(e.to_string())
    }
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
    fn parse(name: &str) -> Result<Self, Error> {
        [
            StudyStatus::Submitted,
            StudyStatus::Approved,
            StudyStatus::Rejected,
            StudyStatus::Revoked,
        ]
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| Error::Store(format!("unknown study status `{name}`")))
    }

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
    pub decision: String,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyResult {
    pub query: String,
    pub dimensions: Vec<String>,
    pub per_node: Vec<AggregateResult>,
    pub failures: Vec<NodeFailure>,
    pub total: Vec<TotalCell>,
    /// Quantiles read off the combined histogram, for a histogram query.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantiles: Vec<Quantile>,
    /// Events per this many patients, for a rate query.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rate_per: u32,
    /// Set for a pooled release: `total` is the federation's table as
    /// disclosure control released it, and `per_node` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<PooledRelease>,
}

/// How a pooled table was made and released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PooledRelease {
    /// The hospitals whose cells are in the sum.
    pub contributors: Vec<String>,
    /// What was withheld and why, the noise and its accounting.
    pub notes: Vec<String>,
    pub noise: Option<ghx_study::result::NoiseStatement>,
    /// The cell size the table was held to.
    pub min_cell_size: u32,
    /// Set when each patient counted once across hospitals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkage: Option<PooledLinkage>,
}

/// How a pooled table counted each patient once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PooledLinkage {
    /// Slots of each count's bitmap.
    pub slots: u32,
    /// Patients without a linkage token, counted at each hospital that has
    /// them (noisy when the table is).
    pub unlinked: i64,
    /// Linear counting's standard error of the largest released cell, in
    /// patients.
    pub standard_error: f64,
    /// Exact tables: the unlinked count is below the cell size, not given.
    #[serde(default)]
    pub unlinked_withheld: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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

#[derive(Debug)]
pub struct StudyBook {
    committee: Committee,
    store: CoordinatorStore,
    /// Serialises read-check-write decisions.
    deciding: Mutex<()>,
}

fn study_of(record: StudyRecord) -> Result<Study, Error> {
    let manifest = StudyManifest::parse(record.manifest_json.as_bytes()).map_err(|e| {
        Error::Store(format!(
            "stored manifest of {} is unreadable: {e}",
            record.id
        ))
    })?;
    Ok(Study {
        status: StudyStatus::parse(&record.status)?,
        manifest,
        manifest_json: record.manifest_json.into_bytes(),
        submitted_at: record.submitted_at,
        last_run: record.last_run,
        votes: record
            .votes
            .into_iter()
            .map(|v| Vote {
                member: v.member,
                decision: v.decision,
                note: v.note,
                at: v.at,
            })
            .collect(),
        id: record.id,
    })
}

impl StudyBook {
    pub fn new(committee: Committee, store: CoordinatorStore) -> Self {
        StudyBook {
            committee,
            store,
            deciding: Mutex::new(()),
        }
    }

    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The database, for training runs.
    pub fn store(&self) -> &CoordinatorStore {
        &self.store
    }

    /// Records a new submitted study and returns its id. The manifest's
    /// requester must already be set from the caller's certificate.
    pub fn submit(&self, manifest: StudyManifest) -> Result<String, Error> {
        let json = String::from_utf8(manifest.canonical_json()).expect("JSON is UTF-8");
        Ok(self.store.insert_study(&json, &now_rfc3339())?)
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
        let _deciding = self.deciding.lock().unwrap_or_else(|e| e.into_inner());
        let study = self.get(id)?;
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
        let status = match decision {
            "approve" if study.approvals() + 1 >= self.committee.quorum => StudyStatus::Approved,
            "approve" => StudyStatus::Submitted,
            "reject" => StudyStatus::Rejected,
            _ => StudyStatus::Revoked,
        };
        let vote = VoteRecord {
            member: member.to_owned(),
            decision: decision.to_owned(),
            note: note.to_owned(),
            at: now_rfc3339(),
        };
        if !self
            .store
            .add_vote(id, &vote, study.status.name(), status.name())?
        {
            return Err(Error::Conflict(id.to_owned()));
        }
        self.get(id)
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
        let record = self
            .store
            .study(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        study_of(record)
    }

    pub fn list(&self) -> Result<Vec<Study>, Error> {
        self.store.studies()?.into_iter().map(study_of).collect()
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

    /// Whether study `id`, runnable when it was read, still is: only its
    /// status is read again (the manifest cannot change); the error is
    /// [`Self::runnable`]'s.
    pub fn still_runnable(&self, id: &str) -> Result<(), Error> {
        match self.store.study_status(id)?.as_deref() {
            Some(status) if status == StudyStatus::Approved.name() => Ok(()),
            _ => self.runnable(id).map(|_| ()),
        }
    }

    pub fn record_result(&self, id: &str, result: &StudyResult) -> Result<(), Error> {
        let json = serde_json::to_string(result).expect("results serialise");
        Ok(self
            .store
            .save_result(id, &result.query, &now_rfc3339(), &json)?)
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
        let json = self
            .store
            .result(id, &name)?
            .ok_or_else(|| Error::NoResult(id.to_owned()))?;
        serde_json::from_str(&json)
            .map_err(|e| Error::Store(format!("stored result of {id} is unreadable: {e}")))
    }
}
