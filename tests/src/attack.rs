//! An attacker of cell suppression, written apart from the node's
//! disclosure control: given what was released of a table (its released
//! cells, which cells were withheld and whether for being small) and what
//! other releases said of sums of its cells (margins: a total, or withheld
//! as small or at least k), it bounds any sum of its cells by linear
//! programming. It drives the microlp solver directly and addresses cells by
//! index tuples, so it shares no modelling code with `node::release`.

use std::collections::BTreeMap;

use microlp::{ComparisonOp, OptimizationDirection, Problem};

/// What a requester sees of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Released(u64),
    /// Withheld as below the minimum cell size: 0..k-1 patients (every
    /// cell of the domain is listed, empty or not).
    Small,
    /// Withheld for another reason (to protect a small cell, or too few
    /// events): at least k patients.
    Withheld,
}

/// A table as a requester holds it: the cells present (absent cells of the
/// grid are empty, and known to be), by index along each dimension.
#[derive(Debug, Clone)]
pub struct Table {
    pub shape: Vec<usize>,
    pub cells: BTreeMap<Vec<usize>, Seen>,
}

/// A line of a table: every cell whose indices equal `fixed` on all
/// dimensions but `free`; or the whole table when `free` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Line {
    pub free: Option<usize>,
    pub fixed: Vec<usize>,
}

impl Line {
    /// Whether the cell at `index` lies on this line.
    pub fn holds(&self, index: &[usize]) -> bool {
        match self.free {
            None => true,
            Some(free) => index
                .iter()
                .enumerate()
                .all(|(d, i)| d == free || *i == self.fixed[d]),
        }
    }
}

/// Every line of a grid of `shape`: the total, then for each dimension each
/// combination of the others' indices (`fixed` holds 0 at the free one).
pub fn all_lines(shape: &[usize]) -> Vec<Line> {
    let mut lines = vec![Line {
        free: None,
        fixed: vec![0; shape.len()],
    }];
    if shape.len() < 2 {
        return lines;
    }
    for free in 0..shape.len() {
        let mut fixed = vec![0; shape.len()];
        loop {
            lines.push(Line {
                free: Some(free),
                fixed: fixed.clone(),
            });
            // Odometer over every dimension but `free`.
            let mut d = 0;
            loop {
                if d == shape.len() {
                    break;
                }
                if d == free {
                    d += 1;
                    continue;
                }
                fixed[d] += 1;
                if fixed[d] < shape[d] {
                    break;
                }
                fixed[d] = 0;
                d += 1;
            }
            if d == shape.len() {
                break;
            }
        }
    }
    lines
}

/// What a requester learned of a sum of the table's cells from another
/// release: its total, or that it was withheld as small (0..k-1 patients)
/// or for another reason (at least k).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    Total(u64),
    Small,
    AtLeastK,
}

/// A sum of cells (by index) and what is known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Margin {
    pub cells: Vec<Vec<usize>>,
    pub fact: Fact,
}

/// The whole-number interval `(lo, hi)` of the sum of the cells `target`
/// consistent with the table and the margins, the attacker knowing that a
/// small cell holds 0..k-1 patients and any other withheld cell at least k.
/// Panics if the system is infeasible (the release contradicts the margins).
pub fn interval(table: &Table, margins: &[Margin], k: u64, target: &[Vec<usize>]) -> (i64, i64) {
    let kf = k as f64;
    let solve = |direction| {
        let mut problem = Problem::new(direction);
        let mut vars = BTreeMap::new();
        let mut constant = 0.0;
        for (index, seen) in &table.cells {
            let in_target = target.contains(index);
            let bounds = match seen {
                Seen::Released(n) => {
                    if in_target {
                        constant += *n as f64;
                    }
                    continue;
                }
                // Tables list every cell of their domain: a small cell may
                // be empty.
                Seen::Small => (0.0, kf - 1.0),
                Seen::Withheld => (kf, f64::INFINITY),
            };
            let objective = if in_target { 1.0 } else { 0.0 };
            vars.insert(index.clone(), problem.add_var(objective, bounds));
        }
        for margin in margins {
            let mut known = 0.0;
            let mut terms = Vec::new();
            for index in &margin.cells {
                match table.cells.get(index) {
                    Some(Seen::Released(n)) => known += *n as f64,
                    Some(_) => terms.push((vars[index], 1.0)),
                    None => {}
                }
            }
            if terms.is_empty() {
                continue;
            }
            match margin.fact {
                Fact::Total(total) => {
                    problem.add_constraint(terms, ComparisonOp::Eq, total as f64 - known)
                }
                Fact::Small => {
                    problem.add_constraint(terms, ComparisonOp::Le, kf - 1.0 - known);
                }
                Fact::AtLeastK => problem.add_constraint(terms, ComparisonOp::Ge, kf - known),
            }
        }
        match problem
            .solve()
            .expect("the released table is consistent with its margins")
            .into_solution()
        {
            Ok(solution) => constant + solution.objective(),
            Err(_) => panic!("the solver stopped before an optimum"),
        }
    };
    let lo = (solve(OptimizationDirection::Minimize) - 1e-6).ceil() as i64;
    let hi = (solve(OptimizationDirection::Maximize) + 1e-6).floor() as i64;
    (lo, hi)
}

/// The same table with every cell withheld (the small ones as small): what
/// the line totals alone say of each cell.
pub fn all_withheld(table: &Table) -> Table {
    Table {
        shape: table.shape.clone(),
        cells: table
            .cells
            .iter()
            .map(|(index, seen)| {
                let seen = match seen {
                    Seen::Small => Seen::Small,
                    _ => Seen::Withheld,
                };
                (index.clone(), seen)
            })
            .collect(),
    }
}
