//! After admission: the balance stage's choice of pool, the upstream
//! request, shadow copies, the cost settled against what the backend
//! reported, and the request's one access-log event and metrics.

use std::borrow::Cow;

use crate::error::{ClientError, ProxyError};
use crate::metrics::status_label;
use crate::ratelimit::Admission;
use crate::upstream::{Exchange, Request};
use crate::validate::{Admitted, Verdict};

use super::{Call, Record, Refusal, Served};

/// The gateway's own answer (the model list, filtered by authz when it ran),
/// counted and logged.
pub(super) fn answer(c: &Call<'_>, list: Vec<u8>, admission: Option<Admission>) -> Served {
    let (rq, route) = (c.rq, c.route.name.as_str());
    c.w.metrics
        .inc(&c.w.metrics.requests, &[route, "200", rq.protocol], 1);
    if c.cur.shared.access_log {
        tracing::info!(target: "access", request_id = rq.id.as_str(), method = rq.method.as_str(), path = rq.path.as_str(),
            client = %rq.peer.ip(), route, status = 200u16, "answered by the gateway");
    }
    Served::Answer {
        body: list,
        admission: admission.map(Box::new),
    }
}

/// Stage 4d, balance (the pool): the model's pool (`[[models]] cluster`,
/// version pools, canary splits; sticky by principal, else by address),
/// else the route's cluster. The backend within it is picked at checkout.
pub(super) fn balance(c: &Call<'_>, verdict: &Verdict) -> usize {
    let Some((m, v)) = verdict.model.as_ref() else {
        return c.route.cluster;
    };
    let Some(pools) = c.cur.shared.model_pools.get(m) else {
        return c.route.cluster;
    };
    // Sticky by principal (no copy), else by address.
    let key: Cow<'_, str> = match c.identity {
        _ if !pools.sticky => "".into(),
        Some(i) if !i.principal.is_empty() => i.principal.as_str().into(),
        _ => c.rq.peer.ip().to_string().into(),
    };
    let Some(cluster) = pools.cluster(v, verdict.facts.pinned, &key, &c.w.rng) else {
        return c.route.cluster;
    };
    if pools.total > 0 {
        let labels = [m.as_str(), c.cur.shared.clusters[cluster].name.as_str()];
        c.w.metrics.inc(&c.w.metrics.balance_split, &labels, 1);
    }
    cluster
}

/// A streamed chat/completions request that didn't ask for its usage is
/// sent asking (`[ratelimit.cost] stream_usage`): its buffered body gets
/// `stream_options.include_usage`. `true`: the client didn't ask, so the
/// usage-only event is removed from what it gets.
pub(super) fn ask_stream_usage(c: &Call<'_>, verdict: &mut Verdict) -> bool {
    use crate::validate::openai::{ask_stream_usage, StreamUsage};
    let how = verdict.facts.stream_usage;
    if !matches!(how, StreamUsage::NoOptions | StreamUsage::NotAsked)
        || !openai_route(c)
        || !c.cur.shared.rules.stream_usage
    {
        return false;
    }
    match &mut verdict.admitted {
        Admitted::Buffered(b) => ask_stream_usage(&mut b.body, how),
        _ => false,
    }
}

fn openai_route(c: &Call<'_>) -> bool {
    c.cur.shared.rules.routes[c.route.index].protocol == crate::config::Protocol::Openai
}

/// Everything the upstream stage needs to know about the request.
pub(super) fn upstream_request<'a>(
    c: &Call<'a>,
    verdict: &'a Verdict,
    admission: &'a Option<Admission>,
    cluster: usize,
    tls: bool,
    limit_headers: &'a str,
    strip_usage: bool,
) -> Request<'a> {
    let openai = openai_route(c);
    // Tokens were charged, or usage is counted per tenant and model (OpenAI
    // routes): look for the usage the backend reports.
    let scan_usage = openai
        || admission.as_ref().is_some_and(|a| a.tokens > 0)
            && c.cur
                .shared
                .ratelimit
                .as_ref()
                .is_some_and(|p| p.correct_from_usage);
    let cut = admission
        .as_ref()
        .filter(|a| verdict.facts.stream && crate::ratelimit::Limiter::cuts_streams(a));
    Request {
        head: &c.rq.head,
        grant: None,
        tap: openai && verdict.facts.stream,
        strip_usage,
        cut,
        identity: c.identity,
        tls,
        buffered: match &verdict.admitted {
            Admitted::Buffered(b) => Some(b),
            _ => None,
        },
        continue_sent: verdict.continue_sent,
        route: c.route,
        request_id: &c.rq.id,
        peer: c.rq.peer.ip(),
        started: c.rq.started,
        response_headers: limit_headers,
        scan_usage,
        cluster,
        model: c.model(verdict),
        size: verdict.facts.max_tokens.unwrap_or(0),
        prefix: &verdict.prefix,
        prompt_tokens: verdict.facts.prompt_tokens,
        stream: verdict.facts.stream,
        traceparent: c.rq.trace.borrow().as_ref().map(|t| t.traceparent()),
    }
}

