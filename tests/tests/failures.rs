//! Every timeout, every way a backend can fail, and every limit: each gets
//! its status and the JSON error shape, and never leaks internals.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use gateway_tests::gateway::free_port;
use gateway_tests::{both_drivers, one_cluster, request, Backend, Client, Driver, Gateway, Spec};

fn assert_no_internals(body: &str, backend: &str) {
    for leak in [backend, "refused", "os error", "Connection", "127.0.0.1"] {
        assert!(!body.contains(leak), "error body leaks `{leak}`: {body}");
    }
}

both_drivers!(backend_down_is_a_fast_502, |d: Driver| {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let g = Gateway::start(Spec::new(d, &one_cluster(dead)));
    let mut c = Client::connect(g.addr);
    let r = c.get("/v1/models");
    assert_eq!(r.status, 502);
    assert_eq!(r.error_type(), "bad_gateway");
    assert_no_internals(&r.text(), &dead.to_string());
    // The client connection survives an upstream failure.
    assert_eq!(c.get("/again").status, 502);
    assert_eq!(
        g.wait_metric(
            &["gateway_upstream_errors_total", "kind=\"connect_refused\""],
            2.0
        ),
        2.0
    );
    assert_eq!(
        g.metric(&["gateway_request_errors_total", "source=\"upstream\""]),
        2.0
    );
});

both_drivers!(backend_closing_or_resetting, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    // Accepts, reads, closes without a response → 502.
    let r = request(g.addr, b"GET /drop HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 502);
    assert_eq!(r.error_type(), "bad_gateway");
    // Resets mid-response: the head and 10 of 100000 bytes were relayed, then
    // the client connection is closed so the truncation is visible.
    let mut c = Client::connect(g.addr);
    c.send(b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n");
    let (status, headers) = c.read_head();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-length") && v == "100000"));
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "client connection must close on a truncated response"
    );
    assert!(c.leftover().len() < 100000);
    assert!(
        g.wait_metric(&["gateway_upstream_errors_total", "kind=\"reset\""], 1.0)
            + g.metric(&["gateway_upstream_errors_total", "kind=\"closed\""])
            >= 1.0
    );
});

