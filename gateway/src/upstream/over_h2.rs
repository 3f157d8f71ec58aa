//! HTTP routes to backends that speak HTTP/2 (`[clusters.X] http = "2"`,
//! over TLS with ALPN `h2`, or `"h2c"`, cleartext with prior knowledge).
//!
//! Every request of a worker to one backend is a stream of one multiplexed
//! connection (the same one gRPC routes use, `grpc::sender`). The request
//! is the head the HTTP/1.1 path would send (`send::head_for_backend`: the
//! same hop-by-hop removal, forwarding, identity and trace headers) turned
//! into HEADERS, its body DATA frames. The answer is re-framed as HTTP/1.1
//! bytes ([`H2Source`]: a head, then DATA as chunks) and goes through the
//! same relay as a backend connection's: filters, the SSE tap, usage and
//! token budgets, timing, the client's framing — one relay for both.
//!
//! Retries: a stream the backend refused (REFUSED_STREAM, or past a
//! GOAWAY) was not processed and goes again elsewhere; other failures
//! before the answer, for idempotent requests with nothing streamed from
//! the client, like the HTTP/1.1 path (another backend, within the budget).

use std::future::poll_fn;
use std::io::Write as _;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};

use super::relay::{self, Source};
use super::{
    choose, grpc, note_outcome, prefix_matches, prefix_sent, prefix_view, send, wait_for, Attempts,
    Exchange, InFlight, Picked, Request,
};
use crate::codec::{self, BodyKind, ChunkedDecoder, ResponseHead};
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::io::{watching, ReadError};
use crate::pool::H2Lease;
use crate::worker::{Current, Worker};

/// Fresh connections a request may try after one closed under it.
const REOPENS: usize = 3;

/// How waiting for the backend's answer failed.
enum Failed {
    /// Not processed (REFUSED_STREAM: the backend sheds it; the connection
    /// stays): safe to send again whatever the method.
    Refused,
    /// Not processed: past the backend's GOAWAY (the connection is closing).
    GoAway,
    Upstream(UpstreamError),
    Proxy(ProxyError),
}

