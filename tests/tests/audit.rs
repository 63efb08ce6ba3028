//! The audit log under attack, on SQLite and the real PostgreSQL: each way
//! of tampering with the database directly (edit, delete, reorder, insert,
//! rewrite-and-rechain, truncate, forge a checkpoint) is caught at the right
//! entry; expiry keeps what is left verifiable; entries written before the
//! log was chained are chained when the store opens.
//!
//! Then across a running federation: the coordinator's record of what it
//! sent reconciles with every node's record of what it answered, and a query
//! injected at one node is an alarm naming it; and each side holds the
//! other's signed heads, so a tail deleted or rewritten together with its
//! checkpoints is caught against the other side's database.

use diesel::prelude::*;
use ghx::audit_files::{Expect, witnesses_among};
use ghx::local_federation::{
    LocalFederation, LocalFederationOptions, NodeLink, REQUESTER, manifest_for,
};
use ghx_audit::checkpoint::{Signer, Verifier};
use ghx_audit::verify::{Broken, Problem, verify};
use ghx_audit::{Entry, GENESIS};
use ghx_db::audit::AuditLog;
use ghx_federation_tests::backend::Backend;
use ghx_federation_tests::postgres::TestDatabase;
use ghx_node::Store;
use ghx_pki::{CertificateAuthority, CertificateRequest, Role};

/// A node database on one backend with a signed log of ten entries
/// (checkpoints every four), and a raw connection for tampering.
struct Fixture {
    url: String,
    log: AuditLog,
    verifier: Verifier,
    _dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

fn entry(i: usize, at: &str) -> Entry {
    Entry {
        at: at.to_owned(),
        caller: "coordinator".into(),
        caller_role: "coordinator".into(),
        requester: "demo-requester".into(),
        study_id: format!("study-{:04}", 1 + i % 3),
        capability_id: format!("cap-{i}"),
        action: "aggregate".into(),
        decision: "answered".into(),
        reason: "0 cells suppressed".into(),
        query_sha256: format!("{i:064x}"),
        result_cells: 4,
        ..Entry::default()
    }
}

fn fixture(backend: Backend) -> Fixture {
    let Backend { url, dir, pg } = backend;
    let store = Store::open(&url).unwrap();
    let ca = CertificateAuthority::create("G-Health").unwrap();
    let node = ca
        .issue(&CertificateRequest::new(
            "chonnam",
            Role::Node,
            "Chonnam National University Hospital",
        ))
        .unwrap();
    let log = store
        .audit_log()
        .clone()
        .signed_by(Signer::from_pem("chonnam", &node.key_pem).unwrap(), 4);
    for i in 0..10 {
        log.append(&entry(i, &ghx_audit::now_rfc3339())).unwrap();
    }
    Fixture {
        url,
        log,
        verifier: Verifier::from_certificate_pem(&node.cert_pem).unwrap(),
        _dir: dir,
        _pg: pg,
    }
}

fn sqlite() -> Fixture {
    fixture(Backend::sqlite("node.db"))
}

fn postgres() -> Fixture {
    fixture(Backend::postgres())
}

impl Fixture {
    /// Runs SQL straight against the database, as an intruder would.
    fn tamper(&self, sql: &str) {
        use diesel::connection::SimpleConnection;
        if self.url.starts_with("postgres") {
            PgConnection::establish(&self.url)
                .unwrap()
                .batch_execute(sql)
                .unwrap();
        } else {
            SqliteConnection::establish(&self.url)
                .unwrap()
                .batch_execute(sql)
                .unwrap();
        }
    }

    fn broken(&self) -> Option<Broken> {
        let v = verify(
            &self.log.entries().unwrap(),
            &self.log.checkpoints().unwrap(),
            Some(&self.verifier),
        );
        v.broken
    }

