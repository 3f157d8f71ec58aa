//! The chunked-body decoder: whatever the input and however it is split
//! across reads, the same verdict, the same payload and the same length.
#![no_main]
use libfuzzer_sys::fuzz_target;

fn run(parts: &[&[u8]]) -> (Result<usize, ()>, Vec<u8>, bool) {
    let mut d = gateway::codec::ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut used = 0;
    for p in parts {
        let mut rest: &[u8] = p;
        if d.is_done() {
            break;
        }
        match d.feed(rest, |r| out.extend_from_slice(&rest[r])) {
            Ok(n) => {
                used += n;
                rest = &rest[n..];
                let _ = rest;
            }
            Err(_) => return (Err(()), out, false),
        }
    }
    (Ok(used), out, d.is_done())
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let body = &data[1..];
    let split = split.min(body.len());
    let whole = run(&[body]);
    let halves = run(&[&body[..split], &body[split..]]);
    assert_eq!(whole.0.is_ok(), halves.0.is_ok());
    if whole.2 {
        assert_eq!(whole, halves);
    }
});
