//! The node store test suite, run against SQLite and the real PostgreSQL.
//!
//! Each test is written once as a function taking a fresh `Store`; the
//! `suite!` macro instantiates it for both backends.

use std::path::Path;

use ghx_federation_tests::postgres::TestDatabase;
use ghx_federation_tests::reference::Export;
use ghx_node::Store;
use ghx_node::engine;
use ghx_node::import::{ImportOptions, Location, import_path};
use ghx_node::store::AuditEntry;
use ghx_study::query::QuerySpec;
use ghx_synth::{HospitalProfile, SynthOptions};

/// A store on one backend plus whatever keeps its database alive.
struct Fixture {
    store: Store,
    dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("node.db").to_str().unwrap()).unwrap();
    Fixture {
        store,
        dir,
        _pg: None,
    }
}

fn postgres() -> Fixture {
    let db = TestDatabase::create();
    let store = Store::open(&db.url).unwrap();
    Fixture {
        store,
        dir: tempfile::tempdir().unwrap(),
        _pg: Some(db),
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::postgres()) } )*
        }
    };
}

suite!(
    import_matches_the_export_and_counts_match_the_reference,
    reimporting_the_same_export_updates_instead_of_duplicating,
    bad_lines_are_rejected_by_line_and_stored_data_is_unchanged,
    transaction_bundles_are_all_or_nothing_collections_per_entry,
    audit_entries_are_appended_in_order,
);

const E11_BY_SEX_AND_BAND: &str = r#"{"version":"ghx.query/v1",
    "cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},
    "analysis":{"kind":"count","group_by":["sex","age_band"]}}"#;

fn synth(dir: &Path, hospital: &str, patients: usize) -> ghx_synth::Summary {
    ghx_synth::write_ndjson_dir(
        &SynthOptions {
            hospital: HospitalProfile::by_id(hospital).unwrap(),
            patients,
            seed: 11,
            as_of: ghx_synth::default_as_of(),
        },
        dir,
    )
    .unwrap()
}

fn engine_counts(store: &Store) -> std::collections::BTreeMap<(String, String), u64> {
    let spec = QuerySpec::parse(E11_BY_SEX_AND_BAND.as_bytes()).unwrap();
    engine::count(store, &spec)
        .unwrap()
        .into_iter()
        .map(|c| ((c.key[0].clone(), c.key[1].clone()), c.count))
        .collect()
}

fn import_matches_the_export_and_counts_match_the_reference(f: Fixture) {
    let data = f.dir.path().join("data");
    let summary = synth(&data, "chonnam", 600);
    // A small batch size makes the import span many transactions.
    let report = import_path(&f.store, &data, &ImportOptions { batch_size: 250 }).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.accepted as usize, summary.total());
    assert!(report.batches > 1);

    let counts = f.store.resource_counts().unwrap();
    assert_eq!(counts["Patient"] as usize, summary.patients);
    assert_eq!(counts["Condition"] as usize, summary.conditions);
    assert_eq!(counts["Observation"] as usize, summary.observations);
    assert_eq!(counts["Consent"] as usize, summary.consents);

    let expected = Export::read(&data).count_by_sex_and_band(
        "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8",
        "E11",
        ghx_synth::default_as_of(),
    );
    assert!(!expected.is_empty());
    assert_eq!(engine_counts(&f.store), expected);
}

fn reimporting_the_same_export_updates_instead_of_duplicating(f: Fixture) {
    let data = f.dir.path().join("data");
    synth(&data, "chosun", 200);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let counts = f.store.resource_counts().unwrap();
    let answer = engine_counts(&f.store);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    assert_eq!(f.store.resource_counts().unwrap(), counts);
    assert_eq!(engine_counts(&f.store), answer);
}

