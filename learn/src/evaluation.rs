//! The evaluation of a model on held-out rows, as nodes sum it and as it
//! may be released.
//!
//! A node sums, over its held-out patients, only counts: rows, positives,
//! and positives and negatives per bin of predicted probability
//! ([`SCORE_BINS`] equal bins, 0.01 wide). No sum of scores, losses or squared errors
//! leaves a node, because the model is the sender's to choose: one scoring
//! every patient 0.5 but one 0.99 makes everyone else's log-loss (or Brier)
//! term the same whatever their label, so a summed loss gives that one
//! patient's label, and a summed score their score, which says what their
//! features are.
//!
//! What is released ([`EvaluationSums::disclosed`]) is read off the score
//! histogram with neighbouring bins merged, from the lowest scores up,
//! until each holds at least k patients, so that no released number rests
//! on fewer than k patients whatever the model. Where bins are merged
//! depends on how many patients score where, never on their labels (a rule
//! that also asked for k positives would close a bin just as its k-th
//! positive came in, and so say that patient's label). Every metric is
//! computed from those merged bins alone: AUC with ties within a bin
//! counting half, accuracy with a bin that straddles 0.5 counting half,
//! Brier score and log loss with each patient's score taken as the middle
//! of their bin, and the calibration table is the merged bins. Merging
//! costs resolution where patients are few (the tails); AUC, where patients
//! are many, stays within about one bin's share of pairs of the exact one.
//!
//! An evaluation of a model the requester supplies (external validation)
//! is noised too, at each node before masking ([`EvaluationSums::noised`]):
//! [`NOISED_SCORE_BINS`] bins, each count with discrete noise. The merge
//! then reads noisy counts only, and clamps a merged bin's counts at 0.

use serde::{Deserialize, Serialize};

use crate::metrics::{self, CalibrationBin};
use crate::{Dataset, Error, Model};

/// Bins of predicted probability in the score histograms.
pub const SCORE_BINS: usize = 100;
/// Bins of predicted probability in an unreleased evaluation's
/// calibration table ([`EvaluationSums::metrics`]).
pub const CALIBRATION_BINS: usize = 10;
/// Bins of predicted probability in a noised evaluation
/// ([`EvaluationSums::noised`]): fewer, wider bins than [`SCORE_BINS`]
/// keep the noise of the merged bins small (each bin's noise adds up).
pub const NOISED_SCORE_BINS: usize = 20;

/// Counts that evaluate a model on some held-out rows; they add up across
/// nodes into the pooled evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationSums {
    pub rows: f64,
    pub positives: f64,
    /// Held-out positives and negatives per score bin.
    pub positive_scores: Vec<f64>,
    pub negative_scores: Vec<f64>,
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

/// Consecutive score bins `[from, to)` taken as one, with their counts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    from: usize,
    to: usize,
    positives: f64,
    negatives: f64,
}

impl Run {
    fn rows(&self) -> f64 {
        self.positives + self.negatives
    }

    fn lower(&self) -> f64 {
        self.from as f64 / SCORE_BINS as f64
    }

    fn upper(&self) -> f64 {
        self.to as f64 / SCORE_BINS as f64
    }

    /// The score every patient of the run is taken to have.
    fn middle(&self) -> f64 {
        (self.lower() + self.upper()) / 2.0
    }

    fn join(&mut self, next: &Run) {
        self.to = next.to;
        self.positives += next.positives;
        self.negatives += next.negatives;
    }
}

impl EvaluationSums {
    /// Length of [`Self::to_vec`].
    pub const LEN: usize = 2 + 2 * SCORE_BINS;

    /// Evaluates `model` on `data` (already standardised).
    pub fn of(model: &Model, data: &Dataset) -> Self {
        let scores = model.predict_all(data);
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
        EvaluationSums {
            rows: data.len() as f64,
            positives: positive_scores.iter().sum(),
            positive_scores,
            negative_scores,
        }
    }

    /// The flat vector that is summed.
    pub fn to_vec(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend([self.rows, self.positives]);
        out.extend(&self.positive_scores);
        out.extend(&self.negative_scores);
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
        let (head, rest) = v.split_at(2);
        let (positive_scores, negative_scores) = rest.split_at(SCORE_BINS);
        // Noised counts may be negative: they keep their sign, so that the
        // noise of a merged bin averages out ([`Self::disclosed`] clamps
        // the merged bins).
        let counts = |c: &[f64]| c.iter().map(|x| x.round()).collect();
        Ok(EvaluationSums {
            rows: head[0].round(),
            positives: head[1].round(),
            positive_scores: counts(positive_scores),
            negative_scores: counts(negative_scores),
        })
    }

