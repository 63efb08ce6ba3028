//! Importing EHR exports: FHIR bulk NDJSON and Bundles, plain or gzip, from
//! a file or a directory.
//!
//! Every resource is validated by deserializing it into its fhir-model R4
//! type (fhir-model's R4B module; the resources the node indexes have the same
//! shape in R4 and R4B), checked against the FHIR JSON format
//! (`conformance`: unknown elements, empty values, date forms) and screened
//! for resident registration numbers (`rrn`). A resource that fails is
//! reported with its file, line or entry, id and reason, and skipped.
//!
//! Key decisions:
//! - Each file is decided on its own: its stream (gzip checksum, UTF-8) is
//!   read through before anything of it is committed (`verify`), so a
//!   damaged file is imported not at all, named with the line, and the
//!   other files still are. JSON beside an export that is no FHIR resource
//!   (a manifest) is skipped with a note.
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

mod bundle;
mod codemap;
mod conformance;
pub(crate) mod index;
mod ndjson;
pub mod rrn;
mod verify;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use codemap::{MapKind, load_code_map, load_edi_loinc_map, reindex};
pub use rrn::RrnPolicy;

use crate::store::{self, BatchOutcome, Store};
use index::IndexContext;
use writer::Writer;

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
    /// 0-based entry index of a Bundle on a 1-based NDJSON line.
    LineEntry(u64, usize),
    /// The file as a whole (a file that is a single resource or a bad Bundle).
    File,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Entry(n) => write!(f, "entry {n}"),
            Location::LineEntry(line, n) => write!(f, "line {line} entry {n}"),
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

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStatus {
    /// Read through; its valid resources are stored.
    Imported,
    /// Nothing of it was imported: the stream is damaged or unreadable.
    Failed(String),
    /// Not a FHIR file (e.g. an export manifest); left alone.
    Skipped(String),
}

/// One file of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub path: PathBuf,
    pub status: FileStatus,
    /// Resources of this file stored, and rejected.
    pub accepted: u64,
    pub rejected: u64,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub files: Vec<FileReport>,
    /// Valid resources now stored (created, updated or already identical).
    pub accepted: u64,
    pub outcome: BatchOutcome,
    pub batches: u64,
    pub rejected: Vec<Rejection>,
    /// Resources stored after their RRN identifiers were removed.
    pub rrn_stripped: Vec<Rejection>,
    /// Resources stored in lenient mode although they depart from the FHIR
    /// format, with where.
    pub let_through: Vec<Rejection>,
    /// Lines skipped because an earlier, interrupted import committed them.
    pub resumed_lines: u64,
    /// Stored resources per (resource type, code system) of their codes:
    /// what the node now holds diagnoses, labs and prescriptions in.
    pub code_systems: BTreeMap<(String, String), u64>,
}

impl ImportReport {
    /// The files nothing was imported from.
    pub fn failed_files(&self) -> impl Iterator<Item = &FileReport> {
        self.files
            .iter()
            .filter(|f| matches!(f.status, FileStatus::Failed(_)))
    }
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
    /// The federation's link key ([`ghx_disclosure::linkage`]): each
    /// Patient's RRN is kept only as its linkage token.
    pub link_key: Option<ghx_disclosure::linkage::LinkKey>,
    /// Accept (and count) resources that depart from the FHIR format
    /// instead of rejecting them; off by default.
    pub lenient: bool,
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
            link_key: None,
            lenient: false,
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
            .field("link_key", &self.link_key)
            .field("lenient", &self.lenient)
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
/// directory in name order. Each file is decided on its own (see the module
/// doc); `Err` only when the import cannot go on at all (the store fails).
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
    let mut ctx = codemap::context(store)?;
    ctx.rrn = options.rrn;
    ctx.link_key = options.link_key.clone();
    ctx.lenient = options.lenient;
    ctx.imported_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut writer = Writer::new(store, options);
    for file in &files {
        writer.file = file.clone();
        let (accepted, rejected) = (writer.report.accepted, writer.report.rejected.len());
        let status = match import_file(&mut writer, &ctx, file) {
            Ok(status) => status,
            Err(Error::Read { source, .. }) => {
                // Read through once, then unreadable (a file still being
                // written, a flaky share): what is pending is dropped; what
                // committed stays, and the next import resumes after it.
                writer.discard();
                let committed = writer.report.accepted - accepted;
                FileStatus::Failed(if committed == 0 {
                    format!("cannot read: {source}; nothing of this file was imported")
                } else {
                    format!(
                        "cannot read: {source}; {committed} resources of it were committed first (import it again to resume after them)"
                    )
                })
            }
            Err(e @ Error::UnknownFormat { .. }) => FileStatus::Failed(e.to_string()),
            Err(e) => return Err(e),
        };
        if let FileStatus::Failed(reason) = &status {
            tracing::warn!(file = %file.display(), %reason, "file not imported");
        }
        writer.report.files.push(FileReport {
            path: file.clone(),
            status,
            accepted: writer.report.accepted - accepted,
            rejected: (writer.report.rejected.len() - rejected) as u64,
        });
    }
    Ok(writer.report)
}

fn import_file(
    writer: &mut Writer<'_>,
    ctx: &IndexContext,
    file: &Path,
) -> Result<FileStatus, Error> {
    let name = file.to_string_lossy();
    if name.ends_with(".ndjson") || name.ends_with(".ndjson.gz") {
        if let Err(problem) = verify::check_lines(file)? {
            return Ok(FileStatus::Failed(problem));
        }
        ndjson::import_ndjson(writer, ctx, file)?;
    } else if name.ends_with(".json") || name.ends_with(".json.gz") {
        let text = match verify::read_document(file)? {
            Ok(text) => text,
            Err(problem) => return Ok(FileStatus::Failed(problem)),
        };
        if let Some(note) = bundle::import_document(writer, ctx, &text)? {
            return Ok(FileStatus::Skipped(note));
        }
    } else {
        return Err(Error::UnknownFormat {
            path: file.to_owned(),
        });
    }
    Ok(FileStatus::Imported)
}
