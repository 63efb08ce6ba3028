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

    pub fn sign(&self, claims: &Claims) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| Error::Key(e.to_string()))
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

    /// Checks the token's signature, issuer, audience, validity window and
    /// that it was issued for exactly `query_json`.
    pub fn verify(&self, token: &str, query_json: &[u8]) -> Result<Claims, Error> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(Error::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(Error::MissingKeyId)?;
        let key = self.keys.get(&kid).ok_or(Error::UnknownKey(kid))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[&self.node_id]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => Error::BadSignature,
            ErrorKind::ExpiredSignature => Error::Expired,
            ErrorKind::ImmatureSignature => Error::NotYetValid,
            ErrorKind::InvalidAudience => Error::WrongAudience(self.node_id.clone()),
            ErrorKind::InvalidIssuer => Error::WrongIssuer,
            ErrorKind::InvalidAlgorithm => Error::Algorithm("other".to_owned()),
            _ => Error::Malformed(e.to_string()),
        })?;
        if data.claims.query_sha256 != crate::query::digest(query_json) {
            return Err(Error::QueryMismatch);
        }
        Ok(data.claims)
    }
}

/// Claims for a capability valid from now for `valid_for`.
pub fn claims_for(
    study_id: &str,
    audience: Vec<String>,
    query_json: &[u8],
    requester: &str,
    org: &str,
    purpose: &str,
    valid_for: time::Duration,
) -> Claims {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Claims {
        iss: ISSUER.to_owned(),
        sub: study_id.to_owned(),
        aud: audience,
        iat: now,
        nbf: now,
        exp: now + valid_for.whole_seconds(),
        jti: format!("{study_id}-{}", random_suffix()),
        query_sha256: crate::query::digest(query_json),
        requester: requester.to_owned(),
        org: org.to_owned(),
        purpose: purpose.to_owned(),
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
        claims_for(
            "s-1",
            vec!["chosun".into()],
            QUERY,
            "acme",
            "Acme Analytics",
            "HRESCH",
            valid_for,
        )
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

        // Tamper with the payload but keep the signature.
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1].replace_range(0..4, "eyJh");
        let tampered = parts.join(".");
        assert!(verifier.verify(&tampered, QUERY).is_err());

        // alg=none: header {"alg":"none","kid":"k1"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.{}.",
            good.split('.').nth(1).unwrap()
        );
        assert!(matches!(
            verifier.verify(&none, QUERY),
            Err(Error::Malformed(_) | Error::Algorithm(_))
        ));

        assert!(matches!(
            verifier.verify("garbage", QUERY),
            Err(Error::Malformed(_))
        ));
    }
}
