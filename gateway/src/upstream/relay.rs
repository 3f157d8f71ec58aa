//! The response toward the client: its head (1xx skipped; a backend that
//! closes without answering gets the request again where that is safe), then
//! the head and body relayed in the client's framing as they arrive —
//! re-chunked for HTTP/1.1, close-delimited for HTTP/1.0, and rewritten
//! where the route drops response fields.

use std::io::Write as _;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::send::Target;
use super::{
    note_outcome, timed_out, wait_for, Attempts, Exchange, Picked, Request, UpConn,
    EARLY_ANSWER_WAIT, MAX_FILTERED_BODY, MAX_FILTERED_EVENT,
};
use crate::codec::{self, BodyKind, ChunkedDecoder, RequestHead, ResponseHead};
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::filter::SseFilter;
use crate::io::{Conn, ReadError, WriteError};
use crate::pool::Cluster;
use crate::worker::{Current, Worker};

/// Where a response's bytes come from, as HTTP/1.1 (status line, headers,
/// framed body): a backend connection as is, or an HTTP/2 stream re-framed
/// (`over_h2::H2Source`). Everything past the head is relayed the same way.
pub(super) trait Source {
    /// Bytes received and not consumed yet.
    fn pending(&self) -> &[u8];
    /// Drop the first `n` pending bytes.
    fn consume(&mut self, n: usize);
    /// Receive more within `d`, giving up when the client on `watch` hangs
    /// up; `Ok(0)` is the end of the stream.
    async fn fill_watching(&mut self, d: Duration, watch: RawFd) -> Result<usize, ReadError>;
}

impl Source for Conn {
    #[inline]
    fn pending(&self) -> &[u8] {
        Conn::pending(self)
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        Conn::consume(self, n)
    }

    async fn fill_watching(&mut self, d: Duration, watch: RawFd) -> Result<usize, ReadError> {
        Conn::fill_watching(self, d, watch).await
    }
}

/// What waiting for the response head ended in.
pub(super) enum Head {
    /// A final response head is in `resp` (and in the connection's buffer).
    Ready,
    /// The request goes again (`Attempts` says where).
    Retry,
}

