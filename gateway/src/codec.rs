//! Stage 2 — HTTP/1.1 codec: strict request/response head parsing (httparse
//! underneath) and chunked framing.
//!
//! Outcome of [`parse_request`]: `Ok(Some(head))` → continue to routing;
//! `Ok(None)` → read more bytes; `Err(ClientError)` → answer with its status
//! and close (the framing is no longer trustworthy).
//!
//! Strictness is the defence against request smuggling and desync
//! (RFC 9112 §6.1, §6.3, §11.2): bare CR or LF, obs-fold, repeated or
//! malformed Content-Length, Content-Length together with Transfer-Encoding,
//! and any transfer coding but a single final `chunked` are all refused.

use std::ops::Range;

use crate::config::Limits;
use crate::error::{ClientError, UpstreamError};

/// How the body of a message is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Response only: the body ends when the upstream closes.
    UntilClose,
}

/// One header as byte ranges into the buffer the head was parsed from.
#[derive(Debug, Clone)]
pub struct HeaderRef {
    pub name: Range<usize>,
    pub value: Range<usize>,
    /// Hop-by-hop or otherwise replaced by the gateway: not forwarded.
    pub drop: bool,
}

/// A parsed request head. Ranges index the client read buffer, which still
/// holds the head until it is consumed after forwarding.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    pub head_len: usize,
    pub method: Range<usize>,
    pub target: Range<usize>,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<HeaderRef>,
    pub body: Option<BodyKind>,
    pub host: Option<Range<usize>>,
    pub request_id: Option<Range<usize>>,
    /// Some when the client sent X-Forwarded-For (the lines stay in `headers`).
    pub forwarded_for: Option<Range<usize>>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub is_head: bool,
    /// GET, HEAD, OPTIONS, TRACE, PUT, DELETE (RFC 9110 §9.2.2).
    pub idempotent: bool,
}

impl RequestHead {
    pub fn body_kind(&self) -> BodyKind {
        self.body.unwrap_or(BodyKind::Empty)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub reason: Range<usize>,
    pub minor: u8,
    pub headers: Vec<HeaderRef>,
    pub body: Option<BodyKind>,
    /// `Content-Length` of a response that has no body here (HEAD, 204, 304).
    pub bodiless_length: Option<u64>,
    pub keep_alive: bool,
}

impl ResponseHead {
    pub fn body_kind(&self) -> BodyKind {
        self.body.unwrap_or(BodyKind::Empty)
    }
}

/// Headers that mean something only to one HTTP/1.1 connection: never
/// sent in HTTP/2 (RFC 9113 §8.2.2).
pub const H2_HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Headers that describe one connection only (RFC 9110 §7.6.1) plus those
/// the gateway sets itself; never forwarded as received.
fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"expect",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
        || (name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-"))
}

use crate::config::MAX_HEADERS;

const FRAMING: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"host"];

/// The tokens of `Connection` headers (RFC 9110 §7.6.1).
#[derive(Default)]
struct ConnectionTokens<'a> {
    close: bool,
    keep_alive: bool,
    /// Other tokens: names of headers that are hop-by-hop for this message.
    listed: Vec<&'a [u8]>,
}

impl<'a> ConnectionTokens<'a> {
    fn absorb(&mut self, value: &'a [u8]) {
        for t in comma_tokens(value) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                self.listed.push(t);
            }
        }
    }

    /// Headers named in Connection are hop-by-hop too.
    fn drop_listed(&self, buf: &[u8], headers: &mut [HeaderRef]) {
        if self.listed.is_empty() {
            return;
        }
        for h in headers.iter_mut() {
            let n = &buf[h.name.clone()];
            // Framing and Host are never hop-by-hop, whatever Connection says:
            // dropping them would desync the next hop (smuggling).
            if FRAMING.iter().any(|f| f.eq_ignore_ascii_case(n)) {
                continue;
            }
            if self.listed.iter().any(|l| l.eq_ignore_ascii_case(n)) {
                h.drop = true;
            }
        }
    }
}

/// Find the end of a head (`\r\n\r\n`), returning the head length.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n\r\n").map(|p| p + 4)
}

#[inline]
fn memchr_lf(s: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', s)
}

