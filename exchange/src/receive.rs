//! The recipient's side of one hospital's transfer: open each part, check
//! the hospital's signature and certificate, the request, the order and the
//! chain, that every Bundle is FHIR R4 and every resource is the
//! resident's, and that a Provenance names the hospital for every resource;
//! then accept the transfer only whole (a signed end whose counts match).

use serde_json::Value;

use crate::envelope::{self, Opener};
use crate::keys::RecipientKey;
use crate::part::{Damaged, End, Outcome, Part, SignedPart, chain_digest};

/// Why a hospital's transfer is refused. Nothing of it is kept.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hospital `{hospital}`: {source}")]
    Open {
        hospital: String,
        source: envelope::Error,
    },
    #[error("hospital `{0}`: {1}")]
    Damaged(String, Damaged),
    #[error("hospital `{hospital}`: a part's signature: {source}")]
    Signature {
        hospital: String,
        source: ghx_pki::signed::Refusal,
    },
    #[error("hospital `{hospital}`: {what}")]
    Mismatch { hospital: String, what: String },
    #[error("hospital `{hospital}`: part {seq} is not a valid FHIR R4 Bundle: {why}")]
    NotFhir {
        hospital: String,
        seq: u32,
        why: String,
    },
    #[error("hospital `{hospital}`: {resource} does not belong to the resident the hospital named")]
    NotTheResidents { hospital: String, resource: String },
    #[error("hospital `{hospital}`: {resource} has no Provenance naming the hospital")]
    Provenance { hospital: String, resource: String },
    #[error("hospital `{0}`: the transfer ended before its signed end; nothing of it is kept")]
    Incomplete(String),
    #[error(
        "hospital `{0}`: the resident withdrew consent during the transfer; nothing of it is kept"
    )]
    Withdrawn(String),
}

/// One hospital's transfer, complete.
#[derive(Debug, Clone)]
pub struct Received {
    pub hospital: String,
    pub outcome: Outcome,
    /// The resident's patient id there (when anything was sent).
    pub patient: Option<String>,
    /// The resources (the Patient first), Provenance apart.
    pub resources: Vec<Value>,
    pub provenance: Vec<Value>,
}

/// A transfer being received.
pub struct Incoming {
    hospital: String,
    request: String,
    opener: Opener,
    certificate: Option<String>,
    next_seq: u32,
    previous: String,
    patient: Option<String>,
    resources: Vec<Value>,
    provenance: Vec<Value>,
    end: Option<End>,
}

impl Incoming {
    pub fn new(
        key: &RecipientKey,
        request: &str,
        hospital: &str,
        encapsulated: &[u8],
    ) -> Result<Self, Error> {
        Ok(Incoming {
            hospital: hospital.to_owned(),
            request: request.to_owned(),
            opener: Opener::new(key, encapsulated, request, hospital).map_err(|source| {
                Error::Open {
                    hospital: hospital.to_owned(),
                    source,
                }
            })?,
            certificate: None,
            next_seq: 0,
            previous: String::new(),
            patient: None,
            resources: Vec::new(),
            provenance: Vec::new(),
            end: None,
        })
    }

    fn mismatch(&self, what: impl Into<String>) -> Error {
        Error::Mismatch {
            hospital: self.hospital.clone(),
            what: what.into(),
        }
    }

