//! Evaluation of a binary classifier's scores against labels: AUC,
//! accuracy, Brier score and calibration by risk decile.

use serde::{Deserialize, Serialize};

/// Area under the ROC curve: the probability that a random positive scores
/// above a random negative, ties counting half (Mann-Whitney U). None when
/// either class is absent.
pub fn auc(scores: &[f64], labels: &[f64]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&y| y > 0.5).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Sum of positives' (average) ranks, 1-based.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&k| labels[k] > 0.5).count() as f64 * average_rank;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Share of rows classified right at the threshold 0.5.
pub fn accuracy(scores: &[f64], labels: &[f64]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let right = scores
        .iter()
        .zip(labels)
        .filter(|(s, y)| (**s >= 0.5) == (**y > 0.5))
        .count();
    right as f64 / scores.len() as f64
}

/// Mean squared difference between predicted probability and outcome.
pub fn brier(scores: &[f64], labels: &[f64]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores
        .iter()
        .zip(labels)
        .map(|(s, y)| (s - y) * (s - y))
        .sum::<f64>()
        / scores.len() as f64
}

/// One bin of predicted risk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    /// Predicted probabilities in [lower, upper).
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    /// Sums, so bins from several hospitals add up.
    pub predicted_sum: f64,
    pub observed_sum: f64,
}

impl CalibrationBin {
    pub fn mean_predicted(&self) -> Option<f64> {
        (self.count > 0).then(|| self.predicted_sum / self.count as f64)
    }

    pub fn observed_rate(&self) -> Option<f64> {
        (self.count > 0).then(|| self.observed_sum / self.count as f64)
    }
}

/// Calibration in `bins` equal-width bins of predicted probability; bins
/// of different nodes with the same edges can be added ([`merge`]).
pub fn calibration(scores: &[f64], labels: &[f64], bins: usize) -> Vec<CalibrationBin> {
    let bins = bins.max(1);
    let mut out: Vec<CalibrationBin> = (0..bins)
        .map(|b| CalibrationBin {
            lower: b as f64 / bins as f64,
            upper: (b + 1) as f64 / bins as f64,
            count: 0,
            predicted_sum: 0.0,
            observed_sum: 0.0,
        })
        .collect();
    for (s, y) in scores.iter().zip(labels) {
        let b = ((s * bins as f64) as usize).min(bins - 1);
        out[b].count += 1;
        out[b].predicted_sum += s;
        out[b].observed_sum += y;
    }
    out
}

/// Adds calibration tables with the same bins.
pub fn merge(tables: &[Vec<CalibrationBin>]) -> Vec<CalibrationBin> {
    let mut out = tables.first().cloned().unwrap_or_default();
    for table in tables.iter().skip(1) {
        for (o, b) in out.iter_mut().zip(table) {
            o.count += b.count;
            o.predicted_sum += b.predicted_sum;
            o.observed_sum += b.observed_sum;
        }
    }
    out
}

/// Expected calibration error: the count-weighted mean gap between mean
/// predicted probability and observed rate over bins.
pub fn expected_calibration_error(bins: &[CalibrationBin]) -> f64 {
    let total: u64 = bins.iter().map(|b| b.count).sum();
    if total == 0 {
        return 0.0;
    }
    bins.iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.predicted_sum - b.observed_sum).abs())
        .sum::<f64>()
        / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AUC by comparing every positive with every negative.
    fn auc_by_pairs(scores: &[f64], labels: &[f64]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, si) in scores.iter().enumerate() {
            for (j, sj) in scores.iter().enumerate() {
                if labels[i] > 0.5 && labels[j] < 0.5 {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auc_of_known_orderings() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), Some(0.5));
        assert_eq!(auc(&[0.5, 0.7], &[1.0, 1.0]), None);
    }

    proptest::proptest! {
        #[test]
        fn auc_equals_the_pairwise_definition(
            rows in proptest::collection::vec((0u8..20, proptest::bool::ANY), 2..60)
        ) {
            let scores: Vec<f64> = rows.iter().map(|(s, _)| f64::from(*s) / 20.0).collect();
            let labels: Vec<f64> = rows.iter().map(|(_, y)| if *y { 1.0 } else { 0.0 }).collect();
            match auc(&scores, &labels) {
                Some(a) => proptest::prop_assert!((a - auc_by_pairs(&scores, &labels)).abs() < 1e-12),
                None => proptest::prop_assert!(labels.iter().all(|&y| y == labels[0])),
            }
        }
    }

    #[test]
    fn calibration_bins_add_up_across_nodes() {
        let a = calibration(&[0.05, 0.15, 0.95], &[0.0, 1.0, 1.0], 10);
        let b = calibration(&[0.12, 0.91], &[0.0, 0.0], 10);
        let both = calibration(
            &[0.05, 0.15, 0.95, 0.12, 0.91],
            &[0.0, 1.0, 1.0, 0.0, 0.0],
            10,
        );
        assert_eq!(merge(&[a, b]), both);
        assert_eq!(both[1].count, 2);
        assert_eq!(both[1].observed_rate(), Some(0.5));
        // Bins 0 (0.05 vs 0), 1 (0.27 vs 1) and 9 (1.86 vs 1).
        let ece = expected_calibration_error(&both);
        assert!((ece - (0.05 + 0.73 + 0.86) / 5.0).abs() < 1e-12, "{ece}");
        assert_eq!(accuracy(&[0.6, 0.4, 0.7], &[1.0, 1.0, 0.0]), 1.0 / 3.0);
        assert!((brier(&[1.0, 0.0], &[1.0, 1.0]) - 0.5).abs() < 1e-12);
    }
}
