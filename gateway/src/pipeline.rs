//! The request pipeline, assembled in one place and in request order:
//!
//! 1. listener (`listener.rs`) — accepted a connection on this worker
//!    (the XDP front door, `xdp/`, already dropped blocked clients at the NIC)
//! 2. tls (`tls.rs`) — on TLS listeners, a finished handshake
//! 3. http codec (`codec.rs`) — read and check one request head
//! 4. route match (`route.rs`) — host/path/method → a configured route, or 404
//! 5. authn (`authn.rs`) — who is calling, or 401
//!    then the early part of stage 8: a caller already over a request rate
//!    that doesn't depend on the body (ip, principal, tenant, route) gets its
//!    429 here, before its body is read
//! 6. validate (`validate/`) — content type, JSON shape, protocol (OpenAI,
//!    KServe v2) and model catalogue checks; may answer itself (`/v1/models`)
//! 7. authz (`authz.rs`) — may this identity use this model, or 403
//! 8. ratelimit (`ratelimit/`) — rate, cost, concurrency and quota at every
//!    level that applies, or 429; the admission is held to the response's end
//! 9. balance (`balance/`, called from `upstream::checkout`) — the
//!    least-loaded backend of the model's pool (or the route's cluster)
//! 10. upstream (`upstream.rs`) — forward, stream the response back
//!
//! then one access-log event and the metrics for the request. The route is
//! matched before authn (a route says which methods it accepts) and
//! validation (a route says which protocol its requests speak); authz and
//! ratelimit need the model validation found.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

use crate::codec::{self, RequestHead};
use crate::error::{validation_type, ClientError, ErrorBody, ProxyError};
use crate::io::{Conn, ReadError};
use crate::metrics::status_label;
use crate::upstream::{self, Exchange, Request};
use crate::validate;
use crate::worker::{Current, Worker};
use std::io::Write as _;

/// What reading the next request produced.
enum Next {
    Request,
    /// The client closed, went idle too long, or the worker is draining: close quietly.
    Close,
    /// Answer with this error, then close.
    Reject(ClientError),
}

