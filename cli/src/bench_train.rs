//! `ghx bench-train`: federated training on a local three-hospital
//! federation, per-round coordination overhead and total time, against
//! Flower (the `flwr` Python package) running FedAvg on the same rows in the
//! same run, twice: fit rounds only (what a ghx round gives: the local
//! model and nothing else), and with what federations that monitor every
//! round give (the received model's training loss, and an evaluation round
//! on held-out rows after each fit round). Overhead is
//! measured two ways, for all three runs alike: round
//! wall time outside the slowest node's local computation, and round wall
//! time during which no node was computing (outside the union of the nodes'
//! computations: on one machine the nodes share its cores, so a node waiting
//! for a core while another computes is not coordination). With
//! `repeat` above 1 the three runs take turns that many times on the same
//! federation and rows, and each figure is also given as its median over
//! the repetitions (a shared VM's speed drifts from minute to minute; taking
//! turns spreads the drift over all three alike).
//! Numbers, not a test: nothing here asserts a timing.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ghx_coordinator::training::{RunStatus, TrainingRecord};
use ghx_learn::{Dataset, Model, Standardiser, metrics};
use ghx_proto::v1 as pb;
use ghx_study::manifest::StudyManifest;

use crate::local_federation::{self, LocalFederation, LocalFederationOptions, RESEARCHER};

