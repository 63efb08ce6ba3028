//! Sessions: pairwise masks agreed once for many rounds.
//!
//! A training run sums one update vector per node per round, for tens of
//! rounds, among the same few nodes. Agreeing keys and unmasking every
//! round (the four steps of [`crate::Client`]) costs three extra trips
//! per round; a session costs them once:
//!
//! 1. **Open.** Each member makes one X25519 mask key for the session and
//!    advertises its public half ([`SessionKeys`], signed by the caller as
//!    [`SessionKeys::statement`]).
//! 2. **Agree.** Each member, given the members' keys, works out one pair
//!    secret per other member. Nothing is shared or dealt.
//! 3. **Round `n`** (once per round, one message each way): each member
//!    adds to its encoded update, modulo 2^64, for every other member, the
//!    ChaCha20 stream of their pair secret on stream number `n`: added if
//!    its id sorts first, subtracted otherwise. With every member's input
//!    the streams cancel and [`sum`] is the members' sum.
//!
//! A member masks each round number once, in increasing order
//! ([`SessionClient::mask`] refuses the rest): two inputs under the same
//! masks would reveal their difference. There is no unmasking and no self
//! mask, because no secret is ever revealed: a round missing a member's
//! input cannot be summed ([`Error::Incomplete`] names who is missing), and
//! the caller opens a new session among the members still answering and
//! redoes the round under fresh keys. The masked inputs of the failed
//! round stay masked by the pair secrets of the missing member, which no
//! one reveals. So, unlike the per-round protocol, a session tolerates no
//! dropout within a round; it trades that for one trip per round, which is
//! the right trade for a few hospitals that rarely drop.
//!
//! The coordinator learns nothing beyond each round's sum unless it
//! colludes with all but one member (the pair secrets of an honest member
//! with every colluder would then be known). With two members each learns
//! the other's update from the sum, as with any sum.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{Error, MaskedInput, NodeId, RoundParams};

const SESSION_PAIR_INFO: &[u8] = b"ghx-secagg/v1 session pair";

/// Step 1, member to coordinator to every member: the session's public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeys {
    pub node: NodeId,
    pub mask_key: [u8; 32],
}

impl SessionKeys {
    /// The bytes a member signs to vouch for its key in `session`;
    /// distinct from a round's [`crate::Advertise::statement`], so neither
    /// can stand for the other.
    pub fn statement(&self, session: &str) -> Vec<u8> {
        [
            b"ghx-secagg/v1 session keys".as_slice(),
            &[0],
            session.as_bytes(),
            &[0],
            self.node.as_bytes(),
            &[0],
            &self.mask_key,
        ]
        .concat()
    }
}

/// Adds (or subtracts) stream `number` of the pair secret to `values`.
fn apply_round_stream(values: &mut [u64], secret: [u8; 32], number: u32, add: bool) {
    let mut rng = ChaCha20Rng::from_seed(secret);
    rng.set_stream(u64::from(number));
    for v in values.iter_mut() {
        let r = rng.next_u64();
        *v = if add {
            v.wrapping_add(r)
        } else {
            v.wrapping_sub(r)
        };
    }
}

/// One member's side of a session. Its secret key stays in here.
pub struct SessionClient {
    params: RoundParams,
    node: NodeId,
    mask: StaticSecret,
    own: SessionKeys,
    /// Per other member, after [`SessionClient::agree`]: the pair secret.
    pairs: Option<BTreeMap<NodeId, [u8; 32]>>,
    /// The last round number masked.
    last: Option<u32>,
    /// A round's mask computed ahead of it ([`SessionClient::prepare`]).
    prepared: Option<(u32, Vec<u64>)>,
}

impl SessionClient {
    /// Opens a session (`params.round` names it) as `node`; returns the
    /// key to advertise.
    pub fn new(params: RoundParams, node: &str) -> Result<(SessionClient, SessionKeys), Error> {
        params.check_participant(node)?;
        let mask = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let own = SessionKeys {
            node: node.to_owned(),
            mask_key: PublicKey::from(&mask).to_bytes(),
        };
        Ok((
            SessionClient {
                params,
                node: node.to_owned(),
                mask,
                own: own.clone(),
                pairs: None,
                last: None,
                prepared: None,
            },
            own,
        ))
    }

