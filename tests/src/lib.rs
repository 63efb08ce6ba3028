//! Helpers for the whole-federation tests: an independent reference
//! computation over the synthetic NDJSON, an attacker of cell suppression,
//! throwaway PostgreSQL databases and the `suite!` that runs one test on
//! both backends, a stand-in OpenTelemetry collector and a TCP relay that
//! can cut links.
//!
//! The reference deliberately shares no code with the node: it reads the raw
//! NDJSON with serde_json and computes ages with calendar arithmetic, so a
//! bug in the node's import, index or SQL shows up as a mismatch.

#![forbid(unsafe_code)]

pub mod attack;
pub mod backend;
pub mod collector;
pub mod consented;
pub mod postgres;
pub mod proxy;
pub mod reference;

/// A count of patients with a type 2 diabetes (KCD-8 E11) diagnosis.
pub const E11_COUNT: &str = r#"{"version":"ghx.query/v1","cohort":{"as_of":"2026-01-01","conditions":[{"system":"http://www.hl7korea.or.kr/CodeSystem/kostat-kcd-8","code":"E11","match":"prefix"}]},"analysis":{"kind":"count"}}"#;