/// A listening socket whose accept queue is full: SYNs to it are dropped, so
/// connecting hangs (a blackholed backend, without leaving loopback).
fn blackhole() -> (SocketAddr, Vec<TcpStream>, TcpStream) {
    // SAFETY: plain socket syscalls on a fresh fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let sock = unsafe { TcpStream::from_raw_fd(fd) };
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.sin_port = 0;
    unsafe {
        assert_eq!(
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
    }
    let addr = sock.local_addr().unwrap();
    // Fill the queue.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    (addr, fillers, sock)
}

both_drivers!(upstream_connect_timeout, |d: Driver| {
    let (addr, _fill, _l) = blackhole();
    let body = format!(
        "[timeouts]\nupstream_connect = \"300ms\"\n\n{}",
        one_cluster(addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    let t = Instant::now();
    let r = request(g.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 502);
    assert_eq!(r.error_type(), "bad_gateway");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        g.wait_metric(
            &["gateway_upstream_errors_total", "kind=\"connect_timeout\""],
            1.0
        ),
        1.0
    );
});

both_drivers!(upstream_response_timeout_per_route, |d: Driver| {
    let b = Backend::start("slow");
    let body = format!(
        "[timeouts]\nupstream_response = \"10s\"\n\n[clusters.b]\nbackends = [\"{}\"]\n\n\
[[routes]]\nname = \"fast\"\npath_prefix = \"/fast/\"\ncluster = \"b\"\n[routes.timeouts]\nupstream_response = \"300ms\"\n\n\
[[routes]]\nname = \"rest\"\npath_prefix = \"/\"\ncluster = \"b\"\n",
        b.addr
    );
    let g = Gateway::start(Spec::new(d, &body));
    // Same slow backend: the route with the short timeout gives up, the other waits.
    let r = request(
        g.addr,
        b"GET /fast/slow?ms=2000 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.error_type(), "gateway_timeout");
    let r = request(g.addr, b"GET /slow?ms=700 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        g.wait_metric(
            &["gateway_upstream_errors_total", "kind=\"response_timeout\""],
            1.0
        ),
        1.0
    );
});

both_drivers!(total_timeout_cuts_a_stream, |d: Driver| {
    let b = Backend::start("sse");
    let body = format!("[timeouts]\ntotal = \"600ms\"\n\n{}", one_cluster(b.addr));
    let g = Gateway::start(Spec::new(d, &body));
    // Before the head: 504.
    let r = request(g.addr, b"GET /slow?ms=3000 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 504);
    // Mid-stream: the relayed stream is cut and the connection closed.
    let mut c = Client::connect(g.addr);
    c.send(b"GET /sse?n=20&gap_ms=200 HTTP/1.1\r\nHost: a\r\n\r\n");
    let (status, _) = c.read_head();
    assert_eq!(status, 200);
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(!String::from_utf8_lossy(c.leftover()).contains("[DONE]"));
    assert!(
        g.wait_metric(
            &["gateway_upstream_errors_total", "kind=\"total_timeout\""],
            2.0
        ) >= 2.0
    );
});

both_drivers!(client_header_and_idle_timeouts, |d: Driver| {
    let b = Backend::start("b");
    let body = format!(
        "[timeouts]\nclient_header = \"400ms\"\nclient_idle = \"400ms\"\n\n{}",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    // Slowloris: half a head, then nothing → 408 and close.
    let mut c = Client::connect(g.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 408);
    assert_eq!(r.error_type(), "request_timeout");
    assert!(c.closed_within(Duration::from_secs(3)));
    // Idle keep-alive connection: closed quietly after the idle timeout.
    let mut c = Client::connect(g.addr);
    assert_eq!(c.get("/").status, 200);
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "idle connection not closed"
    );
    assert!(c.leftover().is_empty(), "an idle close sends nothing");
    // A body that stops arriving → 408.
    let body = format!(
        "[timeouts]\nclient_body = \"400ms\"\n\n{}",
        one_cluster(b.addr)
    );
    let g2 = Gateway::start(Spec::new(d, &body));
    let mut c = Client::connect(g2.addr);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-some");
    let r = c.read_response();
    assert_eq!(r.status, 408);
    drop(g);
});

both_drivers!(header_and_body_limits, |d: Driver| {
    let b = Backend::start("b");
    let body = format!(
        "[limits]\nmax_header_bytes = 2048\nmax_headers = 20\nmax_uri_bytes = 256\nmax_request_body_bytes = 1000\n\n{}",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    let check = |raw: Vec<u8>, status: u16, ty: &str| {
        let mut c = Client::connect(g.addr);
        c.send(&raw);
        let r = c.read_response();
        assert_eq!(
            r.status,
            status,
            "{}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        );
        assert_eq!(r.error_type(), ty);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed_within(Duration::from_secs(3)));
    };
    check(
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(300)).into_bytes(),
        414,
        "uri_too_long",
    );
    check(
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "v".repeat(3000)
        )
        .into_bytes(),
        431,
        "request_header_too_large",
    );
    check(
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-H: 1\r\n".repeat(25)
        )
        .into_bytes(),
        431,
        "request_header_too_large",
    );
    check(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n".to_vec(),
        413,
        "payload_too_large",
    );
    // Chunked over the limit: refused mid-stream.
    let mut raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("190\r\n{}\r\n", "x".repeat(400)).as_bytes());
    }
    check(raw, 413, "payload_too_large");
    assert_eq!(
        b.requests(),
        0,
        "nothing over a limit may reach the backend as a complete request"
    );
    assert!(
        g.wait_metric(
            &["gateway_request_errors_total", "kind=\"body_too_large\""],
            2.0
        ) >= 2.0
    );
});

both_drivers!(client_hangup_aborts_the_upstream_request, |d: Driver| {
    let b = Backend::start("gpu");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    c.send(b"POST /generate?ms=8000 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}");
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    // The gateway notices within its watch interval and closes the backend
    // connection, so the model server can stop generating.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.aborted() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        b.aborted(),
        1,
        "the backend kept generating for a client that left"
    );
    assert_eq!(
        g.wait_metric(
            &["gateway_request_errors_total", "kind=\"client_closed\""],
            1.0
        ),
        1.0
    );
    assert_eq!(g.metric(&["gateway_requests_total", "status=\"499\""]), 1.0);
});