/// Checkout → send → response head over HTTP/2, tried again where that is
/// safe; then the answer relayed. `body`: what of the request body is
/// still to come from the client.
#[expect(
    clippy::too_many_arguments,
    reason = "the same exchange state as the HTTP/1.1 path"
)]
pub(super) async fn exchange<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    x: &mut Exchange,
    body: BodyKind,
) -> Result<(), ProxyError> {
    let deadline = req.route.total_timeout.map(|t| req.started + t);
    let cl = &cur.shared.clusters[req.cluster];
    let matches = prefix_matches(cl, req);
    let view = prefix_view(req, matches.as_ref());
    let mut a = Attempts {
        sent_continue: req.continue_sent,
        ..Attempts::default()
    };
    // Backends this request went to or failed to reach.
    let mut t = Tries::default();
    let mut last = UpstreamError::ConnectError;
    // Each attempt goes to a backend not tried yet (bounded past 64 too),
    // plus those on fresh connections.
    for _ in 0..cl.backends.len().min(64) + 1 + REOPENS {
        let Some(at) = next(
            w,
            cur,
            req,
            view.as_ref(),
            matches.as_ref(),
            &mut t.tried,
            a.failed_on,
        )?
        else {
            break;
        };
        let (b, addr) = (at.backend, at.addr);
        let (wait, is_total) = wait_for(req.route.connect_timeout, deadline);
        if is_total && wait.is_zero() {
            return Err(UpstreamError::TotalTimeout.into());
        }
        let send_timeout = cur.shared.timeouts.send;
        let (mut sender, lease) = match grpc::sender(w, cl, addr, wait, send_timeout).await {
            Ok(s) => s,
            Err(ProxyError::Upstream(e)) => {
                // Nothing was sent: the next backend.
                w.metrics
                    .inc(&w.metrics.upstream_errors, &[&cl.name, e.kind()], 1);
                tracing::warn!(cluster = %cl.name, backend = %addr, kind = e.kind(), "upstream HTTP/2 connect failed");
                note_outcome(w, cl, b, false);
                last = e;
                continue;
            }
            Err(e) => return Err(e),
        };
        x.backend = Some(addr);
        x.inflight = Some(InFlight::hold(cur, at, req.stream));
        if let Some(g) = req.grant {
            g.arrived();
        }
        // A stream slot on the connection (the backend's
        // SETTINGS_MAX_CONCURRENT_STREAMS), within the connect timeout.
        match monoio::time::timeout(wait, poll_fn(|cx| sender.poll_ready(cx))).await {
            Err(_) => {
                // At its own stream limit: busy, not failing.
                x.inflight = None;
                return Err(UpstreamError::Saturated.into());
            }
            Ok(Err(_)) => {
                // The connection died before this request went out.
                grpc::forget(w, addr, &lease);
                t.reopen(b);
                last = UpstreamError::Closed;
                x.inflight = None;
                continue;
            }
            Ok(Ok(())) => {}
        }
        let sent = send_request(client, req, cur, &mut sender, at, body, out, &mut a, x).await?;
        let Some(response) = sent else {
            grpc::forget(w, addr, &lease);
            t.reopen(b);
            last = UpstreamError::Closed;
            x.inflight = None;
            continue;
        };
        let sent_at = Instant::now();
        // Whether this request can go again: nothing of its body was taken
        // from the client (none, or read whole by validation).
        let replayable = body == BodyKind::Empty;
        let (mut wait, is_total) = wait_for(req.route.response_timeout, deadline);
        if a.upload_cut {
            wait = wait.min(super::EARLY_ANSWER_WAIT);
        }
        let watch = client.closed_watch();
        let repeatable = replayable && req.head.idempotent;
        let answered = match answer(response, wait, watch).await {
            Ok(r) => head_of_answer(r, req, cur, resp, wait, watch, repeatable).await,
            Err(f) => Err(f),
        };
        let failed = match answered {
            Ok(mut src) => {
                let done = relay::Done {
                    sent_at,
                    upload_cut: a.upload_cut,
                    deadline,
                };
                return relay::relay(client, req, w, cur, &mut src, b, &done, out, resp, x).await;
            }
            Err(f) => f,
        };
        last = after(
            w, cur, req, at, &lease, failed, replayable, is_total, &mut t, &mut a, x,
        )?;
    }
    Err(last.into())
}

/// Backends a request went to or failed to reach (a bit per index below
/// 64), and its fresh-connection tries.
#[derive(Default)]
struct Tries {
    tried: u64,
    /// A connection that turned out closed or closing under a request it
    /// didn't process is not the backend's fault: up to REOPENS times per
    /// request, that backend may be picked again, on a fresh connection.
    reopens: usize,
}

impl Tries {
    fn reopen(&mut self, b: usize) {
        if self.reopens < REOPENS && b < 64 {
            self.reopens += 1;
            self.tried &= !(1 << b);
        }
    }
}

