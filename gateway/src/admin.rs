//! Admin listener on its own thread (blocking I/O; it serves scrapes,
//! probes and operators, not traffic): `GET /metrics`, `GET /healthz`,
//! `GET /readyz`, and the front door's control plane:
//! `GET /xdp/blocks`, `POST /xdp/blocks` (`{"addr": "...", "ttl": "10m"}`),
//! `DELETE /xdp/blocks/{addr}`, `GET /xdp/stats`, `GET /xdp/watch` (a
//! stream of sampled verdicts, JSON lines).
//!
//! Anyone who can reach this listener can block clients: keep it on
//! loopback or a management network.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::server::Health;
use crate::xdp::{BlockError, BlockReason, FrontDoor};

/// The configuration in force (TLS certificates to reload, API keys to revoke).
pub type Current = Arc<dyn Fn() -> Arc<crate::generation::Resolved> + Send + Sync>;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 4096;

/// Admin connections served at once; more are closed at accept (a scraper
/// or a probe retries; a flood of slow clients can't hold every thread).
const MAX_CONNECTIONS: usize = 32;

/// What the admin API reads and acts on (shared by every connection's thread).
pub struct State {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub front_door: Arc<FrontDoor>,
    pub limiter: Arc<crate::ratelimit::Limiter>,
    pub loads: Arc<crate::balance::Registry>,
    pub current: Current,
}

/// Bind now (so a bad address fails the start; SO_REUSEPORT, so a new
/// gateway can start beside an old one that is draining) and serve on a
/// thread: each connection on its own short-lived thread, at most
/// [`MAX_CONNECTIONS`] at once, so a slow client never stalls `/readyz` or
/// `/metrics`.
pub fn spawn(addr: SocketAddr, state: State) -> std::io::Result<()> {
    let listener = bind_reuseport(addr)?;
    let st = Arc::new(state);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("gateway-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => serve(c, &st, &open),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

/// One admin connection on its own thread, within the cap.
fn serve(c: TcpStream, st: &Arc<State>, open: &Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        open.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(
            max = MAX_CONNECTIONS,
            "admin connection refused: too many at once"
        );
        return;
    }
    let (st2, open2) = (st.clone(), open.clone());
    let spawned = std::thread::Builder::new()
        .name("gateway-admin-conn".into())
        .spawn(move || {
            if let Err(e) = handle(c, &st2) {
                tracing::debug!(error = %e, "admin request failed");
            }
            open2.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        open.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(error = %e, "cannot start an admin connection thread");
    }
}

/// A listening socket with SO_REUSEADDR and SO_REUSEPORT set before bind.
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

fn handle(mut c: TcpStream, st: &State) -> std::io::Result<()> {
    let (metrics, health, front_door, limiter, loads, current) = (
        &*st.metrics,
        &*st.health,
        &*st.front_door,
        &*st.limiter,
        &*st.loads,
        &st.current,
    );
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let Some(req) = read_head(&mut c, &mut buf, current)? else {
        return Ok(());
    };
    let (method, head_len, body_len) = (req.method.as_str(), req.head_len, req.body_len);
    let path = req.path.split('?').next().unwrap_or("");
    if body_len > MAX_BODY {
        return respond(&mut c, 413, "text/plain", b"body too large\n");
    }
    let mut n = req.read;
    while n < head_len + body_len {
        let r = c.read(&mut buf[n..])?;
        if r == 0 {
            return Ok(());
        }
        n += r;
    }
    let body = &buf[head_len..head_len + body_len];
    let Some(api) = Api::of(path) else {
        return probe(&mut c, method, path, metrics, health, front_door);
    };
    // The control plane (blocks, key revocation, certificate reload) needs
    // the `admin` scope once authentication is configured; metrics and
    // probes stay open for scrapers and orchestrators.
    if let Err(refusal) = admin_allowed(current, req.bearer.as_deref(), req.api_key.as_deref()) {
        return refuse(&mut c, refusal);
    }
    if api_is_watch(method, path) {
        return xdp_watch(&mut c, &req.path, &st.front_door);
    }
    let (status, json) = match api {
        Api::Xdp => xdp_api(method, path, body, front_door),
        Api::Tls => tls_reload_api(method, metrics, current),
        Api::Balance => balance_api(method, path, body, loads),
        Api::Quota => quota_api(method, path, limiter),
        Api::Usage => usage_api(method, limiter),
        Api::Authn => authn_api(method, path, body, current().authn.as_deref()),
    };
    respond(
        &mut c,
        status,
        "application/json",
        json.to_string().as_bytes(),
    )
}

/// The control-plane API a path belongs to; `None`: metrics and probes.
#[derive(Clone, Copy)]
enum Api {
    Xdp,
    Tls,
    Balance,
    Quota,
    Usage,
    Authn,
}

impl Api {
    fn of(path: &str) -> Option<Api> {
        let api = match path {
            "/tls/reload" => Api::Tls,
            p if p.starts_with("/xdp/") => Api::Xdp,
            p if p.starts_with("/balance/") => Api::Balance,
            p if p.starts_with("/ratelimit/") => Api::Quota,
            "/usage" => Api::Usage,
            p if p.starts_with("/authn/") => Api::Authn,
            _ => return None,
        };
        Some(api)
    }
}

/// A request head read by [`read_head`]: what [`handle`] routes on.
struct AdminHead {
    method: String,
    path: String,
    head_len: usize,
    body_len: usize,
    /// Bytes read into the buffer so far (the head, maybe part of the body).
    read: usize,
    bearer: Option<Vec<u8>>,
    api_key: Option<Vec<u8>>,
}

/// Reads a request head into `buf`: the head with its credentials and
/// declared body length, or `None` when the client closed or was answered 400.
fn read_head(
    c: &mut TcpStream,
    buf: &mut [u8],
    current: &Current,
) -> std::io::Result<Option<AdminHead>> {
    let mut n = 0;
    let mut bearer: Option<Vec<u8>> = None;
    let mut api_key: Option<Vec<u8>> = None;
    loop {
        let r = c.read(&mut buf[n..])?;
        if r == 0 {
            return Ok(None);
        }
        n += r;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let key_header = current()
                    .authn
                    .as_ref()
                    .map(|a| a.api_key_header().to_string());
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("authorization") {
                        let v = h.value.trim_ascii();
                        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                            bearer = Some(v[7..].trim_ascii().to_vec());
                        }
                    } else if key_header
                        .as_deref()
                        .is_some_and(|k| h.name.eq_ignore_ascii_case(k))
                    {
                        api_key = Some(h.value.trim_ascii().to_vec());
                    }
                }
                let body_len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                return Ok(Some(AdminHead {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    head_len,
                    body_len,
                    read: n,
                    bearer,
                    api_key,
                }));
            }
            Ok(httparse::Status::Partial) if n < buf.len() => continue,
            _ => {
                respond(c, 400, "text/plain", b"bad request\n")?;
                return Ok(None);
            }
        }
    }
}

