//! Issue 40: exports made by other tools (ICD-10-CM and SNOMED CT coding,
//! transaction Bundles on NDJSON lines, manifests, long decimals, damaged
//! files) import faithfully, on both backends.

use std::io::Write;
use std::path::Path;

use ghx_federation_tests::consented;
use ghx_node::Store;
use ghx_node::consent::{ConsentRules, DefaultConsent, SensitiveCodes};
use ghx_node::import::{FileStatus, ImportOptions, MapKind, import_path, load_code_map, reindex};
use ghx_node::terminology::{ICD10CM, SNOMED};
use ghx_study::query::QuerySpec;

use super::{Fixture, write};

fn opt_out() -> ConsentRules {
    ConsentRules {
        default: DefaultConsent::OptOut,
        sensitive: SensitiveCodes::default(),
    }
}

/// Patients counted for a cohort of one KCD-8 diagnosis prefix.
fn kcd_count(store: &Store, code: &str) -> u64 {
    let json = format!(
        r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[
            {{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"{code}","match":"prefix"}}]}},
            "analysis":{{"kind":"count"}}}}"#
    );
    let spec = QuerySpec::parse(json.as_bytes()).unwrap();
    consented::count(store, &spec, opt_out())
        .0
        .iter()
        .map(|c| c.value.patients())
        .sum()
}

