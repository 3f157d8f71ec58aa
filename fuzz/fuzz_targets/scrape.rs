//! Model-server metrics and ORCA headers: any text parses to a sample or
//! nothing, never a panic, and whatever a server reports, the load the
//! balancer keeps stays in range (KV use a fraction).
#![no_main]
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;

use gateway::balance::{scrape, BackendLoad};
use gateway::config::Engine;

fn keep(s: &scrape::Sample) {
    let b = BackendLoad::new("127.0.0.1:1".parse().unwrap());
    b.report(s.waiting, s.running, s.kv);
    assert!(b.kv_permille.load(Ordering::Relaxed) <= 1000);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for e in [Engine::Vllm, Engine::Sglang, Engine::Tgi, Engine::Triton] {
            keep(&scrape::parse(e, text));
        }
    }
    if let Some(s) = scrape::parse_orca(data) {
        keep(&s);
    }
});