/// What a failed attempt at `at` leads to: `Ok` with the error to give if
/// no attempt is left, when the request goes again; else the client's error.
#[expect(clippy::too_many_arguments, reason = "the exchange's state")]
fn after(
    w: &Worker,
    cur: &Current,
    req: &Request<'_>,
    at: Picked,
    lease: &H2Lease,
    failed: Failed,
    replayable: bool,
    is_total: bool,
    t: &mut Tries,
    a: &mut Attempts,
    x: &mut Exchange,
) -> Result<UpstreamError, ProxyError> {
    let cl = &cur.shared.clusters[req.cluster];
    let (b, addr) = (at.backend, at.addr);
    let e = match failed {
        Failed::Proxy(e) => return Err(e),
        Failed::GoAway if replayable => {
            // Past the backend's GOAWAY (nginx: every `keepalive_requests`):
            // not processed, and no fault of the backend's; again on a fresh
            // connection, no budget spent (the attempts are bounded).
            tracing::debug!(cluster = %cl.name, backend = %addr, "HTTP/2 stream past the backend's GOAWAY; sending it again");
            w.metrics.inc(&w.metrics.upstream_retries, &[&cl.name], 1);
            grpc::forget(w, addr, lease);
            if b < 64 {
                t.tried &= !(1 << b);
            }
            x.inflight = None;
            return Ok(UpstreamError::Reset);
        }
        Failed::Refused if replayable => {
            // The backend shed it (not processed): another backend first;
            // this one again only within the reopen allowance.
            tracing::info!(cluster = %cl.name, backend = %addr, "HTTP/2 stream refused by the backend; sending it again");
            w.metrics.inc(&w.metrics.upstream_retries, &[&cl.name], 1);
            let untried = (0..cl.backends.len().min(64)).any(|i| t.tried & (1 << i) == 0);
            if !untried {
                t.reopen(b);
            }
            x.inflight = None;
            return Ok(UpstreamError::Reset);
        }
        Failed::Refused | Failed::GoAway => UpstreamError::Reset,
        Failed::Upstream(e) => e,
    };
    let total = is_total && e == UpstreamError::ResponseTimeout;
    elsewhere(w, cur, req, at, e, replayable, total, a, x)?;
    Ok(e)
}

/// A failure `e` of the attempt at `at` after the request went out: `Ok`
/// when it goes to another backend (idempotent, `replayable`: nothing
/// streamed from the client, within the budget — never when `total`, the
/// route's total deadline, is what ran out); else the error the client gets.
#[expect(clippy::too_many_arguments, reason = "the exchange's state")]
fn elsewhere(
    w: &Worker,
    cur: &Current,
    req: &Request<'_>,
    at: Picked,
    e: UpstreamError,
    replayable: bool,
    total: bool,
    a: &mut Attempts,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    if !total && replayable && req.head.idempotent && relay::another_backend(cur, at, a.failed_on) {
        relay::retry_elsewhere(w, cur, at, a, x);
        return Ok(());
    }
    Err(if total {
        UpstreamError::TotalTimeout
    } else {
        e
    }
    .into())
}

/// The balance stage's next backend for this request, marked tried; the
/// prompt indexed there (prefix-aware clusters).
fn next(
    w: &Worker,
    cur: &Current,
    req: &Request<'_>,
    view: Option<&crate::balance::PrefixView<'_>>,
    matches: Option<&crate::balance::prefix::Matches>,
    tried: &mut u64,
    failed_on: u64,
) -> Result<Option<Picked>, UpstreamError> {
    let Some(b) = choose(w, cur, req, view, *tried | failed_on)? else {
        return Ok(None);
    };
    if b < 64 {
        *tried |= 1 << b;
    }
    let cl = &cur.shared.clusters[req.cluster];
    Ok(Some(Picked {
        cluster: req.cluster,
        backend: b,
        addr: cl.backends[b],
        uncached: matches.map_or(req.prompt_tokens, |m| prefix_sent(w, cl, req, m, b)),
    }))
}

