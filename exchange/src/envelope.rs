//! HPKE (RFC 9180, base mode) from a hospital to the recipient, one
//! context per transfer: the hospital's first frame carries the
//! encapsulated key, and every part is sealed in order under the
//! context's sequence of nonces, so a relay that drops, repeats or
//! reorders a part makes every later part fail to open. The context's
//! `info` binds the request id and the hospital; each part's plaintext is
//! padded to a multiple of [`PAD`] bytes, so a relay sees sizes in steps of
//! 16 KiB, and "nothing to send" looks the same whatever the reason.

use hpke::aead::{AeadCtxR, AeadCtxS, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};

use crate::keys::RecipientKey;

/// Plaintexts are padded to a multiple of this many bytes.
pub const PAD: usize = 16 * 1024;

/// Why a frame cannot be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the recipient's public key is not an X25519 key")]
    PublicKey,
    #[error("the encapsulated key is not valid")]
    Encapsulated,
    #[error(
        "a part does not open with the recipient's key (changed, reordered, or for another recipient)"
    )]
    Open,
    #[error("an opened part is not padded as the exchange pads")]
    Padding,
    #[error("sealing failed")]
    Seal,
}

/// The HPKE `info`: the exchange, version, request id and hospital, each
/// length-prefixed.
fn info(request: &str, hospital: &str) -> Vec<u8> {
    let mut out = b"ghx exchange v1".to_vec();
    for part in [request, hospital] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// A hospital's sealing context for one transfer.
pub struct Sealer {
    context: AeadCtxS<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>,
    encapsulated: Vec<u8>,
}

impl Sealer {
    pub fn new(recipient_public: &[u8; 32], request: &str, hospital: &str) -> Result<Self, Error> {
        let public = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(recipient_public)
            .map_err(|_| Error::PublicKey)?;
        let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
        let (encapsulated, context) =
            hpke::setup_sender::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
                &OpModeS::Base,
                &public,
                &info(request, hospital),
                &mut rng,
            )
            .map_err(|_| Error::PublicKey)?;
        Ok(Sealer {
            context,
            encapsulated: encapsulated.to_bytes().to_vec(),
        })
    }

    /// The encapsulated key, sent once before the first part.
    pub fn encapsulated(&self) -> &[u8] {
        &self.encapsulated
    }

    /// Pads and seals the next part.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut padded = Vec::with_capacity(padded_len(plaintext.len()));
        padded.extend_from_slice(&(plaintext.len() as u32).to_be_bytes());
        padded.extend_from_slice(plaintext);
        padded.resize(padded_len(plaintext.len()), 0);
        self.context.seal(&padded, b"").map_err(|_| Error::Seal)
    }
}

fn padded_len(len: usize) -> usize {
    (len + 4).div_ceil(PAD) * PAD
}

/// The recipient's opening context for one hospital's transfer.
pub struct Opener {
    context: AeadCtxR<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>,
}

impl Opener {
    pub fn new(
        key: &RecipientKey,
        encapsulated: &[u8],
        request: &str,
        hospital: &str,
    ) -> Result<Self, Error> {
        let encapsulated = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(encapsulated)
            .map_err(|_| Error::Encapsulated)?;
        let context = hpke::setup_receiver::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            key.secret(),
            &encapsulated,
            &info(request, hospital),
        )
        .map_err(|_| Error::Encapsulated)?;
        Ok(Opener { context })
    }

    /// Opens the next part and removes its padding.
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, Error> {
        let padded = self
            .context
            .open(ciphertext, b"")
            .map_err(|_| Error::Open)?;
        let len = padded
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(Error::Padding)?;
        if padded.len() != padded_len(len) {
            return Err(Error::Padding);
        }
        Ok(padded[4..4 + len].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_open_in_order_only_for_the_recipient_of_that_request() {
        let key = RecipientKey::generate();
        let public: [u8; 32] = hex::decode(key.public_hex()).unwrap().try_into().unwrap();
        let mut sealer = Sealer::new(&public, "r-1", "chosun").unwrap();
        let a = sealer.seal(b"first").unwrap();
        let b = sealer.seal(&vec![7u8; 20_000]).unwrap();
        assert_eq!(a.len() % PAD, 16, "one padded block and the tag");
        assert_eq!(b.len(), 2 * PAD + 16);
        let mut opener = Opener::new(&key, sealer.encapsulated(), "r-1", "chosun").unwrap();
        assert_eq!(opener.open(&a).unwrap(), b"first");
        assert_eq!(opener.open(&b).unwrap().len(), 20_000);

        // Out of order.
        let mut opener = Opener::new(&key, sealer.encapsulated(), "r-1", "chosun").unwrap();
        assert_eq!(opener.open(&b), Err(Error::Open));
        // Another request or hospital.
        let mut opener = Opener::new(&key, sealer.encapsulated(), "r-2", "chosun").unwrap();
        assert_eq!(opener.open(&a), Err(Error::Open));
        // Another recipient.
        let other = RecipientKey::generate();
        let mut opener = Opener::new(&other, sealer.encapsulated(), "r-1", "chosun").unwrap();
        assert_eq!(opener.open(&a), Err(Error::Open));
    }
}
