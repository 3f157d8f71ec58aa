//! The HTTP/1.1 request head parser: never panics, and a head it accepts
//! has its ranges inside the input and a length no larger than the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = gateway::config::Limits::default();
    let mut head = gateway::codec::RequestHead::default();
    if let Ok(true) = gateway::codec::parse_request(data, &limits, &mut head) {
        assert!(head.head_len <= data.len());
        for r in [&head.method, &head.target] {
            assert!(r.end <= head.head_len);
        }
        for h in &head.headers {
            assert!(h.name.end <= head.head_len && h.value.end <= head.head_len);
        }
    }
});
