//! The exchange over the real federation (issue 42): a consenting
//! resident's records from every hospital that holds them arrive whole,
//! equal to what the hospitals hold for them, and merge into one record;
//! the coordinator relays only ciphertext; a resident without consent and
//! a non-patient get the same answer; bad requests are refused by name
//! with nothing sent; a withdrawal mid-transfer stops it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use futures::StreamExt;
use ghx::exchange::Recipient;
use ghx::local_federation::{LocalFederation, LocalFederationOptions, RECIPIENT, REQUESTER};
use ghx_exchange::part::Outcome;
use ghx_exchange::receive::Outcomes;
use ghx_exchange::request::{Claims, Kind, Resident};
use ghx_proto::v1 as pb;
use serde_json::{Value, json};

const SCOPE: &str = "_type=Condition,Observation,MedicationRequest,Encounter";

fn ndjson(dir: &Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{kind}.ndjson")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn patient_of(resource: &Value) -> Option<String> {
    ["subject", "patient"].iter().find_map(|f| {
        resource[*f]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"))
            .map(str::to_owned)
    })
}

/// Per hospital: RRN to patient id, and the patients with an exchange
/// consent (read from the exports, not the node).
struct Exports {
    rrns: Vec<BTreeMap<String, String>>,
    consenting: Vec<BTreeSet<String>>,
}

fn exports(federation: &LocalFederation) -> Exports {
    let mut rrns = Vec::new();
    let mut consenting = Vec::new();
    for node in &federation.nodes {
        let mut by_rrn = BTreeMap::new();
        for p in ndjson(&node.data_dir, "Patient") {
            for id in p["identifier"].as_array().into_iter().flatten() {
                if id["system"] == ghx_synth::RRN_SYSTEM {
                    by_rrn.insert(
                        id["value"].as_str().unwrap().to_owned(),
                        p["id"].as_str().unwrap().to_owned(),
                    );
                }
            }
        }
        rrns.push(by_rrn);
        consenting.push(
            ndjson(&node.data_dir, "Consent")
                .iter()
                .filter(|c| c["scope"]["coding"][0]["code"] == "patient-privacy")
                .filter_map(patient_of)
                .collect(),
        );
    }
    Exports { rrns, consenting }
}

