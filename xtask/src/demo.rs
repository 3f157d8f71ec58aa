//! `cargo xtask run`: the product on a fresh machine. Three simulated GPUs
//! of different speeds (`gpu-sim`: continuous batching, KV cache, vLLM
//! metrics), the gateway in front of them with an OpenAI route, a model
//! catalogue, a demo API key, a rate limit and GPU-aware routing, and the
//! commands to try it — one that is refused included. `--load` drives a
//! little traffic so the metrics move.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{
    die_with_parent, flag_value, ignore_sigint, show, target_dir, wait_for_port, KillOnDrop, Result,
};

/// The demo API key, and its SHA-256 (what a config holds).
const DEMO_KEY: &str = "sk-demo-0123456789abcdef";
const DEMO_KEY_SHA256: &str = "639d00d1a103366f4544c1479747fb37bf39927908dc7db5ea65635cec29b82c";
/// `--load`'s own key (its own rate limit).
const LOAD_KEY: &str = "sk-load-0123456789abcdef";
const LOAD_KEY_SHA256: &str = "2f34d187001acfc51bd1f24ece0b928ddfe148b018ae1f56093f1fa5900a2f5b";

/// The simulated pool: (name, port, speed, batch).
const GPUS: [(&str, u16, &str, &str); 3] = [
    ("h100", 8001, "1.0", "16"),
    ("a100", 8002, "0.6", "8"),
    ("t4", 8003, "0.25", "4"),
];

