//! The exchange at the node: from a resident's signed request to the
//! records this hospital may send to the recipient they chose.
//!
//! The node decides from its own files: the identity service's keys it
//! pins (`[exchange] identity_keys`), the federation CA for the recipient,
//! the patient's own Consents (a `patient-privacy` permit naming the
//! recipient for the purpose; sensitive categories only where named) and
//! the types it sends. "No such patient" and "no consent" give one answer,
//! [`Answer::Nothing`], which the api sends as one end part padded like
//! any other. Resources are read from the store as imported (the RRN was
//! never stored), filtered by the request's scope, and a resource with a
//! coding in a sensitive category the consent does not name is left out,
//! with every resource that refers to one left out.

use std::collections::{BTreeSet, HashMap};

use ghx_exchange::request::{Claims, IdentityKeys, Kind};
use ghx_exchange::scope::Scope;
use serde_json::{Value, json};

use crate::classify::{Classify, Code};
use crate::config::ExchangeSettings;
use crate::consent::{self, CategorySet, ConsentRequest, ConsentRules, Exclusion};
use crate::store::{self, Store};
use crate::terminology;

/// Why a request is refused: nothing is read of any patient then.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("this hospital takes no exchange requests (no identity service keys are configured)")]
    Off,
    #[error(transparent)]
    Request(#[from] ghx_exchange::request::Error),
    #[error("the recipient's key: {0}")]
    RecipientKey(#[from] ghx_exchange::keys::Error),
    #[error("this hospital does not send {0} resources through the exchange")]
    TypeNotSent(String),
    #[error(
        "the recipient's key is not the one the signed request names for it: nothing is sealed to it"
    )]
    KeyNotInRequest,
    #[error("the request `{0}` was already used: each request is answered once")]
    Replayed(String),
    #[error(
        "the answer would exceed what this hospital sends at once ({max_resources} resources, {max_bytes} bytes): narrow the period or types"
    )]
    Oversize { max_resources: u64, max_bytes: u64 },
    #[error("storage: {0}")]
    Store(#[from] store::Error),
    #[error("a stored consent could not be read: {0}")]
    Consent(#[from] consent::eligibility::Error),
}

impl Classify for Refusal {
    fn code(&self) -> Code {
        match self {
            Refusal::Off => Code::FailedPrecondition,
            Refusal::Request(ghx_exchange::request::Error::Scope(_))
            | Refusal::Request(ghx_exchange::request::Error::TooLong(_))
            | Refusal::Request(ghx_exchange::request::Error::Purpose(_))
            | Refusal::Request(ghx_exchange::request::Error::Resident)
            | Refusal::TypeNotSent(_) => Code::InvalidArgument,
            Refusal::Request(_) | Refusal::RecipientKey(_) | Refusal::KeyNotInRequest => {
                Code::PermissionDenied
            }
            Refusal::Replayed(_) => Code::AlreadyExists,
            Refusal::Oversize { .. } => Code::ResourceExhausted,
            Refusal::Store(_) | Refusal::Consent(_) => Code::Internal,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Refusal::Store(_) | Refusal::Consent(_) => "internal",
            _ => "exchange",
        }
    }
}

/// A request whose signature, recipient and limits check out.
pub struct Admitted {
    pub claims: Claims,
    pub scope: Scope,
    /// The recipient's HPKE public key, as its certificate vouches.
    pub recipient_key: [u8; 32],
}

/// Checks a request before anything of the resident is read: the identity
/// service's signature and claims, the recipient's key statement under a
/// recipient certificate, the types asked, and that the request is new.
pub fn admit(
    settings: &ExchangeSettings,
    identity: &IdentityKeys,
    members: &ghx_pki::signed::MemberKeys,
    store: &Store,
    hospital: &str,
    token: &str,
    key: &ghx_exchange::keys::SignedKey,
) -> Result<Admitted, Refusal> {
    if identity.is_empty() {
        return Err(Refusal::Off);
    }
    let (claims, scope) = identity.verify(token, hospital)?;
    let recipient_key = key.verify(members, &claims.recipient)?;
    if !hex::encode(recipient_key).eq_ignore_ascii_case(&claims.recipient_key) {
        return Err(Refusal::KeyNotInRequest);
    }
    if let Some(t) = scope
        .types
        .iter()
        .find(|t| !settings.types.iter().any(|s| s == *t))
    {
        return Err(Refusal::TypeNotSent(t.clone()));
    }
    if !store.record_capability_use(&format!("exchange:{}", claims.jti), "exchange", claims.exp)? {
        return Err(Refusal::Replayed(claims.jti.clone()));
    }
    Ok(Admitted {
        claims,
        scope,
        recipient_key,
    })
}

/// What the node answers an admitted request.
#[derive(Debug)]
pub enum Answer {
    /// No such patient, or no consent: one answer for both. The reason
    /// stays in the hospital's own audit log.
    Nothing {
        why: String,
    },
    Records(Records),
}

/// The resources to send, and what to check again while sending.
#[derive(Debug)]
pub struct Records {
    pub patient: String,
    /// The Patient first.
    pub resources: Vec<Value>,
    pub bytes: u64,
    /// Resources the consent or sensitivity kept back.
    pub withheld: usize,
    /// The consent question, asked again between parts.
    pub request: ConsentRequest,
}

/// Finds the resident and decides what may be sent.
pub fn prepare(
    store: &Store,
    rules: &ConsentRules,
    settings: &ExchangeSettings,
    hospital: (&str, &str),
    admitted: &Admitted,
    now: i64,
) -> Result<Answer, Refusal> {
    let claims = &admitted.claims;
    let patient = match (
        &claims.resident.link_token,
        claims.resident.patients.get(hospital.0),
    ) {
        (Some(token), _) => match store.patients_with_token(token)?.as_slice() {
            [one] => one.clone(),
            [] => return Ok(nothing("no patient has this linkage token")),
            _ => return Ok(nothing("several patients have this linkage token")),
        },
        (None, Some(id)) if store.has_patient(id)? => id.clone(),
        _ => return Ok(nothing("no such patient")),
    };
    let request = consent_request(claims, &admitted.scope, now);
    let disclosure = match permitted(store, rules, &patient, &request)? {
        Ok(d) => d,
        Err(why) => return Ok(nothing(&format!("consent: {}", why.describe()))),
    };
    if disclosure.classes.is_empty() {
        return Ok(nothing("consent: permits none of the types asked"));
    }
    let (resources, withheld) = match claims.kind {
        Kind::Records => select(store, rules, &patient, &admitted.scope, &request)?,
        Kind::History => (history(store, &patient, hospital)?, 0),
    };
    let bytes: u64 = resources.iter().map(|r| r.to_string().len() as u64).sum();
    if resources.len() as u64 > settings.max_resources || bytes > settings.max_bytes {
        return Err(Refusal::Oversize {
            max_resources: settings.max_resources,
            max_bytes: settings.max_bytes,
        });
    }
    Ok(Answer::Records(Records {
        patient,
        resources,
        bytes,
        withheld,
        request,
    }))
}

fn nothing(why: &str) -> Answer {
    Answer::Nothing {
        why: why.to_owned(),
    }
}

/// The consent question of a request: the recipient, the purpose, the
/// types, the codes the scope names, now.
fn consent_request(claims: &Claims, scope: &Scope, now: i64) -> ConsentRequest {
    let classes = match claims.kind {
        Kind::Records => scope.types.clone(),
        // The history of disclosures is the patient's, about the Patient.
        Kind::History => vec!["Patient".to_owned()],
    };
    let codes = scope
        .codes
        .iter()
        .filter_map(|t| {
            let system = terminology::canonical_system(t.system.as_deref()?);
            let code = t.code.as_deref()?;
            Some((
                system.to_owned(),
                terminology::normalize_code(system, code).into_owned(),
                false,
            ))
        })
        .collect();
    ConsentRequest {
        purpose: claims.purpose.clone(),
        classes,
        codes,
        recipient: Some(claims.recipient.clone()),
        at: now,
        last: now,
    }
}

/// The patient's consent decision for `request`, read now.
pub fn permitted(
    store: &Store,
    rules: &ConsentRules,
    patient: &str,
    request: &ConsentRequest,
) -> Result<Result<consent::Disclosure, Exclusion>, Refusal> {
    let records = consent_records(store, patient)?;
    Ok(consent::evaluate_disclosure(rules, &records, request))
}

fn consent_records(store: &Store, patient: &str) -> Result<Vec<consent::ConsentRecord>, Refusal> {
    Ok(store
        .patient_consents(patient)?
        .iter()
        .map(consent::eligibility::record_of_row)
        .collect::<Result<Vec<_>, _>>()?)
}

/// The patient's resources the scope selects and the consent permits.
///
/// Consent is asked per resource, with its type and its own codes, so a
/// deny naming a code and a permit opening one sensitive code apply to
/// exactly the resources they name. Every resource of the patient (in
/// scope or not) that may not be sent marks what refers to it, to a
/// fixpoint: a resource that refers to one withheld would say it exists.
fn select(
    store: &Store,
    rules: &ConsentRules,
    patient: &str,
    scope: &Scope,
    base: &ConsentRequest,
) -> Result<(Vec<Value>, usize), Refusal> {
    let records = consent_records(store, patient)?;
    let mut chosen: Vec<(String, Value)> = Vec::new();
    let mut withheld_labels: BTreeSet<String> = BTreeSet::new();
    let mut decided: HashMap<DecisionKey, Option<CategorySet>> = HashMap::new();
    let mut withheld = 0;
    for row in store.patient_resources(patient)? {
        let label = format!("{}/{}", row.resource_type, row.id);
        let Ok(resource) = serde_json::from_str::<Value>(&row.content) else {
            withheld_labels.insert(label);
            continue;
        };
        let codings = canonical_codings(&resource);
        let permitted = *decided
            .entry((row.resource_type.clone(), codings.clone()))
            .or_insert_with(|| {
                let request = ConsentRequest {
                    classes: vec![row.resource_type.clone()],
                    codes: codings
                        .iter()
                        .map(|(s, c)| (s.clone(), c.clone(), false))
                        .collect(),
                    ..base.clone()
                };
                consent::evaluate_disclosure(rules, &records, &request)
                    .ok()
                    .filter(|d| d.classes.contains(&row.resource_type))
                    .map(|d| d.sensitive)
            });
        let sendable = permitted
            .is_some_and(|categories| sensitivity_permits(&rules.sensitive, &resource, categories));
        let in_scope = row.resource_type == "Patient" || scope.types.contains(&row.resource_type);
        let stored_at = ghx_exchange::scope::instant_range(&row.last_updated).map(|(s, _)| s);
        let asked = in_scope && scope.selects(&resource, stored_at);
        if !sendable {
            withheld_labels.insert(label);
            if asked {
                withheld += 1;
            }
        } else if asked {
            chosen.push((label, resource));
        }
    }
    loop {
        let before = chosen.len();
        chosen.retain(|(label, resource)| {
            let mut refers = false;
            ghx_exchange::receive::walk_references(resource, &mut |r| {
                refers |= withheld_labels.contains(r);
            });
            if refers {
                withheld_labels.insert(label.clone());
            }
            !refers
        });
        withheld += before - chosen.len();
        if chosen.len() == before {
            break;
        }
    }
    let mut kept: Vec<Value> = chosen.into_iter().map(|(_, r)| r).collect();
    kept.sort_by_key(|r| r.get("resourceType").and_then(Value::as_str) != Some("Patient"));
    Ok((kept, withheld))
}

/// What a per-resource consent decision depends on: the type and codes.
type DecisionKey = (String, Vec<(String, String)>);

/// A resource's codings, canonical system and normalised code, sorted.
fn canonical_codings(resource: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk_codings(resource, &mut |system, code| {
        let system = terminology::canonical_system(system);
        out.push((
            system.to_owned(),
            terminology::normalize_code(system, code).into_owned(),
        ));
    });
    out.sort();
    out.dedup();
    out
}

/// Whether every sensitive category a resource falls in is one the
/// consent names: from its codings, and its `meta.security` labels. What
/// cannot be classified is taken as in every category (sent only when the
/// consent names them all): a Condition with no ICD-10-family coding, an
/// Observation with no LOINC coding, a MedicationRequest with no ATC one.
fn sensitivity_permits(
    codes: &consent::SensitiveCodes,
    resource: &Value,
    permitted: CategorySet,
) -> bool {
    let mut categories = CategorySet::default();
    let (mut icd10, mut loinc, mut atc) = (false, false, false);
    for (system, code) in canonical_codings(resource) {
        icd10 |= terminology::icd10_family(&system);
        loinc |= system == terminology::LOINC;
        atc |= consent::sensitive::is_atc(&system);
        if let Some(c) = codes.category(&system, &code) {
            categories.insert(c);
        }
        for c in codes.observation_categories_touched(&system, &code) {
            categories.insert(c);
        }
        for c in codes.medication_categories_touched(&system, &code, false) {
            categories.insert(c);
        }
    }
    for label in resource
        .pointer("/meta/security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(system), Some(code)) = (
            label.get("system").and_then(Value::as_str),
            label.get("code").and_then(Value::as_str),
        ) && let Some(c) = consent::Category::from_label(system, code)
        {
            categories.insert(c);
        }
    }
    let unclassified = match resource.get("resourceType").and_then(Value::as_str) {
        Some("Condition") => !icd10,
        Some("Observation") => !loinc,
        Some("MedicationRequest") => !atc,
        _ => false,
    };
    if unclassified {
        categories = CategorySet::all();
    }
    categories.minus(permitted).0 == 0
}

