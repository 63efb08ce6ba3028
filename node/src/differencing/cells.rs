//! Differencing between cells: a cell is a set of patients, whatever cohort
//! or analysis made it, so the sets behind an exact table's numbers are
//! compared with every set released to the same organisation before, and a
//! release with a set 1..k−1 patients from an earlier one is refused.
//!
//! Whole-cohort differencing ([`super::check`]) misses what one cohort
//! analysed two ways gives: diagnosis groups `[F32]` and `[F32, F33]` of the
//! same cohort, whose cells differ by the patients with F33 alone; rate
//! events that differ by one criterion; age bins shifted by a year. Each of
//! these is two cells whose sets differ by a few patients.
//!
//! The sets of a table ([`TableSets::of`]):
//! - each released cell's patients, and for a rate its patients with and
//!   without the event, for a summary those with and without a value;
//! - every line total of the table, over every coarser grouping (by fewer
//!   dimensions, down to the table's total), that the node releases if
//!   asked ([`crate::release::release_with_lines`]): its audit took them as
//!   known, and a requester sums released cells into them;
//! - the cohort (its size is a line total, or the values note's complement);
//! - for a summary, each released cell's and line's patients paired with
//!   their value: the same patients with a value changed (another `pick`,
//!   window or import) differ there by the patients whose value changed.
//!
//! Sets of fewer than k patients are neither compared nor recorded: nothing
//! releases them (a small cell is withheld), and a set k or more patients
//! from every recorded one is not close to any either.
//!
//! Nothing is exempt by kind, not even a table's own margins asked later;
//! but a set recorded before is not compared again: releasing it again
//! says nothing new. So a table and then its margins (or the margins
//! first) pass: the table's line totals are recorded as the node would
//! release them if asked ([`crate::release::release_with_lines`], the
//! same computation the margins' own release makes), and the margins
//! release exactly those sets. On other data (after an import, under
//! another consent context, with another k) the sets differ, and a pair a
//! few patients apart is what must be refused; so is a pair of sibling
//! groupings (by age band, by diagnosis) that the linear programme never
//! audited against each other.
//!
//! Unions: a requester also adds released cells up. So each exact table's
//! finest partition is kept too (every cell, a rate's split by the event
//! and a summary's by having a value, released or not), and a new set whose
//! distance to the nearest union of a table's released cells is 1..k−1 is
//! refused ([`Partition::distance`]).
//!
//! Known limits (THREATS.md, gap 2): a set that is exactly a withheld cell
//! of k or more of an earlier table is near nothing, yet can pin a small
//! cell that one protected through a line total; unions mixing released
//! cells with released line totals are measured against cells only;
//! noised releases are not compared cell by cell (their noise covers
//! differences, and whole cohorts are still compared).

use std::collections::BTreeMap;

use ghx_study::query::{Analysis, QuerySpec};

use super::{CohortPrint, Error};
use crate::engine::CellMembers;
use crate::store::Store;

/// The sets of patients behind an exact table's numbers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TableSets {
    /// Distinct sets of at least k patients, each with whether the table
    /// gives its size exactly (a released count, a rate's patients and
    /// events, a summary's n, a line the node releases if asked), or it is
    /// kept to compare with only (a summary's patients with or without a
    /// value, the cohort): only a set given exactly before may be released
    /// again unchecked.
    sets: Vec<(CohortPrint, bool)>,
    /// A summary's patients paired with their values, compared with the
    /// sets recorded before only.
    valued: Vec<CohortPrint>,
    /// The table's finest partition: each cell (a rate's split by the
    /// event, a summary's by having a value), released or not.
    parts: Vec<(bool, CohortPrint)>,
}

