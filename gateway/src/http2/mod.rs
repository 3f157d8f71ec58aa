//! The HTTP/2 connection driver: h2c with prior knowledge on plaintext
//! listeners (`server.h2c`; the preface is detected per connection by the
//! HTTP/1.1 driver, which hands the connection over).
//!
//! Framing, HPACK and flow control are the `h2` crate's (run over monoio
//! through monoio-compat's tokio-IO wrapper), with its defences against
//! rapid reset (CVE-2023-44487), CONTINUATION floods (CVE-2024-27316 class:
//! a header list past `max_header_list_size` is refused) and unbounded
//! SETTINGS/PING acknowledgements (one pending at a time; a peer that does
//! not read stops being read). `[http2]` sets every limit; a connection
//! that breaks one gets GOAWAY and is counted
//! (`gateway_h2_goaways_total{reason}`).
//!
//! Each stream runs the same request pipeline as an HTTP/1.1 request
//! ([`crate::pipeline::run`]) through a [`Downstream`](crate::downstream::Downstream)
//! of its own ([`stream::H2Stream`]): its head as the codec parses one, its
//! DATA frames as the body, the pipeline's answer re-framed as HEADERS and
//! DATA. Streams of a connection run concurrently, each its own task.

mod stream;

pub use stream::{head_of, H2Stream};

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use monoio::net::TcpStream;
use monoio_compat::StreamWrapper;

use std::os::fd::RawFd;

use crate::io::Conn;
use crate::pipeline::{Incoming, Scratch};
use crate::worker::Worker;

/// The client preface every HTTP/2 connection opens with (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a TLS connection's streams need of its handshake.
#[derive(Debug, Default)]
pub struct TlsFacts {
    /// The client certificate the handshake verified (DER leaf).
    pub client_cert: Option<Vec<u8>>,
    /// The TLS version, as the access log names it.
    pub version: &'static str,
}

/// Serve an h2c connection whose first bytes (`read`, at least the start
/// of the preface) were already read off `tcp`.
pub async fn serve_h2c(tcp: TcpStream, read: Vec<u8>, peer: SocketAddr, w: Rc<Worker>) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let io = Prefixed {
        read: Bytes::from(read),
        inner: StreamWrapper::new(tcp),
    };
    serve(io, peer, fd, None, w).await;
}

/// Serve a TLS connection whose client chose `h2` by ALPN.
pub async fn serve_tls(conn: Conn, peer: SocketAddr, w: Rc<Worker>) {
    let fd = conn.raw_fd();
    let facts = TlsFacts {
        client_cert: conn
            .tls_session()
            .and_then(|t| t.peer_certificates())
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec()),
        version: match conn.tls_session().and_then(|t| t.protocol_version()) {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "other",
        },
    };
    let send = w.current().shared.timeouts.send;
    serve(
        StreamWrapper::new(crate::io::TlsStreamIo { conn, send }),
        peer,
        fd,
        Some(Rc::new(facts)),
        w,
    )
    .await;
}