/// Serve every request of one client connection, in order.
/// `tls`: the TLS listener's address, for a connection accepted on one.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    w: Rc<Worker>,
    tls: Option<SocketAddr>,
) {
    let _ = stream.set_nodelay(true);
    // Stage 2: tls (on TLS listeners).
    let mut client = if let Some(local) = tls {
        match crate::tls::terminate(stream, peer, local, &w).await {
            Some(c) => c,
            None => return,
        }
    } else {
        Conn::new(stream, w.current().shared.buffer_size)
    };
    let conn_id = w.conn_id();
    let mut head = RequestHead::default();
    // Reused per request, like `head`: no allocation for its header list.
    let mut resp_head = codec::ResponseHead::default();
    let mut out = Vec::with_capacity(4096);
    let mut rid = String::with_capacity(40);
    let mut rl_headers = String::new();
    let mut first = true;
    // Closing after an error answer: linger so the answer is not lost to an RST.
    let mut linger = false;
    loop {
        // Stage 3: http codec.
        match read_head(&mut client, &mut head, &w, &w.current(), conn_id, first).await {
            Next::Request => {}
            Next::Close => break,
            Next::Reject(e) => {
                let cur = w.current();
                w.new_request_id(&mut rid);
                let e = ProxyError::Client(e);
                respond_error(&mut client, &cur, e, &rid, true, false, &mut out).await;
                log_rejected(&w, &cur, &rid, peer, e);
                linger = true;
                break;
            }
        }
        first = false;
        let started = Instant::now();
        // The configuration this request runs under, start to end: taken when
        // its head has arrived (a reload while the connection idled applies).
        let cur = w.current();
        match &head.request_id {
            Some(r) => {
                rid.clear();
                rid.push_str(std::str::from_utf8(&client.pending()[r.clone()]).unwrap_or_default());
            }
            None => w.new_request_id(&mut rid),
        }

        // Stage 4: route match.
        let buf = client.pending();
        let route = cur.shared.router.route(
            head.host.clone().map(|h| &buf[h]).unwrap_or_default(),
            &buf[head.target.clone()],
            &buf[head.method.clone()],
        );
        let Some(route) = route else {
            let e = ProxyError::Client(ClientError::NoRoute);
            // The unread body would be taken for the next request: close unless there is none.
            let close =
                !head.keep_alive || head.body_kind() != codec::BodyKind::Empty || w.draining.get();
            log_rejected(&w, &cur, &rid, peer, e);
            client.consume(head.head_len);
            respond_error(&mut client, &cur, e, &rid, close, head.is_head, &mut out).await;
            if close {
                linger = true;
                break;
            }
            continue;
        };

        // Captured for the access log before the head is consumed (path without query).
        let (method, path) = if cur.shared.access_log {
            let target = &buf[head.target.clone()];
            let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
            (
                String::from_utf8_lossy(&buf[head.method.clone()]).into_owned(),
                String::from_utf8_lossy(path).into_owned(),
            )
        } else {
            (String::new(), String::new())
        };

        // Stage 5: authn — who is calling (401 when the route needs to know and can't).
        let identity = match authenticate(&mut client, &mut head, route, &w, &cur) {
            Ok(id) => id,
            Err(e) => {
                let close = !head.keep_alive
                    || head.body_kind() != codec::BodyKind::Empty
                    || w.draining.get();
                log_rejected(&w, &cur, &rid, peer, e);
                client.consume(head.head_len);
                w.metrics.inc(
                    &w.metrics.requests,
                    &[&route.name, status_label(e.status())],
                    1,
                );
                respond_error(&mut client, &cur, e, &rid, close, head.is_head, &mut out).await;
                if close {
                    linger = true;
                    break;
                }
                continue;
            }
        };

        // Stage 8, early: a request-rate refusal that depends only on the
        // caller is answered here, before the body is read and checked.
        rl_headers.clear();
        if let Some(r) = rate_limit_early(
            &identity,
            route,
            peer,
            &w,
            &cur,
            &rid,
            started,
            &mut rl_headers,
        ) {
            let close =
                !head.keep_alive || head.body_kind() != codec::BodyKind::Empty || w.draining.get();
            client.consume(head.head_len);
            respond_refusal(
                &mut client,
                &w,
                &cur,
                &route.name,
                &r,
                &rl_headers,
                &rid,
                close,
                head.is_head,
                &mut out,
            )
            .await;
            if close {
                linger = true;
                break;
            }
            continue;
        }

        // Stage 6: validate.
        let verdict = match validate::admit(
            &mut client,
            &head,
            route,
            &cur.shared.rules,
            &cur.shared.timeouts,
            &w.json_scratch,
        )
        .await
        {
            Ok(v) => v,
            Err(refused) => {
                let r = &refused.rejection;
                let model = refused.model.as_deref().unwrap_or("");
                w.metrics.inc(
                    &w.metrics.validation_rejections,
                    &[&route.name, model, r.reason],
                    1,
                );
                w.metrics.inc(
                    &w.metrics.requests,
                    &[&route.name, status_label(r.status)],
                    1,
                );
                if cur.shared.access_log {
                    tracing::info!(target: "access", request_id = rid.as_str(), client = %peer.ip(), method, path, route = route.name.as_str(),
                        status = r.status, error = r.reason, pointer = r.pointer.as_deref().unwrap_or(""), "request refused by validation");
                }
                if r.status == 499 {
                    break;
                }
                if !refused.consumed {
                    client.consume(head.head_len);
                }
                let keep = head.keep_alive
                    && (refused.body_read || head.body_kind() == codec::BodyKind::Empty)
                    && !w.draining.get();
                let body = ErrorBody {
                    status: r.status,
                    error_type: validation_type(r.status),
                    message: &r.message,
                    code: Some(r.reason),
                    param: r.pointer.as_deref(),
                    retry_after: None,
                    headers: "",
                };
                respond_body(
                    &mut client,
                    &cur,
                    &body,
                    &rid,
                    !keep,
                    head.is_head,
                    &mut out,
                )
                .await;
                if !keep {
                    linger = true;
                    break;
                }
                continue;
            }
        };
        // Stage 7: authz — may this identity use this model? (Needs the model
        // the validate stage found, hence here.) The model list is not
        // refused but filtered: each caller sees the models it may use.
        let is_list = matches!(verdict.admitted, validate::Admitted::Answer(_));
        let filtered_list = match (&cur.shared.authz, is_list && !route.anonymous) {
            (Some(authz), true) => {
                let anon = crate::authn::Identity::anonymous();
                let id = identity.as_deref().unwrap_or(&anon);
                Some(validate::openai::models_list(
                    &cur.shared.rules.catalog,
                    |m| authz.decide(id, m, "infer").is_some(),
                ))
            }
            _ => None,
        };
        let denied = if is_list {
            None
        } else {
            authorize(
                &identity,
                verdict
                    .model
                    .as_ref()
                    .map(|(m, _)| m.as_str())
                    .unwrap_or(""),
                route,
                &w,
                &cur,
                &rid,
                peer,
            )
            .err()
        };
        if let Some(e) = denied {
            let close = refused_after_validate(&mut client, &head, &verdict.admitted, &w);
            w.metrics.inc(&w.metrics.requests, &[&route.name, "403"], 1);
            respond_error(&mut client, &cur, e, &rid, close, head.is_head, &mut out).await;
            if close {
                linger = true;
                break;
            }
            continue;
        }

        // Stage 8: ratelimit — may this caller send this now? (Keys on the
        // identity, the model and the cost, hence after authz.)
        rl_headers.clear();
        let admission = match rate_limit(
            &identity,
            route,
            &verdict,
            peer,
            &w,
            &cur,
            &rid,
            started,
            &mut rl_headers,
        ) {
            Ok(a) => a,
            Err(r) => {
                let close = refused_after_validate(&mut client, &head, &verdict.admitted, &w);
                respond_refusal(
                    &mut client,
                    &w,
                    &cur,
                    &route.name,
                    &r,
                    &rl_headers,
                    &rid,
                    close,
                    head.is_head,
                    &mut out,
                )
                .await;
                if close {
                    linger = true;
                    break;
                }
                continue;
            }
        };

        let buffered = match &verdict.admitted {
            validate::Admitted::Answer(body) => {
                // Answered here (GET /v1/models), filtered by identity.
                let body = filtered_list.as_ref().unwrap_or(body);
                client.consume(head.head_len);
                let keep = head.keep_alive
                    && head.body_kind() == codec::BodyKind::Empty
                    && !w.draining.get();
                out.clear();
                let _ = write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {rid}\r\n{}\r\n",
                    body.len(),
                    if keep { "" } else { "connection: close\r\n" }
                );
                if !head.is_head {
                    out.extend_from_slice(body);
                }
                let (_, o) = client
                    .write_all(std::mem::take(&mut out), cur.shared.timeouts.send)
                    .await;
                out = o;
                w.metrics.inc(&w.metrics.requests, &[&route.name, "200"], 1);
                if !keep {
                    break;
                }
                continue;
            }
            validate::Admitted::Buffered(b) => Some(b),
            validate::Admitted::Stream => None,
        };

        // Stage 10: upstream, to a backend the balance stage picks from the
        // model's pool (`[[models]] cluster`), else the route's cluster.
        let req_cluster = verdict
            .model
            .as_ref()
            .and_then(|(m, v)| {
                let pools = cur.shared.model_pools.get(m)?;
                // Sticky by principal (no copy), else by address.
                let key: std::borrow::Cow<'_, str> = match identity.as_deref() {
                    _ if !pools.sticky => "".into(),
                    Some(i) if !i.principal.is_empty() => i.principal.as_str().into(),
                    _ => peer.ip().to_string().into(),
                };
                let c = pools.cluster(v, verdict.facts.pinned, &key, &w.rng)?;
                if pools.total > 0 {
                    w.metrics.inc(
                        &w.metrics.balance_split,
                        &[m, &cur.shared.clusters[c].name],
                        1,
                    );
                }
                Some(c)
            })
            .unwrap_or(route.cluster);
        let req = Request {
            head: &head,
            identity: identity.as_deref(),
            tls: client.tls_session().is_some(),
            buffered,
            continue_sent: verdict.continue_sent,
            route,
            request_id: &rid,
            peer: peer.ip(),
            started,
            response_headers: &rl_headers,
            scan_usage: admission.as_ref().is_some_and(|a| a.tokens > 0)
                && cur
                    .shared
                    .ratelimit
                    .as_ref()
                    .is_some_and(|p| p.correct_from_usage),
            // Stage 9 (balance, in `upstream::checkout`): the model's pool, else the route's.
            cluster: req_cluster,
            model: verdict.model.as_ref().map_or("", |(m, _)| m.as_str()),
            size: verdict.facts.max_tokens.unwrap_or(0),
        };
        // Shadow traffic: a copy of this request to the model's shadow pool,
        // answered by nobody.
        if let Some((m, (cluster, millionths, max_inflight, timeout))) = verdict
            .model
            .as_ref()
            .and_then(|(m, _)| Some((m, cur.shared.model_pools.get(m)?.shadow?)))
        {
            if w.rng.below(1_000_000) < millionths as usize {
                if w.shadows.get() >= max_inflight {
                    cur.shared
                        .metrics
                        .shadow
                        .with_label_values(&[m, &cur.shared.clusters[cluster].name, "skipped_busy"])
                        .inc();
                } else {
                    upstream::spawn_shadow(&w, &cur, &req, cluster, m, timeout);
                }
            }
        }
        let x = upstream::forward(&mut client, &req, &w, &cur, &mut out, &mut resp_head).await;
        if let (Some(a), Some(actual), Some(p)) = (
            &admission,
            x.usage.as_ref().and_then(|u| u.total()),
            cur.shared.ratelimit.as_ref(),
        ) {
            let model = verdict.model.as_ref().map(|m| m.0.as_str()).unwrap_or("");
            let actual = p.weigh(model, actual);
            cur.shared.limiter.correct(a, actual);
            cur.route_counters[route.index].tokens_actual.inc_by(actual);
        }
        if let (Some(a), 0) = (&admission, x.status) {
            // Nothing reached a backend (none reachable, all saturated): the
            // request's cost and quota count go back.
            if x.backend.is_none() || matches!(x.error, Some(ProxyError::Upstream(_))) {
                cur.shared.limiter.refund_unserved(a);
            }
        }
        // Concurrency slots go back now that the response is over.
        drop(admission);
        if !x.head_consumed {
            // Failed before anything was sent upstream (e.g. no backend reachable).
            client.consume(head.head_len);
        }
        let mut keep = x.client_keep_alive;
        let mut status = x.status;
        if let Some(e) = x.error {
            let client_gone = matches!(
                e,
                ProxyError::Client(ClientError::ClientClosed | ClientError::SendTimeout)
            );
            if !x.response_started && !client_gone {
                // Reusable only if the request's framing was fully consumed.
                let body_consumed =
                    x.request_body_done || head.body_kind() == codec::BodyKind::Empty;
                keep = head.keep_alive && body_consumed && !e.must_close() && !w.draining.get();
                status = e.status();
                respond_error(&mut client, &cur, e, &rid, !keep, head.is_head, &mut out).await;
                linger = !keep;
            } else {
                keep = false;
                if status == 0 {
                    status = e.status();
                }
            }
            let (source, kind) = e.source_and_kind();
            w.metrics.inc(&w.metrics.request_errors, &[source, kind], 1);
        }
        if out.capacity() > 1 << 20 {
            // A buffered body went through `out`: don't keep its memory per connection.
            out = Vec::with_capacity(4096);
        }
        let model = verdict
            .model
            .as_ref()
            .map(|(m, v)| (m.as_str(), v.as_str()));
        finish(
            &w,
            &cur,
            &method,
            &path,
            &rid,
            peer,
            (route.name.as_str(), &cur.shared.clusters[req_cluster].name),
            model,
            status,
            started,
            &x,
        );
        if !keep || w.draining.get() {
            break;
        }
    }
    w.mark_busy(conn_id);
    // TLS: say goodbye properly (an EOF without close_notify looks like truncation).
    client.close_notify().await;
    if linger {
        linger_close(&mut client).await;
    }
}