    /// The sums in `bins` equal bins of predicted probability (a divisor
    /// of [`SCORE_BINS`]), each bin's count plus `noise()`: each bin's
    /// counts go to the last fine bin it covers, the others are 0, so the
    /// vector keeps its length and [`Self::disclosed`] merges whole bins.
    /// The totals are recomputed from the bins, so that one patient more
    /// or less moves one count by one (sensitivity 1 in L1 for the whole
    /// vector).
    pub fn noised(&self, bins: usize, mut noise: impl FnMut() -> f64) -> Self {
        assert!(
            bins > 0 && SCORE_BINS.is_multiple_of(bins),
            "{bins} does not divide {SCORE_BINS}"
        );
        let width = SCORE_BINS / bins;
        let mut coarse = |fine: &[f64]| {
            let mut out = vec![0.0; SCORE_BINS];
            for (group, chunk) in fine.chunks(width).enumerate() {
                out[group * width + width - 1] = chunk.iter().sum::<f64>() + noise();
            }
            out
        };
        let positive_scores = coarse(&self.positive_scores);
        let negative_scores = coarse(&self.negative_scores);
        let positives: f64 = positive_scores.iter().sum();
        EvaluationSums {
            rows: positives + negative_scores.iter().sum::<f64>(),
            positives,
            positive_scores,
            negative_scores,
        }
    }

    /// The score bins in runs of `width`.
    fn runs(&self, width: usize) -> Vec<Run> {
        (0..SCORE_BINS)
            .step_by(width)
            .map(|from| {
                let to = (from + width).min(SCORE_BINS);
                Run {
                    from,
                    to,
                    positives: self.positive_scores[from..to].iter().sum(),
                    negatives: self.negative_scores[from..to].iter().sum(),
                }
            })
            .collect()
    }

    /// The metrics at the full resolution of the histogram, for use where
    /// they were computed (a node's own rows, or tests): every score bin
    /// its own, the calibration table in [`CALIBRATION_BINS`] bins. Not for
    /// release: see [`Self::disclosed`].
    pub fn metrics(&self) -> Metrics {
        let fine = self.runs(1);
        let mut out = metrics_of(&fine);
        out.calibration = calibration(&self.runs(SCORE_BINS / CALIBRATION_BINS));
        out.expected_calibration_error = metrics::expected_calibration_error(&out.calibration);
        out
    }

    /// The metrics as they may leave where they were computed, every
    /// number resting on at least `k` patients (the module's rule): none
    /// unless the rows, the positives and the negatives each reach `k`.
    pub fn disclosed(&self, k: u64) -> Option<Metrics> {
        let k = k as f64;
        let fine = self.runs(1);
        // The totals as the bins hold them, whatever the header says.
        let positives: f64 = fine.iter().map(|r| r.positives).sum();
        let negatives: f64 = fine.iter().map(|r| r.negatives).sum();
        if positives < k || negatives < k {
            return None;
        }
        // Noised counts may be negative; a merged bin holds none fewer
        // than 0 (its total reached k before).
        let runs: Vec<Run> = merged(&fine, k)
            .into_iter()
            .map(|run| Run {
                positives: run.positives.max(0.0),
                negatives: run.negatives.max(0.0),
                ..run
            })
            .collect();
        let mut out = metrics_of(&runs);
        out.calibration = calibration(&runs);
        out.expected_calibration_error = metrics::expected_calibration_error(&out.calibration);
        Some(out)
    }
}

/// Whether a run may be released on its own: at least `k` patients.
/// Labels play no part (the module's rule).
fn releasable(run: &Run, k: f64) -> bool {
    run.rows() >= k
}

/// Merges consecutive runs, from the lowest scores up, until each is
/// releasable; a last run that is not joins the one before it (the whole
/// histogram is releasable when both classes reach `k`). No run is
/// left out, whose counts would be the totals less the others'.
fn merged(runs: &[Run], k: f64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut open: Option<Run> = None;
    for run in runs {
        let joined = match open.take() {
            None => *run,
            Some(mut open) => {
                open.join(run);
                open
            }
        };
        if releasable(&joined, k) {
            out.push(joined);
        } else {
            open = Some(joined);
        }
    }
    if let Some(mut rest) = open {
        while let Some(mut before) = out.pop() {
            before.join(&rest);
            rest = before;
            if releasable(&rest, k) {
                break;
            }
        }
        out.push(rest);
    }
    out
}