/// A synthetic-generator-shaped transaction Bundle for one patient: an
/// ICD-10-CM diagnosis and a lab value with many decimals (issue 40: both
/// made the patient vanish).
fn patient_bundle(i: usize) -> String {
    format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[
        {{"fullUrl":"urn:uuid:p{i}","resource":{{"resourceType":"Patient","id":"cm{i}","gender":"female","birthDate":"1960-02-03",
            "extension":[{{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex","valueCode":"F"}}]}},
          "request":{{"method":"PUT","url":"Patient/cm{i}"}}}},
        {{"fullUrl":"urn:uuid:c{i}","resource":{{"resourceType":"Condition","id":"cmc{i}","subject":{{"reference":"urn:uuid:p{i}"}},
            "code":{{"coding":[{{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"E11.65"}}]}},"onsetDateTime":"2019-05-01"}},
          "request":{{"method":"PUT","url":"Condition/cmc{i}"}}}},
        {{"fullUrl":"urn:uuid:o{i}","resource":{{"resourceType":"Observation","id":"cmo{i}","status":"final",
            "code":{{"coding":[{{"system":"http://loinc.org","code":"2345-7"}}]}},"subject":{{"reference":"urn:uuid:p{i}"}},
            "effectiveDateTime":"2024-03-01T09:00:00+09:00","valueQuantity":{{"value":323.0707114835185,"unit":"mg/dL"}}}},
          "request":{{"method":"PUT","url":"Observation/cmo{i}"}}}}]}}"#
    )
    .replace('\n', " ")
}

fn gzip(path: &Path, text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).unwrap();
    let bytes = encoder.finish().unwrap();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

pub(super) fn exports_of_other_tools_import_whole_or_not_at_all(f: Fixture) {
    let dir = f.dir.path().join("export");
    std::fs::create_dir_all(&dir).unwrap();
    // Files are imported in name order: damaged ones come first, so the
    // good ones after them prove the import goes on.
    let good: Vec<String> = (0..12).map(patient_bundle).collect();
    // 1. A gzip whose checksum is wrong (one payload byte flipped).
    let mut bytes = gzip(&dir.join("a-checksum.ndjson.gz"), &good.join("\n"));
    let at = bytes.len() - 6;
    bytes[at] ^= 0xff;
    std::fs::write(dir.join("a-checksum.ndjson.gz"), &bytes).unwrap();
    // 2. A gzip cut short.
    let bytes = gzip(&dir.join("b-truncated.ndjson.gz"), &good.join("\n"));
    std::fs::write(dir.join("b-truncated.ndjson.gz"), &bytes[..bytes.len() / 2]).unwrap();
    // 3. A non-UTF-8 byte on line 3 (lines 1 and 2 are valid).
    let mut latin1 = format!("{}\n{}\n", good[0], good[1]).into_bytes();
    latin1.extend(br#"{"resourceType":"Patient","id":"bad","name":[{"text":"Jos"#);
    latin1.push(0xe9);
    latin1.extend(b"\"}]}\n");
    std::fs::write(dir.join("c-latin1.ndjson"), latin1).unwrap();
    // 4. A bulk-export manifest beside the data.
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"transactionTime":"2026-01-01T00:00:00Z","request":"$export","output":[]}"#,
    )
    .unwrap();
    // 5. A transaction naming one resource twice (FHIR forbids it).
    let twice = patient_bundle(99).replace(
        r#"{"fullUrl":"urn:uuid:c99""#,
        r#"{"resource":{"resourceType":"Patient","id":"cm99"},"request":{"method":"PUT","url":"Patient/cm99"}},{"fullUrl":"urn:uuid:c99""#,
    );
    write(&dir.join("d-twice.ndjson"), &[twice]);
    // 6. The good data: Bundles on NDJSON lines, after a byte-order mark.
    let mut lines = good.clone();
    lines[0] = format!("\u{feff}{}", lines[0]);
    write(&dir.join("z-patients.ndjson"), &lines);
    // 7. One resource alone in a .json file, the last file (BOM too).
    std::fs::write(
        dir.join("zz-one.json"),
        "\u{feff}{\"resourceType\":\"Patient\",\"id\":\"alone\",\"gender\":\"male\"}",
    )
    .unwrap();

    let report = import_path(&f.store, &dir, &ImportOptions::default()).unwrap();
    let status = |name: &str| {
        report
            .files
            .iter()
            .find(|file| file.path.ends_with(name))
            .unwrap()
            .status
            .clone()
    };
    let failed = |name: &str| match status(name) {
        FileStatus::Failed(why) => why,
        other => panic!("{name}: expected failed, got {other:?}"),
    };
    assert!(failed("a-checksum.ndjson.gz").contains("damaged"));
    assert!(failed("b-truncated.ndjson.gz").contains("truncated"));
    let why = failed("c-latin1.ndjson");
    assert!(why.contains("line 3") && why.contains("UTF-8"), "{why}");
    assert!(!why.contains("Jos"), "{why}");
    assert!(matches!(status("manifest.json"), FileStatus::Skipped(_)));
    assert_eq!(status("z-patients.ndjson"), FileStatus::Imported);
    assert_eq!(report.failed_files().count(), 3);
    // The transaction naming Patient/cm99 twice is refused whole.
    assert_eq!(report.rejected.len(), 4, "{:?}", report.rejected);
    assert!(
        report
            .rejected
            .iter()
            .all(|r| r.file.ends_with("d-twice.ndjson"))
    );
    assert!(
        report
            .rejected
            .iter()
            .any(|r| r.reason.contains("appears twice")),
        "{:?}",
        report.rejected
    );

    // Nothing of a damaged file is stored: only the 12 good patients, each
    // with its diagnosis and long-decimal lab value, and the one alone.
    let counts = f.store.resource_counts().unwrap();
    assert_eq!(counts.get("Patient"), Some(&13));
    assert!(f.store.resource("Patient", "alone").unwrap().is_some());
    assert_eq!(counts.get("Observation"), Some(&12));
    assert!(f.store.resource("Patient", "bad").unwrap().is_none());
    assert_eq!(
        report
            .code_systems
            .get(&("Condition".to_owned(), ICD10CM.to_owned())),
        Some(&12)
    );
    // ICD-10-CM E11.65 answers the KCD-8 category E11; a KCD-8 subcode
    // does not cross systems (they divide categories differently).
    assert_eq!(kcd_count(&f.store, "E11"), 12);
    assert_eq!(kcd_count(&f.store, "E116"), 0);
    let held = f.store.held_code_systems().unwrap();
    assert!(held.contains(&("Condition".to_owned(), ICD10CM.to_owned())));
}

pub(super) fn snomed_diagnoses_answer_kcd_queries_through_a_loaded_map(f: Fixture) {
    let file = f.dir.path().join("snomed.ndjson");
    // s11's diagnosis has a second SNOMED CT coding the map does not know
    // (here HIV disease): it must not count as a mapped E11 alone. s0 denies
    // research use of the SNOMED CT diabetes code.
    let mut lines: Vec<String> = (0..11)
        .flat_map(|i| {
            [
                format!(r#"{{"resourceType":"Patient","id":"s{i}","gender":"male","birthDate":"1955"}}"#),
                format!(
                    r#"{{"resourceType":"Condition","id":"sc{i}","subject":{{"reference":"Patient/s{i}"}},"code":{{"coding":[{{"system":"http://snomed.info/sct","code":"44054006"}}]}}}}"#
                ),
            ]
        })
        .collect();
    lines.push(
        r#"{"resourceType":"Patient","id":"s11","gender":"male","birthDate":"1955"}"#.to_owned(),
    );
    lines.push(r#"{"resourceType":"Condition","id":"sc11","subject":{"reference":"Patient/s11"},"code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006"},{"system":"http://snomed.info/sct","code":"86406008"}]}}"#.to_owned());
    lines.push(r#"{"resourceType":"Consent","id":"k0","status":"active","scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"research"}]},"category":[{"coding":[{"system":"http://loinc.org","code":"57016-8"}]}],"patient":{"reference":"Patient/s0"},"dateTime":"2025-01-01T00:00:00Z","provision":{"type":"permit","provision":[{"type":"deny","code":[{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}]}]}]}}"#.to_owned());
    // s12 permits research on the SNOMED CT code only: a map to the whole
    // KCD-8 category must not widen that permit to KCD-8 requests.
    lines.push(
        r#"{"resourceType":"Patient","id":"s12","gender":"male","birthDate":"1955"}"#.to_owned(),
    );
    lines.push(r#"{"resourceType":"Condition","id":"sc12","subject":{"reference":"Patient/s12"},"code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}]}}"#.to_owned());
    lines.push(r#"{"resourceType":"Consent","id":"k12","status":"active","scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"research"}]},"category":[{"coding":[{"system":"http://loinc.org","code":"57016-8"}]}],"patient":{"reference":"Patient/s12"},"dateTime":"2025-01-01T00:00:00Z","provision":{"type":"permit","code":[{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}]}]}}"#.to_owned());
    write(&file, &lines);
    let report = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(
        report
            .code_systems
            .get(&("Condition".to_owned(), SNOMED.to_owned())),
        Some(&13)
    );
    assert_eq!(kcd_count(&f.store, "E11"), 0, "no map yet");
    let map = f.dir.path().join("snomed-kcd.csv");
    std::fs::write(&map, "snomed_code,kcd_code\n44054006,E11\n").unwrap();
    assert_eq!(
        load_code_map(&f.store, &map, MapKind::SnomedToKcd).unwrap(),
        1
    );
    reindex(&f.store, 100).unwrap();
    // s1..s10: s0's deny of the SNOMED CT code governs the KCD-8 query too,
    // s11's partly mapped diagnosis is not read as E11, and s12's permit
    // stays the SNOMED CT code's.
    assert_eq!(kcd_count(&f.store, "E11"), 10);
    // A bad row names its line and changes nothing.
    std::fs::write(&map, "44054006,E11\nnot-a-code,E11\n").unwrap();
    let err = load_code_map(&f.store, &map, MapKind::SnomedToKcd).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    assert_eq!(kcd_count(&f.store, "E11"), 10);
}

pub(super) fn departures_from_the_format_are_rejected_unless_the_node_is_lenient(f: Fixture) {
    let file = f.dir.path().join("typos.ndjson");
    write(
        &file,
        &[
            r#"{"resourceType":"Patient","id":"t1","gender":"male","brithDate":"1970-01-01"}"#,
            r#"{"resourceType":"Patient","id":"t2","gender":"male","birthDate":"1970-01-01"}"#,
        ],
    );
    let report = import_path(&f.store, &file, &ImportOptions::default()).unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert!(
        report.rejected[0]
            .reason
            .contains("Patient.brithDate: unknown element"),
        "{}",
        report.rejected[0].reason
    );
    assert!(f.store.resource("Patient", "t1").unwrap().is_none());
    let lenient = ImportOptions {
        lenient: true,
        ..ImportOptions::default()
    };
    let report = import_path(&f.store, &file, &lenient).unwrap();
    assert!(report.rejected.is_empty());
    assert_eq!(report.let_through.len(), 1);
    assert!(f.store.resource("Patient", "t1").unwrap().is_some());
}

/// The Python `fhir.resources` R4 (4.0.1) models: where `.ci/run` installs
/// them, or `GHX_FHIR_RESOURCES`.
fn python_fhir_resources() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("GHX_FHIR_RESOURCES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-fhir"));
    let probe = std::process::Command::new("python3")
        .env("PYTHONPATH", &dir)
        .args([
            "-c",
            "import fhir.resources as f; assert f.__fhir_version__ == '4.0.1'",
        ])
        .output()
        .ok()?;
    probe.status.success().then_some(dir)
}

const VALIDATE_PY: &str = r#"
import json, sys
from fhir.resources import get_fhir_model_class
for line in sys.stdin:
    obj = json.loads(line)
    try:
        get_fhir_model_class(obj["resourceType"]).parse_obj(obj)
        print("ok")
    except Exception as e:
        print("invalid " + str(e).splitlines()[1].strip())
"#;

/// The node's verdict on every resource equals an independent R4
/// validator's (Python fhir.resources 4.0.1): the synthetic export's own
/// shapes are valid to both, and each departure issue 40 names is invalid
/// to both. (The node is stricter in one respect not compared here: codes
/// of required bindings, `gender: robot`, which fhir.resources lets pass.)
#[test]
fn an_independent_r4_validator_agrees_with_the_node() {
    let Some(py) = python_fhir_resources() else {
        eprintln!(
            "SKIPPED an_independent_r4_validator_agrees_with_the_node: python3 with fhir.resources 4.0.1 \
             not found (.ci/run installs it into target/py-fhir; or set GHX_FHIR_RESOURCES)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    super::synth(&data, "chosun", 30);
    let mut lines = Vec::new();
    for ty in ghx_synth::RESOURCE_TYPES {
        let text = std::fs::read_to_string(data.join(format!("{ty}.ndjson"))).unwrap();
        lines.extend(text.lines().take(15).map(str::to_owned));
    }
    let valid = lines.len();
    lines.extend(
        [
            r#"{"resourceType":"Patient","id":"x1","brithDate":"1970-01-01"}"#,
            r#"{"resourceType":"Patient","id":"x2","identifier":[{"identifer":"a","value":"1"}]}"#,
            r#"{"resourceType":"Patient","id":"x3","birthDate":"2025-13-45"}"#,
            r#"{"resourceType":"Condition","id":"x5","subject":{"reference":"Patient/p"},"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":""}]}}"#,
            r#"{"resourceType":"MedicationAdministration","id":"x6","status":"completed","medicationCodeableConcept":{"text":"x"},"subject":{"reference":"Patient/p"},"effectiveDateTime":"2025-01-01","dosage":{"timing":{"code":{"text":"BID"}}}}"#,
            r#"{"resourceType":"Observation","id":"x7","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p"},"valueQuantity":{"value":"high"}}"#,
            r#"{"resourceType":"Encounter","id":"x8","status":"finished","class":{"code":"AMB"},"period":{"start":"2025-02-30"}}"#,
        ]
        .map(str::to_owned),
    );
    let file = dir.path().join("mixed.ndjson");
    write(&file, &lines);

    let mut child = std::process::Command::new("python3")
        .env("PYTHONPATH", &py)
        .args(["-c", VALIDATE_PY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let python: Vec<bool> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l == "ok")
        .collect();
    assert_eq!(python.len(), lines.len());

    let store = Store::open(dir.path().join("v.db").to_str().unwrap()).unwrap();
    let report = import_path(&store, &file, &ImportOptions::default()).unwrap();
    let rejected: std::collections::BTreeSet<u64> = report
        .rejected
        .iter()
        .map(|r| match r.location {
            ghx_node::import::Location::Line(n) => n,
            ref other => panic!("{other:?}"),
        })
        .collect();
    for (i, line) in lines.iter().enumerate() {
        let node = !rejected.contains(&(i as u64 + 1));
        assert_eq!(
            node, python[i],
            "node and fhir.resources disagree on {line}"
        );
        assert_eq!(node, i < valid, "{line}");
    }
}
