//! One record from several hospitals' transfers.
//!
//! Each hospital's ids are made unique by prefixing the hospital (`chosun.`)
//! and every reference inside its resources follows; each hospital's
//! Patient becomes the one Patient `resident`, with every hospital's
//! identifiers. The same lab result or diagnosis reported by two hospitals
//! is kept once: an Observation with the same code, the same effective
//! time and the same value(s) and unit(s), or a Condition with the same
//! code (ICD-10 family codes compared without dots) and the same onset day.
//! The copy dropped keeps its Provenance, retargeted to the one kept, so
//! the record says which hospitals reported it.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::receive::{Received, label};
use crate::scope::{clinical_date, main_codings};

/// The merged record's Patient id.
pub const RESIDENT: &str = "resident";

/// What merging found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Resources each hospital sent (its Patient included).
    pub per_hospital: BTreeMap<String, usize>,
    /// Resources kept once that more than one hospital reported.
    pub duplicates: usize,
    /// Resources in the merged record (the Patient included, Provenance not).
    pub resources: usize,
}

/// The merged Bundle (type collection) and what merging found.
pub fn merge(received: &[Received], timestamp: &str) -> (Value, Report) {
    let mut report = Report::default();
    // Pass 1: new ids, and which resources are copies of one kept before.
    let mut renamed: Vec<HashMap<String, String>> = Vec::new();
    // What each clinical fact was kept as, and which hospital sent it: a
    // repeat within one hospital is that hospital's own, and kept.
    let mut seen: HashMap<String, (String, String)> = HashMap::new();
    let mut dropped: Vec<Vec<bool>> = Vec::new();
    for r in received {
        let mut map = HashMap::new();
        let mut drop = Vec::new();
        report
            .per_hospital
            .insert(r.hospital.clone(), r.resources.len());
        for resource in &r.resources {
            let old = label(resource);
            let kind = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("");
            if kind == "Patient" {
                map.insert(old, format!("Patient/{RESIDENT}"));
                drop.push(true);
                continue;
            }
            let new = format!("{kind}/{}", new_id(&r.hospital, resource));
            match same_as_key(resource).and_then(|key| match seen.get(&key) {
                Some((hospital, kept)) if *hospital != r.hospital => Some(kept.clone()),
                Some(_) => None,
                None => {
                    seen.insert(key, (r.hospital.clone(), new.clone()));
                    None
                }
            }) {
                Some(kept) => {
                    report.duplicates += 1;
                    map.insert(old, kept);
                    drop.push(true);
                }
                None => {
                    map.insert(old, new);
                    drop.push(false);
                }
            }
        }
        renamed.push(map);
        dropped.push(drop);
    }
    // Pass 2: the resident, then each hospital's kept resources and
    // Provenance, references rewritten.
    let mut entries = vec![json!({"resource": resident(received)})];
    for ((r, map), drop) in received.iter().zip(&renamed).zip(&dropped) {
        for (resource, dropped) in r.resources.iter().zip(drop) {
            if *dropped {
                continue;
            }
            entries.push(json!({"resource": rewrite(resource, map)}));
        }
        for (k, provenance) in r.provenance.iter().enumerate() {
            let mut p = rewrite(provenance, map);
            p["id"] = json!(format!("{}.provenance-{}", r.hospital, k + 1));
            entries.push(json!({"resource": p}));
        }
    }
    report.resources = entries
        .iter()
        .filter(|e| e["resource"]["resourceType"] != "Provenance")
        .count();
    (
        json!({
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": timestamp,
            "entry": entries,
        }),
        report,
    )
}

