//! The configuration loader: any text is a configuration or a list of
//! errors an operator can read (file, key, message), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = gateway::generation::Resolved::from_str(text, "fuzz.toml") {
            for err in &e.0 {
                assert!(!err.message.is_empty());
            }
        }
    }
});
