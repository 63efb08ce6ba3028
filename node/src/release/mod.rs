//! Disclosure control at the node: suppression and secondary suppression
//! of a table ([`ghx_disclosure`], shared with the coordinator's pooled
//! release) and every note a released result carries beside its cells,
//! each in aggregate terms only.

use ghx_study::query::{Analysis, QuerySpec};
use ghx_study::result::AggregateResult;

use crate::consent::eligibility::Summary;
pub use ghx_disclosure::{Candidate, release};
pub(crate) use ghx_disclosure::{Values, release_with_lines};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
