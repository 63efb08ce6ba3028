//! Disclosure control: the only way raw counts become releasable results.
//!
//! Every cell whose count is below the node's minimum cell size is replaced
//! by a suppression marker before anything leaves the node. The notes say, in
//! aggregate terms only, how many cells were withheld and why.

use ghx_study::query::QuerySpec;
use ghx_study::result::{AggregateResult, Cell, CellValue};

use crate::consent::eligibility::Summary;
use crate::engine::RawCell;

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

/// Applies small-cell suppression to raw counts.
pub fn release(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    min_cell_size: u32,
) -> AggregateResult {
    let threshold = u64::from(min_cell_size);
    let reason = format!("count below the minimum cell size of {min_cell_size}");
    let mut suppressed = 0usize;
    let total = raw.len();
    let cells = raw
        .into_iter()
        .map(|cell| Cell {
            key: cell.key,
            value: if cell.count < threshold {
                suppressed += 1;
                CellValue::Suppressed {
                    reason: reason.clone(),
                }
            } else {
                CellValue::Count(cell.count)
            },
        })
        .collect();
    let mut notes = Vec::new();
    if suppressed > 0 {
        notes.push(format!(
            "{suppressed} of {total} cells suppressed: {reason}"
        ));
    }
    AggregateResult {
        node_id: node_id.to_owned(),
        dimensions: spec
            .dimensions()
            .iter()
            .map(|d| d.name().to_owned())
            .collect(),
        cells,
        min_cell_size,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_below_the_threshold_are_suppressed_and_counted_in_notes() {
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex"]}}"#,
        )
        .unwrap();
        let raw = vec![
            RawCell {
                key: vec!["female".into()],
                count: 10,
            },
            RawCell {
                key: vec!["male".into()],
                count: 9,
            },
        ];
        let result = release("chosun", &spec, raw, 10);
        assert_eq!(result.cells[0].value, CellValue::Count(10));
        assert!(matches!(
            result.cells[1].value,
            CellValue::Suppressed { .. }
        ));
        assert_eq!(
            result.notes,
            ["1 of 2 cells suppressed: count below the minimum cell size of 10"]
        );
    }
}