    /// Step 2: the members' keys (this node's included, as it made them;
    /// at least the threshold of participants). Once per session.
    pub fn agree(&mut self, keys: &[SessionKeys]) -> Result<(), Error> {
        let session = &self.params.round;
        if self.pairs.is_some() {
            return Err(Error::Duplicate {
                round: session.clone(),
                node: self.node.clone(),
                step: "session keys",
            });
        }
        let mut members = BTreeMap::new();
        for k in keys {
            self.params.check_participant(&k.node)?;
            if members.insert(k.node.clone(), k).is_some() {
                return Err(Error::Duplicate {
                    round: session.clone(),
                    node: k.node.clone(),
                    step: "session key",
                });
            }
        }
        match members.get(&self.node) {
            Some(listed) if **listed == self.own => {}
            _ => {
                return Err(Error::NotOwnKeys {
                    round: session.clone(),
                    node: self.node.clone(),
                });
            }
        }
        self.params.enough("session keys", members.len())?;
        let pairs = members
            .values()
            .filter(|k| k.node != self.node)
            .map(|k| {
                let shared = self.mask.diffie_hellman(&PublicKey::from(k.mask_key));
                let (lo, hi) = if self.node < k.node {
                    (&self.node, &k.node)
                } else {
                    (&k.node, &self.node)
                };
                (
                    k.node.clone(),
                    crate::derive(shared.as_bytes(), session, SESSION_PAIR_INFO, lo, hi),
                )
            })
            .collect();
        self.pairs = Some(pairs);
        Ok(())
    }

    /// Claims round `number` before its input is computed: refused unless
    /// it is above every round claimed before, so no round is masked twice
    /// even when computing one fails.
    pub fn claim(&mut self, number: u32) -> Result<(), Error> {
        if self.pairs.is_none() {
            return Err(Error::OutOfOrder {
                round: self.params.round.clone(),
                node: self.node.clone(),
                step: "masked input",
            });
        }
        if let Some(last) = self.last
            && number <= last
        {
            return Err(Error::Replayed {
                session: self.params.round.clone(),
                number,
                last,
            });
        }
        self.last = Some(number);
        Ok(())
    }

    /// Computes round `number`'s mask (the sum of its pair streams) ahead
    /// of the round, between rounds, so that [`SessionClient::mask`] of
    /// that round only adds it. Nothing before the keys are agreed or for
    /// a round already claimed; the mask is the same either way.
    pub fn prepare(&mut self, number: u32) {
        let Some(pairs) = &self.pairs else {
            return;
        };
        if self.last.is_some_and(|last| number <= last) {
            return;
        }
        self.prepared = Some((number, self.round_mask(pairs, number)));
    }

    /// Round `number`'s mask: the sum of its stream of every pair secret,
    /// added or subtracted by the order of the pair's members.
    fn round_mask(&self, pairs: &BTreeMap<NodeId, [u8; 32]>, number: u32) -> Vec<u64> {
        let mut mask = vec![0u64; self.params.dim];
        for (peer, secret) in pairs {
            apply_round_stream(&mut mask, *secret, number, self.node < *peer);
        }
        mask
    }

    /// As [`SessionClient::mask`], with a second layer of pair streams
    /// keyed by each pair secret and `bound`: what every member must have
    /// computed its input from (a run's lineage head). Members that
    /// computed from different `bound`s leave each other's residue in the
    /// sum, so inputs computed from different starting points are never
    /// summed into anything readable.
    pub fn mask_bound(
        &mut self,
        number: u32,
        bound: &[u8; 32],
        input: &[u64],
    ) -> Result<MaskedInput, Error> {
        let mut masked = self.mask(number, input)?;
        if let Some(pairs) = &self.pairs {
            for (peer, secret) in pairs {
                let key: [u8; 32] = sha2::Sha256::new()
                    .chain_update(b"ghx-secagg/v1 bound\0")
                    .chain_update(secret)
                    .chain_update(bound)
                    .finalize()
                    .into();
                apply_round_stream(&mut masked.values, key, number, self.node < *peer);
            }
        }
        Ok(masked)
    }

    /// Step 3 for round `number` (claimed with [`SessionClient::claim`]):
    /// masks `input` (already [`crate::encode`]d).
    pub fn mask(&mut self, number: u32, input: &[u64]) -> Result<MaskedInput, Error> {
        let (Some(pairs), Some(last)) = (&self.pairs, self.last) else {
            return Err(Error::OutOfOrder {
                round: self.params.round.clone(),
                node: self.node.clone(),
                step: "masked input",
            });
        };
        if number != last {
            return Err(Error::Replayed {
                session: self.params.round.clone(),
                number,
                last,
            });
        }
        if input.len() != self.params.dim {
            return Err(Error::WrongLength {
                round: self.params.round.clone(),
                node: self.node.clone(),
                got: input.len(),
                expected: self.params.dim,
            });
        }
        let mask = match self.prepared.take() {
            Some((prepared, mask)) if prepared == number => mask,
            _ => self.round_mask(pairs, number),
        };
        Ok(MaskedInput {
            node: self.node.clone(),
            values: input
                .iter()
                .zip(mask)
                .map(|(v, m)| v.wrapping_add(m))
                .collect(),
        })
    }
}

