//! The lineage of a training run: what each node signs with its masked
//! input, and the chain of heads over the run's exact sums, so that every
//! node can check that the model it is asked to compute from follows from
//! the approved training and the true sums of the rounds before
//! (`learn/LINEAGE.md`, part B). Shared by the node and the coordinator;
//! no wire types.
//!
//! Under FedAvg the next model *is* the round's sum over its count, and in
//! a session the pair masks cancel, so a round's sum is the wrapping sum of
//! the members' masked inputs. Each member signs its masked input; the
//! coordinator passes the members' signed inputs of round r on with round
//! r + 1, and each node adds them up itself. Every field of the signed
//! statement and of a head is length-prefixed, so no two different tuples
//! encode alike.

use base64::Engine;
use ghx_learn::Standardiser;
use ghx_learn::federated::{self, Phase};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::training::{ModelDocument, TrainingSpec};

/// Largest magnitude of a parameter a round's sum may lead to: beyond it
/// the model is no honest training's (and a saturating weight is how a
/// crafted network singles out a patient).
pub const MAX_PARAMETER: f64 = 1e6;

/// A head of the chain: SHA-256.
pub type Head = [u8; 32];

/// What is wrong with a round's evidence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the evidence of round {round} holds no input of {node}")]
    Missing { round: u32, node: String },
    #[error("the evidence of round {round} holds an input of {node}, who is not a member")]
    Stranger { round: u32, node: String },
    #[error("the evidence of round {round} holds two inputs of {node}")]
    Twice { round: u32, node: String },
    #[error("the evidence of round {round}: {node}'s input has {got} values, {expected} expected")]
    Length {
        round: u32,
        node: String,
        got: usize,
        expected: usize,
    },
    #[error("a round's sum cannot be read into a model: {0}")]
    Unreadable(String),
    #[error("a round's sum leads to a model {problem}: no honest training gives one")]
    OutOfBounds { problem: &'static str },
}

/// The model a round's sum leads to, and the rows it summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Followed {
    pub model: ModelDocument,
    pub rows: f64,
}

/// The model that follows `previous` (none: the moments round, whose sum
/// gives the standardisation and the training's declared start) given a
/// round's decoded sum (longer vectors, padded for a session, are read
/// from their start). The coordinator and every node read sums with this
/// one function, so they agree on every model of a run.
pub fn model_after(
    spec: &TrainingSpec,
    previous: Option<&ModelDocument>,
    sum: &[f64],
) -> Result<Followed, Error> {
    let unreadable = |e: &dyn std::fmt::Display| Error::Unreadable(e.to_string());
    let (dim, params) = (spec.features.len(), spec.param_count());
    let phase = if previous.is_none() {
        Phase::Moments
    } else {
        Phase::Train
    };
    let sum = sum
        .get(..phase.len(dim, params))
        .ok_or_else(|| Error::Unreadable(format!("{} values are too few", sum.len())))?;
    let followed = match previous {
        None => {
            let standardiser = Standardiser::from_sums(sum).map_err(|e| unreadable(&e))?;
            let start = spec.declared_initial_model().map_err(|e| unreadable(&e))?;
            Followed {
                model: ModelDocument::new(spec, &standardiser.mean, &standardiser.sd, &start),
                rows: sum[0],
            }
        }
        Some(previous) => {
            let global = previous.model();
            let totals = match &spec.privacy {
                // Noised rounds sum clipped gradients: one step from the
                // global model.
                Some(_) => federated::read_private_training_sum(
                    sum,
                    &global,
                    spec.optimiser.learning_rate,
                    spec.optimiser.l2,
                ),
                None => {
                    // FedAvg divides by the count.
                    if sum[params] < 1.0 {
                        return Err(Error::OutOfBounds {
                            problem: "from fewer than one training row",
                        });
                    }
                    federated::read_training_sum(sum, &global)
                }
            }
            .map_err(|e| unreadable(&e))?;
            Followed {
                model: ModelDocument::new(spec, &previous.mean, &previous.sd, &totals.model),
                rows: totals.train_rows,
            }
        }
    };
    let model = followed.model.model();
    if model
        .params()
        .iter()
        .chain(&followed.model.mean)
        .chain(&followed.model.sd)
        .any(|p| !p.is_finite() || p.abs() > MAX_PARAMETER)
    {
        return Err(Error::OutOfBounds {
            problem: "with a value that is not finite or above 1e6",
        });
    }
    Ok(followed)
}