/// Shadow traffic: a sampled copy of this request to the model's shadow
/// pool, answered by nobody (skipped when too many are in flight).
pub(super) fn shadow(c: &Call<'_>, verdict: &Verdict, req: &Request<'_>) {
    let Some((m, _)) = verdict.model.as_ref() else {
        return;
    };
    let Some((cluster, millionths, max_inflight, timeout)) =
        c.cur.shared.model_pools.get(m).and_then(|p| p.shadow)
    else {
        return;
    };
    if c.w.rng.below(1_000_000) >= millionths as usize {
        return;
    }
    if c.w.shadows.get() >= max_inflight {
        let labels = [
            m.as_str(),
            c.cur.shared.clusters[cluster].name.as_str(),
            "skipped_busy",
        ];
        c.cur.shared.metrics.shadow.with_label_values(&labels).inc();
        return;
    }
    crate::upstream::spawn_shadow(c.w, c.cur, req, cluster, m, timeout);
}

/// Settle the request's cost: corrected to the usage the backend reported,
/// refunded when no backend served it; its concurrency slots go back.
pub(super) fn settle(c: &Call<'_>, admission: Option<Admission>, verdict: &Verdict, x: &Exchange) {
    let cur = c.cur;
    let (Some(a), Some(p)) = (admission, cur.shared.ratelimit.as_ref()) else {
        return;
    };
    let served = served_tokens(verdict, x).filter(|_| p.correct_from_usage);
    if let Some(actual) = served.map(|(p, c, _)| p + c) {
        let actual = p.weigh(c.model(verdict), actual);
        cur.shared.limiter.correct(&a, actual);
        cur.route_counters[c.route.index]
            .tokens_actual
            .inc_by(actual);
    }
    // Nothing reached a backend (none reachable, all saturated): the
    // request's cost and quota count go back.
    let unserved = x.backend.is_none() || matches!(x.error, Some(ProxyError::Upstream(_)));
    if x.status == 0 && unserved {
        cur.shared.limiter.refund_unserved(&a);
    }
}

/// The request's access-log event and metrics; a failure before the
/// response started becomes the refusal the driver answers with.
pub(super) fn finish(
    c: &Call<'_>,
    cluster: usize,
    verdict: &Verdict,
    x: Exchange,
) -> Result<Served, Refusal> {
    let mut status = x.status;
    let mut refusal = None;
    if let Some(e) = x.error {
        let client_gone = matches!(
            e,
            ProxyError::Client(ClientError::ClientClosed | ClientError::SendTimeout)
        );
        if !x.response_started && !client_gone {
            status = e.status();
            refusal = Some(Refusal {
                head_consumed: x.head_consumed,
                body_read: x.request_body_done,
                record: Record::Counted,
                ..Refusal::from_error(e)
            });
        } else if status == 0 {
            status = e.status();
        }
        let (source, kind) = e.source_and_kind();
        c.w.metrics
            .inc(&c.w.metrics.request_errors, &[source, kind], 1);
    }
    record(c, cluster, verdict, status, &x);
    match refusal {
        Some(r) => Err(r),
        None => Ok(Served::Relayed {
            keep_alive: x.client_keep_alive && x.error.is_none(),
        }),
    }
}

