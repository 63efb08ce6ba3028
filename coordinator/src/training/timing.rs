//! Where a round's time goes, seen from the coordinator: the nodes'
//! computations on its time line ([`Computation`]), each answer's split
//! ([`AnswerTimes`]) and the round's steps ([`StepTimes`]).

use ghx_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// One node's local computation placed on the coordinator's time line:
/// seconds after an origin of the coordinator's choosing. The node says
/// when, after its handler received the request, it started computing and
/// for how long, and how long its handler held the request; the time the
/// call took beyond that is taken as spent equally on the way there and
/// back (as NTP does), so the clocks of the two machines need not agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Computation {
    pub start: f64,
    pub end: f64,
}

impl Computation {
    /// The computation of a call sent `sent` and answered `back` (both
    /// measured from the origin, s) whose answer says `m`.
    pub fn placed(sent: f64, back: f64, m: &pb::RoundMaskedInputResponse) -> Computation {
        let handled = m.handled_micros as f64 / 1e6;
        let way = ((back - sent) - handled).max(0.0) / 2.0;
        let start = (sent + way + m.local_started_micros as f64 / 1e6).min(back);
        let end = (start + m.local_micros as f64 / 1e6).min(back);
        Computation { start, end }
    }

    /// The longest of `computations` (the slowest node's), s.
    pub fn longest(computations: &[Computation]) -> f64 {
        computations
            .iter()
            .map(|c| c.end - c.start)
            .fold(0.0, f64::max)
    }

