//! The node store test suite, run against SQLite and the real PostgreSQL.
//!
//! Each test is written once as a function taking a fresh `Store`; the
//! `suite!` macro instantiates it for both backends.

use std::path::Path;

use ghx_federation_tests::backend::Backend;
use ghx_federation_tests::consented;
use ghx_federation_tests::postgres::TestDatabase;
use ghx_federation_tests::reference::Export;
use ghx_node::Store;
use ghx_node::import::{
    ImportOptions, Location, RrnPolicy, import_path, load_edi_loinc_map, reindex,
};
use ghx_node::store::AuditEntry;
use ghx_node::testing::CohortIndex;
use ghx_study::query::QuerySpec;
use ghx_synth::{HospitalProfile, SynthOptions};

/// A store on one backend plus whatever keeps its database alive.
struct Fixture {
    store: Store,
    dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

fn fixture(backend: Backend) -> Fixture {
    Fixture {
        store: Store::open(&backend.url).unwrap(),
        dir: backend.dir,
        _pg: backend.pg,
    }
}

fn sqlite() -> Fixture {
    fixture(Backend::sqlite("node.db"))
}

fn postgres() -> Fixture {
    fixture(Backend::postgres())
}

ghx_federation_tests::suite!(
    import_matches_the_export_and_counts_match_the_reference,
    reimporting_the_same_export_updates_instead_of_duplicating,
    bad_lines_are_rejected_by_line_and_stored_data_is_unchanged,
    transaction_bundles_are_all_or_nothing_collections_per_entry,
    audit_entries_are_appended_in_order,
    changed_resources_get_new_versions_and_deletes_leave_tombstones,
    gzip_exports_import_like_plain_ones,
    rrn_identifiers_are_stripped_or_rejected_before_storage,
    linkage_tokens_replace_rrns_and_outlive_the_stripped_content,
    the_exchange_finds_a_residents_records_and_keeps_its_disclosures,
    edi_lab_codes_count_under_their_mapped_loinc_code,
    an_export_reimports_to_the_same_resources,
    an_unfinished_checkpoint_resumes_after_its_last_line,
    sensitive_diagnoses_count_only_where_consent_names_them,
    cohorts_a_few_patients_apart_are_refused_per_organisation,
    counting_members_equals_counting_in_sql,
    statistics_match_an_independent_computation_from_the_export,
    privacy_budget_charges_refuse_overspending,
    view_variables_match_native_variables_and_rebuild_after_import,
    the_cohort_index_follows_imports,
    a_runs_lineage_starts_once_and_advances_compare_and_set,
    exports_of_other_tools_import_whole_or_not_at_all,
    snomed_diagnoses_answer_kcd_queries_through_a_loaded_map,
    departures_from_the_format_are_rejected_unless_the_node_is_lenient,
);

#[path = "store/exports.rs"]
mod exports;
use exports::*;

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
            shared: 0.0,
        },
        dir,
    )
    .unwrap()
}

fn engine_counts(store: &Store) -> std::collections::BTreeMap<(String, String), u64> {
    let spec = QuerySpec::parse(E11_BY_SEX_AND_BAND.as_bytes()).unwrap();
    consented::count(store, &spec, consented::opt_in())
        .0
        .into_iter()
        .map(|c| ((c.key[0].clone(), c.key[1].clone()), c.value.patients()))
        .collect()
}

fn import_matches_the_export_and_counts_match_the_reference(f: Fixture) {
    let data = f.dir.path().join("data");
    let summary = synth(&data, "chonnam", 600);
    // A small batch size makes the import span many transactions.
    let report = import_path(
        &f.store,
        &data,
        &ImportOptions {
            batch_size: 250,
            ..ImportOptions::default()
        },
    )
    .unwrap();
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
        purpose: "HRESCH".into(),
        policy_reasons: "permitted by `research-aggregates`".into(),
        consent_excluded: 7,
        source: "127.0.0.1:50001".into(),
        requester: "alice".into(),
        requester_org: "Acme Health".into(),
        result_sha256: "ab".repeat(32),
        epsilon: 0.25,
        ..AuditEntry::default()
    };
    let first = f.store.append_audit(&entry("s1")).unwrap();
    let second = f.store.append_audit(&entry("s2")).unwrap();
    assert_eq!((first, second), (1, 2));
    // Every column comes back as written, chained in order.
    let mut expected = vec![entry("s1"), entry("s2")];
    ghx_audit::verify::chain_all(&mut expected, 1, ghx_audit::GENESIS);
    assert_eq!(f.store.audit_entries().unwrap(), expected);
}

fn count_query(store: &Store, cohort: &str) -> u64 {
    let json = format!(
        r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01",{cohort}}},"analysis":{{"kind":"count"}}}}"#
    );
    let spec = QuerySpec::parse(json.as_bytes()).unwrap();
    consented::count(store, &spec, consented::opt_in())
        .0
        .iter()
        .map(|c| c.value.patients())
        .sum()
}

fn write(path: &Path, lines: &[impl AsRef<str>]) {
    let lines: Vec<&str> = lines.iter().map(AsRef::as_ref).collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

const CONSENTED: &str = r#"{"resourceType":"Consent","id":"k1","status":"active","scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"research"}]},"category":[{"coding":[{"system":"http://loinc.org","code":"57016-8"}]}],"patient":{"reference":"Patient/v1"},"dateTime":"2025-01-01T00:00:00Z","provision":{"type":"permit"}}"#;

fn changed_resources_get_new_versions_and_deletes_leave_tombstones(f: Fixture) {
    let file = f.dir.path().join("v.ndjson");
    let patient = |gender: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"v1","gender":"{gender}","birthDate":"1960-05-05"}}"#
        )
    };
    let condition = r#"{"resourceType":"Condition","id":"vc1","subject":{"reference":"Patient/v1"},"code":{"coding":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11.9"}]}}"#;
    write(&file, &[&patient("male"), condition, CONSENTED]);
    let r = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!((r.outcome.created, r.outcome.updated), (3, 0));
    assert_eq!(
        count_query(
            &f.store,
            r#""conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11.9"}]"#
        ),
        1
    );

    write(&file, &[&patient("female"), condition, CONSENTED]);
    let r = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(
        (r.outcome.created, r.outcome.updated, r.outcome.unchanged),
        (0, 1, 2)
    );
    let versions = f.store.history("Patient", "v1").unwrap();
    assert_eq!(versions.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [1, 2]);
    assert!(
        versions[0].1.as_deref().unwrap().contains("male")
            && versions[1].1.as_deref().unwrap().contains("female")
    );
    // Queries read sex and birth date from the consent decisions, which
    // the update made again: the patient now counts as female only.
    let e11_of = |sex: &str| {
        format!(
            r#""sex":["{sex}"],"conditions":[{{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11.9"}}]"#
        )
    };
    assert_eq!(count_query(&f.store, &e11_of("female")), 1);
    assert_eq!(count_query(&f.store, &e11_of("male")), 0);

    // A transaction Bundle deletes the condition: the count drops.
    let bundle = f.dir.path().join("delete.json");
    std::fs::write(&bundle, r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Condition/vc1"}},{"request":{"method":"DELETE","url":"Condition/never-stored"}}]}"#).unwrap();
    let r = import_path(&f.store, &bundle, &ImportOptions::default()).unwrap();
    assert_eq!((r.outcome.deleted, r.outcome.not_found), (1, 1));
    assert_eq!(f.store.resource("Condition", "vc1").unwrap(), None);
    assert_eq!(
        count_query(
            &f.store,
            r#""conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]"#
        ),
        0
    );
    let history = f.store.history("Condition", "vc1").unwrap();
    assert_eq!(history, vec![(1, Some(condition.to_owned())), (2, None)]);

    // Re-created after deletion, it continues the version sequence.
    write(&file, &[condition]);
    import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(
        f.store
            .history("Condition", "vc1")
            .unwrap()
            .last()
            .unwrap()
            .0,
        3
    );

    // A bad DELETE names the problem.
    std::fs::write(&bundle, r#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Condition?code=E11"}}]}"#).unwrap();
    let r = import_path(&f.store, &bundle, &ImportOptions::default()).unwrap();
    assert!(
        r.rejected[0]
            .reason
            .contains("conditional deletes are not supported"),
        "{:?}",
        r.rejected
    );
}

fn gzip_exports_import_like_plain_ones(f: Fixture) {
    use std::io::Write;
    let data = f.dir.path().join("data");
    let summary = synth(&data, "chosun", 80);
    let gz = f.dir.path().join("gz");
    std::fs::create_dir_all(&gz).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let out = gz.join(format!(
            "{}.gz",
            path.file_name().unwrap().to_string_lossy()
        ));
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(out).unwrap(),
            flate2::Compression::fast(),
        );
        encoder.write_all(&std::fs::read(&path).unwrap()).unwrap();
        encoder.finish().unwrap();
    }
    let report = import_path(&f.store, &gz, &ImportOptions::default()).unwrap();
    assert_eq!(
        (report.files.len(), report.accepted as usize),
        (6, summary.total())
    );
    assert!(report.rejected.is_empty());
}

