//! Importing EHR exports: FHIR bulk NDJSON and Bundles, plain or gzip, from
//! a file or a directory.
//!
//! Every resource is validated by deserializing it into its fhir-model R4
//! type (fhir-model's R4B module; the resources the node indexes have the same
//! shape in R4 and R4B) and screened for resident registration numbers. A
//! resource that fails is reported with its file, line or entry, id and
//! reason, and skipped.
//!
//! Key decisions:
//! - Parsing runs on worker threads while one writer commits batches in file
//!   order, so throughput uses every core and the result is the same as a
//!   sequential import.
//! - Each batch is one transaction that also records how far its file got
//!   (`import_checkpoints`). A killed import leaves no half batch, and the next
//!   import of the same file resumes after the last committed line.
//! - Re-importing an unchanged resource changes nothing (content hash);
//!   a changed one gets a new version, the old one is kept in history.
//!   A transaction Bundle is all-or-nothing, as FHIR defines it.
//! - Reasons are redacted so that no value from a resource (a name, a date)
//!   appears in a report or a log.

pub(crate) mod index;
pub mod rrn;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub use rrn::RrnPolicy;

use crate::store::{self, Batch, BatchOutcome, Checkpoint, CodeMapping, ResourceKey, Store};
use crate::terminology::{self, HIRA_EDI, LOINC};
use index::{Head, IndexContext, Invalid, Validated, index_resource, redact};

/// An import that could not proceed at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an NDJSON file or a FHIR Bundle/resource JSON file (expected .ndjson, .json, optionally .gz)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("writing a batch failed after {committed} resources were committed: {source}")]
    Store {
        committed: u64,
        source: store::Error,
    },
    #[error("{path} line {line}: {problem}")]
    CodeMap {
        path: PathBuf,
        line: u64,
        problem: String,
    },
}

/// Where in its file a rejected resource was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of an NDJSON file.
    Line(u64),
    /// 0-based entry index of a Bundle.
    Entry(usize),
    /// The file as a whole (a file that is a single resource or a bad Bundle).
    File,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Entry(n) => write!(f, "entry {n}"),
            Location::File => f.write_str("file"),
        }
    }
}

/// A resource that was not imported, or a warning about one that was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub file: PathBuf,
    pub location: Location,
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.location)?;
        if let Some(ty) = &self.resource_type {
            write!(f, " {ty}")?;
            if let Some(id) = &self.id {
                write!(f, "/{id}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub files: usize,
    /// Valid resources now stored (created, updated or already identical).
    pub accepted: u64,
    pub outcome: BatchOutcome,
    pub batches: u64,
    pub rejected: Vec<Rejection>,
    /// Resources stored after their RRN identifiers were removed.
    pub rrn_stripped: Vec<Rejection>,
    /// Lines skipped because an earlier, interrupted import committed them.
    pub resumed_lines: u64,
}

/// Progress after each committed batch, for a progress display.
#[derive(Debug, Clone)]
pub struct Progress {
    pub file: PathBuf,
    pub accepted: u64,
    pub rejected: u64,
    pub elapsed: Duration,
}

pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How an import runs.
#[derive(Clone)]
pub struct ImportOptions {
    /// Resources per transaction.
    pub batch_size: usize,
    /// Parser threads; the writer runs on the calling thread.
    pub workers: usize,
    pub rrn: RrnPolicy,
    /// Continue an interrupted import of the same file where it stopped.
    pub resume: bool,
    pub progress: Option<ProgressFn>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            batch_size: 2000,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            rrn: RrnPolicy::Strip,
            resume: true,
            progress: None,
        }
    }
}

impl std::fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("batch_size", &self.batch_size)
            .field("workers", &self.workers)
            .field("rrn", &self.rrn)
            .field("resume", &self.resume)
            .finish_non_exhaustive()
    }
}

const EXTENSIONS: [&str; 4] = [".ndjson", ".ndjson.gz", ".json", ".json.gz"];

fn is_import_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    EXTENSIONS.iter().any(|e| name.ends_with(e))
}

