//! What one node contributes to a federated training or evaluation round,
//! and how the coordinator reads the federation's sum.
//!
//! Every vector here is a sum over a node's patients, laid out the same way
//! at every node, so it can be summed by secure aggregation and read back
//! only as the federation's total:
//!
//! - a *moments* round: [`Standardiser::local_sums`] of the training rows;
//! - a *training* round: the locally trained model weighted by its training
//!   rows ([`Model::weighted`]), the global model's summed training log
//!   loss, and [`EvaluationSums`] of the global model on held-out rows;
//! - an *evaluation* round: [`EvaluationSums`] alone.
//!
//! Pooled AUC comes from summed score histograms with [`SCORE_BINS`] bins
//! (ties within a bin count half), so it matches the pooled computation up
//! to the bin width.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::metrics::{self, CalibrationBin};
use crate::{Dataset, Error, Model, Standardiser, TrainConfig};

/// Bins of predicted probability in the score histograms.
pub const SCORE_BINS: usize = 1000;
/// Bins of predicted probability in the calibration table.
pub const CALIBRATION_BINS: usize = 10;

/// Sums that evaluate a model on some held-out rows; they add up across
/// nodes into the pooled evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationSums {
    pub rows: f64,
    pub positives: f64,
    pub log_loss: f64,
    pub brier: f64,
    /// Rows classified right at 0.5.
    pub correct: f64,
    /// Held-out positives and negatives per score bin.
    pub positive_scores: Vec<f64>,
    pub negative_scores: Vec<f64>,
    pub calibration: Vec<CalibrationBin>,
}

/// Evaluation metrics of a model on held-out rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub rows: u64,
    pub positives: u64,
    /// None when one class is absent.
    pub auc: Option<f64>,
    pub accuracy: f64,
    pub brier: f64,
    pub log_loss: f64,
    pub expected_calibration_error: f64,
    pub calibration: Vec<CalibrationBin>,
}

fn score_bin(score: f64) -> usize {
    ((score * SCORE_BINS as f64) as usize).min(SCORE_BINS - 1)
}

impl EvaluationSums {
    /// Length of [`Self::to_vec`].
    pub const LEN: usize = 5 + 2 * SCORE_BINS + 3 * CALIBRATION_BINS;

    /// Evaluates `model` on `data` (already standardised).
    pub fn of(model: &Model, data: &Dataset) -> Self {
        let (scores, log_loss) = model.predict_all_with_log_loss(data);
        let labels = data.labels();
        let mut positive_scores = vec![0.0; SCORE_BINS];
        let mut negative_scores = vec![0.0; SCORE_BINS];
        for (s, y) in scores.iter().zip(labels) {
            if *y > 0.5 {
                positive_scores[score_bin(*s)] += 1.0;
            } else {
                negative_scores[score_bin(*s)] += 1.0;
            }
        }
        let rows = data.len() as f64;
        EvaluationSums {
            rows,
            positives: labels.iter().sum(),
            log_loss: log_loss * rows,
            brier: metrics::brier(&scores, labels) * rows,
            correct: metrics::accuracy(&scores, labels) * rows,
            positive_scores,
            negative_scores,
            calibration: metrics::calibration(&scores, labels, CALIBRATION_BINS),
        }
    }

