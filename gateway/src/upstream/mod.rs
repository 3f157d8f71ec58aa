//! Stage 5 — upstream: the balance stage picks a backend of the request's
//! cluster ([`checkout`]), a pooled keep-alive connection is reused or one
//! opened, the request and its body are forwarded as they arrive
//! ([`send`]), and the response is streamed back as it arrives ([`relay`]).
//! [`shadow`] mirrors a copy of a request to a shadow pool; [`grpc`]
//! relays gRPC routes' streams over HTTP/2 instead; `over_h2` sends HTTP
//! routes to backends that speak HTTP/2 (`[clusters.X] http`) and relays
//! their answers through the same [`relay`].
//!
//! Outcome ([`Exchange`]): `error: None` → a response was relayed;
//! `error: Some(e)` with `response_started: false` → the caller answers with
//! `e`'s status; with `response_started: true` → the client connection must
//! be closed (the response is cut short, which the client can detect).

pub mod grpc;
mod over_h2;
mod relay;
mod send;
mod shadow;

pub use shadow::spawn_shadow;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::codec::{BodyKind, RequestHead, ResponseHead};
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::io::Conn;
use crate::pool::{Cluster, Slot};
use crate::route::Route;
use crate::worker::{Current, Worker};

/// After the backend stopped reading an upload: how long to wait for its early answer.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Largest JSON response read whole to drop fields from (larger ones pass untouched).
const MAX_FILTERED_BODY: u64 = 16 * 1024 * 1024;
/// Largest SSE event rewritten (larger ones pass untouched).
const MAX_FILTERED_EVENT: usize = 1024 * 1024;

/// Largest body copied into the head's write (one syscall instead of two).
const COALESCE_MAX: usize = 16 * 1024;

pub struct UpConn {
    pub conn: Conn,
    pub cluster: usize,
    pub backend: usize,
    pub addr: SocketAddr,
    pub reused: bool,
    slot: Slot,
    /// Prompt tokens the backend has to prefill, as far as the prefix index
    /// knows (its time to first token teaches the balancer its prefill speed).
    pub uncached: u64,
}

impl UpConn {
    pub(super) fn picked(&self) -> Picked {
        Picked {
            cluster: self.cluster,
            backend: self.backend,
            addr: self.addr,
            uncached: self.uncached,
        }
    }
}

/// The backend one attempt of a request went to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Picked {
    pub cluster: usize,
    pub backend: usize,
    pub addr: SocketAddr,
    /// Prompt tokens it has to prefill, as far as the prefix index knows.
    pub uncached: u64,
}

/// The balance stage's pick among the request's cluster, backends in
/// `tried` left out: `Ok(None)` when none is left; every backend
/// saturated → `Saturated` (counted), unless the request is past the
/// queue stage, which sends it to the least loaded instead.
fn choose(
    w: &Worker,
    cur: &Current,
    req: &Request<'_>,
    view: Option<&crate::balance::PrefixView<'_>>,
    tried: u64,
) -> Result<Option<usize>, UpstreamError> {
    let ci = req.cluster;
    let cl = &cur.shared.clusters[ci];
    let pick = |s: &crate::balance::BalanceSettings| {
        crate::balance::pick(
            s,
            &cl.loads,
            tried,
            req.model,
            req.size,
            view,
            cur.cursor(ci),
            &w.rng,
        )
    };
    match pick(&cl.balance) {
        Ok(b) => Ok(Some(b)),
        Err(crate::balance::NoPick::Exhausted) => Ok(None),
        // Past the queue stage (granted, or it found room): a backend that
        // saturated since goes to the least loaded rather than a 503.
        Err(crate::balance::NoPick::Saturated) if req.grant.is_some() || cl.queue.is_some() => {
            Ok(pick(&unsaturated(&cl.balance)).ok())
        }
        Err(crate::balance::NoPick::Saturated) => {
            w.metrics.inc(&w.metrics.balance_shed, &[&cl.name], 1);
            Err(UpstreamError::Saturated)
        }
    }
}

