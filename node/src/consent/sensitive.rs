//! Sensitive categories of diagnosis: data a patient must explicitly consent
//! to before it takes part in any computation.
//!
//! The fixed categories follow Korean practice and the list (mental
//! and behavioural disorders, HIV, sexually transmitted infections, abuse,
//! abortion); rare diseases come from the hospital's policy file. A category
//! is permitted for a patient only by a consent provision that names it, by
//! a security label or by a code inside it (then only for requests within
//! the codes it names); a blanket "permit" does not.
//!
//! Categories are read from KCD-8, WHO ICD-10 and ICD-10-CM codes, which
//! share the three-character categories used here. A diagnosis coded in
//! any other system (SNOMED CT, a local code) cannot be classified without
//! a map, so it is treated as belonging to every category: it takes part
//! only for a patient who named them all, and selecting on it counts as
//! selecting sensitive data. Failing closed keeps a depression coded in
//! SNOMED CT as protected as one coded in KCD-8.
//!
//! Prescriptions say as much as diagnoses: an antiretroviral says HIV, an
//! antipsychotic a mental illness. Prescriptions coded in ATC are
//! classified by the classes below ([`MEDICATION_CLASSES`]), broadly (an
//! antiretroviral class also holds hepatitis B drugs, an antidepressant is
//! also given for pain: failing closed), and a prescription in a sensitive
//! class takes part only for a patient who permits its category, as a
//! diagnosis does. Prescriptions in other systems (HIRA EDI product codes)
//! are not classified yet: that needs a hospital's map (THREATS 4 (7)).
//!
//! Some laboratory tests say a category by being done at all (an HIV viral
//! load): [`OBSERVATION_CODES`] lists them in LOINC, and an observation
//! coded with one is treated as a diagnosis in its category.
//!
//! A resource's category is read from every coding of it, not only the one
//! a query selects it by: a prescription coded in ATC and in EDI is as
//! sensitive as its ATC class when selected by its EDI code, and a
//! diagnosis's ICD-10-family codings classify it whatever other codings it
//! carries ([`SensitiveCodes::sql_condition_bits`]). Every diagnosis and
//! observation selection is tested so; a prescription selected by an ATC
//! code outside every class is taken at its word.

use std::collections::BTreeSet;

use crate::terminology::{ATC, ICD10, ICD10CM, KCD8, LOINC, icd10_family};

/// The system of ghx's own category codes, usable in Consent security labels.
pub const CATEGORY_SYSTEM: &str =
    "https://g-health.gwangju.kr/fhir/CodeSystem/ghx-sensitive-category";
/// HL7 v3 ActCode, whose sensitivity codes consent forms commonly use.
pub const V3_ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// One sensitive category; its bit is used in the consent eligibility table.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    MentalHealth,
    Hiv,
    SexuallyTransmitted,
    Abuse,
    Abortion,
    RareDisease,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::MentalHealth,
        Category::Hiv,
        Category::SexuallyTransmitted,
        Category::Abuse,
        Category::Abortion,
        Category::RareDisease,
    ];

    /// The category's code in [`CATEGORY_SYSTEM`] and in policies.
    pub fn code(self) -> &'static str {
        match self {
            Category::MentalHealth => "mental-health",
            Category::Hiv => "hiv",
            Category::SexuallyTransmitted => "sti",
            Category::Abuse => "abuse",
            Category::Abortion => "abortion",
            Category::RareDisease => "rare-disease",
        }
    }

    /// The HL7 v3 ActCode sensitivity label that also names the category.
    fn v3_label(self) -> Option<&'static str> {
        match self {
            Category::MentalHealth => Some("PSY"),
            Category::Hiv => Some("HIV"),
            Category::SexuallyTransmitted => Some("STD"),
            Category::Abuse => Some("SDV"),
            Category::Abortion => Some("SEX"),
            Category::RareDisease => None,
        }
    }

    pub fn bit(self) -> i64 {
        1 << (self as u8)
    }

    /// The category a security label names, if any.
    pub fn from_label(system: &str, code: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| {
            (system == CATEGORY_SYSTEM && c.code() == code)
                || (system == V3_ACT_CODE && c.v3_label() == Some(code))
        })
    }
}

