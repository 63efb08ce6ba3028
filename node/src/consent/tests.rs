//! Consent decision table: each case is a patient's Consent resources (FHIR
//! JSON, parsed as import parses them) and a request; the table of outcomes
//! is a snapshot a privacy officer can read.

use expect_test::expect;
use fhir_model::r4b::resources::Consent;
use serde_json::{Value, json};

use super::*;

/// 2026-06-01T00:00:00Z, when every request in the table is evaluated.
const NOW: i64 = 1_780_272_000;

fn consent(status: &str, date: &str, provision: Value) -> ConsentRecord {
    let resource = json!({
        "resourceType": "Consent",
        "id": "c",
        "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": "Patient/p"},
        "dateTime": date,
        "provision": provision,
    });
    let parsed: Consent = serde_json::from_value(resource).expect("valid Consent");
    record_of(&parsed, crate::import::index::date_time_unix, NOW)
}

fn privacy(provision: Value) -> ConsentRecord {
    let mut record = consent("active", "2026-01-01T00:00:00Z", provision);
    record.scope = "patient-privacy".to_owned();
    record
}

fn purpose(code: &str) -> Value {
    json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": code}])
}

fn request(purpose: &str, classes: &[&str]) -> ConsentRequest {
    ConsentRequest {
        recipient: None,
        purpose: purpose.to_owned(),
        classes: classes.iter().map(|c| (*c).to_owned()).collect(),
        codes: vec![(terminology::KCD8.to_owned(), "E11".to_owned(), true)],
        at: NOW,
        last: NOW,
    }
}

/// A research request reading `codes` (KCD-8, normalised) instead of E11*.
fn reading(codes: &[(&str, bool)]) -> ConsentRequest {
    ConsentRequest {
        recipient: None,
        codes: codes
            .iter()
            .map(|(code, prefix)| (terminology::KCD8.to_owned(), (*code).to_owned(), *prefix))
            .collect(),
        ..request("HRESCH", &["Patient", "Condition"])
    }
}

/// A Consent as `consent` makes it, without a dateTime (and with the given
/// meta.lastUpdated, if any): import dates it at `NOW`.
fn undated(status: &str, last_updated: Option<&str>, provision: Value) -> ConsentRecord {
    let mut resource = json!({
        "resourceType": "Consent", "id": "c", "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": "Patient/p"},
        "provision": provision,
    });
    if let Some(at) = last_updated {
        resource["meta"] = json!({"lastUpdated": at});
    }
    let parsed: Consent = serde_json::from_value(resource).expect("valid Consent");
    record_of(&parsed, crate::import::index::date_time_unix, NOW)
}

fn rules(default: DefaultConsent) -> ConsentRules {
    ConsentRules {
        default,
        sensitive: SensitiveCodes {
            rare_disease_prefixes: vec!["E752".to_owned()],
        },
    }
}

fn outcome(o: Outcome) -> String {
    match o {
        Outcome::Included { sensitive } => {
            let names: Vec<&str> = sensitive.iter().map(Category::code).collect();
            if names.is_empty() {
                "included".to_owned()
            } else {
                format!("included, may use {}", names.join(" + "))
            }
        }
        Outcome::Excluded(why) => format!("excluded: {}", why.describe()),
    }
}

