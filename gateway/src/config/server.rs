//! `[server]`, `[admin]`, `[log]`, `[limits]` and `[timeouts]`: the process,
//! its listeners, and what a client may send and for how long.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{duration, Sink};

/// Upper bound for `limits.max_headers` (the header array lives on the stack).
pub const MAX_HEADERS: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses the proxy listens on; every worker binds each with SO_REUSEPORT.
    pub listen: Vec<String>,
    /// `"auto"` (one per online CPU) or a number.
    pub workers: Workers,
    /// Pin worker N to the Nth CPU the process may run on.
    pub pin_workers: bool,
    /// `auto` (io_uring, falling back to epoll), `io_uring` or `epoll`.
    pub driver: DriverChoice,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// After SIGTERM/SIGINT, `/readyz` answers 503 this long before the
    /// listeners stop accepting (load balancers and endpoint lists lag
    /// behind readiness).
    #[serde(deserialize_with = "duration")]
    pub drain_delay: Duration,
    /// Client connections allowed at once, over all workers.
    pub max_connections: usize,
    /// Bytes of read buffer per connection side (client, upstream).
    pub buffer_size: usize,
    /// Keep a client-supplied `X-Forwarded-For` and append to it (only behind a trusted L4 balancer).
    pub trust_forwarded_headers: bool,
    /// Listen backlog per worker socket.
    pub backlog: i32,
    /// Backend host names are re-resolved this often; a change reloads the
    /// configuration (a Kubernetes headless Service). "0s" = only at start.
    #[serde(deserialize_with = "duration")]
    pub dns_refresh: Duration,
    /// HTTP/2 without TLS (h2c, prior knowledge) on the plaintext
    /// listeners: a connection opening with the HTTP/2 preface is served
    /// as HTTP/2 (`[http2]`), any other as HTTP/1.1.
    pub h2c: bool,
}

/// `[http2]`: limits of an HTTP/2 client connection. A connection that
/// breaks them is closed with GOAWAY and counted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Settings {
    /// Streams open at once per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Decoded header list of one request, bytes (SETTINGS_MAX_HEADER_LIST_SIZE;
    /// HEADERS + CONTINUATION past it: refused, the connection closed).
    pub max_header_list_size: u32,
    /// HPACK dynamic table the client may make us keep (SETTINGS_HEADER_TABLE_SIZE).
    pub header_table_size: u32,
    /// Flow-control windows: per stream and per connection, bytes a client
    /// may send ahead of what the gateway has read.
    pub stream_window: u32,
    pub connection_window: u32,
    /// Response bytes buffered per stream for a slow reader.
    pub max_send_buffer: usize,
    /// Rapid reset (CVE-2023-44487): streams reset by the client before the
    /// gateway took them; more → GOAWAY.
    pub max_pending_resets: usize,
    /// Streams the gateway had to reset for a client's errors; more → GOAWAY.
    pub max_error_resets: usize,
    /// A connection with no open stream this long is closed (GOAWAY).
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: 128,
            max_header_list_size: 16 * 1024,
            header_table_size: 4096,
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_send_buffer: 256 * 1024,
            max_pending_resets: 20,
            max_error_resets: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["127.0.0.1:8080".into()],
            workers: Workers::Auto,
            pin_workers: true,
            driver: DriverChoice::Auto,
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            max_connections: 10_000,
            buffer_size: 64 * 1024,
            trust_forwarded_headers: false,
            backlog: 1024,
            dns_refresh: Duration::from_secs(30),
            h2c: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(usize),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n >= 1 => Ok(Workers::Count(n as usize)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "workers = {n}: use \"auto\" or a number of at least 1"
            ))),
            Raw::S(s) if s == "auto" => Ok(Workers::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "workers = \"{s}\": use \"auto\" or a number of at least 1"
            ))),
        }
    }
}

