//! How an export looks when another tool made it (issue 40): diagnoses in
//! ICD-10-CM or SNOMED CT instead of KCD-8, no Consent resources, and the
//! noise real exports carry (lab values with many decimals, extensions ghx
//! does not know, resources repeated in a second file). The data stay the
//! same patients; only their form changes, so tests and the demo exercise
//! the import paths that form takes.

use serde_json::Value;

/// The code system diagnoses are written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Coding {
    /// KR Core: KCD-8 (the default).
    #[default]
    Kcd8,
    /// The United States' ICD-10-CM (same codes for the conditions here).
    Icd10Cm,
    /// SNOMED CT concepts (answer KCD-8 queries through a loaded map).
    Snomed,
}

impl std::str::FromStr for Coding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kcd8" => Ok(Coding::Kcd8),
            "icd10cm" => Ok(Coding::Icd10Cm),
            "snomed" => Ok(Coding::Snomed),
            other => Err(format!(
                "unknown coding `{other}`; expected kcd8, icd10cm or snomed"
            )),
        }
    }
}

/// ICD-10-CM's system URI.
pub(crate) const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
/// SNOMED CT's system URI.
pub(crate) const SNOMED: &str = "http://snomed.info/sct";

/// SNOMED CT concepts for the KCD-8 categories the generator writes, and
/// the map a hospital would load (`snomed_code,kcd_code`).
pub const SNOMED_TO_KCD: &[(&str, &str)] = &[
    ("44054006", "E11"),
    ("38341003", "I10"),
    ("55822004", "E78"),
];

/// The form of the export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub coding: Coding,
    /// Leave out every Consent resource.
    pub no_consents: bool,
    /// Long decimals, unknown extensions, duplicates across files.
    pub noise: bool,
}

impl Shape {
    /// Rewrites one resource; `None` drops it.
    pub(crate) fn apply(&self, mut resource: Value) -> Option<Value> {
        let ty = resource["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if self.no_consents && ty == "Consent" {
            return None;
        }
        if ty == "Condition" && self.coding != Coding::Kcd8 {
            for coding in resource["code"]["coding"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                let code = coding["code"].as_str().unwrap_or_default().to_owned();
                match self.coding {
                    Coding::Icd10Cm => coding["system"] = Value::from(ICD10CM),
                    Coding::Snomed => {
                        let category = code.get(..3).unwrap_or_default();
                        if let Some((sct, _)) = SNOMED_TO_KCD.iter().find(|(_, k)| *k == category) {
                            coding["system"] = Value::from(SNOMED);
                            coding["code"] = Value::from(*sct);
                        }
                    }
                    Coding::Kcd8 => {}
                }
            }
        }
        if self.noise {
            if let Some(value) = resource
                .pointer_mut("/valueQuantity/value")
                .filter(|v| v.is_f64())
            {
                // What a generator's floating point writes: 16 digits.
                let v = value.as_f64().unwrap_or_default();
                *value = Value::from(v + v * 1.37e-13);
            }
            if let Some(object) = resource.as_object_mut() {
                object.entry("extension").or_insert_with(|| {
                    serde_json::json!([{
                        "url": "http://example.org/fhir/StructureDefinition/generator-run",
                        "valueString": "synthetic export"
                    }])
                });
            }
        }
        Some(resource)
    }

    /// Whether a stored resource is also written to the type's second file.
    pub(crate) fn duplicate(&self, resource: &Value) -> bool {
        self.noise
            && resource["resourceType"] == "Patient"
            && resource["id"]
                .as_str()
                .is_some_and(|id| id.bytes().last().is_some_and(|b| b % 7 == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_rewrite_coding_drop_consents_and_add_noise() {
        let condition = json!({"resourceType": "Condition", "id": "c",
            "code": {"coding": [{"system": crate::KCD8, "code": "E11.9"}]}});
        let cm = Shape {
            coding: Coding::Icd10Cm,
            ..Shape::default()
        };
        assert_eq!(
            cm.apply(condition.clone()).unwrap()["code"]["coding"][0]["system"],
            ICD10CM
        );
        let sct = Shape {
            coding: Coding::Snomed,
            ..Shape::default()
        };
        let coded = sct.apply(condition).unwrap();
        assert_eq!(coded["code"]["coding"][0]["code"], "44054006");
        let none = Shape {
            no_consents: true,
            ..Shape::default()
        };
        assert!(
            none.apply(json!({"resourceType": "Consent", "id": "k"}))
                .is_none()
        );
        let noisy = Shape {
            noise: true,
            ..Shape::default()
        };
        let obs = noisy
            .apply(
                json!({"resourceType": "Observation", "id": "o", "valueQuantity": {"value": 6.5}}),
            )
            .unwrap();
        let text = obs["valueQuantity"]["value"].to_string();
        assert!(text.len() >= 15, "{text}");
        assert!(obs["extension"][0]["url"].is_string());
    }
}
