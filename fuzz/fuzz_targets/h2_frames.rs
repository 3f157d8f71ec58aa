//! HTTP/2 frames from a client: any bytes after the preface, read in
//! chunks of any size, go through the server side the gateway runs (the
//! `h2` crate with `[http2]`'s default limits, `gateway::http2::builder`).
//! Every request it accepts becomes the HTTP/1.1 head the pipeline parses
//! (`head_of`); that head must read back, through the strict HTTP/1.1
//! parser, as exactly that request — same method, target, header count and
//! body framing, ending where it ends (no desync across the translation) —
//! or be refused with a typed error. What the server writes back stays
//! bounded by what it read (no amplification: SETTINGS/PING floods).
#![no_main]
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use gateway::codec::{parse_request, BodyKind, RequestHead};

/// The client side: the preface, then the fuzz input, `chunk` bytes a read;
/// then end of stream. What the server writes is counted.
struct Wire {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    written: Rc<Cell<usize>>,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (self.input.len() - self.pos)
            .min(self.chunk)
            .min(buf.remaining());
        let at = self.pos;
        buf.put_slice(&self.input[at..at + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.written.set(self.written.get() + buf.len());
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The head the pipeline would get for `parts` reads back as that request.
fn check_head(parts: &http::request::Parts, end_stream: bool) {
    let head = gateway::http2::head_of(parts, end_stream);
    let limits = gateway::config::Limits::default();
    let mut h = RequestHead::default();
    match parse_request(&head, &limits, &mut h) {
        // Refused (a method or target HTTP/1.1 doesn't allow, too many
        // headers, a conflicting length...): the stream gets a typed 4xx.
        Err(_) => {}
        Ok(false) => panic!(
            "complete head read as incomplete: {:?}",
            String::from_utf8_lossy(&head)
        ),
        Ok(true) => {
            assert_eq!(
                h.head_len,
                head.len(),
                "head ends early: {:?}",
                String::from_utf8_lossy(&head)
            );
            assert_eq!(&head[h.method.clone()], parts.method.as_str().as_bytes());
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            assert_eq!(&head[h.target.clone()], target.as_bytes());
            let host = usize::from(parts.uri.authority().is_some());
            let own = parts.headers.len()
                - usize::from(host == 1 && parts.headers.contains_key(http::header::HOST))
                + host
                + usize::from(!parts.headers.contains_key(http::header::CONTENT_LENGTH));
            assert_eq!(
                h.headers.len(),
                own,
                "header count: {:?}",
                String::from_utf8_lossy(&head)
            );
            let want = match parts.headers.get(http::header::CONTENT_LENGTH) {
                Some(v) => v.to_str().ok().and_then(|v| v.parse::<u64>().ok()),
                None if end_stream => Some(0),
                None => None,
            };
            match (h.body_kind(), want) {
                (BodyKind::Length(n), Some(w)) => assert_eq!(n, w),
                (BodyKind::Empty, Some(0)) => {}
                (BodyKind::Chunked, None) => {}
                (k, w) => panic!(
                    "framing {k:?}, expected {w:?}: {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, frames)) = data.split_first() else {
        return;
    };
    let mut input = gateway::http2::PREFACE.to_vec();
    input.extend_from_slice(frames);
    let written = Rc::new(Cell::new(0));
    let read_total = input.len();
    let wire = Wire {
        input,
        pos: 0,
        chunk: usize::from(c) + 1,
        written: written.clone(),
    };
    let settings = gateway::config::Http2Settings::default();
    let mut cx = Context::from_waker(Waker::noop());
    let mut handshake = Box::pin(gateway::http2::builder(&settings).handshake::<_, Bytes>(wire));
    let mut conn = loop {
        match handshake.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(c)) => break c,
            Poll::Ready(Err(_)) => return,
            // The wire never waits: a pending handshake is stuck on nothing.
            Poll::Pending => return,
        }
    };
    let mut idle = 0;
    loop {
        match conn.poll_accept(&mut cx) {
            Poll::Ready(Some(Ok(req))) => {
                idle = 0;
                let (req, mut respond) = req;
                let (parts, body) = req.into_parts();
                check_head(&parts, body.is_end_stream());
                let _ = respond.send_response(http::Response::new(()), true);
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => break,
            Poll::Pending => {
                // Pending with input left can't last: every read is ready.
                idle += 1;
                if idle > 64 {
                    break;
                }
            }
        }
    }
    let _ = conn.poll_closed(&mut cx);
    drop(conn);
    // Our SETTINGS and window update, then at most a frame of about the
    // size of each frame read (a PING ack, a RST_STREAM, a response HEADERS).
    assert!(
        written.get() <= 3 * read_total + 4096,
        "wrote {} bytes for {read_total} read",
        written.get()
    );
});