impl Workers {
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    Auto,
    #[serde(alias = "iouring", alias = "io-uring")]
    #[value(name = "io_uring", alias = "io-uring", alias = "iouring")]
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`); keep it on loopback.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9901".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// `[tracing]`: OpenTelemetry traces over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector, `host:port` ("" = no tracing). Changes need a restart.
    pub otlp_endpoint: String,
    /// Its OTLP/HTTP traces path.
    pub otlp_path: String,
    /// Requests traced when the client sent no sampled `traceparent`, 0 to 1
    /// (a client's sampled `traceparent` is always followed).
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped and counted.
    pub max_queue: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: String::new(),
            otlp_path: "/v1/traces".into(),
            sample_ratio: 0.1,
            service_name: "gateway".into(),
            max_queue: 4096,
        }
    }
}

pub(super) fn check_tracing(t: &TracingConfig, sink: &mut Sink) {
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        sink.err("tracing.sample_ratio", "a fraction from 0 to 1");
    }
    if !t.otlp_endpoint.is_empty() {
        use std::net::ToSocketAddrs;
        if t.otlp_endpoint
            .to_socket_addrs()
            .map_or(true, |mut a| a.next().is_none())
        {
            sink.err(
                "tracing.otlp_endpoint",
                "must be host:port of an OTLP/HTTP collector, e.g. \"127.0.0.1:4318\"",
            );
        }
        if !t.otlp_path.starts_with('/') || t.max_queue == 0 {
            sink.err(
                "tracing",
                "otlp_path must start with `/` and max_queue be at least 1",
            );
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `gateway=debug`, … (`RUST_LOG` overrides it).
    pub level: String,
    /// One `access` event per request.
    pub access_log: bool,
    /// Audit events (authz denials, key revocations, blocks, escalations,
    /// TLS reloads) go to this file, lossless, instead of stdout ("" = stdout).
    pub audit_file: String,
    /// The audit file is rotated at this size (`audit.log.1` … `.N`).
    pub audit_max_bytes: u64,
    /// Rotated audit files kept.
    pub audit_keep: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
            access_log: true,
            audit_file: String::new(),
            audit_max_bytes: 100 << 20,
            audit_keep: 5,
        }
    }
}

/// Limits on what a client may send. Each has a safe default and is enforced by the codec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes of request line + headers; over it → 431 (or 414 when the request line alone is over `max_uri_bytes`).
    pub max_header_bytes: usize,
    /// Number of request headers; over it → 431.
    pub max_headers: usize,
    /// Bytes of request target; over it → 414.
    pub max_uri_bytes: usize,
    /// Bytes of request body; over it → 413. Routes may override.
    pub max_request_body_bytes: u64,
    /// Bytes of an upstream response head; over it → 502.
    pub max_response_header_bytes: usize,
    /// Headers in an upstream response head; over it → 502.
    pub max_response_headers: usize,
    /// JSON request bodies are read whole to be checked: at most this many bytes → 413.
    pub max_json_body_bytes: u64,
    /// Deepest nesting of a JSON body → 400.
    pub json_max_depth: usize,
    /// Most values (of any kind) in a JSON body → 413.
    pub json_max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_request_body_bytes: 64 * 1024 * 1024,
            max_response_header_bytes: 32 * 1024,
            max_response_headers: 128,
            max_json_body_bytes: 16 * 1024 * 1024,
            json_max_depth: 64,
            json_max_elements: 2 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its head (slowloris guard) → 408 + close.
    #[serde(deserialize_with = "duration")]
    pub client_header: Duration,
    /// At `max_connections`: a request head still incomplete this long after
    /// its first byte is closed to make room (so are idle keep-alive
    /// connections), instead of holding a place for `client_header`.
    #[serde(deserialize_with = "duration")]
    pub client_header_overload: Duration,
    /// How long a keep-alive client connection may sit idle between requests.
    #[serde(deserialize_with = "duration")]
    pub client_idle: Duration,
    /// Longest gap between two reads of a request body → 408 + close.
    #[serde(deserialize_with = "duration")]
    pub client_body: Duration,
    /// TCP connect to a backend → next backend, then 502.
    #[serde(deserialize_with = "duration")]
    pub upstream_connect: Duration,
    /// From the request sent to the response head, and longest gap between response body reads → 504.
    #[serde(deserialize_with = "duration")]
    pub upstream_response: Duration,
    /// Whole exchange, request head to last response byte → 504 (0 = no limit).
    #[serde(deserialize_with = "duration")]
    pub total: Duration,
    /// Longest a write to a client or a backend may make no progress (a peer
    /// that stopped reading) before the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub send: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(10),
            client_header_overload: Duration::from_secs(1),
            client_idle: Duration::from_secs(60),
            client_body: Duration::from_secs(60),
            upstream_connect: Duration::from_secs(2),
            upstream_response: Duration::from_secs(300),
            total: Duration::from_secs(0),
            send: Duration::from_secs(60),
        }
    }
}

/// `server.listen` and `admin.listen`, parsed and checked, with the rest of
/// `[server]` and `[log]`. `tls_listen` is `tls.listen` (either may be the
/// only listener). Returns the plaintext addresses and the admin address.
pub(super) fn check_server(
    server: &ServerConfig,
    admin: &AdminConfig,
    log: &LogConfig,
    tls_listen: &[String],
    sink: &mut Sink,
) -> (Vec<SocketAddr>, SocketAddr) {
    let (listen, admin) = check_listen(server, admin, tls_listen, sink);
    if server.max_connections == 0 {
        sink.err("server.max_connections", "must be at least 1");
    }
    if server.buffer_size < 4096 || server.buffer_size > 16 * 1024 * 1024 {
        sink.err(
            "server.buffer_size",
            "must be between 4096 and 16777216 bytes",
        );
    }
    if server.backlog < 1 {
        sink.err("server.backlog", "must be at least 1");
    }
    if server.shutdown_grace.is_zero() {
        sink.err("server.shutdown_grace", "must be more than 0, e.g. \"30s\"");
    }
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        sink.err(
            "log.level",
            format!(
                "`{}` is not a filter; use e.g. \"info\" or \"gateway=debug\"",
                log.level
            ),
        );
    }
    (listen, admin)
}

fn check_listen(
    server: &ServerConfig,
    admin: &AdminConfig,
    tls_listen: &[String],
    sink: &mut Sink,
) -> (Vec<SocketAddr>, SocketAddr) {
    let mut listen = Vec::new();
    if server.listen.is_empty() && tls_listen.is_empty() {
        sink.err(
            "server.listen",
            "give at least one address, e.g. [\"0.0.0.0:8080\"] (or tls.listen)",
        );
    }
    for (i, a) in server.listen.iter().enumerate() {
        match a.parse::<SocketAddr>() {
            Ok(sa) => listen.push(sa),
            Err(_) => sink.err(
                format!("server.listen[{i}]"),
                format!("`{a}` is not an IP:port such as \"0.0.0.0:8080\""),
            ),
        }
    }
    let admin = match admin.listen.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            sink.err(
                "admin.listen",
                format!(
                    "`{}` is not an IP:port such as \"127.0.0.1:9901\"",
                    admin.listen
                ),
            );
            "127.0.0.1:0".parse().unwrap()
        }
    };
    if listen.contains(&admin) {
        sink.err(
            "admin.listen",
            "the admin listener must not share an address with server.listen",
        );
    }
    (listen, admin)
}

/// `[limits]` on the request head, against the read buffer.
pub(super) fn check_head_limits(l: &Limits, buffer_size: usize, sink: &mut Sink) {
    for (k, v, min) in [
        ("limits.max_header_bytes", l.max_header_bytes, 256usize),
        ("limits.max_headers", l.max_headers, 4),
        ("limits.max_response_headers", l.max_response_headers, 4),
        ("limits.max_uri_bytes", l.max_uri_bytes, 16),
        (
            "limits.max_response_header_bytes",
            l.max_response_header_bytes,
            256,
        ),
    ] {
        if v < min {
            sink.err(k, format!("must be at least {min}"));
        }
    }
    for (k, v) in [
        ("limits.max_headers", l.max_headers),
        ("limits.max_response_headers", l.max_response_headers),
    ] {
        if v > MAX_HEADERS {
            sink.err(k, format!("must be at most {MAX_HEADERS}"));
        }
    }
    for (k, v) in [
        ("limits.max_header_bytes", l.max_header_bytes),
        (
            "limits.max_response_header_bytes",
            l.max_response_header_bytes,
        ),
    ] {
        if v > buffer_size {
            sink.err(
                k,
                format!("must not exceed server.buffer_size ({buffer_size})"),
            );
        }
    }
    if l.max_uri_bytes > l.max_header_bytes {
        sink.err(
            "limits.max_uri_bytes",
            "must not exceed limits.max_header_bytes",
        );
    }
}

/// `[limits]` on JSON bodies.
pub(super) fn check_json_limits(l: &Limits, sink: &mut Sink) {
    if l.json_max_depth == 0 || l.json_max_depth > 1024 {
        sink.err("limits.json_max_depth", "must be between 1 and 1024");
    }
    if l.json_max_elements == 0 {
        sink.err("limits.json_max_elements", "must be at least 1");
    }
}

/// `[timeouts]`: every one but `total` must be above zero.
pub(super) fn check_timeouts(t: &Timeouts, sink: &mut Sink) {
    for (k, v) in [
        ("timeouts.client_header", t.client_header),
        ("timeouts.client_header_overload", t.client_header_overload),
        ("timeouts.client_idle", t.client_idle),
        ("timeouts.client_body", t.client_body),
        ("timeouts.upstream_connect", t.upstream_connect),
        ("timeouts.upstream_response", t.upstream_response),
        ("timeouts.send", t.send),
    ] {
        if v.is_zero() {
            sink.err(k, "must be more than 0");
        }
    }
}
