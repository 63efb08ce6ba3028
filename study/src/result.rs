//! Released aggregate results and their combination across nodes.

use std::collections::BTreeMap;

/// One node's released answer. Every count in it has passed the node's
/// disclosure control.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AggregateResult {
    pub node_id: String,
    pub dimensions: Vec<String>,
    pub cells: Vec<Cell>,
    pub min_cell_size: u32,
    /// What was suppressed and why, in aggregate terms only.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    pub key: Vec<String>,
    pub value: CellValue,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CellValue {
    Count(u64),
    Suppressed { reason: String },
}

/// A node that did not contribute, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFailure {
    pub node_id: String,
    pub reason: String,
}

/// A cell of the federated total.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TotalCell {
    pub key: Vec<String>,
    /// Sum of the released counts.
    pub count: u64,
    /// Nodes whose part of this cell was suppressed and so is not in `count`.
    pub suppressed_at: Vec<String>,
}

/// Sums released counts cell by cell, keeping track of which nodes withheld a
/// part of each cell. Cells are ordered by key.
pub fn combine(results: &[AggregateResult]) -> Vec<TotalCell> {
    let mut totals: BTreeMap<&[String], TotalCell> = BTreeMap::new();
    for result in results {
        for cell in &result.cells {
            let total = totals.entry(&cell.key).or_insert_with(|| TotalCell {
                key: cell.key.clone(),
                count: 0,
                suppressed_at: Vec::new(),
            });
            match &cell.value {
                CellValue::Count(n) => total.count += n,
                CellValue::Suppressed { .. } => total.suppressed_at.push(result.node_id.clone()),
            }
        }
    }
    totals.into_values().collect()
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
                    suppressed_at: vec![]
                },
                TotalCell {
                    key: vec!["male".into()],
                    count: 15,
                    suppressed_at: vec!["a".into()]
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
                .map(|i| AggregateResult { node_id: format!("n{i}"), dimensions: vec![], cells: vec![], min_cell_size: 0, notes: vec![] })
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
    }
}
