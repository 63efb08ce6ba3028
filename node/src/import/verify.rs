//! A file's stream is checked whole before anything of it is committed, so
//! that a damaged file is imported not at all rather than in part: the gzip
//! stream must decompress to its end with a matching checksum, and every
//! line must be UTF-8. The problem is named by file and line, never by the
//! bytes found.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::Error;

/// Opens a file, decompressing `.gz` transparently.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Read + Send>, Error> {
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

/// Reads an NDJSON file through: `Ok(Err(problem))` when its stream is
/// damaged (`Err` only when it cannot be opened).
pub(crate) fn check_lines(path: &Path) -> Result<Result<(), String>, Error> {
    let mut reader = BufReader::with_capacity(1 << 16, open(path)?);
    let mut line = Vec::with_capacity(1 << 12);
    let mut number = 0u64;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(Ok(())),
            Ok(_) => {
                number += 1;
                if let Err(e) = std::str::from_utf8(&line) {
                    return Ok(Err(not_utf8(number, e.valid_up_to())));
                }
            }
            Err(e) => return Ok(Err(damaged(number, &e))),
        }
    }
}

/// Reads a JSON document whole: `Ok(Err(problem))` when its stream is
/// damaged or it is not UTF-8.
pub(crate) fn read_document(path: &Path) -> Result<Result<String, String>, Error> {
    let mut bytes = Vec::new();
    if let Err(e) = open(path)?.read_to_end(&mut bytes) {
        let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        return Ok(Err(damaged(lines, &e)));
    }
    // A byte-order mark (Windows exports) is not data.
    if bytes.starts_with(b"\xef\xbb\xbf") {
        bytes.drain(..3);
    }
    Ok(String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..valid].iter().filter(|b| **b == b'\n').count() as u64 + 1;
        let start = bytes[..valid]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        not_utf8(line, valid - start)
    }))
}

fn not_utf8(line: u64, column: usize) -> String {
    format!(
        "line {line}, byte {}: not valid UTF-8 (export the file as UTF-8); nothing of this file was imported",
        column + 1
    )
}

fn damaged(lines_read: u64, e: &std::io::Error) -> String {
    let what = match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "the compressed stream ends early (truncated file)".to_owned()
        }
        _ => format!("the stream is damaged ({e})"),
    };
    format!("after line {lines_read}: {what}; nothing of this file was imported")
}