    /// The flat vector that is summed.
    pub fn to_vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend([
            self.rows,
            self.positives,
            self.log_loss,
            self.brier,
            self.correct,
        ]);
        out.extend(&self.positive_scores);
        out.extend(&self.negative_scores);
        for bin in &self.calibration {
            out.extend([bin.count as f64, bin.predicted_sum, bin.observed_sum]);
        }
        out
    }

    /// Reads a (summed) vector back.
    pub fn from_vec(v: &[f64]) -> Result<Self, Error> {
        if v.len() != Self::LEN {
            return Err(Error::WrongSumLength {
                what: "evaluation sums",
                got: v.len(),
                dim: 0,
            });
        }
        let (head, rest) = v.split_at(5);
        let (positive_scores, rest) = rest.split_at(SCORE_BINS);
        let (negative_scores, calibration) = rest.split_at(SCORE_BINS);
        let calibration = calibration
            .chunks(3)
            .enumerate()
            .map(|(b, c)| CalibrationBin {
                lower: b as f64 / CALIBRATION_BINS as f64,
                upper: (b + 1) as f64 / CALIBRATION_BINS as f64,
                count: c[0].round().max(0.0) as u64,
                predicted_sum: c[1],
                observed_sum: c[2],
            })
            .collect();
        Ok(EvaluationSums {
            rows: head[0].round(),
            positives: head[1].round(),
            log_loss: head[2],
            brier: head[3],
            correct: head[4].round(),
            positive_scores: positive_scores.iter().map(|c| c.round()).collect(),
            negative_scores: negative_scores.iter().map(|c| c.round()).collect(),
            calibration,
        })
    }

    /// AUC from the score histograms: ties within a bin count half.
    pub fn histogram_auc(&self) -> Option<f64> {
        let positives: f64 = self.positive_scores.iter().sum();
        let negatives: f64 = self.negative_scores.iter().sum();
        if positives < 0.5 || negatives < 0.5 {
            return None;
        }
        let mut below = 0.0;
        let mut wins = 0.0;
        for (p, n) in self.positive_scores.iter().zip(&self.negative_scores) {
            wins += p * (below + 0.5 * n);
            below += n;
        }
        Some(wins / (positives * negatives))
    }

    pub fn metrics(&self) -> Metrics {
        let rows = self.rows.max(0.0);
        let per_row = |x: f64| if rows > 0.0 { x / rows } else { 0.0 };
        Metrics {
            rows: rows as u64,
            positives: self.positives.max(0.0) as u64,
            auc: self.histogram_auc(),
            accuracy: per_row(self.correct),
            brier: per_row(self.brier),
            log_loss: per_row(self.log_loss),
            expected_calibration_error: metrics::expected_calibration_error(&self.calibration),
            calibration: self.calibration.clone(),
        }
    }
}

impl Metrics {
    /// The metrics as they may leave where they were computed, every
    /// number resting on at least `k` patients: none unless the rows, the
    /// positives and the negatives each reach `k`; calibration bins merged
    /// until each holds `k` rows ([`metrics::coarsen`]) and the calibration
    /// error taken over those.
    pub fn disclosed(mut self, k: u64) -> Option<Metrics> {
        let negatives = self.rows.saturating_sub(self.positives);
        if self.rows < k || self.positives < k || negatives < k {
            return None;
        }
        self.calibration = metrics::coarsen(&self.calibration, k);
        self.expected_calibration_error = metrics::expected_calibration_error(&self.calibration);
        Some(self)
    }
}

/// What a round sums: the wire names a phase by [`Phase::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Feature moments, for standardisation.
    Moments,
    /// A local training step from the global model, with its evaluation.
    Train,
    /// The evaluation of a model on held-out rows.
    Evaluate,
}

impl Phase {
    /// The phase named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "moments" => Some(Phase::Moments),
            "train" => Some(Phase::Train),
            "evaluate" => Some(Phase::Evaluate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Moments => "moments",
            Phase::Train => "train",
            Phase::Evaluate => "evaluate",
        }
    }

    /// Length of the summed vector for `dim` features and a model of
    /// `params` parameters ([`Model::param_count`]).
    pub fn len(self, dim: usize, params: usize) -> usize {
        match self {
            Phase::Moments => 1 + 2 * dim,
            Phase::Train => training_len(params),
            Phase::Evaluate => EvaluationSums::LEN,
        }
    }
}

/// What a node sends in a moments round.
pub fn moments_contribution(train: &Dataset) -> Vec<f64> {
    Standardiser::local_sums(train)
}

/// Length of a training round's vector for a model of `params`
/// parameters: the model part (parameters, then the row count), the
/// summed training loss and the evaluation sums.
pub fn training_len(params: usize) -> usize {
    params + 1 + 1 + EvaluationSums::LEN
}

