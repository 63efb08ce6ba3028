//! Signed checkpoints: the keeper's signature over the chain hash at one
//! sequence number.
//!
//! A checkpoint is a compact JWS (via `jsonwebtoken`) signed with the private
//! key of the keeper's mTLS certificate (ECDSA P-256 as `ghx pki` issues
//! them, or Ed25519), so the committee verifies it with the certificate it
//! already trusts and no new key has to be distributed.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Errors signing or checking checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the signing key is neither an ECDSA P-256 nor an Ed25519 PKCS#8 PEM key")]
    Key,
    #[error("the certificate cannot be read: {0}")]
    Certificate(String),
    #[error("the certificate's key is neither ECDSA P-256 nor Ed25519")]
    CertificateKey,
    #[error("cannot sign the checkpoint: {0}")]
    Sign(String),
}

/// The keeper's signed word that its log's entry `seq` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: String,
    pub at: String,
    /// The JWS over [`Claims`].
    pub token: String,
}

/// What a checkpoint token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The keeper: a node id or `coordinator`.
    pub iss: String,
    pub seq: i64,
    pub hash: String,
    pub iat: i64,
    /// When it was signed, in unix milliseconds (`iat` is whole seconds):
    /// a witness compares a head with a log read in the same second.
    /// Absent in tokens from before witnesses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<i64>,
}

impl Claims {
    /// When it was signed, in unix milliseconds.
    pub fn signed_ms(&self) -> i64 {
        self.ms.unwrap_or(self.iat.saturating_mul(1000))
    }
}

impl Checkpoint {
    /// The checkpoint a token claims to be, read without checking its
    /// signature (a witness stores what it receives; [`Verifier::claims`]
    /// decides later). `None` when the token does not parse.
    pub fn from_token(token: &str) -> Option<(Checkpoint, Claims)> {
        let claims = peek(token)?;
        let at = time::OffsetDateTime::from_unix_timestamp(claims.iat)
            .ok()?
            .format(&time::format_description::well_known::Rfc3339)
            .ok()?;
        Some((
            Checkpoint {
                seq: claims.seq,
                hash: claims.hash.clone(),
                at,
                token: token.to_owned(),
            },
            claims,
        ))
    }
}

/// What a token claims, its signature unchecked.
pub fn peek(token: &str) -> Option<Claims> {
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token).ok()
}

/// Signs checkpoints with the keeper's private key.
pub struct Signer {
    keeper: String,
    key: EncodingKey,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keeper", &self.keeper)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl Signer {
    /// A signer for `keeper` from a PKCS#8 PEM private key.
    pub fn from_pem(keeper: &str, key_pem: &str) -> Result<Self, Error> {
        let (key, algorithm) = if let Ok(key) = EncodingKey::from_ec_pem(key_pem.as_bytes()) {
            (key, Algorithm::ES256)
        } else if let Ok(key) = EncodingKey::from_ed_pem(key_pem.as_bytes()) {
            (key, Algorithm::EdDSA)
        } else {
            return Err(Error::Key);
        };
        Ok(Signer {
            keeper: keeper.to_owned(),
            key,
            algorithm,
        })
    }

    pub fn keeper(&self) -> &str {
        &self.keeper
    }

    /// A checkpoint over entry `seq` whose hash is `hash`.
    pub fn sign(&self, seq: i64, hash: &str) -> Result<Checkpoint, Error> {
        let now = time::OffsetDateTime::now_utc();
        let claims = Claims {
            iss: self.keeper.clone(),
            seq,
            hash: hash.to_owned(),
            iat: now.unix_timestamp(),
            ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000).ok(),
        };
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|e| Error::Sign(e.to_string()))?;
        Ok(Checkpoint {
            seq,
            hash: hash.to_owned(),
            at: crate::now_rfc3339(),
            token,
        })
    }
}

/// Checks checkpoints against the keeper's certificate.
pub struct Verifier {
    keeper: String,
    key: DecodingKey,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keeper", &self.keeper)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

/// Why a checkpoint is not good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flaw {
    /// The signature does not verify with the keeper's certificate.
    Signature(String),
    /// The signed claims disagree with the stored row.
    Claims,
}

impl std::fmt::Display for Flaw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flaw::Signature(e) => write!(f, "its signature does not verify ({e})"),
            Flaw::Claims => f.write_str("its signed sequence number or hash differs from the row"),
        }
    }
}

