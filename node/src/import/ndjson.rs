//! NDJSON files (FHIR bulk data): lines are parsed on worker threads and
//! committed by one writer in file order, with a checkpoint per batch so an
//! interrupted import resumes where it stopped. A line that holds a Bundle
//! is unpacked into its entries.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::bundle::{self, Plan};
use super::index::{IndexContext, Invalid, Validated, index_resource};
use super::verify::open;
use super::writer::Writer;
use super::{Error, Location};
use crate::store::Checkpoint;

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

/// One parsed line. Almost every line is a resource: boxing it would cost
/// an allocation per line for the rare Bundle's sake.
#[expect(clippy::large_enum_variant, reason = "resources are the common case")]
enum Parsed {
    Resource(Result<Validated, Invalid>),
    Bundle(Result<Plan, Invalid>),
}

fn parse_line(text: &str, ctx: &IndexContext) -> Parsed {
    if bundle::is_bundle(text) {
        Parsed::Bundle(bundle::plan(text, ctx))
    } else {
        Parsed::Resource(index_resource(text, ctx))
    }
}

/// Lines read for a worker: a sequence number and (line number, text) pairs.
type RawChunk = (u64, Vec<(u64, String)>);

/// Lines parsed by a worker: (line number, outcome), in file order.
type ParsedChunk = Vec<(u64, Parsed)>;

const CHUNK_LINES: usize = 256;

pub(crate) fn import_ndjson(
    writer: &mut Writer<'_>,
    ctx: &IndexContext,
    path: &Path,
) -> Result<(), Error> {
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
                        .filter(|(_, text)| !text.trim().trim_start_matches('\u{feff}').is_empty())
                        .map(|(number, text)| {
                            // A byte-order mark (Windows exports) is not data.
                            let text = text.trim().trim_start_matches('\u{feff}');
                            (number, parse_line(text, ctx))
                        })
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
                        Parsed::Resource(Ok(validated)) => {
                            writer.add(validated, Location::Line(number), &checkpoint)?
                        }
                        Parsed::Resource(Err(invalid)) | Parsed::Bundle(Err(invalid)) => {
                            writer.reject(Location::Line(number), invalid)
                        }
                        Parsed::Bundle(Ok(plan)) => bundle::apply(
                            writer,
                            plan,
                            |entry| Location::LineEntry(number, entry),
                            &checkpoint,
                        )?,
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
