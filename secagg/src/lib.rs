//! Secure aggregation for federated training rounds: the coordinator learns
//! the sum of the nodes' update vectors and nothing about any one of them.
//!
//! This is the semi-honest protocol of Bonawitz et al., "Practical Secure
//! Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), for the
//! few, well-connected participants of a hospital federation:
//!
//! 1. **Advertise.** Each node makes two X25519 key pairs for the round: a
//!    channel key (to encrypt shares to other nodes through the coordinator)
//!    and a mask key (for pairwise masks), and commits to a random self-mask
//!    seed.
//! 2. **Share keys.** Each node splits its mask key and its self-mask seed
//!    into Shamir shares (threshold `t`), one per advertised node, and sends
//!    each share encrypted to its recipient (ChaCha20-Poly1305 under a key
//!    agreed between the two channel keys). The coordinator only routes.
//! 3. **Masked input.** Each node adds to its update, modulo 2^64, the
//!    stream of its self-mask seed and, for every other node that shared
//!    keys, the stream of their pairwise secret: added if its id sorts
//!    first, subtracted otherwise. Pairwise streams cancel in the sum.
//!    A node masks once per round.
//!
//! Steps 1 and 2 do not depend on the update, so a caller can agree the
//! keys of a round while the round before it is still computing; the key
//! agreements step 3 needs are worked out at step 2, leaving step 3 (on
//! the critical path, after the update exists) only decryption and
//! stream additions.
//! 4. **Unmask.** Given the nodes whose masked input arrived (survivors),
//!    each node reveals its share of each survivor's self-mask seed and of
//!    each dropped node's mask key, never both for one node. From `t` shares
//!    the coordinator removes the survivors' self masks and the dropped
//!    nodes' pairwise masks, and is left with the survivors' sum.
//!
//! A node that drops at any step after sharing keys is handled as long as
//! `t` nodes remain; the coordinator learns nothing beyond the sum unless
//! it colludes with `t` or more nodes, and no subset of the survivors' sum
//! is ever unmasked. Updates are fixed-point encoded ([`encode`]): weights
//! are summed exactly. With two survivors each learns the other's update
//! from the sum, as with any sum; rounds need three.
//!
//! A training run's rounds, always among the same few nodes, use a
//! [`session`] instead: keys agreed once per run and one trip per round,
//! with a dropped node answered by re-keying among the rest rather than by
//! unmasking.
//!
//! Left to the caller: authenticating advertised keys between nodes. The
//! coordinator routes keys; one that substituted its own could read shares.
//! [`Advertise::statement`] is what a node signs to vouch for its keys; ghx
//! nodes sign it with their certificate key and every node checks the
//! others' signatures before dealing shares (`ghx_pki::signed`), which
//! closes that attack. The rest of the protocol is the semi-honest one
//! (e.g. a coordinator lying about who survived is refused by
//! [`Client::unmask`], but one sending different nodes different survivor
//! sets would need the active protocol's consistency round).

use std::collections::{BTreeMap, BTreeSet};

pub mod session;
pub use session::{SessionClient, SessionKeys};

use hkdf::Hkdf;
use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use ring::aead;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

/// A participant's id (the node id of its certificate).
pub type NodeId = String;

/// Fractional bits of the fixed-point encoding of updates.
pub const SCALE_BITS: u32 = 24;

/// The largest magnitude [`encode`] accepts: sums of up to 255 such values
/// cannot overflow the 64-bit ring.
pub const MAX_MAGNITUDE: f64 = (1u64 << (63 - SCALE_BITS - 8)) as f64;

