//! `ghx study`: a requester submits, lists and runs studies.

use super::{connect, print_result, print_studies, run_study, status_error};
use crate::args::StudyCommand;
use anyhow::{Context, Result};
use ghx_proto::v1 as pb;

pub(super) async fn study(cmd: StudyCommand) -> Result<()> {
    match cmd {
        StudyCommand::Submit { client, manifest } => {
            let manifest_json = std::fs::read(&manifest)
                .with_context(|| format!("cannot read manifest {}", manifest.display()))?;
            // Check locally first, for an error that names the file.
            ghx_study::manifest::StudyManifest::parse(&manifest_json)
                .with_context(|| format!("{} is not a valid study manifest", manifest.display()))?;
            let mut c = connect(&client).await?;
            let id = c
                .submit_study(pb::SubmitStudyRequest { manifest_json })
                .await
                .map_err(status_error)?
                .into_inner()
                .study_id;
            if client.json {
                println!("{}", serde_json::json!({ "study_id": id }));
            } else {
                println!("submitted {id}; it runs once the steering committee approves it");
            }
            Ok(())
        }
        StudyCommand::Status { client, study } => {
            let mut c = connect(&client).await?;
            let studies = match study {
                Some(id) => vec![
                    c.get_study(pb::GetStudyRequest { study_id: id })
                        .await
                        .map_err(status_error)?
                        .into_inner(),
                ],
                None => {
                    c.list_studies(pb::ListStudiesRequest {})
                        .await
                        .map_err(status_error)?
                        .into_inner()
                        .studies
                }
            };
            print_studies(&studies, client.json);
            Ok(())
        }
        StudyCommand::Run {
            client,
            study,
            query,
        } => {
            let mut c = connect(&client).await?;
            let result = run_study(&mut c, &study, &query).await?;
            print_result(&result, client.json);
            Ok(())
        }
        StudyCommand::Result {
            client,
            study,
            query,
        } => {
            let mut c = connect(&client).await?;
            let result = c
                .get_study_result(pb::GetStudyResultRequest {
                    study_id: study,
                    query,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .result
                .context("the coordinator returned no result")?;
            print_result(&result, client.json);
            Ok(())
        }
    }
}
