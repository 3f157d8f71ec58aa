//! HTTP/2 from clients (h2c, prior knowledge) through the real binary, on
//! both I/O drivers, with clients written by others — curl, nghttp, h2load —
//! and misbehaving ones crafted with python-hyper's `h2` (`tests/py/
//! h2_abuse.py`): every stage applies to a stream as to an HTTP/1.1
//! request (the same refusals), bodies both ways arrive whole, streams are
//! multiplexed, HTTP/1.1 still works on the same listener, and each
//! HTTP/2 limit holds: rapid reset, CONTINUATION floods, PING/SETTINGS
//! floods, concurrent streams, header list size, idle connections.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::backend::fnv;
use gateway_tests::jwt::key_digest;
use gateway_tests::{both_drivers, request, Backend, Driver, Gateway, Spec};

const KEY: &str = "sk-h2-0123456789abcdef";

fn start(d: Driver, backend: std::net::SocketAddr, http2: &str) -> Gateway {
    let body = format!(
        "[http2]\n{http2}\n[clusters.b]\nbackends = [\"{backend}\"]\n[[models]]\nname = \"m\"\n\
         [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"b\"\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\nanonymous = true\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n",
        key_digest(KEY)
    );
    Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(d, &body)
    })
}

/// curl over h2c with prior knowledge: (HTTP version, status, body).
fn curl(g: &Gateway, path: &str, args: &[&str]) -> (String, u16, Vec<u8>) {
    gateway_tests::curl_h2c(g.addr, path, args)
}

