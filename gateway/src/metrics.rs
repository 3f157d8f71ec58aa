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
    pub connections_shed: IntCounterVec,
    pub xdp_enabled: IntGauge,
    pub xdp_attached: IntGaugeVec,
    pub xdp_packets: IntCounterVec,
    pub xdp_block_drops: IntCounterVec,
    pub xdp_blocked: IntGaugeVec,
    pub xdp_block_events: IntCounterVec,
    pub xdp_watch_events: IntCounter,
    pub xdp_watch_suppressed: IntCounter,
    pub xdp_watchers: IntGauge,
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
    pub queue_depth: IntGaugeVec,
    pub h2_connections: IntCounterVec,
    pub h2_streams: IntCounter,
    pub h2_goaways: IntCounterVec,
    pub usage_tokens: IntCounterVec,
    pub stream_cuts: IntCounterVec,
    pub queue_wait: HistogramVec,
    pub queue_dispatched: IntCounterVec,
    pub queue_refused: IntCounterVec,
    pub prefix_routes: IntCounterVec,
    pub trace_spans: IntCounterVec,
    pub prefix_index_bytes: IntGaugeVec,
    pub prefix_fleet: IntCounterVec,
    pub prefix_fleet_up: IntGauge,
    pub backend_ttft: prometheus::GaugeVec,
    pub backend_prefill: prometheus::GaugeVec,
    pub backend_itl: prometheus::GaugeVec,
    pub backend_streams: IntGaugeVec,
    pub backend_tokens: prometheus::GaugeVec,
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

/// A metric's name, help text and label names (none for a single series).
struct Desc {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

impl Desc {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Desc {
        Desc { name, help, labels }
    }
}

/// Registers and returns the integer counter family `d`.
fn counter_vec(r: &Registry, d: &Desc) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(d.name, d.help), d.labels).unwrap(),
    )
}

/// Registers and returns the integer gauge family `d`.
fn gauge_vec(r: &Registry, d: &Desc) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(d.name, d.help), d.labels).unwrap(),
    )
}

/// Registers and returns the floating-point gauge family `d`.
fn float_gauge_vec(r: &Registry, d: &Desc) -> prometheus::GaugeVec {
    reg(
        r,
        prometheus::GaugeVec::new(Opts::new(d.name, d.help), d.labels).unwrap(),
    )
}

/// Registers and returns the single integer counter `d` (no labels).
fn counter(r: &Registry, d: &Desc) -> IntCounter {
    reg(r, IntCounter::new(d.name, d.help).unwrap())
}

/// Registers and returns the single integer gauge `d` (no labels).
fn gauge(r: &Registry, d: &Desc) -> IntGauge {
    reg(r, IntGauge::new(d.name, d.help).unwrap())
}

/// Registers and returns the histogram family `d` with `buckets`.
fn histogram_vec(r: &Registry, d: &Desc, buckets: Vec<f64>) -> HistogramVec {
    let opts = HistogramOpts::new(d.name, d.help).buckets(buckets);
    reg(r, HistogramVec::new(opts, d.labels).unwrap())
}

/// Registers and returns the single histogram `d` (no labels) with `buckets`.
fn histogram(r: &Registry, d: &Desc, buckets: Vec<f64>) -> prometheus::Histogram {
    let opts = HistogramOpts::new(d.name, d.help).buckets(buckets);
    reg(r, prometheus::Histogram::with_opts(opts).unwrap())
}

// Requests, as clients see them.
const REQUESTS: Desc = Desc::new(
    "gateway_requests_total",
    "Requests answered, by route, status and protocol (http/1.1, h2, h2c)",
    &["route", "status", "protocol"],
);
const REQUEST_DURATION: Desc = Desc::new(
    "gateway_request_duration_seconds",
    "From the end of the request head to the last response byte",
    &["route"],
);
const REQUEST_ERRORS: Desc = Desc::new(
    "gateway_request_errors_total",
    "Requests that ended in an error, by source (client, upstream, internal) and kind",
    &["source", "kind"],
);
const REQUEST_BYTES: Desc = Desc::new(
    "gateway_request_body_bytes_total",
    "Request body bytes forwarded upstream",
    &["route"],
);
const RESPONSE_BYTES: Desc = Desc::new(
    "gateway_response_body_bytes_total",
    "Response body bytes sent to clients",
    &["route"],
);
const VALIDATION_REJECTIONS: Desc = Desc::new(
    "gateway_validation_rejections_total",
    "Requests refused by the validation stage, by route, model and reason",
    &["route", "model", "reason"],
);

