//! One HTTP/2 stream as the pipeline's [`Downstream`]: its pseudo-headers
//! and headers become the HTTP/1.1 head the codec parses (so every stage
//! checks exactly what it checks for HTTP/1.1: the same strict rules, the
//! same limits), its DATA frames the body (chunked when no
//! `content-length` was sent); the HTTP/1.1 response the pipeline writes
//! becomes HEADERS and DATA frames, sent as the client's flow-control
//! window allows (a slow reader holds at most `max_send_buffer`).

use std::future::poll_fn;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};

use crate::codec::{self, BodyKind, ChunkedDecoder, ResponseHead};
use crate::downstream::Downstream;
use crate::io::{Conn, ReadError, WriteError};
use crate::pipeline::{self, Served};
use crate::worker::Worker;

/// Largest response head the re-framing accepts (the pipeline writes the
/// backend's head, already bounded by `max_response_header_bytes`).
const MAX_RESPONSE_HEAD: usize = 256 * 1024;

/// Serve one stream: its head parsed, the pipeline run, its answer framed.
pub(super) async fn serve(
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: SocketAddr,
    fd: RawFd,
    tls: Option<Rc<super::TlsFacts>>,
    w: &Rc<Worker>,
) {
    let cur = w.current();
    let mut rq = super::incoming(peer, tls.as_deref());
    let (parts, body) = req.into_parts();
    let head = head_of(&parts, body.is_end_stream());
    let grpc = crate::pipeline::is_grpc(&parts.headers);
    let end_stream = body.is_end_stream();
    let mut d = H2Stream {
        parts,
        buf: head,
        pos: 0,
        cap: cur.shared.buffer_size,
        body: Some(body),
        chunked: false,
        ended: false,
        respond: Some(respond),
        send: None,
        out: Out::Head(Vec::new()),
        head_request: false,
        fd,
        tls,
    };
    d.head_request = d.parts.method == http::Method::HEAD;
    d.chunked = !d.parts.headers.contains_key(http::header::CONTENT_LENGTH) && !end_stream;
    let mut s = super::scratch();
    let parsed = codec::parse_request(d.pending(), &cur.shared.limits, &mut rq.head);
    let served = match parsed {
        Ok(true) => {
            rq.begin(Some(d.pending()), w, &cur);
            pipeline::run(&mut d, &mut rq, w, &cur, &mut s).await
        }
        Ok(false) => Err(pipeline::Refusal::from_error(
            crate::error::ClientError::HeaderTooLarge.into(),
        )),
        Err(e) => {
            rq.begin(None, w, &cur);
            Err(pipeline::Refusal::from_error(e.into()))
        }
    };
    let send = cur.shared.timeouts.send;
    match served {
        Ok(Served::Relayed { .. }) => {}
        Ok(Served::Answer { body, admission }) => {
            s.out.clear();
            let _ = write!(
                s.out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\n\r\n",
                body.len(),
                rq.id
            );
            s.out.extend_from_slice(&body);
            let _ = d.write_all(std::mem::take(&mut s.out), send).await;
            drop(admission);
        }
        Err(r) => {
            r.record(&rq, w, &cur);
            if r.client_gone {
            } else if grpc || r.dialect == crate::error::Dialect::Grpc {
                d.grpc_refuse(&r, &rq.id);
            } else {
                s.out.clear();
                r.body(&s.limit_headers).write(&rq.id, false, &mut s.out);
                let _ = d.write_all(std::mem::take(&mut s.out), send).await;
            }
        }
    }
    d.finish();
    d.drain_body().await;
}

