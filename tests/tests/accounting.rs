//! Every streamed token accounted, through the real binary in front of a
//! simulated vLLM server (which, like vLLM, reports usage in a stream only
//! when asked): the gateway asks for it and hides the usage-only event from
//! a client that didn't; a backend that still reports none has its stream's
//! events counted; usage per tenant and model as metrics and `GET /usage`;
//! a stream that outgrows its caller's token budget is cut with OpenAI's
//! error event, and the model server sees the hang-up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use gateway_tests::jwt::key_digest;
use gateway_tests::{request, Driver, Gateway, Spec};

const KEY: &str = "sk-acme-0123456789abcdef";
const OPS: &str = "sk-ops-0123456789abcdef";

fn config(sim: SocketAddr, ratelimit: &str) -> String {
    format!(
        "[clusters.p]\nbackends = [\"{sim}\"]\n[[models]]\nname = \"m\"\n\
         [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"p\"\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
         [[authn.api_keys]]\nclient = \"ops\"\nroles = [\"admin\"]\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n\
         [[authz.rules]]\nid = \"ops\"\nroles = [\"admin\"]\nscopes = [\"admin\"]\n{ratelimit}\n",
        key_digest(KEY),
        key_digest(OPS)
    )
}

fn start(body: &str) -> Gateway {
    Gateway::start(Spec::new(Driver::Auto, body))
}

/// A chat request body with `extra` members (e.g. `"max_tokens":5`).
fn stream(g: &Gateway, extra: &str) -> (u16, String) {
    let body = format!(
        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"hello there, how are you"}}]{extra}}}"#
    );
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn content_events(text: &str) -> usize {
    text.matches("\"delta\":{\"content\"").count()
}

fn usage_doc(g: &Gateway) -> serde_json::Value {
    let raw = format!("GET /usage HTTP/1.1\r\nhost: admin\r\nx-api-key: {OPS}\r\n\r\n");
    let r = request(g.admin, raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn acme(doc: &serde_json::Value) -> serde_json::Value {
    doc["since_start"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme" && t["model"] == "m")
        .cloned()
        .unwrap_or_default()
}

#[test]
fn streams_are_asked_for_usage_and_clients_that_did_not_ask_never_see_it() {
    let sim = GpuSim::start(SimConfig::default());
    let g = start(&config(
        sim.addr,
        "[ratelimit.tenant]\ntokens_per_minute = 1000000\n",
    ));
    // Not asked: the backend is asked, the client gets no usage event.
    let (st, text) = stream(&g, r#","max_tokens":7"#);
    assert_eq!(st, 200, "{text}");
    assert_eq!(content_events(&text), 7);
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.contains("data: [DONE]"));
    // `stream_options` without include_usage: the same, the other options kept.
    let (st, text) = stream(
        &g,
        r#","max_tokens":5,"stream_options":{"include_usage":false}"#,
    );
    assert_eq!(st, 200);
    assert!(!text.contains("\"usage\""), "{text}");
    // Asked: the client gets its usage event as before.
    let (st, text) = stream(
        &g,
        r#","max_tokens":3,"stream_options":{"include_usage":true}"#,
    );
    assert_eq!(st, 200);
    assert!(text.contains("\"completion_tokens\":3"), "{text}");
    // Settled on the backend's counts: 7 + 5 + 3 output tokens, none counted by event.
    let doc = usage_doc(&g);
    let a = acme(&doc);
    assert_eq!(a["requests"], 3, "{doc}");
    assert_eq!(a["completion_tokens"], 15, "{doc}");
    assert_eq!(a["completion_tokens_counted"], 0, "{doc}");
    assert!(a["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        g.metric(&[
            "gateway_usage_tokens_total",
            "tenant=\"acme\"",
            "model=\"m\"",
            "kind=\"completion\""
        ]),
        15.0
    );
    // The rate limit was corrected to what the backend reported.
    assert!(g.wait_metric(&["gateway_ratelimit_tokens_total", "kind=\"actual\""], 16.0) > 15.0);
}

#[test]
fn a_stream_with_no_usage_report_is_counted_by_its_events() {
    let sim = GpuSim::start(SimConfig::default());
    // The gateway doesn't ask: the backend reports nothing in the stream.
    let g = start(&config(
        sim.addr,
        "[ratelimit.cost]\nstream_usage = false\n[ratelimit.tenant]\ntokens_per_minute = 1000000\n",
    ));
    let (st, text) = stream(&g, r#","max_tokens":9"#);
    assert_eq!(st, 200);
    assert!(!text.contains("\"usage\""));
    let a = acme(&usage_doc(&g));
    assert_eq!(a["completion_tokens"], 9);
    assert_eq!(a["completion_tokens_counted"], 9);
}

#[test]
fn a_stream_past_its_callers_token_quota_is_cut_and_the_backend_aborts() {
    // The model runs long when no max_tokens is given; the gateway's estimate is 8.
    let sim = GpuSim::start(SimConfig {
        default_output: 400,
        step_ms: 5.0,
        ..Default::default()
    });
    let g = start(&config(
        sim.addr,
        "[ratelimit.cost]\ndefault_max_tokens = 8\n[ratelimit.tenant]\ntokens_per_day = 60\ncut_streams = true\n",
    ));
    let t0 = Instant::now();
    let (st, text) = stream(&g, "");
    assert_eq!(st, 200);
    let n = content_events(&text);
    assert!(
        (40..=70).contains(&n),
        "cut near the 60-token quota, got {n} tokens"
    );
    let last: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("data: "))
        .rev()
        .take(2)
        .collect();
    assert_eq!(last[0], "data: [DONE]", "{text}");
    let err: serde_json::Value = serde_json::from_str(&last[1]["data: ".len()..]).unwrap();
    assert_eq!(err["error"]["code"], "token_quota_exceeded");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert!(t0.elapsed() < Duration::from_secs(1), "not run to the end");
    // The model server saw the hang-up and stopped generating.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.aborted() == 0 {
        assert!(Instant::now() < deadline, "the backend kept generating");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sim.completed(), 0);
    assert_eq!(g.wait_metric(&["gateway_stream_cuts_total"], 1.0), 1.0);
    assert!(g.log_shows("stream ended"));
    // What it streamed was charged: the quota is spent.
    let (st, _) = stream(&g, "");
    assert_eq!(st, 429);
}