/// What a hospital's export holds of a patient in the scope's types (the
/// Patient without its RRN, as the node keeps it).
fn held(dir: &Path, patient: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for p in ndjson(dir, "Patient") {
        if p["id"] == patient {
            let mut p = p.clone();
            let ids: Vec<Value> = p["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["system"] != ghx_synth::RRN_SYSTEM)
                .cloned()
                .collect();
            p["identifier"] = Value::Array(ids);
            out.insert(format!("Patient/{patient}"), p);
        }
    }
    for kind in ["Condition", "Observation", "MedicationRequest", "Encounter"] {
        for r in ndjson(dir, kind) {
            if patient_of(&r).as_deref() == Some(patient) {
                out.insert(format!("{kind}/{}", r["id"].as_str().unwrap()), r);
            }
        }
    }
    out
}

async fn relay(
    federation: &LocalFederation,
    recipient: &Recipient,
    token: &str,
) -> Result<Vec<pb::RelayedFrame>, tonic::Status> {
    let mut client = federation.client(RECIPIENT).await.unwrap();
    let mut stream = client
        .relay_exchange(recipient.request(token))
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(frame) = stream.next().await {
        frames.push(frame?);
    }
    Ok(frames)
}

fn open(recipient: &Recipient, token: &str, frames: &[pb::RelayedFrame]) -> Outcomes {
    let claims = ghx_exchange::request::unverified_claims(token).unwrap();
    let mut transfers = recipient.transfers(&claims.jti);
    let mut bytes = 0;
    for frame in frames {
        ghx::exchange::accept(&mut transfers, frame, &mut bytes);
    }
    transfers.finish()
}

fn hospitals(federation: &LocalFederation) -> Vec<String> {
    federation
        .nodes
        .iter()
        .map(|n| n.profile.id.to_owned())
        .collect()
}

fn claims(
    federation: &LocalFederation,
    recipient: &Recipient,
    resident: Resident,
    scope: &str,
) -> Claims {
    Claims::new(
        "g-health-identity",
        hospitals(federation),
        resident,
        (RECIPIENT, &recipient.public_key()),
        scope,
        Kind::Records,
        300,
    )
}

fn token_for(federation: &LocalFederation, rrn: &str) -> String {
    let key = ghx_disclosure::linkage::LinkKey::parse(
        &std::fs::read_to_string(federation.dir.join("linkage.key")).unwrap(),
    )
    .unwrap();
    key.token(&rrn.chars().filter(char::is_ascii_digit).collect::<String>())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_residents_records_travel_sealed_to_the_service_they_chose() {
    let dir = tempfile::tempdir().unwrap();
    let mut federation = LocalFederation::start(&LocalFederationOptions {
        shared: 0.4,
        // Small parts, so a long record spans hundreds of them.
        exchange_part_bytes: Some(4096),
        ..LocalFederationOptions::new(dir.path(), 300, 2042)
    })
    .await
    .unwrap();
    let exports = exports(&federation);
    let recipient = federation.recipient().unwrap();

    // A resident treated at every hospital, consenting at each, with a
    // diagnosis.
    let (rrn, ids) = exports.rrns[0]
        .iter()
        .filter_map(|(rrn, id0)| {
            let ids: Vec<Option<String>> = (0..3)
                .map(|h| {
                    if h == 0 {
                        Some(id0.clone())
                    } else {
                        exports.rrns[h].get(rrn).cloned()
                    }
                })
                .collect();
            let everywhere = ids.iter().all(Option::is_some);
            let consents = ids.iter().enumerate().all(|(h, id)| {
                id.as_ref()
                    .is_some_and(|id| exports.consenting[h].contains(id))
            });
            let diagnosed = ids.iter().enumerate().all(|(h, id)| {
                held(&federation.nodes[h].data_dir, id.as_deref().unwrap_or(""))
                    .keys()
                    .any(|k| k.starts_with("Condition/"))
            });
            (everywhere && consents && diagnosed).then(|| {
                (
                    rrn.clone(),
                    ids.into_iter().map(Option::unwrap).collect::<Vec<_>>(),
                )
            })
        })
        .next()
        .expect("a consenting resident treated at all three hospitals");

    let token = federation
        .authorise(&claims(
            &federation,
            &recipient,
            Resident {
                link_token: Some(token_for(&federation, &rrn)),
                ..Resident::default()
            },
            SCOPE,
        ))
        .unwrap();
    let frames = relay(&federation, &recipient, &token).await.unwrap();

    // The coordinator's copy of the traffic: ciphertext only.
    let mut secrets: Vec<String> = ids.clone();
    secrets.extend([
        rrn.clone(),
        token_for(&federation, &rrn),
        "Observation".into(),
        "4548-4".into(),
        "resourceType".into(),
        "BEGIN CERTIFICATE".into(),
    ]);
    for frame in &frames {
        assert!(frame.refusal.is_empty(), "{}", frame.refusal);
        let f = frame.frame.as_ref().unwrap();
        assert_eq!(f.ciphertext.len() % ghx_exchange::envelope::PAD, 16);
        for secret in &secrets {
            assert!(
                !contains(&f.ciphertext, secret.as_bytes()),
                "`{secret}` in the relayed traffic"
            );
        }
    }
    let outcomes = open(&recipient, &token, &frames);
    assert!(outcomes.failed.is_empty(), "{:?}", outcomes.failed);
    assert_eq!(outcomes.received.len(), 3);
    for (h, node) in federation.nodes.iter().enumerate() {
        let got = outcomes
            .received
            .iter()
            .find(|r| r.hospital == node.profile.id)
            .unwrap();
        assert_eq!(got.outcome, Outcome::Complete);
        assert_eq!(got.patient.as_deref(), Some(ids[h].as_str()));
        let got: BTreeMap<String, Value> = got
            .resources
            .iter()
            .map(|r| (ghx_exchange::receive::label(r), r.clone()))
            .collect();
        let want = held(&node.data_dir, &ids[h]);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{}: every resource in scope, nothing else",
            node.profile.id
        );
        for (k, v) in &want {
            assert_eq!(&got[k], v, "{k} arrives as the hospital holds it");
        }
    }
    // The merged record: one Patient, each diagnosis recorded alike at
    // several hospitals kept once, valid FHIR.
    let (bundle, report) = ghx_exchange::merge::merge(&outcomes.received, "2026-12-07T00:00:00Z");
    let _: fhir_model::r4b::resources::Bundle = serde_json::from_value(bundle.clone()).unwrap();
    let mut diagnoses = BTreeSet::new();
    let mut condition_copies = 0;
    for (h, node) in federation.nodes.iter().enumerate() {
        for (k, c) in held(&node.data_dir, &ids[h]) {
            if k.starts_with("Condition/") {
                condition_copies += 1;
                let code = c["code"]["coding"][0]["code"]
                    .as_str()
                    .unwrap()
                    .replace('.', "");
                diagnoses.insert((code, c["onsetDateTime"].as_str().unwrap().to_owned()));
            }
        }
    }
    let merged_conditions = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Condition")
        .count();
    eprintln!(
        "merged: {report:?}, {condition_copies} diagnoses recorded, {} distinct",
        diagnoses.len()
    );
    assert_eq!(merged_conditions, diagnoses.len());
    assert!(
        report.duplicates >= condition_copies - diagnoses.len(),
        "{report:?}"
    );
    assert!(
        condition_copies > diagnoses.len(),
        "the same diagnosis at two hospitals"
    );
    let patients = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Patient")
        .count();
    assert_eq!(patients, 1);

    // Each hospital recorded the disclosure; the coordinator the relay,
    // with no patient id in its trail.
    for (h, node) in federation.nodes.iter().enumerate() {
        let disclosures = node.store.disclosures_of(&ids[h]).unwrap();
        assert_eq!(disclosures.len(), 1);
        assert_eq!(disclosures[0].recipient, RECIPIENT);
        assert_eq!(disclosures[0].outcome, "sent");
    }
    let entries = federation.coordinator_audit();
    for node in &federation.nodes {
        assert!(
            entries
                .iter()
                .any(|e| e.action == "exchange" && e.peer == node.profile.id && e.result_cells > 0),
            "the relay to {} is in the coordinator's trail",
            node.profile.id
        );
    }
    let trail = format!("{entries:?}");
    for id in &ids {
        assert!(
            !trail.contains(id.as_str()),
            "{id} in the coordinator's trail"
        );
    }

    // The same request again: refused everywhere, nothing sent.
    let again = relay(&federation, &recipient, &token).await.unwrap();
    assert_eq!(again.len(), 3);
    for frame in &again {
        assert!(frame.frame.is_none());
        assert!(frame.refusal.contains("already used"), "{}", frame.refusal);
    }

    // The resident's history: who received their records, and when.
    let mut history = claims(
        &federation,
        &recipient,
        Resident {
            link_token: Some(token_for(&federation, &rrn)),
            ..Resident::default()
        },
        "",
    );
    history.kind = Kind::History;
    let token = federation.authorise(&history).unwrap();
    let outcomes = open(
        &recipient,
        &token,
        &relay(&federation, &recipient, &token).await.unwrap(),
    );
    assert!(outcomes.failed.is_empty(), "{:?}", outcomes.failed);
    for r in &outcomes.received {
        let events: Vec<&Value> = r
            .resources
            .iter()
            .filter(|e| e["resourceType"] == "AuditEvent")
            .collect();
        assert_eq!(events.len(), 1, "{}: the one disclosure before", r.hospital);
        assert_eq!(
            events[0]["agent"][0]["who"]["identifier"]["value"],
            RECIPIENT
        );
    }

    // No consent and no such patient: one answer.
    let unconsenting = exports.rrns[1]
        .values()
        .find(|id| !exports.consenting[1].contains(*id))
        .unwrap()
        .clone();
    let mut answers = Vec::new();
    for patient in [unconsenting.as_str(), "no-such-patient"] {
        let mut c = claims(&federation, &recipient, Resident::default(), SCOPE);
        c.aud = vec![federation.nodes[1].profile.id.to_owned()];
        c.resident.patients.insert(
            federation.nodes[1].profile.id.to_owned(),
            patient.to_owned(),
        );
        let token = federation.authorise(&c).unwrap();
        let frames = relay(&federation, &recipient, &token).await.unwrap();
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| f.frame.as_ref().unwrap().ciphertext.len())
            .collect();
        let outcomes = open(&recipient, &token, &frames);
        assert_eq!(outcomes.received.len(), 1);
        assert_eq!(outcomes.received[0].outcome, Outcome::Nothing);
        assert!(outcomes.received[0].resources.is_empty());
        answers.push(sizes);
    }
    assert_eq!(answers[0], answers[1], "the same answer, to the byte count");

    bad_requests(&federation, &recipient).await;
    withdrawn_mid_transfer(&federation, &recipient).await;
    oversize(&mut federation, &recipient).await;
    federation.shutdown().await;
}

