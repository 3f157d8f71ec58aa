//! gRPC routes through the real binary, with the official Python gRPC
//! library on both sides (`tests/py/grpc_pair.py`: a grpcio server as the
//! backend, a grpcio client through the gateway's h2c listener): unary,
//! server-streaming and bidirectional calls relayed with the backend's
//! statuses and trailers; the gateway's own refusals as gRPC statuses
//! (UNAUTHENTICATED, RESOURCE_EXHAUSTED with retry pushback, NOT_FOUND);
//! `grpc-timeout`; the standard health service passed through.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use gateway_tests::gateway::free_port;
use gateway_tests::jwt::key_digest;
use gateway_tests::{Driver, Gateway, Spec};

const KEY: &str = "sk-grpc-0123456789abcdef";
const LIMITED: &str = "sk-grpc-limited-0123456789";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/grpc_pair.py")
}

/// The grpcio backend, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend(port: u16) -> Server {
    backend_with(&["server", &port.to_string()])
}

fn backend_with(args: &[&str]) -> Server {
    let mut child = Command::new("python3")
        .arg(script())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (cargo xtask setup installs grpcio)");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the grpcio server did not start");
    Server(child)
}

#[test]
fn grpc_calls_are_relayed_and_refusals_are_grpc_statuses() {
    let port = free_port();
    let _server = backend(port);
    let body = format!(
        "[clusters.g]\nbackends = [\"127.0.0.1:{port}\"]\n\
         [[routes]]\nname = \"echo\"\npath_prefix = \"/test.Echo/\"\nprotocol = \"grpc\"\ncluster = \"g\"\n\
         [[routes]]\nname = \"health\"\npath_prefix = \"/grpc.health.v1.Health/\"\nprotocol = \"grpc\"\ncluster = \"g\"\nanonymous = true\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
         [[authn.api_keys]]\nclient = \"limited\"\ntenant = \"small\"\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n\
         [ratelimit.classes.tight.principal]\nrequests_per_second = 0.01\nburst = 1\n\
         [ratelimit.tenant_classes]\nsmall = \"tight\"\n",
        key_digest(KEY),
        key_digest(LIMITED)
    );
    let g = Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(Driver::Auto, &body)
    });
    let out = Command::new("python3")
        .arg(script())
        .args(["client", &g.addr.to_string(), KEY, LIMITED])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Relayed: messages, streams both ways, the backend's trailers and statuses.
    assert_eq!(r["unary"]["value"]["resp"], "echo:hello", "{r}");
    assert_eq!(r["unary"]["value"]["trailer"], "yes", "{r}");
    assert_eq!(
        r["server_stream"]["value"],
        serde_json::json!(["0:x", "1:x", "2:x", "3:x", "4:x"])
    );
    assert_eq!(
        r["bidi"]["value"],
        serde_json::json!(["re:a", "re:b", "re:c"])
    );
    assert_eq!(r["fail"]["code"], "NOT_FOUND");
    assert_eq!(r["fail"]["details"], "nope, not here");
    assert_eq!(r["health"]["value"], "SERVING");
    // The backend sees the gateway's request id and the client's address.
    assert_eq!(r["who"]["value"]["x-forwarded-for"], "127.0.0.1", "{r}");
    assert!(r["who"]["value"]["x-request-id"]
        .as_str()
        .is_some_and(|s| s.len() >= 16));
    // The gateway's own answers, as gRPC statuses.
    assert_eq!(r["no_key"]["code"], "UNAUTHENTICATED", "{r}");
    assert_eq!(r["limited_1"]["ok"], true, "{r}");
    assert_eq!(r["limited_2"]["code"], "RESOURCE_EXHAUSTED", "{r}");
    assert!(
        r["limited_2"]["pushback"]
            .as_str()
            .is_some_and(|p| p.parse::<u64>().unwrap() >= 1000),
        "{r}"
    );
    assert_eq!(r["no_route"]["code"], "NOT_FOUND", "{r}");
    assert_eq!(r["deadline"]["code"], "DEADLINE_EXCEEDED", "{r}");
    assert!(g.metric(&["gateway_h2_streams_total"]) >= 10.0);
}

#[test]
fn kserve_grpc_model_infer_is_decoded_routed_and_its_tensors_checked() {
    let port = free_port();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/triton_grpc.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["server", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (cargo xtask setup installs tritonclient[grpc])");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    assert_eq!(line.trim(), "ready");
    let body = format!(
        "[clusters.triton]\nbackends = [\"127.0.0.1:{port}\"]\n[[models]]\nname = \"simple\"\nversions = [\"1\"]\n\
         [[routes]]\nname = \"grpc-health\"\npath_prefix = \"/inference.GRPCInferenceService/Server\"\nprotocol = \"grpc\"\ncluster = \"triton\"\nanonymous = true\n\
         [[routes]]\nname = \"kserve-grpc\"\npath_prefix = \"/inference.GRPCInferenceService/\"\nprotocol = \"grpc\"\ncluster = \"triton\"\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"acme\"\ntenants = [\"acme\"]\nmodels = [\"simple\"]\n",
        key_digest(KEY)
    );
    let g = Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(Driver::Auto, &body)
    });
    let out = Command::new("python3")
        .arg(&script)
        .args(["client", &g.addr.to_string(), KEY])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["live"]["value"], true, "{r}");
    assert_eq!(r["ready"]["value"], true, "{r}");
    assert_eq!(r["metadata"]["value"], "simple", "{r}");
    let expected: Vec<Vec<i32>> = vec![(0..16).collect()];
    assert_eq!(r["infer"]["value"], serde_json::json!(expected), "{r}");
    assert_eq!(r["unknown_model"]["status"], "StatusCode.NOT_FOUND", "{r}");
    assert_eq!(r["no_key"]["status"], "StatusCode.UNAUTHENTICATED", "{r}");
    assert_eq!(r["bad_raw"]["status"], "INVALID_ARGUMENT", "{r}");
    assert!(
        r["bad_raw"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/raw_input_contents/0")),
        "{r}"
    );
    // The model routed and counted like a REST request's.
    assert!(
        g.wait_metric(
            &["gateway_validation_rejections_total", "model=\"simple\""],
            1.0
        ) >= 1.0
    );
}

#[test]
fn grpc_reaches_a_tls_backend_over_h2_by_alpn() {
    use gateway_tests::tls::{write_pair, Ca};
    let dir = gateway_tests::gateway::temp_dir("grpc-tls");
    let ca = Ca::new("grpc backend CA");
    let (cert, key) = write_pair(&dir, "backend", &ca.leaf(&["grpc.test"]));
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let port = free_port();
    let _server = backend_with(&[
        "server-tls",
        &port.to_string(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    ]);
    let body = format!(
        "[clusters.g]\nbackends = [\"127.0.0.1:{port}\"]\n[clusters.g.tls]\nca = \"{}\"\nserver_name = \"grpc.test\"\n\
         [[routes]]\nname = \"echo\"\npath_prefix = \"/\"\nprotocol = \"grpc\"\ncluster = \"g\"\nanonymous = true\n",
        dir.join("ca.pem").display()
    );
    let g = Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(Driver::Auto, &body)
    });
    let out = Command::new("python3")
        .arg(script())
        .args(["client", &g.addr.to_string(), KEY, LIMITED])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["unary"]["value"]["resp"], "echo:hello", "{r}");
    assert_eq!(
        r["bidi"]["value"],
        serde_json::json!(["re:a", "re:b", "re:c"]),
        "{r}"
    );
    assert_eq!(r["health"]["value"], "SERVING", "{r}");
}