/// Every LF must follow a CR and every CR must precede an LF.
fn line_endings_ok(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && prev != b'\r' {
            return false;
        }
        // A CR at the very end of a partial head may still be followed by LF.
        if b == b'\r' && head.get(i + 1).is_some_and(|&n| n != b'\n') {
            return false;
        }
        prev = b;
    }
    true
}

/// Where `s` lies in `buf`. httparse hands back slices of the buffer, but
/// not always: a reason phrase that isn't UTF-8 comes back as a static
/// `""` (found by fuzzing: the subtraction underflowed). Anything outside
/// `buf`, and anything empty, is the empty range.
fn range_of(buf: &[u8], s: &[u8]) -> Range<usize> {
    let (b, p) = (buf.as_ptr() as usize, s.as_ptr() as usize);
    if s.is_empty() || p < b || p + s.len() > b + buf.len() {
        return 0..0;
    }
    let start = p - b;
    start..start + s.len()
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b" \t".contains(b))
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b" \t".contains(b))
        .map_or(s, |p| p + 1);
    &v[s..e]
}

fn comma_tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim)
}

fn is_token(t: &[u8]) -> bool {
    !t.is_empty()
        && t.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// What the Transfer-Encoding headers say, combined.
enum TeVerdict {
    Chunked,
    /// Syntax error, `chunked` twice, or `chunked` not final → 400.
    Bad,
    /// A coding other than `chunked` → 501 for requests.
    Unsupported,
}

fn check_transfer_encoding(values: &[&[u8]]) -> TeVerdict {
    let mut codings: Vec<&[u8]> = Vec::with_capacity(2);
    for v in values {
        for t in comma_tokens(v) {
            // A coding may carry parameters ("gzip;q=1"); the name is enough here.
            let name = trim(t.split(|&b| b == b';').next().unwrap_or(t));
            if !is_token(name) {
                return TeVerdict::Bad;
            }
            codings.push(name);
        }
    }
    let chunked = codings
        .iter()
        .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
        .count();
    let last_chunked = codings
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
    if chunked > 1 || (chunked == 1 && !last_chunked) || codings.is_empty() {
        return TeVerdict::Bad;
    }
    if codings.len() > 1 || !last_chunked {
        return TeVerdict::Unsupported;
    }
    TeVerdict::Chunked
}

/// Parse a request head from the start of `buf`.
///
/// `Ok(false)`: the head is not complete yet.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    out: &mut RequestHead,
) -> Result<bool, ClientError> {
    let Some(head_len) = find_head_end(buf) else {
        return incomplete_head(buf, limits);
    };
    let head = complete_head(buf, head_len, limits)?;

    // On the stack: no allocation per request. `max_headers` is capped at MAX_HEADERS.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers[..limits.max_headers.min(MAX_HEADERS)]);
    let parsed = req.parse(head);
    check_parsed(parsed)?;
    let (method, target, minor) = request_line(&req, limits)?;

    out.headers.clear();
    out.head_len = head_len;
    out.method = range_of(buf, method.as_bytes());
    out.target = range_of(buf, target.as_bytes());
    out.minor = minor;
    out.host = None;
    out.request_id = None;
    out.forwarded_for = None;
    out.expect_continue = false;
    out.is_head = method == "HEAD";
    out.idempotent = matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    );

    let mut framing = Framing::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let drop = framing.absorb(buf, name, value, minor, out)?;
        out.headers.push(HeaderRef {
            name: range_of(buf, name),
            value: range_of(buf, value),
            drop,
        });
    }
    framing.conn.drop_listed(buf, &mut out.headers);
    if minor == 1 && out.host.is_none() {
        return Err(ClientError::Malformed("missing Host header"));
    }

    out.body = Some(framing.body(minor)?);
    if out.body_kind() == BodyKind::Empty {
        out.expect_continue = false;
    }
    out.keep_alive = if minor == 1 {
        !framing.conn.close
    } else {
        framing.conn.keep_alive && !framing.conn.close
    };
    Ok(true)
}