fn rrn_identifiers_are_stripped_or_rejected_before_storage(f: Fixture) {
    let file = f.dir.path().join("rrn.ndjson");
    write(
        &file,
        &[
            r#"{"resourceType":"Patient","id":"r1","identifier":[{"system":"urn:mrn","value":"M1"},{"type":{"coding":[{"code":"NNKOR"}]},"value":"900101-1234567"}],"gender":"male"}"#,
            r#"{"resourceType":"Patient","id":"r2","gender":"female","text":{"status":"generated","div":"<div>RRN 8501012345678</div>"}}"#,
        ],
    );
    let report = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(report.accepted, 1);
    assert_eq!(report.rrn_stripped.len(), 1);
    assert_eq!(report.rejected[0].location, Location::Line(2));
    assert!(
        report.rejected[0]
            .reason
            .starts_with("Patient.text.div contains a value shaped like"),
        "{}",
        report.rejected[0].reason
    );
    let stored = f.store.resource("Patient", "r1").unwrap().unwrap();
    assert!(
        stored.contains("M1") && !stored.contains("900101") && !stored.contains("NNKOR"),
        "{stored}"
    );
    assert_eq!(f.store.resource("Patient", "r2").unwrap(), None);

    // Under the reject policy the first one is refused too.
    write(
        &file,
        &[
            r#"{"resourceType":"Patient","id":"r3","identifier":[{"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"9001011234567"}]}"#,
        ],
    );
    let options = ImportOptions {
        rrn: RrnPolicy::Reject,
        ..ImportOptions::default()
    };
    let report = import_path(&f.store, &file, &options).unwrap();
    assert_eq!(report.accepted, 0);
    assert!(
        report.rejected[0]
            .reason
            .contains("resident registration number")
    );
    for r in report.rejected.iter().chain(&report.rrn_stripped) {
        assert!(
            !r.to_string().contains("900101"),
            "reports never carry the number: {r}"
        );
    }
}

/// With a link key, import keeps a Patient's RRN only as its linkage
/// token; the token stays with the patient when the content is rewritten
/// without the RRN (a later export, a re-index), and nothing stored holds
/// the RRN.
fn linkage_tokens_replace_rrns_and_outlive_the_stripped_content(f: Fixture) {
    use ghx_disclosure::linkage::LinkKey;
    let key = LinkKey::parse(&LinkKey::generate()).unwrap();
    let file = f.dir.path().join("linked.ndjson");
    let with_rrn = r#"{"resourceType":"Patient","id":"l1","identifier":[{"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"900101-1234567"}],"gender":"male"}"#;
    write(
        &file,
        &[
            with_rrn,
            r#"{"resourceType":"Patient","id":"l2","gender":"female"}"#,
        ],
    );
    let keyed = ImportOptions {
        link_key: Some(key.clone()),
        ..ImportOptions::default()
    };
    let report = import_path(&f.store, &file, &keyed).unwrap();
    assert_eq!(report.accepted, 2);
    let token = key.token("9001011234567");
    let tokens = || f.store.link_tokens().unwrap();
    assert_eq!(tokens(), [("l1".to_owned(), token.clone())]);
    let stored = f.store.resource("Patient", "l1").unwrap().unwrap();
    assert!(
        !stored.contains("900101") && !stored.contains(&token),
        "{stored}"
    );
    // The same file without the key: unchanged, token kept.
    import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(tokens(), [("l1".to_owned(), token.clone())]);
    // A later export without the RRN changes the patient; the token stays.
    write(
        &file,
        &[r#"{"resourceType":"Patient","id":"l1","gender":"male","birthDate":"1990-01-01"}"#],
    );
    let report = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(report.accepted, 1);
    assert_eq!(tokens(), [("l1".to_owned(), token.clone())]);
    reindex(&f.store, 100).unwrap();
    assert_eq!(tokens(), [("l1".to_owned(), token.clone())]);
    // Another key gives another token, set on an unchanged patient too.
    let other = LinkKey::parse(&LinkKey::generate()).unwrap();
    write(
        &file,
        &[&with_rrn.replace(
            r#""gender":"male""#,
            r#""gender":"male","birthDate":"1990-01-01""#,
        )],
    );
    import_path(
        &f.store,
        &file,
        &ImportOptions {
            link_key: Some(other.clone()),
            ..ImportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(tokens(), [("l1".to_owned(), other.token("9001011234567"))]);
}

fn the_exchange_finds_a_residents_records_and_keeps_its_disclosures(f: Fixture) {
    use ghx_disclosure::linkage::LinkKey;
    use ghx_node::store::Disclosure;
    let key = LinkKey::parse(&LinkKey::generate()).unwrap();
    let file = f.dir.path().join("resident.ndjson");
    write(
        &file,
        &[
            r#"{"resourceType":"Patient","id":"r1","identifier":[{"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"900101-1234567"}],"gender":"male"}"#,
            r#"{"resourceType":"Patient","id":"r2","gender":"female"}"#,
            r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"subject":{"reference":"Patient/r1"},"effectiveDateTime":"2025-01-02","valueQuantity":{"value":6.1,"unit":"%"}}"#,
            r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"4548-4"}]},"subject":{"reference":"Patient/r2"},"effectiveDateTime":"2025-01-02","valueQuantity":{"value":5.1,"unit":"%"}}"#,
            r#"{"resourceType":"Consent","id":"k1","status":"active","scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"patient-privacy"}]},"category":[{"coding":[{"system":"http://loinc.org","code":"59284-0"}]}],"patient":{"reference":"Patient/r1"},"dateTime":"2025-01-01T00:00:00+09:00","provision":{"type":"permit","actor":[{"role":{"coding":[{"code":"IRCP"}]},"reference":{"identifier":{"system":"urn:ghx:recipient","value":"report-service"}}}]}}"#,
        ],
    );
    let keyed = ImportOptions {
        link_key: Some(key.clone()),
        ..ImportOptions::default()
    };
    assert_eq!(import_path(&f.store, &file, &keyed).unwrap().accepted, 5);
    let store = &f.store;
    assert_eq!(
        store
            .patients_with_token(&key.token("9001011234567"))
            .unwrap(),
        ["r1"]
    );
    assert!(store.patients_with_token("nobody").unwrap().is_empty());
    assert!(store.has_patient("r2").unwrap() && !store.has_patient("r3").unwrap());
    let records: Vec<String> = store
        .patient_resources("r1")
        .unwrap()
        .iter()
        .map(|r| format!("{}/{}", r.resource_type, r.id))
        .collect();
    assert_eq!(records, ["Consent/k1", "Observation/o1", "Patient/r1"]);
    let consents = store.patient_consents("r1").unwrap();
    assert_eq!(consents.len(), 1);
    assert!(
        consents[0].provision.contains("report-service"),
        "{}",
        consents[0].provision
    );
    let disclosure = |id: &str| Disclosure {
        patient_id: "r1".into(),
        request_id: id.into(),
        recipient: "report-service".into(),
        purpose: "PATRQT".into(),
        scope: "_type=Observation".into(),
        disclosed_at: "2026-12-07T00:00:00Z".into(),
        resources: 2,
        sha256: "ab".repeat(32),
        outcome: "sent".into(),
    };
    store.record_disclosure(&disclosure("q1")).unwrap();
    store.record_disclosure(&disclosure("q2")).unwrap();
    store
        .end_disclosure("q2", "stopped: consent withdrawn")
        .unwrap();
    let kept = store.disclosures_of("r1").unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0], disclosure("q1"));
    assert_eq!(kept[1].outcome, "stopped: consent withdrawn");
    assert!(store.disclosures_of("r2").unwrap().is_empty());
}