// The upstream side of requests.
const UPSTREAM_HEADER_TIME: Desc = Desc::new(
    "gateway_upstream_response_header_seconds",
    "From the request sent upstream to the response head (time to first byte)",
    &["cluster"],
);
const UPSTREAM_ERRORS: Desc = Desc::new(
    "gateway_upstream_errors_total",
    "Upstream failures by cluster and kind",
    &["cluster", "kind"],
);
const UPSTREAM_CONNECTIONS: Desc = Desc::new(
    "gateway_upstream_connections_opened_total",
    "New TCP connections to backends",
    &["cluster"],
);
const UPSTREAM_REUSED: Desc = Desc::new(
    "gateway_upstream_connections_reused_total",
    "Requests sent on a pooled keep-alive connection",
    &["cluster"],
);
const UPSTREAM_RETRIES: Desc = Desc::new(
    "gateway_upstream_retries_total",
    "Idempotent requests re-sent to another backend after one closed or reset before answering (within the retry budget)",
    &["cluster"],
);

// Client connections, workers and the configuration in force.
const CONNECTIONS_ACCEPTED: Desc = Desc::new(
    "gateway_connections_accepted_total",
    "Client connections accepted",
    &[],
);
const ACTIVE_CONNECTIONS: Desc = Desc::new(
    "gateway_active_connections",
    "Open client connections, per worker",
    &["worker"],
);
const POOL_IDLE: Desc = Desc::new(
    "gateway_upstream_pool_idle_connections",
    "Idle pooled backend connections, per worker and cluster",
    &["worker", "cluster"],
);
const RUNTIME_DRIVER: Desc = Desc::new(
    "gateway_runtime_driver",
    "Workers running on each I/O driver (io_uring or epoll)",
    &["driver"],
);
const WORKERS: Desc = Desc::new("gateway_workers", "Worker threads running", &[]);
const DRAINING: Desc = Desc::new(
    "gateway_draining",
    "1 while shutting down and draining in-flight requests",
    &[],
);
const CONFIG_RELOADS: Desc = Desc::new(
    "gateway_config_reloads_total",
    "Configuration reloads (SIGHUP), by result (ok, error)",
    &["result"],
);
const CONFIG_GENERATION: Desc = Desc::new(
    "gateway_config_generation",
    "Configuration in force: 0 at start, +1 per successful reload",
    &[],
);
const CONNECTION_PANICS: Desc = Desc::new(
    "gateway_connection_panics_total",
    "Connection tasks that panicked (a bug; the connection was dropped)",
    &[],
);

const CONNECTIONS_SHED: Desc = Desc::new(
    "gateway_connections_shed_total",
    "Client connections closed to make room at max_connections, by reason (idle: keep-alive between requests; slow_head: a request head incomplete after timeouts.client_header_overload)",
    &["reason"],
);

// The front door: XDP and the accept-time checks.
const XDP_ENABLED: Desc = Desc::new(
    "gateway_xdp_enabled",
    "1 when the XDP front door is attached; 0: blocks are enforced at accept only",
    &[],
);
const XDP_ATTACHED: Desc = Desc::new(
    "gateway_xdp_attached",
    "1 per interface the XDP program is attached to, with its mode (native, generic)",
    &["interface", "mode"],
);
const XDP_PACKETS: Desc = Desc::new(
    "gateway_xdp_packets_total",
    "Packets seen by the XDP program, by verdict (pass, drop, would_drop) and reason",
    &["verdict", "reason"],
);
const XDP_BLOCK_DROPS: Desc = Desc::new(
    "gateway_xdp_blocked_packets_total",
    "Packets from blocked sources dropped at XDP (would_drop in monitor mode), by block reason",
    &["reason"],
);
const XDP_BLOCKED: Desc = Desc::new(
    "gateway_xdp_blocked_sources",
    "Addresses in the blocklist, by reason (manual, config, rate_limit)",
    &["reason"],
);
const XDP_BLOCK_EVENTS: Desc = Desc::new(
    "gateway_xdp_block_events_total",
    "Blocklist changes, by action (block, unblock, expire, refused_full) and reason",
    &["action", "reason"],
);
const XDP_WATCH_EVENTS: Desc = Desc::new(
    "gateway_xdp_watch_events_total",
    "Sampled XDP verdicts read from the watch stream (only while someone runs `gateway xdp watch`)",
    &[],
);
const XDP_WATCH_SUPPRESSED: Desc = Desc::new(
    "gateway_xdp_watch_suppressed_total",
    "Sampled XDP verdicts not written because a CPU reached xdp.watch_max_per_second",
    &[],
);
const XDP_WATCHERS: Desc = Desc::new(
    "gateway_xdp_watchers",
    "Watch streams open now (`gateway xdp watch`, GET /xdp/watch); 0: the watch is off in the packet path",
    &[],
);
const ACCEPT_REFUSED: Desc = Desc::new(
    "gateway_accept_refused_total",
    "Connections closed at accept by the userspace front door, by reason",
    &["reason"],
);

