//! What a finished training run is handed over as: a model card (Markdown)
//! and its training curves (SVG), both built from the run's record, which
//! holds aggregates only.

use std::fmt::Write as _;

use ghx_coordinator::training::{RoundRecord, TrainingRecord};
use ghx_learn::federated::Metrics;
use ghx_study::manifest::StudyManifest;
use ghx_study::training::{Feature, ModelKind};

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"))
}

fn metrics_row(name: &str, m: &Metrics) -> String {
    format!(
        "| {name} | {} | {} | {} | {:.4} | {:.4} | {:.4} |\n",
        m.rows,
        m.positives,
        opt(m.auc),
        m.accuracy,
        m.brier,
        m.expected_calibration_error
    )
}

fn definition(f: &Feature) -> String {
    match (&f.variable, f.sex_is) {
        (Some(v), _) => serde_json::to_string(v).unwrap_or_default(),
        (None, Some(sex)) => format!("1 if sex is {}", sex.code()),
        (None, None) => String::new(),
    }
}

/// One line of progress for a completed round.
pub fn progress_line(r: &RoundRecord, total: u32) -> String {
    // Records from before rounds stopped carrying a loss and an
    // evaluation still show theirs.
    let metrics = match (r.train_loss, &r.holdout) {
        (Some(loss), Some(holdout)) => format!(
            "train loss {loss:.4}, held-out AUC {} (model before the round), ",
            opt(holdout.auc)
        ),
        _ => String::new(),
    };
    format!(
        "round {:>3}/{total}: {metrics}{} training rows, {} nodes, {:.1} ms ({:.1} ms local)",
        r.round,
        r.train_rows,
        r.contributors.len(),
        r.seconds * 1000.0,
        r.local_seconds * 1000.0
    )
}

