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

use ghx_audit::checkpoint::Verifier;
use ghx_audit::reconcile::Reconciliation;
use ghx_audit::verify::Verification;
use ghx_audit::{EXPORT_FORMAT, LogExport};
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
    Ok(LogExport {
        format: EXPORT_FORMAT.to_owned(),
        keeper,
        certificate_pem: certificate_pem.to_owned(),
        entries: log.entries()?,
        checkpoints: log.checkpoints()?,
    })
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

/// Verifies a log, holding its start to the legal minimum retention (two
/// years): a log whose head was deleted up to a younger checkpoint is
/// broken, not expired.
pub fn verify(log: &LogExport, verifier: Option<&Verifier>) -> Verification {
    ghx_audit::verify::verify_retained(
        &log.entries,
        &log.checkpoints,
        verifier,
        ghx_audit::verify::Retention {
            days: ghx_audit::MIN_RETENTION_DAYS,
            now: time::OffsetDateTime::now_utc(),
        },
    )
}

/// Verifies a log against the certificate inside it, trusted only when
/// the federation CA (`ca_pem`) issued it; without a CA, the chain only.
pub fn verify_with_ca(log: &LogExport, ca_pem: Option<&str>) -> Result<Verification, Error> {
    let verifier = verifier_for(log, None, ca_pem)?;
    Ok(verify(log, verifier.as_ref()))
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
    match &v.broken {
        None => format!("{keeper}: audit log intact: {range}, {signatures}, {tail}"),
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