/// A set of categories as the bit mask stored per patient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CategorySet(pub i64);

impl CategorySet {
    /// Every category.
    pub fn all() -> CategorySet {
        CategorySet(Category::ALL.iter().fold(0, |bits, c| bits | c.bit()))
    }

    pub fn insert(&mut self, category: Category) {
        self.0 |= category.bit();
    }

    pub fn contains(self, category: Category) -> bool {
        self.0 & category.bit() != 0
    }

    pub fn union(self, other: CategorySet) -> CategorySet {
        CategorySet(self.0 | other.0)
    }

    pub fn minus(self, other: CategorySet) -> CategorySet {
        CategorySet(self.0 & !other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Category> {
        Category::ALL.into_iter().filter(move |c| self.contains(*c))
    }
}

/// Which diagnosis codes are sensitive at this hospital.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SensitiveCodes {
    /// Rare-disease codes (KCD-8/ICD-10, normalised, matched as prefixes).
    pub rare_disease_prefixes: Vec<String>,
}

/// Normalised KCD-8/ICD-10 code ranges of the fixed categories, as
/// (category, first, last) over the three-character category code.
const RANGES: &[(Category, &str, &str)] = &[
    (Category::MentalHealth, "F00", "F99"),
    (Category::Hiv, "B20", "B24"),
    (Category::SexuallyTransmitted, "A50", "A64"),
    (Category::Abuse, "T74", "T74"),
    (Category::Abortion, "O04", "O04"),
];

/// ATC classes (or single substances) whose prescription places a patient
/// in a category: HIV antiretrovirals (protease, reverse-transcriptase and
/// integrase inhibitors, HIV combinations, and the HIV-only substances of
/// J05AX, under their current and former codes); antipsychotics,
/// anxiolytics, hypnotics, antidepressants and their combinations,
/// psychostimulants, anti-dementia drugs and drugs for nicotine, alcohol
/// or opioid dependence (the F chapter); mifepristone and its combinations,
/// and gynaecological misoprostol. A chosen list, not a closed
/// classification: a class left out is selectable (THREATS 4 (7)).
pub const MEDICATION_CLASSES: &[(Category, &str)] = &[
    (Category::Hiv, "J05AE"),
    (Category::Hiv, "J05AF"),
    (Category::Hiv, "J05AG"),
    (Category::Hiv, "J05AJ"),
    (Category::Hiv, "J05AR"),
    // Enfuvirtide, raltegravir, maraviroc, elvitegravir, dolutegravir,
    // ibalizumab, fostemsavir, lenacapavir.
    (Category::Hiv, "J05AX07"),
    (Category::Hiv, "J05AX08"),
    (Category::Hiv, "J05AX09"),
    (Category::Hiv, "J05AX11"),
    (Category::Hiv, "J05AX12"),
    (Category::Hiv, "J05AX23"),
    (Category::Hiv, "J05AX29"),
    (Category::Hiv, "J05AX31"),
    (Category::MentalHealth, "N05A"),
    (Category::MentalHealth, "N05B"),
    (Category::MentalHealth, "N05C"),
    (Category::MentalHealth, "N06A"),
    (Category::MentalHealth, "N06B"),
    (Category::MentalHealth, "N06C"),
    (Category::MentalHealth, "N06D"),
    (Category::MentalHealth, "N07BA"),
    (Category::MentalHealth, "N07BB"),
    (Category::MentalHealth, "N07BC"),
    (Category::Abortion, "G03XB"),
    (Category::Abortion, "G02AD06"),
];

/// Laboratory tests whose very presence says a category, in LOINC: HIV
/// antibody, antigen and viral-load tests, and tests for chlamydia,
/// gonorrhoea and syphilis. An observation carrying one of these codings
/// (or a local code the hospital maps to one) takes part only for a patient
/// who permits its category, and selecting on one is selecting sensitive
/// data. A chosen list, not a closed classification: a test left out, or a
/// local code not mapped to LOINC, is selectable (THREATS 4 (7)). CD4
/// counts are left out: they are ordered for other immune conditions.
pub const OBSERVATION_CODES: &[(Category, &str)] = &[
    (Category::Hiv, "7917-8"),
    (Category::Hiv, "5221-7"),
    (Category::Hiv, "29893-5"),
    (Category::Hiv, "31201-7"),
    (Category::Hiv, "56888-1"),
    (Category::Hiv, "68961-2"),
    (Category::Hiv, "75622-1"),
    (Category::Hiv, "10351-5"),
    (Category::Hiv, "20447-9"),
    (Category::Hiv, "25836-8"),
    (Category::Hiv, "62469-2"),
    (Category::SexuallyTransmitted, "21613-5"),
    (Category::SexuallyTransmitted, "43304-5"),
    (Category::SexuallyTransmitted, "24111-7"),
    (Category::SexuallyTransmitted, "43305-2"),
    (Category::SexuallyTransmitted, "20507-0"),
    (Category::SexuallyTransmitted, "5292-8"),
    (Category::SexuallyTransmitted, "22461-8"),
];

/// Whether a (canonical) system is ATC, however its URI is spelled: any
/// system at whocc.no counts, so a spelling without an alias still falls
/// in its classes (failing closed).
pub fn is_atc(system: &str) -> bool {
    system == ATC || system.to_ascii_lowercase().contains("whocc.no")
}

impl SensitiveCodes {
    /// The category of a normalised diagnosis code, if it is sensitive and
    /// classifiable: a code outside the ICD-10 family has none here (so a
    /// consent naming one permits no category), though it is treated as in
    /// every category wherever data is selected.
    pub fn category(&self, system: &str, code: &str) -> Option<Category> {
        if !icd10_family(system) {
            return None;
        }
        let head = code.get(..3).unwrap_or(code);
        if let Some((category, ..)) = RANGES
            .iter()
            .find(|(_, first, last)| head.len() == 3 && head >= *first && head <= *last)
        {
            return Some(*category);
        }
        self.rare_disease_prefixes
            .iter()
            .any(|prefix| code.starts_with(prefix.as_str()))
            .then_some(Category::RareDisease)
    }