/// Why a step of a round failed. Messages name the round, the step's
/// problem and the nodes involved, never values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error(
        "round {round}: the threshold {threshold} must be at least 2 and at most the {participants} participants"
    )]
    BadThreshold {
        round: String,
        threshold: u8,
        participants: usize,
    },
    #[error("round {round}: {node} is not a participant of this round")]
    NotParticipant { round: String, node: NodeId },
    #[error("round {round}: {node} sent its {step} twice")]
    Duplicate {
        round: String,
        node: NodeId,
        step: &'static str,
    },
    #[error("round {round}: {node} sent its {step} before taking part in the step before")]
    OutOfOrder {
        round: String,
        node: NodeId,
        step: &'static str,
    },
    #[error("round {round}: only {have} nodes are left at {step}, {need} are needed")]
    TooFewNodes {
        round: String,
        step: &'static str,
        have: usize,
        need: usize,
    },
    #[error(
        "round {round}: the share from {from} to {to} is missing, misrouted or does not decrypt"
    )]
    BadShare {
        round: String,
        from: NodeId,
        to: NodeId,
    },
    #[error("round {round}: {node} sent an update of {got} values, the round sums {expected}")]
    WrongLength {
        round: String,
        node: NodeId,
        got: usize,
        expected: usize,
    },
    #[error("round {round}: revealing what was asked would unmask {node}'s own update; refused")]
    Contradictory { round: String, node: NodeId },
    #[error("round {round}: the {what} of {node} could not be rebuilt from the shares given")]
    Reconstruct {
        round: String,
        node: NodeId,
        what: &'static str,
    },
    #[error("round {round}: the keys listed as {node}'s own are not the ones it advertised")]
    NotOwnKeys { round: String, node: NodeId },
    /// The value itself is never in the message: it is a node's unmasked
    /// input, and errors travel to the coordinator and its run records.
    #[error("update value {index} is not a finite number within ±{MAX_MAGNITUDE}; updates must be")]
    OutOfRange { index: usize },
    #[error(
        "session {session}: round {number} was asked for after round {last}; each round is masked once, in order"
    )]
    Replayed {
        session: String,
        number: u32,
        last: u32,
    },
    #[error("session {session}: no masked input from {}; the round cannot be summed without every member", missing.join(", "))]
    Incomplete {
        session: String,
        missing: Vec<NodeId>,
    },
}

/// What every participant of a round agrees on before it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundParams {
    /// Unique per round (e.g. `study-0007/train/round-12`); binds keys,
    /// shares and masks to the round.
    pub round: String,
    /// Node ids, sorted and distinct.
    pub participants: Vec<NodeId>,
    /// Shares needed to unmask, and nodes needed at every step.
    pub threshold: u8,
    /// Length of the update vectors.
    pub dim: usize,
}

impl RoundParams {
    pub fn new(
        round: impl Into<String>,
        participants: impl IntoIterator<Item = impl Into<NodeId>>,
        threshold: u8,
        dim: usize,
    ) -> Result<Self, Error> {
        let round = round.into();
        let participants: Vec<NodeId> = participants
            .into_iter()
            .map(Into::into)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if threshold < 2 || usize::from(threshold) > participants.len() || participants.len() > 255
        {
            return Err(Error::BadThreshold {
                round,
                threshold,
                participants: participants.len(),
            });
        }
        Ok(RoundParams {
            round,
            participants,
            threshold,
            dim,
        })
    }

    fn check_participant(&self, node: &str) -> Result<(), Error> {
        if self.participants.iter().any(|p| p == node) {
            Ok(())
        } else {
            Err(Error::NotParticipant {
                round: self.round.clone(),
                node: node.to_owned(),
            })
        }
    }

    fn enough(&self, step: &'static str, have: usize) -> Result<(), Error> {
        let need = usize::from(self.threshold);
        if have < need {
            return Err(Error::TooFewNodes {
                round: self.round.clone(),
                step,
                have,
                need,
            });
        }
        Ok(())
    }
}

/// Step 1, node to coordinator to every node: the round's public keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertise {
    pub node: NodeId,
    pub channel_key: [u8; 32],
    pub mask_key: [u8; 32],
    /// SHA-256 of the self-mask seed, so its reconstruction can be checked.
    pub self_mask_commitment: [u8; 32],
}

impl Advertise {
    /// The bytes a node signs to vouch for its advertisement in `round`
    /// (see the module doc: authenticating keys is the caller's part).
    pub fn statement(&self, round: &str) -> Vec<u8> {
        [
            b"ghx-secagg/v1 keys".as_slice(),
            &[0],
            round.as_bytes(),
            &[0],
            self.node.as_bytes(),
            &[0],
            &self.channel_key,
            &self.mask_key,
            &self.self_mask_commitment,
        ]
        .concat()
    }
}

/// Step 2, node to coordinator to one node: a share pair, encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub from: NodeId,
    pub to: NodeId,
    pub ciphertext: Vec<u8>,
}