impl TableSets {
    /// The sets behind a table whose raw `cells` (with the patients behind
    /// each, `members`) are released where `released` says, with the line
    /// totals `lines` (each a list of cells), of a cohort `cohort`, under
    /// minimum cell size `min_cell_size`.
    pub(crate) fn of(
        spec: &QuerySpec,
        cohort: &CohortPrint,
        members: &[CellMembers],
        released: &[bool],
        lines: &[Vec<usize>],
        min_cell_size: u32,
    ) -> Self {
        let k = min_cell_size.max(1) as usize;
        // A rate's patients with the event, and a summary's with a value,
        // are released beside the cell's patients.
        let two_sided = matches!(
            spec.analysis,
            Analysis::Rate { .. } | Analysis::Summary { .. }
        );
        // A summary releases n, those with a value: not its cell's
        // patients, nor those without.
        let summary = matches!(spec.analysis, Analysis::Summary { .. });
        let mut sets: BTreeMap<String, (CohortPrint, bool)> = BTreeMap::new();
        let mut valued: BTreeMap<String, (CohortPrint, bool)> = BTreeMap::new();
        let mut keep = |who: &CellMembers| {
            let patients = print(&who.patients);
            if two_sided {
                let events = print(&who.events);
                let without = patients.minus(&events);
                add(&mut sets, events, k, true);
                add(&mut sets, without, k, !summary);
                add(&mut valued, print(&who.valued), k, true);
            }
            add(&mut sets, patients, k, !summary);
        };
        for (who, _) in members.iter().zip(released).filter(|(_, r)| **r) {
            keep(who);
        }
        for line in lines {
            let mut union = CellMembers::default();
            for cell in line {
                let who = &members[*cell];
                union.patients.extend(&who.patients);
                union.events.extend(&who.events);
                union.valued.extend(&who.valued);
            }
            keep(&union);
        }
        add(&mut sets, cohort.clone(), k, false);
        let mut parts = Vec::new();
        for (who, released) in members.iter().zip(released) {
            let patients = print(&who.patients);
            if two_sided {
                let events = print(&who.events);
                parts.push((*released, patients.minus(&events)));
                parts.push((*released, events));
            } else {
                parts.push((*released, patients));
            }
        }
        parts.retain(|(_, part)| !part.is_empty());
        TableSets {
            sets: sets.into_values().collect(),
            valued: valued.into_values().map(|(set, _)| set).collect(),
            parts,
        }
    }

    /// The partition as stored: per part, a released flag byte, its size
    /// (u32, little-endian) and its sorted hashes.
    fn parts_to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (released, part) in &self.parts {
            bytes.push(u8::from(*released));
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            bytes.extend(len.to_le_bytes());
            bytes.extend(part.to_bytes());
        }
        bytes
    }
}

/// An earlier table's partition, as [`TableSets::parts_to_bytes`] stored
/// it, indexed by patient: each part's size, whether it was released, and
/// which part each patient is in.
struct Partition {
    parts: Vec<(bool, usize)>,
    part_of: std::collections::HashMap<u64, u32>,
}

impl Partition {
    fn from_bytes(bytes: &[u8]) -> Option<Partition> {
        let mut parts = Vec::new();
        let mut part_of = std::collections::HashMap::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (&flag, after) = rest.split_first()?;
            let len = u32::from_le_bytes(after.get(..4)?.try_into().ok()?) as usize;
            let hashes = after.get(4..4 + 8 * len)?;
            let index = u32::try_from(parts.len()).ok()?;
            for h in hashes.chunks_exact(8) {
                part_of.insert(u64::from_le_bytes(h.try_into().ok()?), index);
            }
            parts.push((flag != 0, len));
            rest = &after[4 + 8 * len..];
        }
        Some(Partition { parts, part_of })
    }

    /// How far `set` is from any union of released parts, counting no
    /// further than `limit`: the patients of each released part it splits
    /// (the smaller side), of each withheld part it holds, and outside the
    /// table. A set that close to such a union gives, with the parts' own
    /// counts, the count of what separates them.
    fn distance(&self, set: &CohortPrint, limit: usize) -> usize {
        let mut inside = vec![0usize; self.parts.len()];
        let mut outside = 0;
        for h in &set.0 {
            match self.part_of.get(h) {
                Some(part) => inside[*part as usize] += 1,
                None => {
                    outside += 1;
                    if outside >= limit {
                        return limit;
                    }
                }
            }
        }
        let mut d = outside;
        for ((released, size), inside) in self.parts.iter().zip(inside) {
            d += if *released {
                inside.min(size - inside)
            } else {
                inside
            };
            if d >= limit {
                return limit;
            }
        }
        d
    }
}

