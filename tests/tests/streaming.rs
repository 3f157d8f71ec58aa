//! Streaming with bounded memory: SSE token streams relayed chunk by chunk,
//! and a 512 MiB upload that never gets buffered.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::backend::{fnv, FNV_INIT};
use gateway_tests::{both_drivers, one_cluster, Backend, Client, Driver, Gateway, Spec};

both_drivers!(
    sse_events_arrive_before_the_upstream_finishes,
    |d: Driver| {
        let b = Backend::start("b1");
        let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
        let mut c = Client::connect(g.addr);
        c.send(b"GET /sse-gated HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n");
        let (status, headers) = c.read_head();
        assert_eq!(status, 200);
        assert!(headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "text/event-stream"));
        // The backend holds the rest of the stream until released: the first
        // event can only be here if the gateway relayed it without waiting.
        let first = c.read_chunk().expect("first event");
        assert_eq!(first, b"data: {\"token\":0}\n\n");
        b.release();
        assert_eq!(c.read_chunk().expect("last event"), b"data: [DONE]\n\n");
        assert_eq!(c.read_chunk(), None);
        // And the connection is still good.
        assert_eq!(c.get("/after").status, 200);
    }
);

both_drivers!(openai_style_stream, |d: Driver| {
    let b = Backend::start("b1");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    let body = br#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    c.send(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    c.send(body);
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let text = r.text();
    assert_eq!(text.matches("data: ").count(), 7, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
});

/// Stream `total` bytes as a Content-Length upload while sampling the gateway's RSS.
fn upload(g: &Gateway, total: u64) -> (serde_json::Value, u64, u64) {
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let pid = g.pid();
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = s
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    peak.fetch_max(kb, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let before = g.rss_kib();
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "PUT /sink HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n").unwrap();
    let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let mut hash = FNV_INIT;
    let mut sent = 0u64;
    while sent < total {
        let k = (total - sent).min(block.len() as u64) as usize;
        s.write_all(&block[..k]).unwrap();
        hash = fnv_continue(hash, &block[..k]);
        sent += k as u64;
    }
    let mut c = Client::from_stream(s);
    let r = c.read_response();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["body_fnv"],
        format!("{hash:016x}"),
        "body corrupted in transit"
    );
    (v, before, peak.load(Ordering::SeqCst))
}

fn fnv_continue(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

both_drivers!(large_upload_is_streamed_with_bounded_memory, |d: Driver| {
    let b = Backend::start("sink");
    let body = format!(
        "[limits]\nmax_request_body_bytes = 1073741824\n\n{}",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(d, &body));
    let total = 512 * 1024 * 1024u64;
    let (v, before, peak) = upload(&g, total);
    assert_eq!(v["body_len"], total);
    // Bounded: a few buffers per connection, nowhere near the body size.
    assert!(
        peak < before + 48 * 1024,
        "RSS grew from {before} KiB to {peak} KiB while streaming 512 MiB"
    );
    assert_eq!(
        g.wait_metric(&["gateway_request_body_bytes_total"], total as f64),
        total as f64
    );
    assert_eq!(fnv(b""), FNV_INIT);
});

both_drivers!(
    large_download_is_streamed_with_bounded_memory,
    |d: Driver| {
        let b = Backend::start("big");
        let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
        let before = g.rss_kib();
        let mut c = Client::connect(g.addr);
        let r = c.get(&format!("/big?bytes={}", 256 * 1024 * 1024));
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 256 * 1024 * 1024);
        let after = g.rss_kib();
        assert!(
            after < before + 48 * 1024,
            "RSS grew from {before} KiB to {after} KiB relaying 256 MiB"
        );
    }
);