/// Step 3, node to coordinator: the masked update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub node: NodeId,
    pub values: Vec<u64>,
}

/// Step 4, node to coordinator: shares of survivors' self masks and of
/// dropped nodes' mask keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmasking {
    pub node: NodeId,
    /// (survivor, share of its self-mask seed)
    pub self_mask_shares: Vec<(NodeId, Vec<u8>)>,
    /// (dropped node, share of its mask key)
    pub mask_key_shares: Vec<(NodeId, Vec<u8>)>,
}

/// The outcome of a round at the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// The sum of the contributors' encoded updates (see [`decode`]).
    pub sum: Vec<u64>,
    /// Whose updates are in the sum.
    pub contributors: Vec<NodeId>,
    /// Nodes that shared keys but whose update did not arrive.
    pub dropped: Vec<NodeId>,
}

/// Encodes an update in fixed point for summing.
pub fn encode(values: &[f64]) -> Result<Vec<u64>, Error> {
    values
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            if !value.is_finite() || value.abs() >= MAX_MAGNITUDE {
                return Err(Error::OutOfRange { index });
            }
            // Two's complement in the ring; within range by the check.
            Ok((value * f64::from(1u32 << SCALE_BITS)).round() as i64 as u64)
        })
        .collect()
}

/// Decodes a sum of [`encode`]d updates.
pub fn decode(sum: &[u64]) -> Vec<f64> {
    sum.iter()
        .map(|&v| v as i64 as f64 / f64::from(1u32 << SCALE_BITS))
        .collect()
}

const SHARE_INFO: &[u8] = b"ghx-secagg/v1 share";
const PAIR_INFO: &[u8] = b"ghx-secagg/v1 pair";

/// A 32-byte key from a Diffie-Hellman secret, bound to the round and to
/// the labelled parties.
fn derive(shared: &[u8; 32], round: &str, label: &[u8], a: &str, b: &str) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(round.as_bytes()), shared);
    let mut info = Vec::with_capacity(label.len() + a.len() + b.len() + 2);
    info.extend_from_slice(label);
    info.push(0);
    info.extend_from_slice(a.as_bytes());
    info.push(0);
    info.extend_from_slice(b.as_bytes());
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// The pairwise mask seed of two nodes: the same from either side.
fn pair_seed(round: &str, own: &StaticSecret, peer_key: &[u8; 32], a: &str, b: &str) -> [u8; 32] {
    let shared = own.diffie_hellman(&PublicKey::from(*peer_key));
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    derive(shared.as_bytes(), round, PAIR_INFO, lo, hi)
}

/// Adds (or subtracts) the seed's stream to `values`, modulo 2^64.
fn apply_stream(values: &mut [u64], seed: [u8; 32], add: bool) {
    let mut rng = ChaCha20Rng::from_seed(seed);
    for v in values.iter_mut() {
        let r = rng.next_u64();
        *v = if add {
            v.wrapping_add(r)
        } else {
            v.wrapping_sub(r)
        };
    }
}

fn aead_key(key: [u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key).expect("32-byte ChaCha20 key"),
    )
}

/// The associated data of a share: round, sender and recipient.
fn share_aad(round: &str, from: &str, to: &str) -> Vec<u8> {
    [round.as_bytes(), &[0], from.as_bytes(), &[0], to.as_bytes()].concat()
}

/// What a node agreed with one peer at step 2.
struct Agreed {
    share_key: [u8; 32],
    pair_seed: [u8; 32],
}

/// One node's side of a round. Secrets stay in here.
pub struct Client {
    params: RoundParams,
    node: NodeId,
    channel: StaticSecret,
    mask: StaticSecret,
    self_mask: [u8; 32],
    /// What this node advertised.
    own: Advertise,
    /// Advertised keys of the nodes that took part in step 1.
    peers: BTreeMap<NodeId, Advertise>,
    /// Worked out at step 2, so step 3 (on the round's critical path) does
    /// no key agreement: per peer, the key its share to this node is
    /// encrypted under and the pair's mask seed.
    agreed: BTreeMap<NodeId, Agreed>,
    /// Shares held for each node (own included): (mask key, self mask).
    held: BTreeMap<NodeId, (Vec<u8>, Vec<u8>)>,
    /// Nodes whose pairwise masks are in this node's masked input.
    masked_with: Option<BTreeSet<NodeId>>,
    /// The survivor set this node unmasked for, once it has.
    revealed_for: Option<BTreeSet<NodeId>>,
}

