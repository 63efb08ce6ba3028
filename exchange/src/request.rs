//! A resident's request, as the platform's identity service signs it.
//!
//! Identity proofing is the platform's job; a hospital needs a statement
//! of it it can check. The statement is a compact JWS, EdDSA (Ed25519)
//! only, under a key the hospital pins (`[exchange] identity_keys`). Its
//! claims bind the resident (their linkage token, or each hospital's
//! patient id), the hospitals asked (`aud`), the recipient (a federation
//! certificate name), the purpose, the scope (FHIR search parameters), a
//! short validity and a single-use id (`jti`).

use std::collections::{BTreeMap, HashMap};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::scope::{self, Scope};

/// Longest a request may be valid for, from issue to expiry.
pub const MAX_LIFETIME_SECS: i64 = 15 * 60;

/// Clock skew allowed between the identity service and a hospital.
const LEEWAY: i64 = 30;

/// Why a request is refused before anything of the resident is read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the request is not a well-formed signed token: {0}")]
    Malformed(String),
    #[error("the request uses algorithm {0}; only EdDSA is accepted")]
    Algorithm(String),
    #[error("the request has no key id (kid)")]
    MissingKeyId,
    #[error("the request names signing key `{0}`, which this hospital does not trust")]
    UnknownKey(String),
    #[error("the request's signature does not verify against the identity service's key")]
    BadSignature,
    #[error("the request has expired")]
    Expired,
    #[error("the request is not yet valid")]
    NotYetValid,
    #[error("the request is not addressed to this hospital (`{0}`)")]
    WrongAudience(String),
    #[error(
        "the request is valid for {0} seconds; a request may be valid for at most {MAX_LIFETIME_SECS}"
    )]
    TooLong(i64),
    #[error("the request names purpose `{0}`; the exchange serves PATRQT and TREAT")]
    Purpose(String),
    #[error(
        "the request must name the resident by exactly one of a linkage token or hospital patient ids"
    )]
    Resident,
    #[error("the request's scope: {0}")]
    Scope(#[from] scope::Error),
    #[error("the request has no single-use id (jti)")]
    NoId,
    #[error("the request names a hospital twice")]
    RepeatedHospital,
    #[error(
        "a request naming the resident by patient ids names one hospital (its own id there); for several, name the resident by linkage token"
    )]
    PatientIdsElsewhere,
    #[error("the request's recipient key is not 64 hexadecimal characters")]
    RecipientKey,
    #[error("signing key is not a valid Ed25519 PEM key: {0}")]
    Key(String),
}

/// What the request is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The resident's records in the scope.
    #[default]
    Records,
    /// The history of who received the resident's records from the
    /// hospital, and when.
    History,
}

/// How the resident is named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resident {
    /// The federation's linkage token (`fingerprint:hex`) of the
    /// resident's registration number, which the identity service can
    /// compute and the hospitals hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_token: Option<String>,
    /// Or the resident's patient id at each hospital.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub patients: BTreeMap<String, String>,
}

/// The signed claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The identity service.
    pub iss: String,
    /// A name for the resident the identity service uses; never read by
    /// the hospitals (they read `resident`).
    pub sub: String,
    /// The hospitals (node ids) asked.
    pub aud: Vec<String>,
    pub resident: Resident,
    /// The recipient's federation certificate name.
    pub recipient: String,
    /// The recipient's HPKE public key (hex X25519) as registered with the
    /// platform: hospitals seal only to this key, so whoever can issue
    /// certificates cannot have records sealed to a key of its own.
    pub recipient_key: String,
    pub purpose: String,
    /// FHIR search parameters (`scope::Scope`).
    pub scope: String,
    #[serde(default)]
    pub kind: Kind,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

impl Claims {
    /// The scope, parsed.
    pub fn parsed_scope(&self) -> Result<Scope, Error> {
        match self.kind {
            Kind::Records => Ok(Scope::parse(&self.scope)?),
            // A history request reads the disclosure ledger, not records.
            Kind::History => Ok(Scope::default()),
        }
    }