    /// Every category a code criterion could select: for a prefix, each
    /// category overlapping the codes it covers.
    pub fn categories_touched(&self, system: &str, code: &str, prefix: bool) -> BTreeSet<Category> {
        if !icd10_family(system) {
            return Category::ALL.into_iter().collect();
        }
        if !prefix {
            return self.category(system, code).into_iter().collect();
        }
        let mut touched = BTreeSet::new();
        for (category, first, last) in RANGES {
            let overlaps = if code.len() >= 3 {
                self.category(system, code) == Some(*category)
            } else {
                code >= &first[..code.len()] && code <= &last[..code.len()]
            };
            if overlaps {
                touched.insert(*category);
            }
        }
        if self
            .rare_disease_prefixes
            .iter()
            .any(|p| p.starts_with(code) || code.starts_with(p.as_str()))
        {
            touched.insert(Category::RareDisease);
        }
        touched
    }

    /// Every category a code of any kind could select, read by its system:
    /// a diagnosis code's, an ATC class's, a listed laboratory test's, and
    /// every category for a code in a system none of these classify (a
    /// product or local code may stand beside a classified coding).
    pub fn any_touched(&self, system: &str, code: &str, prefix: bool) -> BTreeSet<Category> {
        if is_atc(system) {
            self.medication_categories_touched(system, code, prefix)
        } else if system == LOINC {
            self.observation_categories_touched(system, code)
        } else {
            self.categories_touched(system, code, prefix)
        }
    }

    /// Every category a prescription criterion could select: the classes
    /// its ATC code lies in, or for a prefix the classes it overlaps.
    /// Other systems are not classified (none).
    pub fn medication_categories_touched(
        &self,
        system: &str,
        code: &str,
        prefix: bool,
    ) -> BTreeSet<Category> {
        if !is_atc(system) {
            return BTreeSet::new();
        }
        let code = code.trim().to_ascii_uppercase();
        MEDICATION_CLASSES
            .iter()
            .filter(|(_, class)| code.starts_with(class) || (prefix && class.starts_with(&code)))
            .map(|(category, _)| *category)
            .collect()
    }

