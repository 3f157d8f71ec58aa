//! Rate limits through the real binary: each level alone and together,
//! burst then rate, token cost charged up front and corrected from the
//! backend's reported usage, concurrency held by long streams, day quotas
//! that survive a restart, the RateLimit headers, exact counts across
//! workers, escalation (at accept; the XDP path is in xdp_netns.rs), and
//! two gateways sharing a tenant limit through a real redis-server that is
//! killed and restarted mid-test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::gateway::{free_port, temp_dir};
use gateway_tests::jwt::key_digest;
use gateway_tests::redis::Redis;
use gateway_tests::{request, Backend, Client, Driver, Gateway, Response, Spec};

const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-0123456789";
const CAROL: &str = "carol-key-0123456789";
const OPS: &str = "ops-key-0123456789";

/// The admin API with the ops key (admin scope).
fn admin(g: &Gateway, method: &str, path: &str) -> Response {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\nx-api-key: {OPS}\r\ncontent-length: 0\r\n\r\n"
    );
    request(g.admin, raw.as_bytes())
}

/// Three API-key clients: alice and bob in tenant acme, carol in globex.
fn config(backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[clusters.b]
backends = ["{backend}"]

[[models]]
name = "llama-3-8b"
[[models]]
name = "big-70b"

[[routes]]
name = "open"
path_prefix = "/open/"
cluster = "b"
anonymous = true

[[routes]]
name = "chat"
path_prefix = "/v1/"
protocol = "openai"
cluster = "b"

[[routes]]
name = "other"
path_prefix = "/"
cluster = "b"

[[authn.api_keys]]
client = "alice"
tenant = "acme"
sha256 = ["{ka}"]

[[authn.api_keys]]
client = "bob"
tenant = "acme"
sha256 = ["{kb}"]

[[authn.api_keys]]
client = "carol"
tenant = "globex"
sha256 = ["{kc}"]

[[authn.api_keys]]
client = "ops"
roles = ["admin"]
sha256 = ["{ko}"]

[[authz.rules]]
id = "ops-admin"
roles = ["admin"]
scopes = ["admin"]

[[authz.rules]]
id = "all"
tenants = ["*"]
models = ["*"]

{extra}
"#,
        ka = key_digest(ALICE),
        kb = key_digest(BOB),
        kc = key_digest(CAROL),
        ko = key_digest(OPS),
    )
}

fn start(extra: &str) -> (Gateway, Backend) {
    let b = Backend::start("rl");
    let g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, extra)));
    (g, b)
}

fn get(addr: SocketAddr, path: &str, key: &str) -> Response {
    let raw = format!("GET {path} HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\n\r\n");
    request(addr, raw.as_bytes())
}

fn chat(addr: SocketAddr, key: &str, model: &str, max_tokens: u64, stream: bool) -> Response {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}],"max_tokens":{max_tokens},"stream":{stream},"stream_options":{{"include_usage":true}}}}"#
    );
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-api-key: {key}\r\n\r\n{body}",
        body.len()
    );
    request(addr, raw.as_bytes())
}

fn error_code(r: &Response) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn principal_burst_then_rate_with_draft_headers() {
    let (g, _b) = start("[ratelimit.principal]\nrequests_per_second = 2\nburst = 3\n");
    let first = get(g.addr, "/x", ALICE);
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"principal\";q=3;w=2"),
        "{:?}",
        first.headers
    );
    assert_eq!(first.header("ratelimit"), Some("\"principal\";r=2;t=1"));
    assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    let refused = get(g.addr, "/x", ALICE);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_type(), "rate_limit_exceeded");
    assert_eq!(error_code(&refused), "requests");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.header("ratelimit"),
        Some("\"principal\";r=0;t=1"),
        "{:?}",
        refused.headers
    );
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"principal\";q=3;w=2")
    );
    // Another principal has its own bucket.
    assert_eq!(get(g.addr, "/x", BOB).status, 200);
    // The rate refills one request every 500 ms.
    std::thread::sleep(Duration::from_millis(550));
    assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    assert_eq!(get(g.addr, "/x", ALICE).status, 429);
    g.wait_metric(
        &[
            "gateway_ratelimit_decisions_total",
            "level=\"principal\"",
            "limit=\"requests\"",
            "result=\"refused\"",
        ],
        2.0,
    );
    assert!(g.log_shows("request refused by a rate limit"));
}

