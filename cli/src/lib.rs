//! The `ghx` command's library: the in-process local federation that
//! `ghx demo`, `ghx bench` and the whole-federation tests share, result
//! rendering, and the files `ghx audit` reads and writes.
//! The binary (`main.rs`) only parses arguments and calls into the crates.

#![forbid(unsafe_code)]

pub mod audit_files;
pub mod bench;
pub mod bench_train;
pub mod local_federation;
pub mod render;
pub mod training_report;
