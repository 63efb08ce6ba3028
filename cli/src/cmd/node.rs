//! `ghx node` and `ghx synth`: run a hospital node, load, export and
//! re-index its data, and write synthetic exports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::shutdown_signal;
use crate::args::{NodeCommand, SynthArgs};
use anyhow::{Context, Result};
use ghx_node::import::{ImportOptions, import_path};

/// `ghx node`: run a node, or load, export or re-index its data.
pub(super) async fn node(command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Run {
            config,
            set,
            print_config,
        } => {
            let config = ghx_node::NodeConfig::layered(config.as_deref(), &set)?;
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            let telemetry = ghx_telemetry::Telemetry::install(
                ghx_telemetry::Service {
                    name: "ghx-node",
                    instance: &config.id,
                },
                &config.telemetry,
                "info",
            )?;
            let listener = match config.listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            let node = tokio::task::spawn_blocking(move || ghx_node::Node::build(config)).await??;
            let served = node.serve(listener, shutdown_signal()).await;
            telemetry.shutdown()?;
            Ok(served?)
        }
        NodeCommand::Import {
            config,
            paths,
            batch_size,
            workers,
            no_resume,
            rejects,
        } => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let mut options = ImportOptions {
                batch_size,
                resume: !no_resume,
                rrn: config.rrn_policy.parse().map_err(anyhow::Error::msg)?,
                ..ImportOptions::default()
            };
            if let Some(workers) = workers {
                options.workers = workers;
            }
            node_import(&config, &paths, options, rejects.as_deref()).await
        }
        NodeCommand::Export {
            config,
            out,
            resource_type,
        } => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let started = Instant::now();
            let counts = tokio::task::spawn_blocking(move || {
                ghx_node::export::export_ndjson(&store, &out, resource_type.as_deref())
                    .map(|c| (c, out))
            })
            .await??;
            let (counts, out) = counts;
            for (ty, n) in &counts {
                println!("{ty:<20} {n:>9}");
            }
            println!(
                "exported {} resources to {} in {:.1} s",
                counts.values().sum::<u64>(),
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        NodeCommand::LoadCodeMap { config, csv } => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let (loaded, reindexed) = tokio::task::spawn_blocking(move || {
                let loaded = ghx_node::import::load_edi_loinc_map(&store, &csv)?;
                let reindexed = ghx_node::import::reindex(&store, 2000)?;
                Ok::<_, ghx_node::import::Error>((loaded, reindexed))
            })
            .await??;
            println!("loaded {loaded} EDI -> LOINC mappings; re-indexed {reindexed} resources");
            Ok(())
        }
        NodeCommand::Reindex { config } => {
            let config = ghx_node::NodeConfig::layered(Some(&config), &[])?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let n = tokio::task::spawn_blocking(move || ghx_node::import::reindex(&store, 2000))
                .await??;
            println!("re-indexed {n} resources");
            Ok(())
        }
    }
}

pub(super) fn synth(args: &SynthArgs) -> Result<()> {
    let hospital = ghx_synth::HospitalProfile::by_id(&args.hospital)?;
    let started = Instant::now();
    let summary = ghx_synth::write_ndjson_dir(
        &ghx_synth::SynthOptions {
            hospital,
            patients: args.patients,
            seed: args.seed,
            as_of: ghx_synth::default_as_of(),
        },
        &args.out,
    )?;
    println!(
        "{}: wrote {} resources for {} patients to {} in {:.1} s",
        hospital.name,
        summary.total(),
        summary.patients,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn node_import(
    config: &ghx_node::NodeConfig,
    paths: &[PathBuf],
    mut options: ImportOptions,
    rejects: Option<&Path>,
) -> Result<()> {
    let store = ghx_node::Store::open(&config.database_url)?;
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
    let mut reject_lines = Vec::new();
    for path in paths {
        let started = Instant::now();
        let store = store.clone();
        let path_owned = path.clone();
        let run_options = options.clone();
        let report =
            tokio::task::spawn_blocking(move || import_path(&store, &path_owned, &run_options))
                .await??;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
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
        for rejection in report.rejected.iter().take(10) {
            println!("  rejected {rejection}");
        }
        if report.rejected.len() > 10 {
            println!("  ... and {} more", report.rejected.len() - 10);
        }
        reject_lines.extend(report.rejected.iter().map(ToString::to_string));
        reject_lines.extend(report.rrn_stripped.iter().map(|w| format!("warning {w}")));
    }
    if let Some(peak) = peak_rss_mib() {
        println!("peak memory (RSS): {peak:.0} MiB");
    }
    if let Some(path) = rejects {
        let mut text = reject_lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// This process's peak resident set size, from /proc (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
