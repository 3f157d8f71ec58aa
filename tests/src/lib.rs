//! Shared integration-test harness: the real gateway binary ([`gateway`]), a
//! real HTTP/1.1 backend ([`backend`]) and a raw client ([`client`]). Tests
//! under `tests/tests/` read as scenarios built from these.

pub mod backend;
pub mod chaos;
pub mod client;
pub mod gateway;
pub mod gpusim;
pub mod jwt;
pub mod netns;
pub mod packet;
pub mod redis;
pub mod tls;

pub use backend::Backend;
pub use client::{curl_h2c, request, Client, Response};
pub use gateway::{one_cluster, Driver, Gateway, Spec};
