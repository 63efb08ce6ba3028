//! Driving runs: each run's steps one after another on its own task, the
//! run's state saved after each (while the next computes), runs a restart
//! left running resumed, and the run's outcome audited.
//!
//! The driver asks its [`Host`] (the coordinator's api) for the studies,
//! what a round runs with and the audit log, so it depends on nothing
//! above it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use ghx_audit::{Decision, Entry, now_rfc3339};
use ghx_db::audit::AuditLog;
use ghx_study::training::TrainingSpec;

use super::protocol::Federation;
use super::record::{RunStatus, TrainingRecord};
use super::run::{Pipeline, advance};
use crate::store::{CoordinatorStore, TrainingRunRow};
use crate::studies::{self, Study, StudyBook};

/// Why a run could not be started, loaded, saved or stepped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Study(#[from] studies::Error),
    #[error(transparent)]
    Training(#[from] super::Error),
    #[error("no training run `{0}`")]
    NoSuchRun(String),
    #[error("study `{id}` has no training named `{name}`")]
    NoSuchTraining { id: String, name: String },
}

/// What the driver needs from the process it runs in.
pub trait Host: Clone + Send + Sync + 'static {
    fn studies(&self) -> &StudyBook;
    /// What a round of `spec` in `study` runs with.
    fn federation<'a>(
        &'a self,
        study: &'a Study,
        spec: &'a TrainingSpec,
        run: Option<&'a str>,
    ) -> Federation<'a>;
    fn audit(&self) -> &AuditLog;
    /// The runs this process drives.
    fn driving(&self) -> &Mutex<BTreeSet<String>>;
}

fn store_error(e: impl Into<studies::Error>) -> Error {
    Error::Study(e.into())
}

/// What stores `record` (its rounds from `saved` on; those before are
/// stored already) as it is now: the state is read at once, the writing is
/// left to the caller (so a driver can write while the next round
/// computes). Each round is its own row, so a save costs the same at round
/// 1000 as at round 1.
pub fn saver(
    store: &CoordinatorStore,
    record: &mut TrainingRecord,
    saved: usize,
) -> impl FnOnce() -> Result<(), Error> + Send + 'static {
    let rounds = std::mem::take(&mut record.rounds);
    let state = serde_json::to_string(&*record).expect("records serialize");
    record.rounds = rounds;
    let new_rounds: Vec<(u32, String)> = record.rounds[saved.min(record.rounds.len())..]
        .iter()
        .map(|r| (r.round, serde_json::to_string(r).expect("rounds serialize")))
        .collect();
    let row = TrainingRunRow {
        id: record.run_id.clone(),
        study_id: record.study_id.clone(),
        training: record.training.clone(),
        status: record.status.name().to_owned(),
        record_json: state,
        updated_at: now_rfc3339(),
    };
    let store = store.clone();
    move || {
        store
            .save_training_run(&row, &new_rounds)
            .map_err(store_error)
    }
}

/// A stored training run.
pub fn load(store: &CoordinatorStore, run_id: &str) -> Result<TrainingRecord, Error> {
    let row = store
        .training_run(run_id)
        .map_err(store_error)?
        .ok_or_else(|| Error::NoSuchRun(run_id.to_owned()))?;
    let unreadable = |e: serde_json::Error| {
        Error::Study(studies::Error::Store(format!(
            "stored training run {run_id} is unreadable: {e}"
        )))
    };
    let mut record: TrainingRecord = serde_json::from_str(&row.record_json).map_err(unreadable)?;
    let rounds = store.training_rounds(run_id).map_err(store_error)?;
    // A run saved before rounds had rows of their own keeps them in its
    // record until it is saved again.
    if !rounds.is_empty() {
        record.rounds = rounds
            .iter()
            .map(|r| serde_json::from_str(r))
            .collect::<Result<_, _>>()
            .map_err(unreadable)?;
    }
    Ok(record)
}

/// Resumes every run a previous coordinator process left running, from
/// its last completed round. Returns the runs resumed.
pub fn resume(host: &impl Host) -> Result<Vec<String>, Error> {
    let store = host.studies().store();
    let rows = store
        .training_runs(Some(RunStatus::Running.name()))
        .map_err(store_error)?;
    let mut resumed = Vec::new();
    for row in rows {
        let mut record = load(store, &row.id)?;
        record.resumed += 1;
        tracing::info!(run = %record.run_id, rounds_done = record.rounds.len(), "resuming training run");
        resumed.push(record.run_id.clone());
        spawn(host, record);
    }
    Ok(resumed)
}

/// Drives `record` on its own task, unless this process drives it already.
pub fn spawn(host: &impl Host, record: TrainingRecord) {
    let mut driving = host.driving().lock().unwrap_or_else(|e| e.into_inner());
    if !driving.insert(record.run_id.clone()) {
        return;
    }
    let host = host.clone();
    tokio::spawn(async move {
        let run_id = record.run_id.clone();
        drive(&host, record).await;
        host.driving()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&run_id);
    });
}