/// No complete head yet: refuses early what is already malformed or can no
/// longer fit, else `Ok(false)` (read more).
#[inline]
fn incomplete_head(buf: &[u8], limits: &Limits) -> Result<bool, ClientError> {
    if !line_endings_ok(buf) {
        return Err(ClientError::Malformed("bare CR or LF in the request head"));
    }
    let line_end = memchr_lf(buf);
    if line_end.is_none() && buf.len() > limits.max_uri_bytes + 64 {
        return Err(ClientError::UriTooLong);
    }
    if buf.len() >= limits.max_header_bytes {
        return Err(match line_end {
            Some(p) if p > limits.max_uri_bytes + 64 => ClientError::UriTooLong,
            None => ClientError::UriTooLong,
            _ => ClientError::HeaderTooLarge,
        });
    }
    Ok(false)
}

/// The complete head of `head_len` bytes, or the refusal of one too large,
/// with a bare CR or LF, or with an empty line before the request line.
#[inline]
fn complete_head<'b>(
    buf: &'b [u8],
    head_len: usize,
    limits: &Limits,
) -> Result<&'b [u8], ClientError> {
    if head_len > limits.max_header_bytes {
        let line = memchr_lf(buf).unwrap_or(head_len);
        return Err(if line > limits.max_uri_bytes + 64 {
            ClientError::UriTooLong
        } else {
            ClientError::HeaderTooLarge
        });
    }
    let head = &buf[..head_len];
    if !line_endings_ok(head) {
        return Err(ClientError::Malformed("bare CR or LF in the request head"));
    }
    if head.starts_with(b"\r\n") {
        return Err(ClientError::Malformed("empty line before the request line"));
    }
    Ok(head)
}

/// The client error for what httparse made of a complete head (`Ok` when it
/// parsed the whole of it).
#[inline]
fn check_parsed(parsed: httparse::Result<usize>) -> Result<(), ClientError> {
    match parsed {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Malformed("incomplete request head"))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ClientError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            return Err(ClientError::Malformed("unsupported HTTP version"))
        }
        Err(httparse::Error::HeaderName) => {
            return Err(ClientError::Malformed("invalid header name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(ClientError::Malformed("invalid header value"))
        }
        Err(httparse::Error::Token) => return Err(ClientError::Malformed("invalid method")),
        Err(_) => return Err(ClientError::Malformed("invalid request line")),
    }
    Ok(())
}

/// The method, target and minor version of the request line, or the refusal
/// of a target too long, CONNECT, or a target that is not origin-form.
#[inline]
fn request_line<'b>(
    req: &httparse::Request<'_, 'b>,
    limits: &Limits,
) -> Result<(&'b str, &'b str, u8), ClientError> {
    let method = req.method.ok_or(ClientError::Malformed("invalid method"))?;
    let target = req
        .path
        .ok_or(ClientError::Malformed("invalid request target"))?;
    let minor = req
        .version
        .ok_or(ClientError::Malformed("unsupported HTTP version"))?;
    if target.len() > limits.max_uri_bytes {
        return Err(ClientError::UriTooLong);
    }
    if method == "CONNECT" {
        return Err(ClientError::UnsupportedMethod);
    }
    // Only origin-form, and `*` for OPTIONS (RFC 9112 §3.2).
    if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) {
        return Err(ClientError::Malformed(
            "request target must be an absolute path",
        ));
    }
    Ok((method, target, minor))
}

/// What the request's headers say about its framing and connection, as
/// they are read.
#[derive(Default)]
struct Framing<'a> {
    content_length: Option<u64>,
    te_values: Vec<&'a [u8]>,
    conn: ConnectionTokens<'a>,
}