/// Read until one complete request head is buffered. The first byte of a
/// request must come within the idle timeout (the header timeout for a new
/// connection); the rest of the head within the header timeout.
async fn read_head(
    client: &mut Conn,
    head: &mut RequestHead,
    w: &Worker,
    cur: &Current,
    conn_id: u64,
    first: bool,
) -> Next {
    let limits = &cur.shared.limits;
    let t = &cur.shared.timeouts;
    let mut head_deadline: Option<Instant> = None;
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
        if idle {
            if w.draining.get() {
                return Next::Close;
            }
            w.mark_idle(conn_id, client.raw_fd());
        }
        let r = client
            .fill_timeout(wait.max(Duration::from_millis(1)))
            .await;
        if idle {
            w.mark_busy(conn_id);
        }
        match r {
            Ok(0) if idle => return Next::Close,
            // Closed mid-head: nobody to answer.
            Ok(0) => return Next::Close,
            Ok(_) => {}
            Err(ReadError::Timeout) if idle => return Next::Close,
            Err(ReadError::Timeout) => return Next::Reject(ClientError::HeaderTimeout),
            Err(ReadError::Io(_)) | Err(ReadError::WatchedClosed) => return Next::Close,
        }
    }
}

/// Answer with the JSON error shape (head only for HEAD requests: a body
/// there would be read as the next response).
async fn respond_error(
    client: &mut Conn,
    cur: &Current,
    e: ProxyError,
    rid: &str,
    close: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    e.to_response(rid, close, out);
    send_answer(client, cur, head_only, out).await;
}

