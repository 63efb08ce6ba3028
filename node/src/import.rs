//! Importing EHR exports: FHIR NDJSON files and Bundles into the store.
//!
//! Every resource is validated by deserializing it into its fhir-model R4
//! type (fhir-model's R4B module; the resources the node indexes have the same
//! shape in R4 and R4B). A resource that fails is reported with its file,
//! line or entry and the reason, and skipped; the valid ones are written in
//! batches, each batch in one transaction, so an import that fails part way
//! keeps every batch before the failure and no part of the failing one.
//! A transaction Bundle is all-or-nothing, as FHIR defines it.
//!
//! Reasons are redacted so that no value from a resource (a name, a date)
//! appears in a report or a log: only field names and allowed values remain.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use fhir_model::r4b::resources::{
    Condition, Consent, Encounter, MedicationRequest, Observation, ObservationComponent,
    ObservationEffective, ObservationValue, Patient, Resource,
};
use fhir_model::r4b::types::{CodeableConcept, Reference};
use fhir_model::{Date, DateTime};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::store::{
    self, Batch, ConditionCode, ConsentRow, ObservationValue as ObsRow, PatientRow, Store,
    StoredResource,
};

/// An import that could not proceed at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an NDJSON file or a FHIR Bundle/resource JSON file (expected .ndjson or .json)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("writing a batch failed after {committed} resources were committed: {source}")]
    Store {
        committed: u64,
        source: store::Error,
    },
}

/// Where in its file a rejected resource was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of an NDJSON file.
    Line(u64),
    /// 0-based entry index of a Bundle.
    Entry(usize),
    /// The file as a whole (a file that is a single resource or a bad Bundle).
    File,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Entry(n) => write!(f, "entry {n}"),
            Location::File => f.write_str("file"),
        }
    }
}

/// A resource that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub file: PathBuf,
    pub location: Location,
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.location)?;
        if let Some(ty) = &self.resource_type {
            write!(f, " {ty}")?;
            if let Some(id) = &self.id {
                write!(f, "/{id}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub files: usize,
    pub accepted: u64,
    pub batches: u64,
    pub rejected: Vec<Rejection>,
}

/// How an import runs.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Resources per transaction.
    pub batch_size: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { batch_size: 2000 }
    }
}

/// Imports a file, or every `.ndjson` and `.json` file of a directory in name
/// order.
pub fn import_path(
    store: &Store,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let p = entry.path();
            if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("ndjson" | "json")
            ) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut importer = Importer {
        store,
        options,
        batch: Batch::default(),
        batch_keys: HashSet::new(),
        report: ImportReport::default(),
    };
    for file in &files {
        importer.import_file(file)?;
        importer.report.files += 1;
    }
    importer.flush()?;
    Ok(importer.report)
}

struct Importer<'a> {
    store: &'a Store,
    options: &'a ImportOptions,
    batch: Batch,
    batch_keys: HashSet<(String, String)>,
    report: ImportReport,
}

