//! What `ghx audit` reads and writes: a keeper's log straight from its
//! database or from a chain export file, checked against a certificate the
//! reader trusts; exports (chain or FHIR AuditEvent NDJSON); reconciliation
//! and the monthly review.
//!
//! Key decision: verification never trusts what it is verifying. A log read
//! from a database is opened as it is (no migrations, no sealing); the
//! certificate that checks an export's checkpoints is either given by the
//! reader or the one inside the export, and then only if the federation CA
//! issued it.

use std::path::{Path, PathBuf};

use ghx_audit::checkpoint::{Checkpoint, Verifier};
use ghx_audit::reconcile::Reconciliation;
use ghx_audit::verify::Verification;
use ghx_audit::witness::Witness;
use ghx_audit::{EXPORT_FORMAT, LogExport, WitnessedHead};
use ghx_db::audit::AuditLog;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a ghx audit export ({EXPORT_FORMAT}): {reason}")]
    NotAnExport { path: PathBuf, reason: String },
    #[error("cannot read the audit log: {0}")]
    Database(#[from] ghx_db::Error),
    #[error("certificate: {0}")]
    Certificate(#[from] ghx_audit::checkpoint::Error),
    #[error(transparent)]
    Untrusted(#[from] ghx_pki::Error),
    #[error(
        "the certificate names `{named}` but the log is `{keeper}`'s; checkpoints must be checked with the keeper's own certificate"
    )]
    WrongKeeper { named: String, keeper: String },
    #[error(transparent)]
    Export(#[from] ghx_audit::fhir::Error),
    #[error("`{0}` is not a month; expected YYYY-MM")]
    Month(String),
    #[error("`{0}` is not a date; expected YYYY-MM-DD")]
    Date(String),
    #[error(
        "a retention period of {0} days is shorter than the legal minimum of {min} days",
        min = ghx_audit::MIN_RETENTION_DAYS
    )]
    Retention(u32),
    #[error(
        "the export of {0}'s log does not say when it was made (an older ghx wrote it), so the heads others hold cannot be compared with it: export it again"
    )]
    Undated(String),
    #[error(
        "the export of {keeper}'s log was made at {exported_at}, before the end of the period under review ({until}): export it again"
    )]
    ExportedEarly {
        keeper: String,
        exported_at: String,
        until: String,
    },
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path`.
pub fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

/// The whole log in the database at `url` (a SQLite path or a postgres://
/// URL), kept by whoever `certificate_pem` names.
pub fn read_database(url: &str, certificate_pem: &str) -> Result<LogExport, Error> {
    let keeper = Verifier::from_certificate_pem(certificate_pem)?
        .keeper()
        .to_owned();
    let log = AuditLog::new(ghx_db::open_existing(url)?);
    // Before the entries are read: a head signed before this is of an
    // entry the log then held.
    let exported_at = ghx_audit::now_rfc3339();
    Ok(LogExport {
        format: EXPORT_FORMAT.to_owned(),
        keeper,
        certificate_pem: certificate_pem.to_owned(),
        entries: log.entries()?,
        checkpoints: log.checkpoints()?,
        exported_at,
        witnessed: log.witnesses().all()?,
    })
}

/// The heads of other keepers held in the database at `url` (another
/// keeper's: read before the log it witnesses).
pub fn read_witnessed(url: &str) -> Result<Vec<WitnessedHead>, Error> {
    Ok(AuditLog::new(ghx_db::open_existing(url)?)
        .witnesses()
        .all()?)
}

/// The heads of `keeper`'s log among `held`, held by `by`.
pub fn witnesses_for(keeper: &str, by: &str, held: &[WitnessedHead]) -> Vec<Witness> {
    held.iter()
        .filter(|w| w.keeper == keeper)
        .filter_map(|w| Checkpoint::from_token(&w.token))
        .map(|(checkpoint, _)| Witness {
            by: by.to_owned(),
            checkpoint,
        })
        .collect()
}

/// The heads of `log`'s keeper that every other log of `all` holds.
pub fn witnesses_among(log: &LogExport, all: &[LogExport]) -> Vec<Witness> {
    all.iter()
        .filter(|other| other.keeper != log.keeper)
        .flat_map(|other| witnesses_for(&log.keeper, &other.keeper, &other.witnessed))
        .collect()
}

/// How a log is held to its retention period and its witnesses.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// At least [`ghx_audit::MIN_RETENTION_DAYS`].
    pub retention_days: u32,
    /// Heads of the log held elsewhere; `None` when no witness was given.
    pub witnesses: Option<&'a [Witness]>,
    /// Which of them count.
    pub window: Window,
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Expect {
            retention_days: ghx_audit::MIN_RETENTION_DAYS,
            witnesses: None,
            window: Window::Exported,
        }
    }
}

/// Which witnessed heads a log must hold: those signed before it was read.
#[derive(Debug, Clone, Copy)]
pub enum Window {
    /// The witnesses were read before the log: every head they hold.
    ReadFirst,
    /// Those signed before the log says it was read (`exported_at`, which
    /// whoever made the export wrote).
    Exported,
    /// Those signed before this instant (the end of the month under review),
    /// and the export must have been made after it: an export dated back
    /// before a cut cannot leave that cut's heads out.
    Until(time::OffsetDateTime),
}

/// A retention period the law allows.
pub fn retention(days: u32) -> Result<u32, Error> {
    if days < ghx_audit::MIN_RETENTION_DAYS {
        return Err(Error::Retention(days));
    }
    Ok(days)
}

/// A chain export written by `ghx audit export --format chain`.
pub fn read_export(path: &Path) -> Result<LogExport, Error> {
    let text = read(path)?;
    let log: LogExport = serde_json::from_str(&text).map_err(|e| Error::NotAnExport {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if log.format != EXPORT_FORMAT {
        return Err(Error::NotAnExport {
            path: path.to_owned(),
            reason: format!("its format is `{}`", log.format),
        });
    }
    Ok(log)
}

/// A certificate file's contents.
pub fn read_pem(path: &Path) -> Result<String, Error> {
    read(path)
}

/// The verifier for `log`'s checkpoints: the certificate the reader gave,
/// else the one inside the log if the federation CA (`ca_pem`) issued it.
/// `None` when neither is available: the chain can still be checked, the
/// signatures not.
pub fn verifier_for(
    log: &LogExport,
    certificate_pem: Option<&str>,
    ca_pem: Option<&str>,
) -> Result<Option<Verifier>, Error> {
    let pem = match (certificate_pem, ca_pem) {
        (Some(pem), Some(ca)) => {
            ghx_pki::verify_member(ca, pem)?;
            pem
        }
        (Some(pem), None) => pem,
        (None, Some(ca)) if !log.certificate_pem.is_empty() => {
            ghx_pki::verify_member(ca, &log.certificate_pem)?;
            log.certificate_pem.as_str()
        }
        _ => return Ok(None),
    };
    let verifier = Verifier::from_certificate_pem(pem)?;
    if verifier.keeper() != log.keeper {
        return Err(Error::WrongKeeper {
            named: verifier.keeper().to_owned(),
            keeper: log.keeper.clone(),
        });
    }
    Ok(Some(verifier))
}

/// Verifies a log, holding its start to the retention period (a log whose
/// head was deleted up to a younger checkpoint is broken, not expired) and
/// its entries to the heads of it that witnesses hold, signed before the
/// log was read (a log whose tail was deleted or rewritten is broken).
pub fn verify(
    log: &LogExport,
    verifier: Option<&Verifier>,
    expect: Expect<'_>,
) -> Result<Verification, Error> {
    let verdict = ghx_audit::verify::verify_retained(
        &log.entries,
        &log.checkpoints,
        verifier,
        ghx_audit::verify::Retention {
            days: expect.retention_days,
            now: time::OffsetDateTime::now_utc(),
        },
    );
    let Some(witnesses) = expect.witnesses else {
        return Ok(verdict);
    };
    let millis = |t: time::OffsetDateTime| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok();
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let read_at = || {
        time::OffsetDateTime::parse(
            &log.exported_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|_| Error::Undated(log.keeper.clone()))
    };
    let signed_before = match expect.window {
        Window::ReadFirst => None,
        Window::Exported => millis(read_at()?),
        Window::Until(until) => {
            if read_at()? < until {
                return Err(Error::ExportedEarly {
                    keeper: log.keeper.clone(),
                    exported_at: log.exported_at.clone(),
                    until: rfc3339(until),
                });
            }
            millis(until)
        }
    };
    Ok(ghx_audit::witness::compare(
        verdict,
        &log.entries,
        witnesses,
        verifier,
        signed_before,
    ))
}

/// Verifies a log against the certificate inside it, trusted only when
/// the federation CA (`ca_pem`) issued it; without a CA, the chain only.
pub fn verify_with_ca(
    log: &LogExport,
    ca_pem: Option<&str>,
    expect: Expect<'_>,
) -> Result<Verification, Error> {
    let verifier = verifier_for(log, None, ca_pem)?;
    verify(log, verifier.as_ref(), expect)
}

/// Reconciles the coordinator's log with the nodes' logs over `period`.
pub fn reconcile_logs(
    coordinator: &LogExport,
    nodes: &[LogExport],
    period: (Option<time::OffsetDateTime>, Option<time::OffsetDateTime>),
) -> Reconciliation {
    let nodes: Vec<(String, Vec<ghx_audit::Entry>)> = nodes
        .iter()
        .map(|log| (log.keeper.clone(), entries_in(log, period)))
        .collect();
    ghx_audit::reconcile::reconcile(&entries_in(coordinator, period), &nodes)
}

/// The verdict in words.
pub fn verification_text(keeper: &str, v: &Verification) -> String {
    let range = match (v.first_seq, v.last_seq) {
        (Some(a), Some(b)) => format!("entries {a} to {b}"),
        _ => "no entries".to_owned(),
    };
    let signatures = if v.signatures_checked {
        format!("{} signed checkpoints checked", v.checkpoints_checked)
    } else {
        "checkpoint signatures NOT checked (give --cert, or --ca for an export)".to_owned()
    };
    let tail = match v.signed_through {
        Some(s) => format!(
            "signed through entry {s}; {} later entries chained but not yet signed",
            v.unsigned_tail
        ),
        None => format!(
            "no signed checkpoint; {} entries chained only",
            v.unsigned_tail
        ),
    };
    let witnessed = match &v.witnessed {
        None => {
            "heads NOT compared with any witness (give --witness-db or --witness-file)".to_owned()
        }
        Some(w) => {
            let mut skipped = String::new();
            if w.unverified > 0 {
                skipped.push_str(&format!(
                    ", {} whose signature does not verify skipped",
                    w.unverified
                ));
            }
            if w.later > 0 {
                skipped.push_str(&format!(", {} signed after it was read skipped", w.later));
            }
            match &w.through {
                Some((seq, by)) => format!(
                    "witnessed through entry {seq} by {by} ({} heads compared{skipped}); {} later entries not yet witnessed",
                    w.compared, w.unwitnessed_tail
                ),
                None => format!("no witness holds a head of it yet (0 heads compared{skipped})"),
            }
        }
    };
    match &v.broken {
        None => format!("{keeper}: audit log intact: {range}, {signatures}, {tail}; {witnessed}"),
        Some(b) => format!("{keeper}: audit log BROKEN at {b} ({range}, {signatures})"),
    }
}

/// A calendar month or a `[from, to)` pair of dates as a period.
pub fn period(
    month: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(Option<time::OffsetDateTime>, Option<time::OffsetDateTime>), Error> {
    if let Some(m) = month {
        let (a, b) = ghx_audit::report::month(m).ok_or_else(|| Error::Month(m.to_owned()))?;
        return Ok((Some(a), Some(b)));
    }
    let date = |text: &str| -> Result<time::OffsetDateTime, Error> {
        time::Date::parse(
            text,
            &time::macros::format_description!("[year]-[month]-[day]"),
        )
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| Error::Date(text.to_owned()))
    };
    Ok((from.map(date).transpose()?, to.map(date).transpose()?))
}

/// The log's entries in a period.
pub fn entries_in(
    log: &LogExport,
    (from, to): (Option<time::OffsetDateTime>, Option<time::OffsetDateTime>),
) -> Vec<ghx_audit::Entry> {
    log.entries
        .iter()
        .filter(|e| ghx_audit::fhir::in_period(&e.at, from, to))
        .cloned()
        .collect()
}

/// Reconciliation in words, one finding per line.
pub fn reconciliation_text(r: &Reconciliation) -> String {
    let mut out = format!(
        "{} requests matched, {} alarms, {} warnings\n",
        r.matched,
        r.alarms(),
        r.findings.len() - r.alarms()
    );
    for f in &r.findings {
        out.push_str(&format!("  {f}\n"));
    }
    for (node, n) in &r.nodes_without_log {
        out.push_str(&format!(
            "  not checked: {n} requests sent to {node}, whose log was not given\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(exported_at: &str) -> LogExport {
        LogExport {
            format: EXPORT_FORMAT.to_owned(),
            keeper: "chosun".to_owned(),
            exported_at: exported_at.to_owned(),
            ..LogExport::default()
        }
    }

    #[test]
    fn an_export_that_cannot_say_when_it_was_made_is_not_compared_silently() {
        let none: [Witness; 0] = [];
        let expect = Expect {
            witnesses: Some(&none),
            ..Expect::default()
        };
        assert!(matches!(
            verify(&export(""), None, expect),
            Err(Error::Undated(keeper)) if keeper == "chosun"
        ));
        // Without witnesses there is nothing to compare, and no date needed.
        assert!(verify(&export(""), None, Expect::default()).is_ok());

        // Reviewing November: an export dated before its end is refused,
        // one made after it is compared up to the end.
        let end = time::macros::datetime!(2026-12-01 00:00 UTC);
        let november = Expect {
            witnesses: Some(&none),
            window: Window::Until(end),
            ..Expect::default()
        };
        assert!(matches!(
            verify(&export("2026-11-30T23:00:00Z"), None, november),
            Err(Error::ExportedEarly { .. })
        ));
        let v = verify(&export("2026-12-02T08:00:00Z"), None, november).unwrap();
        assert_eq!(v.witnessed.map(|w| w.compared), Some(0));
    }
}