/// Imports a file, or every `.ndjson`, `.json` (and `.gz`) file of a
/// directory in name order.
pub fn import_path(
    store: &Store,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(read_err)? {
            let p = entry.map_err(read_err)?.path();
            if p.is_file() && is_import_file(&p) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let code_map = store.code_map().map_err(|source| Error::Store {
        committed: 0,
        source,
    })?;
    let mut ctx = IndexContext {
        rrn: options.rrn,
        imported_at: time::OffsetDateTime::now_utc().unix_timestamp(),
        ..IndexContext::default()
    };
    for m in code_map.into_iter().filter(|m| m.target_system == LOINC) {
        ctx.to_loinc
            .entry((m.source_system, m.source_code))
            .or_default()
            .push(m.target_code);
    }
    let mut writer = Writer {
        store,
        options,
        started: Instant::now(),
        batch: Batch::default(),
        batch_keys: HashSet::new(),
        report: ImportReport::default(),
        file: PathBuf::new(),
        unbounded: false,
    };
    for file in &files {
        writer.file = file.clone();
        let name = file.to_string_lossy();
        if name.ends_with(".ndjson") || name.ends_with(".ndjson.gz") {
            import_ndjson(&mut writer, &ctx, file)?;
        } else if name.ends_with(".json") || name.ends_with(".json.gz") {
            let mut text = String::new();
            open(file)?
                .read_to_string(&mut text)
                .map_err(|source| Error::Read {
                    path: file.clone(),
                    source,
                })?;
            import_json_document(&mut writer, &ctx, &text)?;
            writer.flush(None)?;
        } else {
            return Err(Error::UnknownFormat { path: file.clone() });
        }
        writer.report.files += 1;
    }
    Ok(writer.report)
}

/// Opens a file, decompressing `.gz` transparently.
fn open(path: &Path) -> Result<Box<dyn Read + Send>, Error> {
    let file = File::open(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 16, file),
        )))
    } else {
        Ok(Box::new(file))
    }
}

/// Identifies a file's content cheaply: its size and the hash of its first
/// 64 KiB. A different export under the same name is not resumed.
fn fingerprint(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    let mut head = Vec::with_capacity(1 << 16);
    File::open(path)
        .and_then(|f| f.take(1 << 16).read_to_end(&mut head))
        .map_err(read_err)?;
    Ok(format!("{len}:{}", hex::encode(Sha256::digest(&head))))
}

/// Lines read for a worker: a sequence number and (line number, text) pairs.
type RawChunk = (u64, Vec<(u64, String)>);

/// Lines parsed by a worker: (line number, outcome), in file order.
type ParsedChunk = Vec<(u64, Result<Validated, Invalid>)>;

const CHUNK_LINES: usize = 256;