impl Client {
    /// Starts a round as `node`; returns the advertisement to send.
    pub fn new(params: RoundParams, node: &str) -> Result<(Client, Advertise), Error> {
        params.check_participant(node)?;
        let mut rng = rand::rngs::OsRng;
        let channel = StaticSecret::random_from_rng(rng);
        let mask = StaticSecret::random_from_rng(rng);
        let mut self_mask = [0u8; 32];
        rng.fill_bytes(&mut self_mask);
        let advertise = Advertise {
            node: node.to_owned(),
            channel_key: PublicKey::from(&channel).to_bytes(),
            mask_key: PublicKey::from(&mask).to_bytes(),
            self_mask_commitment: Sha256::digest(self_mask).into(),
        };
        Ok((
            Client {
                params,
                node: node.to_owned(),
                channel,
                mask,
                self_mask,
                own: advertise.clone(),
                peers: BTreeMap::new(),
                agreed: BTreeMap::new(),
                held: BTreeMap::new(),
                masked_with: None,
                revealed_for: None,
            },
            advertise,
        ))
    }

    /// Step 2: given every advertisement the coordinator collected (this
    /// node's included), returns one encrypted share pair per other node.
    pub fn share_keys(&mut self, advertised: &[Advertise]) -> Result<Vec<EncryptedShare>, Error> {
        let round = self.params.round.clone();
        if !self.peers.is_empty() {
            return Err(Error::Duplicate {
                round,
                node: self.node.clone(),
                step: "key shares",
            });
        }
        let mut peers = BTreeMap::new();
        for a in advertised {
            self.params.check_participant(&a.node)?;
            if peers.insert(a.node.clone(), a.clone()).is_some() {
                return Err(Error::Duplicate {
                    round,
                    node: a.node.clone(),
                    step: "advertisement",
                });
            }
        }
        match peers.get(&self.node) {
            None => {
                return Err(Error::OutOfOrder {
                    round,
                    node: self.node.clone(),
                    step: "key shares",
                });
            }
            // The list every node deals to must hold this node's keys as
            // it made them.
            Some(listed) if *listed != self.own => {
                return Err(Error::NotOwnKeys {
                    round,
                    node: self.node.clone(),
                });
            }
            Some(_) => {}
        }
        self.params.enough("key sharing", peers.len())?;
        let dealer = blahaj::Sharks(self.params.threshold);
        let mask_shares = dealer.dealer(&self.mask.to_bytes()).take(peers.len());
        let self_shares = dealer.dealer(&self.self_mask).take(peers.len());
        let mut out = Vec::new();
        for ((peer, advert), (m, s)) in peers.iter().zip(mask_shares.zip(self_shares)) {
            let (m, s) = (Vec::from(&m), Vec::from(&s));
            if *peer == self.node {
                self.held.insert(peer.clone(), (m, s));
                continue;
            }
            let shared = self
                .channel
                .diffie_hellman(&PublicKey::from(advert.channel_key));
            let key = derive(shared.as_bytes(), &round, SHARE_INFO, &self.node, peer);
            self.agreed.insert(
                peer.clone(),
                Agreed {
                    share_key: derive(shared.as_bytes(), &round, SHARE_INFO, peer, &self.node),
                    pair_seed: pair_seed(&round, &self.mask, &advert.mask_key, &self.node, peer),
                },
            );
            let mut plaintext = Vec::with_capacity(2 + m.len() + s.len());
            plaintext.extend_from_slice(&u16::try_from(m.len()).unwrap_or(u16::MAX).to_be_bytes());
            plaintext.extend_from_slice(&m);
            plaintext.extend_from_slice(&s);
            // Each key encrypts exactly one message, so a zero nonce is safe.
            aead_key(key)
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key([0; 12]),
                    aead::Aad::from(share_aad(&round, &self.node, peer)),
                    &mut plaintext,
                )
                .map_err(|_| Error::BadShare {
                    round: round.clone(),
                    from: self.node.clone(),
                    to: peer.clone(),
                })?;
            out.push(EncryptedShare {
                from: self.node.clone(),
                to: peer.clone(),
                ciphertext: plaintext,
            });
        }
        self.peers = peers;
        Ok(out)
    }

    /// Step 3: given the shares addressed to this node (from every node
    /// that completed step 2), masks `input` (already [`encode`]d).
    pub fn mask_input(
        &mut self,
        shares: &[EncryptedShare],
        input: &[u64],
    ) -> Result<MaskedInput, Error> {
        let round = self.params.round.clone();
        if self.peers.is_empty() {
            return Err(Error::OutOfOrder {
                round,
                node: self.node.clone(),
                step: "masked input",
            });
        }
        // A second masked input over other peers would let the difference
        // of the two reveal pairwise masks.
        if self.masked_with.is_some() {
            return Err(Error::Duplicate {
                round,
                node: self.node.clone(),
                step: "masked input",
            });
        }
        if input.len() != self.params.dim {
            return Err(Error::WrongLength {
                round,
                node: self.node.clone(),
                got: input.len(),
                expected: self.params.dim,
            });
        }
        let mut with = BTreeSet::from([self.node.clone()]);
        for share in shares {
            let bad = || Error::BadShare {
                round: round.clone(),
                from: share.from.clone(),
                to: share.to.clone(),
            };
            let Some(agreed) = self.agreed.get(&share.from) else {
                return Err(bad());
            };
            if share.to != self.node || share.from == self.node || !with.insert(share.from.clone())
            {
                return Err(bad());
            }
            let mut buffer = share.ciphertext.clone();
            let plain = aead_key(agreed.share_key)
                .open_in_place(
                    aead::Nonce::assume_unique_for_key([0; 12]),
                    aead::Aad::from(share_aad(&round, &share.from, &self.node)),
                    &mut buffer,
                )
                .map_err(|_| bad())?;
            let Some((len, rest)) = plain.split_first_chunk::<2>() else {
                return Err(bad());
            };
            let len = usize::from(u16::from_be_bytes(*len));
            if rest.len() < len {
                return Err(bad());
            }
            let (m, s) = rest.split_at(len);
            self.held
                .insert(share.from.clone(), (m.to_vec(), s.to_vec()));
        }
        self.params.enough("masked input", with.len())?;
        let mut values = input.to_vec();
        apply_stream(&mut values, self.self_mask, true);
        for peer in with.iter().filter(|p| **p != self.node) {
            apply_stream(&mut values, self.agreed[peer].pair_seed, self.node < *peer);
        }
        self.masked_with = Some(with);
        Ok(MaskedInput {
            node: self.node.clone(),
            values,
        })
    }

    /// Step 4: given the nodes whose masked input the coordinator received,
    /// reveals shares of their self masks and of the others' mask keys.
    /// Refuses a survivor set that would unmask one node's update: one this
    /// node never masked with, or a second, different set.
    pub fn unmask(&mut self, survivors: &[NodeId]) -> Result<Unmasking, Error> {
        let round = self.params.round.clone();
        let Some(with) = &self.masked_with else {
            return Err(Error::OutOfOrder {
                round,
                node: self.node.clone(),
                step: "unmasking",
            });
        };
        let survivors: BTreeSet<NodeId> = survivors.iter().cloned().collect();
        if let Some(outside) = survivors.iter().find(|s| !with.contains(*s)) {
            return Err(Error::Contradictory {
                round,
                node: outside.clone(),
            });
        }
        if let Some(before) = &self.revealed_for
            && *before != survivors
        {
            let node = before
                .symmetric_difference(&survivors)
                .next()
                .cloned()
                .unwrap_or_default();
            return Err(Error::Contradictory { round, node });
        }
        self.params.enough("unmasking", survivors.len())?;
        let mut out = Unmasking {
            node: self.node.clone(),
            self_mask_shares: Vec::new(),
            mask_key_shares: Vec::new(),
        };
        for peer in with {
            let (mask_share, self_share) = &self.held[peer];
            if survivors.contains(peer) {
                out.self_mask_shares
                    .push((peer.clone(), self_share.clone()));
            } else {
                out.mask_key_shares.push((peer.clone(), mask_share.clone()));
            }
        }
        self.revealed_for = Some(survivors);
        Ok(out)
    }
}

