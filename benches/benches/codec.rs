//! Stage 2 hot path: request-head parsing and chunked-body scanning.
//!
//! `cargo bench -p gateway-benches --bench codec` (add `-- --quick` for a short run).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::codec::{parse_request, ChunkedDecoder, RequestHead};
use gateway::config::Limits;

const SMALL_GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gw.internal\r\n\r\n";

/// What an OpenAI-compatible SDK sends for a chat completion (12 headers).
const CHAT_POST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: OpenAI/Python 1.51.0\r\n\
Accept: application/json\r\n\
Accept-Encoding: gzip, deflate\r\n\
Content-Type: application/json\r\n\
Content-Length: 187\r\n\
Authorization: Bearer sk-proj-0123456789abcdefghijklmnopqrstuvwxyzABCDEF\r\n\
X-Request-Id: 3f2c9a1e-8d4b-4c7a-9e21-5b6f0d1a2c3e\r\n\
X-Stainless-Lang: python\r\n\
X-Stainless-Package-Version: 1.51.0\r\n\
X-Stainless-Retry-Count: 0\r\n\
Connection: keep-alive\r\n\
\r\n";

/// A head with 60 headers: far more than clients send, well under the limit (100).
fn many_headers() -> Vec<u8> {
    let mut h = b"POST /v1/completions HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 42\r\n"
        .to_vec();
    for i in 0..58 {
        h.extend_from_slice(
            format!("X-Custom-Header-{i:02}: value-{i:02}-abcdefghijklmnopqrstuvwxyz\r\n")
                .as_bytes(),
        );
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// 64 KiB of payload as 64 chunks of 1 KiB, then the last chunk.
fn chunked_body() -> Vec<u8> {
    let mut b = Vec::with_capacity(70 * 1024);
    for i in 0..64u8 {
        b.extend_from_slice(b"400\r\n");
        b.extend(std::iter::repeat_n(b'a' + i % 26, 1024));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"0\r\n\r\n");
    b
}

fn bench_parse_request(c: &mut Criterion) {
    let limits = Limits::default();
    let many = many_headers();
    let cases: [(&str, &[u8]); 3] = [
        ("small_get", SMALL_GET),
        ("chat_post_12h", CHAT_POST),
        ("60_headers", &many),
    ];

    let mut g = c.benchmark_group("parse_request");
    for (name, buf) in cases {
        let mut head = RequestHead::default();
        // A benchmark of an error path would measure the wrong thing.
        assert_eq!(
            parse_request(buf, &limits, &mut head),
            Ok(true),
            "{name} must parse"
        );
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let done = parse_request(black_box(buf), &limits, &mut head);
                black_box((done, head.headers.len()))
            })
        });
    }
    g.finish();
}

fn bench_chunked(c: &mut Criterion) {
    let body = chunked_body();
    let scan = |reads: usize| {
        let mut dec = ChunkedDecoder::new();
        let mut payload = 0usize;
        let mut consumed = 0usize;
        for part in body.chunks(reads) {
            consumed += dec
                .feed(black_box(part), |r| payload += r.len())
                .expect("valid chunked body");
        }
        assert!(dec.is_done());
        (consumed, payload)
    };
    assert_eq!(scan(body.len()), (body.len(), 64 * 1024));

    let mut g = c.benchmark_group("chunked_decoder_64k");
    g.throughput(Throughput::Bytes(body.len() as u64));
    // The whole body in one buffer, and as the 16 KiB reads a socket would hand over.
    g.bench_function("one_buffer", |b| b.iter(|| black_box(scan(body.len()))));
    g.bench_function("16k_reads", |b| b.iter(|| black_box(scan(16 * 1024))));
    g.finish();
}

criterion_group!(benches, bench_parse_request, bench_chunked);
criterion_main!(benches);
