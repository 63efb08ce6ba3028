//! The coarser groupings of a table: what a requester learns of a table's
//! cells from the same cohort grouped by fewer dimensions.
//!
//! A table grouped by sex and age band has three coarser groupings: by sex,
//! by age band, and none (the cohort's total). Each is a table of its own
//! whose cells are sums of this table's cells, and the node would release
//! it, if asked, under the same disclosure control. So before auditing a
//! table, [`protect_with_lines`] works out what each coarser grouping releases, from
//! the coarsest up (each audited against the groupings coarser than itself),
//! and hands the result to [`protection`] as what a requester knows: a
//! released cell of a coarser grouping is a known sum, a withheld one a sum
//! known to be small or at least k. Assuming instead that every row and
//! column total is known, whatever its size, would make a small total's
//! cells look given away already, and leave them unprotected.

use std::collections::BTreeMap;

use super::Values;
use super::protection::{Audit, Counts, Known, Status, Table, Withheld};

/// One grouping of the table: its cells, each a list of the table's cells
/// (indices) it sums, with their counts and what is released of them.
struct Grouping {
    /// The dimensions kept (a bit per dimension of the table).
    kept: u32,
    sums: Vec<Vec<usize>>,
    counts: Vec<Counts>,
    status: Vec<Status>,
}

/// The table's cells grouped by the dimensions in `kept`.
fn group(keys: &[&[String]], counts: &[Counts], kept: u32) -> (Vec<Vec<usize>>, Vec<Counts>) {
    let mut by_key: BTreeMap<Vec<&str>, (Vec<usize>, Counts)> = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        let projected: Vec<&str> = key
            .iter()
            .enumerate()
            .filter(|(d, _)| kept & (1 << d) != 0)
            .map(|(_, k)| k.as_str())
            .collect();
        let entry = by_key.entry(projected).or_default();
        entry.0.push(i);
        entry.1 = entry.1.add(counts[i]);
    }
    by_key.into_values().unzip()
}

/// What the groupings in `coarser` tell of a table whose cells are `sums`
/// (each a list of base cells): their released cells as known sums and
/// their withheld ones as bounded sums, over the table's cell indices.
fn knowledge(coarser: &[&Grouping], sums: &[Vec<usize>]) -> (Vec<Known>, Vec<Withheld>) {
    let mut cell_of_base = BTreeMap::new();
    for (cell, bases) in sums.iter().enumerate() {
        for base in bases {
            cell_of_base.insert(*base, cell);
        }
    }
    let mut known = Vec::new();
    let mut withheld = Vec::new();
    for grouping in coarser {
        for ((bases, counts), status) in grouping
            .sums
            .iter()
            .zip(&grouping.counts)
            .zip(&grouping.status)
        {
            let mut cells: Vec<usize> = bases.iter().map(|b| cell_of_base[b]).collect();
            cells.sort_unstable();
            cells.dedup();
            match status {
                Status::Released => known.push(Known {
                    cells,
                    counts: *counts,
                }),
                status => withheld.push(Withheld {
                    cells,
                    small: *status == Status::Small,
                    counts: *counts,
                }),
            }
        }
    }
    (known, withheld)
}

/// [`protect_with_lines`] without the lines.
#[cfg(test)]
pub(crate) fn protect(
    keys: &[&[String]],
    counts: &[Counts],
    status: &mut [Status],
    k: u64,
    values: Values,
) -> Audit {
    protect_with_lines(keys, counts, status, k, values).0
}