/// The coordinator's side of a round: routes shares, collects masked
/// inputs and removes masks. It never holds a node's secret key.
pub struct Aggregator {
    params: RoundParams,
    advertised: BTreeMap<NodeId, Advertise>,
    /// Senders of step 2, with their shares by recipient.
    shares: BTreeMap<NodeId, BTreeMap<NodeId, EncryptedShare>>,
    masked: BTreeMap<NodeId, Vec<u64>>,
}

impl Aggregator {
    pub fn new(params: RoundParams) -> Self {
        Aggregator {
            params,
            advertised: BTreeMap::new(),
            shares: BTreeMap::new(),
            masked: BTreeMap::new(),
        }
    }

    fn duplicate(&self, node: &str, step: &'static str) -> Error {
        Error::Duplicate {
            round: self.params.round.clone(),
            node: node.to_owned(),
            step,
        }
    }

    fn out_of_order(&self, node: &str, step: &'static str) -> Error {
        Error::OutOfOrder {
            round: self.params.round.clone(),
            node: node.to_owned(),
            step,
        }
    }

    /// Step 1: one advertisement per participant.
    pub fn advertise(&mut self, advertise: Advertise) -> Result<(), Error> {
        self.params.check_participant(&advertise.node)?;
        if self.advertised.contains_key(&advertise.node) {
            return Err(self.duplicate(&advertise.node, "advertisement"));
        }
        self.advertised.insert(advertise.node.clone(), advertise);
        Ok(())
    }

