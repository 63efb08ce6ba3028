//! Whole-federation tests: a coordinator and three hospital nodes started in
//! this process on loopback, talking gRPC over mutual TLS with certificates
//! issued at test time.

use std::collections::BTreeMap;

use base64::Engine;

use ghx::local_federation::{
    COMMITTEE, COMMITTEE_2, LocalFederation, LocalFederationOptions, REQUESTER, SIGNING_KID,
    manifest_for, manifest_with_budget,
};
use ghx_federation_tests::reference::Export;
use ghx_node::consent::DefaultConsent;
use ghx_node::import::{ImportOptions, import_path};
use ghx_node::policy::PolicyDir;
use ghx_pki::{CertificateRequest, PkiDir, Role, TlsMaterial};
use ghx_proto::v1 as pb;
use ghx_proto::v1::node_service_client::NodeServiceClient;
use ghx_study::capability::{Signer, claims_for, generate_signing_key, revocation_for};
use ghx_study::manifest::StudyManifest;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const KCD8: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
const MIN_CELL: u32 = 10;

const E11_BY_SEX_AND_BAND: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count","group_by":["sex","age_band"]}}"#;

/// Whether the node's shipped consent policy counts patients without consent.
fn opt_out(federation: &LocalFederation, node: &str) -> bool {
    let policy = PolicyDir::load(&federation.dir.join("policies").join(node)).unwrap();
    policy.consent.default == DefaultConsent::OptOut
}

async fn start(patients: usize) -> (LocalFederation, tempfile::TempDir) {
    start_with_quorum(patients, 1).await
}

async fn start_with_quorum(patients: usize, quorum: usize) -> (LocalFederation, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: patients,
        seed: 2026,
        min_cell_size: MIN_CELL,
        committee_quorum: quorum,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .expect("the local federation starts");
    (federation, dir)
}

fn submit_request(purpose: &str, query: &str) -> pb::SubmitStudyRequest {
    pb::SubmitStudyRequest {
        manifest_json: manifest_for("E11 study", purpose, &[("q", query)]),
    }
}

