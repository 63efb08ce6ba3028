//! Validation of one resource and the index rows derived from it.

use std::collections::HashMap;

use fhir_model::r4b::resources::{
    Condition, ConditionOnset, Consent, Encounter, MedicationRequest, MedicationRequestMedication,
    Observation, ObservationComponentValue, ObservationEffective, ObservationValue, Patient,
    Resource,
};
use fhir_model::r4b::types::{CodeableConcept, Quantity, Reference};
use fhir_model::{Date, DateTime};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::conformance::{self, Finding};
use super::rrn::{self, RrnPolicy};
use crate::consent::Rule;
use crate::store::{
    ConditionCode, ConsentRow, EncounterRow, IndexedResource, MedicationCode,
    ObservationValue as ObsRow, PatientRow, StoredResource,
};
use crate::terminology::{self, KCD8, LOINC};

/// What indexing needs besides the resource itself.
#[derive(Debug, Default)]
pub(crate) struct IndexContext {
    /// Bundle `fullUrl` -> `Type/id`, to resolve references inside a Bundle.
    pub(crate) full_urls: HashMap<String, String>,
    /// (system, code) -> LOINC codes it maps to (HIRA EDI lab codes).
    pub(crate) to_loinc: HashMap<(String, String), Vec<String>>,
    /// (system, code) -> KCD-8 codes it maps to (SNOMED CT diagnoses).
    pub(crate) to_kcd: HashMap<(String, String), Vec<String>>,
    pub(crate) rrn: RrnPolicy,
    /// The federation's link key: a Patient's RRN becomes its linkage token
    /// before the RRN is stripped.
    pub(crate) link_key: Option<ghx_disclosure::linkage::LinkKey>,
    /// Unix seconds of this import: the time of a Consent that states none.
    pub(crate) imported_at: i64,
    /// Accept resources that depart from the FHIR format (unknown elements,
    /// empty values), counting them, instead of rejecting them.
    pub(crate) lenient: bool,
}

/// Why one resource was not accepted.
#[derive(Debug, Clone)]
pub(crate) struct Invalid {
    pub(crate) resource_type: Option<String>,
    pub(crate) id: Option<String>,
    pub(crate) reason: String,
}

impl Invalid {
    /// An id that holds an RRN, or is no FHIR id, is not repeated in
    /// reports (it could be data); nor is a resource type that is no name.
    pub(crate) fn new(resource_type: Option<&str>, id: Option<&str>, reason: String) -> Self {
        Invalid {
            resource_type: resource_type.map(|t| super::rrn::element_name(t).to_owned()),
            id: id
                .filter(|id| valid_id(id) && !rrn::contains_rrn(id.as_bytes()))
                .map(str::to_owned),
            reason,
        }
    }
}

/// A validated resource, the RRN identifiers removed from it, and where it
/// departs from the format (lenient mode only; strict mode rejects).
#[derive(Debug)]
pub(crate) struct Validated {
    pub(crate) indexed: IndexedResource,
    pub(crate) rrn_stripped: Vec<String>,
    pub(crate) let_through: Vec<Finding>,
    /// The code systems of its codes (diagnosis, lab, medication), as sent.
    pub(crate) code_systems: Vec<String>,
}

/// The first fields of any resource, read without building the resource.
#[derive(Deserialize)]
pub(crate) struct Head<'a> {
    #[serde(rename = "resourceType", borrow)]
    pub(crate) resource_type: &'a str,
    #[serde(borrow, default)]
    pub(crate) id: Option<&'a str>,
}