/// Writes `bytes` with its length (u32, big-endian) first.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("a lineage field fits in 4 GiB");
    out.extend(len.to_be_bytes());
    out.extend(bytes);
}

fn sha256(bytes: &[u8]) -> Head {
    Sha256::digest(bytes).into()
}

/// Where a run's chain starts: its study, the digest of its training and
/// its id.
pub fn genesis(study: &str, training_sha256: &str, run: &str) -> Head {
    let mut out = b"ghx-lineage/v1 genesis\0".to_vec();
    for f in [study, training_sha256, run] {
        field(&mut out, f.as_bytes());
    }
    sha256(&out)
}

/// The head after applying round `round`'s exact (wrapping) sum to the
/// chain at `parent`. Exact u64 sums, not the f64 models read from them,
/// so every build agrees.
pub fn next_head(parent: &Head, round: u32, sum: &[u64]) -> Head {
    let mut out = b"ghx-lineage/v1 round\0".to_vec();
    out.extend(parent);
    out.extend(round.to_be_bytes());
    let mut values = Vec::with_capacity(sum.len() * 8);
    for v in sum {
        values.extend(v.to_be_bytes());
    }
    field(&mut out, &values);
    sha256(&out)
}

/// The digest of the mask keys a session agreed, `(node, mask key)` in
/// any order: every input of a round names the same one, so keys relayed
/// differently to different members are caught.
pub fn keys_sha256(keys: &[(String, Vec<u8>)]) -> Head {
    let mut sorted: Vec<&(String, Vec<u8>)> = keys.iter().collect();
    sorted.sort();
    let mut out = b"ghx-lineage/v1 keys\0".to_vec();
    for (node, key) in sorted {
        field(&mut out, node.as_bytes());
        field(&mut out, key);
    }
    sha256(&out)
}

/// What each member of a session signs once it has agreed the session's
/// keys: the study, the session and the digest of the keys it agreed. A
/// member masks nothing until every member's confirmation verifies over
/// its own digest, so a coordinator relaying different key sets to
/// different members gets no input at all.
pub fn agreement_statement(study: &str, session: &str, keys_sha256: &Head) -> Vec<u8> {
    let mut out = b"ghx-lineage/v1 agreed\0".to_vec();
    for f in [study, session] {
        field(&mut out, f.as_bytes());
    }
    out.extend(keys_sha256);
    out
}

/// What one member signs with its masked input of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputStatement<'a> {
    pub study: &'a str,
    pub training_sha256: &'a str,
    pub run: &'a str,
    pub session: &'a str,
    pub round: u32,
    /// The head the round computed from.
    pub parent: &'a Head,
    pub keys_sha256: &'a Head,
    /// The round's members, sorted.
    pub members: &'a [String],
    pub node: &'a str,
    pub masked: &'a [u64],
}

impl InputStatement<'_> {
    /// The bytes signed.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"ghx-lineage/v1 input\0".to_vec();
        for f in [self.study, self.training_sha256, self.run, self.session] {
            field(&mut out, f.as_bytes());
        }
        out.extend(self.round.to_be_bytes());
        out.extend(self.parent);
        out.extend(self.keys_sha256);
        out.extend(
            u32::try_from(self.members.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for m in self.members {
            field(&mut out, m.as_bytes());
        }
        field(&mut out, self.node.as_bytes());
        let mut masked = Sha256::new();
        for v in self.masked {
            masked.update(v.to_be_bytes());
        }
        out.extend(masked.finalize());
        out
    }
}

/// One member's signed masked input of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedInput {
    pub node: String,
    /// Big-endian u64s, base64 (JSON readers round large integers).
    #[serde(with = "words")]
    pub values: Vec<u64>,
    #[serde(with = "bytes")]
    pub signature: Vec<u8>,
    pub certificate_pem: String,
}

/// A round's evidence: every member's signed masked input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub session: String,
    pub round: u32,
    /// Sorted.
    pub members: Vec<String>,
    #[serde(with = "bytes32")]
    pub keys_sha256: Head,
    #[serde(with = "bytes32")]
    pub parent: Head,
    pub inputs: Vec<SignedInput>,
}

