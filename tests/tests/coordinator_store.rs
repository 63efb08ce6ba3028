//! The coordinator's durable state, run against SQLite and the real
//! PostgreSQL: committee decisions, results and the audit trail survive a
//! restart (a new `StudyBook` over the same database).

use ghx_audit::Entry as AuditRecord;
use ghx_coordinator::store::{CoordinatorStore, TrainingRunRow};
use ghx_coordinator::studies::{Committee, Error, StudyBook, StudyResult, StudyStatus};
use ghx_federation_tests::backend::Backend;
use ghx_study::manifest::StudyManifest;
use ghx_study::result::{AggregateResult, Cell, CellValue, NodeFailure, TotalCell};

/// A database URL on one backend plus whatever keeps it alive.
type Fixture = Backend;

fn sqlite() -> Fixture {
    Backend::sqlite("coordinator.db")
}

fn postgres() -> Fixture {
    Backend::postgres()
}

ghx_federation_tests::suite!(
    a_study_needs_a_quorum_of_distinct_members_then_can_be_revoked,
    a_rejected_study_cannot_be_approved_later,
    state_results_and_audit_survive_a_restart,
    training_runs_are_saved_updated_and_listed_by_status,
);

fn book(f: &Fixture, quorum: usize) -> StudyBook {
    StudyBook::new(
        Committee {
            quorum,
            members: vec!["kim".into(), "lee".into(), "park".into()],
        },
        CoordinatorStore::open(&f.url).unwrap(),
    )
}

fn manifest() -> StudyManifest {
    let mut m =
        StudyManifest::parse(include_str!("../../deploy/examples/study-e11.json").as_bytes())
            .unwrap();
    m.requester.user = "alice".into();
    m.requester.organisation = "Acme".into();
    m
}

fn a_study_needs_a_quorum_of_distinct_members_then_can_be_revoked(f: Fixture) {
    let book = book(&f, 2);
    let id = book.submit(manifest()).unwrap();
    assert_eq!(id, "study-0001");
    assert_eq!(
        book.runnable(&id).unwrap_err(),
        Error::AwaitingQuorum(id.clone(), 0, 2)
    );
    assert_eq!(
        book.approve(&id, "mallory", "").unwrap_err(),
        Error::NotAMember("mallory".into())
    );
    assert_eq!(
        book.approve(&id, "kim", "ok").unwrap().status,
        StudyStatus::Submitted
    );
    assert_eq!(
        book.approve(&id, "kim", "again").unwrap_err(),
        Error::AlreadyVoted {
            id: id.clone(),
            member: "kim".into()
        }
    );
    assert_eq!(
        book.runnable(&id).unwrap_err(),
        Error::AwaitingQuorum(id.clone(), 1, 2)
    );
    assert_eq!(
        book.approve(&id, "lee", "").unwrap().status,
        StudyStatus::Approved
    );
    assert!(book.runnable(&id).is_ok());
    assert_eq!(
        book.revoke(&id, "park", " ").unwrap_err(),
        Error::NoReason("revocation")
    );
    let revoked = book
        .revoke(&id, "park", "consent form was withdrawn")
        .unwrap();
    assert_eq!(revoked.status, StudyStatus::Revoked);
    assert!(matches!(
        book.runnable(&id).unwrap_err(),
        Error::WrongState {
            status: "revoked",
            ..
        }
    ));
    let decisions: Vec<(&str, &str)> = revoked
        .votes
        .iter()
        .map(|v| (v.member.as_str(), v.decision.as_str()))
        .collect();
    assert_eq!(
        decisions,
        [("kim", "approve"), ("lee", "approve"), ("park", "revoke")]
    );
}

fn a_rejected_study_cannot_be_approved_later(f: Fixture) {
    let book = book(&f, 1);
    let id = book.submit(manifest()).unwrap();
    book.reject(&id, "kim", "no IRB approval for this purpose")
        .unwrap();
    assert!(matches!(
        book.approve(&id, "lee", "").unwrap_err(),
        Error::WrongState {
            status: "rejected",
            ..
        }
    ));
    assert_eq!(
        book.get("study-9999").unwrap_err(),
        Error::NotFound("study-9999".into())
    );
    assert_eq!(book.submit(manifest()).unwrap(), "study-0002");
}