fn edi_lab_codes_count_under_their_mapped_loinc_code(f: Fixture) {
    let file = f.dir.path().join("edi.ndjson");
    write(
        &file,
        &[
            r#"{"resourceType":"Patient","id":"v1","gender":"male","birthDate":"1960-05-05"}"#,
            CONSENTED,
            r#"{"resourceType":"Observation","id":"e1","status":"final","code":{"coding":[{"system":"http://www.hl7korea.or.kr/CodeSystem/hira-edi-procedure","code":"C3825"}]},"subject":{"reference":"Patient/v1"},"valueQuantity":{"value":7.1,"code":"%"}}"#,
        ],
    );
    import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    let hba1c_at_least_6_5 =
        r#""observations":[{"system":"http://loinc.org","code":"4548-4","min":6.5}]"#;
    assert_eq!(
        count_query(&f.store, hba1c_at_least_6_5),
        0,
        "unmapped EDI codes are not LOINC"
    );

    let csv = f.dir.path().join("edi-loinc.csv");
    std::fs::write(&csv, "edi_code,loinc_code\nC3825,4548-4\nB2710,1558-6\n").unwrap();
    assert_eq!(load_edi_loinc_map(&f.store, &csv).unwrap(), 2);
    reindex(&f.store, 100).unwrap();
    assert_eq!(count_query(&f.store, hba1c_at_least_6_5), 1);
    assert_eq!(
        count_query(
            &f.store,
            r#""observations":[{"system":"http://loinc.org","code":"4548-4","min":7.5}]"#
        ),
        0
    );

    std::fs::write(&csv, "C3825,not-loinc\n").unwrap();
    let err = load_edi_loinc_map(&f.store, &csv).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("LOINC"), "{err}");
    std::fs::write(&csv, "edi_code,loinc_code\n").unwrap();
    assert!(
        load_edi_loinc_map(&f.store, &csv)
            .unwrap_err()
            .to_string()
            .contains("no mappings found")
    );
    assert_eq!(
        f.store.code_map().unwrap().len(),
        2,
        "a bad map file changes nothing"
    );
}

fn an_export_reimports_to_the_same_resources(f: Fixture) {
    let data = f.dir.path().join("data");
    synth(&data, "christian", 60);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let out = f.dir.path().join("export");
    let counts = ghx_node::export::export_ndjson(&f.store, &out, None).unwrap();
    assert_eq!(
        counts.values().sum::<u64>(),
        f.store.resource_counts().unwrap().values().sum::<u64>()
    );

    // Every exported resource equals the imported one, apart from the
    // node's version and time, which go in meta extensions.
    let read = |path: &Path| -> std::collections::BTreeMap<String, serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                if let Some(meta) = v.get_mut("meta").and_then(|m| m.as_object_mut()) {
                    if let Some(list) = meta.get_mut("extension").and_then(|e| e.as_array_mut()) {
                        list.retain(|e| !e["url"].as_str().unwrap().starts_with("urn:ghx:"));
                        if list.is_empty() {
                            meta.remove("extension");
                        }
                    }
                    if meta.is_empty() {
                        v.as_object_mut().unwrap().remove("meta");
                    }
                }
                (v["id"].as_str().unwrap().to_owned(), v)
            })
            .collect()
    };
    for ty in ghx_synth::RESOURCE_TYPES {
        let original = data.join(format!("{ty}.ndjson"));
        if std::fs::metadata(&original).unwrap().len() == 0 {
            continue;
        }
        assert_eq!(
            read(&out.join(format!("{ty}.ndjson"))),
            read(&original),
            "{ty}"
        );
    }

    // Importing the export into the same store changes nothing.
    let report = import_path(&f.store, &out, &ImportOptions::default()).unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!((report.outcome.created, report.outcome.updated), (0, 0));

    // The source's own meta.lastUpdated and versionId are kept (issue 40).
    let source = f.dir.path().join("meta.ndjson");
    write(
        &source,
        &[
            r#"{"resourceType":"Patient","id":"meta1","meta":{"versionId":"7","lastUpdated":"2024-01-02T03:04:05Z"},"gender":"male"}"#,
        ],
    );
    import_path(&f.store, &source, &ImportOptions::default()).unwrap();
    let out = f.dir.path().join("export2");
    ghx_node::export::export_ndjson(&f.store, &out, Some("Patient")).unwrap();
    let exported = std::fs::read_to_string(out.join("Patient.ndjson")).unwrap();
    let line = exported.lines().find(|l| l.contains("\"meta1\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["meta"]["lastUpdated"], "2024-01-02T03:04:05Z");
    assert_eq!(v["meta"]["versionId"], "7");
    assert_eq!(v["meta"]["extension"][0]["valueString"], "1");
}

fn an_unfinished_checkpoint_resumes_after_its_last_line(f: Fixture) {
    // A first import that was interrupted after committing line 2 (its
    // checkpoint was written in the same transaction as those lines).
    let file = f.dir.path().join("resume.ndjson");
    let lines: Vec<String> = (1..=5)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"res{i}","gender":"male"}}"#))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    write(&file, &lines[..2]);
    import_path(
        &f.store,
        &file,
        &ImportOptions {
            batch_size: 1,
            ..ImportOptions::default()
        },
    )
    .unwrap();
    // The export grew (same file, appended): a new fingerprint, so it is
    // read from the start; unchanged lines are recognised.
    write(&file, &lines);
    let report = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(
        (
            report.resumed_lines,
            report.outcome.unchanged,
            report.outcome.created
        ),
        (0, 2, 3)
    );
}

