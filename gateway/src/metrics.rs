//! Prometheus metrics. One registry for the process; each worker writes to
//! its own unsynchronised shards ([`WorkerMetrics`], prometheus `local`
//! metrics) and folds them into the registry every [`FLUSH_EVERY`], so the
//! per-request path touches no shared atomics or locks.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::local::{LocalHistogramVec, LocalIntCounter, LocalIntCounterVec};
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// How often worker shards are folded into the registry.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Every metric the gateway exports; see README "Metrics".
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_header_time: HistogramVec,
    pub request_errors: IntCounterVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub validation_rejections: IntCounterVec,
    pub upstream_connections: IntCounterVec,
    pub upstream_reused: IntCounterVec,
    pub connections_accepted: IntCounter,
    pub active_connections: IntGaugeVec,
    pub pool_idle: IntGaugeVec,
    pub runtime_driver: IntGaugeVec,
    pub workers: IntGauge,
    pub draining: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub connection_panics: IntCounter,
    pub xdp_enabled: IntGauge,
    pub xdp_attached: IntGaugeVec,
    pub xdp_packets: IntCounterVec,
    pub xdp_block_drops: IntCounterVec,
    pub xdp_blocked: IntGaugeVec,
    pub xdp_block_events: IntCounterVec,
    pub accept_refused: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_errors: IntCounterVec,
    pub tls_reloads: IntCounterVec,
    pub authn: IntCounterVec,
    pub authz: IntCounterVec,
    pub ratelimit: IntCounterVec,
    pub ratelimit_tokens: IntCounterVec,
    pub ratelimit_escalations: IntCounterVec,
    pub ratelimit_tracked: IntGaugeVec,
    pub ratelimit_redis_up: IntGauge,
    pub ratelimit_redis_errors: IntCounterVec,
    pub ratelimit_redis_sync: prometheus::Histogram,
    pub balance_shed: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub balance_split: IntCounterVec,
    pub shadow: IntCounterVec,
    pub shadow_duration: HistogramVec,
    pub balance_ejections: IntCounterVec,
    pub balance_scrapes: IntCounterVec,
    pub backend_inflight: IntGaugeVec,
    pub backend_queue: IntGaugeVec,
    pub backend_kv: prometheus::GaugeVec,
    pub backend_latency: prometheus::GaugeVec,
    pub backend_available: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let latency = exponential_buckets(0.0005, 2.0, 22).expect("valid buckets"); // 0.5 ms … ~35 min
        Arc::new(Metrics {
            requests: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_requests_total", "Requests answered, by route and status"), &["route", "status"]).unwrap(),
            ),
            request_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("gateway_request_duration_seconds", "From the end of the request head to the last response byte")
                        .buckets(latency.clone()),
                    &["route"],
                )
                .unwrap(),
            ),
            upstream_header_time: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("gateway_upstream_response_header_seconds", "From the request sent upstream to the response head (time to first byte)")
                        .buckets(latency),
                    &["cluster"],
                )
                .unwrap(),
            ),
            request_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_request_errors_total", "Requests that ended in an error, by source (client, upstream, internal) and kind"),
                    &["source", "kind"],
                )
                .unwrap(),
            ),
            request_bytes: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_request_body_bytes_total", "Request body bytes forwarded upstream"), &["route"]).unwrap(),
            ),
            response_bytes: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_response_body_bytes_total", "Response body bytes sent to clients"), &["route"]).unwrap(),
            ),
            upstream_errors: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_upstream_errors_total", "Upstream failures by cluster and kind"), &["cluster", "kind"]).unwrap(),
            ),
            validation_rejections: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_validation_rejections_total", "Requests refused by the validation stage, by route, model and reason"),
                    &["route", "model", "reason"],
                )
                .unwrap(),
            ),
            upstream_connections: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_upstream_connections_opened_total", "New TCP connections to backends"), &["cluster"]).unwrap(),
            ),
            upstream_reused: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_upstream_connections_reused_total", "Requests sent on a pooled keep-alive connection"), &["cluster"])
                    .unwrap(),
            ),
            connections_accepted: reg(&r, IntCounter::new("gateway_connections_accepted_total", "Client connections accepted").unwrap()),
            active_connections: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_active_connections", "Open client connections, per worker"), &["worker"]).unwrap(),
            ),
            pool_idle: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_upstream_pool_idle_connections", "Idle pooled backend connections, per worker and cluster"), &["worker", "cluster"])
                    .unwrap(),
            ),
            runtime_driver: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_runtime_driver", "Workers running on each I/O driver (io_uring or epoll)"), &["driver"]).unwrap(),
            ),
            workers: reg(&r, IntGauge::new("gateway_workers", "Worker threads running").unwrap()),
            draining: reg(&r, IntGauge::new("gateway_draining", "1 while shutting down and draining in-flight requests").unwrap()),
            config_reloads: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_config_reloads_total", "Configuration reloads (SIGHUP), by result (ok, error)"), &["result"]).unwrap(),
            ),
            config_generation: reg(&r, IntGauge::new("gateway_config_generation", "Configuration in force: 0 at start, +1 per successful reload").unwrap()),
            connection_panics: reg(&r, IntCounter::new("gateway_connection_panics_total", "Connection tasks that panicked (a bug; the connection was dropped)").unwrap()),
            xdp_enabled: reg(&r, IntGauge::new("gateway_xdp_enabled", "1 when the XDP front door is attached; 0: blocks are enforced at accept only").unwrap()),
            xdp_attached: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_xdp_attached", "1 per interface the XDP program is attached to, with its mode (native, generic)"), &["interface", "mode"]).unwrap(),
            ),
            xdp_packets: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_xdp_packets_total", "Packets seen by the XDP program, by verdict (pass, drop, would_drop) and reason"),
                    &["verdict", "reason"],
                )
                .unwrap(),
            ),
            xdp_block_drops: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_xdp_blocked_packets_total", "Packets from blocked sources dropped at XDP (would_drop in monitor mode), by block reason"), &["reason"]).unwrap(),
            ),
            xdp_blocked: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_xdp_blocked_sources", "Addresses in the blocklist, by reason (manual, config, rate_limit)"), &["reason"]).unwrap(),
            ),
            xdp_block_events: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_xdp_block_events_total", "Blocklist changes, by action (block, unblock, expire, refused_full) and reason"),
                    &["action", "reason"],
                )
                .unwrap(),
            ),
            accept_refused: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_accept_refused_total", "Connections closed at accept by the userspace front door, by reason"), &["reason"]).unwrap(),
            ),
            tls_handshakes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_tls_handshakes_total", "Completed TLS handshakes, by version (1.2, 1.3) and whether the session was resumed"),
                    &["version", "resumed"],
                )
                .unwrap(),
            ),
            tls_errors: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_tls_handshake_errors_total", "TLS handshakes that failed, by kind (timeout, closed, bad_client_certificate, incompatible, ...)"), &["kind"]).unwrap(),
            ),
            tls_reloads: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_tls_certificate_reloads_total", "Certificate reloads when the files changed, by result (ok, error)"), &["result"]).unwrap(),
            ),
            authn: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_authn_total", "Authentication outcomes, by route, method (jwt, api_key, mtls, anonymous, none) and result (ok or the reason refused)"),
                    &["route", "method", "result"],
                )
                .unwrap(),
            ),
            authz: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_authz_decisions_total", "Authorization decisions, by route, decision (allow, deny) and the rule that allowed"),
                    &["route", "decision", "rule"],
                )
                .unwrap(),
            ),
            ratelimit: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_ratelimit_decisions_total", "Rate-limit decisions, by route, result (admitted, refused), and for refusals the level (ip, principal, tenant, route, model) and limit (requests, tokens, concurrency, requests_per_day, ..., redis_unavailable)"),
                    &["route", "result", "level", "limit"],
                )
                .unwrap(),
            ),
            ratelimit_tokens: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_ratelimit_tokens_total", "Cost in tokens, by route and kind: estimated (charged up front) and actual (reported by the backend's usage)"),
                    &["route", "kind"],
                )
                .unwrap(),
            ),
            ratelimit_escalations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_ratelimit_escalations_total", "Repeat offenders handed to the XDP blocklist, by result (blocked, allowlisted, shared_address, error)"),
                    &["result"],
                )
                .unwrap(),
            ),
            ratelimit_tracked: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_ratelimit_tracked_keys", "Keys the limiter tracks, per level"), &["level"]).unwrap(),
            ),
            ratelimit_redis_up: reg(&r, IntGauge::new("gateway_ratelimit_redis_up", "1 while Redis (fleet-wide limits) is reachable; 0 while local counts are used").unwrap()),
            ratelimit_redis_errors: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_ratelimit_redis_errors_total", "Failed Redis operations, by stage (connect, sync)"), &["stage"]).unwrap(),
            ),
            ratelimit_redis_sync: reg(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new("gateway_ratelimit_redis_sync_seconds", "Duration of one Redis sync round trip")
                        .buckets(exponential_buckets(0.0001, 2.0, 14).expect("valid buckets")),
                )
                .unwrap(),
            ),
            balance_shed: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_balance_shed_total", "Requests refused with 503 because every backend of the cluster was saturated"), &["cluster"]).unwrap(),
            ),
            upstream_retries: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_upstream_retries_total", "Idempotent requests re-sent to another backend after one closed or reset before answering (within the retry budget)"),
                    &["cluster"],
                )
                .unwrap(),
            ),
            shadow: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_shadow_requests_total", "Mirrored (shadow) requests, by model, shadow cluster and result (the status, or timeout, connect_error, skipped_busy, ...)"),
                    &["model", "cluster", "result"],
                )
                .unwrap(),
            ),
            shadow_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("gateway_shadow_duration_seconds", "Latency of mirrored requests (their answers are discarded)")
                        .buckets(exponential_buckets(0.0005, 2.0, 22).expect("valid buckets")),
                    &["cluster"],
                )
                .unwrap(),
            ),
            balance_split: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_balance_split_total", "Requests of a model with a traffic split, by the pool they went to"),
                    &["model", "cluster"],
                )
                .unwrap(),
            ),
            balance_ejections: reg(
                &r,
                IntCounterVec::new(Opts::new("gateway_balance_ejections_total", "Backends ejected after consecutive failures"), &["cluster", "backend"]).unwrap(),
            ),
            balance_scrapes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("gateway_balance_scrapes_total", "Model-server /metrics scrapes, by result (ok, no_load_metrics, http_error, unreachable)"),
                    &["cluster", "result"],
                )
                .unwrap(),
            ),
            backend_inflight: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_backend_inflight", "Requests from this gateway in flight to each backend"), &["cluster", "backend"]).unwrap(),
            ),
            backend_queue: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_backend_queue", "Requests queued at each backend, as it last reported (-1: no fresh report)"), &["cluster", "backend"]).unwrap(),
            ),
            backend_kv: reg(
                &r,
                prometheus::GaugeVec::new(Opts::new("gateway_backend_kv_cache_usage", "KV-cache use of each backend, 0..1, as it last reported (-1: no fresh report)"), &["cluster", "backend"]).unwrap(),
            ),
            backend_latency: reg(
                &r,
                prometheus::GaugeVec::new(Opts::new("gateway_backend_latency_ewma_seconds", "EWMA of request latency per backend"), &["cluster", "backend"]).unwrap(),
            ),
            backend_available: reg(
                &r,
                IntGaugeVec::new(Opts::new("gateway_backend_available", "1 when a backend takes traffic; 0 while ejected or failing its health check"), &["cluster", "backend"]).unwrap(),
            ),
            registry: r,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