    /// The claims a hospital checks beyond the signature: lifetime,
    /// purpose, how the resident is named, the id, the scope.
    pub fn check(&self) -> Result<Scope, Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // From the earliest it claims to be valid, and from now: a request
        // cannot be stretched by an issue time after its expiry.
        let lifetime = self.exp - self.iat.min(self.nbf).min(now);
        if lifetime > MAX_LIFETIME_SECS || self.iat > now + LEEWAY {
            return Err(Error::TooLong(lifetime));
        }
        if self.resident.link_token.is_some() != self.resident.patients.is_empty() {
            return Err(Error::Resident);
        }
        let mut hospitals = self.aud.clone();
        hospitals.sort();
        hospitals.dedup();
        if hospitals.len() != self.aud.len() {
            return Err(Error::RepeatedHospital);
        }
        // Patient ids of other hospitals would tell each hospital where
        // else the resident is treated.
        if !self.resident.patients.is_empty()
            && (self.aud.len() != 1
                || !self.resident.patients.contains_key(&self.aud[0])
                || self.resident.patients.len() != 1)
        {
            return Err(Error::PatientIdsElsewhere);
        }
        if self.recipient_key.len() != 64 || hex::decode(&self.recipient_key).is_err() {
            return Err(Error::RecipientKey);
        }
        if !crate::PURPOSES.contains(&self.purpose.as_str()) {
            return Err(Error::Purpose(self.purpose.clone()));
        }
        if self.jti.trim().is_empty() {
            return Err(Error::NoId);
        }
        self.parsed_scope()
    }
}

impl Claims {
    /// A request valid from now for `valid_secs`, with a fresh random id:
    /// what the identity service signs once it has proofed the resident.
    pub fn new(
        issuer: &str,
        hospitals: Vec<String>,
        resident: Resident,
        recipient: (&str, &str),
        scope: &str,
        kind: Kind,
        valid_secs: i64,
    ) -> Claims {
        use rand_core::RngCore;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut id = [0u8; 16];
        rand_core::UnwrapErr(rand_core::OsRng).fill_bytes(&mut id);
        Claims {
            iss: issuer.to_owned(),
            sub: "resident".to_owned(),
            aud: hospitals,
            resident,
            recipient: recipient.0.to_owned(),
            recipient_key: recipient.1.to_owned(),
            purpose: "PATRQT".to_owned(),
            scope: scope.to_owned(),
            kind,
            iat: now,
            nbf: now,
            exp: now + valid_secs,
            jti: format!("exchange-{}", hex::encode(id)),
        }
    }
}

/// Signs requests: the platform's identity service (and `ghx exchange
/// authorise`, which stands in for it in the demo and tests).
pub struct IdentitySigner {
    key: EncodingKey,
    kid: String,
}

impl IdentitySigner {
    /// A signer from an Ed25519 PKCS#8 PEM private key, named `kid`.
    pub fn from_pem(kid: &str, pem: &str) -> Result<Self, Error> {
        Ok(IdentitySigner {
            key: EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?,
            kid: kid.to_owned(),
        })
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| Error::Key(e.to_string()))
    }
}

/// A new Ed25519 key pair for an identity service, as (private PKCS#8 PEM,
/// public SPKI PEM).
pub fn generate_identity_key() -> Result<(String, String), Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| Error::Key(e.to_string()))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The identity service keys a hospital trusts, by key id.
pub struct IdentityKeys {
    keys: HashMap<String, DecodingKey>,
}