fn sensitive_diagnoses_count_only_where_consent_names_them(f: Fixture) {
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let patient = |id: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","gender":"female","birthDate":"1970-01-01"}}"#
        )
    };
    let condition = |id: &str, patient: &str, code: &str| {
        format!(
            r#"{{"resourceType":"Condition","id":"{id}","subject":{{"reference":"Patient/{patient}"}},"code":{{"coding":[{{"system":"{kcd}","code":"{code}"}}]}}}}"#
        )
    };
    let consent = |id: &str, patient: &str, status: &str, nested: &str| {
        format!(
            r#"{{"resourceType":"Consent","id":"{id}","status":"{status}","scope":{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"research"}}]}},"category":[{{"coding":[{{"system":"http://loinc.org","code":"57016-8"}}]}}],"patient":{{"reference":"Patient/{patient}"}},"dateTime":"2026-01-0{}T00:00:00Z","provision":{{"type":"permit"{nested}}}}}"#,
            if status == "active" { 1 } else { 2 }
        )
    };
    let label = |code: &str, system: &str| {
        format!(
            r#","provision":[{{"type":"permit","securityLabel":[{{"system":"{system}","code":"{code}"}}]}}]"#
        )
    };
    let v3 = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    let ghx = "https://g-health.gwangju.kr/fhir/CodeSystem/ghx-sensitive-category";
    let data = f.dir.path().join("sensitive");
    std::fs::create_dir_all(&data).unwrap();
    write(
        &data.join("Patient.ndjson"),
        &[&patient("s1"), &patient("s2"), &patient("s3")],
    );
    write(
        &data.join("Condition.ndjson"),
        &[
            &condition("c1", "s1", "F32.1"),
            &condition("c1b", "s1", "E11.9"),
            &condition("c1c", "s1", "E75.2"),
            &condition("c2", "s2", "F32.9"),
            &condition("c3", "s3", "E75.21"),
        ],
    );
    write(
        &data.join("Consent.ndjson"),
        &[
            &consent("k1", "s1", "active", ""),
            &consent("k2", "s2", "active", &label("PSY", v3)),
            &consent("k3", "s3", "active", &label("rare-disease", ghx)),
        ],
    );
    let report = import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let rules = || ghx_node::consent::ConsentRules {
        default: ghx_node::consent::DefaultConsent::OptIn,
        sensitive: ghx_node::consent::SensitiveCodes {
            rare_disease_prefixes: vec!["E752".to_owned()],
        },
    };
    let count = |code: &str| -> u64 {
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-06-01","conditions":[{{"system":"{kcd}","code":"{code}","match":"prefix"}}]}},"analysis":{{"kind":"count"}}}}"#
        );
        let spec = QuerySpec::parse(json.as_bytes()).unwrap();
        consented::count(&f.store, &spec, rules())
            .0
            .iter()
            .map(|c| c.value.patients())
            .sum()
    };
    // s1's depression is invisible (a blanket permit is not enough), s2
    // named mental health; s1's diabetes is not sensitive.
    assert_eq!(count("F32"), 1);
    assert_eq!(count("F"), 1);
    assert_eq!(count("E11"), 1);
    // Rare disease: only s3 named it; s1's E75.2 stays invisible.
    assert_eq!(count("E75"), 1);
    assert_eq!(count("E"), 2, "s1 through E11, s3 through E75.21");

    // An antidepressant coded in ATC and in a hospital's product code is
    // mental health however it is selected: s1's stays invisible, s2's
    // counts; by index (no window) and by SQL (a window) alike.
    let edi = "http://www.hl7korea.or.kr/CodeSystem/hira-edi-medication";
    let prescription = |id: &str, patient: &str| {
        format!(
            r#"{{"resourceType":"MedicationRequest","id":"{id}","status":"active","intent":"order","subject":{{"reference":"Patient/{patient}"}},"authoredOn":"2025-03-01","medicationCodeableConcept":{{"coding":[{{"system":"http://www.whocc.no/atc","code":"N06AB03"}},{{"system":"{edi}","code":"642900560"}}]}}}}"#
        )
    };
    write(
        &data.join("MedicationRequest.ndjson"),
        &[&prescription("m1", "s1"), &prescription("m2", "s2")],
    );
    std::fs::remove_file(data.join("Condition.ndjson")).unwrap();
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let prescribed = |window: &str| -> u64 {
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-06-01","medications":[{{"system":"{edi}","code":"642900560"{window}}}]}},"analysis":{{"kind":"count"}}}}"#
        );
        let spec = QuerySpec::parse(json.as_bytes()).unwrap();
        consented::count(&f.store, &spec, rules())
            .0
            .iter()
            .map(|c| c.value.patients())
            .sum()
    };
    assert_eq!(prescribed(""), 1);
    assert_eq!(prescribed(r#","window":{"from":"2025-01-01"}"#), 1);

    // An HIV viral load is HIV by its LOINC coding, also when selected by
    // the local code beside it; no one here named HIV. A local test with
    // no listed coding counts as it is.
    let lab = "urn:oid:1.2.410.100001.lab";
    let observation = |id: &str, patient: &str, codings: &str| {
        format!(
            r#"{{"resourceType":"Observation","id":"{id}","status":"final","subject":{{"reference":"Patient/{patient}"}},"effectiveDateTime":"2025-03-01","valueQuantity":{{"value":50}},"code":{{"coding":[{codings}]}}}}"#
        )
    };
    let viral_load = format!(
        r#"{{"system":"http://loinc.org","code":"20447-9"}},{{"system":"{lab}","code":"HIV-VL"}}"#
    );
    write(
        &data.join("Observation.ndjson"),
        &[
            &observation("o1", "s1", &viral_load),
            &observation("o2", "s2", &viral_load),
            &observation("o3", "s1", &format!(r#"{{"system":"{lab}","code":"GLU"}}"#)),
        ],
    );
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let observed = |system: &str, code: &str| -> u64 {
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-06-01","observations":[{{"system":"{system}","code":"{code}"}}]}},"analysis":{{"kind":"count"}}}}"#
        );
        let spec = QuerySpec::parse(json.as_bytes()).unwrap();
        consented::count(&f.store, &spec, rules())
            .0
            .iter()
            .map(|c| c.value.patients())
            .sum()
    };
    assert_eq!(observed("http://loinc.org", "20447-9"), 0);
    assert_eq!(observed(lab, "HIV-VL"), 0);
    assert_eq!(observed(lab, "GLU"), 1);

    // Read through a view, the viral load is as sensitive: no values; the
    // local test's value still counts.
    let through_view_as = |code: &str, patient: &str| -> u64 {
        let view = format!(
            r#"{{"resourceType":"ViewDefinition","resource":"Observation","status":"active",
            "select":[{{"column":[{{"name":"patient","path":"{patient}"}},
                {{"name":"v","path":"value.ofType(Quantity).value"}}]}}],
            "where":[{{"path":"code.coding.where(code = '{code}').exists()"}}]}}"#
        );
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-06-01"}},"analysis":{{"kind":"summary","variable":{{"kind":"view","view":{view},"column":"v","pick":"max"}}}}}}"#
        );
        let spec = QuerySpec::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let prepared = ghx_node::consent::eligibility::Eligibility::new(rules())
            .prepare(
                &f.store,
                &ghx_node::gate::consent_request("HRESCH", &spec, 1_780_272_000),
            )
            .unwrap();
        let members = ghx_node::testing::cohort_for_analysis(
            &f.store,
            &spec,
            &prepared.context,
            &rules().sensitive,
        )
        .unwrap();
        ghx_node::testing::analyse(&spec, &members, false)
            .cells
            .iter()
            .map(|c| c.value.patients())
            .sum()
    };
    let through_view = |code: &str| through_view_as(code, "subject.getReferenceKey(Patient)");
    assert_eq!(through_view("20447-9"), 0);
    assert_eq!(through_view("GLU"), 1);
    // A view may not credit one patient's value to another (whose consent
    // would be the one checked): s1's test named as s3's gives nothing.
    assert_eq!(through_view_as("GLU", "'s3'"), 0);

    // s2 withdraws: the next count no longer sees them.
    write(
        &data.join("Consent.ndjson"),
        &[&consent("k2b", "s2", "inactive", "")],
    );
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    assert_eq!(count("F32"), 0);
    let (_, summary) = consented::count(
        &f.store,
        &QuerySpec::parse(br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-06-01"},"analysis":{"kind":"count"}}"#).unwrap(),
        rules(),
    );
    assert_eq!((summary.patients, summary.included), (3, 2));
    assert_eq!(
        summary
            .excluded
            .get(&ghx_node::consent::Exclusion::Withdrawn),
        Some(&1)
    );
}