/// One access record and the request's metrics.
fn record(c: &Call<'_>, cluster: usize, verdict: &Verdict, status: u16, x: &Exchange) {
    let (rq, cur) = (c.rq, c.cur);
    let elapsed = rq.started.elapsed();
    let m = &c.w.metrics;
    let route = c.route.name.as_str();
    m.inc(&m.requests, &[route, status_label(status), rq.protocol], 1);
    let served = served_tokens(verdict, x);
    account(c, verdict, served);
    if x.cut {
        cut_stream(c, verdict, x);
    }
    m.observe(&m.request_duration, route, elapsed);
    m.inc(&m.request_bytes, &[route], x.req_bytes);
    m.inc(&m.response_bytes, &[route], x.resp_bytes);
    if !cur.shared.access_log {
        return;
    }
    let model = verdict.model.as_ref();
    let (prompt, completion) = served.map_or((None, None), |(p, c, _)| (Some(p), Some(c)));
    let id = c.identity;
    tracing::info!(
        target: "access",
        request_id = rq.id.as_str(),
        method = rq.method.as_str(),
        path = rq.path.as_str(),
        client = %rq.peer.ip(),
        protocol = rq.protocol,
        tls = rq.tls.unwrap_or(""),
        principal = id.map_or("", |i| i.principal.as_str()),
        tenant = id.map_or("", |i| i.tenant.as_str()),
        auth = id.map_or("", |i| i.method),
        route,
        cluster = cur.shared.clusters[cluster].name.as_str(),
        model = model.map_or("", |m| m.0.as_str()),
        model_version = model.map_or("", |m| m.1.as_str()),
        upstream = x.backend.map(|b| b.to_string()).unwrap_or_default(),
        status,
        error = x.error.map(|e| e.source_and_kind().1).unwrap_or(""),
        duration_ms = elapsed.as_secs_f64() * 1e3,
        upstream_header_ms = x.header_time.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
        ttft_ms = x.first_byte.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
        // Estimated from the body when the backend reported no usage.
        prompt_tokens = prompt.unwrap_or(verdict.facts.prompt_tokens),
        completion_tokens = completion.unwrap_or(0),
        request_bytes = x.req_bytes,
        response_bytes = x.resp_bytes,
    );
}

/// What a request consumed: prompt and completion tokens as the backend
/// reported them (the prompt estimated when it reported only output), or,
/// for a stream with no usage, its content events counted (then `true`).
/// `None`: nothing reported and nothing streamed.
fn served_tokens(verdict: &Verdict, x: &Exchange) -> Option<(u64, u64, bool)> {
    let prompt_est = verdict.facts.prompt_tokens;
    match x.usage.as_ref().map(|u| u.counts()) {
        Some((p, Some(c))) => Some((p.unwrap_or(prompt_est), c, false)),
        _ if verdict.facts.stream && x.content_events > 0 => {
            Some((prompt_est, x.content_events, true))
        }
        Some((Some(p), None)) => Some((p, 0, false)),
        _ => None,
    }
}

/// Usage accounting: tokens per tenant and model, as Prometheus counters
/// (labels only from the configuration: other names count as `other`) and
/// in the admin API's book (`GET /usage`).
fn account(c: &Call<'_>, verdict: &Verdict, served: Option<(u64, u64, bool)>) {
    let Some((prompt, completion, counted)) = served else {
        return;
    };
    let shared = &c.cur.shared;
    let tenant = c.identity.map_or("", |i| i.tenant.as_str());
    let model = c.model(verdict);
    shared
        .limiter
        .usage
        .add(tenant, model, prompt, completion, counted);
    let tenant_label = match tenant {
        "" => "none",
        t if shared.known_tenants.contains(t) => t,
        _ => "other",
    };
    let model_label = if shared.rules.catalog.contains(model) {
        model
    } else {
        "other"
    };
    let u = &shared.metrics.usage_tokens;
    u.with_label_values(&[tenant_label, model_label, "prompt"])
        .inc_by(prompt);
    u.with_label_values(&[tenant_label, model_label, "completion"])
        .inc_by(completion);
}

/// A stream ended at its caller's token budget: counted and audited.
fn cut_stream(c: &Call<'_>, verdict: &Verdict, x: &Exchange) {
    let shared = &c.cur.shared;
    shared
        .metrics
        .stream_cuts
        .with_label_values(&[c.route.name.as_str()])
        .inc();
    let id = c.identity;
    tracing::warn!(target: "audit", request_id = c.rq.id.as_str(), route = c.route.name.as_str(),
        principal = id.map_or("", |i| i.principal.as_str()), tenant = id.map_or("", |i| i.tenant.as_str()),
        model = c.model(verdict), streamed_tokens = x.content_events,
        "stream ended: its output reached the caller's token budget");
}
