//! Studies and their approval state.
//!
//! A study moves Submitted -> Approved -> (run any number of times). Only an
//! approved study gets a capability. The book is in memory for now; durable
//! coordinator state is the subject of a later issue.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ghx_study::result::{AggregateResult, NodeFailure, TotalCell};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no study `{0}`")]
    NotFound(String),
    #[error("study `{0}` has not been approved by the steering committee")]
    NotApproved(String),
    #[error("study `{0}` is already approved")]
    AlreadyApproved(String),
    #[error("study `{0}` has no result yet; run it first")]
    NoResult(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StudyStatus {
    Submitted,
    Approved { by: String, note: String },
}

#[derive(Debug, Clone)]
pub struct Study {
    pub id: String,
    pub title: String,
    pub purpose: String,
    /// The requester's certificate name and organisation.
    pub requester: String,
    pub requester_org: String,
    /// Canonical query JSON, as the capability binds it.
    pub query_json: Vec<u8>,
    pub status: StudyStatus,
    pub result: Option<StudyResult>,
}

/// The combined answer of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyResult {
    pub dimensions: Vec<String>,
    pub per_node: Vec<AggregateResult>,
    pub failures: Vec<NodeFailure>,
    pub total: Vec<TotalCell>,
}

#[derive(Debug, Default)]
pub struct StudyBook {
    inner: Mutex<BTreeMap<String, Study>>,
}

impl StudyBook {
    /// Records a new submitted study and returns its id.
    pub fn submit(
        &self,
        title: &str,
        purpose: &str,
        requester: &str,
        requester_org: &str,
        query_json: Vec<u8>,
    ) -> String {
        let mut studies = self.inner.lock().expect("study book lock");
        let id = format!("study-{:04}", studies.len() + 1);
        studies.insert(
            id.clone(),
            Study {
                id: id.clone(),
                title: title.to_owned(),
                purpose: purpose.to_owned(),
                requester: requester.to_owned(),
                requester_org: requester_org.to_owned(),
                query_json,
                status: StudyStatus::Submitted,
                result: None,
            },
        );
        id
    }

    pub fn approve(&self, id: &str, by: &str, note: &str) -> Result<(), Error> {
        let mut studies = self.inner.lock().expect("study book lock");
        let study = studies
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if matches!(study.status, StudyStatus::Approved { .. }) {
            return Err(Error::AlreadyApproved(id.to_owned()));
        }
        study.status = StudyStatus::Approved {
            by: by.to_owned(),
            note: note.to_owned(),
        };
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Study, Error> {
        self.inner
            .lock()
            .expect("study book lock")
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_owned()))
    }

    /// The study, if it may be run now.
    pub fn runnable(&self, id: &str) -> Result<Study, Error> {
        let study = self.get(id)?;
        match study.status {
            StudyStatus::Approved { .. } => Ok(study),
            StudyStatus::Submitted => Err(Error::NotApproved(id.to_owned())),
        }
    }

    pub fn record_result(&self, id: &str, result: StudyResult) -> Result<(), Error> {
        let mut studies = self.inner.lock().expect("study book lock");
        let study = studies
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        study.result = Some(result);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_study_runs_only_after_approval_and_once_approved_stays_so() {
        let book = StudyBook::default();
        let id = book.submit("t", "research", "acme", "Acme", b"{}".to_vec());
        assert_eq!(
            book.runnable(&id).unwrap_err(),
            Error::NotApproved(id.clone())
        );
        book.approve(&id, "kim", "ok").unwrap();
        assert!(book.runnable(&id).is_ok());
        assert_eq!(
            book.approve(&id, "lee", "").unwrap_err(),
            Error::AlreadyApproved(id.clone())
        );
        assert_eq!(
            book.get("study-9999").unwrap_err(),
            Error::NotFound("study-9999".into())
        );
    }
}