/// Wait for the response head, skipping informational ones. `watch`: the
/// client's hang-up descriptor (a client that left ends the wait).
#[expect(
    clippy::too_many_arguments,
    reason = "the attempt's connection and state, and where the head goes"
)]
pub(super) async fn response_head(
    watch: RawFd,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    to: Target<'_>,
    a: &mut Attempts,
    resp: &mut ResponseHead,
    x: &mut Exchange,
) -> Result<Head, ProxyError> {
    let limits = &cur.shared.limits;
    let up = to.up;
    // Nothing of the request is left to stream, and it may be repeated
    // (RFC 9110 §9.2.2): until its answer goes to the client, any failure
    // of the backend can be retried on another one.
    let repeatable = to.body == BodyKind::Empty && req.head.idempotent;
    loop {
        let (max_bytes, max_headers) = (
            limits.max_response_header_bytes,
            limits.max_response_headers,
        );
        match codec::parse_response(
            up.conn.pending(),
            max_bytes,
            max_headers,
            req.head.is_head,
            resp,
        ) {
            Ok(true) if resp.status == 101 => return Err(UpstreamError::BadResponse.into()),
            Ok(true) if (100..200).contains(&resp.status) => {
                up.conn.consume(resp.head_len);
                continue;
            }
            // A small answer to a repeatable request is read whole before
            // its head goes to the client: a backend dying between its
            // head and its body is then retried like one that never
            // answered, instead of a response cut short.
            Ok(true) if !(repeatable && body_short(resp, up.conn.pending().len(), cur)) => {
                return Ok(Head::Ready)
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let (mut wait, is_total) = wait_for(req.route.response_timeout, to.deadline);
        if a.upload_cut {
            wait = wait.min(EARLY_ANSWER_WAIT);
        }
        // The backend sent nothing at all (a stale keep-alive connection).
        let unanswered = repeatable && up.conn.pending().is_empty();
        match up.conn.fill_watching(wait, watch).await {
            Err(ReadError::WatchedClosed) => return Err(ClientError::ClientClosed.into()),
            Ok(0) | Err(ReadError::Timeout) | Err(ReadError::Io(_)) if a.upload_cut => {
                return Err(UpstreamError::Reset.into())
            }
            // The backend closed a reused connection without answering: it
            // may never have seen the request. Resend only what is safe to
            // repeat (RFC 9110 §9.2.2).
            Ok(0) | Err(ReadError::Io(_)) if up.reused && !a.retried && unanswered => {
                a.retried = true;
                return Ok(Head::Retry);
            }
            // A fresh connection closed or reset before any answer: an
            // idempotent request with nothing left to stream goes to
            // another backend, within the cluster's retry budget.
            // Likewise when it said nothing within `upstream_response` (a
            // hung or frozen server) — but not when the route's total
            // deadline is what ran out.
            // Also when it died or froze partway through its answer (a
            // partial head, or a small body not all in): nothing of it has
            // reached the client yet.
            Ok(0) | Err(ReadError::Io(_))
                if repeatable && another_backend(cur, up.picked(), a.failed_on) =>
            {
                return Ok(retry_elsewhere(w, cur, up.picked(), a, x));
            }
            Err(ReadError::Timeout)
                if repeatable && !is_total && another_backend(cur, up.picked(), a.failed_on) =>
            {
                return Ok(retry_elsewhere(w, cur, up.picked(), a, x));
            }
            Ok(0) => return Err(UpstreamError::Closed.into()),
            Ok(_) => {}
            Err(ReadError::Timeout) => return Err(timed_out(is_total).into()),
            Err(ReadError::Io(e)) => return Err(UpstreamError::from_io(&e).into()),
        }
    }
}

/// Answers this small are read whole before their head is relayed, when
/// the request could be retried elsewhere.
const SMALL_ANSWER: u64 = 16 * 1024;

/// The response `resp` (its head parsed, `pending` bytes in) has a small
/// body of known length not all read yet, that fits the connection's buffer.
pub(super) fn body_short(resp: &ResponseHead, pending: usize, cur: &Current) -> bool {
    match resp.body_kind() {
        BodyKind::Length(n) if n <= SMALL_ANSWER => {
            let whole = resp.head_len + n as usize;
            whole > pending && whole <= cur.shared.buffer_size
        }
        _ => false,
    }
}

/// Give up on `up` for this request: its failure counted (here, not again
/// at the end), the request marked to go to another backend.
pub(super) fn retry_elsewhere(
    w: &Worker,
    cur: &Current,
    up: Picked,
    a: &mut Attempts,
    x: &mut Exchange,
) -> Head {
    let cl = &cur.shared.clusters[up.cluster];
    note_outcome(w, cl, up.backend, false);
    w.metrics.inc(&w.metrics.upstream_retries, &[&cl.name], 1);
    tracing::warn!(cluster = %cl.name, backend = %up.addr, "backend closed or timed out without answering; retrying on another backend");
    if up.backend < 64 {
        a.failed_on |= 1 << up.backend;
    }
    x.inflight = None;
    Head::Retry
}

/// Whether a request that failed on `up` may try another backend: at most
/// two failed backends, one left untried, and the retry budget pays.
pub(super) fn another_backend(cur: &Current, up: Picked, failed_on: u64) -> bool {
    let cl = &cur.shared.clusters[up.cluster];
    let with_this = failed_on | 1u64.checked_shl(up.backend as u32).unwrap_or(0);
    failed_on.count_ones() < 2
        && with_this.count_ones() < cl.backends.len() as u32
        && cl.retry_budget.try_take()
}

/// How the request's attempts ended.
pub(super) struct Done {
    pub sent_at: Instant,
    pub upload_cut: bool,
    pub deadline: Option<Instant>,
}

/// How the response reaches the client.
#[derive(Clone, Copy)]
struct Framing {
    /// The backend's body framing.
    up_body: BodyKind,
    client_11: bool,
    /// A chunked or close-delimited body goes to an HTTP/1.1 client chunked.
    rechunk: bool,
    /// The client connection closes after this response.
    close: bool,
}

impl Framing {
    fn new(head: &RequestHead, resp: &ResponseHead, must_close: bool) -> Framing {
        let up_body = resp.body_kind();
        let client_11 = head.minor == 1;
        let streamed = matches!(up_body, BodyKind::Chunked | BodyKind::UntilClose);
        Framing {
            up_body,
            client_11,
            rechunk: client_11 && streamed,
            // An HTTP/1.0 client learns the end of a streamed body from the close.
            close: !head.keep_alive || must_close || (!client_11 && streamed),
        }
    }
}

/// Relay the response whose head is in `resp`: the head in the client's
/// framing, then the body as it arrives; the backend connection goes back
/// to the pool when the exchange ended exactly on a message boundary.
#[expect(
    clippy::too_many_arguments,
    reason = "the exchange's two connections, its state and its buffers"
)]
pub(super) async fn response<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    mut up: UpConn,
    done: Done,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    relay(
        client,
        req,
        w,
        cur,
        &mut up.conn,
        up.backend,
        &done,
        out,
        resp,
        x,
    )
    .await?;
    // A stream cut short is not at a message boundary: the connection
    // closes, and the model server aborts the generation.
    let reusable = resp.keep_alive
        && !x.cut
        && resp.body_kind() != BodyKind::UntilClose
        && up.conn.pending().is_empty()
        && !done.upload_cut;
    if reusable {
        let mut pool = cur.pool.borrow_mut();
        if pool.put(up.cluster, up.backend, up.conn, up.slot) {
            cur.pool_idle[up.cluster].inc();
        }
    }
    Ok(())
}

