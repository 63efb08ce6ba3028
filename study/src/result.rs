//! Released aggregate results and their exact combination across nodes.
//!
//! Nodes release counts, sufficient statistics (count, mean and sum of
//! squared deviations, combined with Chan et al.'s parallel formula) and
//! histogram bin counts; every federated statistic is computed from those,
//! so it equals the same statistic computed on the pooled released data.

use std::collections::BTreeMap;

use crate::query::Bins;

/// One node's released answer. Every number in it has passed the node's
/// disclosure control.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AggregateResult {
    pub node_id: String,
    /// Names of the cell-key components.
    pub dimensions: Vec<String>,
    pub cells: Vec<Cell>,
    pub min_cell_size: u32,
    /// What was suppressed or noised and why, in aggregate terms only.
    pub notes: Vec<String>,
    /// The analysis kind: count, summary, histogram or rate.
    #[serde(default)]
    pub analysis: String,
    /// The noise the node added, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<NoiseStatement>,
}

impl AggregateResult {
    /// Hex SHA-256 of the result's JSON: what both the node and the
    /// coordinator record in their audit logs, so reconciliation can tell
    /// whether what arrived is what was released.
    pub fn digest(&self) -> String {
        crate::query::digest(&serde_json::to_vec(self).expect("a result always serialises"))
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    pub key: Vec<String>,
    pub value: CellValue,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CellValue {
    Count(u64),
    Suppressed { reason: String },
    Summary(Moments),
    Rate(RateCounts),
}

impl CellValue {
    /// The number of patients behind the value, if released.
    pub fn patients(&self) -> Option<u64> {
        match self {
            CellValue::Count(n) => Some(*n),
            CellValue::Summary(m) => Some(m.n),
            CellValue::Rate(r) => Some(r.population),
            CellValue::Suppressed { .. } => None,
        }
    }
}

/// Sufficient statistics of a numeric variable: enough to combine means and
/// variances exactly.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    /// The smallest value, when released (never under noise; see the node's
    /// release notes for how it is protected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Moments {
    pub const EMPTY: Moments = Moments {
        n: 0,
        mean: 0.0,
        m2: 0.0,
        min: None,
        max: None,
    };

    /// The moments of a set of values (Welford's algorithm).
    pub fn of(values: &[f64]) -> Moments {
        let mut m = Moments::EMPTY;
        for &x in values {
            m.n += 1;
            let delta = x - m.mean;
            m.mean += delta / m.n as f64;
            m.m2 += delta * (x - m.mean);
            m.min = Some(m.min.map_or(x, |v| v.min(x)));
            m.max = Some(m.max.map_or(x, |v| v.max(x)));
        }
        m
    }

    /// The moments of the union of two disjoint sets (Chan et al.).
    pub fn merge(&self, other: &Moments) -> Moments {
        if other.n == 0 {
            return *self;
        }
        if self.n == 0 {
            return *other;
        }
        let (na, nb) = (self.n as f64, other.n as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        let both = |a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64| match (a, b) {
            (Some(a), Some(b)) => Some(f(a, b)),
            _ => None,
        };
        Moments {
            n: self.n + other.n,
            mean: self.mean + delta * nb / n,
            m2: self.m2 + other.m2 + delta * delta * na * nb / n,
            min: both(self.min, other.min, f64::min),
            max: both(self.max, other.max, f64::max),
        }
    }

    /// Sample standard deviation (n - 1 in the denominator).
    pub fn sd(&self) -> Option<f64> {
        (self.n > 1).then(|| (self.m2.max(0.0) / (self.n - 1) as f64).sqrt())
    }
}

/// The two counts of a crude rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateCounts {
    /// Patients of the cohort with the event.
    pub events: u64,
    /// Patients of the cohort.
    pub population: u64,
}

impl RateCounts {
    /// Events per `per` patients.
    pub fn rate(&self, per: u32) -> Option<f64> {
        (self.population > 0).then(|| self.events as f64 * f64::from(per) / self.population as f64)
    }
}

/// The noise a node added before release.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseStatement {
    pub mechanism: String,
    pub epsilon: f64,
    pub delta: f64,
    /// Sensitivities and scales, in words.
    pub detail: String,
}

/// A node that did not contribute, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFailure {
    pub node_id: String,
    pub reason: String,
}

/// A cell of the federated total.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TotalCell {
    pub key: Vec<String>,
    /// Patients in the released parts of the cell: the count of a count or
    /// histogram cell, `n` of a summary, the population of a rate.
    pub count: u64,
    /// Nodes whose part of this cell was suppressed and so is not in it.
    pub suppressed_at: Vec<String>,
    /// The combined moments of a summary cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Moments>,
    /// The combined counts of a rate cell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateCounts>,
    /// A pooled cell disclosure control withheld, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<String>,
}