    /// Overwrites entry `e` (by its seq) with all its columns.
    fn overwrite(&self, e: &Entry) {
        self.tamper(&format!(
            "UPDATE audit_log SET action = '{}', decision = '{}', prev_hash = '{}', hash = '{}' \
             WHERE seq = {}",
            e.action, e.decision, e.prev_hash, e.hash, e.seq
        ));
    }
}

ghx_federation_tests::suite!(
    heads_are_signed_once_each_and_witnessed_once_per_entry,
    an_untouched_log_verifies_with_its_signatures,
    an_edited_entry_is_named,
    a_deleted_entry_is_named,
    reordered_entries_are_named,
    an_inserted_entry_is_named_even_with_a_valid_hash,
    a_rewritten_and_rechained_log_fails_at_its_checkpoint,
    a_truncated_tail_fails_at_its_checkpoint,
    a_forged_checkpoint_is_named,
    expiry_keeps_the_rest_verifiable,
    entries_from_before_chaining_are_chained_on_open,
);

fn an_untouched_log_verifies_with_its_signatures(f: Fixture) {
    let v = verify(
        &f.log.entries().unwrap(),
        &f.log.checkpoints().unwrap(),
        Some(&f.verifier),
    );
    assert!(v.is_intact(), "{:?}", v.broken);
    // Checkpoints at 4 and 8: two signatures checked, 9 and 10 unsigned.
    assert_eq!(
        (
            v.entries,
            v.checkpoints_checked,
            v.signed_through,
            v.unsigned_tail
        ),
        (10, 2, Some(8), 2)
    );
    let entries = f.log.entries().unwrap();
    assert_eq!(entries[0].prev_hash, GENESIS);
    assert_eq!(entries[5].prev_hash, entries[4].hash);
}

fn heads_are_signed_once_each_and_witnessed_once_per_entry(f: Fixture) {
    use ghx_audit::checkpoint::Checkpoint;
    use ghx_db::witnesses::{NoteError, Refused};
    let head = f
        .log
        .signed_head()
        .unwrap()
        .expect("a signed log has a head");
    let (cp, _) = Checkpoint::from_token(&head).unwrap();
    assert_eq!(cp.seq, 10);
    f.verifier.check(&cp).unwrap();
    assert_eq!(f.log.signed_head().unwrap().as_ref(), Some(&head));

    // Kept once per entry, only under the keeper that signed it; this
    // database stands for the other side's.
    let witnesses = f.log.witnesses();
    assert!(witnesses.all().unwrap().is_empty());
    assert!(witnesses.note("chonnam", &head).unwrap());
    assert!(!witnesses.note("chonnam", &head).unwrap());
    assert!(matches!(
        witnesses.note("chosun", &head),
        Err(NoteError::Refused(Refused::OtherKeeper { .. }))
    ));
    assert!(matches!(
        witnesses.note("chonnam", "not a token"),
        Err(NoteError::Refused(Refused::NotAToken))
    ));
    f.log.append(&entry(10, &ghx_audit::now_rfc3339())).unwrap();
    let next = f.log.signed_head().unwrap().unwrap();
    assert_ne!(next, head);
    assert!(witnesses.note("chonnam", &next).unwrap());
    // Every head is kept: a newer one vouches only for the chain as it is
    // now, an older one is the evidence of a rewrite.
    let held = witnesses.all().unwrap();
    assert_eq!(held.len(), 2);
    assert!(held.iter().all(|h| h.keeper == "chonnam"));

    // Past retention, each keeper's newest head stays.
    let far = ghx_audit::OffsetDateTime::now_utc().unix_timestamp() + 10;
    assert_eq!(witnesses.expire_before(far).unwrap(), 1);
    let held = witnesses.all().unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].token, next);
}

fn an_edited_entry_is_named(f: Fixture) {
    f.tamper("UPDATE audit_log SET decision = 'refused' WHERE seq = 5");
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 5,
            problem: Problem::Edited
        })
    );
}

fn a_deleted_entry_is_named(f: Fixture) {
    f.tamper("DELETE FROM audit_log WHERE seq = 6");
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 6,
            problem: Problem::Missing { next: 7 }
        })
    );
}

fn reordered_entries_are_named(f: Fixture) {
    f.tamper(
        "UPDATE audit_log SET seq = -3 WHERE seq = 3; \
         UPDATE audit_log SET seq = 3 WHERE seq = 7; \
         UPDATE audit_log SET seq = 7 WHERE seq = -3;",
    );
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 3,
            problem: Problem::Edited
        })
    );
}

