//! `ghx bench` and `ghx bench-train`: measurements in release builds.

use crate::args::{BenchArgs, BenchTrainArgs};
use anyhow::Result;

pub(super) async fn bench_train(args: BenchTrainArgs) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.unwrap_or_else(|| temp.path().to_owned());
    println!(
        "bench train: 3 nodes x {} patients, {} rounds of FedAvg, {} ({} build)",
        args.patients,
        args.rounds,
        args.mlp_hidden_units.map_or_else(
            || "logistic regression".to_owned(),
            |units| format!("MLP with {units} hidden units")
        ),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let report = ghx::bench_train::run(&ghx::bench_train::TrainBenchOptions {
        dir,
        patients_per_node: args.patients,
        rounds: args.rounds,
        seed: args.seed,
        mlp_hidden_units: args.mlp_hidden_units,
        flower_python: args.flower_python,
        flower_script: args.flower_script,
        repeat: args.repeat,
    })
    .await?;
    println!(
        "setup (synthesise + import, 3 nodes): {:.1} s; {} training rows, {} held out (complete cases of consenting patients)",
        report.setup.as_secs_f64(),
        report.train_rows,
        report.holdout_rows
    );
    println!(
        "{:<34} {:>7} {:>10} {:>10} {:>10} {:>12} {:>13} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "framework",
        "rounds",
        "total s",
        "round p50",
        "local p50",
        "overhead p50",
        "overhead mean",
        "busy p50",
        "idle p50",
        "idle mean",
        "rounds s",
        "AUC"
    );
    let line = |name: &str, t: &ghx::bench_train::Timing| {
        println!(
            "{:<34} {:>7} {:>10.2} {:>8.2}ms {:>8.2}ms {:>10.2}ms {:>11.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9.2} {:>7}",
            name,
            t.rounds,
            t.total_seconds,
            t.round_p50_ms,
            t.local_p50_ms,
            t.overhead_p50_ms,
            t.overhead_mean_ms,
            t.busy_p50_ms,
            t.idle_p50_ms,
            t.idle_mean_ms,
            t.rounds_seconds,
            t.auc
                .map_or_else(|| "n/a".to_owned(), |a| format!("{a:.4}"))
        );
    };
    println!(
        "(local: the slowest node's computation; overhead: round time outside it; busy: time some node was computing; idle: round time when none was)"
    );
    let turns = report.repetitions.len();
    for (i, rep) in report.repetitions.iter().enumerate() {
        if turns > 1 {
            println!("repetition {} of {turns}:", i + 1);
        }
        bench_train_lines(rep, &line);
    }
    if turns > 1 {
        // Flower's medians are over the turns it ran in; say so when it
        // did not run in every one.
        let (fit, evaluating) = report.flower_ran();
        let flower_turns = if (1..turns).contains(&fit) || (1..turns).contains(&evaluating) {
            format!(
                " (Flower's over those it ran in: fit rounds only {fit}, with evaluation {evaluating})"
            )
        } else {
            String::new()
        };
        println!("median over the {turns} repetitions{flower_turns}:");
        bench_train_lines(&report.median(), &line);
    }
    Ok(())
}

/// One repetition's (or the medians') lines of `ghx bench-train`.
fn bench_train_lines(
    rep: &ghx::bench_train::Repetition,
    line: &dyn Fn(&str, &ghx::bench_train::Timing),
) {
    line("ghx (mTLS gRPC, secure aggregation)", &rep.ghx);
    let s = rep.ghx_steps_ms;
    println!(
        "ghx median per round: session opened on the round's path {:.2} ms (opened while the moments round computes), masked input incl. local {:.2} ms, unmasking {:.2} ms (none in a session), rest (state read for saving, study check started, model updated) {:.2} ms",
        s[0], s[1], s[2], s[3]
    );
    let a = rep.ghx_last_answer_ms;
    println!(
        "ghx median per round, the answer that ended it: {:.3} ms outside the node's handler (wire, TLS, HTTP/2, both ways), {:.3} ms in the handler before computing (admission, checks), {:.3} ms after (masking, audit write, hand-back)",
        a[0], a[1], a[2]
    );
    for (name, flower) in [
        ("Flower FedAvg, fit rounds only", &rep.flower),
        ("Flower FedAvg + evaluation rounds", &rep.flower_evaluating),
    ] {
        match flower {
            Ok(flower) => {
                line(name, flower);
                let ratio = |theirs: f64, ours: f64| theirs / ours.max(1e-9);
                println!(
                    "  {name} / ghx: per-round overhead p50 {:.1}x (mean {:.1}x); time with no node computing p50 {:.1}x (mean {:.1}x)",
                    ratio(flower.overhead_p50_ms, rep.ghx.overhead_p50_ms),
                    ratio(flower.overhead_mean_ms, rep.ghx.overhead_mean_ms),
                    ratio(flower.idle_p50_ms, rep.ghx.idle_p50_ms),
                    ratio(flower.idle_mean_ms, rep.ghx.idle_mean_ms),
                );
            }
            Err(why) => println!("{name}: not run ({why})"),
        }
    }
}

