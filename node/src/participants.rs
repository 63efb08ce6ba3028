//! Which sets of nodes this node sums its values with in secure
//! aggregation.
//!
//! Secure aggregation hides each node's values inside a sum, but two sums
//! of the same kind of value over sets of nodes that differ give away what
//! the difference contributed: moments over {A, B, C} and over {A, B} are
//! C's moments, and a coordinator that claims C dropped out and redoes a
//! round among the rest learns C's update. So this node
//!
//! - sums only over at least `min_participants` nodes (three by default:
//!   with two, either learns the other's values from the sum);
//! - when the federation's members are configured, only with them (a node
//!   certificate made up by whoever runs the CA cannot join a sum as a
//!   node whose values the coordinator knows);
//! - sums a study's values over one set of nodes only: the set is bound,
//!   in the node's database, when it first contributes to one of the
//!   study's rounds, and any later round or session of the study keyed
//!   over another set is refused, a redo over the same set allowed;
//! - unmasks a one-off round only for every node it was keyed with
//!   (unmasking for the survivors of a dropout is a sum over another set).
//!
//! One set per study rather than one per round quantity: a coordinator
//! chooses the models it sends, and a model equivalent to an earlier one
//! (the same weights and a feature weighted zero) is a different quantity
//! that sums the same values. The cost is availability: a study whose
//! node drops out continues only when it is back, or as a new study the
//! committee approves over the smaller set.

use crate::classify::{Classify, Code};
use std::collections::BTreeSet;

use crate::config::SumSettings;
use crate::store::{self, Store};

/// Why this node will not sum over a set of nodes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "round {round} sums over {have} nodes; this node sums only over at least {min} \
         (secure_aggregation.min_participants), since a smaller sum gives away its members' values"
    )]
    TooFew {
        round: String,
        have: usize,
        min: u32,
    },
    #[error(
        "round {round} names `{node}`, which is not one of this node's federation members \
         (secure_aggregation.members)"
    )]
    NotMember { round: String, node: String },
    #[error(
        "study {study}: this node's sums for the study are over [{bound}]; it sums a study's \
         values over one set of nodes only, and round {round} asks [{asked}]"
    )]
    OtherSet {
        study: String,
        round: String,
        bound: String,
        asked: String,
    },
    #[error(
        "round {round}: unmasking for [{survivors}] rather than every node it was keyed with \
         would reveal a sum over another set of nodes"
    )]
    Survivors { round: String, survivors: String },
    #[error(
        "round {round} can be unmasked with {threshold} of its {participants} nodes' shares; \
         this node takes part only in rounds that need every node's, so that no sum is \
         revealed without every participant's consent"
    )]
    Threshold {
        round: String,
        threshold: u8,
        participants: usize,
    },
    #[error("storage: {0}")]
    Store(#[from] store::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::TooFew { .. }
            | Error::NotMember { .. }
            | Error::OtherSet { .. }
            | Error::Survivors { .. }
            | Error::Threshold { .. } => Code::FailedPrecondition,
            Error::Store(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self.code() {
            Code::Internal => "internal",
            _ => "participants",
        }
    }
}

/// This node's rule for the sets it sums over.
#[derive(Debug, Clone)]
pub struct SumRule {
    min: u32,
    members: BTreeSet<String>,
}

impl SumRule {
    pub fn new(settings: &SumSettings) -> Self {
        SumRule {
            min: settings.min_participants,
            members: settings.members.iter().cloned().collect(),
        }
    }

    /// Whether the federation's members are configured: a pooled query,
    /// whose noise each node shares by the number of members, needs them
    /// (else made-up members would shrink every share).
    pub fn has_members(&self) -> bool {
        !self.members.is_empty()
    }

    /// Checks a round or session of `study` keyed over `participants`
    /// before anything is computed: enough nodes, all members, and the
    /// study's set if it has one here.
    pub fn check(
        &self,
        store: &Store,
        study: &str,
        round: &str,
        participants: &[String],
    ) -> Result<(), Error> {
        self.admissible(round, participants)?;
        match store.sum_participants(study)? {
            Some(bound) => same_set(study, round, &bound, participants),
            None => Ok(()),
        }
    }

    /// As [`SumRule::check`], when this node is about to contribute: binds
    /// the study to `participants` if it is not bound yet.
    pub fn bind(
        &self,
        store: &Store,
        study: &str,
        round: &str,
        participants: &[String],
    ) -> Result<(), Error> {
        self.admissible(round, participants)?;
        let bound = store.bind_sum_participants(study, &joined(participants))?;
        same_set(study, round, &bound, participants)
    }