    /// Takes the next sealed part.
    pub fn accept(
        &mut self,
        ciphertext: &[u8],
        members: &ghx_pki::signed::MemberKeys,
    ) -> Result<(), Error> {
        if self.end.is_some() {
            return Err(self.mismatch("a part arrived after the transfer's end"));
        }
        let opened = self.opener.open(ciphertext).map_err(|source| Error::Open {
            hospital: self.hospital.clone(),
            source,
        })?;
        let signed =
            SignedPart::decode(&opened).map_err(|e| Error::Damaged(self.hospital.clone(), e))?;
        if self.certificate.is_none() {
            if signed.certificate_pem.is_empty() {
                return Err(self.mismatch("the first part carries no certificate"));
            }
            self.certificate = Some(signed.certificate_pem.clone());
        }
        let certificate = self.certificate.as_deref().unwrap_or_default();
        members
            .verify(
                ghx_pki::Role::Node,
                &self.hospital,
                certificate,
                &signed.part,
                &signed.signature,
            )
            .map_err(|source| Error::Signature {
                hospital: self.hospital.clone(),
                source,
            })?;
        let part: Part = serde_json::from_slice(&signed.part)
            .map_err(|e| self.mismatch(format!("a part is not readable: {e}")))?;
        if part.request != self.request || part.hospital != self.hospital {
            return Err(self.mismatch("a part is for another request or hospital"));
        }
        if part.seq != self.next_seq || part.previous != self.previous {
            return Err(self.mismatch(format!(
                "part {} is out of order or does not follow the part before",
                part.seq
            )));
        }
        match (&self.patient, &part.patient) {
            (None, Some(p)) if self.next_seq == 0 => self.patient = Some(p.clone()),
            (a, b) if a == b => {}
            (None, None) => {}
            _ => return Err(self.mismatch("parts name different patients")),
        }
        self.previous = chain_digest(&signed.part);
        self.next_seq += 1;
        if let Some(bundle) = part.bundle {
            self.take_bundle(part.seq, bundle)?;
        }
        if let Some(end) = part.end {
            let resources = self.resources.len() as u64;
            if end.outcome == Outcome::Nothing && (part.seq != 0 || resources != 0) {
                return Err(self.mismatch("an end saying nothing was sent follows sent parts"));
            }
            if end.outcome == Outcome::Complete
                && (end.parts != part.seq || end.resources != resources)
            {
                return Err(self.mismatch(format!(
                    "the end counts {} parts and {} resources; {} and {resources} arrived",
                    end.parts, end.resources, part.seq
                )));
            }
            self.end = Some(end);
        }
        Ok(())
    }

    fn take_bundle(&mut self, seq: u32, bundle: Value) -> Result<(), Error> {
        let not_fhir = |why: String| Error::NotFhir {
            hospital: self.hospital.clone(),
            seq,
            why,
        };
        let _: fhir_model::r4b::resources::Bundle =
            serde_json::from_value(bundle.clone()).map_err(|e| not_fhir(e.to_string()))?;
        let Some(patient) = self.patient.clone() else {
            return Err(self.mismatch("a Bundle arrived without the resident's patient id"));
        };
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut resources = Vec::new();
        let mut provenance = Vec::new();
        for entry in entries {
            let Some(resource) = entry.get("resource").cloned() else {
                return Err(not_fhir("an entry without a resource".to_owned()));
            };
            if resource.get("resourceType").and_then(Value::as_str) == Some("Provenance") {
                provenance.push(resource);
            } else {
                if !belongs(&resource, &patient) {
                    return Err(Error::NotTheResidents {
                        hospital: self.hospital.clone(),
                        resource: label(&resource),
                    });
                }
                resources.push(resource);
            }
        }
        for resource in &resources {
            let target = label(resource);
            let covered = provenance.iter().any(|p| {
                names_hospital(p, &self.hospital)
                    && p.get("target").and_then(Value::as_array).is_some_and(|t| {
                        t.iter()
                            .any(|r| r.get("reference").and_then(Value::as_str) == Some(&target))
                    })
            });
            if !covered {
                return Err(Error::Provenance {
                    hospital: self.hospital.clone(),
                    resource: target,
                });
            }
        }
        self.resources.extend(resources);
        self.provenance.extend(provenance);
        Ok(())
    }

    /// The transfer, if it ended whole.
    pub fn finish(self) -> Result<Received, Error> {
        match self.end {
            None => Err(Error::Incomplete(self.hospital)),
            Some(End {
                outcome: Outcome::Withdrawn,
                ..
            }) => Err(Error::Withdrawn(self.hospital)),
            Some(end) => Ok(Received {
                hospital: self.hospital,
                outcome: end.outcome,
                patient: self.patient,
                resources: self.resources,
                provenance: self.provenance,
            }),
        }
    }
}

/// Every hospital's transfer of one request, as frames arrive: a
/// hospital's transfer that fails a check is dropped whole and the reason
/// kept; the others go on.
pub struct Transfers<'a> {
    key: &'a RecipientKey,
    request: String,
    members: ghx_pki::signed::MemberKeys,
    open: std::collections::BTreeMap<String, Incoming>,
    failed: std::collections::BTreeMap<String, String>,
}

/// Every hospital's outcome.
#[derive(Debug, Clone, Default)]
pub struct Outcomes {
    /// Transfers received whole (`Complete` or `Nothing`).
    pub received: Vec<Received>,
    /// Hospitals that refused or whose transfer was discarded, and why.
    pub failed: std::collections::BTreeMap<String, String>,
}

