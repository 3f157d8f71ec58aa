//! `[clusters.X]`: backend pools, their connection pools and how each picks
//! a backend (`[clusters.X.balance]`, for the balance stage).

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, valid_name, Sink};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each backend, resolved at load.
    pub backends: Vec<String>,
    /// Idle keep-alive connections kept per backend per worker.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// An idle pooled connection older than this is closed. Keep it under the
    /// backend's own keep-alive timeout (uvicorn, under vLLM, closes after 5 s).
    #[serde(default = "default_pool_idle_timeout", deserialize_with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Open connections (in use + idle) to each backend, per worker. At the
    /// limit a request tries the next backend, then waits up to the connect
    /// timeout for a free one, then gets 503 + Retry-After.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How a backend is picked (`[clusters.X.balance]`), health and load signals.
    #[serde(default)]
    pub balance: BalanceSettings,
    /// Flow control (`[clusters.X.queue]`): when every backend is
    /// saturated, requests wait here instead of being answered 503.
    #[serde(default)]
    pub queue: Option<QueueSettings>,
    /// TLS to the backends (`[clusters.X.tls]`; absent: plaintext).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// The HTTP version HTTP routes speak to the backends: "1.1" (pooled
    /// keep-alive connections), "2" (HTTP/2 over TLS, ALPN `h2`: needs
    /// `[clusters.X.tls]`) or "h2c" (HTTP/2 in cleartext, prior
    /// knowledge). HTTP/2 multiplexes every request of a worker to a
    /// backend over one connection. gRPC routes always use HTTP/2.
    #[serde(default)]
    pub http: UpstreamHttp,
    /// HTTP/2 to the backends (`http = "2"` / `"h2c"`, and gRPC routes):
    /// requests multiplexed on one connection before the worker opens
    /// another to the same backend (up to `max_connections`).
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: usize,
}

fn default_max_streams_per_connection() -> usize {
    100
}

/// `[clusters.X] http`: see [`ClusterConfig::http`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum UpstreamHttp {
    #[default]
    #[serde(rename = "1.1")]
    Http1,
    #[serde(rename = "2")]
    H2,
    #[serde(rename = "h2c")]
    H2c,
}

impl UpstreamHttp {
    /// HTTP/2 (over TLS or cleartext).
    pub fn is_h2(self) -> bool {
        self != UpstreamHttp::Http1
    }
}

/// `[clusters.X.tls]`: the backends speak TLS (a service mesh, a managed
/// endpoint). Paths are relative to the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs the backends' certificates must chain to.
    pub ca: Option<std::path::PathBuf>,
    /// The name the certificates must carry (and the SNI sent); default:
    /// the host of the cluster's first backend.
    pub server_name: Option<String>,
    /// Mutual TLS to the backends: the gateway's certificate chain and key (PEM).
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
    /// Check the backends' certificates (false: any certificate is taken,
    /// for a lab only: the traffic is then open to interception).
    pub verify: bool,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            ca: None,
            server_name: None,
            client_cert: None,
            client_key: None,
            verify: true,
        }
    }
}

/// `[clusters.X.queue]`: one logical queue per cluster, shared by every
/// worker. Bands by priority (higher first, strictly); within a band, fair
/// shares between flows (deficit round robin on estimated tokens); within a
/// flow, arrival order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Requests waiting, every band together; one more → 429 + Retry-After.
    pub max_requests: usize,
    /// Request bytes held by waiting requests (bodies read for validation,
    /// else their declared length); over it → 429 + Retry-After.
    pub max_bytes: u64,
    /// Waited this long without a backend taking it → 503 + Retry-After.
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Who shares a band fairly: each `tenant`, each `principal`, or `none`
    /// (one flow: arrival order).
    pub fairness: Fairness,
    /// The `x-gateway-priority: N` header may lower a request's band (never
    /// raise it above what its route or tenant class gives it).
    pub client_priority: bool,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max_requests: 1024,
            max_bytes: 64 << 20,
            max_wait: Duration::from_secs(30),
            fairness: Fairness::Tenant,
            client_priority: false,
        }
    }
}

/// Whose requests share a queue band fairly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fairness {
    #[default]
    Tenant,
    Principal,
    None,
}

fn default_max_connections() -> usize {
    512
}

fn default_pool_max_idle() -> usize {
    64
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(4)
}

/// How a cluster picks a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastRequest,
    GieLike,
    GpuAware,
    /// The endpoint picker's prefix-cache scorers (prefix weight 3, queue 2,
    /// KV 2; approximate prefix index only): a comparator for the bench.
    GiePrefix,
    /// `gpu_aware`'s expected completion time plus the prefill of what the
    /// backend doesn't hold (for this request, and as the stall it puts on
    /// the requests running there), among the backends that don't finish
    /// it far later than the soonest: sticky to where the prefix is until
    /// waiting there costs more than a miss elsewhere.
    PrefixAware,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastRequest => "least_request",
            Algorithm::GieLike => "gie_like",
            Algorithm::GpuAware => "gpu_aware",
            Algorithm::GiePrefix => "gie_prefix",
            Algorithm::PrefixAware => "prefix_aware",
        }
    }

    /// Uses the model servers' own metrics.
    pub fn scrapes(self) -> bool {
        !matches!(self, Algorithm::RoundRobin | Algorithm::LeastRequest)
    }

    /// Routes on the prompt's prefix (needs its blocks hashed).
    pub fn uses_prefix(self) -> bool {
        matches!(self, Algorithm::GiePrefix | Algorithm::PrefixAware)
    }
}

