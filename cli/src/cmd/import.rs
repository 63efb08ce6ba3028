//! `ghx node import` and `ghx node status`: loading a hospital's exports
//! offline, and what the node then holds at a glance (resources, code
//! systems, the consent picture).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ghx_node::config::OfflineConfig;
use ghx_node::import::{FileStatus, ImportOptions, ImportReport, import_path};

/// Imports `paths`, prints the summary, writes the rejects file, and fails
/// (non-zero exit) when any file was not imported.
pub(super) async fn run(
    config: &OfflineConfig,
    paths: &[PathBuf],
    mut options: ImportOptions,
    rejects: Option<PathBuf>,
) -> Result<()> {
    let store = ghx_node::Store::open(&config.database_url)?;
    let started_at = time::OffsetDateTime::now_utc();
    let rejects = rejects.unwrap_or_else(|| {
        let stamp = started_at
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_default();
        PathBuf::from(format!("ghx-import-{stamp}.rejects.txt"))
    });
    // A live counter on a terminal; nothing when output is redirected.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .expect("valid progress template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let progress_bar = bar.clone();
    options.progress = Some(std::sync::Arc::new(
        move |p: &ghx_node::import::Progress| {
            let secs = p.elapsed.as_secs_f64().max(1e-9);
            progress_bar.set_message(format!(
                "{}: {} resources ({:.0}/s), {} rejected",
                p.file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                p.accepted,
                p.accepted as f64 / secs,
                p.rejected
            ));
        },
    ));
    let mut lines = vec![format!(
        "# ghx node import at {started_at}: rejected resources, files not imported and warnings; values are never shown"
    )];
    let mut failed = Vec::new();
    let mut files = 0;
    let mut outcome = Outcome::default();
    for path in paths {
        let started = Instant::now();
        let (store, path_owned, run_options) = (store.clone(), path.clone(), options.clone());
        let report =
            tokio::task::spawn_blocking(move || import_path(&store, &path_owned, &run_options))
                .await??;
        bar.finish_and_clear();
        print_report(path, &report, started.elapsed().as_secs_f64());
        lines.extend(reject_lines(&report));
        files += report.files.len();
        failed.extend(report.failed_files().map(|f| f.path.display().to_string()));
        outcome.add(&report);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&rejects, text)
        .with_context(|| format!("cannot write the rejects file {}", rejects.display()))?;
    println!(
        "rejects file: {} ({} rejected, {} warnings, {} files not imported)",
        rejects.display(),
        outcome.rejected,
        outcome.warnings,
        failed.len()
    );
    print_consent(config, &store).await;
    if let Some(peak) = peak_rss_mib() {
        println!("peak memory (RSS): {peak:.0} MiB");
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {files} files were not imported (see each file's line above): {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

#[derive(Default)]
struct Outcome {
    rejected: usize,
    warnings: usize,
}

impl Outcome {
    fn add(&mut self, report: &ImportReport) {
        self.rejected += report.rejected.len();
        self.warnings += report.rrn_stripped.len() + report.let_through.len();
    }
}

fn print_report(path: &Path, report: &ImportReport, secs: f64) {
    let o = report.outcome;
    println!(
        "{}: {} resources in {:.1} s ({:.0} resources/s): {} created, {} updated, {} unchanged, {} deleted; {} rejected",
        path.display(),
        report.accepted + o.deleted,
        secs,
        (report.accepted + o.deleted) as f64 / secs.max(1e-9),
        o.created,
        o.updated,
        o.unchanged,
        o.deleted,
        report.rejected.len()
    );
    for file in &report.files {
        match &file.status {
            FileStatus::Imported if report.files.len() > 1 => println!(
                "  {}: {} stored, {} rejected",
                file.path.display(),
                file.accepted,
                file.rejected
            ),
            FileStatus::Imported => {}
            FileStatus::Failed(why) => {
                println!("  {}: NOT IMPORTED: {why}", file.path.display())
            }
            FileStatus::Skipped(why) => println!("  {}: {why}", file.path.display()),
        }
    }
    if report.resumed_lines > 0 {
        println!(
            "  resumed: skipped {} lines committed by an interrupted import",
            report.resumed_lines
        );
    }
    if !report.rrn_stripped.is_empty() {
        println!(
            "  warning: removed resident registration numbers from {} resources",
            report.rrn_stripped.len()
        );
    }
    if !report.let_through.is_empty() {
        println!(
            "  lenient: {} resources depart from the FHIR format and were accepted anyway",
            report.let_through.len()
        );
    }
    if !report.code_systems.is_empty() {
        println!("  code systems seen (resources):");
        for ((ty, system), n) in &report.code_systems {
            println!("    {ty:<18} {:<12} {n:>9}  {system}", system_name(system));
        }
    }
    for rejection in report.rejected.iter().take(10) {
        println!("  rejected {rejection}");
    }
    if report.rejected.len() > 10 {
        println!(
            "  ... and {} more (see the rejects file)",
            report.rejected.len() - 10
        );
    }
}

fn reject_lines(report: &ImportReport) -> Vec<String> {
    let mut lines = Vec::new();
    for file in &report.files {
        match &file.status {
            FileStatus::Failed(why) => {
                lines.push(format!("not-imported {}: {why}", file.path.display()))
            }
            FileStatus::Skipped(why) => {
                lines.push(format!("skipped {}: {why}", file.path.display()))
            }
            FileStatus::Imported => {}
        }
    }
    lines.extend(report.rejected.iter().map(|r| format!("rejected {r}")));
    lines.extend(report.rrn_stripped.iter().map(|w| format!("warning {w}")));
    lines.extend(report.let_through.iter().map(|w| format!("lenient {w}")));
    lines
}

fn system_name(system: &str) -> &'static str {
    use ghx_node::terminology::{ATC, HIRA_EDI, ICD10, ICD10CM, KCD8, LOINC, SNOMED};
    match system {
        KCD8 => "KCD-8",
        ICD10 => "WHO ICD-10",
        ICD10CM => "ICD-10-CM",
        SNOMED => "SNOMED CT",
        LOINC => "LOINC",
        HIRA_EDI => "HIRA EDI",
        ATC => "ATC",
        _ => "local",
    }
}

/// Prints who can take part in research now, and why the others cannot.
async fn print_consent(config: &OfflineConfig, store: &ghx_node::Store) {
    let Some(dir) = config.policy_dir.clone() else {
        println!("consent: set policy_dir in the node's file to see who can take part in research");
        return;
    };
    let store = store.clone();
    let picture = tokio::task::spawn_blocking(move || {
        let policy = ghx_node::policy::PolicyDir::load(&dir)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Ok::<_, anyhow::Error>(ghx_node::consent::eligibility::picture(
            &store,
            &policy.consent,
            now,
        )?)
    })
    .await;
    match picture {
        Ok(Ok(p)) => {
            let r = &p.research;
            println!(
                "consent ({} hospital): {} of {} patients can take part in research now; {} have a Consent resource",
                p.default, r.included, r.patients, p.with_consent
            );
            for (why, n) in &r.excluded {
                println!("  {n:>9} left out: {}", why.describe());
            }
            if r.included == 0 && r.patients > 0 && p.with_consent == 0 {
                println!(
                    "  no patient has a Consent and this hospital is {}: import the EHR's Consent resources (or record consents) before research queries",
                    p.default
                );
            }
        }
        Ok(Err(e)) => println!("consent: cannot compute the picture: {e}"),
        Err(e) => println!("consent: cannot compute the picture: {e}"),
    }
}

/// `ghx node status`.
pub(super) async fn status(config: &OfflineConfig) -> Result<()> {
    let store = ghx_node::Store::open(&config.database_url)?;
    let s = store.clone();
    let (counts, held) = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((s.resource_counts()?, s.held_code_systems()?))
    })
    .await??;
    println!("database: {}", ghx_db::redact_url(&config.database_url));
    println!("resources:");
    for (ty, n) in &counts {
        println!("  {ty:<20} {n:>9}");
    }
    println!("coded in:");
    for (ty, system) in &held {
        println!("  {ty:<20} {:<12} {system}", system_name(system));
    }
    print_consent(config, &store).await;
    Ok(())
}

/// This process's peak resident set size, from /proc (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