fn import_ndjson(writer: &mut Writer<'_>, ctx: &IndexContext, path: &Path) -> Result<(), Error> {
    let source = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_owned())
        .to_string_lossy()
        .into_owned();
    let fingerprint = fingerprint(path)?;
    let previous = writer
        .store
        .checkpoint(&source)
        .map_err(|source| Error::Store {
            committed: writer.report.accepted,
            source,
        })?;
    let skip = match previous {
        Some(cp) if writer.options.resume && cp.fingerprint == fingerprint && !cp.finished => {
            cp.lines_committed.max(0) as u64
        }
        _ => 0,
    };
    writer.report.resumed_lines += skip;
    let reader = BufReader::with_capacity(1 << 16, open(path)?);
    let workers = writer.options.workers.max(1);
    let read_error: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let mut checkpoint = Checkpoint {
        source,
        fingerprint,
        lines_committed: skip as i64,
        finished: false,
    };

    std::thread::scope(|scope| -> Result<(), Error> {
        let (work_tx, work_rx): (SyncSender<RawChunk>, Receiver<RawChunk>) =
            sync_channel(workers * 4);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, done_rx) = sync_channel::<(u64, ParsedChunk)>(workers * 4);
        let read_error = &read_error;
        scope.spawn(move || {
            let mut chunk = Vec::with_capacity(CHUNK_LINES);
            let mut seq = 0u64;
            for (index, line) in reader.lines().enumerate() {
                let number = index as u64 + 1;
                let line = match line {
                    Ok(line) => line,
                    Err(e) => {
                        *read_error.lock().expect("read error slot") = Some(e);
                        return;
                    }
                };
                if number <= skip {
                    continue;
                }
                chunk.push((number, line));
                if chunk.len() == CHUNK_LINES {
                    if work_tx.send((seq, std::mem::take(&mut chunk))).is_err() {
                        return;
                    }
                    seq += 1;
                }
            }
            if !chunk.is_empty() {
                let _ = work_tx.send((seq, chunk));
            }
        });
        for _ in 0..workers {
            let work_rx = Arc::clone(&work_rx);
            let done_tx = done_tx.clone();
            scope.spawn(move || {
                loop {
                    let job = work_rx.lock().expect("work queue").recv();
                    let Ok((seq, lines)) = job else { return };
                    let parsed = lines
                        .into_iter()
                        .filter(|(_, text)| !text.trim().is_empty())
                        .map(|(number, text)| (number, index_resource(text.trim(), ctx)))
                        .collect();
                    if done_tx.send((seq, parsed)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        // The writer takes chunks in file order, whatever order they finish in.
        let mut pending: BTreeMap<u64, ParsedChunk> = BTreeMap::new();
        let mut next = 0u64;
        let mut last_line = skip;
        for (seq, parsed) in done_rx.iter() {
            pending.insert(seq, parsed);
            while let Some(parsed) = pending.remove(&next) {
                next += 1;
                for (number, outcome) in parsed {
                    // Every line before this one is either in the batch or
                    // rejected: a flush now may record it as committed.
                    checkpoint.lines_committed = (number - 1) as i64;
                    match outcome {
                        Ok(validated) => {
                            writer.add(validated, Location::Line(number), &checkpoint)?
                        }
                        Err(invalid) => writer.reject(Location::Line(number), invalid),
                    }
                    last_line = number;
                }
            }
        }
        if let Some(e) = read_error.lock().expect("read error slot").take() {
            return Err(Error::Read {
                path: path.to_owned(),
                source: e,
            });
        }
        checkpoint.lines_committed = last_line as i64;
        checkpoint.finished = true;
        writer.flush(Some(&checkpoint))
    })
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    entry: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "fullUrl", borrow, default)]
    full_url: Option<&'a str>,
    #[serde(borrow, default)]
    resource: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request: Option<RawRequest<'a>>,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow, default)]
    url: &'a str,
}

enum EntryAction {
    Store(Box<Validated>),
    Delete(ResourceKey),
}

fn import_json_document(
    writer: &mut Writer<'_>,
    ctx: &IndexContext,
    text: &str,
) -> Result<(), Error> {
    let head = match serde_json::from_str::<Head<'_>>(text) {
        Ok(head) => head,
        Err(e) => {
            writer.reject(
                Location::File,
                Invalid::new(
                    None,
                    None,
                    format!("not valid JSON: {}", redact(&e.to_string())),
                ),
            );
            return Ok(());
        }
    };
    if head.resource_type != "Bundle" {
        match index_resource(text, ctx) {
            Ok(validated) => writer.add(validated, Location::File, &Checkpoint::none())?,
            Err(invalid) => writer.reject(Location::File, invalid),
        }
        return Ok(());
    }
    let bundle: RawBundle<'_> = match serde_json::from_str(text) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("not a valid Bundle: {}", redact(&e.to_string()));
            writer.reject(
                Location::File,
                Invalid::new(Some("Bundle"), head.id, reason),
            );
            return Ok(());
        }
    };
    let kind = bundle.kind.unwrap_or("");
    if !matches!(kind, "collection" | "transaction" | "batch" | "searchset") {
        let reason = format!(
            "Bundle.type is `{kind}`; expected collection, transaction, batch or searchset"
        );
        writer.reject(
            Location::File,
            Invalid::new(Some("Bundle"), head.id, reason),
        );
        return Ok(());
    }
    // References to entries by fullUrl (urn:uuid:... in transactions)
    // resolve to the entries' resource ids.
    let mut entry_ctx = IndexContext {
        full_urls: HashMap::new(),
        to_loinc: ctx.to_loinc.clone(),
        rrn: ctx.rrn,
        imported_at: ctx.imported_at,
    };
    for entry in &bundle.entry {
        if let (Some(url), Some(resource)) = (entry.full_url, entry.resource)
            && let Ok(h) = serde_json::from_str::<Head<'_>>(resource.get())
            && let Some(id) = h.id
        {
            entry_ctx
                .full_urls
                .insert(url.to_owned(), format!("{}/{id}", h.resource_type));
        }
    }
    let mut actions = Vec::new();
    let mut failures = Vec::new();
    for (index, entry) in bundle.entry.iter().enumerate() {
        let method = entry.request.as_ref().map(|r| r.method).unwrap_or("PUT");
        match method {
            "DELETE" => {
                let url = entry.request.as_ref().map(|r| r.url).unwrap_or_default();
                match url.split_once('/') {
                    Some((ty, id)) if !ty.is_empty() && !id.is_empty() && !id.contains(['/', '?']) => {
                        actions.push((index, EntryAction::Delete(ResourceKey {
                            resource_type: ty.to_owned(),
                            id: id.to_owned(),
                        })));
                    }
                    _ => failures.push((
                        index,
                        Invalid::new(None, None, "DELETE request.url must be Type/id; conditional deletes are not supported".to_owned()),
                    )),
                }
            }
            "PUT" | "POST" => match entry.resource {
                None => failures.push((
                    index,
                    Invalid::new(None, None, "entry has no resource".to_owned()),
                )),
                Some(resource) => match index_resource(resource.get(), &entry_ctx) {
                    Ok(validated) => actions.push((index, EntryAction::Store(Box::new(validated)))),
                    Err(invalid) => failures.push((index, invalid)),
                },
            },
            other => failures.push((
                index,
                Invalid::new(
                    None,
                    None,
                    format!(
                        "request.method {other} is not supported; expected PUT, POST or DELETE"
                    ),
                ),
            )),
        }
    }
    let transaction = kind == "transaction";
    if transaction && !failures.is_empty() {
        let first = failures[0].0;
        for (index, invalid) in failures {
            writer.reject(Location::Entry(index), invalid);
        }
        for (index, action) in actions {
            let reason = format!(
                "not imported: transaction Bundle is all-or-nothing and entry {first} is invalid"
            );
            let invalid = match action {
                EntryAction::Store(v) => Invalid::new(
                    Some(&v.indexed.resource.resource_type),
                    Some(&v.indexed.resource.id),
                    reason,
                ),
                EntryAction::Delete(key) => {
                    Invalid::new(Some(&key.resource_type), Some(&key.id), reason)
                }
            };
            writer.reject(Location::Entry(index), invalid);
        }
        return Ok(());
    }
    for (index, invalid) in failures {
        writer.reject(Location::Entry(index), invalid);
    }
    if transaction {
        // A transaction must land in one database transaction.
        writer.flush(None)?;
        writer.unbounded = true;
    }
    for (index, action) in actions {
        match action {
            EntryAction::Store(validated) => {
                writer.add(*validated, Location::Entry(index), &Checkpoint::none())?
            }
            EntryAction::Delete(key) => writer.delete(key, &Checkpoint::none())?,
        }
    }
    if transaction {
        writer.unbounded = false;
        writer.flush(None)?;
    }
    Ok(())
}

