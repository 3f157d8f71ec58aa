//! Proxying behaviour: headers, keep-alive on both sides, chunked both ways,
//! routing, Expect: 100-continue, HTTP/1.0, pipelining — on both drivers.

use gateway_tests::backend::fnv;
use gateway_tests::{both_drivers, one_cluster, request, Backend, Client, Driver, Gateway, Spec};

both_drivers!(forwards_and_rewrites_headers, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    c.send(
        b"GET /echo?q=1 HTTP/1.1\r\nHost: api.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n\
Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9v\r\nUpgrade: websocket\r\n\
X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Custom: kept\r\n\r\n",
    );
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let v = r.json();
    let h = &v["headers"];
    assert_eq!(v["path"], "/echo");
    assert_eq!(h["host"], "api.test");
    assert_eq!(h["x-custom"], "kept");
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
        "connection",
    ] {
        assert!(
            h.get(gone).is_none(),
            "hop-by-hop header {gone} reached the backend: {h}"
        );
    }
    // Untrusted client: its X-Forwarded-For is replaced, not appended to.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    // A request id is generated, sent upstream and returned to the client.
    let rid = r
        .header("x-request-id")
        .expect("x-request-id returned")
        .to_string();
    assert_eq!(rid.len(), 32);
    assert_eq!(h["x-request-id"], rid.as_str());

    // A client-supplied id is propagated as is; a malformed one is replaced.
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: trace-abc.123\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.header("x-request-id"), Some("trace-abc.123"));
    assert_eq!(r.json()["headers"]["x-request-id"], "trace-abc.123");
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: bad id\"<>\r\n\r\n");
    let r = c.read_response();
    assert_ne!(r.header("x-request-id"), Some("bad id\"<>"));
    assert_eq!(r.header("x-request-id").unwrap().len(), 32);
});

both_drivers!(keep_alive_is_reused_on_both_sides, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    for i in 0..30 {
        let r = c.get(&format!("/n/{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/n/{i}"));
    }
    // One client connection carried every request; the gateway's worker kept
    // one upstream connection for all of them.
    assert_eq!(
        g.wait_metric(&["gateway_requests_total", "status=\"200\""], 30.0),
        30.0
    );
    assert_eq!(g.metric(&["gateway_connections_accepted_total"]), 1.0);
    assert_eq!(
        b.connections(),
        1,
        "backend saw {} connections for 30 sequential requests",
        b.connections()
    );
    assert_eq!(
        g.metric(&["gateway_upstream_connections_opened_total"]),
        1.0
    );
    assert_eq!(
        g.metric(&["gateway_upstream_connections_reused_total"]),
        29.0
    );
    assert_eq!(g.metric(&["gateway_upstream_pool_idle_connections"]), 1.0);
});

