//! `ghx node import` as a hospital runs it: an import killed with SIGKILL
//! leaves no half batch and resumes where it stopped, ending in the same
//! state as an uninterrupted import; an offline import with a damaged file
//! reports it, writes the rejects file and shows the consent picture.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ghx_node::Store;
use ghx_synth::{HospitalProfile, SynthOptions};

fn config(dir: &Path, db: &Path) -> std::path::PathBuf {
    // Import needs only the database; TLS and policy paths are never opened.
    let path = dir.join(format!(
        "{}.toml",
        db.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &path,
        format!(
            "id = \"chosun\"\ndisplay_name = \"Chosun\"\nlisten = \"127.0.0.1:0\"\ndatabase_url = \"{}\"\npolicy_dir = \"policies\"\n\
             [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n\
             [[coordinator_keys]]\nkid = \"k\"\npublic_key = \"k.pem\"\n",
            db.display()
        ),
    )
    .unwrap();
    path
}

fn import(config: &Path, data: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(["node", "import", "--batch-size", "300", "--config"])
        .arg(config)
        .arg("--rejects")
        .arg(config.with_extension("rejects.txt"))
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ghx")
}

fn lines(path: &Path) -> i64 {
    std::fs::read_to_string(path).unwrap().lines().count() as i64
}

#[test]
fn a_killed_import_leaves_no_half_batch_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ghx_synth::write_ndjson_dir(
        &SynthOptions {
            hospital: HospitalProfile::by_id("chosun").unwrap(),
            patients: 3000,
            seed: 5,
            as_of: ghx_synth::default_as_of(),
            shared: 0.0,
        },
        &data,
    )
    .unwrap();
    let db = dir.path().join("killed.db");
    let cfg = config(dir.path(), &db);
    let store = Store::open(db.to_str().unwrap()).unwrap();
    let total = || store.resource_counts().unwrap().values().sum::<u64>();

    // Kill it part way through.
    let mut child = import(&cfg, &data);
    let started = Instant::now();
    while total() < 20_000 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "import made no progress"
        );
        if child.try_wait().unwrap().is_some() {
            panic!("the import finished before it could be interrupted; make the data larger");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Every file's stored resources are exactly the lines its checkpoint
    // says were committed: whole batches only.
    let counts = store.resource_counts().unwrap();
    let mut interrupted = 0;
    for ty in ghx_synth::RESOURCE_TYPES {
        let file = std::fs::canonicalize(data.join(format!("{ty}.ndjson"))).unwrap();
        let stored = counts.get(ty).copied().unwrap_or(0) as i64;
        match store.checkpoint(&file.to_string_lossy()).unwrap() {
            Some(cp) => {
                assert_eq!(
                    stored, cp.lines_committed,
                    "{ty}: stored resources match the checkpoint"
                );
                if !cp.finished {
                    interrupted += 1;
                    assert!(cp.lines_committed < lines(&file));
                }
            }
            None => assert_eq!(stored, 0, "{ty}: nothing stored before its file started"),
        }
    }
    assert!(
        interrupted <= 1,
        "at most the file being read is unfinished"
    );

    // Run it again: it resumes, and ends where a clean import ends.
    let output = import(&cfg, &data).wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("resumed: skipped"), "{stdout}");
    let clean_db = dir.path().join("clean.db");
    let clean_cfg = config(dir.path(), &clean_db);
    assert!(import(&clean_cfg, &data).wait().unwrap().success());
    let clean = Store::open(clean_db.to_str().unwrap()).unwrap();
    assert_eq!(
        store.resource_counts().unwrap(),
        clean.resource_counts().unwrap()
    );
    let spec = ghx_study::query::QuerySpec::parse(
        br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}],
             "observations":[{"system":"http://loinc.org","code":"4548-4","min":6.5}]},
            "analysis":{"kind":"count","group_by":["sex","age_band"]}}"#,
    )
    .unwrap();
    assert_eq!(
        consented_counts(&store, &spec),
        consented_counts(&clean, &spec)
    );
    // No resource was written twice: every stored resource is version 1.
    let page = store.resources_page(None, None, 1_000_000).unwrap();
    assert!(page.iter().all(|r| r.version_id == 1));
}