/// Validates one resource's JSON and derives its index rows.
pub(crate) fn index_resource(json: &str, ctx: &IndexContext) -> Result<Validated, Invalid> {
    let head: Head<'_> = serde_json::from_str(json).map_err(|e| {
        Invalid::new(
            None,
            None,
            format!("not valid JSON: {}", redact(&e.to_string())),
        )
    })?;
    let ty = head.resource_type;
    // What reasons may say of the type (it could be anything).
    let shown = rrn::element_name(ty);
    let invalid = |reason: String| Invalid::new(Some(ty), head.id, reason);
    let id = head.id.filter(|id| valid_id(id)).ok_or_else(|| {
        invalid("resource has no valid id (1-64 characters of A-Z a-z 0-9 - .)".to_owned())
    })?;
    // A node's own export carries its version in `meta`; that is not data.
    let unexported = crate::export::without_node_meta(json);
    let json = unexported.as_deref().unwrap_or(json);
    // One parse serves screening, the typed resource and the format check.
    let mut value: Value = serde_json::from_str(json)
        .map_err(|e| invalid(format!("not valid JSON: {}", redact(&e.to_string()))))?;
    // What is stored is what was screened: the raw text when nothing in it
    // could be an RRN (no escape, so the parse shows what the text does),
    // else the screened value re-serialised.
    let mut link_token = None;
    let (json, rrn_stripped) = if rrn::suspicious(json) {
        if ty == "Patient"
            && let Some(key) = &ctx.link_key
        {
            link_token = rrn::patient_rrn(&value).map(|digits| key.token(&digits));
        }
        let removed = rrn::screen_value(&mut value, ctx.rrn).map_err(invalid)?;
        let text = serde_json::to_string(&value).expect("a parsed value serializes");
        (text, removed)
    } else {
        (json.to_owned(), Vec::new())
    };
    let mut let_through = Vec::new();
    let mut code_systems = Vec::new();
    let patient_of = |reference: Option<&Reference>| -> Option<String> {
        let r = reference?.reference.as_deref()?;
        let resolved = ctx.full_urls.get(r).map(String::as_str).unwrap_or(r);
        let (_, id) = resolved.rsplit_once("Patient/")?;
        Some(id.to_owned())
    };
    let mut indexed = IndexedResource {
        resource: StoredResource {
            resource_type: ty.to_owned(),
            id: id.to_owned(),
            patient_id: None,
            content_sha256: hex::encode(Sha256::digest(json.as_bytes())),
            content: String::new(),
        },
        patient: None,
        conditions: Vec::new(),
        observations: Vec::new(),
        encounter: None,
        medications: Vec::new(),
        consent: None,
    };
    match ty {
        "Patient" => {
            let p: Patient = parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            indexed.patient = Some(PatientRow {
                id: id.to_owned(),
                gender: p
                    .gender
                    .map(|g| g.as_ref().to_owned())
                    .unwrap_or_else(|| "unknown".to_owned()),
                birth_ymd: p.birth_date.as_ref().map(date_ymd),
                link_token,
            });
            indexed.resource.patient_id = Some(id.to_owned());
        }
        "Condition" => {
            let c: Condition = parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            let patient = patient_of(Some(&c.subject)).ok_or_else(|| {
                invalid("Condition.subject is not a Patient reference".to_owned())
            })?;
            // Refuted and mistaken diagnoses are kept but never counted.
            let excluded = c.verification_status.as_ref().is_some_and(|s| {
                codes(s).any(|(_, code)| code == "refuted" || code == "entered-in-error")
            });
            let onset_at = match &c.onset {
                Some(ConditionOnset::DateTime(dt)) => Some(date_time_unix(dt)),
                Some(ConditionOnset::Period(p)) => p.start.as_ref().map(date_time_unix),
                _ => None,
            };
            let recorded_at = c.recorded_date.as_ref().map(date_time_unix);
            if let Some(code) = &c.code {
                code_systems = systems_of(code);
            }
            if !excluded && let Some(code) = &c.code {
                let row = |system: String, code: String| ConditionCode {
                    condition_id: id.to_owned(),
                    patient_id: patient.clone(),
                    system,
                    code,
                    onset_at,
                    recorded_at,
                };
                // SNOMED CT diagnoses also count under the KCD-8 code the
                // hospital mapped them to, but only when every coding outside
                // the ICD-10 family is mapped: a mapped row would otherwise
                // decide the diagnosis's sensitive categories alone and hide
                // what an unmapped coding may say (which fails closed).
                let all_mapped = normalized_codes(code).all(|(system, code)| {
                    terminology::icd10_family(&system) || ctx.to_kcd.contains_key(&(system, code))
                });
                for (system, code) in normalized_codes(code) {
                    let mapped = all_mapped
                        .then(|| ctx.to_kcd.get(&(system.clone(), code.clone())))
                        .flatten();
                    for target in mapped.into_iter().flatten() {
                        indexed
                            .conditions
                            .push(row(KCD8.to_owned(), target.clone()));
                    }
                    indexed.conditions.push(row(system, code));
                }
                indexed
                    .conditions
                    .sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
                indexed
                    .conditions
                    .dedup_by(|a, b| a.system == b.system && a.code == b.code);
            }
            indexed.resource.patient_id = Some(patient);
        }
        "Observation" => {
            let o: Observation = parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            let patient = patient_of(o.subject.as_ref()).ok_or_else(|| {
                invalid("Observation.subject is not a Patient reference".to_owned())
            })?;
            code_systems = systems_of(&o.code);
            let status = o.status.as_ref();
            if status != "entered-in-error" && status != "cancelled" {
                let effective_at = match &o.effective {
                    Some(ObservationEffective::DateTime(dt)) => Some(date_time_unix(dt)),
                    Some(ObservationEffective::Instant(i)) => Some(i.0.unix_timestamp()),
                    Some(ObservationEffective::Period(p)) => p.start.as_ref().map(date_time_unix),
                    _ => None,
                };
                let value = match &o.value {
                    Some(ObservationValue::Quantity(q)) => quantity(q),
                    _ => (None, None),
                };
                let mut rows = Vec::new();
                let mut push =
                    |concept: &CodeableConcept, (value, unit): (Option<f64>, Option<String>)| {
                        for (system, code) in normalized_codes(concept) {
                            // Local lab codes also count under the LOINC code
                            // the hospital mapped them to.
                            if let Some(targets) = ctx.to_loinc.get(&(system.clone(), code.clone()))
                            {
                                for target in targets {
                                    rows.push(ObsRow {
                                        observation_id: id.to_owned(),
                                        patient_id: patient.clone(),
                                        system: LOINC.to_owned(),
                                        code: target.clone(),
                                        value,
                                        unit: unit.clone(),
                                        effective_at,
                                    });
                                }
                            }
                            rows.push(ObsRow {
                                observation_id: id.to_owned(),
                                patient_id: patient.clone(),
                                system,
                                code,
                                value,
                                unit: unit.clone(),
                                effective_at,
                            });
                        }
                    };
                push(&o.code, value);
                for component in o.component.iter().flatten() {
                    let value = match &component.value {
                        Some(ObservationComponentValue::Quantity(q)) => quantity(q),
                        _ => (None, None),
                    };
                    push(&component.code, value);
                }
                rows.sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
                rows.dedup_by(|a, b| a.system == b.system && a.code == b.code);
                indexed.observations = rows;
            }
            indexed.resource.patient_id = Some(patient);
        }
        "Encounter" => {
            let e: Encounter = parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            let patient = patient_of(e.subject.as_ref());
            if let Some(patient) = &patient {
                let period = e.period.as_ref();
                indexed.encounter = Some(EncounterRow {
                    encounter_id: id.to_owned(),
                    patient_id: patient.clone(),
                    class_code: e.class.code.clone().unwrap_or_default(),
                    start_at: period.and_then(|p| p.start.as_ref()).map(date_time_unix),
                    end_at: period.and_then(|p| p.end.as_ref()).map(date_time_unix),
                });
            }
            indexed.resource.patient_id = patient;
        }
        "MedicationRequest" => {
            let m: MedicationRequest =
                parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            let patient = patient_of(Some(&m.subject)).ok_or_else(|| {
                invalid("MedicationRequest.subject is not a Patient reference".to_owned())
            })?;
            if let MedicationRequestMedication::CodeableConcept(concept) = &m.medication {
                code_systems = systems_of(concept);
                let authored_at = m.authored_on.as_ref().map(date_time_unix);
                indexed.medications = normalized_codes(concept)
                    .map(|(system, code)| MedicationCode {
                        medication_request_id: id.to_owned(),
                        patient_id: patient.clone(),
                        system,
                        code,
                        authored_at,
                    })
                    .collect();
                indexed
                    .medications
                    .sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
                indexed
                    .medications
                    .dedup_by(|a, b| a.system == b.system && a.code == b.code);
            }
            indexed.resource.patient_id = Some(patient);
        }
        "Consent" => {
            let c: Consent = parse(&value, shown, ctx, &mut let_through).map_err(invalid)?;
            let patient = patient_of(c.patient.as_ref())
                .ok_or_else(|| invalid("Consent.patient is not a Patient reference".to_owned()))?;
            let mut record = crate::consent::record_of(&c, date_time_unix, ctx.imported_at);
            // A provision naming a mapped SNOMED CT code names its KCD-8
            // code too, so that it governs requests in KCD-8 as the mapped
            // rows answer them.
            if let Some(provision) = &mut record.provision {
                translate_codes(provision, Rule::Deny, &ctx.to_kcd);
            }
            let decision = record
                .provision
                .as_ref()
                .and_then(|p| p.rule)
                .map_or("deny", |rule| match rule {
                    crate::consent::Rule::Permit => "permit",
                    crate::consent::Rule::Deny => "deny",
                });
            indexed.consent = Some(ConsentRow {
                consent_id: id.to_owned(),
                patient_id: patient.clone(),
                status: record.status.clone(),
                scope: record.scope.clone(),
                decision: decision.to_owned(),
                recorded_at: record.recorded_at,
                provision: serde_json::to_string(&record.provision).expect("provisions serialise"),
            });
            indexed.resource.patient_id = Some(patient);
        }
        _ => {
            parse::<Resource>(&value, shown, ctx, &mut let_through).map_err(invalid)?;
        }
    }
    indexed.resource.content = json;
    Ok(Validated {
        indexed,
        rrn_stripped,
        let_through,
        code_systems,
    })
}