/// One worker's shards. `!Sync`: only its worker thread touches it.
pub struct WorkerMetrics {
    pub requests: RefCell<LocalIntCounterVec>,
    pub request_duration: RefCell<LocalHistogramVec>,
    pub upstream_header_time: RefCell<LocalHistogramVec>,
    pub request_errors: RefCell<LocalIntCounterVec>,
    pub request_bytes: RefCell<LocalIntCounterVec>,
    pub response_bytes: RefCell<LocalIntCounterVec>,
    pub upstream_errors: RefCell<LocalIntCounterVec>,
    pub validation_rejections: RefCell<LocalIntCounterVec>,
    pub upstream_connections: RefCell<LocalIntCounterVec>,
    pub upstream_reused: RefCell<LocalIntCounterVec>,
    pub authn: RefCell<LocalIntCounterVec>,
    pub authz: RefCell<LocalIntCounterVec>,
    pub ratelimit: RefCell<LocalIntCounterVec>,
    pub balance_shed: RefCell<LocalIntCounterVec>,
    pub upstream_retries: RefCell<LocalIntCounterVec>,
    pub balance_split: RefCell<LocalIntCounterVec>,
    pub balance_ejections: RefCell<LocalIntCounterVec>,
    pub connections_accepted: LocalIntCounter,
    pub active_connections: IntGauge,
}