/// Answer with a gateway-made error body (head only for HEAD requests).
async fn respond_body(
    client: &mut Conn,
    cur: &Current,
    body: &ErrorBody<'_>,
    rid: &str,
    close: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    body.write(rid, close, out);
    send_answer(client, cur, head_only, out).await;
}

/// Write the gateway's own answer in `out` (only its head for HEAD requests:
/// a body there would be read as the next response).
async fn send_answer(client: &mut Conn, cur: &Current, head_only: bool, out: &mut Vec<u8>) {
    if head_only {
        truncate_to_head(out);
    }
    let (_, o) = client
        .write_all(std::mem::take(out), cur.shared.timeouts.send)
        .await;
    *out = o;
}

/// The authn stage: `Ok(None)` when the route is anonymous or nothing is
/// configured, `Ok(Some(identity))`, or a 401.
fn authenticate(
    client: &mut Conn,
    head: &mut RequestHead,
    route: &crate::route::Route,
    w: &Worker,
    cur: &Current,
) -> Result<Option<std::sync::Arc<crate::authn::Identity>>, ProxyError> {
    let authn = match cur.shared.authn.as_ref() {
        Some(a) if !route.anonymous => a,
        configured => {
            // Nobody to authenticate: client-sent identity headers still go.
            crate::authn::strip_identity_headers(
                &cur.shared.authn_settings.identity_headers,
                client.pending(),
                head,
            );
            if configured.is_some() {
                w.metrics
                    .inc(&w.metrics.authn, &[&route.name, "anonymous", "ok"], 1);
            }
            return Ok(None);
        }
    };
    let tls = client.tls_session();
    let buf = client.pending();
    match authn.authenticate(buf, head, &route.auth, tls, &w.token_cache) {
        Ok(id) => {
            w.metrics
                .inc(&w.metrics.authn, &[&route.name, id.method, "ok"], 1);
            Ok(Some(id))
        }
        Err(e) => {
            w.metrics
                .inc(&w.metrics.authn, &[&route.name, "none", e.reason], 1);
            tracing::info!(target: "audit", route = route.name.as_str(), reason = e.reason, "authentication refused");
            Err(ProxyError::Client(ClientError::Unauthenticated {
                challenge: e.challenge(),
            }))
        }
    }
}

