//! Disclosure control: the only way raw counts become releasable results.
//!
//! Every cell whose count is below the node's minimum cell size is replaced
//! by a suppression marker before anything leaves the node, and enough other
//! cells are withheld with it that the released cells, with what every
//! coarser grouping of the same cohort releases, tell a requester no more of
//! a small count than those groupings alone would (secondary suppression:
//! [`groupings`] works out the coarser releases, [`protection`] audits one
//! table by linear programming). The notes say, in aggregate terms only,
//! how many cells were withheld and why.

use ghx_study::query::{Analysis, QuerySpec};
use ghx_study::result::{AggregateResult, Cell, CellValue, Moments, RateCounts};

use crate::consent::eligibility::Summary;
use crate::engine::{Raw, RawCell};
use protection::{Audit, Counts, Status};

mod groupings;
mod protection;

/// Whether a result's values are exact or noised: a noised result carries
/// no exact number of patients anywhere, notes included, since an exact
/// count beside noised cells is what the noise was meant to hide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Values {
    Exact,
    Noised,
}

impl Values {
    pub(crate) fn of(spec: &QuerySpec) -> Values {
        match spec.noise {
            Some(_) => Values::Noised,
            None => Values::Exact,
        }
    }
}

/// A number of patients as a note shows it: "fewer than k" below the
/// minimum cell size, and no number at all in a noised result.
fn shown(n: u64, min_cell_size: u32, values: Values) -> String {
    match values {
        Values::Noised => "some".to_owned(),
        Values::Exact if n > 0 && n < u64::from(min_cell_size) => {
            format!("fewer than {min_cell_size}")
        }
        Values::Exact => n.to_string(),
    }
}

/// A node-wide number as a consent note shows it in an exact result: the
/// band of `step` it lies in ("1500-1599"), "fewer than `step`" below it.
/// Exact totals, compared between two results, would say that one more
/// patient withdrew (or was imported); a band changes only at its edges.
fn band(n: u64, step: u64) -> String {
    if step <= 1 {
        // A minimum cell size of 1 protects nothing to begin with.
        return n.to_string();
    }
    if n < step {
        return format!("fewer than {step}");
    }
    let low = n - n % step;
    format!("{low}-{}", low + step - 1)
}

/// Patients of the node, banded by this many in consent notes (as
/// `GetNodeInfo` rounds resource counts).
const PATIENT_BAND: u64 = 100;

/// What consent excluded, in aggregate form: totals over the whole node
/// (not the cohort), each in a band (of the minimum cell size for
/// exclusions, of [`PATIENT_BAND`] for the node's patients), and in a
/// noised result only the reasons.
pub(crate) fn consent_note(summary: &Summary, min_cell_size: u32, values: Values) -> String {
    let k = u64::from(min_cell_size);
    let total = summary.excluded_total();
    let patients = band(summary.patients, PATIENT_BAND);
    if total == 0 {
        return match values {
            Values::Noised => "consent: no patients excluded".to_owned(),
            Values::Exact => format!("consent: none of {patients} patients excluded"),
        };
    }
    let reasons: Vec<String> = summary
        .excluded
        .iter()
        .map(|(why, n)| match values {
            Values::Noised => why.describe().to_string(),
            Values::Exact => format!("{} {}", why.describe(), band(*n, k)),
        })
        .collect();
    match values {
        Values::Noised => format!("consent: some patients excluded ({})", reasons.join("; ")),
        Values::Exact => format!(
            "consent: {} of {patients} patients excluded ({})",
            band(total, k),
            reasons.join("; ")
        ),
    }
}

/// What a result says beside its cells, gathered along the pipeline:
/// [`annotate`] writes it.
#[derive(Debug)]
pub(crate) struct Notes<'a> {
    /// The access policy's decision, summarised.
    pub access: String,
    /// What consent decided node-wide for the request.
    pub consent: &'a Summary,
    /// The cohort's patients with and without a value of the analysis's
    /// variable (for a summary, those with a value are its events).
    pub values: (u64, u64),
    /// Under noise: the noise's statement, and the budget note of its
    /// charge.
    pub noise: Option<(ghx_study::result::NoiseStatement, String)>,
    /// Codes of the query that match nothing here for the system they are
    /// in ([`crate::coding`]).
    pub coding: Vec<String>,
}