#[test]
fn tenant_route_and_ip_levels_combine() {
    let (g, _b) = start(
        "[ratelimit.tenant]\nrequests_per_second = 0.01\nburst = 4\n\
         [ratelimit.ip]\nrequests_per_second = 0.01\nburst = 7\n\
         [ratelimit.route]\nrequests_per_second = 0.01\nburst = 100\n",
    );
    // alice and bob share acme's 4.
    for key in [ALICE, BOB, ALICE, BOB] {
        assert_eq!(get(g.addr, "/x", key).status, 200);
    }
    let r = get(g.addr, "/x", BOB);
    assert_eq!((r.status, error_code(&r).as_str()), (429, "requests"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"tenant\";q=4;w=400"));
    // globex is another tenant: 3 more fit under the address's 7 (the refused one was given back).
    for _ in 0..3 {
        assert_eq!(get(g.addr, "/x", CAROL).status, 200);
    }
    let r = get(g.addr, "/x", CAROL);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("ratelimit-policy"), Some("\"ip\";q=7;w=700"));
    // Anonymous routes are limited by address only.
    assert_eq!(get(g.addr, "/open/x", "").status, 429);
    std::thread::sleep(Duration::from_millis(300));
    let m = g.metrics();
    let refused = |level: &str| {
        gateway_tests::gateway::sum_metric(
            &m,
            &[
                "gateway_ratelimit_decisions_total",
                &format!("level=\"{level}\""),
                "result=\"refused\"",
            ],
        )
    };
    assert_eq!((refused("tenant"), refused("ip")), (1.0, 2.0));
}

#[test]
fn x_ratelimit_style_and_no_headers_on_success() {
    let (g, _b) = start(
        "[ratelimit]\nheaders = \"x_ratelimit\"\nheaders_on_success = false\n[ratelimit.principal]\nrequests_per_second = 0.01\nburst = 1\n",
    );
    let ok = get(g.addr, "/x", ALICE);
    assert_eq!(ok.status, 200);
    assert!(ok.header("x-ratelimit-limit").is_none() && ok.header("ratelimit").is_none());
    let r = get(g.addr, "/x", ALICE);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-limit"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset"), Some("100"));
    assert_eq!(r.header("retry-after"), Some("100"));
    assert!(r.header("ratelimit").is_none());
}

