//! The validation stage against the real binary: OpenAI and KServe v2
//! requests, the model catalogue, schemas, content types and magic bytes,
//! and a property test that no body can make the gateway answer 5xx or hang.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gateway_tests::gateway::temp_dir;
use gateway_tests::{Backend, Client, Driver, Gateway, Response, Spec};

fn schema_file() -> PathBuf {
    let d = temp_dir("schema");
    let p = d.join("llama.schema.json");
    std::fs::write(
        &p,
        r#"{"type":"object","required":["user"],"properties":{"user":{"type":"string","maxLength":64},"seed":{"type":"integer","minimum":0}}}"#,
    )
    .unwrap();
    p
}

fn config(b: SocketAddr, schema: &Path) -> String {
    format!(
        r#"
[limits]
max_json_body_bytes = 65536
json_max_depth = 16

[timeouts]
client_body = "500ms"

[clusters.gpu]
backends = ["{b}"]

[[models]]
name = "llama"
versions = ["1.0", "1.1", "2.0"]
context_tokens = 1000
max_output_tokens = 200
max_n = 2

[[models]]
name = "strict"
schema = "{schema}"

[[models]]
name = "retired"
enabled = false

[[models]]
name = "resnet"
versions = ["1", "3"]

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

[[routes]]
name = "filtered"
host = "filtered.test"
path_prefix = "/"
response_drop_fields = ["/headers", "/id", "/choices/0/delta/role"]
cluster = "gpu"

[[routes]]
name = "images"
path_prefix = "/upload/"
content_types = ["image/png", "image/jpeg"]
max_request_body_bytes = 1048576
cluster = "gpu"
"#,
        schema = schema.display()
    )
}

