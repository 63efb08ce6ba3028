//! Who may call what: every federation role against every RPC of the
//! coordinator and of a node, over the real mTLS federation (issue 38, 6).
//! A call is refused for its role when it fails with PermissionDenied
//! naming the role or the study's owner; any other outcome (success, or a
//! refusal for another reason, such as a missing training) means the role
//! check let it through.

use ghx::local_federation::{
    COMMITTEE, LocalFederation, LocalFederationOptions, RECIPIENT, REQUESTER, RESEARCHER,
    manifest_for,
};
use ghx_pki::{CertificateRequest, Role, TlsMaterial};
use ghx_proto::v1 as pb;
use ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use ghx_proto::v1::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-model.json");

/// The callers, each with its own certificate: (column label, member).
const CALLERS: [(&str, &str); 8] = [
    ("owner", RESEARCHER),
    ("other-req", REQUESTER),
    ("committee", COMMITTEE),
    ("auditor", "demo-auditor"),
    ("node", "chosun"),
    ("node-admin", "roles-admin"),
    ("coordinator", "coordinator"),
    ("recipient", RECIPIENT),
];

/// What the role check said of one call.
fn verdict(outcome: Result<(), Status>) -> &'static str {
    match outcome {
        Err(s)
            if s.code() == Code::PermissionDenied
                && (s.message().contains("role")
                    || s.message().contains("belongs to another requester")) =>
        {
            "no"
        }
        _ => "yes",
    }
}

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// Studies for the calls that change a study, one per caller so that one
/// caller's allowed call does not change what the next one meets.
struct Studies {
    owned: String,
    pending_approve: Vec<String>,
    pending_reject: Vec<String>,
    approved_revoke: Vec<String>,
    run_id: String,
}

async fn coordinator_call(
    client: &mut CoordinatorServiceClient<Channel>,
    rpc: &str,
    caller: usize,
    studies: &Studies,
) -> Result<(), Status> {
    let study_id = studies.owned.clone();
    match rpc {
        "RegisterNode" => {
            // Chosun's own node, registered again where it is (a new id is
            // refused unless the configuration allows it; below).
            let endpoint = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .ok()
                .and_then(|r| {
                    r.into_inner()
                        .nodes
                        .into_iter()
                        .find(|n| n.node_id == "chosun")
                })
                .map(|n| n.endpoint)
                .unwrap_or_default();
            ok(client
                .register_node(pb::RegisterNodeRequest {
                    node: Some(pb::NodeRecord {
                        node_id: "chosun".into(),
                        endpoint,
                        display_name: "Chosun University Hospital".into(),
                    }),
                })
                .await)
        }
        "ListNodes" => ok(client.list_nodes(pb::ListNodesRequest {}).await),
        "SubmitStudy" => ok(client
            .submit_study(pb::SubmitStudyRequest {
                manifest_json: MANIFEST.as_bytes().to_vec(),
            })
            .await),
        "ListStudies" => ok(client.list_studies(pb::ListStudiesRequest {}).await),
        "GetStudy" => ok(client.get_study(pb::GetStudyRequest { study_id }).await),
        "ApproveStudy" => ok(client
            .approve_study(pb::ApproveStudyRequest {
                study_id: studies.pending_approve[caller].clone(),
                note: String::new(),
            })
            .await),
        "RejectStudy" => ok(client
            .reject_study(pb::RejectStudyRequest {
                study_id: studies.pending_reject[caller].clone(),
                reason: "roles test".into(),
            })
            .await),
        "RevokeStudy" => ok(client
            .revoke_study(pb::RevokeStudyRequest {
                study_id: studies.approved_revoke[caller].clone(),
                reason: "roles test".into(),
            })
            .await),
        "RunStudy" => ok(client
            .run_study(pb::RunStudyRequest {
                study_id,
                query: String::new(),
            })
            .await),
        "GetStudyResult" => ok(client
            .get_study_result(pb::GetStudyResultRequest {
                study_id,
                query: String::new(),
            })
            .await),
        // A training the manifest does not hold: the role check comes first.
        "StartTraining" => ok(client
            .start_training(pb::StartTrainingRequest {
                study_id,
                training: "no-such-training".into(),
            })
            .await),
        "GetTraining" => ok(client
            .get_training(pb::GetTrainingRequest {
                run_id: studies.run_id.clone(),
            })
            .await),
        "ValidateModel" => ok(client
            .validate_model(pb::ValidateModelRequest {
                study_id,
                training: String::new(),
                model_json: b"{}".to_vec(),
            })
            .await),
        "RenewCertificate" => ok(client
            .renew_certificate(pb::RenewCertificateRequest {
                csr_pem: String::new(),
            })
            .await),
        "RelayExchange" => ok(client.relay_exchange(pb::ExchangeRequest::default()).await),
        other => panic!("no call for {other}"),
    }
}

