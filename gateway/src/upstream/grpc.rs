//! gRPC to backends (`protocol = "grpc"` routes, from HTTP/2 clients): the
//! request relayed frame by frame over HTTP/2 (h2c) to a backend of the
//! route's cluster, picked by the balance stage's algorithm — messages both
//! ways as they come (bidirectional streaming), the backend's trailers
//! (`grpc-status`, `grpc-message`) relayed, `grpc-timeout` bounding the
//! whole exchange. One multiplexed HTTP/2 connection per backend per
//! worker (`h2`'s client), reopened when it dies.
//!
//! A failure before the backend answered becomes the pipeline's refusal
//! (a gRPC status in a Trailers-Only answer); after, the stream is reset.

use std::cell::Cell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use monoio::net::TcpStream;
use monoio_compat::StreamWrapper;

use crate::downstream::Frames;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::pool::{H2Conn, H2Lease};
use crate::worker::{Current, Worker};

use super::{Exchange, InFlight, Request};

/// Headers a gRPC request keeps on its way to the backend (everything but
/// the pseudo-headers the codec's head carried and the connection's own).
const DROPPED: [&str; 7] = [
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-request-id",
];

pub async fn forward(d: &mut dyn Frames, req: &Request<'_>, w: &Worker, cur: &Current) -> Exchange {
    let mut x = Exchange::default();
    let started = Instant::now();
    let r = exchange(d, req, w, cur, &mut x, started).await;
    if let Err(e) = r {
        if x.response_started {
            d.reset();
        }
        if let ProxyError::Upstream(u) = e {
            let cl = &cur.shared.clusters[req.cluster];
            w.metrics
                .inc(&w.metrics.upstream_errors, &[&cl.name, u.kind()], 1);
        }
        x.error = Some(e);
    }
    x
}

/// `grpc-timeout` (gRPC over HTTP/2: digits and a unit, H M S m u n).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    if n.is_empty() || n.len() > 8 {
        return None;
    }
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn exchange(
    d: &mut dyn Frames,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    x: &mut Exchange,
    started: Instant,
) -> Result<(), ProxyError> {
    let cl = &cur.shared.clusters[req.cluster];
    let b = pick(cl, req, w, cur)?;
    let addr = cl.backends[b];
    x.backend = Some(addr);
    // The whole exchange: the client's grpc-timeout, within the route's total.
    let asked = d
        .parts()
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    let limit = match (asked, req.route.total_timeout) {
        (Some(a), Some(t)) => Some(a.min(t)),
        (a, t) => a.or(t),
    };
    let deadline = limit.map(|l| started + l);
    let within = |fallback: Duration| {
        deadline.map_or(fallback, |dl| {
            dl.saturating_duration_since(Instant::now()).min(fallback)
        })
    };
    let send_timeout = cur.shared.timeouts.send;
    // A stream on a connection that takes it; one that turns out closed
    // (the backend's GOAWAY) is dropped and the call goes on a fresh one:
    // nothing of it was sent.
    let mut fresh = false;
    let (response, up_send, lease) = loop {
        let (mut send, lease) =
            sender(w, cl, addr, within(req.route.connect_timeout), send_timeout).await?;
        let ready = monoio::time::timeout(
            within(req.route.connect_timeout),
            poll_fn(|cx| send.poll_ready(cx)),
        )
        .await;
        let sent = match ready {
            Err(_) => return Err(UpstreamError::ConnectTimeout.into()),
            Ok(Ok(())) => send.send_request(upstream_request(d, req, addr)?, false),
            Ok(Err(e)) => Err(e),
        };
        match sent {
            Ok((response, up_send)) => break (response, up_send, lease),
            Err(_) => {
                forget(w, addr, &lease);
                if fresh {
                    return Err(UpstreamError::Closed.into());
                }
                fresh = true;
            }
        }
    };
    let load = cl.loads[b].clone();
    let n = load.inflight.fetch_add(1, Ordering::AcqRel) + 1;
    x.inflight = Some(InFlight {
        load,
        stream: false,
        concurrency: n,
        backend: b,
        uncached: 0,
        queue: cl.queue.as_ref().map(|q| q.0.clone()),
    });
    if let Some(g) = req.grant {
        g.arrived();
    }
    send_body(d, req, up_send, send_timeout);
    let sent_at = Instant::now();
    let resp = match monoio::time::timeout(within(req.route.response_timeout), response).await {
        Err(_) if deadline.is_some_and(|dl| Instant::now() >= dl) => {
            return Err(UpstreamError::TotalTimeout.into())
        }
        Err(_) => return Err(UpstreamError::ResponseTimeout.into()),
        Ok(Err(e)) => {
            if e.is_io() || e.is_go_away() {
                forget(w, addr, &lease);
            }
            return Err(UpstreamError::Reset.into());
        }
        Ok(Ok(r)) => r,
    };
    x.header_time = Some(sent_at.elapsed());
    x.status = resp.status().as_u16();
    relay_response(d, req, resp, x, deadline, sent_at, send_timeout).await
}