/// Which metric names a backend's `/metrics` uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Vllm,
    Sglang,
    Tgi,
    Triton,
    /// No metrics endpoint: local signals only.
    None,
}

/// `[clusters.X]` balancing settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceSettings {
    pub algorithm: Algorithm,
    pub engine: Engine,
    /// Scraped every `metrics_interval` (gie_like, gpu_aware); "0s" = never.
    pub metrics_path: String,
    #[serde(deserialize_with = "duration")]
    pub metrics_interval: Duration,
    /// Metrics older than this are ignored, not trusted.
    #[serde(deserialize_with = "duration")]
    pub metrics_max_age: Duration,
    /// Active health check: GET this path every `health_interval` ("" = none).
    pub health_path: String,
    #[serde(deserialize_with = "duration")]
    pub health_interval: Duration,
    /// A backend with this many requests queued is saturated (skipped; all saturated → 503).
    pub queue_saturation: u32,
    /// A backend whose KV cache is at least this full is saturated.
    pub kv_saturation: f64,
    /// Requests in flight to one backend from this gateway (every worker);
    /// at it the backend is saturated. 0: no cap.
    pub max_inflight: u32,
    /// Consecutive failures (connect errors, 5xx) that eject a backend.
    pub eject_after: u32,
    /// First ejection; doubled on each one in a row, up to `max_ejection`.
    #[serde(deserialize_with = "duration")]
    pub ejection: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_ejection: Duration,
    /// A new (or re-admitted) backend's share ramps up over this long.
    #[serde(deserialize_with = "duration")]
    pub warmup: Duration,
    /// Retries (an idempotent request whose backend closed or reset before
    /// answering, sent to another backend) as a fraction of requests...
    pub retry_budget: f64,
    /// ...plus this many always available when traffic is low.
    pub retry_reserve: u32,
    /// Prefix-aware algorithms: KV blocks (16 tokens) each backend caches,
    /// until its engine reports its own (`vllm:cache_config_info`
    /// `num_gpu_blocks`); sizes the gateway's index of what it sent where.
    pub prefix_cache_blocks: u32,
    /// Prefill time per 1,000 prompt tokens on the fastest backend, until
    /// measured (time to first token of uncached prompts).
    #[serde(deserialize_with = "duration")]
    pub prefill_per_1k_tokens: Duration,
    /// `prefix_aware`: how much a cache miss counts against a backend
    /// beyond its own prefill: × the requests running there, whose steps
    /// the prefill stalls (1.0: their delay counts as much as this
    /// request's). Higher: more cache hits; 0: each request minds only its
    /// own time.
    pub prefix_stickiness: f64,
    /// `prefix_aware`: never a backend whose expected completion time is
    /// over (1 + this) × the soonest backend's (unless it is within the
    /// fastest backend's mean latency anyway), however much its cache
    /// saves: the guard for end-to-end tails.
    pub prefix_max_slowdown: f64,
    /// Prefix-aware algorithms: share what was sent where with the other
    /// gateways through the fleet's Redis (`[ratelimit.redis]`, when set),
    /// so a fleet keeps each prefix where the first gateway put it.
    pub prefix_fleet_sync: bool,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        BalanceSettings {
            algorithm: Algorithm::RoundRobin,
            engine: Engine::Vllm,
            metrics_path: "/metrics".into(),
            metrics_interval: Duration::from_millis(100),
            metrics_max_age: Duration::from_millis(500),
            health_path: String::new(),
            health_interval: Duration::from_secs(5),
            queue_saturation: 64,
            kv_saturation: 0.98,
            max_inflight: 0,
            eject_after: 5,
            ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(120),
            warmup: Duration::from_secs(10),
            retry_budget: 0.2,
            retry_reserve: 10,
            prefix_cache_blocks: 16_384,
            prefill_per_1k_tokens: Duration::from_millis(50),
            prefix_stickiness: 2.0,
            prefix_max_slowdown: 0.5,
            prefix_fleet_sync: true,
        }
    }
}

