//! The request pipeline: every stage of one request, in request order, run
//! by [`run`] for whichever protocol driver read the request.
//!
//! Before it, per connection (the driver's part, `http1/`):
//! - 0 front door (`xdp/`) — blocked clients dropped at the NIC and at accept
//! - 1 listener (`listener.rs`) — a connection accepted on this worker
//! - 1b tls (`tls.rs`) — on TLS listeners, a finished handshake
//! - 2 http codec (`codec.rs`) — one strictly parsed request head
//!
//! Then the stages, each a function that returns what it found or a
//! [`Refusal`] (`?` ends the request there):
//!
//! - 3 route (`route.rs`) — host/path/method → a configured route, or 404
//! - 3b authn (`authn.rs`) — who is calling, or 401
//! - 4c ratelimit, early (`ratelimit/`) — a caller already over a request
//!   rate that doesn't depend on the body gets its 429 before the body is read
//! - 4 validate (`validate/`) — content type, JSON shape, protocol (OpenAI,
//!   KServe v2) and model catalogue checks; may answer itself (`/v1/models`)
//! - 4b authz (`authz.rs`) — may this identity use this model, or 403
//! - 4c ratelimit (`ratelimit/`) — rate, cost, concurrency and quota at every
//!   level that applies, or 429; the admission is held to the response's end
//! - 4d balance (`balance/`) — the model's pool (or the route's cluster); the
//!   backend itself is picked when the upstream stage checks a connection out
//! - 4e queue (`pipeline/queue.rs`, `balance/queue.rs`) — when every backend
//!   of the pool is saturated: wait for room in band and fair-share order,
//!   or 429 (queue full) / 503 (waited too long)
//! - 5 upstream (`upstream/`) — forward, stream the response back
//!
//! then the request's cost is settled against what the backend reported,
//! and one access-log event and the metrics close it (`dispatch::finish`;
//! a refusal's: [`Refusal::record`]). The route is matched before authn (a
//! route says which methods it accepts) and validation (a route says which
//! protocol its requests speak); authz and ratelimit need the model
//! validation found.

#![expect(
    clippy::result_large_err,
    reason = "a refusal is built once per refused request and moved to the driver; boxing it would add an allocation to every refusal for no gain"
)]

mod admission;
mod dispatch;
mod queue;
mod refusal;

pub use refusal::{Record, Refusal};

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use crate::authn::Identity;
use crate::codec::{RequestHead, ResponseHead};
use crate::config::Protocol;
use crate::downstream::Downstream;
use crate::error::{ClientError, Dialect, ProxyError};
use crate::ratelimit::Admission;
use crate::route::Route;
use crate::validate::{self, Admitted, Verdict};
use crate::worker::{Current, Worker};

/// One request as the driver hands it over: its parsed head (whose ranges
/// index the downstream's pending bytes until the head is consumed) and
/// what the stages learn about it.
pub struct Incoming {
    pub head: RequestHead,
    pub peer: SocketAddr,
    /// The request id: the client's `x-request-id`, or a fresh one.
    pub id: String,
    pub started: Instant,
    /// The matched route's index (the route stage's finding).
    pub route: Option<usize>,
    /// Method and path (without query) for the access log; empty when it is off.
    pub method: String,
    pub path: String,
    /// The driver's protocol (`http/1.1`), and the TLS version when the
    /// connection is TLS, for the access log.
    pub protocol: &'static str,
    pub tls: Option<&'static str>,
    /// This request's span, when it is traced (`[tracing]`).
    pub trace: std::cell::RefCell<Option<crate::otel::Trace>>,
}

impl Incoming {
    pub fn new(peer: SocketAddr) -> Incoming {
        Incoming {
            head: RequestHead::default(),
            peer,
            id: String::with_capacity(40),
            started: Instant::now(),
            route: None,
            method: String::new(),
            path: String::new(),
            protocol: "http/1.1",
            tls: None,
            trace: std::cell::RefCell::new(None),
        }
    }

    /// Record a stage's event on the request's span, when it is traced.
    pub fn event(
        &self,
        name: &'static str,
        attrs: impl FnOnce() -> Vec<(&'static str, crate::otel::Value)>,
    ) {
        if let Some(t) = self.trace.borrow_mut().as_mut() {
            t.event(name, attrs());
        }
    }

    /// Start a request whose head was just parsed into `self.head` from
    /// `buf` (`None`: a head that could not be parsed).
    pub fn begin(&mut self, buf: Option<&[u8]>, w: &Worker, cur: &Current) {
        self.started = Instant::now();
        self.route = None;
        self.method.clear();
        self.path.clear();
        let Some(buf) = buf else {
            w.new_request_id(&mut self.id);
            return;
        };
        match &self.head.request_id {
            Some(r) => {
                self.id.clear();
                self.id
                    .push_str(std::str::from_utf8(&buf[r.clone()]).unwrap_or_default());
            }
            None => w.new_request_id(&mut self.id),
        }
        if cur.shared.access_log {
            let target = &buf[self.head.target.clone()];
            let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
            self.method
                .push_str(&String::from_utf8_lossy(&buf[self.head.method.clone()]));
            self.path.push_str(&String::from_utf8_lossy(path));
        }
    }
}

/// Buffers a connection reuses from one request to the next.
pub struct Scratch {
    /// Bytes on their way to the client.
    pub out: Vec<u8>,
    pub resp_head: ResponseHead,
    /// Rate-limit header lines for this request's answer.
    pub limit_headers: String,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch {
            out: Vec::with_capacity(4096),
            resp_head: ResponseHead::default(),
            limit_headers: String::new(),
        }
    }
}

