//! The monthly review: per requester and per study, what was asked, answered
//! and refused, what left, and the privacy budget spent, as a Markdown
//! document the steering committee reads.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::{Decision, Entry};

/// Counts for one requester or one study.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub requests: usize,
    pub answered: usize,
    pub refused: usize,
    pub cells_released: i64,
    pub epsilon: f64,
    pub studies: std::collections::BTreeSet<String>,
    /// Distinct refusal reasons with how often each was given.
    pub refusals: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, e: &Entry) {
        self.requests += 1;
        match Decision::parse(&e.decision) {
            Some(Decision::Answered) => {
                self.answered += 1;
                self.cells_released += e.result_cells;
            }
            Some(Decision::Refused) => {
                self.refused += 1;
                *self.refusals.entry(e.reason.clone()).or_default() += 1;
            }
            _ => {}
        }
        self.epsilon += e.epsilon;
        if !e.study_id.is_empty() {
            self.studies.insert(e.study_id.clone());
        }
    }
}

/// The review of one log over one period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Review {
    pub by_requester: BTreeMap<String, Tally>,
    pub by_study: BTreeMap<String, Tally>,
}

/// Who a request is counted against: the requester its capability names,
/// else the caller.
fn requester_of(e: &Entry) -> String {
    if e.requester.is_empty() {
        match e.caller_org.as_str() {
            "" => e.caller.clone(),
            org => format!("{} ({org})", e.caller),
        }
    } else {
        match e.requester_org.as_str() {
            "" => e.requester.clone(),
            org => format!("{} ({org})", e.requester),
        }
    }
}

/// Tallies the requests in `entries`: data requests at a node, or the
/// coordinator's dispatches (one per node) and committee steps.
pub fn review(entries: &[Entry]) -> Review {
    let mut out = Review::default();
    for e in entries {
        out.by_requester.entry(requester_of(e)).or_default().add(e);
        let study = if e.study_id.is_empty() {
            "(no study)".to_owned()
        } else {
            e.study_id.clone()
        };
        out.by_study.entry(study).or_default().add(e);
    }
    out
}

/// The review as Markdown, titled for `keeper` and `period`.
pub fn render(keeper: &str, period: &str, review: &Review) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Access review: {keeper}, {period}\n");
    let total: usize = review.by_requester.values().map(|t| t.requests).sum();
    let refused: usize = review.by_requester.values().map(|t| t.refused).sum();
    let _ = writeln!(
        out,
        "{total} audited requests, {refused} refused, from {} requesters across {} studies.\n",
        review.by_requester.len(),
        review.by_study.len()
    );
    let table = |out: &mut String, heading: &str, rows: &BTreeMap<String, Tally>| {
        let _ = writeln!(out, "## By {heading}\n");
        let _ = writeln!(
            out,
            "| {heading} | requests | answered | refused | cells released | epsilon spent | studies |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
        for (name, t) in rows {
            let studies: Vec<&str> = t.studies.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {:.3} | {} |",
                t.requests,
                t.answered,
                t.refused,
                t.cells_released,
                t.epsilon,
                studies.join(", ")
            );
        }
        out.push('\n');
    };
    table(&mut out, "requester", &review.by_requester);
    table(&mut out, "study", &review.by_study);
    let refusals: Vec<(&String, &Tally)> = review
        .by_requester
        .iter()
        .filter(|(_, t)| !t.refusals.is_empty())
        .collect();
    if !refusals.is_empty() {
        let _ = writeln!(out, "## Refusals\n");
        for (name, t) in refusals {
            for (reason, n) in &t.refusals {
                let _ = writeln!(out, "- {name}: {n} × {reason}");
            }
        }
        out.push('\n');
    }
    out
}

/// The calendar month `YYYY-MM` as a half-open UTC period.
pub fn month(text: &str) -> Option<(time::OffsetDateTime, time::OffsetDateTime)> {
    let (year, month) = text.split_once('-')?;
    let year: i32 = year.parse().ok()?;
    let month = time::Month::try_from(month.parse::<u8>().ok()?).ok()?;
    let start = time::Date::from_calendar_date(year, month, 1).ok()?;
    let (next_year, next_month) = if month == time::Month::December {
        (year + 1, time::Month::January)
    } else {
        (year, month.next())
    };
    let end = time::Date::from_calendar_date(next_year, next_month, 1).ok()?;
    Some((start.midnight().assume_utc(), end.midnight().assume_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_counts_per_requester_and_study() {
        let e = |requester: &str, study: &str, decision: Decision, eps: f64| Entry {
            requester: requester.into(),
            requester_org: "Org".into(),
            study_id: study.into(),
            decision: decision.into(),
            reason: if decision == Decision::Refused {
                "budget spent".into()
            } else {
                String::new()
            },
            result_cells: if decision == Decision::Answered { 3 } else { 0 },
            epsilon: eps,
            ..Entry::default()
        };
        let entries = vec![
            e("alice", "s1", Decision::Answered, 0.5),
            e("alice", "s1", Decision::Refused, 0.0),
            e("bob", "s2", Decision::Answered, 0.0),
        ];
        let r = review(&entries);
        let alice = &r.by_requester["alice (Org)"];
        assert_eq!(
            (alice.requests, alice.answered, alice.refused),
            (3 - 1, 1, 1)
        );
        assert_eq!(alice.cells_released, 3);
        assert!((alice.epsilon - 0.5).abs() < 1e-12);
        assert_eq!(r.by_study["s2"].answered, 1);
        let text = render("chonnam", "2026-11", &r);
        assert!(
            text.contains("| alice (Org) | 2 | 1 | 1 | 3 | 0.500 | s1 |"),
            "{text}"
        );
        assert!(text.contains("alice (Org): 1 × budget spent"), "{text}");
    }

    #[test]
    fn months_are_calendar_months() {
        let (from, to) = month("2026-12").unwrap();
        assert_eq!(
            (from.year(), to.year(), to.month()),
            (2026, 2027, time::Month::January)
        );
        assert!(month("2026-13").is_none());
        assert!(month("November").is_none());
    }
}
