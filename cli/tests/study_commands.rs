//! The requester's and committee's commands, run as the real `ghx` binary
//! against a federation started in this process: submit, list, approve at
//! quorum, run (a node that is down is reported, not dropped), result,
//! status, reject and revoke, in tables and in JSON.

use std::path::Path;

use ghx::local_federation::{
    COMMITTEE, COMMITTEE_2, LocalFederation, LocalFederationOptions, REQUESTER, manifest_for,
};
use ghx_pki::{CertificateRequest, Role};
use ghx_proto::v1 as pb;

mod common;
use common::ghx;

const E11: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count"}}"#;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_and_committee_commands_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 300,
        seed: 7,
        min_cell_size: 10,
        committee_quorum: 2,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        // A fourth hospital's node is registered below.
        open_registration: true,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .unwrap();
    let manifest = dir.path().join("study.json");
    std::fs::write(
        &manifest,
        manifest_for("T2D prevalence", "HRESCH", &[("e11-total", E11)]),
    )
    .unwrap();
    let manifest = manifest.to_str().unwrap();

    let (ok, out, err) = ghx(
        &federation,
        REQUESTER,
        &["study", "submit", manifest, "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let id = json(&out)["study_id"].as_str().unwrap().to_owned();
    let (ok, out, _) = ghx(&federation, REQUESTER, &["study", "submit", manifest]).await;
    assert!(ok && out.contains("submitted study-0002"), "{out}");

    // A manifest that is not one is refused before it is sent.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"version\":\"ghx.manifest/v1\"}").unwrap();
    let (ok, _, err) = ghx(
        &federation,
        REQUESTER,
        &["study", "submit", bad.to_str().unwrap()],
    )
    .await;
    assert!(
        !ok && err.contains("is not a valid study manifest"),
        "{err}"
    );

    let (ok, out, _) = ghx(&federation, COMMITTEE, &["committee", "list"]).await;
    assert!(
        ok && out.contains(&format!("{id}  submitted 0/2 approvals")),
        "{out}"
    );
    let (ok, out, _) = ghx(
        &federation,
        COMMITTEE,
        &["committee", "approve", &id, "--note", "IRB ok"],
    )
    .await;
    assert!(ok && out.contains("1/2 approvals"), "{out}");
    assert!(out.contains("approve by demo-committee: IRB ok"), "{out}");
    let (ok, _, err) = ghx(&federation, REQUESTER, &["study", "run", &id]).await;
    assert!(!ok && err.contains("1 of the 2 approvals"), "{err}");
    let (ok, out, _) = ghx(
        &federation,
        COMMITTEE_2,
        &["committee", "approve", &id, "--json"],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(json(&out)[0]["status"], "approved");

    // Hospital IT registers a fourth node that is not running (its own
    // hospital's: a node-admin registers only those): the run reports it
    // by name with the reason, and the others still answer.
    federation
        .pki
        .issue(
            &federation.pki.load_ca().unwrap(),
            &CertificateRequest::new("it-admin", Role::NodeAdmin, "A hospital that is down"),
        )
        .unwrap();
    let mut admin = federation.client("it-admin").await.unwrap();
    admin
        .register_node(pb::RegisterNodeRequest {
            node: Some(pb::NodeRecord {
                node_id: "ghost".into(),
                endpoint: "https://localhost:9".into(),
                display_name: "A hospital that is down".into(),
            }),
        })
        .await
        .unwrap();
    let (ok, out, err) = ghx(&federation, REQUESTER, &["study", "run", &id, "--json"]).await;
    assert!(ok, "{err}");
    let result = json(&out);
    assert_eq!(result["query"], "e11-total");
    assert_eq!(result["per_node"].as_array().unwrap().len(), 3);
    assert_eq!(result["failures"][0]["node_id"], "ghost");
    assert!(!result["failures"][0]["reason"].as_str().unwrap().is_empty());
    let (ok, out, _) = ghx(&federation, REQUESTER, &["study", "result", &id, "--json"]).await;
    assert!(ok);
    assert_eq!(json(&out), result);
    let (ok, out, _) = ghx(&federation, REQUESTER, &["study", "result", &id]).await;
    assert!(ok && out.contains("ghost: did not answer"), "{out}");
    let (ok, out, _) = ghx(&federation, REQUESTER, &["study", "status", &id]).await;
    assert!(
        ok && out.contains(&format!("{id}  approved  2/2 approvals")),
        "{out}"
    );

    // Reject the second study, revoke the first.
    let (ok, _, err) = ghx(
        &federation,
        COMMITTEE,
        &["committee", "reject", "study-0002", "--reason", ""],
    )
    .await;
    assert!(!ok && err.contains("needs a reason"), "{err}");
    let (ok, out, _) = ghx(
        &federation,
        COMMITTEE,
        &["committee", "reject", "study-0002", "--reason", "duplicate"],
    )
    .await;
    assert!(ok && out.contains("study-0002  rejected"), "{out}");
    let (ok, out, _) = ghx(
        &federation,
        COMMITTEE_2,
        &["committee", "revoke", &id, "--reason", "IRB suspended it"],
    )
    .await;
    assert!(
        ok && out.contains("revoke by demo-committee-2: IRB suspended it"),
        "{out}"
    );
    let (ok, _, err) = ghx(&federation, REQUESTER, &["study", "run", &id]).await;
    assert!(!ok && err.contains("is revoked"), "{err}");
    let (ok, out, _) = ghx(&federation, REQUESTER, &["study", "status", "--json"]).await;
    assert!(ok);
    let listed = json(&out);
    let statuses: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["revoked", "rejected"]);
    assert!(Path::new(&federation.dir.join("ghx-coordinator.db")).exists());
    federation.shutdown().await;
}
