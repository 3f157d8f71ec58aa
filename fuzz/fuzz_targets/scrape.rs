//! Model-server metrics and ORCA headers: any text parses to a sample or
//! nothing, never a panic; KV use stays a fraction.
#![no_main]
use libfuzzer_sys::fuzz_target;

use gateway::balance::scrape;
use gateway::config::Engine;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for e in [Engine::Vllm, Engine::Sglang, Engine::Tgi, Engine::Triton] {
            let s = scrape::parse(e, text);
            if let Some(kv) = s.kv {
                assert!((0.0..=1.0).contains(&kv) || kv.is_nan());
            }
        }
    }
    let _ = scrape::parse_orca(data);
});