    /// Whether a prescription selected by `code` could be in a sensitive
    /// class once every coding of it is read: always when selected by a
    /// code outside ATC (the same prescription may carry an ATC coding in a
    /// sensitive class), and when an ATC selection touches one. A selection
    /// by an ATC code outside every sensitive class is taken at its word (a
    /// prescription coded in two ATC classes contradicts itself).
    pub fn medication_may_be_sensitive(&self, system: &str, code: &str, prefix: bool) -> bool {
        !is_atc(system)
            || !self
                .medication_categories_touched(system, code, prefix)
                .is_empty()
    }

    /// Every category an observation criterion or variable selects: that
    /// of its LOINC code, if listed in [`OBSERVATION_CODES`]; none for other
    /// systems (not classified).
    pub fn observation_categories_touched(&self, system: &str, code: &str) -> BTreeSet<Category> {
        if system != LOINC {
            return BTreeSet::new();
        }
        OBSERVATION_CODES
            .iter()
            .filter(|(_, listed)| *listed == code.trim())
            .map(|(category, _)| *category)
            .collect()
    }

    /// A SQL expression giving the category bits of the observation whose
    /// id is the SQL expression `id`, read from every coding of it (and of
    /// its components): the union of its listed LOINC codings' categories.
    /// Codes are literal fragments of [`OBSERVATION_CODES`].
    pub fn sql_observation_bits(&self, id: &str) -> String {
        let mut bit = format!("CASE WHEN ox.system <> '{LOINC}' THEN 0");
        for category in Category::ALL {
            let codes: Vec<String> = OBSERVATION_CODES
                .iter()
                .filter(|(c, _)| *c == category)
                .map(|(_, code)| format!("'{code}'"))
                .collect();
            if !codes.is_empty() {
                bit.push_str(&format!(
                    " WHEN ox.code IN ({}) THEN {}",
                    codes.join(", "),
                    category.bit()
                ));
            }
        }
        bit.push_str(" ELSE 0 END");
        format!(
            "(SELECT COALESCE(SUM(DISTINCT {bit}), 0) FROM observation_values ox \
             WHERE ox.observation_id = {id})"
        )
    }

    /// A SQL expression giving the category bit of the prescription row
    /// aliased `alias` (0 when in no sensitive class, or not in ATC, as
    /// [`is_atc`] reads systems). Classes are literal fragments of
    /// [`MEDICATION_CLASSES`]; one row has at most one bit.
    fn sql_medication_category_bit(alias: &str) -> String {
        let mut sql = format!("CASE WHEN LOWER({alias}.system) NOT LIKE '%whocc.no%' THEN 0");
        for (category, class) in MEDICATION_CLASSES {
            sql.push_str(&format!(
                " WHEN UPPER({alias}.code) LIKE '{class}%' THEN {}",
                category.bit()
            ));
        }
        sql.push_str(" ELSE 0 END");
        sql
    }

    /// A SQL expression giving the category bits of the prescription whose
    /// id is the SQL expression `id`, read from every coding of it: a
    /// prescription coded in ATC and in a hospital's product codes is as
    /// sensitive as its ATC class, however it is selected. Each coding has
    /// at most one bit, so the sum of the distinct bits is their union.
    pub fn sql_medication_bits(&self, id: &str) -> String {
        format!(
            "(SELECT COALESCE(SUM(DISTINCT {}), 0) FROM medication_codes mx \
             WHERE mx.medication_request_id = {id})",
            Self::sql_medication_category_bit("mx")
        )
    }