    fn admissible(&self, round: &str, participants: &[String]) -> Result<(), Error> {
        let distinct: BTreeSet<&String> = participants.iter().collect();
        if distinct.len() < self.min as usize {
            return Err(Error::TooFew {
                round: round.to_owned(),
                have: distinct.len(),
                min: self.min,
            });
        }
        if !self.members.is_empty()
            && let Some(node) = distinct.iter().find(|n| !self.members.contains(**n))
        {
            return Err(Error::NotMember {
                round: round.to_owned(),
                node: (*node).clone(),
            });
        }
        Ok(())
    }
}

/// A round must need every participant's shares to be unmasked: else a
/// coordinator could unmask it at some nodes only, which never bind the
/// study, and unmask a round over another set at others.
pub fn check_threshold(round: &str, threshold: u8, participants: usize) -> Result<(), Error> {
    if usize::from(threshold) == participants {
        Ok(())
    } else {
        Err(Error::Threshold {
            round: round.to_owned(),
            threshold,
            participants,
        })
    }
}

/// A one-off round is unmasked only for every node it was keyed with.
pub fn check_survivors(
    round: &str,
    participants: &[String],
    survivors: &[String],
) -> Result<(), Error> {
    if joined(participants) == joined(survivors) {
        Ok(())
    } else {
        Err(Error::Survivors {
            round: round.to_owned(),
            survivors: sorted(survivors).join(", "),
        })
    }
}

fn sorted(nodes: &[String]) -> Vec<&str> {
    nodes
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Sorted, distinct, comma-separated: as the store keeps a set.
fn joined(nodes: &[String]) -> String {
    sorted(nodes).join(",")
}

fn same_set(study: &str, round: &str, bound: &str, asked: &[String]) -> Result<(), Error> {
    if bound == joined(asked) {
        Ok(())
    } else {
        Err(Error::OtherSet {
            study: study.to_owned(),
            round: round.to_owned(),
            bound: bound.replace(',', ", "),
            asked: sorted(asked).join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(nodes: &[&str]) -> Vec<String> {
        nodes.iter().map(|n| (*n).to_owned()).collect()
    }

    fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("node.db").to_str().unwrap()).unwrap();
        (store, dir)
    }

    #[test]
    fn a_study_sums_over_one_set_of_at_least_the_minimum() {
        let (store, _dir) = store();
        let rule = SumRule::new(&SumSettings::default());
        let abc = ids(&["chonnam", "chosun", "christian"]);
        let err = rule
            .check(&store, "s1", "r1", &ids(&["chonnam", "chosun"]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooFew {
                    have: 2,
                    min: 3,
                    ..
                }
            ),
            "{err}"
        );
        // Checking binds nothing; contributing binds the set.
        rule.check(&store, "s1", "r1", &abc).unwrap();
        assert_eq!(store.sum_participants("s1").unwrap(), None);
        rule.bind(&store, "s1", "r1", &abc).unwrap();
        // The same set again, in any order: a redo.
        let cba = ids(&["christian", "chosun", "chonnam"]);
        rule.bind(&store, "s1", "r2", &cba).unwrap();
        let abcd = ids(&["chonnam", "chosun", "christian", "extra"]);
        let err = rule.check(&store, "s1", "r3", &abcd).unwrap_err();
        assert!(matches!(err, Error::OtherSet { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("[chonnam, chosun, christian]; it sums a study's values over one set"),
            "{err}"
        );
        // Another study binds its own set.
        rule.bind(&store, "s2", "r1", &abcd).unwrap();
        assert_eq!(
            store.sum_participants("s2").unwrap().as_deref(),
            Some("chonnam,chosun,christian,extra")
        );
    }

    #[test]
    fn only_configured_members_and_only_every_keyed_node() {
        let (store, _dir) = store();
        let rule = SumRule::new(&SumSettings {
            min_participants: 2,
            members: ids(&["chonnam", "chosun", "christian"]),
            member_keys: Default::default(),
        });
        let err = rule
            .check(&store, "s1", "r1", &ids(&["chonnam", "chosun", "madeup"]))
            .unwrap_err();
        assert!(
            matches!(&err, Error::NotMember { node, .. } if node == "madeup"),
            "{err}"
        );
        rule.check(&store, "s1", "r1", &ids(&["chonnam", "chosun"]))
            .unwrap();
        let abc = ids(&["chonnam", "chosun", "christian"]);
        check_survivors("r1", &abc, &ids(&["christian", "chonnam", "chosun"])).unwrap();
        let err = check_survivors("r1", &abc, &ids(&["chonnam", "chosun"])).unwrap_err();
        assert!(matches!(err, Error::Survivors { .. }), "{err}");
    }
}
