//! Conversions between secure-aggregation round messages (`ghx_secagg`) and
//! the wire, in both directions. Keys must be exactly 32 bytes; anything
//! else from a peer is an error that says which field was wrong.

use ghx_secagg::{Advertise, EncryptedShare, MaskedInput, RoundParams, SessionKeys, Unmasking};
use ghx_study::lineage::{Evidence, SignedInput};

use crate::v1 as pb;

fn key(field: &str, bytes: &[u8]) -> Result<[u8; 32], String> {
    bytes
        .try_into()
        .map_err(|_| format!("{field} has {} bytes; expected 32", bytes.len()))
}

pub fn params_to_wire(p: &RoundParams) -> pb::RoundParams {
    pb::RoundParams {
        round: p.round.clone(),
        participants: p.participants.clone(),
        threshold: u32::from(p.threshold),
        dim: u32::try_from(p.dim).unwrap_or(u32::MAX),
    }
}

pub fn params_from_wire(p: pb::RoundParams) -> Result<RoundParams, String> {
    let threshold = u8::try_from(p.threshold).map_err(|_| "threshold above 255".to_owned())?;
    RoundParams::new(p.round, p.participants, threshold, p.dim as usize).map_err(|e| e.to_string())
}

pub fn advertise_to_wire(a: &Advertise) -> pb::AdvertisedKeys {
    pb::AdvertisedKeys {
        node: a.node.clone(),
        channel_key: a.channel_key.to_vec(),
        mask_key: a.mask_key.to_vec(),
        self_mask_commitment: a.self_mask_commitment.to_vec(),
        ..Default::default()
    }
}

pub fn advertise_from_wire(a: pb::AdvertisedKeys) -> Result<Advertise, String> {
    Ok(Advertise {
        channel_key: key("channel_key", &a.channel_key)?,
        mask_key: key("mask_key", &a.mask_key)?,
        self_mask_commitment: key("self_mask_commitment", &a.self_mask_commitment)?,
        node: a.node,
    })
}

pub fn session_keys_to_wire(k: &SessionKeys) -> pb::SessionKeys {
    pb::SessionKeys {
        node: k.node.clone(),
        mask_key: k.mask_key.to_vec(),
        ..Default::default()
    }
}

pub fn session_keys_from_wire(k: pb::SessionKeys) -> Result<SessionKeys, String> {
    Ok(SessionKeys {
        mask_key: key("mask_key", &k.mask_key)?,
        node: k.node,
    })
}

pub fn share_to_wire(s: EncryptedShare) -> pb::EncryptedShare {
    pb::EncryptedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext,
    }
}

pub fn share_from_wire(s: pb::EncryptedShare) -> EncryptedShare {
    EncryptedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext,
    }
}

pub fn masked_to_wire(m: MaskedInput) -> pb::RoundMaskedInputResponse {
    pb::RoundMaskedInputResponse {
        node: m.node,
        values: m.values,
        ..Default::default()
    }
}

pub fn masked_from_wire(m: pb::RoundMaskedInputResponse) -> MaskedInput {
    MaskedInput {
        node: m.node,
        values: m.values,
    }
}

fn node_shares_to_wire(shares: Vec<(String, Vec<u8>)>) -> Vec<pb::NodeShare> {
    shares
        .into_iter()
        .map(|(node, share)| pb::NodeShare { node, share })
        .collect()
}

fn node_shares_from_wire(shares: Vec<pb::NodeShare>) -> Vec<(String, Vec<u8>)> {
    shares.into_iter().map(|s| (s.node, s.share)).collect()
}

pub fn unmasking_to_wire(u: Unmasking) -> pb::RoundUnmaskResponse {
    pb::RoundUnmaskResponse {
        node: u.node,
        self_mask_shares: node_shares_to_wire(u.self_mask_shares),
        mask_key_shares: node_shares_to_wire(u.mask_key_shares),
    }
}

pub fn unmasking_from_wire(u: pb::RoundUnmaskResponse) -> Unmasking {
    Unmasking {
        node: u.node,
        self_mask_shares: node_shares_from_wire(u.self_mask_shares),
        mask_key_shares: node_shares_from_wire(u.mask_key_shares),
    }
}

pub fn evidence_to_wire(e: &Evidence) -> pb::LineageEvidence {
    pb::LineageEvidence {
        session: e.session.clone(),
        round: e.round,
        members: e.members.clone(),
        keys_sha256: e.keys_sha256.to_vec(),
        parent: e.parent.to_vec(),
        inputs: e
            .inputs
            .iter()
            .map(|i| pb::LineageInput {
                node: i.node.clone(),
                values: i.values.clone(),
                signature: i.signature.clone(),
                certificate_pem: i.certificate_pem.clone(),
            })
            .collect(),
    }
}

pub fn evidence_from_wire(e: pb::LineageEvidence) -> Result<Evidence, String> {
    Ok(Evidence {
        keys_sha256: key("lineage keys_sha256", &e.keys_sha256)?,
        parent: key("lineage parent", &e.parent)?,
        session: e.session,
        round: e.round,
        members: e.members,
        inputs: e
            .inputs
            .into_iter()
            .map(|i| SignedInput {
                node: i.node,
                values: i.values,
                signature: i.signature,
                certificate_pem: i.certificate_pem,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_messages_survive_the_wire_and_bad_keys_are_named() {
        let params = RoundParams::new("r", ["a", "b", "c"], 2, 4).unwrap();
        assert_eq!(params_from_wire(params_to_wire(&params)).unwrap(), params);
        let a = Advertise {
            node: "a".to_owned(),
            channel_key: [1; 32],
            mask_key: [2; 32],
            self_mask_commitment: [3; 32],
        };
        assert_eq!(advertise_from_wire(advertise_to_wire(&a)).unwrap(), a);
        let mut wire = advertise_to_wire(&a);
        wire.mask_key.pop();
        assert_eq!(
            advertise_from_wire(wire).unwrap_err(),
            "mask_key has 31 bytes; expected 32"
        );
        let mut bad = params_to_wire(&params);
        bad.threshold = 1;
        assert!(params_from_wire(bad).is_err());
        let evidence = Evidence {
            session: "s".to_owned(),
            round: 2,
            members: vec!["a".to_owned(), "b".to_owned()],
            keys_sha256: [4; 32],
            parent: [5; 32],
            inputs: vec![SignedInput {
                node: "a".to_owned(),
                values: vec![u64::MAX, 1],
                signature: vec![6; 64],
                certificate_pem: "pem".to_owned(),
            }],
        };
        assert_eq!(
            evidence_from_wire(evidence_to_wire(&evidence)).unwrap(),
            evidence
        );
        let mut wire = evidence_to_wire(&evidence);
        wire.parent.truncate(3);
        assert_eq!(
            evidence_from_wire(wire).unwrap_err(),
            "lineage parent has 3 bytes; expected 32"
        );
    }
}
