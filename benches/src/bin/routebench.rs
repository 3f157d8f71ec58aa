//! `routebench`: GPU-aware routing, compared through the gateway.
//!
//! A pool of simulated GPU model servers (`gateway_tests::gpusim`: continuous
//! batching, a queue, prefill and decode costs, KV-cache capacity, vLLM's
//! metric names) of mixed speed and batch size sits behind one gateway with
//! four clusters over the same servers, one per algorithm: `round_robin`,
//! `least_request` (P2C on in-flight), `gie_like` (the Kubernetes Inference
//! Gateway's default scorers: queue weight 2 `(max−q)/(max−min)`, KV cache
//! weight 2 `1−kv`, metrics scraped every 50 ms, older than 200 ms ignored)
//! and `gpu_aware` (the gateway's own). Open-loop Poisson arrivals at 60 %,
//! 80 % and 90 % of the pool's capacity, mixed prompt and output lengths,
//! streamed (SSE) so time to first token is measured; every algorithm gets
//! the same arrival sequence (same seed) at each load, one after the other,
//! with the servers drained in between. Results: a table, `routing.json` and
//! `routing.svg` (p99 latency per load and algorithm) in `target/bench/`.
//!
//! Usually run as `cargo xtask bench routing`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use serde_json::json;

const USAGE: &str = "usage: routebench [--duration SECS] [--loads 0.6,0.8,0.9] [--seed N] [--quick]

  --duration SECS   seconds of arrivals per algorithm per load (default 40)
  --loads LIST      fractions of the pool's capacity (default 0.6,0.8,0.9)
  --seed N          arrival and length sequence (default 7)
  --quick           10 s per run, loads 0.8 only

env: GATEWAY_BIN (default <workspace>/target/release/gateway)
";

const POLICIES: [&str; 4] = ["round_robin", "least_request", "gie_like", "gpu_aware"];

/// The pool: mixed GPUs (speed) and batch sizes; the last one is slow.
fn pool() -> Vec<SimConfig> {
    let sim = |name: &str, speed: f64, max_batch: usize| SimConfig {
        name: name.into(),
        engine: "vllm".into(),
        max_batch,
        kv_tokens: 65_536,
        step_ms: 10.0,
        per_seq_ms: 0.5,
        prefill_ms_per_1k_tokens: 20.0,
        speed,
    };
    vec![
        sim("h100-a", 1.0, 16),
        sim("a100-b", 0.7, 8),
        sim("l40-c", 0.45, 8),
        sim("t4-d", 0.2, 4),
    ]
}

/// Prompt tokens uniform in 50..1500; output tokens 8, 32, 64 or 128 (equally likely).
const OUTPUTS: [u64; 4] = [8, 32, 64, 128];
const PROMPT: (u64, u64) = (50, 1500);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
struct Arrival {
    at: Duration,
    prompt: u64,
    output: u64,
}

fn arrivals(seed: u64, rate: f64, duration: Duration) -> Vec<Arrival> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut t = 0.0;
    let mut v = Vec::new();
    loop {
        t += -r.unit().ln() / rate;
        if t >= duration.as_secs_f64() || v.len() >= 20_000 {
            return v;
        }
        let prompt = PROMPT.0 + r.next() % (PROMPT.1 - PROMPT.0);
        let output = OUTPUTS[(r.next() % 4) as usize];
        v.push(Arrival {
            at: Duration::from_secs_f64(t),
            prompt,
            output,
        });
    }
}

#[derive(Default, Clone)]
struct Outcome {
    ok: bool,
    latency: f64,
    ttft: f64,
}

/// One streamed chat completion through the gateway: (TTFT, latency) in seconds.
fn one(gw: SocketAddr, host: &str, a: Arrival) -> Outcome {
    let started = Instant::now();
    let text = "x".repeat((a.prompt * 4) as usize);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}],"max_tokens":{},"stream":true}}"#,
        a.output
    );
    let run = || -> std::io::Result<Outcome> {
        let mut s = TcpStream::connect(gw)?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        let mut ttft = None;
        loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if ttft.is_none() && memchr::memmem::find(&buf, b"data: ").is_some() {
                ttft = Some(started.elapsed().as_secs_f64());
            }
            if memchr::memmem::find(&buf, b"[DONE]").is_some() {
                break;
            }
        }
        let ok =
            buf.starts_with(b"HTTP/1.1 200") && memchr::memmem::find(&buf, b"[DONE]").is_some();
        Ok(Outcome {
            ok,
            latency: started.elapsed().as_secs_f64(),
            ttft: ttft.unwrap_or(f64::NAN),
        })
    };
    run().unwrap_or_default()
}

