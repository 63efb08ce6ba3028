//! Secondary suppression of one table, audited by linear programming: which
//! further cells it withholds so that releasing it narrows nothing a
//! requester could know of a small count.
//!
//! **What a requester is assumed to know**, beside the table's released
//! cells (exactly): what every coarser grouping of the same cohort releases
//! ([`super::groupings`] works that out, by the same method): each of its
//! released cells is a known sum of this table's cells, each withheld one a
//! sum known to be small (0..k-1 patients, k the minimum cell size: tables
//! list every cell of their domain, so an empty cell is withheld as small
//! and a small one may be empty) or at least k, as its reason says. Of the table's own withheld cells the
//! requester knows the same from their reasons; for rates, the same of the
//! events, each cell's events between 0 and its patients.
//!
//! **The protection rule.** For every small quantity (the patients of a
//! small cell of this table or of a coarser grouping, empty or not; the
//! events, and the patients without the event, of every withheld rate
//! cell), the interval of values consistent with all of the above is the
//! interval consistent with the coarser groupings alone (the same programme
//! with every cell of this table withheld): releasing the table adds
//! nothing. Where the coarser groupings say nothing more of a small count,
//! that is all of 0..k-1. An empty cell is protected like any small one:
//! were it not, the cells withheld to protect the others would be chosen
//! by which small cells are empty, and the pattern itself would say so
//! (a partner withheld beside a small cell exactly when that cell is not
//! empty gives the cells it pins away).
//!
//! **The method.** Start from the cells withheld for being small and close
//! every known sum that holds a single withheld cell (preferring a partner
//! that closes another such sum, then one of at least 2k - 1 patients, whose
//! slack above k can hide any small value). Then, quantity by quantity,
//! while its interval is narrower than the rule allows, withhold the
//! released cell (closing sums again) that leaves it least short, then the
//! fewest and smallest cells. Withholding a cell only widens every interval
//! (its true value stays feasible), so one pass suffices, and a table with
//! every cell withheld satisfies the rule, so it ends. Intervals are those
//! of the linear relaxation, rounded inwards to whole patients; for
//! two-dimensional tables its vertices are whole numbers, for more
//! dimensions an integer programme could be narrower (THREATS.md).

use std::cell::Cell;

use good_lp::{Expression, ProblemVariables, Solution, SolverModel, Variable, microlp, variable};

/// What a table holds in one cell, as the additive counts a requester could
/// learn sums of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) patients: u64,
    /// Patients with the event, for rate cells.
    pub(crate) events: Option<u64>,
}

impl Counts {
    pub(crate) fn add(self, other: Counts) -> Counts {
        Counts {
            patients: self.patients + other.patients,
            events: match (self.events, other.events) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            },
        }
    }

    /// The status a cell of these counts starts with: small, few events, or
    /// released.
    pub(crate) fn primary(self, k: u64) -> Status {
        let small = |n: u64| n > 0 && n < k;
        match self.events {
            _ if self.patients < k => Status::Small,
            Some(e) if small(e) || small(self.patients - e) => Status::FewEvents,
            _ => Status::Released,
        }
    }
}

/// Whether a cell is released, and if not, why: what its reason tells a
/// requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Released,
    /// Fewer patients than the minimum cell size.
    Small,
    /// Enough patients, but events or patients without the event too few.
    FewEvents,
    /// Withheld to protect a small cell.
    Protecting,
}

impl Status {
    pub(crate) fn withheld(self) -> bool {
        self != Status::Released
    }
}

/// A sum of this table's cells that a coarser grouping released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    pub(crate) cells: Vec<usize>,
    pub(crate) counts: Counts,
}

/// A sum of this table's cells that a coarser grouping withheld: small
/// (0..k-1 patients), or withheld for another reason (at least k).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Withheld {
    pub(crate) cells: Vec<usize>,
    pub(crate) small: bool,
    /// Its true counts, to protect it when it is small.
    pub(crate) counts: Counts,
}

