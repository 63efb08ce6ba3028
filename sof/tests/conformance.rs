//! Runs the official SQL on FHIR v2 test suite (kept as data in
//! `../shared/conformance/sql-on-fhir-v2`, or where `GHX_SOF_TESTS` points)
//! and reports the pass rate and the failing cases. Rows are compared as a
//! multiset (the specification does not order rows) and numbers by value.
//!
//! The test fails if the pass rate falls below the floor measured when the
//! evaluator was written, so a regression cannot go unnoticed; it is skipped,
//! saying so, when the suite is not on the machine.

use std::path::PathBuf;

use ghx_sof::View;
use serde_json::Value;

/// Cases passing when this floor was set; raise it as the evaluator grows.
const FLOOR: usize = 134;

fn suite_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("GHX_SOF_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/conformance/sql-on-fhir-v2")
        });
    dir.is_dir().then_some(dir)
}

/// Passing cases whose rows came in another order than listed.
static OUT_OF_ORDER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

fn rows_match(got: &[Value], want: &[Value]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let mut unused: Vec<&Value> = want.iter().collect();
    got.iter().all(|row| {
        unused
            .iter()
            .position(|w| same_value(row, w))
            .map(|i| unused.swap_remove(i))
            .is_some()
    })
}

/// Runs one case; `Ok(())` when it passes, else why not.
fn run_case(resources: &[Value], case: &Value) -> Result<(), String> {
    let expect_error = case.get("expectError").and_then(Value::as_bool) == Some(true);
    let outcome = View::parse(&case["view"]).and_then(|view| {
        let mut rows = Vec::new();
        for r in resources {
            rows.extend(view.rows(r)?.into_iter().map(Value::Object));
        }
        Ok((view, rows))
    });
    match (outcome, expect_error) {
        (Err(_), true) => Ok(()),
        (Ok(_), true) => Err("expected an error".to_owned()),
        (Err(e), false) => Err(e.to_string()),
        (Ok((view, rows)), false) => {
            if let Some(columns) = case.get("expectColumns").and_then(Value::as_array) {
                let want: Vec<&str> = columns.iter().filter_map(Value::as_str).collect();
                if view.columns() != want.as_slice() {
                    return Err(format!("columns {:?}, expected {want:?}", view.columns()));
                }
            }
            let want = case["expect"].as_array().cloned().unwrap_or_default();
            if rows_match(&rows, &want) {
                let in_order = rows.len() == want.len()
                    && rows.iter().zip(&want).all(|(a, b)| same_value(a, b));
                if !in_order {
                    OUT_OF_ORDER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            } else {
                Err(format!(
                    "rows {}, expected {}",
                    serde_json::to_string(&rows).unwrap_or_default(),
                    serde_json::to_string(&want).unwrap_or_default()
                ))
            }
        }
    }
}

#[test]
fn official_sql_on_fhir_v2_suite() {
    let Some(dir) = suite_dir() else {
        eprintln!("SQL on FHIR v2 suite not found (set GHX_SOF_TESTS); skipped");
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p.file_name().unwrap().to_string_lossy().contains("schema")
        })
        .collect();
    files.sort();
    let (mut passed, mut total) = (0, 0);
    let mut failures = Vec::new();
    for file in files {
        let suite: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let resources = suite["resources"].as_array().cloned().unwrap_or_default();
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        for case in suite["tests"].as_array().into_iter().flatten() {
            total += 1;
            match run_case(&resources, case) {
                Ok(()) => passed += 1,
                Err(why) => failures.push(format!(
                    "{name} / {}: {why}",
                    case["title"].as_str().unwrap_or("?")
                )),
            }
        }
    }
    eprintln!(
        "SQL on FHIR v2: {passed} of {total} cases pass ({} of them with rows in another order than listed)",
        OUT_OF_ORDER.load(std::sync::atomic::Ordering::Relaxed)
    );
    for f in &failures {
        eprintln!("  FAIL {f}");
    }
    assert!(
        passed >= FLOOR,
        "{passed} of {total} pass, below the floor of {FLOOR}"
    );
}
