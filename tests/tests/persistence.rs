//! State that survives a restart: blocks added at run time (`[xdp]
//! state_file`, enforced at accept here: no NIC needed) and API keys revoked
//! through the admin API (`[authn] revocations_file`) are back, with their
//! remaining TTL, in the next process before it serves anyone; an expired
//! block is not; a config block is not written to the file.

use std::time::Duration;

use gateway_tests::gateway::{free_port, temp_dir};
use gateway_tests::jwt::key_digest;
use gateway_tests::{request, Backend, Driver, Gateway, Spec};

fn body(backend: std::net::SocketAddr, dir: &std::path::Path) -> String {
    format!(
        r#"[clusters.b]
backends = ["{backend}"]

[[routes]]
path_prefix = "/"
cluster = "b"
auth = ["api_key"]

[authn]
revocations_file = "{dir}/revoked.json"

[[authn.api_keys]]
client = "batch"
tenant = "acme"
sha256 = ["{k1}", "{k2}"]

[[authn.api_keys]]
client = "ops"
roles = ["admin"]
sha256 = ["{k3}"]

[[authz.rules]]
id = "ops-admin"
roles = ["admin"]
scopes = ["admin"]

[[authz.rules]]
id = "all"
tenants = ["*"]
models = ["*"]

[xdp]
state_file = "{dir}/blocks.json"
block = ["198.51.100.1"]
"#,
        dir = dir.display(),
        k1 = key_digest("key-one-0123456789"),
        k2 = key_digest("key-two-0123456789"),
        k3 = key_digest("ops-key-0123456789"),
    )
}

const OPS: &str = "x-api-key: ops-key-0123456789\r\n";

fn admin(g: &Gateway, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n{OPS}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = request(g.admin, raw.as_bytes());
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or_default(),
    )
}

fn served_with(g: &Gateway, key: &str) -> u16 {
    let raw = format!("GET /x HTTP/1.1\r\nhost: a\r\nx-api-key: {key}\r\n\r\n");
    request(g.addr, raw.as_bytes()).status
}

#[test]
fn blocks_and_revocations_survive_a_restart() {
    let backend = Backend::start("persist");
    let dir = temp_dir("persist");
    let text = body(backend.addr, &dir);
    let mut g = Gateway::start(Spec::new(Driver::Auto, &text));
    assert_eq!(served_with(&g, "key-one-0123456789"), 200);

    let (s, v) = admin(
        &g,
        "POST",
        "/xdp/blocks",
        r#"{"addr":"203.0.113.7","ttl":"1h"}"#,
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = admin(
        &g,
        "POST",
        "/xdp/blocks",
        r#"{"addr":"2001:db8::bad","ttl":"2s"}"#,
    );
    assert_eq!(s, 201, "{v}");
    let digest = key_digest("key-one-0123456789");
    let (s, v) = admin(
        &g,
        "POST",
        "/authn/revoke",
        &format!(r#"{{"sha256":"{digest}"}}"#),
    );
    assert_eq!((s, &v["saved"]), (200, &true.into()), "{v}");
    assert_eq!(served_with(&g, "key-one-0123456789"), 401);

    // Saved within the maintenance second, and at exit.
    std::thread::sleep(Duration::from_millis(1500));
    let saved = std::fs::read_to_string(dir.join("blocks.json")).unwrap();
    assert!(
        saved.contains("203.0.113.7") && !saved.contains("198.51.100.1"),
        "{saved}"
    );
    g.signal(libc::SIGTERM);
    assert!(g.wait_exit(Duration::from_secs(20)).is_some());
    // Long enough for the 2 s block to run out while nothing runs.
    std::thread::sleep(Duration::from_millis(1000));

    let g = Gateway::start(Spec::new(Driver::Auto, &text));
    let (s, v) = admin(&g, "GET", "/xdp/blocks", "");
    assert_eq!(s, 200);
    let blocks = v["blocks"].as_array().unwrap();
    let find = |a: &str| blocks.iter().find(|b| b["addr"] == a);
    let kept = find("203.0.113.7").unwrap_or_else(|| panic!("block not restored: {v}"));
    assert_eq!(kept["reason"], "manual");
    let ttl = kept["ttl_s"].as_u64().unwrap();
    assert!(
        (3500..=3600).contains(&ttl),
        "the TTL left, not a fresh one: {ttl}"
    );
    assert!(
        find("2001:db8::bad").is_none(),
        "an expired block came back: {v}"
    );
    assert_eq!(find("198.51.100.1").unwrap()["reason"], "config");
    assert_eq!(
        served_with(&g, "key-one-0123456789"),
        401,
        "the revoked key stays revoked although the config still lists it"
    );
    assert_eq!(
        served_with(&g, "key-two-0123456789"),
        200,
        "the other key of the client works"
    );
    let (s, v) = admin(&g, "GET", "/authn/keys", "");
    assert_eq!(s, 200);
    let prefix = &digest[..16];
    assert!(
        !v.to_string().contains(prefix),
        "the revoked key is not listed: {v}"
    );
}

/// A state file that can't be read stops the start with a clear message
/// rather than silently un-revoking every key.
#[test]
fn an_unreadable_revocations_file_stops_the_start() {
    let dir = temp_dir("persist-bad");
    std::fs::write(dir.join("revoked.json"), b"{not json").unwrap();
    let backend = Backend::start("persist");
    let out = std::process::Command::new(gateway_tests::gateway::gateway_bin())
        .args(["check-config"])
        .arg({
            let p = dir.join("g.toml");
            std::fs::write(&p, body(backend.addr, &dir)).unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(out.status.success(), "the config itself is fine");
    let mut child = std::process::Command::new(gateway_tests::gateway::gateway_bin())
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
            "--config",
        ])
        .arg(dir.join("g.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "it kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        text.contains("revoked API keys") && text.contains("revoked.json"),
        "{text}"
    );
}