fn an_inserted_entry_is_named_even_with_a_valid_hash(f: Fixture) {
    // The intruder knows the hash function: the inserted entry links to
    // entry 5 and hashes correctly, and everything after moves up one.
    let entries = f.log.entries().unwrap();
    let mut injected = entry(99, &entries[4].at);
    injected.chain(6, &entries[4].hash);
    f.tamper(
        "UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 6; \
         UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1006;",
    );
    f.tamper(&format!(
        "INSERT INTO audit_log (seq, at, caller, caller_role, caller_org, source, requester, \
         requester_org, study_id, capability_id, action, peer, decision, reason, purpose, \
         policy_reasons, query_sha256, result_sha256, result_cells, consent_excluded, epsilon, \
         prev_hash, hash) VALUES (6, '{}', '{}', '{}', '', '', '{}', '', '{}', '{}', '{}', '', \
         '{}', '{}', '', '', '{}', '', {}, 0, 0, '{}', '{}')",
        injected.at,
        injected.caller,
        injected.caller_role,
        injected.requester,
        injected.study_id,
        injected.capability_id,
        injected.action,
        injected.decision,
        injected.reason,
        injected.query_sha256,
        injected.result_cells,
        injected.prev_hash,
        injected.hash
    ));
    // Entry 6 is consistent; the old entry 6, now at 7, is not.
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 7,
            problem: Problem::Edited
        })
    );
}

fn a_rewritten_and_rechained_log_fails_at_its_checkpoint(f: Fixture) {
    // Edit entry 3 and rebuild every hash after it: the chain is consistent
    // again, but entry 4 no longer has the hash the node signed.
    let mut entries = f.log.entries().unwrap();
    entries[2].decision = "refused".into();
    let prev = entries[1].hash.clone();
    ghx_audit::verify::chain_all(&mut entries[2..], 3, &prev);
    for e in &entries[2..] {
        f.overwrite(e);
    }
    assert!(
        verify(&f.log.entries().unwrap(), &[], None).is_intact(),
        "the rechained log is consistent on its own"
    );
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 4,
            problem: Problem::Rewritten
        })
    );
}

fn a_truncated_tail_fails_at_its_checkpoint(f: Fixture) {
    f.tamper("DELETE FROM audit_log WHERE seq >= 7");
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 7,
            problem: Problem::Truncated { signed_through: 8 }
        })
    );
}

fn a_forged_checkpoint_is_named(f: Fixture) {
    // A rechained log with checkpoints re-signed by another key.
    let other = CertificateAuthority::create("Elsewhere")
        .unwrap()
        .issue(&CertificateRequest::new("chonnam", Role::Node, "x"))
        .unwrap();
    let forged = Signer::from_pem("chonnam", &other.key_pem)
        .unwrap()
        .sign(4, &"f".repeat(64))
        .unwrap();
    f.tamper(&format!(
        "UPDATE audit_checkpoints SET hash = '{}', token = '{}' WHERE seq = 4",
        forged.hash, forged.token
    ));
    let broken = f.broken().unwrap();
    assert_eq!(broken.seq, 4);
    assert!(
        matches!(broken.problem, Problem::BadCheckpoint(_)),
        "{broken}"
    );
}

fn expiry_keeps_the_rest_verifiable(f: Fixture) {
    // Nothing here is two years old: routine upkeep signs and keeps all.
    let settings = ghx_audit::Settings::default();
    assert_eq!(f.log.maintain(&settings).unwrap().deleted, 0);

    // With a cutoff after every entry, expiry stops at the last signed
    // checkpoint among them (upkeep just signed one at 10, the head), short
    // of the last entry, which always stays.
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let cutoff = later
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let expired = f.log.expire_before(&cutoff).unwrap();
    assert_eq!((expired.deleted, expired.anchor), (8, Some(8)));
    assert_eq!(f.broken(), None);
    // Issue 38 (9): a start is taken for expiry only on a checkpoint
    // signed more than the retention period ago. Today, the head deleted up
    // to a checkpoint signed just now is a deletion; in two years and a
    // day, the same log is expired as it should be.
    let retained = |days_on: i64| {
        ghx_audit::verify::verify_retained(
            &f.log.entries().unwrap(),
            &f.log.checkpoints().unwrap(),
            Some(&f.verifier),
            ghx_audit::verify::Retention {
                days: ghx_audit::MIN_RETENTION_DAYS,
                now: time::OffsetDateTime::now_utc() + time::Duration::days(days_on),
            },
        )
    };
    let early = retained(0).broken.expect("a head deleted, not expired");
    assert_eq!(early.seq, 9);
    assert!(
        matches!(
            early.problem,
            Problem::EarlyExpiry {
                retention_days: 730,
                ..
            }
        ),
        "{early}"
    );
    assert!(retained(731).is_intact(), "{:?}", retained(731).broken);

    // Appending continues the chain, and the log verifies from its new
    // first entry, anchored by the signed checkpoint at 8.
    let next = f.log.append(&entry(11, &ghx_audit::now_rfc3339())).unwrap();
    assert_eq!(next.seq, 11);
    let v = verify(
        &f.log.entries().unwrap(),
        &f.log.checkpoints().unwrap(),
        Some(&f.verifier),
    );
    assert!(v.is_intact(), "{:?}", v.broken);
    assert_eq!((v.first_seq, v.last_seq), (Some(9), Some(11)));

    // Deleting the new first entry outside expiry leaves nothing to anchor
    // the log at 10.
    f.tamper("DELETE FROM audit_log WHERE seq = 9");
    assert_eq!(
        f.broken(),
        Some(Broken {
            seq: 10,
            problem: Problem::Unanchored
        })
    );
}