// TLS.
const TLS_HANDSHAKES: Desc = Desc::new(
    "gateway_tls_handshakes_total",
    "Completed TLS handshakes, by version (1.2, 1.3) and whether the session was resumed",
    &["version", "resumed"],
);
const TLS_ERRORS: Desc = Desc::new(
    "gateway_tls_handshake_errors_total",
    "TLS handshakes that failed, by kind (timeout, closed, bad_client_certificate, incompatible, ...)",
    &["kind"],
);
const TLS_RELOADS: Desc = Desc::new(
    "gateway_tls_certificate_reloads_total",
    "Certificate reloads when the files changed, by result (ok, error)",
    &["result"],
);

// Authentication and authorization.
const AUTHN: Desc = Desc::new(
    "gateway_authn_total",
    "Authentication outcomes, by route, method (jwt, api_key, mtls, anonymous, none) and result (ok or the reason refused)",
    &["route", "method", "result"],
);
const AUTHZ: Desc = Desc::new(
    "gateway_authz_decisions_total",
    "Authorization decisions, by route, decision (allow, deny) and the rule that allowed",
    &["route", "decision", "rule"],
);

// Rate limiting.
const RATELIMIT: Desc = Desc::new(
    "gateway_ratelimit_decisions_total",
    "Rate-limit decisions, by route, result (admitted, refused), and for refusals the level (ip, principal, tenant, route, model) and limit (requests, tokens, concurrency, requests_per_day, ..., redis_unavailable)",
    &["route", "result", "level", "limit"],
);
const RATELIMIT_TOKENS: Desc = Desc::new(
    "gateway_ratelimit_tokens_total",
    "Cost in tokens, by route and kind: estimated (charged up front) and actual (reported by the backend's usage)",
    &["route", "kind"],
);
const RATELIMIT_ESCALATIONS: Desc = Desc::new(
    "gateway_ratelimit_escalations_total",
    "Repeat offenders handed to the XDP blocklist, by result (blocked, allowlisted, shared_address, error)",
    &["result"],
);
const RATELIMIT_TRACKED: Desc = Desc::new(
    "gateway_ratelimit_tracked_keys",
    "Keys the limiter tracks, per level",
    &["level"],
);
const RATELIMIT_REDIS_UP: Desc = Desc::new(
    "gateway_ratelimit_redis_up",
    "1 while Redis (fleet-wide limits) is reachable; 0 while local counts are used",
    &[],
);
const RATELIMIT_REDIS_ERRORS: Desc = Desc::new(
    "gateway_ratelimit_redis_errors_total",
    "Failed Redis operations, by stage (connect, sync)",
    &["stage"],
);
const RATELIMIT_REDIS_SYNC: Desc = Desc::new(
    "gateway_ratelimit_redis_sync_seconds",
    "Duration of one Redis sync round trip",
    &[],
);