    /// A SQL expression giving the category bits of the diagnosis whose id
    /// is the SQL expression `id`, read from every coding of it: the union
    /// of its ICD-10-family codings' categories when it has any (a SNOMED CT
    /// coding beside them is read as their translation), and every
    /// category when it has none (unclassifiable, failing closed). So a
    /// diagnosis coded F32 in ICD-10-CM and Z00 in KCD-8 is mental health
    /// whichever code selects it. Rare-disease prefixes are bound through
    /// `param`.
    pub fn sql_condition_bits(&self, id: &str, param: impl FnMut(String) -> String) -> String {
        let icd = format!("cx.system IN ('{KCD8}', '{ICD10}', '{ICD10CM}')");
        format!(
            "(SELECT CASE WHEN MAX(CASE WHEN {icd} THEN 1 ELSE 0 END) = 1 \
             THEN SUM(DISTINCT CASE WHEN {icd} THEN {} ELSE 0 END) ELSE {} END \
             FROM condition_codes cx WHERE cx.condition_id = {id})",
            self.sql_category_bit("cx", param),
            CategorySet::all().0
        )
    }

    /// A SQL expression giving the category bit (0 when not sensitive; every
    /// category's bit for a code outside the ICD-10 family) of the
    /// diagnosis row aliased `alias`: one bit at most for an ICD-10-family
    /// code. Fixed categories are literal fragments; rare-disease prefixes
    /// are bound through `param`.
    fn sql_category_bit(&self, alias: &str, mut param: impl FnMut(String) -> String) -> String {
        let mut sql = format!(
            "CASE WHEN {alias}.system NOT IN ('{KCD8}', '{ICD10}', '{ICD10CM}') THEN {}",
            CategorySet::all().0
        );
        for (category, first, last) in RANGES {
            // Codes are stored without dots, so a three-character range
            // covers every subcode: `F32` <= `F329` < `F9:` (':' follows '9').
            let upper = format!("{last}:");
            sql.push_str(&format!(
                " WHEN {alias}.code >= '{first}' AND {alias}.code < '{upper}' THEN {}",
                category.bit()
            ));
        }
        for prefix in &self.rare_disease_prefixes {
            let p = param(format!("{prefix}%"));
            sql.push_str(&format!(
                " WHEN {alias}.code LIKE {p} THEN {}",
                Category::RareDisease.bit()
            ));
        }
        sql.push_str(" ELSE 0 END");
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes() -> SensitiveCodes {
        SensitiveCodes {
            rare_disease_prefixes: vec!["E752".into(), "G122".into()],
        }
    }

    #[test]
    fn every_code_system_is_classified_or_treated_as_every_category() {
        // Issue 38 (7): ICD-10-CM shares the ICD-10 categories.
        let s = codes();
        assert_eq!(s.category(ICD10CM, "F329"), Some(Category::MentalHealth));
        assert_eq!(
            s.categories_touched(ICD10CM, "F3", true),
            [Category::MentalHealth].into_iter().collect()
        );
        // SNOMED CT 35489007 (depressive disorder) cannot be classified
        // without a map: it counts as every category where data is
        // selected, and a consent naming it permits none.
        let snomed = "http://snomed.info/sct";
        assert_eq!(
            s.categories_touched(snomed, "35489007", false).len(),
            Category::ALL.len()
        );
        assert_eq!(s.category(snomed, "35489007"), None);
    }

    #[test]
    fn fixed_ranges_and_rare_diseases_are_recognised() {
        let s = codes();
        assert_eq!(s.category(KCD8, "F329"), Some(Category::MentalHealth));
        assert_eq!(s.category(KCD8, "F00"), Some(Category::MentalHealth));
        assert_eq!(s.category(ICD10, "B24"), Some(Category::Hiv));
        assert_eq!(s.category(KCD8, "B25"), None);
        assert_eq!(s.category(KCD8, "A64"), Some(Category::SexuallyTransmitted));
        assert_eq!(s.category(KCD8, "A65"), None);
        assert_eq!(s.category(KCD8, "T741"), Some(Category::Abuse));
        assert_eq!(s.category(KCD8, "O049"), Some(Category::Abortion));
        assert_eq!(s.category(KCD8, "E7521"), Some(Category::RareDisease));
        assert_eq!(s.category(KCD8, "E119"), None);
        assert_eq!(s.category("http://loinc.org", "F32"), None);
    }

    #[test]
    fn prefixes_touch_every_category_they_could_select() {
        let s = codes();
        let touched = |code| s.categories_touched(KCD8, code, true);
        assert_eq!(touched("F"), BTreeSet::from([Category::MentalHealth]));
        assert_eq!(touched("E11"), BTreeSet::new());
        assert_eq!(touched("E"), BTreeSet::from([Category::RareDisease]));
        assert_eq!(touched("B2"), BTreeSet::from([Category::Hiv]));
        assert_eq!(
            touched("A"),
            BTreeSet::from([Category::SexuallyTransmitted])
        );
        assert_eq!(
            touched("A6"),
            BTreeSet::from([Category::SexuallyTransmitted])
        );
        assert_eq!(touched("").len(), Category::ALL.len());
    }

    #[test]
    fn prescriptions_in_sensitive_classes_are_classified() {
        let codes = codes();
        let touched = |code: &str, prefix| {
            codes
                .medication_categories_touched(ATC, code, prefix)
                .into_iter()
                .collect::<Vec<_>>()
        };
        // Dolutegravir/lamivudine (J05AR25): HIV; sertraline (N06AB06):
        // mental health; metformin (A10BA02): none.
        assert_eq!(touched("J05AR25", false), [Category::Hiv]);
        assert_eq!(touched("n06ab06", false), [Category::MentalHealth]);
        assert!(touched("A10BA02", false).is_empty());
        // HIV-only substances among other antivirals: maraviroc is HIV,
        // aciclovir (J05AB01) and baloxavir (J05AX25) are not; an
        // olanzapine/fluoxetine combination and donepezil are mental
        // health; a mifepristone combination is abortion.
        assert_eq!(touched("J05AX09", false), [Category::Hiv]);
        assert!(touched("J05AB01", false).is_empty());
        assert!(touched("J05AX25", false).is_empty());
        assert_eq!(touched("J05AX", true), [Category::Hiv]);
        assert_eq!(touched("N06CA03", false), [Category::MentalHealth]);
        assert_eq!(touched("N06DA02", false), [Category::MentalHealth]);
        assert_eq!(touched("G03XB51", false), [Category::Abortion]);
        // A prefix over a class, or inside one, touches it.
        assert_eq!(touched("J05", true), [Category::Hiv]);
        assert_eq!(touched("N0", true), [Category::MentalHealth]);
        assert_eq!(touched("G03XB", true), [Category::Abortion]);
        assert!(touched("J01", true).is_empty());
        // ATC under a spelling with no alias still counts; other systems
        // are not classified here (a hospital's map would).
        assert_eq!(
            codes
                .medication_categories_touched("https://www.whocc.no/ATC/", "J05AR25", false)
                .into_iter()
                .collect::<Vec<_>>(),
            [Category::Hiv]
        );
        assert!(
            codes
                .medication_categories_touched("http://example.org/edi", "J05AR25", false)
                .is_empty()
        );
        // Selected by a code outside ATC, a prescription may still carry
        // an ATC coding in a class: its bits are read from every coding.
        assert!(codes.medication_may_be_sensitive("http://example.org/edi", "645", false));
        assert!(!codes.medication_may_be_sensitive(ATC, "J01", true));
        let sql = codes.sql_medication_bits("m.medication_request_id");
        assert!(sql.contains("LIKE 'J05AR%' THEN 2"), "{sql}");
    }

    #[test]
    fn laboratory_tests_that_say_a_category_are_classified() {
        let s = codes();
        assert_eq!(
            s.observation_categories_touched(LOINC, "20447-9")
                .into_iter()
                .collect::<Vec<_>>(),
            [Category::Hiv]
        );
        assert!(s.observation_categories_touched(LOINC, "4548-4").is_empty());
        let sql = s.sql_observation_bits("o.observation_id");
        assert!(sql.contains("'20447-9'"), "{sql}");
        assert!(sql.contains("'43304-5'"), "{sql}");
    }

    #[test]
    fn labels_name_categories_in_both_systems() {
        assert_eq!(
            Category::from_label(V3_ACT_CODE, "PSY"),
            Some(Category::MentalHealth)
        );
        assert_eq!(
            Category::from_label(CATEGORY_SYSTEM, "rare-disease"),
            Some(Category::RareDisease)
        );
        assert_eq!(Category::from_label(V3_ACT_CODE, "rare-disease"), None);
    }
}