#[test]
fn token_cost_is_charged_up_front_and_corrected_from_usage() {
    // 2000 tokens at once. A request declares 1500 output tokens: charged
    // 1503, refused a second time unless the backend's usage (≈50 tokens: it
    // counts a quarter of the body's bytes as prompt, plus 6) gives the rest back.
    let tokens = "[ratelimit.principal]\ntokens_per_minute = 0.001\ntoken_burst = 2000\n";
    let (g, _b) = start(tokens);
    for i in 0..5 {
        let r = chat(g.addr, ALICE, "llama-3-8b", 1500, false);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Streaming: the usage comes in the last SSE event.
    for i in 0..3 {
        let r = chat(g.addr, ALICE, "llama-3-8b", 1500, true);
        assert_eq!(r.status, 200, "stream {i}: {}", r.text());
    }
    std::thread::sleep(Duration::from_millis(300));
    let m = g.metrics();
    let estimated = gateway_tests::gateway::sum_metric(
        &m,
        &["gateway_ratelimit_tokens_total", "kind=\"estimated\""],
    );
    let actual = gateway_tests::gateway::sum_metric(
        &m,
        &["gateway_ratelimit_tokens_total", "kind=\"actual\""],
    );
    assert!(estimated >= 8.0 * 1500.0, "{estimated}");
    assert!(actual > 8.0 * 6.0 && actual < 8.0 * 100.0, "{actual}");

    // Without correction the second request is refused; a weighted model costs more.
    let (g2, _b2) = start(&format!(
        "{tokens}[ratelimit.cost]\ncorrect_from_usage = false\nmodel_weights = {{ \"big-70b\" = 4.0 }}\n"
    ));
    assert_eq!(chat(g2.addr, ALICE, "llama-3-8b", 1500, false).status, 200);
    let r = chat(g2.addr, ALICE, "llama-3-8b", 1500, false);
    assert_eq!((r.status, error_code(&r).as_str()), (429, "tokens"));
    // big-70b weighs 4: 4 × (3 + 400) = 1612 of bob's fresh 2000; then
    // 403 more is over, 303 fits.
    assert_eq!(chat(g2.addr, BOB, "big-70b", 400, false).status, 200);
    assert_eq!(chat(g2.addr, BOB, "llama-3-8b", 400, false).status, 429);
    assert_eq!(chat(g2.addr, BOB, "llama-3-8b", 300, false).status, 200);
}

#[test]
fn concurrency_limit_holds_through_a_long_stream() {
    let (g, b) = start("[ratelimit.principal]\nconcurrency = 1\n");
    // A long streaming response holds alice's one slot.
    let mut streaming = Client::connect(g.addr);
    streaming.send(
        format!("GET /sse-gated HTTP/1.1\r\nhost: t\r\nx-api-key: {ALICE}\r\n\r\n").as_bytes(),
    );
    let (status, _) = streaming.read_head();
    assert_eq!(status, 200);
    let r = get(g.addr, "/x", ALICE);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (429, "concurrency"),
        "{}",
        r.text()
    );
    assert_eq!(get(g.addr, "/x", BOB).status, 200, "bob has his own slot");
    b.release();
    // The stream ends; the slot comes back.
    while streaming.read_chunk().is_some_and(|c| !c.is_empty()) {}
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(g.addr, "/x", ALICE);
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot never came back: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn day_quota_survives_a_restart() {
    let dir = temp_dir("quota");
    let state = dir.join("quotas.json");
    let extra = format!(
        "[ratelimit]\nstate_file = \"{}\"\npersist_interval = \"1s\"\n[ratelimit.tenant]\nrequests_per_day = 3\n",
        state.display()
    );
    let b = Backend::start("rl");
    let mut g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, &extra)));
    let first = get(g.addr, "/x", ALICE);
    assert_eq!(first.status, 200);
    assert_eq!(
        first
            .header("ratelimit-policy")
            .map(|p| p.starts_with("\"tenant-day\";q=3;w=86400")),
        Some(true)
    );
    assert_eq!(get(g.addr, "/x", BOB).status, 200);
    assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    let r = get(g.addr, "/x", BOB);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (429, "requests_per_day")
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 86_400);
    assert_eq!(
        get(g.addr, "/x", CAROL).status,
        200,
        "globex has its own quota"
    );
    g.signal(libc::SIGTERM);
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
    let saved = std::fs::read_to_string(&state).expect("state file written");
    assert!(saved.contains("\"acme\""), "{saved}");

    // Same file, new process: acme's day is still used up.
    g.child = None;
    let g2 = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, &extra)));
    let r = get(g2.addr, "/x", ALICE);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (429, "requests_per_day"),
        "{}",
        r.text()
    );
    assert_eq!(get(g2.addr, "/x", CAROL).status, 200);
    assert!(g2.log_shows("quota counts restored"));

    // Operators see the counts, and can start a tenant's day over.
    let q = admin(&g2, "GET", "/ratelimit/quotas");
    assert_eq!(q.status, 200, "{}", q.text());
    assert_eq!(
        q.json()["tenants"]["acme"]["requests_today"],
        3,
        "{}",
        q.text()
    );
    assert_eq!(q.json()["tenants"]["globex"]["requests_today"], 2);
    let denied = request(
        g2.admin,
        b"GET /ratelimit/quotas HTTP/1.1\r\nhost: a\r\n\r\n",
    );
    assert_eq!(
        denied.status, 401,
        "the control plane needs the admin scope"
    );
    assert_eq!(admin(&g2, "DELETE", "/ratelimit/quotas/acme").status, 200);
    assert_eq!(get(g2.addr, "/x", ALICE).status, 200);
    assert_eq!(admin(&g2, "DELETE", "/ratelimit/quotas/nobody").status, 404);
}

