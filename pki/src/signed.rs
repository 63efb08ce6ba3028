//! Statements signed with a federation member's certificate key, so a
//! party that only relays them cannot forge or swap them: a node signs the
//! keys it advertises for a secure-aggregation round, and every other node
//! checks the signature against the sender's certificate (issued by the
//! federation CA, valid now, naming the sender) before it deals shares to
//! those keys.
//!
//! Signatures are ECDSA P-256 with SHA-256 (ASN.1 DER), the certificates'
//! own key type, made and checked with `ring` (already rustls' provider).
//! A certificate is checked against the CA once and then kept for
//! [`TRUST_KEPT`], since a round checks the same few certificates again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::signature::{self, EcdsaKeyPair};

use crate::{Error, PeerIdentity, pem_der, verify_member};

/// How long a certificate checked against the CA is trusted without
/// checking it again.
pub const TRUST_KEPT: Duration = Duration::from_secs(10 * 60);

/// Signs `message` with a PKCS#8 PEM P-256 private key (a certificate's
/// key as [`crate::CertifiedKey::key_pem`] holds it).
pub fn sign(key_pem: &str, message: &[u8]) -> Result<Vec<u8>, Error> {
    let der = pem_der(key_pem)?;
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
        .map_err(|e| Error::Parse(format!("the signing key is not a P-256 key: {e}")))?;
    Ok(key
        .sign(&rng, message)
        .map_err(|e| Error::Parse(format!("signing failed: {e}")))?
        .as_ref()
        .to_vec())
}

/// Why a signed statement is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("its certificate is not a valid federation certificate: {0}")]
    Certificate(Error),
    #[error("its certificate names `{named}`, not `{expected}`")]
    WrongSigner { named: String, expected: String },
    #[error("its certificate is a {role}'s, not a {expected}'s")]
    WrongRole {
        role: crate::Role,
        expected: crate::Role,
    },
    #[error(
        "its certificate's key is not the one pinned for `{node}` \
         (secure_aggregation.member_keys)"
    )]
    Unpinned { node: String },
    #[error("its signature does not verify")]
    Signature,
}

/// The pin of a certificate's key: hex SHA-256 of its subject public key
/// (the key a renewal keeps), as `secure_aggregation.member_keys` holds it
/// and `ghx pki pin` prints it.
pub fn key_pin(cert_pem: &str) -> Result<String, Error> {
    Ok(pin_of(&certificate_key(cert_pem)?))
}

struct Trusted {
    identity: PeerIdentity,
    public_key: Vec<u8>,
    checked: Instant,
}

/// Checks statements signed by federation members, against the CA.
pub struct MemberKeys {
    ca_pem: String,
    trusted: Mutex<HashMap<String, Trusted>>,
    /// Node id to [`key_pin`]: those nodes sign only with that key.
    pins: BTreeMap<String, String>,
}

impl MemberKeys {
    pub fn new(ca_pem: impl Into<String>) -> Self {
        MemberKeys {
            ca_pem: ca_pem.into(),
            trusted: Mutex::new(HashMap::new()),
            pins: BTreeMap::new(),
        }
    }

    /// Pins nodes' keys (node id to [`key_pin`]): a statement of a pinned
    /// node is taken only under a certificate of that key, so whoever can
    /// issue certificates cannot impersonate it with a key of its own.
    pub fn pinned(mut self, pins: BTreeMap<String, String>) -> Self {
        self.pins = pins
            .into_iter()
            .map(|(node, pin)| (node, pin.to_ascii_lowercase()))
            .collect();
        self
    }

    /// Checks that `signature` over `message` was made with the key of
    /// `cert_pem`, a node certificate the federation CA issued to
    /// `signer`, valid now.
    pub fn verify_node(
        &self,
        signer: &str,
        cert_pem: &str,
        message: &[u8],
        signature_der: &[u8],
    ) -> Result<(), Refusal> {
        self.verify(crate::Role::Node, signer, cert_pem, message, signature_der)
    }

    /// Checks that `signature` over `message` was made with the key of
    /// `cert_pem`, a certificate of `role` the federation CA issued to
    /// `signer`, valid now.
    pub fn verify(
        &self,
        role: crate::Role,
        signer: &str,
        cert_pem: &str,
        message: &[u8],
        signature_der: &[u8],
    ) -> Result<(), Refusal> {
        let check_signer =
            |identity: &PeerIdentity, signer: &str| check_signer(identity, signer, role);
        let public_key = {
            let now = Instant::now();
            let mut trusted = self.trusted.lock().unwrap_or_else(|e| e.into_inner());
            trusted.retain(|_, t| now.duration_since(t.checked) < TRUST_KEPT);
            match trusted.get(cert_pem) {
                Some(t) => check_signer(&t.identity, signer).map(|()| t.public_key.clone())?,
                None => {
                    let identity =
                        verify_member(&self.ca_pem, cert_pem).map_err(Refusal::Certificate)?;
                    check_signer(&identity, signer)?;
                    let public_key = certificate_key(cert_pem).map_err(Refusal::Certificate)?;
                    trusted.insert(
                        cert_pem.to_owned(),
                        Trusted {
                            identity,
                            public_key: public_key.clone(),
                            checked: now,
                        },
                    );
                    public_key
                }
            }
        };
        if let Some(pin) = self.pins.get(signer)
            && pin_of(&public_key) != *pin
        {
            return Err(Refusal::Unpinned {
                node: signer.to_owned(),
            });
        }
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, public_key)
            .verify(message, signature_der)
            .map_err(|_| Refusal::Signature)
    }
}