async fn node_call(client: &mut NodeServiceClient<Channel>, rpc: &str) -> Result<(), Status> {
    match rpc {
        "Health" => ok(client.health(pb::HealthRequest {}).await),
        "Exchange" => ok(client.exchange(pb::ExchangeRequest::default()).await),
        "GetNodeInfo" => ok(client.get_node_info(pb::GetNodeInfoRequest {}).await),
        "RunAggregate" => ok(client
            .run_aggregate(pb::RunAggregateRequest::default())
            .await),
        "RevokeStudy" => ok(client
            .revoke_study(pb::RevokeStudyNodeRequest::default())
            .await),
        "RoundAdvertise" => ok(client
            .round_advertise(pb::RoundAdvertiseRequest::default())
            .await),
        "RoundShareKeys" => ok(client
            .round_share_keys(pb::RoundShareKeysRequest::default())
            .await),
        "RoundMaskedInput" => ok(client
            .round_masked_input(pb::RoundMaskedInputRequest::default())
            .await),
        "RoundUnmask" => ok(client.round_unmask(pb::RoundUnmaskRequest::default()).await),
        "SessionOpen" => ok(client
            .session_open(pb::RoundAdvertiseRequest::default())
            .await),
        "SessionAgree" => ok(client
            .session_agree(pb::SessionAgreeRequest::default())
            .await),
        "SessionInput" => ok(client
            .session_input(pb::SessionInputRequest::default())
            .await),
        "SessionRounds" => {
            let requests = futures::stream::iter([pb::SessionInputRequest::default()]);
            match client.session_rounds(requests).await {
                Ok(response) => {
                    let mut answers = response.into_inner();
                    match answers.message().await {
                        Err(status) => Err(status),
                        Ok(_) => Ok(()),
                    }
                }
                Err(status) => Err(status),
            }
        }
        other => panic!("no call for {other}"),
    }
}

const COORDINATOR_RPCS: [&str; 15] = [
    "RegisterNode",
    "ListNodes",
    "SubmitStudy",
    "ListStudies",
    "GetStudy",
    "ApproveStudy",
    "RejectStudy",
    "RevokeStudy",
    "RunStudy",
    "GetStudyResult",
    "StartTraining",
    "GetTraining",
    "ValidateModel",
    "RenewCertificate",
    "RelayExchange",
];

const NODE_RPCS: [&str; 13] = [
    "Health",
    "GetNodeInfo",
    "RunAggregate",
    "RevokeStudy",
    "RoundAdvertise",
    "RoundShareKeys",
    "RoundMaskedInput",
    "RoundUnmask",
    "SessionOpen",
    "SessionAgree",
    "SessionInput",
    "SessionRounds",
    "Exchange",
];

fn render(service: &str, rpcs: &[&str], verdicts: &[Vec<&str>]) -> String {
    let mut out = format!("{service:<18}");
    for (label, _) in CALLERS {
        out.push_str(&format!(" {label:>11}"));
    }
    out.push('\n');
    for (rpc, row) in rpcs.iter().zip(verdicts) {
        out.push_str(&format!("{rpc:<18}"));
        for v in row {
            out.push_str(&format!(" {v:>11}"));
        }
        out.push('\n');
    }
    out
}

