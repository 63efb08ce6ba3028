//! Capabilities: the coordinator's signed permission for one approved query.
//!
//! A capability is a compact JWS (EdDSA over Ed25519) whose claims bind the
//! study, the nodes it is addressed to, its expiry and the SHA-256 of the exact
//! query bytes. A node verifies it with the coordinator's public key, which it
//! holds pinned in its own configuration, so a node obeys only what the
//! coordinator signed and a changed query no longer matches its capability.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::manifest::StudyManifest;

/// The issuer name every capability carries.
pub const ISSUER: &str = "ghx-coordinator";

/// Why a capability was refused or could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("capability is not a well-formed token: {0}")]
    Malformed(String),
    #[error("capability uses algorithm {0}; only EdDSA is accepted")]
    Algorithm(String),
    #[error("capability names signing key `{0}`, which this node does not trust")]
    UnknownKey(String),
    #[error("capability has no key id (kid)")]
    MissingKeyId,
    #[error("capability signature does not verify against the coordinator's key")]
    BadSignature,
    #[error("capability has expired")]
    Expired,
    #[error("capability is not yet valid")]
    NotYetValid,
    #[error("capability is not addressed to node `{0}`")]
    WrongAudience(String),
    #[error("capability was issued by someone other than {ISSUER}")]
    WrongIssuer,
    #[error("capability was issued for a different query (digest mismatch)")]
    QueryMismatch,
    #[error("signing key is not a valid Ed25519 PEM key: {0}")]
    Key(String),
}

/// What a capability grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The study id.
    pub sub: String,
    /// The node ids this capability is addressed to.
    pub aud: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Unique id of this capability.
    pub jti: String,
    /// Hex SHA-256 of the canonical query bytes.
    pub query_sha256: String,
    /// Hex SHA-256 of the canonical approved study manifest.
    pub manifest_sha256: String,
    /// The requester the study belongs to.
    pub requester: String,
    /// The requester's organisation, as their certificate names it.
    pub org: String,
    /// Purpose of use, as approved.
    pub purpose: String,
}

/// Signs capabilities with the coordinator's private key.
pub struct Signer {
    key: EncodingKey,
    kid: String,
}

impl Signer {
    /// A signer from an Ed25519 PKCS#8 PEM private key, named `kid`.
    pub fn from_pem(kid: &str, pem: &str) -> Result<Self, Error> {
        let key =
            EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?;
        Ok(Signer {
            key,
            kid: kid.to_owned(),
        })
    }

    /// Signs capability or revocation claims.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| Error::Key(e.to_string()))
    }
}

/// The coordinator's signed word that a study is revoked: nodes refuse its
/// capabilities from then on, even unexpired ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub iss: String,
    /// The revoked study.
    pub sub: String,
    pub aud: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    pub reason: String,
}

/// Revocation claims for `study_id`, addressed to `audience`.
pub fn revocation_for(study_id: &str, audience: Vec<String>, reason: &str) -> Revocation {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Revocation {
        iss: ISSUER.to_owned(),
        sub: study_id.to_owned(),
        aud: audience,
        iat: now,
        // Delivery may be retried for a day.
        exp: now + 86_400,
        jti: format!("revoke-{study_id}-{}", random_suffix()),
        reason: reason.to_owned(),
    }
}

/// A new Ed25519 signing key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_signing_key() -> Result<(String, String), Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| Error::Key(e.to_string()))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Verifies capabilities at a node against pinned coordinator keys.
pub struct Verifier {
    node_id: String,
    keys: HashMap<String, DecodingKey>,
}