/// Adds to each deny provision the KCD-8 codes its codes map to, so that
/// it governs KCD-8 requests the mapped rows answer. A permit is left as
/// written: a map from a narrow concept to a broad KCD-8 code would widen
/// what the patient permitted. `parent` is the rule a provision without
/// its own inherits (a root without one is read as a deny: adding codes to
/// a deny only narrows).
fn translate_codes(
    provision: &mut crate::consent::Provision,
    parent: Rule,
    to_kcd: &HashMap<(String, String), Vec<String>>,
) {
    let rule = provision.rule.unwrap_or(parent);
    for child in &mut provision.provisions {
        translate_codes(child, rule, to_kcd);
    }
    if rule != Rule::Deny {
        return;
    }
    let mapped: Vec<(String, String)> = provision
        .codes
        .iter()
        .flat_map(|key| to_kcd.get(key).into_iter().flatten())
        .map(|kcd| (KCD8.to_owned(), kcd.clone()))
        .collect();
    for code in mapped {
        if !provision.codes.contains(&code) {
            provision.codes.push(code);
        }
    }
}

/// The distinct canonical systems of a concept's codings.
fn systems_of(concept: &CodeableConcept) -> Vec<String> {
    let mut systems: Vec<String> = normalized_codes(concept).map(|(s, _)| s).collect();
    systems.sort();
    systems.dedup();
    systems
}