fn state_results_and_audit_survive_a_restart(f: Fixture) {
    let result = StudyResult {
        query: "e11-total".into(),
        dimensions: vec![],
        per_node: vec![AggregateResult {
            node_id: "chosun".into(),
            dimensions: vec![],
            cells: vec![Cell {
                key: vec![],
                value: CellValue::Count(42),
            }],
            min_cell_size: 10,
            notes: vec!["consent: none of 100 patients excluded".into()],
            analysis: "count".into(),
            noise: Some(ghx_study::result::NoiseStatement {
                mechanism: "laplace".into(),
                epsilon: 0.5,
                delta: 0.0,
                detail: "each count: sensitivity 1".into(),
            }),
        }],
        failures: vec![NodeFailure {
            node_id: "chonnam".into(),
            reason: "no answer within 30 s".into(),
        }],
        total: vec![TotalCell {
            key: vec![],
            count: 42,
            suppressed_at: vec![],
            summary: None,
            rate: None,
            withheld: None,
        }],
        quantiles: vec![ghx_study::result::Quantile {
            group: vec![],
            q: 0.5,
            value: Some(7.25),
            partial: false,
        }],
        rate_per: 0,
        pooled: None,
    };
    let mut audit = AuditRecord {
        at: "2026-11-25T00:00:00Z".into(),
        caller: "kim".into(),
        caller_role: "committee".into(),
        action: "approve".into(),
        study_id: "study-0001".into(),
        decision: "done".into(),
        reason: "IRB letter checked".into(),
        ..AuditRecord::default()
    };
    let id = {
        let book = book(&f, 1);
        let id = book.submit(manifest()).unwrap();
        book.approve(&id, "kim", "IRB letter checked").unwrap();
        book.record_result(&id, &result).unwrap();
        book.store().audit_log().append(&audit).unwrap();
        id
    };
    // A new process over the same database.
    let book = book(&f, 1);
    let study = book.runnable(&id).unwrap();
    assert_eq!(study.manifest, manifest());
    assert_eq!(study.manifest_json, manifest().canonical_json());
    assert_eq!(book.result(&id, "").unwrap(), result);
    assert_eq!(book.result(&id, "e11-total").unwrap(), result);
    assert_eq!(
        book.result(&id, "e11-by-sex-and-age").unwrap_err(),
        Error::NoResult(id.clone())
    );
    assert!(matches!(
        book.result(&id, "nope").unwrap_err(),
        Error::NoSuchQuery { .. }
    ));
    audit.chain(1, ghx_audit::GENESIS);
    assert_eq!(book.store().audit_log().entries().unwrap(), vec![audit]);
    assert_eq!(book.list().unwrap().len(), 1);
}

fn training_runs_are_saved_updated_and_listed_by_status(f: Fixture) {
    let b = book(&f, 1);
    let id = b.submit(manifest()).unwrap();
    let store = CoordinatorStore::open(&f.url).unwrap();
    let row = |run: &str, status: &str, json: &str| TrainingRunRow {
        id: run.to_owned(),
        study_id: id.clone(),
        training: "t".to_owned(),
        status: status.to_owned(),
        record_json: json.to_owned(),
        updated_at: "2026-11-29T00:00:00Z".to_owned(),
    };
    let round = |n: u32| (n, format!(r#"{{"round":{n}}}"#));
    store
        .save_training_run(&row("run-0001", "running", "{}"), &[round(1)])
        .unwrap();
    store
        .save_training_run(&row("run-0002", "running", "{}"), &[])
        .unwrap();
    // An update replaces status and record, keeping one row per run; its
    // rounds are added to those stored, a round stored before is kept as
    // it was.
    store
        .save_training_run(
            &row("run-0001", "completed", r#"{"done":true}"#),
            &[(1, "changed".to_owned()), round(2), round(3)],
        )
        .unwrap();
    let all = store.training_runs(None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].status, "completed");
    assert_eq!(all[0].record_json, r#"{"done":true}"#);
    assert_eq!(
        store.training_rounds("run-0001").unwrap(),
        vec![round(1).1, round(2).1, round(3).1]
    );
    assert!(store.training_rounds("run-0002").unwrap().is_empty());
    // A round of a run that is not stored is refused with the run, which
    // is not stored either.
    assert!(
        store
            .save_training_run(
                &TrainingRunRow {
                    study_id: "no-such-study".to_owned(),
                    ..row("run-0003", "running", "{}")
                },
                &[round(1)],
            )
            .is_err()
    );
    assert!(store.training_rounds("run-0003").unwrap().is_empty());
    // A restarted coordinator finds what is still running.
    let reopened = CoordinatorStore::open(&f.url).unwrap();
    let running = reopened.training_runs(Some("running")).unwrap();
    assert_eq!(running, vec![row("run-0002", "running", "{}")]);
}