/// Each refused by name at every hospital, nothing sent.
async fn bad_requests(federation: &LocalFederation, recipient: &Recipient) {
    let someone = Resident {
        link_token: Some("0000:00".to_owned()),
        ..Resident::default()
    };
    let refused = |frames: &[pb::RelayedFrame], what: &str| {
        assert!(!frames.is_empty());
        for f in frames {
            assert!(f.frame.is_none(), "{what}: nothing is sent");
            assert!(f.refusal.contains(what), "{what}: {}", f.refusal);
        }
    };
    // Unsigned.
    let c = claims(federation, recipient, someone.clone(), SCOPE);
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(&serde_json::to_vec(&c).unwrap())
    );
    refused(
        &relay(federation, recipient, &unsigned).await.unwrap(),
        "only EdDSA",
    );
    // Expired.
    let mut c = claims(federation, recipient, someone.clone(), SCOPE);
    c.iat -= 3_600;
    c.nbf -= 3_600;
    c.exp = c.iat + 300;
    let token = federation.authorise(&c).unwrap();
    refused(
        &relay(federation, recipient, &token).await.unwrap(),
        "expired",
    );
    // Over-broad: a type the hospitals do not send, a week-long validity.
    let token = federation
        .authorise(&claims(
            federation,
            recipient,
            someone.clone(),
            "_type=Observation,Consent",
        ))
        .unwrap();
    refused(
        &relay(federation, recipient, &token).await.unwrap(),
        "does not send Consent",
    );
    let mut c = claims(federation, recipient, someone.clone(), SCOPE);
    c.exp = c.iat + 7 * 86_400;
    let token = federation.authorise(&c).unwrap();
    refused(
        &relay(federation, recipient, &token).await.unwrap(),
        "at most 900",
    );
    // A recipient key that does not match its certificate: the statement
    // changed after signing.
    let token = federation
        .authorise(&claims(federation, recipient, someone.clone(), SCOPE))
        .unwrap();
    let other = ghx_exchange::keys::RecipientKey::generate();
    let mut request = recipient.request(&token);
    let mut statement: Value = serde_json::from_slice(&request.key_statement).unwrap();
    statement["public_key"] = json!(other.public_hex());
    request.key_statement = serde_json::to_vec(&statement).unwrap();
    let mut client = federation.client(RECIPIENT).await.unwrap();
    let mut stream = client.relay_exchange(request).await.unwrap().into_inner();
    let mut frames = Vec::new();
    while let Some(f) = stream.next().await {
        frames.push(f.unwrap());
    }
    refused(&frames, "signature does not verify");
    // A key the recipient's certificate vouches for, but not the one the
    // identity service registered and named: whoever can issue
    // certificates cannot have records sealed to a key of its own.
    let other = federation.recipient().unwrap();
    let token = federation
        .authorise(&claims(federation, recipient, someone.clone(), SCOPE))
        .unwrap();
    refused(
        &relay(federation, &other, &token).await.unwrap(),
        "not the one the signed request names",
    );
    // Patient ids of one hospital sent to all three would tell each where
    // else the resident is treated.
    let mut c = claims(federation, recipient, Resident::default(), SCOPE);
    c.resident
        .patients
        .insert("chonnam".to_owned(), "x".to_owned());
    let token = federation.authorise(&c).unwrap();
    refused(
        &relay(federation, recipient, &token).await.unwrap(),
        "names one hospital",
    );
    // A caller that is not a registered recipient cannot relay at all.
    let mut requester = federation.client(REQUESTER).await.unwrap();
    let status = requester
        .relay_exchange(recipient.request(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("recipient"),
        "{}",
        status.message()
    );
}

