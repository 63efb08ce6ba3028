//! A recipient's encryption key and the statement that binds it to the
//! recipient's federation certificate.
//!
//! The recipient holds an X25519 key pair for HPKE. Its public half travels
//! in a [`KeyStatement`] signed with the recipient's certificate key
//! (ECDSA P-256, `ghx_pki::signed`), so a hospital encrypts only to a key
//! the federation CA's recipient vouches for: a relay that swaps the key
//! breaks the signature, and a statement under another certificate names
//! another recipient.

use hpke::{Deserializable, Kem as _, Serializable, kem::X25519HkdfSha256};
use serde::{Deserialize, Serialize};

/// Why a key or its statement is refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the recipient key file is not a ghx exchange key: {0}")]
    File(String),
    #[error("the recipient's key statement is not readable: {0}")]
    Statement(String),
    #[error("the recipient's key statement: {0}")]
    Signature(#[from] ghx_pki::signed::Refusal),
    #[error("the key statement is for `{named}`, not the request's recipient `{expected}`")]
    WrongRecipient { named: String, expected: String },
    #[error("signing the key statement failed: {0}")]
    Sign(ghx_pki::Error),
}

/// The cipher suite, named as RFC 9180 does.
pub const SUITE: &str = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305";

/// A recipient's HPKE key pair.
pub struct RecipientKey {
    secret: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: <X25519HkdfSha256 as hpke::Kem>::PublicKey,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    suite: String,
    private_key: String,
}

impl RecipientKey {
    pub fn generate() -> RecipientKey {
        let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
        let (secret, public) = X25519HkdfSha256::gen_keypair(&mut rng);
        RecipientKey { secret, public }
    }

    /// The key as a file (JSON; keep it private).
    pub fn to_file(&self) -> String {
        serde_json::to_string_pretty(&KeyFile {
            suite: SUITE.to_owned(),
            private_key: hex::encode(self.secret.to_bytes()),
        })
        .expect("a key file serialises")
    }

    pub fn from_file(text: &str) -> Result<RecipientKey, Error> {
        let file: KeyFile = serde_json::from_str(text).map_err(|e| Error::File(e.to_string()))?;
        if file.suite != SUITE {
            return Err(Error::File(format!("suite `{}`, not {SUITE}", file.suite)));
        }
        let bytes = hex::decode(file.private_key.trim())
            .map_err(|_| Error::File("the private key is not hex".to_owned()))?;
        let secret = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&bytes)
            .map_err(|_| Error::File("the private key is not an X25519 key".to_owned()))?;
        let public = X25519HkdfSha256::sk_to_pk(&secret);
        Ok(RecipientKey { secret, public })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.public.to_bytes())
    }

    pub(crate) fn secret(&self) -> &<X25519HkdfSha256 as hpke::Kem>::PrivateKey {
        &self.secret
    }
}

/// What the recipient states about its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatement {
    /// The recipient's certificate name.
    pub recipient: String,
    pub suite: String,
    /// Hex X25519 public key.
    pub public_key: String,
}

/// A key statement with the recipient's signature and certificate, as it
/// travels with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKey {
    /// The statement's JSON bytes, as signed.
    pub statement: Vec<u8>,
    /// ECDSA P-256 (ASN.1 DER) over `statement`.
    pub signature: Vec<u8>,
    pub certificate_pem: String,
}

impl SignedKey {
    /// The recipient `name` states `key` is its own, signing with its
    /// certificate's key.
    pub fn sign(
        name: &str,
        key: &RecipientKey,
        certificate_pem: &str,
        certificate_key_pem: &str,
    ) -> Result<SignedKey, Error> {
        let statement = serde_json::to_vec(&KeyStatement {
            recipient: name.to_owned(),
            suite: SUITE.to_owned(),
            public_key: key.public_hex(),
        })
        .expect("a statement serialises");
        let signature =
            ghx_pki::signed::sign(certificate_key_pem, &statement).map_err(Error::Sign)?;
        Ok(SignedKey {
            statement,
            signature,
            certificate_pem: certificate_pem.to_owned(),
        })
    }

    /// Checks the statement is `recipient`'s, signed with the key of a
    /// recipient certificate the federation CA issued to it, and returns
    /// the public key it states.
    pub fn verify(
        &self,
        members: &ghx_pki::signed::MemberKeys,
        recipient: &str,
    ) -> Result<[u8; 32], Error> {
        let statement: KeyStatement =
            serde_json::from_slice(&self.statement).map_err(|e| Error::Statement(e.to_string()))?;
        if statement.recipient != recipient {
            return Err(Error::WrongRecipient {
                named: statement.recipient,
                expected: recipient.to_owned(),
            });
        }
        members.verify(
            ghx_pki::Role::Recipient,
            recipient,
            &self.certificate_pem,
            &self.statement,
            &self.signature,
        )?;
        if statement.suite != SUITE {
            return Err(Error::Statement(format!(
                "suite `{}`, not {SUITE}",
                statement.suite
            )));
        }
        let bytes = hex::decode(&statement.public_key)
            .map_err(|_| Error::Statement("the public key is not hex".to_owned()))?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| Error::Statement("the public key is not 32 bytes".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_round_trips() {
        let key = RecipientKey::generate();
        let again = RecipientKey::from_file(&key.to_file()).unwrap();
        assert_eq!(key.public_hex(), again.public_hex());
        assert!(RecipientKey::from_file("{}").is_err());
    }
}