pub fn run(args: &[String]) -> Result {
    let load = args.iter().any(|a| a == "--load");
    let gateway_args: Vec<String> = args.iter().filter(|a| *a != "--load").cloned().collect();
    build()?;
    let target = target_dir();
    let listen = flag_value(&gateway_args, "--listen").unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen = listen.split(',').next().unwrap_or_default().to_string();
    let admin = flag_value(&gateway_args, "--admin").unwrap_or_else(|| "127.0.0.1:9901".into());
    for port in GPUS.iter().map(|g| g.1) {
        let a: SocketAddr = ([127, 0, 0, 1], port).into();
        if TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok() {
            return Err(format!(
                "{a} is already in use: stop whatever listens there first"
            ));
        }
    }
    let mut sims = Vec::new();
    for (name, port, speed, batch) in GPUS {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut cmd = Command::new(target.join("release/gpu-sim"));
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--name",
            name,
            "--speed",
            speed,
            "--max-batch",
            batch,
        ]);
        die_with_parent(&mut cmd, libc::SIGKILL);
        println!("$ {}", show(&cmd));
        let mut sim = KillOnDrop::spawn("gpu-sim", cmd)?;
        wait_for_port(&mut sim, addr, Duration::from_secs(10))?;
        sims.push(sim);
    }
    let dir = target.join("demo");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, demo_config(&listen, &admin))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    print_tour(&listen, &admin, &config);

    let mut cmd = Command::new(target.join("release/gateway"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .args(&gateway_args);
    die_with_parent(&mut cmd, libc::SIGTERM);
    println!("$ {}", show(&cmd));
    let mut gateway = cmd
        .spawn()
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    // Ctrl-C reaches the whole foreground process group: let the gateway
    // drain and exit on its own, then stop the simulators ourselves.
    ignore_sigint();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = load.then(|| {
        let (stop, listen) = (stop.clone(), listen.clone());
        std::thread::spawn(move || drive(&listen, &stop))
    });
    let status = gateway
        .wait()
        .map_err(|e| format!("waiting for the gateway: {e}"))?;
    stop.store(true, Ordering::Relaxed);
    if let Some(d) = driver {
        let _ = d.join();
    }
    drop(sims);
    match (status.code(), status.signal()) {
        (Some(0), _) | (_, Some(libc::SIGINT)) => Ok(()),
        _ => Err(format!("gateway exited with {status}")),
    }
}

/// The gateway (with the XDP program when its toolchain is installed) and
/// the simulator, release builds.
fn build() -> Result {
    crate::build_gateway_any()?;
    crate::build_test_bin("gpu-sim")
}

fn demo_config(listen: &str, admin: &str) -> String {
    let backends: Vec<String> = GPUS
        .iter()
        .map(|g| format!("\"127.0.0.1:{}\"", g.1))
        .collect();
    let backends = backends.join(", ");
    format!(
        r#"# Written by `cargo xtask run`: the demo. See `gateway config default` for every key.
[server]
listen = ["{listen}"]
workers = 2

[admin]
listen = "{admin}"

[log]
format = "pretty"
level = "info"

# Three simulated GPUs of different speeds, vLLM metrics scraped every 100 ms.
[clusters.gpus]
backends = [{backends}]
[clusters.gpus.balance]
algorithm = "prefix_aware"     # gpu_aware + where each prompt's KV cache already is
engine = "vllm"
metrics_interval = "100ms"
warmup = "2s"

[[models]]
name = "llama-3-8b"
context_tokens = 8192
max_output_tokens = 1024

[[models]]
name = "mistral-7b"
context_tokens = 4096
max_output_tokens = 512

[[routes]]
name = "openai"
path_prefix = "/v1/"
protocol = "openai"
cluster = "gpus"

# The demo key (`Authorization: Bearer {DEMO_KEY}`); configs hold its SHA-256.
[[authn.api_keys]]
client = "demo-app"
tenant = "demo"
sha256 = ["{DEMO_KEY_SHA256}"]

[[authn.api_keys]]
client = "demo-load"
tenant = "demo"
sha256 = ["{LOAD_KEY_SHA256}"]

[[authz.rules]]
id = "demo"
tenants = ["demo"]
models = ["*"]

# 2 requests a second with bursts of 5 per caller; 100k tokens a minute.
[ratelimit.principal]
requests_per_second = 2
burst = 5
tokens_per_minute = 100000
"#
    )
}

fn print_tour(listen: &str, admin: &str, config: &std::path::Path) {
    let chat =
        r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"Hello!"}],"max_tokens":32}"#;
    println!();
    println!("Three simulated GPUs (h100 :8001, a100 :8002, t4 :8003) behind the gateway on http://{listen}");
    println!("(config: {}). From another terminal:", config.display());
    println!();
    println!("  # a chat completion, and a streamed one");
    println!(
        "  curl -s http://{listen}/v1/chat/completions -H 'authorization: Bearer {DEMO_KEY}' \\"
    );
    println!("       -H 'content-type: application/json' -d '{chat}'");
    println!(
        "  curl -sN http://{listen}/v1/chat/completions -H 'authorization: Bearer {DEMO_KEY}' \\"
    );
    println!(
        "       -H 'content-type: application/json' -d '{}'",
        chat.replace("\"max_tokens\":32", "\"max_tokens\":32,\"stream\":true")
    );
    println!("  curl -s http://{listen}/v1/models -H 'authorization: Bearer {DEMO_KEY}'");
    println!();
    println!("  # refused: no key (401), a temperature out of range (400, param \"temperature\"), an unknown model (404)");
    println!("  curl -si http://{listen}/v1/chat/completions -H 'content-type: application/json' -d '{chat}'");
    println!(
        "  curl -s http://{listen}/v1/chat/completions -H 'authorization: Bearer {DEMO_KEY}' \\"
    );
    println!(
        "       -H 'content-type: application/json' -d '{}'",
        chat.replace("\"max_tokens\":32", "\"temperature\":9")
    );
    println!("  # over the rate limit (2/s, bursts of 5): 429 with Retry-After");
    println!("  for i in $(seq 10); do curl -s -o /dev/null -w '%{{http_code}} ' http://{listen}/v1/models \\");
    println!("       -H 'authorization: Bearer {DEMO_KEY}'; done; echo");
    println!();
    println!("  # the OpenAI Python SDK, unmodified");
    println!("  python3 -c \"import openai; c = openai.OpenAI(base_url='http://{listen}/v1', api_key='{DEMO_KEY}'); \\");
    println!("    print(c.chat.completions.create(model='llama-3-8b', messages=[{{'role':'user','content':'hi'}}]).choices[0].message.content)\"");
    println!();
    println!("  # what the gateway sees: per-backend load, TTFT, routing, refusals");
    println!(
        "  curl -s http://{admin}/metrics | grep -E '^gateway_(backend|prefix|requests_total)'"
    );
    println!("  curl -s http://{admin}/balance/backends");
    println!();
    println!("Ctrl-C stops the gateway (it drains in-flight requests) and the simulators.");
    println!();
}

/// `--load`: a chat request every 0.6 s (a handful of shared system
/// prompts, so prefix routing shows) until the gateway stops.
fn drive(listen: &str, stop: &AtomicBool) {
    let Ok(addr) = listen.parse::<SocketAddr>() else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let systems = [
        "You are a helpful travel agent. ",
        "You are a careful code reviewer. ",
        "You answer in haiku. ",
    ];
    let mut n: u64 = 0;
    // Bounded: at most 12 hours of it.
    while !stop.load(Ordering::Relaxed) && n < 12 * 3600 * 4 {
        n += 1;
        let system = systems[(n % 3) as usize].repeat(40);
        let body = format!(
            r#"{{"model":"llama-3-8b","stream":{},"max_tokens":{},"messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"question {n}"}}]}}"#,
            n.is_multiple_of(2),
            16 + (n % 4) * 16
        );
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: demo\r\nauthorization: Bearer {LOAD_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.write_all(req.as_bytes());
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
        std::thread::sleep(Duration::from_millis(600));
    }
}