fn entries_from_before_chaining_are_chained_on_open(f: Fixture) {
    // Rows as an older ghx wrote them: no links.
    f.tamper(
        "INSERT INTO audit_log (seq, at, caller, caller_role, caller_org, study_id, \
         capability_id, action, decision, reason, query_sha256, result_cells, purpose, \
         policy_reasons, consent_excluded) VALUES \
         (11, '2026-11-29T00:00:00Z', 'coordinator', 'coordinator', '', 's', 'c', 'aggregate', \
          'answered', '', '', 0, '', '', 0), \
         (12, '2026-11-29T00:00:01Z', 'coordinator', 'coordinator', '', 's', 'c', 'aggregate', \
          'refused', 'no', '', 0, '', '', 0)",
    );
    assert!(!verify(&f.log.entries().unwrap(), &[], None).is_intact());
    let reopened = Store::open(&f.url).unwrap();
    let entries = reopened.audit_entries().unwrap();
    assert_eq!(entries.len(), 12);
    assert_eq!(entries[10].prev_hash, entries[9].hash);
    assert_eq!(f.broken(), None);
}

/// A federation in `dir` with a count of E11 approved as one study and run
/// `runs` times; its checkpoints every `every` entries.
async fn queried_federation(
    dir: &std::path::Path,
    seed: u64,
    every: i64,
    node_link: NodeLink,
    runs: usize,
) -> (LocalFederation, String) {
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.to_owned(),
        patients_per_node: 200,
        seed,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: Some(every),
        node_link,
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .unwrap();
    let manifest = manifest_for(
        "audit",
        "HRESCH",
        &[(
            "e11",
            r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},"analysis":{"kind":"count"}}"#,
        )],
    );
    let study = federation
        .approved_study(REQUESTER, manifest)
        .await
        .unwrap();
    let mut client = federation.client(REQUESTER).await.unwrap();
    for _ in 0..runs {
        client
            .run_study(ghx_proto::v1::RunStudyRequest {
                study_id: study.clone(),
                query: String::new(),
            })
            .await
            .unwrap();
    }
    (federation, study)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_and_the_nodes_reconcile_and_an_injected_query_is_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let (federation, study) = queried_federation(dir.path(), 11, 2, Default::default(), 2).await;

    let ca = std::fs::read_to_string(federation.pki.tls_files("coordinator").ca).unwrap();
    let read = |keeper: &str, url: &str| {
        let cert = std::fs::read_to_string(federation.pki.tls_files(keeper).cert).unwrap();
        let log = ghx::audit_files::read_database(url, &cert).unwrap();
        let verifier = ghx::audit_files::verifier_for(&log, None, Some(&ca))
            .unwrap()
            .expect("the CA vouches for the keeper's certificate");
        let v = ghx::audit_files::verify(&log, Some(&verifier), Default::default()).unwrap();
        assert!(v.is_intact(), "{keeper}: {:?}", v.broken);
        assert!(v.checkpoints_checked > 0, "{keeper} signs checkpoints");
        log
    };
    let coordinator = read(
        "coordinator",
        dir.path().join("ghx-coordinator.db").to_str().unwrap(),
    );
    let nodes: Vec<(String, Vec<Entry>)> = federation
        .nodes
        .iter()
        .map(|n| {
            let url = dir.path().join(format!("{}.db", n.profile.id));
            let log = read(n.profile.id, url.to_str().unwrap());
            (log.keeper.clone(), log.entries)
        })
        .collect();

    // Every node entry is a query the coordinator sent, with the same
    // result digest on both sides: 2 queries x 3 nodes.
    let r = ghx_audit::reconcile::reconcile(&coordinator.entries, &nodes);
    assert_eq!((r.matched, r.findings.len()), (6, 0), "{:?}", r.findings);
    let sent: Vec<&Entry> = coordinator
        .entries
        .iter()
        .filter(|e| !e.peer.is_empty())
        .collect();
    assert_eq!(sent.len(), 6);
    assert!(
        sent.iter()
            .all(|e| e.requester == REQUESTER && e.result_sha256.len() == 64)
    );
    // Each node recorded where the request came from and for whom.
    for (node, entries) in &nodes {
        assert!(
            entries.iter().all(|e| e.source.starts_with("127.0.0.1:")
                && e.requester == REQUESTER
                && e.caller == "coordinator"),
            "{node}: {entries:?}"
        );
    }

    // Someone at Chosun answers a query the coordinator never sent.
    let chosun = &federation.nodes[1];
    let seq = chosun
        .store
        .append_audit(&Entry {
            at: ghx_audit::now_rfc3339(),
            caller: "coordinator".into(),
            caller_role: "coordinator".into(),
            study_id: study.clone(),
            capability_id: "not-issued".into(),
            action: "aggregate".into(),
            decision: "answered".into(),
            query_sha256: "e".repeat(64),
            ..Entry::default()
        })
        .unwrap();
    let mut nodes = nodes;
    nodes[1].1 = chosun.store.audit_entries().unwrap();
    let r = ghx_audit::reconcile::reconcile(&coordinator.entries, &nodes);
    assert_eq!(r.alarms(), 1, "{:?}", r.findings);
    let alarm = &r.findings[0];
    assert_eq!((alarm.log.as_str(), alarm.seq), (chosun.profile.id, seq));
    assert!(alarm.what.contains("never sent"), "{alarm}");

    // The FHIR export of a node's log: one valid AuditEvent per entry.
    let (ndjson, n) =
        ghx_audit::fhir::export_ndjson(chosun.profile.id, &nodes[1].1, None, None).unwrap();
    assert_eq!(n, nodes[1].1.len());
    let first: serde_json::Value = serde_json::from_str(ndjson.lines().next().unwrap()).unwrap();
    assert_eq!(first["resourceType"], "AuditEvent");
    assert_eq!(
        first["agent"][1]["who"]["identifier"]["value"], REQUESTER,
        "the requester the capability names is an agent"
    );
    federation.shutdown().await;
}