/// Deserialises a resource into its fhir-model type and checks it against
/// the format (`conformance`): a departure rejects it unless the node is
/// lenient, which lets it through and records where.
fn parse<T: DeserializeOwned + Serialize>(
    input: &Value,
    ty: &str,
    ctx: &IndexContext,
    let_through: &mut Vec<Finding>,
) -> Result<T, String> {
    let bad = |e: serde_json::Error| format!("invalid {ty}: {}", redact(&e.to_string()));
    let typed = T::deserialize(input).map_err(bad)?;
    let round_trip = serde_json::to_value(&typed).map_err(bad)?;
    let findings = conformance::check(ty, input, &round_trip);
    if !findings.is_empty() {
        if !ctx.lenient {
            return Err(format!("invalid {ty}: {}", conformance::reason(&findings)));
        }
        let_through.extend(findings);
    }
    Ok(typed)
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn codes(concept: &CodeableConcept) -> impl Iterator<Item = (&str, &str)> {
    concept
        .coding
        .iter()
        .flatten()
        .filter_map(|c| Some((c.system.as_deref()?, c.code.as_deref()?)))
}

/// Codes with canonical systems and normalised spelling, as indexed.
fn normalized_codes(concept: &CodeableConcept) -> impl Iterator<Item = (String, String)> + '_ {
    codes(concept).map(|(system, code)| {
        let system = terminology::canonical_system(system);
        (
            system.to_owned(),
            terminology::normalize_code(system, code).into_owned(),
        )
    })
}

