//! Seeded synthetic FHIR R4 data for the three Gwangju hospitals.
//!
//! Key decision: every patient is drawn from one small causal model, so the
//! data carry the correlations real analyses look for: age and BMI raise the
//! risk of type 2 diabetes, hypertension and dyslipidaemia; diabetics have
//! higher HbA1c and fasting glucose; hypertensives higher blood pressure; and
//! each hospital has its own case-mix (age, BMI, research-consent rate). The
//! generator streams patient by patient into one NDJSON file per resource type
//! (the FHIR bulk-export layout), so memory stays flat at any size, and the
//! same seed always gives the same bytes.

#![forbid(unsafe_code)]

mod shape;
pub use shape::{Coding, SNOMED_TO_KCD, Shape};

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::{Value, json};
use time::{Date, Duration, Month};

/// KR Core's KCD-8 code system.
pub const KCD8: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown hospital `{0}`; expected one of chonnam, chosun, christian")]
    UnknownHospital(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A hospital's case-mix.
#[derive(Debug, Clone, PartialEq)]
pub struct HospitalProfile {
    pub id: &'static str,
    pub name: &'static str,
    mean_age: f64,
    sd_age: f64,
    mean_bmi_offset: f64,
    /// Added to the log-odds of type 2 diabetes (referral centres see more).
    diabetes_offset: f64,
    /// Share of patients with an active research-permit Consent.
    research_consent_rate: f64,
    /// Share of the remaining patients with an explicit research deny.
    research_deny_rate: f64,
}

/// The three hospitals of the G-Health federation.
pub const HOSPITALS: [HospitalProfile; 3] = [
    HospitalProfile {
        id: "chonnam",
        name: "Chonnam National University Hospital",
        mean_age: 58.0,
        sd_age: 16.0,
        mean_bmi_offset: 0.3,
        diabetes_offset: 0.35,
        research_consent_rate: 0.78,
        research_deny_rate: 0.5,
    },
    HospitalProfile {
        id: "chosun",
        name: "Chosun University Hospital",
        mean_age: 54.0,
        sd_age: 17.0,
        mean_bmi_offset: 0.0,
        diabetes_offset: 0.15,
        research_consent_rate: 0.70,
        research_deny_rate: 0.4,
    },
    HospitalProfile {
        id: "christian",
        name: "Gwangju Christian Hospital",
        mean_age: 49.0,
        sd_age: 18.0,
        mean_bmi_offset: -0.2,
        diabetes_offset: 0.0,
        research_consent_rate: 0.84,
        research_deny_rate: 0.6,
    },
];

impl HospitalProfile {
    pub fn by_id(id: &str) -> Result<&'static HospitalProfile, Error> {
        HOSPITALS
            .iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Error::UnknownHospital(id.to_owned()))
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub hospital: &'static HospitalProfile,
    pub patients: usize,
    pub seed: u64,
    /// The data are as of this date: ages and observation dates are relative to it.
    pub as_of: Date,
    /// Share (0 to 1) of this hospital's patients who are also treated at
    /// one or two of the other hospitals: the same resident (the same
    /// resident registration number, sex, birth date and diagnoses) under
    /// this hospital's own id, with its own visits, results and consent.
    /// Above zero, every patient carries a resident registration number
    /// (the node's import never stores it); zero writes none.
    pub shared: f64,
}

/// KR Core's identifier system for resident registration numbers.
pub const RRN_SYSTEM: &str = "http://www.hl7korea.or.kr/Identifier/rrn";

/// Of the residents treated at more than one hospital, the share treated
/// at all three (the rest at two).
const AT_THREE: f64 = 0.25;

/// How many resources of each type were written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub patients: usize,
    pub conditions: usize,
    pub observations: usize,
    pub encounters: usize,
    pub medication_requests: usize,
    pub consents: usize,
}

impl Summary {
    pub fn total(&self) -> usize {
        self.patients
            + self.conditions
            + self.observations
            + self.encounters
            + self.medication_requests
            + self.consents
    }
}

/// The resource types written, in file order.
pub const RESOURCE_TYPES: [&str; 6] = [
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Consent",
];

