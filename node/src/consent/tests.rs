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
    record_of(&parsed, crate::import::index::date_time_unix)
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
        purpose: purpose.to_owned(),
        classes: classes.iter().map(|c| (*c).to_owned()).collect(),
        codes: vec![(terminology::KCD8.to_owned(), "E11".to_owned(), true)],
        at: NOW,
    }
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
        sensitive: label under a provision for another purpose  opt-in   HRESCH  -> included
        sensitive: permitted then denied by label               opt-in   HRESCH  -> included, may use mental-health
        privacy consent denying research                        opt-in   HRESCH  -> excluded: consent denies this use
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
