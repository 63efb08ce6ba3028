//! Code systems the node recognises, and how codes are normalised so that a
//! query matches however a hospital's EHR spelled a code.
//!
//! KR Core names diagnoses in KCD-8 (the Korean extension of ICD-10) and
//! labs in LOINC or HIRA EDI procedure codes. KCD-8 and ICD-10 codes are
//! compared without their dot and in upper case (`e11.9` = `E119`), and a few
//! alternative spellings of the same code system are mapped to one URI.

use std::borrow::Cow;

pub const KCD8: &str = "http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8";
pub const ICD10: &str = "http://hl7.org/fhir/sid/icd-10";
/// ICD-10-CM (the United States' clinical modification): the same
/// three-character categories as WHO ICD-10 and KCD-8 for every category
/// ghx treats as sensitive, with longer subcodes.
pub const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const LOINC: &str = "http://loinc.org";
/// SNOMED CT: diagnoses in it answer KCD-8 queries through a map the
/// hospital loads (`ghx node load-code-map --kind snomed-kcd`).
pub const SNOMED: &str = "http://snomed.info/sct";
/// HIRA EDI procedure codes, which KR Core uses for laboratory tests.
pub const HIRA_EDI: &str = "http://www.hl7korea.or.kr/CodeSystem/hira-edi-procedure";
/// WHO ATC, the classification prescriptions are coded in here.
pub const ATC: &str = "http://www.whocc.no/atc";

/// Other spellings seen for the same code systems.
const ALIASES: &[(&str, &str)] = &[
    (
        "http://www.hl7korea.or.kr/fhir/krcore/CodeSystem/kostat-kcd-8",
        KCD8,
    ),
    ("https://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8", KCD8),
    ("urn:oid:2.16.840.1.113883.6.3", ICD10),
    ("http://hl7.org/fhir/sid/icd-10-who", ICD10),
    ("urn:oid:2.16.840.1.113883.6.1", LOINC),
    ("https://loinc.org", LOINC),
    ("http://loinc.org/", LOINC),
    (
        "http://www.hl7korea.or.kr/fhir/krcore/CodeSystem/hira-edi-procedure",
        HIRA_EDI,
    ),
    ("urn:oid:2.16.840.1.113883.6.73", ATC),
    ("http://www.whocc.no/atc/", ATC),
    ("https://www.whocc.no/atc", ATC),
];

/// The canonical URI of a code system.
pub fn canonical_system(system: &str) -> &str {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == system)
        .map(|(_, canonical)| *canonical)
        .unwrap_or(system)
}

/// Whether `system` (canonical) is KCD-8, WHO ICD-10 or ICD-10-CM, whose
/// codes share the ICD-10 categories and are written alike.
pub fn icd10_family(system: &str) -> bool {
    system == KCD8 || system == ICD10 || system == ICD10CM
}

/// The concept layer for diagnoses: the other systems whose codes answer a
/// query in `system` at the ICD-10 category level (the first three
/// characters, `E11`). KCD-8, WHO ICD-10 and ICD-10-CM share every
/// three-character category: KCD-8 is WHO ICD-10 with Korean fourth and
/// fifth characters added (and a few Korean-only categories, U codes for
/// Korean medicine among them, that simply match nothing elsewhere), and
/// ICD-10-CM keeps WHO's categories but divides them differently below
/// (E11.65 exists only in ICD-10-CM, and a fourth character can mean
/// another thing: WHO E11.6 "with other specified complications" is
/// subdivided in ICD-10-CM into E11.61-E11.69). So only categories cross
/// systems; a longer code matches its own system only. SNOMED CT is not
/// here: it answers through the map a hospital loads.
pub fn sharing_category(system: &str) -> &'static [&'static str] {
    match system {
        KCD8 => &[ICD10, ICD10CM],
        ICD10 => &[KCD8, ICD10CM],
        ICD10CM => &[KCD8, ICD10],
        _ => &[],
    }
}

/// Whether a normalised code of `system` is a whole ICD-10 category (or
/// chapter-level prefix of one): at most three characters.
pub fn is_category(system: &str, code: &str) -> bool {
    icd10_family(system) && !code.is_empty() && code.len() <= 3
}

/// A code in the form it is indexed and compared in.
pub fn normalize_code<'a>(system: &str, code: &'a str) -> Cow<'a, str> {
    let code = code.trim();
    // ATC codes are upper case (a lower-case one must still fall in its
    // class, THREATS 4 (7)).
    if system == ATC && code.bytes().any(|b| b.is_ascii_lowercase()) {
        return Cow::Owned(code.to_ascii_uppercase());
    }
    if icd10_family(system) && code.bytes().any(|b| b == b'.' || b.is_ascii_lowercase()) {
        return Cow::Owned(
            code.chars()
                .filter(|c| *c != '.')
                .map(|c| c.to_ascii_uppercase())
                .collect(),
        );
    }
    Cow::Borrowed(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atc_codes_and_systems_have_one_spelling() {
        assert_eq!(canonical_system("urn:oid:2.16.840.1.113883.6.73"), ATC);
        assert_eq!(canonical_system("http://www.whocc.no/atc/"), ATC);
        assert_eq!(normalize_code(ATC, " j05ar25 "), "J05AR25");
        assert_eq!(normalize_code(ATC, "A10BA02"), "A10BA02");
    }

    #[test]
    fn kcd_codes_compare_without_dots_and_case() {
        assert_eq!(normalize_code(KCD8, "E11.9"), "E119");
        assert_eq!(normalize_code(KCD8, " e11.9 "), "E119");
        assert_eq!(normalize_code(KCD8, "E119"), "E119");
        assert_eq!(normalize_code(LOINC, "4548-4"), "4548-4");
        assert_eq!(canonical_system("urn:oid:2.16.840.1.113883.6.1"), LOINC);
        assert_eq!(canonical_system("urn:other"), "urn:other");
    }
}