/// Relay the response whose head is in `resp` (and at the start of
/// `src`'s pending bytes), from backend `backend` of the request's cluster.
#[expect(
    clippy::too_many_arguments,
    reason = "the exchange's two sides, its state and its buffers"
)]
pub(super) async fn relay<D: Downstream, S: Source>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    src: &mut S,
    backend: usize,
    done: &Done,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let cl = &cur.shared.clusters[req.cluster];
    let header_time = done.sent_at.elapsed();
    x.header_time = Some(header_time);
    w.metrics
        .observe(&w.metrics.upstream_header_time, &cl.name, header_time);
    if !x.head_consumed {
        client.consume(req.head.head_len);
        x.head_consumed = true;
    }
    let framing = Framing::new(req.head, resp, w.draining.get() || done.upload_cut);
    x.client_keep_alive = !framing.close;
    x.status = resp.status;
    if cl.balance.algorithm.scrapes() {
        report_orca(cl, backend, src.pending(), resp);
    }
    let watch = client.closed_watch();
    let f = filter(req, cur, src, resp, framing.up_body, watch, done.deadline).await?;
    out.clear();
    let head_bytes: &[u8] = f.head_copy.as_deref().unwrap_or(src.pending());
    let length = f.replaced.as_ref().map(|b| b.len() as u64);
    write_head(head_bytes, resp, framing, length, req, out);
    if f.replaced.is_none() {
        src.consume(resp.head_len);
    }
    let mut body = BodyRelay::new(framing, f);
    let timing = Timing {
        deadline: done.deadline,
        sent_at: done.sent_at,
    };
    relay_body(client, req, cur, src, &mut body, timing, out, x).await?;
    x.response_started = true;
    Ok(())
}

/// An ORCA load report in the response updates the backend's load at once.
fn report_orca(cl: &Cluster, backend: usize, buf: &[u8], resp: &ResponseHead) {
    let Some(h) = resp
        .headers
        .iter()
        .find(|h| buf[h.name.clone()].eq_ignore_ascii_case(b"endpoint-load-metrics"))
    else {
        return;
    };
    if let Some(smp) = crate::balance::scrape::parse_orca(&buf[h.value.clone()]) {
        cl.loads[backend].report(smp.waiting, smp.running, smp.kv);
    }
}

/// What the route's response field filter (`response_drop_fields`) makes of a response.
#[derive(Default)]
struct Filtered {
    /// A JSON body read whole and rewritten.
    replaced: Option<Vec<u8>>,
    /// The response head, copied before reading the whole body (reading
    /// reuses the buffer the head's ranges index).
    head_copy: Option<Vec<u8>>,
    /// An SSE stream, rewritten event by event.
    sse: Option<SseFilter>,
}