/// The balance stage, then connect or reuse: the cluster's algorithm picks a
/// backend (`balance::pick`); a connect failure moves on to another one not
/// tried yet (nothing was sent) and counts against the backend's health;
/// after every backend failed, the last error is returned (→ 502). Every
/// backend saturated (its queue or KV cache, as the server reports it) → 503.
async fn checkout(
    w: &Worker,
    cur: &Current,
    req: &Request<'_>,
    allow_pooled: bool,
    deadline: Option<Instant>,
    exclude: u64,
) -> Result<UpConn, UpstreamError> {
    let route = req.route;
    let ci = req.cluster;
    let cl = &cur.shared.clusters[ci];
    // Waiting for a free slot (every backend at max_connections) is bounded
    // like a connect.
    let (wait, _) = wait_for(route.connect_timeout, deadline);
    let give_up = Instant::now() + wait;
    let released = cur.pool.borrow().released.clone();
    let matches = prefix_matches(cl, req);
    let view = prefix_view(req, matches.as_ref());
    loop {
        let mut last = UpstreamError::Saturated;
        let mut tried = exclude;
        // At most one pick per backend per pass (indexes past 64 have no
        // bit in `tried`: this bounds the pass all the same).
        for _ in 0..cl.backends.len() {
            let Some(b) = choose(w, cur, req, view.as_ref(), tried)? else {
                break;
            };
            if b < 64 {
                tried |= 1 << b;
            }
            let addr = cl.backends[b];
            // Indexed (and its cache clock advanced) only once a
            // connection to it is in hand: a pick that finds no slot or
            // can't connect sent nothing.
            let sent = || match &matches {
                Some(m) => prefix_sent(w, cl, req, m, b),
                None => req.prompt_tokens,
            };
            if allow_pooled {
                let (conn, dropped) = cur.pool.borrow_mut().take(ci, b);
                let gauge = &cur.pool_idle[ci];
                gauge.sub(dropped as i64 + i64::from(conn.is_some()));
                if let Some((conn, slot)) = conn {
                    w.metrics.inc(&w.metrics.upstream_reused, &[&cl.name], 1);
                    return Ok(UpConn {
                        conn,
                        cluster: ci,
                        backend: b,
                        addr,
                        reused: true,
                        slot,
                        uncached: sent(),
                    });
                }
            }
            let Some(slot) = cur.pool.borrow().try_slot(ci, b) else {
                continue;
            };
            let (wait, is_total) = wait_for(route.connect_timeout, deadline);
            if is_total && wait.is_zero() {
                return Err(UpstreamError::TotalTimeout);
            }
            match connect(addr, wait, cur.shared.buffer_size, cl.tls.as_ref()).await {
                Ok(conn) => {
                    w.metrics
                        .inc(&w.metrics.upstream_connections, &[&cl.name], 1);
                    return Ok(UpConn {
                        conn,
                        cluster: ci,
                        backend: b,
                        addr,
                        reused: false,
                        slot,
                        uncached: sent(),
                    });
                }
                Err(e) => {
                    w.metrics
                        .inc(&w.metrics.upstream_errors, &[&cl.name, e.kind()], 1);
                    tracing::warn!(cluster = %cl.name, backend = %addr, kind = e.kind(), "upstream connect failed");
                    note_outcome(w, cl, b, false);
                    last = e;
                }
            }
        }
        if last != UpstreamError::Saturated {
            return Err(last);
        }
        // Every backend is at max_connections: wait for one to free up.
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UpstreamError::Saturated);
        }
        // Still `Saturated` means this pass made no connect attempt, so it
        // never yielded: no slot can have been freed since it looked, and
        // listening now misses nothing (single-threaded worker).
        let freed = released.listen();
        let _ = monoio::time::timeout(left, freed).await;
    }
}

/// The cluster's rules with saturation off: for a request its queue
/// dispatched (rare: a backend saturated between the grant and the pick).
fn unsaturated(s: &crate::balance::BalanceSettings) -> crate::balance::BalanceSettings {
    crate::balance::BalanceSettings {
        max_inflight: 0,
        queue_saturation: u32::MAX,
        kv_saturation: f64::INFINITY,
        ..s.clone()
    }
}

/// Passive health: a backend's success or failure; an ejection is logged and counted.
fn note_outcome(w: &Worker, cl: &Cluster, b: usize, ok: bool) {
    if let Some(d) = cl.loads[b].outcome(ok, &cl.balance) {
        w.metrics.inc(
            &w.metrics.balance_ejections,
            &[&cl.name, &cl.backend_names[b]],
            1,
        );
        tracing::warn!(cluster = %cl.name, backend = %cl.backends[b], ejected_for_s = d.as_secs_f64(),
            "backend ejected after consecutive failures");
    }
}

/// This request's hold on its backend's in-flight count (all workers);
/// released when the exchange is dropped, after the response's last byte.
#[derive(Debug)]
pub struct InFlight {
    pub load: std::sync::Arc<crate::balance::BackendLoad>,
    /// Counted in the backend's streams in flight too.
    pub stream: bool,
    /// In flight there when this one was sent, itself included.
    pub concurrency: u32,
    pub backend: usize,
    /// Prompt tokens it had to prefill (as far as the prefix index knows).
    pub uncached: u64,
    /// Its cluster's queue: the slot it frees goes to a waiter.
    pub queue: Option<std::sync::Arc<crate::balance::queue::FlowQueue>>,
}