impl Scratch {
    /// After a request: a buffered body that went through `out` doesn't
    /// keep its memory for the rest of the connection.
    pub fn trim(&mut self) {
        if self.out.capacity() > 1 << 20 {
            self.out = Vec::with_capacity(4096);
        }
    }
}

/// How a request that no stage refused was served.
pub enum Served {
    /// A backend's response went to the client (or was cut short once it
    /// had started); `keep_alive`: the connection may carry another request.
    Relayed { keep_alive: bool },
    /// The gateway answers itself: 200 with this JSON body (`GET /v1/models`,
    /// filtered by what the caller may use). The head is still pending; the
    /// rate-limit admission (concurrency slots) is held until the answer is
    /// written and this is dropped.
    Answer {
        body: Vec<u8>,
        admission: Option<Box<Admission>>,
    },
}

/// One authenticated request on its way through the later stages: the
/// driver's facts, its route and caller, and the worker and configuration
/// generation it runs on.
struct Call<'a> {
    rq: &'a Incoming,
    route: &'a Route,
    identity: Option<&'a Identity>,
    w: &'a Rc<Worker>,
    cur: &'a Rc<Current>,
}

impl Call<'_> {
    /// The model validation resolved ("" when none).
    fn model<'v>(&self, verdict: &'v Verdict) -> &'v str {
        verdict.model.as_ref().map_or("", |(m, _)| m.as_str())
    }
}

/// Run every stage of one request. `Err`: the driver answers with the
/// refusal (after [`Refusal::record`]), in the shape its route's clients
/// expect ([`dialect`]); `Ok`: served, see [`Served`].
pub async fn run<D: Downstream>(
    d: &mut D,
    rq: &mut Incoming,
    w: &Rc<Worker>,
    cur: &Rc<Current>,
    s: &mut Scratch,
) -> Result<Served, Refusal> {
    begin_trace(d.pending(), rq, w, cur);
    let served = stages(d, rq, w, cur, s).await;
    let served = served.map_err(|r| r.speak(dialect(rq, cur)));
    end_trace(rq, cur, &served);
    served
}

/// Start the request's span: the client's sampled `traceparent` continued,
/// else a new trace at `sample_ratio`.
fn begin_trace(buf: &[u8], rq: &mut Incoming, w: &Worker, cur: &Current) {
    let Some(t) = cur.shared.tracer.as_ref() else {
        return;
    };
    let h = &rq.head;
    let parent = h
        .headers
        .iter()
        .find(|x| buf[x.name.clone()].eq_ignore_ascii_case(b"traceparent"))
        .map(|x| &buf[x.value.clone()]);
    let draw = w.rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
    let ids = (w.rng.next_u64(), w.rng.next_u64(), w.rng.next_u64());
    let mut trace = t.begin(parent, draw, ids);
    if let Some(tr) = trace.as_mut() {
        tr.attr("http.request.method", rq.method.as_str());
        tr.attr("url.path", rq.path.as_str());
        tr.attr("client.address", rq.peer.ip().to_string().as_str());
        tr.attr("network.protocol.name", rq.protocol);
        tr.attr("gateway.request_id", rq.id.as_str());
    }
    *rq.trace.borrow_mut() = trace;
}

/// Close the request's span with its outcome and hand it to the exporter.
fn end_trace(rq: &Incoming, cur: &Current, served: &Result<Served, Refusal>) {
    let Some(mut tr) = rq.trace.borrow_mut().take() else {
        return;
    };
    let Some(t) = cur.shared.tracer.as_ref() else {
        return;
    };
    let route = rq
        .route
        .map_or("", |i| cur.shared.router.routes()[i].name.as_str());
    tr.attr("gateway.route", route);
    let error = match served {
        Err(r) => {
            tr.attr("http.response.status_code", u64::from(r.status));
            tr.attr("gateway.refused", r.code.unwrap_or(r.error_type));
            r.status >= 500
        }
        Ok(_) => false,
    };
    let name = if route.is_empty() {
        rq.method.clone()
    } else {
        format!("{} {route}", rq.method)
    };
    t.finish(tr, name, error);
}

fn rules_protocol(cur: &Current, route: &Route) -> Protocol {
    cur.shared.rules.routes[route.index].protocol
}

/// A gRPC request (`content-type: application/grpc[+…]`): its refusals are
/// gRPC statuses whatever route it reached.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "application/grpc" || v.starts_with("application/grpc+"))
}