/// How an audit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audit {
    /// Every small quantity satisfies the rule.
    Protected,
    /// The audit reached its work limit; every cell was withheld.
    TooLarge,
}

/// Most work one table's audit may do, counted as the sum over the linear
/// programmes it solves of the square of their variables (a programme's
/// cost grows about so): about a thousand programmes over two hundred
/// withheld cells, or a few over thousands. A table that needs more (very
/// many small cells, each needing partners) is withheld whole: the audit
/// fails closed, deterministically, and one query cannot hold a node's
/// processor for long. The limit applies to each table audited: the
/// requested one and each of its coarser groupings.
pub(crate) const MAX_EFFORT: u64 = 40_000_000;

/// How many released cells are tried as the next protecting cell.
const CANDIDATES: usize = 24;

/// Which additive count of a sum of cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Patients,
    Events,
    NonEvents,
}

/// A small quantity the rule protects: a measure of a sum of cells.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Quantity {
    cells: Vec<usize>,
    measure: Measure,
    /// Its patients are a small cell's (here or in a coarser grouping):
    /// 0..k-1 is the widest a requester could hold.
    small: bool,
}

/// Feasible whole values of a quantity: `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interval {
    pub(crate) lo: i64,
    pub(crate) hi: i64,
}

/// How far `got` falls short of `needed` on either side, in patients.
fn shortfall(got: Interval, needed: Interval) -> i64 {
    got.lo
        .saturating_sub(needed.lo)
        .max(0)
        .saturating_add(needed.hi.saturating_sub(got.hi).max(0))
}

/// Which side of an interval to compute.
#[derive(Debug, Clone, Copy)]
struct Sides {
    lo: bool,
    hi: bool,
}

const BOTH: Sides = Sides { lo: true, hi: true };

/// Which way a programme optimises.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Lowest,
    Highest,
}

/// One table under audit.
pub(crate) struct Table<'a> {
    pub(crate) counts: &'a [Counts],
    pub(crate) known: Vec<Known>,
    pub(crate) withheld: Vec<Withheld>,
    pub(crate) k: u64,
    /// Work done so far, as [`MAX_EFFORT`] counts it, and the limit.
    effort: Cell<u64>,
    limit: u64,
}