    /// Closes step 1: what every node gets for step 2.
    pub fn advertisements(&self) -> Result<Vec<Advertise>, Error> {
        self.params.enough("key sharing", self.advertised.len())?;
        Ok(self.advertised.values().cloned().collect())
    }

    /// Step 2: a node's shares, one for every other advertised node.
    pub fn submit_shares(&mut self, from: &str, shares: Vec<EncryptedShare>) -> Result<(), Error> {
        if !self.advertised.contains_key(from) {
            return Err(self.out_of_order(from, "key shares"));
        }
        if self.shares.contains_key(from) {
            return Err(self.duplicate(from, "key shares"));
        }
        let mut by_recipient = BTreeMap::new();
        for share in shares {
            if share.from != from
                || share.to == from
                || !self.advertised.contains_key(&share.to)
                || by_recipient.contains_key(&share.to)
            {
                return Err(Error::BadShare {
                    round: self.params.round.clone(),
                    from: share.from,
                    to: share.to,
                });
            }
            by_recipient.insert(share.to.clone(), share);
        }
        if let Some(missing) = self
            .advertised
            .keys()
            .find(|n| *n != from && !by_recipient.contains_key(*n))
        {
            return Err(Error::BadShare {
                round: self.params.round.clone(),
                from: from.to_owned(),
                to: missing.clone(),
            });
        }
        self.shares.insert(from.to_owned(), by_recipient);
        Ok(())
    }

    /// Closes step 2 for `node`: the shares addressed to it.
    pub fn shares_for(&self, node: &str) -> Result<Vec<EncryptedShare>, Error> {
        self.params.enough("masked input", self.shares.len())?;
        Ok(self
            .shares
            .values()
            .filter_map(|by| by.get(node).cloned())
            .collect())
    }

    /// Step 3: a node's masked update.
    pub fn submit_masked(&mut self, input: MaskedInput) -> Result<(), Error> {
        if !self.shares.contains_key(&input.node) {
            return Err(self.out_of_order(&input.node, "masked input"));
        }
        if self.masked.contains_key(&input.node) {
            return Err(self.duplicate(&input.node, "masked input"));
        }
        if input.values.len() != self.params.dim {
            return Err(Error::WrongLength {
                round: self.params.round.clone(),
                node: input.node,
                got: input.values.len(),
                expected: self.params.dim,
            });
        }
        self.masked.insert(input.node, input.values);
        Ok(())
    }

    /// Closes step 3: the survivors every node is asked to unmask for.
    pub fn survivors(&self) -> Result<Vec<NodeId>, Error> {
        self.params.enough("unmasking", self.masked.len())?;
        Ok(self.masked.keys().cloned().collect())
    }

