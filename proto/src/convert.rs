//! Conversions between released results in domain form (`ghx_study::result`)
//! and on the wire, in both directions. A message from a peer is checked as
//! it is converted: a cell without a value or with a key of the wrong width
//! is an error that says so.

use ghx_study::result::{
    AggregateResult, Cell, CellValue, Moments, NoiseStatement, Quantile, RateCounts, TotalCell,
};

use crate::v1 as pb;

fn moments_to_wire(m: Moments) -> pb::Moments {
    pb::Moments {
        n: m.n,
        mean: m.mean,
        m2: m.m2,
        min: m.min,
        max: m.max,
    }
}

fn moments_from_wire(m: pb::Moments) -> Moments {
    Moments {
        n: m.n,
        mean: m.mean,
        m2: m.m2,
        min: m.min,
        max: m.max,
    }
}

fn rate_to_wire(r: RateCounts) -> pb::RateCounts {
    pb::RateCounts {
        events: r.events,
        population: r.population,
    }
}

fn rate_from_wire(r: pb::RateCounts) -> RateCounts {
    RateCounts {
        events: r.events,
        population: r.population,
    }
}

/// A released node result, as sent.
pub fn result_to_wire(result: AggregateResult) -> pb::AggregateResult {
    pb::AggregateResult {
        node_id: result.node_id,
        dimensions: result.dimensions,
        min_cell_size: result.min_cell_size,
        notes: result.notes,
        analysis: result.analysis,
        noise: result.noise.map(noise_to_wire),
        cells: result
            .cells
            .into_iter()
            .map(|c| pb::Cell {
                key: c.key,
                value: Some(match c.value {
                    CellValue::Count(n) => pb::cell::Value::Count(n),
                    CellValue::Suppressed { reason } => {
                        pb::cell::Value::Suppressed(pb::Suppressed { reason })
                    }
                    CellValue::Summary(m) => pb::cell::Value::Summary(moments_to_wire(m)),
                    CellValue::Rate(r) => pb::cell::Value::Rate(rate_to_wire(r)),
                }),
            })
            .collect(),
    }
}

/// A received node result, checked for shape: every cell has a value and
/// one key component per dimension, and numbers are finite.
pub fn result_from_wire(result: pb::AggregateResult) -> Result<AggregateResult, String> {
    let width = result.dimensions.len();
    let cells = result
        .cells
        .into_iter()
        .map(|cell| {
            if cell.key.len() != width {
                return Err(format!(
                    "cell key has {} values for {width} dimensions",
                    cell.key.len()
                ));
            }
            let value = match cell.value {
                Some(pb::cell::Value::Count(n)) => CellValue::Count(n),
                Some(pb::cell::Value::Suppressed(s)) => CellValue::Suppressed { reason: s.reason },
                Some(pb::cell::Value::Summary(m)) => {
                    let finite = [Some(m.mean), Some(m.m2), m.min, m.max]
                        .into_iter()
                        .flatten()
                        .all(f64::is_finite);
                    if !finite {
                        return Err("summary cell with a non-finite number".to_owned());
                    }
                    CellValue::Summary(moments_from_wire(m))
                }
                Some(pb::cell::Value::Rate(r)) => CellValue::Rate(rate_from_wire(r)),
                None => return Err("cell without a value".to_owned()),
            };
            Ok(Cell {
                key: cell.key,
                value,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(AggregateResult {
        node_id: result.node_id,
        dimensions: result.dimensions,
        cells,
        min_cell_size: result.min_cell_size,
        notes: result.notes,
        analysis: result.analysis,
        noise: result.noise.map(|n| NoiseStatement {
            mechanism: n.mechanism,
            epsilon: n.epsilon,
            delta: n.delta,
            detail: n.detail,
        }),
    })
}

/// A federated total cell, as sent.
pub fn total_to_wire(t: TotalCell) -> pb::TotalCell {
    pb::TotalCell {
        key: t.key,
        count: t.count,
        suppressed_at: t.suppressed_at,
        summary: t.summary.map(moments_to_wire),
        rate: t.rate.map(rate_to_wire),
        withheld: t.withheld.unwrap_or_default(),
    }
}

/// A statement of the noise added, as sent.
pub fn noise_to_wire(n: NoiseStatement) -> pb::NoiseStatement {
    pb::NoiseStatement {
        mechanism: n.mechanism,
        epsilon: n.epsilon,
        delta: n.delta,
        detail: n.detail,
    }
}

/// A quantile of a combined histogram, as sent.
pub fn quantile_to_wire(q: Quantile) -> pb::Quantile {
    pb::Quantile {
        group: q.group,
        q: q.q,
        value: q.value,
        partial: q.partial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_cross_the_wire_unchanged_and_bad_cells_are_named() {
        let result = AggregateResult {
            node_id: "chosun".into(),
            dimensions: vec!["sex".into()],
            cells: vec![
                Cell {
                    key: vec!["female".into()],
                    value: CellValue::Summary(Moments::of(&[1.0, 2.0, 4.0])),
                },
                Cell {
                    key: vec!["male".into()],
                    value: CellValue::Rate(RateCounts {
                        events: 3,
                        population: 40,
                    }),
                },
                Cell {
                    key: vec!["other".into()],
                    value: CellValue::Suppressed {
                        reason: "small".into(),
                    },
                },
            ],
            min_cell_size: 10,
            notes: vec!["note".into()],
            analysis: "summary".into(),
            noise: Some(NoiseStatement {
                mechanism: "laplace".into(),
                epsilon: 0.5,
                delta: 0.0,
                detail: "scale 2".into(),
            }),
        };
        let wire = result_to_wire(result.clone());
        assert_eq!(result_from_wire(wire.clone()).unwrap(), result);
        let mut bad = wire.clone();
        bad.cells[0].key.push("extra".into());
        assert_eq!(
            result_from_wire(bad).unwrap_err(),
            "cell key has 2 values for 1 dimensions"
        );
        let mut bad = wire;
        bad.cells[0].value = Some(pb::cell::Value::Summary(pb::Moments {
            n: 3,
            mean: f64::NAN,
            m2: 0.0,
            min: None,
            max: None,
        }));
        assert_eq!(
            result_from_wire(bad).unwrap_err(),
            "summary cell with a non-finite number"
        );
    }
}