/// A patient's exchange Consent for the report service.
fn exchange_consent(patient: &str, id: &str, status: &str, date: &str) -> Value {
    json!({
        "resourceType": "Consent", "id": id, "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "dateTime": date,
        "provision": {"type": "permit",
            "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                       "reference": {"identifier": {"system": ghx_exchange::RECIPIENT_SYSTEM, "value": RECIPIENT}}}],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "PATRQT"}]},
    })
}

/// Imports a consenting patient with `observations` glucose results into
/// `node`.
fn import_long_record(node: &ghx::local_federation::LocalNode, patient: &str, observations: usize) {
    let mut lines = vec![
        json!({"resourceType": "Patient", "id": patient, "gender": "female", "birthDate": "1961-04-02"}),
    ];
    for k in 0..observations {
        lines.push(json!({
            "resourceType": "Observation", "id": format!("{patient}-obs{k}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1558-6"}]},
            "subject": {"reference": format!("Patient/{patient}")},
            "effectiveDateTime": format!("20{:02}-{:02}-{:02}T08:00:00+09:00", 20 + k % 6, 1 + k % 12, 1 + k % 28),
            "valueQuantity": {"value": 90 + k % 40, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        }));
    }
    lines.push(exchange_consent(
        patient,
        &format!("{patient}-exchange-1"),
        "active",
        "2025-01-01T10:00:00+09:00",
    ));
    import_lines(node, &lines);
}