/// `[clusters]`, checked: every backend address each cluster resolves to.
pub(super) fn check_clusters(
    clusters: &BTreeMap<String, ClusterConfig>,
    sink: &mut Sink,
) -> BTreeMap<String, Vec<SocketAddr>> {
    let mut resolved = BTreeMap::new();
    for (name, c) in clusters {
        let key = format!("clusters.{name}");
        if !valid_name(name) {
            sink.err(
                key.clone(),
                "cluster names use letters, digits, '-', '_' and '.'",
            );
        }
        if c.backends.is_empty() {
            sink.err(
                format!("{key}.backends"),
                "give at least one backend, e.g. [\"10.0.0.5:8000\"]",
            );
        }
        if c.max_streams_per_connection == 0 {
            sink.err(
                format!("{key}.max_streams_per_connection"),
                "must be at least 1",
            );
        }
        if c.max_connections == 0 {
            sink.err(format!("{key}.max_connections"), "must be at least 1");
        }
        if c.pool_max_idle > c.max_connections {
            sink.err(
                format!("{key}.pool_max_idle"),
                format!("must not exceed max_connections ({})", c.max_connections),
            );
        }
        if c.pool_idle_timeout.is_zero() {
            sink.err(format!("{key}.pool_idle_timeout"), "must be more than 0");
        }
        let mut addrs = Vec::new();
        for (i, b) in c.backends.iter().enumerate() {
            match resolve_all(b) {
                Ok(a) => {
                    for x in a {
                        if !addrs.contains(&x) {
                            addrs.push(x);
                        }
                    }
                }
                Err(m) => sink.err(format!("{key}.backends[{i}]"), m),
            }
        }
        resolved.insert(name.clone(), addrs);
        check_balance(&key, &c.balance, sink);
        if let Some(t) = &c.tls {
            if t.verify && t.ca.is_none() {
                sink.err(format!("{key}.tls.ca"), "give the CA bundle the backends' certificates chain to (or verify = false, for a lab only)");
            }
            if t.client_cert.is_some() != t.client_key.is_some() {
                sink.err(
                    format!("{key}.tls"),
                    "client_cert and client_key go together",
                );
            }
        }
        match (c.http, c.tls.is_some()) {
            (UpstreamHttp::H2, false) => sink.err(
                format!("{key}.http"),
                "\"2\" is HTTP/2 over TLS: add [clusters.X.tls], or use \"h2c\" for cleartext HTTP/2",
            ),
            (UpstreamHttp::H2c, true) => sink.err(
                format!("{key}.http"),
                "\"h2c\" is cleartext HTTP/2; with [clusters.X.tls] use \"2\"",
            ),
            _ => {}
        }
        if let Some(q) = &c.queue {
            if q.max_requests == 0 || q.max_bytes == 0 || q.max_wait.is_zero() {
                sink.err(
                    format!("{key}.queue"),
                    "max_requests, max_bytes and max_wait must be above 0 (remove [queue] to answer saturation with 503 at once)",
                );
            }
        }
    }
    resolved
}

/// `[clusters.X.balance]`; `key` is `clusters.X`.
fn check_balance(key: &str, b: &BalanceSettings, sink: &mut Sink) {
    if b.metrics_max_age < b.metrics_interval
        && b.algorithm.scrapes()
        && !b.metrics_interval.is_zero()
    {
        sink.err(
            format!("{key}.balance.metrics_max_age"),
            "must be at least metrics_interval, or every scrape is stale on arrival",
        );
    }
    if !(b.kv_saturation > 0.0 && b.kv_saturation <= 1.0) || b.queue_saturation == 0 {
        sink.err(
            format!("{key}.balance"),
            "kv_saturation is a fraction in (0, 1] (1 = never saturated by the KV cache) and queue_saturation at least 1",
        );
    }
    if !(0.0..=100.0).contains(&b.prefix_stickiness)
        || !(0.0..=100.0).contains(&b.prefix_max_slowdown)
        || b.prefix_cache_blocks == 0
    {
        sink.err(
            format!("{key}.balance"),
            "prefix_stickiness and prefix_max_slowdown are factors from 0 to 100, and prefix_cache_blocks at least 1",
        );
    }
    if !(0.0..=1.0).contains(&b.retry_budget) {
        sink.err(
            format!("{key}.balance.retry_budget"),
            "a fraction of requests, 0 to 1",
        );
    }
    if b.ejection > b.max_ejection || (!b.health_path.is_empty() && b.health_interval.is_zero()) {
        sink.err(
            format!("{key}.balance"),
            "ejection must not exceed max_ejection, and health_interval must be above 0",
        );
    }
    if !b.metrics_path.starts_with('/')
        || (!b.health_path.is_empty() && !b.health_path.starts_with('/'))
    {
        sink.err(
            format!("{key}.balance"),
            "metrics_path and health_path are paths starting with '/'",
        );
    }
}

/// Every address a backend name resolves to (a Kubernetes headless
/// Service answers with one per pod), sorted, without duplicates.
pub fn resolve_all(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if !s.contains(':') {
        return Err(format!("`{s}` needs a port, e.g. \"{s}:8000\""));
    }
    match s.to_socket_addrs() {
        Ok(it) => {
            let mut v: Vec<SocketAddr> = it.collect();
            v.sort();
            v.dedup();
            if v.is_empty() {
                Err(format!("`{s}` resolved to no address"))
            } else {
                Ok(v)
            }
        }
        Err(e) => Err(format!("cannot resolve `{s}`: {e}")),
    }
}
