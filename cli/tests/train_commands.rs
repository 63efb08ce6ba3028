//! The requester's training commands, run as the real `ghx` binary against
//! a federation started in this process: start a run and follow it to the
//! model, its card and curves; check its status; validate the model (and
//! refuse one that does not fit the approved features). And the training
//! benchmark's turns and medians (`bench-train --repeat`).

use ghx::local_federation::{LocalFederation, LocalFederationOptions, RESEARCHER};
use ghx_study::training::ModelDocument;

mod common;
use common::ghx;

const MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-model.json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_trains_follows_and_validates_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: dir.path().to_owned(),
        patients_per_node: 3000,
        seed: 11,
        min_cell_size: 10,
        committee_quorum: 1,
        audit_checkpoint_every: None,
        node_link: Default::default(),
        min_sum_participants: ghx_node::config::DEFAULT_MIN_PARTICIPANTS,
        open_registration: false,
        pooled_without_noise: false,
        shared: 0.0,
        exchange_part_bytes: None,
    })
    .await
    .unwrap();
    let study = federation
        .approved_study(RESEARCHER, MANIFEST.as_bytes().to_vec())
        .await
        .unwrap();
    let out_dir = dir.path().join("model");
    let out_arg = out_dir.to_str().unwrap();

    let (ok, out, err) = ghx(
        &federation,
        RESEARCHER,
        &["train", "start", &study, "--out", out_arg],
    )
    .await;
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("started run-0001 of t2d-risk (20 rounds)"),
        "{out}"
    );
    // Progress, one line per round, then the outputs.
    for round in 1..=20 {
        assert!(out.contains(&format!("round {round:>3}/20:")), "{out}");
    }
    assert!(out.contains("run run-0001 completed"), "{out}");
    let model_path = out_dir.join("model.json");
    let model: ModelDocument =
        serde_json::from_slice(&std::fs::read(&model_path).unwrap()).unwrap();
    assert_eq!(model.features.len(), 5);
    let card = std::fs::read_to_string(out_dir.join("model-card.md")).unwrap();
    assert!(
        card.starts_with("# Model card: t2d-risk (run-0001)"),
        "{card}"
    );
    assert!(card.contains("| pooled |"), "{card}");
    assert!(card.contains("| creatinine |"), "{card}");
    // Every round placed its sites' computations on the coordinator's clock.
    assert!(card.contains("time with no site computing"), "{card}");
    let svg = std::fs::read_to_string(out_dir.join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);

    let (ok, out, err) = ghx(
        &federation,
        RESEARCHER,
        &["train", "status", "run-0001", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["status"], "completed");
    assert_eq!(record["rounds"].as_array().unwrap().len(), 20);

    // External validation of the written model at every hospital.
    let (ok, out, err) = ghx(
        &federation,
        RESEARCHER,
        &[
            "train",
            "validate",
            &study,
            "--model",
            model_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Noised at each hospital, and said so. The noise is drawn afresh each
    // time: 3000 patients a hospital keep its calibration bins large beside
    // it (with 1000, one run in a few read an AUC near 0.5).
    assert!(report["pooled"]["auc"].as_f64().unwrap() > 0.6, "{out}");
    assert_eq!(report["noise"]["epsilon"], 0.25, "{out}");
    assert_eq!(report["contributors"].as_array().unwrap().len(), 3);

    // A model for other features is refused, and says why.
    let mut other = model.clone();
    other.features.truncate(4);
    other.mean.truncate(4);
    other.sd.truncate(4);
    other.weights.truncate(4);
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, serde_json::to_vec(&other).unwrap()).unwrap();
    let (ok, _, err) = ghx(
        &federation,
        RESEARCHER,
        &[
            "train",
            "validate",
            &study,
            "--model",
            other_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("differ from the approved training's features"),
        "{err}"
    );
    federation.shutdown().await;
}

/// `ghx bench-train --repeat 2`: the runs take turns on one federation,
/// each turn printed, then the medians; a Flower that cannot start is
/// named in every turn and in the medians. `--repeat 0` is refused.
#[test]
fn the_training_benchmark_takes_turns_and_gives_medians() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |repeat: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ghx"))
            .args(["bench-train", "--patients", "300", "--rounds", "2"])
            .args(["--repeat", repeat, "--flower-python"])
            .arg(dir.path().join("no-such-python"))
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let refused = bench("0");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--repeat"), "{err}");

    let run = bench("2");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ghx_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("ghx (mTLS gRPC"))
        .collect();
    assert_eq!(ghx_lines.len(), 3, "two turns and the medians:\n{out}");
    for heading in [
        "repetition 1 of 2:",
        "repetition 2 of 2:",
        "median over the 2 repetitions:",
    ] {
        assert!(out.contains(heading), "{heading}\n{out}");
    }
    // Each turn trained the two rounds asked for.
    for line in &ghx_lines {
        assert_eq!(line.split_whitespace().nth(5), Some("2"), "{line}");
    }
    assert_eq!(
        out.matches("Flower FedAvg, fit rounds only: not run (cannot start Python")
            .count(),
        3,
        "{out}"
    );
}