/// What a node sends in a training round: trains from `global` on its
/// (standardised) training rows, and evaluates `global` on them and on its
/// held-out rows.
pub fn training_contribution(
    global: &Model,
    train: &Dataset,
    holdout: &Dataset,
    config: &TrainConfig,
    rng: &mut impl Rng,
) -> Result<Vec<f64>, Error> {
    let (local, (loss, evaluation)) =
        alongside_evaluation(global, train, holdout, || global.train(train, config, rng));
    let mut out = local?.weighted(train.len());
    out.push(loss * train.len() as f64);
    out.extend(evaluation.to_vec());
    Ok(out)
}

/// Runs `work` on this thread while another computes what every training
/// round also reports, which does not depend on it: `global`'s mean log
/// loss on `train` and its evaluation on `holdout`. On a node with two
/// cores free this takes the round from the sum of the passes (SGD epoch,
/// loss, evaluation) to the longest; the values are exactly the ones one
/// thread computes.
fn alongside_evaluation<T>(
    global: &Model,
    train: &Dataset,
    holdout: &Dataset,
    work: impl FnOnce() -> T,
) -> (T, (f64, EvaluationSums)) {
    std::thread::scope(|scope| {
        let side = scope.spawn(|| (global.log_loss(train), EvaluationSums::of(global, holdout)));
        let done = work();
        let reported = side
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (done, reported)
    })
}

/// What a node sends in a noised training round (DP-FedSGD, see
/// `ghx_study::training::TrainingPrivacy`): the sum over its training rows
/// of each row's log-loss gradient at `global` (in [`Model::params`]
/// order), clipped to L2 norm `clip`, and the row count, each with
/// Gaussian noise of standard deviation `noise_std`; then, unnoised like
/// any round's, the global model's summed training loss and its evaluation
/// on held-out rows. Same layout as [`training_contribution`]; read with
/// [`read_private_training_sum`].
pub fn private_training_contribution(
    global: &Model,
    train: &Dataset,
    holdout: &Dataset,
    clip: f64,
    noise_std: f64,
    rng: &mut impl Rng,
) -> Result<Vec<f64>, Error> {
    let noise = rand_distr::Normal::new(0.0, noise_std).map_err(|_| Error::BadSetting {
        setting: "noise standard deviation",
        value: noise_std,
        expected: "expected a finite number, 0 or more",
    })?;
    let (gradient, (loss, evaluation)) = alongside_evaluation(global, train, holdout, || {
        global.clipped_gradient_sum(train, clip)
    });
    let mut out = gradient?;
    out.push(train.len() as f64);
    for v in &mut out {
        *v += rng.sample(noise);
    }
    out.push(loss * train.len() as f64);
    out.extend(evaluation.to_vec());
    Ok(out)
}

/// Reads the sum of every contributor's [`private_training_contribution`]:
/// one gradient step from `global` with the mean of the noisy gradient sum
/// over the noisy count, plus the L2 penalty's own (data-free) gradient.
pub fn read_private_training_sum(
    sum: &[f64],
    global: &Model,
    learning_rate: f64,
    l2: f64,
) -> Result<RoundTotals, Error> {
    let params = global.param_count();
    let (gradient, loss, evaluation) = split_training_sum(sum, params)?;
    let train_rows = gradient[params];
    // A noisy count near zero would blow the step up: one row at least.
    let n = train_rows.max(1.0);
    let mean: Vec<f64> = gradient[..params].iter().map(|g| g / n).collect();
    Ok(RoundTotals {
        model: global.step(&mean, learning_rate, l2)?,
        train_rows,
        train_loss: loss / n,
        evaluation,
    })
}

/// The federation's total of a training round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTotals {
    /// FedAvg (or FedProx) of the nodes' local models, or for a noised
    /// round the global model after one step with the summed gradients.
    pub model: Model,
    /// Training rows that took part.
    pub train_rows: f64,
    /// Mean training log loss of the global model the round started from.
    pub train_loss: f64,
    /// The global model the round started from, on held-out rows.
    pub evaluation: EvaluationSums,
}