/// After an answer that didn't read the whole request body: read (and
/// drop) what the client still sends, up to this much for this long, so the
/// stream ends cleanly instead of with a reset some clients take as an error.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The request's HTTP/1.1 head: method, path, `host` from `:authority`,
/// the headers, and the body's framing. What the codec's strict parser
/// reads back must be this request and nothing else (fuzz target `h2_frames`).
pub fn head_of(parts: &http::request::Parts, end_stream: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(parts.method.as_str().as_bytes());
    h.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    h.extend_from_slice(target.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority();
    if let Some(a) = authority {
        h.extend_from_slice(b"host: ");
        h.extend_from_slice(a.as_str().as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if name == http::header::HOST && authority.is_some() {
            continue;
        }
        h.extend_from_slice(name.as_str().as_bytes());
        h.extend_from_slice(b": ");
        h.extend_from_slice(value.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        if end_stream {
            h.extend_from_slice(b"content-length: 0\r\n");
        } else {
            h.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2): printable ASCII
/// but `%` as is, everything else as `%XX`.
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = std::fmt::Write::write_fmt(&mut out, format_args!("%{b:02X}"));
        }
    }
    out
}

/// Where the response being written is.
enum Out {
    /// Collecting the head.
    Head(Vec<u8>),
    /// Its body: what is left of a `Length`, or a chunked decoder.
    Body {
        kind: BodyKind,
        remaining: u64,
        dec: ChunkedDecoder,
    },
    /// Sent to its end (or reset).
    Done,
}

/// One HTTP/2 stream (see the module doc).
pub struct H2Stream {
    parts: http::request::Parts,
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    /// `None` once a protocol relaying frames (gRPC) took it.
    body: Option<RecvStream>,
    /// The request body is re-framed as chunks (no `content-length`).
    chunked: bool,
    /// The client's half of the stream has ended.
    ended: bool,
    respond: Option<SendResponse<Bytes>>,
    send: Option<SendStream<Bytes>>,
    out: Out,
    head_request: bool,
    fd: RawFd,
    tls: Option<Rc<super::TlsFacts>>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl H2Stream {
    fn tls_facts(&self) -> Option<&super::TlsFacts> {
        self.tls.as_deref()
    }

    /// A refusal as gRPC says it: a Trailers-Only answer (HTTP 200,
    /// `grpc-status`, `grpc-message`; `grpc-retry-pushback-ms` when the
    /// client should come back later).
    fn grpc_refuse(&mut self, r: &pipeline::Refusal, request_id: &str) {
        let Some(respond) = self.respond.as_mut() else {
            return;
        };
        let mut b = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header(
                "grpc-status",
                crate::error::grpc_status(r.status).to_string(),
            )
            .header(
                "grpc-message",
                percent(&match r.param.as_deref() {
                    Some(p) if !p.is_empty() => format!("{} (at {p})", r.message),
                    _ => r.message.to_string(),
                }),
            )
            .header("x-request-id", request_id);
        if let Some(s) = r.retry_after {
            b = b.header("grpc-retry-pushback-ms", (s * 1000).to_string());
        }
        if let Ok(resp) = b.body(()) {
            let _ = respond.send_response(resp, true);
        }
        self.respond = None;
        self.out = Out::Done;
    }

    /// The response head: HEADERS (hop-by-hop fields dropped); informational
    /// answers (100 Continue) are not forwarded: HTTP/2 clients don't wait
    /// for them. `Ok(None)`: the head is not complete yet.
    fn start_response(&mut self, acc: &[u8]) -> Result<Option<usize>, WriteError> {
        let mut rh = ResponseHead::default();
        match codec::parse_response(
            acc,
            MAX_RESPONSE_HEAD,
            crate::config::MAX_HEADERS,
            self.head_request,
            &mut rh,
        ) {
            Ok(false) => return Ok(None),
            Err(e) => return Err(WriteError::Io(io_err(e))),
            Ok(true) => {}
        }
        if (100..200).contains(&rh.status) {
            return Ok(Some(rh.head_len));
        }
        let mut resp = http::Response::builder().status(rh.status);
        for h in &rh.headers {
            let name = &acc[h.name.clone()];
            if codec::H2_HOP_BY_HOP
                .iter()
                .any(|x| name.eq_ignore_ascii_case(x.as_bytes()))
            {
                continue;
            }
            resp = resp.header(name, &acc[h.value.clone()]);
        }
        let resp = resp.body(()).map_err(|e| WriteError::Io(io_err(e)))?;
        let kind = if self.head_request {
            BodyKind::Empty
        } else {
            rh.body_kind()
        };
        let end = matches!(kind, BodyKind::Empty | BodyKind::Length(0));
        let respond = self
            .respond
            .as_mut()
            .ok_or_else(|| WriteError::Io(io_err("response already sent")))?;
        let send = respond
            .send_response(resp, end)
            .map_err(|e| WriteError::Io(io_err(e)))?;
        self.respond = None;
        if end {
            self.out = Out::Done;
        } else {
            self.send = Some(send);
            self.out = Out::Body {
                kind,
                remaining: match kind {
                    BodyKind::Length(n) => n,
                    _ => 0,
                },
                dec: ChunkedDecoder::new(),
            };
        }
        Ok(Some(rh.head_len))
    }

    /// Response body bytes in the backend's framing → DATA frames.
    async fn body_bytes(&mut self, data: &[u8], d: Duration) -> Result<(), WriteError> {
        let Out::Body {
            kind,
            remaining,
            dec,
        } = &mut self.out
        else {
            return Ok(());
        };
        let (payload, end) = match *kind {
            BodyKind::Length(_) => {
                let n = (*remaining).min(data.len() as u64) as usize;
                *remaining -= n as u64;
                (Bytes::copy_from_slice(&data[..n]), *remaining == 0)
            }
            BodyKind::Chunked => {
                let mut p = Vec::with_capacity(data.len());
                dec.feed(data, |r| p.extend_from_slice(&data[r]))
                    .map_err(|e| WriteError::Io(io_err(e)))?;
                (Bytes::from(p), dec.is_done())
            }
            _ => (Bytes::copy_from_slice(data), false),
        };
        if end {
            self.out = Out::Done;
        }
        self.send_data(payload, end, d).await
    }

    /// HTTP/1.1 response bytes from the pipeline → HEADERS, then DATA.
    async fn emit(&mut self, data: &[u8], d: Duration) -> Result<(), WriteError> {
        let Out::Head(acc) = &mut self.out else {
            return self.body_bytes(data, d).await;
        };
        let mut acc = std::mem::take(acc);
        acc.extend_from_slice(data);
        loop {
            match self.start_response(&acc)? {
                None => {
                    self.out = Out::Head(acc);
                    return Ok(());
                }
                Some(used) => {
                    acc.drain(..used);
                    // Still collecting: that was an informational answer.
                    if !matches!(self.out, Out::Head(_)) {
                        break;
                    }
                }
            }
        }
        self.body_bytes(&acc, d).await
    }

    /// Send `data` as the client's window allows, waiting at most `d` for
    /// each opening of it.
    async fn send_data(
        &mut self,
        mut data: Bytes,
        end: bool,
        d: Duration,
    ) -> Result<(), WriteError> {
        let Some(s) = self.send.as_mut() else {
            return Ok(());
        };
        while !data.is_empty() {
            s.reserve_capacity(data.len());
            let n = match monoio::time::timeout(d, poll_fn(|cx| s.poll_capacity(cx))).await {
                Err(_) => return Err(WriteError::Timeout),
                Ok(None) => return Err(WriteError::Io(io_err("stream closed"))),
                Ok(Some(Err(e))) => return Err(WriteError::Io(io_err(e))),
                Ok(Some(Ok(n))) => n,
            };
            if n == 0 {
                continue;
            }
            let part = data.split_to(n.min(data.len()));
            s.send_data(part, end && data.is_empty())
                .map_err(|e| WriteError::Io(io_err(e)))?;
        }
        if end {
            if data.is_empty() && s.capacity() == 0 {
                // Nothing was sent with the end flag (an empty last piece).
                let _ = s.send_data(Bytes::new(), true);
            }
            self.send = None;
        }
        Ok(())
    }

    /// See [`DRAIN_BYTES`].
    async fn drain_body(&mut self) {
        let Some(body) = self.body.as_mut() else {
            return;
        };
        let deadline = std::time::Instant::now() + DRAIN_TIME;
        let mut drained = 0;
        while drained < DRAIN_BYTES && !body.is_end_stream() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match monoio::time::timeout(left, body.data()).await {
                Ok(Some(Ok(b))) => {
                    drained += b.len();
                    let _ = body.flow_control().release_capacity(b.len());
                }
                _ => break,
            }
        }
    }

    /// After the pipeline: a body with no end of its own (close-delimited)
    /// ends here; one cut short is reset, so the client knows it is incomplete.
    fn finish(&mut self) {
        match &self.out {
            Out::Body {
                kind: BodyKind::UntilClose,
                ..
            } => {
                if let Some(s) = self.send.as_mut() {
                    let _ = s.send_data(Bytes::new(), true);
                }
            }
            Out::Body { .. } => {
                if let Some(s) = self.send.as_mut() {
                    s.send_reset(h2::Reason::INTERNAL_ERROR);
                }
            }
            Out::Head(_) => {
                if let Some(r) = self.respond.as_mut() {
                    r.send_reset(h2::Reason::INTERNAL_ERROR);
                }
            }
            Out::Done => {}
        }
        self.out = Out::Done;
        self.send = None;
    }
}

impl crate::downstream::Frames for H2Stream {
    /// The request as the client sent it (pseudo-headers and headers).
    fn parts(&self) -> &http::request::Parts {
        &self.parts
    }

    /// The request body's frames, for a protocol relayed frame by frame.
    fn take_body(&mut self) -> Option<RecvStream> {
        self.body.take()
    }

    /// Answer with `resp` (HEADERS; `end`: nothing follows): the stream for
    /// its DATA and trailers, `None` when it ended.
    fn respond(
        &mut self,
        resp: http::Response<()>,
        end: bool,
    ) -> Result<Option<SendStream<Bytes>>, h2::Error> {
        let Some(mut r) = self.respond.take() else {
            return Ok(None);
        };
        let s = r.send_response(resp, end)?;
        self.out = Out::Done;
        Ok((!end).then_some(s))
    }

    /// The answer went out whole by another way (gRPC's relay).
    fn done(&mut self) {
        self.out = Out::Done;
    }

    /// The answer broke off after it started: the client must not take it as whole.
    fn reset(&mut self) {
        self.out = Out::Body {
            kind: BodyKind::Chunked,
            remaining: 0,
            dec: ChunkedDecoder::new(),
        };
    }
}

impl Downstream for H2Stream {
    fn frames(&mut self) -> Option<&mut dyn crate::downstream::Frames> {
        Some(self)
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    fn is_full(&self) -> bool {
        self.buf.len() - self.pos >= self.cap
    }

    async fn fill_timeout(&mut self, d: Duration) -> Result<usize, ReadError> {
        loop {
            if self.ended {
                return Ok(0);
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(0);
            };
            let data = match monoio::time::timeout(d, body.data()).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(None) => {
                    self.ended = true;
                    if self.chunked {
                        self.buf.extend_from_slice(b"0\r\n\r\n");
                        return Ok(5);
                    }
                    return Ok(0);
                }
                Ok(Some(Err(e))) => return Err(ReadError::Io(io_err(e))),
                Ok(Some(Ok(b))) => b,
            };
            let n = data.len();
            let _ = body.flow_control().release_capacity(n);
            if n == 0 {
                continue;
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let before = self.buf.len();
            if self.chunked {
                let _ = write!(self.buf, "{n:x}\r\n");
                self.buf.extend_from_slice(&data);
                self.buf.extend_from_slice(b"\r\n");
            } else {
                self.buf.extend_from_slice(&data);
            }
            return Ok(self.buf.len() - before);
        }
    }

    async fn forward(&mut self, n: usize, dst: &mut Conn, d: Duration) -> Result<(), WriteError> {
        let bytes = self.pending()[..n].to_vec();
        dst.write_all(bytes, d).await.0?;
        self.consume(n);
        Ok(())
    }

    async fn write_all(
        &mut self,
        mut out: Vec<u8>,
        d: Duration,
    ) -> (Result<(), WriteError>, Vec<u8>) {
        let r = self.emit(&out, d).await;
        out.clear();
        (r, out)
    }

    fn closed_watch(&self) -> RawFd {
        self.fd
    }

    fn tls(&self) -> bool {
        H2Stream::tls_facts(self).is_some()
    }

    fn client_certificate(&self) -> Option<&[u8]> {
        H2Stream::tls_facts(self).and_then(|t| t.client_cert.as_deref())
    }
}