impl IdentityKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, Error> {
        Ok(IdentityKeys {
            keys: keys
                .into_iter()
                .map(|(kid, pem)| {
                    DecodingKey::from_ed_pem(pem.as_bytes())
                        .map(|k| (kid.to_owned(), k))
                        .map_err(|e| Error::Key(e.to_string()))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a request addressed to `hospital`: algorithm, key,
    /// signature, validity window, audience; then [`Claims::check`].
    pub fn verify(&self, token: &str, hospital: &str) -> Result<(Claims, Scope), Error> {
        let alg = declared_algorithm(token)?;
        if alg != "EdDSA" {
            return Err(Error::Algorithm(alg));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or(Error::MissingKeyId)?;
        let key = self.keys.get(&kid).ok_or(Error::UnknownKey(kid))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[hospital]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "nbf", "iat", "jti"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY as u64;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => Error::BadSignature,
                ErrorKind::ExpiredSignature => Error::Expired,
                ErrorKind::ImmatureSignature => Error::NotYetValid,
                ErrorKind::InvalidAudience => Error::WrongAudience(hospital.to_owned()),
                ErrorKind::InvalidAlgorithm => Error::Algorithm("other".to_owned()),
                _ => Error::Malformed(e.to_string()),
            })?
            .claims;
        let scope = claims.check()?;
        Ok((claims, scope))
    }
}

/// The claims of a token, not verified: what the coordinator reads to
/// route and record a request it relays (the hospitals verify).
pub fn unverified_claims(token: &str) -> Result<Claims, Error> {
    use base64::Engine;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| Error::Malformed("no payload".to_owned()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Error::Malformed("payload is not base64url".to_owned()))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Malformed(e.to_string()))
}

/// The `alg` a token's header declares (`none` included, which the JWT
/// library cannot name).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "g-health-identity".into(),
            sub: "resident-1".into(),
            aud: vec!["chonnam".into(), "chosun".into()],
            resident: Resident {
                link_token: Some("abcd:00".into()),
                patients: BTreeMap::new(),
            },
            recipient: "report-service".into(),
            recipient_key: "ab".repeat(32),
            purpose: "PATRQT".into(),
            scope: "_type=Observation".into(),
            kind: Kind::Records,
            iat: now,
            nbf: now,
            exp: now + 300,
            jti: "r-1".into(),
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn a_signed_request_verifies_only_where_it_is_addressed_and_as_signed() {
        let (private, public) = generate_identity_key().unwrap();
        let signer = IdentitySigner::from_pem("idp-1", &private).unwrap();
        let keys = IdentityKeys::new([("idp-1", public.as_str())]).unwrap();
        let token = signer.sign(&claims(now())).unwrap();
        let (read, scope) = keys.verify(&token, "chosun").unwrap();
        assert_eq!(read.recipient, "report-service");
        assert_eq!(scope.types, ["Observation"]);
        assert_eq!(
            keys.verify(&token, "christian").unwrap_err(),
            Error::WrongAudience("christian".into())
        );
        // A changed payload under the old signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut changed = claims(now());
        changed.recipient = "someone-else".into();
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&changed).unwrap());
        assert_eq!(
            keys.verify(&parts.join("."), "chosun").unwrap_err(),
            Error::BadSignature
        );
        // Unsigned.
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert_eq!(
            keys.verify(&none, "chosun").unwrap_err(),
            Error::Algorithm("none".into())
        );
        // Another identity service's key.
        let (other, _) = generate_identity_key().unwrap();
        let forged = IdentitySigner::from_pem("idp-1", &other)
            .unwrap()
            .sign(&claims(now()))
            .unwrap();
        assert_eq!(
            keys.verify(&forged, "chosun").unwrap_err(),
            Error::BadSignature
        );
    }

    #[test]
    fn expired_long_lived_and_over_broad_requests_are_refused() {
        let (private, public) = generate_identity_key().unwrap();
        let signer = IdentitySigner::from_pem("k", &private).unwrap();
        let keys = IdentityKeys::new([("k", public.as_str())]).unwrap();
        let mut old = claims(now() - 3_600);
        old.exp = now() - 600;
        assert_eq!(
            keys.verify(&signer.sign(&old).unwrap(), "chosun")
                .unwrap_err(),
            Error::Expired
        );
        let mut long = claims(now());
        long.exp = now() + 86_400;
        assert!(matches!(
            keys.verify(&signer.sign(&long).unwrap(), "chosun"),
            Err(Error::TooLong(_))
        ));
        let mut untyped = claims(now());
        untyped.scope = "date=ge2020".into();
        assert_eq!(
            keys.verify(&signer.sign(&untyped).unwrap(), "chosun")
                .unwrap_err(),
            Error::Scope(scope::Error::NoTypes)
        );
        let mut both = claims(now());
        both.resident.patients.insert("chosun".into(), "p1".into());
        assert_eq!(
            keys.verify(&signer.sign(&both).unwrap(), "chosun")
                .unwrap_err(),
            Error::Resident
        );
        let mut research = claims(now());
        research.purpose = "HRESCH".into();
        assert_eq!(
            keys.verify(&signer.sign(&research).unwrap(), "chosun")
                .unwrap_err(),
            Error::Purpose("HRESCH".into())
        );
    }
}
