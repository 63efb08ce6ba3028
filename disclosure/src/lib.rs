//! Disclosure control shared by the node and the coordinator: the only
//! way raw numbers become releasable cells.
//!
//! Every cell whose count is below the minimum cell size is replaced by a
//! suppression marker, and enough other cells are withheld with it that
//! the released cells, with what every coarser grouping of the same cohort
//! releases, tell a requester no more of a small count than those
//! groupings alone would (secondary suppression: [`groupings`] works out
//! the coarser releases, [`protection`] audits one table by linear
//! programming). A node applies it to its own table; the coordinator to a
//! pooled table ([`pooled`]), the federation's noisy sum, which no node
//! sees. The notes say, in aggregate terms only, how many cells were
//! withheld and why.

use ghx_study::query::{Analysis, QuerySpec};
use ghx_study::result::{AggregateResult, Cell, CellValue, Moments, RateCounts};
use protection::{Audit, Counts, Status};

mod groupings;
pub mod linkage;
pub mod pooled;
mod protection;

/// A group and its raw, unreleased value.
#[derive(Debug, Clone, PartialEq)]
pub struct RawCell {
    /// One value per cell-key component, in the query's order.
    pub key: Vec<String>,
    pub value: Raw,
}

/// A raw cell value.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// Patients in the cell.
    Count(u64),
    /// The variable's values of the cell's patients, sorted ascending and
    /// clamped into the clip range when the query gives one.
    Values(Vec<f64>),
    /// Patients with the event, and patients.
    Rate { events: u64, population: u64 },
}

impl Raw {
    /// The number of patients behind the value.
    pub fn patients(&self) -> u64 {
        match self {
            Raw::Count(n) | Raw::Rate { population: n, .. } => *n,
            Raw::Values(v) => v.len() as u64,
        }
    }
}

/// Whether a result's values are exact or noised: a noised result carries
/// no exact number of patients anywhere, notes included, since an exact
/// count beside noised cells is what the noise was meant to hide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    Exact,
    Noised,
}

impl Values {
    pub fn of(spec: &QuerySpec) -> Values {
        match spec.noise {
            Some(_) => Values::Noised,
            None => Values::Exact,
        }
    }
}

/// Why a released cell is withheld.
const PRIMARY: &str = "count below the minimum cell size";
const FEW_EVENTS: &str = "fewer events (or non-events) than the minimum cell size";
const FEW_VALUES: &str = "fewer patients with (or without) a value than the minimum cell size";
const COMPLEMENTARY: &str =
    "withheld to protect a suppressed cell in the same row, column or total";

/// A cell's value as it would be released, before suppression: exact, or
/// noised (by the node's noise, or a pooled sum).
#[derive(Debug, Clone, PartialEq)]
pub enum Candidate {
    Count(u64),
    /// A summary, and the cell's patients without a value when exact
    /// ([`Candidate::lacking`]): then the cell is held, like a rate, to
    /// k or more (or none) on each side, since a count of the same cell
    /// less its n would give those without a value.
    Summary(Moments, Option<u64>),
    Rate(RateCounts),
}

impl Candidate {
    fn patients(&self) -> u64 {
        match self {
            Candidate::Count(n) => *n,
            Candidate::Summary(m, lacking) => m.n + lacking.unwrap_or(0),
            Candidate::Rate(r) => r.population,
        }
    }

    /// The additive counts a requester could learn line totals of.
    fn counts(&self) -> Counts {
        Counts {
            patients: self.patients(),
            events: match self {
                Candidate::Rate(r) => Some(r.events),
                Candidate::Summary(m, Some(_)) => Some(m.n),
                _ => None,
            },
        }
    }

    /// A summary candidate told how many of its cell's patients have no
    /// value; anything else as it is.
    pub fn lacking(self, lacking: u64) -> Candidate {
        match self {
            Candidate::Summary(m, _) => Candidate::Summary(m, Some(lacking)),
            other => other,
        }
    }

    /// The exact values of raw cells. A summary's minimum and maximum are
    /// the k-th smallest and largest value (k = the minimum cell size), so
    /// that at least k patients share each side of them: never one
    /// patient's own extreme value.
    pub fn exact(raw: &RawCell, min_cell_size: u32) -> Candidate {
        match &raw.value {
            Raw::Count(n) => Candidate::Count(*n),
            Raw::Rate { events, population } => Candidate::Rate(RateCounts {
                events: *events,
                population: *population,
            }),
            Raw::Values(sorted) => {
                let mut m = Moments::of(sorted);
                let k = min_cell_size.max(1) as usize;
                // With fewer than 2k - 1 values the k-th smallest and the
                // k-th largest cross; then neither is released.
                let (lo, hi) = match sorted.len().checked_sub(k) {
                    Some(i) if i + 1 >= k => (sorted.get(k - 1), sorted.get(i)),
                    _ => (None, None),
                };
                m.min = lo.copied();
                m.max = hi.copied();
                Candidate::Summary(m, None)
            }
        }
    }
}