/// Calls `f` with every (system, code) of every Coding in a resource.
fn walk_codings(value: &Value, f: &mut impl FnMut(&str, &str)) {
    match value {
        Value::Object(map) => {
            if let (Some(Value::String(system)), Some(Value::String(code))) =
                (map.get("system"), map.get("code"))
            {
                f(system, code);
            }
            map.values().for_each(|v| walk_codings(v, f));
        }
        Value::Array(list) => list.iter().for_each(|v| walk_codings(v, f)),
        _ => {}
    }
}

/// The patient's disclosure history as FHIR AuditEvents.
fn history(store: &Store, patient: &str, hospital: (&str, &str)) -> Result<Vec<Value>, Refusal> {
    Ok(store
        .disclosures_of(patient)?
        .into_iter()
        .enumerate()
        .map(|(k, d)| {
            json!({
                "resourceType": "AuditEvent",
                "id": format!("disclosure-{}", k + 1),
                "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export"},
                "recorded": d.disclosed_at,
                "outcome": if d.outcome == "sent" { "0" } else { "4" },
                "outcomeDesc": d.outcome,
                "purposeOfEvent": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": d.purpose}]}],
                "agent": [{
                    "who": {"identifier": {"system": ghx_exchange::RECIPIENT_SYSTEM, "value": d.recipient}},
                    "requestor": false,
                }],
                "source": {"observer": {"identifier": {"system": ghx_exchange::HOSPITAL_SYSTEM, "value": hospital.0}, "display": hospital.1}},
                "entity": [{
                    "what": {"reference": format!("Patient/{patient}")},
                    "description": format!("{} resources ({}); request {}", d.resources, d.scope, d.request_id),
                }],
            })
        })
        .collect())
}
