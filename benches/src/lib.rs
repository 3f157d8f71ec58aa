//! The pieces of `loadbench`, the side-by-side load harness: the backend
//! directly, the gateway, HAProxy and nginx, each proxy on one core, all
//! driven by `wrk`. The binary (`src/bin/loadbench.rs`) runs them in rounds.
//!
//! - [`procs`]: child processes that die with the harness, readiness probes,
//!   CPU time from /proc, CPU pinning, Ctrl-C.
//! - [`targets`]: config files and launch commands for each server.
//! - [`wrk`]: one wrk run, its Lua reporting script and its JSON summary.
//! - [`report`]: medians, the table, `results.json`, `throughput.svg`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod procs;
pub mod report;
pub mod targets;
pub mod wrk;

/// Errors in the harness are for a person to read; a string says it all.
pub type Result<T = ()> = std::result::Result<T, String>;
