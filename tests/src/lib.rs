//! Helpers for the whole-federation tests: an independent reference
//! computation over the synthetic NDJSON, and throwaway PostgreSQL databases.
//!
//! The reference deliberately shares no code with the node: it reads the raw
//! NDJSON with serde_json and computes ages with calendar arithmetic, so a
//! bug in the node's import, index or SQL shows up as a mismatch.

#![forbid(unsafe_code)]

pub mod consented;
pub mod postgres;
pub mod reference;