/// Applies small-cell suppression to candidate values, then secondary
/// suppression audited by linear programming ([`protection`]) so that
/// nothing released about the table (its cells, and every row, column or
/// table total another query of the same cohort could ask for) narrows what
/// a requester can know of a suppressed cell. A rate cell is also
/// suppressed when its events, or its patients without the event, are
/// fewer than the minimum cell size but not zero; so is an exact summary's
/// cell whose patients with a value, or without one, are
/// ([`Candidate::lacking`]).
pub fn release(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    candidates: Vec<Candidate>,
    min_cell_size: u32,
) -> AggregateResult {
    release_with_lines(node_id, spec, raw, candidates, min_cell_size).0
}

/// [`release`], and the line totals (lists of the table's cells, by index)
/// the node would release of the table's coarser groupings if asked: with
/// the released cells, what differencing records of the table
/// (the node's differencing of cells).
pub fn release_with_lines(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    candidates: Vec<Candidate>,
    min_cell_size: u32,
) -> (AggregateResult, Vec<Vec<usize>>) {
    let threshold = u64::from(min_cell_size);
    let total = raw.len();
    let mut status: Vec<Status> = candidates
        .iter()
        .map(|c| c.counts().primary(threshold))
        .collect();
    let primary = status.iter().filter(|s| **s == Status::Small).count();
    let one_sided = status.iter().filter(|s| **s == Status::FewEvents).count();
    let counts: Vec<Counts> = candidates.iter().map(Candidate::counts).collect();
    let (audit, lines) = protect_canonically(spec, &raw, &counts, &mut status, threshold);
    let complementary = status.iter().filter(|s| **s == Status::Protecting).count();
    let cells = raw
        .into_iter()
        .zip(candidates)
        .zip(&status)
        .map(|((cell, candidate), status)| Cell {
            key: cell.key,
            value: match status {
                Status::Small => CellValue::Suppressed {
                    reason: format!("{PRIMARY} of {min_cell_size}"),
                },
                Status::FewEvents => CellValue::Suppressed {
                    reason: match spec.analysis {
                        Analysis::Summary { .. } => FEW_VALUES,
                        _ => FEW_EVENTS,
                    }
                    .to_owned(),
                },
                Status::Protecting => CellValue::Suppressed {
                    reason: COMPLEMENTARY.to_owned(),
                },
                Status::Released => match candidate {
                    Candidate::Count(n) => CellValue::Count(n),
                    Candidate::Summary(m, _) => CellValue::Summary(m),
                    Candidate::Rate(r) => CellValue::Rate(r),
                },
            },
        })
        .collect();
    let mut notes = Vec::new();
    if primary > 0 {
        notes.push(format!(
            "{primary} of {total} cells suppressed: {PRIMARY} of {min_cell_size}"
        ));
    }
    if one_sided > 0 {
        let reason = match spec.analysis {
            Analysis::Summary { .. } => FEW_VALUES,
            _ => FEW_EVENTS,
        };
        notes.push(format!("{one_sided} of {total} cells suppressed: {reason}"));
    }
    if complementary > 0 {
        notes.push(format!(
            "{complementary} more cells {COMPLEMENTARY} (complementary suppression)"
        ));
    }
    if audit == Audit::TooLarge {
        notes.push(
            "every cell withheld: this table has too many small cells for disclosure control to show each one protected; coarsen its grouping or bins".to_owned()
        );
    }
    let result = AggregateResult {
        node_id: node_id.to_owned(),
        dimensions: spec.key_names(),
        cells,
        min_cell_size,
        notes,
        analysis: spec.kind().to_owned(),
        noise: None,
    };
    (result, lines)
}