// Balancing, traffic splits and shadowing.
const TRACE_SPANS: Desc = Desc::new(
    "gateway_trace_spans_total",
    "Trace spans by fate: exported to the OTLP collector, failed (the collector refused or was unreachable), dropped (the export queue was full)",
    &["result"],
);
const PREFIX_ROUTES: Desc = Desc::new(
    "gateway_prefix_routes_total",
    "Requests routed by a prefix-aware algorithm, by whether the chosen backend had been sent the prompt's leading blocks (cached) or not (uncached)",
    &["cluster", "result"],
);
const PREFIX_INDEX_BYTES: Desc = Desc::new(
    "gateway_prefix_index_bytes",
    "Memory of the cluster's prefix index (what was sent where), shared by every worker; fixed: 32 bytes per KV block of the pool's caches",
    &["cluster"],
);
const PREFIX_FLEET: Desc = Desc::new(
    "gateway_prefix_fleet_placements_total",
    "Prefix placements shared with the other gateways through Redis: sent (made here), dropped (not sent: the outbox was full), applied (made by another gateway, indexed here), unknown (for a cluster or backend this gateway doesn't have), malformed (an unreadable entry)",
    &["result"],
);
const PREFIX_FLEET_UP: Desc = Desc::new(
    "gateway_prefix_fleet_redis_up",
    "1 while the prefix placements sync reaches Redis, 0 while it doesn't (each gateway then routes on its own index)",
    &[],
);
const BACKEND_TTFT: Desc = Desc::new(
    "gateway_backend_ttft_ewma_seconds",
    "EWMA of the time from sending a request to its first response body byte (the first token of a stream), per backend",
    &["cluster", "backend"],
);
const BACKEND_PREFILL: Desc = Desc::new(
    "gateway_backend_prefill_seconds_per_1k_tokens",
    "Prefill time per 1,000 uncached prompt tokens, as learned from time to first token (0: not learned yet)",
    &["cluster", "backend"],
);
const BACKEND_ITL: Desc = Desc::new(
    "gateway_backend_itl_ewma_seconds",
    "EWMA of the time between a stream's events (inter-token time), per backend",
    &["cluster", "backend"],
);
const BACKEND_STREAMS: Desc = Desc::new(
    "gateway_backend_streams",
    "Streamed (SSE) requests from this gateway in flight to each backend",
    &["cluster", "backend"],
);
const BACKEND_TOKENS: Desc = Desc::new(
    "gateway_backend_stream_tokens_per_second",
    "Tokens (stream events) per second of a stream, per backend: events ÷ streaming time of the streams that ended lately",
    &["cluster", "backend"],
);
const BALANCE_SHED: Desc = Desc::new(
    "gateway_balance_shed_total",
    "Requests refused with 503 because every backend of the cluster was saturated",
    &["cluster"],
);
const H2_CONNECTIONS: Desc = Desc::new(
    "gateway_h2_connections_total",
    "HTTP/2 client connections: accepted, handshake_failed, handshake_timeout",
    &["result"],
);
const H2_STREAMS: Desc = Desc::new(
    "gateway_h2_streams_total",
    "HTTP/2 streams (requests) accepted",
    &[],
);
const H2_GOAWAYS: Desc = Desc::new(
    "gateway_h2_goaways_total",
    "HTTP/2 connections ended: idle (the gateway's GOAWAY after idle_timeout), a protocol violation the gateway answered with GOAWAY (enhance_your_calm: rapid reset, header or frame floods; protocol_error, flow_control_error, frame_size_error, compression_error), no_error (the client's GOAWAY), io",
    &["reason"],
);
const USAGE_TOKENS: Desc = Desc::new(
    "gateway_usage_tokens_total",
    "Tokens served, as the backend reported them (a stream without usage: its content events), by tenant (configured names; others `other`, anonymous `none`), model (the catalogue's; others `other`) and kind (prompt, completion)",
    &["tenant", "model", "kind"],
);
const STREAM_CUTS: Desc = Desc::new(
    "gateway_stream_cuts_total",
    "Streams ended because their output took the caller past a token budget with cut_streams",
    &["route"],
);
const QUEUE_DEPTH: Desc = Desc::new(
    "gateway_queue_depth",
    "Requests waiting in the cluster's queue for a backend with room, by priority band",
    &["cluster", "band"],
);
const QUEUE_WAIT: Desc = Desc::new(
    "gateway_queue_wait_seconds",
    "Time requests waited in the cluster's queue (dispatched or not), by priority band",
    &["cluster", "band"],
);
const QUEUE_DISPATCHED: Desc = Desc::new(
    "gateway_queue_dispatched_total",
    "Requests the cluster's queue dispatched to the balance stage after waiting, by priority band",
    &["cluster", "band"],
);
const QUEUE_REFUSED: Desc = Desc::new(
    "gateway_queue_refused_total",
    "Requests that left the cluster's queue undispatched: full (max_requests, 429), bytes (max_bytes, 429), timeout (max_wait, 503), disconnected (client gone)",
    &["cluster", "reason"],
);
const BALANCE_SPLIT: Desc = Desc::new(
    "gateway_balance_split_total",
    "Requests of a model with a traffic split, by the pool they went to",
    &["model", "cluster"],
);
const SHADOW: Desc = Desc::new(
    "gateway_shadow_requests_total",
    "Mirrored (shadow) requests, by model, shadow cluster and result (the status, or timeout, connect_error, skipped_busy, ...)",
    &["model", "cluster", "result"],
);
const SHADOW_DURATION: Desc = Desc::new(
    "gateway_shadow_duration_seconds",
    "Latency of mirrored requests (their answers are discarded)",
    &["cluster"],
);
const BALANCE_EJECTIONS: Desc = Desc::new(
    "gateway_balance_ejections_total",
    "Backends ejected after consecutive failures",
    &["cluster", "backend"],
);
const BALANCE_SCRAPES: Desc = Desc::new(
    "gateway_balance_scrapes_total",
    "Model-server /metrics scrapes, by result (ok, no_load_metrics, http_error, unreachable)",
    &["cluster", "result"],
);