/// Answers a control-plane request refused by [`admin_allowed`] (401 with
/// its challenge, or 403).
fn refuse(
    c: &mut TcpStream,
    (status, why, challenge): (u16, &str, Option<&str>),
) -> std::io::Result<()> {
    let body = serde_json::json!({"error": why}).to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}connection: close\r\n\r\n",
        if status == 401 { "Unauthorized" } else { "Forbidden" },
        body.len(),
        challenge.map(|c| format!("www-authenticate: {c}\r\n")).unwrap_or_default()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    c.flush()
}

/// `POST /tls/reload`: the status and JSON body of re-reading the TLS
/// certificates of the configuration in force.
fn tls_reload_api(method: &str, metrics: &Metrics, current: &Current) -> (u16, serde_json::Value) {
    use serde_json::json;
    let reload = (method == "POST")
        .then(|| current().tls.as_ref().map(|t| t.resolver.reload()))
        .flatten();
    match (method, reload) {
        ("POST", None) => (
            404,
            json!({"error": "TLS is not configured ([tls] listen)"}),
        ),
        ("POST", Some(r)) => {
            crate::tls::note_reload(metrics, &r, "admin_api");
            match r {
                Ok(n) => (200, json!({"reloaded": n})),
                Err(e) => (409, json!({"error": e})),
            }
        }
        _ => (405, json!({"error": "POST /tls/reload"})),
    }
}