impl Importer<'_> {
    fn import_file(&mut self, path: &Path) -> Result<(), Error> {
        let read_err = |source| Error::Read {
            path: path.to_owned(),
            source,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("ndjson") => {
                let reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(read_err)?);
                for (index, line) in reader.lines().enumerate() {
                    let line = line.map_err(read_err)?;
                    let trimmed = line.trim();
                    if trimmed.is_empty() {
                        continue;
                    }
                    let location = Location::Line(index as u64 + 1);
                    match index_resource(trimmed, &HashMap::new()) {
                        Ok(indexed) => self.add(indexed)?,
                        Err(rejected) => self.reject(path, location, rejected),
                    }
                }
                Ok(())
            }
            Some("json") => {
                let mut text = String::new();
                File::open(path)
                    .and_then(|mut f| f.read_to_string(&mut text))
                    .map_err(read_err)?;
                self.import_json_document(path, &text)
            }
            _ => Err(Error::UnknownFormat {
                path: path.to_owned(),
            }),
        }
    }

    fn import_json_document(&mut self, path: &Path, text: &str) -> Result<(), Error> {
        let head = match serde_json::from_str::<Head<'_>>(text) {
            Ok(head) => head,
            Err(e) => {
                self.reject(
                    path,
                    Location::File,
                    Invalid::new(
                        None,
                        None,
                        format!("not valid JSON: {}", redact(&e.to_string())),
                    ),
                );
                return Ok(());
            }
        };
        if head.resource_type != "Bundle" {
            match index_resource(text, &HashMap::new()) {
                Ok(indexed) => self.add(indexed)?,
                Err(rejected) => self.reject(path, Location::File, rejected),
            }
            return Ok(());
        }
        let bundle: RawBundle<'_> = match serde_json::from_str(text) {
            Ok(b) => b,
            Err(e) => {
                self.reject(
                    path,
                    Location::File,
                    Invalid::new(
                        Some("Bundle"),
                        head.id,
                        format!("not a valid Bundle: {}", redact(&e.to_string())),
                    ),
                );
                return Ok(());
            }
        };
        let kind = bundle.kind.unwrap_or("");
        if !matches!(kind, "collection" | "transaction" | "batch" | "searchset") {
            self.reject(path, Location::File, Invalid::new(Some("Bundle"), head.id, format!("Bundle.type is `{kind}`; expected collection, transaction, batch or searchset")));
            return Ok(());
        }
        // Resolve references to entries by their fullUrl (urn:uuid:... in
        // transactions) to the entries' resource ids.
        let mut full_urls = HashMap::new();
        for entry in &bundle.entry {
            if let (Some(url), Some(resource)) = (entry.full_url, entry.resource)
                && let Ok(h) = serde_json::from_str::<Head<'_>>(resource.get())
                && let Some(id) = h.id
            {
                full_urls.insert(url.to_owned(), format!("{}/{id}", h.resource_type));
            }
        }
        let mut indexed_entries = Vec::new();
        let mut failures = Vec::new();
        for (index, entry) in bundle.entry.iter().enumerate() {
            if let Some(request) = &entry.request
                && request.method != "PUT"
                && request.method != "POST"
            {
                failures.push((
                    index,
                    Invalid::new(
                        None,
                        None,
                        format!(
                            "request.method {} is not supported; expected PUT or POST",
                            request.method
                        ),
                    ),
                ));
                continue;
            }
            let Some(resource) = entry.resource else {
                failures.push((
                    index,
                    Invalid::new(None, None, "entry has no resource".to_owned()),
                ));
                continue;
            };
            match index_resource(resource.get(), &full_urls) {
                Ok(indexed) => indexed_entries.push(indexed),
                Err(invalid) => failures.push((index, invalid)),
            }
        }
        if kind == "transaction" && !failures.is_empty() {
            let first = failures[0].0;
            for (index, invalid) in failures {
                self.reject(path, Location::Entry(index), invalid);
            }
            for indexed in indexed_entries {
                let reason = format!(
                    "not imported: transaction Bundle is all-or-nothing and entry {first} is invalid"
                );
                let invalid = Invalid::new(
                    Some(&indexed.resource.resource_type),
                    Some(&indexed.resource.id),
                    reason,
                );
                // The position of valid entries is not tracked separately;
                // report them against the bundle file.
                self.reject(path, Location::File, invalid);
            }
            return Ok(());
        }
        for (index, invalid) in failures {
            self.reject(path, Location::Entry(index), invalid);
        }
        if kind == "transaction" {
            // A transaction must land in one database transaction.
            self.flush()?;
            for indexed in indexed_entries {
                self.push(indexed);
            }
            self.flush()
        } else {
            for indexed in indexed_entries {
                self.add(indexed)?;
            }
            Ok(())
        }
    }

    fn reject(&mut self, file: &Path, location: Location, invalid: Invalid) {
        tracing::warn!(file = %file.display(), %location, reason = %invalid.reason, "resource rejected");
        self.report.rejected.push(Rejection {
            file: file.to_owned(),
            location,
            resource_type: invalid.resource_type,
            id: invalid.id,
            reason: invalid.reason,
        });
    }

    fn add(&mut self, indexed: Indexed) -> Result<(), Error> {
        let key = (
            indexed.resource.resource_type.clone(),
            indexed.resource.id.clone(),
        );
        // A second version of a resource in one batch would collide with the
        // first in the index tables; the earlier one is written first.
        if self.batch_keys.contains(&key) || self.batch.resources.len() >= self.options.batch_size {
            self.flush()?;
        }
        self.push(indexed);
        Ok(())
    }

    fn push(&mut self, indexed: Indexed) {
        self.batch_keys.insert((
            indexed.resource.resource_type.clone(),
            indexed.resource.id.clone(),
        ));
        self.batch.resources.push(indexed.resource);
        self.batch.patients.extend(indexed.patient);
        self.batch.conditions.extend(indexed.conditions);
        self.batch.observations.extend(indexed.observations);
        self.batch.consents.extend(indexed.consent);
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_keys.clear();
        self.store
            .write_batch(&batch)
            .map_err(|source| Error::Store {
                committed: self.report.accepted,
                source,
            })?;
        self.report.accepted += batch.resources.len() as u64;
        self.report.batches += 1;
        Ok(())
    }
}

/// The first fields of any resource, read without building the resource.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: &'a str,
    #[serde(borrow, default)]
    id: Option<&'a str>,
}