fn post(c: &mut Client, path: &str, ctype: &str, body: &[u8]) -> Response {
    c.send(format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    c.send(body);
    c.read_response()
}

/// Status, error type, code and JSON pointer of a refusal (OpenAI routes
/// keep the pointer beside OpenAI's `param`; the gateway's shape has it as `param`).
fn refusal(r: &Response) -> (u16, String, String, String) {
    let ty = r.error_type();
    let v = r.json();
    let e = &v["error"];
    let pointer = e.get("pointer").unwrap_or(&e["param"]);
    (
        r.status,
        ty,
        e["code"].as_str().unwrap_or("").into(),
        pointer.as_str().unwrap_or("").into(),
    )
}

/// A KServe refusal: `{"error": "<message>"}` and nothing else (what
/// `tritonclient` parses); its status and the pointer the message ends with.
fn kserve_refusal(r: &Response) -> (u16, String) {
    let v = r.json();
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a string error: {v}"));
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let at = msg
        .rsplit_once("(at ")
        .map_or("", |(_, p)| p.trim_end_matches(')'));
    (r.status, at.to_string())
}

fn start(d: Driver) -> (Backend, Gateway) {
    let b = Backend::start("gpu");
    let schema = schema_file();
    let g = Gateway::start(Spec::new(d, &config(b.addr, &schema)));
    (b, g)
}

fn openai_requests(d: Driver) {
    let (b, g) = start(d);
    let mut c = Client::connect(g.addr);
    let ok = br#"{"model":"llama","messages":[{"role":"user","content":"hello"}],"max_tokens":50}"#;
    let r = post(&mut c, "/v1/chat/completions", "application/json", ok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "llama");

    type Case<'a> = (&'a [u8], &'a str, (u16, &'a str, &'a str, &'a str));
    let cases: &[Case] = &[
        (br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#, "application/json", (404, "not_found_error", "model_not_found", "/model")),
        (br#"{"model":"retired","messages":[{"role":"user","content":"x"}]}"#, "application/json", (404, "not_found_error", "model_disabled", "/model")),
        (br#"{"model":"llama@3","messages":[{"role":"user","content":"x"}]}"#, "application/json", (404, "not_found_error", "version_not_found", "/model")),
        (br#"{"model":"llama","messages":[{"role":"user","content":"x"}],"max_tokens":500}"#, "application/json", (400, "invalid_request_error", "max_tokens_out_of_range", "/max_tokens")),
        (br#"{"model":"llama","messages":[{"role":"wizard","content":"x"}]}"#, "application/json", (400, "invalid_request_error", "invalid_role", "/messages/0/role")),
        (br#"{"model":"llama","messages":[{"role":"user","content":"x"}],"temperature":9}"#, "application/json", (400, "invalid_request_error", "out_of_range", "/temperature")),
        (br#"{"model":"strict","messages":[{"role":"user","content":"x"}]}"#, "application/json", (400, "invalid_request_error", "schema_violation", "")),
        (br#"{"model":"strict","user":"u","seed":-1,"messages":[{"role":"user","content":"x"}]}"#, "application/json", (400, "invalid_request_error", "schema_violation", "/seed")),
        (br#"{"model":"llama","messages":[{"role":"user","content":"x"}"#, "application/json", (400, "invalid_request_error", "invalid_json", "")),
        (b"{\"model\":\"llama\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", "application/json", (400, "invalid_request_error", "invalid_json", "")),
    ];
    for (body, ct, want) in cases {
        let r = post(&mut c, "/v1/chat/completions", ct, body);
        let got = refusal(&r);
        assert_eq!(
            (got.0, got.1.as_str(), got.2.as_str(), got.3.as_str()),
            *want,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(
            !r.text().contains("wizard") && !r.text().contains("nope"),
            "payload echoed: {}",
            r.text()
        );
    }
    // The connection survived every refusal (each body was read whole).
    assert_eq!(
        g.wait_metric(&["gateway_connections_accepted_total"], 1.0),
        1.0
    );

    // A wrong media type is refused before the body is read; that connection closes.
    let mut c3 = Client::connect(g.addr);
    let r = post(
        &mut c3,
        "/v1/chat/completions",
        "text/plain",
        br#"{"model":"llama","messages":[]}"#,
    );
    assert_eq!(
        refusal(&r),
        (
            400,
            "invalid_request_error".into(),
            "unsupported_media_type".into(),
            "".into()
        )
    );
    // OpenAI's own names for the parameter, all four keys present.
    let r = post(
        &mut c,
        "/v1/chat/completions",
        "application/json",
        br#"{"model":"llama","messages":[{"role":"wizard","content":"x"}]}"#,
    );
    let e = &r.json()["error"];
    assert_eq!(e["param"], "messages[0].role", "{e}");
    let r = post(
        &mut c,
        "/v1/chat/completions",
        "application/json",
        br#"{"model":"nope","messages":[]}"#,
    );
    let e = &r.json()["error"];
    assert!(
        e["message"].is_string() && e["param"] == "model" && e["code"] == "model_not_found",
        "{e}"
    );

    // Context window: ~4 bytes a token; 3600 bytes + 200 output > 1000.
    let long = format!(
        r#"{{"model":"llama","messages":[{{"role":"user","content":"{}"}}],"max_tokens":200}}"#,
        "a".repeat(3600)
    );
    assert_eq!(
        refusal(&post(
            &mut c,
            "/v1/chat/completions",
            "application/json",
            long.as_bytes()
        ))
        .2,
        "context_length_exceeded"
    );

    // Too deep and too large.
    let deep = format!(
        r#"{{"model":"llama","x":{}{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(
        refusal(&post(
            &mut c,
            "/v1/chat/completions",
            "application/json",
            deep.as_bytes()
        ))
        .2,
        "json_too_deep"
    );
    let mut c2 = Client::connect(g.addr);
    let big = format!(
        r#"{{"model":"llama","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(70000)
    );
    let r = post(
        &mut c2,
        "/v1/chat/completions",
        "application/json",
        big.as_bytes(),
    );
    assert_eq!(r.status, 413);

    // Version resolution: suffix and header.
    let r = post(
        &mut c,
        "/v1/chat/completions",
        "application/json",
        br#"{"model":"llama@>=1.1","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 200);
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nX-Model-Version: 9\r\nContent-Length: 30\r\n\r\n{\"model\":\"llama\",\"prompt\":\"x\"}");
    assert_eq!(refusal(&c.read_response()).2, "version_not_found");

    // A chunked JSON body is read whole, checked, and sent on with a length.
    c.send(b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(b"10\r\n{\"model\":\"llama\"\r\n11\r\n,\"input\":\"hello\"}\r\n0\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["content-length"], "33");
    assert_eq!(r.json()["body_len"], 33);

    // The model list comes from the catalogue: enabled models only.
    let r = c.get("/v1/models");
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["llama", "resnet", "strict"]);

    // Paths the backend would decode or normalise into a checked endpoint are refused.
    for path in [
        "/v1/%63hat/completions",
        "/v1//chat/completions",
        "/v1/x/../chat/completions",
    ] {
        let mut c4 = Client::connect(g.addr);
        let r = post(&mut c4, path, "application/json", br#"{"model":"nope"}"#);
        assert_eq!(refusal(&r).2, "invalid_path", "{path}");
    }
    // Duplicate keys would be read differently by the backend: refused.
    let r = post(
        &mut c,
        "/v1/chat/completions",
        "application/json",
        br#"{"model":"llama","model":"nope","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(refusal(&r).2, "duplicate_key");

    // Nothing refused reached the backend.
    assert_eq!(b.requests(), 3);
    assert!(
        g.wait_metric(
            &[
                "gateway_validation_rejections_total",
                "reason=\"model_not_found\""
            ],
            1.0
        ) >= 1.0
    );
}

fn kserve_requests(d: Driver) {
    let (b, g) = start(d);
    let mut c = Client::connect(g.addr);
    let ok = br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
    let r = post(&mut c, "/v2/models/resnet/infer", "application/json", ok);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        post(
            &mut c,
            "/v2/models/resnet/versions/3/infer",
            "application/json",
            ok
        )
        .status,
        200
    );
    // (path, body, (status, pointer), reason in the metrics)
    type Case<'a> = (&'a str, &'a [u8], (u16, &'a str), &'a str);
    let cases: &[Case] = &[
        (
            "/v2/models/resnet/infer",
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}"#,
            (400, "/inputs/0/data"),
            "shape_mismatch",
        ),
        (
            "/v2/models/resnet/infer",
            br#"{"inputs":[{"name":"x","shape":[3],"datatype":"UINT8","data":[1,256,3]}]}"#,
            (400, "/inputs/0/data/1"),
            "datatype_mismatch",
        ),
        (
            "/v2/models/resnet/infer",
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP8","data":[1]}]}"#,
            (400, "/inputs/0/datatype"),
            "invalid_datatype",
        ),
        (
            "/v2/models/resnet/infer",
            br#"{"inputs":[]}"#,
            (400, "/inputs"),
            "empty_inputs",
        ),
        ("/v2/models/unknown/infer", ok, (404, ""), "model_not_found"),
        (
            "/v2/models/resnet/versions/2/infer",
            ok,
            (404, ""),
            "version_not_found",
        ),
    ];
    for (path, body, want, reason) in cases {
        let got = kserve_refusal(&post(&mut c, path, "application/json", body));
        assert_eq!(
            (got.0, got.1.as_str()),
            *want,
            "{path} {}",
            String::from_utf8_lossy(body)
        );
        let series = format!("reason=\"{reason}\"");
        assert!(
            g.wait_metric(&["gateway_validation_rejections_total", &series], 1.0) >= 1.0,
            "{reason}"
        );
    }
    // A model name from the path the catalogue doesn't know is no label value.
    let text = g.metrics();
    assert!(
        !text.contains("model=\"unknown\""),
        "client-chosen label: {text}"
    );
    assert!(text.contains("model=\"other\""), "{text}");
    // tritonclient sends no Content-Type: read as JSON.
    c.send(
        format!(
            "POST /v2/models/resnet/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            ok.len()
        )
        .as_bytes(),
    );
    c.send(ok);
    assert_eq!(c.read_response().status, 200);
    // Metadata and readiness pass through for known models only.
    assert_eq!(c.get("/v2/models/resnet").status, 200);
    assert_eq!(c.get("/v2/models/resnet/ready").status, 200);
    assert_eq!(c.get("/v2/models/unknown/ready").status, 404);
    assert_eq!(b.requests(), 5);
}

fn binary_uploads(d: Driver) {
    let (b, g) = start(d);
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend(std::iter::repeat_n(7u8, 300_000));
    let mut c = Client::connect(g.addr);
    let r = post(&mut c, "/upload/img", "image/png", &png);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], png.len() as u64);
    // Declared PNG, but a JPEG: refused before anything is forwarded.
    let mut c = Client::connect(g.addr);
    let r = post(
        &mut c,
        "/upload/img",
        "image/png",
        &[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert_eq!(refusal(&r).2, "content_mismatch");
    let mut c = Client::connect(g.addr);
    assert_eq!(
        refusal(&post(&mut c, "/upload/img", "application/pdf", b"%PDF-1.7")).0,
        415
    );
    // A chunked image over the route's limit: streamed, then cut off mid-stream.
    let mut c = Client::connect(g.addr);
    c.send(b"POST /upload/img HTTP/1.1\r\nHost: a\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(b"8\r\n\x89PNG\r\n\x1a\n\r\n");
    let chunk = format!("10000\r\n{}\r\n", "z".repeat(0x10000));
    for _ in 0..24 {
        use std::io::Write;
        if c.stream.write_all(chunk.as_bytes()).is_err() {
            break;
        }
    }
    let r = c.read_response();
    assert_eq!(r.status, 413);
    assert_eq!(
        b.requests(),
        1,
        "no over-limit body may reach the backend whole"
    );

    // Chunk framing padded so the signature can't be decided in one buffer: refused, not waved through.
    let mut c = Client::connect(g.addr);
    c.send(b"POST /upload/img HTTP/1.1\r\nHost: a\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n");
    let pad = format!("1;{}\r\nX\r\n", "e".repeat(4000));
    for _ in 0..20 {
        use std::io::Write;
        if c.stream.write_all(pad.as_bytes()).is_err() {
            break;
        }
    }
    assert_eq!(refusal(&c.read_response()).2, "content_mismatch");

    // Expect: 100-continue on a checked route: one 100, then the final answer.
    let mut c = Client::connect(g.addr);
    c.send(format!("POST /upload/img HTTP/1.1\r\nHost: a\r\nContent-Type: image/png\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", png.len()).as_bytes());
    assert_eq!(c.read_head().0, 100);
    c.send(&png);
    let (status, _) = c.read_head();
    assert_eq!(status, 200, "a second 100 Continue was sent");

    // A body that never comes, on a checked route: 408, and the worker lives on.
    let mut c = Client::connect(g.addr);
    c.send(b"POST /upload/img HTTP/1.1\r\nHost: a\r\nContent-Type: image/png\r\nContent-Length: 100\r\n\r\n");
    assert_eq!(c.read_response().status, 408);
    let mut c = Client::connect(g.addr);
    assert_eq!(post(&mut c, "/upload/img", "image/png", &png).status, 200);
    assert_eq!(g.metric(&["gateway_connection_panics_total"]), 0.0);
}

macro_rules! on_both {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn io_uring() {
                if gateway_tests::gateway::io_uring_available() {
                    super::$name(gateway_tests::Driver::IoUring);
                }
            }
            #[test]
            fn epoll() {
                super::$name(gateway_tests::Driver::Epoll);
            }
        }
    )*};
}
fn response_fields_are_dropped(d: Driver) {
    let (_b, g) = start(d);
    let mut c = Client::connect(g.addr);
    // A JSON response: rewritten with a new length, the rest intact.
    c.send(b"GET /some/path HTTP/1.1\r\nHost: filtered.test\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v.get("headers").is_none(), "{v}");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );
    // Chunked JSON too: read whole, filtered, sent with a length.
    c.send(b"GET /json-chunked HTTP/1.1\r\nHost: filtered.test\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(!r.chunked);
    assert_eq!(r.json(), serde_json::json!({"keep": 1}));
    // An SSE stream: each JSON event rewritten, [DONE] and framing intact,
    // and the connection still usable afterwards.
    let body = br#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    c.send(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: filtered.test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    c.send(body);
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    let text = r.text();
    assert_eq!(text.matches("data: ").count(), 7, "{text}");
    assert!(
        !text.contains("chatcmpl-demo"),
        "dropped field still there: {text}"
    );
    assert!(text.contains("\"content\":\"Hello\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    c.send(b"GET /after HTTP/1.1\r\nHost: filtered.test\r\n\r\n");
    assert_eq!(c.read_response().json()["path"], "/after");
}

on_both!(
    openai_requests,
    kserve_requests,
    binary_uploads,
    response_fields_are_dropped
);

mod property {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// One gateway and backend for every case (started once, on epoll and
    /// io_uring alternately would double the cost; `auto` here).
    fn shared() -> &'static (Backend, Gateway) {
        static G: OnceLock<(Backend, Gateway)> = OnceLock::new();
        G.get_or_init(|| start(Driver::Auto))
    }

    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            // Mutations of valid requests: truncations and byte flips.
            (0usize..90, any::<u8>()).prop_map(|(i, b)| {
                let mut v = br#"{"model":"llama","messages":[{"role":"user","content":"hello"}],"max_tokens":5}"#.to_vec();
                let i = i % v.len();
                v[i] = b;
                v
            }),
            (0usize..69).prop_map(|i| br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT8","data":[1,-2]}]}"#[..i].to_vec()),
            "[\\[\\]{}\",:0-9a-z ]{0,200}".prop_map(String::into_bytes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn no_body_gets_a_5xx_or_hangs(body in json_ish(), path in prop_oneof![
            Just("/v1/chat/completions"), Just("/v1/completions"), Just("/v1/embeddings"),
            Just("/v2/models/resnet/infer"), Just("/upload/x")
        ], ct in prop_oneof![Just("application/json"), Just("image/png"), Just("text/plain")]) {
            let (_, g) = shared();
            let mut c = Client::connect(g.addr);
            let r = post(&mut c, path, ct, &body);
            prop_assert!(r.status < 500, "{} for {path} {ct} {:?}: {}", r.status, String::from_utf8_lossy(&body), r.text());
            prop_assert!(r.status == 200 || (400..500).contains(&r.status));
        }
    }
}
