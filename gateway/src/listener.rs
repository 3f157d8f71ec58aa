//! Stage 1 — listener: each worker binds its own `SO_REUSEPORT` socket per
//! address (the kernel spreads connections across workers) and accepts until
//! a drain starts. At the per-worker connection limit it stops accepting,
//! which leaves new connections in the kernel backlog (back-pressure, not
//! errors).

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::net::{ListenerOpts, TcpListener};

use crate::http1;
use crate::worker::Worker;

pub fn bind(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(backlog);
    TcpListener::bind_with_config(addr, &opts)
}

/// Accept connections until the worker drains; `tls`: the address of a TLS
/// listener (its client-authentication policy depends on it).
/// At max_connections with nothing reclaimable: look again this often.
const SHED_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Close reclaimable connections (see `Worker::shed`), a batch at a time;
/// counted, and logged at most every 10 s per worker.
fn shed(w: &Worker) -> usize {
    let cur = w.current();
    let batch = (cur.shared.max_conns_per_worker / 16).max(1);
    let (idle, slow) = w.shed(batch, cur.shared.timeouts.client_header_overload);
    let m = &w.metrics_registry.connections_shed;
    if idle > 0 {
        m.with_label_values(&["idle"]).inc_by(idle as u64);
    }
    if slow > 0 {
        m.with_label_values(&["slow_head"]).inc_by(slow as u64);
    }
    if idle + slow > 0
        && w.shed_logged
            .get()
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10))
    {
        w.shed_logged.set(Some(std::time::Instant::now()));
        tracing::warn!(worker = w.id, idle, slow_head = slow, "at max_connections: closed idle keep-alive and slow request-head connections to make room");
    }
    idle + slow
}

pub async fn accept_loop(listener: TcpListener, w: Rc<Worker>, tls: Option<SocketAddr>) {
    loop {
        if w.draining.get() {
            return;
        }
        // At max_connections: make room by closing idle keep-alive and slow
        // request-head connections; else (every connection busy) back-pressure:
        // wait for one to close.
        while w.active.get() >= w.current().shared.max_conns_per_worker && !w.draining.get() {
            let l = w.wake.listen();
            if w.active.get() < w.current().shared.max_conns_per_worker || w.draining.get() {
                break;
            }
            if shed(&w) == 0 {
                // Nothing to reclaim yet: a head may turn slow meanwhile.
                monoio::select! {
                    _ = l => {}
                    _ = monoio::time::sleep(SHED_RECHECK) => {}
                }
            } else {
                l.await;
            }
        }
        if w.draining.get() {
            return;
        }
        let drained = w.drain.listen();
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = drained => None,
        };
        match accepted {
            None => continue,
            Some(Ok((stream, peer))) => {
                // Stage 0 in userspace: blocked addresses that got past (or
                // around) XDP are closed here, before a byte is read.
                if w.current().shared.front_door.refuses(peer.ip()) {
                    tracing::debug!(worker = w.id, client = %peer, "connection from a blocked address closed at accept");
                    drop(stream);
                    continue;
                }
                w.metrics.connections_accepted.inc();
                w.active.set(w.active.get() + 1);
                w.metrics.active_connections.inc();
                let w2 = w.clone();
                monoio::spawn(async move {
                    // A bug must cost one connection, not the worker and all of its connections.
                    if crate::task::CatchUnwind(http1::serve_connection(
                        stream,
                        peer,
                        w2.clone(),
                        tls,
                    ))
                    .await
                    .is_err()
                    {
                        w2.metrics_registry.connection_panics.inc();
                        tracing::error!(worker = w2.id, client = %peer, "connection task panicked; connection dropped");
                    }
                    w2.active.set(w2.active.get() - 1);
                    w2.metrics.active_connections.dec();
                    w2.wake.notify(usize::MAX);
                });
            }
            Some(Err(e)) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(worker = w.id, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
