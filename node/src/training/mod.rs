//! Federated training at the node: feature extraction and the node's side
//! of secure-aggregation rounds.
//!
//! Features and the label are read through the aggregate engine, one query
//! per numeric feature plus one for the label ([`ghx_study::training::TrainingSpec::queries`]),
//! so consent, sensitive-category exclusions and the consent context are
//! exactly those of an aggregate query. Patients missing a feature are left
//! out (complete cases) and counted. Each patient is held out for
//! evaluation or not by a hash of the training and its id, so the split is
//! stable across rounds and runs.
//!
//! Step 1 admits a one-off round (moments, or an evaluation) and reads the
//! training's rows (once per run); at step 3 the round's contribution is
//! computed, masked and sent; nothing of it is stored. The round's secrets
//! stay in memory until step 4. A training run's rounds go through a
//! session instead (`ghx_secagg::session`): admitted and keyed once, then
//! one request per round (round 0 the moments), each checked against
//! revocation and the capability's expiry, each computed from the model
//! the node's own lineage gives (`crate::lineage`); the session's secret
//! stays in memory while the run uses it. Patient rows stay in this module's cache for the
//! length of a run and never leave the node.

use crate::classify::{Classify, Code};

pub use ghx_learn::federated::Phase;

mod contribution;
mod extract;
mod rounds;

pub use contribution::{Contribution, check_enough, contribution, round_seed};
pub use extract::{
    Extracted, RowPatients, Standardised, extract, extract_under_policy, train_config,
};
pub use rounds::{RoundOrigin, RoundWork, Rounds, check_keys};