fn add(sets: &mut BTreeMap<String, (CohortPrint, bool)>, set: CohortPrint, k: usize, exact: bool) {
    if set.len() >= k {
        let entry = sets
            .entry(CohortPrint::digest(&set.to_bytes()))
            .or_insert((set, exact));
        entry.1 |= exact;
    }
}

fn print(hashes: &[i64]) -> CohortPrint {
    // Stored as the same 64 bits in a signed column.
    CohortPrint::of_hashes(hashes.iter().map(|h| *h as u64).collect())
}

/// Refuses `table` if one of its sets, not released before, differs from
/// a set released to `organisation` before by 1 to `threshold − 1`
/// patients.
pub(crate) fn check(
    store: &Store,
    organisation: &str,
    table: &TableSets,
    threshold: u32,
) -> Result<(), Error> {
    let radius = i64::from(threshold);
    let limit = threshold as usize;
    let close = |d: usize| d > 0 && d < limit;
    let refused = || Error::TooClose {
        organisation: organisation.to_owned(),
    };
    let mut new_sets = Vec::new();
    for (set, is_valued) in table
        .sets
        .iter()
        .map(|(s, _)| (s, false))
        .chain(table.valued.iter().map(|s| (s, true)))
    {
        let size = i64::try_from(set.len()).unwrap_or(i64::MAX);
        let digest = CohortPrint::digest(&set.to_bytes());
        let near = store.cells_near(organisation, size, radius)?;
        // A set given exactly before is known already: giving it again
        // says nothing new, whatever it lies beside.
        if near.iter().any(|(d, exact, _)| *exact && *d == digest) {
            continue;
        }
        for (_, _, earlier) in near {
            if set.close_to(&CohortPrint::from_bytes(&earlier), threshold) {
                return Err(refused());
            }
        }
        if !is_valued {
            new_sets.push(set);
        }
    }
    if new_sets.is_empty() {
        return Ok(());
    }
    for bytes in store.released_tables(organisation)? {
        // A partition that does not read back fails closed.
        let partition = Partition::from_bytes(&bytes).ok_or(Error::CorruptRecord)?;
        if new_sets
            .iter()
            .any(|set| close(partition.distance(set, limit)))
        {
            return Err(refused());
        }
    }
    Ok(())
}

