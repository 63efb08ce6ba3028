//! Expected answers computed directly from NDJSON exports.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use serde_json::Value;
use time::{Date, OffsetDateTime, format_description::well_known::Rfc3339};

/// One hospital's export, reduced to what the count queries need.
#[derive(Debug, Default)]
pub struct Export {
    /// Patient id -> (gender, birth date).
    pub patients: HashMap<String, (String, Option<Date>)>,
    /// Patient id -> recorded (system, code) pairs, refuted ones excluded.
    pub conditions: HashMap<String, HashSet<(String, String)>>,
    /// Patient id -> research consents as (time, status, decision).
    pub research_consents: HashMap<String, Vec<(i64, String, String)>>,
    /// Patient id -> (LOINC code, effective Unix time, value) of observations
    /// with a quantity value.
    pub observations: HashMap<String, Vec<(String, i64, f64)>>,
    /// Patient id -> (class code, start Unix time) of encounters.
    pub encounters: HashMap<String, Vec<(String, i64)>>,
    /// Patient id -> (ATC code, authored Unix time) of prescriptions.
    pub medications: HashMap<String, Vec<(String, i64)>>,
    /// Whether the hospital counts patients who have no research consent
    /// at all (an opt-out hospital). Set by the caller; false by default.
    pub opt_out: bool,
}

fn lines(path: &Path) -> Vec<Value> {
    if !path.exists() {
        return Vec::new();
    }
    let file = std::fs::File::open(path).expect("open ndjson");
    std::io::BufReader::new(file)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read line")).expect("valid json"))
        .collect()
}

fn patient_of(reference: &Value) -> String {
    reference["reference"]
        .as_str()
        .and_then(|r| r.strip_prefix("Patient/"))
        .expect("Patient reference")
        .to_owned()
}

impl Export {
    /// Reads `<dir>/Patient.ndjson`, `Condition.ndjson` and `Consent.ndjson`.
    pub fn read(dir: &Path) -> Export {
        let mut export = Export::default();
        for p in lines(&dir.join("Patient.ndjson")) {
            let birth = p["birthDate"].as_str().map(|s| {
                Date::parse(s, &time::format_description::well_known::Iso8601::DATE)
                    .expect("birthDate")
            });
            export.patients.insert(
                p["id"].as_str().unwrap().to_owned(),
                (p["gender"].as_str().unwrap_or("unknown").to_owned(), birth),
            );
        }
        for c in lines(&dir.join("Condition.ndjson")) {
            let refuted = c["verificationStatus"]["coding"]
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|x| x["code"] == "refuted" || x["code"] == "entered-in-error")
                });
            if refuted {
                continue;
            }
            let codes = export
                .conditions
                .entry(patient_of(&c["subject"]))
                .or_default();
            for coding in c["code"]["coding"].as_array().into_iter().flatten() {
                codes.insert((
                    coding["system"].as_str().unwrap().to_owned(),
                    coding["code"].as_str().unwrap().to_owned(),
                ));
            }
        }
        let instant = |v: &Value| -> i64 {
            let s = v.as_str().expect("a date or dateTime");
            OffsetDateTime::parse(s, &Rfc3339).map_or_else(
                |_| {
                    Date::parse(s, &time::format_description::well_known::Iso8601::DATE)
                        .expect("date")
                        .midnight()
                        .assume_utc()
                        .unix_timestamp()
                },
                |t| t.unix_timestamp(),
            )
        };
        for o in lines(&dir.join("Observation.ndjson")) {
            let Some(value) = o["valueQuantity"]["value"].as_f64() else {
                continue;
            };
            export
                .observations
                .entry(patient_of(&o["subject"]))
                .or_default()
                .push((
                    o["code"]["coding"][0]["code"].as_str().unwrap().to_owned(),
                    instant(&o["effectiveDateTime"]),
                    value,
                ));
        }
        for e in lines(&dir.join("Encounter.ndjson")) {
            export
                .encounters
                .entry(patient_of(&e["subject"]))
                .or_default()
                .push((
                    e["class"]["code"].as_str().unwrap().to_owned(),
                    instant(&e["period"]["start"]),
                ));
        }
        for m in lines(&dir.join("MedicationRequest.ndjson")) {
            export
                .medications
                .entry(patient_of(&m["subject"]))
                .or_default()
                .push((
                    m["medicationCodeableConcept"]["coding"][0]["code"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    instant(&m["authoredOn"]),
                ));
        }
        for k in lines(&dir.join("Consent.ndjson")) {
            let is_research = k["scope"]["coding"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["code"] == "research");
            if !is_research {
                continue;
            }
            let at = OffsetDateTime::parse(k["dateTime"].as_str().unwrap(), &Rfc3339)
                .expect("consent dateTime")
                .unix_timestamp();
            let decision = k["provision"]["type"].as_str().unwrap_or("deny").to_owned();
            export
                .research_consents
                .entry(patient_of(&k["patient"]))
                .or_default()
                .push((at, k["status"].as_str().unwrap().to_owned(), decision));
        }
        export
    }

    /// Whether the patient's latest research consent decision is an active
    /// permit, or, at an opt-out hospital, they have none.
    pub fn research_permitted(&self, patient: &str) -> bool {
        let Some(consents) = self.research_consents.get(patient) else {
            return self.opt_out;
        };
        let decisive: Vec<_> = consents
            .iter()
            .filter(|(_, status, _)| matches!(status.as_str(), "active" | "inactive" | "rejected"))
            .collect();
        let Some(latest) = decisive.iter().map(|(t, _, _)| *t).max() else {
            return self.opt_out;
        };
        decisive
            .iter()
            .any(|(t, status, decision)| *t == latest && status == "active" && decision == "permit")
    }

    /// Consenting patients with a condition coded `system` starting with
    /// `prefix`, counted by (sex, ten-year age band at `as_of`).
    pub fn count_by_sex_and_band(
        &self,
        system: &str,
        prefix: &str,
        as_of: Date,
    ) -> BTreeMap<(String, String), u64> {
        let mut counts = BTreeMap::new();
        for (id, (gender, birth)) in &self.patients {
            if !self.research_permitted(id) {
                continue;
            }
            let has = self.conditions.get(id).is_some_and(|codes| {
                codes
                    .iter()
                    .any(|(s, c)| s == system && c.starts_with(prefix))
            });
            if !has {
                continue;
            }
            let band = match birth {
                None => "unknown".to_owned(),
                Some(b) if *b > as_of => continue,
                Some(b) => band_label(age_at(*b, as_of)),
            };
            *counts.entry((gender.clone(), band)).or_insert(0) += 1;
        }
        counts
    }
}