/// Whose clients a request's errors go to: its route's protocol's.
pub fn dialect(rq: &Incoming, cur: &Current) -> Dialect {
    match rq.route.map(|i| cur.shared.rules.routes[i].protocol) {
        Some(Protocol::Openai) => Dialect::OpenAi,
        Some(Protocol::Kserve) => Dialect::Kserve,
        Some(Protocol::Grpc) => Dialect::Grpc,
        Some(Protocol::Passthrough) | None => Dialect::Gateway,
    }
}

async fn stages<D: Downstream>(
    d: &mut D,
    rq: &mut Incoming,
    w: &Rc<Worker>,
    cur: &Rc<Current>,
    s: &mut Scratch,
) -> Result<Served, Refusal> {
    let route = route(d.pending(), rq, cur)?; // 3
    let identity = admission::authenticate(d, rq, route, w, cur)?; // 3b
    let identity = identity.as_deref();
    rq.event("authn", || {
        let i = identity;
        vec![
            ("method", i.map_or("none", |i| i.method).into()),
            ("tenant", i.map_or("", |i| i.tenant.as_str()).into()),
        ]
    });
    let c = Call {
        rq,
        route,
        identity,
        w,
        cur,
    };
    s.limit_headers.clear();
    admission::rate_limit_early(&c, &mut s.limit_headers)?; // 4c, early
    let mut verdict = validate(d, &c).await?; // 4
    rq.event("validate", || {
        let (m, v) = verdict.model.clone().unwrap_or_default();
        vec![
            ("model", m.as_str().into()),
            ("model.version", v.as_str().into()),
            ("prompt_tokens", verdict.facts.prompt_tokens.into()),
        ]
    });
    let models = admission::authorize(&c, &verdict)?; // 4b
    let admission = admission::rate_limit(&c, &verdict, &mut s.limit_headers)?; // 4c
    rq.event("ratelimit", || {
        vec![(
            "charged_tokens",
            admission.as_ref().map_or(0, |a| a.tokens).into(),
        )]
    });
    if let Admitted::Answer(list) = &mut verdict.admitted {
        let list = models.unwrap_or_else(|| std::mem::take(list));
        return Ok(dispatch::answer(&c, list, admission));
    }
    let cluster = dispatch::balance(&c, &verdict); // 4d
    let grant = queue::wait(d, &c, &verdict, &admission, cluster).await?; // 4e
    let tls = d.tls();
    let strip_usage = dispatch::ask_stream_usage(&c, &mut verdict);
    let mut req = dispatch::upstream_request(
        &c,
        &verdict,
        &admission,
        cluster,
        tls,
        &s.limit_headers,
        strip_usage,
    );
    req.grant = grant.as_ref();
    dispatch::shadow(&c, &verdict, &req);
    let x = if rules_protocol(cur, route) == Protocol::Grpc {
        let Some(h2) = d.frames() else {
            return Err(Refusal {
                retry_after: None,
                ..Refusal::policy(
                    400,
                    "invalid_request",
                    "grpc_needs_http2",
                    "gRPC is spoken over HTTP/2",
                    0,
                )
            });
        };
        crate::upstream::grpc::forward(h2, &req, w, cur).await // 5, gRPC
    } else {
        crate::upstream::forward(d, &req, w, cur, &mut s.out, &mut s.resp_head).await
        // 5
    };
    rq.event("upstream", || {
        let cl = &cur.shared.clusters[cluster];
        vec![
            ("cluster", cl.name.as_str().into()),
            ("algorithm", cl.balance.algorithm.as_str().into()),
            (
                "backend",
                x.backend
                    .map(|b| b.to_string())
                    .unwrap_or_default()
                    .as_str()
                    .into(),
            ),
            ("http.response.status_code", u64::from(x.status).into()),
            (
                "ttft_ms",
                x.first_byte.map_or(0, |d| d.as_millis() as u64).into(),
            ),
            (
                "header_ms",
                x.header_time.map_or(0, |d| d.as_millis() as u64).into(),
            ),
        ]
    });
    dispatch::settle(&c, admission, &verdict, &x);
    dispatch::finish(&c, cluster, &verdict, x)
}

/// Stage 3, route match: the configured route for this host, path and method.
fn route<'c>(buf: &[u8], rq: &mut Incoming, cur: &'c Current) -> Result<&'c Route, Refusal> {
    let h = &rq.head;
    let host = h.host.clone().map(|r| &buf[r]).unwrap_or_default();
    let route = cur
        .shared
        .router
        .route(host, &buf[h.target.clone()], &buf[h.method.clone()])
        .ok_or_else(|| Refusal::from_error(ProxyError::Client(ClientError::NoRoute)))?;
    rq.route = Some(route.index);
    Ok(route)
}

/// Stage 4, validate: the request's checks, and the model it asks for.
async fn validate<D: Downstream>(d: &mut D, c: &Call<'_>) -> Result<Verdict, Refusal> {
    let (rules, t) = (&c.cur.shared.rules, &c.cur.shared.timeouts);
    validate::admit(d, &c.rq.head, c.route, rules, t, &c.w.json_scratch)
        .await
        .map_err(Refusal::from_validation)
}