/// The balance stage's choice among the route's cluster.
fn pick(
    cl: &crate::pool::Cluster,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
) -> Result<usize, ProxyError> {
    let cursor = cur.cursor(req.cluster);
    match crate::balance::pick(
        &cl.balance,
        &cl.loads,
        0,
        req.model,
        0,
        None,
        cursor,
        &w.rng,
    ) {
        Ok(b) => Ok(b),
        Err(crate::balance::NoPick::Saturated) => {
            w.metrics.inc(&w.metrics.balance_shed, &[&cl.name], 1);
            Err(UpstreamError::Saturated.into())
        }
        Err(crate::balance::NoPick::Exhausted) => Err(UpstreamError::ConnectError.into()),
    }
}

/// The request's messages go on their own task: a bidirectional stream
/// answers before the client has finished sending. A body validation read
/// whole (KServe ModelInfer) goes as is.
fn send_body(
    d: &mut dyn Frames,
    req: &Request<'_>,
    mut up_send: SendStream<Bytes>,
    send_timeout: Duration,
) {
    match req.buffered {
        Some(b) => {
            let body = Bytes::copy_from_slice(&b.body);
            monoio::spawn(async move {
                if send_all(&mut up_send, body, send_timeout).await.is_ok() {
                    let _ = up_send.send_data(Bytes::new(), true);
                } else {
                    up_send.send_reset(h2::Reason::CANCEL);
                }
            });
        }
        None => {
            if let Some(body) = d.take_body() {
                monoio::spawn(pump_request(body, up_send, send_timeout));
            }
        }
    }
}

/// The backend's answer to the client: HEADERS, every DATA frame as it
/// comes, the trailers; past `deadline`, DEADLINE_EXCEEDED in trailers.
async fn relay_response(
    d: &mut dyn Frames,
    req: &Request<'_>,
    resp: http::Response<RecvStream>,
    x: &mut Exchange,
    deadline: Option<Instant>,
    sent_at: Instant,
    send_timeout: Duration,
) -> Result<(), ProxyError> {
    let (mut parts, mut up_body) = resp.into_parts();
    parts.headers.insert(
        "x-request-id",
        http::HeaderValue::from_str(req.request_id).map_err(|_| ProxyError::Internal)?,
    );
    let end = up_body.is_end_stream();
    let mut down = d
        .respond(http::Response::from_parts(parts, ()), end)
        .map_err(|_| ClientError::ClientClosed)?;
    x.response_started = true;
    let Some(down) = down.as_mut() else {
        return Ok(());
    };
    loop {
        let next = match deadline {
            Some(dl) => {
                let l = dl.saturating_duration_since(Instant::now());
                match monoio::time::timeout(l, up_body.data()).await {
                    Ok(n) => n,
                    Err(_) => {
                        // Past grpc-timeout mid-stream: DEADLINE_EXCEEDED; the backend's stream is cancelled.
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("4"));
                        t.insert(
                            "grpc-message",
                            http::HeaderValue::from_static("deadline%20exceeded"),
                        );
                        let _ = down.send_trailers(t);
                        d.done();
                        return Ok(());
                    }
                }
            }
            None => up_body.data().await,
        };
        match next {
            None => break,
            Some(Err(_)) => return Err(UpstreamError::Reset.into()),
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let _ = up_body.flow_control().release_capacity(n);
                if x.first_byte.is_none() {
                    x.first_byte = Some(sent_at.elapsed());
                    x.first_at = Some(Instant::now());
                }
                x.resp_bytes += n as u64;
                send_all(down, chunk, send_timeout)
                    .await
                    .map_err(|_| ClientError::ClientClosed)?;
            }
        }
    }
    match up_body.trailers().await {
        Ok(Some(t)) => down
            .send_trailers(t)
            .map_err(|_| ClientError::ClientClosed)?,
        Ok(None) => down
            .send_data(Bytes::new(), true)
            .map_err(|_| ClientError::ClientClosed)?,
        Err(_) => return Err(UpstreamError::Reset.into()),
    }
    d.done();
    Ok(())
}