#[test]
fn consent_decision_table() {
    let research = request("HRESCH", &["Patient", "Condition"]);
    let with_obs = request("HRESCH", &["Patient", "Condition", "Observation"]);
    let marketing = request("HMARKT", &["Patient", "Condition"]);
    let permit = json!({"type": "permit", "purpose": purpose("HRESCH")});
    // Issue 38 (7): codes a permit names must cover what a request reads.
    let prefix_e1 = reading(&[("E1", true)]);
    let prefix_e11 = reading(&[("E11", true)]);
    let e11_and_f32 = reading(&[("E11", true), ("F32", true)]);
    let kcd = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
    // Naming one sensitive code opens its category only for requests
    // within the codes named.
    let prefix_f32 = reading(&[("F32", true)]);
    let prefix_f3 = reading(&[("F3", true)]);
    let f32_and_hba1c = ConsentRequest {
        recipient: None,
        codes: vec![
            (kcd.to_owned(), "F32".to_owned(), true),
            ("http://loinc.org".to_owned(), "4548-4".to_owned(), false),
        ],
        ..request("HRESCH", &["Patient", "Condition", "Observation"])
    };
    let permit_f32 = json!({"type": "permit", "purpose": purpose("HRESCH"),
        "provision": [{"type": "permit", "code": [{"coding": [{"system": kcd, "code": "F32"}]}]}]});
    let permit_e11 = json!({"type": "permit", "purpose": purpose("HRESCH"),
        "code": [{"coding": [{"system": kcd, "code": "E11"}]}]});
    let deny_e11 = json!({"type": "deny",
        "code": [{"coding": [{"system": kcd, "code": "E11"}]}]});
    // A request decided for the hour from NOW: periods ending or starting
    // within it.
    let hour = ConsentRequest {
        recipient: None,
        last: NOW + 3599,
        ..request("HRESCH", &["Patient", "Condition"])
    };
    let permit_until_half_past = json!({"type": "permit", "purpose": purpose("HRESCH"),
        "period": {"start": "2026-01-01T00:00:00Z", "end": "2026-06-01T00:30:00Z"}});
    let deny_from_half_past = json!({"type": "permit", "purpose": purpose("HRESCH"),
        "provision": [{"type": "deny", "period": {"start": "2026-06-01T00:30:00Z"}}]});
    let cases: Vec<(&str, Vec<ConsentRecord>, &ConsentRequest, DefaultConsent)> = vec![
        (
            "permit for research",
            vec![consent("active", "2026-01-01T00:00:00Z", permit.clone())],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "deny",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({"type": "deny"}),
            )],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "no consent, opt-in hospital",
            vec![],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "no consent, opt-out hospital",
            vec![],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "withdrawn by a newer inactive consent",
            vec![
                consent("active", "2026-01-01T00:00:00Z", permit.clone()),
                consent("inactive", "2026-03-01T00:00:00Z", permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "withdrawn by a newer deny",
            vec![
                consent("active", "2026-01-01T00:00:00Z", permit.clone()),
                consent("active", "2026-03-01T00:00:00Z", json!({"type": "deny"})),
            ],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "permit newer than an old deny",
            vec![
                consent("active", "2025-01-01T00:00:00Z", json!({"type": "deny"})),
                consent("active", "2026-03-01T00:00:00Z", permit.clone()),
            ],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "rejected",
            vec![consent("rejected", "2026-01-01T00:00:00Z", permit.clone())],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "draft is not consent",
            vec![consent("draft", "2026-01-01T00:00:00Z", permit.clone())],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "expired period",
            vec![consent(
                "active",
                "2024-01-01T00:00:00Z",
                json!({
            "type": "permit", "purpose": purpose("HRESCH"),
            "period": {"start": "2024-01-01", "end": "2025-12-31"}}),
            )],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "period not yet started",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit", "period": {"start": "2027-01-01"}}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "purpose mismatch",
            vec![consent("active", "2026-01-01T00:00:00Z", permit.clone())],
            &marketing,
            DefaultConsent::OptOut,
        ),
        (
            "permit without purpose covers any purpose",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({"type": "permit"}),
            )],
            &marketing,
            DefaultConsent::OptIn,
        ),
        (
            "class: conditions only, query reads observations",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
                      {"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]}),
            )],
            &with_obs,
            DefaultConsent::OptIn,
        ),
        (
            "nested deny of observations",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}]}),
            )],
            &with_obs,
            DefaultConsent::OptIn,
        ),
        (
            "nested deny of observations, query reads none",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "nested deny of the queried code",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "deny", "code": [{"coding": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E11.9"}]}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "nested deny of another code",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "deny", "code": [{"coding": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "I10"}]}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "nested permit under a root deny, for research",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "deny",
            "provision": [{"type": "permit", "purpose": purpose("HRESCH")}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "nested permit under a root deny, other purpose",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "deny",
            "provision": [{"type": "permit", "purpose": purpose("HRESCH")}]}),
            )],
            &marketing,
            DefaultConsent::OptIn,
        ),
        (
            "nested deny restricted to one actor narrows",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "deny", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"display": "Acme"}}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "permit restricted by dataPeriod does not widen",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "deny",
            "provision": [{"type": "permit", "dataPeriod": {"start": "2020-01-01"}}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: blanket permit does not permit mental health",
            vec![consent("active", "2026-01-01T00:00:00Z", permit.clone())],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permit with PSY label",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit", "purpose": purpose("HRESCH"),
            "provision": [{"type": "permit", "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permit naming codes F32 and E75.2",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "permit", "code": [{"coding": [
                {"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "F32"},
                {"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E75.2"}]}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permit naming F32, request for F32*",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                permit_f32.clone(),
            )],
            &prefix_f32,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permit naming F32, request for F3*",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                permit_f32.clone(),
            )],
            &prefix_f3,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permit naming F32, request for F32* and HbA1c",
            vec![consent("active", "2026-01-01T00:00:00Z", permit_f32)],
            &f32_and_hba1c,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: label under a provision for another purpose",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [{"type": "permit", "purpose": purpose("TREAT"), "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "sensitive: permitted then denied by label",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({
            "type": "permit",
            "provision": [
                {"type": "permit", "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}, {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]},
                {"type": "deny", "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]}]}),
            )],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "privacy consent denying research",
            vec![
                consent("active", "2026-01-01T00:00:00Z", permit.clone()),
                privacy(
                    json!({"type": "permit", "provision": [{"type": "deny", "purpose": purpose("HRESCH")}]}),
                ),
            ],
            &research,
            DefaultConsent::OptIn,
        ),
        (
            "codes: permit for E11, request for E1*",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                permit_e11.clone(),
            )],
            &prefix_e1,
            DefaultConsent::OptIn,
        ),
        (
            "codes: permit for E11, request for E11*",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                permit_e11.clone(),
            )],
            &prefix_e11,
            DefaultConsent::OptIn,
        ),
        (
            "codes: permit for E11, request for E11* and F32*",
            vec![consent("active", "2026-01-01T00:00:00Z", permit_e11)],
            &e11_and_f32,
            DefaultConsent::OptIn,
        ),
        (
            "codes: deny of E11, request for E1*",
            vec![consent("active", "2026-01-01T00:00:00Z", deny_e11)],
            &prefix_e1,
            DefaultConsent::OptOut,
        ),
        (
            "tie: withdrawal and permit at one time, withdrawal first",
            vec![
                consent("inactive", "2026-03-01T00:00:00Z", permit.clone()),
                consent("active", "2026-03-01T00:00:00Z", permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "tie: withdrawal and permit at one time, permit first",
            vec![
                consent("active", "2026-03-01T00:00:00Z", permit.clone()),
                consent("inactive", "2026-03-01T00:00:00Z", permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "tie: deny and permit at one time, permit first",
            vec![
                consent("active", "2026-03-01T00:00:00Z", permit.clone()),
                consent("active", "2026-03-01T00:00:00Z", json!({"type": "deny"})),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "undated withdrawal, lastUpdated after the permit",
            vec![
                consent("active", "2026-01-01T00:00:00Z", permit.clone()),
                undated("inactive", Some("2026-02-01T00:00:00Z"), permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "undated withdrawal, no lastUpdated: import time",
            vec![
                consent("active", "2026-01-01T00:00:00Z", permit.clone()),
                undated("inactive", None, permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "tie: nested deny and nested permit at one time",
            vec![
                consent(
                    "active",
                    "2026-03-01",
                    json!({"type": "permit", "provision": [{"type": "deny", "purpose": purpose("HRESCH")}]}),
                ),
                consent(
                    "active",
                    "2026-03-01",
                    json!({"type": "deny", "provision": [{"type": "permit", "purpose": purpose("HRESCH")}]}),
                ),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "undated permit after a dated withdrawal",
            vec![
                consent("inactive", "2025-06-01T00:00:00Z", permit.clone()),
                undated("active", None, permit.clone()),
            ],
            &research,
            DefaultConsent::OptOut,
        ),
        (
            "codes: ICD-10 deny of E11, KCD-8 request for E11*",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                json!({"type": "deny", "code": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11"}]}]}),
            )],
            &prefix_e11,
            DefaultConsent::OptOut,
        ),
        (
            "hour: permit ending within the hour",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                permit_until_half_past,
            )],
            &hour,
            DefaultConsent::OptIn,
        ),
        (
            "hour: deny starting within the hour",
            vec![consent(
                "active",
                "2026-01-01T00:00:00Z",
                deny_from_half_past,
            )],
            &hour,
            DefaultConsent::OptIn,
        ),
        (
            "privacy consent about treatment only, opt-out",
            vec![privacy(
                json!({"type": "permit", "purpose": purpose("TREAT")}),
            )],
            &research,
            DefaultConsent::OptOut,
        ),
    ];
    let mut table = String::new();
    for (name, consents, request, default) in cases {
        let default_name = match default {
            DefaultConsent::OptIn => "opt-in",
            DefaultConsent::OptOut => "opt-out",
        };
        table.push_str(&format!(
            "{name:<55} {default_name:<8} {:<7} -> {}\n",
            request.purpose,
            outcome(evaluate(&rules(default), &consents, request))
        ));
    }
    expect![[r#"
        permit for research                                     opt-in   HRESCH  -> included
        deny                                                    opt-out  HRESCH  -> excluded: consent denies this use
        no consent, opt-in hospital                             opt-in   HRESCH  -> excluded: no research consent (opt-in hospital)
        no consent, opt-out hospital                            opt-out  HRESCH  -> included
        withdrawn by a newer inactive consent                   opt-out  HRESCH  -> excluded: consent withdrawn
        withdrawn by a newer deny                               opt-in   HRESCH  -> excluded: consent denies this use
        permit newer than an old deny                           opt-in   HRESCH  -> included
        rejected                                                opt-out  HRESCH  -> excluded: consent rejected
        draft is not consent                                    opt-in   HRESCH  -> excluded: no research consent (opt-in hospital)
        expired period                                          opt-out  HRESCH  -> excluded: consent period not current
        period not yet started                                  opt-in   HRESCH  -> excluded: consent period not current
        purpose mismatch                                        opt-out  HMARKT  -> excluded: consent given for other purposes
        permit without purpose covers any purpose               opt-in   HMARKT  -> included
        class: conditions only, query reads observations        opt-in   HRESCH  -> excluded: consent covers other data
        nested deny of observations                             opt-in   HRESCH  -> excluded: consent denies this use
        nested deny of observations, query reads none           opt-in   HRESCH  -> included
        nested deny of the queried code                         opt-in   HRESCH  -> excluded: consent denies this use
        nested deny of another code                             opt-in   HRESCH  -> included
        nested permit under a root deny, for research           opt-in   HRESCH  -> included
        nested permit under a root deny, other purpose          opt-in   HMARKT  -> excluded: consent denies this use
        nested deny restricted to one actor narrows             opt-in   HRESCH  -> excluded: consent denies this use
        permit restricted by dataPeriod does not widen          opt-in   HRESCH  -> excluded: consent denies this use
        sensitive: blanket permit does not permit mental health opt-in   HRESCH  -> included
        sensitive: permit with PSY label                        opt-in   HRESCH  -> included, may use mental-health
        sensitive: permit naming codes F32 and E75.2            opt-in   HRESCH  -> included, may use mental-health + rare-disease
        sensitive: permit naming F32, request for F32*          opt-in   HRESCH  -> included, may use mental-health
        sensitive: permit naming F32, request for F3*           opt-in   HRESCH  -> included
        sensitive: permit naming F32, request for F32* and HbA1c opt-in   HRESCH  -> included, may use mental-health
        sensitive: label under a provision for another purpose  opt-in   HRESCH  -> included
        sensitive: permitted then denied by label               opt-in   HRESCH  -> included, may use mental-health
        privacy consent denying research                        opt-in   HRESCH  -> excluded: consent denies this use
        codes: permit for E11, request for E1*                  opt-in   HRESCH  -> excluded: consent covers other data
        codes: permit for E11, request for E11*                 opt-in   HRESCH  -> included
        codes: permit for E11, request for E11* and F32*        opt-in   HRESCH  -> excluded: consent covers other data
        codes: deny of E11, request for E1*                     opt-out  HRESCH  -> excluded: consent denies this use
        tie: withdrawal and permit at one time, withdrawal first opt-out  HRESCH  -> excluded: consent withdrawn
        tie: withdrawal and permit at one time, permit first    opt-out  HRESCH  -> excluded: consent withdrawn
        tie: deny and permit at one time, permit first          opt-out  HRESCH  -> excluded: consent denies this use
        undated withdrawal, lastUpdated after the permit        opt-out  HRESCH  -> excluded: consent withdrawn
        undated withdrawal, no lastUpdated: import time         opt-out  HRESCH  -> excluded: consent withdrawn
        tie: nested deny and nested permit at one time          opt-out  HRESCH  -> excluded: consent denies this use
        undated permit after a dated withdrawal                 opt-out  HRESCH  -> excluded: consent withdrawn
        codes: ICD-10 deny of E11, KCD-8 request for E11*       opt-out  HRESCH  -> excluded: consent denies this use
        hour: permit ending within the hour                     opt-in   HRESCH  -> excluded: consent period not current
        hour: deny starting within the hour                     opt-in   HRESCH  -> excluded: consent denies this use
        privacy consent about treatment only, opt-out           opt-out  HRESCH  -> included
    "#]].assert_eq(&table);
}

#[test]
fn provisions_survive_storage() {
    let record = consent(
        "active",
        "2026-01-01T00:00:00+09:00",
        json!({"type": "permit", "period": {"start": "2026-01-01", "end": "2027-01-01"},
               "provision": [{"type": "deny", "class": [{"code": "Observation"}]}]}),
    );
    let stored = serde_json::to_string(&record.provision).unwrap();
    let back: Option<Provision> = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, record.provision);
    assert_eq!(record.recorded_at, 1_767_193_200);
}

/// A patient-privacy Consent naming the report service, dated `date`.
fn exchange_consent(status: &str, date: &str, extra: Value) -> ConsentRecord {
    let mut provision = json!({
        "type": "permit",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                   "reference": {"identifier": {"system": ghx_exchange::RECIPIENT_SYSTEM, "value": "report-service"}}}],
        "purpose": purpose("PATRQT"),
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        provision[k] = v.clone();
    }
    let mut record = consent(status, date, provision);
    record.scope = "patient-privacy".to_owned();
    record
}

/// The exchange asks about one resource: its type and codes.
fn disclosure(class: &str, codes: &[(&str, &str)], recipient: &str) -> ConsentRequest {
    ConsentRequest {
        recipient: Some(recipient.to_owned()),
        purpose: "PATRQT".to_owned(),
        classes: vec![class.to_owned()],
        codes: codes
            .iter()
            .map(|(s, c)| ((*s).to_owned(), (*c).to_owned(), false))
            .collect(),
        at: NOW,
        last: NOW,
    }
}

#[test]
fn a_consent_naming_a_recipient_speaks_to_the_exchange_only() {
    let rules = rules(DefaultConsent::OptOut);
    let research = consent(
        "active",
        "2025-01-01T00:00:00Z",
        json!({"type": "permit", "purpose": purpose("HRESCH")}),
    );
    let exchange = exchange_consent("active", "2025-06-01T00:00:00Z", json!({}));
    let condition = disclosure(
        "Condition",
        &[(terminology::KCD8, "E119")],
        "report-service",
    );

    // The research permit alone never discloses; the exchange consent
    // does, to the recipient it names only.
    assert_eq!(
        evaluate_disclosure(&rules, std::slice::from_ref(&research), &condition),
        Err(Exclusion::NoConsent)
    );
    assert!(evaluate_disclosure(&rules, &[research.clone(), exchange.clone()], &condition).is_ok());
    let elsewhere = disclosure("Condition", &[(terminology::KCD8, "E119")], "someone-else");
    assert_eq!(
        evaluate_disclosure(&rules, std::slice::from_ref(&exchange), &elsewhere),
        Err(Exclusion::RecipientNotNamed)
    );

    // Withdrawing the exchange consent stops the exchange, not research.
    let withdrawn = exchange_consent("inactive", "2025-09-01T00:00:00Z", json!({}));
    let all = [research.clone(), exchange.clone(), withdrawn];
    assert_eq!(
        evaluate_disclosure(&rules, &all, &condition),
        Err(Exclusion::Withdrawn)
    );
    let research_request = request("HRESCH", &["Patient", "Condition"]);
    assert!(matches!(
        evaluate(&rules, &all, &research_request),
        Outcome::Included { .. }
    ));
    // Nor does an exchange consent displace an earlier privacy objection
    // at an opt-out hospital.
    let objection = privacy(json!({"type": "deny"}));
    let objected = [
        objection.clone(),
        exchange_consent("active", "2026-02-01T00:00:00Z", json!({})),
    ];
    assert_eq!(
        evaluate(&rules, &objected, &research_request),
        Outcome::Excluded(Exclusion::Denied)
    );
    // A later objection naming no recipient stops the exchange too.
    assert_eq!(
        evaluate_disclosure(&rules, &[exchange.clone(), objection], &condition),
        Err(Exclusion::Denied)
    );

    // A deny naming a code withholds exactly the resources with it.
    let but_not_e11 = exchange_consent(
        "active",
        "2025-06-01T00:00:00Z",
        json!({"provision": [{"type": "deny", "code": [{"coding": [{"system": terminology::KCD8, "code": "E11"}]}]}]}),
    );
    assert_eq!(
        evaluate_disclosure(&rules, std::slice::from_ref(&but_not_e11), &condition),
        Err(Exclusion::DataNotCovered)
    );
    let hypertension = disclosure("Condition", &[(terminology::KCD8, "I10")], "report-service");
    assert!(evaluate_disclosure(&rules, std::slice::from_ref(&but_not_e11), &hypertension).is_ok());

    // Naming F32 opens F32, not F20.
    let depression = exchange_consent(
        "active",
        "2025-06-01T00:00:00Z",
        json!({"provision": [{"type": "permit", "code": [{"coding": [{"system": terminology::KCD8, "code": "F32"}]}]}]}),
    );
    let f32 = disclosure(
        "Condition",
        &[(terminology::KCD8, "F329")],
        "report-service",
    );
    let f20 = disclosure(
        "Condition",
        &[(terminology::KCD8, "F200")],
        "report-service",
    );
    let opened = |r: &ConsentRequest| {
        evaluate_disclosure(&rules, std::slice::from_ref(&depression), r)
            .map(|d| d.sensitive.contains(Category::MentalHealth))
    };
    assert_eq!(opened(&f32), Ok(true));
    assert_eq!(opened(&f20), Ok(false));
}
