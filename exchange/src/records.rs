//! The hospital's side of a transfer: the resident's resources as Bundles
//! of bounded size, each with a Provenance naming the hospital, and the
//! parts that carry them signed, chained and sealed to the recipient.

use serde_json::{Value, json};

use crate::envelope::{self, Sealer};
use crate::part::{End, Outcome, Part, SignedPart, chain_digest};

/// Why a part cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Seal(#[from] envelope::Error),
    #[error("signing a part failed: {0}")]
    Sign(ghx_pki::Error),
}

/// Who the hospital is, as its Provenance names it.
#[derive(Debug, Clone)]
pub struct Hospital {
    pub id: String,
    pub name: String,
}

/// Splits `resources` into Bundles of about `target_bytes` of JSON each
/// (at least one resource each), each with a Provenance that targets every
/// resource in it and names the hospital as custodian. `recorded` is the
/// transfer's time (RFC 3339).
pub fn bundles(
    resources: &[Value],
    hospital: &Hospital,
    recorded: &str,
    target_bytes: usize,
) -> Vec<(Value, u64)> {
    let mut out = Vec::new();
    let mut entries: Vec<Value> = Vec::new();
    let mut size = 0usize;
    let flush = |entries: &mut Vec<Value>, out: &mut Vec<(Value, u64)>| {
        if entries.is_empty() {
            return;
        }
        let count = entries.len() as u64;
        let targets: Vec<Value> = entries
            .iter()
            .filter_map(|e| {
                let kind = e.get("resourceType")?.as_str()?;
                let id = e.get("id")?.as_str()?;
                Some(json!({"reference": format!("{kind}/{id}")}))
            })
            .collect();
        let provenance = json!({
            "resourceType": "Provenance",
            "id": format!("provenance-{}", out.len() + 1),
            "target": targets,
            "recorded": recorded,
            "activity": {"text": "transmitted to the service the resident chose, at their request"},
            "agent": [{
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "custodian"}]},
                "who": {"identifier": {"system": crate::HOSPITAL_SYSTEM, "value": hospital.id}, "display": hospital.name},
            }],
        });
        let mut list: Vec<Value> = entries
            .drain(..)
            .map(|resource| json!({"resource": resource}))
            .collect();
        list.push(json!({"resource": provenance}));
        out.push((
            json!({
                "resourceType": "Bundle",
                "type": "collection",
                "timestamp": recorded,
                "entry": list,
            }),
            count,
        ));
    };
    for resource in resources {
        let len = resource.to_string().len();
        if size + len > target_bytes && !entries.is_empty() {
            flush(&mut entries, &mut out);
            size = 0;
        }
        size += len;
        entries.push(resource.clone());
    }
    flush(&mut entries, &mut out);
    out
}

/// One transfer being sent: parts signed with the hospital's key, chained
/// and sealed in order.
pub struct Outgoing {
    sealer: Sealer,
    key_pem: String,
    certificate_pem: String,
    request: String,
    hospital: String,
    seq: u32,
    previous: String,
    resources: u64,
}

impl Outgoing {
    pub fn new(
        recipient_public: &[u8; 32],
        request: &str,
        hospital: &str,
        key_pem: &str,
        certificate_pem: &str,
    ) -> Result<Self, Error> {
        Ok(Outgoing {
            sealer: Sealer::new(recipient_public, request, hospital)?,
            key_pem: key_pem.to_owned(),
            certificate_pem: certificate_pem.to_owned(),
            request: request.to_owned(),
            hospital: hospital.to_owned(),
            seq: 0,
            previous: String::new(),
            resources: 0,
        })
    }

    /// The encapsulated key for the first frame.
    pub fn encapsulated(&self) -> &[u8] {
        self.sealer.encapsulated()
    }

    /// The next part carrying `bundle` of `count` resources.
    pub fn bundle(&mut self, patient: &str, bundle: Value, count: u64) -> Result<Vec<u8>, Error> {
        self.resources += count;
        self.next(Some(patient), Some(bundle), None)
    }

    /// The last part.
    pub fn end(&mut self, patient: Option<&str>, outcome: Outcome) -> Result<Vec<u8>, Error> {
        let end = End {
            outcome,
            parts: self.seq,
            resources: self.resources,
        };
        self.next(patient, None, Some(end))
    }

    fn next(
        &mut self,
        patient: Option<&str>,
        bundle: Option<Value>,
        end: Option<End>,
    ) -> Result<Vec<u8>, Error> {
        let part = Part {
            request: self.request.clone(),
            hospital: self.hospital.clone(),
            seq: self.seq,
            previous: self.previous.clone(),
            patient: patient.map(str::to_owned),
            bundle,
            end,
        };
        let bytes = part.bytes();
        let signature = ghx_pki::signed::sign(&self.key_pem, &bytes).map_err(Error::Sign)?;
        let certificate_pem = if self.seq == 0 {
            self.certificate_pem.clone()
        } else {
            String::new()
        };
        self.previous = chain_digest(&bytes);
        self.seq += 1;
        let signed = SignedPart {
            part: bytes,
            signature,
            certificate_pem,
        };
        Ok(self.sealer.seal(&signed.encode())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_stay_near_their_size_and_each_has_its_provenance() {
        let resources: Vec<Value> = (0..50)
            .map(|i| json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final", "code": {"text": "x".repeat(200)}}))
            .collect();
        let hospital = Hospital {
            id: "chosun".into(),
            name: "Chosun University Hospital".into(),
        };
        let bundles = bundles(&resources, &hospital, "2026-12-07T00:00:00Z", 2_000);
        assert!(bundles.len() >= 5, "{}", bundles.len());
        let total: u64 = bundles.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 50);
        for (bundle, count) in &bundles {
            let entries = bundle["entry"].as_array().unwrap();
            assert_eq!(entries.len() as u64, count + 1);
            let provenance = &entries.last().unwrap()["resource"];
            assert_eq!(provenance["resourceType"], "Provenance");
            assert_eq!(
                provenance["target"].as_array().unwrap().len() as u64,
                *count
            );
            assert_eq!(
                provenance["agent"][0]["who"]["identifier"]["value"],
                "chosun"
            );
        }
    }
}