/// The model card of a run of `manifest`'s training.
pub fn model_card(record: &TrainingRecord, manifest: &StudyManifest) -> String {
    let mut out = String::new();
    let spec = manifest.training_named(&record.training);
    let _ = writeln!(
        out,
        "# Model card: {} ({})\n",
        record.training, record.run_id
    );
    let _ = writeln!(out, "- Study: {} — {}", record.study_id, manifest.title);
    let _ = writeln!(
        out,
        "- Requester: {} ({}); purpose {}; ethics {} {}",
        manifest.requester.user,
        manifest.requester.organisation,
        manifest.purpose,
        manifest.ethics.committee,
        manifest.ethics.reference
    );
    let _ = writeln!(
        out,
        "- Status: {}{}; started {}; {} of {} rounds{}",
        record.status.name(),
        if record.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", record.detail)
        },
        record.started_at,
        record.rounds.len(),
        record.rounds_total,
        if record.resumed > 0 {
            format!(
                "; resumed {} time(s) after a coordinator restart",
                record.resumed
            )
        } else {
            String::new()
        }
    );
    if let Some(spec) = spec {
        let o = &spec.optimiser;
        let kind = match spec.hidden_units {
            Some(units) if spec.model == ModelKind::Mlp => format!(
                "multilayer perceptron, one hidden layer of {units} tanh units, sigmoid output ({} parameters)",
                spec.param_count()
            ),
            _ => "logistic regression".to_owned(),
        };
        let _ = writeln!(
            out,
            "- Model: {kind}; {:?} (mu {}), learning rate {}, {} local epoch(s), batch {}, L2 {}; quorum {} nodes per round; {:.0}% of each site's patients held out",
            o.algorithm,
            o.mu,
            o.learning_rate,
            o.epochs,
            o.batch_size,
            o.l2,
            spec.quorum,
            spec.holdout * 100.0
        );
        let _ = writeln!(
            out,
            "- Label: {}",
            serde_json::to_string(&spec.label).unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "- Cohort: {}",
            serde_json::to_string(&spec.cohort).unwrap_or_default()
        );
    }
    if let Some(model) = &record.model {
        // A logistic model's weights read per feature; an MLP's do not.
        let logistic = model.hidden.is_none();
        if logistic {
            let _ = writeln!(out, "\n## Features and weights\n");
            let _ = writeln!(
                out,
                "Each feature is standardised as (x − mean) / sd with the federation's pooled moments; the weight is per standard deviation.\n"
            );
            let _ = writeln!(
                out,
                "| feature | definition | mean | sd | weight | odds ratio per sd |"
            );
            let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        } else {
            let _ = writeln!(out, "\n## Features\n");
            let _ = writeln!(
                out,
                "Each feature is standardised as (x − mean) / sd with the federation's pooled moments and read by every hidden unit; an MLP's weights have no per-feature reading (the model JSON holds them all).\n"
            );
            let _ = writeln!(out, "| feature | definition | mean | sd |");
            let _ = writeln!(out, "|---|---|---:|---:|");
        }
        for (i, f) in model.features.iter().enumerate() {
            let weight = if logistic {
                format!(" {:.4} | {:.3} |", model.weights[i], model.weights[i].exp())
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | `{}` | {:.4} | {:.4} |{weight}",
                f.name,
                definition(f),
                model.mean[i],
                model.sd[i]
            );
        }
        if logistic {
            let _ = writeln!(out, "| (intercept) | | | | {:.4} | |", model.bias);
        }
    }
    let _ = writeln!(out, "\n## Data and evaluation\n");
    let _ = writeln!(
        out,
        "Training rows pooled over the sites (complete cases of consenting patients): {}.\n",
        record.moments_rows
    );
    if let Some(e) = &record.evaluation {
        let _ = writeln!(
            out,
            "Held-out evaluation of the final model (pooled from summed score histograms, every figure read off score bins merged until each holds at least the cell size; Brier and log loss take each patient's score as the middle of their bin; no site's own figures, which with the pooled ones would show a few patients of one site):\n"
        );
        let _ = writeln!(
            out,
            "| site | held-out rows | with label | AUC | accuracy | Brier | ECE |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        match &e.pooled {
            Some(pooled) => out.push_str(&metrics_row("pooled", pooled)),
            None => out.push_str(
                "| pooled | withheld: held-out positives or negatives below the cell size | | | | | |\n",
            ),
        }
        for (node, m) in &e.per_node {
            out.push_str(&metrics_row(node, m));
        }
        for f in &e.failures {
            let _ = writeln!(out, "\nNot evaluated at {}: {}", f.node_id, f.reason);
        }
        if let Some(pooled) = &e.pooled {
            let _ = writeln!(
                out,
                "\nCalibration (pooled, by predicted risk; the merged bins above, each patient's prediction taken as the middle of their bin):\n"
            );
            let _ = writeln!(out, "| predicted | rows | mean predicted | observed |");
            let _ = writeln!(out, "|---|---:|---:|---:|");
            for b in &pooled.calibration {
                let _ = writeln!(
                    out,
                    "| {:.3}–{:.3} | {} | {} | {} |",
                    b.lower,
                    b.upper,
                    b.count,
                    opt(b.mean_predicted()),
                    opt(b.observed_rate())
                );
            }
        }
    }
    let _ = writeln!(out, "\n## Privacy\n");
    let dropped: usize = record.rounds.iter().map(|r| r.failures.len()).sum();
    let noise = match spec.and_then(|s| s.privacy) {
        Some(p) => {
            let rounds = record.rounds.len() as u64;
            format!(
                "Model updates were noised (DP-FedSGD): each round every site sent the sum of its patients' gradients clipped to L2 norm {}, and their count, with Gaussian noise of standard deviation {:.4} (noise multiplier {}). {rounds} rounds cost epsilon {:.4} at delta {:e} (zero-concentrated DP rho {:.4}), charged round by round to the study's budget at each site (budget epsilon {}, delta {:e}). The standardisation moments and the final evaluation's counts are not noised.",
                p.clip,
                p.noise_std(),
                p.noise_multiplier,
                p.epsilon_after(rounds),
                p.delta,
                p.rho_per_round() * rounds as f64,
                manifest.privacy_budget,
                manifest.privacy_delta,
            )
        }
        None => format!(
            "No noise was added: differential-privacy cost of this run is epsilon 0 (the study's budget is {}).",
            manifest.privacy_budget
        ),
    };
    let validation = match spec.and_then(|s| s.validation) {
        Some(v) => format!(
            "External validations of a model you supply are noised at each site: two-sided geometric noise of epsilon {} on each count of its score histogram ({} bins), charged to the study's budget per validation.",
            v.epsilon,
            ghx_learn::evaluation::NOISED_SCORE_BINS
        ),
        None => "Sites refuse external validation of a model you supply: this training declares no validation.epsilon.".to_owned(),
    };
    let _ = writeln!(
        out,
        "- Every round went through secure aggregation: the coordinator received only the sum of the participating sites' contributions (sample-weighted models or gradients, moments, score histograms), never one site's. Training rounds carried no loss and no evaluation; the final model's evaluation is the run's one.\n\
         - {noise}\n\
         - Sites left out of a round (down, refused or late): {dropped} over {} rounds.\n\
         - The evaluation is released pooled only, when the held-out positives and negatives each reach the study's largest cell size, read off score bins of at least that many patients.\n\
         - {validation}",
        record.rounds.len()
    );
    if !record.rounds.is_empty() {
        let total: f64 = record.rounds.iter().map(|r| r.seconds).sum();
        let n = record.rounds.len() as f64;
        let mean_ms = |f: &dyn Fn(&RoundRecord) -> f64| {
            record.rounds.iter().map(|r| f(r).max(0.0)).sum::<f64>() / n * 1000.0
        };
        let overhead = mean_ms(&|r| r.seconds - r.local_seconds);
        let _ = write!(
            out,
            "\n## Timing\n\n{} rounds in {total:.2} s; coordination overhead (round time outside the slowest site's local computation) {overhead:.1} ms per round on average",
            record.rounds.len(),
        );
        // Runs recorded before the union of the sites' computations was
        // kept have no busy time to report.
        if record.rounds.iter().all(|r| r.busy_seconds > 0.0) {
            let idle = mean_ms(&|r| r.seconds - r.busy_seconds);
            let _ = write!(
                out,
                "; time with no site computing {idle:.1} ms per round on average"
            );
        }
        let _ = writeln!(out, ".");
    }
    out
}