/// Send every arrival at its time (open loop: a slow answer never delays the next).
fn run_load(gw: SocketAddr, host: &'static str, plan: &[Arrival]) -> (Vec<Outcome>, f64) {
    let results = Arc::new(Mutex::new(Vec::with_capacity(plan.len())));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(plan.len());
    for a in plan.iter().copied() {
        if let Some(wait) = a.at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let results = results.clone();
        handles.push(std::thread::spawn(move || {
            let o = one(gw, host, a);
            results.lock().unwrap().push(o);
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let v = std::mem::take(&mut *results.lock().unwrap());
    (v, elapsed)
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn gateway_config(listen: SocketAddr, admin: SocketAddr, sims: &[SocketAddr]) -> String {
    let backends: Vec<String> = sims.iter().map(|a| format!("\"{a}\"")).collect();
    let mut c = format!(
        "[server]\nlisten = [\"{listen}\"]\nworkers = 2\n[admin]\nlisten = \"{admin}\"\n[log]\naccess_log = false\n\n"
    );
    for p in POLICIES {
        c += &format!(
            "[clusters.{p}]\nbackends = [{}]\nmax_connections = 4096\n[clusters.{p}.balance]\nalgorithm = \"{p}\"\nengine = \"vllm\"\n\
             metrics_interval = \"50ms\"\nmetrics_max_age = \"200ms\"\nqueue_saturation = 1000\nwarmup = \"0s\"\n\n",
            backends.join(", ")
        );
    }
    // OpenAI routes over a catalogue: every algorithm sees the same checked
    // request (model, declared max_tokens); only gpu_aware uses the budget.
    c += "[[models]]\nname = \"m\"\ncontext_tokens = 32768\nmax_output_tokens = 4096\n\n";
    for p in POLICIES {
        c += &format!(
            "[[routes]]\nname = \"{p}\"\nhost = \"{p}.bench\"\npath_prefix = \"/\"\ncluster = \"{p}\"\nprotocol = \"openai\"\n[routes.timeouts]\nupstream_response = \"300s\"\n\n"
        );
    }
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn main() -> ExitCode {
    let mut duration = Duration::from_secs(40);
    let mut loads = vec![0.6, 0.8, 0.9];
    let mut seed = 7u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--duration" => {
                duration = Duration::from_secs(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|s| (1..=600).contains(s))
                        .unwrap_or(40),
                )
            }
            "--loads" => {
                loads = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|x| x.parse().ok())
                    .filter(|x: &f64| *x > 0.0 && *x <= 1.5)
                    .collect()
            }
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(7),
            "--quick" => {
                duration = Duration::from_secs(10);
                loads = vec![0.8];
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("routebench: unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if loads.is_empty() {
        eprintln!("routebench: --loads: fractions such as 0.6,0.8,0.9");
        return ExitCode::from(2);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bench_dir = root.join("target/bench");
    let _ = std::fs::create_dir_all(&bench_dir);
    let gateway_bin = std::env::var_os("GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/gateway"));

    let cfgs = pool();
    let mean_prompt = (PROMPT.0 + PROMPT.1) as f64 / 2.0;
    let mean_output = OUTPUTS.iter().sum::<u64>() as f64 / OUTPUTS.len() as f64;
    let capacity: f64 = cfgs
        .iter()
        .map(|c| c.capacity_rps(mean_prompt, mean_output))
        .sum();
    let sims: Vec<GpuSim> = cfgs.iter().cloned().map(GpuSim::start).collect();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    println!("pool capacity ≈ {capacity:.1} req/s:");
    for (c, s) in cfgs.iter().zip(&sims) {
        println!(
            "  {} on {}: speed {}, batch {}, ≈ {:.2} req/s",
            c.name,
            s.addr,
            c.speed,
            c.max_batch,
            c.capacity_rps(mean_prompt, mean_output)
        );
    }

    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let conf = bench_dir.join("routing-gateway.toml");
    std::fs::write(&conf, gateway_config(listen, admin, &addrs)).expect("write config");
    let mut gw = match Command::new(&gateway_bin)
        .args(["run", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "routebench: cannot start {}: {e} (cargo build --release -p gateway)",
                gateway_bin.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if Instant::now() > deadline {
            eprintln!("routebench: the gateway did not start");
            let _ = gw.kill();
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut rows = Vec::new();
    for &load in &loads {
        let rate = capacity * load;
        let plan = arrivals(seed, rate, duration);
        println!(
            "\nload {:.0} %: {:.1} req/s, {} requests over {} s",
            load * 100.0,
            rate,
            plan.len(),
            duration.as_secs()
        );
        for p in POLICIES {
            // Drained: nothing queued or running anywhere.
            let idle_by = Instant::now() + Duration::from_secs(300);
            while sims.iter().any(|s| s.load() != (0, 0)) && Instant::now() < idle_by {
                std::thread::sleep(Duration::from_millis(100));
            }
            let host: &'static str = match p {
                "round_robin" => "round_robin.bench",
                "least_request" => "least_request.bench",
                "gie_like" => "gie_like.bench",
                _ => "gpu_aware.bench",
            };
            let before: Vec<u64> = sims.iter().map(|s| s.completed()).collect();
            let (out, elapsed) = run_load(listen, host, &plan);
            let share: Vec<u64> = sims
                .iter()
                .zip(&before)
                .map(|(s, b)| s.completed() - b)
                .collect();
            let ok: Vec<&Outcome> = out.iter().filter(|o| o.ok).collect();
            let lat: Vec<f64> = ok.iter().map(|o| o.latency).collect();
            let ttft: Vec<f64> = ok.iter().map(|o| o.ttft).collect();
            let row = json!({
                "load": load, "policy": p, "requests": out.len(), "ok": ok.len(),
                "errors": out.len() - ok.len(),
                // Completed ÷ time from the first arrival to the last answer.
                "throughput_rps": ok.len() as f64 / elapsed,
                "p50_s": pct(lat.clone(), 0.5), "p99_s": pct(lat.clone(), 0.99), "mean_s": lat.iter().sum::<f64>() / lat.len().max(1) as f64,
                "ttft_p50_s": pct(ttft.clone(), 0.5), "ttft_p99_s": pct(ttft, 0.99),
                "per_backend": share,
            });
            println!(
                "  {:<14} p50 {:>6.2} s  p99 {:>6.2} s  TTFT p50 {:>6.3} s p99 {:>6.3} s  {:>5.2} req/s  errors {}  per backend {}",
                p,
                row["p50_s"].as_f64().unwrap_or(f64::NAN),
                row["p99_s"].as_f64().unwrap_or(f64::NAN),
                row["ttft_p50_s"].as_f64().unwrap_or(f64::NAN),
                row["ttft_p99_s"].as_f64().unwrap_or(f64::NAN),
                row["throughput_rps"].as_f64().unwrap_or(0.0),
                row["errors"],
                row["per_backend"]
            );
            rows.push(row);
        }
    }
    let _ = gw.kill();
    let _ = gw.wait();

    // The bar: gpu_aware p99 ≤ 0.6 × least_request's and ≤ gie_like's, at every load.
    let p99 = |load: f64, p: &str| {
        rows.iter()
            .find(|r| r["load"].as_f64() == Some(load) && r["policy"] == p)
            .and_then(|r| r["p99_s"].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!("\nload    gpu_aware/least_request p99   gpu_aware/gie_like p99");
    let mut ratios = Vec::new();
    for &load in &loads {
        let (g, lr, gie) = (
            p99(load, "gpu_aware"),
            p99(load, "least_request"),
            p99(load, "gie_like"),
        );
        println!(
            "{:>4.0} %  {:>27.2}   {:>22.2}",
            load * 100.0,
            g / lr,
            g / gie
        );
        ratios.push(json!({"load": load, "vs_least_request": g / lr, "vs_gie_like": g / gie}));
    }
    let results = json!({
        "pool": cfgs.iter().zip(&addrs).map(|(c, a)| json!({"name": c.name, "addr": a.to_string(), "speed": c.speed, "max_batch": c.max_batch,
            "capacity_rps": c.capacity_rps(mean_prompt, mean_output)})).collect::<Vec<_>>(),
        "capacity_rps": capacity, "duration_s": duration.as_secs(), "seed": seed,
        "workload": {"prompt_tokens": [PROMPT.0, PROMPT.1], "output_tokens": OUTPUTS, "stream": true, "arrivals": "poisson (open loop)"},
        "results": rows, "p99_ratios": ratios,
    });
    let json_path = bench_dir.join("routing.json");
    let _ = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    );
    let svg_path = bench_dir.join("routing.svg");
    let _ = std::fs::write(&svg_path, svg(&loads, &|l, p| p99(l, p)));
    println!(
        "\nresults: {}\nchart:   {}\nconfig:  {}",
        json_path.display(),
        svg_path.display(),
        conf.display()
    );
    ExitCode::SUCCESS
}

/// Grouped bars: p99 latency per load, one bar per algorithm.
fn svg(loads: &[f64], p99: &dyn Fn(f64, &str) -> f64) -> String {
    let colors = ["#9e9e9e", "#5c6bc0", "#ffa726", "#43a047"];
    let max = loads
        .iter()
        .flat_map(|&l| POLICIES.iter().map(move |p| (l, *p)))
        .map(|(l, p)| p99(l, p))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max);
    let (w, h, left, bottom, top) = (760.0, 360.0, 60.0, 40.0, 40.0);
    let group = (w - left - 20.0) / loads.len() as f64;
    let bar = group / 5.0;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<text x=\"{left}\" y=\"20\" font-size=\"14\">p99 latency (s) by load, through the gateway (lower is better)</text>\n");
    for (gi, &l) in loads.iter().enumerate() {
        for (pi, p) in POLICIES.iter().enumerate() {
            let v = p99(l, p);
            let v = if v.is_finite() { v } else { 0.0 };
            let bh = (h - bottom - top) * v / max;
            let x = left + gi as f64 * group + pi as f64 * bar + bar / 2.0;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{v:.2}</text>\n",
                h - bottom - bh,
                bar * 0.9,
                colors[pi],
                x + bar * 0.45,
                h - bottom - bh - 3.0
            );
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0} % of capacity</text>\n",
            left + gi as f64 * group + group / 2.0,
            h - bottom + 18.0,
            l * 100.0
        );
    }
    for (pi, p) in POLICIES.iter().enumerate() {
        s += &format!(
            "<rect x=\"{:.1}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"37\">{p}</text>\n",
            left + 330.0 + pi as f64 * 105.0,
            colors[pi],
            left + 343.0 + pi as f64 * 105.0
        );
    }
    s + "</svg>\n"
}