fn quantity(q: &Quantity) -> (Option<f64>, Option<String>) {
    (q.value, q.code.clone().or_else(|| q.unit.clone()))
}

/// A FHIR date as the integer YYYYMMDD. Partial dates take the middle of
/// their range, so ages computed from them are off by at most half a year.
fn date_ymd(date: &Date) -> i64 {
    match date {
        Date::Year(y) => i64::from(*y) * 10000 + 701,
        Date::YearMonth(y, m) => i64::from(*y) * 10000 + i64::from(u8::from(*m)) * 100 + 15,
        Date::Date(d) => {
            i64::from(d.year()) * 10000 + i64::from(u8::from(d.month())) * 100 + i64::from(d.day())
        }
    }
}

pub(crate) fn date_time_unix(dt: &DateTime) -> i64 {
    match dt {
        DateTime::DateTime(instant) => instant.0.unix_timestamp(),
        DateTime::Date(date) => {
            let ymd = date_ymd(date);
            let d = time::Date::from_calendar_date(
                (ymd / 10000) as i32,
                time::Month::try_from(((ymd / 100) % 100) as u8).unwrap_or(time::Month::January),
                (ymd % 100) as u8,
            )
            .unwrap_or(time::Date::MIN);
            d.midnight().assume_utc().unix_timestamp()
        }
    }
}