pub(super) async fn bench(args: BenchArgs) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.unwrap_or_else(|| temp.path().to_owned());
    println!(
        "bench: 3 nodes x {} patients, {} runs per query ({} build)",
        args.patients,
        args.runs,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let report = ghx::bench::run(&ghx::bench::BenchOptions {
        dir,
        patients_per_node: args.patients,
        runs: args.runs,
        seed: args.seed,
        outbound: args.outbound,
    })
    .await?;
    println!(
        "setup (synthesise + import, 3 nodes): {:.1} s; resources: {}",
        report.setup.as_secs_f64(),
        report
            .resources_per_node
            .iter()
            .map(|(n, r)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "first federated query (consent decisions evaluated for every patient): {:.1} ms",
        report.first_query.as_secs_f64() * 1000.0
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "operation", "p50 ms", "p95 ms", "max ms"
    );
    for l in &report.latencies {
        println!(
            "{:<40} {:>9.2} {:>9.2} {:>9.2}",
            l.name,
            l.p50.as_secs_f64() * 1000.0,
            l.p95.as_secs_f64() * 1000.0,
            l.max.as_secs_f64() * 1000.0
        );
    }
    for u in &report.utility {
        println!(
            "{}: {} cells, {} with a true total >= the cell size; released exactly per hospital {} ({:.0}%), pooled (epsilon 0.3) {} ({:.0}%, largest error {}; of those withheld, {} below the cell size when noised, {} to protect another)",
            u.table,
            u.cells,
            u.worth_releasing,
            u.per_hospital_exact,
            100.0 * u.per_hospital_exact as f64 / u.worth_releasing.max(1) as f64,
            u.pooled_released,
            100.0 * u.pooled_released as f64 / u.worth_releasing.max(1) as f64,
            u.pooled_max_error,
            u.pooled_withheld_small,
            u.pooled_withheld_protecting
        );
    }
    for name in ["count", "grouped"] {
        if let Some(ratio) = report.pooled_over_per_hospital(name) {
            println!("pooled {name} p50 / per-hospital {name} p50: {ratio:.2}x");
        }
        if let Some((ratio, node)) = report.overhead(name) {
            println!("federated {name} p50 / slowest local SQL p50 ({node}): {ratio:.2}x");
        }
        if let Some((ratio, node)) = report.over_node_work(name) {
            println!("federated {name} p50 / slowest node work p50 ({node}): {ratio:.2}x");
        }
    }
    Ok(())
}

pub(super) async fn bench_exchange(args: crate::args::BenchExchangeArgs) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = args.dir.unwrap_or_else(|| temp.path().to_owned());
    let report = ghx::bench_exchange::run(&ghx::bench_exchange::BenchExchangeOptions {
        dir,
        runs: args.runs,
        per_hospital: args.per_hospital,
    })
    .await?;
    let ms = |q: f64| {
        let i = ((report.times.len() as f64 - 1.0) * q).round() as usize;
        report.times[i].as_secs_f64() * 1000.0
    };
    println!(
        "exchange ({} build): {} resources from 3 hospitals, {:.1} MiB of ciphertext relayed, merged into {} ({} kept once)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        report.resources,
        report.relayed_bytes as f64 / (1024.0 * 1024.0),
        report.merged,
        report.duplicates
    );
    println!(
        "request to merged record over {} runs: p50 {:.0} ms, p95 {:.0} ms, min {:.0} ms, max {:.0} ms",
        report.times.len(),
        ms(0.5),
        ms(0.95),
        ms(0.0),
        ms(1.0)
    );
    Ok(())
}