/// A line chart of `values` by round, as an SVG group at `(x0, y0)`.
fn panel(out: &mut String, title: &str, values: &[(u32, f64)], x0: f64, y0: f64) {
    let (w, h) = (420.0, 240.0);
    let (left, top, right, bottom) = (50.0, 28.0, 12.0, 30.0);
    let _ = writeln!(
        out,
        r##"<g transform="translate({x0},{y0})"><text x="{}" y="16" font-size="14" text-anchor="middle">{title}</text>"##,
        w / 2.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        w - left - right,
        h - top - bottom
    );
    if values.is_empty() {
        out.push_str("</g>\n");
        return;
    }
    let lo = values.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
    let hi = values.iter().map(|v| v.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let last = values.last().map_or(1, |v| v.0).max(2);
    let x = |r: u32| left + (f64::from(r) - 1.0) / f64::from(last - 1) * (w - left - right);
    let y = |v: f64| top + (hi - v) / (hi - lo) * (h - top - bottom);
    let points: Vec<String> = values
        .iter()
        .map(|(r, v)| format!("{:.1},{:.1}", x(*r), y(*v)))
        .collect();
    let _ = writeln!(
        out,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    for v in [lo, (lo + hi) / 2.0, hi] {
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{:.1}" font-size="11" text-anchor="end">{v:.3}</text>"##,
            left - 4.0,
            y(v) + 4.0
        );
    }
    for r in [1, last.div_ceil(2), last] {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{r}</text>"##,
            x(r),
            h - bottom + 14.0
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">round</text></g>"##,
        left + (w - left - right) / 2.0,
        h - 4.0
    );
}

/// How far the model moved in each round (the L2 norm of the change in a
/// logistic model's weights and bias; none for a network), as an SVG
/// document; records from before rounds stopped carrying a loss and an
/// evaluation show those instead. Rounds carry no evaluation (a loss
/// summed over patients gives one patient's label to whoever chooses the
/// model), so the run's one evaluation is its last.
pub fn curves_svg(record: &TrainingRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="270" font-family="sans-serif">"##
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let loss: Vec<(u32, f64)> = record
        .rounds
        .iter()
        .filter_map(|r| r.train_loss.map(|l| (r.round, l)))
        .collect();
    let auc: Vec<(u32, f64)> = record
        .rounds
        .iter()
        .filter_map(|r| r.holdout.as_ref().and_then(|h| h.auc).map(|a| (r.round, a)))
        .collect();
    if loss.is_empty() {
        panel(
            &mut out,
            &format!("{}: model step per round (L2)", record.training),
            &steps(record),
            0.0,
            10.0,
        );
        panel(
            &mut out,
            "training rows per round",
            &rows(record),
            430.0,
            10.0,
        );
    } else {
        panel(
            &mut out,
            &format!("{}: training log loss", record.training),
            &loss,
            0.0,
            10.0,
        );
        panel(&mut out, "held-out AUC (pooled)", &auc, 430.0, 10.0);
    }
    out.push_str("</svg>\n");
    out
}

/// The L2 norm of each round's change in a logistic model's parameters
/// (from the round before, none for the first); empty for a network.
fn steps(record: &TrainingRecord) -> Vec<(u32, f64)> {
    record
        .rounds
        .windows(2)
        .filter(|w| !w[1].weights.is_empty() && w[0].weights.len() == w[1].weights.len())
        .map(|w| {
            let squares: f64 = w[0]
                .weights
                .iter()
                .zip(&w[1].weights)
                .map(|(a, b)| (b - a).powi(2))
                .sum::<f64>()
                + (w[1].bias - w[0].bias).powi(2);
            (w[1].round, squares.sqrt())
        })
        .collect()
}

fn rows(record: &TrainingRecord) -> Vec<(u32, f64)> {
    record
        .rounds
        .iter()
        .map(|r| (r.round, r.train_rows as f64))
        .collect()
}

/// Polls a run until it stops running, calling `progress` once per newly
/// completed round; returns the final record.
pub async fn follow(
    client: &mut ghx_proto::v1::coordinator_service_client::CoordinatorServiceClient<
        tonic::transport::Channel,
    >,
    run_id: &str,
    mut progress: impl FnMut(&RoundRecord, u32),
) -> Result<TrainingRecord, tonic::Status> {
    let mut shown = 0;
    loop {
        let status = client
            .get_training(ghx_proto::v1::GetTrainingRequest {
                run_id: run_id.to_owned(),
            })
            .await?
            .into_inner();
        let record: TrainingRecord = serde_json::from_slice(&status.record_json)
            .map_err(|e| tonic::Status::internal(format!("unreadable training record: {e}")))?;
        for r in record.rounds.iter().skip(shown) {
            progress(r, record.rounds_total);
        }
        shown = record.rounds.len();
        if status.status != "running" {
            return Ok(record);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Writes `model.json`, `model-card.md`, `curves.svg` and `run.json` into
/// `dir`; returns the paths written.
pub fn write_outputs(
    dir: &std::path::Path,
    record: &TrainingRecord,
    manifest: &StudyManifest,
) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut put = |name: &str, contents: String| -> std::io::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, contents)?;
        written.push(path);
        Ok(())
    };
    if let Some(model) = &record.model {
        put(
            "model.json",
            serde_json::to_string_pretty(model).expect("models serialize"),
        )?;
    }
    put("model-card.md", model_card(record, manifest))?;
    put("curves.svg", curves_svg(record))?;
    put(
        "run.json",
        serde_json::to_string_pretty(record).expect("records serialize"),
    )?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghx_study::training::ModelDocument;
    use rand::SeedableRng;

    fn card(manifest_json: &str) -> String {
        let manifest = StudyManifest::parse(manifest_json.as_bytes()).unwrap();
        let spec = &manifest.trainings[0];
        let d = spec.features.len();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let model = spec.initial_model(&mut rng).unwrap();
        let mut record =
            TrainingRecord::new("run-0001", "study-0001", spec, "2026-11-30T00:00:00Z");
        record.model = Some(ModelDocument::new(
            spec,
            &vec![0.0; d],
            &vec![1.0; d],
            &model,
        ));
        model_card(&record, &manifest)
    }

    #[test]
    fn the_model_card_says_which_model_and_reads_weights_only_where_they_mean_something() {
        let mlp = card(include_str!("../../deploy/examples/study-t2d-mlp.json"));
        assert!(
            mlp.contains("multilayer perceptron, one hidden layer of 8 tanh units, sigmoid output (57 parameters)"),
            "{mlp}"
        );
        assert!(mlp.contains("no per-feature reading") && !mlp.contains("odds ratio"));
        let logistic = card(include_str!("../../deploy/examples/study-t2d-model.json"));
        assert!(
            logistic.contains("- Model: logistic regression;"),
            "{logistic}"
        );
        assert!(logistic.contains("odds ratio per sd") && logistic.contains("| (intercept) |"));
        // Every feature row of the MLP's card has four columns.
        let age = mlp.lines().find(|l| l.starts_with("| age |")).unwrap();
        assert_eq!(age.matches('|').count(), 5, "{age}");
        let age = logistic.lines().find(|l| l.starts_with("| age |")).unwrap();
        assert_eq!(age.matches('|').count(), 7, "{age}");
        assert!(!mlp.contains("| (intercept) |"));
        assert!(
            logistic.contains("noised at each site: two-sided geometric noise of epsilon 0.25"),
            "{logistic}"
        );
        let dp = card(include_str!(
            "../../deploy/examples/study-t2d-model-dp.json"
        ));
        assert!(dp.contains("Sites refuse external validation"), "{dp}");
    }
}
