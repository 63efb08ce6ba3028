//! `ghx audit`: verify, export, report on and reconcile audit logs.

use crate::args::{AuditCommand, LogArgs};
use anyhow::{Context, Result, bail};

/// Reads a log and checks it; returns it with its verdict, printed.
fn checked_log(args: &LogArgs) -> Result<(ghx_audit::LogExport, ghx_audit::verify::Verification)> {
    use ghx::audit_files;
    let cert = args
        .cert
        .as_deref()
        .map(audit_files::read_pem)
        .transpose()?;
    let ca = args.ca.as_deref().map(audit_files::read_pem).transpose()?;
    let retention_days = audit_files::retention(args.retention_days)?;
    // Witnesses first: every head they hold was signed before the log is read.
    let mut held = Vec::new();
    for url in &args.witness_dbs {
        held.push((ghx_db::redact_url(url), audit_files::read_witnessed(url)?));
    }
    for path in &args.witness_files {
        let export = audit_files::read_export(path)?;
        held.push((export.keeper, export.witnessed));
    }
    let log = match (&args.db, &args.file) {
        (Some(url), _) => audit_files::read_database(
            url,
            cert.as_deref().context("--db needs the keeper's --cert")?,
        )?,
        (None, Some(path)) => audit_files::read_export(path)?,
        (None, None) => bail!("give --db or --file"),
    };
    let verifier = audit_files::verifier_for(&log, cert.as_deref(), ca.as_deref())?;
    let witnesses: Vec<_> = held
        .iter()
        .flat_map(|(by, heads)| audit_files::witnesses_for(&log.keeper, by, heads))
        .collect();
    let given = !args.witness_dbs.is_empty() || !args.witness_files.is_empty();
    let verdict = audit_files::verify(
        &log,
        verifier.as_ref(),
        audit_files::Expect {
            retention_days,
            witnesses: given.then_some(witnesses.as_slice()),
            // A database is read after its witnesses; an export says when
            // it was made.
            window: if args.db.is_some() {
                audit_files::Window::ReadFirst
            } else {
                audit_files::Window::Exported
            },
        },
    )?;
    println!("{}", audit_files::verification_text(&log.keeper, &verdict));
    if given && witnesses.is_empty() {
        eprintln!(
            "warning: no witness given holds a head of {}'s log: is it the other side's database or export (the coordinator's for a node, a node's for the coordinator)?",
            log.keeper
        );
    }
    Ok((log, verdict))
}

pub(super) fn audit(command: AuditCommand) -> Result<()> {
    use ghx::audit_files;
    match command {
        AuditCommand::Verify(args) => {
            let (_, verdict) = checked_log(&args)?;
            if !verdict.is_intact() {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditCommand::Export {
            log,
            format,
            out,
            month,
            from,
            to,
        } => {
            let (log, verdict) = checked_log(&log)?;
            if let Some(broken) = verdict.broken {
                bail!("not exporting a broken log: {broken}");
            }
            if format == "chain" {
                if month.is_some() || from.is_some() || to.is_some() {
                    bail!(
                        "a chain export is the whole log; --month, --from and --to apply to --format fhir"
                    );
                }
                audit_files::write(&out, &serde_json::to_string_pretty(&log)?)?;
                println!(
                    "wrote {} entries and {} checkpoints to {}",
                    log.entries.len(),
                    log.checkpoints.len(),
                    out.display()
                );
            } else {
                let period = audit_files::period(month.as_deref(), from.as_deref(), to.as_deref())?;
                let (ndjson, n) =
                    ghx_audit::fhir::export_ndjson(&log.keeper, &log.entries, period.0, period.1)?;
                audit_files::write(&out, &ndjson)?;
                println!(
                    "wrote {n} FHIR R4 AuditEvent resources to {}",
                    out.display()
                );
            }
            Ok(())
        }
        AuditCommand::Reconcile {
            coordinator,
            nodes,
            ca,
            month,
            retention_days,
        } => {
            let ca = ca.as_deref().map(audit_files::read_pem).transpose()?;
            let period = audit_files::period(month.as_deref(), None, None)?;
            let retention_days = audit_files::retention(retention_days)?;
            // Each export carries the heads of the others it holds: the
            // coordinator's log is compared with what every node holds of
            // it, each node's with what the coordinator holds.
            let mut logs = vec![audit_files::read_export(&coordinator)?];
            for path in &nodes {
                logs.push(audit_files::read_export(path)?);
            }
            // Reviewing a month that has ended: every head signed before
            // its end must be in an export made after it. Otherwise each
            // export's own date decides.
            let window = match period.1 {
                Some(end) if month.is_some() && end <= time::OffsetDateTime::now_utc() => {
                    audit_files::Window::Until(end)
                }
                _ => audit_files::Window::Exported,
            };
            let mut intact = true;
            for log in &logs {
                let witnesses = audit_files::witnesses_among(log, &logs);
                let verdict = audit_files::verify_with_ca(
                    log,
                    ca.as_deref(),
                    audit_files::Expect {
                        retention_days,
                        witnesses: Some(&witnesses),
                        window,
                    },
                )?;
                println!("{}", audit_files::verification_text(&log.keeper, &verdict));
                intact &= verdict.is_intact();
            }
            let (coordinator_log, node_logs) = logs.split_first().context("no coordinator log")?;
            let result = audit_files::reconcile_logs(coordinator_log, node_logs, period);
            print!("{}", audit_files::reconciliation_text(&result));
            if !intact || result.alarms() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        AuditCommand::Report { log, month, out } => {
            let (log, verdict) = checked_log(&log)?;
            if let Some(broken) = &verdict.broken {
                eprintln!(
                    "warning: the log is broken at {broken}; the review below cannot be trusted"
                );
            }
            let period = audit_files::period(Some(&month), None, None)?;
            let review = ghx_audit::report::review(&audit_files::entries_in(&log, period));
            let text = ghx_audit::report::render(&log.keeper, &month, &review);
            match out {
                Some(path) => {
                    audit_files::write(&path, &text)?;
                    println!("wrote the {month} review to {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}
