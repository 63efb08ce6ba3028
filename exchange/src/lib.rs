//! The exchange: a resident's own records, from the hospitals they name, to
//! the service they chose (PIPA article 35-2, the right to have one's
//! personal information transmitted).
//!
//! The key decision is that nobody between a hospital and the recipient can
//! read or change what travels. The platform's identity service signs the
//! resident's request (`request`: a JWS naming the resident, the hospitals,
//! the recipient, the scope in FHIR search parameters, a short expiry and a
//! single-use id). The recipient's X25519 key travels in a statement signed
//! with its federation certificate (`keys`), so a key that does not match
//! the certificate is refused. Each hospital answers in parts (`part`),
//! each signed with the hospital's certificate key and chained to the one
//! before, then sealed with HPKE (RFC 9180, `envelope`) to the recipient's
//! key and padded, so the coordinator relays ciphertext of a few sizes
//! only. The recipient (`receive`) opens, checks and completes each
//! hospital's transfer, and `merge` writes one record from all of them.
//! No I/O here: the node decides and reads its store, the coordinator
//! relays, the CLI writes files.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod keys;
pub mod merge;
pub mod part;
pub mod receive;
pub mod records;
pub mod request;
pub mod scope;

/// HL7 v3 ActReason codes a resident's request may carry: the patient's
/// own request (transmission to a service they chose) and treatment.
pub const PURPOSES: [&str; 2] = ["PATRQT", "TREAT"];

/// The identifier system naming a registered recipient in a Consent's
/// `provision.actor.reference.identifier` (its certificate's name as value).
pub const RECIPIENT_SYSTEM: &str = "urn:ghx:recipient";

/// The identifier system naming a hospital (its node id as value) in a
/// Provenance's agent.
pub const HOSPITAL_SYSTEM: &str = "urn:ghx:node";
