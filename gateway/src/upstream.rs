//! Stage 9 — upstream: pick a backend of the route's cluster (round-robin),
//! reuse a pooled keep-alive connection or open one, forward the request and
//! its body as it arrives, and stream the response back as it arrives.
//!
//! Outcome ([`Exchange`]): `error: None` → a response was relayed;
//! `error: Some(e)` with `response_started: false` → the caller answers with
//! `e`'s status; with `response_started: true` → the client connection must
//! be closed (the response is cut short, which the client can detect).

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::codec::{self, BodyKind, ChunkedDecoder, RequestHead, ResponseHead};
use crate::config::Timeouts;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::io::{Conn, ReadError, WriteError};
use crate::route::Route;
use crate::worker::{Current, Worker};

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub backends: Vec<SocketAddr>,
    /// `backends` as metric labels.
    pub backend_names: Vec<String>,
    /// How a backend is picked, and its health rules.
    pub balance: crate::balance::BalanceSettings,
    /// Each backend's load and health (process-wide, by index).
    pub loads: Vec<std::sync::Arc<crate::balance::BackendLoad>>,
    /// Retries of idempotent requests left to spend (process-wide).
    pub retry_budget: std::sync::Arc<crate::balance::RetryBudget>,
    /// Open connections per backend per worker (in use + idle).
    pub max_connections: usize,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
}

/// After the backend stopped reading an upload: how long to wait for its early answer.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Largest JSON response read whole to drop fields from (larger ones pass untouched).
const MAX_FILTERED_BODY: u64 = 16 * 1024 * 1024;
/// Largest SSE event rewritten (larger ones pass untouched).
const MAX_FILTERED_EVENT: usize = 1024 * 1024;

/// Largest body copied into the head's write (one syscall instead of two).
const COALESCE_MAX: usize = 16 * 1024;

struct Idle {
    conn: Conn,
    since: Instant,
    slot: Slot,
}

/// One open connection to a backend, counted against its cluster's
/// `max_connections`; released (and a waiter woken) when dropped.
pub struct Slot {
    open: Rc<Cell<usize>>,
    released: Rc<event_listener::Event>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        self.released.notify(1);
    }
}

/// Idle keep-alive connections of one worker, `[cluster][backend]`, most
/// recently used last (reused first: its TCP state is warmest).
pub struct Pool {
    idle: Vec<Vec<VecDeque<Idle>>>,
    max_idle: Vec<usize>,
    idle_timeout: Vec<Duration>,
    /// Open connections (in use and idle) per `[cluster][backend]`.
    open: Vec<Vec<Rc<Cell<usize>>>>,
    max_open: Vec<usize>,
    /// Woken when a connection closes: a request waiting for a slot retries.
    released: Rc<event_listener::Event>,
}

impl Pool {
    pub fn new(clusters: &[Cluster]) -> Pool {
        Pool {
            idle: clusters
                .iter()
                .map(|c| c.backends.iter().map(|_| VecDeque::new()).collect())
                .collect(),
            max_idle: clusters.iter().map(|c| c.pool_max_idle).collect(),
            idle_timeout: clusters.iter().map(|c| c.pool_idle_timeout).collect(),
            open: clusters
                .iter()
                .map(|c| c.backends.iter().map(|_| Rc::new(Cell::new(0))).collect())
                .collect(),
            max_open: clusters.iter().map(|c| c.max_connections).collect(),
            released: Rc::new(event_listener::Event::new()),
        }
    }

    /// A slot for a new connection, unless the backend is at `max_connections`.
    fn try_slot(&self, cluster: usize, backend: usize) -> Option<Slot> {
        let open = &self.open[cluster][backend];
        if open.get() >= self.max_open[cluster] {
            return None;
        }
        open.set(open.get() + 1);
        Some(Slot {
            open: open.clone(),
            released: self.released.clone(),
        })
    }

    /// A live idle connection to this backend; `.1` is how many were discarded.
    fn take(&mut self, cluster: usize, backend: usize) -> (Option<(Conn, Slot)>, usize) {
        let timeout = self.idle_timeout[cluster];
        let q = &mut self.idle[cluster][backend];
        let mut dropped = 0;
        while let Some(i) = q.pop_back() {
            if i.since.elapsed() >= timeout {
                // Everything below is older still.
                dropped += 1 + q.len();
                q.clear();
                break;
            }
            // A close, or bytes the backend sent after its response (a buggy
            // backend answering HEAD with a body): either makes it unusable.
            if i.conn.is_stale() {
                dropped += 1;
                continue;
            }
            return (Some((i.conn, i.slot)), dropped);
        }
        (None, dropped)
    }