impl WorkerMetrics {
    pub fn new(m: &Metrics, worker: usize) -> WorkerMetrics {
        let w = worker.to_string();
        WorkerMetrics {
            requests: RefCell::new(m.requests.local()),
            request_duration: RefCell::new(m.request_duration.local()),
            upstream_header_time: RefCell::new(m.upstream_header_time.local()),
            request_errors: RefCell::new(m.request_errors.local()),
            request_bytes: RefCell::new(m.request_bytes.local()),
            response_bytes: RefCell::new(m.response_bytes.local()),
            upstream_errors: RefCell::new(m.upstream_errors.local()),
            validation_rejections: RefCell::new(m.validation_rejections.local()),
            upstream_connections: RefCell::new(m.upstream_connections.local()),
            upstream_reused: RefCell::new(m.upstream_reused.local()),
            authn: RefCell::new(m.authn.local()),
            authz: RefCell::new(m.authz.local()),
            ratelimit: RefCell::new(m.ratelimit.local()),
            balance_shed: RefCell::new(m.balance_shed.local()),
            balance_split: RefCell::new(m.balance_split.local()),
            upstream_retries: RefCell::new(m.upstream_retries.local()),
            balance_ejections: RefCell::new(m.balance_ejections.local()),
            connections_accepted: m.connections_accepted.local(),
            active_connections: m.active_connections.with_label_values(&[&w]),
        }
    }

