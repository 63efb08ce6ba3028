//! `ghx audit` as the steering committee and hospital IT run it, the real
//! binary against the databases of a federation started in this process:
//! export every keeper's log, reconcile them, write the monthly review and
//! the FHIR export, then catch a tampered database and an injected query.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use ghx::local_federation::{LocalFederation, LocalFederationOptions, REQUESTER, manifest_for};

mod common;
use common::ghx;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_commands_verify_export_reconcile_and_review() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 300,
        seed: 5,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: Some(1),
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .unwrap();
    let query = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},"analysis":{"kind":"count"}}"#;
    let study = federation
        .approved_study(
            REQUESTER,
            manifest_for("audit", "HRESCH", &[("e11", query)]),
        )
        .await
        .unwrap();
    federation
        .client(REQUESTER)
        .await
        .unwrap()
        .run_study(ghx_proto::v1::RunStudyRequest {
            study_id: study.clone(),
            query: String::new(),
        })
        .await
        .unwrap();

    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let ca = federation
        .pki
        .tls_files("coordinator")
        .ca
        .to_str()
        .unwrap()
        .to_owned();
    let cert = |keeper: &str| {
        federation
            .pki
            .tls_files(keeper)
            .cert
            .to_str()
            .unwrap()
            .to_owned()
    };
    let keepers = [
        ("coordinator", path("ghx-coordinator.db")),
        ("chonnam", path("chonnam.db")),
        ("chosun", path("chosun.db")),
        ("christian", path("christian.db")),
    ];
    for (keeper, db) in &keepers {
        let out = path(&format!("{keeper}.audit.json"));
        let (ok, stdout, stderr) = ghx(
            &federation,
            REQUESTER,
            &[
                "audit",
                "export",
                "--db",
                db,
                "--cert",
                &cert(keeper),
                "--ca",
                &ca,
                "--out",
                &out,
            ],
        )
        .await;
        assert!(ok, "{keeper}: {stderr}");
        assert!(
            stdout.contains(&format!("{keeper}: audit log intact"))
                && stdout.contains("signed checkpoints checked"),
            "{stdout}"
        );
    }

    let reconcile = |chosun_export: String| {
        let mut args: Vec<String> = ["audit", "reconcile", "--ca", &ca, "--coordinator"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(path("coordinator.audit.json"));
        for node in [
            path("chonnam.audit.json"),
            chosun_export,
            path("christian.audit.json"),
        ] {
            args.push("--node".to_owned());
            args.push(node);
        }
        args
    };
    let args = reconcile(path("chosun.audit.json"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = ghx(&federation, REQUESTER, &args).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("3 requests matched, 0 alarms, 0 warnings"),
        "{stdout}"
    );

    let month = time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!("[year]-[month]"))
        .unwrap();
    let (ok, stdout, stderr) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "report",
            "--file",
            &path("coordinator.audit.json"),
            "--ca",
            &ca,
            "--month",
            &month,
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("# Access review: coordinator, {month}"))
            && stdout.contains(REQUESTER)
            && stdout.contains(&study),
        "{stdout}"
    );

    let fhir = path("chonnam.fhir.ndjson");
    let (ok, stdout, stderr) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "export",
            "--db",
            &keepers[1].1,
            "--cert",
            &cert("chonnam"),
            "--format",
            "fhir",
            "--month",
            &month,
            "--out",
            &fhir,
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let events = std::fs::read_to_string(&fhir).unwrap();
    assert!(
        stdout.contains(&format!(
            "wrote {} FHIR R4 AuditEvent resources",
            events.lines().count()
        )),
        "{stdout}"
    );
    assert!(
        events
            .lines()
            .all(|l| l.contains("\"resourceType\":\"AuditEvent\""))
    );

    // A query Chosun answered that the coordinator never sent.
    let chosun = &federation.nodes[1];
    let injected = chosun
        .store
        .append_audit(&ghx_audit::Entry {
            at: ghx_audit::now_rfc3339(),
            caller: "coordinator".into(),
            caller_role: "coordinator".into(),
            study_id: study.clone(),
            capability_id: "never-issued".into(),
            action: "aggregate".into(),
            decision: "answered".into(),
            query_sha256: "a".repeat(64),
            ..ghx_audit::Entry::default()
        })
        .unwrap();
    let injected_export = path("chosun.injected.json");
    let (ok, _, stderr) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "export",
            "--db",
            &keepers[2].1,
            "--cert",
            &cert("chosun"),
            "--out",
            &injected_export,
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let args = reconcile(injected_export);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, _) = ghx(&federation, REQUESTER, &args).await;
    assert!(!ok, "an injected query fails reconciliation");
    assert!(
        stdout.contains(&format!(
            "ALARM: chosun entry {injected}: chosun answered a aggregate request"
        )) && stdout.contains("the coordinator never sent"),
        "{stdout}"
    );

    // Someone edits Chonnam's database directly.
    SqliteConnection::establish(&keepers[1].1)
        .unwrap()
        .batch_execute("UPDATE audit_log SET decision = 'refused' WHERE seq = 1")
        .unwrap();
    let (ok, stdout, _) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "verify",
            "--db",
            &keepers[1].1,
            "--cert",
            &cert("chonnam"),
        ],
    )
    .await;
    assert!(!ok, "a tampered log fails verification");
    assert!(
        stdout.contains("chonnam: audit log BROKEN at entry 1: its contents do not match its hash"),
        "{stdout}"
    );

    // Chosun's log checked against the heads of it the coordinator holds:
    // intact up to the injected entry, which no head covers yet.
    let chosun_cert = cert("chosun");
    let verify_args = [
        "audit",
        "verify",
        "--db",
        &keepers[2].1,
        "--cert",
        &chosun_cert,
        "--witness-db",
        &keepers[0].1,
    ];
    let verify_chosun = || ghx(&federation, REQUESTER, &verify_args);
    let (ok, stdout, stderr) = verify_chosun().await;
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("witnessed through entry")
            && stdout.contains("1 later entries not yet witnessed"),
        "{stdout}"
    );
    // Then emptied, checkpoints and all (it answered one query, the
    // injected entry followed): nothing left to contradict, caught only
    // against the coordinator's heads.
    SqliteConnection::establish(&keepers[2].1)
        .unwrap()
        .batch_execute("DELETE FROM audit_log; DELETE FROM audit_checkpoints;")
        .unwrap();
    let (ok, stdout, _) = verify_chosun().await;
    assert!(!ok, "a cut log fails against its witness");
    assert!(
        stdout.contains("chosun: audit log BROKEN at entry 1: the log ends here, though")
            && stdout.contains("holds the keeper's signed head of entry"),
        "{stdout}"
    );

    // A database that is not there is named, and none is created.
    let missing = path("nowhere.db");
    let (ok, _, stderr) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "verify",
            "--db",
            &missing,
            "--cert",
            &cert("chonnam"),
        ],
    )
    .await;
    assert!(
        !ok && stderr.contains("nowhere.db") && stderr.contains("no such database file"),
        "{stderr}"
    );
    assert!(!std::path::Path::new(&missing).exists());

    // The wrong keeper's certificate is named as such.
    let (ok, _, stderr) = ghx(
        &federation,
        REQUESTER,
        &[
            "audit",
            "verify",
            "--file",
            &path("chosun.audit.json"),
            "--cert",
            &cert("chonnam"),
        ],
    )
    .await;
    assert!(
        !ok && stderr.contains("the certificate names `chonnam` but the log is `chosun`'s"),
        "{stderr}"
    );
    federation.shutdown().await;
}