/// Records the sets of a table released to `organisation`.
pub(crate) fn record(
    store: &Store,
    organisation: &str,
    study_id: &str,
    query_sha256: &str,
    table: &TableSets,
) -> Result<(), Error> {
    let rows: Vec<crate::store::NewReleasedCell> = table
        .sets
        .iter()
        .map(|(set, exact)| (set, *exact))
        .chain(table.valued.iter().map(|set| (set, true)))
        .map(|(set, exact)| {
            let (size, members, print_sha256) = set.stored();
            crate::store::NewReleasedCell {
                size,
                print_sha256,
                members,
                exact,
            }
        })
        .collect();
    store.record_cells(organisation, study_id, query_sha256, &rows)?;
    let parts = table.parts_to_bytes();
    let digest = CohortPrint::digest(&parts);
    store.record_table(organisation, study_id, query_sha256, &parts, &digest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> QuerySpec {
        serde_json::from_str(json).unwrap()
    }

    const BY_SEX_BAND: &str = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"count","group_by":["sex","age_band"]}}"#;
    const BY_BAND_RATE: &str = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"rate","event":{"conditions":[{"system":"x","code":"E11"}]},"group_by":["age_band"]}}"#;

    fn who(range: std::ops::Range<i64>) -> CellMembers {
        CellMembers {
            patients: range.collect(),
            ..CellMembers::default()
        }
    }

    fn sizes(t: &TableSets) -> Vec<usize> {
        let mut sizes: Vec<usize> = t.sets.iter().map(|(set, _)| set.len()).collect();
        sizes.sort_unstable();
        sizes
    }

    #[test]
    fn a_table_releases_its_released_cells_lines_and_cohort() {
        // Women 0..20 and 20..23, men 23..40 and 40..60, by sex and age
        // band; the women's 3 withheld, and the line of their band.
        let members = [who(0..20), who(20..23), who(23..40), who(40..60)];
        let cohort = print(&(0..60).collect::<Vec<_>>());
        let lines = [vec![0, 1], vec![2, 3], vec![0, 2], vec![0, 1, 2, 3]];
        let t = TableSets::of(
            &spec(BY_SEX_BAND),
            &cohort,
            &members,
            &[true, false, true, true],
            &lines,
            5,
        );
        // Cells 20, 17 and 20; lines: women 23, men 37, 40-49 37; the
        // total is the cohort, 60.
        assert_eq!(sizes(&t), [17, 20, 20, 23, 37, 37, 60]);
    }

    #[test]
    fn a_rate_releases_who_has_the_event_and_who_does_not() {
        let members = [
            CellMembers {
                patients: (0..20).collect(),
                events: (0..6).collect(),
                ..CellMembers::default()
            },
            CellMembers {
                patients: (20..40).collect(),
                events: (20..22).collect(),
                ..CellMembers::default()
            },
        ];
        let cohort = print(&(0..40).collect::<Vec<_>>());
        let t = TableSets::of(
            &spec(BY_BAND_RATE),
            &cohort,
            &members,
            &[true, false],
            &[vec![0, 1]],
            5,
        );
        // 40-49: 20, with 6, without 14; total: 40, with 8, without 32.
        // 50-59 is withheld (2 events) and its sets are not listed.
        assert_eq!(sizes(&t), [6, 8, 14, 20, 32, 40]);
        // Its partition is every cell split by the event, withheld or not.
        let parts: Vec<(bool, usize)> = t.parts.iter().map(|(r, p)| (*r, p.len())).collect();
        assert_eq!(parts, [(true, 14), (true, 6), (false, 18), (false, 2)]);
    }

    #[test]
    fn a_summary_gives_exactly_only_those_with_a_value() {
        // One cell of 30 patients, 20 with a value: n is given exactly; its
        // 30 patients and the 10 without a value are kept to compare with
        // only, so that a count of them later is checked, not waved through.
        let summary = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},"analysis":{"kind":"summary","variable":{"kind":"age"},"clip":{"min":0,"max":100}}}"#;
        let members = [CellMembers {
            patients: (0..30).collect(),
            events: (0..20).collect(),
            valued: (100..120).collect(),
        }];
        let cohort = print(&(0..30).collect::<Vec<_>>());
        let t = TableSets::of(&spec(summary), &cohort, &members, &[true], &[], 10);
        let exact: Vec<(usize, bool)> = t.sets.iter().map(|(s, e)| (s.len(), *e)).collect();
        assert_eq!(exact.len(), 3);
        assert!(exact.contains(&(20, true)));
        assert!(exact.contains(&(10, false)));
        assert!(exact.contains(&(30, false)));
        assert_eq!(t.valued.len(), 1);
    }

    #[test]
    fn a_set_near_a_union_of_released_cells_is_near_the_table() {
        // F32 60, F33 20, none 20, all released; the three with no
        // diagnosis of interest are 80..100.
        let members = [who(0..60), who(60..80), who(80..100)];
        let cohort = print(&(0..100).collect::<Vec<_>>());
        let count = spec(BY_SEX_BAND);
        let t = TableSets::of(&count, &cohort, &members, &[true; 3], &[], 10);
        let partition = Partition::from_bytes(&t.parts_to_bytes()).unwrap();
        let set = |ids: std::ops::Range<i64>| print(&ids.collect::<Vec<_>>());
        // F32 or F33, exactly: a union, nothing new.
        assert_eq!(partition.distance(&set(0..80), 10), 0);
        // Cohort "F3*": F32, F33 and two with F34 only, among "none".
        assert_eq!(partition.distance(&set(0..82), 10), 2);
        // Two patients from outside the table.
        let mut outside: Vec<i64> = (0..60).collect();
        outside.extend([500, 501]);
        assert_eq!(partition.distance(&print(&outside), 10), 2);
        // Half of "none" is as far from either side.
        assert_eq!(partition.distance(&set(0..70), 10), 10);
        // A withheld cell counts whole: F33 withheld, F32 with it gives 20.
        let t = TableSets::of(&count, &cohort, &members, &[true, false, true], &[], 10);
        let partition = Partition::from_bytes(&t.parts_to_bytes()).unwrap();
        assert_eq!(partition.distance(&set(0..80), 30), 20);
        assert_eq!(partition.distance(&set(0..63), 30), 3);
    }
}
