//! What the node's data is coded in, and the notes that say so when a
//! query's codes cannot match here because the node holds another system
//! (issue 40: a KCD-8 query over ICD-10-CM data answered zeros with no word
//! of why).
//!
//! A note names only code systems ghx knows (KCD-8, WHO ICD-10, ICD-10-CM,
//! SNOMED CT, LOINC, HIRA EDI, ATC) and whether the node holds any
//! diagnoses, labs or prescriptions in them: hospital facts, never a code or
//! a count. Which of them the node holds is probed on the code indexes
//! (a seek per system and table), once per data generation.

use std::collections::BTreeSet;
use std::sync::Mutex;

use ghx_study::query::{CodeMatch, QuerySpec};

use crate::store::{self, Store};
use crate::terminology::{self, ATC, HIRA_EDI, ICD10, ICD10CM, KCD8, LOINC, SNOMED};

/// Known systems and their names in notes.
const NAMES: &[(&str, &str)] = &[
    (KCD8, "KCD-8"),
    (ICD10, "WHO ICD-10"),
    (ICD10CM, "ICD-10-CM"),
    (SNOMED, "SNOMED CT"),
    (LOINC, "LOINC"),
    (HIRA_EDI, "HIRA EDI"),
    (ATC, "ATC"),
];

fn name(system: &str) -> Option<&'static str> {
    NAMES.iter().find(|(s, _)| *s == system).map(|(_, n)| *n)
}

/// (resource type, canonical system) pairs the node's index holds, of the
/// systems ghx knows.
type Held = BTreeSet<(String, String)>;

/// The systems held, cached per data generation.
#[derive(Debug, Default)]
pub(crate) struct HeldSystems {
    cache: Mutex<Option<(i64, Held)>>,
}

impl HeldSystems {
    fn held(&self, store: &Store) -> Result<Held, store::Error> {
        let generation = store.data_generation()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, held)) = &*cache
            && *g == generation
        {
            return Ok(held.clone());
        }
        let mut held = Held::new();
        for ty in ["Condition", "Observation", "MedicationRequest"] {
            for (system, _) in NAMES {
                if store.holds_code_system(ty, system)? {
                    held.insert((ty.to_owned(), (*system).to_owned()));
                }
            }
        }
        *cache = Some((generation, held.clone()));
        Ok(held)
    }

    /// A note for each coded part of `spec` that can match nothing here
    /// because of the system it is in.
    pub(crate) fn notes(
        &self,
        store: &Store,
        spec: &QuerySpec,
    ) -> Result<Vec<String>, store::Error> {
        let held = self.held(store)?;
        let mut notes = BTreeSet::new();
        for read in spec.codes_read() {
            let system = terminology::canonical_system(read.system);
            let holds = |s: &str| held.contains(&(read.resource_type.to_owned(), s.to_owned()));
            // Only systems ghx knows: whether a hospital holds anything in
            // a system a requester names is not told.
            let Some(asked) = name(system) else {
                continue;
            };
            if holds(system) {
                continue;
            }
            let code = terminology::normalize_code(system, read.code);
            // Only a prefix (`E11*`) reaches another system's subcodes.
            let category =
                read.matching == CodeMatch::Prefix && terminology::is_category(system, &code);
            let shared = terminology::sharing_category(system);
            if category && shared.iter().any(|s| holds(s)) {
                continue;
            }
            let others: Vec<&str> = held
                .iter()
                .filter(|(ty, _)| ty == read.resource_type)
                .filter_map(|(_, s)| name(s))
                .collect();
            let mut note = format!(
                "coding: no {} at this node is coded in {asked}",
                read.resource_type
            );
            if others.is_empty() {
                note.push_str(" (nor in another system ghx knows)");
            } else {
                note.push_str(&format!("; they are coded in {}", others.join(", ")));
                if shared.iter().any(|s| holds(s)) {
                    note.push_str(
                        "; only ICD-10 categories (three characters, like E11) match across KCD-8, WHO ICD-10 and ICD-10-CM",
                    );
                }
                if read.resource_type == "Condition" && others.contains(&"SNOMED CT") {
                    note.push_str(
                        "; SNOMED CT diagnoses answer KCD-8 codes once the hospital loads a SNOMED CT to KCD-8 map",
                    );
                }
            }
            notes.insert(note);
        }
        Ok(notes.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{ImportOptions, import_path};

    fn spec(system: &str, code: &str, matching: &str) -> QuerySpec {
        let json = format!(
            r#"{{"version":"ghx.query/v1","cohort":{{"as_of":"2026-01-01","conditions":[
                {{"system":"{system}","code":"{code}","match":"{matching}"}}]}},"analysis":{{"kind":"count"}}}}"#
        );
        QuerySpec::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_query_in_a_system_the_node_does_not_hold_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("n.db").to_str().unwrap()).unwrap();
        let file = dir.path().join("cm.ndjson");
        std::fs::write(
            &file,
            [
                r#"{"resourceType":"Patient","id":"p1","gender":"female"}"#,
                r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/p1"},"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"E11.65"}]}}"#,
                r#"{"resourceType":"Condition","id":"c2","subject":{"reference":"Patient/p1"},"code":{"coding":[{"system":"http://snomed.info/sct","code":"38341003"}]}}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        import_path(&store, &file, &ImportOptions::default()).unwrap();
        let held = HeldSystems::default();
        // E11* reaches ICD-10-CM at the category: no note.
        assert!(
            held.notes(&store, &spec(KCD8, "E11", "prefix"))
                .unwrap()
                .is_empty()
        );
        // An exact subcode does not cross systems: said, with what is held.
        let notes = held.notes(&store, &spec(KCD8, "E11.9", "exact")).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("coding: no Condition at this node is coded in KCD-8; they are coded in ICD-10-CM, SNOMED CT")
                && notes[0].contains("only ICD-10 categories")
                && notes[0].contains("SNOMED CT to KCD-8 map"),
            "{}",
            notes[0]
        );
        // A system a requester names that ghx does not know gets no note
        // either way: whether anything is coded in it is not told.
        assert!(
            held.notes(&store, &spec("urn:local:hiv-lab", "X1", "exact"))
                .unwrap()
                .is_empty()
        );
        assert!(
            held.notes(&store, &spec(SNOMED, "38341003", "exact"))
                .unwrap()
                .is_empty()
        );
    }
}