/// The authz stage: allowed (a rule matched, or nothing is configured) or 403.
fn authorize(
    identity: &Option<std::sync::Arc<crate::authn::Identity>>,
    model: &str,
    route: &crate::route::Route,
    w: &Worker,
    cur: &Current,
    rid: &str,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let Some(authz) = cur.shared.authz.as_ref() else {
        return Ok(());
    };
    if route.anonymous {
        return Ok(());
    }
    let anon = crate::authn::Identity::anonymous();
    let id = identity.as_deref().unwrap_or(&anon);
    match authz.decide(id, model, "infer") {
        Some(rule) => {
            w.metrics
                .inc(&w.metrics.authz, &[&route.name, "allow", rule], 1);
            Ok(())
        }
        None => {
            w.metrics
                .inc(&w.metrics.authz, &[&route.name, "deny", ""], 1);
            tracing::warn!(target: "audit", request_id = rid, client = %peer.ip(), route = route.name.as_str(),
                principal = id.principal.as_str(), tenant = id.tenant.as_str(), method = id.method, model,
                decision = "deny", "no authorization rule allows this request");
            Err(ProxyError::Client(ClientError::Forbidden))
        }
    }
}

/// After a refusal once validation ran: take the head off the client buffer
/// where validation left it, and say whether the connection must close (the
/// body, if any, was read only when validation buffered it).
fn refused_after_validate(
    client: &mut Conn,
    head: &RequestHead,
    admitted: &validate::Admitted,
    w: &Worker,
) -> bool {
    if matches!(
        admitted,
        validate::Admitted::Stream | validate::Admitted::Answer(_)
    ) {
        client.consume(head.head_len);
    }
    !head.keep_alive
        || !matches!(
            admitted,
            validate::Admitted::Buffered(_) | validate::Admitted::Answer(_)
        ) && head.body_kind() != codec::BodyKind::Empty
        || w.draining.get()
}