/// Runs SQL straight against a keeper's SQLite database, as an intruder
/// would.
fn tamper(db: &std::path::Path, sql: &str) {
    use diesel::connection::SimpleConnection;
    SqliteConnection::establish(db.to_str().unwrap())
        .unwrap()
        .batch_execute(sql)
        .unwrap();
}

/// Outbound nodes (the heads cross the tunnel both ways): three queries,
/// then each keeper's database is attacked after shutdown, the way issue
/// 38 part 9 describes, and checked against the other side's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_deleted_or_rewritten_with_its_checkpoints_fails_against_the_other_side() {
    let dir = tempfile::tempdir().unwrap();
    let (federation, _study) =
        queried_federation(dir.path(), 12, 1, NodeLink::Outbound { via: None }, 3).await;
    // Something Chonnam records on its own, with no query after it: the
    // coordinator's periodic exchange (every 2 s here) brings its head.
    let local = federation.nodes[0]
        .store
        .append_audit(&Entry {
            at: ghx_audit::now_rfc3339(),
            caller: "chonnam-it".into(),
            action: "import".into(),
            decision: "done".into(),
            ..Entry::default()
        })
        .unwrap();
    let coordinator = federation.coordinator_api();
    let witnessed_through = |keeper: &str| {
        coordinator
            .audit_log()
            .witnesses()
            .all()
            .unwrap()
            .iter()
            .filter(|h| h.keeper == keeper)
            .filter_map(|h| ghx_audit::checkpoint::peek(&h.token))
            .map(|c| c.seq)
            .max()
    };
    let mut waited = 0;
    while witnessed_through("chonnam") < Some(local) && waited < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        waited += 1;
    }
    assert_eq!(witnessed_through("chonnam"), Some(local));
    let keepers = federation.audit_keepers();
    let ca = std::fs::read_to_string(keepers.ca()).unwrap();
    federation.shutdown().await;

    let check = |logs: &[ghx_audit::LogExport], keeper: &str, witnessed: bool| {
        let log = logs.iter().find(|l| l.keeper == keeper).unwrap();
        let witnesses = witnesses_among(log, logs);
        let expect = Expect {
            witnesses: witnessed.then_some(witnesses.as_slice()),
            ..Default::default()
        };
        ghx::audit_files::verify_with_ca(log, Some(&ca), expect).unwrap()
    };

    // Untouched: every log agrees with every head the other side holds;
    // each node's log is witnessed to its last entry (the response to the
    // coordinator's last call carried it), the coordinator's in part.
    let logs = keepers.read().unwrap();
    for log in &logs {
        let v = check(&logs, &log.keeper, true);
        assert!(v.is_intact(), "{}: {:?}", log.keeper, v.broken);
        let seen = v.witnessed.unwrap();
        assert_eq!((seen.unverified, seen.later), (0, 0), "{}", log.keeper);
        let (through, by) = seen.through.expect("witnessed");
        if log.keeper == "coordinator" {
            assert!(by != "coordinator" && through > 1, "{by} {through}");
        } else {
            assert_eq!((through, by.as_str()), (v.last_seq.unwrap(), "coordinator"));
            assert_eq!(seen.unwitnessed_tail, 0);
        }
    }
    let node_head = |logs: &[ghx_audit::LogExport], node: &str| {
        check(logs, node, true)
            .witnessed
            .and_then(|w| w.through)
            .unwrap()
            .0
    };

    // 1. Chosun's tail deleted with the checkpoints above the cut: alone it
    // verifies (a shorter, signed log), against the coordinator's heads not.
    let chosun_head = node_head(&logs, "chosun");
    let cut = chosun_head - 2;
    tamper(
        &keepers.dir().join("chosun.db"),
        &format!(
            "DELETE FROM audit_log WHERE seq > {cut}; DELETE FROM audit_checkpoints WHERE seq > {cut};"
        ),
    );

    // 2. Christian's last entry rewritten (a refusal instead of an answer)
    // and rechained, its checkpoint deleted.
    let christian = logs.iter().find(|l| l.keeper == "christian").unwrap();
    let mut last = christian.entries.last().unwrap().clone();
    let prev = christian.entries[christian.entries.len() - 2].hash.clone();
    last.decision = "refused".into();
    last.result_sha256 = String::new();
    let seq = last.seq;
    last.chain(seq, &prev);
    tamper(
        &keepers.dir().join("christian.db"),
        &format!(
            "UPDATE audit_log SET decision = 'refused', result_sha256 = '', hash = '{}' WHERE seq = {seq}; \
             DELETE FROM audit_checkpoints WHERE seq >= {seq};",
            last.hash
        ),
    );

    // 3. The coordinator's tail, from the newest head any node holds, with
    // its checkpoints.
    let coordinator_head = check(&logs, "coordinator", true)
        .witnessed
        .and_then(|w| w.through)
        .unwrap();
    tamper(
        &keepers.dir().join("ghx-coordinator.db"),
        &format!(
            "DELETE FROM audit_log WHERE seq >= {0}; DELETE FROM audit_checkpoints WHERE seq >= {0};",
            coordinator_head.0
        ),
    );

    let logs = keepers.read().unwrap();
    for keeper in ["chosun", "christian", "coordinator"] {
        let alone = check(&logs, keeper, false);
        assert!(alone.is_intact(), "{keeper} alone: {:?}", alone.broken);
    }
    assert_eq!(
        check(&logs, "chosun", true).broken,
        Some(Broken {
            seq: cut + 1,
            problem: Problem::EndsBeforeWitness {
                witnessed_through: chosun_head,
                by: "coordinator".into()
            }
        })
    );
    assert_eq!(
        check(&logs, "christian", true).broken,
        Some(Broken {
            seq,
            problem: Problem::WitnessDiffers {
                by: "coordinator".into()
            }
        })
    );
    assert_eq!(
        check(&logs, "coordinator", true).broken,
        Some(Broken {
            seq: coordinator_head.0,
            problem: Problem::EndsBeforeWitness {
                witnessed_through: coordinator_head.0,
                by: coordinator_head.1.clone()
            }
        })
    );
    // Chonnam, untouched, still verifies against the coordinator's heads.
    assert!(check(&logs, "chonnam", true).is_intact());
}