fn cohorts_a_few_patients_apart_are_refused_per_organisation(f: Fixture) {
    use ghx_node::consent::eligibility::Eligibility;
    use ghx_node::testing::differencing::{self, CohortPrint};
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let data = f.dir.path().join("differencing");
    std::fs::create_dir_all(&data).unwrap();
    // Fifteen consenting diabetics born 1980..1994: one per birth year.
    let mut patients = Vec::new();
    let mut conditions = Vec::new();
    let mut consents = Vec::new();
    for i in 0..15 {
        patients.push(format!(
            r#"{{"resourceType":"Patient","id":"d{i}","gender":"female","birthDate":"{}-03-01"}}"#,
            1980 + i
        ));
        conditions.push(format!(
            r#"{{"resourceType":"Condition","id":"dc{i}","subject":{{"reference":"Patient/d{i}"}},"code":{{"coding":[{{"system":"{kcd}","code":"E11.9"}}]}}}}"#
        ));
        consents.push(
            CONSENTED
                .replace("\"k1\"", &format!("\"dk{i}\""))
                .replace("Patient/v1", &format!("Patient/d{i}")),
        );
    }
    std::fs::write(data.join("Patient.ndjson"), patients.join("\n")).unwrap();
    std::fs::write(data.join("Condition.ndjson"), conditions.join("\n")).unwrap();
    std::fs::write(data.join("Consent.ndjson"), consents.join("\n")).unwrap();
    let report = import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);

    let eligibility = Eligibility::new(consented::opt_in());
    // Ages at 2026-06-01 run from 32 (born 1994) to 46 (born 1980).
    let cohort = |max_age: u32| {
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-06-01","conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}],"age":{{"max":{max_age}}}}},"analysis":{{"kind":"count"}}}}"#
        );
        let spec = QuerySpec::parse(json.as_bytes()).unwrap();
        let request = ghx_node::gate::consent_request("HRESCH", &spec, 1_780_272_000);
        let prepared = eligibility.prepare(&f.store, &request).unwrap();
        let members = ghx_node::testing::cohort_members(
            &f.store,
            &spec,
            &prepared.context,
            &eligibility.rules().sensitive,
        )
        .unwrap();
        // The node prints a cohort from the hashes its consent decisions
        // store: they are the hashes of the members' ids.
        let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        let print = CohortPrint::of_members(&members);
        assert_eq!(print, CohortPrint::of(&ids));
        print
    };
    let all = cohort(99);
    assert_eq!(all.len(), 15);
    differencing::check(&f.store, "Acme", &all, 10).unwrap();
    differencing::record(&f.store, "Acme", "study-0001", "q1", &all).unwrap();
    // The same cohort again reveals nothing new.
    differencing::check(&f.store, "Acme", &cohort(99), 10).unwrap();
    // One patient fewer (the oldest) is refused, without saying how many.
    let err = differencing::check(&f.store, "Acme", &cohort(45), 10).unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused by differencing control: set beside what was already released to Acme, this release could single out patients"
    );
    // Ten fewer is far enough; another organisation has no earlier cohort.
    differencing::check(&f.store, "Acme", &cohort(36), 10).unwrap();
    differencing::check(&f.store, "Other Org", &cohort(45), 10).unwrap();
    // A cohort released again, under another study, is stored once; the
    // checks still see it and every other distinct cohort.
    differencing::record(&f.store, "Acme", "study-0002", "q2", &all).unwrap();
    assert_eq!(f.store.released_cohort_count("Acme").unwrap(), 1);
    differencing::record(&f.store, "Acme", "study-0002", "q3", &cohort(36)).unwrap();
    assert_eq!(f.store.released_cohort_count("Acme").unwrap(), 2);
    assert!(differencing::check(&f.store, "Acme", &cohort(45), 10).is_err());
    // Two patients (ages 32, 33): 13 from the first cohort, 3 from the second.
    assert!(differencing::check(&f.store, "Acme", &cohort(33), 10).is_err());
    differencing::check(&f.store, "Acme", &cohort(36), 10).unwrap();
}