/// What the prefix index knows of the request's prompt, when its cluster
/// routes on prefixes.
fn prefix_matches(cl: &Cluster, req: &Request<'_>) -> Option<crate::balance::prefix::Matches> {
    let ix = cl.prefix.as_ref()?;
    if req.prefix.is_empty() {
        return None;
    }
    let holders = ix.holders(&cl.loads);
    let mut m = ix.index.matches(req.prefix, &holders);
    m.holders = holders;
    Some(m)
}

/// The balance stage's view of the request's prompt, given what the index
/// holds of it.
fn prefix_view<'v>(
    req: &Request<'v>,
    matches: Option<&'v crate::balance::prefix::Matches>,
) -> Option<crate::balance::PrefixView<'v>> {
    matches.map(|m| crate::balance::PrefixView {
        blocks: req.prefix,
        matches: m,
        prompt_tokens: req.prompt_tokens,
    })
}

/// Output tokens a request without a declared budget is taken to allocate
/// in its backend's cache (the prefix index's model of eviction); a
/// declared `max_tokens` counts up to 4× this (clients often declare far
/// more than they get).
const TYPICAL_OUTPUT_TOKENS: u64 = 256;

/// The prompt goes to backend `b`: count whether it was held there, advance
/// `b`'s cache clock by what it will allocate, index the blocks there at
/// that clock; returns the prompt tokens `b` has to prefill as far as the
/// index knows.
fn prefix_sent(
    w: &Worker,
    cl: &Cluster,
    req: &Request<'_>,
    m: &crate::balance::prefix::Matches,
    b: usize,
) -> u64 {
    let held = u64::from(m.per_backend.get(b).copied().unwrap_or(0));
    let result = if held > 0 { "cached" } else { "uncached" };
    w.metrics
        .inc(&w.metrics.prefix_routes, &[&cl.name, result], 1);
    // What the backend allocates for it: the prompt blocks it doesn't
    // hold, and the output's (the declared budget, else a typical answer).
    let output = match req.size {
        0 => TYPICAL_OUTPUT_TOKENS,
        n => n.min(4 * TYPICAL_OUTPUT_TOKENS),
    };
    let load = &cl.loads[b];
    let blocks = |tokens: u64| tokens.div_ceil(crate::balance::prefix::BLOCK_TOKENS);
    let allocated = blocks(req.prompt_tokens)
        .max(req.prefix.len() as u64)
        .saturating_sub(held)
        + blocks(output);
    let stamp = load.allocate(allocated);
    if let Some(ix) = &cl.prefix {
        ix.index.insert(req.prefix, &m.holders, b, stamp);
        // The fleet learns it at the next sync (when shared).
        ix.record(load.addr, req.prefix, allocated);
    }
    req.prompt_tokens
        .saturating_sub(held * crate::balance::prefix::BLOCK_TOKENS)
}

impl InFlight {
    /// Count this request in flight at the backend `up` leads to.
    /// `stream`: the client asked for a stream (counted in the backend's streams).
    fn hold(cur: &Current, up: Picked, stream: bool) -> InFlight {
        let load = cur.shared.clusters[up.cluster].loads[up.backend].clone();
        let n = load
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        if stream {
            load.streams
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        InFlight {
            load,
            stream,
            concurrency: n,
            backend: up.backend,
            uncached: up.uncached,
            queue: cur.shared.clusters[up.cluster]
                .queue
                .as_ref()
                .map(|q| q.0.clone()),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.stream {
            self.load
                .streams
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        self.load
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if let Some(q) = self.queue.as_ref().filter(|q| q.waiting() > 0) {
            q.pump();
        }
    }
}

/// A new connection to `addr`: TCP, then the TLS handshake when the
/// cluster's backends speak TLS (`[clusters.X.tls]`), all within `timeout`.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    buffer: usize,
    tls: Option<&crate::tls::Upstream>,
) -> Result<Conn, UpstreamError> {
    let started = Instant::now();
    let s = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(UpstreamError::ConnectRefused)
        }
        Ok(Err(_)) => return Err(UpstreamError::ConnectError),
        Ok(Ok(s)) => s,
    };
    let _ = s.set_nodelay(true);
    let Some(t) = tls else {
        return Ok(Conn::new(s, buffer));
    };
    let session = rustls::ClientConnection::new(t.config.clone(), t.name.clone())
        .map_err(|_| UpstreamError::ConnectError)?;
    let mut conn = Conn::new_client_tls(s, buffer, session);
    let left = timeout.saturating_sub(started.elapsed());
    match conn.handshake(left).await {
        Ok(()) => Ok(conn),
        Err(crate::io::HandshakeError::Timeout) => Err(UpstreamError::ConnectTimeout),
        Err(e) => {
            tracing::warn!(backend = %addr, error = ?e, "TLS handshake with the backend failed");
            Err(UpstreamError::ConnectError)
        }
    }
}