const MANIFEST: &str = include_str!("../../deploy/examples/study-t2d-model.json");

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Federation(#[from] local_federation::Error),
    #[error("coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the training run did not complete: {0}")]
    Incomplete(String),
    #[error("policy: {0}")]
    Policy(#[from] ghx_node::policy::Error),
    #[error("extracting rows: {0}")]
    Extract(#[from] ghx_node::training::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    pub dir: PathBuf,
    pub patients_per_node: usize,
    pub rounds: u32,
    pub seed: u64,
    /// Hidden units of an MLP trained instead of logistic regression (by
    /// Flower too).
    pub mlp_hidden_units: Option<u32>,
    /// A Python with `flwr` and `numpy`; None skips the comparison.
    pub flower_python: Option<PathBuf>,
    /// `bench/flower_fedavg.py`.
    pub flower_script: PathBuf,
    /// How many times each of the three runs is made (at least once).
    pub repeat: u32,
}

/// Per-round timings of one framework.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub rounds: usize,
    /// Sum of round wall times.
    pub rounds_seconds: f64,
    /// From start to the final model (ghx: including the moments and
    /// evaluation rounds; Flower: including client start-up).
    pub total_seconds: f64,
    pub round_p50_ms: f64,
    pub local_p50_ms: f64,
    /// Round time outside the slowest node's local computation.
    pub overhead_p50_ms: f64,
    pub overhead_mean_ms: f64,
    /// Time in a round during which some node was computing.
    pub busy_p50_ms: f64,
    /// Round time during which no node was computing.
    pub idle_p50_ms: f64,
    pub idle_mean_ms: f64,
    /// AUC of the final model on the pooled held-out rows.
    pub auc: Option<f64>,
}

/// What the benchmark measured.
#[derive(Debug, Clone)]
pub struct TrainBenchReport {
    pub setup: Duration,
    pub train_rows: usize,
    pub holdout_rows: usize,
    /// Each repetition, in the order run.
    pub repetitions: Vec<Repetition>,
}

/// One turn of the three runs.
#[derive(Debug, Clone)]
pub struct Repetition {
    pub ghx: Timing,
    /// Flower's timings, or why it did not run: fit rounds only.
    pub flower: Result<Timing, String>,
    /// Flower monitoring every round (the received model's training loss
    /// from each fit, and an evaluation round on held-out rows after each
    /// fit round; more than a ghx round gives), or why it did not run.
    pub flower_evaluating: Result<Timing, String>,
    /// ghx's median wall time per round of: opening the session on the
    /// round's path, the masked input with local computation, unmasking,
    /// the rest (see `RoundRecord::steps_ms`), ms.
    pub ghx_steps_ms: [f64; 4],
    /// ghx's median over its rounds of where the answer that ended each
    /// round spent its time: outside the node's handler (both ways), in
    /// the handler before computing, after computing (see
    /// `RoundRecord::last_answer_ms`), ms.
    pub ghx_last_answer_ms: [f64; 3],
}

/// The middle value (the upper of the two middle ones for an even count);
/// 0 for none.
fn p50(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// One round's wall time, slowest node's local computation and time during
/// which some node computed, s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTime {
    pub seconds: f64,
    pub local: f64,
    pub busy: f64,
}

impl TrainBenchReport {
    /// Each figure's median over the repetitions (a run's p50 becomes the
    /// median of the runs' p50s); Flower's over the repetitions it ran in,
    /// or the first reason it did not run.
    pub fn median(&self) -> Repetition {
        let reps = &self.repetitions;
        let flower = |pick: &dyn Fn(&Repetition) -> &Result<Timing, String>| {
            let ran: Vec<Timing> = reps.iter().filter_map(|r| pick(r).clone().ok()).collect();
            if ran.is_empty() {
                Err(reps
                    .first()
                    .and_then(|r| pick(r).clone().err())
                    .unwrap_or_else(|| "no repetition ran".to_owned()))
            } else {
                Ok(median_timing(&ran))
            }
        };
        Repetition {
            ghx: median_timing(&reps.iter().map(|r| r.ghx.clone()).collect::<Vec<_>>()),
            flower: flower(&|r| &r.flower),
            flower_evaluating: flower(&|r| &r.flower_evaluating),
            ghx_steps_ms: p50_each(reps.iter().map(|r| r.ghx_steps_ms)),
            ghx_last_answer_ms: p50_each(reps.iter().map(|r| r.ghx_last_answer_ms)),
        }
    }

    /// In how many repetitions each Flower run gave timings: fit rounds
    /// only, and with evaluation rounds.
    pub fn flower_ran(&self) -> (usize, usize) {
        let ran =
            |pick: fn(&Repetition) -> bool| self.repetitions.iter().filter(|r| pick(r)).count();
        (
            ran(|r| r.flower.is_ok()),
            ran(|r| r.flower_evaluating.is_ok()),
        )
    }
}

/// The median of each of a ghx round's times (its steps, or its last
/// answer's parts) over `steps`.
fn p50_each<const N: usize>(steps: impl Iterator<Item = [f64; N]>) -> [f64; N] {
    let steps: Vec<[f64; N]> = steps.collect();
    std::array::from_fn(|i| p50(steps.iter().map(|s| s[i]).collect()))
}

/// Each field's median over `runs`.
fn median_timing(runs: &[Timing]) -> Timing {
    let m = |f: &dyn Fn(&Timing) -> f64| p50(runs.iter().map(f).collect());
    let aucs: Vec<f64> = runs.iter().filter_map(|t| t.auc).collect();
    Timing {
        rounds: runs.first().map_or(0, |t| t.rounds),
        rounds_seconds: m(&|t| t.rounds_seconds),
        total_seconds: m(&|t| t.total_seconds),
        round_p50_ms: m(&|t| t.round_p50_ms),
        local_p50_ms: m(&|t| t.local_p50_ms),
        overhead_p50_ms: m(&|t| t.overhead_p50_ms),
        overhead_mean_ms: m(&|t| t.overhead_mean_ms),
        busy_p50_ms: m(&|t| t.busy_p50_ms),
        idle_p50_ms: m(&|t| t.idle_p50_ms),
        idle_mean_ms: m(&|t| t.idle_mean_ms),
        auc: (!aucs.is_empty()).then(|| p50(aucs)),
    }
}

fn timing(rounds: &[RoundTime], total_seconds: f64, auc: Option<f64>) -> Timing {
    let ms = |f: &dyn Fn(&RoundTime) -> f64| -> Vec<f64> {
        rounds.iter().map(|r| f(r).max(0.0) * 1000.0).collect()
    };
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let overhead = ms(&|r| r.seconds - r.local);
    let idle = ms(&|r| r.seconds - r.busy);
    Timing {
        rounds: rounds.len(),
        rounds_seconds: rounds.iter().map(|r| r.seconds).sum(),
        total_seconds,
        round_p50_ms: p50(ms(&|r| r.seconds)),
        local_p50_ms: p50(ms(&|r| r.local)),
        overhead_p50_ms: p50(overhead.clone()),
        overhead_mean_ms: mean(&overhead),
        busy_p50_ms: p50(ms(&|r| r.busy)),
        idle_p50_ms: p50(idle.clone()),
        idle_mean_ms: mean(&idle),
        auc,
    }
}

fn pooled(parts: impl Iterator<Item = Dataset>, dim: usize) -> Dataset {
    let mut out = Dataset::new(dim);
    for part in parts {
        for i in 0..part.len() {
            out.push(part.row(i), part.label(i) > 0.5)
                .expect("rows of the same width");
        }
    }
    out
}

fn write_csv(path: &Path, data: &Dataset) -> Result<(), Error> {
    let wrap = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(wrap)?);
    for i in 0..data.len() {
        let row: Vec<String> = data.row(i).iter().map(|x| format!("{x:.9}")).collect();
        writeln!(out, "{},{}", row.join(","), data.label(i)).map_err(wrap)?;
    }
    out.flush().map_err(wrap)
}