/// Reads the sum of every contributor's [`training_contribution`] from
/// `global` (which gives the model's shape).
pub fn read_training_sum(sum: &[f64], global: &Model) -> Result<RoundTotals, Error> {
    let params = global.param_count();
    let (weighted, loss, evaluation) = split_training_sum(sum, params)?;
    let model = global.average_of(weighted)?;
    let train_rows = weighted[params];
    Ok(RoundTotals {
        model,
        train_rows,
        train_loss: loss / train_rows,
        evaluation,
    })
}

/// The parts of a training round's sum, in either layout: the model part
/// (`params` parameters, then the row count), the summed training loss and
/// the evaluation sums.
fn split_training_sum(sum: &[f64], params: usize) -> Result<(&[f64], f64, EvaluationSums), Error> {
    if sum.len() != training_len(params) {
        return Err(Error::WrongSumLength {
            what: "a training round",
            got: sum.len(),
            dim: params,
        });
    }
    let (model, rest) = sum.split_at(params + 1);
    Ok((model, rest[0], EvaluationSums::from_vec(&rest[1..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_leave_only_when_both_classes_reach_k_and_with_bins_of_k() {
        let metrics = |rows: u64, positives: u64| Metrics {
            rows,
            positives,
            auc: Some(0.7),
            accuracy: 0.8,
            brier: 0.1,
            log_loss: 0.3,
            expected_calibration_error: 0.0,
            calibration: metrics::calibration(
                &(0..rows)
                    .map(|i| i as f64 / rows as f64)
                    .collect::<Vec<_>>(),
                &(0..rows)
                    .map(|i| f64::from(i < positives))
                    .collect::<Vec<_>>(),
                10,
            ),
        };
        assert!(metrics(100, 9).disclosed(10).is_none());
        assert!(metrics(100, 91).disclosed(10).is_none());
        let out = metrics(100, 30).disclosed(20).unwrap();
        assert!(out.calibration.iter().all(|b| b.count >= 20));
        assert_eq!(out.calibration.iter().map(|b| b.count).sum::<u64>(), 100);
        assert_eq!(
            out.expected_calibration_error,
            metrics::expected_calibration_error(&out.calibration)
        );
    }

    fn data(rows: &[(&[f64], bool)]) -> Dataset {
        let mut d = Dataset::new(rows[0].0.len());
        for (r, y) in rows {
            d.push(r, *y).unwrap();
        }
        d
    }

    #[test]
    fn histogram_auc_matches_exact_auc_and_sums_add_up() {
        let a = data(&[(&[0.1], false), (&[2.0], true), (&[0.5], true)]);
        let b = data(&[(&[-1.0], false), (&[1.5], false), (&[3.0], true)]);
        let model = Model {
            hidden: None,
            weights: vec![1.3],
            bias: -0.4,
        };
        let sa = EvaluationSums::of(&model, &a).to_vec();
        let sb = EvaluationSums::of(&model, &b).to_vec();
        let summed: Vec<f64> = sa.iter().zip(&sb).map(|(x, y)| x + y).collect();
        let pooled = EvaluationSums::from_vec(&summed).unwrap().metrics();
        let mut all = a.clone();
        for i in 0..b.len() {
            all.push(b.row(i), b.label(i) > 0.5).unwrap();
        }
        let scores = model.predict_all(&all);
        let exact = metrics::auc(&scores, all.labels()).unwrap();
        assert!((pooled.auc.unwrap() - exact).abs() < 1e-9, "{pooled:?}");
        assert_eq!(pooled.rows, 6);
        assert_eq!(pooled.positives, 3);
        assert!((pooled.log_loss - model.log_loss(&all)).abs() < 1e-12);
        assert!((pooled.accuracy - metrics::accuracy(&scores, all.labels())).abs() < 1e-12);
    }

    #[test]
    fn private_rounds_clip_each_rows_gradient_and_step_from_the_global_model() {
        // At the zero model every prediction is 0.5. Row 1 (label 0) has
        // gradient 0.5 * (3, 4, 1), norm 0.5 * sqrt(26) > 1: scaled to
        // norm 1. Row 2 (label 1) has -0.5 * (0.1, 0, 1), norm
        // 0.5 * sqrt(1.01) < 1: kept.
        let a = data(&[(&[3.0, 4.0], false), (&[0.1, 0.0], true)]);
        let global = Model::zeros(2);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let v = private_training_contribution(&global, &a, &a, 1.0, 0.0, &mut rng).unwrap();
        assert_eq!(v.len(), training_len(3));
        let k = 1.0 / 26f64.sqrt();
        let expected = [3.0 * k - 0.05, 4.0 * k, k - 0.5, 2.0];
        for (got, want) in v.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12, "{v:?}");
        }
        // The coordinator's step: w - lr * (g / n + l2 * w).
        let totals = read_private_training_sum(&v, &global, 0.5, 0.0).unwrap();
        assert!((totals.model.weights[0] + 0.5 * expected[0] / 2.0).abs() < 1e-12);
        assert!((totals.model.bias + 0.5 * expected[2] / 2.0).abs() < 1e-12);
        assert_eq!(totals.train_rows, 2.0);
        // With noise, the gradient and count move; the evaluation does not.
        let noisy = private_training_contribution(&global, &a, &a, 1.0, 5.0, &mut rng).unwrap();
        assert!(noisy[..4].iter().zip(&v).all(|(x, y)| x != y));
        assert_eq!(noisy[4..], v[4..]);
        assert!(read_private_training_sum(&v[1..], &global, 0.5, 0.0).is_err());
    }

    #[test]
    fn a_training_contribution_is_the_single_threaded_one() {
        // The loss and evaluation computed on a second thread are exactly
        // what computing everything in turn gives, in the same places.
        let rows: Vec<(Vec<f64>, bool)> = (0..300)
            .map(|i| {
                let x = f64::from(i) / 100.0 - 1.5;
                (vec![x, (x * 3.0).sin()], (i * 7) % 5 < 2)
            })
            .collect();
        let rows: Vec<(&[f64], bool)> = rows.iter().map(|(r, y)| (r.as_slice(), *y)).collect();
        let (train, holdout) = (data(&rows[..200]), data(&rows[200..]));
        let global = Model {
            hidden: None,
            weights: vec![0.3, -0.8],
            bias: 0.1,
        };
        let config = TrainConfig {
            epochs: 2,
            batch_size: 16,
            learning_rate: 0.2,
            proximal_mu: 0.0,
            l2: 0.0,
        };
        let seeded = || <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let v = training_contribution(&global, &train, &holdout, &config, &mut seeded()).unwrap();
        let mut expected = global
            .train(&train, &config, &mut seeded())
            .unwrap()
            .weighted(train.len());
        expected.push(global.log_loss(&train) * train.len() as f64);
        expected.extend(EvaluationSums::of(&global, &holdout).to_vec());
        assert_eq!(v, expected);
    }

    #[test]
    fn a_training_sum_reads_back_as_the_weighted_average() {
        let a = data(&[(&[0.1, 1.0], false), (&[2.0, 0.0], true)]);
        let global = Model::zeros(2);
        let config = TrainConfig {
            epochs: 1,
            batch_size: 1,
            learning_rate: 0.1,
            proximal_mu: 0.0,
            l2: 0.0,
        };
        let mut rng = rand::rngs::mock::StepRng::new(0, 1);
        let v = training_contribution(&global, &a, &a, &config, &mut rng).unwrap();
        assert_eq!(v.len(), training_len(3));
        let totals = read_training_sum(&v, &global).unwrap();
        assert_eq!(totals.train_rows, 2.0);
        assert!((totals.train_loss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(totals.evaluation.rows, 2.0);
        assert!(read_training_sum(&v[1..], &global).is_err());
    }
}
