//! Reading one request head off an HTTP/1.1 connection, within the idle
//! and header timeouts.

use std::time::{Duration, Instant};

use crate::codec::{self, RequestHead};
use crate::error::ClientError;
use crate::io::{Conn, ReadError};
use crate::worker::Worker;

/// What reading the next request produced.
pub(super) enum Next {
    Request,
    /// The client closed, went idle too long, or the worker is draining: close quietly.
    Close,
    /// Answer with this error, then close.
    Reject(ClientError),
}

/// Read until one complete request head is buffered. The first byte of a
/// request must come within the idle timeout (the header timeout for a new
/// connection); the rest of the head within the header timeout.
pub(super) async fn read(
    client: &mut Conn,
    head: &mut RequestHead,
    w: &Worker,
    conn_id: u64,
    first: bool,
) -> Next {
    let cur = w.current();
    let limits = &cur.shared.limits;
    let t = &cur.shared.timeouts;
    let mut head_deadline: Option<Instant> = None;
    // A new connection's first request counts from the accept: at
    // max_connections it gets the grace a slow head gets, not an idle one's.
    let accepted = first.then(Instant::now);
    loop {
        if !client.pending().is_empty() {
            match codec::parse_request(client.pending(), limits, head) {
                Ok(true) => return Next::Request,
                Ok(false) => {}
                Err(e) => return Next::Reject(e),
            }
            head_deadline.get_or_insert_with(|| Instant::now() + t.client_header);
        }
        let wait = match head_deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None if first => t.client_header,
            None => t.client_idle,
        };
        let idle = client.pending().is_empty();
        if idle && w.draining.get() {
            return Next::Close;
        }
        // Reclaimable at max_connections: at once when idle between
        // requests, once slow when a head is on its way.
        match (head_deadline, accepted) {
            (Some(d), _) => {
                w.mark_reading_head(conn_id, client.raw_fd(), d - t.client_header, true)
            }
            (None, Some(at)) => w.mark_reading_head(conn_id, client.raw_fd(), at, false),
            (None, None) => w.mark_idle(conn_id, client.raw_fd()),
        }
        let r = client
            .fill_timeout(wait.max(Duration::from_millis(1)))
            .await;
        w.mark_busy(conn_id);
        match r {
            // Closed, idle or mid-head: nobody to answer.
            Ok(0) => return Next::Close,
            Ok(_) => {}
            Err(ReadError::Timeout) if idle => return Next::Close,
            Err(ReadError::Timeout) => return Next::Reject(ClientError::HeaderTimeout),
            Err(ReadError::Io(_)) | Err(ReadError::WatchedClosed) => return Next::Close,
        }
    }
}