async fn submitted(federation: &LocalFederation, member: &str, manifest: &[u8]) -> String {
    federation
        .client(member)
        .await
        .unwrap()
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_reaches_exactly_the_rpcs_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions::new(dir.path(), 40, 2026))
        .await
        .expect("the local federation starts");
    federation
        .pki
        .issue(
            &federation.pki.load_ca().unwrap(),
            &CertificateRequest::new("roles-admin", Role::NodeAdmin, "Chosun University Hospital"),
        )
        .unwrap();

    // The owner's study (approved), one pending study per caller to approve
    // and one to reject, and one approved study per caller to revoke.
    let owned = federation
        .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();
    let count = manifest_for("Roles", "HRESCH", &[("n", ghx_federation_tests::E11_COUNT)]);
    let (mut pending_approve, mut pending_reject, mut approved_revoke) = (vec![], vec![], vec![]);
    for _ in CALLERS {
        pending_approve.push(submitted(&federation, RESEARCHER, &count).await);
        pending_reject.push(submitted(&federation, RESEARCHER, &count).await);
        approved_revoke.push(
            federation
                .approved_study(RESEARCHER, count.clone())
                .await
                .unwrap(),
        );
    }
    // A training run of the owner's, for GetTraining (with so few patients
    // its rounds are refused; the run record exists either way).
    let run_id = federation
        .client(RESEARCHER)
        .await
        .unwrap()
        .start_training(pb::StartTrainingRequest {
            study_id: owned.clone(),
            training: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let studies = Studies {
        owned,
        pending_approve,
        pending_reject,
        approved_revoke,
        run_id,
    };

    let mut coordinator = vec![Vec::new(); COORDINATOR_RPCS.len()];
    let mut node = vec![Vec::new(); NODE_RPCS.len()];
    let chosun = federation
        .nodes
        .iter()
        .find(|n| n.profile.id == "chosun")
        .unwrap()
        .addr();
    for (caller, (_, member)) in CALLERS.iter().enumerate() {
        let files = federation.pki.tls_files(member);
        let mut client = federation.client(member).await.unwrap();
        for (row, rpc) in COORDINATOR_RPCS.iter().enumerate() {
            let outcome = coordinator_call(&mut client, rpc, caller, &studies).await;
            coordinator[row].push(verdict(outcome));
        }
        let tls = TlsMaterial::load(&files).unwrap();
        let channel = Endpoint::from_shared(format!("https://localhost:{}", chosun.port()))
            .unwrap()
            .tls_config(tls.client_config("chosun"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = NodeServiceClient::new(channel);
        for (row, rpc) in NODE_RPCS.iter().enumerate() {
            node[row].push(verdict(node_call(&mut client, rpc).await));
        }
        // Issue 38 (10): how much a hospital holds goes to the coordinator
        // only, in hundreds.
        let info = client
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        if *member == "coordinator" {
            assert!(!info.resource_counts.is_empty());
            assert!(
                info.resource_counts.values().all(|n| n % 100 == 0),
                "{info:?}"
            );
        } else {
            assert!(info.resource_counts.is_empty(), "{member}: {info:?}");
        }
    }

    let got = format!(
        "{}\n{}",
        render("coordinator", &COORDINATOR_RPCS, &coordinator),
        render("node", &NODE_RPCS, &node)
    );
    expect_test::expect![[r#"
        coordinator              owner   other-req   committee     auditor        node  node-admin coordinator   recipient
        RegisterNode                no          no          no          no          no         yes          no          no
        ListNodes                  yes         yes         yes         yes         yes         yes         yes         yes
        SubmitStudy                yes         yes          no          no          no          no          no          no
        ListStudies                yes         yes         yes         yes          no          no          no          no
        GetStudy                   yes          no         yes         yes          no          no          no          no
        ApproveStudy                no          no         yes          no          no          no          no          no
        RejectStudy                 no          no         yes          no          no          no          no          no
        RevokeStudy                 no          no         yes          no          no          no          no          no
        RunStudy                   yes          no          no          no          no          no          no          no
        GetStudyResult             yes          no         yes         yes          no          no          no          no
        StartTraining              yes          no          no          no          no          no          no          no
        GetTraining                yes          no         yes         yes          no          no          no          no
        ValidateModel              yes          no          no          no          no          no          no          no
        RenewCertificate            no          no          no          no         yes          no          no          no
        RelayExchange               no          no          no          no          no          no          no         yes

        node                     owner   other-req   committee     auditor        node  node-admin coordinator   recipient
        Health                     yes         yes         yes         yes         yes         yes         yes         yes
        GetNodeInfo                yes         yes         yes         yes         yes         yes         yes         yes
        RunAggregate                no          no          no          no          no          no         yes          no
        RevokeStudy                 no          no          no          no          no          no         yes          no
        RoundAdvertise              no          no          no          no          no          no         yes          no
        RoundShareKeys              no          no          no          no          no          no         yes          no
        RoundMaskedInput            no          no          no          no          no          no         yes          no
        RoundUnmask                 no          no          no          no          no          no         yes          no
        SessionOpen                 no          no          no          no          no          no         yes          no
        SessionAgree                no          no          no          no          no          no         yes          no
        SessionInput                no          no          no          no          no          no         yes          no
        SessionRounds               no          no          no          no          no          no         yes          no
        Exchange                    no          no          no          no          no          no         yes          no
    "#]].assert_eq(&got);

    // Issue 38 (10): a node-admin registers its own hospital's nodes only;
    // Chosun's cannot redirect Christian's node, register one under
    // another hospital's name, or add a new one.
    let mut admin = federation.client("roles-admin").await.unwrap();
    let register = |id: &str, name: &str| pb::RegisterNodeRequest {
        node: Some(pb::NodeRecord {
            node_id: id.to_owned(),
            endpoint: "https://attacker.invalid:443".into(),
            display_name: name.to_owned(),
        }),
    };
    for (id, name, why) in [
        (
            "christian",
            "Chosun University Hospital",
            "node `christian` is registered to Gwangju Christian Hospital",
        ),
        (
            "christian",
            "Gwangju Christian Hospital",
            "the node's display name must be `Chosun University Hospital`",
        ),
        (
            "roles-new",
            "Gwangju Christian Hospital",
            "the node's display name must be `Chosun University Hospital`",
        ),
        // Nor add a node id of its own: with a node certificate for it, it
        // would receive every query and manifest and join rounds. New
        // hospitals are added to the coordinator's configuration.
        (
            "roles-new",
            "Chosun University Hospital",
            "node `roles-new` is not one of this federation's nodes",
        ),
    ] {
        let refused = admin.register_node(register(id, name)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains(why), "{}", refused.message());
    }
    let listed = admin
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let christian = listed.iter().find(|n| n.node_id == "christian").unwrap();
    assert!(!christian.endpoint.contains("attacker"), "{christian:?}");
    federation.shutdown().await;
}