/// Combines released cells key by key, keeping track of which nodes withheld
/// a part of each cell. Cells are ordered by key.
pub fn combine(results: &[AggregateResult]) -> Vec<TotalCell> {
    let mut totals: BTreeMap<&[String], TotalCell> = BTreeMap::new();
    for result in results {
        for cell in &result.cells {
            let total = totals.entry(&cell.key).or_insert_with(|| TotalCell {
                key: cell.key.clone(),
                count: 0,
                suppressed_at: Vec::new(),
                summary: None,
                rate: None,
                withheld: None,
            });
            match &cell.value {
                CellValue::Count(n) => total.count += n,
                CellValue::Suppressed { .. } => total.suppressed_at.push(result.node_id.clone()),
                CellValue::Summary(m) => {
                    total.count += m.n;
                    total.summary = Some(total.summary.unwrap_or(Moments::EMPTY).merge(m));
                }
                CellValue::Rate(r) => {
                    total.count += r.population;
                    let sum = total.rate.get_or_insert(RateCounts {
                        events: 0,
                        population: 0,
                    });
                    sum.events += r.events;
                    sum.population += r.population;
                }
            }
        }
    }
    totals.into_values().collect()
}

/// A quantile estimated from a (combined) histogram.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantile {
    /// The group (cell key without the bin).
    pub group: Vec<String>,
    pub q: f64,
    /// Linear interpolation inside the bin holding the quantile; `None` when
    /// that is the open underflow or overflow bin, or the group is empty.
    pub value: Option<f64>,
    /// Some bin of the group was withheld somewhere, so the estimate leaves
    /// those patients out.
    pub partial: bool,
}

/// Quantiles of every group of a histogram whose cell keys end in the bin
/// label. Computed from bin counts only, so the quantile of a combined
/// histogram is the quantile of the pooled histogram.
pub fn histogram_quantiles(totals: &[TotalCell], bins: &Bins, qs: &[f64]) -> Vec<Quantile> {
    let mut groups: BTreeMap<Vec<String>, (Vec<u64>, bool)> = BTreeMap::new();
    for cell in totals {
        let Some((bin_label, group)) = cell.key.split_last() else {
            continue;
        };
        let Some(index) = bins.index_of(bin_label) else {
            continue;
        };
        let entry = groups
            .entry(group.to_vec())
            .or_insert_with(|| (vec![0; bins.count as usize + 2], false));
        entry.0[index] += cell.count;
        entry.1 |= !cell.suppressed_at.is_empty();
    }
    let mut out = Vec::new();
    for (group, (counts, partial)) in groups {
        for &q in qs {
            out.push(Quantile {
                group: group.clone(),
                q,
                value: quantile_of_counts(&counts, bins, q),
                partial,
            });
        }
    }
    out
}