fn import_lines(node: &ghx::local_federation::LocalNode, lines: &[Value]) {
    let data = tempfile::tempdir().unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(data.path().join("export.ndjson"), text).unwrap();
    let options = ghx_node::import::ImportOptions::default();
    ghx_node::import::import_path(&node.store, data.path(), &options).unwrap();
}

/// A long record, a withdrawal after its first part: the hospital stops,
/// tells the recipient, and records it; the recipient keeps nothing.
async fn withdrawn_mid_transfer(federation: &LocalFederation, recipient: &Recipient) {
    let node = &federation.nodes[1];
    let patient = "long-record-1";
    import_long_record(node, patient, 3000);

    let mut c = claims(
        federation,
        recipient,
        Resident::default(),
        "_type=Observation",
    );
    c.aud = vec![node.profile.id.to_owned()];
    c.resident
        .patients
        .insert(node.profile.id.to_owned(), patient.to_owned());
    let token = federation.authorise(&c).unwrap();
    let mut client = federation.client(RECIPIENT).await.unwrap();
    let mut stream = client
        .relay_exchange(recipient.request(&token))
        .await
        .unwrap()
        .into_inner();
    let mut frames = vec![stream.next().await.unwrap().unwrap()];
    // The resident withdraws while the transfer runs.
    let withdrawal = exchange_consent(
        patient,
        "long-exchange-2",
        "inactive",
        "2026-12-01T10:00:00+09:00",
    );
    tokio::task::block_in_place(|| import_lines(node, &[withdrawal]));
    while let Some(f) = stream.next().await {
        frames.push(f.unwrap());
    }
    eprintln!("withdrawal: {} frames relayed", frames.len());
    let parts_needed = 3000 * 250 / 4096;
    assert!(
        frames.len() < parts_needed / 2,
        "the transfer stopped early: {} frames",
        frames.len()
    );
    let outcomes = open(recipient, &token, &frames);
    assert!(outcomes.received.is_empty());
    let why = &outcomes.failed[node.profile.id];
    assert!(why.contains("withdrew consent"), "{why}");
    let disclosures = node.store.disclosures_of(patient).unwrap();
    assert!(
        disclosures[0].outcome.starts_with("stopped"),
        "{disclosures:?}"
    );
    assert!(
        disclosures[0].outcome.contains("consent withdrawn"),
        "{disclosures:?}"
    );
}

/// An answer over the hospital's limit is refused whole, naming the limit
/// and not the record's size; nothing is sent.
async fn oversize(federation: &mut LocalFederation, recipient: &Recipient) {
    let id = federation.nodes[1].profile.id.to_owned();
    let path = federation.nodes[1].config_path.clone();
    let config = std::fs::read_to_string(&path).unwrap();
    let limited = config.replace(
        "part_bytes = 4096",
        "part_bytes = 4096\nmax_resources = 1000",
    );
    assert_ne!(config, limited);
    std::fs::write(&path, limited).unwrap();
    federation.restart_node(&id).await.unwrap();
    let patient = "long-record-2";
    import_long_record(&federation.nodes[1], patient, 1500);
    let mut c = claims(
        federation,
        recipient,
        Resident::default(),
        "_type=Observation",
    );
    c.aud = vec![id.clone()];
    c.resident.patients.insert(id, patient.to_owned());
    let token = federation.authorise(&c).unwrap();
    let frames = relay(federation, recipient, &token).await.unwrap();
    assert_eq!(frames.len(), 1);
    assert!(frames[0].frame.is_none());
    assert!(
        frames[0]
            .refusal
            .contains("exceed what this hospital sends at once (1000 resources"),
        "{}",
        frames[0].refusal
    );
    assert!(!frames[0].refusal.contains("1501"), "no size of the record");
    assert!(
        federation.nodes[1]
            .store
            .disclosures_of(patient)
            .unwrap()
            .is_empty()
    );
}