/// Runs [`groupings::protect_with_lines`] over the table in a canonical form, so that
/// the same table asked another way (dimensions in another order,
/// diagnosis groups listed in another order or under other labels) gets
/// the same suppression: otherwise two patterns of one table could be
/// combined. Dimensions are taken in order of name, and each cell is keyed
/// by what it holds (a diagnosis group by its system, match and sorted
/// codes, not its label) and visited in that key's order.
fn protect_canonically(
    spec: &QuerySpec,
    raw: &[RawCell],
    counts: &[Counts],
    status: &mut [Status],
    threshold: u64,
) -> (Audit, Vec<Vec<usize>>) {
    let names = spec.key_names();
    let mut dims: Vec<usize> = (0..names.len()).collect();
    dims.sort_by(|a, b| names[*a].cmp(&names[*b]));
    let groups: std::collections::BTreeMap<&str, String> = spec
        .dimensions()
        .iter()
        .filter_map(|d| match d {
            ghx_study::query::Dimension::Diagnosis { diagnosis } => Some(diagnosis),
            _ => None,
        })
        .flatten()
        .map(|g| {
            let mut codes = g.codes.clone();
            codes.sort();
            let canonical = format!("{}|{:?}|{}", g.system, g.matching, codes.join(","));
            (g.label.as_str(), canonical)
        })
        .collect();
    let canonical = |key: &[String]| -> Vec<String> {
        dims.iter()
            .map(|d| {
                let value = &key[*d];
                match (names[*d].as_str(), groups.get(value.as_str())) {
                    ("diagnosis", Some(canonical)) => canonical.clone(),
                    _ => value.clone(),
                }
            })
            .collect()
    };
    let keys: Vec<Vec<String>> = raw.iter().map(|c| canonical(&c.key)).collect();
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    let sorted_keys: Vec<&[String]> = order.iter().map(|i| keys[*i].as_slice()).collect();
    let sorted_counts: Vec<Counts> = order.iter().map(|i| counts[*i]).collect();
    let mut sorted_status: Vec<Status> = order.iter().map(|i| status[*i]).collect();
    let (audit, lines) = groupings::protect_with_lines(
        &sorted_keys,
        &sorted_counts,
        &mut sorted_status,
        threshold,
        Values::of(spec),
    );
    for (position, i) in order.iter().enumerate() {
        status[*i] = sorted_status[position];
    }
    let lines = lines
        .into_iter()
        .map(|cells| cells.into_iter().map(|position| order[position]).collect())
        .collect();
    (audit, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(key: &[&str], count: u64) -> RawCell {
        RawCell {
            key: key.iter().map(|k| (*k).to_owned()).collect(),
            value: Raw::Count(count),
        }
    }

    fn exact_release(spec: &QuerySpec, raw: Vec<RawCell>, min_cell_size: u32) -> AggregateResult {
        let candidates = raw
            .iter()
            .map(|c| Candidate::exact(c, min_cell_size))
            .collect();
        release("chosun", spec, raw, candidates, min_cell_size)
    }

    #[test]
    fn cells_below_the_threshold_are_suppressed_and_counted_in_notes() {
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex"]}}"#,
        )
        .unwrap();
        let raw = vec![cell(&["female"], 10), cell(&["male"], 9)];
        let result = exact_release(&spec, raw, 10);
        assert!(matches!(
            result.cells[1].value,
            CellValue::Suppressed { .. }
        ));
        // The total of a one-dimensional table is a margin: with one cell
        // hidden, the other must be hidden too.
        assert!(matches!(
            result.cells[0].value,
            CellValue::Suppressed { .. }
        ));
        assert_eq!(
            result.notes,
            [
                "1 of 2 cells suppressed: count below the minimum cell size of 10",
                "1 more cells withheld to protect a suppressed cell in the same row, column or total (complementary suppression)"
            ]
        );
    }

    #[test]
    fn a_two_way_table_withholds_a_rectangle_whose_partners_can_hide_the_small_cell() {
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex","age_band"]}}"#,
        )
        .unwrap();
        let raw = vec![
            cell(&["female", "40-49"], 30),
            cell(&["female", "50-59"], 4),
            cell(&["female", "60-69"], 25),
            cell(&["male", "40-49"], 20),
            cell(&["male", "50-59"], 40),
            cell(&["male", "60-69"], 50),
        ];
        let result = exact_release(&spec, raw, 10);
        let hidden: Vec<String> = result
            .cells
            .iter()
            .filter(|c| matches!(c.value, CellValue::Suppressed { .. }))
            .map(|c| c.key.join("/"))
            .collect();
        // female/50-59 (4) takes a partner of at least 2k - 1 = 19 in its
        // row (25, not 30) and in its column (40); then 60-69 needs one
        // more (male, 50). Moving patients around that rectangle, the small
        // cell can be anything from 1 to 9 for all the totals say.
        assert_eq!(
            hidden,
            ["female/50-59", "female/60-69", "male/50-59", "male/60-69"]
        );
    }

    #[test]
    fn extremes_are_kth_values_and_withheld_when_they_would_cross() {
        let cell = |n: usize| RawCell {
            key: vec![],
            value: Raw::Values((1..=n).map(|v| v as f64).collect()),
        };
        let extremes = |n| match Candidate::exact(&cell(n), 10) {
            Candidate::Summary(m, _) => (m.min, m.max),
            other => panic!("{other:?}"),
        };
        assert_eq!(extremes(25), (Some(10.0), Some(16.0)));
        assert_eq!(extremes(20), (Some(10.0), Some(11.0)));
        assert_eq!(extremes(19), (Some(10.0), Some(10.0)));
        assert_eq!(extremes(18), (None, None));
        assert_eq!(extremes(3), (None, None));
    }
}