/// Response field filtering: a JSON body is read whole (up to
/// MAX_FILTERED_BODY) and rewritten; an SSE stream gets a filter that
/// rewrites it event by event; anything else passes untouched.
async fn filter<S: Source>(
    req: &Request<'_>,
    cur: &Current,
    up: &mut S,
    resp: &ResponseHead,
    up_body: BodyKind,
    watch: RawFd,
    deadline: Option<Instant>,
) -> Result<Filtered, ProxyError> {
    let drop = cur.shared.rules.routes[req.route.index].drop_fields.clone();
    // An OpenAI stream is read event by event even with no field to drop.
    let Some(f) = drop.or_else(|| req.tap.then(Default::default)) else {
        return Ok(Filtered::default());
    };
    let media = {
        let ub = up.pending();
        resp.headers
            .iter()
            .find(|h| ub[h.name.clone()].eq_ignore_ascii_case(b"content-type"))
            .and_then(|h| crate::validate::magic::media_type(&ub[h.value.clone()]))
    };
    let timeout = req.route.response_timeout;
    let mut out = Filtered::default();
    match (media.as_deref(), up_body) {
        (Some("application/json"), _) if f.is_empty() => {}
        (Some("application/json"), BodyKind::Length(n)) if n <= MAX_FILTERED_BODY => {
            out.head_copy = Some(up.pending()[..resp.head_len].to_vec());
            let whole = read_exact_body(up, resp.head_len, n, watch, timeout, deadline).await?;
            out.replaced = Some(f.apply_json(&whole).unwrap_or(whole));
        }
        (Some("application/json"), BodyKind::Chunked) => {
            out.head_copy = Some(up.pending()[..resp.head_len].to_vec());
            let whole = read_chunked_body(up, resp.head_len, watch, timeout, deadline).await?;
            out.replaced = Some(f.apply_json(&whole).unwrap_or(whole));
        }
        (Some("text/event-stream"), BodyKind::Chunked | BodyKind::UntilClose) => {
            let mut sse = SseFilter::new(f, MAX_FILTERED_EVENT);
            sse.tap.strip_usage = req.strip_usage;
            out.sse = Some(sse);
        }
        _ => {}
    }
    Ok(out)
}

