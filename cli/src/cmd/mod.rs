//! What each command does: one module per command family, and the few
//! helpers they share (the coordinator connection, printing results).

use anyhow::{Context, Result};
use ghx::render;
use ghx_pki::TlsFiles;
use ghx_proto::v1 as pb;

use crate::args::{ClientArgs, Command};

mod audit;
mod bench;
mod committee;
mod coordinator;
mod demo;
mod exchange;
mod import;
mod node;
mod pki;
mod policy;
mod study;
mod train;

/// Runs one command.
pub(crate) async fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(args) => demo::demo(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::BenchTrain(args) => bench::bench_train(args).await,
        Command::BenchExchange(args) => bench::bench_exchange(args).await,
        Command::Synth(args) => node::synth(&args),
        Command::Pki(cmd) => pki::pki(cmd),
        Command::Node(cmd) => node::node(cmd).await,
        Command::Coordinator(cmd) => coordinator::coordinator(cmd).await,
        Command::Study(cmd) => study::study(cmd).await,
        Command::Policy(cmd) => policy::policy(cmd),
        Command::Audit(cmd) => audit::audit(cmd),
        Command::Committee(cmd) => committee::committee(cmd).await,
        Command::Train(cmd) => train::train(cmd).await,
        Command::Exchange(cmd) => exchange::exchange(cmd).await,
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

async fn connect(
    client: &ClientArgs,
) -> Result<pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>> {
    let files = TlsFiles {
        ca: client.ca.clone(),
        cert: client.cert.clone(),
        key: client.key.clone(),
    };
    ghx::client::connect_coordinator(&client.coordinator, &files)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the coordinator at {}",
                client.coordinator
            )
        })
}

fn print_result(result: &pb::StudyResult, json: bool) {
    if json {
        println!("{}", render::study_json(result));
    } else {
        print!("{}", render::study_table(result));
    }
}

fn print_studies(studies: &[pb::StudySummary], json: bool) {
    if json {
        println!("{}", render::studies_json(studies));
    } else {
        print!("{}", render::studies_table(studies));
    }
}

/// Runs a study query (empty: the manifest's first) and returns its result.
async fn run_study(
    client: &mut pb::coordinator_service_client::CoordinatorServiceClient<
        tonic::transport::Channel,
    >,
    study_id: &str,
    query: &str,
) -> Result<pb::StudyResult> {
    client
        .run_study(pb::RunStudyRequest {
            study_id: study_id.to_owned(),
            query: query.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .result
        .context("the coordinator returned no result")
}
