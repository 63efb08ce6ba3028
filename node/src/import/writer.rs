//! The import's single writer: collects validated resources into batches,
//! commits them in file order, and keeps the report of what happened.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use super::index::{Invalid, Validated};
use super::{Error, ImportOptions, ImportReport, Location, Progress, Rejection};
use crate::store::{Batch, Checkpoint, ResourceKey, Store};

/// Collects validated resources into batches and commits them in order.
pub(crate) struct Writer<'a> {
    pub(crate) store: &'a Store,
    pub(crate) options: &'a ImportOptions,
    pub(crate) started: Instant,
    pub(crate) batch: Batch,
    pub(crate) batch_keys: HashSet<(String, String)>,
    pub(crate) report: ImportReport,
    /// The file being imported.
    pub(crate) file: PathBuf,
    /// Inside a transaction Bundle: never split the batch.
    pub(crate) unbounded: bool,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(store: &'a Store, options: &'a ImportOptions) -> Self {
        Writer {
            store,
            options,
            started: Instant::now(),
            batch: Batch::default(),
            batch_keys: HashSet::new(),
            report: ImportReport::default(),
            file: PathBuf::new(),
            unbounded: false,
        }
    }

    pub(crate) fn reject(&mut self, location: Location, invalid: Invalid) {
        tracing::warn!(file = %self.file.display(), %location, reason = %invalid.reason, "resource rejected");
        self.report.rejected.push(Rejection {
            file: self.file.clone(),
            location,
            resource_type: invalid.resource_type,
            id: invalid.id,
            reason: invalid.reason,
        });
    }

    pub(crate) fn add(
        &mut self,
        validated: Validated,
        location: Location,
        checkpoint: &Checkpoint,
    ) -> Result<(), Error> {
        let r = &validated.indexed.resource;
        let note = |reason: String| Rejection {
            file: self.file.clone(),
            location: location.clone(),
            resource_type: Some(r.resource_type.clone()),
            id: Some(r.id.clone()),
            reason,
        };
        if !validated.rrn_stripped.is_empty() {
            let removed = note(format!(
                "resident registration number removed from {}",
                validated.rrn_stripped.join(", ")
            ));
            self.report.rrn_stripped.push(removed);
        }
        if !validated.let_through.is_empty() {
            let lenient = note(format!(
                "accepted by lenient mode: {}",
                super::conformance::reason(&validated.let_through)
            ));
            self.report.let_through.push(lenient);
        }
        for system in &validated.code_systems {
            *self
                .report
                .code_systems
                .entry((r.resource_type.clone(), system.clone()))
                .or_default() += 1;
        }
        let key = (r.resource_type.clone(), r.id.clone());
        self.make_room(&key, checkpoint)?;
        self.batch_keys.insert(key);
        self.batch.items.push(validated.indexed);
        Ok(())
    }

    pub(crate) fn delete(
        &mut self,
        key: ResourceKey,
        checkpoint: &Checkpoint,
    ) -> Result<(), Error> {
        let k = (key.resource_type.clone(), key.id.clone());
        self.make_room(&k, checkpoint)?;
        self.batch_keys.insert(k);
        self.batch.deletes.push(key);
        Ok(())
    }

    /// Flushes first if the batch is full, or already holds this resource (a
    /// second version in one batch would collide in the index tables).
    fn make_room(&mut self, key: &(String, String), checkpoint: &Checkpoint) -> Result<(), Error> {
        let full = !self.unbounded && self.batch.len() >= self.options.batch_size;
        if full || self.batch_keys.contains(key) {
            let cp = (!checkpoint.source.is_empty()).then_some(checkpoint);
            self.flush(cp)?;
        }
        Ok(())
    }

    /// Drops what is pending (a file that failed part way).
    pub(crate) fn discard(&mut self) {
        self.batch = Batch::default();
        self.batch_keys.clear();
        self.unbounded = false;
    }

    pub(crate) fn flush(&mut self, checkpoint: Option<&Checkpoint>) -> Result<(), Error> {
        if self.batch.is_empty() && checkpoint.is_none() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.batch_keys.clear();
        batch.checkpoint = checkpoint.cloned();
        let outcome = self
            .store
            .write_batch(&batch)
            .map_err(|source| Error::Store {
                committed: self.report.accepted,
                source,
            })?;
        self.report.accepted += outcome.created + outcome.updated + outcome.unchanged;
        self.report.outcome += outcome;
        if !batch.is_empty() {
            self.report.batches += 1;
        }
        if let Some(progress) = &self.options.progress {
            progress(&Progress {
                file: self.file.clone(),
                accepted: self.report.accepted,
                rejected: self.report.rejected.len() as u64,
                elapsed: self.started.elapsed(),
            });
        }
        Ok(())
    }
}