impl<'a> Table<'a> {
    pub(crate) fn new(
        counts: &'a [Counts],
        known: Vec<Known>,
        withheld: Vec<Withheld>,
        k: u64,
    ) -> Self {
        Table {
            counts,
            known,
            withheld,
            k,
            effort: Cell::new(0),
            limit: MAX_EFFORT,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    fn exhausted(&self) -> bool {
        self.effort.get() >= self.limit
    }

    /// The small quantities a requester must learn no more of.
    fn protected(&self, status: &[Status]) -> Vec<Quantity> {
        let mut out = Vec::new();
        for (c, (counts, status)) in self.counts.iter().zip(status).enumerate() {
            // Empty or not: which small cells are protected must not
            // depend on what they hold (the module's rule).
            if *status == Status::Small {
                out.push(Quantity {
                    cells: vec![c],
                    measure: Measure::Patients,
                    small: true,
                });
            }
            // Both sides of every withheld rate cell, whatever they hold:
            // protecting only the sides of 1..k-1 would choose partners by
            // whether a side is empty or small (the module's rule).
            if let (Some(_), true) = (counts.events, status.withheld()) {
                for measure in [Measure::Events, Measure::NonEvents] {
                    out.push(Quantity {
                        cells: vec![c],
                        measure,
                        small: false,
                    });
                }
            }
        }
        for sum in self.withheld.iter().filter(|w| w.small) {
            out.push(Quantity {
                cells: sum.cells.clone(),
                measure: Measure::Patients,
                small: true,
            });
        }
        out
    }

    /// The value of `measure` over `cells`, as released.
    fn value(&self, cells: &[usize], measure: Measure) -> i64 {
        cells
            .iter()
            .map(|c| {
                let counts = self.counts[*c];
                let events = counts.events.unwrap_or(0);
                let n = match measure {
                    Measure::Patients => counts.patients,
                    Measure::Events => events,
                    Measure::NonEvents => counts.patients - events,
                };
                i64::try_from(n).unwrap_or(i64::MAX)
            })
            .sum()
    }

    /// The interval of `quantity` given everything a requester knows when
    /// the cells for which `hidden` holds are withheld (the others
    /// released exactly); statuses say what a withheld cell's reason tells.
    /// `None` where the solver fails or the work limit is reached, which
    /// the caller treats as "not shown protected".
    fn interval(
        &self,
        quantity: &Quantity,
        status: &[Status],
        hidden: &dyn Fn(usize) -> bool,
        sides: Sides,
    ) -> Option<Interval> {
        let mut vars = ProblemVariables::new();
        let mut patients: Vec<Option<Variable>> = vec![None; self.counts.len()];
        let mut events: Vec<Option<Variable>> = vec![None; self.counts.len()];
        let k = self.k as f64;
        for (c, counts) in self.counts.iter().enumerate() {
            if !hidden(c) {
                continue;
            }
            let bounds = match status[c] {
                // Empty or not: every cell of the domain is listed.
                Status::Small => variable().min(0.0).max(k - 1.0),
                _ => variable().min(k),
            };
            patients[c] = Some(vars.add(bounds));
            if counts.events.is_some() {
                events[c] = Some(vars.add(variable().min(0.0)));
            }
        }
        // The measure over hidden cells, and the released part as a number.
        let measure_of = |cells: &[usize], measure: Measure| -> (Expression, i64) {
            let mut expr = Expression::default();
            let mut constant = 0;
            for c in cells {
                match (patients[*c], events[*c], measure) {
                    (Some(p), _, Measure::Patients) => expr += p,
                    (_, Some(e), Measure::Events) => expr += e,
                    (Some(p), Some(e), Measure::NonEvents) => {
                        expr += p;
                        expr -= e;
                    }
                    _ => constant += self.value(&[*c], measure),
                }
            }
            (expr, constant)
        };
        let mut constraints = Vec::new();
        for (c, event) in events.iter().enumerate() {
            if let (Some(e), Some(p)) = (event, patients[c]) {
                constraints.push(Expression::from(*e).leq(p));
            }
        }
        for known in &self.known {
            if !known.cells.iter().any(|c| hidden(*c)) {
                continue;
            }
            let (sum, released) = measure_of(&known.cells, Measure::Patients);
            let total = i64::try_from(known.counts.patients).unwrap_or(i64::MAX);
            constraints.push(sum.eq((total - released) as f64));
            if let Some(events) = known.counts.events {
                let (sum, released) = measure_of(&known.cells, Measure::Events);
                let total = i64::try_from(events).unwrap_or(i64::MAX);
                constraints.push(sum.eq((total - released) as f64));
            }
        }
        for withheld in &self.withheld {
            if !withheld.cells.iter().any(|c| hidden(*c)) {
                continue;
            }
            let (sum, released) = measure_of(&withheld.cells, Measure::Patients);
            let released = released as f64;
            if withheld.small {
                constraints.push(sum.leq(k - 1.0 - released));
            } else {
                constraints.push(sum.geq(k - released));
            }
        }
        let (objective, constant) = measure_of(&quantity.cells, quantity.measure);
        let size = vars.len() as u64;
        let solve = |direction: Direction| -> Option<f64> {
            if self.exhausted() {
                return None;
            }
            self.effort.set(self.effort.get() + size * size);
            let vars = vars.clone();
            let problem = match direction {
                Direction::Highest => vars.maximise(objective.clone()),
                Direction::Lowest => vars.minimise(objective.clone()),
            };
            match problem
                .using(microlp)
                .with_all(constraints.iter().cloned())
                .solve()
            {
                Ok(solution) => Some(solution.eval(&objective)),
                // Nothing bounds it on that side (a withheld line total
                // says only "at least k"): the interval is open there.
                Err(good_lp::ResolutionError::Unbounded) => Some(match direction {
                    Direction::Highest => f64::INFINITY,
                    Direction::Lowest => f64::NEG_INFINITY,
                }),
                Err(_) => None,
            }
        };
        // A side not asked for is taken at the true value, the narrowest it
        // could be, so that it never looks better than it is.
        let value = self.value(&quantity.cells, quantity.measure);
        const EPS: f64 = 1e-6;
        // Casts saturate: an open side is i64::MIN or i64::MAX.
        let lo = if sides.lo {
            constant.saturating_add((solve(Direction::Lowest)? - EPS).ceil() as i64)
        } else {
            value
        };
        let hi = if sides.hi {
            constant.saturating_add((solve(Direction::Highest)? + EPS).floor() as i64)
        } else {
            value
        };
        Some(Interval { lo, hi })
    }

    /// The widest interval a requester could hold of `quantity` before
    /// anything is released: for a small count's patients, 0..k-1; none
    /// where it has no simple form.
    fn widest(&self, quantity: &Quantity) -> Option<Interval> {
        quantity.small.then(|| Interval {
            lo: 0,
            hi: i64::try_from(self.k).unwrap_or(i64::MAX) - 1,
        })
    }

    /// Withholds further cells (marked [`Status::Protecting`]) until every
    /// small quantity satisfies the protection rule of this module.
    /// `status` holds the primary suppression on entry and the final
    /// pattern on return.
    pub(crate) fn protect(&self, status: &mut [Status]) -> Audit {
        let quantities = self.protected(status);
        self.close(status);
        for quantity in &quantities {
            // What the coarser groupings alone allow (the programme with
            // every cell withheld), computed only when the widest interval
            // a requester could hold is not already reached.
            let mut needed: Option<Interval> = None;
            loop {
                let pattern: Vec<Status> = status.to_vec();
                let hidden = |c: usize| pattern[c].withheld();
                let got = self.interval(quantity, &pattern, &hidden, BOTH);
                if let (Some(got), Some(widest)) = (got, self.widest(quantity))
                    && shortfall(got, widest) == 0
                {
                    break;
                }
                let needed = match needed {
                    Some(needed) => needed,
                    None => {
                        let all = |_: usize| true;
                        match self.interval(quantity, &pattern, &all, BOTH) {
                            Some(interval) => *needed.insert(interval),
                            // Without the baseline nothing can be shown.
                            None => return self.withhold_all(status),
                        }
                    }
                };
                if got.is_some_and(|got| shortfall(got, needed) == 0) {
                    break;
                }
                if self.exhausted() {
                    return self.withhold_all(status);
                }
                let sides = got.map_or(BOTH, |got| Sides {
                    lo: got.lo > needed.lo,
                    hi: got.hi < needed.hi,
                });
                match self.best_step(&pattern, quantity, needed, sides) {
                    Some(next) => status.copy_from_slice(&next),
                    None if self.exhausted() => return self.withhold_all(status),
                    // Every cell is withheld: the interval is the baseline.
                    None => break,
                }
            }
        }
        Audit::Protected
    }

    fn withhold_all(&self, status: &mut [Status]) -> Audit {
        for s in status.iter_mut().filter(|s| !s.withheld()) {
            *s = Status::Protecting;
        }
        Audit::TooLarge
    }

    /// Until no known sum holds exactly one withheld cell beside released
    /// ones, withholds a partner in such a sum: a
    /// withheld cell alone in a known sum would be that sum less the
    /// released cells. The partner is,
    /// in order of preference, one that also closes another such sum, one
    /// of at least 2k - 1 patients (whose slack above k can hide any small
    /// value; the smallest such), else the largest. Smaller sums (rows,
    /// columns) are closed before larger ones (the table's total), so that
    /// partners are found near the cell they protect.
    pub(crate) fn close(&self, status: &mut [Status]) {
        let roomy = 2 * self.k - 1;
        let mut order: Vec<&Known> = self.known.iter().filter(|s| s.cells.len() > 1).collect();
        order.sort_by_key(|s| s.cells.len());
        // The sums each cell is in, and how many withheld cells each sum
        // holds, kept up to date: closing stays linear in the table's size.
        let mut sums_of: Vec<Vec<usize>> = vec![Vec::new(); self.counts.len()];
        for (i, sum) in order.iter().enumerate() {
            for c in &sum.cells {
                sums_of[*c].push(i);
            }
        }
        // Statuses alone decide, never what a withheld cell holds (the
        // module's rule).
        let mut hidden: Vec<usize> = order
            .iter()
            .map(|sum| sum.cells.iter().filter(|c| status[**c].withheld()).count())
            .collect();
        loop {
            let mut changed = false;
            for (i, sum) in order.iter().enumerate() {
                if hidden[i] != 1 {
                    continue;
                }
                let closes_another =
                    |c: usize| sums_of[c].iter().any(|j| *j != i && hidden[*j] == 1);
                let partner = sum
                    .cells
                    .iter()
                    .copied()
                    .filter(|c| !status[*c].withheld())
                    .min_by_key(|c| {
                        let size = self.counts[*c].patients;
                        let preference = match (closes_another(*c), size >= roomy) {
                            (true, _) => 0,
                            (false, true) => 1,
                            (false, false) => 2,
                        };
                        // Roomy cells smallest first, the others largest first.
                        let order = if size >= roomy { size } else { u64::MAX - size };
                        (preference, order, *c)
                    });
                if let Some(partner) = partner {
                    status[partner] = Status::Protecting;
                    for j in &sums_of[partner] {
                        hidden[*j] += 1;
                    }
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// The next pattern: `pattern` with one more released cell withheld
    /// (and the sums that leaves with a single withheld cell closed), the
    /// one that leaves `quantity` shortest of `needed`, then the one that
    /// withholds fewest and smallest cells. Candidates are the
    /// [`CANDIDATES`] released cells nearest to the quantity: those sharing
    /// a known sum with it (other than the largest) first, then those
    /// sharing one with any withheld cell, then the rest; smaller cells first
    /// within each. `None` when no cell is left to withhold.
    fn best_step(
        &self,
        pattern: &[Status],
        quantity: &Quantity,
        needed: Interval,
        sides: Sides,
    ) -> Option<Vec<Status>> {
        let largest = self.known.iter().map(|s| s.cells.len()).max().unwrap_or(0);
        let inner: Vec<&Known> = self
            .known
            .iter()
            .filter(|s| s.cells.len() < largest)
            .collect();
        let nearness = |c: usize| -> u8 {
            if inner
                .iter()
                .any(|s| s.cells.contains(&c) && s.cells.iter().any(|q| quantity.cells.contains(q)))
            {
                0
            } else if inner
                .iter()
                .any(|s| s.cells.contains(&c) && s.cells.iter().any(|o| pattern[*o].withheld()))
            {
                1
            } else {
                2
            }
        };
        let mut candidates: Vec<(u8, u64, usize)> = (0..pattern.len())
            .filter(|c| !pattern[*c].withheld())
            .map(|c| (nearness(c), self.counts[c].patients, c))
            .collect();
        candidates.sort_unstable();
        candidates
            .into_iter()
            .take(CANDIDATES)
            .map(|(_, _, c)| {
                let mut next = pattern.to_vec();
                next[c] = Status::Protecting;
                self.close(&mut next);
                let hidden = |o: usize| next[o].withheld();
                let short = self
                    .interval(quantity, &next, &hidden, sides)
                    .map_or(i64::MAX, |got| shortfall(got, needed));
                let added: Vec<usize> = (0..next.len())
                    .filter(|o| next[*o] != pattern[*o])
                    .collect();
                let size: u64 = added.iter().map(|o| self.counts[*o].patients).sum();
                ((short, added.len(), size, c), next)
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, next)| next)
    }
}