fn check_signer(identity: &PeerIdentity, signer: &str, role: crate::Role) -> Result<(), Refusal> {
    if identity.name != signer {
        return Err(Refusal::WrongSigner {
            named: identity.name.clone(),
            expected: signer.to_owned(),
        });
    }
    if identity.role != role {
        return Err(Refusal::WrongRole {
            role: identity.role,
            expected: role,
        });
    }
    Ok(())
}

fn pin_of(public_key: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, public_key))
}

/// The subject public key of a PEM certificate.
fn certificate_key(cert_pem: &str) -> Result<Vec<u8>, Error> {
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| Error::Parse(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, CertificateRequest, Role};

    fn member(ca: &CertificateAuthority, name: &str, role: Role) -> crate::CertifiedKey {
        ca.issue(&CertificateRequest::new(name, role, "Test Hospital"))
            .unwrap()
    }

    #[test]
    fn a_node_statement_verifies_only_as_signed_by_that_node() {
        let ca = CertificateAuthority::create("test").unwrap();
        let chonnam = member(&ca, "chonnam", Role::Node);
        let chosun = member(&ca, "chosun", Role::Node);
        let keys = MemberKeys::new(ca.cert_pem());
        let signature = sign(&chonnam.key_pem, b"round 1 keys").unwrap();
        keys.verify_node("chonnam", &chonnam.cert_pem, b"round 1 keys", &signature)
            .unwrap();
        // Checked again from the kept certificate.
        keys.verify_node("chonnam", &chonnam.cert_pem, b"round 1 keys", &signature)
            .unwrap();
        // Other bytes, another node's name or certificate: refused.
        assert!(matches!(
            keys.verify_node("chonnam", &chonnam.cert_pem, b"round 2 keys", &signature),
            Err(Refusal::Signature)
        ));
        let e = keys
            .verify_node("chosun", &chonnam.cert_pem, b"round 1 keys", &signature)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "its certificate names `chonnam`, not `chosun`"
        );
        assert!(matches!(
            keys.verify_node("chosun", &chosun.cert_pem, b"round 1 keys", &signature),
            Err(Refusal::Signature)
        ));
    }

    #[test]
    fn a_pinned_node_signs_only_with_its_pinned_key() {
        let ca = CertificateAuthority::create("test").unwrap();
        let chonnam = member(&ca, "chonnam", Role::Node);
        // The CA issues a second `chonnam` certificate for a key of its own.
        let impostor = member(&ca, "chonnam", Role::Node);
        let pins = BTreeMap::from([(
            "chonnam".to_owned(),
            key_pin(&chonnam.cert_pem).unwrap().to_ascii_uppercase(),
        )]);
        let keys = MemberKeys::new(ca.cert_pem()).pinned(pins);
        let signature = sign(&chonnam.key_pem, b"keys").unwrap();
        keys.verify_node("chonnam", &chonnam.cert_pem, b"keys", &signature)
            .unwrap();
        let forged = sign(&impostor.key_pem, b"keys").unwrap();
        let e = keys
            .verify_node("chonnam", &impostor.cert_pem, b"keys", &forged)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "its certificate's key is not the one pinned for `chonnam` (secure_aggregation.member_keys)"
        );
        // Unpinned, the impostor passes: what the pin closes.
        MemberKeys::new(ca.cert_pem())
            .verify_node("chonnam", &impostor.cert_pem, b"keys", &forged)
            .unwrap();
        assert_eq!(key_pin(&chonnam.cert_pem).unwrap().len(), 64);
    }

    #[test]
    fn a_statement_under_a_foreign_or_non_node_certificate_is_refused() {
        let ca = CertificateAuthority::create("test").unwrap();
        let other_ca = CertificateAuthority::create("elsewhere").unwrap();
        let keys = MemberKeys::new(ca.cert_pem());
        let outsider = member(&other_ca, "chonnam", Role::Node);
        let signature = sign(&outsider.key_pem, b"keys").unwrap();
        assert!(matches!(
            keys.verify_node("chonnam", &outsider.cert_pem, b"keys", &signature),
            Err(Refusal::Certificate(_))
        ));
        let coordinator = member(&ca, "coordinator", Role::Coordinator);
        let signature = sign(&coordinator.key_pem, b"keys").unwrap();
        let e = keys
            .verify_node("coordinator", &coordinator.cert_pem, b"keys", &signature)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "its certificate is a coordinator's, not a node's"
        );
        assert!(matches!(
            keys.verify_node("chonnam", "not a certificate", b"keys", &signature),
            Err(Refusal::Certificate(_))
        ));
    }
}
