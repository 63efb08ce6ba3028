//! One part of a hospital's answer, as signed by the hospital.
//!
//! A part carries a Bundle of the resident's resources (with a Provenance
//! naming the hospital) or the transfer's end, which says how it ended and
//! how many parts and resources it had. Each part names the request, the
//! hospital and its sequence number, and chains the SHA-256 of the part
//! before, so the recipient knows a transfer is whole only when it holds
//! a signed end whose counts and chain match. The hospital signs each
//! part's bytes with its certificate key; its certificate travels in the
//! first part.
//!
//! Wire form (inside the encryption): `u32 len | part JSON | u16 len |
//! signature | u32 len | certificate PEM (may be empty)`, big-endian.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Everything in scope was sent.
    Complete,
    /// Nothing is disclosed: the hospital has no such patient, or no
    /// consent permits it (deliberately one answer).
    Nothing,
    /// The resident withdrew consent during the transfer: discard what
    /// arrived.
    Withdrawn,
}

/// The end of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub outcome: Outcome,
    /// Parts before this one.
    pub parts: u32,
    /// Resources in them (Provenance not counted).
    pub resources: u64,
}

/// One part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// The request's single-use id.
    pub request: String,
    /// The hospital (node id).
    pub hospital: String,
    pub seq: u32,
    /// Hex SHA-256 of the previous part's signed bytes; empty for the first.
    pub previous: String,
    /// The resident's patient id at the hospital, when anything is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
}

impl Part {
    /// The bytes signed and chained.
    pub fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a part serialises")
    }
}

/// Hex SHA-256 of signed part bytes, as the next part's `previous`.
pub fn chain_digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A part with its signature (and, first, the hospital's certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPart {
    pub part: Vec<u8>,
    pub signature: Vec<u8>,
    pub certificate_pem: String,
}

/// Why a part's framing is unreadable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a part's framing is damaged")]
pub struct Damaged;

impl SignedPart {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.part.len() + self.certificate_pem.len() + 90);
        out.extend_from_slice(&(self.part.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.part);
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&(self.certificate_pem.len() as u32).to_be_bytes());
        out.extend_from_slice(self.certificate_pem.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SignedPart, Damaged> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], Damaged> {
            let slice = bytes
                .get(at..at.checked_add(n).ok_or(Damaged)?)
                .ok_or(Damaged)?;
            at += n;
            Ok(slice)
        };
        let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| Damaged)?) as usize;
        let part = take(len)?.to_vec();
        let len = u16::from_be_bytes(take(2)?.try_into().map_err(|_| Damaged)?) as usize;
        let signature = take(len)?.to_vec();
        let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| Damaged)?) as usize;
        let certificate_pem = String::from_utf8(take(len)?.to_vec()).map_err(|_| Damaged)?;
        if at != bytes.len() {
            return Err(Damaged);
        }
        Ok(SignedPart {
            part,
            signature,
            certificate_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_part_round_trips_and_truncation_is_damage() {
        let signed = SignedPart {
            part: b"{}".to_vec(),
            signature: vec![1, 2, 3],
            certificate_pem: "pem".into(),
        };
        let bytes = signed.encode();
        assert_eq!(SignedPart::decode(&bytes).unwrap(), signed);
        assert_eq!(SignedPart::decode(&bytes[..bytes.len() - 1]), Err(Damaged));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(SignedPart::decode(&longer), Err(Damaged));
    }
}
