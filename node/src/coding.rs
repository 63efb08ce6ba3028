//! What the node's data is coded in, and the notes that say so when a
//! query's codes cannot match here because the node holds another system
//! (issue 40: a KCD-8 query over ICD-10-CM data answered zeros with no word
//! of why).
//!
//! A note names only code systems ghx knows (KCD-8, WHO ICD-10, ICD-10-CM,
//! SNOMED CT, LOINC, HIRA EDI, ATC) and whether the node holds any
//! diagnoses, labs or prescriptions in them: hospital facts, never a code or
//! a count. The systems held are read once per data generation.

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

/// (resource type, canonical system) pairs the node's index holds.
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
        let held: Held = store.held_code_systems()?.into_iter().collect();
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