/// The coordinator's side of a session round: the sum of every member's
/// masked input for the round, or which members are missing.
pub fn sum(
    session: &str,
    members: &[NodeId],
    dim: usize,
    inputs: &[MaskedInput],
) -> Result<Vec<u64>, Error> {
    let mut seen = BTreeSet::new();
    let mut out = vec![0u64; dim];
    for input in inputs {
        if !members.contains(&input.node) {
            return Err(Error::NotParticipant {
                round: session.to_owned(),
                node: input.node.clone(),
            });
        }
        if !seen.insert(input.node.as_str()) {
            return Err(Error::Duplicate {
                round: session.to_owned(),
                node: input.node.clone(),
                step: "masked input",
            });
        }
        if input.values.len() != dim {
            return Err(Error::WrongLength {
                round: session.to_owned(),
                node: input.node.clone(),
                got: input.values.len(),
                expected: dim,
            });
        }
        for (s, v) in out.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v);
        }
    }
    let missing: Vec<NodeId> = members
        .iter()
        .filter(|m| !seen.contains(m.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::Incomplete {
            session: session.to_owned(),
            missing,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    fn session(nodes: &[&str]) -> Vec<SessionClient> {
        let params = RoundParams::new("s-1", nodes.iter().copied(), 2, 3).unwrap();
        let (mut clients, keys): (Vec<_>, Vec<_>) = nodes
            .iter()
            .map(|n| SessionClient::new(params.clone(), n).unwrap())
            .unzip();
        for c in &mut clients {
            c.agree(&keys).unwrap();
        }
        clients
    }

    fn masked(clients: &mut [SessionClient], number: u32, inputs: &[[f64; 3]]) -> Vec<MaskedInput> {
        clients
            .iter_mut()
            .zip(inputs)
            .map(|(c, x)| {
                c.claim(number).unwrap();
                c.mask(number, &encode(x).unwrap()).unwrap()
            })
            .collect()
    }

    #[test]
    fn every_round_sums_exactly_and_hides_each_input() {
        let nodes = ["a", "b", "c"];
        let members: Vec<NodeId> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let mut clients = session(&nodes);
        let inputs = [[1.5, -2.0, 0.25], [0.5, 1.0, 0.0], [-1.0, 4.0, 3.5]];
        let mut seen = Vec::new();
        for number in 1..=3 {
            let out = masked(&mut clients, number, &inputs);
            // Each masked input is far from its input, and differs by round.
            for (m, x) in out.iter().zip(&inputs) {
                assert_ne!(m.values, encode(x).unwrap());
                assert!(!seen.contains(&m.values));
                seen.push(m.values.clone());
            }
            let total = decode(&sum("s-1", &members, 3, &out).unwrap());
            assert_eq!(total, vec![1.0, 3.0, 3.75]);
        }
    }

    #[test]
    fn inputs_bound_to_different_starts_never_sum_to_anything_readable() {
        let nodes = ["a", "b", "c"];
        let members: Vec<NodeId> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let mut clients = session(&nodes);
        let inputs = [[1.5, -2.0, 0.25], [0.5, 1.0, 0.0], [-1.0, 4.0, 3.5]];
        let bound = |clients: &mut [SessionClient], number: u32, heads: [[u8; 32]; 3]| {
            clients
                .iter_mut()
                .zip(&inputs)
                .zip(heads)
                .map(|((c, x), head)| {
                    c.claim(number).unwrap();
                    c.mask_bound(number, &head, &encode(x).unwrap()).unwrap()
                })
                .collect::<Vec<_>>()
        };
        // The same start everywhere: the exact sum.
        let same = bound(&mut clients, 1, [[7; 32]; 3]);
        let total = decode(&sum("s-1", &members, 3, &same).unwrap());
        assert_eq!(total, vec![1.0, 3.0, 3.75]);
        // One member on another start: the residue of its pairs swamps
        // the sum (and no two members' pair alone cancels it).
        let mixed = bound(&mut clients, 2, [[7; 32], [8; 32], [8; 32]]);
        let total = sum("s-1", &members, 3, &mixed).unwrap();
        let exact = encode(&[1.0, 3.0, 3.75]).unwrap();
        assert!(
            total
                .iter()
                .zip(&exact)
                .all(|(t, e)| t.wrapping_sub(*e).min(e.wrapping_sub(*t)) > 1 << 40),
            "{total:?}"
        );
    }

    #[test]
    fn a_mask_prepared_ahead_is_the_mask_of_its_round() {
        let nodes = ["a", "b", "c"];
        let members: Vec<NodeId> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let mut clients = session(&nodes);
        let inputs = [[1.5, -2.0, 0.25], [0.5, 1.0, 0.0], [-1.0, 4.0, 3.5]];
        // Round 1 unprepared; then a prepares 2 and b a wrong round, c
        // none; a prepares 3 only after claiming it (ignored).
        let plain = masked(&mut clients, 1, &inputs);
        clients[0].prepare(2);
        clients[1].prepare(7);
        clients[1].prepare(1);
        let out = masked(&mut clients, 2, &inputs);
        assert_eq!(
            decode(&sum("s-1", &members, 3, &out).unwrap()),
            vec![1.0, 3.0, 3.75]
        );
        assert_ne!(out[0].values, plain[0].values);
        // The prepared mask is used once: the same round masked again by
        // its streams gives the same values.
        let again = clients[0].mask(2, &encode(&inputs[0]).unwrap()).unwrap();
        assert_eq!(again.values, out[0].values);
        clients[0].claim(3).unwrap();
        clients[0].prepare(3);
        assert!(clients[0].prepared.is_none());
    }

    #[test]
    fn a_missing_member_is_named_and_nothing_is_summed() {
        let nodes = ["a", "b", "c"];
        let members: Vec<NodeId> = nodes.iter().map(|n| (*n).to_owned()).collect();
        let mut clients = session(&nodes);
        let mut out = masked(&mut clients, 1, &[[1.0; 3], [2.0; 3], [3.0; 3]]);
        out.remove(1);
        assert_eq!(
            sum("s-1", &members, 3, &out),
            Err(Error::Incomplete {
                session: "s-1".into(),
                missing: vec!["b".into()]
            })
        );
        let again = out[0].clone();
        out.push(again);
        assert!(matches!(
            sum("s-1", &members, 3, &out),
            Err(Error::Duplicate { .. })
        ));
    }

    #[test]
    fn a_round_number_is_masked_once_and_in_order() {
        let mut clients = session(&["a", "b"]);
        let c = &mut clients[0];
        c.claim(2).unwrap();
        assert!(matches!(
            c.claim(2),
            Err(Error::Replayed {
                number: 2,
                last: 2,
                ..
            })
        ));
        assert!(matches!(c.claim(1), Err(Error::Replayed { .. })));
        // Only the round last claimed can be masked.
        assert!(c.mask(2, &[0, 0, 0]).is_ok());
        assert!(matches!(c.mask(1, &[0, 0, 0]), Err(Error::Replayed { .. })));
        c.claim(5).unwrap();
        assert!(matches!(c.mask(5, &[0, 0]), Err(Error::WrongLength { .. })));
    }

    #[test]
    fn keys_must_include_this_members_own_and_only_participants() {
        let params = RoundParams::new("s-1", ["a", "b", "c"], 2, 3).unwrap();
        let (mut a, ka) = SessionClient::new(params.clone(), "a").unwrap();
        let (_, kb) = SessionClient::new(params.clone(), "b").unwrap();
        // Not yet agreed: nothing can be claimed.
        assert!(matches!(a.claim(1), Err(Error::OutOfOrder { .. })));
        let substituted = SessionKeys {
            node: "a".into(),
            mask_key: kb.mask_key,
        };
        assert!(matches!(
            a.agree(&[substituted, kb.clone()]),
            Err(Error::NotOwnKeys { .. })
        ));
        let outsider = SessionKeys {
            node: "z".into(),
            mask_key: kb.mask_key,
        };
        assert!(matches!(
            a.agree(&[ka.clone(), outsider]),
            Err(Error::NotParticipant { .. })
        ));
        assert!(matches!(
            a.agree(std::slice::from_ref(&ka)),
            Err(Error::TooFewNodes { .. })
        ));
        // Two of the three participants reach the threshold.
        a.agree(&[ka.clone(), kb.clone()]).unwrap();
        a.claim(1).unwrap();
        assert!(matches!(a.agree(&[ka, kb]), Err(Error::Duplicate { .. })));
        assert!(SessionClient::new(params, "z").is_err());
    }

    #[test]
    fn statements_bind_the_session_and_differ_from_round_statements() {
        let k = SessionKeys {
            node: "a".into(),
            mask_key: [7; 32],
        };
        assert_ne!(k.statement("s-1"), k.statement("s-2"));
        let round = crate::Advertise {
            node: "a".into(),
            channel_key: [7; 32],
            mask_key: [7; 32],
            self_mask_commitment: [7; 32],
        };
        assert_ne!(k.statement("s-1"), round.statement("s-1"));
    }
}