both_drivers!(chunked_both_ways, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    // Chunked request body, with an extension and a trailer, sent in pieces.
    let parts: [&[u8]; 4] = [b"hello ", b"chunked ", b"world", &[7u8; 3000]];
    let mut whole = Vec::new();
    c.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (i, p) in parts.iter().enumerate() {
        whole.extend_from_slice(p);
        let ext = if i == 0 { ";name=value" } else { "" };
        c.send(format!("{:x}{ext}\r\n", p.len()).as_bytes());
        c.send(p);
        c.send(b"\r\n");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    c.send(b"0\r\nX-Checksum: 1\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["body_len"], whole.len() as u64);
    assert_eq!(v["body_fnv"], format!("{:016x}", fnv(&whole)));
    assert_eq!(v["headers"]["transfer-encoding"], "chunked");

    // Chunked response relayed as chunked, intact.
    let r = c.get("/chunked?n=20&size=5000");
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    assert_eq!(r.body.len(), 100_000);
    assert_eq!(&r.body[..5000], &[b'a'; 5000][..]);
    assert_eq!(&r.body[95_000..], &[b't'; 5000][..]);

    // A close-delimited upstream body becomes chunked for an HTTP/1.1 client,
    // and the client connection stays usable.
    let r = c.get("/close?bytes=70000");
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    assert_eq!(r.body, vec![b'z'; 70000]);
    assert_eq!(c.get("/after").status, 200);
});

both_drivers!(routes_by_host_path_and_method, |d: Driver| {
    let chat = Backend::start("chat");
    let models = Backend::start("models");
    let other = Backend::start("other");
    let body = format!(
        r#"
[clusters.chat]
backends = ["{}"]
[clusters.models]
backends = ["{}"]
[clusters.other]
backends = ["{}"]

[[routes]]
name = "chat"
host = "api.example.com"
path_prefix = "/v1/chat/"
methods = ["POST"]
cluster = "chat"

[[routes]]
name = "models"
path_exact = "/v1/models"
methods = ["GET"]
cluster = "models"

[[routes]]
name = "tenant"
host = "*.tenants.example.com"
path_prefix = "/"
cluster = "other"
"#,
        chat.addr, models.addr, other.addr
    );
    let g = Gateway::start(Spec::new(d, &body));
    let who = |raw: &str| {
        let r = request(g.addr, raw.as_bytes());
        (
            r.status,
            if r.status == 200 {
                r.json()["backend"].as_str().unwrap_or("").to_string()
            } else {
                r.error_type()
            },
        )
    };
    assert_eq!(who("POST /v1/chat/echo HTTP/1.1\r\nHost: API.example.com:8443\r\nContent-Length: 2\r\n\r\n{}"), (200, "chat".into()));
    assert_eq!(
        who("GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
        (200, "models".into())
    );
    assert_eq!(
        who("GET /v1/models/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        (404, "not_found".into())
    );
    assert_eq!(
        who("GET /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\n\r\n"),
        (404, "not_found".into())
    );
    assert_eq!(
        who("GET /anything HTTP/1.1\r\nHost: a.tenants.example.com\r\n\r\n"),
        (200, "other".into())
    );
    assert_eq!(
        who("GET /anything HTTP/1.1\r\nHost: tenants.example.com\r\n\r\n"),
        (404, "not_found".into())
    );

    // A 404 without a body keeps the connection open.
    let mut c = Client::connect(g.addr);
    let r = c.get("/nowhere");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("connection"), None);
    assert_eq!(c.get("/v1/models").status, 200);
    assert_eq!(
        g.wait_metric(&["gateway_requests_total", "status=\"404\""], 4.0),
        4.0
    );
});

both_drivers!(expect_100_continue, |d: Driver| {
    let b = Backend::start("b1");
    let body = format!(
        "[limits]\nmax_request_body_bytes = 1000\n\n{}",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    let mut c = Client::connect(g.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let (status, _) = c.read_head();
    assert_eq!(status, 100, "the gateway must invite the body");
    c.send(b"12345");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 5);
    assert!(r.json()["headers"].get("expect").is_none());

    // Too large: refused before the client sends the body.
    let mut c = Client::connect(g.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 413);
    assert_eq!(r.error_type(), "payload_too_large");
    assert_eq!(b.requests(), 1);
});

both_drivers!(http10_and_pipelining, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    // HTTP/1.0 without keep-alive: answered, then closed; chunked upstream
    // bodies are de-chunked for it.
    let mut c = Client::connect(g.addr);
    c.send(b"GET /chunked?n=3&size=10 HTTP/1.0\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(!r.chunked);
    assert_eq!(r.body.len(), 30);
    assert!(c.closed_within(std::time::Duration::from_secs(2)));

    // Two pipelined requests in one write: two responses, in order.
    let mut c = Client::connect(g.addr);
    c.send(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nPOST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
    let r1 = c.read_response();
    let r2 = c.read_response();
    assert_eq!(r1.json()["path"], "/one");
    assert_eq!(r2.json()["path"], "/two");
    assert_eq!(r2.json()["body_len"], 3);
});

both_drivers!(
    load_spreads_round_robin_and_skips_dead_backends,
    |d: Driver| {
        let a = Backend::start("a");
        let b2 = Backend::start("b");
        let dead = format!("127.0.0.1:{}", gateway_tests::gateway::free_port());
        let body = format!(
        "[clusters.pool]\nbackends = [\"{}\", \"{dead}\", \"{}\"]\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"pool\"\n",
        a.addr, b2.addr
    );
        let mut spec = Spec::new(d, &body);
        spec.workers = 1;
        let g = Gateway::start(spec);
        let mut c = Client::connect(g.addr);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..30 {
            let r = c.get("/x");
            assert_eq!(
                r.status, 200,
                "a dead backend must be skipped, not surfaced"
            );
            *seen
                .entry(r.json()["backend"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        assert!(
            seen["a"] >= 10 && seen["b"] >= 10,
            "uneven spread: {seen:?}"
        );
        assert!(
            g.wait_metric(
                &["gateway_upstream_errors_total", "kind=\"connect_refused\""],
                1.0
            ) >= 1.0
        );
    }
);