/// The request for the backend: the client's method, path and headers
/// (connection-specific ones dropped), the gateway's request id and the
/// client's address.
fn upstream_request(
    d: &dyn Frames,
    req: &Request<'_>,
    addr: SocketAddr,
) -> Result<http::Request<()>, ProxyError> {
    let p = d.parts();
    let path = p.uri.path_and_query().map_or("/", |x| x.as_str());
    let uri = format!("http://{addr}{path}");
    let mut b = http::Request::builder().method(p.method.clone()).uri(uri);
    for (name, value) in &p.headers {
        if DROPPED.contains(&name.as_str()) {
            continue;
        }
        b = b.header(name, value);
    }
    b = b
        .header("x-request-id", req.request_id)
        .header("x-forwarded-for", req.peer.to_string());
    b.body(())
        .map_err(|_| ProxyError::Client(ClientError::Malformed("request head")))
}

/// The client's messages and trailers to the backend, as its window allows.
async fn pump_request(mut body: RecvStream, mut up: SendStream<Bytes>, send_timeout: Duration) {
    loop {
        match body.data().await {
            None => break,
            Some(Err(_)) => {
                up.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(chunk)) => {
                let n = chunk.len();
                let _ = body.flow_control().release_capacity(n);
                if send_all(&mut up, chunk, send_timeout).await.is_err() {
                    up.send_reset(h2::Reason::CANCEL);
                    return;
                }
            }
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => {
            let _ = up.send_trailers(t);
        }
        _ => {
            let _ = up.send_data(Bytes::new(), true);
        }
    }
}

/// Send `data` on `s` as the peer's window allows (at most `d` per wait).
pub(crate) async fn send_all(
    s: &mut SendStream<Bytes>,
    mut data: Bytes,
    d: Duration,
) -> Result<(), ()> {
    while !data.is_empty() {
        s.reserve_capacity(data.len());
        let n = match monoio::time::timeout(d, poll_fn(|cx| s.poll_capacity(cx))).await {
            Ok(Some(Ok(n))) => n,
            _ => return Err(()),
        };
        if n == 0 {
            continue;
        }
        let part = data.split_to(n.min(data.len()));
        s.send_data(part, false).map_err(|_| ())?;
    }
    Ok(())
}

/// A place for one request on this worker's HTTP/2 connections to `addr`:
/// the least busy one under the cluster's `max_streams_per_connection`,
/// else a new one (h2c, or TLS with ALPN `h2` when the cluster's backends
/// speak TLS) while fewer than `max_connections` are open, else the least
/// busy (the backend's own stream limit then makes it wait).
pub(super) async fn sender(
    w: &Worker,
    cl: &crate::pool::Cluster,
    addr: SocketAddr,
    timeout: Duration,
    send_timeout: Duration,
) -> Result<(SendRequest<Bytes>, H2Lease), ProxyError> {
    let deadline = Instant::now() + timeout;
    // Clusters with different TLS identities never share a connection.
    let key = (cl.key, addr);
    loop {
        if let Some(conns) = w.h2_upstream.borrow_mut().get_mut(&key) {
            conns.retain(H2Conn::is_alive);
            let least = conns.iter().min_by_key(|c| c.streams());
            // Room: under our limit and the backend's own
            // (SETTINGS_MAX_CONCURRENT_STREAMS); at max_connections, the
            // least busy anyway (the backend's limit then queues it).
            let room = |c: &&H2Conn| {
                c.streams() < cl.h2_streams.min(c.send.current_max_send_streams())
                    || conns.len() >= cl.max_connections
            };
            if let Some(c) = least.filter(room) {
                return Ok(c.lease());
            }
        }
        // Another request of this worker is opening one: wait for it, then
        // look again (a burst opens one connection, not one per request).
        let Some(opening) = w.h2_connecting.borrow().get(&key).cloned() else {
            break;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UpstreamError::ConnectTimeout.into());
        }
        let _ = monoio::time::timeout(left, opening.listen()).await;
    }
    let opening = Opening::new(w, key);
    let left = deadline.saturating_duration_since(Instant::now());
    let opened = open(cl, addr, left, send_timeout).await;
    drop(opening);
    let (send, alive) = opened?;
    let conn = H2Conn::new(send, alive);
    w.metrics
        .inc(&w.metrics.upstream_connections, &[&cl.name], 1);
    let lease = conn.lease();
    w.h2_upstream
        .borrow_mut()
        .entry(key)
        .or_default()
        .push(conn);
    Ok(lease)
}