/// The response head for the client, in `out`: status line and the
/// backend's end-to-end headers as they were, the client's framing, the
/// request id, the gateway's extra headers (rate limits) and `Connection`.
fn write_head(
    ub: &[u8],
    resp: &ResponseHead,
    f: Framing,
    replaced: Option<u64>,
    req: &Request<'_>,
    out: &mut Vec<u8>,
) {
    let _ = write!(out, "HTTP/1.1 {} ", resp.status);
    out.extend_from_slice(&ub[resp.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    codec::write_kept_headers(ub, &resp.headers, out);
    let framing = replaced.map_or(f.up_body, BodyKind::Length);
    match (framing, resp.bodiless_length) {
        (BodyKind::Length(n), _) | (BodyKind::Empty, Some(n)) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        _ if f.rechunk => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(req.request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(req.response_headers.as_bytes());
    if f.close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !f.client_11 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The response body on its way: the backend's framing decoded, the
/// client's written, the filter applied, token usage scanned.
struct BodyRelay {
    framing: Framing,
    /// Bytes left of a `Length` body.
    remaining: u64,
    dec: ChunkedDecoder,
    sse: Option<SseFilter>,
    /// Rewritten SSE bytes waiting to be framed for the client.
    sse_out: Vec<u8>,
    replaced: Option<Vec<u8>>,
}

impl BodyRelay {
    fn new(framing: Framing, f: Filtered) -> BodyRelay {
        BodyRelay {
            framing,
            remaining: match framing.up_body {
                BodyKind::Length(n) => n,
                _ => 0,
            },
            dec: ChunkedDecoder::new(),
            sse: f.sse,
            sse_out: Vec::new(),
            replaced: f.replaced,
        }
    }

    /// Move what the backend sent so far (`p`) into `out` in the client's
    /// framing: how many bytes of `p` were used, and whether the body ended.
    fn step(
        &mut self,
        p: &[u8],
        out: &mut Vec<u8>,
        x: &mut Exchange,
    ) -> Result<(usize, bool), ProxyError> {
        let rechunk = self.framing.rechunk;
        if let Some(b) = self.replaced.take() {
            x.resp_bytes += b.len() as u64;
            if let Some(u) = x.usage.as_mut() {
                u.feed(&b);
            }
            out.extend_from_slice(&b);
            return Ok((0, true));
        }
        match self.framing.up_body {
            BodyKind::Empty => Ok((0, true)),
            BodyKind::Length(_) => {
                let used = (self.remaining.min(p.len() as u64)) as usize;
                out.extend_from_slice(&p[..used]);
                if let Some(u) = x.usage.as_mut() {
                    u.feed(&p[..used]);
                }
                self.remaining -= used as u64;
                x.resp_bytes += used as u64;
                Ok((used, self.remaining == 0))
            }
            BodyKind::Chunked if self.sse.is_some() => {
                let f = self.sse.as_mut().expect("checked");
                let sse_out = &mut self.sse_out;
                // Usage is read from what the backend sent, before any event is
                // removed or rewritten.
                let usage = &mut x.usage;
                let n = self
                    .dec
                    .feed(p, |r| {
                        if let Some(u) = usage.as_mut() {
                            u.feed(&p[r.clone()]);
                        }
                        f.feed(&p[r], sse_out)
                    })
                    .map_err(|_| UpstreamError::BadResponse);
                let used = abort_if_started(n, x)?;
                let finished = self.dec.is_done();
                if finished {
                    f.finish(&mut self.sse_out);
                }
                self.emit_sse(rechunk, finished, out, x);
                Ok((used, finished))
            }
            BodyKind::UntilClose if self.sse.is_some() => {
                if let Some(u) = x.usage.as_mut() {
                    u.feed(p);
                }
                self.sse
                    .as_mut()
                    .expect("checked")
                    .feed(p, &mut self.sse_out);
                self.emit_sse(rechunk, false, out, x);
                Ok((p.len(), false))
            }
            BodyKind::Chunked => {
                let before = self.dec.data_total;
                let usage = &mut x.usage;
                let n = if rechunk {
                    let n = self.dec.feed(p, |r| {
                        if let Some(u) = usage.as_mut() {
                            u.feed(&p[r]);
                        }
                    });
                    let n = abort_if_started(n.map_err(|_| UpstreamError::BadResponse), x)?;
                    out.extend_from_slice(&p[..n]);
                    n
                } else {
                    let n = self.dec.feed(p, |r| {
                        if let Some(u) = usage.as_mut() {
                            u.feed(&p[r.clone()]);
                        }
                        out.extend_from_slice(&p[r])
                    });
                    abort_if_started(n.map_err(|_| UpstreamError::BadResponse), x)?
                };
                x.resp_bytes += self.dec.data_total - before;
                Ok((n, self.dec.is_done()))
            }
            BodyKind::UntilClose => {
                if let Some(u) = x.usage.as_mut() {
                    u.feed(p);
                }
                if !p.is_empty() {
                    if rechunk {
                        codec::encode_chunk(p, out);
                    } else {
                        out.extend_from_slice(p);
                    }
                }
                x.resp_bytes += p.len() as u64;
                Ok((p.len(), false))
            }
        }
    }

    /// Count, scan and frame the rewritten SSE bytes.
    fn emit_sse(&mut self, rechunk: bool, last: bool, out: &mut Vec<u8>, x: &mut Exchange) {
        x.resp_bytes += self.sse_out.len() as u64;
        if let Some(f) = self.sse.as_mut() {
            x.content_events = f.tap.content_events;
            f.tap.removed.clear();
        }
        emit(&mut self.sse_out, rechunk, last, out);
    }

    /// End the stream for the client now (its caller's token budget is
    /// spent): an error event in OpenAI's shape, `[DONE]`, the body's end.
    fn cut(&mut self, request_id: &str, out: &mut Vec<u8>) {
        let event = format!(
            "data: {{\"error\":{{\"message\":\"the stream was ended: its output reached your token budget\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":\"token_quota_exceeded\",\"request_id\":\"{request_id}\"}}}}\n\ndata: [DONE]\n\n"
        );
        self.sse_out.extend_from_slice(event.as_bytes());
        let rechunk = self.framing.rechunk;
        emit(&mut self.sse_out, rechunk, rechunk, out);
    }

    /// A close-delimited body ended: flush the filter and, when re-chunking,
    /// write the last chunk.
    fn finish_until_close(&mut self, out: &mut Vec<u8>) {
        if let Some(f) = self.sse.as_mut() {
            f.finish(&mut self.sse_out);
        }
        let rechunk = self.framing.rechunk;
        emit(&mut self.sse_out, rechunk, rechunk, out);
    }
}

/// When the request went out, and its total deadline.
#[derive(Clone, Copy)]
struct Timing {
    deadline: Option<Instant>,
    sent_at: Instant,
}

/// Relay the body: take what is buffered, write it, read more, until the
/// framing says done (or the backend, the client or a timeout ends it).
#[expect(
    clippy::too_many_arguments,
    reason = "the exchange's two connections, its state and its buffers"
)]
async fn relay_body<D: Downstream, S: Source>(
    client: &mut D,
    req: &Request<'_>,
    cur: &Current,
    up: &mut S,
    body: &mut BodyRelay,
    timing: Timing,
    out: &mut Vec<u8>,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let send = cur.shared.timeouts.send;
    let deadline = timing.deadline;
    loop {
        let (used, mut finished) = body.step(up.pending(), out, x)?;
        if !finished && over_budget(req, cur, x) {
            body.cut(req.request_id, out);
            x.cut = true;
            finished = true;
        }
        if used > 0 {
            if x.first_byte.is_none() {
                x.first_byte = Some(timing.sent_at.elapsed());
                x.first_at = Some(Instant::now());
            }
            if req.stream {
                // Tokens by their events (an event split across reads is
                // missed: a small undercount, never a wrong stream).
                x.events +=
                    memchr::memmem::find_iter(&up.pending()[..used], b"data:").count() as u64;
            }
        }
        up.consume(used);
        if !out.is_empty() {
            let (r, o) = client.write_all(std::mem::take(out), send).await;
            *out = o;
            x.response_started = true;
            if let Err(e) = r {
                x.client_keep_alive = false;
                return Err(client_write(e));
            }
        }
        if finished {
            return Ok(());
        }
        let (wait, is_total) = wait_for(req.route.response_timeout, deadline);
        match up.fill_watching(wait, client.closed_watch()).await {
            Err(ReadError::WatchedClosed) => {
                x.client_keep_alive = false;
                return Err(ClientError::ClientClosed.into());
            }
            Ok(0) if body.framing.up_body == BodyKind::UntilClose => {
                body.finish_until_close(out);
                if !out.is_empty() {
                    let (r, _) = client.write_all(std::mem::take(out), send).await;
                    r.map_err(client_write)?;
                }
                return Ok(());
            }
            Ok(0) => return abort(x, UpstreamError::Closed),
            Ok(_) => {}
            Err(ReadError::Timeout) => return abort(x, timed_out(is_total)),
            Err(ReadError::Io(e)) => return abort(x, UpstreamError::from_io(&e)),
        }
    }
}

/// A stream whose output so far (content events: a token each) takes its
/// caller past a budget that ends streams (`cut_streams`).
fn over_budget(req: &Request<'_>, cur: &Current, x: &Exchange) -> bool {
    let (Some(a), Some(p)) = (req.cut, cur.shared.ratelimit.as_ref()) else {
        return false;
    };
    if x.content_events == 0 {
        return false;
    }
    let spent = p.weigh(req.model, req.prompt_tokens + x.content_events);
    cur.shared
        .limiter
        .stream_over_budget(a, spent.saturating_sub(a.tokens))
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
async fn read_exact_body<S: Source>(
    up: &mut S,
    skip: usize,
    n: u64,
    client_fd: RawFd,
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
async fn read_chunked_body<S: Source>(
    up: &mut S,
    skip: usize,
    client_fd: RawFd,
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
async fn fill_response<S: Source>(
    up: &mut S,
    client_fd: RawFd,
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
pub(super) fn client_write(e: WriteError) -> ProxyError {
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
