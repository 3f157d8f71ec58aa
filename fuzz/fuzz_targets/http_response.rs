//! The upstream response head parser: never panics; an accepted head lies
//! within the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut head = gateway::codec::ResponseHead::default();
    for is_head in [false, true] {
        if let Ok(true) = gateway::codec::parse_response(data, 16 * 1024, 128, is_head, &mut head) {
            assert!(head.head_len <= data.len());
            assert!((100..=599).contains(&head.status));
        }
    }
});
