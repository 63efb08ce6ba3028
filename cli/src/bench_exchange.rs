//! `ghx bench-exchange`: one resident's long record (five years at each of
//! the three hospitals, about 2,000 resources in all) delivered through
//! the real federation to the report service, opened, checked and merged;
//! each run a new signed request. Times are from the request's sending to
//! the merged record.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::local_federation::{Error, LocalFederation, LocalFederationOptions, RECIPIENT};

pub struct BenchExchangeOptions {
    pub dir: PathBuf,
    pub runs: usize,
    /// Resources of the resident at each hospital (about).
    pub per_hospital: usize,
}

pub struct BenchExchangeReport {
    pub resources: usize,
    pub merged: usize,
    pub duplicates: usize,
    pub relayed_bytes: u64,
    /// One per run, sorted.
    pub times: Vec<Duration>,
}

/// The resident's record at hospital `h`: monthly visits over five years,
/// each with a few results; the yearly HbA1c (a referral's copy) the same at
/// every hospital.
fn record(hospital: &str, patient: &str, per_hospital: usize) -> Vec<Value> {
    let subject = json!({"reference": format!("Patient/{patient}")});
    let mut out = vec![json!({
        "resourceType": "Patient", "id": patient, "gender": "female", "birthDate": "1962-05-14",
        "identifier": [
            {"system": format!("urn:ghx:{hospital}:mrn"), "value": format!("MRN-{patient}")},
            {"system": ghx_synth::RRN_SYSTEM, "value": RRN},
        ],
    })];
    out.push(json!({
        "resourceType": "Condition", "id": format!("{patient}-t2d"), "subject": subject,
        "code": {"coding": [{"system": "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", "code": "E11.9"}]},
        "onsetDateTime": "2021-03-02",
    }));
    out.push(json!({
        "resourceType": "Consent", "id": format!("{patient}-exchange"), "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": subject, "dateTime": "2021-01-01T10:00:00+09:00",
        "provision": {"type": "permit",
            "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                       "reference": {"identifier": {"system": ghx_exchange::RECIPIENT_SYSTEM, "value": RECIPIENT}}}],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "PATRQT"}]},
    }));
    let labs = [
        ("1558-6", "mg/dL"),
        ("2160-0", "mg/dL"),
        ("13457-7", "mg/dL"),
        ("39156-5", "kg/m2"),
        ("8480-6", "mm[Hg]"),
        ("8462-4", "mm[Hg]"),
        ("2093-3", "mg/dL"),
        ("2571-8", "mg/dL"),
        ("2085-9", "mg/dL"),
        ("718-7", "g/dL"),
    ];
    let mut visit = 0usize;
    while out.len() < per_hospital {
        let year = 2021 + visit / 12;
        let month = 1 + visit % 12;
        let day = 1 + (visit * 7 + hospital.len()) % 27;
        let when = format!("{year}-{month:02}-{day:02}T09:00:00+09:00");
        let encounter = format!("{patient}-enc{visit}");
        out.push(json!({
            "resourceType": "Encounter", "id": encounter, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": subject, "period": {"start": when},
        }));
        for (k, (code, unit)) in labs.iter().enumerate() {
            out.push(json!({
                "resourceType": "Observation", "id": format!("{patient}-obs{visit}-{k}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": subject, "encounter": {"reference": format!("Encounter/{encounter}")},
                "effectiveDateTime": when,
                "valueQuantity": {"value": 50.0 + ((visit * 13 + k * 7) % 90) as f64, "unit": unit,
                                  "system": "http://unitsofmeasure.org", "code": unit},
            }));
        }
        visit += 1;
    }
    for year in 2021..2026 {
        out.push(json!({
            "resourceType": "Observation", "id": format!("{patient}-a1c-{year}"), "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": subject, "effectiveDateTime": format!("{year}-06-15T08:30:00+09:00"),
            "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        }));
    }
    out
}

/// The resident's registration number (valid check digit; synthetic).
const RRN: &str = "620514-2345677";

pub async fn run(options: &BenchExchangeOptions) -> Result<BenchExchangeReport, Error> {
    use ghx_exchange::request::{Claims, Kind, Resident};
    let federation =
        LocalFederation::start(&LocalFederationOptions::new(&options.dir, 200, 7)).await?;
    let key_path = federation.dir.join("linkage.key");
    let link_key = ghx_disclosure::linkage::LinkKey::parse(
        &std::fs::read_to_string(&key_path).map_err(|source| Error::Io {
            action: "read",
            path: key_path.clone(),
            source,
        })?,
    )
    .map_err(|e| Error::Identity(e.to_string()))?;
    let import = ghx_node::import::ImportOptions {
        link_key: Some(link_key.clone()),
        ..Default::default()
    };
    let mut hospitals = Vec::new();
    for node in &federation.nodes {
        let patient = format!("long-{}", node.profile.id);
        let data = options.dir.join("exchange-bench").join(node.profile.id);
        std::fs::create_dir_all(&data).map_err(|source| Error::Io {
            action: "create",
            path: data.clone(),
            source,
        })?;
        let text: String = record(node.profile.id, &patient, options.per_hospital)
            .iter()
            .map(|r| format!("{r}\n"))
            .collect();
        let file = data.join("record.ndjson");
        std::fs::write(&file, text).map_err(|source| Error::Io {
            action: "write",
            path: file.clone(),
            source,
        })?;
        let store = node.store.clone();
        let import = import.clone();
        tokio::task::spawn_blocking(move || ghx_node::import::import_path(&store, &data, &import))
            .await
            .expect("import task")?;
        hospitals.push(node.profile.id.to_owned());
    }
    let token = link_key.token(&RRN.replace('-', ""));
    let recipient = federation.recipient()?;
    let mut client = federation.client(RECIPIENT).await?;
    let mut times = Vec::new();
    let mut last = None;
    // One warm-up run, not counted.
    for run in 0..=options.runs {
        let claims = Claims::new(
            "g-health-identity",
            hospitals.clone(),
            Resident {
                link_token: Some(token.clone()),
                ..Resident::default()
            },
            (RECIPIENT, &recipient.public_key()),
            "_type=Condition,Observation,Encounter",
            Kind::Records,
            300,
        );
        let token = federation.authorise(&claims)?;
        let started = Instant::now();
        let fetched = crate::exchange::fetch(&mut client, &recipient, &token)
            .await
            .map_err(|e| Error::Identity(e.to_string()))?;
        let elapsed = started.elapsed();
        if !fetched.failed.is_empty() {
            return Err(Error::Identity(format!("{:?}", fetched.failed)));
        }
        if run > 0 {
            times.push(elapsed);
        }
        last = Some(fetched);
    }
    federation.shutdown().await;
    times.sort();
    let last = last.expect("at least one run");
    Ok(BenchExchangeReport {
        resources: last.received.iter().map(|r| r.resources.len()).sum(),
        merged: last.report.resources,
        duplicates: last.report.duplicates,
        relayed_bytes: last.relayed_bytes,
        times,
    })
}
