//! `ghx train`: start, follow and report federated training runs.

use std::path::Path;

use super::{connect, status_error};
use crate::args::TrainCommand;
use anyhow::{Context, Result, bail};
use ghx::training_report;
use ghx_proto::v1 as pb;

async fn manifest_of(
    c: &mut pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>,
    study: &str,
) -> Result<ghx_study::manifest::StudyManifest> {
    let summary = c
        .get_study(pb::GetStudyRequest {
            study_id: study.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(ghx_study::manifest::StudyManifest::parse(
        &summary.manifest_json,
    )?)
}

pub(super) async fn follow_and_write(
    c: &mut pb::coordinator_service_client::CoordinatorServiceClient<tonic::transport::Channel>,
    run_id: &str,
    study: &str,
    out: &Path,
) -> Result<()> {
    let record = training_report::follow(c, run_id, |r, total| {
        println!("{}", training_report::progress_line(r, total));
    })
    .await
    .map_err(status_error)?;
    let manifest = manifest_of(c, study).await?;
    let written = training_report::write_outputs(out, &record, &manifest)
        .with_context(|| format!("cannot write into {}", out.display()))?;
    println!("run {} {}", record.run_id, record.status.name());
    match record.evaluation.as_ref().map(|e| &e.pooled) {
        Some(Some(pooled)) => println!(
            "final model on about {} held-out patients (counts noised at each hospital): AUC {}, accuracy {:.4}, Brier {:.4}",
            pooled.rows,
            pooled
                .auc
                .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.4}")),
            pooled.accuracy,
            pooled.brier
        ),
        Some(None) => println!(
            "final model: pooled metrics withheld (held-out positives or negatives below the cell size)"
        ),
        None => {}
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    if record.status != ghx_coordinator::training::RunStatus::Completed {
        bail!("training {}: {}", record.status.name(), record.detail);
    }
    Ok(())
}

pub(super) async fn train(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Start {
            client,
            study,
            training,
            out,
            no_wait,
        } => {
            let mut c = connect(&client).await?;
            let status = c
                .start_training(pb::StartTrainingRequest {
                    study_id: study.clone(),
                    training,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "started {} of {} ({} rounds)",
                status.run_id, status.training, status.rounds_total
            );
            if no_wait {
                return Ok(());
            }
            follow_and_write(&mut c, &status.run_id, &study, &out).await
        }
        TrainCommand::Status { client, run, out } => {
            let mut c = connect(&client).await?;
            let status = c
                .get_training(pb::GetTrainingRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            match out {
                Some(out) => follow_and_write(&mut c, &run, &status.study_id, &out).await,
                None => {
                    if client.json {
                        println!("{}", String::from_utf8_lossy(&status.record_json));
                    } else {
                        println!(
                            "{} ({} of {}): {}, {} of {} rounds {}",
                            status.run_id,
                            status.study_id,
                            status.training,
                            status.status,
                            status.rounds_done,
                            status.rounds_total,
                            status.detail
                        );
                    }
                    Ok(())
                }
            }
        }
        TrainCommand::Validate {
            client,
            study,
            training,
            model,
        } => {
            let model_json = std::fs::read(&model)
                .with_context(|| format!("cannot read model {}", model.display()))?;
            let mut c = connect(&client).await?;
            let report = c
                .validate_model(pb::ValidateModelRequest {
                    study_id: study,
                    training,
                    model_json,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let report: serde_json::Value = serde_json::from_slice(&report.report_json)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}
