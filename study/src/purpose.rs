//! Purposes of use: the HL7 v3 ActReason codes a study may state, so that a
//! hospital's policies and its patients' consents can refer to them.

/// The ActReason code system.
pub const SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// The purposes ghx accepts, as (code, meaning).
pub const KNOWN: &[(&str, &str)] = &[
    ("HRESCH", "healthcare research"),
    ("CLINTRCH", "clinical trial research"),
    ("PUBHLTH", "public health"),
    ("HQUALIMP", "healthcare quality improvement"),
    ("HOPERAT", "healthcare operations"),
    ("HMARKT", "healthcare marketing"),
    ("TREAT", "treatment"),
];

/// A purpose code ghx does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown purpose `{0}`; expected an HL7 v3 ActReason code such as HRESCH (healthcare research) or PUBHLTH (public health)"
)]
pub struct UnknownPurpose(pub String);

/// Checks that `code` is a known purpose.
pub fn check(code: &str) -> Result<&'static str, UnknownPurpose> {
    KNOWN
        .iter()
        .find(|(known, _)| *known == code)
        .map(|(known, _)| *known)
        .ok_or_else(|| UnknownPurpose(code.to_owned()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_codes_pass_and_free_text_is_refused() {
        assert_eq!(super::check("HRESCH"), Ok("HRESCH"));
        let err = super::check("research").unwrap_err();
        assert!(err.to_string().contains("HRESCH"), "{err}");
    }
}