async fn serve<IO>(io: IO, peer: SocketAddr, fd: RawFd, tls: Option<Rc<TlsFacts>>, w: Rc<Worker>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let cur = w.current();
    let s = &cur.shared.http2;
    let m = &cur.shared.metrics;
    let handshake = builder(s).handshake::<_, Bytes>(io);
    let mut conn = match monoio::time::timeout(cur.shared.timeouts.client_header, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            m.h2_connections
                .with_label_values(&["handshake_failed"])
                .inc();
            tracing::debug!(client = %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            m.h2_connections
                .with_label_values(&["handshake_timeout"])
                .inc();
            return;
        }
    };
    m.h2_connections.with_label_values(&["accepted"]).inc();
    let idle = s.idle_timeout;
    let open = Rc::new(std::cell::Cell::new(0usize));
    let mut idle_since = std::time::Instant::now();
    let mut goaway_sent = false;
    loop {
        // Polling `accept` drives the whole connection (every stream's
        // frames), so this loop runs for as long as the connection lives;
        // it looks up every half second for idleness and a drain.
        let next = monoio::time::timeout(Duration::from_millis(500), conn.accept()).await;
        match next {
            Err(_) => {
                if open.get() > 0 {
                    idle_since = std::time::Instant::now();
                }
                if w.draining.get() && !goaway_sent {
                    // In-flight streams finish; no new ones.
                    conn.graceful_shutdown();
                    goaway_sent = true;
                }
                if open.get() == 0 && idle_since.elapsed() >= idle && !goaway_sent {
                    conn.graceful_shutdown();
                    goaway_sent = true;
                    m.h2_goaways.with_label_values(&["idle"]).inc();
                }
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                let reason = goaway_reason(&e);
                m.h2_goaways.with_label_values(&[reason]).inc();
                tracing::info!(client = %peer, reason, error = %e, "HTTP/2 connection closed on a protocol violation");
                return;
            }
            Ok(Some(Ok((req, respond)))) => {
                if w.draining.get() {
                    conn.graceful_shutdown();
                }
                // A client can't have more than max_concurrent_streams open:
                // more requests still being worked on means it resets streams
                // while they run (rapid reset, CVE-2023-44487).
                if open.get() >= 2 * s.max_concurrent_streams as usize {
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    m.h2_goaways.with_label_values(&["rapid_reset"]).inc();
                    tracing::warn!(client = %peer, open = open.get(), "HTTP/2 rapid reset: connection closed with GOAWAY");
                    let _ = monoio::time::timeout(
                        Duration::from_secs(1),
                        poll_fn(|cx| conn.poll_closed(cx)),
                    )
                    .await;
                    return;
                }
                m.h2_streams.inc();
                open.set(open.get() + 1);
                let (w2, open2, tls2) = (w.clone(), open.clone(), tls.clone());
                monoio::spawn(async move {
                    // A bug costs one stream, not the worker.
                    let served =
                        crate::task::CatchUnwind(stream::serve(req, respond, peer, fd, tls2, &w2));
                    if served.await.is_err() {
                        w2.metrics_registry.connection_panics.inc();
                        tracing::error!(client = %peer, "HTTP/2 stream task panicked; stream dropped");
                    }
                    open2.set(open2.get() - 1);
                });
            }
        }
    }
}

/// The server side of a client connection with `[http2]`'s limits (the
/// fuzz target `h2_frames` drives the same one).
pub fn builder(s: &crate::config::Http2Settings) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(s.max_concurrent_streams)
        .max_header_list_size(s.max_header_list_size)
        .header_table_size(s.header_table_size)
        .initial_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_send_buffer_size(s.max_send_buffer)
        .max_pending_accept_reset_streams(s.max_pending_resets)
        .max_local_error_reset_streams(Some(s.max_error_resets));
    b
}

/// What a connection error is counted as: the GOAWAY reason the gateway
/// sent (or that the client did).
fn goaway_reason(e: &h2::Error) -> &'static str {
    match e.reason() {
        Some(h2::Reason::ENHANCE_YOUR_CALM) => "enhance_your_calm",
        Some(h2::Reason::PROTOCOL_ERROR) => "protocol_error",
        Some(h2::Reason::FLOW_CONTROL_ERROR) => "flow_control_error",
        Some(h2::Reason::FRAME_SIZE_ERROR) => "frame_size_error",
        Some(h2::Reason::COMPRESSION_ERROR) => "compression_error",
        Some(h2::Reason::NO_ERROR) => "no_error",
        Some(_) => "other",
        None if e.is_io() => "io",
        None => "other",
    }
}

/// The connection's bytes: those already read (the preface, when the
/// HTTP/1.1 driver looked at it), then the socket's.
struct Prefixed {
    read: Bytes,
    inner: StreamWrapper<TcpStream>,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let part = self.read.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Buffers reused by one stream.
fn scratch() -> Scratch {
    Scratch::default()
}

/// The request as the pipeline's stages see it: HTTP/2 on the access log.
fn incoming(peer: SocketAddr, tls: Option<&TlsFacts>) -> Incoming {
    let mut rq = Incoming::new(peer);
    rq.protocol = if tls.is_some() { "h2" } else { "h2c" };
    rq.tls = tls.map(|t| t.version);
    rq
}