/// Writes `<dir>/<ResourceType>.ndjson` files and returns what was written.
pub fn write_ndjson_dir(options: &SynthOptions, dir: &Path) -> Result<Summary, Error> {
    write_shaped(options, &Shape::default(), dir)
}

/// Like [`write_ndjson_dir`], in the form another tool's export takes
/// ([`Shape`]). With noise, some Patients are written again to
/// `Patient.again.ndjson` (not counted twice in the summary).
pub fn write_shaped(options: &SynthOptions, shape: &Shape, dir: &Path) -> Result<Summary, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    for ty in RESOURCE_TYPES {
        let path = dir.join(format!("{ty}.ndjson"));
        let file = File::create(&path).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        files.push((path, BufWriter::with_capacity(1 << 16, file)));
    }
    let again_path = dir.join("Patient.again.ndjson");
    let mut again = Vec::new();
    let mut summary = Summary::default();
    let mut failure = None;
    generate(options, |resource| {
        if failure.is_some() {
            return;
        }
        let Some(resource) = shape.apply(resource) else {
            return;
        };
        if shape.duplicate(&resource) {
            again.push(resource.to_string());
        }
        let ty = resource["resourceType"].as_str().unwrap_or_default();
        let index = RESOURCE_TYPES.iter().position(|t| *t == ty).unwrap_or(0);
        match ty {
            "Patient" => summary.patients += 1,
            "Condition" => summary.conditions += 1,
            "Observation" => summary.observations += 1,
            "Encounter" => summary.encounters += 1,
            "MedicationRequest" => summary.medication_requests += 1,
            _ => summary.consents += 1,
        }
        let (path, out) = &mut files[index];
        let written = serde_json::to_writer(&mut *out, &resource)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        if let Err(source) = written {
            failure = Some(Error::Write {
                path: path.clone(),
                source,
            });
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if !again.is_empty() {
        again.push(String::new());
        std::fs::write(&again_path, again.join("\n")).map_err(|source| Error::Write {
            path: again_path.clone(),
            source,
        })?;
    }
    for (path, mut out) in files {
        out.flush()
            .map_err(|source| Error::Write { path, source })?;
    }
    Ok(summary)
}

/// Generates the resources, handing each to `sink` as soon as it is made.
pub fn generate(options: &SynthOptions, mut sink: impl FnMut(Value)) {
    let h = options.hospital;
    // Mix the hospital into the seed so the hospitals differ for one seed.
    let seed = options.seed ^ fnv1a(h.id.as_bytes());
    let mut rng = StdRng::seed_from_u64(seed);
    let shared = (options.shared.clamp(0.0, 1.0) * options.patients as f64).round() as usize;
    let mut residents = SharedResidents::new(options.seed, h.id);
    // The exchange's consents from a stream of their own, so the rest of
    // the data is as it was before they were added.
    let mut exchange = StdRng::seed_from_u64(seed ^ fnv1a(b"exchange consent"));
    for i in 0..options.patients {
        let mut patient = if i < shared {
            // A resident of the federation's shared population, drawn from
            // their own seed (so alike at every hospital), with this
            // hospital's consent.
            let mut patient = residents.next(options.as_of);
            patient.consent = ConsentKind::draw(h, &mut rng);
            patient
        } else {
            let mut patient = Patient::draw(h, options.as_of, &mut rng);
            patient.exchange_consent = exchange.gen_bool(EXCHANGE_CONSENT_RATE);
            patient
        };
        // With a shared population, residents come with their RRN; a few
        // patients of one hospital only (foreign residents, the
        // unidentified) have none.
        if options.shared > 0.0 && patient.rrn.is_none() && !rng.gen_bool(WITHOUT_RRN) {
            patient.rrn = Some(rrn(patient.birth, patient.female, &mut rng));
        }
        patient.emit(
            h,
            &format!("{}-{:07}", h.id, i + 1),
            options.as_of,
            &mut rng,
            &mut sink,
        );
    }
}

/// Share of a hospital's own patients (not shared) without an RRN.
pub const WITHOUT_RRN: f64 = 0.02;

/// Share of residents with a Consent (`patient-privacy`) permitting the
/// exchange to send their records to the report service
/// ([`REPORT_SERVICE`]) at their own request (PATRQT).
pub const EXCHANGE_CONSENT_RATE: f64 = 0.3;

/// The exchange recipient the synthetic exchange Consents name.
pub const REPORT_SERVICE: &str = "report-service";

/// The federation's residents treated at more than one hospital, in a
/// fixed order: resident `j` is drawn from a seed of its own, and is at two
/// hospitals or (a quarter of them) all three. A hospital's shared patients
/// are the first residents whose hospitals include it.
struct SharedResidents {
    seed: u64,
    hospital: &'static str,
    next: u64,
}

impl SharedResidents {
    fn new(seed: u64, hospital: &'static str) -> Self {
        SharedResidents {
            seed: seed ^ fnv1a(b"shared residents"),
            hospital,
            next: 0,
        }
    }

    /// The next resident treated at this hospital.
    fn next(&mut self, as_of: Date) -> Patient {
        loop {
            let j = self.next;
            self.next += 1;
            let mut rng = StdRng::seed_from_u64(self.seed ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let at: Vec<&HospitalProfile> = if rng.gen_bool(AT_THREE) {
                HOSPITALS.iter().collect()
            } else {
                let left_out = rng.gen_range(0..HOSPITALS.len());
                HOSPITALS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != left_out)
                    .map(|(_, h)| h)
                    .collect()
            };
            if at.iter().any(|h| h.id == self.hospital) {
                let mut patient = Patient::draw(at[0], as_of, &mut rng);
                patient.rrn = Some(rrn(patient.birth, patient.female, &mut rng));
                // Drawn last, so the resident is otherwise as before: one
                // word on the exchange at every hospital, and the dates of
                // diagnoses every hospital records alike.
                patient.exchange_consent = rng.gen_bool(EXCHANGE_CONSENT_RATE);
                patient.onsets = Some([rng.r#gen(), rng.r#gen(), rng.r#gen()]);
                return patient;
            }
        }
    }
}

/// A resident registration number for a birth date and sex: `YYMMDD-G`
/// (G 1/2 for men and women born in the 1900s, 3/4 from 2000), five
/// random digits and the check digit of the citizen formula.
fn rrn(birth: Date, female: bool, rng: &mut StdRng) -> String {
    let century_2000 = birth.year() >= 2000;
    let g = match (century_2000, female) {
        (false, false) => 1,
        (false, true) => 2,
        (true, false) => 3,
        (true, true) => 4,
    };
    let mut digits: Vec<u32> = format!(
        "{:02}{:02}{:02}{g}{:05}",
        birth.year() % 100,
        u8::from(birth.month()),
        birth.day(),
        rng.gen_range(0..100_000)
    )
    .chars()
    .filter_map(|c| c.to_digit(10))
    .collect();
    let weights = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5];
    let sum: u32 = digits.iter().zip(weights).map(|(d, w)| d * w).sum();
    digits.push((11 - sum % 11) % 10);
    let text: String = digits
        .iter()
        .map(|d| char::from_digit(*d, 10).expect("a digit"))
        .collect();
    format!("{}-{}", &text[..6], &text[6..])
}

/// One synthetic patient's latent state.
struct Patient {
    female: bool,
    age: f64,
    birth: Date,
    bmi: f64,
    diabetes: bool,
    hypertension: bool,
    dyslipidaemia: bool,
    consent: ConsentKind,
    /// A resident registration number, when the export carries them.
    rrn: Option<String>,
    /// Whether the patient consents to the exchange sending their records
    /// to the report service.
    exchange_consent: bool,
    /// A shared resident's diagnoses' onsets (fractions of the span they
    /// may lie in), alike at every hospital.
    onsets: Option<[f64; 3]>,
}

#[derive(Clone, Copy)]
enum ConsentKind {
    Permit,
    Deny,
    /// Permitted once, then withdrawn by a newer inactive consent.
    Withdrawn,
    None,
}

impl ConsentKind {
    /// A patient's research consent at hospital `h`.
    fn draw(h: &HospitalProfile, rng: &mut StdRng) -> ConsentKind {
        if rng.gen_bool(h.research_consent_rate) {
            if rng.gen_bool(0.03) {
                ConsentKind::Withdrawn
            } else {
                ConsentKind::Permit
            }
        } else if rng.gen_bool(h.research_deny_rate) {
            ConsentKind::Deny
        } else {
            ConsentKind::None
        }
    }
}

fn normal(rng: &mut StdRng, mean: f64, sd: f64) -> f64 {
    Normal::new(mean, sd).expect("finite sd").sample(rng)
}

fn logistic(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl Patient {
    fn draw(h: &HospitalProfile, as_of: Date, rng: &mut StdRng) -> Patient {
        let female = rng.gen_bool(0.52);
        let age = normal(rng, h.mean_age, h.sd_age).clamp(18.0, 99.0);
        let days = (age * 365.25) as i64 + rng.gen_range(0..365);
        let birth = as_of - Duration::days(days);
        let bmi = (normal(rng, 23.6 + h.mean_bmi_offset, 3.4) + 0.02 * (age - 50.0)
            - if female { 0.8 } else { 0.0 })
        .clamp(15.0, 45.0);
        let male = if female { 0.0 } else { 1.0 };
        let diabetes = rng.gen_bool(logistic(
            -4.9 + 0.055 * age + 0.19 * (bmi - 23.0) + 0.25 * male + h.diabetes_offset,
        ));
        let d = if diabetes { 1.0 } else { 0.0 };
        let hypertension = rng.gen_bool(logistic(
            -5.4 + 0.075 * age + 0.13 * (bmi - 23.0) + 0.3 * male + 0.6 * d,
        ));
        let dyslipidaemia =
            rng.gen_bool(logistic(-3.6 + 0.045 * age + 0.08 * (bmi - 23.0) + 0.5 * d));
        let consent = ConsentKind::draw(h, rng);
        Patient {
            female,
            age,
            birth,
            bmi,
            diabetes,
            hypertension,
            dyslipidaemia,
            consent,
            rrn: None,
            exchange_consent: false,
            onsets: None,
        }
    }

    fn emit(
        &self,
        h: &HospitalProfile,
        id: &str,
        as_of: Date,
        rng: &mut StdRng,
        sink: &mut impl FnMut(Value),
    ) {
        let patient_ref = format!("Patient/{id}");
        sink(json!({
            "resourceType": "Patient",
            "id": id,
            "meta": {"profile": ["http://www.hl7korea.or.kr/fhir/krcore/StructureDefinition/krcore-patient"]},
            "identifier": std::iter::once(json!({"system": format!("urn:ghx:{}:mrn", h.id), "value": format!("MRN{}", &id[id.len() - 7..])}))
                .chain(self.rrn.iter().map(|rrn| json!({"system": RRN_SYSTEM, "value": rrn})))
                .collect::<Vec<_>>(),
            "active": true,
            "gender": if self.female { "female" } else { "male" },
            "birthDate": iso(self.birth),
        }));

        // Annual check-ups over the last `visits` years; the latest is within
        // the past year.
        let visits = rng.gen_range(2..=10usize);
        let last_visit = as_of - Duration::days(rng.gen_range(7..330));
        let visit_days: Vec<Date> = (0..visits)
            .rev()
            .map(|k| last_visit - Duration::days(365 * k as i64 + rng.gen_range(-20..20)))
            .collect();
        let first_day = visit_days[0];
        // Onset in years before the last visit: conditions may predate
        // follow-up (prevalent) or start during it (incident).
        let onset = |rng: &mut StdRng| {
            let years_ago = rng.gen_range(0.0..(self.age - 18.0).clamp(0.5, 14.0));
            last_visit - Duration::days((years_ago * 365.25) as i64 + 1)
        };
        // A shared resident's onsets are theirs, not the hospital's: the
        // same diagnosis is dated alike wherever it is recorded (the draw
        // is still made, so the hospital's stream is unchanged).
        let span_days = (self.age - 18.0).clamp(0.5, 14.0) * 365.25;
        let shared_onset = |k: usize, drawn: Date| match self.onsets {
            Some(f) => as_of - Duration::days((f[k] * span_days) as i64 + 340),
            None => drawn,
        };
        let diabetes_onset = self.diabetes.then(|| shared_onset(0, onset(rng)));
        let hypertension_onset = self.hypertension.then(|| shared_onset(1, onset(rng)));
        let lipid_onset = self.dyslipidaemia.then(|| shared_onset(2, onset(rng)));
        let has = |onset: Option<Date>, day: Date| onset.is_some_and(|o| o <= day);

        let mut condition = |n: usize, code: &str, display: &str, onset: Date| {
            // Recorded at the first visit on or after onset.
            let recorded = visit_days
                .iter()
                .copied()
                .find(|d| *d >= onset)
                .unwrap_or(first_day);
            let enc = visit_days.iter().position(|d| *d == recorded).unwrap_or(0);
            sink(json!({
                "resourceType": "Condition",
                "id": format!("{id}-cond{n}"),
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}],
                "code": {"coding": [{"system": KCD8, "code": code, "display": display}]},
                "subject": {"reference": patient_ref},
                "encounter": {"reference": format!("Encounter/{id}-enc{enc}")},
                "onsetDateTime": iso(onset),
                "recordedDate": iso(recorded.max(onset)),
            }));
        };
        if let Some(o) = diabetes_onset {
            let (code, display) = if rng.gen_bool(0.8) {
                ("E11.9", "Type 2 diabetes mellitus without complications")
            } else {
                (
                    "E11.2",
                    "Type 2 diabetes mellitus with kidney complications",
                )
            };
            condition(0, code, display, o);
        }
        if let Some(o) = hypertension_onset {
            condition(1, "I10", "Essential (primary) hypertension", o);
        }
        if let Some(o) = lipid_onset {
            let (code, display) = if rng.gen_bool(0.7) {
                ("E78.5", "Hyperlipidaemia, unspecified")
            } else {
                ("E78.0", "Pure hypercholesterolaemia")
            };
            condition(2, code, display, o);
        }

        // Personal offsets keep one patient's values consistent over time.
        let hba1c_offset = normal(rng, 0.0, 0.2);
        let sbp_offset = normal(rng, 0.0, 6.0);
        let ldl_offset = normal(rng, 0.0, 15.0);
        let bmi_drift = normal(rng, 0.05, 0.2);
        for (k, day) in visit_days.iter().copied().enumerate() {
            let years_before_last = (last_visit - day).whole_days() as f64 / 365.25;
            let age = self.age - years_before_last;
            let bmi = (self.bmi - bmi_drift * years_before_last + normal(rng, 0.0, 0.4))
                .clamp(15.0, 45.0);
            let d = has(diabetes_onset, day);
            let htn = if has(hypertension_onset, day) {
                1.0
            } else {
                0.0
            };
            let lip = if has(lipid_onset, day) { 1.0 } else { 0.0 };
            // Dysglycaemia rises over the three years before diabetes onset.
            let pre = match diabetes_onset {
                Some(o) if o > day => {
                    (1.0 - (o - day).whole_days() as f64 / (3.0 * 365.25)).max(0.0)
                }
                _ => 0.0,
            };
            let enc_id = format!("{id}-enc{k}");
            sink(json!({
                "resourceType": "Encounter",
                "id": enc_id,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
                "subject": {"reference": patient_ref},
                "period": {"start": format!("{}T09:00:00+09:00", iso(day)), "end": format!("{}T09:30:00+09:00", iso(day))},
                "serviceProvider": {"display": h.name},
            }));
            let hba1c = if d {
                normal(rng, 7.3, 0.9).clamp(5.7, 14.0)
            } else {
                (5.3 + 0.004 * (age - 40.0)
                    + 0.02 * (bmi - 23.0)
                    + 0.8 * pre
                    + hba1c_offset
                    + normal(rng, 0.0, 0.12))
                .clamp(4.0, 6.4)
            };
            let glucose = if d {
                normal(rng, 148.0, 32.0).clamp(90.0, 400.0)
            } else {
                normal(rng, 91.0 + 0.8 * (bmi - 23.0) + 20.0 * pre, 8.0).clamp(65.0, 125.0)
            };
            let dm = if d { 1.0 } else { 0.0 };
            let sbp = normal(
                rng,
                112.0
                    + 0.45 * (age - 40.0)
                    + 0.9 * (bmi - 23.0)
                    + 14.0 * htn
                    + 3.0 * dm
                    + sbp_offset,
                8.0,
            )
            .clamp(80.0, 220.0);
            let dbp = normal(
                rng,
                72.0 + 0.12 * (age - 40.0) + 0.45 * (bmi - 23.0) + 8.0 * htn,
                6.0,
            )
            .clamp(45.0, 130.0)
            .min(sbp - 15.0);
            let ldl = normal(
                rng,
                108.0 + 0.25 * (age - 40.0) + 28.0 * lip - 8.0 * dm + ldl_offset,
                12.0,
            )
            .clamp(30.0, 300.0);
            let creatinine = normal(
                rng,
                if self.female { 0.72 } else { 0.95 } + 0.004 * (age - 40.0) + 0.1 * dm,
                0.1,
            )
            .clamp(0.3, 4.0);

            let mut n = 0;
            let mut observation = |code: &str,
                                   display: &str,
                                   value: Value,
                                   components: Option<Value>| {
                let mut obs = json!({
                    "resourceType": "Observation",
                    "id": format!("{id}-obs{k}-{n}"),
                    "status": "final",
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": if code == "39156-5" || code == "85354-9" { "vital-signs" } else { "laboratory" }}]}],
                    "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                    "subject": {"reference": patient_ref},
                    "encounter": {"reference": format!("Encounter/{enc_id}")},
                    "effectiveDateTime": format!("{}T09:10:00+09:00", iso(day)),
                });
                if value.is_object() {
                    obs["valueQuantity"] = value;
                }
                if let Some(c) = components {
                    obs["component"] = c;
                }
                sink(obs);
                n += 1;
            };
            observation(
                "4548-4",
                "Hemoglobin A1c/Hemoglobin.total in Blood",
                quantity(hba1c, 1, "%", "%"),
                None,
            );
            observation(
                "1558-6",
                "Fasting glucose [Mass/volume] in Serum or Plasma",
                quantity(glucose, 0, "mg/dL", "mg/dL"),
                None,
            );
            observation(
                "39156-5",
                "Body mass index (BMI) [Ratio]",
                quantity(bmi, 1, "kg/m2", "kg/m2"),
                None,
            );
            observation(
                "13457-7",
                "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation",
                quantity(ldl, 0, "mg/dL", "mg/dL"),
                None,
            );
            observation(
                "2160-0",
                "Creatinine [Mass/volume] in Serum or Plasma",
                quantity(creatinine, 2, "mg/dL", "mg/dL"),
                None,
            );
            observation(
                "85354-9",
                "Blood pressure panel with all children optional",
                Value::Null,
                Some(json!([
                    {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]}, "valueQuantity": quantity(sbp, 0, "mm[Hg]", "mm[Hg]")},
                    {"code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]}, "valueQuantity": quantity(dbp, 0, "mm[Hg]", "mm[Hg]")},
                ])),
            );
            if d && rng.gen_bool(0.85) {
                sink(json!({
                    "resourceType": "MedicationRequest",
                    "id": format!("{id}-med{k}"),
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "A10BA02", "display": "metformin"}]},
                    "subject": {"reference": patient_ref},
                    "encounter": {"reference": format!("Encounter/{enc_id}")},
                    "authoredOn": iso(day),
                }));
            }
        }

        let consent = |cid: &str, status: &str, decision: &str, date: Date| {
            json!({
                "resourceType": "Consent",
                "id": format!("{id}-{cid}"),
                "status": status,
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8", "display": "Privacy policy acknowledgement Document"}]}],
                "patient": {"reference": patient_ref},
                "dateTime": format!("{}T10:00:00+09:00", iso(date)),
                "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
                "provision": {"type": decision, "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]},
            })
        };
        let signed = first_day - Duration::days(rng.gen_range(0..30));
        match self.consent {
            ConsentKind::Permit => sink(consent("consent0", "active", "permit", signed)),
            ConsentKind::Deny => sink(consent("consent0", "active", "deny", signed)),
            ConsentKind::Withdrawn => {
                sink(consent("consent0", "active", "permit", signed));
                sink(consent(
                    "consent1",
                    "inactive",
                    "permit",
                    signed + Duration::days(60),
                ));
            }
            ConsentKind::None => {}
        }
        if self.exchange_consent {
            sink(json!({
                "resourceType": "Consent",
                "id": format!("{id}-exchange0"),
                "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
                "patient": {"reference": patient_ref},
                "dateTime": format!("{}T11:00:00+09:00", iso(signed)),
                "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
                "provision": {
                    "type": "permit",
                    "actor": [{
                        "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                        "reference": {"identifier": {"system": "urn:ghx:recipient", "value": REPORT_SERVICE}, "display": "G-Health Personal Health Report"},
                    }],
                    "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "PATRQT"}],
                },
            }));
        }
    }
}