impl Verifier {
    /// A verifier from the keeper's certificate (PEM); the keeper is the
    /// certificate's common name.
    pub fn from_certificate_pem(pem: &str) -> Result<Self, Error> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        Self::from_x509(&cert)
    }

    fn from_x509(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<Self, Error> {
        let keeper = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| Error::Certificate("it has no common name".to_owned()))?
            .to_owned();
        let spki = cert.public_key();
        let point = spki.subject_public_key.data.as_ref();
        let oid = spki.algorithm.algorithm.to_id_string();
        let (key, algorithm) = match oid.as_str() {
            // id-ecPublicKey; ghx certificates are P-256.
            "1.2.840.10045.2.1" => (DecodingKey::from_ec_der(point), Algorithm::ES256),
            // id-Ed25519
            "1.3.101.112" => (DecodingKey::from_ed_der(point), Algorithm::EdDSA),
            _ => return Err(Error::CertificateKey),
        };
        Ok(Verifier {
            keeper,
            key,
            algorithm,
        })
    }

    /// A verifier from the keeper's certificate (DER), as a TLS peer
    /// presented it.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Certificate(e.to_string()))?;
        Self::from_x509(&cert)
    }

    /// The keeper the certificate names.
    pub fn keeper(&self) -> &str {
        &self.keeper
    }

    /// Checks one checkpoint: signed by this keeper, over its own row.
    pub fn check(&self, checkpoint: &Checkpoint) -> Result<(), Flaw> {
        self.claims(checkpoint).map(|_| ())
    }

    /// What a genuine checkpoint's token says (its signed time among it).
    pub fn claims(&self, checkpoint: &Checkpoint) -> Result<Claims, Flaw> {
        let mut validation = Validation::new(self.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.set_issuer(&[&self.keeper]);
        let claims = jsonwebtoken::decode::<Claims>(&checkpoint.token, &self.key, &validation)
            .map_err(|e| Flaw::Signature(e.to_string()))?
            .claims;
        if claims.seq != checkpoint.seq || claims.hash != checkpoint.hash {
            return Err(Flaw::Claims);
        }
        Ok(claims)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A keeper's PEM key and self-signed certificate, for tests here and
    /// in `witness`.
    pub(crate) fn keeper_cert(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (key.serialize_pem(), cert.pem())
    }

    #[test]
    fn signed_checkpoints_verify_and_forgeries_do_not() {
        let (key, cert) = keeper_cert("chonnam");
        let signer = Signer::from_pem("chonnam", &key).unwrap();
        let verifier = Verifier::from_certificate_pem(&cert).unwrap();
        assert_eq!(verifier.keeper(), "chonnam");
        let cp = signer.sign(7, &"a".repeat(64)).unwrap();
        verifier.check(&cp).unwrap();

        // The row moved to another hash: the signature no longer covers it.
        let moved = Checkpoint {
            hash: "b".repeat(64),
            ..cp.clone()
        };
        assert_eq!(verifier.check(&moved), Err(Flaw::Claims));

        // Signed by someone else's key.
        let (other_key, _) = keeper_cert("chonnam");
        let forged = Signer::from_pem("chonnam", &other_key)
            .unwrap()
            .sign(7, &cp.hash)
            .unwrap();
        assert!(matches!(verifier.check(&forged), Err(Flaw::Signature(_))));

        // Signed by another keeper's genuine key.
        let (chosun_key, _) = keeper_cert("chosun");
        let other = Signer::from_pem("chosun", &chosun_key)
            .unwrap()
            .sign(7, &cp.hash)
            .unwrap();
        assert!(verifier.check(&other).is_err());

        // A witness reads the token alone; the signature decides later.
        let (read, claims) = Checkpoint::from_token(&cp.token).unwrap();
        assert_eq!(
            (read.seq, &read.hash, &claims.iss),
            (7, &cp.hash, &"chonnam".to_owned())
        );
        verifier.check(&read).unwrap();
        assert!(Checkpoint::from_token("not a token").is_none());
        let der = x509_parser::pem::parse_x509_pem(cert.as_bytes())
            .unwrap()
            .1
            .contents;
        Verifier::from_certificate_der(&der)
            .unwrap()
            .check(&read)
            .unwrap();
    }

    #[test]
    fn a_key_that_is_not_a_key_is_named() {
        assert!(matches!(
            Signer::from_pem("x", "not a key"),
            Err(Error::Key)
        ));
        assert!(matches!(
            Verifier::from_certificate_pem("not a certificate"),
            Err(Error::Certificate(_))
        ));
    }
}