/// What happened to one request, for the access log and metrics.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Status relayed to the client (0 when none was).
    pub status: u16,
    pub error: Option<ProxyError>,
    pub response_started: bool,
    /// The request body was read to its end (so the connection may be reused).
    pub request_body_done: bool,
    /// The request head was removed from the client buffer.
    pub head_consumed: bool,
    pub backend: Option<SocketAddr>,
    pub header_time: Option<Duration>,
    /// From sending the request to the response's first body byte (the
    /// first token of a stream).
    pub first_byte: Option<Duration>,
    /// A stream's SSE events relayed so far (`data:` lines), and when the
    /// first body byte came.
    pub events: u64,
    pub first_at: Option<Instant>,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    /// The client connection may carry another request.
    pub client_keep_alive: bool,
    /// The backend's in-flight slot (balance stage), held to the end.
    pub inflight: Option<InFlight>,
    /// The token usage the backend reported (when asked to look for it).
    pub usage: Option<crate::ratelimit::usage::UsageScan>,
    /// An OpenAI stream's events that carried generated content.
    pub content_events: u64,
    /// The stream was ended at the caller's token budget (`cut_streams`).
    pub cut: bool,
}

/// Everything the upstream stage needs to know about the request.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    /// An OpenAI stream: its events are read as they pass (content events
    /// counted; with `strip_usage`, the usage-only event the gateway asked
    /// for removed).
    pub tap: bool,
    pub strip_usage: bool,
    /// The caller's admission, when a budget of it ends streams that
    /// outgrow it (`cut_streams`).
    pub cut: Option<&'a crate::ratelimit::Admission>,
    /// Dispatched by its cluster's queue: room was counted for it until it
    /// is in flight.
    pub grant: Option<&'a crate::balance::queue::Grant>,
    /// Who is calling (authn stage); sent to the backend as identity headers.
    pub identity: Option<&'a crate::authn::Identity>,
    /// The client connection is TLS (`x-forwarded-proto: https`).
    pub tls: bool,
    /// Read whole and checked by the validation stage (head and body are
    /// then off the client buffer and `head`'s ranges index `buffered.head`).
    pub buffered: Option<&'a crate::validate::Buffered>,
    /// The validation stage already answered `Expect: 100-continue`.
    pub continue_sent: bool,
    pub route: &'a Route,
    pub request_id: &'a str,
    pub peer: IpAddr,
    pub started: Instant,
    /// Extra response header lines (each ending in CRLF): the rate-limit headers.
    pub response_headers: &'a str,
    /// Look for the backend's reported token usage in the response body.
    pub scan_usage: bool,
    /// The cluster serving it: the model's pool (`[[models]] cluster`) or the route's.
    pub cluster: usize,
    /// The model asked for ("" when none): LoRA affinity.
    pub model: &'a str,
    /// The declared output budget (`max_tokens`; 0 unknown): size-aware balancing.
    pub size: u64,
    /// The prompt's block hashes (prefix-aware balancing; empty: none).
    pub prefix: &'a [u64],
    /// The prompt's estimated size in tokens.
    pub prompt_tokens: u64,
    /// The client asked for a stream (`"stream": true`): the first body
    /// byte is the first token, which times the backend's prefill.
    pub stream: bool,
    /// Traced: the `traceparent` naming the gateway's span, which replaces
    /// the client's on the way to the backend.
    pub traceparent: Option<String>,
}