/// The study and training a run's next step runs with: `known` (whose
/// approval [`still_approved`] checks while the step runs), else read and
/// checked.
fn still_running(
    studies: &StudyBook,
    record: &TrainingRecord,
    known: Option<(Study, TrainingSpec)>,
) -> Result<(Study, TrainingSpec), Error> {
    if let Some(known) = known {
        return Ok(known);
    }
    let study = studies.runnable(&record.study_id)?;
    let spec = study
        .manifest
        .training_named(&record.training)
        .cloned()
        .ok_or_else(|| Error::NoSuchTraining {
            id: record.study_id.clone(),
            name: record.training.clone(),
        })?;
    Ok((study, spec))
}

/// Checks on the blocking pool that study `id` is still approved, while a
/// step of its run computes: off the rounds' path (with PostgreSQL the
/// check is a round trip to the database). A revocation that lands during
/// a step stops the run with that step, whose outcome is not kept; the
/// nodes, told at once, refuse the study's capabilities themselves
/// meanwhile.
fn still_approved(host: &impl Host, id: &str) -> tokio::task::JoinHandle<Result<(), Error>> {
    let host = host.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || Ok(host.studies().still_runnable(&id)?))
}

/// The outcome of a run's blocking task (its state saved, its study's
/// approval checked); `doing` names it in the error.
async fn joined(
    task: tokio::task::JoinHandle<Result<(), Error>>,
    doing: &str,
) -> Result<(), Error> {
    task.await.unwrap_or_else(|e| {
        Err(Error::Study(studies::Error::Store(format!(
            "the task {doing} failed: {e}"
        ))))
    })
}

/// Runs rounds until the run completes or fails, saving after each: a
/// round's state is written while the next round computes (off the
/// rounds' critical path), and that write must succeed before the next
/// round's state is taken; the last state is written before the run is
/// reported done. A restart resumes from the last round written.
async fn drive(host: &impl Host, mut record: TrainingRecord) {
    let mut pipeline = Pipeline::default();
    let run_id = record.run_id.clone();
    let store = host.studies().store().clone();
    // Rounds stored as of the last save (a resumed run's first save stores
    // its rounds again, where a run saved before rounds had rows of their
    // own keeps them).
    let mut saved = 0;
    // The study and training, read once; every step checks the study is
    // still approved (a revoked study stops its runs), while it runs.
    let mut running: Option<(Study, TrainingSpec)> = None;
    // The write of the last round's state, while this round computes.
    let mut writing: Option<tokio::task::JoinHandle<Result<(), Error>>> = None;
    loop {
        // The first step reads the study; later ones check it meanwhile.
        let check = running
            .as_ref()
            .map(|(study, _)| still_approved(host, &study.id));
        let step = match still_running(host.studies(), &record, running.take()) {
            Ok((study, spec)) => {
                let before = check.is_some().then(|| record.before_step());
                let advanced = {
                    let fed = host.federation(&study, &spec, Some(&run_id));
                    advance(&fed, &mut record, &mut pipeline).await
                };
                running = Some((study, spec));
                let checked = match check {
                    Some(check) => joined(check, "checking the study is still approved").await,
                    None => Ok(()),
                };
                // A step of a study revoked meanwhile is not kept: its
                // round, model or evaluation never reaches the requester. A
                // failed check also explains a step the nodes refused.
                if checked.is_err()
                    && let Some(before) = before
                {
                    record.undo_step(before);
                }
                checked.and(advanced.map_err(Error::from))
            }
            Err(e) => Err(e),
        };
        if let Some(write) = writing.take()
            && let Err(e) = joined(write, "saving a training run").await
        {
            tracing::error!(run = %record.run_id, error = %e, "cannot save training run; stopping it");
            return;
        }
        match step {
            Ok(true) => {
                if let Some(r) = record.rounds.last() {
                    tracing::info!(run = %record.run_id, round = r.round, rows = r.train_rows, "training round done");
                }
            }
            Ok(false) => return,
            Err(e) => {
                record.status = RunStatus::Failed;
                record.detail = e.to_string();
            }
        }
        // The next round's time starts here: reading the state to save is
        // part of every round's cost; writing it overlaps the next.
        pipeline.mark();
        let save = saver(&store, &mut record, saved);
        saved = record.rounds.len();
        let write = tokio::task::spawn_blocking(save);
        if record.status == RunStatus::Running {
            writing = Some(write);
            continue;
        }
        if let Err(e) = joined(write, "saving a training run").await {
            tracing::error!(run = %record.run_id, error = %e, "cannot save training run; stopping it");
            return;
        }
        let outcome = if record.status == RunStatus::Completed {
            Decision::Done
        } else {
            Decision::Refused
        };
        let _ = host.audit().append(&Entry {
            at: now_rfc3339(),
            caller: "coordinator".to_owned(),
            caller_role: "coordinator".to_owned(),
            action: "training".to_owned(),
            study_id: record.study_id.clone(),
            decision: outcome.into(),
            reason: format!(
                "run {} of {}: {} of {} rounds; {}",
                record.run_id,
                record.training,
                record.rounds.len(),
                record.rounds_total,
                if record.detail.is_empty() {
                    record.status.name().to_owned()
                } else {
                    record.detail.clone()
                }
            ),
            ..Entry::default()
        });
        return;
    }
}