/// The ratelimit stage: `Ok(None)` when nothing is limited, `Ok(admission)`
/// (held to the end of the response: concurrency slots, cost correction),
/// or the refusal. `headers` gets the rate-limit response headers.
#[expect(
    clippy::too_many_arguments,
    reason = "one stage's inputs, each from a different earlier stage"
)]
fn rate_limit(
    identity: &Option<std::sync::Arc<crate::authn::Identity>>,
    route: &crate::route::Route,
    verdict: &validate::Verdict,
    peer: SocketAddr,
    w: &Worker,
    cur: &Current,
    rid: &str,
    started: Instant,
    headers: &mut String,
) -> Result<Option<crate::ratelimit::Admission>, crate::ratelimit::Refusal> {
    let Some(p) = cur.shared.ratelimit.as_ref() else {
        return Ok(None);
    };
    let (principal, tenant) = identity
        .as_deref()
        .map(|i| (i.principal.as_str(), i.tenant.as_str()))
        .unwrap_or(("", ""));
    let model = verdict.model.as_ref().map(|m| m.0.as_str()).unwrap_or("");
    let f = &verdict.facts;
    let tokens = if p.counts_tokens && (f.prompt_tokens > 0 || f.max_tokens.is_some()) {
        p.cost(model, f.prompt_tokens, f.max_tokens)
    } else {
        0
    };
    let subject = crate::ratelimit::Subject {
        ip: peer.ip(),
        principal,
        tenant,
        route: &route.name,
        model,
        tokens,
    };
    match cur.shared.limiter.admit_at(p, &subject, started) {
        Ok(a) => {
            let c = &cur.route_counters[route.index];
            c.admitted.inc();
            c.tokens_estimated.inc_by(tokens);
            if let (Some(s), true) = (a.shown, p.headers_on_success) {
                s.write_headers(p.headers, headers);
            }
            Ok(Some(a))
        }
        Err(r) => {
            note_refusal(&r, p, &subject, w, rid, headers);
            Err(r)
        }
    }
}

/// Count, log and write the headers of a rate-limit refusal.
fn note_refusal(
    r: &crate::ratelimit::Refusal,
    p: &crate::ratelimit::Policies,
    s: &crate::ratelimit::Subject<'_>,
    w: &Worker,
    rid: &str,
    headers: &mut String,
) {
    let (level, limit) = (r.level.as_str(), r.limit.as_str());
    w.metrics
        .inc(&w.metrics.ratelimit, &[s.route, "refused", level, limit], 1);
    if let Some(shown) = r.shown {
        shown.write_headers(p.headers, headers);
    }
    tracing::info!(target: "ratelimit", request_id = rid, client = %s.ip, principal = s.principal, tenant = s.tenant, route = s.route,
        model = s.model, level, limit, cost_tokens = s.tokens, retry_after_s = r.retry_after_s, "request refused by a rate limit");
}