/// A connection being opened to a backend: others wait for it; the mark
/// goes (and they wake) however the opening ends, a dropped future too.
struct Opening<'a> {
    w: &'a Worker,
    key: (u64, SocketAddr),
    done: Rc<event_listener::Event>,
}

impl<'a> Opening<'a> {
    fn new(w: &'a Worker, key: (u64, SocketAddr)) -> Opening<'a> {
        let done = Rc::new(event_listener::Event::new());
        w.h2_connecting.borrow_mut().insert(key, done.clone());
        Opening { w, key, done }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.w.h2_connecting.borrow_mut().remove(&self.key);
        self.done.notify(usize::MAX);
    }
}

/// A new HTTP/2 connection to `addr` within `timeout`, and its liveness.
async fn open(
    cl: &crate::pool::Cluster,
    addr: SocketAddr,
    timeout: Duration,
    send_timeout: Duration,
) -> Result<(SendRequest<Bytes>, Rc<Cell<bool>>), ProxyError> {
    let tls = cl.tls.as_ref();
    let started = Instant::now();
    let tcp = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout.into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(UpstreamError::ConnectRefused.into())
        }
        Ok(Err(_)) => return Err(UpstreamError::ConnectError.into()),
        Ok(Ok(t)) => t,
    };
    let _ = tcp.set_nodelay(true);
    let left = || timeout.saturating_sub(started.elapsed());
    let send = match tls {
        None => handshake(StreamWrapper::new(tcp), left()).await?,
        Some(t) => {
            let session = rustls::ClientConnection::new(t.h2.clone(), t.name.clone())
                .map_err(|_| UpstreamError::ConnectError)?;
            let mut conn = crate::io::Conn::new_client_tls(tcp, 64 * 1024, session);
            let no_h2 = match conn.handshake(left()).await {
                Ok(()) => conn.alpn_protocol() != Some(b"h2"),
                Err(crate::io::HandshakeError::Tls(rustls::Error::AlertReceived(
                    rustls::AlertDescription::NoApplicationProtocol,
                ))) => true,
                Err(e) => {
                    tracing::warn!(backend = %addr, error = ?e, "TLS handshake with the HTTP/2 backend failed");
                    return Err(UpstreamError::ConnectError.into());
                }
            };
            // A backend that didn't choose h2 by ALPN (or refused it) would
            // read the HTTP/2 preface as a broken HTTP/1.1 request.
            if no_h2 {
                tracing::warn!(backend = %addr, cluster = %cl.name, "the backend did not negotiate HTTP/2 (ALPN h2) over TLS; set http = \"1.1\" for it");
                return Err(UpstreamError::ConnectError.into());
            }
            let io = crate::io::TlsStreamIo {
                conn,
                send: send_timeout,
            };
            handshake(StreamWrapper::new(io), left()).await?
        }
    };
    Ok(send)
}

/// The HTTP/2 handshake over `io`; the connection's frames are then driven
/// by a task of their own until it closes.
async fn handshake<IO>(
    io: IO,
    timeout: Duration,
) -> Result<(SendRequest<Bytes>, Rc<Cell<bool>>), ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let hs = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, Bytes>(io);
    let (send, conn) = match monoio::time::timeout(timeout, hs).await {
        Ok(Ok(x)) => x,
        _ => return Err(UpstreamError::ConnectError.into()),
    };
    let alive = Rc::new(Cell::new(true));
    let flag = alive.clone();
    monoio::spawn(async move {
        let _ = conn.await;
        flag.set(false);
    });
    Ok((send, alive))
}

/// The connection `lease` is on failed: requests after go to another (or a new one).
pub(super) fn forget(w: &Worker, addr: SocketAddr, lease: &H2Lease) {
    for (_, conns) in w
        .h2_upstream
        .borrow_mut()
        .iter_mut()
        .filter(|(k, _)| k.1 == addr)
    {
        conns.retain(|c| !c.holds(lease));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "100", "100x", "123456789S", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }
}