/// `result` as released with every note: access and consent first, then
/// the suppression notes [`release`] wrote, the noise's statement and its
/// charge, then what reading the analysis needs ([`analysis_notes`]).
pub(crate) fn annotate(
    mut result: AggregateResult,
    spec: &QuerySpec,
    notes: Notes<'_>,
    min_cell_size: u32,
) -> AggregateResult {
    let mut all = vec![
        format!("access: {}", notes.access),
        consent_note(notes.consent, min_cell_size, Values::of(spec)),
    ];
    all.extend(notes.coding);
    all.append(&mut result.notes);
    if let Some((statement, paid)) = notes.noise {
        all.push(format!(
            "noise: {} mechanism, epsilon {}{} ({})",
            statement.mechanism,
            statement.epsilon,
            if statement.delta > 0.0 {
                format!(", delta {:e}", statement.delta)
            } else {
                String::new()
            },
            statement.detail
        ));
        all.push(paid);
        result.noise = Some(statement);
    }
    all.extend(analysis_notes(spec, notes.values, min_cell_size));
    result.notes = all;
    result
}

/// What a requester needs to read the analysis's numbers right, in
/// aggregate terms: patients left out for lack of a value (shown as "fewer
/// than" below the minimum cell size, and without a number under noise or
/// when those with a value are fewer than it: the cohort's size less it
/// would give them) and how extremes are protected.
pub(crate) fn analysis_notes(
    spec: &QuerySpec,
    (with_value, without_value): (u64, u64),
    min_cell_size: u32,
) -> Vec<String> {
    let values = Values::of(spec);
    let mut notes = Vec::new();
    if matches!(
        spec.analysis,
        Analysis::Summary { .. } | Analysis::Histogram { .. }
    ) && without_value > 0
    {
        let few_with = with_value > 0 && with_value < u64::from(min_cell_size);
        let shown = match values {
            Values::Exact if few_with => "some".to_owned(),
            _ => shown(without_value, min_cell_size, values),
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
        match values {
            Values::Noised => notes.push("min and max: not released under noise".to_owned()),
            Values::Exact => notes.push(format!(
                "min and max: the {min_cell_size}th smallest and largest value of each cell, so that at least {min_cell_size} patients share each side (not released for cells of fewer than {} patients)",
                2 * min_cell_size - 1
            )),
        }
    }
    notes
}

/// Why a released cell is withheld.
const PRIMARY: &str = "count below the minimum cell size";
const FEW_EVENTS: &str = "fewer events (or non-events) than the minimum cell size";
const FEW_VALUES: &str = "fewer patients with (or without) a value than the minimum cell size";
const COMPLEMENTARY: &str =
    "withheld to protect a suppressed cell in the same row, column or total";

/// A cell's value as it would be released, before suppression: exact, or
/// noised by [`crate::noise`].
#[derive(Debug, Clone, PartialEq)]
pub enum Candidate {
    Count(u64),
    /// A summary, and the cell's patients without a value when exact
    /// ([`Candidate::lacking`]): then the cell is held, like a rate, to
    /// k or more (or none) on each side, since a count of the same cell
    /// less its n would give those without a value.
    Summary(Moments, Option<u64>),
    Rate(RateCounts),
}

impl Candidate {
    fn patients(&self) -> u64 {
        match self {
            Candidate::Count(n) => *n,
            Candidate::Summary(m, lacking) => m.n + lacking.unwrap_or(0),
            Candidate::Rate(r) => r.population,
        }
    }

    /// The additive counts a requester could learn line totals of.
    fn counts(&self) -> Counts {
        Counts {
            patients: self.patients(),
            events: match self {
                Candidate::Rate(r) => Some(r.events),
                Candidate::Summary(m, Some(_)) => Some(m.n),
                _ => None,
            },
        }
    }

    /// A summary candidate told how many of its cell's patients have no
    /// value; anything else as it is.
    pub fn lacking(self, lacking: u64) -> Candidate {
        match self {
            Candidate::Summary(m, _) => Candidate::Summary(m, Some(lacking)),
            other => other,
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
                Candidate::Summary(m, None)
            }
        }
    }
}

/// Applies small-cell suppression to candidate values, then secondary
/// suppression audited by linear programming ([`protection`]) so that
/// nothing released about the table (its cells, and every row, column or
/// table total another query of the same cohort could ask for) narrows what
/// a requester can know of a suppressed cell. A rate cell is also
/// suppressed when its events, or its patients without the event, are
/// fewer than the minimum cell size but not zero; so is an exact summary's
/// cell whose patients with a value, or without one, are
/// ([`Candidate::lacking`]).
pub fn release(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    candidates: Vec<Candidate>,
    min_cell_size: u32,
) -> AggregateResult {
    release_with_lines(node_id, spec, raw, candidates, min_cell_size).0
}