both_drivers!(requests_streams_and_refusals_over_h2c, |d: Driver| {
    let b = Backend::start("h2");
    let g = start(d, b.addr, "");
    // A plain GET; the backend saw an ordinary HTTP/1.1 request.
    let (v, code, body) = curl(&g, "/echo?q=1", &[]);
    assert_eq!((v.as_str(), code), ("2", 200));
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/echo");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["headers"]["host"], g.addr.to_string());
    // An upload without content-length arrives whole (re-framed as chunks).
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let file = g.dir.join("upload");
    std::fs::write(&file, &upload).unwrap();
    let (_, code, body) = curl(
        &g,
        "/echo",
        &[
            "-X",
            "PUT",
            "-H",
            "transfer-encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    );
    assert_eq!(code, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_len"], upload.len());
    assert_eq!(seen["body_fnv"], format!("{:016x}", fnv(&upload)));
    // A large download, whole.
    let (_, code, body) = curl(&g, "/big?bytes=5000000", &[]);
    assert_eq!((code, body.len()), (200, 5_000_000));
    let (_, code, body) = curl(&g, "/chunked?n=50&size=10000", &[]);
    assert_eq!((code, body.len()), (200, 500_000));
    // The OpenAI route: authn, validation and the OpenAI error shape apply.
    let auth = format!("authorization: Bearer {KEY}");
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let (_, code, body) = curl(
        &g,
        "/v1/chat/completions",
        &[
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            chat,
        ],
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let (_, code, _) = curl(
        &g,
        "/v1/chat/completions",
        &["-H", "content-type: application/json", "-d", chat],
    );
    assert_eq!(code, 401);
    let (_, code, body) = curl(
        &g,
        "/v1/chat/completions",
        &[
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"model":"m","temperature":9,"messages":[{"role":"user","content":"hi"}]}"#,
        ],
    );
    assert_eq!(code, 400);
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"]["param"], "temperature");
    // A stream: every event, in order, the usage event hidden.
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (_, code, body) = curl(
        &g,
        "/v1/chat/completions",
        &[
            "-N",
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            stream,
        ],
    );
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("\"delta\"").count(), 6, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // HTTP/1.1 on the same listener still works.
    let r = request(g.addr, b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(g.metric(&["gateway_h2_connections_total", "result=\"accepted\""]) >= 7.0);
    assert!(
        g.wait_metric(
            &["gateway_requests_total", "route=\"chat\"", "status=\"401\""],
            1.0
        ) >= 1.0
    );
});

both_drivers!(h2load_multiplexes_streams, |d: Driver| {
    let b = Backend::start("h2");
    let g = start(d, b.addr, "");
    let out = Command::new("h2load")
        .args(["-n", "600", "-c", "3", "-m", "20"])
        .arg(format!("http://{}/echo", g.addr))
        .output()
        .expect("h2load runs (cargo xtask setup installs nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("600 succeeded"), "{text}");
    assert!(text.contains("600 2xx"), "{text}");
    // nghttp: one connection, several streams at once, each answered.
    let out = Command::new("nghttp")
        .args(["-n", "-s", "-m", "5"])
        .arg(format!("http://{}/slow?ms=200", g.addr))
        .output()
        .expect("nghttp runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        g.metric(&["gateway_h2_connections_total", "result=\"accepted\""]),
        4.0
    );
});

fn abuse(g: &Gateway, scenario: &str) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/h2_abuse.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(g.addr.to_string())
        .arg(scenario)
        .output()
        .expect("python3 runs (cargo xtask setup installs h2)");
    assert!(
        out.status.success(),
        "{scenario}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Another client is still served, quickly, after an attack.
fn still_serves(g: &Gateway) {
    let t = Instant::now();
    let (_, code, _) = curl(g, "/echo", &[]);
    assert_eq!(code, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn rapid_reset_ends_the_connection_with_goaway() {
    let b = Backend::start("h2");
    let g = start(Driver::Auto, b.addr, "max_concurrent_streams = 32");
    let rss = g.rss_kib();
    let r = abuse(&g, "rapid_reset");
    // ENHANCE_YOUR_CALM (11), long before the 2000 resets were all sent.
    assert_eq!(r["goaway"], 11, "{r}");
    // Counted as the gateway's own rapid-reset guard or h2's pending-reset limit.
    let calm = g.metric(&["gateway_h2_goaways_total", "reason=\"rapid_reset\""])
        + g.metric(&["gateway_h2_goaways_total", "reason=\"enhance_your_calm\""]);
    assert!(calm >= 1.0);
    // The streams it had started reached the backend at most twice the limit.
    assert!(
        b.requests() <= 2 * 32 + 1,
        "{} requests reached the backend",
        b.requests()
    );
    still_serves(&g);
    assert!(g.rss_kib() < rss + 64 * 1024);
}

#[test]
fn continuation_flood_is_refused_at_the_header_list_limit() {
    let b = Backend::start("h2");
    let g = start(Driver::Auto, b.addr, "max_header_list_size = 16384");
    let rss = g.rss_kib();
    let r = abuse(&g, "continuation");
    assert!(r["closed"] == true || !r["goaway"].is_null(), "{r}");
    // It stopped being read long before 20 MB of headers.
    assert!(r["sent_bytes"].as_u64().unwrap() < 20_000_000, "{r}");
    assert_eq!(b.requests(), 0);
    still_serves(&g);
    assert!(
        g.rss_kib() < rss + 32 * 1024,
        "RSS grew from {rss} to {} KiB",
        g.rss_kib()
    );
}

#[test]
fn ping_and_settings_floods_stay_bounded_and_others_are_served() {
    let b = Backend::start("h2");
    let g = start(Driver::Auto, b.addr, "");
    let rss = g.rss_kib();
    for s in ["ping_flood", "settings_flood"] {
        let r = abuse(&g, s);
        // Either answered once it read the acks, or the flooder was cut off;
        // never an unbounded queue of acknowledgements.
        assert!(r["sent"].as_u64().unwrap() > 0, "{s}: {r}");
        still_serves(&g);
    }
    assert!(
        g.rss_kib() < rss + 32 * 1024,
        "RSS grew from {rss} to {} KiB",
        g.rss_kib()
    );
}

#[test]
fn concurrent_streams_and_header_size_limits_hold() {
    let b = Backend::start("h2");
    let g = start(
        Driver::Auto,
        b.addr,
        "max_concurrent_streams = 50\nmax_header_list_size = 8192",
    );
    let r = abuse(&g, "streams");
    assert_eq!(r["max_concurrent_streams"], 50, "{r}");
    // 50 served; the other 150 refused by the client's own h2 or reset by the gateway.
    assert!(r["ok"].as_u64().unwrap() >= 50, "{r}");
    let before = b.requests();
    let r = abuse(&g, "big_header");
    assert!(
        r["status"] == 431 || !r["reset"].is_null() || !r["goaway"].is_null(),
        "a 64 KiB header is refused: {r}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        b.requests(),
        before,
        "the oversized request never reached the backend"
    );
}

#[test]
fn an_idle_h2_connection_gets_goaway() {
    let b = Backend::start("h2");
    let g = start(Driver::Auto, b.addr, "idle_timeout = \"300ms\"");
    let out = Command::new("nghttp")
        .args(["-n", "-v"])
        .arg(format!("http://{}/echo", g.addr))
        .output()
        .unwrap();
    assert!(out.status.success());
    // nghttp closes after its request; a raw client that stays silent is sent GOAWAY.
    let r = abuse_idle(&g);
    assert!(r, "no GOAWAY within 3 s of idleness");
    assert!(g.metric(&["gateway_h2_goaways_total", "reason=\"idle\""]) >= 1.0);
}

/// Open an h2c connection, say nothing more, wait for the GOAWAY frame.
fn abuse_idle(g: &Gateway) -> bool {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(g.addr).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        // Frames: 9-byte headers; GOAWAY is type 7.
        let mut i = 0;
        while i + 9 <= buf.len() {
            let len = (usize::from(buf[i]) << 16)
                | (usize::from(buf[i + 1]) << 8)
                | usize::from(buf[i + 2]);
            if buf[i + 3] == 7 {
                return true;
            }
            i += 9 + len;
        }
    }
    false
}

#[test]
fn tls_clients_that_choose_h2_by_alpn_get_http2_with_their_certificate_identity() {
    use gateway_tests::tls::{write_pair, Ca};
    let dir = gateway_tests::gateway::temp_dir("h2tls");
    let ca = Ca::new("h2 test CA");
    write_pair(&dir, "api", &ca.leaf(&["api.test"]));
    let clients = Ca::new("h2 client CA");
    std::fs::write(dir.join("clients-ca.pem"), &clients.pem).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let (cert, key) = write_pair(&dir, "svc", &clients.client("svc-a"));
    let b = Backend::start("h2tls");
    let port = gateway_tests::gateway::free_port();
    let body = format!(
        "[tls]\nlisten = [\"127.0.0.1:{port}\"]\nclient_auth = \"optional\"\nclient_ca = \"{d}/clients-ca.pem\"\n\
         [[tls.certificates]]\ncert = \"{d}/api.crt\"\nkey = \"{d}/api.key\"\n\
         [clusters.b]\nbackends = [\"{}\"]\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n\
         [[authn.mtls_clients]]\nname = \"svc-a\"\nclient = \"service-a\"\ntenant = \"acme\"\n\
         [[authz.rules]]\nid = \"any\"\ntenants = [\"*\"]\n",
        b.addr,
        d = dir.display()
    );
    let g = Gateway::start(Spec::new(Driver::Auto, &body));
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--cacert"])
            .arg(dir.join("ca.pem"))
            .args([
                "--resolve",
                &format!("api.test:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .args(extra)
            .arg(format!("https://api.test:{port}/who"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, tail) = text.rsplit_once('\n').unwrap();
        (tail.to_string(), body.to_string())
    };
    let (tail, body) = curl(&[
        "--http2",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(tail, "2 200", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["x-gateway-principal"], "service-a");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    // Without a certificate: no identity, 401; HTTP/1.1 still offered.
    let (tail, _) = curl(&["--http2"]);
    assert_eq!(tail, "2 401");
    let (tail, _) = curl(&[
        "--http1.1",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(tail, "1.1 200");
    assert!(g.metric(&["gateway_h2_connections_total", "result=\"accepted\""]) >= 2.0);
}

/// curl over h2c, with the response headers: (status, headers, body).
fn curl_headers(g: &Gateway, path: &str, args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-D", "-"])
        .args(args)
        .arg(format!("http://{}{path}", g.addr))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn rate_limits_and_balancing_hold_over_h2() {
    let (b1, b2) = (Backend::start("one"), Backend::start("two"));
    let body = format!(
        "[clusters.b]\nbackends = [\"{}\", \"{}\"]\n[clusters.b.balance]\nalgorithm = \"round_robin\"\n\
         [[models]]\nname = \"m\"\n\
         [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"b\"\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\nanonymous = true\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n\
         [ratelimit.principal]\nrequests_per_second = 0.01\nburst = 2\n",
        b1.addr,
        b2.addr,
        key_digest(KEY)
    );
    let g = Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(Driver::Auto, &body)
    });
    // Balancing: round robin over both backends, stream after stream.
    for _ in 0..6 {
        assert_eq!(curl_headers(&g, "/echo", &[]).0, 200);
    }
    assert_eq!((b1.requests(), b2.requests()), (3, 3));
    // Rate limits: the third request of a burst of 2 is refused, in OpenAI's shape,
    // with Retry-After and the rate-limit headers.
    let auth = format!("authorization: Bearer {KEY}");
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let args = [
        "-H",
        auth.as_str(),
        "-H",
        "content-type: application/json",
        "-d",
        chat,
    ];
    assert_eq!(curl_headers(&g, "/v1/chat/completions", &args).0, 200);
    assert_eq!(curl_headers(&g, "/v1/chat/completions", &args).0, 200);
    let (status, head, body) = curl_headers(&g, "/v1/chat/completions", &args);
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(head.contains("ratelimit"), "{head}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert!(
        g.wait_metric(
            &[
                "gateway_requests_total",
                "status=\"429\"",
                "protocol=\"h2c\""
            ],
            1.0
        ) >= 1.0
    );
}