/// Removes values taken from the input from a parser error message, keeping
/// field names and the lists of allowed values that make it useful.
pub(crate) fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[start] as char;
        let (before, after) = rest.split_at(start);
        out.push_str(before);
        let Some(len) = after[1..].find(quote) else {
            out.push_str(after);
            rest = "";
            break;
        };
        let inner = &after[1..=len];
        let keep = quote == '`' && (out.ends_with("field ") || out.contains("expected"));
        out.push(quote);
        out.push_str(if keep { inner } else { "…" });
        out.push(quote);
        rest = &after[len + 2..];
    }
    out.push_str(rest);
    // fhir-model's code parsers say "Unknown value: <value>".
    while let Some(pos) = out.find("Unknown value: ") {
        let value_start = pos + "Unknown value: ".len();
        let value_end = out[value_start..]
            .find(" at line")
            .map(|e| value_start + e)
            .unwrap_or(out.len());
        out.replace_range(pos..value_end, "unknown code value …");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(json: &str) -> Result<Validated, Invalid> {
        index_resource(json, &IndexContext::default())
    }

    #[test]
    fn redaction_keeps_field_names_and_allowed_values_but_drops_data() {
        assert_eq!(
            redact("invalid type: string \"Kim Minji\", expected f64 at line 1 column 9"),
            "invalid type: string \"…\", expected f64 at line 1 column 9"
        );
        assert_eq!(
            redact("missing field `subject` at line 1 column 20"),
            "missing field `subject` at line 1 column 20"
        );
        assert_eq!(
            redact("unknown variant `900101-1234567`, expected one of `a`, `b`"),
            "unknown variant `…`, expected one of `a`, `b`"
        );
        assert_eq!(
            redact("Unknown value: robot at line 1 column 40"),
            "unknown code value … at line 1 column 40"
        );
    }

    #[test]
    fn a_patient_is_indexed_with_gender_and_birth_date() {
        let json =
            r#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1970-06-15"}"#;
        let patient = index(json).unwrap().indexed.patient.unwrap();
        assert_eq!(
            (patient.gender.as_str(), patient.birth_ymd),
            ("female", Some(19700615))
        );
    }

    #[test]
    fn invalid_resources_are_named_without_their_values() {
        let err = index(r#"{"resourceType":"Patient","id":"p1","gender":"robot"}"#).unwrap_err();
        assert!(
            err.reason
                .starts_with("invalid Patient: unknown code value …"),
            "{}",
            err.reason
        );
        assert!(!err.reason.contains("robot"));
        let json = r#"{"resourceType":"Condition","id":"c1","code":{"coding":[{"system":"urn:x","code":"E11"}]}}"#;
        assert!(
            index(json)
                .unwrap_err()
                .reason
                .contains("missing field `subject`")
        );
        assert!(
            index(r#"{"resourceType":"Patient"}"#)
                .unwrap_err()
                .reason
                .contains("no valid id")
        );
    }

    #[test]
    fn kcd_codes_are_indexed_normalised_with_onset() {
        let json = r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p1"},
            "code":{"coding":[{"system":"http://www.hl7korea.or.kr/fhir/krcore/CodeSystem/kostat-kcd-8","code":"e11.9"}]},
            "onsetDateTime":"2020-01-01"}"#;
        let c = &index(json).unwrap().indexed.conditions[0];
        assert_eq!(
            (c.system.as_str(), c.code.as_str()),
            (terminology::KCD8, "E119")
        );
        assert_eq!(c.onset_at, Some(1_577_836_800));
    }

    #[test]
    fn observation_components_and_mapped_edi_codes_are_indexed() {
        let json = r#"{"resourceType":"Observation","id":"o1","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},
            "subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-03-01T09:00:00+09:00",
            "component":[
              {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":128,"code":"mm[Hg]"}},
              {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},"valueQuantity":{"value":82,"code":"mm[Hg]"}}]}"#;
        let indexed = index(json).unwrap().indexed;
        let got: Vec<_> = indexed
            .observations
            .iter()
            .map(|o| (o.code.as_str(), o.value))
            .collect();
        assert_eq!(
            got,
            [
                ("8462-4", Some(82.0)),
                ("8480-6", Some(128.0)),
                ("85354-9", None)
            ]
        );

        let edi = r#"{"resourceType":"Observation","id":"o2","status":"final",
            "code":{"coding":[{"system":"http://www.hl7korea.or.kr/CodeSystem/hira-edi-procedure","code":"C3825"}]},
            "subject":{"reference":"Patient/p1"},"valueQuantity":{"value":6.9,"code":"%"}}"#;
        let mut ctx = IndexContext::default();
        ctx.to_loinc.insert(
            (terminology::HIRA_EDI.to_owned(), "C3825".to_owned()),
            vec!["4548-4".to_owned()],
        );
        let indexed = index_resource(edi, &ctx).unwrap().indexed;
        let got: Vec<_> = indexed
            .observations
            .iter()
            .map(|o| (o.system.as_str(), o.code.as_str(), o.value))
            .collect();
        assert_eq!(
            got,
            [
                (LOINC, "4548-4", Some(6.9)),
                (terminology::HIRA_EDI, "C3825", Some(6.9))
            ]
        );
    }

    #[test]
    fn departures_from_the_format_are_rejected_with_path_and_rule_unless_lenient() {
        // Issue 40: each of these was stored before.
        let cases = [
            (
                r#"{"resourceType":"Patient","id":"p1","brithDate":"1970-01-01"}"#,
                "Patient.brithDate: unknown element",
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","identifier":[{"identifer":"x","value":"1"}]}"#,
                "Patient.identifier[0].identifer: unknown element",
            ),
            (
                r#"{"resourceType":"MedicationAdministration","id":"m1","status":"completed",
                   "medicationCodeableConcept":{"text":"x"},"subject":{"reference":"Patient/p1"},
                   "effectiveDateTime":"2025-01-01","dosage":{"timing":{"code":{"text":"BID"}}}}"#,
                "MedicationAdministration.dosage.timing: unknown element",
            ),
            (
                r#"{"resourceType":"Patient","id":"p1","birthDate":"2025-13-45"}"#,
                "invalid Patient",
            ),
            (
                r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p1"},
                   "code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":""}]}}"#,
                "Condition.code.coding[0].code: empty value",
            ),
            (
                r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},
                   "subject":{"reference":"Patient/p1"},"effectiveDateTime":"20251"}"#,
                "invalid Observation",
            ),
        ];
        for (json, expected) in cases {
            let err = index(json).expect_err(expected);
            assert!(err.reason.contains(expected), "{expected}: {}", err.reason);
            let lenient = IndexContext {
                lenient: true,
                ..IndexContext::default()
            };
            // Lenient mode lets through what the types can hold, and says where.
            if !expected.starts_with("invalid") {
                let validated = index_resource(json, &lenient).expect(expected);
                assert!(
                    validated.let_through[0]
                        .to_string()
                        .contains(expected.split(':').next().unwrap()),
                    "{expected}"
                );
            }
        }
        // Extensions, primitive extensions and contained resources are known.
        let fine = r#"{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1970-06",
            "_birthDate":{"extension":[{"url":"urn:x","valueString":"estimated"}]},
            "extension":[{"url":"urn:y","valueCodeableConcept":{"coding":[{"system":"urn:s","code":"a"}]}}],
            "contained":[{"resourceType":"Organization","id":"o","name":"Chosun"}],
            "name":[{"given":["A","B"],"family":"Kim"}],
            "meta":{"lastUpdated":"2025-03-01T09:00:00.123+09:00"}}"#;
        let validated = index(fine).unwrap();
        assert!(validated.let_through.is_empty());
    }

    #[test]
    fn snomed_diagnoses_count_under_their_mapped_kcd_code() {
        let json = r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p1"},
            "code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}]}}"#;
        let mut ctx = IndexContext::default();
        ctx.to_kcd.insert(
            (terminology::SNOMED.to_owned(), "44054006".to_owned()),
            vec!["E11".to_owned()],
        );
        let validated = index_resource(json, &ctx).unwrap();
        let got: Vec<_> = validated
            .indexed
            .conditions
            .iter()
            .map(|c| (c.system.as_str(), c.code.as_str()))
            .collect();
        assert_eq!(got, [(terminology::SNOMED, "44054006"), (KCD8, "E11")]);
        assert_eq!(validated.code_systems, [terminology::SNOMED]);
    }

    #[test]
    fn rrn_identifiers_never_reach_the_stored_content() {
        let json = r#"{"resourceType":"Patient","id":"p1","identifier":[{"system":"http://www.hl7korea.or.kr/Identifier/rrn","value":"900101-1234567"}],"gender":"male"}"#;
        let validated = index(json).unwrap();
        assert_eq!(validated.rrn_stripped, ["Patient.identifier[0]"]);
        assert!(!validated.indexed.resource.content.contains("900101"));
    }
}
