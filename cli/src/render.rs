//! Renders study results for people (aligned tables) and programs (JSON).

use ghx_proto::v1 as pb;
use serde_json::json;

/// An aligned text table: dimension columns, one column per node, a total.
pub fn study_table(result: &pb::StudyResult) -> String {
    let mut header: Vec<String> = result.dimensions.clone();
    let nodes: Vec<&pb::AggregateResult> = result.per_node.iter().collect();
    header.extend(nodes.iter().map(|n| n.node_id.clone()));
    header.push("total".to_owned());
    let mut rows = vec![header];
    for total in &result.total {
        let mut row = total.key.clone();
        for node in &nodes {
            let cell = node.cells.iter().find(|c| c.key == total.key);
            row.push(match cell.and_then(|c| c.value.as_ref()) {
                Some(pb::cell::Value::Count(n)) => n.to_string(),
                Some(pb::cell::Value::Suppressed(s)) if s.reason.starts_with("withheld") => {
                    "x".to_owned()
                }
                Some(pb::cell::Value::Suppressed(_)) => format!("<{}", node.min_cell_size),
                None => "-".to_owned(),
            });
        }
        let partial = if total.suppressed_at.is_empty() {
            ""
        } else {
            "+"
        };
        row.push(format!("{}{partial}", total.count));
        rows.push(row);
    }
    let dims = result.dimensions.len();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < dims {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    let legend_needed = result.total.iter().any(|t| !t.suppressed_at.is_empty());
    if legend_needed {
        out.push_str("\n<N: suppressed at that hospital (fewer than N patients); x: withheld so that a suppressed\ncell cannot be worked out from totals; total+ excludes withheld parts\n");
    }
    for node in &nodes {
        for note in &node.notes {
            out.push_str(&format!("{}: {note}\n", node.node_id));
        }
    }
    for failure in &result.failures {
        out.push_str(&format!(
            "{}: did not answer: {}\n",
            failure.node_id, failure.reason
        ));
    }
    out
}

/// The same result as JSON.
pub fn study_json(result: &pb::StudyResult) -> serde_json::Value {
    let cell = |c: &pb::Cell| match &c.value {
        Some(pb::cell::Value::Count(n)) => json!({"key": c.key, "count": n}),
        Some(pb::cell::Value::Suppressed(s)) => json!({"key": c.key, "suppressed": s.reason}),
        None => json!({"key": c.key}),
    };
    json!({
        "study_id": result.study_id,
        "query": result.query,
        "dimensions": result.dimensions,
        "per_node": result.per_node.iter().map(|n| json!({
            "node_id": n.node_id,
            "min_cell_size": n.min_cell_size,
            "cells": n.cells.iter().map(cell).collect::<Vec<_>>(),
            "notes": n.notes,
        })).collect::<Vec<_>>(),
        "failures": result.failures.iter().map(|f| json!({"node_id": f.node_id, "reason": f.reason})).collect::<Vec<_>>(),
        "total": result.total.iter().map(|t| json!({"key": t.key, "count": t.count, "suppressed_at": t.suppressed_at})).collect::<Vec<_>>(),
    })
}

/// Studies as a table: one row per study, then each one's committee votes.
pub fn studies_table(studies: &[pb::StudySummary]) -> String {
    let mut out = String::new();
    for s in studies {
        let approvals = s.votes.iter().filter(|v| v.decision == "approve").count();
        out.push_str(&format!(
            "{}  {:<9} {}/{} approvals  {}  ({} for {}, {})\n",
            s.study_id,
            s.status,
            approvals,
            s.quorum,
            s.title,
            s.purpose,
            s.organisation,
            s.requester
        ));
        out.push_str(&format!(
            "    queries: {}; manifest sha256 {}\n",
            s.query_names.join(", "),
            &s.manifest_sha256[..s.manifest_sha256.len().min(16)]
        ));
        for v in &s.votes {
            let note = if v.note.is_empty() {
                String::new()
            } else {
                format!(": {}", v.note)
            };
            out.push_str(&format!(
                "    {} {} by {}{note}\n",
                v.at, v.decision, v.member
            ));
        }
    }
    if studies.is_empty() {
        out.push_str("no studies\n");
    }
    out
}

/// Studies for programs; the manifest is included as JSON.
pub fn studies_json(studies: &[pb::StudySummary]) -> serde_json::Value {
    serde_json::Value::Array(
        studies
            .iter()
            .map(|s| {
                json!({
                    "study_id": s.study_id,
                    "title": s.title,
                    "purpose": s.purpose,
                    "requester": s.requester,
                    "organisation": s.organisation,
                    "status": s.status,
                    "quorum": s.quorum,
                    "votes": s.votes.iter().map(|v| json!({
                        "member": v.member, "decision": v.decision, "note": v.note, "at": v.at,
                    })).collect::<Vec<_>>(),
                    "submitted_at": s.submitted_at,
                    "manifest_sha256": s.manifest_sha256,
                    "manifest": serde_json::from_slice::<serde_json::Value>(&s.manifest_json)
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_suppression_and_partial_totals() {
        let node = |id: &str, cells: Vec<pb::Cell>| pb::AggregateResult {
            node_id: id.into(),
            dimensions: vec!["sex".into()],
            cells,
            min_cell_size: 10,
            notes: vec![],
        };
        let count = |k: &str, n| pb::Cell {
            key: vec![k.into()],
            value: Some(pb::cell::Value::Count(n)),
        };
        let hidden = |k: &str| pb::Cell {
            key: vec![k.into()],
            value: Some(pb::cell::Value::Suppressed(pb::Suppressed {
                reason: "small".into(),
            })),
        };
        let result = pb::StudyResult {
            study_id: "study-0001".into(),
            query: "by-sex".into(),
            dimensions: vec!["sex".into()],
            per_node: vec![
                node("chonnam", vec![count("female", 12), hidden("male")]),
                node("chosun", vec![count("female", 30)]),
            ],
            failures: vec![pb::NodeFailure {
                node_id: "christian".into(),
                reason: "unreachable".into(),
            }],
            total: vec![
                pb::TotalCell {
                    key: vec!["female".into()],
                    count: 42,
                    suppressed_at: vec![],
                },
                pb::TotalCell {
                    key: vec!["male".into()],
                    count: 0,
                    suppressed_at: vec!["chonnam".into()],
                },
            ],
        };
        expect_test::expect![[r#"
            sex     chonnam  chosun  total
            ------  -------  ------  -----
            female       12      30     42
            male        <10       -     0+

            <N: suppressed at that hospital (fewer than N patients); x: withheld so that a suppressed
            cell cannot be worked out from totals; total+ excludes withheld parts
            christian: did not answer: unreachable
        "#]]
        .assert_eq(&study_table(&result));
    }
}