impl<'a> Transfers<'a> {
    /// For request `request` (its id), checking hospitals' certificates
    /// against the federation CA `ca_pem`.
    pub fn new(key: &'a RecipientKey, request: &str, ca_pem: &str) -> Self {
        Transfers {
            key,
            request: request.to_owned(),
            members: ghx_pki::signed::MemberKeys::new(ca_pem),
            open: Default::default(),
            failed: Default::default(),
        }
    }

    /// Takes each hospital's parts only under its pinned key (hospital id
    /// to `ghx_pki::signed::key_pin`), so whoever can issue certificates
    /// cannot speak for a pinned hospital.
    pub fn pinned(mut self, pins: std::collections::BTreeMap<String, String>) -> Self {
        self.members = self.members.pinned(pins);
        self
    }

    /// A hospital refused (or could not be reached).
    pub fn refused(&mut self, hospital: &str, reason: &str) {
        self.open.remove(hospital);
        self.failed
            .insert(hospital.to_owned(), format!("refused: {reason}"));
    }

    /// A frame of `hospital`'s transfer.
    pub fn frame(&mut self, hospital: &str, encapsulated: &[u8], ciphertext: &[u8]) {
        if self.failed.contains_key(hospital) {
            return;
        }
        if !self.open.contains_key(hospital) {
            match Incoming::new(self.key, &self.request, hospital, encapsulated) {
                Ok(incoming) => {
                    self.open.insert(hospital.to_owned(), incoming);
                }
                Err(e) => {
                    self.failed.insert(hospital.to_owned(), e.to_string());
                    return;
                }
            }
        }
        let incoming = self.open.get_mut(hospital).expect("opened above");
        if let Err(e) = incoming.accept(ciphertext, &self.members) {
            self.open.remove(hospital);
            self.failed.insert(hospital.to_owned(), e.to_string());
        }
    }

    /// Every transfer as it ended.
    pub fn finish(self) -> Outcomes {
        let mut outcomes = Outcomes {
            received: Vec::new(),
            failed: self.failed,
        };
        for (hospital, incoming) in self.open {
            match incoming.finish() {
                Ok(r) => outcomes.received.push(r),
                Err(e) => {
                    outcomes.failed.insert(hospital, e.to_string());
                }
            }
        }
        outcomes
    }
}

/// `Type/id` of a resource.
pub fn label(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("?"),
        resource.get("id").and_then(Value::as_str).unwrap_or("?")
    )
}

fn names_hospital(provenance: &Value, hospital: &str) -> bool {
    provenance
        .get("agent")
        .and_then(Value::as_array)
        .is_some_and(|agents| {
            agents.iter().any(|a| {
                a.pointer("/who/identifier/system").and_then(Value::as_str)
                    == Some(crate::HOSPITAL_SYSTEM)
                    && a.pointer("/who/identifier/value").and_then(Value::as_str) == Some(hospital)
            })
        })
}

/// Whether a resource is the patient's: the Patient itself, or a resource
/// whose every reference to a Patient is to them (and that has one).
pub fn belongs(resource: &Value, patient: &str) -> bool {
    if resource.get("resourceType").and_then(Value::as_str) == Some("Patient") {
        return resource.get("id").and_then(Value::as_str) == Some(patient);
    }
    let own = format!("Patient/{patient}");
    let mut any = false;
    let mut all = true;
    walk_references(resource, &mut |reference| {
        if reference.starts_with("Patient/") {
            any = true;
            all &= reference == own;
        }
    });
    any && all
}

/// Calls `f` with every `reference` string in a resource.
pub fn walk_references(value: &Value, f: &mut impl FnMut(&str)) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("reference", Value::String(s)) => f(s),
                    _ => walk_references(v, f),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| walk_references(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_resource_belongs_to_the_resident_only_through_its_every_patient_reference() {
        let own = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}});
        assert!(belongs(&own, "p1"));
        let other = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"}});
        assert!(!belongs(&other, "p1"));
        let mixed = json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Patient/p2"}]});
        assert!(!belongs(&mixed, "p1"));
        let none = json!({"resourceType": "Observation"});
        assert!(!belongs(&none, "p1"));
        assert!(belongs(
            &json!({"resourceType": "Patient", "id": "p1"}),
            "p1"
        ));
    }
}