    fn put(&mut self, cluster: usize, backend: usize, conn: Conn, slot: Slot) -> bool {
        let q = &mut self.idle[cluster][backend];
        if q.len() >= self.max_idle[cluster] {
            return false;
        }
        q.push_back(Idle {
            conn,
            since: Instant::now(),
            slot,
        });
        // A request waiting for a slot can take this connection now.
        self.released.notify(1);
        true
    }

    /// Close connections idle for longer than their cluster allows; returns how many per cluster.
    pub fn sweep(&mut self) -> Vec<usize> {
        let mut closed = vec![0; self.idle.len()];
        for (c, backends) in self.idle.iter_mut().enumerate() {
            for q in backends.iter_mut() {
                while q
                    .front()
                    .is_some_and(|i| i.since.elapsed() >= self.idle_timeout[c])
                {
                    q.pop_front();
                    closed[c] += 1;
                }
            }
        }
        closed
    }

    /// Idle connections per cluster.
    pub fn idle_counts(&self) -> Vec<usize> {
        self.idle
            .iter()
            .map(|b| b.iter().map(VecDeque::len).sum())
            .collect()
    }

    pub fn clear(&mut self) {
        for b in self.idle.iter_mut() {
            for q in b.iter_mut() {
                q.clear();
            }
        }
    }
}

pub struct UpConn {
    pub conn: Conn,
    pub cluster: usize,
    pub backend: usize,
    pub addr: SocketAddr,
    pub reused: bool,
    slot: Slot,
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
    loop {
        let mut last = UpstreamError::Saturated;
        let mut tried = exclude;
        // At most one pick per backend per pass (indexes past 64 have no
        // bit in `tried`: this bounds the pass all the same).
        for _ in 0..cl.backends.len() {
            let b = match crate::balance::pick(
                &cl.balance,
                &cl.loads,
                tried,
                req.model,
                req.size,
                cur.cursor(ci),
                &w.rng,
            ) {
                Ok(b) => b,
                Err(crate::balance::NoPick::Exhausted) => break,
                Err(crate::balance::NoPick::Saturated) => {
                    w.metrics.inc(&w.metrics.balance_shed, &[&cl.name], 1);
                    return Err(UpstreamError::Saturated);
                }
            };
            if b < 64 {
                tried |= 1 << b;
            }
            let addr = cl.backends[b];
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
            match connect(addr, wait, cur.shared.buffer_size).await {
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
    /// In flight there when this one was sent, itself included.
    pub concurrency: u32,
    pub backend: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    buffer: usize,
) -> Result<Conn, UpstreamError> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Err(_) => Err(UpstreamError::ConnectTimeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(UpstreamError::ConnectRefused)
        }
        Ok(Err(_)) => Err(UpstreamError::ConnectError),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Conn::new(s, buffer))
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
    pub req_bytes: u64,
    pub resp_bytes: u64,
    /// The client connection may carry another request.
    pub client_keep_alive: bool,
    /// The backend's in-flight slot (balance stage), held to the end.
    pub inflight: Option<InFlight>,
    /// The token usage the backend reported (when asked to look for it).
    pub usage: Option<crate::ratelimit::usage::UsageScan>,
}

/// Everything the upstream stage needs to know about the request.
pub struct Request<'a> {
    pub head: &'a RequestHead,
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
}

