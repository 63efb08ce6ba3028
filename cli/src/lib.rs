//! The `ghx` command's library: the in-process local federation that
//! `ghx demo`, `ghx bench` and the whole-federation tests share, result
//! rendering, the coordinator connection every client makes, and the files
//! `ghx audit` reads and writes.
//! The binary (`main.rs`) parses arguments (`args.rs`) and hands each
//! command to its module under `cmd/`.

#![forbid(unsafe_code)]

pub mod audit_files;
pub mod bench;
pub mod bench_exchange;
pub mod bench_train;
pub mod client;
pub mod exchange;
pub mod local_federation;
pub mod render;
pub mod training_report;