impl Evidence {
    /// Checks that it holds one input of each member and no other, all of
    /// `len` values, and returns their wrapping sum: the round's exact
    /// sum. Signatures are the caller's to check.
    pub fn sum(&self, len: usize) -> Result<Vec<u64>, Error> {
        let round = self.round;
        let mut seen: Vec<&str> = Vec::new();
        let mut sum = vec![0u64; len];
        for input in &self.inputs {
            let node = input.node.clone();
            if !self.members.contains(&input.node) {
                return Err(Error::Stranger { round, node });
            }
            if seen.contains(&input.node.as_str()) {
                return Err(Error::Twice { round, node });
            }
            seen.push(&input.node);
            if input.values.len() != len {
                return Err(Error::Length {
                    round,
                    node,
                    got: input.values.len(),
                    expected: len,
                });
            }
            for (s, v) in sum.iter_mut().zip(&input.values) {
                *s = s.wrapping_add(*v);
            }
        }
        if let Some(node) = self.members.iter().find(|m| !seen.contains(&m.as_str())) {
            return Err(Error::Missing {
                round,
                node: node.clone(),
            });
        }
        Ok(sum)
    }

    /// The statement `input` signed, given the run it belongs to.
    pub fn statement<'a>(
        &'a self,
        (study, training_sha256, run): (&'a str, &'a str, &'a str),
        input: &'a SignedInput,
    ) -> InputStatement<'a> {
        InputStatement {
            study,
            training_sha256,
            run,
            session: &self.session,
            round: self.round,
            parent: &self.parent,
            keys_sha256: &self.keys_sha256,
            members: &self.members,
            node: &input.node,
            masked: &input.values,
        }
    }
}

