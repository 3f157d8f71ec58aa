//! The request toward the backend: its head rewritten for the backend
//! (hop-by-hop headers gone, framing normalised, forwarding and identity
//! headers added), then its body, streamed as it arrives in bounded memory.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Instant;

use super::{relay, wait_for, Attempts, Exchange, Request, UpConn, COALESCE_MAX};
use crate::codec::{self, BodyKind, ChunkedDecoder};
use crate::config::Timeouts;
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError, UpstreamError};
use crate::io::{Conn, ReadError, WriteError};
use crate::worker::{Current, Worker};

/// The backend connection of one attempt and what it is sent.
pub(super) struct Target<'a> {
    pub up: &'a mut UpConn,
    /// What of the request body is still to be streamed from the client.
    pub body: BodyKind,
    pub deadline: Option<Instant>,
}

/// Send the request head (with a buffered body, or a small one that came
/// with the head), then stream the rest of the body. `Ok(false)`: a reused
/// connection failed before anything was taken from the client — try again
/// on a fresh one; or a fresh one did (a backend dying between accept and
/// read) — try another backend, when the request can't have been acted on
/// (idempotent, or its body not sent yet). A backend that stops reading mid-upload may have answered
/// already (an early 413, say): `upload_cut` is set and its answer relayed.
// The exchange's state, passed apart as everywhere in this stage (a struct
// would only rename the same borrows).
#[allow(clippy::too_many_arguments)]
pub(super) async fn request<D: Downstream>(
    client: &mut D,
    req: &Request<'_>,
    w: &Worker,
    cur: &Current,
    to: Target<'_>,
    a: &mut Attempts,
    out: &mut Vec<u8>,
    x: &mut Exchange,
) -> Result<bool, ProxyError> {
    let timeouts = &cur.shared.timeouts;
    if req.head.expect_continue && !a.sent_continue {
        let (r, _) = client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), timeouts.send)
            .await;
        r.map_err(relay::client_write)?;
        a.sent_continue = true;
    }
    let with_head = head_for_backend(client.pending(), req, cur, to.up.addr, to.body, out);
    let (r, o) = to
        .up
        .conn
        .write_all(std::mem::take(out), timeouts.send)
        .await;
    // A buffered body went through `out`: don't hold a second copy of it
    // for the rest of a (possibly minutes-long) response.
    *out = if o.capacity() > 1 << 20 {
        Vec::with_capacity(4096)
    } else {
        o
    };
    match r {
        Err(WriteError::Timeout) => return Err(UpstreamError::SendTimeout.into()),
        // Nothing of the body has been read from the client yet: safe to retry.
        Err(_) if to.up.reused && !a.retried => return Ok(false),
        Err(_)
            if (req.head.idempotent || to.body != BodyKind::Empty)
                && relay::another_backend(cur, to.up.picked(), a.failed_on) =>
        {
            relay::retry_elsewhere(w, cur, to.up.picked(), a, x);
            return Ok(false);
        }
        Err(_) => return Err(UpstreamError::Reset.into()),
        Ok(()) => {}
    }
    if to.body == BodyKind::Empty {
        x.request_body_done = true;
        return Ok(true);
    }
    // The head is no longer needed unless a bodiless request may be retried.
    client.consume(req.head.head_len + with_head);
    x.head_consumed = true;
    x.req_bytes = with_head as u64;
    let limit = req.route.max_request_body_bytes;
    let sent = send_body(
        client,
        &mut to.up.conn,
        to.body,
        limit,
        timeouts,
        to.deadline,
        x,
    );
    match sent.await {
        Ok(()) => x.request_body_done = true,
        Err(ProxyError::Upstream(UpstreamError::Reset)) => a.upload_cut = true,
        Err(e) => return Err(e),
    }
    Ok(true)
}

/// The head the backend gets, in `out`, followed by a buffered body or by a
/// small body that arrived with the head (one write instead of two); how
/// many of the client's pending body bytes went with it.
pub(super) fn head_for_backend(
    pending: &[u8],
    req: &Request<'_>,
    cur: &Current,
    backend: SocketAddr,
    body: BodyKind,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    let s = &cur.shared;
    let identity = s.authn.as_ref().map(|_| &s.authn_settings);
    if let Some(b) = req.buffered {
        let len = Some(b.body.len() as u64);
        build_upstream_head(&b.head, req, s.trust_forwarded, backend, len, identity, out);
        out.extend_from_slice(&b.body);
        return 0;
    }
    build_upstream_head(
        pending,
        req,
        s.trust_forwarded,
        backend,
        None,
        identity,
        out,
    );
    if let BodyKind::Length(n) = body {
        let p = &pending[req.head.head_len..];
        let k = n.min(p.len() as u64) as usize;
        if k <= COALESCE_MAX {
            out.extend_from_slice(&p[..k]);
            return k;
        }
    }
    0
}

/// Stream the request body to the backend as it arrives, within bounded memory.
async fn send_body<D: Downstream>(
    client: &mut D,
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
                    .forward(n, up, send_timeout)
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
pub(super) fn build_upstream_head(
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
    match &req.traceparent {
        None => codec::write_kept_headers(buf, &h.headers, out),
        // Traced: the backend's spans are children of the gateway's.
        Some(tp) => {
            for hd in h
                .headers
                .iter()
                .filter(|hd| !hd.drop && !buf[hd.name.clone()].eq_ignore_ascii_case(b"traceparent"))
            {
                out.extend_from_slice(&buf[hd.name.clone()]);
                out.extend_from_slice(b": ");
                out.extend_from_slice(&buf[hd.value.clone()]);
                out.extend_from_slice(b"\r\n");
            }
            let _ = write!(out, "traceparent: {tp}\r\n");
        }
    }
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
