//! Disclosure control: the only way raw counts become releasable results.
//!
//! Every cell whose count is below the node's minimum cell size is replaced
//! by a suppression marker before anything leaves the node, and enough other
//! cells are withheld with it that no suppressed cell can be worked out from
//! a row, column or table total (complementary suppression). The notes say,
//! in aggregate terms only, how many cells were withheld and why.

use ghx_study::query::{Analysis, QuerySpec};
use ghx_study::result::{AggregateResult, Cell, CellValue, Moments, RateCounts};

use crate::consent::eligibility::Summary;
use crate::engine::{Raw, RawCell};

/// What consent excluded, in aggregate form: totals over the whole node
/// (not the cohort), and any number below the minimum cell size shown only
/// as "fewer than" it.
pub fn consent_note(summary: &Summary, min_cell_size: u32) -> String {
    let shown = |n: u64| {
        if n > 0 && n < u64::from(min_cell_size) {
            format!("fewer than {min_cell_size}")
        } else {
            n.to_string()
        }
    };
    let total = summary.excluded_total();
    if total == 0 {
        return format!(
            "consent: none of {} patients excluded",
            shown(summary.patients)
        );
    }
    let reasons: Vec<String> = summary
        .excluded
        .iter()
        .map(|(why, n)| format!("{} {}", why.describe(), shown(*n)))
        .collect();
    format!(
        "consent: {} of {} patients excluded ({})",
        shown(total),
        shown(summary.patients),
        reasons.join("; ")
    )
}

/// What a requester needs to read the analysis's numbers right, in
/// aggregate terms: patients left out for lack of a value (shown as "fewer
/// than" below the minimum cell size) and how extremes are protected.
pub fn analysis_notes(
    spec: &QuerySpec,
    without_value: u64,
    min_cell_size: u32,
    noised: bool,
) -> Vec<String> {
    let mut notes = Vec::new();
    if matches!(
        spec.analysis,
        Analysis::Summary { .. } | Analysis::Histogram { .. }
    ) && without_value > 0
    {
        let shown = if without_value < u64::from(min_cell_size) {
            format!("fewer than {min_cell_size}")
        } else {
            without_value.to_string()
        };
        notes.push(format!(
            "values: {shown} patients of the cohort have no value of the variable and are not included"
        ));
    }
    if let Analysis::Summary { clip, .. } = &spec.analysis {
        if let Some(clip) = clip {
            notes.push(format!(
                "values: clipped to [{}, {}] before any statistic",
                clip.min, clip.max
            ));
        }
        if noised {
            notes.push("min and max: not released under noise".to_owned());
        } else {
            notes.push(format!(
                "min and max: the {min_cell_size}th smallest and largest value of each cell, so that at least {min_cell_size} patients share each side (not released for cells of fewer than {} patients)",
                2 * min_cell_size - 1
            ));
        }
    }
    notes
}

/// Why a released cell is withheld.
const PRIMARY: &str = "count below the minimum cell size";
const FEW_EVENTS: &str = "fewer events (or non-events) than the minimum cell size";
const COMPLEMENTARY: &str =
    "withheld to protect a suppressed cell in the same row, column or total";

/// A cell's value as it would be released, before suppression: exact, or
/// noised by [`crate::noise`].
#[derive(Debug, Clone, PartialEq)]
pub enum Candidate {
    Count(u64),
    Summary(Moments),
    Rate(RateCounts),
}

impl Candidate {
    fn patients(&self) -> u64 {
        match self {
            Candidate::Count(n) => *n,
            Candidate::Summary(m) => m.n,
            Candidate::Rate(r) => r.population,
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
                Candidate::Summary(m)
            }
        }
    }
}