pub async fn forward(
    client: &mut Conn,
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

async fn exchange(
    client: &mut Conn,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let head = req.head;
    let route = req.route;
    // A buffered body is already off the client connection: nothing to stream.
    let body = if req.buffered.is_some() {
        BodyKind::Empty
    } else {
        head.body_kind()
    };
    if let Some(b) = req.buffered {
        x.head_consumed = true;
        x.request_body_done = true;
        x.req_bytes = b.body.len() as u64;
    }
    if let BodyKind::Length(n) = body {
        if n > route.max_request_body_bytes {
            return Err(ClientError::BodyTooLarge.into());
        }
    }
    let deadline = route.total_timeout.map(|t| req.started + t);
    let timeouts = &cur.shared.timeouts;
    let mut sent_continue = req.continue_sent;
    let mut retried = false;
    // Backends that closed or reset on this request (not tried again).
    let mut failed_on = 0u64;
    cur.shared.clusters[req.cluster]
        .retry_budget
        .deposit(&cur.shared.clusters[req.cluster].balance);
    let mut upload_cut = false;

    let (mut up, sent_at) = 'attempt: loop {
        // A stale pooled connection is retried once, on a fresh one, only when
        // nothing of the request body has been consumed.
        let mut up = checkout(w, cur, req, !retried, deadline, failed_on).await?;
        x.backend = Some(up.addr);
        let load = cur.shared.clusters[up.cluster].loads[up.backend].clone();
        let n = load
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        x.inflight = Some(InFlight {
            load,
            concurrency: n,
            backend: up.backend,
        });
        if head.expect_continue && !sent_continue {
            let (r, _) = client
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), timeouts.send)
                .await;
            r.map_err(client_write)?;
            sent_continue = true;
        }
        out.clear();
        if let Some(b) = req.buffered {
            build_upstream_head(
                &b.head,
                req,
                cur.shared.trust_forwarded,
                up.addr,
                Some(b.body.len() as u64),
                cur.shared
                    .authn
                    .as_ref()
                    .map(|_| &cur.shared.authn_settings),
                out,
            );
            out.extend_from_slice(&b.body);
        } else {
            build_upstream_head(
                client.pending(),
                req,
                cur.shared.trust_forwarded,
                up.addr,
                None,
                cur.shared
                    .authn
                    .as_ref()
                    .map(|_| &cur.shared.authn_settings),
                out,
            );
        }
        // A small body that arrived with the head goes out in the same write.
        let mut with_head = 0usize;
        if let BodyKind::Length(n) = body {
            let p = &client.pending()[head.head_len..];
            let k = n.min(p.len() as u64) as usize;
            if k <= COALESCE_MAX {
                out.extend_from_slice(&p[..k]);
                with_head = k;
            }
        }
        let (r, o) = up.conn.write_all(std::mem::take(out), timeouts.send).await;
        // A buffered body went through `out`: don't hold a second copy of it
        // for the rest of a (possibly minutes-long) response.
        *out = if o.capacity() > 1 << 20 {
            Vec::with_capacity(4096)
        } else {
            o
        };
        if let Err(WriteError::Timeout) = r {
            return Err(UpstreamError::SendTimeout.into());
        }
        if r.is_err() {
            // Nothing of the body has been read from the client yet: safe to retry.
            if up.reused && !retried {
                retried = true;
                continue;
            }
            return Err(UpstreamError::Reset.into());
        }
        // The head is no longer needed unless a bodiless request may be retried.
        if body != BodyKind::Empty {
            client.consume(head.head_len + with_head);
            x.head_consumed = true;
            x.req_bytes = with_head as u64;
            let sent = send_body(
                client,
                &mut up.conn,
                body,
                route.max_request_body_bytes,
                timeouts,
                deadline,
                x,
            );
            match sent.await {
                Ok(()) => x.request_body_done = true,
                // The backend stopped reading mid-upload; it may have answered
                // already (an early 413, say): relay that rather than a 502.
                Err(ProxyError::Upstream(UpstreamError::Reset)) => upload_cut = true,
                Err(e) => return Err(e),
            }
        } else {
            x.request_body_done = true;
        }
        let sent_at = Instant::now();

        // Response head; informational (1xx) responses are skipped.
        loop {
            match codec::parse_response(
                up.conn.pending(),
                cur.shared.limits.max_response_header_bytes,
                cur.shared.limits.max_response_headers,
                head.is_head,
                resp,
            ) {
                Ok(true) if resp.status == 101 => return Err(UpstreamError::BadResponse.into()),
                Ok(true) if (100..200).contains(&resp.status) => {
                    up.conn.consume(resp.head_len);
                    continue;
                }
                Ok(true) => break 'attempt (up, sent_at),
                Ok(false) => {}
                Err(e) => return Err(e.into()),
            }
            let (mut wait, is_total) = wait_for(route.response_timeout, deadline);
            if upload_cut {
                wait = wait.min(EARLY_ANSWER_WAIT);
            }
            match up.conn.fill_watching(wait, client.raw_fd()).await {
                Err(ReadError::WatchedClosed) => return Err(ClientError::ClientClosed.into()),
                Ok(0) | Err(ReadError::Timeout) | Err(ReadError::Io(_)) if upload_cut => {
                    return Err(UpstreamError::Reset.into())
                }
                // The backend closed a reused connection without answering: it
                // may never have seen the request. Resend only what is safe to
                // repeat (RFC 9110 §9.2.2).
                Ok(0) | Err(ReadError::Io(_))
                    if up.reused
                        && !retried
                        && body == BodyKind::Empty
                        && up.conn.pending().is_empty()
                        && head.idempotent =>
                {
                    retried = true;
                    continue 'attempt;
                }
                // A fresh connection closed or reset before any answer: an
                // idempotent request with nothing left to stream goes to
                // another backend, within the cluster's retry budget.
                Ok(0) | Err(ReadError::Io(_))
                    if failed_on.count_ones() < 2
                        && (failed_on | 1u64.checked_shl(up.backend as u32).unwrap_or(0))
                            .count_ones()
                            < cur.shared.clusters[up.cluster].backends.len() as u32
                        && body == BodyKind::Empty
                        && up.conn.pending().is_empty()
                        && head.idempotent
                        && cur.shared.clusters[up.cluster].retry_budget.try_take() =>
                {
                    let cl = &cur.shared.clusters[up.cluster];
                    note_outcome(w, cl, up.backend, false);
                    w.metrics.inc(&w.metrics.upstream_retries, &[&cl.name], 1);
                    tracing::warn!(cluster = %cl.name, backend = %up.addr, "backend closed without answering; retrying on another backend");
                    if up.backend < 64 {
                        failed_on |= 1 << up.backend;
                    }
                    // Its failure is counted here, not again at the end.
                    x.inflight = None;
                    continue 'attempt;
                }
                Ok(0) => return Err(UpstreamError::Closed.into()),
                Ok(_) => {}
                Err(ReadError::Timeout) => {
                    return Err(if is_total {
                        UpstreamError::TotalTimeout
                    } else {
                        UpstreamError::ResponseTimeout
                    }
                    .into())
                }
                Err(ReadError::Io(e)) => return Err(UpstreamError::from_io(&e).into()),
            }
        }
    };
    let cluster_name = &cur.shared.clusters[up.cluster].name;
    let header_time = sent_at.elapsed();
    x.header_time = Some(header_time);
    w.metrics
        .observe(&w.metrics.upstream_header_time, cluster_name, header_time);
    if !x.head_consumed {
        client.consume(head.head_len);
        x.head_consumed = true;
    }

    // Framing toward the client.
    let up_body = resp.body_kind();
    let client_11 = head.minor == 1;
    let rechunk = client_11 && matches!(up_body, BodyKind::Chunked | BodyKind::UntilClose);
    let close_delimited = !client_11 && matches!(up_body, BodyKind::Chunked | BodyKind::UntilClose);
    let client_close = !head.keep_alive || w.draining.get() || close_delimited || upload_cut;
    x.client_keep_alive = !client_close;
    x.status = resp.status;
    // An ORCA load report in the response updates the backend's load at once.
    if cur.shared.clusters[up.cluster].balance.algorithm.scrapes() {
        let ub = up.conn.pending();
        if let Some(h) = resp
            .headers
            .iter()
            .find(|h| ub[h.name.clone()].eq_ignore_ascii_case(b"endpoint-load-metrics"))
        {
            if let Some(smp) = crate::balance::scrape::parse_orca(&ub[h.value.clone()]) {
                cur.shared.clusters[up.cluster].loads[up.backend].report(
                    smp.waiting,
                    smp.running,
                    smp.kv,
                );
            }
        }
    }

    // Response field filtering (route `response_drop_fields`): a JSON body is
    // read whole (up to MAX_FILTERED_BODY) and rewritten; an SSE stream is
    // rewritten event by event; anything else passes untouched.
    let filter = cur.shared.rules.routes[route.index].drop_fields.clone();
    let media = filter.as_ref().and_then(|_| {
        let ub = up.conn.pending();
        resp.headers
            .iter()
            .find(|h| ub[h.name.clone()].eq_ignore_ascii_case(b"content-type"))
            .and_then(|h| crate::validate::magic::media_type(&ub[h.value.clone()]))
    });
    let mut replaced: Option<Vec<u8>> = None;
    let mut head_copy: Option<Vec<u8>> = None;
    if let (Some(f), Some("application/json")) = (&filter, media.as_deref()) {
        let whole = match up_body {
            BodyKind::Length(n) if n <= MAX_FILTERED_BODY => {
                // The head's ranges index the buffer that reading the body reuses.
                head_copy = Some(up.conn.pending()[..resp.head_len].to_vec());
                Some(
                    read_exact_body(
                        &mut up.conn,
                        resp.head_len,
                        n,
                        client.raw_fd(),
                        route.response_timeout,
                        deadline,
                    )
                    .await?,
                )
            }
            BodyKind::Chunked => {
                head_copy = Some(up.conn.pending()[..resp.head_len].to_vec());
                Some(
                    read_chunked_body(
                        &mut up.conn,
                        resp.head_len,
                        client.raw_fd(),
                        route.response_timeout,
                        deadline,
                    )
                    .await?,
                )
            }
            _ => None,
        };
        replaced = whole.map(|w| f.apply_json(&w).unwrap_or(w));
    }
    let mut sse = match (&filter, media.as_deref(), up_body) {
        (Some(f), Some("text/event-stream"), BodyKind::Chunked | BodyKind::UntilClose) => {
            Some(crate::filter::SseFilter::new(f.clone(), MAX_FILTERED_EVENT))
        }
        _ => None,
    };
    let mut sse_out = Vec::new();

    out.clear();
    {
        let ub: &[u8] = head_copy.as_deref().unwrap_or(up.conn.pending());
        let _ = write!(out, "HTTP/1.1 {} ", resp.status);
        out.extend_from_slice(&ub[resp.reason.clone()]);
        out.extend_from_slice(b"\r\n");
        codec::write_kept_headers(ub, &resp.headers, out);
        let framing = replaced
            .as_ref()
            .map_or(up_body, |b| BodyKind::Length(b.len() as u64));
        match (framing, resp.bodiless_length) {
            (BodyKind::Length(n), _) | (BodyKind::Empty, Some(n)) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            _ if rechunk => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(req.request_id.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(req.response_headers.as_bytes());
        if client_close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if !client_11 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    if replaced.is_none() {
        up.conn.consume(resp.head_len);
    }

    // Body: relay what is buffered, write, read more, until the framing says done.
    let mut remaining = if let BodyKind::Length(n) = up_body {
        n
    } else {
        0
    };
    let mut dec = ChunkedDecoder::new();
    let mut finished;
    loop {
        let p = up.conn.pending();
        let used;
        match up_body {
            _ if replaced.is_some() => {
                let b = replaced.take().unwrap_or_default();
                x.resp_bytes += b.len() as u64;
                if let Some(u) = x.usage.as_mut() {
                    u.feed(&b);
                }
                out.extend_from_slice(&b);
                used = 0;
                finished = true;
            }
            BodyKind::Empty => {
                used = 0;
                finished = true;
            }
            BodyKind::Length(_) => {
                used = (remaining.min(p.len() as u64)) as usize;
                out.extend_from_slice(&p[..used]);
                if let Some(u) = x.usage.as_mut() {
                    u.feed(&p[..used]);
                }
                remaining -= used as u64;
                x.resp_bytes += used as u64;
                finished = remaining == 0;
            }
            BodyKind::Chunked if sse.is_some() => {
                let f = sse.as_mut().expect("checked");
                let n = dec
                    .feed(p, |r| f.feed(&p[r], &mut sse_out))
                    .map_err(|_| UpstreamError::BadResponse);
                used = abort_if_started(n, x)?;
                finished = dec.is_done();
                if finished {
                    f.finish(&mut sse_out);
                }
                x.resp_bytes += sse_out.len() as u64;
                if let Some(u) = x.usage.as_mut() {
                    u.feed(&sse_out);
                }
                emit(&mut sse_out, rechunk, finished, out);
            }
            BodyKind::UntilClose if sse.is_some() => {
                used = p.len();
                sse.as_mut().expect("checked").feed(p, &mut sse_out);
                x.resp_bytes += sse_out.len() as u64;
                if let Some(u) = x.usage.as_mut() {
                    u.feed(&sse_out);
                }
                emit(&mut sse_out, rechunk, false, out);
                finished = false;
            }
            BodyKind::Chunked => {
                let before = dec.data_total;
                let usage = &mut x.usage;
                used = if rechunk {
                    let n = dec
                        .feed(p, |r| {
                            if let Some(u) = usage.as_mut() {
                                u.feed(&p[r]);
                            }
                        })
                        .map_err(|_| UpstreamError::BadResponse);
                    let n = abort_if_started(n, x)?;
                    out.extend_from_slice(&p[..n]);
                    n
                } else {
                    let n = dec
                        .feed(p, |r| {
                            if let Some(u) = usage.as_mut() {
                                u.feed(&p[r.clone()]);
                            }
                            out.extend_from_slice(&p[r])
                        })
                        .map_err(|_| UpstreamError::BadResponse);
                    abort_if_started(n, x)?
                };
                x.resp_bytes += dec.data_total - before;
                finished = dec.is_done();
            }
            BodyKind::UntilClose => {
                used = p.len();
                if let Some(u) = x.usage.as_mut() {
                    u.feed(p);
                }
                if used > 0 {
                    if rechunk {
                        codec::encode_chunk(p, out);
                    } else {
                        out.extend_from_slice(p);
                    }
                }
                x.resp_bytes += used as u64;
                finished = false;
            }
        }
        up.conn.consume(used);
        if !out.is_empty() {
            let (r, o) = client.write_all(std::mem::take(out), timeouts.send).await;
            *out = o;
            x.response_started = true;
            if let Err(e) = r {
                x.client_keep_alive = false;
                return Err(client_write(e));
            }
        }
        if finished {
            break;
        }
        let (wait, is_total) = wait_for(route.response_timeout, deadline);
        match up.conn.fill_watching(wait, client.raw_fd()).await {
            Err(ReadError::WatchedClosed) => {
                x.client_keep_alive = false;
                return Err(ClientError::ClientClosed.into());
            }
            Ok(0) if up_body == BodyKind::UntilClose => {
                if let Some(f) = sse.as_mut() {
                    f.finish(&mut sse_out);
                }
                emit(&mut sse_out, rechunk, rechunk, out);
                if !out.is_empty() {
                    let (r, _) = client.write_all(std::mem::take(out), timeouts.send).await;
                    r.map_err(client_write)?;
                }
                break;
            }
            Ok(0) => return abort(x, UpstreamError::Closed),
            Ok(_) => {}
            Err(ReadError::Timeout) => {
                return abort(
                    x,
                    if is_total {
                        UpstreamError::TotalTimeout
                    } else {
                        UpstreamError::ResponseTimeout
                    },
                )
            }
            Err(ReadError::Io(e)) => return abort(x, UpstreamError::from_io(&e)),
        }
    }
    x.response_started = true;

    // Back to the pool only when the exchange ended exactly on a message boundary.
    let reusable = resp.keep_alive
        && up_body != BodyKind::UntilClose
        && up.conn.pending().is_empty()
        && !upload_cut;
    if reusable {
        let mut pool = cur.pool.borrow_mut();
        if pool.put(up.cluster, up.backend, up.conn, up.slot) {
            cur.pool_idle[up.cluster].inc();
        }
    }
    Ok(())
}

/// Rewritten SSE bytes → the client's framing: one chunk (and the last
/// chunk when `last`) for HTTP/1.1, raw for HTTP/1.0.
fn emit(sse_out: &mut Vec<u8>, rechunk: bool, last: bool, out: &mut Vec<u8>) {
    if rechunk {
        if !sse_out.is_empty() {
            codec::encode_chunk(sse_out, out);
        }
        if last {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    } else {
        out.extend_from_slice(sse_out);
    }
    sse_out.clear();
}

/// Read a whole `Length` response body that starts `skip` bytes into the
/// buffer (its head is still there) and consume head and body.
async fn read_exact_body(
    up: &mut Conn,
    skip: usize,
    n: u64,
    client_fd: std::os::fd::RawFd,
    response_timeout: Duration,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, ProxyError> {
    let mut body = Vec::with_capacity(n as usize);
    let mut skip = skip;
    while (body.len() as u64) < n {
        let p = &up.pending()[skip..];
        let k = ((n - body.len() as u64) as usize).min(p.len());
        body.extend_from_slice(&p[..k]);
        up.consume(skip + k);
        skip = 0;
        if body.len() as u64 == n {
            break;
        }
        fill_response(up, client_fd, response_timeout, deadline).await?;
    }
    if skip > 0 {
        up.consume(skip);
    }
    Ok(body)
}

/// Read a whole chunked response body (payload only, at most
/// MAX_FILTERED_BODY: fields can't be dropped from what isn't held, so a
/// larger one fails closed) and consume head and body.
async fn read_chunked_body(
    up: &mut Conn,
    skip: usize,
    client_fd: std::os::fd::RawFd,
    response_timeout: Duration,
    deadline: Option<Instant>,
) -> Result<Vec<u8>, ProxyError> {
    let mut body = Vec::new();
    let mut dec = ChunkedDecoder::new();
    let mut skip = skip;
    loop {
        let p = &up.pending()[skip..];
        let n = dec
            .feed(p, |r| body.extend_from_slice(&p[r]))
            .map_err(|_| UpstreamError::BadResponse)?;
        up.consume(skip + n);
        skip = 0;
        if body.len() as u64 > MAX_FILTERED_BODY {
            tracing::warn!(
                limit = MAX_FILTERED_BODY,
                "JSON response too large to filter; refused"
            );
            return Err(UpstreamError::BadResponse.into());
        }
        if dec.is_done() {
            return Ok(body);
        }
        fill_response(up, client_fd, response_timeout, deadline).await?;
    }
}

/// Read more of a response body while its client waits; end of stream
/// before the body's end is an error.
async fn fill_response(
    up: &mut Conn,
    client_fd: std::os::fd::RawFd,
    response_timeout: Duration,
    deadline: Option<Instant>,
) -> Result<(), ProxyError> {
    let (wait, is_total) = wait_for(response_timeout, deadline);
    match up.fill_watching(wait, client_fd).await {
        Ok(0) => Err(UpstreamError::Closed.into()),
        Ok(_) => Ok(()),
        Err(ReadError::WatchedClosed) => Err(ClientError::ClientClosed.into()),
        Err(ReadError::Timeout) => Err(if is_total {
            UpstreamError::TotalTimeout
        } else {
            UpstreamError::ResponseTimeout
        }
        .into()),
        Err(ReadError::Io(e)) => Err(UpstreamError::from_io(&e).into()),
    }
}

/// A failed write to the client: it went away, or stopped reading.
fn client_write(e: WriteError) -> ProxyError {
    match e {
        WriteError::Timeout => ClientError::SendTimeout.into(),
        WriteError::Io(_) => ClientError::ClientClosed.into(),
    }
}

fn abort_if_started(
    r: Result<usize, UpstreamError>,
    x: &mut Exchange,
) -> Result<usize, ProxyError> {
    r.map_err(|e| {
        x.client_keep_alive = false;
        e.into()
    })
}

fn abort(x: &mut Exchange, e: UpstreamError) -> Result<(), ProxyError> {
    x.client_keep_alive = false;
    Err(e.into())
}

/// Stream the request body to the backend as it arrives, within bounded memory.
async fn send_body(
    client: &mut Conn,
    up: &mut Conn,
    kind: BodyKind,
    limit: u64,
    t: &Timeouts,
    deadline: Option<Instant>,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let (body_timeout, send_timeout) = (t.client_body, t.send);
    let mut dec = ChunkedDecoder::new();
    let mut left = if let BodyKind::Length(n) = kind {
        n - x.req_bytes
    } else {
        0
    };
    if kind != BodyKind::Chunked && left == 0 {
        return Ok(());
    }
    loop {
        if !client.pending().is_empty() {
            let n = match kind {
                BodyKind::Length(_) => (left.min(client.pending().len() as u64)) as usize,
                BodyKind::Chunked => {
                    let n = dec
                        .feed(client.pending(), |_| {})
                        .map_err(|_| ClientError::Malformed("invalid chunked body"))?;
                    if dec.data_total > limit {
                        return Err(ClientError::BodyTooLarge.into());
                    }
                    n
                }
                _ => return Ok(()),
            };
            if n > 0 {
                client
                    .forward(n, &mut up.stream, send_timeout)
                    .await
                    .map_err(|e| match e {
                        WriteError::Timeout => UpstreamError::SendTimeout,
                        WriteError::Io(_) => UpstreamError::Reset,
                    })?;
            }
            match kind {
                BodyKind::Length(_) => {
                    left -= n as u64;
                    x.req_bytes += n as u64;
                    if left == 0 {
                        return Ok(());
                    }
                }
                _ => {
                    x.req_bytes = dec.data_total;
                    if dec.is_done() {
                        return Ok(());
                    }
                }
            }
        }
        let (wait, is_total) = wait_for(body_timeout, deadline);
        match client.fill_timeout(wait).await {
            Ok(0) => return Err(ClientError::ClientClosed.into()),
            Ok(_) => {}
            Err(ReadError::Timeout) if is_total => return Err(UpstreamError::TotalTimeout.into()),
            Err(ReadError::Timeout) => return Err(ClientError::BodyTimeout.into()),
            Err(ReadError::Io(_)) | Err(ReadError::WatchedClosed) => {
                return Err(ClientError::ClientClosed.into())
            }
        }
    }
}

/// The request head as the backend sees it: hop-by-hop headers gone, framing
/// normalised, forwarding headers and the request id added.
fn build_upstream_head(
    buf: &[u8],
    req: &Request<'_>,
    trust_forwarded: bool,
    backend: SocketAddr,
    length: Option<u64>,
    identity_settings: Option<&crate::config::AuthnSettings>,
    out: &mut Vec<u8>,
) {
    let h = req.head;
    out.extend_from_slice(&buf[h.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(&buf[h.target.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    codec::write_kept_headers(buf, &h.headers, out);
    if h.host.is_none() {
        let _ = write!(out, "host: {backend}\r\n");
    }
    match length.map(BodyKind::Length).unwrap_or(h.body_kind()) {
        BodyKind::Length(0) => out.extend_from_slice(b"content-length: 0\r\n"),
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyKind::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ => {}
    }
    if let (Some(id), Some(settings)) = (req.identity, identity_settings) {
        crate::authn::write_identity_headers(settings, id, out);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if trust_forwarded && h.forwarded_for.is_some() {
        // Every X-Forwarded-For line, in order (RFC 9110 §5.3: same as one comma-joined line).
        for hd in h
            .headers
            .iter()
            .filter(|hd| buf[hd.name.clone()].eq_ignore_ascii_case(b"x-forwarded-for"))
        {
            out.extend_from_slice(&buf[hd.value.clone()]);
            out.extend_from_slice(b", ");
        }
    }
    let _ = write!(
        out,
        "{}\r\nx-forwarded-proto: {}\r\nx-request-id: {}\r\n\r\n",
        req.peer,
        if req.tls { "https" } else { "http" },
        req.request_id
    );
}

/// Shadow traffic: send a copy of a buffered request to a backend of
/// `cluster` on its own connection, read and discard the answer, record its
/// status and latency. Runs as a detached task on this worker: the client's
/// exchange never waits on it and never sees it.
pub fn spawn_shadow(
    w: &std::rc::Rc<Worker>,
    cur: &std::rc::Rc<Current>,
    req: &Request<'_>,
    cluster: usize,
    model: &str,
    timeout: Duration,
) {
    let Some(b) = req.buffered else { return };
    let cl = &cur.shared.clusters[cluster];
    let Ok(backend) = crate::balance::pick(
        &cl.balance,
        &cl.loads,
        0,
        req.model,
        req.size,
        cur.cursor(cluster),
        &w.rng,
    ) else {
        cur.shared
            .metrics
            .shadow
            .with_label_values(&[model, &cl.name, "no_backend"])
            .inc();
        return;
    };
    let addr = cl.backends[backend];
    let mut out = Vec::with_capacity(b.head.len() + b.body.len() + 256);
    build_upstream_head(
        &b.head,
        req,
        cur.shared.trust_forwarded,
        addr,
        Some(b.body.len() as u64),
        cur.shared
            .authn
            .as_ref()
            .map(|_| &cur.shared.authn_settings),
        &mut out,
    );
    // The backend closes after answering: the copy is read to EOF.
    if out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
        out.extend_from_slice(b"connection: close\r\n\r\n");
    }
    out.extend_from_slice(&b.body);
    let load = cl.loads[backend].clone();
    load.inflight
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let guard = InFlight {
        load,
        concurrency: 1,
        backend,
    };
    let metrics = cur.shared.metrics.clone();
    let (model, cluster_name) = (model.to_string(), cl.name.clone());
    let connect_timeout = req.route.connect_timeout;
    let inflight = w.shadows.clone();
    inflight.set(inflight.get() + 1);
    monoio::spawn(async move {
        let started = Instant::now();
        let result = monoio::time::timeout(timeout, async {
            let s = monoio::time::timeout(connect_timeout, TcpStream::connect_addr(addr))
                .await
                .map_err(|_| "connect_timeout")?
                .map_err(|_| "connect_error")?;
            use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
            let mut s = s;
            let (r, _) = s.write_all(out).await;
            r.map_err(|_| "send_error")?;
            let mut status = 0u16;
            let mut first = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let (r, b) = s.read(buf).await;
                buf = b;
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        if status == 0 && first.len() < 32 {
                            first.extend_from_slice(&buf[..n.min(32)]);
                            status = std::str::from_utf8(&first)
                                .ok()
                                .and_then(|t| t.split_whitespace().nth(1))
                                .and_then(|c| c.parse().ok())
                                .unwrap_or(0);
                        }
                    }
                    Err(_) => return Err("read_error"),
                }
            }
            Ok::<u16, &'static str>(status)
        })
        .await;
        let label = match result {
            Ok(Ok(s)) if s > 0 => crate::metrics::status_label(s),
            Ok(Ok(_)) => "bad_response",
            Ok(Err(e)) => e,
            Err(_) => "timeout",
        };
        metrics
            .shadow
            .with_label_values(&[&model, &cluster_name, label])
            .inc();
        metrics
            .shadow_duration
            .with_label_values(&[&cluster_name])
            .observe(started.elapsed().as_secs_f64());
        drop(guard);
        inflight.set(inflight.get() - 1);
    });
}