impl Export {
    /// Whether the patient has a condition coded `system` starting with `prefix`.
    pub fn has_condition(&self, patient: &str, system: &str, prefix: &str) -> bool {
        self.conditions.get(patient).is_some_and(|codes| {
            codes
                .iter()
                .any(|(s, c)| s == system && c.replace('.', "").starts_with(prefix))
        })
    }

    /// The patient's latest value of a LOINC code.
    pub fn latest_value(&self, patient: &str, code: &str) -> Option<f64> {
        self.observations
            .get(patient)?
            .iter()
            .filter(|(c, _, _)| c == code)
            .max_by_key(|(_, at, _)| *at)
            .map(|(_, _, v)| *v)
    }

    /// Consenting patients born on or before `as_of` who satisfy `keep`.
    pub fn cohort<'a>(
        &'a self,
        as_of: Date,
        keep: impl Fn(&str, &str, Option<Date>) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a str, &'a str, Option<Date>)> + 'a {
        self.patients
            .iter()
            .filter_map(move |(id, (gender, birth))| {
                let born = birth.is_none_or(|b| b <= as_of);
                (born && self.research_permitted(id) && keep(id, gender, *birth)).then_some((
                    id.as_str(),
                    gender.as_str(),
                    *birth,
                ))
            })
    }
}

/// Completed years between `birth` and `at`, by the calendar.
pub fn age_at(birth: Date, at: Date) -> i32 {
    let mut age = at.year() - birth.year();
    if (at.month() as u8, at.day()) < (birth.month() as u8, birth.day()) {
        age -= 1;
    }
    age
}

fn band_label(age: i32) -> String {
    if age >= 90 {
        "90+".to_owned()
    } else {
        let low = age / 10 * 10;
        format!("{low}-{}", low + 9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn ages_follow_the_calendar() {
        assert_eq!(age_at(date!(1970 - 06 - 15), date!(2026 - 06 - 14)), 55);
        assert_eq!(age_at(date!(1970 - 06 - 15), date!(2026 - 06 - 15)), 56);
        assert_eq!(band_label(89), "80-89");
        assert_eq!(band_label(90), "90+");
    }
}