#[test]
fn admitted_total_is_exact_across_workers() {
    let b = Backend::start("rl");
    let body = config(
        b.addr,
        "[ratelimit.route]\nrequests_per_second = 0.001\nburst = 150\n",
    );
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.workers = 2;
    let g = Gateway::start(spec);
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let addr = g.addr;
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (ok, refused) = (ok.clone(), refused.clone());
            std::thread::spawn(move || {
                for _ in 0..60 {
                    match get(addr, "/x", ALICE).status {
                        200 => ok.fetch_add(1, Ordering::Relaxed),
                        429 => refused.fetch_add(1, Ordering::Relaxed),
                        s => panic!("status {s}"),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        ok.load(Ordering::Relaxed),
        150,
        "exactly the burst, whatever the worker"
    );
    assert_eq!(refused.load(Ordering::Relaxed), 360 - 150);
    assert_eq!(b.stats.requests.load(Ordering::Relaxed), 150);
}

#[test]
fn escalation_blocks_a_hammering_address_but_spares_a_shared_one() {
    let extra = "[ratelimit.principal]\nrequests_per_second = 0.01\nburst = 1\n\
                 [ratelimit.escalation]\nenabled = true\nrefusals = 5\nwindow = \"10s\"\nblock_ttl = \"2s\"\nmax_good_principals = 1\n";
    let (g, _b) = start(extra);
    // bob behaves on this address: one good principal → alice's refusals don't escalate.
    assert_eq!(get(g.addr, "/x", BOB).status, 200);
    assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    for _ in 0..6 {
        assert_eq!(get(g.addr, "/x", ALICE).status, 429);
    }
    g.wait_metric(
        &[
            "gateway_ratelimit_escalations_total",
            "result=\"shared_address\"",
        ],
        1.0,
    );
    assert_eq!(get(g.addr, "/open/x", "").status, 200, "not blocked");
    assert!(g.log_shows("the address also carries well-behaved principals"));

    // A fresh gateway where only carol hammers: blocked (at accept, no XDP here), for the TTL.
    let (g, _b) = start(extra);
    assert_eq!(get(g.addr, "/x", CAROL).status, 200);
    for _ in 0..5 {
        assert_eq!(get(g.addr, "/x", CAROL).status, 429);
    }
    g.wait_metric(
        &["gateway_ratelimit_escalations_total", "result=\"blocked\""],
        1.0,
    );
    let mut c = Client::connect(g.addr);
    c.send(b"GET /open/x HTTP/1.1\r\nhost: t\r\n\r\n");
    assert!(c.closed_within(Duration::from_secs(2)), "blocked at accept");
    assert!(
        g.log_shows("repeat offender blocked at the NIC"),
        "{}",
        g.log_text()
    );
    assert_eq!(
        g.metric(&["gateway_xdp_blocked_sources", "reason=\"rate_limit\""]),
        1.0
    );
    // The TTL ends: served again.
    std::thread::sleep(Duration::from_millis(2500));
    let deadline = Instant::now() + Duration::from_secs(3);
    while get(g.addr, "/open/x", "").status != 200 {
        assert!(Instant::now() < deadline, "block never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Redis: fleet-wide tenant limits.

#[test]
fn two_gateways_share_a_tenant_limit_through_redis_and_survive_its_loss() {
    let dir = temp_dir("redis");
    let mut redis = Redis::start_on(free_port(), &dir);
    let (_b, _, g1, g2) = redis_pair(
        &redis,
        "20ms",
        "[ratelimit.tenant]\nrequests_per_second = 0.01\nburst = 20\n\
         [ratelimit.model]\nrequests_per_second = 0.01\nburst = 1000\non_redis_failure = \"closed\"\n",
    );
    // acme gets 20 across both gateways, not 20 each. Alternate, pausing
    // past a sync now and then so each sees the other's consumption.
    let mut ok = 0;
    for i in 0..40 {
        let g = if i % 2 == 0 { &g1 } else { &g2 };
        if get(g.addr, "/x", ALICE).status == 200 {
            ok += 1;
        }
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    assert!(
        (20..=22).contains(&ok),
        "fleet admitted {ok}: the shared limit is 20 (bound: one sync's worth over)"
    );

    // Redis goes away: the fail-open tenant level keeps working locally, the
    // fail-closed model level refuses with 503.
    redis.kill();
    g1.wait_metric(&["gateway_ratelimit_redis_errors_total"], 1.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while g1.metric(&["gateway_ratelimit_redis_up"]) != 0.0 {
        assert!(Instant::now() < deadline, "redis_up never dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = get(g1.addr, "/x", CAROL);
    assert_eq!(
        r.status, 200,
        "no model on this route: only fail-open levels apply"
    );
    let r = chat(g1.addr, CAROL, "llama-3-8b", 10, false);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (503, "redis_unavailable"),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").is_some());
    assert!(g1.log_shows("Redis unreachable"));

    // Back: reconnects (backoff), fleet limits again.
    redis.restart();
    for g in [&g1, &g2] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.metric(&["gateway_ratelimit_redis_up"]) != 1.0 {
            assert!(Instant::now() < deadline, "never reconnected");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(g1.log_shows("Redis reachable"));
    assert_eq!(chat(g1.addr, CAROL, "llama-3-8b", 10, false).status, 200);
    // The restarted Redis lost the counts (no persistence): acme starts
    // afresh, and the shared limit holds again across both gateways.
    let mut ok = 0;
    for i in 0..50 {
        let g = if i % 2 == 0 { &g1 } else { &g2 };
        if get(g.addr, "/x", BOB).status == 200 {
            ok += 1;
        }
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(60));
        }
    }
    assert!((20..=22).contains(&ok), "{ok}");
}

/// A caller already over its request rate is refused before its body is
/// read: the 429 comes back while a 4 MiB upload has barely started (the
/// gateway neither waits for nor checks a body it would refuse anyway).
#[test]
fn over_the_rate_refused_before_the_body_is_read() {
    use std::io::{Read, Write};
    let (g, _b) = start("[ratelimit.principal]\nrequests_per_second = 0.01\nburst = 1\n");
    assert_eq!(chat(g.addr, ALICE, "llama-3-8b", 16, false).status, 200);

    let mut s = std::net::TcpStream::connect(g.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-api-key: {ALICE}\r\n\r\n",
        4 << 20
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&[b' '; 1024]).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer before the body was sent: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Another caller is unaffected, and the refusal is counted once.
    assert_eq!(chat(g.addr, BOB, "llama-3-8b", 16, false).status, 200);
    let refused = g.wait_metric(
        &[
            "gateway_ratelimit_decisions_total",
            "level=\"principal\"",
            "result=\"refused\"",
        ],
        1.0,
    );
    assert_eq!(refused, 1.0);
}

/// A backend and two gateways sharing `redis` (synced every `sync`, with
/// `extra` config), both connected to it; the config body for more.
fn redis_pair(redis: &Redis, sync: &str, extra: &str) -> (Backend, String, Gateway, Gateway) {
    let extra = format!(
        "[ratelimit.redis]\naddress = \"127.0.0.1:{}\"\nsync_interval = \"{sync}\"\n{extra}",
        redis.port
    );
    let b = Backend::start("rl");
    let body = config(b.addr, &extra);
    let g1 = Gateway::start(Spec::new(Driver::Auto, &body));
    let g2 = Gateway::start(Spec::new(Driver::Auto, &body));
    for g in [&g1, &g2] {
        g.wait_metric(&["gateway_ratelimit_redis_up"], 1.0);
    }
    (b, body, g1, g2)
}

/// An API key revoked on one gateway is refused by every gateway sharing
/// the Redis, within about a second, with no restart; and a gateway started
/// later learns it too.
#[test]
fn a_revocation_reaches_the_fleet_through_redis() {
    let dir = temp_dir("redis-revoke");
    let redis = Redis::start_on(free_port(), &dir);
    let (_b, body, g1, g2) = redis_pair(&redis, "50ms", "");
    for g in [&g1, &g2] {
        assert_eq!(get(g.addr, "/x", ALICE).status, 200);
    }
    let digest = key_digest(ALICE);
    let payload = format!(r#"{{"sha256":"{digest}"}}"#);
    let raw = format!(
        "POST /authn/revoke HTTP/1.1\r\nhost: admin\r\nx-api-key: {OPS}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    );
    let r = request(g1.admin, raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let revoked_at = Instant::now();
    assert_eq!(
        get(g1.addr, "/x", ALICE).status,
        401,
        "at once where revoked"
    );
    while get(g2.addr, "/x", ALICE).status != 401 {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "the other gateway still accepts the revoked key after 2 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "revocation reached the other gateway in {:?}",
        revoked_at.elapsed()
    );
    assert_eq!(get(g2.addr, "/x", BOB).status, 200, "other keys unaffected");
    assert!(
        g2.log_shows("\"source\":\"fleet\""),
        "audited as a fleet revocation"
    );
    // A gateway that starts later reads the fleet's set on its first sync.
    let g3 = Gateway::start(Spec::new(Driver::Auto, &body));
    g3.wait_metric(&["gateway_ratelimit_redis_up"], 1.0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while get(g3.addr, "/x", ALICE).status != 401 {
        assert!(
            Instant::now() < deadline,
            "a new gateway never learned the revocation"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