/// The resident's one Patient: the first hospital's, with every hospital's
/// identifiers.
fn resident(received: &[Received]) -> Value {
    let patients: Vec<&Value> = received
        .iter()
        .filter_map(|r| {
            r.resources
                .iter()
                .find(|x| x.get("resourceType").and_then(Value::as_str) == Some("Patient"))
        })
        .collect();
    let mut patient = patients
        .first()
        .map(|p| (*p).clone())
        .unwrap_or_else(|| json!({"resourceType": "Patient"}));
    let mut identifiers: Vec<Value> = Vec::new();
    for p in &patients {
        for id in p
            .get("identifier")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !identifiers.contains(id) {
                identifiers.push(id.clone());
            }
        }
    }
    patient["id"] = json!(RESIDENT);
    if let Some(meta) = patient.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("extension");
    }
    if !identifiers.is_empty() {
        patient["identifier"] = Value::Array(identifiers);
    }
    patient
}

/// `hospital.id`, within FHIR's 64 characters (a digest past them): node
/// ids have no dot, so no two hospitals' ids meet.
fn new_id(hospital: &str, resource: &Value) -> String {
    let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
    let candidate = format!("{hospital}.{id}");
    if candidate.len() <= 64 {
        candidate
    } else {
        use sha2::Digest;
        format!(
            "{hospital}.{}",
            &hex::encode(sha2::Sha256::digest(id.as_bytes()))[..32]
        )
    }
}

/// A copy of `resource` with its id and every mapped reference renamed.
fn rewrite(resource: &Value, map: &HashMap<String, String>) -> Value {
    let mut out = resource.clone();
    if let Some(new) = map.get(&label(resource))
        && let Some((_, id)) = new.split_once('/')
    {
        out["id"] = json!(id);
    }
    rename_references(&mut out, map);
    if let Some(meta) = out.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("extension");
    }
    out
}

fn rename_references(value: &mut Value, map: &HashMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (key, v) in object.iter_mut() {
                match (key.as_str(), &*v) {
                    ("reference", Value::String(s)) => {
                        if let Some(new) = map.get(s) {
                            *v = json!(new);
                        }
                    }
                    _ => rename_references(v, map),
                }
            }
        }
        Value::Array(list) => list.iter_mut().for_each(|v| rename_references(v, map)),
        _ => {}
    }
}

/// What makes two hospitals' resources the same clinical fact, for the
/// kinds compared; `None` for the rest (always kept).
fn same_as_key(resource: &Value) -> Option<String> {
    let kind = resource.get("resourceType")?.as_str()?;
    let coding = main_codings(resource).into_iter().next()?;
    let code = format!(
        "{}|{}",
        family(&coding.0),
        normal_code(&coding.0, &coding.1)
    );
    let (start, _) = clinical_date(resource)?;
    // Only copies in the same state are one fact: a refuted or
    // entered-in-error copy is kept beside the other.
    let state = format!(
        "{}{}",
        resource.get("status").and_then(Value::as_str).unwrap_or(""),
        resource
            .pointer("/verificationStatus/coding/0/code")
            .and_then(Value::as_str)
            .unwrap_or("")
    );
    let code = format!("{code}|{state}");
    match kind {
        "Observation" => {
            let mut values = vec![value_of(resource)];
            for component in resource
                .get("component")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let c = main_codings(component)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                values.push(format!("{}={}", c.1, value_of(component)));
            }
            Some(format!("Observation|{code}|{start}|{}", values.join(";")))
        }
        "Condition" => {
            // The onset day, in Korean time.
            let day = (start + 9 * 3600).div_euclid(86_400);
            Some(format!("Condition|{code}|{day}"))
        }
        _ => None,
    }
}

/// A result's value: a quantity by number and unit code, any other
/// `value[x]` (or its absence's reason) as written.
fn value_of(resource: &Value) -> String {
    if let Some(q) = resource.get("valueQuantity") {
        return format!(
            "{}{}",
            q.get("value")
                .and_then(Value::as_f64)
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default(),
            q.get("code")
                .or_else(|| q.get("unit"))
                .and_then(Value::as_str)
                .unwrap_or("")
        );
    }
    resource
        .as_object()
        .and_then(|o| {
            o.iter()
                .find(|(k, _)| k.starts_with("value") || *k == "dataAbsentReason")
                .map(|(k, v)| format!("{k}={v}"))
        })
        .unwrap_or_default()
}

