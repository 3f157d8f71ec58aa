//! KServe v2 gRPC calls naming a model: any bytes are a checked request or
//! a refusal with a status and reason, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

use gateway::validate::kserve_grpc::{check, Call};

fuzz_target!(|data: &[u8]| {
    let catalog = gateway::catalog::Catalog::new(vec![gateway::catalog::Model {
        name: "simple".into(),
        versions: vec![gateway::catalog::Version::parse("1").unwrap()],
        enabled: true,
        limits: Default::default(),
        schema: None,
    }]);
    for call in [Call::Infer, Call::Ready, Call::Metadata] {
        if let Err(r) = check(call, data, &catalog) {
            assert!(r.status >= 400 && !r.reason.is_empty());
        }
    }
});
