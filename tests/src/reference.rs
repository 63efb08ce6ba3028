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
