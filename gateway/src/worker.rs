//! State owned by one worker thread: its upstream pool, metric shards,
//! round-robin cursors, request-id generator and drain bookkeeping. Nothing
//! here is shared with other workers, so nothing here locks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::local::LocalIntCounter;
use prometheus::IntGauge;

use crate::config::{Limits, Timeouts};
use crate::generation::Resolved;
use crate::metrics::{Metrics, WorkerMetrics};
use crate::pool::{Cluster, Pool};
use crate::route::Router;
use crate::shutdown::Shutdown;

/// Process-wide state every configuration generation shares: it outlives
/// reloads (blocks, rate-limit buckets and quotas, backend loads).
pub struct Process {
    pub front_door: Arc<crate::xdp::FrontDoor>,
    pub limiter: Arc<crate::ratelimit::Limiter>,
    pub loads: Arc<crate::balance::Registry>,
    /// The OTLP trace exporter (`[tracing] otlp_endpoint`; changes need a restart).
    pub tracer: Option<Arc<crate::otel::Tracer>>,
}

/// What every worker gets, read-only, built once from the config.
pub struct Shared {
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub router: Router,
    pub clusters: Vec<Cluster>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    pub buffer_size: usize,
    pub max_conns_per_worker: usize,
    pub trust_forwarded: bool,
    pub access_log: bool,
    /// HTTP/2 with prior knowledge on plaintext listeners, and its limits.
    pub h2c: bool,
    pub http2: crate::config::Http2Settings,
    /// Which configuration this is (0 at start, +1 per successful reload).
    pub generation: u64,
    /// The validation stage's rules and the model catalogue.
    pub rules: crate::validate::Rules,
    /// The blocklist (process-wide; the same handle in every generation).
    pub front_door: Arc<crate::xdp::FrontDoor>,
    /// The TLS stage, when `[tls] listen` is set.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The authentication stage, when a method is configured.
    pub authn: Option<Arc<crate::authn::Authn>>,
    /// The authorization rules; `None`: no authentication and no rules (all open).
    pub authz: Option<crate::authz::Authz>,
    /// `[authn]` (identity header names, ...).
    pub authn_settings: crate::config::AuthnSettings,
    /// The rate limits of this generation; `None`: nothing is limited.
    pub ratelimit: Option<Arc<crate::ratelimit::Policies>>,
    /// The limiter's state (process-wide; survives reloads).
    pub limiter: Arc<crate::ratelimit::Limiter>,
    /// Traces (when an OTLP endpoint is configured).
    pub tracer: Option<Arc<crate::otel::Tracer>>,
    /// Models served by their own pools (`[[models]] cluster`,
    /// `version_clusters`, `split`), by model name.
    pub model_pools: HashMap<String, crate::balance::ModelPools>,
    /// Queue bands by tenant class (`[ratelimit.classes.X] priority`).
    pub bands: crate::balance::queue::Bands,
    /// Tenants the configuration names (API keys, client certificates,
    /// tenant classes): the only tenant values metric labels take.
    pub known_tenants: std::collections::HashSet<String>,
}