fn counting_members_equals_counting_in_sql(f: Fixture) {
    use ghx_node::consent::eligibility::Eligibility;
    let data = f.dir.path().join("members");
    synth(&data, "christian", 400);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let eligibility = Eligibility::new(consented::opt_in());
    let index = CohortIndex::new();
    let queries = [
        format!(r#""conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}]}},"analysis":{{"kind":"count","group_by":["sex","age_band"]}}"#),
        format!(r#""conditions":[{{"system":"{kcd}","code":"I10"}}]}},"analysis":{{"kind":"count","group_by":["age_band"]}}"#),
        r#""observations":[{"system":"http://loinc.org","code":"4548-4","min":6.5}],"age":{"min":40,"max":69}},"analysis":{"kind":"count","group_by":["sex"]}"#.to_owned(),
        r#""age":{"min":50}},"analysis":{"kind":"count"}"#.to_owned(),
        format!(r#""conditions":[{{"system":"{kcd}","code":"Z99"}}]}},"analysis":{{"kind":"count"}}"#),
        format!(r#""conditions":[{{"system":"{kcd}","code":"Z99"}}]}},"analysis":{{"kind":"count","group_by":["sex"]}}"#),
        format!(r#""conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}]}},"analysis":{{"kind":"count","group_by":["sex","age_band",{{"diagnosis":[{{"label":"htn","system":"{kcd}","codes":["I10"]}},{{"label":"lipid","system":"{kcd}","codes":["E78"],"match":"prefix"}}]}}]}}"#),
        r#""sex":["female"],"encounters":[{"class":"AMB","min_count":3,"window":{"from":"2020-01-01"}}],"medications":[{"system":"http://www.whocc.no/atc","code":"A10BA02"}]},"analysis":{"kind":"count","group_by":["age_band"]}"#.to_owned(),
    ];
    for q in queries {
        let json = format!(r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01",{q}}}"#);
        let spec = QuerySpec::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
        let request = ghx_node::gate::consent_request("HRESCH", &spec, 1_780_272_000);
        let prepared = eligibility.prepare(&f.store, &request).unwrap();
        let sensitive = &eligibility.rules().sensitive;
        let sql = ghx_node::testing::count(&f.store, &spec, &prepared.context, sensitive).unwrap();
        let members =
            ghx_node::testing::cohort_for_analysis(&f.store, &spec, &prepared.context, sensitive)
                .unwrap();
        // The cohort index gives the SQL's members where it covers the
        // query (codes without windows, sex, age), and runs it elsewhere.
        let covered = !q.contains("observations") && !q.contains("encounters");
        assert_eq!(CohortIndex::covers(&spec), covered, "{q}");
        let from_index = index
            .members(&f.store, &spec, &prepared.context, sensitive)
            .unwrap();
        assert_eq!(by_print(from_index), by_print(members.clone()), "{q}");
        let mut counted = ghx_node::testing::analyse(&spec, &members, false).cells;
        let mut sql = sql;
        let by_key =
            |a: &ghx_node::testing::RawCell, b: &ghx_node::testing::RawCell| a.key.cmp(&b.key);
        counted.sort_by(by_key);
        sql.sort_by(by_key);
        assert_eq!(counted, sql, "{q}");
    }
}

/// Members in a comparable order.
fn by_print(mut members: Vec<ghx_node::testing::Member>) -> Vec<ghx_node::testing::Member> {
    members.sort_by_key(|m| m.print);
    members
}

fn the_cohort_index_follows_imports(f: Fixture) {
    use ghx_node::consent::eligibility::Eligibility;
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let data = f.dir.path().join("index");
    std::fs::create_dir_all(&data).unwrap();
    let patient = |id: &str, gender: &str, born: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","gender":"{gender}","birthDate":"{born}"}}"#
        )
    };
    let condition = |id: &str, patient: &str, code: &str| {
        format!(
            r#"{{"resourceType":"Condition","id":"{id}","subject":{{"reference":"Patient/{patient}"}},"code":{{"coding":[{{"system":"{kcd}","code":"{code}"}}]}}}}"#
        )
    };
    let consent = |i: usize, id: &str| {
        CONSENTED
            .replace("\"k1\"", &format!("\"ik{i}\""))
            .replace("Patient/v1", &format!("Patient/{id}"))
    };
    let people = [
        ("i1", "female", "1950-02-01"),
        ("i2", "male", "1970-02-01"),
        ("i3", "female", "2030-01-01"),
    ];
    write(
        &data.join("Patient.ndjson"),
        &people
            .iter()
            .map(|(id, g, b)| patient(id, g, b))
            .collect::<Vec<_>>(),
    );
    write(
        &data.join("Consent.ndjson"),
        &people
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| consent(i, id))
            .collect::<Vec<_>>(),
    );
    write(
        &data.join("Condition.ndjson"),
        &[
            &condition("ic1", "i1", "E11.9"),
            &condition("ic2", "i2", "I10"),
            // Born after the reference date: never in a cohort.
            &condition("ic3", "i3", "E11.9"),
        ],
    );
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();

    let eligibility = Eligibility::new(consented::opt_in());
    let index = CohortIndex::new();
    let query = format!(
        r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}]}},"analysis":{{"kind":"count","group_by":["sex",{{"diagnosis":[{{"label":"htn","system":"{kcd}","codes":["I10"]}}]}}]}}}}"#
    );
    let spec = QuerySpec::parse(query.as_bytes()).unwrap();
    let cells = || {
        let request = ghx_node::gate::consent_request("HRESCH", &spec, 1_780_272_000);
        let prepared = eligibility.prepare(&f.store, &request).unwrap();
        let sensitive = &eligibility.rules().sensitive;
        let members = index
            .members(&f.store, &spec, &prepared.context, sensitive)
            .unwrap();
        let sql =
            ghx_node::testing::cohort_for_analysis(&f.store, &spec, &prepared.context, sensitive)
                .unwrap();
        assert_eq!(by_print(members.clone()), by_print(sql));
        ghx_node::testing::analyse(&spec, &members, false)
            .cells
            .into_iter()
            .map(|c| (c.key.join("/"), c.value.patients()))
            .collect::<Vec<_>>()
    };
    assert_eq!(cells(), [("female/none".to_owned(), 1)]);
    // A diagnosis imported later reaches the sets the index already holds
    // (same consent context, newer data generation): i2 joins the cohort
    // and is counted in the hypertension group.
    write(
        &data.join("Condition.ndjson"),
        &[&condition("ic4", "i2", "E11.2")],
    );
    std::fs::remove_file(data.join("Patient.ndjson")).unwrap();
    std::fs::remove_file(data.join("Consent.ndjson")).unwrap();
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    assert_eq!(
        cells(),
        [("female/none".to_owned(), 1), ("male/htn".to_owned(), 1)]
    );
}

/// Runs a query's members through the engine, as the node does.
fn analysed(store: &Store, json: &str) -> Vec<ghx_node::testing::RawCell> {
    use ghx_node::consent::eligibility::Eligibility;
    let spec = QuerySpec::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
    let eligibility = Eligibility::new(consented::opt_in());
    let request = ghx_node::gate::consent_request("HRESCH", &spec, 1_780_272_000);
    let prepared = eligibility.prepare(store, &request).unwrap();
    let sensitive = &eligibility.rules().sensitive;
    let members =
        ghx_node::testing::cohort_for_analysis(store, &spec, &prepared.context, sensitive).unwrap();
    ghx_node::testing::analyse(&spec, &members, false).cells
}