/// The early part of the ratelimit stage, before the body is read: a
/// request-rate refusal at a level that depends only on the caller and the
/// route (charges nothing; the full stage runs after validation).
#[expect(
    clippy::too_many_arguments,
    reason = "one stage's inputs, each from a different earlier stage"
)]
fn rate_limit_early(
    identity: &Option<std::sync::Arc<crate::authn::Identity>>,
    route: &crate::route::Route,
    peer: SocketAddr,
    w: &Worker,
    cur: &Current,
    rid: &str,
    started: Instant,
    headers: &mut String,
) -> Option<crate::ratelimit::Refusal> {
    let p = cur.shared.ratelimit.as_ref()?;
    let (principal, tenant) = identity
        .as_deref()
        .map(|i| (i.principal.as_str(), i.tenant.as_str()))
        .unwrap_or(("", ""));
    let subject = crate::ratelimit::Subject {
        ip: peer.ip(),
        principal,
        tenant,
        route: &route.name,
        model: "",
        tokens: 0,
    };
    let r = cur.shared.limiter.refuse_early(p, &subject, started)?;
    note_refusal(&r, p, &subject, w, rid, headers);
    Some(r)
}

/// Count and answer a rate-limit refusal: 429 (or 503 for a fail-closed
/// level whose Redis is down) with the JSON error shape, `Retry-After` and
/// the rate-limit headers.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection, the refusal and how to answer it"
)]
async fn respond_refusal(
    client: &mut Conn,
    w: &Worker,
    cur: &Current,
    route: &str,
    r: &crate::ratelimit::Refusal,
    headers: &str,
    rid: &str,
    close: bool,
    is_head: bool,
    out: &mut Vec<u8>,
) {
    let body = ErrorBody {
        status: r.status(),
        error_type: if r.status() == 429 {
            "rate_limit_exceeded"
        } else {
            "service_unavailable"
        },
        message: r.message(),
        code: Some(r.limit.as_str()),
        param: None,
        retry_after: Some(r.retry_after_s),
        headers,
    };
    w.metrics
        .inc(&w.metrics.requests, &[route, status_label(r.status())], 1);
    respond_body(client, cur, &body, rid, close, is_head, out).await;
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
async fn linger_close(client: &mut Conn) {
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

fn log_rejected(w: &Worker, cur: &Current, rid: &str, peer: SocketAddr, e: ProxyError) {
    let (source, kind) = e.source_and_kind();
    // No route was chosen: counted under route="".
    w.metrics
        .inc(&w.metrics.requests, &["", status_label(e.status())], 1);
    w.metrics.inc(&w.metrics.request_errors, &[source, kind], 1);
    if cur.shared.access_log {
        tracing::info!(target: "access", request_id = rid, client = %peer.ip(), status = e.status(), error = kind, "request rejected");
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one access record, logged and counted in one place"
)]
fn finish(
    w: &Worker,
    cur: &Current,
    method: &str,
    path: &str,
    rid: &str,
    peer: SocketAddr,
    (route, cluster): (&str, &str),
    model: Option<(&str, &str)>,
    status: u16,
    started: Instant,
    x: &Exchange,
) {
    let elapsed = started.elapsed();
    let m = &w.metrics;
    m.inc(&m.requests, &[route, status_label(status)], 1);
    m.observe(&m.request_duration, route, elapsed);
    m.inc(&m.request_bytes, &[route], x.req_bytes);
    m.inc(&m.response_bytes, &[route], x.resp_bytes);
    if cur.shared.access_log {
        tracing::info!(
            target: "access",
            request_id = rid,
            method,
            path,
            client = %peer.ip(),
            route,
            cluster,
            model = model.map(|m| m.0).unwrap_or(""),
            model_version = model.map(|m| m.1).unwrap_or(""),
            upstream = x.backend.map(|b| b.to_string()).unwrap_or_default(),
            status,
            error = x.error.map(|e| e.source_and_kind().1).unwrap_or(""),
            duration_ms = elapsed.as_secs_f64() * 1e3,
            upstream_header_ms = x.header_time.map(|d| d.as_secs_f64() * 1e3).unwrap_or(0.0),
            request_bytes = x.req_bytes,
            response_bytes = x.resp_bytes,
        );
    }
}
