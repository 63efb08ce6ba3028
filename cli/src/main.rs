//! `ghx`: one command for every role in the G-Health federation.
//!
//! This binary parses arguments (`args`), starts the async runtime and
//! hands the command to `cmd`, which builds what the library crates
//! provide and runs it; errors are reported here, once.

#![forbid(unsafe_code)]

mod args;
mod cmd;

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command, CoordinatorCommand, NodeCommand};

/// mimalloc: the import's parser threads allocate and free millions of
/// small JSON values, where glibc's allocator spent a fifth of the time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The services set up their telemetry once their configuration is read
    // (it may export over OTLP); every other command logs warnings to stderr.
    let service = matches!(
        cli.command,
        Command::Node(NodeCommand::Run { .. })
            | Command::Coordinator(CoordinatorCommand::Run { .. })
    );
    if !service {
        ghx_telemetry::Telemetry::logs_only("warn")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(cmd::run(cli.command));
    if let Err(e) = &outcome {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
