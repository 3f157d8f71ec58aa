//! The contract between a protocol driver and the request pipeline: what the
//! pipeline reads of one request, and where it writes the answer.
//!
//! A driver (HTTP/1.1 today: `http1/`) owns the client connection:
//! it reads and parses request heads, decides keep-alive and writes the
//! gateway's own answers. For the stages that need the request's bytes
//! (validation reads a JSON body, the upstream stage streams a body to the
//! backend and the response back), it hands the pipeline one
//! [`Downstream`]: the bytes of the request as they arrive, and a sink for
//! the response. The pipeline is generic over it (monomorphised: no dynamic
//! dispatch per request), so an HTTP/2 stream driver plugs in by
//! implementing this trait for a stream: its DATA frames as `pending`/`fill`,
//! its response written through `write_all`.
//!
//! What the pipeline writes through `write_all` is an HTTP/1.1 response
//! (status line, headers, framed body): the message form the backend spoke,
//! relayed with the fewest copies. A driver for another protocol re-frames
//! it (h2: HEADERS from the head, DATA from the body).

use std::os::fd::RawFd;
use std::time::Duration;

use crate::io::{Conn, ReadError, WriteError};

/// One request's client side, as the pipeline sees it.
#[expect(
    async_fn_in_trait,
    reason = "thread-per-core: every future stays on its worker thread, so no Send bound is wanted"
)]
pub trait Downstream {
    /// Request bytes received and not consumed yet (the head first, then body).
    fn pending(&self) -> &[u8];
    /// Drop the first `n` pending bytes.
    fn consume(&mut self, n: usize);
    /// No room to receive more before something is consumed.
    fn is_full(&self) -> bool;
    /// Receive more request bytes within `d`; `Ok(0)` is the end of the stream.
    async fn fill_timeout(&mut self, d: Duration) -> Result<usize, ReadError>;
    /// Send the first `n` pending bytes to a backend connection and consume them.
    async fn forward(&mut self, n: usize, dst: &mut Conn, d: Duration) -> Result<(), WriteError>;
    /// Write response bytes within `d`; the buffer comes back for reuse.
    async fn write_all(&mut self, out: Vec<u8>, d: Duration) -> (Result<(), WriteError>, Vec<u8>);
    /// A descriptor whose hang-up means the client is gone (watched while a
    /// backend works on the request: a client that left must not keep a GPU busy).
    fn closed_watch(&self) -> RawFd;
    /// The request came over TLS.
    fn tls(&self) -> bool;
    /// The client certificate the TLS handshake verified (DER), if any.
    fn client_certificate(&self) -> Option<&[u8]>;
    /// An HTTP/2 stream's own frames, for protocols relayed frame by frame
    /// (gRPC); `None` for HTTP/1.1.
    fn frames(&mut self) -> Option<&mut dyn Frames> {
        None
    }
}

/// An HTTP/2 stream as a protocol relayed frame by frame (gRPC) needs it:
/// the request as sent, its DATA and trailers, and the answer's HEADERS,
/// DATA and trailers, without re-framing.
pub trait Frames {
    /// The request as the client sent it (pseudo-headers and headers).
    fn parts(&self) -> &http::request::Parts;
    /// The request body's frames (once).
    fn take_body(&mut self) -> Option<h2::RecvStream>;
    /// Answer with `resp` (HEADERS; `end`: nothing follows): the stream for
    /// its DATA and trailers, `None` when it ended.
    fn respond(
        &mut self,
        resp: http::Response<()>,
        end: bool,
    ) -> Result<Option<h2::SendStream<bytes::Bytes>>, h2::Error>;
    /// The answer went out whole.
    fn done(&mut self);
    /// The answer broke off after it started: the client must not take it as whole.
    fn reset(&mut self);
}

impl Downstream for Conn {
    #[inline]
    fn pending(&self) -> &[u8] {
        Conn::pending(self)
    }

    #[inline]
    fn consume(&mut self, n: usize) {
        Conn::consume(self, n)
    }

    fn is_full(&self) -> bool {
        Conn::is_full(self)
    }

    async fn fill_timeout(&mut self, d: Duration) -> Result<usize, ReadError> {
        Conn::fill_timeout(self, d).await
    }

    async fn forward(&mut self, n: usize, dst: &mut Conn, d: Duration) -> Result<(), WriteError> {
        Conn::forward(self, n, dst, d).await
    }

    async fn write_all(&mut self, out: Vec<u8>, d: Duration) -> (Result<(), WriteError>, Vec<u8>) {
        Conn::write_all(self, out, d).await
    }

    fn closed_watch(&self) -> RawFd {
        self.raw_fd()
    }

    fn tls(&self) -> bool {
        Conn::tls_session(self).is_some()
    }

    fn client_certificate(&self) -> Option<&[u8]> {
        Conn::tls_session(self)
            .and_then(|t| t.peer_certificates())
            .and_then(|c| c.first())
            .map(|c| c.as_ref())
    }
}