/// Why a round step failed at this node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the training's features: {0}")]
    Extract(#[from] crate::views::Error),
    #[error("unknown round phase `{0}`; expected moments, train or evaluate")]
    Phase(String),
    #[error("this node is not a participant of round {0}")]
    NotParticipant(String),
    #[error("round {round} sums {got} values; a {phase} round of this training sums {expected}")]
    Dimension {
        round: String,
        phase: String,
        got: usize,
        expected: usize,
    },
    /// Which groups are small is said, never how small: a count below the
    /// cell size must not leave the node, not even in an error.
    #[error(
        "too few patients here for this training: {} below the minimum cell size {min}",
        short.join(", ")
    )]
    TooFew { short: Vec<&'static str>, min: u32 },
    #[error("the model sent with the round: {0}")]
    Model(#[from] ghx_study::training::Error),
    #[error("the model sent with a training round is not of the kind and size the training trains")]
    ModelShape,
    #[error("training: {0}")]
    Learn(#[from] ghx_learn::Error),
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] ghx_secagg::Error),
    #[error("round {0} is unknown here or has expired")]
    NoSuchRound(String),
    #[error("round {0} was already started here")]
    RoundExists(String),
    #[error("round {0} already computed its masked input here")]
    AlreadyComputed(String),
    #[error("round {round}: the keys advertised as {node}'s are refused: {reason}")]
    UnvouchedKeys {
        round: String,
        node: String,
        reason: ghx_pki::signed::Refusal,
    },
    #[error("this node has no certificate key to sign its round keys with")]
    NoSigningKey,
    #[error("signing this node's round keys: {0}")]
    Signing(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("consent evaluation: {0}")]
    Consent(#[from] crate::consent::eligibility::Error),
    #[error("a session trains; `{0}` rounds are run one at a time")]
    SessionPhase(String),
    #[error("session {0}: its capability has expired; the coordinator must open a new session")]
    CapabilityExpired(String),
    #[error(transparent)]
    Participants(#[from] crate::participants::Error),
    #[error(
        "study {study} has had the {limit} model evaluations this node allows a study \
         (max_evaluations_per_study)"
    )]
    Evaluations { study: String, limit: u32 },
    #[error(
        "every evaluation (a run's or an external validation) is noised at each node: \
         training `{0}` must declare validation.epsilon in the study's manifest"
    )]
    ValidationUndeclared(String),
    #[error(
        "a training round is computed only in a run's session, from the model this node \
         computes itself"
    )]
    TrainOutsideRun,
    #[error("a session trains a run: the request names none")]
    SessionWithoutRun,
    #[error(
        "the moments are a run's round 0, computed in the run's session; a one-off moments \
         round is refused"
    )]
    MomentsOutsideRun,
    #[error("session {0} has not agreed its keys yet")]
    NotAgreed(String),
    #[error(
        "session {session}: {node} did not confirm the keys this node agreed ({reason}); \
         nothing is masked"
    )]
    Unconfirmed {
        session: String,
        node: String,
        reason: String,
    },
    #[error(
        "only a run's final model is evaluated in the run: the evidence is of round {got}; \
         the training has {rounds} rounds"
    )]
    NotFinal { got: u32, rounds: u32 },
    #[error("lineage: {0}")]
    Lineage(#[from] crate::lineage::Error),
    #[error("round {round} is past the training's last round ({rounds})")]
    PastLastRound { round: u32, rounds: u32 },
    #[error(
        "this node's rows for the training changed since run {0} started here (an import or a \
         consent change): a run computes on one set of rows; start a new run"
    )]
    RowsChanged(String),
    #[error("run {0} has no stored lineage to seal here")]
    Unsealed(String),
    #[error(
        "a new run's noised rounds and evaluation cost epsilon {epsilon:.4}; {left:.4} is left \
         of the privacy budget here"
    )]
    RunUnaffordable { epsilon: f64, left: f64 },
}

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            Error::Extract(e) => e.code(),
            Error::Lineage(e) => e.code(),
            Error::Participants(e) => e.code(),
            Error::TooFew { .. }
            | Error::ValidationUndeclared(_)
            | Error::NotFinal { .. }
            | Error::PastLastRound { .. }
            | Error::RowsChanged(_)
            | Error::NotAgreed(_) => Code::FailedPrecondition,
            Error::Evaluations { .. } | Error::RunUnaffordable { .. } => Code::ResourceExhausted,
            Error::NoSuchRound(_) => Code::NotFound,
            Error::RoundExists(_) | Error::AlreadyComputed(_) => Code::AlreadyExists,
            Error::UnvouchedKeys { .. }
            | Error::Unconfirmed { .. }
            | Error::CapabilityExpired(_) => Code::PermissionDenied,
            Error::Phase(_)
            | Error::SessionPhase(_)
            | Error::TrainOutsideRun
            | Error::SessionWithoutRun
            | Error::MomentsOutsideRun
            | Error::NotParticipant(_)
            | Error::Dimension { .. }
            | Error::Model(_)
            | Error::ModelShape
            | Error::SecAgg(_) => Code::InvalidArgument,
            Error::Learn(_)
            | Error::NoSigningKey
            | Error::Unsealed(_)
            | Error::Signing(_)
            | Error::Random(_)
            | Error::Consent(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Error::Extract(e) => e.kind(),
            Error::Lineage(e) => e.kind(),
            Error::Participants(e) => e.kind(),
            Error::TooFew { .. } => "too_few",
            _ => match self.code() {
                Code::ResourceExhausted => "budget",
                Code::Internal => "internal",
                _ => "training",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::extract::held_out;
    use super::*;
    use ghx_learn::Dataset;
    use ghx_learn::federated::EvaluationSums;
    use ghx_secagg::{Advertise, Client, RoundParams, SessionClient};
    use ghx_study::training::ModelDocument;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_holdout_split_is_stable_and_near_its_share() {
        let salt = [7u8; 32];
        let held = (0..10_000)
            .filter(|i| held_out(&salt, &format!("p{i}"), 0.2))
            .count();
        assert!((1_800..2_200).contains(&held), "{held}");
        assert_eq!(held_out(&salt, "p1", 0.2), held_out(&salt, "p1", 0.2));
    }

    #[test]
    fn a_rounds_seed_follows_its_step_rows_and_the_nodes_secret_only() {
        let (head, other) = ([1u8; 32], [2u8; 32]);
        let (a, b, rows, more) = ([3u8; 32], [4u8; 32], [5u8; 32], [6u8; 32]);
        let seed = round_seed(&a, &head, 3, &rows);
        assert_eq!(seed, round_seed(&a, &head, 3, &rows));
        assert_ne!(seed, round_seed(&a, &other, 3, &rows));
        assert_ne!(seed, round_seed(&a, &head, 4, &rows));
        assert_ne!(seed, round_seed(&b, &head, 3, &rows));
        assert_ne!(seed, round_seed(&a, &head, 3, &more));
        // Rows that differ in one label differ in digest.
        let mut data = Extracted {
            train: Dataset::new(2),
            holdout: Dataset::new(2),
            incomplete: 0,
            patients: Default::default(),
        };
        data.train.push(&[1.0, 2.0], true).unwrap();
        let before = data.digest();
        data.train.push(&[1.0, 2.0], false).unwrap();
        assert_ne!(before, data.digest());
    }

    #[test]
    fn rows_are_standardised_once_per_mean_and_sd() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let dim = spec.features.len();
        let mut data = Extracted {
            train: Dataset::new(dim),
            holdout: Dataset::new(dim),
            incomplete: 0,
            patients: Default::default(),
        };
        data.train.push(&vec![3.0; dim], true).unwrap();
        data.holdout.push(&vec![5.0; dim], false).unwrap();
        let model = |mean: f64| {
            ModelDocument::new(
                spec,
                &vec![mean; dim],
                &vec![2.0; dim],
                &ghx_learn::Model::zeros(dim),
            )
        };
        let cache = Standardised::default();
        let first = cache.train(&data, &model(1.0));
        assert_eq!(first.row(0), vec![1.0; dim].as_slice());
        assert!(Arc::ptr_eq(&first, &cache.train(&data, &model(1.0))));
        assert_eq!(
            cache.holdout(&data, &model(1.0)).row(0),
            vec![2.0; dim].as_slice()
        );
        // Other means: standardised again.
        let other = cache.train(&data, &model(3.0));
        assert_eq!(other.row(0), vec![0.0; dim].as_slice());
        assert!(!Arc::ptr_eq(&first, &other));
    }

    #[test]
    fn too_few_patients_says_which_groups_but_not_their_counts() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let mut train = Dataset::new(5);
        for i in 0..30 {
            train.push(&[1.0, 0.0, 2.0, 3.0, 4.0], i < 3).unwrap();
        }
        let mut holdout = Dataset::new(5);
        for i in 0..12 {
            holdout.push(&[1.0, 1.0, 2.0, 3.0, 4.0], i < 6).unwrap();
        }
        let data = Extracted {
            train,
            holdout,
            incomplete: 0,
            patients: Default::default(),
        };
        let e = contribution(
            Phase::Moments,
            spec,
            (&data, &Standardised::default()),
            (None, None),
            10,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            "too few patients here for this training: training rows with the label \
             below the minimum cell size 10"
        );
        assert!(!e.contains('3'), "{e}");
        let ok = contribution(
            Phase::Moments,
            spec,
            (&data, &Standardised::default()),
            (None, None),
            3,
            None,
        )
        .unwrap();
        assert_eq!(ok.values.len(), Phase::Moments.len(5, 6));
        assert_eq!(ok.values[0], 30.0);
    }

    #[test]
    fn a_validation_is_noised_here_before_it_leaves() {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        let spec = &manifest.trainings[0];
        let mut data = Extracted {
            train: Dataset::new(5),
            holdout: Dataset::new(5),
            incomplete: 0,
            patients: Default::default(),
        };
        for i in 0..400 {
            let x = f64::from(i) / 40.0 - 5.0;
            data.train
                .push(&[x, 0.0, 1.0, 1.0, 1.0], i % 3 == 0)
                .unwrap();
            data.holdout
                .push(&[x, 1.0, 1.0, 1.0, 1.0], i % 4 == 0)
                .unwrap();
        }
        let mut weights = vec![0.0; 5];
        weights[0] = 1.0;
        let model = ModelDocument::new(
            spec,
            &[0.0; 5],
            &[1.0; 5],
            &ghx_learn::Model {
                hidden: None,
                weights,
                bias: 0.0,
            },
        );
        let seeded = |validation, seed| {
            contribution(
                Phase::Evaluate,
                spec,
                (&data, &Standardised::default()),
                (Some(&model), seed),
                10,
                validation,
            )
            .unwrap()
            .values
        };
        let run = |validation| seeded(validation, None);
        let exact = EvaluationSums::from_vec(&run(None)).unwrap();
        let noised = EvaluationSums::from_vec(&run(Some(0.25))).unwrap();
        // A run's evaluation draws from the run's seed: redone, the same
        // noised counts (so it is charged once); an external validation
        // (no seed) draws afresh.
        assert_eq!(
            seeded(Some(0.25), Some([7; 32])),
            seeded(Some(0.25), Some([7; 32]))
        );
        assert_ne!(
            seeded(Some(0.25), Some([7; 32])),
            seeded(Some(0.25), Some([8; 32]))
        );
        assert_ne!(run(Some(0.25)), run(Some(0.25)));
        // The exact counts in twentieths of score, against the noised ones.
        let coarse = exact.noised(ghx_learn::evaluation::NOISED_SCORE_BINS, || 0.0);
        let cells = |s: &EvaluationSums| {
            s.positive_scores
                .iter()
                .chain(&s.negative_scores)
                .copied()
                .collect::<Vec<f64>>()
        };
        let (truth, seen) = (cells(&coarse), cells(&noised));
        let differ = truth.iter().zip(&seen).filter(|(a, b)| a != b).count();
        // sd 5.6 per count: P(unchanged) = (1 - a) / (1 + a) = 0.12.
        assert!(differ >= 30, "{differ} of 40 counts noised");
        let zero = (0..seen.len()).filter(|i| i % 5 != 4);
        assert!(zero.clone().all(|i| seen[i] == 0.0 && truth[i] == 0.0));
        assert_eq!(noised.rows, seen.iter().sum::<f64>());
        assert_eq!(noised.positives, noised.positive_scores.iter().sum::<f64>());
        // Without an epsilon the histogram is exact, at full resolution
        // (nodes give every evaluation one).
        assert_eq!(exact.rows, 400.0);
        assert_eq!(exact.positives, 100.0);
    }

    fn example_work() -> Arc<RoundWork> {
        let manifest = ghx_study::manifest::StudyManifest::parse(include_bytes!(
            "../../../deploy/examples/study-t2d-model.json"
        ))
        .unwrap();
        Arc::new(RoundWork {
            phase: Phase::Moments,
            spec: manifest.trainings[0].clone(),
            data: Arc::new(Extracted {
                train: Dataset::new(5),
                holdout: Dataset::new(5),
                incomplete: 0,
                patients: Default::default(),
            }),
            standardised: Standardised::default(),
            min_cell_size: 10,
            claims: ghx_study::capability::claims_for(
                &manifest,
                "study-0001",
                vec!["a".to_owned()],
                b"{}",
                time::Duration::minutes(5),
            ),
            manifest: Arc::new(manifest),
            validation: None,
            run: String::new(),
        })
    }

    #[test]
    fn a_node_outside_the_round_cannot_start_it() {
        let rounds = Rounds::default();
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        let start = |node: &str| {
            rounds.start(
                params.clone(),
                node,
                &RoundOrigin::default(),
                example_work(),
                Duration::from_secs(5),
            )
        };
        assert!(matches!(start("c"), Err(Error::NotParticipant(_))));
        start("a").unwrap();
        assert!(matches!(start("a"), Err(Error::RoundExists(_))));
        assert!(matches!(
            rounds.share_keys("r2", &[]),
            Err(Error::NoSuchRound(_))
        ));
    }

    #[test]
    fn keys_the_coordinator_substituted_or_replayed_are_refused() {
        use ghx_pki::{CertificateAuthority, CertificateRequest, Role};
        let ca = CertificateAuthority::create("test").unwrap();
        let a = ca
            .issue(&CertificateRequest::new("a", Role::Node, "A Hospital"))
            .unwrap();
        let members = ghx_pki::signed::MemberKeys::new(ca.cert_pem());
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        let (_, keys) = Client::new(params.clone(), "a").unwrap();
        let signature = ghx_pki::signed::sign(&a.key_pem, &keys.statement("r1")).unwrap();
        let check = |round: &str, keys: &Advertise| {
            check_keys(
                &members,
                round,
                &keys.node,
                &keys.statement(round),
                (&a.cert_pem, &signature),
            )
        };
        check("r1", &keys).unwrap();
        // A coordinator that swaps in keys of its own under a's name (it has
        // no key of a's to sign them with) is refused by name.
        let (_, own) = Client::new(params.clone(), "a").unwrap();
        let e = check("r1", &own).unwrap_err();
        assert_eq!(
            e.to_string(),
            "round r1: the keys advertised as a's are refused: its signature does not verify"
        );
        // a's keys of round r1, replayed in another round, are refused too.
        assert!(matches!(
            check("r2", &keys),
            Err(Error::UnvouchedKeys { .. })
        ));
        // A session key is vouched for by a signature over its own
        // statement, never by a round's.
        let (_, session_keys) = SessionClient::new(params, "a").unwrap();
        let session_signature =
            ghx_pki::signed::sign(&a.key_pem, &session_keys.statement("r1")).unwrap();
        let session_check = |signature: &[u8]| {
            check_keys(
                &members,
                "r1",
                "a",
                &session_keys.statement("r1"),
                (&a.cert_pem, signature),
            )
        };
        session_check(&session_signature).unwrap();
        assert!(matches!(
            session_check(&signature),
            Err(Error::UnvouchedKeys { .. })
        ));
    }

    #[test]
    fn a_round_is_computed_once() {
        let rounds = Rounds::default();
        let params = RoundParams::new("r1", ["a", "b"], 2, 3).unwrap();
        rounds
            .start(
                params,
                "a",
                &RoundOrigin::default(),
                example_work(),
                Duration::from_secs(5),
            )
            .unwrap();
        let (_, work) = rounds.begin_masked("r1").unwrap();
        assert_eq!(work.phase, Phase::Moments);
        assert!(matches!(
            rounds.begin_masked("r1"),
            Err(Error::AlreadyComputed(_))
        ));
        assert!(matches!(
            rounds.begin_masked("r2"),
            Err(Error::NoSuchRound(_))
        ));
    }
}