/// The request on a new stream of `sender`: HEADERS (the head the HTTP/1.1
/// path would send, as fields), then the body as it comes. `Ok(None)`: the
/// connection refused a new stream (it is closing; nothing was sent).
#[expect(clippy::too_many_arguments, reason = "the exchange's state")]
async fn send_request<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    cur: &Current,
    sender: &mut h2::client::SendRequest<Bytes>,
    at: Picked,
    body: BodyKind,
    out: &mut Vec<u8>,
    a: &mut Attempts,
    x: &mut Exchange,
) -> Result<Option<ResponseFuture>, ProxyError> {
    let timeouts = &cur.shared.timeouts;
    // This attempt's: a buffered body cut on an earlier backend doesn't
    // shorten the wait for this one's answer.
    a.upload_cut = false;
    if req.head.expect_continue && !a.sent_continue && body != BodyKind::Empty {
        let (r, _) = client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), timeouts.send)
            .await;
        r.map_err(relay::client_write)?;
        a.sent_continue = true;
    }
    let with_head = send::head_for_backend(client.pending(), req, cur, at.addr, body, out);
    let tls = cur.shared.clusters[req.cluster].tls.is_some();
    let (request, head_len) = request_of(out, tls, at.addr)?;
    let first = Bytes::copy_from_slice(&out[head_len..]);
    let end = first.is_empty() && body == BodyKind::Empty;
    let Ok((response, mut up)) = sender.send_request(request, end) else {
        return Ok(None);
    };
    if end {
        x.request_body_done = true;
        return Ok(Some(response));
    }
    if body != BodyKind::Empty {
        client.consume(req.head.head_len + with_head);
        x.head_consumed = true;
        x.req_bytes = with_head as u64;
    }
    let limit = req.route.max_request_body_bytes;
    let r = async {
        send_all(&mut up, first, timeouts.send).await?;
        if body != BodyKind::Empty {
            stream_body(client, &mut up, body, limit, timeouts, x).await?;
        }
        up.send_data(Bytes::new(), true)
            .map_err(|_| ProxyError::from(UpstreamError::Reset))
    };
    match r.await {
        Ok(()) => x.request_body_done = true,
        // The backend stopped taking the upload (it may have answered
        // early: a 413, say); the client connection closes after.
        Err(ProxyError::Upstream(_)) => a.upload_cut = true,
        Err(e) => {
            up.send_reset(h2::Reason::CANCEL);
            return Err(e);
        }
    }
    Ok(Some(response))
}

async fn send_all(up: &mut SendStream<Bytes>, data: Bytes, d: Duration) -> Result<(), ProxyError> {
    grpc::send_all(up, data, d)
        .await
        .map_err(|()| UpstreamError::Reset.into())
}

/// The rest of the request body from the client, as DATA (a chunked body
/// decoded: HTTP/2 frames it itself), within the route's size limit.
async fn stream_body<D: Downstream>(
    client: &mut D,
    up: &mut SendStream<Bytes>,
    kind: BodyKind,
    limit: u64,
    t: &crate::config::Timeouts,
    x: &mut Exchange,
) -> Result<(), ProxyError> {
    let mut dec = ChunkedDecoder::new();
    let mut left = match kind {
        BodyKind::Length(n) => n - x.req_bytes,
        _ => 0,
    };
    loop {
        let p = client.pending();
        if !p.is_empty() {
            let (data, n) = match kind {
                BodyKind::Length(_) => {
                    let n = left.min(p.len() as u64) as usize;
                    (Bytes::copy_from_slice(&p[..n]), n)
                }
                _ => {
                    let mut data = Vec::new();
                    let n = dec
                        .feed(p, |r| data.extend_from_slice(&p[r]))
                        .map_err(|_| ClientError::Malformed("invalid chunked body"))?;
                    if dec.data_total > limit {
                        return Err(ClientError::BodyTooLarge.into());
                    }
                    (Bytes::from(data), n)
                }
            };
            client.consume(n);
            match kind {
                BodyKind::Length(_) => {
                    left -= n as u64;
                    x.req_bytes += n as u64;
                }
                _ => x.req_bytes = dec.data_total,
            }
            send_all(up, data, t.send).await?;
            let done = match kind {
                BodyKind::Length(_) => left == 0,
                _ => dec.is_done(),
            };
            if done {
                return Ok(());
            }
        }
        if matches!(kind, BodyKind::Length(_)) && left == 0 {
            return Ok(());
        }
        match client.fill_timeout(t.client_body).await {
            Ok(0) => return Err(ClientError::ClientClosed.into()),
            Ok(_) => {}
            Err(ReadError::Timeout) => return Err(ClientError::BodyTimeout.into()),
            Err(_) => return Err(ClientError::ClientClosed.into()),
        }
    }
}

