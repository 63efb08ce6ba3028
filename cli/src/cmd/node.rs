//! `ghx node` and `ghx synth`: run a hospital node, load, export and
//! re-index its data, and write synthetic exports.

use std::time::Instant;

use super::shutdown_signal;
use crate::args::{NodeCommand, SynthArgs};
use anyhow::{Context, Result};
use ghx_node::import::{ImportOptions, MapKind};

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
            lenient,
        } => {
            let config = ghx_node::config::OfflineConfig::load(&config)?;
            let mut options = ImportOptions {
                batch_size,
                resume: !no_resume,
                rrn: config.rrn_policy.parse().map_err(anyhow::Error::msg)?,
                link_key: config.linkage.key()?,
                lenient: lenient || config.import.lenient,
                ..ImportOptions::default()
            };
            if let Some(workers) = workers {
                options.workers = workers;
            }
            super::import::run(&config, &paths, options, rejects).await
        }
        NodeCommand::Status { config } => {
            let config = ghx_node::config::OfflineConfig::load(&config)?;
            super::import::status(&config).await
        }
        NodeCommand::Export {
            config,
            out,
            resource_type,
        } => {
            let config = ghx_node::config::OfflineConfig::load(&config)?;
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
        NodeCommand::LoadCodeMap { config, kind, csv } => {
            let config = ghx_node::config::OfflineConfig::load(&config)?;
            let store = ghx_node::Store::open(&config.database_url)?;
            let (map, label) = match kind.as_str() {
                "snomed-kcd" => (MapKind::SnomedToKcd, "SNOMED CT -> KCD-8"),
                _ => (MapKind::EdiToLoinc, "EDI -> LOINC"),
            };
            let (loaded, reindexed) = tokio::task::spawn_blocking(move || {
                let loaded = ghx_node::import::load_code_map(&store, &csv, map)?;
                let reindexed = ghx_node::import::reindex(&store, 2000)?;
                Ok::<_, ghx_node::import::Error>((loaded, reindexed))
            })
            .await??;
            println!("loaded {loaded} {label} mappings; re-indexed {reindexed} resources");
            Ok(())
        }
        NodeCommand::Reindex { config } => {
            let config = ghx_node::config::OfflineConfig::load(&config)?;
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
    let shape = ghx_synth::Shape {
        coding: args.coding.parse().map_err(anyhow::Error::msg)?,
        no_consents: args.no_consents,
        noise: args.noise,
    };
    let summary = ghx_synth::write_shaped(
        &ghx_synth::SynthOptions {
            hospital,
            patients: args.patients,
            seed: args.seed,
            as_of: ghx_synth::default_as_of(),
            shared: args.shared,
        },
        &shape,
        &args.out,
    )?;
    if shape.coding == ghx_synth::Coding::Snomed {
        let map: String = std::iter::once("snomed_code,kcd_code".to_owned())
            .chain(
                ghx_synth::SNOMED_TO_KCD
                    .iter()
                    .map(|(s, k)| format!("{s},{k}")),
            )
            .map(|l| l + "\n")
            .collect();
        let path = args.out.join("snomed-kcd.csv");
        std::fs::write(&path, map).with_context(|| format!("cannot write {}", path.display()))?;
    }
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
