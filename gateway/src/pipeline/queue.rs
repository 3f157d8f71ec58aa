//! Stage 4e, queue: flow control for a pool whose backends are all
//! saturated (`[clusters.X.queue]`; the queue itself: `balance/queue.rs`).
//! Returns `None` (go on: no queue, or room and nobody waiting), a
//! [`Grant`] (waited, dispatched), or a refusal: 429 queue full, 503
//! waited past `max_wait` (both with `Retry-After`), or the client gone.

use std::time::Instant;

use crate::balance::queue::{Full, Grant, TICK};
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError};
use crate::ratelimit::Admission;
use crate::validate::{Admitted, Verdict};

use super::{Call, Refusal};

/// The header a client may lower its own band with, where the cluster's
/// queue allows it (`client_priority`).
const PRIORITY_HEADER: &[u8] = b"x-gateway-priority";

pub(super) async fn wait<D: Downstream>(
    d: &D,
    c: &Call<'_>,
    verdict: &Verdict,
    admission: &Option<Admission>,
    cluster: usize,
) -> Result<Option<Grant>, Refusal> {
    let cl = &c.cur.shared.clusters[cluster];
    let Some((q, settings)) = cl.queue.as_ref() else {
        return Ok(None);
    };
    if q.open(&cl.loads, &cl.balance) {
        return Ok(None);
    }
    let band = band(d, c, verdict, settings.client_priority);
    let flow = match (settings.fairness, c.identity) {
        (crate::config::Fairness::None, _) | (_, None) => "",
        (crate::config::Fairness::Tenant, Some(i)) if !i.tenant.is_empty() => i.tenant.as_str(),
        (_, Some(i)) => i.principal.as_str(),
    };
    // Fair shares in tokens: what the rate-limit stage charged, else the
    // prompt and output budget validation found.
    let cost = admission
        .as_ref()
        .map_or(0, |a| a.tokens)
        .max(verdict.facts.prompt_tokens + verdict.facts.max_tokens.unwrap_or(0));
    let bytes = match &verdict.admitted {
        Admitted::Buffered(b) => (b.head.len() + b.body.len()) as u64,
        _ => d.pending().len() as u64,
    };
    let m = &c.cur.shared.metrics;
    let band_label = band.to_string();
    let labels = [cl.name.as_str(), band_label.as_str()];
    let ticket = match q.enqueue(band, flow, cost, bytes) {
        Ok(t) => t,
        Err(full) => {
            let reason = match full {
                Full::Requests => "full",
                Full::Bytes => "bytes",
            };
            m.queue_refused.with_label_values(&[&cl.name, reason]).inc();
            tracing::info!(request_id = c.rq.id.as_str(), cluster = %cl.name, band, reason, "queue full: refused");
            return Err(refusal(429, q.retry_after()).after_validation(&verdict.admitted));
        }
    };
    let depth = m.queue_depth.with_label_values(&labels);
    depth.inc();
    let deadline = ticket.enqueued + settings.max_wait;
    let watch = d.closed_watch();
    let outcome = loop {
        if ticket.granted() {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err("timeout");
        }
        if monoio::time::timeout(left.min(TICK), ticket.wait())
            .await
            .is_ok()
        {
            break Ok(());
        }
        if crate::io::peer_closed(watch) {
            break Err("disconnected");
        }
        q.pump_if_idle();
    };
    depth.dec();
    let waited = ticket.enqueued.elapsed();
    m.queue_wait
        .with_label_values(&labels)
        .observe(waited.as_secs_f64());
    let reason = match outcome {
        // Granted, or too late to leave: the grant is ours either way.
        Ok(()) => None,
        Err(reason) if !q.leave(&ticket) => {
            let _ = reason;
            None
        }
        Err(reason) => Some(reason),
    };
    let Some(reason) = reason else {
        m.queue_dispatched.with_label_values(&labels).inc();
        return Ok(Some(Grant::new(q.clone())));
    };
    m.queue_refused.with_label_values(&[&cl.name, reason]).inc();
    tracing::info!(request_id = c.rq.id.as_str(), cluster = %cl.name, band, reason,
        waited_ms = waited.as_millis() as u64, "left the queue undispatched");
    Err(if reason == "disconnected" {
        Refusal::decision(ProxyError::Client(ClientError::ClientClosed))
    } else {
        refusal(503, q.retry_after())
    }
    .after_validation(&verdict.admitted))
}

/// The request's band: its route's priority, else its tenant class's;
/// lowered (never raised) by `x-gateway-priority` where allowed.
fn band<D: Downstream>(d: &D, c: &Call<'_>, verdict: &Verdict, client: bool) -> i32 {
    let tenant = c.identity.map_or("", |i| i.tenant.as_str());
    let band = c.cur.shared.bands.band(c.route.priority, tenant);
    if !client {
        return band;
    }
    let buf = match &verdict.admitted {
        Admitted::Buffered(b) => b.head.as_slice(),
        _ => d.pending(),
    };
    let asked =
        c.rq.head
            .headers
            .iter()
            .find(|h| buf[h.name.clone()].eq_ignore_ascii_case(PRIORITY_HEADER))
            .and_then(|h| std::str::from_utf8(&buf[h.value.clone()]).ok())
            .and_then(|v| v.trim().parse::<i32>().ok());
    asked.map_or(band, |a| c.cur.shared.bands.lowered(band, a))
}

/// 429 (queue full) or 503 (waited too long), with `Retry-After`.
fn refusal(status: u16, retry_after: u64) -> Refusal {
    let (error_type, code, message) = if status == 429 {
        (
            "rate_limit_exceeded",
            "queue_full",
            "every backend is busy and the queue for them is full; retry later",
        )
    } else {
        (
            "service_unavailable",
            "queue_timeout",
            "every backend stayed busy for as long as a request may wait; retry later",
        )
    };
    Refusal::policy(status, error_type, code, message, retry_after)
}