    /// The length of the union of `computations`: the time during which at
    /// least one of them ran.
    pub fn busy_seconds(computations: &[Computation]) -> f64 {
        let mut spans: Vec<(f64, f64)> = computations.iter().map(|c| (c.start, c.end)).collect();
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut busy = 0.0;
        let mut open: Option<(f64, f64)> = None;
        for (start, end) in spans {
            open = match open {
                Some((s, e)) if start <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    busy += e - s;
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        busy + open.map(|(s, e)| e - s).unwrap_or(0.0)
    }
}

/// Wall time at the coordinator of a round's steps, ms: see
/// [`crate::training::RoundRecord::steps_ms`]. Stored and sent as the list
/// of four it always was (older coordinators and clients read it); a named
/// form is read too.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "StoredSteps", into = "[f64; 4]")]
pub struct StepTimes {
    /// Opening the run's session on the round's path (or, outside a
    /// session, agreeing the round's keys).
    pub open_ms: f64,
    /// The masked input, the nodes' local computation included.
    pub masked_ms: f64,
    /// Unmasking (none in a session).
    pub unmask_ms: f64,
    /// The rest of the round's time.
    pub rest_ms: f64,
}

impl From<StepTimes> for [f64; 4] {
    fn from(t: StepTimes) -> [f64; 4] {
        t.to_array()
    }
}

impl StepTimes {
    /// In the order the fields are listed, for tables.
    pub fn to_array(self) -> [f64; 4] {
        [self.open_ms, self.masked_ms, self.unmask_ms, self.rest_ms]
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StoredSteps {
    Named {
        open_ms: f64,
        masked_ms: f64,
        unmask_ms: f64,
        rest_ms: f64,
    },
    Listed([f64; 4]),
}

impl From<StoredSteps> for StepTimes {
    fn from(stored: StoredSteps) -> StepTimes {
        match stored {
            StoredSteps::Named {
                open_ms,
                masked_ms,
                unmask_ms,
                rest_ms,
            } => StepTimes {
                open_ms,
                masked_ms,
                unmask_ms,
                rest_ms,
            },
            StoredSteps::Listed([open_ms, masked_ms, unmask_ms, rest_ms]) => StepTimes {
                open_ms,
                masked_ms,
                unmask_ms,
                rest_ms,
            },
        }
    }
}

/// Where one answer to a round spent its time, ms (see [`AnswerTimes`]).
/// Stored and sent as the list of three it always was; a named form is
/// read too.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "StoredSplit", into = "[f64; 3]")]
pub struct AnswerSplit {
    /// On the wire and in the layers carrying the call both ways.
    pub outside_ms: f64,
    /// In the node's handler before its local computation (admission,
    /// checks).
    pub before_ms: f64,
    /// In the handler after it (masking, the audit write, the answer).
    pub after_ms: f64,
}

impl From<AnswerSplit> for [f64; 3] {
    fn from(t: AnswerSplit) -> [f64; 3] {
        t.to_array()
    }
}

impl AnswerSplit {
    /// In the order the fields are listed, for tables.
    pub fn to_array(self) -> [f64; 3] {
        [self.outside_ms, self.before_ms, self.after_ms]
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StoredSplit {
    Named {
        outside_ms: f64,
        before_ms: f64,
        after_ms: f64,
    },
    Listed([f64; 3]),
}

impl From<StoredSplit> for AnswerSplit {
    fn from(stored: StoredSplit) -> AnswerSplit {
        match stored {
            StoredSplit::Named {
                outside_ms,
                before_ms,
                after_ms,
            }
            | StoredSplit::Listed([outside_ms, before_ms, after_ms]) => AnswerSplit {
                outside_ms,
                before_ms,
                after_ms,
            },
        }
    }
}

/// Where a node's answer to a round spent its time, seen from the
/// coordinator: on the wire and in the layers carrying it both ways
/// (the call's time outside the node's handler), and in the node's
/// handler before and after its local computation (admission and checks;
/// masking, the audit write and handing the answer back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerTimes {
    /// When the answer was back, s from the round's origin.
    pub back: f64,
    pub ms: AnswerSplit,
}

impl AnswerTimes {
    /// The answer `m` to a call sent `sent` and answered `back` (s from
    /// the round's origin).
    pub fn of(sent: f64, back: f64, m: &pb::RoundMaskedInputResponse) -> AnswerTimes {
        let handled = m.handled_micros as f64 / 1e3;
        let before = (m.local_started_micros as f64 / 1e3).min(handled);
        let after = (handled - before - m.local_micros as f64 / 1e3).max(0.0);
        let outside = ((back - sent) * 1e3 - handled).max(0.0);
        AnswerTimes {
            back,
            ms: AnswerSplit {
                outside_ms: outside,
                before_ms: before,
                after_ms: after,
            },
        }
    }

    /// The times of the answer that came back last; zeros for none.
    pub fn of_last(answers: &[AnswerTimes]) -> AnswerSplit {
        answers
            .iter()
            .max_by(|a, b| a.back.total_cmp(&b.back))
            .map(|a| a.ms)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(started_us: u64, local_us: u64, handled_us: u64) -> pb::RoundMaskedInputResponse {
        pb::RoundMaskedInputResponse {
            local_started_micros: started_us,
            local_micros: local_us,
            handled_micros: handled_us,
            ..Default::default()
        }
    }

    #[test]
    fn the_last_answer_is_split_into_transport_and_handler_before_and_after() {
        // Sent at 1 s, back at 1.010 s, held 6 ms by the handler, which
        // computed from 1 ms to 5 ms into that.
        let first = AnswerTimes::of(1.0, 1.010, &answer(1_000, 4_000, 6_000));
        assert_eq!(first.back, 1.010);
        for (got, want) in first.ms.to_array().iter().zip([4.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-9, "{first:?}");
        }
        // Sent later but back last: its times are the round's.
        let last = AnswerTimes::of(1.002, 1.012, &answer(500, 8_000, 9_000));
        let ms = AnswerTimes::of_last(&[last, first]);
        for (got, want) in ms.to_array().iter().zip([1.0, 0.5, 0.5]) {
            assert!((got - want).abs() < 1e-9, "{ms:?}");
        }
        assert_eq!(AnswerTimes::of_last(&[]), AnswerSplit::default());
        // A handler that claims to have computed longer than it held the
        // request is read as no time after computing, never negative.
        let odd = AnswerTimes::of(0.0, 0.001, &answer(200, 5_000, 300));
        assert_eq!(odd.ms.after_ms, 0.0);
    }

    #[test]
    fn a_computation_is_placed_halfway_through_the_transport() {
        // Sent at 1 s, back at 1.010 s; the handler held it 6 ms and
        // computed from 1 ms to 5 ms into that: 2 ms each way.
        let c = Computation::placed(1.0, 1.010, &answer(1_000, 4_000, 6_000));
        assert!((c.start - 1.003).abs() < 1e-12, "{c:?}");
        assert!((c.end - 1.007).abs() < 1e-12, "{c:?}");
        // A node claiming more than the call took stays inside the call.
        let c = Computation::placed(1.0, 1.010, &answer(9_000, 40_000, 60_000));
        assert!(
            c.start <= 1.010 && c.end <= 1.010 && c.start >= 1.0,
            "{c:?}"
        );
    }

    #[test]
    fn busy_time_is_the_union_of_the_computations() {
        let c = |start, end| Computation { start, end };
        assert_eq!(Computation::busy_seconds(&[]), 0.0);
        let busy = Computation::busy_seconds(&[c(2.0, 5.0), c(1.0, 3.0), c(7.0, 8.0), c(7.2, 7.5)]);
        assert!((busy - 5.0).abs() < 1e-12, "{busy}");
        // Touching spans join; a span inside another adds nothing.
        let busy = Computation::busy_seconds(&[c(0.0, 1.0), c(1.0, 2.0), c(0.5, 0.7)]);
        assert!((busy - 2.0).abs() < 1e-12, "{busy}");
        assert!((Computation::longest(&[c(0.0, 1.0), c(0.5, 2.5)]) - 2.0).abs() < 1e-12);
        assert_eq!(Computation::longest(&[]), 0.0);
    }
}

#[cfg(test)]
mod stored {
    use super::*;

    #[test]
    fn times_are_stored_as_the_lists_they_were() {
        let old: StepTimes = serde_json::from_str("[1.0, 2.0, 3.0, 4.0]").unwrap();
        assert_eq!(old.masked_ms, 2.0);
        assert_eq!(serde_json::to_string(&old).unwrap(), "[1.0,2.0,3.0,4.0]");
        let named: StepTimes = serde_json::from_str(
            r#"{"open_ms":1.0,"masked_ms":2.0,"unmask_ms":3.0,"rest_ms":4.0}"#,
        )
        .unwrap();
        assert_eq!(named, old);
        let split: AnswerSplit = serde_json::from_str("[0.5, 0.25, 0.125]").unwrap();
        assert_eq!(split.before_ms, 0.25);
        assert_eq!(serde_json::to_string(&split).unwrap(), "[0.5,0.25,0.125]");
    }
}