impl Shared {
    /// Built from one configuration generation.
    pub fn new(
        r: &Resolved,
        workers: usize,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        generation: u64,
        process: &Process,
    ) -> Shared {
        let loads = &process.loads;
        let names: Vec<String> = r.clusters.keys().cloned().collect();
        let clusters = names
            .iter()
            .map(|n| {
                let c = &r.config.clusters[n];
                let backend_loads: Vec<_> =
                    r.clusters[n].iter().map(|a| loads.get(n, *a)).collect();
                Cluster {
                    name: n.clone(),
                    backends: r.clusters[n].clone(),
                    backend_names: r.clusters[n].iter().map(|a| a.to_string()).collect(),
                    balance: c.balance.clone(),
                    tls: r.upstream_tls.get(n).cloned(),
                    h2: c.http.is_h2(),
                    h2_streams: c.max_streams_per_connection,
                    key: crate::pool::cluster_key(n),
                    queue: c
                        .queue
                        .as_ref()
                        .map(|q| (loads.queue(n, &backend_loads, &c.balance, q), q.clone())),
                    prefix: c.balance.algorithm.uses_prefix().then(|| {
                        let ix = loads.prefix_index(n, &backend_loads, &c.balance);
                        metrics
                            .prefix_index_bytes
                            .with_label_values(&[n])
                            .set(ix.index.bytes() as i64);
                        ix
                    }),
                    loads: backend_loads,
                    retry_budget: loads.budget(n, &c.balance),
                    pool_max_idle: c.pool_max_idle,
                    max_connections: c.max_connections,
                    pool_idle_timeout: c.pool_idle_timeout,
                }
            })
            .collect();
        let s = &r.config.server;
        Shared {
            limits: r.config.limits.clone(),
            timeouts: r.config.timeouts.clone(),
            router: Router::new(&r.config, &names),
            clusters,
            metrics,
            shutdown,
            buffer_size: s.buffer_size,
            max_conns_per_worker: s.max_connections.div_ceil(workers).max(1),
            trust_forwarded: s.trust_forwarded_headers,
            h2c: s.h2c,
            http2: r.config.http2.clone(),
            access_log: r.config.log.access_log,
            generation,
            rules: crate::validate::Rules::new(r),
            front_door: process.front_door.clone(),
            authz: (r.authn.is_some() || !r.config.authz.rules.is_empty())
                .then(|| crate::authz::Authz::new(&r.config.authz.rules)),
            tls: r.tls.clone(),
            authn: r.authn.clone(),
            authn_settings: r.config.authn.clone(),
            ratelimit: r
                .config
                .ratelimit
                .enabled()
                .then(|| Arc::new(crate::ratelimit::Policies::new(&r.config.ratelimit))),
            limiter: process.limiter.clone(),
            tracer: process.tracer.clone(),
            bands: crate::balance::queue::Bands::new(
                &r.config.ratelimit,
                r.config.routes.iter().filter_map(|x| x.priority),
            ),
            known_tenants: r
                .config
                .authn
                .api_keys
                .iter()
                .map(|k| k.tenant.clone())
                .chain(r.config.authn.mtls_clients.iter().map(|k| k.tenant.clone()))
                .chain(r.config.ratelimit.tenant_classes.keys().cloned())
                .filter(|t| !t.is_empty())
                .collect(),
            model_pools: r
                .config
                .models
                .iter()
                .map(|m| {
                    let p =
                        crate::balance::ModelPools::new(m, |c| names.iter().position(|n| n == c));
                    (m.name.clone(), p)
                })
                .filter(|(_, p)| *p != crate::balance::ModelPools::default())
                .collect(),
        }
    }
}

/// Everything a config reload replaces, built by each worker for itself.
/// A request holds the `Rc<Current>` it started with, so a reload never
/// changes the rules (or the pool indexes) under an in-flight request.
pub struct Current {
    pub shared: Shared,
    pub pool: RefCell<Pool>,
    rr: Vec<Cell<usize>>,
    /// `gateway_upstream_pool_idle_connections{worker, cluster}`, by cluster index.
    pub pool_idle: Vec<IntGauge>,
    /// The rate-limit stage's per-request counters, by route index, resolved
    /// once (no label lookup per request).
    pub route_counters: Vec<RouteCounters>,
}

/// `gateway_ratelimit_decisions_total{route, result="admitted"}` and
/// `gateway_ratelimit_tokens_total{route, kind}` of one route, worker-local.
pub struct RouteCounters {
    pub admitted: LocalIntCounter,
    pub tokens_estimated: LocalIntCounter,
    pub tokens_actual: LocalIntCounter,
}

impl RouteCounters {
    fn flush(&self) {
        self.admitted.flush();
        self.tokens_estimated.flush();
        self.tokens_actual.flush();
    }
}

impl Current {
    pub fn new(worker: usize, shared: Shared) -> Current {
        let w = worker.to_string();
        Current {
            pool: RefCell::new(Pool::new(&shared.clusters)),
            rr: shared.clusters.iter().map(|_| Cell::new(worker)).collect(),
            pool_idle: shared
                .clusters
                .iter()
                .map(|c| shared.metrics.pool_idle.with_label_values(&[&w, &c.name]))
                .collect(),
            route_counters: shared
                .router
                .routes()
                .iter()
                .map(|r| {
                    let m = &shared.metrics;
                    RouteCounters {
                        admitted: m
                            .ratelimit
                            .with_label_values(&[&r.name, "admitted", "", ""])
                            .local(),
                        tokens_estimated: m
                            .ratelimit_tokens
                            .with_label_values(&[&r.name, "estimated"])
                            .local(),
                        tokens_actual: m
                            .ratelimit_tokens
                            .with_label_values(&[&r.name, "actual"])
                            .local(),
                    }
                })
                .collect(),
            shared,
        }
    }