fn quantity(value: f64, decimals: i32, unit: &str, code: &str) -> Value {
    let scale = 10f64.powi(decimals);
    json!({"value": (value * scale).round() / scale, "unit": unit, "system": UCUM, "code": code})
}

fn iso(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The reference date the demo and tests use unless told otherwise.
pub fn default_as_of() -> Date {
    Date::from_calendar_date(2026, Month::January, 1).expect("valid date")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(hospital: &str, patients: usize, seed: u64) -> Vec<Value> {
        let mut out = Vec::new();
        let options = SynthOptions {
            hospital: HospitalProfile::by_id(hospital).unwrap(),
            patients,
            seed,
            as_of: default_as_of(),
            shared: 0.0,
        };
        generate(&options, |r| out.push(r));
        out
    }

    /// With a shared population, the hospitals hold the same residents
    /// (same RRN, sex and birth date) under their own ids, at about the
    /// asked share, a quarter of them at all three; each RRN is well formed
    /// (the node's detector takes it: date, century digit, check digit).
    #[test]
    fn a_shared_population_puts_the_same_residents_at_several_hospitals() {
        use std::collections::BTreeMap;
        let patients = 2000;
        let mut seen: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
        let mut without = 0;
        for h in &HOSPITALS {
            let options = SynthOptions {
                hospital: h,
                patients,
                seed: 7,
                as_of: default_as_of(),
                shared: 0.2,
            };
            generate(&options, |r| {
                if r["resourceType"] != "Patient" {
                    return;
                }
                let Some(rrn) = r["identifier"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i["system"] == RRN_SYSTEM)
                else {
                    without += 1;
                    return;
                };
                let rrn = rrn["value"].as_str().unwrap().to_owned();
                let digits: Vec<u32> = rrn.chars().filter_map(|c| c.to_digit(10)).collect();
                assert_eq!((digits.len(), &rrn[6..7]), (13, "-"), "{rrn}");
                let weights = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5];
                let sum: u32 = digits.iter().zip(weights).map(|(d, w)| d * w).sum();
                assert_eq!(digits[12], (11 - sum % 11) % 10, "{rrn}");
                let birth = r["birthDate"].as_str().unwrap();
                assert_eq!(
                    &rrn[..6],
                    format!("{}{}{}", &birth[2..4], &birth[5..7], &birth[8..10])
                );
                seen.entry(rrn).or_default().push((
                    r["id"].as_str().unwrap().to_owned(),
                    r["gender"].as_str().unwrap().to_owned(),
                    birth.to_owned(),
                ));
            });
        }
        let mut at = [0usize; 4];
        for (rrn, held) in &seen {
            at[held.len()] += 1;
            // One resident: one sex and birth date, an id per hospital.
            assert!(
                held.iter()
                    .all(|h| (&h.1, &h.2) == (&held[0].1, &held[0].2)),
                "{rrn}"
            );
            let ids: std::collections::BTreeSet<&str> = held
                .iter()
                .map(|h| &h.0[..h.0.find('-').unwrap()])
                .collect();
            assert_eq!(ids.len(), held.len(), "{rrn} twice at one hospital");
        }
        let records = 3 * patients;
        let shared_records = 2 * at[2] + 3 * at[3];
        let share = shared_records as f64 / records as f64;
        assert!((0.17..=0.21).contains(&share), "{at:?}: {share}");
        let three = at[3] as f64 / (at[2] + at[3]) as f64;
        assert!((0.15..0.35).contains(&three), "{at:?}");
        // About 2% of the patients of one hospital only have no RRN.
        let own = records - shared_records;
        assert!(
            (0.01..0.03).contains(&(without as f64 / own as f64)),
            "{without} of {own}"
        );
        // Without a shared population, no RRNs at all (the default export).
        let mut any = false;
        generate(
            &SynthOptions {
                hospital: &HOSPITALS[0],
                patients: 50,
                seed: 7,
                as_of: default_as_of(),
                shared: 0.0,
            },
            |r| any |= r.to_string().contains(RRN_SYSTEM),
        );
        assert!(!any);
    }

    #[test]
    fn same_seed_same_data_and_hospitals_differ() {
        assert_eq!(collect("chosun", 50, 7), collect("chosun", 50, 7));
        assert_ne!(collect("chosun", 50, 7), collect("chosun", 50, 8));
        assert_ne!(collect("chosun", 50, 7), collect("chonnam", 50, 7));
    }

    #[test]
    fn diabetics_have_higher_hba1c_and_prevalence_rises_with_age() {
        let resources = collect("chonnam", 3000, 1);
        let mut diabetic = std::collections::HashSet::new();
        for r in &resources {
            if r["resourceType"] == "Condition"
                && r["code"]["coding"][0]["code"]
                    .as_str()
                    .unwrap()
                    .starts_with("E11")
            {
                diabetic.insert(r["subject"]["reference"].as_str().unwrap().to_owned());
            }
        }
        let patients: Vec<&Value> = resources
            .iter()
            .filter(|r| r["resourceType"] == "Patient")
            .collect();
        let prevalence = diabetic.len() as f64 / patients.len() as f64;
        assert!(
            (0.08..0.40).contains(&prevalence),
            "diabetes prevalence {prevalence}"
        );

        // The latest HbA1c of diabetics is clearly higher.
        let mut latest: std::collections::HashMap<&str, (&str, f64)> =
            std::collections::HashMap::new();
        for r in &resources {
            if r["resourceType"] == "Observation" && r["code"]["coding"][0]["code"] == "4548-4" {
                let who = r["subject"]["reference"].as_str().unwrap();
                let when = r["effectiveDateTime"].as_str().unwrap();
                let v = r["valueQuantity"]["value"].as_f64().unwrap();
                let e = latest.entry(who).or_insert((when, v));
                if when >= e.0 {
                    *e = (when, v);
                }
            }
        }
        let mean = |d: bool| {
            let v: Vec<f64> = latest
                .iter()
                .filter(|(k, _)| diabetic.contains(**k) == d)
                .map(|(_, (_, v))| *v)
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        assert!(
            mean(true) > mean(false) + 1.0,
            "diabetic HbA1c should be clearly higher"
        );

        let mut by_band = [(0.0, 0.0); 2];
        for r in &patients {
            let year: i32 = r["birthDate"].as_str().unwrap()[..4].parse().unwrap();
            let band = usize::from(2026 - year >= 60);
            let is_d = diabetic.contains(&format!("Patient/{}", r["id"].as_str().unwrap()));
            by_band[band].0 += f64::from(u8::from(is_d));
            by_band[band].1 += 1.0;
        }
        assert!(by_band[1].0 / by_band[1].1 > 1.5 * by_band[0].0 / by_band[0].1);
    }

    #[test]
    fn about_forty_resources_per_patient() {
        let per_patient = collect("chosun", 500, 3).len() as f64 / 500.0;
        assert!((30.0..60.0).contains(&per_patient), "{per_patient}");
    }
}