#[derive(Deserialize)]
struct RawBundle<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(default, borrow)]
    entry: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(rename = "fullUrl", borrow, default)]
    full_url: Option<&'a str>,
    #[serde(borrow, default)]
    resource: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request: Option<RawRequest<'a>>,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    method: &'a str,
}

/// A resource and the index rows derived from it.
#[derive(Debug)]
pub(crate) struct Indexed {
    resource: StoredResource,
    patient: Option<PatientRow>,
    conditions: Vec<ConditionCode>,
    observations: Vec<ObsRow>,
    consent: Option<ConsentRow>,
}

/// Why one resource was not accepted.
#[derive(Debug)]
pub(crate) struct Invalid {
    resource_type: Option<String>,
    id: Option<String>,
    reason: String,
}

impl Invalid {
    fn new(resource_type: Option<&str>, id: Option<&str>, reason: String) -> Self {
        Invalid {
            resource_type: resource_type.map(str::to_owned),
            id: id.map(str::to_owned),
            reason,
        }
    }
}

/// Validates one resource's JSON and derives its index rows.
pub(crate) fn index_resource(
    json: &str,
    full_urls: &HashMap<String, String>,
) -> Result<Indexed, Invalid> {
    let head: Head<'_> = serde_json::from_str(json).map_err(|e| {
        Invalid::new(
            None,
            None,
            format!("not valid JSON: {}", redact(&e.to_string())),
        )
    })?;
    let ty = head.resource_type;
    let invalid = |reason: String| Invalid::new(Some(ty), head.id, reason);
    let id = head.id.filter(|id| valid_id(id)).ok_or_else(|| {
        invalid("resource has no valid id (1-64 characters of A-Z a-z 0-9 - .)".to_owned())
    })?;
    let typed = |e: serde_json::Error| invalid(format!("invalid {ty}: {}", redact(&e.to_string())));
    let mut indexed = Indexed {
        resource: StoredResource {
            resource_type: ty.to_owned(),
            id: id.to_owned(),
            patient_id: None,
            content: json.to_owned(),
        },
        patient: None,
        conditions: Vec::new(),
        observations: Vec::new(),
        consent: None,
    };
    let patient_of = |reference: Option<&Reference>| -> Option<String> {
        let r = reference?.reference.as_deref()?;
        let resolved = full_urls.get(r).map(String::as_str).unwrap_or(r);
        let (_, id) = resolved.rsplit_once("Patient/")?;
        Some(id.to_owned())
    };
    match ty {
        "Patient" => {
            let p: Patient = serde_json::from_str(json).map_err(typed)?;
            indexed.patient = Some(PatientRow {
                id: id.to_owned(),
                gender: p
                    .gender
                    .map(|g| g.as_ref().to_owned())
                    .unwrap_or_else(|| "unknown".to_owned()),
                birth_ymd: p.birth_date.as_ref().map(date_ymd),
            });
            indexed.resource.patient_id = Some(id.to_owned());
        }
        "Condition" => {
            let c: Condition = serde_json::from_str(json).map_err(typed)?;
            let patient = patient_of(Some(&c.subject)).ok_or_else(|| {
                invalid("Condition.subject is not a Patient reference".to_owned())
            })?;
            // Refuted and mistaken diagnoses are kept but never counted.
            let excluded = c.verification_status.as_ref().is_some_and(|s| {
                codes(s).any(|(_, code)| code == "refuted" || code == "entered-in-error")
            });
            if !excluded && let Some(code) = &c.code {
                indexed.conditions = codes(code)
                    .map(|(system, code)| ConditionCode {
                        condition_id: id.to_owned(),
                        patient_id: patient.clone(),
                        system: system.to_owned(),
                        code: code.to_owned(),
                    })
                    .collect();
                dedup_codes(&mut indexed.conditions);
            }
            indexed.resource.patient_id = Some(patient);
        }
        "Observation" => {
            let o: Observation = serde_json::from_str(json).map_err(typed)?;
            let patient = patient_of(o.subject.as_ref()).ok_or_else(|| {
                invalid("Observation.subject is not a Patient reference".to_owned())
            })?;
            let status = o.status.as_ref();
            if status != "entered-in-error" && status != "cancelled" {
                let effective_at = match &o.effective {
                    Some(ObservationEffective::DateTime(dt)) => Some(date_time_unix(dt)),
                    Some(ObservationEffective::Instant(i)) => Some(i.0.unix_timestamp()),
                    Some(ObservationEffective::Period(p)) => p.start.as_ref().map(date_time_unix),
                    _ => None,
                };
                let (value, unit) = quantity(o.value.as_ref());
                let mut rows: Vec<ObsRow> = codes(&o.code)
                    .map(|(system, code)| ObsRow {
                        observation_id: id.to_owned(),
                        patient_id: patient.clone(),
                        system: system.to_owned(),
                        code: code.to_owned(),
                        value,
                        unit: unit.clone(),
                        effective_at,
                    })
                    .collect();
                for component in o.component.iter().flatten() {
                    let (value, unit) = component_quantity(component);
                    rows.extend(codes(&component.code).map(|(system, code)| ObsRow {
                        observation_id: id.to_owned(),
                        patient_id: patient.clone(),
                        system: system.to_owned(),
                        code: code.to_owned(),
                        value,
                        unit: unit.clone(),
                        effective_at,
                    }));
                }
                rows.sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
                rows.dedup_by(|a, b| a.system == b.system && a.code == b.code);
                indexed.observations = rows;
            }
            indexed.resource.patient_id = Some(patient);
        }
        "Consent" => {
            let c: Consent = serde_json::from_str(json).map_err(typed)?;
            let patient = patient_of(c.patient.as_ref())
                .ok_or_else(|| invalid("Consent.patient is not a Patient reference".to_owned()))?;
            let scope = codes(&c.scope)
                .map(|(_, code)| code.to_owned())
                .next()
                .unwrap_or_default();
            // No root provision means no permission was given.
            let decision = c
                .provision
                .as_ref()
                .and_then(|p| p.r#type.as_ref())
                .map(|t| t.as_ref().to_owned())
                .unwrap_or_else(|| "deny".to_owned());
            indexed.consent = Some(ConsentRow {
                consent_id: id.to_owned(),
                patient_id: patient.clone(),
                status: c.status.as_ref().to_owned(),
                scope,
                decision,
                recorded_at: c.date_time.as_ref().map(date_time_unix).unwrap_or(0),
            });
            indexed.resource.patient_id = Some(patient);
        }
        "Encounter" => {
            let e: Encounter = serde_json::from_str(json).map_err(typed)?;
            indexed.resource.patient_id = patient_of(e.subject.as_ref());
        }
        "MedicationRequest" => {
            let m: MedicationRequest = serde_json::from_str(json).map_err(typed)?;
            indexed.resource.patient_id = patient_of(Some(&m.subject));
        }
        _ => {
            serde_json::from_str::<Resource>(json).map_err(typed)?;
        }
    }
    Ok(indexed)
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

fn dedup_codes(rows: &mut Vec<ConditionCode>) {
    rows.sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
    rows.dedup_by(|a, b| a.system == b.system && a.code == b.code);
}

fn quantity(value: Option<&ObservationValue>) -> (Option<f64>, Option<String>) {
    match value {
        Some(ObservationValue::Quantity(q)) => (q.value, q.code.clone().or_else(|| q.unit.clone())),
        _ => (None, None),
    }
}

fn component_quantity(component: &ObservationComponent) -> (Option<f64>, Option<String>) {
    use fhir_model::r4b::resources::ObservationComponentValue;
    match &component.value {
        Some(ObservationComponentValue::Quantity(q)) => {
            (q.value, q.code.clone().or_else(|| q.unit.clone()))
        }
        _ => (None, None),
    }
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

fn date_time_unix(dt: &DateTime) -> i64 {
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
        let indexed = index_resource(json, &HashMap::new()).unwrap();
        let patient = indexed.patient.unwrap();
        assert_eq!(
            (patient.gender.as_str(), patient.birth_ymd),
            ("female", Some(19700615))
        );
    }

    #[test]
    fn invalid_resources_are_named_without_their_values() {
        let json = r#"{"resourceType":"Patient","id":"p1","gender":"robot"}"#;
        let err = index_resource(json, &HashMap::new()).unwrap_err();
        assert!(
            err.reason
                .starts_with("invalid Patient: unknown code value …"),
            "{}",
            err.reason
        );
        assert!(!err.reason.contains("robot"));
        let json = r#"{"resourceType":"Condition","id":"c1","code":{"coding":[{"system":"urn:x","code":"E11"}]}}"#;
        let err = index_resource(json, &HashMap::new()).unwrap_err();
        assert!(
            err.reason.contains("missing field `subject`"),
            "{}",
            err.reason
        );
        let err = index_resource(r#"{"resourceType":"Patient"}"#, &HashMap::new()).unwrap_err();
        assert!(err.reason.contains("no valid id"), "{}", err.reason);
    }

    #[test]
    fn observation_components_are_indexed_with_their_own_codes() {
        let json = r#"{"resourceType":"Observation","id":"o1","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},
            "subject":{"reference":"Patient/p1"},"effectiveDateTime":"2025-03-01T09:00:00+09:00",
            "component":[
              {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":128,"code":"mm[Hg]"}},
              {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},"valueQuantity":{"value":82,"code":"mm[Hg]"}}]}"#;
        let indexed = index_resource(json, &HashMap::new()).unwrap();
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
        assert_eq!(indexed.resource.patient_id.as_deref(), Some("p1"));
    }
}