/// ICD-10 family systems (KCD-8, WHO ICD-10, ICD-10-CM) compare as one.
fn family(system: &str) -> &str {
    let lower = system.to_ascii_lowercase();
    if lower.contains("kcd") || lower.contains("icd-10") || lower.contains("icd10") {
        "icd10"
    } else {
        system
    }
}

fn normal_code(system: &str, code: &str) -> String {
    if family(system) == "icd10" {
        code.chars()
            .filter(|c| *c != '.')
            .map(|c| c.to_ascii_uppercase())
            .collect()
    } else {
        code.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::part::Outcome;
    use crate::receive::walk_references;

    fn received(hospital: &str, patient: &str, resources: Vec<Value>) -> Received {
        let targets: Vec<Value> = resources
            .iter()
            .map(|r| json!({"reference": label(r)}))
            .collect();
        Received {
            hospital: hospital.into(),
            outcome: Outcome::Complete,
            patient: Some(patient.into()),
            resources,
            provenance: vec![
                json!({"resourceType": "Provenance", "id": "p", "target": targets, "recorded": "2026-01-01T00:00:00Z",
                "agent": [{"who": {"identifier": {"system": crate::HOSPITAL_SYSTEM, "value": hospital}}}]}),
            ],
        }
    }

    #[test]
    fn the_same_diagnosis_and_lab_from_two_hospitals_are_kept_once_with_both_provenances() {
        let a = received(
            "chonnam",
            "a1",
            vec![
                json!({"resourceType": "Patient", "id": "a1", "identifier": [{"system": "urn:a", "value": "1"}], "gender": "female"}),
                json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/a1"}, "code": {"coding": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kcd8", "code": "E11.9"}]}, "onsetDateTime": "2020-03-01"}),
                json!({"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/a1"}, "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "effectiveDateTime": "2024-01-02T09:10:00+09:00", "valueQuantity": {"value": 7.1, "code": "%"}}),
            ],
        );
        let b = received(
            "chosun",
            "b7",
            vec![
                json!({"resourceType": "Patient", "id": "b7", "identifier": [{"system": "urn:b", "value": "7"}], "gender": "female"}),
                json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/b7"}, "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E119"}]}, "onsetDateTime": "2020-03-01T10:00:00+09:00"}),
                json!({"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/b7"}, "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "effectiveDateTime": "2024-01-02T00:10:00Z", "valueQuantity": {"value": 7.10, "code": "%"}}),
                json!({"resourceType": "Observation", "id": "o2", "status": "final", "subject": {"reference": "Patient/b7"}, "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]}, "effectiveDateTime": "2024-01-02T00:10:00Z", "valueQuantity": {"value": 7.3, "code": "%"}}),
            ],
        );
        let (bundle, report) = merge(&[a, b], "2026-12-07T00:00:00Z");
        assert_eq!(report.duplicates, 2, "{report:?}");
        assert_eq!(report.resources, 4, "resident, E11.9, two HbA1c values");
        let _: fhir_model::r4b::resources::Bundle = serde_json::from_value(bundle.clone()).unwrap();
        let entries = bundle["entry"].as_array().unwrap();
        let patient = &entries[0]["resource"];
        assert_eq!(patient["id"], RESIDENT);
        assert_eq!(patient["identifier"].as_array().unwrap().len(), 2);
        for e in entries {
            let mut refs = Vec::new();
            walk_references(&e["resource"], &mut |r| refs.push(r.to_owned()));
            for r in refs.iter().filter(|r| r.starts_with("Patient/")) {
                assert_eq!(r, "Patient/resident");
            }
        }
        // Chosun's copy of the diagnosis is Chonnam's, by its Provenance.
        let chosun_provenance = entries
            .iter()
            .find(|e| e["resource"]["id"] == "chosun.provenance-1")
            .unwrap();
        let targets = chosun_provenance["resource"]["target"].to_string();
        assert!(targets.contains("Condition/chonnam.c1"), "{targets}");
        assert!(targets.contains("Observation/chosun.o2"), "{targets}");
    }
}