/// The q-quantile of binned counts, interpolating linearly inside its bin.
pub fn quantile_of_counts(counts: &[u64], bins: &Bins, q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= target {
            let (lo, hi) = bins.bounds(i);
            if lo.is_infinite() || hi.is_infinite() {
                return None;
            }
            let within = (target - below as f64) / c as f64;
            return Some(lo + within.clamp(0.0, 1.0) * (hi - lo));
        }
        below += c;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn result(node: &str, cells: &[(&str, Option<u64>)]) -> AggregateResult {
        AggregateResult {
            node_id: node.into(),
            dimensions: vec!["sex".into()],
            cells: cells
                .iter()
                .map(|(k, v)| Cell {
                    key: vec![(*k).into()],
                    value: match v {
                        Some(n) => CellValue::Count(*n),
                        None => CellValue::Suppressed {
                            reason: "small".into(),
                        },
                    },
                })
                .collect(),
            min_cell_size: 10,
            notes: vec![],
            analysis: "count".into(),
            noise: None,
        }
    }

    #[test]
    fn sums_released_counts_and_names_suppressing_nodes() {
        let total = combine(&[
            result("a", &[("female", Some(12)), ("male", None)]),
            result("b", &[("female", Some(30)), ("male", Some(15))]),
        ]);
        assert_eq!(
            total,
            vec![
                TotalCell {
                    key: vec!["female".into()],
                    count: 42,
                    suppressed_at: vec![],
                    summary: None,
                    rate: None,
                    withheld: None,
                },
                TotalCell {
                    key: vec!["male".into()],
                    count: 15,
                    suppressed_at: vec!["a".into()],
                    summary: None,
                    rate: None,
                    withheld: None,
                },
            ]
        );
    }

    proptest! {
        /// Splitting the same cells across any number of nodes never changes
        /// the federated total: it equals the pooled sum.
        #[test]
        fn federated_total_equals_pooled_sum(
            counts in proptest::collection::vec((0usize..4, 0u64..1000), 0..40),
            nodes in 1usize..5,
        ) {
            let keys = ["a", "b", "c", "d"];
            let mut per_node: Vec<AggregateResult> = (0..nodes)
                .map(|i| AggregateResult { node_id: format!("n{i}"), dimensions: vec![], cells: vec![], min_cell_size: 0, notes: vec![], analysis: "count".into(), noise: None })
                .collect();
            let mut pooled = [0u64; 4];
            for (i, (k, n)) in counts.iter().enumerate() {
                pooled[*k] += n;
                per_node[i % nodes].cells.push(Cell { key: vec![keys[*k].into()], value: CellValue::Count(*n) });
            }
            let total = combine(&per_node);
            for cell in total {
                let k = keys.iter().position(|k| *k == cell.key[0]).unwrap();
                prop_assert_eq!(cell.count, pooled[k]);
            }
        }

        /// Mean, standard deviation, minimum and maximum combined from any
        /// partition of the values across nodes equal the pooled ones.
        #[test]
        fn federated_moments_equal_pooled(
            values in proptest::collection::vec(-500.0f64..500.0, 0..200),
            assignment in proptest::collection::vec(0usize..4, 200),
        ) {
            let mut parts: Vec<Vec<f64>> = vec![Vec::new(); 4];
            for (v, node) in values.iter().zip(&assignment) {
                parts[*node].push(*v);
            }
            let results: Vec<AggregateResult> = parts.iter().enumerate().map(|(i, part)| AggregateResult {
                node_id: format!("n{i}"), dimensions: vec![], min_cell_size: 0, notes: vec![],
                analysis: "summary".into(), noise: None,
                cells: vec![Cell { key: vec![], value: CellValue::Summary(Moments::of(part)) }],
            }).collect();
            let total = combine(&results);
            let pooled = Moments::of(&values);
            let combined = total[0].summary.unwrap();
            prop_assert_eq!(combined.n, pooled.n);
            prop_assert_eq!(total[0].count, values.len() as u64);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()));
            prop_assert!(close(combined.mean, pooled.mean), "{} vs {}", combined.mean, pooled.mean);
            prop_assert!(close(combined.m2, pooled.m2), "{} vs {}", combined.m2, pooled.m2);
            match (combined.sd(), pooled.sd()) {
                (Some(a), Some(b)) => prop_assert!(close(a, b)),
                (a, b) => prop_assert_eq!(a, b),
            }
            prop_assert_eq!(combined.min, pooled.min);
            prop_assert_eq!(combined.max, pooled.max);
        }

        /// Quantiles read off the combined histogram equal those of the
        /// pooled histogram, and lie in the bin of the true quantile.
        #[test]
        fn federated_histogram_quantiles_equal_pooled(
            values in proptest::collection::vec(0.0f64..300.0, 1..300),
            assignment in proptest::collection::vec(0usize..3, 300),
            q in 0.01f64..0.99,
        ) {
            let bins = Bins { start: 0.0, width: 10.0, count: 30 };
            let histogram = |vals: &[f64]| {
                let mut counts = vec![0u64; bins.count as usize + 2];
                for v in vals { counts[bins.index(*v)] += 1; }
                counts
            };
            let mut parts: Vec<Vec<f64>> = vec![Vec::new(); 3];
            for (v, node) in values.iter().zip(&assignment) {
                parts[*node].push(*v);
            }
            let results: Vec<AggregateResult> = parts.iter().enumerate().map(|(i, part)| AggregateResult {
                node_id: format!("n{i}"), dimensions: vec!["bin".into()], min_cell_size: 0, notes: vec![],
                analysis: "histogram".into(), noise: None,
                cells: histogram(part).into_iter().enumerate()
                    .map(|(b, n)| Cell { key: vec![bins.label(b)], value: CellValue::Count(n) })
                    .collect(),
            }).collect();
            let federated = histogram_quantiles(&combine(&results), &bins, &[q]);
            let pooled = quantile_of_counts(&histogram(&values), &bins, q);
            prop_assert_eq!(federated.len(), 1);
            prop_assert_eq!(federated[0].value, pooled);
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            let truth = sorted[rank];
            let estimate = pooled.unwrap();
            prop_assert!((estimate - truth).abs() <= bins.width, "{estimate} vs {truth}");
        }
    }
}
