//! Shadow traffic: a copy of a buffered request to a backend of another
//! pool, answered by nobody.

use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use super::send::build_upstream_head;
use super::{InFlight, Request};
use crate::worker::{Current, Worker};

/// Shadow traffic: send a copy of a buffered request to a backend of
/// `cluster` on its own connection, read and discard the answer, record its
/// status and latency. Runs as a detached task on this worker: the client's
/// exchange never waits on it and never sees it.
pub fn spawn_shadow(
    w: &std::rc::Rc<Worker>,
    cur: &std::rc::Rc<Current>,
    req: &Request<'_>,
    cluster: usize,
    model: &str,
    timeout: Duration,
) {
    let Some(b) = req.buffered else { return };
    let cl = &cur.shared.clusters[cluster];
    let Ok(backend) = crate::balance::pick(
        &cl.balance,
        &cl.loads,
        0,
        req.model,
        req.size,
        None,
        cur.cursor(cluster),
        &w.rng,
    ) else {
        cur.shared
            .metrics
            .shadow
            .with_label_values(&[model, &cl.name, "no_backend"])
            .inc();
        return;
    };
    let addr = cl.backends[backend];
    let mut out = Vec::with_capacity(b.head.len() + b.body.len() + 256);
    build_upstream_head(
        &b.head,
        req,
        cur.shared.trust_forwarded,
        addr,
        Some(b.body.len() as u64),
        cur.shared
            .authn
            .as_ref()
            .map(|_| &cur.shared.authn_settings),
        &mut out,
    );
    // The backend closes after answering: the copy is read to EOF.
    if out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
        out.extend_from_slice(b"connection: close\r\n\r\n");
    }
    out.extend_from_slice(&b.body);
    let load = cl.loads[backend].clone();
    load.inflight
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let guard = InFlight {
        load,
        stream: false,
        concurrency: 1,
        backend,
        uncached: 0,
        queue: None,
    };
    let metrics = cur.shared.metrics.clone();
    let (model, cluster_name) = (model.to_string(), cl.name.clone());
    let connect_timeout = req.route.connect_timeout;
    let inflight = w.shadows.clone();
    inflight.set(inflight.get() + 1);
    monoio::spawn(async move {
        let started = Instant::now();
        let result = monoio::time::timeout(timeout, async {
            let s = monoio::time::timeout(connect_timeout, TcpStream::connect_addr(addr))
                .await
                .map_err(|_| "connect_timeout")?
                .map_err(|_| "connect_error")?;
            use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
            let mut s = s;
            let (r, _) = s.write_all(out).await;
            r.map_err(|_| "send_error")?;
            let mut status = 0u16;
            let mut first = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let (r, b) = s.read(buf).await;
                buf = b;
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        if status == 0 && first.len() < 32 {
                            first.extend_from_slice(&buf[..n.min(32)]);
                            status = std::str::from_utf8(&first)
                                .ok()
                                .and_then(|t| t.split_whitespace().nth(1))
                                .and_then(|c| c.parse().ok())
                                .unwrap_or(0);
                        }
                    }
                    Err(_) => return Err("read_error"),
                }
            }
            Ok::<u16, &'static str>(status)
        })
        .await;
        let label = match result {
            Ok(Ok(s)) if s > 0 => crate::metrics::status_label(s),
            Ok(Ok(_)) => "bad_response",
            Ok(Err(e)) => e,
            Err(_) => "timeout",
        };
        metrics
            .shadow
            .with_label_values(&[&model, &cluster_name, label])
            .inc();
        metrics
            .shadow_duration
            .with_label_values(&[&cluster_name])
            .observe(started.elapsed().as_secs_f64());
        drop(guard);
        inflight.set(inflight.get() - 1);
    });
}