fn statistics_match_an_independent_computation_from_the_export(f: Fixture) {
    use ghx_node::testing::Raw;
    use ghx_study::result::Moments;
    use std::collections::BTreeMap;
    let data = f.dir.path().join("stats");
    synth(&data, "chosun", 600);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let export = Export::read(&data);
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let as_of = time::macros::date!(2026 - 01 - 01);

    // Latest HbA1c of diabetic patients, by sex: n, mean, sd, sorted values.
    let cells = analysed(
        &f.store,
        &format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}]}},
                "analysis":{{"kind":"summary","variable":{{"kind":"observation","system":"http://loinc.org","code":"4548-4"}},"group_by":["sex"]}}}}"#
        ),
    );
    let mut expected: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (id, gender, _) in export.cohort(as_of, |id, _, _| export.has_condition(id, kcd, "E11")) {
        if let Some(v) = export.latest_value(id, "4548-4") {
            expected.entry(gender.to_owned()).or_default().push(v);
        }
    }
    assert!(
        !expected.is_empty(),
        "the synthetic data has diabetic patients with HbA1c"
    );
    assert_eq!(cells.len(), expected.len());
    for cell in &cells {
        let Raw::Values(values) = &cell.value else {
            panic!("summary cells hold values")
        };
        let mut want = expected[&cell.key[0]].clone();
        want.sort_by(f64::total_cmp);
        assert_eq!(values, &want, "{:?}", cell.key);
        let (got, pooled) = (Moments::of(values), Moments::of(&want));
        assert!((got.mean - pooled.mean).abs() < 1e-9 && got.n == pooled.n);
    }

    // Age histogram of everyone consenting, by sex, in ten-year bins.
    let cells = analysed(
        &f.store,
        r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
            "analysis":{"kind":"histogram","variable":{"kind":"age"},"bins":{"start":20,"width":10,"count":6},"group_by":["sex"]}}"#,
    );
    let bins = ghx_study::query::Bins {
        start: 20.0,
        width: 10.0,
        count: 6,
    };
    let mut expected: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for (_, gender, birth) in export.cohort(as_of, |_, _, _| true) {
        if let Some(b) = birth {
            let age = ghx_federation_tests::reference::age_at(b, as_of);
            *expected
                .entry(vec![
                    gender.to_owned(),
                    bins.label(bins.index(f64::from(age))),
                ])
                .or_default() += 1;
        }
    }
    let got: BTreeMap<Vec<String>, u64> = cells
        .iter()
        .map(|c| (c.key.clone(), c.value.patients()))
        .collect();
    assert_eq!(got, expected);

    // Metformin prescribed in 2024-2025 among patients aged 40+, by sex.
    let cells = analysed(
        &f.store,
        r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","age":{"min":40}},
            "analysis":{"kind":"rate","per":1000,"group_by":["sex"],
                        "event":{"medications":[{"system":"http://www.whocc.no/atc","code":"A10BA02","window":{"from":"2024-01-01","to":"2025-12-31"}}]}}}"#,
    );
    let (from, to) = ghx_study::query::Window {
        from: Some(time::macros::date!(2024 - 01 - 01)),
        to: Some(time::macros::date!(2025 - 12 - 31)),
    }
    .unix_bounds();
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, gender, _) in export.cohort(as_of, |_, _, birth| {
        birth.is_some_and(|b| ghx_federation_tests::reference::age_at(b, as_of) >= 40)
    }) {
        let event = export.medications.get(id).is_some_and(|meds| {
            meds.iter()
                .any(|(code, at)| code == "A10BA02" && *at >= from.unwrap() && *at < to.unwrap())
        });
        let e = expected.entry(gender.to_owned()).or_default();
        e.0 += u64::from(event);
        e.1 += 1;
    }
    let got: BTreeMap<String, (u64, u64)> = cells
        .iter()
        .map(|c| match c.value {
            Raw::Rate { events, population } => (c.key[0].clone(), (events, population)),
            _ => panic!("rate cells"),
        })
        .collect();
    assert_eq!(got, expected);
    assert!(
        got.values().any(|(events, _)| *events > 0),
        "some events in the window"
    );

    // Diabetic women with three or more ambulatory visits since 2022, by
    // diagnosis group (hypertension first, then dyslipidaemia).
    let cells = analysed(
        &f.store,
        &format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","sex":["female"],
                "conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}],
                "encounters":[{{"class":"AMB","min_count":3,"window":{{"from":"2022-01-01"}}}}]}},
                "analysis":{{"kind":"count","group_by":[{{"diagnosis":[
                    {{"label":"htn","system":"{kcd}","codes":["I10"]}},
                    {{"label":"lipid","system":"{kcd}","codes":["E78"],"match":"prefix"}}]}}]}}}}"#
        ),
    );
    let since = ghx_study::query::Window {
        from: Some(time::macros::date!(2022 - 01 - 01)),
        to: None,
    }
    .unix_bounds()
    .0
    .unwrap();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (id, _, _) in export.cohort(as_of, |id, gender, _| {
        gender == "female"
            && export.has_condition(id, kcd, "E11")
            && export.encounters.get(id).map_or(0, |es| {
                es.iter()
                    .filter(|(class, at)| class == "AMB" && *at >= since)
                    .count()
            }) >= 3
    }) {
        let group = if export.has_condition(id, kcd, "I10") {
            "htn"
        } else if export.has_condition(id, kcd, "E78") {
            "lipid"
        } else {
            "none"
        };
        *expected.entry(group.to_owned()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = cells
        .iter()
        .map(|c| (c.key[0].clone(), c.value.patients()))
        .collect();
    assert_eq!(got, expected);
    assert!(
        got.len() >= 2,
        "more than one diagnosis group is populated: {got:?}"
    );
}

fn privacy_budget_charges_refuse_overspending(f: Fixture) {
    use ghx_node::store::{BudgetScope, ChargeOutcome, PrivacyCharge};
    let charge = |id: &'static str, study: &'static str, epsilon: f64| PrivacyCharge {
        request_sha256: "q",
        organisation: "acme",
        study_id: study,
        capability_id: id,
        epsilon,
        delta: 0.0,
        study_epsilon: 1.0,
        study_delta: 0.0,
        organisation_epsilon: Some(1.5),
    };
    // Decimal epsilons add up to exactly the budget despite rounding.
    for (i, id) in ["c1", "c2", "c3"].into_iter().enumerate() {
        let outcome = f
            .store
            .charge_privacy(&charge(id, "s1", 0.1 + 0.2 * i as f64))
            .unwrap();
        assert!(
            matches!(outcome, ChargeOutcome::Charged { .. }),
            "{id}: {outcome:?}"
        );
    }
    let spent = f.store.privacy_spent("acme", "s1").unwrap();
    assert!((spent.epsilon - 0.9).abs() < 1e-9 && spent.queries == 3);
    // The study budget refuses, and a refused charge costs nothing.
    let refused = f.store.charge_privacy(&charge("c4", "s1", 0.2)).unwrap();
    assert!(matches!(
        refused,
        ChargeOutcome::Refused { scope: BudgetScope::Study, spent } if spent.queries == 3
    ));
    assert_eq!(f.store.privacy_spent("acme", "s1").unwrap(), spent);
    // A second study has its own budget but shares the organisation's cap.
    assert!(matches!(
        f.store.charge_privacy(&charge("c5", "s2", 0.5)).unwrap(),
        ChargeOutcome::Charged { .. }
    ));
    let refused = f.store.charge_privacy(&charge("c6", "s2", 0.2)).unwrap();
    assert!(
        matches!(refused, ChargeOutcome::Refused { scope: BudgetScope::Organisation, spent } if (spent.epsilon - 1.4).abs() < 1e-9),
        "{refused:?}"
    );
    assert_eq!(f.store.privacy_spent("acme", "s2").unwrap().queries, 1);
    // Delta is a budget of its own (Gaussian noise).
    let gaussian = |id: &'static str, delta: f64| PrivacyCharge {
        delta,
        study_delta: 1e-5,
        ..charge(id, "s4", 0.01)
    };
    assert!(matches!(
        f.store.charge_privacy(&gaussian("g1", 6e-6)).unwrap(),
        ChargeOutcome::Charged { .. }
    ));
    assert!(matches!(
        f.store.charge_privacy(&gaussian("g2", 6e-6)).unwrap(),
        ChargeOutcome::Refused { scope: BudgetScope::Study, spent } if spent.delta == 6e-6
    ));
    // Concurrent charges never overspend: 20 threads race for 0.5 of
    // budget in steps of 0.1; exactly five win.
    let store = f.store.clone();
    let winners: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                scope.spawn(move || {
                    let id = format!("race{i}");
                    let c = PrivacyCharge {
                        request_sha256: "q",
                        organisation: "other",
                        study_id: "s3",
                        capability_id: &id,
                        epsilon: 0.1,
                        delta: 0.0,
                        study_epsilon: 0.5,
                        study_delta: 0.0,
                        organisation_epsilon: None,
                    };
                    matches!(
                        store.charge_privacy(&c).unwrap(),
                        ChargeOutcome::Charged { .. }
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum()
    });
    assert_eq!(winners, 5);
}

fn view_variables_match_native_variables_and_rebuild_after_import(f: Fixture) {
    let data = f.dir.path().join("views");
    synth(&data, "chonnam", 300);
    import_path(&f.store, &data, &ImportOptions::default()).unwrap();
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    let view = r#"{"resourceType": "ViewDefinition", "resource": "Observation", "status": "active",
        "select": [{"column": [
            {"name": "patient", "path": "subject.getReferenceKey(Patient)"},
            {"name": "hba1c", "path": "value.ofType(Quantity).value"}]}],
        "where": [{"path": "code.coding.where(system = 'http://loinc.org' and code = '4548-4').exists()"}]}"#;
    let query = |variable: &str| {
        format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[{{"system":"{kcd}","code":"E11","match":"prefix"}}]}},
                "analysis":{{"kind":"summary","variable":{variable},"group_by":["sex"]}}}}"#
        )
    };
    let native = analysed(
        &f.store,
        &query(
            r#"{"kind":"observation","system":"http://loinc.org","code":"4548-4","pick":"max"}"#,
        ),
    );
    let via_view = query(&format!(
        r#"{{"kind":"view","view":{view},"column":"hba1c","pick":"max"}}"#
    ));
    let spec = QuerySpec::parse(via_view.as_bytes()).unwrap();
    let ghx_study::query::Analysis::Summary { variable, .. } = &spec.analysis else {
        unreachable!()
    };
    assert_eq!(analysed(&f.store, &via_view), native);
    assert!(!native.is_empty());
    // Materialised once per data generation.
    assert_eq!(ghx_node::views::ensure(&f.store, variable).unwrap(), None);
    let more = f.dir.path().join("views-more");
    synth(&more, "chosun", 50);
    import_path(&f.store, &more, &ImportOptions::default()).unwrap();
    assert!(
        ghx_node::views::ensure(&f.store, variable)
            .unwrap()
            .is_some()
    );
    assert_eq!(
        analysed(&f.store, &via_view),
        analysed(
            &f.store,
            &query(
                r#"{"kind":"observation","system":"http://loinc.org","code":"4548-4","pick":"max"}"#
            )
        )
    );
    // A batch that only deletes changes the data too.
    let generation = f.store.data_generation().unwrap();
    let victim = f
        .store
        .resources_page(Some("Observation"), None, 1)
        .unwrap()
        .remove(0)
        .key;
    let outcome = f
        .store
        .write_batch(&ghx_node::store::Batch {
            deletes: vec![victim],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(outcome.deleted, 1);
    assert_eq!(f.store.data_generation().unwrap(), generation + 1);
    assert!(
        ghx_node::views::ensure(&f.store, variable)
            .unwrap()
            .is_some()
    );
    // Views over diagnoses are refused: their sensitive categories could
    // not be enforced.
    let condition_view = view.replace(r#""resource": "Observation""#, r#""resource": "Condition""#);
    let err = QuerySpec::parse(
        query(&format!(
            r#"{{"kind":"view","view":{condition_view},"column":"hba1c","pick":"max"}}"#
        ))
        .as_bytes(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("may read Patient or Observation only, not Condition"),
        "{err}"
    );
}

fn a_runs_lineage_starts_once_and_advances_compare_and_set(f: Fixture) {
    use ghx_node::store::{LineageStep, RunKey};
    let run = RunKey {
        study_id: "study-0001",
        training_sha256: "ab",
        run_id: "run-0001",
    };
    let step = |round: i32, head: &str| LineageStep {
        round,
        head: head.to_owned(),
        model_json: if round < 0 {
            String::new()
        } else {
            format!("{{\"round\":{round}}}")
        },
    };
    assert_eq!(f.store.lineage(run).unwrap(), None);
    assert!(f.store.start_lineage(run, &step(-1, "g")).unwrap());
    // A second start finds it started and changes nothing.
    assert!(!f.store.start_lineage(run, &step(-1, "other")).unwrap());
    let at = f.store.lineage(run).unwrap().unwrap();
    assert_eq!((at.current, at.previous), (step(-1, "g"), None));
    assert!(
        f.store
            .move_lineage(run, &step(-1, "g"), &step(0, "h0"), Some(&step(-1, "g")))
            .unwrap()
    );
    // A request that read genesis too loses the race.
    assert!(
        !f.store
            .move_lineage(run, &step(-1, "g"), &step(0, "x"), Some(&step(-1, "g")))
            .unwrap()
    );
    // So does one that names the right round but another head.
    assert!(
        !f.store
            .move_lineage(run, &step(0, "x"), &step(1, "y"), Some(&step(0, "x")))
            .unwrap()
    );
    assert!(
        f.store
            .move_lineage(run, &step(0, "h0"), &step(1, "h1"), Some(&step(0, "h0")))
            .unwrap()
    );
    let at = f.store.lineage(run).unwrap().unwrap();
    assert_eq!(at.current, step(1, "h1"));
    assert_eq!(at.previous, Some(step(0, "h0")));
    // Round 1 redone from round 0: the current step is replaced, the one
    // before kept (the caller names it); only from the step that is
    // current.
    assert!(
        !f.store
            .move_lineage(run, &step(0, "h0"), &step(1, "z"), Some(&step(0, "h0")))
            .unwrap()
    );
    assert!(
        f.store
            .move_lineage(run, &step(1, "h1"), &step(1, "h1b"), Some(&step(0, "h0")))
            .unwrap()
    );
    let at = f.store.lineage(run).unwrap().unwrap();
    assert_eq!(at.current, step(1, "h1b"));
    assert_eq!(at.previous, Some(step(0, "h0")));
    assert!(
        f.store
            .move_lineage(run, &step(1, "h1b"), &step(1, "h1"), Some(&step(1, "h1b")))
            .unwrap()
    );
    // Another run of the training starts on its own; both are counted.
    let second = RunKey {
        run_id: "run-0002",
        ..run
    };
    assert!(f.store.start_lineage(second, &step(-1, "g2")).unwrap());
    assert_eq!(f.store.count_lineages("study-0001", "ab").unwrap(), 2);
    assert_eq!(f.store.count_lineages("study-0001", "cd").unwrap(), 0);
    assert_eq!(
        f.store.lineage(run).unwrap().unwrap().current,
        step(1, "h1")
    );
    // A run is sealed once: its secret and rows stay what they were first.
    let sealed = Some(("s1".to_owned(), "rows-a".to_owned()));
    assert_eq!(f.store.seal_run(run, "s1", "rows-a").unwrap(), sealed);
    assert_eq!(f.store.seal_run(run, "s2", "rows-b").unwrap(), sealed);
    let unknown = RunKey {
        run_id: "run-none",
        ..run
    };
    assert_eq!(f.store.seal_run(unknown, "s1", "rows-a").unwrap(), None);
}
