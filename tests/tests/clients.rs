//! Clients written by others, unmodified, through the real binary: the
//! official OpenAI Python SDK on an `openai` route and NVIDIA's
//! `tritonclient` (HTTP) on a `kserve` route. Each refusal must reach the
//! application as the client library's own exception type with the fields
//! it reads; nothing refused may reach the backend. The Python side lives in
//! `tests/py/` (installed by `cargo xtask setup`).

use std::path::PathBuf;
use std::process::Command;

use gateway_tests::jwt::key_digest;
use gateway_tests::{Backend, Driver, Gateway, Spec};

const KEY: &str = "sk-app-0123456789abcdef";
const LIMITED: &str = "sk-limited-0123456789abcdef";

fn config(backend: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
[clusters.gpu]
backends = ["{backend}"]

[[models]]
name = "llama"
context_tokens = 1000
max_output_tokens = 512

[[models]]
name = "whisper"

[[models]]
name = "simple"

[[routes]]
name = "openai"
path_prefix = "/v1/"
protocol = "openai"
cluster = "gpu"

[[routes]]
name = "kserve"
path_prefix = "/v2/"
protocol = "kserve"
cluster = "gpu"
auth = ["api_key"]

[[authn.api_keys]]
client = "app"
tenant = "acme"
sha256 = ["{k}"]

[[authn.api_keys]]
client = "limited"
tenant = "small"
sha256 = ["{l}"]

[[authz.rules]]
id = "acme-all"
tenants = ["acme"]
models = ["*"]

[[authz.rules]]
id = "small-llama"
tenants = ["small"]
models = ["llama", ""]
{extra}
"#,
        k = key_digest(KEY),
        l = key_digest(LIMITED),
    )
}

/// Run one of the Python client scripts; its failure message is the test's.
fn python(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("python3 runs (cargo xtask setup installs the client packages)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A counter once every worker's shard has been folded in (every 200 ms).
fn settled(g: &Gateway, parts: &[&str]) -> f64 {
    g.wait_metric(parts, 1.0);
    std::thread::sleep(std::time::Duration::from_millis(500));
    g.metric(parts)
}

fn openai_env(g: &Gateway) -> Vec<(&'static str, String)> {
    vec![
        ("GATEWAY", format!("http://{}", g.addr)),
        ("KEY", KEY.into()),
        ("LIMITED_KEY", LIMITED.into()),
        ("BAD_KEY", "sk-not-a-key-0123456789".into()),
    ]
}

#[test]
fn openai_sdk_unmodified() {
    let b = Backend::start("gpu");
    let g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, "")));
    let out = python("openai_client.py", &["main"], &openai_env(&g));
    assert!(out.contains("ok refusals"), "{out}");
    // The six successful calls reached the backend (the model list is the
    // gateway's own); none of the refused ones did.
    assert_eq!(b.requests(), 6, "{out}");
    // Refusals are counted as answered: 400s, not 422s.
    let bad = [
        "gateway_requests_total",
        "route=\"openai\"",
        "status=\"400\"",
    ];
    assert!(g.wait_metric(&bad, 5.0) >= 5.0);
    assert_eq!(g.metric(&["gateway_requests_total", "status=\"422\""]), 0.0);
    // The access log says who called, how, and what it cost.
    for field in [
        r#""principal":"app""#,
        r#""tenant":"acme""#,
        r#""auth":"api_key""#,
        r#""protocol":"http/1.1""#,
        r#""ttft_ms":"#,
    ] {
        assert!(g.log_shows(field), "access log lacks {field}");
    }
}

#[test]
fn openai_sdk_rate_limit_and_its_retries() {
    let b = Backend::start("gpu");
    let extra = "[ratelimit.principal]\nrequests_per_second = 0.5\nburst = 2\n";
    let g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, extra)));
    python("openai_client.py", &["rate"], &openai_env(&g));
    // Two in the burst, and the retried call once its wait was over.
    assert_eq!(b.requests(), 3);
    // The call without retries, and the retried call's first try.
    assert_eq!(
        settled(&g, &["gateway_requests_total", "status=\"429\""]),
        2.0
    );
}

#[test]
fn openai_sdk_quota_is_not_retried() {
    let b = Backend::start("gpu");
    let extra = "[ratelimit.tenant]\nrequests_per_day = 1\n";
    let g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, extra)));
    python("openai_client.py", &["quota"], &openai_env(&g));
    assert_eq!(b.requests(), 1);
    // `x-should-retry: false`: one refusal, no retries.
    assert_eq!(
        settled(&g, &["gateway_requests_total", "status=\"429\""]),
        1.0
    );
}

#[test]
fn tritonclient_unmodified() {
    let b = Backend::start("triton");
    let g = Gateway::start(Spec::new(Driver::Auto, &config(b.addr, "")));
    let env = [("GATEWAY", g.addr.to_string()), ("KEY", KEY.to_string())];
    let out = python("triton_client.py", &[], &env);
    assert!(out.contains("ok refusals"), "{out}");
    // live, ready (simple), two inferences; the refused ones never arrived.
    assert_eq!(b.requests(), 4, "{out}");
    for reason in [
        "binary_size_mismatch",
        "datatype_mismatch",
        "model_not_found",
    ] {
        let series = format!("reason=\"{reason}\"");
        assert!(
            g.wait_metric(&["gateway_validation_rejections_total", &series], 1.0) >= 1.0,
            "{reason}: {}",
            g.metrics()
        );
    }
}
