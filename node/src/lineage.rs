//! A training run's lineage at this node (`learn/LINEAGE.md` 2.6): the
//! node computes every model of a run itself, from the approved training
//! and the members' signed masked inputs of the round before, and never
//! takes a model from the coordinator. [`advance`] checks a round's
//! evidence (every member of the study's set once, each signature by that
//! member's certificate over the statement this node rebuilds from its own
//! study, training and run), reads the sum into the next model with the
//! function the coordinator uses, and moves the stored lineage
//! compare-and-set before anything is computed from it.

use crate::classify::{Classify, Code};
use ghx_learn::federated;
use ghx_pki::signed::{MemberKeys, Refusal};
use ghx_study::lineage::{self as chain, Evidence, Head};
use ghx_study::training::{ModelDocument, TrainingSpec};

use crate::store::{LineageStep, RunKey, Store};

/// The round a node is asked to compute.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    pub run: RunKey<'a>,
    /// The round about to be computed: 0 the moments, then 1, 2, ...
    pub round: u32,
    /// The nodes the study sums over here, sorted.
    pub members: &'a [String],
    /// Most runs of one training of a study this node starts
    /// (`max_training_runs_per_study`): each new run is another honest
    /// trajectory whose sums the coordinator sees.
    pub max_runs: u32,
    /// Whether the evidence may go back to the step before the last (a
    /// session round the coordinator redoes); a run's evaluation may not,
    /// so each node evaluates one step of a run.
    pub may_rewind: bool,
}

/// What the round computes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The head the round's inputs are signed over.
    pub parent: Head,
    /// The model the round trains (or evaluates) from; none for the
    /// moments.
    pub model: Option<ModelDocument>,
}

/// Why a round's evidence is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run {run} of this training was already started here")]
    Started { run: String },
    #[error(
        "this training of the study has had the {limit} runs this node allows \
         (max_training_runs_per_study)"
    )]
    Runs { limit: u32 },
    #[error(
        "run {run} has no lineage here (it did not start with this node, or started before nodes kept lineage)"
    )]
    NoLineage { run: String },
    #[error("round {round} of run {run} needs the evidence of the round before")]
    NoEvidence { run: String, round: u32 },
    #[error("round {round} needs the evidence of the round before; the evidence is of round {got}")]
    WrongRound { round: u32, got: u32 },
    #[error("the evidence is of a round over [{got}]; this study sums over [{expected}] here")]
    Members { got: String, expected: String },
    #[error(transparent)]
    Evidence(#[from] chain::Error),
    #[error("input of {node} for round {round} is refused: {reason}")]
    Signature {
        node: String,
        round: u32,
        reason: Refusal,
    },
    #[error(
        "run {run}'s lineage here is at round {at}; the evidence continues from a head it does not hold"
    )]
    Parent { run: String, at: i32 },
    #[error("the stored lineage of run {run} is unreadable: {reason}")]
    Stored { run: String, reason: String },
    #[error(
        "run {run}'s evaluation continues this node's lineage; the evidence goes back to the \
         step before its last"
    )]
    Rewound { run: String },
    #[error("another request moved run {run}'s lineage meanwhile")]
    Raced { run: String },
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Signature { .. } => Code::PermissionDenied,
            Error::Runs { .. } => Code::ResourceExhausted,
            Error::Store(_) => Code::Internal,
            Error::Started { .. }
            | Error::NoLineage { .. }
            | Error::NoEvidence { .. }
            | Error::WrongRound { .. }
            | Error::Members { .. }
            | Error::Evidence(_)
            | Error::Parent { .. }
            | Error::Stored { .. }
            | Error::Rewound { .. }
            | Error::Raced { .. } => Code::FailedPrecondition,
        }
    }

    fn kind(&self) -> &'static str {
        match self.code() {
            Code::ResourceExhausted => "budget",
            Code::Internal => "internal",
            _ => "lineage",
        }
    }
}

