//! Inference gateway: the userspace half. A thread-per-core monoio reverse
//! proxy for HTTP/1.1 inference traffic.
//!
//! The request pipeline is assembled in [`pipeline`], in request order:
//! [`xdp`] (at the NIC, and at accept) → [`listener`] → [`tls`] → [`codec`] → [`route`] →
//! [`authn`] → [`validate`] → [`authz`] → [`ratelimit`] → [`balance`] → [`upstream`].
//!
//! Configuration flows one way: [`config`] parses and checks plain settings
//! data (it imports no stage), [`generation`] builds the stages that load
//! files (TLS, authentication) from it, and each stage takes its own slice.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod catalog;
pub mod cli;
pub mod codec;
pub mod config;
pub mod error;
pub mod fetch;
pub mod filter;
pub mod generation;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod ratelimit;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod validate;
pub mod worker;
pub mod x509;
pub mod xdp;