    /// A cluster's round-robin cursor (per worker).
    pub fn cursor(&self, cluster: usize) -> &Cell<usize> {
        &self.rr[cluster]
    }
}

impl Current {
    /// Fold this generation's worker-local counters into the registry.
    pub fn flush(&self) {
        for c in &self.route_counters {
            c.flush();
        }
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        self.flush();
        // The pool closes with this generation: its idle connections go too.
        for (c, n) in self.pool.get_mut().idle_counts().into_iter().enumerate() {
            self.pool_idle[c].sub(n as i64);
        }
    }
}

pub struct Worker {
    pub id: usize,
    current: RefCell<Rc<Current>>,
    pub metrics: WorkerMetrics,
    id_prefix: u64,
    id_counter: Cell<u64>,
    /// Open client connections on this worker.
    pub active: Cell<usize>,
    pub draining: Cell<bool>,
    /// Client connections waiting on their client: for their next request
    /// (`None`), or for the rest of a request head begun at the instant
    /// given; a drain closes them, and so does [`Worker::shed`] at
    /// `max_connections`.
    idle: RefCell<HashMap<u64, Waiting>>,
    next_conn: Cell<u64>,
    /// When this worker last logged making room at max_connections.
    pub shed_logged: Cell<Option<Instant>>,
    /// Woken when a connection closes (accept back-pressure) or a drain starts.
    pub wake: event_listener::Event,
    /// Woken when a drain starts (ends the accept loop).
    pub drain: event_listener::Event,
    /// Reused memory for the validation stage's JSON parsing.
    pub json_scratch: RefCell<crate::validate::Scratch>,
    /// Verified JWTs (per worker: no lock on the hot path).
    pub token_cache: RefCell<crate::authn::TokenCache>,
    /// The balance stage's random choices (power of two choices, ties).
    pub rng: crate::balance::Rng,
    /// Shadow (mirrored) requests in flight on this worker.
    pub shadows: Rc<Cell<usize>>,
    /// HTTP/2 connections to backends (gRPC routes, `http = "2"`/`"h2c"`
    /// clusters), by backend: each multiplexes up to the cluster's
    /// `max_streams_per_connection` requests.
    /// Keyed by the cluster's [`Cluster::key`](crate::pool::Cluster::key) and the backend.
    pub h2_upstream: RefCell<HashMap<(u64, std::net::SocketAddr), Vec<crate::pool::H2Conn>>>,
    /// Backends a new HTTP/2 connection is being opened to (others wait for it).
    pub h2_connecting: RefCell<HashMap<(u64, std::net::SocketAddr), Rc<event_listener::Event>>>,
    /// Process-wide: metrics registry and shutdown flag (never change on reload).
    pub metrics_registry: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
}

/// A client connection waiting on its client (see `Worker::idle`).
struct Waiting {
    fd: RawFd,
    /// None: idle between requests; Some: a request head expected since then.
    since: Option<Instant>,
    /// Part of that head is in.
    partial: bool,
}

impl Worker {
    pub fn new(id: usize, shared: Shared) -> Worker {
        let metrics = WorkerMetrics::new(&shared.metrics, id);
        let token_cache = crate::authn::TokenCache::new(shared.authn_settings.token_cache_entries);
        let metrics_registry = shared.metrics.clone();
        let shutdown = shared.shutdown.clone();
        Worker {
            id,
            current: RefCell::new(Rc::new(Current::new(id, shared))),
            metrics,
            id_prefix: random_u64() ^ ((id as u64) << 56),
            id_counter: Cell::new(0),
            active: Cell::new(0),
            draining: Cell::new(false),
            idle: RefCell::new(HashMap::new()),
            next_conn: Cell::new(0),
            shed_logged: Cell::new(None),
            wake: event_listener::Event::new(),
            drain: event_listener::Event::new(),
            json_scratch: RefCell::new(crate::validate::Scratch::default()),
            token_cache: RefCell::new(token_cache),
            rng: crate::balance::Rng::new(random_u64()),
            shadows: Rc::new(Cell::new(0)),
            h2_upstream: RefCell::new(HashMap::new()),
            h2_connecting: RefCell::new(HashMap::new()),
            metrics_registry,
            shutdown,
        }
    }