impl Verifier {
    /// A verifier for `node_id` trusting the given (kid, public PEM) keys.
    pub fn new<'a>(
        node_id: &str,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Error> {
        let keys = keys
            .into_iter()
            .map(|(kid, pem)| {
                DecodingKey::from_ed_pem(pem.as_bytes())
                    .map(|k| (kid.to_owned(), k))
                    .map_err(|e| Error::Key(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Verifier {
            node_id: node_id.to_owned(),
            keys,
        })
    }

    /// Trusts one more coordinator key, e.g. after a key rotation.
    pub fn add_key(&mut self, kid: &str, pem: &str) -> Result<(), Error> {
        let key =
            DecodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?;
        self.keys.insert(kid.to_owned(), key);
        Ok(())
    }

    /// Whether a key id is trusted.
    pub fn knows_key(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks the token's signature, issuer, audience, validity window and
    /// that it was issued for exactly `query_json`.
    pub fn verify(&self, token: &str, query_json: &[u8]) -> Result<Claims, Error> {
        let claims: Claims = self.decode(token)?;
        if claims.query_sha256 != crate::query::digest(query_json) {
            return Err(Error::QueryMismatch);
        }
        Ok(claims)
    }

    /// Checks a revocation the way [`Verifier::verify`] checks a capability.
    pub fn verify_revocation(&self, token: &str) -> Result<Revocation, Error> {
        self.decode(token)
    }

    /// The key id a token names, if it is well formed enough to name one.
    pub fn key_id(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).ok()?.kid
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, Error> {
        // Read the algorithm ourselves first: `none` is not an algorithm the
        // JWT library can even name, and it deserves its own refusal.
        let alg = declared_algorithm(token)?;
        if alg != "EdDSA" {
            return Err(Error::Algorithm(alg));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or(Error::MissingKeyId)?;
        let key = self.keys.get(&kid).ok_or(Error::UnknownKey(kid))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[&self.node_id]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let data =
            jsonwebtoken::decode::<T>(token, key, &validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => Error::BadSignature,
                ErrorKind::ExpiredSignature => Error::Expired,
                ErrorKind::ImmatureSignature => Error::NotYetValid,
                ErrorKind::InvalidAudience => Error::WrongAudience(self.node_id.clone()),
                ErrorKind::InvalidIssuer => Error::WrongIssuer,
                ErrorKind::InvalidAlgorithm => Error::Algorithm("other".to_owned()),
                _ => Error::Malformed(e.to_string()),
            })?;
        Ok(data.claims)
    }
}

/// The `alg` a token's header declares.
fn declared_algorithm(token: &str) -> Result<String, Error> {
    use base64::Engine;
    let header = token
        .split('.')
        .next()
        .ok_or_else(|| Error::Malformed("no header".to_owned()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Error::Malformed("header is not base64url".to_owned()))?;
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let header: Header = serde_json::from_slice(&bytes)
        .map_err(|_| Error::Malformed("header is not JSON with an `alg`".to_owned()))?;
    Ok(header.alg)
}

/// Claims for a capability to run one query of an approved manifest,
/// valid from now for `valid_for`.
pub fn claims_for(
    manifest: &StudyManifest,
    study_id: &str,
    audience: Vec<String>,
    query_json: &[u8],
    valid_for: time::Duration,
) -> Claims {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let requester = &manifest.requester;
    Claims {
        iss: ISSUER.to_owned(),
        sub: study_id.to_owned(),
        aud: audience,
        iat: now,
        nbf: now,
        exp: now + valid_for.whole_seconds(),
        jti: format!("{study_id}-{}", random_suffix()),
        query_sha256: crate::query::digest(query_json),
        manifest_sha256: manifest.digest(),
        requester: requester.user.clone(),
        org: requester.organisation.clone(),
        purpose: manifest.purpose.clone(),
    }
}

fn random_suffix() -> String {
    // A fresh key pair's public bytes are a convenient, well-seeded source of
    // randomness without another dependency.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 generation");
    hex::encode(&key.public_key_raw()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    const QUERY: &[u8] = br#"{"q":1}"#;

    fn setup() -> (Signer, Verifier) {
        let (private, public) = generate_signing_key().unwrap();
        let signer = Signer::from_pem("k1", &private).unwrap();
        let verifier = Verifier::new("chosun", [("k1", public.as_str())]).unwrap();
        (signer, verifier)
    }

    fn claims(valid_for: Duration) -> Claims {
        let manifest =
            StudyManifest::parse(include_str!("../../deploy/examples/study-e11.json").as_bytes())
                .unwrap();
        claims_for(&manifest, "s-1", vec!["chosun".into()], QUERY, valid_for)
    }

    #[test]
    fn a_valid_capability_verifies() {
        let (signer, verifier) = setup();
        let token = signer.sign(&claims(Duration::minutes(5))).unwrap();
        let got = verifier.verify(&token, QUERY).unwrap();
        assert_eq!(got.sub, "s-1");
    }

    #[test]
    fn bad_capabilities_are_refused_with_distinct_errors() {
        let (signer, verifier) = setup();
        let good = signer.sign(&claims(Duration::minutes(5))).unwrap();

        assert_eq!(
            verifier.verify(&good, br#"{"q":2}"#),
            Err(Error::QueryMismatch)
        );

        let expired = signer.sign(&claims(Duration::minutes(-5))).unwrap();
        assert_eq!(verifier.verify(&expired, QUERY), Err(Error::Expired));

        let mut other_node = claims(Duration::minutes(5));
        other_node.aud = vec!["chonnam".into()];
        let token = signer.sign(&other_node).unwrap();
        assert_eq!(
            verifier.verify(&token, QUERY),
            Err(Error::WrongAudience("chosun".into()))
        );

        let (other_private, _) = generate_signing_key().unwrap();
        let forger = Signer::from_pem("k1", &other_private).unwrap();
        let forged = forger.sign(&claims(Duration::minutes(5))).unwrap();
        assert_eq!(verifier.verify(&forged, QUERY), Err(Error::BadSignature));

        let unknown = Signer::from_pem("k2", &other_private).unwrap();
        let token = unknown.sign(&claims(Duration::minutes(5))).unwrap();
        assert_eq!(
            verifier.verify(&token, QUERY),
            Err(Error::UnknownKey("k2".into()))
        );

        // Tamper with the payload (a later expiry) but keep the signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = good.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        payload["exp"] = (payload["exp"].as_i64().unwrap() + 86_400).into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(payload.to_string()),
            parts[2]
        );
        assert_eq!(verifier.verify(&tampered, QUERY), Err(Error::BadSignature));

        // alg=none: header {"alg":"none","kid":"k1"}, no signature.
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","kid":"k1"}"#),
            parts[1]
        );
        assert_eq!(
            verifier.verify(&none, QUERY),
            Err(Error::Algorithm("none".into()))
        );
        // HS256 with the public key as a shared secret (key confusion).
        let hs = format!(
            "{}.{}.c2ln",
            b64.encode(r#"{"alg":"HS256","kid":"k1"}"#),
            parts[1]
        );
        assert_eq!(
            verifier.verify(&hs, QUERY),
            Err(Error::Algorithm("HS256".into()))
        );

        assert!(matches!(
            verifier.verify("garbage", QUERY),
            Err(Error::Malformed(_))
        ));
    }
}