    pub fn inc(&self, vec: &RefCell<LocalIntCounterVec>, labels: &[&str], by: u64) {
        if by > 0 {
            vec.borrow_mut().with_label_values(labels).inc_by(by);
        }
    }

    pub fn observe(&self, vec: &RefCell<LocalHistogramVec>, label: &str, d: Duration) {
        vec.borrow_mut()
            .with_label_values(&[label])
            .observe(d.as_secs_f64());
    }

    pub fn flush(&self) {
        self.requests.borrow().flush();
        self.request_duration.borrow().flush();
        self.upstream_header_time.borrow().flush();
        self.request_errors.borrow().flush();
        self.request_bytes.borrow().flush();
        self.response_bytes.borrow().flush();
        self.upstream_errors.borrow().flush();
        self.validation_rejections.borrow().flush();
        self.upstream_connections.borrow().flush();
        self.upstream_reused.borrow().flush();
        self.authn.borrow().flush();
        self.authz.borrow().flush();
        self.ratelimit.borrow().flush();
        self.balance_shed.borrow().flush();
        self.balance_split.borrow().flush();
        self.upstream_retries.borrow().flush();
        self.balance_ejections.borrow().flush();
        self.connections_accepted.flush();
    }
}

/// `"200"` for 200, without formatting per request.
pub fn status_label(status: u16) -> &'static str {
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..600).map(|s| s.to_string()).collect());
    labels
        .get(status as usize)
        .map(String::as_str)
        .unwrap_or("other")
}
