//! The X.509 name reader (client certificates → identities): any DER is a
//! subject or nothing, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gateway::x509::subject(data);
});
