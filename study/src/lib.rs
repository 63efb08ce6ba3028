//! What the node and the coordinator must agree on, in domain types: the ghx
//! query language, the capability that authorises one approved query, and the
//! released aggregate results with their combination.
//!
//! Key decision: this crate is the single definition of these meanings. The
//! coordinator validates a requester's query with [`query::QuerySpec::parse`]
//! and the node validates what it receives with the same function, so the two
//! can never disagree about what a query means. Nothing here knows about gRPC
//! or storage.

#![forbid(unsafe_code)]

pub mod capability;
pub mod lineage;
pub mod manifest;
pub mod purpose;
pub mod query;
pub mod result;
pub mod training;