/// Metrics and probes (`GET`/`HEAD` only): `/metrics`, `/healthz`, `/readyz`;
/// 404 for any other path.
fn probe(
    c: &mut TcpStream,
    method: &str,
    path: &str,
    metrics: &Metrics,
    health: &Health,
    front_door: &FrontDoor,
) -> std::io::Result<()> {
    if method != "GET" && method != "HEAD" {
        return respond(c, 405, "text/plain", b"method not allowed\n");
    }
    match path {
        "/metrics" => {
            front_door.tick();
            respond(c, 200, "text/plain; version=0.0.4", &metrics.render())
        }
        "/healthz" => respond(c, 200, "text/plain", b"ok\n"),
        "/dashboard" => respond_with(
            c,
            200,
            "text/html; charset=utf-8",
            // Everything is inline and embedded; it reads /metrics, nothing else.
            "content-security-policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'\r\n\
             x-content-type-options: nosniff\r\ncache-control: no-store\r\n",
            DASHBOARD.as_bytes(),
        ),
        "/readyz" if health.ready() => respond(c, 200, "text/plain", b"ready\n"),
        "/readyz" => respond(c, 503, "text/plain", b"not ready\n"),
        _ => respond(c, 404, "text/plain", b"not found\n"),
    }
}

/// The live dashboard (`GET /dashboard`): one page, embedded in the binary,
/// that reads this listener's `/metrics` every second.
const DASHBOARD: &str = include_str!("dashboard.html");

fn respond(c: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    respond_with(c, status, ctype, "", body)
}

/// `respond` with more header lines (each ending in CRLF).
fn respond_with(
    c: &mut TcpStream,
    status: u16,
    ctype: &str,
    extra: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        201 => "Created",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    c.flush()
}

fn api_is_watch(method: &str, path: &str) -> bool {
    method == "GET" && path == "/xdp/watch"
}