/// Withholds further cells of a table (marked [`Status::Protecting`]) so
/// that, with what every coarser grouping of it releases, no small count is
/// narrowed by releasing it ([`super::protection`]). `keys`, `counts` and
/// `status` describe the cells; `status` holds the primary suppression on
/// entry and the final pattern on return. Also returns the cells of every
/// coarser grouping that grouping releases (as lists of the table's cells
/// it sums): what the node gives a requester who asks for them, and what
/// it took as known while auditing the table; none for noised tables.
///
/// Noised values are closed by known sums only, not audited: a requester
/// knows neither a noised cell nor any coarser cell exactly, so there is no
/// exact system to solve, and noise, not suppression, is what protects them.
pub(crate) fn protect_with_lines(
    keys: &[&[String]],
    counts: &[Counts],
    status: &mut [Status],
    k: u64,
    values: Values,
) -> (Audit, Vec<Vec<usize>>) {
    let dims = keys.first().map_or(0, |key| key.len());
    let full: u32 = (1 << dims) - 1;
    let base: Vec<Vec<usize>> = (0..counts.len()).map(|i| vec![i]).collect();
    if values == Values::Noised {
        let known = (0..full)
            .flat_map(|kept| {
                let (sums, counts) = group(keys, counts, kept);
                sums.into_iter()
                    .zip(counts)
                    .map(|(cells, counts)| Known { cells, counts })
            })
            .collect();
        Table::new(counts, known, Vec::new(), k).close(status);
        return (Audit::Protected, Vec::new());
    }
    // Coarsest first, so that each grouping is audited against those
    // coarser than itself.
    let mut order: Vec<u32> = (0..full).collect();
    order.sort_by_key(|kept| kept.count_ones());
    let mut groupings: Vec<Grouping> = Vec::new();
    for kept in order {
        let (sums, grouped) = group(keys, counts, kept);
        let coarser: Vec<&Grouping> = groupings
            .iter()
            .filter(|g| g.kept & kept == g.kept && g.kept != kept)
            .collect();
        let (known, withheld) = knowledge(&coarser, &sums);
        let mut grouped_status: Vec<Status> = grouped.iter().map(|c| c.primary(k)).collect();
        Table::new(&grouped, known, withheld, k).protect(&mut grouped_status);
        groupings.push(Grouping {
            kept,
            sums,
            counts: grouped,
            status: grouped_status,
        });
    }
    let coarser: Vec<&Grouping> = groupings.iter().collect();
    let (known, withheld) = knowledge(&coarser, &base);
    let audit = Table::new(counts, known, withheld, k).protect(status);
    let lines = groupings
        .into_iter()
        .flat_map(|g| {
            g.sums
                .into_iter()
                .zip(g.status)
                .filter(|(_, status)| *status == Status::Released)
                .map(|(cells, _)| cells)
        })
        .collect();
    (audit, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(rows: usize, columns: usize) -> Vec<Vec<String>> {
        (0..rows * columns)
            .map(|i| vec![format!("r{}", i / columns), format!("c{}", i % columns)])
            .collect()
    }

    /// Protects a rows x columns count table (absent cells: 0) and returns
    /// the indices of the withheld cells among those present.
    fn withheld(rows: usize, columns: usize, values: &[u64], k: u64) -> Vec<usize> {
        let keys = keys(rows, columns);
        let present: Vec<usize> = (0..values.len()).filter(|i| values[*i] > 0).collect();
        let keys: Vec<&[String]> = present.iter().map(|i| keys[*i].as_slice()).collect();
        let counts: Vec<Counts> = present
            .iter()
            .map(|i| Counts {
                patients: values[*i],
                events: None,
            })
            .collect();
        let mut status: Vec<Status> = counts.iter().map(|c| c.primary(k)).collect();
        assert_eq!(
            protect(&keys, &counts, &mut status, k, Values::Exact),
            Audit::Protected
        );
        present
            .iter()
            .zip(&status)
            .filter(|(_, s)| s.withheld())
            .map(|(i, _)| *i)
            .collect()
    }

    #[test]
    fn a_single_small_cell_needs_a_rectangle_of_cells_large_enough_to_hide_it() {
        // The small cell (4) needs partners in its row and column and the
        // fourth corner; the smallest partner in its row (11) cannot hide
        // 1..9 (4 + 11 - 10 leaves at most 5), so a larger one is taken.
        assert_eq!(withheld(2, 3, &[30, 4, 11, 20, 40, 50], 10), [0, 1, 3, 4]);
    }

    #[test]
    fn nothing_is_withheld_when_nothing_is_small() {
        assert_eq!(withheld(2, 2, &[30, 40, 50, 60], 10), Vec::<usize>::new());
    }

    #[test]
    fn a_small_row_is_withheld_by_its_own_grouping_and_hidden_here() {
        // Row r0 totals 7: the grouping by row withholds it (with r1, its
        // partner for the table's total); here its cells need partners in
        // their columns.
        assert_eq!(withheld(2, 2, &[3, 4, 50, 60], 10), [0, 1, 2, 3]);
    }

    #[test]
    fn a_small_cell_alone_in_its_column_is_not_given_away_by_the_totals() {
        // The column 90+ holds only female/90+ (3). With every row and
        // column total known it looked given away already and was left to
        // the closing step; but the grouping by column withholds 90+ and a
        // partner, and the cells of that partner's column must not be
        // released here for the difference to reveal it.
        let values = [19, 100, 20, 3, 100, 19, 20, 0];
        let got = withheld(2, 4, &values, 10);
        assert!(got.contains(&3), "{got:?}");
        // Not both cells of column c2 (20 and 20) may be released: with
        // them, total - c0 - c1 - c2 is 90+.
        assert!(got.contains(&2) || got.contains(&6), "{got:?}");
    }

    #[test]
    fn a_rate_cell_with_few_events_hides_its_events_among_its_partners() {
        let values = [(50, 3), (60, 40), (45, 30), (55, 30), (70, 50), (65, 35)];
        let keys = keys(2, 3);
        let keys: Vec<&[String]> = keys.iter().map(Vec::as_slice).collect();
        let counts: Vec<Counts> = values
            .iter()
            .map(|(n, e)| Counts {
                patients: *n,
                events: Some(*e),
            })
            .collect();
        let mut status: Vec<Status> = counts.iter().map(|c| c.primary(10)).collect();
        assert_eq!(status[0], Status::FewEvents);
        assert_eq!(
            protect(&keys, &counts, &mut status, 10, Values::Exact),
            Audit::Protected
        );
        assert!(
            status.iter().filter(|s| s.withheld()).count() >= 4,
            "{status:?}"
        );
    }

    #[test]
    fn a_table_past_the_work_limit_is_withheld_whole() {
        let counts: Vec<Counts> = [30u64, 4, 11, 20, 40, 50]
            .iter()
            .map(|n| Counts {
                patients: *n,
                events: None,
            })
            .collect();
        let mut status: Vec<Status> = counts.iter().map(|c| c.primary(10)).collect();
        let known = vec![Known {
            cells: (0..6).collect(),
            counts: counts.iter().fold(Counts::default(), |a, c| a.add(*c)),
        }];
        let audit = Table::new(&counts, known, Vec::new(), 10)
            .with_limit(1)
            .protect(&mut status);
        assert_eq!(audit, Audit::TooLarge);
        assert!(status.iter().all(|s| s.withheld()), "{status:?}");
    }
}