    /// The configuration in force now (a request keeps the one it started with).
    pub fn current(&self) -> Rc<Current> {
        self.current.borrow().clone()
    }

    /// Switch to a reloaded configuration. In-flight requests finish on the
    /// old one; its pool closes when the last of them is done.
    pub fn install(&self, shared: Shared) {
        let next = Rc::new(Current::new(self.id, shared));
        *self.current.borrow_mut() = next;
    }

    /// A fresh request id: 32 hex digits, unique per process run.
    pub fn new_request_id(&self, out: &mut String) {
        use std::fmt::Write;
        let n = self.id_counter.get().wrapping_add(1);
        self.id_counter.set(n);
        out.clear();
        let _ = write!(out, "{:016x}{:016x}", self.id_prefix, n);
    }

    pub fn conn_id(&self) -> u64 {
        let n = self.next_conn.get() + 1;
        self.next_conn.set(n);
        n
    }

    pub fn mark_idle(&self, conn: u64, fd: RawFd) {
        self.idle.borrow_mut().insert(
            conn,
            Waiting {
                fd,
                since: None,
                partial: false,
            },
        );
    }

    /// Waiting for a request head that began at `since` (`partial`: some of
    /// it is in; else a new connection that has sent nothing yet).
    pub fn mark_reading_head(&self, conn: u64, fd: RawFd, since: Instant, partial: bool) {
        self.idle.borrow_mut().insert(
            conn,
            Waiting {
                fd,
                since: Some(since),
                partial,
            },
        );
    }

    /// At `max_connections`: make room. Close idle keep-alive connections
    /// first, then those whose request head began more than `slow_head` ago
    /// (slowloris), at most `max` in all; returns (idle, slow) closed. Their
    /// pending read ends (SHUT_RD), so their tasks close them.
    pub fn shed(&self, max: usize, slow_head: Duration) -> (usize, usize) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        let mut picked: Vec<(u64, bool)> = idle
            .iter()
            .filter(|(_, w)| w.since.is_none_or(|t| now.duration_since(t) >= slow_head))
            .map(|(id, w)| (*id, w.since.is_some()))
            .collect();
        // Idle ones first (`false` sorts first).
        picked.sort_unstable_by_key(|&(_, slow)| slow);
        picked.truncate(max);
        let (mut n_idle, mut n_slow) = (0, 0);
        for (id, slow) in picked {
            if let Some(w) = idle.remove(&id) {
                // SAFETY: as in `begin_drain`.
                unsafe { libc::shutdown(w.fd, libc::SHUT_RD) };
                if slow {
                    n_slow += 1;
                } else {
                    n_idle += 1;
                }
            }
        }
        (n_idle, n_slow)
    }

    pub fn mark_busy(&self, conn: u64) {
        self.idle.borrow_mut().remove(&conn);
    }

    /// Stop taking requests: idle keep-alive connections are shut (their
    /// pending read ends), busy ones close after their current response.
    pub fn begin_drain(&self) {
        self.draining.set(true);
        // A request whose head is partly in is let finish (and answered).
        self.idle.borrow_mut().retain(|_, w| {
            if !w.partial {
                // SAFETY: the fd belongs to a live connection task on this thread
                // (it unregisters before closing); SHUT_RD only ends its pending read.
                unsafe {
                    libc::shutdown(w.fd, libc::SHUT_RD);
                }
            }
            w.partial
        });
        self.wake.notify(usize::MAX);
        self.drain.notify(usize::MAX);
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// Close expired pooled connections of the current configuration.
    pub fn sweep_pool(&self) {
        let cur = self.current();
        let closed = cur.pool.borrow_mut().sweep();
        for (c, n) in closed.into_iter().enumerate() {
            cur.pool_idle[c].sub(n as i64);
        }
    }
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}