async fn node_channel(
    files: &ghx_pki::TlsFiles,
    node_id: &str,
    port: u16,
) -> Result<Channel, tonic::transport::Error> {
    let tls = TlsMaterial::load(files).unwrap();
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls.client_config(node_id))
        .unwrap()
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_count_equals_the_reference_with_suppression_per_node() {
    let (federation, _dir) = start(1500).await;
    let mut requester = federation.client(REQUESTER).await.unwrap();
    let (study_id, result) = run_approved_study(&federation, "HRESCH", E11_BY_SEX_AND_BAND).await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    assert_eq!(result.per_node.len(), 3);

    // Expected: per node, the reference count with that node's suppression
    // applied; in total, the sum of released counts plus who suppressed.
    let mut expected_total: BTreeMap<Vec<String>, (u64, Vec<String>)> = BTreeMap::new();
    let mut saw_suppression = false;
    let mut saw_release = false;
    for node in &federation.nodes {
        let mut export = Export::read(&node.data_dir);
        export.opt_out = opt_out(&federation, node.profile.id);
        let reference = export.count_by_sex_and_band(KCD8, "E11", ghx_synth::default_as_of());
        let released = result
            .per_node
            .iter()
            .find(|r| r.node_id == node.profile.id)
            .unwrap_or_else(|| panic!("{} answered", node.profile.id));
        // (released count or None, withheld as a small cell itself)
        let got: BTreeMap<Vec<String>, (Option<u64>, bool)> = released
            .cells
            .iter()
            .map(|c| {
                let value = match c.value.as_ref().unwrap() {
                    pb::cell::Value::Count(n) => (Some(*n), false),
                    pb::cell::Value::Suppressed(s) => {
                        (None, s.reason.contains("below the minimum cell size"))
                    }
                    other => panic!("a count query answered {other:?}"),
                };
                (c.key.clone(), value)
            })
            .collect();
        let want: BTreeMap<Vec<String>, u64> = reference
            .iter()
            .map(|((sex, band), n)| (vec![sex.clone(), band.clone()], *n))
            .collect();
        // Every cell of the domain (4 sexes x 11 bands), empty ones too.
        assert_eq!(got.len(), 44, "cells of {}", node.profile.id);
        assert!(
            want.keys().all(|k| got.contains_key(k)),
            "cells of {}",
            node.profile.id
        );
        for (key, (value, small)) in &got {
            let n = want.get(key).copied().unwrap_or(0);
            match value {
                // A released count is exact.
                Some(released) => assert_eq!(*released, n, "{key:?} at {}", node.profile.id),
                // A withheld cell is small, or withheld to protect one
                // (complementary suppression, checked in node::release).
                None => assert_eq!(*small, n < u64::from(MIN_CELL), "{key:?}"),
            }
            if n < u64::from(MIN_CELL) {
                assert!(value.is_none(), "small cell {key:?} released");
            }
            let total = expected_total.entry(key.clone()).or_default();
            match value {
                Some(n) => {
                    total.0 += n;
                    saw_release = true;
                }
                None => {
                    total.1.push(node.profile.id.to_owned());
                    saw_suppression = true;
                }
            }
        }
        // Each node audited exactly one answered query for this study.
        let audit = node.store.audit_entries().unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (audit[0].decision.as_str(), audit[0].study_id.as_str()),
            ("answered", study_id.as_str())
        );
        assert_eq!(audit[0].caller_role, "coordinator");
        assert_eq!(audit[0].result_cells as usize, released.cells.len());
    }
    assert!(
        saw_release && saw_suppression,
        "the data exercise both release and suppression"
    );
    let got_total: BTreeMap<Vec<String>, (u64, Vec<String>)> = result
        .total
        .iter()
        .map(|t| {
            let mut at = t.suppressed_at.clone();
            at.sort();
            (t.key.clone(), (t.count, at))
        })
        .collect();
    for v in expected_total.values_mut() {
        v.1.sort();
    }
    assert_eq!(got_total, expected_total);

    // The stored result is what the requester fetches later.
    let fetched = requester
        .get_study_result(pb::GetStudyResultRequest {
            study_id,
            query: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(fetched, result);
    federation.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_need_a_committee_quorum_and_nodes_refuse_anything_unapproved() {
    let (federation, dir) = start_with_quorum(120, 2).await;
    let mut requester = federation.client(REQUESTER).await.unwrap();
    let mut committee = federation.client(COMMITTEE).await.unwrap();
    let mut committee_2 = federation.client(COMMITTEE_2).await.unwrap();
    let counts_before: Vec<_> = federation
        .nodes
        .iter()
        .map(|n| n.store.resource_counts().unwrap())
        .collect();

    // A malformed manifest or query is refused at submission, naming the problem.
    let bad_query = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"median"}}"#;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_for("t", "HRESCH", &[("q", E11_BY_SEX_AND_BAND)]))
            .unwrap();
    manifest["queries"][0]["query"] = serde_json::from_str(bad_query).unwrap();
    let err = requester
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest.to_string().into_bytes(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown variant `median`"),
        "{}",
        err.message()
    );
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&manifest_for("t", "HRESCH", &[("q", E11_BY_SEX_AND_BAND)]))
            .unwrap();
    manifest["purpose"] = "research".into();
    let err = requester
        .submit_study(pb::SubmitStudyRequest {
            manifest_json: manifest.to_string().into_bytes(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("unknown purpose `research`"),
        "{}",
        err.message()
    );
    // The committee cannot submit.
    let err = committee
        .submit_study(submit_request("HRESCH", E11_BY_SEX_AND_BAND))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let study_id = requester
        .submit_study(submit_request("HRESCH", E11_BY_SEX_AND_BAND))
        .await
        .unwrap()
        .into_inner()
        .study_id;
    // The requester is stamped from the certificate, whatever the file said.
    let summary = requester
        .get_study(pb::GetStudyRequest {
            study_id: study_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (summary.requester.as_str(), summary.status.as_str()),
        (REQUESTER, "submitted")
    );
    let err = requester
        .approve_study(pb::ApproveStudyRequest {
            study_id: study_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("role requester may not approve studies"),
        "{}",
        err.message()
    );

    // One approval of the two needed is not enough to run.
    let summary = committee
        .approve_study(pb::ApproveStudyRequest {
            study_id: study_id.clone(),
            note: "IRB letter checked".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.status.as_str(), summary.quorum), ("submitted", 2));
    let err = committee
        .approve_study(pb::ApproveStudyRequest {
            study_id: study_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("has already voted"),
        "{}",
        err.message()
    );
    let err = requester
        .run_study(pb::RunStudyRequest {
            study_id: study_id.clone(),
            query: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("1 of the 2 approvals"),
        "{}",
        err.message()
    );
    for node in &federation.nodes {
        assert!(node.store.audit_entries().unwrap().is_empty());
    }
    let summary = committee_2
        .approve_study(pb::ApproveStudyRequest {
            study_id: study_id.clone(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.status, "approved");

    // A second study is rejected, with its reason, and can never run.
    let rejected = requester
        .submit_study(submit_request("HRESCH", E11_BY_SEX_AND_BAND))
        .await
        .unwrap()
        .into_inner()
        .study_id;
    let err = committee
        .reject_study(pb::RejectStudyRequest {
            study_id: rejected.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("needs a reason"),
        "{}",
        err.message()
    );
    committee
        .reject_study(pb::RejectStudyRequest {
            study_id: rejected.clone(),
            reason: "duplicate of an approved study".into(),
        })
        .await
        .unwrap();
    let err = requester
        .run_study(pb::RunStudyRequest {
            study_id: rejected.clone(),
            query: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("is rejected"), "{}", err.message());

    // Straight to a node, bypassing the coordinator: a requester's valid
    // federation certificate is not enough.
    let chosun = &federation.nodes[1];
    let manifest_json = summary.manifest_json.clone();
    let manifest = StudyManifest::parse(&manifest_json).unwrap();
    let query = manifest.queries[0].query.canonical_json();
    let request = |capability: String, query: &[u8], manifest: &[u8]| pb::RunAggregateRequest {
        capability,
        query: Some(pb::QuerySpec {
            json: query.to_vec(),
        }),
        manifest_json: manifest.to_vec(),
    };
    let channel = node_channel(
        &federation.pki.tls_files(REQUESTER),
        "chosun",
        chosun.addr().port(),
    )
    .await
    .unwrap();
    let err = NodeServiceClient::new(channel)
        .run_aggregate(request("x".into(), &query, &manifest_json))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("only the coordinator may run queries"),
        "{}",
        err.message()
    );

    // With the coordinator's certificate, as if the coordinator host were
    // compromised: every token that is not exactly right is refused, each
    // with its own reason.
    let channel = node_channel(
        &federation.pki.tls_files("coordinator"),
        "chosun",
        chosun.addr().port(),
    )
    .await
    .unwrap();
    let mut node = NodeServiceClient::new(channel);
    let real_key =
        std::fs::read_to_string(federation.pki.root().join("coordinator-signing.pem")).unwrap();
    let signer = Signer::from_pem(SIGNING_KID, &real_key).unwrap();
    let claims = |query: &[u8], minutes: i64| {
        claims_for(
            &manifest,
            &study_id,
            vec!["chosun".into()],
            query,
            time::Duration::minutes(minutes),
        )
    };
    let (forged_key, _) = generate_signing_key().unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let good = signer.sign(&claims(&query, 5)).unwrap();
    let parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let tampered = {
        let mut body: serde_json::Value =
            serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
        body["aud"] = serde_json::json!(["chosun", "chonnam"]);
        format!("{}.{}.{}", parts[0], b64.encode(body.to_string()), parts[2])
    };
    let alg_none = format!(
        "{}.{}.",
        b64.encode(format!(r#"{{"alg":"none","kid":"{SIGNING_KID}"}}"#)),
        parts[1]
    );
    let not_in_manifest = E11_BY_SEX_AND_BAND.replace("E11", "I10");
    let not_in_manifest = ghx_study::query::QuerySpec::parse(not_in_manifest.as_bytes())
        .unwrap()
        .canonical_json();
    let mut other_manifest = manifest.clone();
    other_manifest.min_cell_size.default = 3;
    let forger = Signer::from_pem(SIGNING_KID, &forged_key).unwrap();
    let stranger = Signer::from_pem("coordinator-2099", &forged_key).unwrap();
    // (name, token, query, manifest, expected refusal)
    type Case<'a> = (&'a str, String, &'a [u8], Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "forged",
            forger.sign(&claims(&query, 5)).unwrap(),
            &query,
            manifest_json.clone(),
            "signature does not verify",
        ),
        (
            "tampered",
            tampered,
            &query,
            manifest_json.clone(),
            "signature does not verify",
        ),
        (
            "expired",
            signer.sign(&claims(&query, -5)).unwrap(),
            &query,
            manifest_json.clone(),
            "has expired",
        ),
        (
            "alg=none",
            alg_none,
            &query,
            manifest_json.clone(),
            "uses algorithm none",
        ),
        (
            "unknown kid",
            stranger.sign(&claims(&query, 5)).unwrap(),
            &query,
            manifest_json.clone(),
            "signing key `coordinator-2099`, which this node does not trust",
        ),
        (
            "query changed after signing",
            signer.sign(&claims(&query, 5)).unwrap(),
            &not_in_manifest,
            manifest_json.clone(),
            "different query",
        ),
        (
            "signed, but not in the manifest",
            signer.sign(&claims(&not_in_manifest, 5)).unwrap(),
            &not_in_manifest,
            manifest_json.clone(),
            "not one of the manifest's queries",
        ),
        (
            "another manifest than approved",
            signer.sign(&claims(&query, 5)).unwrap(),
            &query,
            other_manifest.canonical_json(),
            "not the one the capability was issued for",
        ),
    ];
    for (name, token, query, manifest, expected) in cases {
        let err = node
            .run_aggregate(request(token, query, &manifest))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().contains(expected),
            "{name}: {}",
            err.message()
        );
    }
    // A capability for Chosun is not valid at Chonnam.
    let chonnam = &federation.nodes[0];
    let channel = node_channel(
        &federation.pki.tls_files("coordinator"),
        "chonnam",
        chonnam.addr().port(),
    )
    .await
    .unwrap();
    let err = NodeServiceClient::new(channel)
        .run_aggregate(request(good.clone(), &query, &manifest_json))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("not addressed to node `chonnam`"),
        "{}",
        err.message()
    );

    // The right capability works once; the same token again is a replay.
    let answered = node
        .run_aggregate(request(good.clone(), &query, &manifest_json))
        .await
        .unwrap();
    assert!(answered.into_inner().result.is_some());
    let err = node
        .run_aggregate(request(good, &query, &manifest_json))
        .await
        .unwrap_err();
    assert!(err.message().contains("already used"), "{}", err.message());

    // Key rotation without restart: a new key dropped in the node's keys
    // directory is trusted for capabilities naming it.
    let (rotated_private, rotated_public) = generate_signing_key().unwrap();
    let keys_dir = federation.pki.root().join("rotated-keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    std::fs::write(keys_dir.join("coordinator-2027.pub.pem"), rotated_public).unwrap();
    let rotated = Signer::from_pem("coordinator-2027", &rotated_private).unwrap();
    let token = rotated.sign(&claims(&query, 5)).unwrap();
    node.run_aggregate(request(token, &query, &manifest_json))
        .await
        .unwrap();

    // Revocation: the committee revokes; nodes refuse the study's
    // capabilities from then on, even fresh ones signed with the real key.
    let summary = committee_2
        .revoke_study(pb::RevokeStudyRequest {
            study_id: study_id.clone(),
            reason: "the IRB suspended the protocol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.status, "revoked");
    let token = signer.sign(&claims(&query, 5)).unwrap();
    let err = node
        .run_aggregate(request(token, &query, &manifest_json))
        .await
        .unwrap_err();
    assert!(err.message().contains("was revoked"), "{}", err.message());
    let err = requester
        .run_study(pb::RunStudyRequest {
            study_id: study_id.clone(),
            query: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("is revoked"), "{}", err.message());
    // A revocation not signed by the coordinator is refused and changes nothing.
    let forged = forger
        .sign(&revocation_for(&rejected, vec!["chosun".into()], "forged"))
        .unwrap();
    let err = node
        .revoke_study(pb::RevokeStudyNodeRequest { revocation: forged })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("signature does not verify"),
        "{}",
        err.message()
    );
    assert!(!chosun.store.is_revoked(&rejected).unwrap());

    // Every step at the node was audited: refusals, answers, the revocation.
    let audit = chosun.store.audit_entries().unwrap();
    let count = |decision: &str| audit.iter().filter(|e| e.decision == decision).count();
    assert_eq!((count("answered"), count("revoked")), (2, 1));
    assert_eq!(
        count("refused"),
        1 + 8 + 1 + 1 + 1,
        "requester, 8 bad tokens, replay, revoked study, forged revocation"
    );
    assert_eq!(
        chonnam.store.audit_entries().unwrap().len(),
        2,
        "wrong audience, revocation"
    );
    // And at the coordinator: every step on the study, done or refused.
    let trail = federation.coordinator_audit();
    let steps: Vec<(&str, &str)> = trail
        .iter()
        .filter(|r| r.study_id == study_id && r.peer.is_empty())
        .map(|r| (r.action.as_str(), r.decision.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("submit", "done"),
            ("approve", "refused"),
            ("approve", "done"),
            ("approve", "refused"),
            ("run", "refused"),
            ("approve", "done"),
            ("revoke", "done"),
            ("run", "refused"),
        ]
    );
    // The revocation as sent to each node, for reconciliation.
    let sent: Vec<(&str, &str, &str)> = trail
        .iter()
        .filter(|r| r.study_id == study_id && !r.peer.is_empty())
        .map(|r| (r.action.as_str(), r.peer.as_str(), r.decision.as_str()))
        .collect();
    assert_eq!(
        sent,
        [
            ("revoke", "chonnam", "answered"),
            ("revoke", "chosun", "answered"),
            ("revoke", "christian", "answered")
        ]
    );

    // Another requester sees neither the study nor its results.
    federation
        .pki
        .issue(
            &federation.pki.load_ca().unwrap(),
            &CertificateRequest::new("other-requester", Role::Requester, "Other Startup"),
        )
        .unwrap();
    let mut other = federation.client("other-requester").await.unwrap();
    let err = other
        .get_study(pb::GetStudyRequest {
            study_id: study_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = other
        .get_study_result(pb::GetStudyResultRequest {
            study_id: study_id.clone(),
            query: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = other
        .list_studies(pb::ListStudiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.studies.is_empty());
    // An auditor sees every study.
    let mut auditor = federation.client("demo-auditor").await.unwrap();
    let listed = auditor
        .list_studies(pb::ListStudiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.studies.len(), 2);

    // A certificate from another CA is refused at the TLS handshake, by the
    // coordinator and by a node alike.
    let rogue = PkiDir::new(dir.path().join("rogue-pki"));
    let rogue_ca = rogue.init("Rogue").unwrap();
    rogue
        .issue(
            &rogue_ca,
            &CertificateRequest::new(REQUESTER, Role::Requester, "Rogue"),
        )
        .unwrap();
    let mut rogue_files = rogue.tls_files(REQUESTER);
    // Trust the real CA so that only the client side is wrong.
    rogue_files.ca = federation.pki.tls_files(REQUESTER).ca;
    let coordinator_url = format!("https://localhost:{}", federation.coordinator_addr.port());
    let try_coordinator = |files: ghx_pki::TlsFiles| {
        let url = coordinator_url.clone();
        async move {
            let mut client = ghx::client::connect_coordinator(&url, &files).await?;
            client.list_nodes(pb::ListNodesRequest {}).await?;
            anyhow::Ok(())
        }
    };
    let try_node = |files: ghx_pki::TlsFiles| async move {
        let channel = node_channel(&files, "chosun", chosun.addr().port()).await?;
        NodeServiceClient::new(channel)
            .get_node_info(pb::GetNodeInfoRequest {})
            .await?;
        anyhow::Ok(())
    };
    // The same calls succeed with the real certificates...
    try_coordinator(federation.pki.tls_files(REQUESTER))
        .await
        .unwrap();
    try_node(federation.pki.tls_files("coordinator"))
        .await
        .unwrap();
    // ...and fail with the rogue one.
    // In TLS 1.3 the client sends its certificate last and learns of the
    // refusal on its first read: as an UnknownCA alert or a closed
    // connection, by timing. Either way no application status was reached.
    for err in [
        try_coordinator(rogue_files.clone()).await.unwrap_err(),
        try_node(rogue_files).await.unwrap_err(),
    ] {
        let chain = format!("{err:#}");
        assert!(
            chain.contains("transport error"),
            "expected a TLS refusal, got: {chain}"
        );
    }

    // Nothing above changed any stored data.
    let counts_after: Vec<_> = federation
        .nodes
        .iter()
        .map(|n| n.store.resource_counts().unwrap())
        .collect();
    assert_eq!(counts_before, counts_after);
    federation.shutdown().await;
}

/// Submits, approves and runs a study; returns its id and result.
async fn run_approved_study(
    federation: &LocalFederation,
    purpose: &str,
    query: &str,
) -> (String, pb::StudyResult) {
    let study_id = federation
        .approved_study(REQUESTER, submit_request(purpose, query).manifest_json)
        .await
        .unwrap();
    let mut requester = federation.client(REQUESTER).await.unwrap();
    let result = requester
        .run_study(pb::RunStudyRequest {
            study_id: study_id.clone(),
            query: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    (study_id, result)
}

/// Runs an ungrouped count study; returns each node's released total (None
/// when suppressed) and the whole result.
async fn run_approved(
    federation: &LocalFederation,
    purpose: &str,
    query: &str,
) -> (BTreeMap<String, Option<u64>>, pb::StudyResult) {
    let (_, result) = run_approved_study(federation, purpose, query).await;
    let totals = result
        .per_node
        .iter()
        .map(|r| {
            let total = match r.cells.as_slice() {
                [cell] => match cell.value.as_ref().unwrap() {
                    pb::cell::Value::Count(n) => Some(*n),
                    pb::cell::Value::Suppressed(_) => None,
                    other => panic!("a count query answered {other:?}"),
                },
                _ => None,
            };
            (r.node_id.clone(), total)
        })
        .collect();
    (totals, result)
}

const E11_COUNT: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_consent_lowers_the_count_by_exactly_the_withdrawn_patients() {
    let (federation, dir) = start(400).await;
    let (before, result) = run_approved(&federation, "HRESCH", E11_COUNT).await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    let chosun = federation
        .nodes
        .iter()
        .find(|n| n.profile.id == "chosun")
        .unwrap();
    let mut export = Export::read(&chosun.data_dir);
    export.opt_out = opt_out(&federation, "chosun");
    let reference: u64 = export
        .count_by_sex_and_band(KCD8, "E11", ghx_synth::default_as_of())
        .values()
        .sum();
    assert_eq!(before["chosun"], Some(reference));

    // Twelve counted patients withdraw: six by a newer inactive Consent,
    // six by a newer Consent that denies research use.
    let mut counted: Vec<&String> = export
        .patients
        .keys()
        .filter(|id| export.research_permitted(id))
        .filter(|id| {
            export
                .conditions
                .get(*id)
                .is_some_and(|codes| codes.iter().any(|(s, c)| s == KCD8 && c.starts_with("E11")))
        })
        .filter(|id| export.patients[*id].1.is_some())
        .collect();
    counted.sort();
    let withdrawing = &counted[..12];
    assert!(reference >= 12 + u64::from(MIN_CELL), "cohort large enough");
    let lines: Vec<String> = withdrawing
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (status, rule) = if i % 2 == 0 { ("inactive", "permit") } else { ("active", "deny") };
            serde_json::json!({
                "resourceType": "Consent",
                "id": format!("{id}-withdrawal"),
                "status": status,
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
                "patient": {"reference": format!("Patient/{id}")},
                "dateTime": "2026-11-20T09:00:00+09:00",
                "provision": {"type": rule},
            })
            .to_string()
        })
        .collect();
    let withdrawals = dir.path().join("withdrawals");
    std::fs::create_dir_all(&withdrawals).unwrap();
    std::fs::write(withdrawals.join("Consent.ndjson"), lines.join("\n")).unwrap();
    let store = chosun.store.clone();
    let report = tokio::task::spawn_blocking(move || {
        import_path(&store, &withdrawals, &ImportOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);

    // The next run sees it at once: Chosun drops by exactly 12, others not.
    let (after, result) = run_approved(&federation, "HRESCH", E11_COUNT).await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    for node in &federation.nodes {
        let id = node.profile.id;
        let expected = if id == "chosun" {
            before[id].map(|n| n - 12)
        } else {
            before[id]
        };
        assert_eq!(after[id], expected, "{id}");
    }
    let notes = &result
        .per_node
        .iter()
        .find(|r| r.node_id == "chosun")
        .unwrap()
        .notes;
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("access: permitted by `research-aggregates`")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("consent withdrawn") && n.contains("consent denies this use")),
        "{notes:?}"
    );
    // Chosun's audit log records the exclusions, 12 more than before.
    let audit = chosun.store.audit_entries().unwrap();
    let [first, second] = audit.as_slice() else {
        panic!("two audited runs, got {}", audit.len())
    };
    assert_eq!(second.consent_excluded - first.consent_excluded, 12);
    assert_eq!(second.purpose, "HRESCH");
    assert!(
        second.policy_reasons.contains("research-aggregates"),
        "{}",
        second.policy_reasons
    );

    // Marketing is refused by every node's own policy, each named with why.
    let (_, result) = run_approved(&federation, "HMARKT", E11_COUNT).await;
    assert!(result.per_node.is_empty());
    let mut refused: Vec<&str> = result.failures.iter().map(|f| f.node_id.as_str()).collect();
    refused.sort();
    assert_eq!(refused, ["chonnam", "chosun", "christian"]);
    for failure in &result.failures {
        assert!(failure.reason.contains("no-marketing"), "{failure:?}");
    }
    let audit = chosun.store.audit_entries().unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.decision, "refused");
    assert!(
        last.policy_reasons.contains("forbidden by `no-marketing`"),
        "{}",
        last.policy_reasons
    );
    federation.shutdown().await;
}

/// Women and men only: a table lists every sex its cohort admits, and an
/// empty sex is protected like any small cell, which costs a released one.
const HBA1C_BY_SEX: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}],"sex":["female","male"]},
    "analysis":{"kind":"summary","variable":{"kind":"observation","system":"http://loinc.org","code":"4548-4"},"group_by":["sex"]}}"#;
const AGE_HISTOGRAM: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":0,"width":5,"count":24},"quantiles":[0.25,0.5,0.75]}}"#;
const NOISY_COUNT: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count","group_by":["sex"]},
    "noise":{"mechanism":"laplace","epsilon":0.2}}"#;

/// Summary statistics and quantiles combine exactly across hospitals, and
/// noised queries are charged to the study's budget until it is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_combine_exactly_and_noise_spends_the_budget() {
    use ghx_study::result::Moments;
    let (federation, _dir) = start(600).await;
    let manifest = manifest_with_budget(
        "E11 statistics",
        "HRESCH",
        &[
            ("hba1c", HBA1C_BY_SEX),
            ("age", AGE_HISTOGRAM),
            ("noisy", NOISY_COUNT),
        ],
        // Christian's policy admits budgets of at most 0.5.
        0.5,
    );
    let study_id = federation
        .approved_study(REQUESTER, manifest)
        .await
        .unwrap();
    let requester = federation.client(REQUESTER).await.unwrap();
    let run = |query: &'static str| {
        let mut requester = requester.clone();
        let study_id = study_id.clone();
        async move {
            requester
                .run_study(pb::RunStudyRequest {
                    study_id,
                    query: query.to_owned(),
                })
                .await
                .map(|r| r.into_inner().result.unwrap())
        }
    };

    // Mean and sd of HbA1c: the federated figure equals the one computed
    // on the three exports pooled together (no cell is small here).
    let result = run("hba1c").await.unwrap();
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    let mut pooled: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for node in &federation.nodes {
        let mut export = Export::read(&node.data_dir);
        export.opt_out = opt_out(&federation, node.profile.id);
        for (id, gender, _) in export.cohort(ghx_synth::default_as_of(), |id, _, _| {
            export.has_condition(id, KCD8, "E11")
        }) {
            if let Some(v) = export.latest_value(id, "4548-4") {
                pooled.entry(gender.to_owned()).or_default().push(v);
            }
        }
    }
    for total in &result.total {
        let got = total.summary.as_ref().expect("summary totals");
        assert!(total.suppressed_at.is_empty(), "{total:?}");
        let want = Moments::of(&pooled[&total.key[0]]);
        assert_eq!(got.n, want.n, "{:?}", total.key);
        assert!((got.mean - want.mean).abs() < 1e-9, "{:?}", total.key);
        assert!((got.m2 - want.m2).abs() < 1e-6 * want.m2, "{:?}", total.key);
        // Extremes are the 10th smallest/largest at some node: inside the
        // pooled range, never a lone patient's value.
        let (lo, hi) = (got.min.unwrap(), got.max.unwrap());
        assert!(
            want.min.unwrap() < lo && lo < want.mean && want.mean < hi && hi < want.max.unwrap()
        );
    }
    assert_eq!(result.total.len(), 2, "every sex the cohort admits");

    // Quantiles of age read off the combined histogram equal those of the
    // histogram of the pooled ages.
    let result = run("age").await.unwrap();
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    let bins = ghx_study::query::Bins {
        start: 0.0,
        width: 5.0,
        count: 24,
    };
    let mut counts = vec![0u64; 26];
    let mut partial = false;
    for node in &result.per_node {
        for cell in &node.cells {
            match cell.value.as_ref().unwrap() {
                pb::cell::Value::Count(n) => counts[bins.index_of(&cell.key[0]).unwrap()] += n,
                _ => partial = true,
            }
        }
    }
    assert_eq!(result.quantiles.len(), 3);
    for q in &result.quantiles {
        assert_eq!(q.partial, partial);
        assert_eq!(
            q.value,
            ghx_study::result::quantile_of_counts(&counts, &bins, q.q)
        );
    }
    let median = result.quantiles[1].value.unwrap();
    assert!(
        (40.0..80.0).contains(&median),
        "median age of diabetics {median}"
    );

    // Noise: each run is charged 0.2 of the 0.5 budget at every node; the
    // third is refused by every node, naming the budget.
    let exact = run_approved(
        &federation,
        "HRESCH",
        &NOISY_COUNT.replace(r#","noise":{"mechanism":"laplace","epsilon":0.2}"#, ""),
    )
    .await
    .1;
    for round in 1..=2 {
        let result = run("noisy").await.unwrap();
        assert!(result.failures.is_empty(), "{:?}", result.failures);
        for node in &result.per_node {
            let noise = node.noise.as_ref().expect("a noise statement");
            assert_eq!((noise.mechanism.as_str(), noise.epsilon), ("laplace", 0.2));
            let spent = format!("spent epsilon {:.4} of 0.5000", 0.2 * f64::from(round));
            assert!(
                node.notes.iter().any(|n| n.contains(&spent)),
                "{}: {:?}",
                node.node_id,
                node.notes
            );
            // Every sex is present, noised, even where no patient is.
            assert_eq!(node.cells.len(), 4, "{:?}", node.cells);
        }
        // Noisy totals are near the exact ones (scale 5 per cell and node).
        for (noisy, exact) in result.total.iter().zip(&exact.total) {
            if noisy.key == exact.key
                && noisy.suppressed_at.is_empty()
                && exact.suppressed_at.is_empty()
            {
                assert!(
                    noisy.count.abs_diff(exact.count) < 60,
                    "{noisy:?} vs {exact:?}"
                );
            }
        }
    }
    let result = run("noisy").await.unwrap();
    assert!(result.per_node.is_empty());
    assert_eq!(result.failures.len(), 3);
    for failure in &result.failures {
        assert!(
            failure.reason.contains("privacy budget of study")
                && failure
                    .reason
                    .contains("0.4000 of 0.5000 epsilon already spent"),
            "{failure:?}"
        );
    }
    federation.shutdown().await;
}