/// Checks `previous` (the evidence of round `at.round - 1`; none for the
/// moments, round 0) and moves the run's lineage to follow it: its sum is
/// applied to the stored head, or was already (a round redone in a new
/// session), or replaces the step applied last (the coordinator lost it).
/// Anything else is refused, and nothing is stored.
pub fn advance(
    store: &Store,
    keys: &MemberKeys,
    at: At<'_>,
    previous: Option<&Evidence>,
    spec: &TrainingSpec,
) -> Result<Step, Error> {
    let run = at.run;
    let name = || run.run_id.to_owned();
    let genesis = chain::genesis(run.study_id, run.training_sha256, run.run_id);
    let Some(evidence) = previous else {
        if at.round != 0 {
            return Err(Error::NoEvidence {
                run: name(),
                round: at.round,
            });
        }
        let start = LineageStep {
            round: -1,
            head: hex::encode(genesis),
            model_json: String::new(),
        };
        // A new run only while the training has had fewer here. (Two
        // admitted at once may pass together: one over, at most per
        // concurrent request.)
        if store.lineage(run)?.is_none()
            && store.count_lineages(run.study_id, run.training_sha256)? >= i64::from(at.max_runs)
        {
            return Err(Error::Runs { limit: at.max_runs });
        }
        if !store.start_lineage(run, &start)? {
            let stored = store
                .lineage(run)?
                .ok_or_else(|| Error::Raced { run: name() })?;
            // At genesis, or one step past it (the coordinator lost the
            // moments round the node applied): the moments again.
            let moments_lost =
                stored.current.round == 0 && stored.previous.as_ref() == Some(&start);
            if stored.current != start && !moments_lost {
                return Err(Error::Started { run: name() });
            }
        }
        return Ok(Step {
            parent: genesis,
            model: None,
        });
    };
    if at.round.checked_sub(1) != Some(evidence.round) {
        return Err(Error::WrongRound {
            round: at.round,
            got: evidence.round,
        });
    }
    if evidence.members != at.members {
        return Err(Error::Members {
            got: evidence.members.join(", "),
            expected: at.members.join(", "),
        });
    }
    let len = federated::session_len(spec.features.len(), spec.param_count());
    let sum = evidence.sum(len)?;
    let own = (run.study_id, run.training_sha256, run.run_id);
    for input in &evidence.inputs {
        let statement = evidence.statement(own, input).bytes();
        keys.verify_node(
            &input.node,
            &input.certificate_pem,
            &statement,
            &input.signature,
        )
        .map_err(|reason| Error::Signature {
            node: input.node.clone(),
            round: evidence.round,
            reason,
        })?;
    }
    let stored = store
        .lineage(run)?
        .ok_or_else(|| Error::NoLineage { run: name() })?;
    let parse = |step: &LineageStep| -> Result<Option<ModelDocument>, Error> {
        if step.round < 0 {
            return Ok(None);
        }
        ModelDocument::parse_for(step.model_json.as_bytes(), spec)
            .map(Some)
            .map_err(|e| Error::Stored {
                run: name(),
                reason: e.to_string(),
            })
    };
    let next = chain::next_head(&evidence.parent, evidence.round, &sum);
    let current = &stored.current;
    if hex::encode(next) == current.head {
        // Applied already: a round redone in a new session.
        return Ok(Step {
            parent: next,
            model: parse(current)?,
        });
    }
    if let Some(before) = &stored.previous
        && hex::encode(next) == before.head
    {
        // The step before the last: the coordinator lost the round this
        // node computed last and redoes it. Nothing moves; the round's
        // new evidence then replaces the last step (below).
        if !at.may_rewind {
            return Err(Error::Rewound { run: name() });
        }
        return Ok(Step {
            parent: next,
            model: parse(before)?,
        });
    }
    let parent = hex::encode(evidence.parent);
    // The step the sum applies to: the last one, or the one before it
    // (the coordinator lost the last round and redoes it).
    let rewound = parent != current.head;
    if rewound && !at.may_rewind {
        return Err(Error::Rewound { run: name() });
    }
    let base = if !rewound {
        current
    } else {
        match &stored.previous {
            Some(before) if before.head == parent => before,
            _ => {
                return Err(Error::Parent {
                    run: name(),
                    at: current.round,
                });
            }
        }
    };
    let followed = chain::model_after(spec, parse(base)?.as_ref(), &ghx_secagg::decode(&sum))?;
    let to = LineageStep {
        round: i32::try_from(evidence.round).unwrap_or(i32::MAX),
        head: hex::encode(next),
        model_json: serde_json::to_string(&followed.model).expect("a model serializes"),
    };
    // Either way the step built on becomes the one before.
    let moved = store.move_lineage(run, current, &to, Some(base))?;
    if !moved {
        return Err(Error::Raced { run: name() });
    }
    Ok(Step {
        parent: next,
        model: Some(followed.model),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghx_pki::{CertificateAuthority, CertificateRequest, Role};
    use ghx_study::lineage::SignedInput;

    struct Federation {
        _dir: tempfile::TempDir,
        store: Store,
        keys: MemberKeys,
        /// (node, certificate, key) of each member.
        nodes: Vec<(String, String, String)>,
        spec: TrainingSpec,
        members: Vec<String>,
    }

    const RUN: RunKey<'static> = RunKey {
        study_id: "study-0001",
        training_sha256: "ab",
        run_id: "run-0001",
    };

    fn federation() -> Federation {
        let ca = CertificateAuthority::create("test").unwrap();
        let nodes = ["a", "b", "c"]
            .map(|id| {
                let issued = ca
                    .issue(&CertificateRequest::new(id, Role::Node, "A Hospital"))
                    .unwrap();
                (id.to_owned(), issued.cert_pem, issued.key_pem)
            })
            .to_vec();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("node.db").to_str().unwrap()).unwrap();
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        Federation {
            _dir: dir,
            store,
            keys: MemberKeys::new(ca.cert_pem()),
            members: nodes.iter().map(|n| n.0.clone()).collect(),
            nodes,
            spec: manifest.trainings[0].clone(),
        }
    }

    impl Federation {
        fn len(&self) -> usize {
            federated::session_len(self.spec.features.len(), self.spec.param_count())
        }

        /// Round `round`'s evidence over `parent` whose inputs sum to
        /// `values` (padded), each masked and signed for `run`.
        fn evidence(&self, run: &str, round: u32, parent: Head, values: &[f64]) -> Evidence {
            let sum = ghx_secagg::encode(&federated::padded(values, self.len())).unwrap();
            let masks: Vec<u64> = (0..sum.len() as u64).map(|i| i * 7919 + 13).collect();
            let inputs: Vec<Vec<u64>> = vec![
                sum.iter()
                    .zip(&masks)
                    .map(|(s, m)| s.wrapping_add(*m))
                    .collect(),
                masks.iter().map(|m| m.wrapping_mul(3)).collect(),
                masks
                    .iter()
                    .map(|m| m.wrapping_mul(4).wrapping_neg())
                    .collect(),
            ];
            let mut evidence = Evidence {
                session: format!("{run}/session-1"),
                round,
                members: self.members.clone(),
                keys_sha256: [9; 32],
                parent,
                inputs: Vec::new(),
            };
            for ((node, cert, _), values) in self.nodes.iter().zip(inputs) {
                evidence.inputs.push(SignedInput {
                    node: node.clone(),
                    values,
                    signature: Vec::new(),
                    certificate_pem: cert.clone(),
                });
            }
            self.sign(&mut evidence, run);
            evidence
        }

        fn sign(&self, evidence: &mut Evidence, run: &str) {
            let signatures: Vec<Vec<u8>> = evidence
                .inputs
                .iter()
                .zip(&self.nodes)
                .map(|(input, (_, _, key))| {
                    let statement = evidence.statement(("study-0001", "ab", run), input);
                    ghx_pki::signed::sign(key, &statement.bytes()).unwrap()
                })
                .collect();
            for (input, signature) in evidence.inputs.iter_mut().zip(signatures) {
                input.signature = signature;
            }
        }

        fn advance(&self, round: u32, previous: Option<&Evidence>) -> Result<Step, Error> {
            let at = At {
                run: RUN,
                round,
                members: &self.members,
                max_runs: 20,
                may_rewind: true,
            };
            advance(&self.store, &self.keys, at, previous, &self.spec)
        }

        fn moments(&self) -> Vec<f64> {
            let d = self.spec.features.len();
            let mut m = vec![40.0];
            m.extend(vec![80.0; d]);
            m.extend(vec![200.0; d]);
            m
        }

        /// A FedAvg sum of 40 rows whose average is `model`'s parameters
        /// plus `shift`.
        fn training_sum(&self, model: &ModelDocument, shift: f64) -> Vec<f64> {
            let mut sum: Vec<f64> = model
                .model()
                .params()
                .iter()
                .map(|p| (p + shift) * 40.0)
                .collect();
            sum.push(40.0);
            sum
        }
    }

    #[test]
    fn honest_evidence_gives_the_coordinators_models_and_replays_change_nothing() {
        let f = federation();
        let start = f.advance(0, None).unwrap();
        assert_eq!(start.parent, chain::genesis("study-0001", "ab", "run-0001"));
        assert_eq!(start.model, None);
        // Round 0 again (a redo before any sum): the same start.
        assert_eq!(f.advance(0, None).unwrap(), start);
        let moments = f.evidence("run-0001", 0, start.parent, &f.moments());
        let one = f.advance(1, Some(&moments)).unwrap();
        let expected = chain::model_after(&f.spec, None, &f.moments())
            .unwrap()
            .model;
        assert_eq!(one.model.as_ref().unwrap(), &expected);
        // The same evidence again (round 1 redone in a new session).
        assert_eq!(f.advance(1, Some(&moments)).unwrap(), one);
        let model = one.model.clone().unwrap();
        let sum = f.training_sum(&model, 0.25);
        let round_one = f.evidence("run-0001", 1, one.parent, &sum);
        let two = f.advance(2, Some(&round_one)).unwrap();
        let read = chain::model_after(&f.spec, Some(&model), &sum)
            .unwrap()
            .model;
        for (a, b) in two
            .model
            .as_ref()
            .unwrap()
            .model()
            .params()
            .iter()
            .zip(read.model().params())
        {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Round 0 of a started run is refused.
        assert!(matches!(f.advance(0, None), Err(Error::Started { .. })));
        // A coordinator that lost round 2 (and the evidence of round 1)
        // redoes round 1 from the moments: the node computes from the
        // model it had then, without moving.
        assert_eq!(f.advance(1, Some(&moments)).unwrap(), one);
        assert_eq!(
            f.store.lineage(RUN).unwrap().unwrap().current.head,
            hex::encode(two.parent)
        );
        // A run's evaluation never goes back: neither to the step before
        // the last nor to a sibling of the last, and nothing moves.
        let again = f.evidence("run-0001", 1, one.parent, &f.training_sum(&model, 0.5));
        let evaluating = |previous: &Evidence| {
            let at = At {
                run: RUN,
                round: previous.round + 1,
                members: &f.members,
                max_runs: 20,
                may_rewind: false,
            };
            advance(&f.store, &f.keys, at, Some(previous), &f.spec)
        };
        for back in [&moments, &again] {
            assert!(matches!(evaluating(back), Err(Error::Rewound { .. })));
            assert_eq!(
                f.store.lineage(RUN).unwrap().unwrap().current.head,
                hex::encode(two.parent)
            );
        }
        assert_eq!(evaluating(&round_one).unwrap(), two);
        // Round 1's new sum then replaces the step applied last.
        let redone = f.advance(2, Some(&again)).unwrap();
        assert_ne!(redone, two);
        let stored = f.store.lineage(RUN).unwrap().unwrap();
        assert_eq!(stored.current.head, hex::encode(redone.parent));
        assert_eq!(stored.previous.unwrap().round, 0);
        // Two steps back is refused: the moments again, summed otherwise.
        let mut other = f.moments();
        other[0] = 41.0;
        let e = f
            .advance(1, Some(&f.evidence("run-0001", 0, start.parent, &other)))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "run run-0001's lineage here is at round 1; the evidence continues from a head it does not hold"
        );
    }

    #[test]
    fn a_training_starts_no_more_runs_than_the_node_allows() {
        let f = federation();
        let start = |run_id: &str, max_runs: u32| {
            let at = At {
                run: RunKey { run_id, ..RUN },
                round: 0,
                members: &f.members,
                max_runs,
                may_rewind: true,
            };
            advance(&f.store, &f.keys, at, None, &f.spec)
        };
        start("run-0001", 2).unwrap();
        start("run-0002", 2).unwrap();
        // A run already started goes on; a third is refused, and stores
        // nothing.
        start("run-0002", 2).unwrap();
        let err = start("run-0003", 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this training of the study has had the 2 runs this node allows \
             (max_training_runs_per_study)"
        );
        assert_eq!(f.store.count_lineages("study-0001", "ab").unwrap(), 2);
        // Another training of the study counts its own.
        let other = At {
            run: RunKey {
                training_sha256: "cd",
                ..RUN
            },
            round: 0,
            members: &f.members,
            max_runs: 2,
            may_rewind: true,
        };
        advance(&f.store, &f.keys, other, None, &f.spec).unwrap();
    }

    #[test]
    fn moments_the_coordinator_lost_are_summed_again() {
        let f = federation();
        let start = f.advance(0, None).unwrap();
        let moments = f.evidence("run-0001", 0, start.parent, &f.moments());
        let one = f.advance(1, Some(&moments)).unwrap();
        // The coordinator lost the moments' evidence: round 0 again, then
        // its new evidence replaces the step.
        assert_eq!(f.advance(0, None).unwrap(), start);
        let mut other = f.moments();
        other[0] = 41.0;
        let again = f.advance(1, Some(&f.evidence("run-0001", 0, start.parent, &other)));
        let again = again.unwrap();
        assert_ne!(again, one);
        assert_eq!(again.model.unwrap().mean[0], 80.0 / 41.0);
    }

    #[test]
    fn forged_evidence_is_refused_and_nothing_moves() {
        let f = federation();
        let start = f.advance(0, None).unwrap();
        let honest = f.evidence("run-0001", 0, start.parent, &f.moments());
        let stored = || f.store.lineage(RUN).unwrap().unwrap();
        let before = stored();
        let refused = |evidence: &Evidence| f.advance(1, Some(evidence)).unwrap_err().to_string();
        // A value changed after signing.
        let mut changed = honest.clone();
        changed.inputs[1].values[0] ^= 1;
        assert_eq!(
            refused(&changed),
            "input of b for round 0 is refused: its signature does not verify"
        );
        // A missing input, another run's evidence, another parent.
        let mut missing = honest.clone();
        missing.inputs.pop();
        assert_eq!(
            refused(&missing),
            "the evidence of round 0 holds no input of c"
        );
        let other_run = f.evidence("run-0002", 0, start.parent, &f.moments());
        assert!(refused(&other_run).contains("its signature does not verify"));
        let mut parent = f.evidence("run-0001", 0, [3; 32], &f.moments());
        assert!(refused(&parent).contains("does not hold"));
        // Members other than the study's set.
        parent.members.pop();
        assert!(refused(&parent).contains("this study sums over [a, b, c]"));
        // A certificate of another federation.
        let foreign = CertificateAuthority::create("other").unwrap();
        let b = foreign
            .issue(&CertificateRequest::new("b", Role::Node, "B Hospital"))
            .unwrap();
        let mut forged = honest.clone();
        forged.inputs[1].certificate_pem = b.cert_pem.clone();
        let statement = forged.statement(("study-0001", "ab", "run-0001"), &forged.inputs[1]);
        forged.inputs[1].signature = ghx_pki::signed::sign(&b.key_pem, &statement.bytes()).unwrap();
        assert!(refused(&forged).starts_with("input of b for round 0 is refused"));
        // Evidence for the wrong round.
        assert!(matches!(
            f.advance(2, Some(&honest)),
            Err(Error::WrongRound { round: 2, got: 0 })
        ));
        assert_eq!(stored(), before);
        // A sum that leads to a saturating model, honestly signed.
        let one = f.advance(1, Some(&honest)).unwrap();
        let mut saturating = f.training_sum(one.model.as_ref().unwrap(), 0.0);
        saturating[0] = 5e7 * 40.0;
        let crafted = f.evidence("run-0001", 1, one.parent, &saturating);
        let e = f.advance(2, Some(&crafted)).unwrap_err().to_string();
        assert!(e.contains("no honest training gives one"), "{e}");
        assert_eq!(stored().current.round, 0);
        // A round without evidence, and a round number that would wrap.
        assert!(matches!(f.advance(3, None), Err(Error::NoEvidence { .. })));
        let mut wrapping = honest.clone();
        wrapping.round = u32::MAX;
        assert!(matches!(
            f.advance(0, Some(&wrapping)),
            Err(Error::WrongRound { .. })
        ));
    }
}
