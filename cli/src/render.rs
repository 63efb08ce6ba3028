//! Renders study results for people (aligned tables) and programs (JSON).

use ghx_proto::v1 as pb;
use serde_json::json;

/// An aligned text table: dimension columns, one column per node, a total.
/// Nodes list every cell of a table's domain, so rows below the minimum
/// cell size at every hospital (most often empty ones, such as sex
/// "other") are counted under the table rather than shown; `--json` lists
/// them.
pub fn study_table(result: &pb::StudyResult) -> String {
    if let Some(pooled) = &result.pooled {
        return pooled_table(result, pooled);
    }
    let mut header: Vec<String> = result.dimensions.clone();
    let nodes: Vec<&pb::AggregateResult> = result.per_node.iter().collect();
    header.extend(nodes.iter().map(|n| n.node_id.clone()));
    header.push("total".to_owned());
    let mut rows = vec![header];
    let mut small_everywhere = 0;
    let mut one_sided = false;
    for total in &result.total {
        let small_at_every_node = !nodes.is_empty()
            && nodes.iter().all(|node| {
                node.cells.iter().any(|c| {
                    c.key == total.key
                        && matches!(&c.value, Some(pb::cell::Value::Suppressed(s))
                            if !s.reason.starts_with("withheld") && !s.reason.starts_with("fewer"))
                })
            });
        if small_at_every_node {
            small_everywhere += 1;
            continue;
        }
        let mut row = total.key.clone();
        for node in &nodes {
            let cell = node.cells.iter().find(|c| c.key == total.key);
            row.push(match cell.and_then(|c| c.value.as_ref()) {
                Some(pb::cell::Value::Count(n)) => n.to_string(),
                Some(pb::cell::Value::Summary(m)) => moments(m, false),
                Some(pb::cell::Value::Rate(r)) => rate(r, result.rate_per),
                Some(pb::cell::Value::Suppressed(s)) if s.reason.starts_with("withheld") => {
                    "x".to_owned()
                }
                Some(pb::cell::Value::Suppressed(s)) if s.reason.starts_with("fewer") => {
                    one_sided = true;
                    format!("s<{}", node.min_cell_size)
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
        row.push(match (&total.summary, &total.rate) {
            (Some(m), _) => format!("{}{partial}", moments(m, true)),
            (_, Some(r)) => format!("{}{partial}", rate(r, result.rate_per)),
            _ => format!("{}{partial}", total.count),
        });
        rows.push(row);
    }
    let mut out = aligned(&rows, result.dimensions.len());
    if small_everywhere > 0 {
        out.push_str(&format!(
            "({small_everywhere} more {} below the minimum cell size at every hospital, not shown; --json lists {})\n",
            if small_everywhere == 1 { "row" } else { "rows" },
            if small_everywhere == 1 { "it" } else { "them" },
        ));
    }
    let legend_needed = result.total.iter().any(|t| !t.suppressed_at.is_empty());
    if legend_needed {
        out.push_str("\n<N: suppressed at that hospital (fewer than N patients); x: withheld so that a suppressed\ncell cannot be worked out from totals; total+ excludes withheld parts\n");
    }
    if one_sided {
        out.push_str("s<N: suppressed at that hospital: fewer than N of its patients have (or lack) the event or value\n");
    }
    if result.rate_per > 0 {
        out.push_str(&format!(
            "rates are events per {} patients (events/patients)\n",
            result.rate_per
        ));
    }
    if result.total.iter().any(|t| t.summary.is_some()) {
        out.push_str("summaries are mean±sd (n; min..max where released)\n");
    }
    for q in &result.quantiles {
        out.push_str(&quantile_line(q));
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

/// Aligned columns: dimensions left, numbers right, a rule under the
/// header.
pub fn aligned(rows: &[Vec<String>], dims: usize) -> String {
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
    out
}

/// One quantile as a line: its group, value and whether bins were
/// withheld from it.
fn quantile_line(q: &pb::Quantile) -> String {
    let group = if q.group.is_empty() {
        "all".to_owned()
    } else {
        q.group.join("/")
    };
    let value = q
        .value
        .map_or_else(|| "in an open-ended bin".to_owned(), |v| format!("{v:.3}"));
    let partial = if q.partial {
        " (partial: some bins withheld)"
    } else {
        ""
    };
    format!("quantile {} of {group}: {value}{partial}\n", q.q)
}

/// A pooled result: one column, the federation's table as released.
fn pooled_table(result: &pb::StudyResult, pooled: &pb::PooledRelease) -> String {
    let mut header = result.dimensions.clone();
    header.push("pooled".to_owned());
    let mut rows = vec![header];
    for total in &result.total {
        let mut row = total.key.clone();
        row.push(if total.withheld.starts_with("withheld") {
            "x".to_owned()
        } else if total.withheld.starts_with("fewer") {
            format!("s<{}", pooled.min_cell_size)
        } else if !total.withheld.is_empty() {
            format!("<{}", pooled.min_cell_size)
        } else {
            match (&total.summary, &total.rate) {
                (Some(m), _) => moments(m, false),
                (_, Some(r)) => rate(r, result.rate_per),
                _ => total.count.to_string(),
            }
        });
        rows.push(row);
    }
    let mut out = String::new();
    if !pooled.contributors.is_empty() {
        out = aligned(&rows, result.dimensions.len());
        out.push_str(&format!(
            "\npooled over {} under secure aggregation: no hospital's own cells were seen; <N: below the cell size of the pooled table; s<N: fewer than N with (or without) the event or value; x: withheld to protect one\n",
            pooled.contributors.join(", ")
        ));
    }
    if result.rate_per > 0 {
        out.push_str(&format!(
            "rates are events per {} patients (events/patients)\n",
            result.rate_per
        ));
    }
    for q in &result.quantiles {
        out.push_str(&quantile_line(q));
    }
    for note in &pooled.notes {
        out.push_str(&format!("pooled: {note}\n"));
    }
    for failure in &result.failures {
        out.push_str(&format!(
            "{}: did not take part: {}\n",
            failure.node_id, failure.reason
        ));
    }
    out
}

/// A summary cell: mean±sd (n), with the range when released and asked for.
fn moments(m: &pb::Moments, with_range: bool) -> String {
    let sd = if m.n > 1 {
        format!("±{:.2}", (m.m2.max(0.0) / (m.n - 1) as f64).sqrt())
    } else {
        String::new()
    };
    let range = match (with_range, m.min, m.max) {
        (true, Some(lo), Some(hi)) => format!("; {lo}..{hi}"),
        _ => String::new(),
    };
    format!("{:.2}{sd} (n={}{range})", m.mean, m.n)
}

/// A rate cell: events per `per` patients, with its two counts.
fn rate(r: &pb::RateCounts, per: u32) -> String {
    if r.population == 0 {
        return "- (0/0)".to_owned();
    }
    let value = r.events as f64 * f64::from(per.max(1)) / r.population as f64;
    format!("{value:.1} ({}/{})", r.events, r.population)
}

fn moments_json(m: &pb::Moments) -> serde_json::Value {
    let sd = (m.n > 1).then(|| (m.m2.max(0.0) / (m.n - 1) as f64).sqrt());
    json!({"n": m.n, "mean": m.mean, "sd": sd, "m2": m.m2, "min": m.min, "max": m.max})
}

/// The same result as JSON.
pub fn study_json(result: &pb::StudyResult) -> serde_json::Value {
    let cell = |c: &pb::Cell| match &c.value {
        Some(pb::cell::Value::Count(n)) => json!({"key": c.key, "count": n}),
        Some(pb::cell::Value::Suppressed(s)) => json!({"key": c.key, "suppressed": s.reason}),
        Some(pb::cell::Value::Summary(m)) => json!({"key": c.key, "summary": moments_json(m)}),
        Some(pb::cell::Value::Rate(r)) => {
            json!({"key": c.key, "events": r.events, "population": r.population})
        }
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
            "noise": n.noise.as_ref().map(|z| json!({"mechanism": z.mechanism, "epsilon": z.epsilon, "delta": z.delta, "detail": z.detail})),
        })).collect::<Vec<_>>(),
        "failures": result.failures.iter().map(|f| json!({"node_id": f.node_id, "reason": f.reason})).collect::<Vec<_>>(),
        "total": result.total.iter().map(|t| {
            let mut v = json!({"key": t.key, "count": t.count, "suppressed_at": t.suppressed_at});
            if !t.withheld.is_empty() {
                v["withheld"] = json!(t.withheld);
            }
            if let Some(m) = &t.summary {
                v["summary"] = moments_json(m);
            }
            if let Some(r) = &t.rate {
                v["events"] = json!(r.events);
                v["population"] = json!(r.population);
                v["rate"] = json!(r.events as f64 * f64::from(result.rate_per.max(1)) / r.population.max(1) as f64);
            }
            v
        }).collect::<Vec<_>>(),
        "rate_per": result.rate_per,
        "quantiles": result.quantiles.iter().map(|q| json!({"group": q.group, "q": q.q, "value": q.value, "partial": q.partial})).collect::<Vec<_>>(),
        "pooled": result.pooled.as_ref().map(|p| json!({
            "contributors": p.contributors,
            "notes": p.notes,
            "min_cell_size": p.min_cell_size,
            "noise": p.noise.as_ref().map(|z| json!({"mechanism": z.mechanism, "epsilon": z.epsilon, "delta": z.delta, "detail": z.detail})),
            "linkage": p.linkage.as_ref().map(|l| json!({"slots": l.slots, "unlinked": if l.unlinked_withheld { serde_json::Value::Null } else { l.unlinked.into() }, "standard_error": l.standard_error})),
        })),
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
            analysis: "count".into(),
            noise: None,
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
                node(
                    "chonnam",
                    vec![count("female", 12), hidden("male"), hidden("other")],
                ),
                node("chosun", vec![count("female", 30), hidden("other")]),
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
                    ..Default::default()
                },
                pb::TotalCell {
                    key: vec!["male".into()],
                    count: 0,
                    suppressed_at: vec!["chonnam".into()],
                    ..Default::default()
                },
                // Small at every hospital that answered: counted, not shown.
                pb::TotalCell {
                    key: vec!["other".into()],
                    count: 0,
                    suppressed_at: vec!["chonnam".into(), "chosun".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        expect_test::expect![[r#"
            sex     chonnam  chosun  total
            ------  -------  ------  -----
            female       12      30     42
            male        <10       -     0+
            (1 more row below the minimum cell size at every hospital, not shown; --json lists it)

            <N: suppressed at that hospital (fewer than N patients); x: withheld so that a suppressed
            cell cannot be worked out from totals; total+ excludes withheld parts
            christian: did not answer: unreachable
        "#]]
        .assert_eq(&study_table(&result));
    }

    #[test]
    fn a_pooled_table_has_one_column_and_says_how_it_was_made() {
        let cell = |k: &str, count: u64, withheld: &str| pb::TotalCell {
            key: vec![k.into()],
            count,
            withheld: withheld.into(),
            ..Default::default()
        };
        let result = pb::StudyResult {
            dimensions: vec!["sex".into()],
            total: vec![
                cell("female", 812, ""),
                cell("male", 0, "count below the minimum cell size of 10"),
                cell("other", 0, "withheld to protect a suppressed cell"),
            ],
            pooled: Some(pb::PooledRelease {
                contributors: vec!["chonnam".into(), "chosun".into(), "christian".into()],
                notes: vec!["noise: distributed discrete Gaussian".into()],
                noise: None,
                min_cell_size: 10,
                linkage: None,
            }),
            ..Default::default()
        };
        expect_test::expect![[r#"
            sex     pooled
            ------  ------
            female     812
            male       <10
            other        x

            pooled over chonnam, chosun, christian under secure aggregation: no hospital's own cells were seen; <N: below the cell size of the pooled table; s<N: fewer than N with (or without) the event or value; x: withheld to protect one
            pooled: noise: distributed discrete Gaussian
        "#]]
        .assert_eq(&study_table(&result));
        let json = study_json(&result);
        assert_eq!(json["pooled"]["contributors"][2], "christian");
        assert_eq!(
            json["total"][1]["withheld"],
            "count below the minimum cell size of 10"
        );
    }

    #[test]
    fn table_shows_summaries_rates_and_quantiles() {
        let summary = |n: u64, mean: f64, m2: f64| pb::Moments {
            n,
            mean,
            m2,
            min: Some(5.9),
            max: Some(9.8),
        };
        let node = pb::AggregateResult {
            node_id: "chosun".into(),
            dimensions: vec!["sex".into()],
            cells: vec![pb::Cell {
                key: vec!["female".into()],
                value: Some(pb::cell::Value::Summary(summary(40, 7.25, 39.0))),
            }],
            min_cell_size: 10,
            notes: vec!["noise: none".into()],
            ..Default::default()
        };
        let result = pb::StudyResult {
            dimensions: vec!["sex".into()],
            per_node: vec![node],
            total: vec![pb::TotalCell {
                key: vec!["female".into()],
                count: 40,
                summary: Some(summary(40, 7.25, 39.0)),
                ..Default::default()
            }],
            quantiles: vec![pb::Quantile {
                group: vec!["female".into()],
                q: 0.5,
                value: Some(7.125),
                partial: false,
            }],
            ..Default::default()
        };
        expect_test::expect![[r#"
            sex               chosun                       total
            ------  ----------------  --------------------------
            female  7.25±1.00 (n=40)  7.25±1.00 (n=40; 5.9..9.8)
            summaries are mean±sd (n; min..max where released)
            quantile 0.5 of female: 7.125
            chosun: noise: none
        "#]]
        .assert_eq(&study_table(&result));
        let rate = pb::RateCounts {
            events: 15,
            population: 1200,
        };
        assert_eq!(super::rate(&rate, 1000), "12.5 (15/1200)");
    }
}