/// Counts the way the node's API does: consent decisions first.
fn consented_counts(
    store: &Store,
    spec: &ghx_study::query::QuerySpec,
) -> Vec<ghx_node::testing::RawCell> {
    use ghx_node::consent::{ConsentRules, DefaultConsent, eligibility::Eligibility};
    let eligibility = Eligibility::new(ConsentRules {
        default: DefaultConsent::OptIn,
        sensitive: Default::default(),
    });
    let request = ghx_node::gate::consent_request("HRESCH", spec, 1_780_272_000);
    let prepared = eligibility.prepare(store, &request).unwrap();
    ghx_node::testing::count(store, spec, &prepared.context, &Default::default()).unwrap()
}

/// Issue 40, as a hospital's IT team sees it: an offline import with only
/// the database in the node's file, one damaged file among good ones, no
/// Consent resources at an opt-in hospital, and a typo in the file.
#[test]
fn an_offline_import_reports_files_rejects_and_the_consent_picture() {
    let dir = tempfile::tempdir().unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/chosun");
    let cfg = dir.path().join("node.toml");
    let db = dir.path().join("offline.db");
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{}\"\npolicy_dir = \"{}\"\n",
            db.display(),
            policies.display()
        ),
    )
    .unwrap();
    let data = dir.path().join("export");
    std::fs::create_dir_all(&data).unwrap();
    let mut good = Vec::new();
    for i in 0..15 {
        good.push(format!(
            r#"{{"resourceType":"Patient","id":"p{i}","gender":"female","birthDate":"1961-01-01"}}"#
        ));
        good.push(format!(
            r#"{{"resourceType":"Condition","id":"c{i}","subject":{{"reference":"Patient/p{i}"}},"code":{{"coding":[{{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"E11.9"}}]}}}}"#
        ));
    }
    std::fs::write(data.join("b-good.ndjson"), good.join("\n")).unwrap();
    let mut bad = format!("{}\n", good[0]).into_bytes();
    bad.extend(b"{\"resourceType\":\"Patient\",\"id\":\"x\",\"gender\":\"ma\xffle\"}\n");
    std::fs::write(data.join("a-bad.ndjson"), bad).unwrap();
    let rejects = dir.path().join("rejects.txt");

    let out = Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(["node", "import", "--config"])
        .arg(&cfg)
        .arg("--rejects")
        .arg(&rejects)
        .arg(&data)
        .output()
        .expect("run ghx");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed file fails the import");
    assert!(
        stderr.contains("1 of 2 files were not imported") && stderr.contains("a-bad.ndjson"),
        "{stderr}"
    );
    assert!(
        stdout.contains("a-bad.ndjson: NOT IMPORTED: line 2"),
        "{stdout}"
    );
    assert!(stdout.contains("ICD-10-CM"), "{stdout}");
    assert!(
        stdout.contains("consent (opt-in hospital): 0 of 15 patients can take part in research now; 0 have a Consent resource"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(&rejects).unwrap();
    assert!(
        written.contains("not-imported") && written.contains("line 2"),
        "{written}"
    );
    let store = Store::open(db.to_str().unwrap()).unwrap();
    assert_eq!(store.resource_counts().unwrap().get("Patient"), Some(&15));

    let status = Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(["node", "status", "--config"])
        .arg(&cfg)
        .output()
        .expect("run ghx");
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{shown}");
    assert!(
        shown.contains("Condition") && shown.contains("ICD-10-CM"),
        "{shown}"
    );
    assert!(shown.contains("0 of 15 patients"), "{shown}");

    // A typo in the file is named with its line.
    std::fs::write(
        &cfg,
        format!(
            "database_url = \"{}\"\nrrn_polcy = \"reject\"\n",
            db.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(["node", "status", "--config"])
        .arg(&cfg)
        .output()
        .expect("run ghx");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 2") && stderr.contains("rrn_polcy"),
        "{stderr}"
    );
}
