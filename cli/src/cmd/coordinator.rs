//! `ghx coordinator`: run the coordinator.

use anyhow::{Context, Result};

use super::shutdown_signal;
use crate::args::CoordinatorCommand;

/// `ghx coordinator run`.
pub(super) async fn coordinator(command: CoordinatorCommand) -> Result<()> {
    match command {
        CoordinatorCommand::Run {
            config,
            set,
            print_config,
        } => {
            let config = ghx_coordinator::CoordinatorConfig::layered(config.as_deref(), &set)?;
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            let telemetry = ghx_telemetry::Telemetry::install(
                ghx_telemetry::Service {
                    name: "ghx-coordinator",
                    instance: &config.listen.to_string(),
                },
                &config.telemetry,
                "info",
            )?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let tunnel = match config.tunnel_listen {
                Some(addr) => {
                    Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                        format!("cannot listen for nodes dialling in on {addr}")
                    })?)
                }
                None => None,
            };
            let mut coordinator = ghx_coordinator::Coordinator::build(config)?;
            if let Some(tunnel) = tunnel {
                coordinator = coordinator.with_tunnel(tunnel);
            }
            let served = coordinator.serve(listener, shutdown_signal()).await;
            telemetry.shutdown()?;
            Ok(served?)
        }
    }
}
