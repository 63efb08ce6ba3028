//! `ghx node run` and `ghx coordinator run` configuration layers, through
//! the real binary with `--print-config`: the file, then `GHX_<SERVICE>__*`
//! environment variables, then `--set` flags, each stronger than the last;
//! bad values are named whichever layer they came from; the database
//! password is never printed.

use std::process::Command;

fn example(name: &str) -> String {
    format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn ghx(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ghx"))
        .args(args)
        .env_remove("GHX_NODE_CONFIG")
        .env_remove("GHX_COORDINATOR_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn node_layers_apply_in_order_and_bad_values_are_named() {
    let file = example("node-chosun.toml");
    let run = |set: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["node", "run", "--config", &file, "--print-config"];
        for s in set {
            args.extend(["--set", s]);
        }
        ghx(&args, env)
    };

    let (ok, out, err) = run(&[], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("id = \"chosun\"") && out.contains("min_cell_size = 10"),
        "{out}"
    );

    // The environment beats the file; a flag beats both.
    let env = [
        ("GHX_NODE__MIN_CELL_SIZE", "5"),
        ("GHX_NODE__AUDIT__RETENTION_DAYS", "1000"),
    ];
    let (ok, out, err) = run(&[], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("min_cell_size = 5") && out.contains("retention_days = 1000"),
        "{out}"
    );
    let (ok, out, _) = run(&["min_cell_size=7"], &env);
    assert!(ok && out.contains("min_cell_size = 7"), "{out}");

    // The password in a database URL is never shown.
    let (ok, out, _) = run(
        &["database_url=postgres://ghx:s3cret@db.internal/chosun"],
        &[],
    );
    assert!(
        ok && out.contains("postgres://ghx:***@db.internal/chosun") && !out.contains("s3cret"),
        "{out}"
    );

    let (ok, _, err) = run(&["min_cell_size=0"], &[]);
    assert!(
        !ok && err.contains("`min_cell_size` must be at least 1"),
        "{err}"
    );
    let (ok, _, err) = run(&[], &[("GHX_NODE__COLOUR", "red")]);
    assert!(
        !ok && err.contains("unknown field `colour`") && err.contains("GHX_NODE__* environment"),
        "{err}"
    );
    let (ok, _, err) = run(&["audit.retention_days=30"], &[]);
    assert!(
        !ok && err.contains("`audit.retention_days` must be at least 730"),
        "{err}"
    );
}

#[test]
fn coordinator_layers_apply_too() {
    let file = example("coordinator.toml");
    let (ok, out, err) = ghx(
        &[
            "coordinator",
            "run",
            "--config",
            &file,
            "--print-config",
            "--set",
            "committee.quorum=3",
        ],
        &[("GHX_COORDINATOR__NODE_DEADLINE_SECS", "12")],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("node_deadline_secs = 12") && out.contains("quorum = 3"),
        "{out}"
    );
}

/// `ghx pki pin` prints the pin `secure_aggregation.member_keys` takes: the
/// same after a renewal (same key), another after `--new-key`; a file that
/// is not a certificate is named.
#[test]
fn pki_pin_prints_the_key_pin_a_renewal_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let (ok, out, err) = ghx(args, &[]);
        assert!(ok, "{args:?}: {err}");
        out
    };
    run(&["pki", "init", "--dir", pki]);
    run(&[
        "pki",
        "issue",
        "--dir",
        pki,
        "--name",
        "chosun",
        "--role",
        "node",
        "--org",
        "Chosun University Hospital",
        "--valid-for",
        "7d",
    ]);
    let cert = dir.path().join("chosun.pem");
    let cert = cert.to_str().unwrap();
    let pin = run(&["pki", "pin", "--cert", cert]).trim().to_owned();
    let pem = std::fs::read_to_string(cert).unwrap();
    assert_eq!(pin, ghx_pki::signed::key_pin(&pem).unwrap());
    assert_eq!(pin.len(), 64);
    run(&["pki", "renew", "--dir", pki, "--name", "chosun"]);
    assert_eq!(run(&["pki", "pin", "--cert", cert]).trim(), pin);
    run(&[
        "pki",
        "renew",
        "--dir",
        pki,
        "--name",
        "chosun",
        "--new-key",
    ]);
    assert_ne!(run(&["pki", "pin", "--cert", cert]).trim(), pin);
    let key = dir.path().join("chosun.key");
    let (ok, _, err) = ghx(&["pki", "pin", "--cert", key.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