// Backends, as the balancer sees them.
const BACKEND_INFLIGHT: Desc = Desc::new(
    "gateway_backend_inflight",
    "Requests from this gateway in flight to each backend",
    &["cluster", "backend"],
);
const BACKEND_QUEUE: Desc = Desc::new(
    "gateway_backend_queue",
    "Requests queued at each backend, as it last reported (-1: no fresh report)",
    &["cluster", "backend"],
);
const BACKEND_KV: Desc = Desc::new(
    "gateway_backend_kv_cache_usage",
    "KV-cache use of each backend, 0..1, as it last reported (-1: no fresh report)",
    &["cluster", "backend"],
);
const BACKEND_LATENCY: Desc = Desc::new(
    "gateway_backend_latency_ewma_seconds",
    "EWMA of request latency per backend",
    &["cluster", "backend"],
);
const BACKEND_AVAILABLE: Desc = Desc::new(
    "gateway_backend_available",
    "1 when a backend takes traffic; 0 while ejected or failing its health check",
    &["cluster", "backend"],
);

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let latency = exponential_buckets(0.0005, 2.0, 22).expect("valid buckets"); // 0.5 ms … ~35 min
        Arc::new(Metrics {
            requests: counter_vec(&r, &REQUESTS),
            request_duration: histogram_vec(&r, &REQUEST_DURATION, latency.clone()),
            upstream_header_time: histogram_vec(&r, &UPSTREAM_HEADER_TIME, latency.clone()),
            request_errors: counter_vec(&r, &REQUEST_ERRORS),
            request_bytes: counter_vec(&r, &REQUEST_BYTES),
            response_bytes: counter_vec(&r, &RESPONSE_BYTES),
            upstream_errors: counter_vec(&r, &UPSTREAM_ERRORS),
            validation_rejections: counter_vec(&r, &VALIDATION_REJECTIONS),
            upstream_connections: counter_vec(&r, &UPSTREAM_CONNECTIONS),
            upstream_reused: counter_vec(&r, &UPSTREAM_REUSED),
            connections_accepted: counter(&r, &CONNECTIONS_ACCEPTED),
            active_connections: gauge_vec(&r, &ACTIVE_CONNECTIONS),
            pool_idle: gauge_vec(&r, &POOL_IDLE),
            runtime_driver: gauge_vec(&r, &RUNTIME_DRIVER),
            workers: gauge(&r, &WORKERS),
            draining: gauge(&r, &DRAINING),
            config_reloads: counter_vec(&r, &CONFIG_RELOADS),
            config_generation: gauge(&r, &CONFIG_GENERATION),
            connection_panics: counter(&r, &CONNECTION_PANICS),
            connections_shed: counter_vec(&r, &CONNECTIONS_SHED),
            xdp_enabled: gauge(&r, &XDP_ENABLED),
            xdp_attached: gauge_vec(&r, &XDP_ATTACHED),
            xdp_packets: counter_vec(&r, &XDP_PACKETS),
            xdp_block_drops: counter_vec(&r, &XDP_BLOCK_DROPS),
            xdp_blocked: gauge_vec(&r, &XDP_BLOCKED),
            xdp_block_events: counter_vec(&r, &XDP_BLOCK_EVENTS),
            xdp_watch_events: counter(&r, &XDP_WATCH_EVENTS),
            xdp_watch_suppressed: counter(&r, &XDP_WATCH_SUPPRESSED),
            xdp_watchers: gauge(&r, &XDP_WATCHERS),
            accept_refused: counter_vec(&r, &ACCEPT_REFUSED),
            tls_handshakes: counter_vec(&r, &TLS_HANDSHAKES),
            tls_errors: counter_vec(&r, &TLS_ERRORS),
            tls_reloads: counter_vec(&r, &TLS_RELOADS),
            authn: counter_vec(&r, &AUTHN),
            authz: counter_vec(&r, &AUTHZ),
            ratelimit: counter_vec(&r, &RATELIMIT),
            ratelimit_tokens: counter_vec(&r, &RATELIMIT_TOKENS),
            ratelimit_escalations: counter_vec(&r, &RATELIMIT_ESCALATIONS),
            ratelimit_tracked: gauge_vec(&r, &RATELIMIT_TRACKED),
            ratelimit_redis_up: gauge(&r, &RATELIMIT_REDIS_UP),
            ratelimit_redis_errors: counter_vec(&r, &RATELIMIT_REDIS_ERRORS),
            ratelimit_redis_sync: histogram(
                &r,
                &RATELIMIT_REDIS_SYNC,
                exponential_buckets(0.0001, 2.0, 14).expect("valid buckets"),
            ),
            balance_shed: counter_vec(&r, &BALANCE_SHED),
            queue_depth: gauge_vec(&r, &QUEUE_DEPTH),
            h2_connections: counter_vec(&r, &H2_CONNECTIONS),
            h2_streams: counter(&r, &H2_STREAMS),
            h2_goaways: counter_vec(&r, &H2_GOAWAYS),
            usage_tokens: counter_vec(&r, &USAGE_TOKENS),
            stream_cuts: counter_vec(&r, &STREAM_CUTS),
            queue_wait: histogram_vec(
                &r,
                &QUEUE_WAIT,
                exponential_buckets(0.005, 2.0, 14).expect("valid buckets"),
            ),
            queue_dispatched: counter_vec(&r, &QUEUE_DISPATCHED),
            queue_refused: counter_vec(&r, &QUEUE_REFUSED),
            prefix_routes: counter_vec(&r, &PREFIX_ROUTES),
            trace_spans: counter_vec(&r, &TRACE_SPANS),
            prefix_index_bytes: gauge_vec(&r, &PREFIX_INDEX_BYTES),
            prefix_fleet: counter_vec(&r, &PREFIX_FLEET),
            prefix_fleet_up: gauge(&r, &PREFIX_FLEET_UP),
            backend_ttft: float_gauge_vec(&r, &BACKEND_TTFT),
            backend_prefill: float_gauge_vec(&r, &BACKEND_PREFILL),
            backend_itl: float_gauge_vec(&r, &BACKEND_ITL),
            backend_streams: gauge_vec(&r, &BACKEND_STREAMS),
            backend_tokens: float_gauge_vec(&r, &BACKEND_TOKENS),
            upstream_retries: counter_vec(&r, &UPSTREAM_RETRIES),
            shadow: counter_vec(&r, &SHADOW),
            shadow_duration: histogram_vec(&r, &SHADOW_DURATION, latency),
            balance_split: counter_vec(&r, &BALANCE_SPLIT),
            balance_ejections: counter_vec(&r, &BALANCE_EJECTIONS),
            balance_scrapes: counter_vec(&r, &BALANCE_SCRAPES),
            backend_inflight: gauge_vec(&r, &BACKEND_INFLIGHT),
            backend_queue: gauge_vec(&r, &BACKEND_QUEUE),
            backend_kv: float_gauge_vec(&r, &BACKEND_KV),
            backend_latency: float_gauge_vec(&r, &BACKEND_LATENCY),
            backend_available: gauge_vec(&r, &BACKEND_AVAILABLE),
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
    pub prefix_routes: RefCell<LocalIntCounterVec>,
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
            prefix_routes: RefCell::new(m.prefix_routes.local()),
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
        self.prefix_routes.borrow().flush();
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
