//! `ghx committee`: the steering committee reviews and decides studies.

use super::{connect, print_studies, status_error};
use crate::args::CommitteeCommand;
use anyhow::Result;
use ghx_proto::v1 as pb;

pub(super) async fn committee(cmd: CommitteeCommand) -> Result<()> {
    let (client, summary) = match cmd {
        CommitteeCommand::List { client } => {
            let mut c = connect(&client).await?;
            let studies = c
                .list_studies(pb::ListStudiesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .studies;
            print_studies(&studies, client.json);
            return Ok(());
        }
        CommitteeCommand::Approve {
            client,
            study,
            note,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .approve_study(pb::ApproveStudyRequest {
                    study_id: study,
                    note,
                })
                .await;
            (client, summary)
        }
        CommitteeCommand::Reject {
            client,
            study,
            reason,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .reject_study(pb::RejectStudyRequest {
                    study_id: study,
                    reason,
                })
                .await;
            (client, summary)
        }
        CommitteeCommand::Revoke {
            client,
            study,
            reason,
        } => {
            let mut c = connect(&client).await?;
            let summary = c
                .revoke_study(pb::RevokeStudyRequest {
                    study_id: study,
                    reason,
                })
                .await;
            (client, summary)
        }
    };
    let summary = summary.map_err(status_error)?.into_inner();
    print_studies(std::slice::from_ref(&summary), client.json);
    Ok(())
}