/// The HTTP/2 request for the HTTP/1.1 head at the start of `head` (as the
/// gateway wrote it: one `name: value` per line), and the head's length.
/// `tls`: the backend connection's (`:scheme`; the client's scheme is in
/// `x-forwarded-proto`).
fn request_of(
    head: &[u8],
    tls: bool,
    backend: std::net::SocketAddr,
) -> Result<(http::Request<()>, usize), ProxyError> {
    let bad = || ProxyError::Client(ClientError::Malformed("request head"));
    let end = memchr::memmem::find(head, b"\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head[..end]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().ok_or_else(bad)?;
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = http::Method::from_bytes(parts.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let target = parts.next().ok_or_else(bad)?;
    let mut authority = None;
    let mut headers = http::HeaderMap::new();
    for l in lines {
        let Some(colon) = memchr::memchr(b':', l) else {
            return Err(bad());
        };
        let (name, value) = (&l[..colon], l[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"host") {
            authority.get_or_insert(value);
            continue;
        }
        let name = http::HeaderName::from_bytes(name).map_err(|_| bad())?;
        // Connection-specific fields never go in HTTP/2 (RFC 9113 §8.2.2).
        if codec::H2_HOP_BY_HOP.contains(&name.as_str()) && !(name == "te" && value == b"trailers")
        {
            continue;
        }
        headers.append(
            name,
            http::HeaderValue::from_bytes(value).map_err(|_| bad())?,
        );
    }
    let fallback = backend.to_string();
    let authority = authority.unwrap_or(fallback.as_bytes());
    let uri = if target.starts_with(b"/") {
        let mut u = Vec::with_capacity(16 + authority.len() + target.len());
        u.extend_from_slice(if tls { b"https://" } else { b"http://" });
        u.extend_from_slice(authority);
        u.extend_from_slice(target);
        http::Uri::try_from(u).map_err(|_| bad())?
    } else {
        // Absolute form (or `*` for OPTIONS) as the client sent it.
        http::Uri::try_from(target).map_err(|_| bad())?
    };
    let mut r = http::Request::new(());
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.headers_mut() = headers;
    Ok((r, end + 4))
}

/// The backend's answer head, within `wait`, giving up when the client on
/// `watch` hangs up.
async fn answer(
    response: ResponseFuture,
    wait: Duration,
    watch: RawFd,
) -> Result<http::Response<RecvStream>, Failed> {
    match watching(response, wait, watch).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => Err(Failed::Refused),
        Ok(Err(e)) if e.is_go_away() && e.is_remote() => Err(Failed::GoAway),
        Ok(Err(_)) => Err(Failed::Upstream(UpstreamError::Reset)),
        Err(ReadError::WatchedClosed) => Err(Failed::Proxy(ClientError::ClientClosed.into())),
        Err(_) => Err(Failed::Upstream(UpstreamError::ResponseTimeout)),
    }
}

/// The answer as HTTP/1.1 bytes, its head parsed into `resp`. For a
/// `repeatable` request a small answer (as the HTTP/1.1 path does) is read
/// whole first, so a backend failing between its HEADERS and its DATA is
/// retried rather than relayed cut short.
async fn head_of_answer(
    r: http::Response<RecvStream>,
    req: &Request<'_>,
    cur: &Current,
    resp: &mut ResponseHead,
    wait: Duration,
    watch: RawFd,
    repeatable: bool,
) -> Result<H2Source, Failed> {
    let (parts, body) = r.into_parts();
    let mut src = H2Source::new(&parts, body, req.head.is_head);
    let limits = &cur.shared.limits;
    match codec::parse_response(
        src.pending(),
        limits.max_response_header_bytes,
        limits.max_response_headers,
        req.head.is_head,
        resp,
    ) {
        Ok(true) => {}
        _ => return Err(Failed::Upstream(UpstreamError::BadResponse)),
    }
    while repeatable && relay::body_short(resp, src.pending().len(), cur) {
        match src.fill_watching(wait, watch).await {
            Ok(0) => return Err(Failed::Upstream(UpstreamError::Closed)),
            Ok(_) => {}
            Err(ReadError::WatchedClosed) => {
                return Err(Failed::Proxy(ClientError::ClientClosed.into()))
            }
            Err(ReadError::Timeout) => {
                return Err(Failed::Upstream(UpstreamError::ResponseTimeout))
            }
            Err(ReadError::Io(_)) => return Err(Failed::Upstream(UpstreamError::Reset)),
        }
    }
    Ok(src)
}

/// An HTTP/2 answer as HTTP/1.1 bytes: the head first; then each DATA
/// frame as it comes — as is under the backend's `content-length`, else as
/// a chunk, the last chunk at the stream's end. Bounded: one frame at a
/// time past what the relay holds, the window released as it is taken.
pub(super) struct H2Source {
    body: RecvStream,
    buf: Vec<u8>,
    pos: usize,
    chunked: bool,
    ended: bool,
}

impl H2Source {
    fn new(parts: &http::response::Parts, body: RecvStream, request_was_head: bool) -> H2Source {
        let mut buf = Vec::with_capacity(1024);
        let status = parts.status;
        let _ = write!(
            buf,
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Unknown")
        );
        for (name, value) in &parts.headers {
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(value.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        let bodiless = request_was_head
            || status.is_informational()
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED;
        let has_length = parts.headers.contains_key(http::header::CONTENT_LENGTH);
        let end = body.is_end_stream();
        let chunked = !bodiless && !has_length && !end;
        if chunked {
            buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        } else if !bodiless && !has_length {
            buf.extend_from_slice(b"content-length: 0\r\n");
        }
        buf.extend_from_slice(b"\r\n");
        H2Source {
            body,
            buf,
            pos: 0,
            chunked,
            ended: end || bodiless,
        }
    }
}

impl Source for H2Source {
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    async fn fill_watching(&mut self, d: Duration, watch: RawFd) -> Result<usize, ReadError> {
        if self.ended {
            return Ok(0);
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match watching(self.body.data(), left, watch).await? {
                Some(Ok(data)) => {
                    let _ = self.body.flow_control().release_capacity(data.len());
                    if data.is_empty() {
                        continue;
                    }
                    let before = self.buf.len();
                    if self.chunked {
                        codec::encode_chunk(&data, &mut self.buf);
                    } else {
                        self.buf.extend_from_slice(&data);
                    }
                    return Ok(self.buf.len() - before);
                }
                Some(Err(e)) => return Err(ReadError::Io(std::io::Error::other(e))),
                None => {
                    self.ended = true;
                    if !self.chunked {
                        return Ok(0);
                    }
                    // Trailers are not relayed to HTTP/1.1 clients.
                    self.buf.extend_from_slice(b"0\r\n\r\n");
                    return Ok(5);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_keeps_its_fields_and_loses_the_connections() {
        let head = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.example\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nte: trailers\r\nx-forwarded-for: 10.0.0.1\r\nX-Request-Id: abc\r\n\r\nbody";
        let (r, n) = request_of(head, true, "127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(&head[n..], b"body");
        assert_eq!(r.method(), http::Method::POST);
        assert_eq!(
            r.uri().to_string(),
            "https://api.example/v1/chat/completions?x=1"
        );
        let h = r.headers();
        assert!(h.get("host").is_none() && h.get("transfer-encoding").is_none());
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        // No host: the backend's address is the authority.
        let (r, _) = request_of(
            b"GET / HTTP/1.1\r\n\r\n",
            false,
            "127.0.0.1:9".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(r.uri().to_string(), "http://127.0.0.1:9/");
    }
}