    /// Step 4: removes the masks with the unmaskings received (from at
    /// least `threshold` survivors) and returns the survivors' sum.
    pub fn finish(&self, unmaskings: &[Unmasking]) -> Result<Aggregate, Error> {
        let round = &self.params.round;
        let mut from = BTreeSet::new();
        for u in unmaskings {
            if !self.masked.contains_key(&u.node) {
                return Err(self.out_of_order(&u.node, "unmasking"));
            }
            if !from.insert(u.node.clone()) {
                return Err(self.duplicate(&u.node, "unmasking"));
            }
        }
        self.params.enough("unmasking", from.len())?;
        let sharks = blahaj::Sharks(self.params.threshold);
        let recover =
            |node: &NodeId, what: &'static str, pick: &dyn Fn(&Unmasking) -> Option<Vec<u8>>| {
                let shares: Vec<blahaj::Share> = unmaskings
                    .iter()
                    .filter_map(pick)
                    .filter_map(|bytes| blahaj::Share::try_from(bytes.as_slice()).ok())
                    .collect();
                let fail = || Error::Reconstruct {
                    round: round.clone(),
                    node: node.clone(),
                    what,
                };
                let secret = sharks.recover(&shares).map_err(|_| fail())?;
                <[u8; 32]>::try_from(secret.as_slice()).map_err(|_| fail())
            };
        let mut sum = vec![0u64; self.params.dim];
        for values in self.masked.values() {
            for (s, v) in sum.iter_mut().zip(values) {
                *s = s.wrapping_add(*v);
            }
        }
        for survivor in self.masked.keys() {
            let seed = recover(survivor, "self mask", &|u: &Unmasking| {
                u.self_mask_shares
                    .iter()
                    .find(|(n, _)| n == survivor)
                    .map(|(_, s)| s.clone())
            })?;
            if <[u8; 32]>::from(Sha256::digest(seed))
                != self.advertised[survivor].self_mask_commitment
            {
                return Err(Error::Reconstruct {
                    round: round.clone(),
                    node: survivor.clone(),
                    what: "self mask",
                });
            }
            apply_stream(&mut sum, seed, false);
        }
        let dropped: Vec<NodeId> = self
            .shares
            .keys()
            .filter(|n| !self.masked.contains_key(*n))
            .cloned()
            .collect();
        for gone in &dropped {
            let key = recover(gone, "mask key", &|u: &Unmasking| {
                u.mask_key_shares
                    .iter()
                    .find(|(n, _)| n == gone)
                    .map(|(_, s)| s.clone())
            })?;
            let secret = StaticSecret::from(key);
            if PublicKey::from(&secret).to_bytes() != self.advertised[gone].mask_key {
                return Err(Error::Reconstruct {
                    round: round.clone(),
                    node: gone.clone(),
                    what: "mask key",
                });
            }
            // Each survivor added the pair's stream if it sorts first.
            for survivor in self.masked.keys() {
                let seed = pair_seed(
                    round,
                    &secret,
                    &self.advertised[survivor].mask_key,
                    gone,
                    survivor,
                );
                apply_stream(&mut sum, seed, survivor > gone);
            }
        }
        Ok(Aggregate {
            sum,
            contributors: self.masked.keys().cloned().collect(),
            dropped,
        })
    }
}

/// Runs a whole round with every party in this process and no one
/// dropping: for simulations and tests, and as the reference a networked
/// round must agree with.
pub fn sum_in_process(
    params: &RoundParams,
    inputs: &BTreeMap<NodeId, Vec<u64>>,
) -> Result<Aggregate, Error> {
    let mut aggregator = Aggregator::new(params.clone());
    let mut clients = Vec::new();
    for node in inputs.keys() {
        let (client, advertise) = Client::new(params.clone(), node)?;
        aggregator.advertise(advertise)?;
        clients.push(client);
    }
    let advertised = aggregator.advertisements()?;
    for (client, node) in clients.iter_mut().zip(inputs.keys()) {
        let shares = client.share_keys(&advertised)?;
        aggregator.submit_shares(node, shares)?;
    }
    for (client, (node, input)) in clients.iter_mut().zip(inputs) {
        let shares = aggregator.shares_for(node)?;
        aggregator.submit_masked(client.mask_input(&shares, input)?)?;
    }
    let survivors = aggregator.survivors()?;
    let unmaskings = clients
        .iter_mut()
        .map(|c| c.unmask(&survivors))
        .collect::<Result<Vec<_>, _>>()?;
    aggregator.finish(&unmaskings)
}