/// Forward one request to a backend and relay its answer to `client`.
pub async fn forward<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
) -> Exchange {
    let mut x = Exchange {
        request_body_done: req.head.body_kind() == BodyKind::Empty,
        usage: req
            .scan_usage
            .then(crate::ratelimit::usage::UsageScan::default),
        ..Exchange::default()
    };
    let result = exchange(client, req, w, cur, out, resp, &mut x).await;
    if let Some(f) = &x.inflight {
        // Load and health signals for the balancer.
        let cl = &cur.shared.clusters[req.cluster];
        if x.status != 0 {
            f.load.complete(
                req.started.elapsed(),
                x.header_time,
                f.concurrency,
                req.size,
            );
        }
        // A whole response's first byte comes after its last token: only a
        // stream's times the prefill.
        if let (Some(t), 200, true) = (x.first_byte, x.status, req.stream) {
            f.load.first_token(t, f.uncached);
            if let Some(at) = x.first_at {
                f.load.stream_done(x.events, at.elapsed());
            }
        }
        let failed = match &result {
            Err(ProxyError::Upstream(_)) => true,
            Err(_) => false,
            Ok(()) => x.status >= 500,
        };
        if !matches!(result, Err(ProxyError::Client(_))) {
            note_outcome(w, cl, f.backend, !failed);
        }
    }
    if let Err(e) = result {
        if let ProxyError::Upstream(u) = e {
            let cluster = &cur.shared.clusters[req.cluster].name;
            // Connect failures were counted per try in `checkout`.
            if !u.retryable() {
                w.metrics
                    .inc(&w.metrics.upstream_errors, &[cluster, u.kind()], 1);
            }
        }
        x.error = Some(e);
    }
    x
}

/// Time left for one wait: the stage timeout, cut short by the route's total deadline.
fn wait_for(stage: Duration, deadline: Option<Instant>) -> (Duration, bool) {
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left < stage {
                (left, true)
            } else {
                (stage, false)
            }
        }
        None => (stage, false),
    }
}

/// A request's state across its attempts (a stale pooled connection
/// replaced, another backend after one closed without answering).
#[derive(Default)]
struct Attempts {
    /// `100 Continue` went to the client already.
    sent_continue: bool,
    /// A stale pooled connection was replaced by a fresh one (once at most).
    retried: bool,
    /// Backends that closed or reset on this request (a bit per index below
    /// 64): not tried again.
    failed_on: u64,
    /// The backend stopped reading the upload; its early answer may still come.
    upload_cut: bool,
}

/// Checkout → send → response head, tried again where that is safe; then
/// the response relayed and the backend connection pooled again.
async fn exchange<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let body = request_body(req, x)?;
    let deadline = req.route.total_timeout.map(|t| req.started + t);
    let cl = &cur.shared.clusters[req.cluster];
    cl.retry_budget.deposit(&cl.balance);
    if cl.h2 {
        return over_h2::exchange(client, req, w, cur, out, resp, x, body).await;
    }
    let mut a = Attempts {
        sent_continue: req.continue_sent,
        ..Attempts::default()
    };
    let (up, sent_at) = loop {
        // A stale pooled connection is retried once, on a fresh one, only
        // when nothing of the request body has been consumed.
        let mut up = checkout(w, cur, req, !a.retried, deadline, a.failed_on).await?;
        x.backend = Some(up.addr);
        x.inflight = Some(InFlight::hold(cur, up.picked(), req.stream));
        if let Some(g) = req.grant {
            g.arrived();
        }
        let to = send::Target {
            up: &mut up,
            body,
            deadline,
        };
        if !send::request(client, req, w, cur, to, &mut a, out, x).await? {
            a.retried = true;
            continue;
        }
        let sent_at = Instant::now();
        let to = send::Target {
            up: &mut up,
            body,
            deadline,
        };
        let watch = client.closed_watch();
        match relay::response_head(watch, req, w, cur, to, &mut a, resp, x).await? {
            relay::Head::Ready => break (up, sent_at),
            relay::Head::Retry => continue,
        }
    };
    let done = relay::Done {
        sent_at,
        upload_cut: a.upload_cut,
        deadline,
    };
    relay::response(client, req, w, cur, up, done, out, resp, x).await
}

/// What of the request body is left to stream (a buffered one is already
/// off the client connection), checked against the route's limit.
fn request_body(req: &Request<'_>, x: &mut Exchange) -> Result<BodyKind, ProxyError> {
    if let Some(b) = req.buffered {
        x.head_consumed = true;
        x.request_body_done = true;
        x.req_bytes = b.body.len() as u64;
        return Ok(BodyKind::Empty);
    }
    let body = req.head.body_kind();
    if let BodyKind::Length(n) = body {
        if n > req.route.max_request_body_bytes {
            return Err(ClientError::BodyTooLarge.into());
        }
    }
    Ok(body)
}

/// A wait that ran out: the route's total deadline, or the stage's own timeout.
fn timed_out(is_total: bool) -> UpstreamError {
    if is_total {
        UpstreamError::TotalTimeout
    } else {
        UpstreamError::ResponseTimeout
    }
}