/// [`release`], and the line totals (lists of the table's cells, by index)
/// the node would release of the table's coarser groupings if asked: with
/// the released cells, what differencing records of the table
/// ([`crate::differencing::cells`]).
pub(crate) fn release_with_lines(
    node_id: &str,
    spec: &QuerySpec,
    raw: Vec<RawCell>,
    candidates: Vec<Candidate>,
    min_cell_size: u32,
) -> (AggregateResult, Vec<Vec<usize>>) {
    let threshold = u64::from(min_cell_size);
    let total = raw.len();
    let mut status: Vec<Status> = candidates
        .iter()
        .map(|c| c.counts().primary(threshold))
        .collect();
    let primary = status.iter().filter(|s| **s == Status::Small).count();
    let one_sided = status.iter().filter(|s| **s == Status::FewEvents).count();
    let counts: Vec<Counts> = candidates.iter().map(Candidate::counts).collect();
    let (audit, lines) = protect_canonically(spec, &raw, &counts, &mut status, threshold);
    let complementary = status.iter().filter(|s| **s == Status::Protecting).count();
    let cells = raw
        .into_iter()
        .zip(candidates)
        .zip(&status)
        .map(|((cell, candidate), status)| Cell {
            key: cell.key,
            value: match status {
                Status::Small => CellValue::Suppressed {
                    reason: format!("{PRIMARY} of {min_cell_size}"),
                },
                Status::FewEvents => CellValue::Suppressed {
                    reason: match spec.analysis {
                        Analysis::Summary { .. } => FEW_VALUES,
                        _ => FEW_EVENTS,
                    }
                    .to_owned(),
                },
                Status::Protecting => CellValue::Suppressed {
                    reason: COMPLEMENTARY.to_owned(),
                },
                Status::Released => match candidate {
                    Candidate::Count(n) => CellValue::Count(n),
                    Candidate::Summary(m, _) => CellValue::Summary(m),
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
    if one_sided > 0 {
        let reason = match spec.analysis {
            Analysis::Summary { .. } => FEW_VALUES,
            _ => FEW_EVENTS,
        };
        notes.push(format!("{one_sided} of {total} cells suppressed: {reason}"));
    }
    if complementary > 0 {
        notes.push(format!(
            "{complementary} more cells {COMPLEMENTARY} (complementary suppression)"
        ));
    }
    if audit == Audit::TooLarge {
        notes.push(
            "every cell withheld: this table has too many small cells for disclosure control to show each one protected; coarsen its grouping or bins".to_owned()
        );
    }
    let result = AggregateResult {
        node_id: node_id.to_owned(),
        dimensions: spec.key_names(),
        cells,
        min_cell_size,
        notes,
        analysis: spec.kind().to_owned(),
        noise: None,
    };
    (result, lines)
}

/// Runs [`groupings::protect_with_lines`] over the table in a canonical form, so that
/// the same table asked another way (dimensions in another order,
/// diagnosis groups listed in another order or under other labels) gets
/// the same suppression: otherwise two patterns of one table could be
/// combined. Dimensions are taken in order of name, and each cell is keyed
/// by what it holds (a diagnosis group by its system, match and sorted
/// codes, not its label) and visited in that key's order.
fn protect_canonically(
    spec: &QuerySpec,
    raw: &[RawCell],
    counts: &[Counts],
    status: &mut [Status],
    threshold: u64,
) -> (Audit, Vec<Vec<usize>>) {
    let names = spec.key_names();
    let mut dims: Vec<usize> = (0..names.len()).collect();
    dims.sort_by(|a, b| names[*a].cmp(&names[*b]));
    let groups: std::collections::BTreeMap<&str, String> = spec
        .dimensions()
        .iter()
        .filter_map(|d| match d {
            ghx_study::query::Dimension::Diagnosis { diagnosis } => Some(diagnosis),
            _ => None,
        })
        .flatten()
        .map(|g| {
            let mut codes = g.codes.clone();
            codes.sort();
            let canonical = format!("{}|{:?}|{}", g.system, g.matching, codes.join(","));
            (g.label.as_str(), canonical)
        })
        .collect();
    let canonical = |key: &[String]| -> Vec<String> {
        dims.iter()
            .map(|d| {
                let value = &key[*d];
                match (names[*d].as_str(), groups.get(value.as_str())) {
                    ("diagnosis", Some(canonical)) => canonical.clone(),
                    _ => value.clone(),
                }
            })
            .collect()
    };
    let keys: Vec<Vec<String>> = raw.iter().map(|c| canonical(&c.key)).collect();
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    let sorted_keys: Vec<&[String]> = order.iter().map(|i| keys[*i].as_slice()).collect();
    let sorted_counts: Vec<Counts> = order.iter().map(|i| counts[*i]).collect();
    let mut sorted_status: Vec<Status> = order.iter().map(|i| status[*i]).collect();
    let (audit, lines) = groupings::protect_with_lines(
        &sorted_keys,
        &sorted_counts,
        &mut sorted_status,
        threshold,
        Values::of(spec),
    );
    for (position, i) in order.iter().enumerate() {
        status[*i] = sorted_status[position];
    }
    let lines = lines
        .into_iter()
        .map(|cells| cells.into_iter().map(|position| order[position]).collect())
        .collect();
    (audit, lines)
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
    fn a_two_way_table_withholds_a_rectangle_whose_partners_can_hide_the_small_cell() {
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
        // female/50-59 (4) takes a partner of at least 2k - 1 = 19 in its
        // row (25, not 30) and in its column (40); then 60-69 needs one
        // more (male, 50). Moving patients around that rectangle, the small
        // cell can be anything from 1 to 9 for all the totals say.
        assert_eq!(
            hidden,
            ["female/50-59", "female/60-69", "male/50-59", "male/60-69"]
        );
    }

    #[test]
    fn notes_say_how_many_lack_a_value_without_revealing_small_numbers() {
        let spec = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
                 "analysis":{"kind":"summary","variable":{"kind":"age"},"clip":{"min":0,"max":100}}}"#,
        )
        .unwrap();
        let notes = analysis_notes(&spec, (50, 3), 10);
        assert_eq!(
            notes[0],
            "values: fewer than 10 patients of the cohort have no value of the variable and are not included"
        );
        assert_eq!(notes[1], "values: clipped to [0, 100] before any statistic");
        assert!(notes[2].starts_with("min and max: the 10th smallest"));
        let notes = analysis_notes(&spec, (50, 42), 10);
        assert!(notes[0].starts_with("values: 42 patients"));
        // With 3 patients with a value, 42 without would give them away
        // beside the cohort's size.
        let notes = analysis_notes(&spec, (3, 42), 10);
        assert!(notes[0].starts_with("values: some patients"), "{notes:?}");
        // Issue 38 (5): a noised result carries no exact count.
        let noised = QuerySpec::parse(
            br#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01"},
                 "analysis":{"kind":"summary","variable":{"kind":"age"},"clip":{"min":0,"max":100}},
                 "noise":{"mechanism":"laplace","epsilon":1.0}}"#,
        )
        .unwrap();
        let notes = analysis_notes(&noised, (50, 42), 10);
        assert_eq!(
            notes[0],
            "values: some patients of the cohort have no value of the variable and are not included"
        );
        assert_eq!(notes[2], "min and max: not released under noise");
    }

    #[test]
    fn consent_notes_band_node_wide_totals_so_one_withdrawal_rarely_shows() {
        use crate::consent::Exclusion;
        let summary = |withdrawn: u64, patients: u64| Summary {
            patients,
            included: patients - withdrawn - 4,
            excluded: [(Exclusion::Withdrawn, withdrawn), (Exclusion::NoConsent, 4)]
                .into_iter()
                .collect(),
        };
        let note = |s: &Summary| consent_note(s, 10, Values::Exact);
        assert_eq!(
            note(&summary(23, 1543)),
            "consent: 20-29 of 1500-1599 patients excluded (no research consent (opt-in hospital) fewer than 10; consent withdrawn 20-29)"
        );
        // One more withdrawal inside a band: the same note.
        assert_eq!(note(&summary(24, 1543)), note(&summary(23, 1543)));
        assert_eq!(
            consent_note(&summary(23, 1543), 10, Values::Noised),
            "consent: some patients excluded (no research consent (opt-in hospital); consent withdrawn)"
        );
        let none = Summary {
            patients: 64,
            included: 64,
            excluded: Default::default(),
        };
        assert_eq!(
            note(&none),
            "consent: none of fewer than 100 patients excluded"
        );
    }

    #[test]
    fn extremes_are_kth_values_and_withheld_when_they_would_cross() {
        let cell = |n: usize| RawCell {
            key: vec![],
            value: Raw::Values((1..=n).map(|v| v as f64).collect()),
        };
        let extremes = |n| match Candidate::exact(&cell(n), 10) {
            Candidate::Summary(m, _) => (m.min, m.max),
            other => panic!("{other:?}"),
        };
        assert_eq!(extremes(25), (Some(10.0), Some(16.0)));
        assert_eq!(extremes(20), (Some(10.0), Some(11.0)));
        assert_eq!(extremes(19), (Some(10.0), Some(10.0)));
        assert_eq!(extremes(18), (None, None));
        assert_eq!(extremes(3), (None, None));
    }
}