impl<'a> Framing<'a> {
    /// Takes in one header: whether it is dropped (not forwarded as
    /// received), or the refusal of a repeated or invalid one.
    #[inline]
    fn absorb(
        &mut self,
        buf: &[u8],
        name: &[u8],
        value: &'a [u8],
        minor: u8,
        out: &mut RequestHead,
    ) -> Result<bool, ClientError> {
        let mut drop = is_hop_by_hop(name);
        if name.eq_ignore_ascii_case(b"content-length") {
            // Re-written by the gateway from the framing it decided on.
            drop = true;
            if self.content_length.is_some() {
                return Err(ClientError::Malformed("repeated Content-Length"));
            }
            self.content_length = Some(
                parse_content_length(value)
                    .ok_or(ClientError::Malformed("invalid Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Re-written by the gateway in a normal form.
            drop = true;
            self.te_values.push(value);
        } else if name.eq_ignore_ascii_case(b"host") {
            if out.host.is_some() {
                return Err(ClientError::Malformed("repeated Host"));
            }
            out.host = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.conn.absorb(value);
        } else if name.eq_ignore_ascii_case(b"expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                out.expect_continue = minor == 1;
            } else {
                return Err(ClientError::ExpectationFailed);
            }
        } else if name.eq_ignore_ascii_case(b"x-request-id") {
            drop = true;
            if out.request_id.is_none() && valid_request_id(value) {
                out.request_id = Some(range_of(buf, value));
            }
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            // Re-written by the gateway (appended to only when trusted; see upstream).
            drop = true;
            out.forwarded_for.get_or_insert(0..0);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
            drop = true;
        }
        Ok(drop)
    }

    /// How the body is delimited, or the refusal of Transfer-Encoding in
    /// HTTP/1.0, with Content-Length, or other than a final `chunked`.
    #[inline]
    fn body(&self, minor: u8) -> Result<BodyKind, ClientError> {
        Ok(if !self.te_values.is_empty() {
            if minor == 0 {
                return Err(ClientError::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            if self.content_length.is_some() {
                return Err(ClientError::Malformed(
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            match check_transfer_encoding(&self.te_values) {
                TeVerdict::Chunked => BodyKind::Chunked,
                TeVerdict::Bad => return Err(ClientError::Malformed("invalid Transfer-Encoding")),
                TeVerdict::Unsupported => return Err(ClientError::UnsupportedTransferCoding),
            }
        } else {
            match self.content_length {
                Some(0) | None => BodyKind::Empty,
                Some(n) => BodyKind::Length(n),
            }
        })
    }
}

/// A request id we accept from a client and propagate: short, printable, no separators.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Parse an upstream response head from the start of `buf`.
/// `Ok(false)`: need more bytes. Errors mean the upstream is not speaking valid HTTP/1.1.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
    request_was_head: bool,
    out: &mut ResponseHead,
) -> Result<bool, UpstreamError> {
    let Some(head_len) = find_head_end(buf) else {
        if buf.len() >= max_head {
            return Err(UpstreamError::BadResponse);
        }
        return Ok(false);
    };
    if head_len > max_head {
        return Err(UpstreamError::BadResponse);
    }
    let head = &buf[..head_len];
    if !line_endings_ok(head) {
        return Err(UpstreamError::BadResponse);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers[..max_headers.min(MAX_HEADERS)]);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(UpstreamError::BadResponse),
    }
    // RFC 9110 §15: a status outside 100..=599 is invalid (httparse takes
    // any three digits: "009" was found by fuzzing).
    let status = resp
        .code
        .filter(|c| (100..=599).contains(c))
        .ok_or(UpstreamError::BadResponse)?;
    let minor = resp.version.ok_or(UpstreamError::BadResponse)?;
    out.head_len = head_len;
    out.status = status;
    out.minor = minor;
    out.reason = resp
        .reason
        .map(|r| range_of(buf, r.as_bytes()))
        .unwrap_or(0..0);
    out.headers.clear();
    let mut content_length: Option<u64> = None;
    let mut te_values: Vec<&[u8]> = Vec::new();
    let mut conn = ConnectionTokens::default();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let mut drop = is_hop_by_hop(name);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value).ok_or(UpstreamError::BadResponse)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(UpstreamError::BadResponse);
            }
            // Written by the gateway for bodies it relays; kept as sent for
            // bodiless answers (HEAD, 304), where it describes the resource.
            drop = true;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Framing toward the client is the gateway's choice.
            drop = true;
            te_values.push(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn.absorb(value);
        } else if name.eq_ignore_ascii_case(b"x-request-id") {
            // The gateway's id is the one the client sees.
            drop = true;
        }
        out.headers.push(HeaderRef {
            name: range_of(buf, name),
            value: range_of(buf, value),
            drop,
        });
    }
    conn.drop_listed(buf, &mut out.headers);
    let no_body =
        request_was_head || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        BodyKind::Empty
    } else if !te_values.is_empty() {
        if content_length.is_some() {
            // Both framings: a desync attempt or a broken server. Refuse it.
            return Err(UpstreamError::BadResponse);
        }
        match check_transfer_encoding(&te_values) {
            TeVerdict::Chunked => BodyKind::Chunked,
            TeVerdict::Bad => return Err(UpstreamError::BadResponse),
            // Codings the gateway would have to remove or re-frame (gzip,
            // identity…): refuse rather than relay a body we can't frame.
            TeVerdict::Unsupported => return Err(UpstreamError::BadResponse),
        }
    } else {
        match content_length {
            Some(0) => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
            None => BodyKind::UntilClose,
        }
    };
    out.body = Some(body);
    out.bodiless_length = if body == BodyKind::Empty {
        content_length
    } else {
        None
    };
    out.keep_alive = body != BodyKind::UntilClose
        && if minor == 1 {
            !conn.close
        } else {
            conn.keep_alive && !conn.close
        };
    Ok(true)
}

/// Incremental validator for a chunked body (RFC 9112 §7.1). It does not
/// copy: it tells the caller how many input bytes belong to the body, which
/// of them are payload, and when the body ends, so the body can be forwarded
/// as received or de-chunked.
#[derive(Debug, Clone, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    remaining: u64,
    digits: u8,
    line_bytes: usize,
    /// Payload bytes seen so far.
    pub data_total: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// Most bytes allowed in a chunk-size line's extensions, or in the trailer section.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked encoding: {0}")]
pub struct ChunkError(pub &'static str);

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scan `input`. Returns how many bytes were consumed (all belong to the
    /// body; bytes after the end are left for the next message), calling
    /// `data` with each payload range.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => {
                    if let Some(d) = hex_val(b) {
                        if self.digits >= 15 {
                            return Err(ChunkError("chunk size too large"));
                        }
                        self.remaining = (self.remaining << 4) | u64::from(d);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkError("chunk size expected"));
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = ChunkState::Ext;
                        self.line_bytes = 0;
                    } else if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else {
                        return Err(ChunkError("invalid chunk size"));
                    }
                    i += 1;
                }
                ChunkState::Ext => {
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(ChunkError("invalid chunk extension"));
                    } else {
                        self.line_bytes += 1;
                        if self.line_bytes > MAX_CHUNK_LINE {
                            return Err(ChunkError("chunk extension too long"));
                        }
                    }
                    i += 1;
                }
                ChunkState::SizeLf => {
                    expect(b, b'\n', "bare CR after chunk size")?;
                    i += 1;
                    self.digits = 0;
                    if self.remaining == 0 {
                        self.state = ChunkState::TrailerStart;
                        self.line_bytes = 0;
                    } else {
                        self.state = ChunkState::Data;
                    }
                }
                ChunkState::Data => {
                    let take = (self.remaining.min((input.len() - i) as u64)) as usize;
                    data(i..i + take);
                    self.data_total += take as u64;
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr => {
                    expect(b, b'\r', "chunk data longer than its size")?;
                    self.state = ChunkState::DataLf;
                    i += 1;
                }
                ChunkState::DataLf => {
                    expect(b, b'\n', "bare CR after chunk data")?;
                    self.state = ChunkState::Size;
                    i += 1;
                }
                ChunkState::TrailerStart => {
                    if b == b'\r' {
                        self.state = ChunkState::FinalLf;
                    } else if is_token(&[b]) {
                        self.state = ChunkState::Trailer;
                        self.line_bytes += 1;
                    } else {
                        return Err(ChunkError("invalid trailer"));
                    }
                    i += 1;
                }
                ChunkState::Trailer => {
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(ChunkError("invalid trailer"));
                    }
                    self.line_bytes += 1;
                    if self.line_bytes > MAX_CHUNK_LINE {
                        return Err(ChunkError("trailer section too long"));
                    }
                    i += 1;
                }
                ChunkState::TrailerLf => {
                    expect(b, b'\n', "bare CR in trailer")?;
                    self.state = ChunkState::TrailerStart;
                    i += 1;
                }
                ChunkState::FinalLf => {
                    expect(b, b'\n', "bare CR at end of body")?;
                    self.state = ChunkState::Done;
                    return Ok(i + 1);
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

fn expect(b: u8, want: u8, msg: &'static str) -> Result<(), ChunkError> {
    if b == want {
        Ok(())
    } else {
        Err(ChunkError(msg))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Append every header not marked `drop` as `name: value CRLF`.
pub fn write_kept_headers(buf: &[u8], headers: &[HeaderRef], out: &mut Vec<u8>) {
    for h in headers.iter().filter(|h| !h.drop) {
        out.extend_from_slice(&buf[h.name.clone()]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[h.value.clone()]);
        out.extend_from_slice(b"\r\n");
    }
}

/// Append one chunk (`len-hex CRLF data CRLF`) to `out`.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, ClientError> {
        let limits = Limits::default();
        let mut head = RequestHead::default();
        parse_request(raw, &limits, &mut head).map(|done| done.then_some(head))
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /v1/models?x=1 HTTP/1.1\r\nHost: a\r\nConnection: foo\r\nFoo: 1\r\n\r\n";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[h.target.clone()], b"/v1/models?x=1");
        assert_eq!(h.body_kind(), BodyKind::Empty);
        assert!(h.keep_alive);
        // Foo is listed in Connection: hop-by-hop.
        assert!(
            h.headers
                .iter()
                .find(|x| &raw[x.name.clone()] == b"Foo")
                .unwrap()
                .drop
        );
    }

    #[test]
    fn partial_head_needs_more() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn smuggling_vectors_are_refused() {
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nFoo: bar\r\n baz\r\n\r\n", 400),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
        ];
        for (raw, status) in cases {
            match parse(raw) {
                Err(e) => assert_eq!(e.status(), *status, "{}", String::from_utf8_lossy(raw)),
                Ok(h) => panic!("accepted {:?}: {h:?}", String::from_utf8_lossy(raw)),
            }
        }
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_header_bytes: 1024,
            max_uri_bytes: 100,
            max_headers: 4,
            ..Limits::default()
        };
        let mut h = RequestHead::default();
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(200));
        assert_eq!(
            parse_request(long_uri.as_bytes(), &limits, &mut h),
            Err(ClientError::UriTooLong)
        );
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X: y\r\n".repeat(5));
        assert_eq!(
            parse_request(many.as_bytes(), &limits, &mut h),
            Err(ClientError::TooManyHeaders)
        );
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "y".repeat(2000));
        assert_eq!(
            parse_request(big.as_bytes(), &limits, &mut h),
            Err(ClientError::HeaderTooLarge)
        );
    }

    #[test]
    fn http10_keepalive_rules() {
        let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn chunked_decoder_stops_at_end_of_body() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let mut d = ChunkedDecoder::new();
        let mut data = Vec::new();
        let n = d.feed(body, |r| data.extend_from_slice(&body[r])).unwrap();
        assert!(d.is_done());
        assert_eq!(&body[n..], b"GET / HTTP/1.1\r\n");
        assert_eq!(data, b"Wikipedia");
    }

    #[test]
    fn chunked_decoder_byte_by_byte() {
        let body = b"a\r\n0123456789\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        for i in 0..body.len() {
            assert_eq!(d.feed(&body[i..i + 1], |_| {}).unwrap(), 1);
        }
        assert!(d.is_done());
        assert_eq!(d.data_total, 10);
    }

    #[test]
    fn chunked_decoder_rejects_bad_framing() {
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"4\nWiki\r\n",
            b"4\r\nWikiX\r\n",
            b"4\r\nWiki\n0\r\n\r\n",
            b"ffffffffffffffff1\r\n",
            b"-1\r\n",
            b"0\r\nbad trailer\n\r\n",
        ] {
            let mut d = ChunkedDecoder::new();
            assert!(
                d.feed(bad, |_| {}).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn response_framing() {
        let mut r = ResponseHead::default();
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: up\r\n\r\n";
        assert!(parse_response(raw, 4096, 64, false, &mut r).unwrap());
        assert_eq!(r.body_kind(), BodyKind::Chunked);
        assert!(r.keep_alive);
        let raw = b"HTTP/1.1 200 OK\r\n\r\n";
        parse_response(raw, 4096, 64, false, &mut r).unwrap();
        assert_eq!(r.body_kind(), BodyKind::UntilClose);
        assert!(!r.keep_alive);
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_response(raw, 4096, 64, false, &mut r).is_err());
        let raw = b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n";
        parse_response(raw, 4096, 64, false, &mut r).unwrap();
        assert_eq!(r.body_kind(), BodyKind::Empty);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any bytes: the parser answers (complete, partial or a typed error), never panics,
        /// and a complete head's ranges stay inside it.
        #[test]
        fn request_parser_is_total(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut h = RequestHead::default();
            if let Ok(true) = parse_request(&raw, &Limits::default(), &mut h) {
                prop_assert!(h.head_len <= raw.len());
                for r in [&h.method, &h.target].into_iter().chain(h.headers.iter().flat_map(|x| [&x.name, &x.value])) {
                    prop_assert!(r.end <= h.head_len);
                }
            }
        }

        /// Mutations of a valid request: still never a panic, and never both
        /// framings accepted.
        #[test]
        fn mutated_requests(i in 0usize..80, b in any::<u8>()) {
            let mut raw = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc".to_vec();
            let i = i % raw.len();
            raw[i] = b;
            let mut h = RequestHead::default();
            if let Ok(true) = parse_request(&raw, &Limits::default(), &mut h) {
                // Whatever got through has exactly one framing.
                prop_assert!(matches!(h.body_kind(), BodyKind::Length(_) | BodyKind::Chunked | BodyKind::Empty));
                let te = h.headers.iter().any(|x| raw[x.name.clone()].eq_ignore_ascii_case(b"transfer-encoding"));
                let cl = h.headers.iter().any(|x| raw[x.name.clone()].eq_ignore_ascii_case(b"content-length"));
                prop_assert!(!(te && cl), "both framings accepted: {:?}", String::from_utf8_lossy(&raw));
            }
        }

        /// The chunked decoder gives the same answer however its input is split.
        #[test]
        fn chunked_split_invariance(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6), split in 1usize..17) {
            let mut body = Vec::new();
            let mut payload = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
                payload.extend_from_slice(c);
            }
            body.extend_from_slice(b"0\r\n\r\nNEXT");
            let mut d = ChunkedDecoder::new();
            let mut got = Vec::new();
            let mut used = 0;
            for piece in body.chunks(split) {
                let n = d.feed(piece, |r| got.extend_from_slice(&piece[r])).unwrap();
                used += n;
                if d.is_done() { break; }
            }
            prop_assert!(d.is_done());
            prop_assert_eq!(got, payload);
            prop_assert_eq!(&body[used..], b"NEXT");
        }

        /// Arbitrary bytes into the chunked decoder: an error or progress, never a panic or overrun.
        #[test]
        fn chunked_decoder_is_total(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut d = ChunkedDecoder::new();
            if let Ok(n) = d.feed(&raw, |r| assert!(r.end <= raw.len())) {
                prop_assert!(n <= raw.len());
            }
        }
    }

    #[test]
    fn a_reason_phrase_that_is_not_utf8_is_an_empty_range() {
        // Found by `cargo xtask fuzz http_response`.
        let raw = b"HTTP/1.1 204 No Con104 No}CouTTP\xce\xce\xd1\xce 2t-Lent\r\nContent-Length: 0\r\n\r\n";
        let mut r = ResponseHead::default();
        assert!(parse_response(raw, 16 * 1024, 64, false, &mut r).unwrap());
        assert_eq!(r.status, 204);
        assert_eq!(r.reason, 0..0);
        // And a status outside 100..=599 is no HTTP status.
        for bad in [
            &b"HTTP/1.1 009 OK\r\n\r\n"[..],
            b"HTTP/1.1 600 X\r\n\r\n",
            b"HTTP/1.1 099 X\r\n\r\n",
        ] {
            assert!(parse_response(bad, 16 * 1024, 64, false, &mut r).is_err());
        }
    }
}