impl Checkpoint {
    /// No checkpoint: the source is not resumable line by line.
    fn none() -> Checkpoint {
        Checkpoint {
            source: String::new(),
            fingerprint: String::new(),
            lines_committed: 0,
            finished: false,
        }
    }
}

/// Collects validated resources into batches and commits them in order.
struct Writer<'a> {
    store: &'a Store,
    options: &'a ImportOptions,
    started: Instant,
    batch: Batch,
    batch_keys: HashSet<(String, String)>,
    report: ImportReport,
    file: PathBuf,
    /// Inside a transaction Bundle: never split the batch.
    unbounded: bool,
}

impl Writer<'_> {
    fn reject(&mut self, location: Location, invalid: Invalid) {
        tracing::warn!(file = %self.file.display(), %location, reason = %invalid.reason, "resource rejected");
        self.report.rejected.push(Rejection {
            file: self.file.clone(),
            location,
            resource_type: invalid.resource_type,
            id: invalid.id,
            reason: invalid.reason,
        });
    }

    fn add(
        &mut self,
        validated: Validated,
        location: Location,
        checkpoint: &Checkpoint,
    ) -> Result<(), Error> {
        let r = &validated.indexed.resource;
        if validated.rrn_stripped > 0 {
            self.report.rrn_stripped.push(Rejection {
                file: self.file.clone(),
                location,
                resource_type: Some(r.resource_type.clone()),
                id: Some(r.id.clone()),
                reason: format!(
                    "{} resident registration number identifier(s) removed",
                    validated.rrn_stripped
                ),
            });
        }
        let key = (r.resource_type.clone(), r.id.clone());
        self.make_room(&key, checkpoint)?;
        self.batch_keys.insert(key);
        self.batch.items.push(validated.indexed);
        Ok(())
    }

    fn delete(&mut self, key: ResourceKey, checkpoint: &Checkpoint) -> Result<(), Error> {
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

    fn flush(&mut self, checkpoint: Option<&Checkpoint>) -> Result<(), Error> {
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

/// Re-derives every index row from the stored resources, e.g. after a code
/// map changed. Returns how many resources were re-indexed.
pub fn reindex(store: &Store, batch_size: usize) -> Result<u64, Error> {
    let store_err = |committed| move |source| Error::Store { committed, source };
    let mut ctx = IndexContext::default();
    for m in store
        .code_map()
        .map_err(store_err(0))?
        .into_iter()
        .filter(|m| m.target_system == LOINC)
    {
        ctx.to_loinc
            .entry((m.source_system, m.source_code))
            .or_default()
            .push(m.target_code);
    }
    let mut after: Option<ResourceKey> = None;
    let mut done = 0u64;
    loop {
        let page = store
            .resources_page(None, after.as_ref(), batch_size as i64)
            .map_err(store_err(done))?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        let mut batch = Batch {
            reindex: true,
            ..Batch::default()
        };
        for stored in &page {
            // A Consent that states no time keeps the time it was stored.
            ctx.imported_at = time::OffsetDateTime::parse(
                &stored.last_updated,
                &time::format_description::well_known::Rfc3339,
            )
            .map_or(0, |t| t.unix_timestamp());
            match index_resource(&stored.content, &ctx) {
                Ok(validated) => batch.items.push(validated.indexed),
                Err(invalid) => tracing::warn!(
                    resource_type = %stored.key.resource_type, id = %stored.key.id, reason = %invalid.reason,
                    "stored resource no longer validates; its index rows are left as they were"
                ),
            }
        }
        store.write_batch(&batch).map_err(store_err(done))?;
        done += page.len() as u64;
    }
    Ok(done)
}

/// Loads a HIRA EDI -> LOINC lab code map from CSV (`edi_code,loinc_code`,
/// further columns ignored, an optional header row with exactly those
/// names), replacing the previous map. Any bad row fails the whole load.
pub fn load_edi_loinc_map(store: &Store, path: &Path) -> Result<usize, Error> {
    let file = File::open(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(file);
    let mut mappings = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let line = index as u64 + 1;
        let bad = |problem: String| Error::CodeMap {
            path: path.to_owned(),
            line,
            problem,
        };
        let record = record.map_err(|e| bad(e.to_string()))?;
        let (Some(edi), Some(loinc)) = (record.get(0), record.get(1)) else {
            return Err(bad("expected two columns: edi_code,loinc_code".to_owned()));
        };
        if line == 1
            && edi.eq_ignore_ascii_case("edi_code")
            && loinc.eq_ignore_ascii_case("loinc_code")
        {
            continue;
        }
        let code_ok = |c: &str| {
            !c.is_empty()
                && c.len() <= 32
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !code_ok(edi) {
            return Err(bad("the EDI code must be letters and digits".to_owned()));
        }
        let loinc_ok = code_ok(loinc)
            && loinc.split_once('-').is_some_and(|(n, c)| {
                !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && c.len() == 1
                    && c.as_bytes()[0].is_ascii_digit()
            });
        if !loinc_ok {
            return Err(bad("the LOINC code must look like 4548-4".to_owned()));
        }
        mappings.push(CodeMapping {
            source_system: HIRA_EDI.to_owned(),
            source_code: terminology::normalize_code(HIRA_EDI, edi).into_owned(),
            target_system: LOINC.to_owned(),
            target_code: loinc.to_owned(),
        });
    }
    if mappings.is_empty() {
        // Loading an empty file would silently remove every mapping.
        return Err(Error::CodeMap {
            path: path.to_owned(),
            line: 0,
            problem: "no mappings found; expected rows of edi_code,loinc_code".to_owned(),
        });
    }
    store
        .replace_code_map(HIRA_EDI, LOINC, &mappings)
        .map_err(|source| Error::Store {
            committed: 0,
            source,
        })?;
    Ok(mappings.len())
}