/// Applies small-cell suppression to candidate values, then complementary
/// suppression so that no suppressed cell can be recovered by subtracting
/// released cells from a margin the requester could learn (the table total,
/// or any row or column total along any dimension, each of which another
/// query of the same cohort could ask for). A rate cell is also suppressed
/// when its events, or its patients without the event, are fewer than the
/// minimum cell size but not zero.
pub fn release(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    candidates: Vec<Candidate>,
    min_cell_size: u32,
) -> AggregateResult {
    let threshold = u64::from(min_cell_size);
    let total = raw.len();
    let small = |n: u64| n > 0 && n < threshold;
    let mut withheld: Vec<Option<&'static str>> = candidates
        .iter()
        .map(|c| match c {
            c if c.patients() < threshold => Some(PRIMARY),
            Candidate::Rate(r) if small(r.events) || small(r.population - r.events) => {
                Some(FEW_EVENTS)
            }
            _ => None,
        })
        .collect();
    let primary = withheld.iter().filter(|w| w.is_some()).count();
    let sizes: Vec<u64> = candidates.iter().map(Candidate::patients).collect();
    complementary_suppression(&raw, &sizes, &mut withheld);
    let complementary = withheld.iter().filter(|w| w.is_some()).count() - primary;
    let cells = raw
        .into_iter()
        .zip(candidates)
        .zip(&withheld)
        .map(|((cell, candidate), why)| Cell {
            key: cell.key,
            value: match why {
                Some(PRIMARY) => CellValue::Suppressed {
                    reason: format!("{PRIMARY} of {min_cell_size}"),
                },
                Some(reason) => CellValue::Suppressed {
                    reason: (*reason).to_owned(),
                },
                None => match candidate {
                    Candidate::Count(n) => CellValue::Count(n),
                    Candidate::Summary(m) => CellValue::Summary(m),
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
    if complementary > 0 {
        notes.push(format!(
            "{complementary} more cells {COMPLEMENTARY} (complementary suppression)"
        ));
    }
    AggregateResult {
        node_id: node_id.to_owned(),
        dimensions: spec.key_names(),
        cells,
        min_cell_size,
        notes,
        analysis: spec.kind().to_owned(),
        noise: None,
    }
}

/// The lines of a table a requester could learn the total of: the whole
/// table, and for each dimension every line along it (all cells sharing
/// the other dimensions' values). Each line is a list of cell indices.
fn lines(raw: &[RawCell]) -> Vec<Vec<usize>> {
    let dims = raw.first().map_or(0, |c| c.key.len());
    let mut lines = vec![(0..raw.len()).collect::<Vec<_>>()];
    if dims > 1 {
        for d in 0..dims {
            let mut by_rest: std::collections::BTreeMap<Vec<&str>, Vec<usize>> =
                std::collections::BTreeMap::new();
            for (i, cell) in raw.iter().enumerate() {
                let rest: Vec<&str> = cell
                    .key
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != d)
                    .map(|(_, k)| k.as_str())
                    .collect();
                by_rest.entry(rest).or_default().push(i);
            }
            lines.extend(by_rest.into_values());
        }
    }
    lines
}

/// Until no line holds exactly one withheld cell beside released ones,
/// withholds the smallest released cell of such a line. Cells that are not
/// in the table are zero and known to be so, so they protect nothing.
fn complementary_suppression(
    raw: &[RawCell],
    sizes: &[u64],
    withheld: &mut [Option<&'static str>],
) {
    let lines = lines(raw);
    loop {
        let mut changed = false;
        for line in &lines {
            let hidden = line.iter().filter(|i| withheld[**i].is_some()).count();
            if hidden != 1 || line.len() < 2 {
                continue;
            }
            let partner = line
                .iter()
                .copied()
                .filter(|i| withheld[*i].is_none())
                .min_by_key(|i| (sizes[*i], raw[*i].key.clone()));
            if let Some(partner) = partner {
                withheld[partner] = Some(COMPLEMENTARY);
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
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
    fn a_two_way_table_withholds_partners_in_each_row_and_column() {
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
        // female/50-59 (4) first needs a partner for the table total: the
        // smallest cell, male/40-49 (20). Each of the two then needs one in
        // its age-band column (male/50-59, female/40-49); now every row,
        // column and the total hold two withheld cells or none.
        assert_eq!(
            hidden,
            ["female/40-49", "female/50-59", "male/40-49", "male/50-59"]
        );
    }

    #[test]
    fn notes_say_how_many_lack_a_value_without_revealing_small_numbers() {
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
                 "analysis":{"kind":"summary","variable":{"kind":"age"},"clip":{"min":0,"max":100}}}"#,
        )
        .unwrap();
        let notes = analysis_notes(&spec, 3, 10, false);
        assert_eq!(
            notes[0],
            "values: fewer than 10 patients of the cohort have no value of the variable and are not included"
        );
        assert_eq!(notes[1], "values: clipped to [0, 100] before any statistic");
        assert!(notes[2].starts_with("min and max: the 10th smallest"));
        let notes = analysis_notes(&spec, 42, 10, true);
        assert!(notes[0].starts_with("values: 42 patients"));
        assert_eq!(notes[2], "min and max: not released under noise");
    }

    #[test]
    fn extremes_are_kth_values_and_withheld_when_they_would_cross() {
        let cell = |n: usize| RawCell {
            key: vec![],
            value: Raw::Values((1..=n).map(|v| v as f64).collect()),
        };
        let extremes = |n| match Candidate::exact(&cell(n), 10) {
            Candidate::Summary(m) => (m.min, m.max),
            other => panic!("{other:?}"),
        };
        assert_eq!(extremes(25), (Some(10.0), Some(16.0)));
        assert_eq!(extremes(20), (Some(10.0), Some(11.0)));
        assert_eq!(extremes(19), (Some(10.0), Some(10.0)));
        assert_eq!(extremes(18), (None, None));
        assert_eq!(extremes(3), (None, None));
    }

    proptest::proptest! {
        #[test]
        fn no_line_ever_holds_a_single_withheld_cell(
            counts in proptest::collection::vec(0u64..40, 1..=24),
            columns in 1usize..=6,
        ) {
            let spec = QuerySpec::parse(
                br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex","age_band"]}}"#,
            )
            .unwrap();
            // Zero cells are absent from a table, as the SQL leaves them out.
            let raw: Vec<RawCell> = counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| RawCell {
                    key: vec![format!("r{}", i / columns), format!("c{}", i % columns)],
                    value: Raw::Count(*n),
                })
                .collect();
            let result = exact_release(&spec, raw.clone(), 10);
            let hidden: Vec<bool> = result
                .cells
                .iter()
                .map(|c| matches!(c.value, CellValue::Suppressed { .. }))
                .collect();
            for (cell, hidden) in raw.iter().zip(&hidden) {
                // Every small cell is withheld; every released value is exact.
                if cell.value.patients() < 10 {
                    proptest::prop_assert!(*hidden);
                }
            }
            for (released, cell) in result.cells.iter().zip(&raw) {
                if let CellValue::Count(n) = released.value {
                    proptest::prop_assert_eq!(n, cell.value.patients());
                }
            }
            for line in lines(&raw) {
                let withheld = line.iter().filter(|i| hidden[**i]).count();
                proptest::prop_assert!(
                    !(withheld == 1 && line.len() >= 2),
                    "a line of {} cells holds exactly one withheld cell",
                    line.len()
                );
            }
        }
    }
}
