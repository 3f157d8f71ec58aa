//! The SSE event filter (with the usage tap) and the usage scanner: the
//! output, the content events counted and the usage found do not depend on
//! how the stream is split across reads.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

fn run(parts: &[&[u8]], strip: bool) -> (Vec<u8>, u64, (Option<u64>, Option<u64>)) {
    let filter = gateway::filter::FieldFilter::new(&["/usage/internal".to_string()]).unwrap();
    let mut f = gateway::filter::SseFilter::new(Arc::new(filter), 4096);
    f.tap.strip_usage = strip;
    let mut u = gateway::ratelimit::usage::UsageScan::default();
    let mut out = Vec::new();
    for p in parts {
        u.feed(p);
        f.feed(p, &mut out);
    }
    f.finish(&mut out);
    (out, f.tap.content_events, u.counts())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let strip = data[0] & 1 == 1;
    let body = &data[2..];
    let split = (data[1] as usize).min(body.len());
    let whole = run(&[body], strip);
    let parts = run(&[&body[..split], &body[split..]], strip);
    assert_eq!(whole.0, parts.0);
    assert_eq!(whole.1, parts.1);
});