/// AUC from runs: a positive above a negative counts one, in the same run
/// half.
fn auc(runs: &[Run]) -> Option<f64> {
    let positives: f64 = runs.iter().map(|r| r.positives).sum();
    let negatives: f64 = runs.iter().map(|r| r.negatives).sum();
    if positives < 0.5 || negatives < 0.5 {
        return None;
    }
    let mut below = 0.0;
    let mut wins = 0.0;
    for run in runs {
        wins += run.positives * (below + 0.5 * run.negatives);
        below += run.negatives;
    }
    Some(wins / (positives * negatives))
}

/// The metrics read off `runs` alone (calibration left to the caller).
fn metrics_of(runs: &[Run]) -> Metrics {
    let rows: f64 = runs.iter().map(Run::rows).sum();
    let positives: f64 = runs.iter().map(|r| r.positives).sum();
    let per_row = |x: f64| if rows > 0.0 { x / rows } else { 0.0 };
    let half = SCORE_BINS / 2;
    let mut correct = 0.0;
    let mut brier = 0.0;
    let mut log_loss = 0.0;
    for run in runs {
        correct += if run.from >= half {
            run.positives
        } else if run.to <= half {
            run.negatives
        } else {
            run.rows() / 2.0
        };
        let p = run.middle();
        brier += run.positives * (1.0 - p).powi(2) + run.negatives * p.powi(2);
        log_loss -= run.positives * p.ln() + run.negatives * (1.0 - p).ln();
    }
    Metrics {
        rows: rows as u64,
        positives: positives as u64,
        auc: auc(runs),
        accuracy: per_row(correct),
        brier: per_row(brier),
        log_loss: per_row(log_loss),
        expected_calibration_error: 0.0,
        calibration: Vec::new(),
    }
}