/// Runs the benchmark.
pub async fn run(options: &TrainBenchOptions) -> Result<TrainBenchReport, Error> {
    let started = Instant::now();
    let federation = LocalFederation::start(&LocalFederationOptions {
        dir: options.dir.clone(),
        patients_per_node: options.patients_per_node,
        seed: options.seed,
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
    .await?;
    let setup = started.elapsed();
    let mut manifest_value: serde_json::Value =
        serde_json::from_str(MANIFEST).expect("the example manifest is JSON");
    manifest_value["trainings"][0]["rounds"] = options.rounds.into();
    manifest_value["trainings"][0]["round_deadline_seconds"] = 600.into();
    // Each run's evaluation is noised and charged to the study's budget
    // (at most 0.5 under the hospitals' policies): a share of it for every
    // turn's. The benchmark scores each model itself, on the rows.
    let turns = options.repeat.max(1);
    let budget = manifest_value["privacy_budget"].as_f64().unwrap_or(0.5);
    manifest_value["trainings"][0]["validation"]["epsilon"] = (budget / f64::from(turns))
        .max(ghx_study::query::MIN_EPSILON)
        .into();
    if let Some(units) = options.mlp_hidden_units {
        manifest_value["trainings"][0]["model"] = "mlp".into();
        manifest_value["trainings"][0]["hidden_units"] = units.into();
    }
    let manifest_json = serde_json::to_vec(&manifest_value).expect("JSON serializes");
    let manifest = StudyManifest::parse(&manifest_json)
        .map_err(|e| Error::Incomplete(format!("benchmark manifest: {e}")))?;
    let spec = manifest.trainings[0].clone();
    let study_id = federation.approved_study(RESEARCHER, manifest_json).await?;
    let mut client = federation.client(RESEARCHER).await?;
    let mut rows: Option<Rows> = None;
    let mut repetitions = Vec::new();
    for turn in 1..=turns {
        if turns > 1 {
            eprintln!("repetition {turn} of {turns}");
        }
        let train_started = Instant::now();
        let status = client
            .start_training(pb::StartTrainingRequest {
                study_id: study_id.clone(),
                training: spec.name.clone(),
            })
            .await?
            .into_inner();
        let record: TrainingRecord =
            crate::training_report::follow(&mut client, &status.run_id, |r, total| {
                if r.round % 10 == 0 || r.round == total {
                    eprintln!("{}", crate::training_report::progress_line(r, total));
                }
            })
            .await?;
        let ghx_total = train_started.elapsed().as_secs_f64();
        if record.status != RunStatus::Completed {
            return Err(Error::Incomplete(record.detail));
        }
        let model = record.model.clone().expect("a completed run has a model");
        let rows = match &mut rows {
            Some(rows) => rows,
            empty => {
                empty.insert(Rows::extract(&federation, options, &manifest, &spec, &model).await?)
            }
        };
        let ghx_rounds: Vec<RoundTime> = record
            .rounds
            .iter()
            .map(|r| RoundTime {
                seconds: r.seconds,
                local: r.local_seconds,
                busy: r.busy_seconds,
            })
            .collect();
        let ghx_model = model.model();
        let ghx = timing(&ghx_rounds, ghx_total, rows.auc_of(&ghx_model));
        let ghx_steps_ms = p50_each(record.rounds.iter().map(|r| r.steps_ms.to_array()));
        let ghx_last_answer_ms =
            p50_each(record.rounds.iter().map(|r| r.last_answer_ms.to_array()));
        let (flower, flower_evaluating) = match &rows.flower {
            Err(why) => (Err(why.clone()), Err(why.clone())),
            Ok((run, holdouts)) => {
                let auc_of = |m: &Model| rows.auc_of(m);
                let fit_only = run.clone().timing(None, &ghx_model, &auc_of).await?;
                let evaluating = run
                    .clone()
                    .timing(Some(holdouts.clone()), &ghx_model, &auc_of)
                    .await?;
                (fit_only, evaluating)
            }
        };
        repetitions.push(Repetition {
            ghx,
            flower,
            flower_evaluating,
            ghx_steps_ms,
            ghx_last_answer_ms,
        });
    }
    federation.shutdown().await;
    let rows = rows.expect("at least one repetition ran");
    Ok(TrainBenchReport {
        setup,
        train_rows: rows.train_rows,
        holdout_rows: rows.holdout.len(),
        repetitions,
    })
}

/// The rows every repetition is measured on: the pooled held-out rows for
/// AUC, and Flower's run on each node's rows (or why it does not run).
struct Rows {
    train_rows: usize,
    /// Standardised as the ghx run did.
    holdout: Dataset,
    /// Flower's fit-only run and the clients' held-out CSVs.
    flower: Result<(FlowerRun, Vec<PathBuf>), String>,
}

impl Rows {
    /// The same rows the run trained on, standardised as `model` was, for
    /// Flower (written as CSV when it runs) and for AUC.
    async fn extract(
        federation: &LocalFederation,
        options: &TrainBenchOptions,
        manifest: &StudyManifest,
        spec: &ghx_study::training::TrainingSpec,
        model: &ghx_study::training::ModelDocument,
    ) -> Result<Rows, Error> {
        let mut parts = Vec::new();
        for node in &federation.nodes {
            let policy = ghx_node::policy::PolicyDir::load(
                &federation.dir.join("policies").join(node.profile.id),
            )?;
            let store = node.store.clone();
            let spec = spec.clone();
            let purpose = manifest.purpose.clone();
            parts.push(
                tokio::task::spawn_blocking(move || {
                    ghx_node::training::extract_under_policy(&store, &policy, &purpose, &spec)
                })
                .await??,
            );
        }
        let standardiser = Standardiser {
            mean: model.mean.clone(),
            sd: model.sd.clone(),
        };
        let dim = spec.features.len();
        let mut holdout = pooled(parts.iter().map(|p| p.holdout.clone()), dim);
        standardiser.apply(&mut holdout);
        let train_rows = parts.iter().map(|p| p.train.len()).sum();
        let flower = match &options.flower_python {
            None => Err("no --flower-python given".to_owned()),
            Some(python) => {
                let mut trains = Vec::new();
                let mut holdouts = Vec::new();
                for (node, part) in federation.nodes.iter().zip(&parts) {
                    for (rows, kind, paths) in [
                        (&part.train, "train", &mut trains),
                        (&part.holdout, "holdout", &mut holdouts),
                    ] {
                        let mut rows = rows.clone();
                        standardiser.apply(&mut rows);
                        let path = options
                            .dir
                            .join(format!("flower-{}-{kind}.csv", node.profile.id));
                        write_csv(&path, &rows)?;
                        paths.push(path);
                    }
                }
                let run = FlowerRun {
                    python: python.clone(),
                    script: options.flower_script.clone(),
                    optimiser: spec.optimiser.clone(),
                    rounds: options.rounds,
                    hidden: options.mlp_hidden_units.unwrap_or(0),
                    trains,
                };
                Ok((run, holdouts))
            }
        };
        Ok(Rows {
            train_rows,
            holdout,
            flower,
        })
    }

    /// AUC of `model` on the pooled held-out rows.
    fn auc_of(&self, model: &Model) -> Option<f64> {
        metrics::auc(&model.predict_all(&self.holdout), self.holdout.labels())
    }
}

/// One run of `bench/flower_fedavg.py` on the rows written for it.
#[derive(Clone)]
struct FlowerRun {
    python: PathBuf,
    script: PathBuf,
    optimiser: ghx_study::training::Optimiser,
    rounds: u32,
    hidden: u32,
    /// Each client's standardised training rows (CSV).
    trains: Vec<PathBuf>,
}

impl FlowerRun {
    /// Runs Flower, with an evaluation round after every fit round on the
    /// clients' `holdouts` when given; the final model's pooled AUC by
    /// `auc_of`, read in `like`'s shape. Err says why Flower gave no
    /// timings.
    async fn timing(
        self,
        holdouts: Option<Vec<PathBuf>>,
        like: &Model,
        auc_of: &dyn Fn(&Model) -> Option<f64>,
    ) -> Result<Result<Timing, String>, Error> {
        let output = tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(&self.python);
            command
                .arg(&self.script)
                .args(["--rounds", &self.rounds.to_string()])
                .args(["--hidden", &self.hidden.to_string()])
                .args(["--lr", &self.optimiser.learning_rate.to_string()])
                .args(["--batch", &self.optimiser.batch_size.to_string()])
                .args(["--epochs", &self.optimiser.epochs.to_string()]);
            command.args(&self.trains);
            // After the training CSVs: `--holdout` takes several too.
            if let Some(holdouts) = &holdouts {
                command.arg("--holdout").args(holdouts);
            }
            command.output()
        })
        .await?;
        Ok(match output {
            Err(e) => Err(format!("cannot start Python: {e}")),
            Ok(out) if !out.status.success() => Err(format!(
                "Flower run failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
            Ok(out) => match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                Err(e) => Err(format!("unreadable Flower output: {e}")),
                Ok(v) => {
                    let rounds: Vec<RoundTime> = v["rounds"]
                        .as_array()
                        .map(|rs| {
                            rs.iter()
                                .map(|r| RoundTime {
                                    seconds: r["seconds"].as_f64().unwrap_or(0.0),
                                    local: r["local_seconds"].as_f64().unwrap_or(0.0),
                                    busy: r["busy_seconds"].as_f64().unwrap_or(0.0),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let weights: Vec<f64> = v["weights"]
                        .as_array()
                        .map(|w| w.iter().filter_map(serde_json::Value::as_f64).collect())
                        .unwrap_or_default();
                    // Read in ghx's parameter layout, shaped as ghx's model
                    // of the same kind.
                    let auc = like.with_params(&weights).ok().and_then(|m| auc_of(&m));
                    Ok(timing(
                        &rounds,
                        v["total_seconds"].as_f64().unwrap_or(0.0),
                        auc,
                    ))
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_round_time_outside_local_work() {
        let round = |seconds, local, busy| RoundTime {
            seconds,
            local,
            busy,
        };
        let t = timing(
            &[
                round(0.010, 0.004, 0.006),
                round(0.020, 0.005, 0.009),
                round(0.012, 0.013, 0.013),
            ],
            1.0,
            None,
        );
        assert_eq!(t.rounds, 3);
        assert!((t.overhead_p50_ms - 6.0).abs() < 1e-9, "{t:?}");
        // A round whose local time exceeds its wall time counts as 0.
        assert!((t.overhead_mean_ms - 7.0).abs() < 1e-9, "{t:?}");
        assert!((t.round_p50_ms - 12.0).abs() < 1e-9);
        assert!((t.idle_p50_ms - 4.0).abs() < 1e-9, "{t:?}");
        assert!((t.idle_mean_ms - 5.0).abs() < 1e-9, "{t:?}");
        assert!((t.busy_p50_ms - 9.0).abs() < 1e-9, "{t:?}");
    }

    fn flat(ms: f64, auc: Option<f64>) -> Timing {
        let s = ms / 1000.0;
        timing(&[round_of(s)], s, auc)
    }

    fn round_of(seconds: f64) -> RoundTime {
        RoundTime {
            seconds,
            local: seconds / 2.0,
            busy: seconds / 2.0,
        }
    }

    #[test]
    fn repetitions_give_each_figure_its_median() {
        let rep = |ghx_ms: f64, flower: Result<Timing, String>| Repetition {
            ghx: flat(ghx_ms, Some(ghx_ms / 100.0)),
            flower: flower.clone(),
            flower_evaluating: flower,
            ghx_steps_ms: [ghx_ms, 0.0, 0.0, 1.0],
            ghx_last_answer_ms: [ghx_ms / 10.0, 0.1, 0.2],
        };
        let report = TrainBenchReport {
            setup: Duration::ZERO,
            train_rows: 0,
            holdout_rows: 0,
            repetitions: vec![
                rep(4.0, Ok(flat(60.0, None))),
                rep(2.0, Err("Flower run failed: boom".to_owned())),
                rep(9.0, Ok(flat(40.0, None))),
            ],
        };
        assert_eq!(report.flower_ran(), (2, 2));
        let m = report.median();
        // ghx: the middle of 2, 4 and 9 ms (each run's overhead is half).
        assert!((m.ghx.round_p50_ms - 4.0).abs() < 1e-9, "{m:?}");
        assert!((m.ghx.overhead_p50_ms - 2.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.ghx.auc, Some(0.04));
        assert_eq!(m.ghx_steps_ms, [4.0, 0.0, 0.0, 1.0]);
        assert_eq!(m.ghx_last_answer_ms, [0.4, 0.1, 0.2]);
        // Flower: over the two repetitions it ran in (the upper middle).
        let flower = m.flower.expect("Flower ran in two repetitions");
        assert!((flower.round_p50_ms - 60.0).abs() < 1e-9, "{flower:?}");
        assert_eq!(flower.auc, None);

        let never = TrainBenchReport {
            repetitions: vec![
                rep(1.0, Err("no --flower-python given".to_owned())),
                rep(2.0, Err("later".to_owned())),
            ],
            ..report
        };
        assert_eq!(
            never.median().flower_evaluating.unwrap_err(),
            "no --flower-python given"
        );
    }
}
