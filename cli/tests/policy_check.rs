//! `ghx policy init` and `ghx policy check` as a privacy officer runs them:
//! a valid directory, an allowed and a refused study (exit status 1), and a
//! broken rule named with its line.

use std::path::Path;
use std::process::Command;

fn ghx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_privacy_officer_can_validate_and_try_out_policies() {
    let dir = tempfile::tempdir().unwrap();
    let chosun = dir.path().join("chosun");
    let chosun = chosun.to_str().unwrap();
    let (code, out, err) = ghx(&["policy", "init", "--hospital", "chosun", "--out", chosun]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("wrote the default policies of chosun"),
        "{out}"
    );

    let (code, out, _) = ghx(&["policy", "check", chosun]);
    assert_eq!(code, 0);
    assert!(
        out.contains("5 access rules valid against the ghx schema; consent default opt-in"),
        "{out}"
    );

    let study = "deploy/examples/study-e11.json";
    let (code, out, _) = ghx(&["policy", "check", chosun, study]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("ALLOW count").count(), 2, "{out}");

    let query = "deploy/examples/e11-by-sex-and-age.json";
    let (code, out, _) = ghx(&["policy", "check", chosun, query, "--purpose", "HMARKT"]);
    assert_eq!(code, 1);
    assert!(out.contains("DENY count `query`"), "{out}");
    assert!(out.contains("forbidden by `no-marketing`"), "{out}");
    let (code, out, _) = ghx(&[
        "policy",
        "check",
        chosun,
        query,
        "--org",
        "Unknown Analytics",
        "--json",
    ]);
    assert_eq!(code, 1);
    let decisions: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(decisions[0]["decision"]["allowed"], false);
    assert_eq!(decisions[0]["request"]["organisation"], "Unknown Analytics");

    // Summaries, histograms and rates are asked as `statistics`: a hospital
    // that permits only counts refuses them and still answers the count.
    let statistics = "deploy/examples/study-e11-statistics.json";
    let (code, out, _) = ghx(&[
        "policy",
        "check",
        chosun,
        statistics,
        "--org",
        "Chonnam National University Medical School",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("ALLOW statistics").count(), 3, "{out}");
    // Trainings are asked as the node asks a training round: academic
    // organisations may train, a startup may not.
    let model = "deploy/examples/study-t2d-model.json";
    let (code, out, _) = ghx(&["policy", "check", chosun, model]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DENY training `t2d-risk`"), "{out}");
    let (code, out, _) = ghx(&[
        "policy",
        "check",
        chosun,
        model,
        "--org",
        "Chonnam National University Medical School",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("permitted by `academic-training`"), "{out}");
    let access = Path::new(chosun).join("access.cedar");
    let text = std::fs::read_to_string(&access).unwrap();
    let counts_only = text.replace(
        r#"action in [Ghx::Action::"count", Ghx::Action::"statistics"]"#,
        r#"action == Ghx::Action::"count""#,
    );
    assert_ne!(counts_only, text);
    std::fs::write(&access, counts_only).unwrap();
    let (code, out, _) = ghx(&[
        "policy",
        "check",
        chosun,
        statistics,
        "--org",
        "Chonnam National University Medical School",
    ]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.matches("DENY statistics").count(), 3, "{out}");
    assert_eq!(out.matches("ALLOW count").count(), 1, "{out}");
    std::fs::write(&access, &text).unwrap();

    std::fs::write(
        &access,
        text.replace("context.purpose ==", "context.purpos =="),
    )
    .unwrap();
    let (code, _, err) = ghx(&["policy", "check", chosun]);
    assert_eq!(code, 1);
    assert!(
        err.contains("access.cedar: policy `academic-training` does not match the schema: line"),
        "{err}"
    );
    assert!(err.contains("did you mean `purpose`?"), "{err}");
}
