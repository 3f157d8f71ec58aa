//! Stage 7 hot path: parsing and checking a JSON request body.
//!
//! Ways through the same validation, on the same bodies:
//! - `gateway`: what each worker does ([`check_json_in`] with its reused
//!   scratch memory): the pre-scan copies the body (checking and leaving out
//!   KServe tensor data), simd-json parses the copy onto a reused tape, the
//!   checks run on the tape.
//! - `gateway_parsing_all`: the same with every tensor value parsed by
//!   simd-json onto the tape (what a KServe body gets when a JSON Schema
//!   applies to it): shows what leaving tensor data out of the parse is worth.
//! - `gateway_fresh_memory`: the same with fresh working memory every time
//!   ([`check_json`]).
//! - `serde_json`: serde_json's parser building simd-json's borrowed DOM,
//!   then the same depth scan, shape limits and protocol checks
//!   ([`depth_within`], [`check_limits`], [`check_parsed`] — the checks are
//!   written once over `validate::json::Json`, which both forms implement).
//!
//! `cargo bench -p gateway-benches --bench validate` (about a minute; add
//! `-- --quick` for a shorter run).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use gateway::generation::Resolved;
use gateway::validate::openai::Endpoint;
use gateway::validate::{
    check_json, check_json_in, check_json_parsing_all, check_limits, check_parsed, depth_within,
    JsonKind, Rejection, Rules, Scratch,
};

/// A catalogue with an LLM and an image model, one OpenAI and one KServe route.
const CONFIG: &str = r#"
[clusters.llm]
backends = ["127.0.0.1:9"]

[clusters.vision]
backends = ["127.0.0.1:9"]

[[routes]]
name = "openai"
path_prefix = "/v1/"
cluster = "llm"
protocol = "openai"

[[routes]]
name = "kserve"
path_prefix = "/v2/"
cluster = "vision"
protocol = "kserve"

[[models]]
name = "llama"
versions = ["1"]
context_tokens = 8192
max_output_tokens = 4096

[[models]]
name = "resnet"
"#;

/// What an OpenAI SDK sends for a short chat completion (~300 bytes).
const CHAT: &str = r#"{"model":"llama","messages":[{"role":"system","content":"You are a concise assistant. Answer in one or two sentences, and say so when you do not know."},{"role":"user","content":"What is the difference between a reverse proxy and a load balancer, in practice?"}],"max_tokens":256,"temperature":0.7}"#;

/// A KServe v2 infer request of about `target` bytes: one FP32 input of
/// shape [1, N], N pseudo-random floats written like `12.345678`.
fn kserve_body(target: usize) -> Vec<u8> {
    const HEAD_GUESS: usize = 128;
    // Each value is "dd.dddddd," or "d.dddddd,": about 10 bytes.
    let n = (target - HEAD_GUESS) / 10;
    let mut data = String::with_capacity(n * 10 + 16);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..n {
        // xorshift64: reproducible, cheap, spread over [0, 100).
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = (x >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
        if i > 0 {
            data.push(',');
        }
        data.push_str(&format!("{v:.6}"));
    }
    format!(
        r#"{{"id":"bench-1","inputs":[{{"name":"input__0","shape":[1,{n}],"datatype":"FP32","data":[{data}]}}],"outputs":[{{"name":"output__0"}}]}}"#
    )
    .into_bytes()
}

fn rules() -> Rules {
    let resolved = Resolved::from_str(CONFIG, "bench").expect("bench config is valid");
    Rules::new(&resolved)
}

/// serde_json parse into the gateway's DOM type, then the gateway's checks.
fn serde_path(kind: JsonKind<'_>, body: &[u8], rules: &Rules) -> Result<bool, Rejection> {
    if !depth_within(body, rules.json.max_depth) {
        return Err(Rejection::new(400, "json_too_deep", "too deep"));
    }
    let v: simd_json::BorrowedValue<'_> = serde_json::from_slice(body)
        .map_err(|_| Rejection::new(400, "invalid_json", "not JSON"))?;
    check_limits(&v, rules.json)?;
    Ok(check_parsed(kind, &v, rules, None)?.model.is_some())
}

/// The worker's path, with its scratch memory kept between bodies.
fn gateway_path(
    kind: JsonKind<'_>,
    body: &[u8],
    scratch: &mut Scratch,
    rules: &Rules,
) -> Result<bool, Rejection> {
    Ok(check_json_in(kind, body, rules, None, scratch)?
        .model
        .is_some())
}

fn all_paths(g: &mut BenchmarkGroup<'_, WallTime>, kind: JsonKind<'_>, body: &[u8], rules: &Rules) {
    let mut scratch = Scratch::default();
    // A benchmark of a rejection would measure the wrong thing.
    assert_eq!(
        check_json(kind, body, rules, None).map(|c| c.model.is_some()),
        Ok(true),
        "fresh memory must admit the body"
    );
    assert_eq!(
        gateway_path(kind, body, &mut scratch, rules),
        Ok(true),
        "the worker's path must admit the body"
    );
    assert_eq!(
        serde_path(kind, body, rules),
        Ok(true),
        "serde_json path must admit the body"
    );

    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("gateway", |b| {
        b.iter(|| {
            let r = gateway_path(kind, black_box(body), &mut scratch, rules);
            assert!(r.is_ok());
            black_box(r)
        })
    });
    g.bench_function("gateway_parsing_all", |b| {
        b.iter(|| {
            let r = check_json_parsing_all(kind, black_box(body), rules, &mut scratch);
            assert!(r.is_ok());
            black_box(r.map(|c| c.model.is_some()))
        })
    });
    g.bench_function("gateway_fresh_memory", |b| {
        b.iter(|| {
            let r = check_json(kind, black_box(body), rules, None);
            assert!(r.is_ok());
            black_box(r.map(|c| c.model.is_some()))
        })
    });
    g.bench_function("serde_json", |b| {
        b.iter(|| {
            let r = serde_path(kind, black_box(body), rules);
            assert!(r.is_ok());
            black_box(r)
        })
    });
}

fn bench_validate(c: &mut Criterion) {
    let rules = rules();
    let chat = JsonKind::OpenAi(Endpoint::Chat, None);
    let infer = JsonKind::KserveInfer("resnet", None, None);

    let mut g = c.benchmark_group(format!("validate_openai_chat_{}b", CHAT.len()));
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    all_paths(&mut g, chat, CHAT.as_bytes(), &rules);
    g.finish();

    let mib = kserve_body(1 << 20);
    let mut g = c.benchmark_group("validate_kserve_1mib");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    all_paths(&mut g, infer, &mib, &rules);
    g.finish();
    drop(mib);

    // Just under the default limits.max_json_body_bytes (16 MiB).
    let big = kserve_body((16 << 20) - 4096);
    let mut g = c.benchmark_group("validate_kserve_16mib");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    all_paths(&mut g, infer, &big, &rules);
    g.finish();
}

criterion_group!(benches, bench_validate);
criterion_main!(benches);