both_drivers!(early_backend_answer_to_an_upload_is_relayed, |d: Driver| {
    let b = Backend::start("b");
    let body = format!(
        "[limits]\nmax_request_body_bytes = 1073741824\n\n{}",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    let mut c = Client::connect(g.addr);
    let total = 32 * 1024 * 1024;
    c.send(
        format!("PUT /reject-upload HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    );
    // Keep sending until the gateway stops taking bytes; it may cut us off.
    let block = vec![0u8; 1 << 20];
    for _ in 0..32 {
        use std::io::Write;
        if c.stream.write_all(&block).is_err() {
            break;
        }
    }
    let r = c.read_response();
    assert_eq!(
        r.status, 413,
        "the backend's own answer must reach the client, not a 502"
    );
});

both_drivers!(a_client_that_stops_reading_is_cut_off, |d: Driver| {
    let b = Backend::start("b");
    let body = format!("[timeouts]\nsend = \"500ms\"\n\n{}", one_cluster(b.addr));
    let g = Gateway::start(Spec::new(d, &body));
    let mut c = Client::connect(g.addr);
    c.send(
        format!(
            "GET /big?bytes={} HTTP/1.1\r\nHost: a\r\n\r\n",
            512 * 1024 * 1024
        )
        .as_bytes(),
    );
    // Never read. The gateway gives up once its writes stall for 500 ms.
    assert!(
        g.wait_metric(
            &["gateway_request_errors_total", "kind=\"send_timeout\""],
            1.0
        ) >= 1.0
    );
    drop(c);
});

both_drivers!(
    timeouts_with_buffered_bytes_never_take_the_worker_down,
    |d: Driver| {
        let b = Backend::start("b");
        let body = format!(
            "[timeouts]\nclient_header = \"300ms\"\n\n{}",
            one_cluster(b.addr)
        );
        let mut spec = Spec::new(d, &body);
        spec.workers = 1;
        let g = Gateway::start(spec);
        // A complete request and the start of the next, then silence: the first
        // is answered, the stalled one times out with bytes still buffered.
        let mut c = Client::connect(g.addr);
        c.send(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HT");
        assert_eq!(c.read_response().json()["path"], "/one");
        assert_eq!(c.read_response().status, 408);
        // The only worker is still serving.
        for _ in 0..3 {
            assert_eq!(
                request(g.addr, b"GET /alive HTTP/1.1\r\nHost: a\r\n\r\n").status,
                200
            );
        }
        assert_eq!(g.metric(&["gateway_connection_panics_total"]), 0.0);
    }
);

both_drivers!(backend_connection_cap_queues_then_sheds, |d: Driver| {
    let b = Backend::start("gpu");
    let body = format!(
        "[clusters.b]\nbackends = [\"{}\"]\nmax_connections = 1\npool_max_idle = 1\n\n\
[[routes]]\nname = \"patient\"\npath_prefix = \"/wait/\"\ncluster = \"b\"\n[routes.timeouts]\nupstream_connect = \"5s\"\n\n\
[[routes]]\nname = \"impatient\"\npath_prefix = \"/\"\ncluster = \"b\"\n[routes.timeouts]\nupstream_connect = \"300ms\"\n",
        b.addr
    );
    let mut spec = Spec::new(d, &body);
    spec.workers = 1;
    let g = Gateway::start(spec);
    // The only slot is busy for 1.5 s.
    let mut busy = Client::connect(g.addr);
    busy.send(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    // A request that can't wait that long is shed with 503 + Retry-After…
    let r = request(g.addr, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 503);
    assert_eq!(r.error_type(), "service_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    // …one that can is queued and served on the freed connection.
    let waiter =
        std::thread::spawn(move || request(g.addr, b"GET /wait/y HTTP/1.1\r\nHost: a\r\n\r\n"));
    assert_eq!(busy.read_response().status, 200);
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/wait/y");
    assert_eq!(
        b.connections(),
        1,
        "the cap allows one connection to the backend: {}",
        g.metrics()
    );
    drop(g);
});