mod bytes {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

mod bytes32 {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(v: &Head, s: S) -> Result<S::Ok, S::Error> {
        bytes::serialize(v, s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Head, D::Error> {
        let v = bytes::deserialize(d)?;
        Head::try_from(v.as_slice()).map_err(|_| serde::de::Error::custom("a head is 32 bytes"))
    }
}

mod words {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let b: Vec<u8> = v.iter().flat_map(|w| w.to_be_bytes()).collect();
        bytes::serialize(&b, s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<u64>, D::Error> {
        let b = bytes::deserialize(d)?;
        if b.len() % 8 != 0 {
            return Err(serde::de::Error::custom("values are 8 bytes each"));
        }
        Ok(b.chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<String> {
        ["chonnam", "chosun", "christian"]
            .map(String::from)
            .to_vec()
    }

    fn evidence() -> Evidence {
        Evidence {
            session: "s1".into(),
            round: 3,
            members: members(),
            keys_sha256: [7; 32],
            parent: genesis("study-0001", "ab", "run-0001"),
            inputs: members()
                .into_iter()
                .enumerate()
                .map(|(i, node)| SignedInput {
                    node,
                    values: vec![u64::MAX - i as u64, 5 * i as u64],
                    signature: vec![i as u8; 4],
                    certificate_pem: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_signed_statement_is_fixed_and_moves_with_every_field() {
        let e = evidence();
        let run = ("study-0001", "ab", "run-0001");
        let bytes = e.statement(run, &e.inputs[0]).bytes();
        expect_test::expect![[r#"
            "ghx-lineage/v1 input\0\0\0\0\nstudy-0001\0\0\0\u{2}ab\0\0\0\u{8}run-0001\0\0\0\u{2}s1\0\0\0\u{3}x"
        "#]]
        .assert_debug_eq(&String::from_utf8_lossy(&bytes[..64]));
        // Tag, four strings, round, parent, keys, three members, node, the
        // masked values' digest.
        let strings = (4 + 10) + (4 + 2) + (4 + 8) + (4 + 2);
        let members = 4 + (4 + 7) + (4 + 6) + (4 + 9);
        assert_eq!(
            bytes.len(),
            21 + strings + 4 + 32 + 32 + members + (4 + 7) + 32
        );
        let changed = |edit: &dyn Fn(&mut Evidence)| {
            let mut other = e.clone();
            edit(&mut other);
            other.statement(run, &other.inputs[0]).bytes()
        };
        let edits: [&dyn Fn(&mut Evidence); 7] = [
            &|e| e.session = "s2".into(),
            &|e| e.round = 4,
            &|e| e.parent[0] ^= 1,
            &|e| e.keys_sha256[0] ^= 1,
            &|e| {
                e.members.pop();
            },
            &|e| e.inputs[0].values[1] ^= 1,
            &|e| e.inputs[0].node = "chosun".into(),
        ];
        for edit in edits {
            assert_ne!(changed(edit), bytes);
        }
        // Another run's statement differs; fields never run into each
        // other ("a" + "bc" is not "ab" + "c").
        assert_ne!(
            e.statement(("study-0001", "ab", "run-0002"), &e.inputs[0])
                .bytes(),
            bytes
        );
        assert_ne!(genesis("a", "bc", "r"), genesis("ab", "c", "r"));
    }

    #[test]
    fn the_sum_wraps_and_needs_every_member_once() {
        let e = evidence();
        // u64::MAX + (u64::MAX - 1) + (u64::MAX - 2) wraps to -6.
        assert_eq!(e.sum(2).unwrap(), vec![u64::MAX - 5, 15]);
        let mut missing = e.clone();
        missing.inputs.pop();
        assert_eq!(
            missing.sum(2).unwrap_err().to_string(),
            "the evidence of round 3 holds no input of christian"
        );
        let mut twice = e.clone();
        twice.inputs[2].node = "chosun".into();
        assert!(matches!(twice.sum(2), Err(Error::Twice { .. })));
        let mut stranger = e.clone();
        stranger.inputs[2].node = "madeup".into();
        assert!(matches!(stranger.sum(2), Err(Error::Stranger { .. })));
        assert!(matches!(e.sum(3), Err(Error::Length { got: 2, .. })));
    }

    #[test]
    fn a_sum_leads_to_one_model_and_a_crafted_one_is_refused() {
        let m = crate::manifest::StudyManifest::parse(include_bytes!(
            "../../deploy/examples/study-t2d-mlp.json"
        ))
        .unwrap();
        let spec = &m.trainings[0];
        let (dim, params) = (spec.features.len(), spec.param_count());
        // Moments of 4 rows: count, sums, sums of squares.
        let mut moments = vec![4.0];
        moments.extend(vec![8.0; dim]);
        moments.extend(vec![20.0; dim]);
        let start = model_after(spec, None, &moments).unwrap();
        assert_eq!(start.rows, 4.0);
        assert_eq!(start.model.mean, vec![2.0; dim]);
        assert_eq!(start.model.model(), spec.declared_initial_model().unwrap());
        // Padded to the session's length, the same.
        let padded = federated::padded(&moments, federated::session_len(dim, params));
        assert_eq!(model_after(spec, None, &padded).unwrap(), start);
        // A FedAvg sum: 10 rows' weighted models, read as the average.
        let mut sum: Vec<f64> = start
            .model
            .model()
            .params()
            .iter()
            .map(|p| p * 10.0)
            .collect();
        sum.push(10.0);
        let next = model_after(spec, Some(&start.model), &sum).unwrap();
        assert_eq!(next.rows, 10.0);
        assert_eq!(next.model.mean, start.model.mean);
        for (a, b) in next
            .model
            .model()
            .params()
            .iter()
            .zip(start.model.model().params())
        {
            assert!((a - b).abs() < 1e-12);
        }
        // A sum over no rows, a saturating weight, a short vector: refused.
        let mut empty = sum.clone();
        empty[params] = 0.0;
        assert!(matches!(
            model_after(spec, Some(&start.model), &empty),
            Err(Error::OutOfBounds { .. })
        ));
        let mut saturating = sum.clone();
        saturating[0] = 1e9 * 10.0;
        let e = model_after(spec, Some(&start.model), &saturating).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a round's sum leads to a model with a value that is not finite or above 1e6: no honest training gives one"
        );
        assert!(matches!(
            model_after(spec, Some(&start.model), &sum[..3]),
            Err(Error::Unreadable(_))
        ));
    }

    #[test]
    fn heads_chain_exact_sums_and_evidence_survives_json() {
        let start = genesis("study-0001", "ab", "run-0001");
        let one = next_head(&start, 0, &[1, 2]);
        assert_ne!(one, next_head(&start, 0, &[1, 3]));
        assert_ne!(one, next_head(&start, 1, &[1, 2]));
        assert_ne!(next_head(&one, 1, &[1, 2]), next_head(&start, 1, &[1, 2]));
        let keys = |k: u8| vec![("a".to_owned(), vec![k]), ("b".to_owned(), vec![2])];
        let mut reversed = keys(1);
        reversed.reverse();
        assert_eq!(keys_sha256(&keys(1)), keys_sha256(&reversed));
        assert_ne!(keys_sha256(&keys(1)), keys_sha256(&keys(3)));
        let e = evidence();
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            json.contains("\"values\":\"//////////8AAAAAAAAAAA==\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Evidence>(&json).unwrap(), e);
        let bad = json.replacen("//////////8AAAAAAAAAAA==", "AAE=", 1);
        assert!(serde_json::from_str::<Evidence>(&bad).is_err());
    }
}
