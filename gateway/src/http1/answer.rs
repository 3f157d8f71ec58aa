//! The gateway's own HTTP/1.1 answers — a refusal in the JSON error shape,
//! the model list — and what becomes of the connection after them.

use std::io::Write as _;
use std::time::{Duration, Instant};

use crate::codec::BodyKind;
use crate::io::Conn;
use crate::pipeline::{Incoming, Refusal, Scratch};
use crate::worker::{Current, Worker};

/// What the connection does after a request.
pub(super) enum After {
    /// Read the next request.
    Next,
    /// Close now (nothing was answered, or the answer went out cleanly).
    Close,
    /// Close after an error answer, lingering so it is not lost to an RST.
    Linger,
}

impl After {
    pub(super) fn from_keep_alive(keep_alive: bool) -> After {
        if keep_alive {
            After::Next
        } else {
            After::Close
        }
    }
}

/// Count, log and answer a refusal (only the head for HEAD requests: a body
/// there would be read as the next response), then say whether the
/// connection can carry another request: only when the refused request's
/// bytes are all off it and its framing can be trusted.
pub(super) async fn refuse(
    client: &mut Conn,
    r: &Refusal,
    rq: &Incoming,
    w: &Worker,
    cur: &Current,
    s: &mut Scratch,
    head_only: bool,
) -> After {
    r.record(rq, w, cur);
    if r.client_gone {
        return After::Close;
    }
    let head = &rq.head;
    if !r.must_close && !r.head_consumed {
        client.consume(head.head_len);
    }
    let body_done = r.body_read || head.body_kind() == BodyKind::Empty;
    let keep = !r.must_close && head.keep_alive && body_done && !w.draining.get();
    s.out.clear();
    r.body(&s.limit_headers).write(&rq.id, !keep, &mut s.out);
    if head_only {
        truncate_to_head(&mut s.out);
    }
    let (_, o) = client
        .write_all(std::mem::take(&mut s.out), cur.shared.timeouts.send)
        .await;
    s.out = o;
    if keep {
        After::Next
    } else {
        After::Linger
    }
}

/// Answer a request the gateway serves itself: 200 with a JSON body.
pub(super) async fn own(
    client: &mut Conn,
    rq: &Incoming,
    w: &Worker,
    cur: &Current,
    body: &[u8],
    s: &mut Scratch,
) -> After {
    let head = &rq.head;
    client.consume(head.head_len);
    let keep = head.keep_alive && head.body_kind() == BodyKind::Empty && !w.draining.get();
    s.out.clear();
    let _ = write!(
        s.out,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\n{}\r\n",
        body.len(),
        rq.id,
        if keep { "" } else { "connection: close\r\n" }
    );
    if !head.is_head {
        s.out.extend_from_slice(body);
    }
    let (_, o) = client
        .write_all(std::mem::take(&mut s.out), cur.shared.timeouts.send)
        .await;
    s.out = o;
    After::from_keep_alive(keep)
}

/// Keep only the head of a response in `out` (answers to HEAD).
fn truncate_to_head(out: &mut Vec<u8>) {
    if let Some(end) = memchr::memmem::find(out, b"\r\n\r\n") {
        out.truncate(end + 4);
    }
}

/// Close after an error without destroying the answer: a close with unread
/// request bytes makes the kernel send RST, which can discard the response
/// before the client reads it. Half-close, drain briefly, then close.
pub(super) async fn linger_close(client: &mut Conn) {
    // SAFETY: shutdown(2) on the connection's own open fd.
    unsafe {
        libc::shutdown(client.raw_fd(), libc::SHUT_WR);
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0usize;
    while drained < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let n = client.pending().len();
        client.consume(n);
        drained += n;
        match client.fill_timeout(left).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// How long, and how much, `linger_close` reads before closing anyway.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_MAX_BYTES: usize = 1 << 20;