/// Runs as a calibration table: each patient's predicted probability taken
/// as the middle of their run.
fn calibration(runs: &[Run]) -> Vec<CalibrationBin> {
    runs.iter()
        .map(|run| CalibrationBin {
            lower: run.lower(),
            upper: run.upper(),
            count: run.rows() as u64,
            predicted_sum: run.middle() * run.rows(),
            observed_sum: run.positives,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A dataset of `(features, label)` rows.
    pub(crate) fn data(rows: &[(&[f64], bool)]) -> Dataset {
        let mut d = Dataset::new(rows[0].0.len());
        for (r, y) in rows {
            d.push(r, *y).unwrap();
        }
        d
    }

    /// Held-out rows whose scores under the identity-like model below are
    /// `scores`, labelled `labels`.
    fn scored(scores: &[f64], labels: &[bool]) -> EvaluationSums {
        let mut sums = EvaluationSums {
            rows: 0.0,
            positives: 0.0,
            positive_scores: vec![0.0; SCORE_BINS],
            negative_scores: vec![0.0; SCORE_BINS],
        };
        for (s, y) in scores.iter().zip(labels) {
            sums.rows += 1.0;
            if *y {
                sums.positives += 1.0;
                sums.positive_scores[score_bin(*s)] += 1.0;
            } else {
                sums.negative_scores[score_bin(*s)] += 1.0;
            }
        }
        sums
    }

    #[test]
    fn histogram_metrics_match_exact_ones_and_sums_add_up() {
        let a = data(&[(&[0.1], false), (&[2.0], true), (&[0.5], true)]);
        let b = data(&[(&[-1.0], false), (&[1.5], false), (&[3.0], true)]);
        let model = Model {
            hidden: None,
            weights: vec![1.3],
            bias: -0.4,
        };
        let sa = EvaluationSums::of(&model, &a).to_vec();
        let sb = EvaluationSums::of(&model, &b).to_vec();
        assert_eq!(sa.len(), EvaluationSums::LEN);
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
        // Scores taken as their bin's middle: within half a bin.
        assert!((pooled.log_loss - model.log_loss(&all)).abs() < 5e-2);
        assert!((pooled.brier - metrics::brier(&scores, all.labels())).abs() < 1e-2);
        assert!((pooled.accuracy - metrics::accuracy(&scores, all.labels())).abs() < 1e-12);
        assert_eq!(pooled.calibration.len(), CALIBRATION_BINS);
        assert!(EvaluationSums::from_vec(&summed[1..]).is_err());
    }

    #[test]
    fn metrics_leave_only_when_both_classes_reach_k_and_from_bins_of_k() {
        let spread = |rows: usize, positives: usize| {
            let scores: Vec<f64> = (0..rows).map(|i| i as f64 / rows as f64).collect();
            let labels: Vec<bool> = (0..rows).map(|i| i < positives).collect();
            scored(&scores, &labels)
        };
        assert!(spread(100, 9).disclosed(10).is_none());
        assert!(spread(100, 91).disclosed(10).is_none());
        assert!(spread(9, 5).disclosed(10).is_none());
        let out = spread(100, 30).disclosed(20).unwrap();
        assert!(out.calibration.len() > 1);
        for bin in &out.calibration {
            assert!(bin.count >= 20, "{bin:?}");
        }
        assert_eq!(out.calibration.iter().map(|b| b.count).sum::<u64>(), 100);
        assert_eq!(out.calibration.first().unwrap().lower, 0.0);
        assert_eq!(out.calibration.last().unwrap().upper, 1.0);
        assert_eq!(
            out.expected_calibration_error,
            metrics::expected_calibration_error(&out.calibration)
        );
    }

    #[test]
    fn a_model_singling_out_one_patient_learns_nothing_of_their_label() {
        // The attack: a model scoring every held-out patient 0.5 but one
        // 0.99. With the exact log loss, everyone else's term is log 2
        // whatever the label, so the total gave that patient's label. Every
        // number released is the same whichever label they have.
        let mut scores = vec![0.5; 60];
        scores.push(0.99);
        let labels = |target: bool| {
            let mut l: Vec<bool> = (0..60).map(|i| i % 3 == 0).collect();
            l.push(target);
            l
        };
        // The other patients' labels balance the totals: the requester
        // knows the cohort's positives either way (one more or one fewer
        // of the others), so compare at equal totals.
        let positive = scored(&scores, &labels(true));
        let mut other = labels(false);
        let swap = other.iter().position(|y| !*y).unwrap();
        other[swap] = true;
        let negative = scored(&scores, &other);
        assert_eq!(positive.positives, negative.positives);
        let (a, b) = (
            positive.disclosed(10).unwrap(),
            negative.disclosed(10).unwrap(),
        );
        assert_eq!(a, b);
        // Without merging, the top bin's one patient showed the label.
        assert_ne!(positive.metrics(), negative.metrics());
    }

    #[test]
    fn where_bins_are_merged_says_nothing_of_labels() {
        // The same scores under any labels merge into the same bins.
        let scores: Vec<f64> = (0..200).map(|i| (i * i % 997) as f64 / 997.0).collect();
        let edges = |labels: &[bool]| -> Vec<(f64, f64)> {
            scored(&scores, labels)
                .disclosed(10)
                .unwrap()
                .calibration
                .iter()
                .map(|b| (b.lower, b.upper))
                .collect()
        };
        let a: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let b: Vec<bool> = (0..200).map(|i| i % 7 < 3).collect();
        let c: Vec<bool> = (0..200).map(|i| i >= 100).collect();
        assert_eq!(edges(&a), edges(&b));
        assert_eq!(edges(&a), edges(&c));
    }

    #[test]
    fn a_noised_evaluation_keeps_its_length_and_merges_whole_bins() {
        let scores: Vec<f64> = (0..300).map(|i| (i * i % 997) as f64 / 997.0).collect();
        let labels: Vec<bool> = (0..300).map(|i| i % 4 == 0).collect();
        let exact = scored(&scores, &labels);
        // Without noise: the counts per 0.05 of score, in each bin's last
        // fine bin, and the totals unchanged.
        let coarse = exact.noised(NOISED_SCORE_BINS, || 0.0);
        assert_eq!(coarse.to_vec().len(), EvaluationSums::LEN);
        assert_eq!(
            (coarse.rows, coarse.positives),
            (exact.rows, exact.positives)
        );
        for (i, (p, n)) in coarse
            .positive_scores
            .iter()
            .zip(&coarse.negative_scores)
            .enumerate()
        {
            if i % 5 != 4 {
                assert_eq!((*p, *n), (0.0, 0.0), "{i}");
            }
        }
        let group = |c: &[f64]| c[10..15].iter().sum::<f64>();
        assert_eq!(coarse.positive_scores[14], group(&exact.positive_scores));
        assert_eq!(coarse.negative_scores[14], group(&exact.negative_scores));
        // With noise (here +-3 in turn), the totals are the noised bins',
        // and negative counts survive the sum's round trip.
        let mut turn = 0.0;
        let noised = exact.noised(NOISED_SCORE_BINS, || {
            turn += 1.0;
            if turn % 2.0 == 0.0 { 3.0 } else { -3.0 }
        });
        assert_eq!(noised.rows, exact.rows);
        assert_eq!(noised.positives, exact.positives);
        let back = EvaluationSums::from_vec(&noised.to_vec()).unwrap();
        assert_eq!(back, noised);
        assert!(back.positive_scores.iter().any(|c| *c < 0.0));
        // Released: whole 0.05 bins, each of at least k, none negative.
        let released = back.disclosed(10).unwrap();
        for bin in &released.calibration {
            assert!(bin.count >= 10, "{bin:?}");
            assert!(bin.observed_sum >= 0.0, "{bin:?}");
            for edge in [bin.lower, bin.upper] {
                let twentieths = edge * 20.0;
                assert!((twentieths - twentieths.round()).abs() < 1e-9, "{bin:?}");
            }
        }
        assert_eq!(
            released.calibration.iter().map(|b| b.count).sum::<u64>(),
            released.rows
        );
    }

    #[test]
    fn a_noised_validation_of_a_demo_sized_federation_keeps_its_auc() {
        // Three nodes holding out 700 patients, 120 positive, scored by a
        // model of AUC about 0.84; each node noises its 40 counts at
        // epsilon 0.5 and the sum is merged at k = 10 (LINEAGE.md 3.4).
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(38);
        let nodes: Vec<EvaluationSums> = (0..3)
            .map(|_| {
                let (mut scores, mut labels) = (Vec::new(), Vec::new());
                for i in 0..233 {
                    let positive = i < 40;
                    let shift = if positive { 1.4 } else { 0.0 };
                    let z: f64 = rng.sample(rand_distr::StandardNormal);
                    scores.push(1.0 / (1.0 + (-(z + shift - 2.0)).exp()));
                    labels.push(positive);
                }
                scored(&scores, &labels)
            })
            .collect();
        let add = |parts: &[EvaluationSums]| {
            let mut sum = vec![0.0; EvaluationSums::LEN];
            for part in parts {
                for (s, x) in sum.iter_mut().zip(part.to_vec()) {
                    *s += x;
                }
            }
            EvaluationSums::from_vec(&sum).unwrap()
        };
        let exact = add(&nodes).disclosed(10).unwrap().auc.unwrap();
        assert!((exact - 0.84).abs() < 0.05, "{exact}");
        let errors: Vec<f64> = (0..300)
            .map(|_| {
                let noised: Vec<EvaluationSums> = nodes
                    .iter()
                    .map(|n| {
                        n.noised(NOISED_SCORE_BINS, || {
                            crate::noise::two_sided_geometric(0.5, &mut rng) as f64
                        })
                    })
                    .collect();
                add(&noised).disclosed(10).unwrap().auc.unwrap() - exact
            })
            .collect();
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        let sd =
            (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / errors.len() as f64).sqrt();
        eprintln!("AUC error at epsilon 0.5, 20 bins: {mean:+.3} +- {sd:.3}");
        assert!(mean.abs() < 0.04 && sd < 0.06, "{mean} +- {sd}");
    }

    #[test]
    fn auc_from_merged_bins_stays_near_the_exact_one() {
        // 2,000 patients with a smooth score distribution: the released
        // AUC is within 0.01 of the exact one.
        let n = 2000;
        let scores: Vec<f64> = (0..n).map(|i| (i as f64 + 0.5) / n as f64).collect();
        let labels: Vec<bool> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f64 / 1000.0 < scores[i])
            .collect();
        let as_f64: Vec<f64> = labels.iter().map(|y| f64::from(u8::from(*y))).collect();
        let exact = metrics::auc(&scores, &as_f64).unwrap();
        let released = scored(&scores, &labels).disclosed(10).unwrap();
        assert!(
            (released.auc.unwrap() - exact).abs() < 0.01,
            "{released:?} {exact}"
        );
    }
}