/// The watch options in `GET /xdp/watch?one_in=N&passes=true&max_per_second=N&seconds=N`.
fn watch_query(target: &str) -> Result<(crate::xdp::WatchOpts, u64), String> {
    let mut opts = crate::xdp::WatchOpts::default();
    let mut seconds = 0u64;
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = |max: u64| -> Result<u64, String> {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{k} must be a whole number up to {max}"))
        };
        match k {
            "one_in" => opts.one_in = num(1_000_000)?.max(1) as u32,
            "max_per_second" => opts.max_per_second = num(100_000)?.max(1) as u32,
            "seconds" => seconds = num(86_400)?,
            "passes" => {
                opts.passes = match v {
                    "" | "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err("passes must be true or false".into()),
                }
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{k}` (one_in, passes, max_per_second, seconds)"
                ))
            }
        }
    }
    Ok((opts, seconds))
}

/// `GET /xdp/watch`: sampled XDP verdicts as JSON lines, for `seconds`
/// (0: until the client hangs up). The first line says what is watched,
/// the last what was missed (`lost` to a slow reader, `skipped` over this
/// stream's cap, `suppressed` over the kernel's per-CPU cap).
fn xdp_watch(c: &mut TcpStream, target: &str, fd: &Arc<FrontDoor>) -> std::io::Result<()> {
    let json_err = |c: &mut TcpStream, status: u16, msg: String| {
        respond(
            c,
            status,
            "application/json",
            serde_json::json!({ "error": msg }).to_string().as_bytes(),
        )
    };
    let (opts, seconds) = match watch_query(target) {
        Ok(x) => x,
        Err(e) => return json_err(c, 400, e),
    };
    let mut w = match fd.watch(opts) {
        Ok(w) => w,
        Err(e @ crate::xdp::WatchError::TooMany(_)) => return json_err(c, 503, e.to_string()),
        Err(e) => return json_err(c, 409, e.to_string()),
    };
    let suppressed_before = fd.watch_suppressed();
    c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncache-control: no-store\r\nconnection: close\r\n\r\n")?;
    let o = w.opts();
    let first = serde_json::json!({"watching": {"one_in": o.one_in, "passes": o.passes, "max_per_second": o.max_per_second, "seconds": seconds}});
    c.write_all(format!("{first}\n").as_bytes())?;
    let until = (seconds > 0).then(|| std::time::Instant::now() + Duration::from_secs(seconds));
    let mut sent = 0u64;
    loop {
        let left = until.map(|u| u.saturating_duration_since(std::time::Instant::now()));
        if left.is_some_and(|l| l.is_zero()) || client_gone(c) {
            break;
        }
        let wait = left
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let mut out = String::new();
        for e in w.next(wait) {
            out.push_str(&e.json().to_string());
            out.push('\n');
            sent += 1;
        }
        if !out.is_empty() {
            c.write_all(out.as_bytes())?;
        }
    }
    let end = serde_json::json!({"end": {"events": sent, "lost": w.lost, "skipped": w.skipped(), "suppressed": fd.watch_suppressed().saturating_sub(suppressed_before)}});
    c.write_all(format!("{end}\n").as_bytes())?;
    c.flush()
}

/// The client closed its end (a watch stream ends when its reader leaves).
fn client_gone(c: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a one-byte buffer we own; MSG_PEEK consumes nothing.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(c),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
        || (n < 0
            && !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ))
}

/// The front door's control plane. Returns the status and a JSON body.
fn xdp_api(method: &str, path: &str, body: &[u8], fd: &FrontDoor) -> (u16, serde_json::Value) {
    use serde_json::json;
    let now = crate::xdp::monotonic_ns();
    let block_json = |b: &crate::xdp::Block| json!({"addr": b.addr.to_string(), "reason": b.reason.as_str(), "ttl_s": b.ttl_left(now)});
    let err = |status: u16, msg: String| (status, json!({"error": msg}));
    match (method, path) {
        ("GET", "/xdp/blocks") => {
            let blocks: Vec<_> = fd.list().iter().map(block_json).collect();
            (200, json!({ "blocks": blocks }))
        }
        ("POST", "/xdp/blocks") => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Req {
                addr: String,
                ttl: Option<String>,
            }
            let req: Req = match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => {
                    return err(
                        400,
                        format!("expected {{\"addr\": \"IP\", \"ttl\": \"10m\"}}: {e}"),
                    )
                }
            };
            let Ok(addr) = req.addr.parse::<std::net::IpAddr>() else {
                return err(
                    400,
                    format!("`{}` is not an IPv4 or IPv6 address", req.addr),
                );
            };
            let ttl = match req.ttl.as_deref().map(humantime::parse_duration) {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    return err(400, format!("ttl: {e} (use e.g. \"90s\", \"10m\", \"1h\")"))
                }
            };
            match fd.block(addr, ttl, BlockReason::Manual) {
                Ok(b) => (201, block_json(&b)),
                Err(e @ (BlockError::Allowlisted(_) | BlockError::Static(_))) => {
                    err(409, e.to_string())
                }
                Err(e @ BlockError::Ttl(_)) => err(400, e.to_string()),
                Err(e @ BlockError::Full(_)) => err(503, e.to_string()),
                Err(e @ BlockError::Kernel(_)) => err(500, e.to_string()),
            }
        }
        ("DELETE", p) if p.starts_with("/xdp/blocks/") => {
            let raw = &p["/xdp/blocks/".len()..];
            let Ok(addr) = raw.parse::<std::net::IpAddr>() else {
                return err(400, format!("`{raw}` is not an IPv4 or IPv6 address"));
            };
            match fd.unblock(addr) {
                Ok(true) => (200, json!({"addr": addr.to_string(), "removed": true})),
                Ok(false) => err(404, format!("{addr} is not blocked")),
                Err(e) => err(409, e.to_string()),
            }
        }
        ("GET", "/xdp/stats") => {
            fd.tick();
            let s = fd.status();
            let counters: serde_json::Map<String, serde_json::Value> = fd
                .counters()
                .into_iter()
                .map(|(v, r, n)| (format!("{v}/{r}"), json!(n)))
                .collect();
            let attached: Vec<_> = s
                .attached
                .iter()
                .map(|(i, m)| json!({"interface": i, "mode": m}))
                .collect();
            (
                200,
                json!({
                    "enabled": !s.attached.is_empty() && s.fallback.is_none(),
                    "attached": attached,
                    "fallback": s.fallback,
                    "blocked": fd.list().len(),
                    "packets": counters,
                }),
            )
        }
        (_, "/xdp/blocks") | (_, "/xdp/stats") | (_, "/xdp/watch") => {
            err(405, "method not allowed".into())
        }
        _ => err(404, "not found".into()),
    }
}

/// `POST /authn/revoke {"sha256": "<hex digest of the key>"}`, `GET /authn/keys`.
fn authn_api(
    method: &str,
    path: &str,
    body: &[u8],
    authn: Option<&crate::authn::Authn>,
) -> (u16, serde_json::Value) {
    use serde_json::json;
    let Some(authn) = authn else {
        return (
            404,
            json!({"error": "authentication is not configured ([authn])"}),
        );
    };
    match (method, path) {
        ("GET", "/authn/keys") => {
            let keys: Vec<_> = authn
                .list_api_keys()
                .into_iter()
                .map(|(client, tenant, prefix)| json!({"client": client, "tenant": tenant, "sha256_prefix": prefix}))
                .collect();
            (200, json!({ "api_keys": keys }))
        }
        ("POST", "/authn/revoke") => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Req {
                sha256: String,
            }
            let Ok(req) = serde_json::from_slice::<Req>(body) else {
                return (
                    400,
                    json!({"error": "expected {\"sha256\": \"<64 hex digits: SHA-256 of the key>\"}"}),
                );
            };
            let Some(d) = crate::authn::parse_hex32(&req.sha256) else {
                return (400, json!({"error": "sha256 must be 64 hex digits"}));
            };
            match authn.revoke_api_key(d) {
                Some((client, Ok(()))) => (200, json!({"revoked": client, "saved": true})),
                // In force in this process, but not kept for a restart: say so.
                Some((client, Err(e))) => (
                    200,
                    json!({"revoked": client, "saved": false, "warning": format!("not saved ({e}): it holds until a restart")}),
                ),
                None => (404, json!({"error": "no active key has that digest"})),
            }
        }
        (_, "/authn/keys") | (_, "/authn/revoke") => (405, json!({"error": "method not allowed"})),
        _ => (404, json!({"error": "not found"})),
    }
}

/// Whether a control-plane request may proceed: always without
/// authentication configured (keep the listener on loopback then); else it
/// needs valid credentials (JWT or API key) and a rule granting `admin`.
fn admin_allowed(
    current: &Current,
    bearer: Option<&[u8]>,
    api_key: Option<&[u8]>,
) -> Result<(), (u16, &'static str, Option<&'static str>)> {
    use crate::config::AuthMethod;
    let r = current();
    let Some(authn) = r.authn.as_ref() else {
        return Ok(());
    };
    let cache = std::cell::RefCell::new(crate::authn::TokenCache::new(1));
    let id = authn
        .authenticate_credentials(
            bearer,
            api_key,
            &[AuthMethod::Jwt, AuthMethod::ApiKey],
            None,
            &cache,
        )
        .map_err(|e| {
            tracing::warn!(target: "audit", reason = e.reason, "admin API: authentication refused");
            (
                401,
                "valid credentials with the admin scope are required",
                Some(e.challenge()),
            )
        })?;
    match crate::authz::Authz::new(&r.config.authz.rules).decide(&id, "", "admin") {
        Some(rule) => {
            tracing::info!(target: "audit", principal = id.principal.as_str(), rule, "admin API access");
            Ok(())
        }
        None => {
            tracing::warn!(target: "audit", principal = id.principal.as_str(), tenant = id.tenant.as_str(), "admin API: no rule grants the admin scope");
            Err((403, "these credentials do not have the admin scope", None))
        }
    }
}

/// `GET /usage`: tokens served per tenant and model since the start (as
/// the backends reported them; streams without usage counted by event),
/// and each tenant's counts in its current quota windows (UTC day, month).
fn usage_api(method: &str, limiter: &crate::ratelimit::Limiter) -> (u16, serde_json::Value) {
    use serde_json::json;
    if method != "GET" {
        return (405, json!({"error": "GET /usage"}));
    }
    let totals: Vec<_> = limiter
        .usage
        .totals()
        .into_iter()
        .map(|(tenant, model, t)| {
            json!({"tenant": tenant, "model": model, "requests": t.requests,
                   "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                   "completion_tokens_counted": t.completion_tokens_counted})
        })
        .collect();
    let windows: Vec<_> = limiter
        .quotas
        .tenants()
        .into_iter()
        .map(|(tenant, st)| {
            let (day, month, c) = st.snapshot();
            json!({"tenant": tenant,
                   "day": {"id": day, "requests": c[0], "tokens": c[1]},
                   "month": {"id": month, "requests": c[2], "tokens": c[3]}})
        })
        .collect();
    (
        200,
        json!({"since_start": totals, "quota_windows": windows}),
    )
}

/// `GET /ratelimit/quotas`: every tenant's day and month counts;
/// `DELETE /ratelimit/quotas/TENANT`: start the tenant's day and month over
/// (an operator granting more; with Redis, this node's view until the next sync).
fn quota_api(
    method: &str,
    path: &str,
    limiter: &crate::ratelimit::Limiter,
) -> (u16, serde_json::Value) {
    use serde_json::json;
    match (method, path) {
        ("GET", "/ratelimit/quotas") => {
            let tenants: serde_json::Map<String, serde_json::Value> = limiter
                .quotas
                .tenants()
                .into_iter()
                .map(|(t, st)| {
                    let (day, month, c) = st.snapshot();
                    (
                        t,
                        json!({"day": day, "requests_today": c[0], "tokens_today": c[1],
                               "month": month, "requests_this_month": c[2], "tokens_this_month": c[3]}),
                    )
                })
                .collect();
            (200, json!({ "tenants": tenants }))
        }
        ("DELETE", p) if p.starts_with("/ratelimit/quotas/") => {
            let tenant = &p["/ratelimit/quotas/".len()..];
            if limiter.quotas.reset(tenant) {
                tracing::warn!(target: "audit", event = "quota_reset", tenant, "tenant quota counts reset (admin API)");
                (200, json!({ "reset": tenant }))
            } else {
                (404, json!({ "error": "no quota counts for this tenant" }))
            }
        }
        (_, "/ratelimit/quotas") => (405, json!({"error": "GET /ratelimit/quotas"})),
        _ => (
            404,
            json!({"error": "GET /ratelimit/quotas, DELETE /ratelimit/quotas/TENANT"}),
        ),
    }
}

/// `GET /balance/backends`: every backend's load and health;
/// `POST /balance/drain` / `POST /balance/undrain` `{"cluster", "backend"}`:
/// take a backend out of rotation (in-flight requests finish) or back in.
fn balance_api(
    method: &str,
    path: &str,
    body: &[u8],
    loads: &crate::balance::Registry,
) -> (u16, serde_json::Value) {
    use serde_json::json;
    use std::sync::atomic::Ordering::Relaxed;
    let now = crate::balance::now_ms();
    match (method, path) {
        ("GET", "/balance/backends") => {
            let list: Vec<_> = loads
                .all()
                .into_iter()
                .map(|(cluster, b)| {
                    json!({
                        "cluster": cluster, "backend": b.addr.to_string(),
                        "available": b.available(now), "draining": b.draining.load(Relaxed),
                        "healthy": b.healthy.load(Relaxed),
                        "ejected_for_ms": b.ejected_until.load(Relaxed).saturating_sub(now),
                        "inflight": b.inflight.load(Relaxed),
                        "latency_ewma_ms": b.latency_ns.load(Relaxed) as f64 / 1e6,
                        "reported": b.reported_ms.load(Relaxed) != 0,
                        "waiting": b.waiting.load(Relaxed), "running": b.running.load(Relaxed),
                        "kv_cache_usage": f64::from(b.kv_permille.load(Relaxed)) / 1000.0,
                        "completed": b.completed.load(Relaxed),
                    })
                })
                .collect();
            (200, json!({ "backends": list }))
        }
        ("POST", "/balance/drain") | ("POST", "/balance/undrain") => {
            let v: serde_json::Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => {
                    return (
                        400,
                        json!({"error": "body: {\"cluster\": \"NAME\", \"backend\": \"HOST:PORT\"}"}),
                    )
                }
            };
            let (Some(cluster), Some(addr)) = (
                v["cluster"].as_str(),
                v["backend"]
                    .as_str()
                    .and_then(|b| b.parse::<std::net::SocketAddr>().ok()),
            ) else {
                return (
                    400,
                    json!({"error": "body: {\"cluster\": \"NAME\", \"backend\": \"HOST:PORT\"}"}),
                );
            };
            let Some(b) = loads.find(cluster, addr) else {
                return (404, json!({"error": "no such backend in that cluster"}));
            };
            let drain = path.ends_with("/drain");
            b.draining.store(drain, Relaxed);
            if !drain {
                // Back with a warm-up ramp, like a new backend.
                b.since_ms.store(now, Relaxed);
            }
            tracing::warn!(target: "audit", event = if drain { "drain" } else { "undrain" }, cluster, backend = %addr,
                inflight = b.inflight.load(Relaxed), "backend {} (admin API)", if drain { "drained" } else { "back in rotation" });
            (
                200,
                json!({"cluster": cluster, "backend": addr.to_string(), "draining": drain, "inflight": b.inflight.load(Relaxed)}),
            )
        }
        ("GET", "/balance/queues") => {
            let list: Vec<_> = loads.queues().iter().map(|q| q.snapshot()).collect();
            (200, json!({ "queues": list }))
        }
        (_, "/balance/backends") => (405, json!({"error": "GET /balance/backends"})),
        (_, "/balance/queues") => (405, json!({"error": "GET /balance/queues"})),
        _ => (
            404,
            json!({"error": "GET /balance/backends, GET /balance/queues, POST /balance/drain, POST /balance/undrain"}),
        ),
    }
}
