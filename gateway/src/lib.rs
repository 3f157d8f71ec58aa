//! Inference gateway: the userspace half. A thread-per-core monoio reverse
//! proxy for HTTP/1.1 and HTTP/2 inference traffic.
//!
//! - process and threads: [`server`] (start, reload, drain), [`worker`]
//!   (what one worker thread owns), [`listener`] (accept);
//! - protocol drivers: [`http1`] and [`http2`] (h2c), each handing every
//!   request to the pipeline through a [`downstream::Downstream`];
//! - the request pipeline, [`pipeline`], and its stages in request order:
//!   [`route`] → [`authn`] → [`validate`] → [`authz`] → [`ratelimit`] →
//!   [`balance`] → [`upstream`] (backend connections: [`pool`]); in front of
//!   it all, [`xdp`] at the NIC and at accept, and [`tls`];
//! - configuration, one way: [`config`] parses and checks plain settings
//!   data (it imports no stage), [`generation`] builds the stages that load
//!   files (TLS, authentication) from it, and each stage takes its own slice;
//! - support: [`io`], [`codec`], [`metrics`], [`fetch`], [`x509`], [`error`],
//!   [`telemetry`], [`catalog`], [`filter`], [`admin`], [`cli`].
#![deny(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod catalog;
pub mod cli;
pub mod codec;
pub mod config;
pub mod downstream;
pub mod error;
pub mod fetch;
pub mod filter;
pub mod generation;
pub mod http1;
pub mod http2;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod pool;
pub mod ratelimit;
pub mod revocations;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod syntax;
pub mod task;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod validate;
pub mod worker;
pub mod x509;
pub mod xdp;