fn bad_lines_are_rejected_by_line_and_stored_data_is_unchanged(f: Fixture) {
    let data = f.dir.path().join("data");
    synth(&data, "christian", 150);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let before = f.store.resource_counts().unwrap();
    let answer_before = engine_counts(&f.store);
    let patient_before = f
        .store
        .resource("Patient", "christian-0000001")
        .unwrap()
        .unwrap();

    let bad = f.dir.path().join("bad.ndjson");
    std::fs::write(
        &bad,
        [
            r#"{"resourceType":"Patient","id":"new-1","gender":"female","birthDate":"1980-02-03"}"#,
            r#"{"resourceType":"Patient","id":"christian-0000001","gender":"#,
            r#"{"resourceType":"Patient","id":"christian-0000001","gender":"robot"}"#,
            "",
            r#"{"resourceType":"Condition","id":"c-x","code":{"coding":[{"system":"urn:x","code":"E11"}]}}"#,
            r#"{"id":"no-type"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let report = import_path(&f.store, &bad, &ImportOptions::default()).unwrap();
    assert_eq!(report.accepted, 1);
    let rejected: Vec<(Location, &str)> = report
        .rejected
        .iter()
        .map(|r| (r.location.clone(), r.reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert_eq!(rejected[0].0, Location::Line(2));
    assert!(
        rejected[0].1.starts_with("not valid JSON"),
        "{}",
        rejected[0].1
    );
    assert_eq!(rejected[1].0, Location::Line(3));
    assert!(
        rejected[1]
            .1
            .starts_with("invalid Patient: unknown code value"),
        "{}",
        rejected[1].1
    );
    assert!(
        !rejected[1].1.contains("robot"),
        "reasons never echo resource values"
    );
    assert_eq!(rejected[2].0, Location::Line(5));
    assert!(
        rejected[2].1.contains("missing field `subject`"),
        "{}",
        rejected[2].1
    );
    assert_eq!(rejected[3].0, Location::Line(6));
    assert!(
        rejected[3].1.contains("missing field `resourceType`"),
        "{}",
        rejected[3].1
    );

    let mut after = before.clone();
    *after.get_mut("Patient").unwrap() += 1;
    assert_eq!(f.store.resource_counts().unwrap(), after);
    assert_eq!(
        f.store
            .resource("Patient", "christian-0000001")
            .unwrap()
            .unwrap(),
        patient_before
    );
    assert_eq!(engine_counts(&f.store), answer_before);
}

fn transaction_bundles_are_all_or_nothing_collections_per_entry(f: Fixture) {
    let bundle = |kind: &str| {
        format!(
            r#"{{"resourceType":"Bundle","type":"{kind}","entry":[
              {{"fullUrl":"urn:uuid:11111111-1111-1111-1111-111111111111",
                "resource":{{"resourceType":"Patient","id":"tx-p1","gender":"male","birthDate":"1960-01-01"}},
                "request":{{"method":"PUT","url":"Patient/tx-p1"}}}},
              {{"resource":{{"resourceType":"Condition","id":"tx-c1","subject":{{"reference":"urn:uuid:11111111-1111-1111-1111-111111111111"}},
                "code":{{"coding":[{{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11.9"}}]}}}},
                "request":{{"method":"PUT","url":"Condition/tx-c1"}}}},
              {{"resource":{{"resourceType":"Observation","id":"tx-o1","status":"not-a-status","code":{{"text":"x"}}}},
                "request":{{"method":"PUT","url":"Observation/tx-o1"}}}}
            ]}}"#
        )
    };
    let tx = f.dir.path().join("tx.json");
    std::fs::write(&tx, bundle("transaction")).unwrap();
    let report = import_path(&f.store, &tx, &ImportOptions::default()).unwrap();
    assert_eq!(report.accepted, 0);
    assert_eq!(report.rejected[0].location, Location::Entry(2));
    assert_eq!(report.rejected.len(), 3);
    assert!(f.store.resource_counts().unwrap().is_empty());

    let collection = f.dir.path().join("collection.json");
    std::fs::write(&collection, bundle("collection")).unwrap();
    let report = import_path(&f.store, &collection, &ImportOptions::default()).unwrap();
    assert_eq!(report.accepted, 2);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].location, Location::Entry(2));
    // The Condition's urn:uuid subject resolved to the bundled Patient.
    let counts = f.store.resource_counts().unwrap();
    assert_eq!((counts["Patient"], counts["Condition"]), (1, 1));
}

fn audit_entries_are_appended_in_order(f: Fixture) {
    let entry = |study: &str| AuditEntry {
        at: "2026-11-25T00:00:00Z".into(),
        caller: "coordinator".into(),
        caller_role: "coordinator".into(),
        caller_org: "G-Health".into(),
        study_id: study.into(),
        capability_id: "cap".into(),
        action: "aggregate".into(),
        decision: "answered".into(),
        reason: String::new(),
        query_sha256: "00".into(),
        result_cells: 3,
    };
    let first = f.store.append_audit(&entry("s1")).unwrap();
    let second = f.store.append_audit(&entry("s2")).unwrap();
    assert!(second > first);
    let all = f.store.audit_entries().unwrap();
    assert_eq!(all, vec![entry("s1"), entry("s2")]);
}
