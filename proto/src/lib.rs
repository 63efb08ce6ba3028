//! The ghx gRPC contract, package `ghx.v1`, as generated tonic/prost code.
//!
//! Key decision: the generated code is checked in (`src/gen/`) instead of being
//! produced by a build script, so a fresh machine builds without `protoc` and
//! the build graph stays small. The test `generated_code_is_current` regenerates
//! the code with a pure-Rust protobuf compiler and fails when the `.proto` files
//! and the checked-in code disagree; run it with `GHX_UPDATE_PROTO=1` to rewrite
//! the checked-in code after editing a `.proto` file.
//!
//! Wire types stay in this crate; [`convert`] is the one place released
//! results cross between their domain types (`ghx-study`) and the wire, used
//! by the node to send and by the coordinator to receive and to answer.
//! Domain types never derive prost.

#![forbid(unsafe_code)]

/// Version 1 of the ghx wire contract.
pub mod v1 {
    #![allow(unreachable_pub, clippy::all, missing_docs)]
    include!("gen/ghx.v1.rs");
}

pub mod convert;
pub mod round;

/// The gRPC metadata key under which a keeper sends its signed audit head
/// (a checkpoint token over the last entry it committed) for the other side
/// to witness: the coordinator on every request to a node, a node on every
/// response to the coordinator.
pub const AUDIT_HEAD_METADATA: &str = "ghx-audit-head";
