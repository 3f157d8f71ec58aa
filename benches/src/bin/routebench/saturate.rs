//! `routebench --saturate` (or `--workload saturate`): flow control when
//! the pool is over capacity, one tenant flooding.
//!
//! **Pool.** Three simulated GPUs (`gpusim`, vLLM-like: continuous batching,
//! a batch of 8 each (`--batch`), speeds 1.0 / 0.8 / 0.6, a KV cache too large to
//! matter) behind one gateway, one cluster (`gpu_aware`). A backend is
//! *saturated* (`--cap`):
//! - `inflight` (default): `[clusters.pool.balance] max_inflight = 8`, the
//!   batch size: this gateway never sends a backend more than its batch can
//!   run, so nothing waits at the servers; what can't run waits at the
//!   gateway (flow control on) or is refused (off). The realistic picture for
//!   one gateway in front of its pool (exact, no scrape lag).
//! - `scraped`: `queue_saturation = 1` on the scraped
//!   `vllm:num_requests_waiting` (every 50 ms, older than 200 ms ignored):
//!   a backend with anything waiting is saturated; lags by a scrape, so the
//!   servers' own queues overshoot a little. (Runs on a gateway without
//!   `max_inflight`.)
//!
//! **Tenants.** Five API keys, one tenant each. With `C` the pool's capacity
//! (req/s, `SimConfig::capacity_rps` at the mean lengths) and the equal
//! share `C/5`: `flood` sends at `--flood` × the equal share (default 5),
//! `b`, `c`, `d` and `vip` at `--light` × it (default 0.5): offered load
//! (5 + 4 × 0.5) / 5 = 1.4 × capacity. `vip`'s tenant class (`band1`) has
//! `priority = 1`: queue band 1, the others band 0 (the class is configured
//! with the queue only; without one, bands order nothing).
//!
//! **Load.** Streamed (SSE) chat completions, prompts 100..400 tokens (every
//! one distinct), outputs 16..64 tokens; each tenant an open-loop Poisson
//! process of its own (seeded); every run gets the same arrivals. No retries:
//! a refused request counts as refused. Timed per request: status, TTFT
//! (first SSE `data:` event), end to end.
//!
//! **Runs** (`--runs`, each on a fresh gateway, the servers drained in
//! between):
//! - `on`: flow control, `[clusters.pool.queue]` (max_requests 4096,
//!   max_bytes 64 MiB, max_wait `--max-wait`, fairness `tenant`);
//! - `off`: the same saturation, no queue section: saturation answers 503 at
//!   once;
//! - `uncapped`: neither (no `max_inflight`, `queue_saturation` 1000): every
//!   request goes to a server and waits in its FIFO queue — the baseline.
//!
//! And, first, each light tenant alone (its arrivals of the first
//! min(duration, 20 s)) through a fresh gateway with the `on` config (or,
//! when the gateway refuses it, `off`, else `uncapped`): its unloaded TTFT
//! p99, the reference for "a light tenant's TTFT p99 under the flood is
//! within 2× of unloaded". Alone, a light tenant never saturates the pool,
//! so the config only adds the gateway's own path.
//!
//! **Reported per run**: goodput (successful requests/s and output tokens/s,
//! over the first arrival to the last answer), refused by status (429, 503,
//! other: connection errors, timeouts), per tenant its requests, successes,
//! refusals, TTFT p50/p99 (successes) and TTFT p99 ÷ unloaded; per band the
//! client-side TTFT p99 and the gateway's queue wait p99 — from its
//! `gateway_queue_wait_seconds{cluster="pool",band}` histogram on the admin
//! port's `/metrics`, the difference over the run, interpolated within the
//! bucket (as Prometheus' `histogram_quantile`) — with its dispatched count
//! and the deepest `gateway_queue_depth` seen (sampled every 250 ms);
//! `gateway_queue_refused_total` by reason; a `GET /balance/queues` snapshot
//! at the end of the arrivals; and Jain's fairness index between tenants:
//!
//! ```text
//! s_i = tenant i's served cost (its successful requests' estimated tokens:
//!       prompt at 4 bytes a token + max_tokens, the gateway's fair-share unit)
//! d_i = its offered cost (every request it sent)
//! S   = Σ s_i (what the pool served in the run)
//! f_i = min(d_i, λ), λ such that Σ f_i = S   (max-min fair share of S)
//! x_i = s_i / f_i
//! J   = (Σ x_i)² / (n · Σ x_i²)               (1 = everyone got its fair share)
//! ```
//!
//! J counts what was served, not how late: a run that serves everything in
//! the end (`uncapped`, or `on` while nothing waits past `max_wait`) scores
//! 1; who waited shows in the TTFT columns. Reading TTFT against unloaded:
//! in a full pool with `max_inflight` = the batch, a request — even in the
//! top band — waits for a slot to free, and completions free about
//! `goodput` slots a second, so that wait alone is ~ln(100) / goodput at
//! p99 (≈ 150 ms at 30 req/s); with short prompts (unloaded TTFT ≈ 20–40 ms
//! here) the 2× bar is then out of reach whatever the queue does. More
//! slots (`--batch`) shorten the wait.
//!
//! Bounded: at most 20,000 arrivals per run, every request gives up at
//! duration + max_wait + 120 s, the servers' drain waits at most 300 s;
//! everything on 127.0.0.1.
//!
//! Results: a table, `target/bench/routing-saturate.json` and `.svg` (TTFT
//! p99 per tenant: unloaded and each run), each run's config in
//! `target/bench/routing-saturate-<run>.toml` and the gateway's output in
//! `.log`. A config the gateway refuses (`check-config`) skips its run, with
//! the reason. `--quick`: 10 s of arrivals per run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use gateway_tests::jwt::key_digest;
use serde_json::{json, Value};

use super::{chat, drain_and_reset, free_addr, pct, words, Gateways, Rng, COLORS};

pub const USAGE: &str = "usage: routebench --saturate [--runs on,off,uncapped] [--cap inflight|scraped] [--flood F]
                  [--light L] [--max-wait SECS] [--batch N] [--duration SECS] [--seed N] [--quick]

  (also: routebench --workload saturate ...)
  Three simulated GPUs (batch 8, speeds 1.0/0.8/0.6) behind one gateway; five tenants (API keys):
  `flood` at F × the equal share (capacity / 5), b, c, d and vip at L × it; vip's tenant class has
  priority 1 (queue band 1). Streamed chat completions, Poisson arrivals per tenant, no retries.
  --runs LIST        on: flow control ([clusters.pool.queue], fairness = tenant); off: the same
                     saturation, no queue (503 at once); uncapped: no saturation cap, the servers
                     queue everything (default on,off,uncapped); each light tenant also alone first
                     (its unloaded TTFT p99)
  --cap C            what saturates a backend: inflight (default: max_inflight = the batch size) or
                     scraped (queue_saturation = 1 on the scraped vllm:num_requests_waiting)
  --flood F          flood's rate, × the equal share (default 5)
  --light L          each light tenant's rate, × the equal share (default 0.5; 5 and 0.5 = 1.4 × capacity)
  --max-wait SECS    the queue's max_wait (default 10)
  --batch N          each server's batch size, and max_inflight with --cap inflight (default 8): the
                     fewer slots, the longer a request waits for one to free when the pool is full
  --duration SECS    seconds of arrivals per run (default 40)
  --seed N           arrivals, lengths, texts (default 7)
  --quick            10 s of arrivals per run

Results: a table, target/bench/routing-saturate.json + .svg, each run's gateway config in
target/bench/routing-saturate-<run>.toml.

env: GATEWAY_BIN (default <workspace>/target/release/gateway)
";

/// Batch size of every server (and `max_inflight` with `--cap inflight`), by default.
const BATCH: usize = 8;
const SPEEDS: [f64; 3] = [1.0, 0.8, 0.6];
/// Prompt tokens (distinct texts), output tokens: uniform, inclusive.
const PROMPT: (u64, u64) = (100, 400);
const OUTPUT: (u64, u64) = (16, 64);
/// The unloaded reference runs: at most this much of a tenant's arrivals.
const UNLOADED_S: u64 = 20;
/// Arrivals per run, at most.
const MAX_REQUESTS: usize = 20_000;

struct TenantSpec {
    name: &'static str,
    /// Its rate as a multiple of the equal share; flood's is `--flood`.
    light: bool,
    /// Its class's queue band (`priority`).
    band: i32,
}

const TENANTS: [TenantSpec; 5] = [
    TenantSpec {
        name: "flood",
        light: false,
        band: 0,
    },
    TenantSpec {
        name: "b",
        light: true,
        band: 0,
    },
    TenantSpec {
        name: "c",
        light: true,
        band: 0,
    },
    TenantSpec {
        name: "d",
        light: true,
        band: 0,
    },
    TenantSpec {
        name: "vip",
        light: true,
        band: 1,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Run {
    On,
    Off,
    Uncapped,
}

impl Run {
    fn parse(s: &str) -> Option<Run> {
        Some(match s {
            "on" => Run::On,
            "off" => Run::Off,
            "uncapped" => Run::Uncapped,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Run::On => "on",
            Run::Off => "off",
            Run::Uncapped => "uncapped",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Run::On => "flow control (queue, fairness = tenant)",
            Run::Off => "no queue: saturation answers 503",
            Run::Uncapped => "no saturation cap: the servers queue",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cap {
    Inflight,
    Scraped,
}

struct Opts {
    runs: Vec<Run>,
    cap: Cap,
    flood: f64,
    light: f64,
    max_wait: u64,
    batch: usize,
    duration: Duration,
    seed: u64,
}

/// One request of the plan.
struct SReq {
    at: Duration,
    tenant: usize,
    body: String,
    output: u64,
    /// Estimated tokens: prompt (4 bytes a token) + max_tokens.
    cost: u64,
}

/// What one request got.
#[derive(Clone)]
struct Done {
    tenant: usize,
    /// 0: no HTTP answer (connect error, reset, timeout).
    status: u16,
    ok: bool,
    ttft: f64,
    e2e: f64,
    tokens: u64,
    cost: u64,
}

fn pool(batch: usize) -> Vec<SimConfig> {
    SPEEDS
        .iter()
        .enumerate()
        .map(|(i, &speed)| SimConfig {
            name: format!("sim-{i}"),
            engine: "vllm".into(),
            max_batch: batch,
            kv_tokens: 262_144,
            step_ms: 10.0,
            per_seq_ms: 0.5,
            prefill_ms_per_1k_tokens: 20.0,
            speed,
            ..SimConfig::default()
        })
        .collect()
}

fn api_key(seed: u64, tenant: &str) -> String {
    format!("routebench-{tenant}-{seed:x}")
}

/// The admin API's key (role `admin`).
fn ops_key(seed: u64) -> String {
    format!("routebench-ops-{seed:x}")
}

/// Every tenant's Poisson arrivals over `duration`, merged by time.
fn plan(o: &Opts, rates: &[f64]) -> Vec<SReq> {
    let end = o.duration.as_secs_f64();
    let mut v = Vec::new();
    for (t, &rate) in rates.iter().enumerate() {
        if rate <= 0.0 {
            continue;
        }
        let mut r = Rng::new(o.seed, 100 + t as u64);
        let mut text = Rng::new(o.seed, 200 + t as u64);
        let mut at = 0.0;
        loop {
            at += r.exp(1.0 / rate);
            if at >= end || v.len() >= MAX_REQUESTS {
                break;
            }
            let prompt = r.range(PROMPT);
            let output = r.range(OUTPUT);
            let content = words(&mut text, (prompt * 4) as usize);
            v.push(SReq {
                at: Duration::from_secs_f64(at),
                tenant: t,
                body: chat(&[json!({"role": "user", "content": content})], output),
                output,
                cost: prompt + output,
            });
        }
    }
    v.sort_by_key(|r| r.at);
    v
}

/// One streamed chat completion with an API key; gives up at `deadline`.
fn send(to: SocketAddr, key: &str, r: &SReq, deadline: Instant) -> Done {
    let started = Instant::now();
    let mut d = Done {
        tenant: r.tenant,
        status: 0,
        ok: false,
        ttft: f64::NAN,
        e2e: f64::NAN,
        tokens: 0,
        cost: r.cost,
    };
    let mut go = || -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: saturate.bench\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            r.body.len(),
            r.body
        )?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        // For a non-200 answer: where its body ends, when known.
        let mut body_end: Option<usize> = None;
        loop {
            if Instant::now() >= deadline {
                break;
            }
            let n = match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            buf.extend_from_slice(&chunk[..n]);
            if d.status == 0 {
                if let Some(h) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                    d.status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    if d.status != 200 {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        body_end = Some(h + 4 + len.unwrap_or(0));
                    }
                }
            }
            if let Some(end) = body_end {
                if buf.len() >= end {
                    break;
                }
                continue;
            }
            if d.status == 200 {
                if d.ttft.is_nan() && memchr::memmem::find(&buf, b"data: ").is_some() {
                    d.ttft = started.elapsed().as_secs_f64();
                }
                if memchr::memmem::find(&buf, b"[DONE]").is_some() {
                    d.ok = true;
                    break;
                }
            }
        }
        Ok(())
    };
    let _ = go();
    d.e2e = started.elapsed().as_secs_f64();
    if d.ok {
        d.tokens = r.output;
    } else {
        d.ttft = f64::NAN;
    }
    d
}

/// Send the selected requests at their times (open loop: a thread each);
/// (what each got, seconds from the first arrival to the last answer).
fn run_plan(
    reqs: &Arc<Vec<SReq>>,
    pick: &[usize],
    to: SocketAddr,
    keys: &Arc<Vec<String>>,
    give_up_after: Duration,
) -> (Vec<Done>, f64) {
    let results = Arc::new(Mutex::new(Vec::with_capacity(pick.len())));
    let Some(&first) = pick.first() else {
        return (Vec::new(), 0.0);
    };
    let t0 = reqs[first].at;
    let start = Instant::now();
    let deadline = start + give_up_after;
    let mut handles = Vec::with_capacity(pick.len());
    for &i in pick {
        if let Some(wait) = (reqs[i].at - t0).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let (rq, k, res) = (reqs.clone(), keys.clone(), results.clone());
        let h = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let r = &rq[i];
                let d = send(to, &k[r.tenant], r, deadline);
                res.lock().unwrap().push(d);
            });
        match h {
            Ok(h) => handles.push(h),
            Err(_) => results.lock().unwrap().push(Done {
                tenant: reqs[i].tenant,
                status: 0,
                ok: false,
                ttft: f64::NAN,
                e2e: 0.0,
                tokens: 0,
                cost: reqs[i].cost,
            }),
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let v = std::mem::take(&mut *results.lock().unwrap());
    (v, elapsed)
}

fn gateway_config(
    listen: SocketAddr,
    admin: SocketAddr,
    sims: &[SocketAddr],
    run: Run,
    o: &Opts,
) -> String {
    let backends: Vec<String> = sims.iter().map(|a| format!("\"{a}\"")).collect();
    let mut c = format!(
        "# routebench --saturate, run `{}`: {}\n[server]\nlisten = [\"{listen}\"]\nworkers = 2\n[admin]\nlisten = \"{admin}\"\n[log]\naccess_log = false\n\n",
        run.name(),
        run.describe()
    );
    let capped = run != Run::Uncapped;
    let queue_saturation = if capped && o.cap == Cap::Scraped {
        1
    } else {
        1000
    };
    c += &format!(
        "[clusters.pool]\nbackends = [{}]\nmax_connections = 4096\n[clusters.pool.balance]\nalgorithm = \"gpu_aware\"\nengine = \"vllm\"\n\
         metrics_interval = \"50ms\"\nmetrics_max_age = \"200ms\"\nqueue_saturation = {queue_saturation}\nwarmup = \"0s\"\n",
        backends.join(", ")
    );
    if capped && o.cap == Cap::Inflight {
        c += &format!("max_inflight = {}\n", o.batch);
    }
    if run == Run::On {
        c += &format!(
            "[clusters.pool.queue]\nmax_requests = 4096\nmax_bytes = {}\nmax_wait = \"{}s\"\nfairness = \"tenant\"\nclient_priority = false\n",
            64u64 << 20,
            o.max_wait
        );
    }
    c += "\n[[models]]\nname = \"m\"\ncontext_tokens = 32768\nmax_output_tokens = 4096\n\n";
    c += "[[routes]]\nname = \"saturate\"\npath_prefix = \"/\"\ncluster = \"pool\"\nprotocol = \"openai\"\n[routes.timeouts]\nupstream_response = \"300s\"\n\n";
    for t in &TENANTS {
        c += &format!(
            "[[authn.api_keys]]\nclient = \"{0}-client\"\ntenant = \"{0}\"\nsha256 = [\"{1}\"]\n",
            t.name,
            key_digest(&api_key(o.seed, t.name))
        );
    }
    // The bench's own operator key: the admin API's /balance/queues.
    c += &format!(
        "[[authn.api_keys]]\nclient = \"ops\"\nroles = [\"admin\"]\nsha256 = [\"{}\"]\n",
        key_digest(&ops_key(o.seed))
    );
    c += "\n[[authz.rules]]\nid = \"bench\"\ntenants = [\"*\"]\nmodels = [\"*\"]\nscopes = [\"infer\"]\n\n";
    c += "[[authz.rules]]\nid = \"ops\"\nroles = [\"admin\"]\nscopes = [\"admin\"]\n\n";
    if run == Run::On {
        let mut bands: Vec<i32> = TENANTS.iter().map(|t| t.band).filter(|&b| b != 0).collect();
        bands.dedup();
        for b in &bands {
            c += &format!("[ratelimit.classes.band{b}]\npriority = {b}\n");
        }
        if !bands.is_empty() {
            c += "[ratelimit.tenant_classes]\n";
            for t in TENANTS.iter().filter(|t| t.band != 0) {
                c += &format!("{} = \"band{}\"\n", t.name, t.band);
            }
        }
    }
    c
}

/// `gateway check-config`: Ok, or its first line of complaint.
fn check(bin: &Path, conf: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("check-config")
        .arg(conf)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (cargo build --release -p gateway)",
                bin.display()
            )
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    Err(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
        .chars()
        .take(400)
        .collect())
}

/// A run's config, written and checked: (path, listen, admin).
struct Conf {
    path: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn write_conf(
    bin: &Path,
    dir: &Path,
    run: Run,
    o: &Opts,
    sims: &[SocketAddr],
) -> Result<Conf, String> {
    let (listen, admin) = (free_addr(), free_addr());
    let path = dir.join(format!("routing-saturate-{}.toml", run.name()));
    std::fs::write(&path, gateway_config(listen, admin, sims, run, o))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    check(bin, &path)?;
    Ok(Conf {
        path,
        listen,
        admin,
    })
}

fn start(bin: &Path, conf: &Conf) -> Result<Gateways, String> {
    let log = std::fs::File::create(conf.path.with_extension("log")).ok();
    let (out, err) = match log.and_then(|f| Some((f.try_clone().ok()?, f))) {
        Some((a, b)) => (Stdio::from(a), Stdio::from(b)),
        None => (Stdio::null(), Stdio::null()),
    };
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&conf.path)
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut g = Gateways {
        procs: vec![child],
        addrs: vec![conf.listen],
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(conf.listen).is_err() || TcpStream::connect(conf.admin).is_err() {
        if Instant::now() > deadline || matches!(g.procs[0].try_wait(), Ok(Some(_))) {
            return Err(format!(
                "the gateway did not start (see {})",
                conf.path.with_extension("log").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A first scrape of every backend (gpu_aware, queue_saturation).
    std::thread::sleep(Duration::from_millis(300));
    Ok(g)
}

/// GET `path` on `addr` (with an API key, when given): the body of a 200.
fn http_get(addr: SocketAddr, path: &str, key: Option<&str>) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\n{auth}connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // Chunked bodies: join the chunks.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Some(out);
    }
    Some(body.to_string())
}

/// Prometheus text: (name, labels, value) of each sample.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut v = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let Some(j) = line.rfind('}') else { continue };
                (&line[..i], &line[i + 1..j], &line[j + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, "", r),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<f64>().ok())
        else {
            continue;
        };
        let mut map = BTreeMap::new();
        for part in labels.split("\",") {
            if let Some((k, val)) = part.split_once('=') {
                map.insert(
                    k.trim().to_string(),
                    val.trim().trim_matches('"').to_string(),
                );
            }
        }
        v.push((name.to_string(), map, value));
    }
    v
}

/// The gateway's queue metrics for cluster `pool`.
#[derive(Default, Clone)]
struct QueueMetrics {
    /// band → (le → cumulative count).
    wait: BTreeMap<String, Vec<(f64, f64)>>,
    dispatched: BTreeMap<String, f64>,
    refused: BTreeMap<String, f64>,
    depth: BTreeMap<String, f64>,
    /// Any `gateway_queue_*` series at all.
    present: bool,
}

fn queue_metrics(text: &str) -> QueueMetrics {
    let mut q = QueueMetrics::default();
    for (name, l, v) in samples(text) {
        if !name.starts_with("gateway_queue_") {
            continue;
        }
        q.present = true;
        if l.get("cluster").map(String::as_str) != Some("pool") {
            continue;
        }
        let band = l.get("band").cloned().unwrap_or_default();
        match name.as_str() {
            "gateway_queue_wait_seconds_bucket" => {
                let le = match l.get("le").map(String::as_str) {
                    Some("+Inf") | Some("Inf") => f64::INFINITY,
                    Some(x) => x.parse().unwrap_or(f64::NAN),
                    None => continue,
                };
                q.wait.entry(band).or_default().push((le, v));
            }
            "gateway_queue_dispatched_total" => {
                *q.dispatched.entry(band).or_default() += v;
            }
            "gateway_queue_refused_total" => {
                let reason = l.get("reason").cloned().unwrap_or_default();
                *q.refused.entry(reason).or_default() += v;
            }
            "gateway_queue_depth" => {
                *q.depth.entry(band).or_default() += v;
            }
            _ => {}
        }
    }
    for b in q.wait.values_mut() {
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    q
}

/// `histogram_quantile(q, after − before)` of one band's buckets.
fn quantile(q: f64, after: &[(f64, f64)], before: Option<&Vec<(f64, f64)>>) -> Option<f64> {
    let b: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let prev = before
                .and_then(|v| v.iter().find(|x| x.0 == le))
                .map_or(0.0, |x| x.1);
            (le, c - prev)
        })
        .collect();
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, c) in &b {
        if c >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            return Some(if c > below {
                lo + (le - lo) * (rank - below) / (c - below)
            } else {
                le
            });
        }
        lo = le;
        below = c;
    }
    Some(lo)
}

/// Max-min fair shares of `total` given `demands` (water-filling).
fn max_min(demands: &[f64], total: f64) -> Vec<f64> {
    let mut share = vec![0.0; demands.len()];
    let mut left = total;
    let mut open: Vec<usize> = (0..demands.len()).filter(|&i| demands[i] > 0.0).collect();
    while !open.is_empty() && left > 1e-9 {
        let each = left / open.len() as f64;
        let (sated, rest): (Vec<usize>, Vec<usize>) =
            open.iter().partition(|&&i| demands[i] - share[i] <= each);
        if sated.is_empty() {
            for &i in &rest {
                share[i] += each;
            }
            break;
        }
        for &i in &sated {
            left -= demands[i] - share[i];
            share[i] = demands[i];
        }
        open = rest;
    }
    share
}

/// Jain's index of `x`: (Σx)² / (n Σx²).
fn jain(x: &[f64]) -> f64 {
    let s: f64 = x.iter().sum();
    let s2: f64 = x.iter().map(|v| v * v).sum();
    if s2 == 0.0 {
        return f64::NAN;
    }
    s * s / (x.len() as f64 * s2)
}

fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// One flooded run on a fresh gateway: its JSON row.
#[allow(clippy::too_many_arguments)]
fn measure(
    bin: &Path,
    conf: &Conf,
    run: Run,
    o: &Opts,
    sims: &[GpuSim],
    reqs: &Arc<Vec<SReq>>,
    keys: &Arc<Vec<String>>,
    unloaded: &[f64],
) -> Result<Value, String> {
    drain_and_reset(sims);
    let gw = start(bin, conf)?;
    let before = http_get(conf.admin, "/metrics", None)
        .map(|t| queue_metrics(&t))
        .unwrap_or_default();
    // Sampler: the deepest queue per band; /balance/queues when arrivals end.
    let stop = Arc::new(AtomicBool::new(false));
    let admin = conf.admin;
    let arrivals_end = o.duration;
    let sampler = {
        let stop = stop.clone();
        let ops = ops_key(o.seed);
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut max: BTreeMap<String, f64> = BTreeMap::new();
            let mut snapshot = Value::Null;
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(1200) {
                if let Some(t) = http_get(admin, "/metrics", None) {
                    for (b, d) in queue_metrics(&t).depth {
                        let m = max.entry(b).or_insert(0.0);
                        *m = m.max(d);
                    }
                }
                if snapshot.is_null() && t0.elapsed() >= arrivals_end {
                    snapshot = http_get(admin, "/balance/queues", Some(&ops))
                        .and_then(|b| serde_json::from_str(&b).ok())
                        .unwrap_or(json!("unavailable"));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (max, snapshot)
        })
    };
    let all: Vec<usize> = (0..reqs.len()).collect();
    let give_up = o.duration + Duration::from_secs(o.max_wait + 120);
    let (out, elapsed) = run_plan(reqs, &all, conf.listen, keys, give_up);
    stop.store(true, Ordering::SeqCst);
    let after = http_get(conf.admin, "/metrics", None)
        .map(|t| queue_metrics(&t))
        .unwrap_or_default();
    let (max_depth, snapshot) = sampler.join().unwrap_or_default();
    drop(gw);

    let n = TENANTS.len();
    let status_of = |d: &Done| match d.status {
        200 if d.ok => "ok",
        429 => "429",
        503 => "503",
        _ => "other",
    };
    let mut status: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &out {
        *status.entry(status_of(d)).or_default() += 1;
    }
    let ok: Vec<&Done> = out.iter().filter(|d| d.ok).collect();
    let tokens: u64 = ok.iter().map(|d| d.tokens).sum();
    // Fairness over estimated tokens: served vs the max-min share of what was served.
    let demand: Vec<f64> = (0..n)
        .map(|t| {
            out.iter()
                .filter(|d| d.tenant == t)
                .map(|d| d.cost as f64)
                .sum()
        })
        .collect();
    let served: Vec<f64> = (0..n)
        .map(|t| {
            ok.iter()
                .filter(|d| d.tenant == t)
                .map(|d| d.cost as f64)
                .sum()
        })
        .collect();
    let share = max_min(&demand, served.iter().sum());
    let norm: Vec<f64> = served
        .iter()
        .zip(&share)
        .map(|(s, f)| if *f > 0.0 { s / f } else { 1.0 })
        .collect();
    let j = jain(&norm);

    // Bands exist with the queue only; without, every tenant is in band 0.
    let band = |t: usize| if run == Run::On { TENANTS[t].band } else { 0 };
    let mut tenants = Vec::new();
    for (t, spec) in TENANTS.iter().enumerate() {
        let mine: Vec<&Done> = out.iter().filter(|d| d.tenant == t).collect();
        let count = |s: &str| mine.iter().filter(|d| status_of(d) == s).count();
        let ttft: Vec<f64> = mine.iter().filter(|d| d.ok).map(|d| d.ttft).collect();
        let e2e: Vec<f64> = mine.iter().filter(|d| d.ok).map(|d| d.e2e).collect();
        let refused_e2e: Vec<f64> = mine.iter().filter(|d| !d.ok).map(|d| d.e2e).collect();
        let p99 = pct(&ttft, 0.99);
        tenants.push(json!({
            "tenant": spec.name, "band": band(t),
            "requests": mine.len(), "ok": count("ok"), "429": count("429"), "503": count("503"), "other": count("other"),
            "ttft_p50_s": num(pct(&ttft, 0.5)), "ttft_p99_s": num(p99),
            "e2e_p50_s": num(pct(&e2e, 0.5)), "e2e_p99_s": num(pct(&e2e, 0.99)),
            "refused_after_p50_s": num(pct(&refused_e2e, 0.5)),
            "unloaded_ttft_p99_s": num(unloaded[t]),
            "ttft_p99_vs_unloaded": num(p99 / unloaded[t]),
            "offered_cost_tokens": demand[t], "served_cost_tokens": served[t],
            "fair_share_cost_tokens": share[t], "served_over_fair_share": num(norm[t]),
        }));
    }

    // Per band: client-side TTFT p99, and the gateway's queue wait p99.
    let mut bands = Vec::new();
    let mut band_ids: Vec<i32> = (0..n).map(band).collect();
    band_ids.sort_unstable();
    band_ids.dedup();
    for b in band_ids.iter().rev() {
        let key = b.to_string();
        let ttft: Vec<f64> = ok
            .iter()
            .filter(|d| band(d.tenant) == *b)
            .map(|d| d.ttft)
            .collect();
        let wait = after
            .wait
            .get(&key)
            .and_then(|a| quantile(0.99, a, before.wait.get(&key)));
        let wait50 = after
            .wait
            .get(&key)
            .and_then(|a| quantile(0.5, a, before.wait.get(&key)));
        let dispatched = after
            .dispatched
            .get(&key)
            .map(|a| a - before.dispatched.get(&key).copied().unwrap_or_default());
        bands.push(json!({
            "band": b, "tenants": (0..n).filter(|&t| band(t) == *b).map(|t| TENANTS[t].name).collect::<Vec<_>>(),
            "client_ttft_p99_s": num(pct(&ttft, 0.99)),
            "gateway_queue_wait_p50_s": wait50.map_or(Value::Null, num),
            "gateway_queue_wait_p99_s": wait.map_or(Value::Null, num),
            "gateway_queue_dispatched": dispatched,
            "gateway_queue_max_depth": max_depth.get(&key),
        }));
    }
    let refused: BTreeMap<String, f64> = after
        .refused
        .iter()
        .map(|(r, v)| (r.clone(), v - before.refused.get(r).copied().unwrap_or(0.0)))
        .collect();

    let row = json!({
        "run": run.name(), "description": run.describe(), "config": conf.path.display().to_string(),
        "requests": out.len(), "ok": ok.len(), "status": status,
        "elapsed_s": elapsed,
        "goodput_rps": ok.len() as f64 / elapsed.max(1e-9),
        "output_tokens_per_s": tokens as f64 / elapsed.max(1e-9),
        "jain_fairness": num(j),
        "tenants": tenants, "bands": bands,
        "gateway_queue_metrics": after.present,
        "gateway_queue_refused": refused,
        "balance_queues_at_end_of_arrivals": snapshot,
    });
    print_run(&row);
    Ok(row)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// A count that may be missing (no queue metrics): "n/a".
fn opt(v: &Value) -> String {
    v.as_f64().map_or("n/a".into(), |x| format!("{x:.0}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn print_run(r: &Value) {
    let st = &r["status"];
    println!(
        "\nrun `{}` ({}): {} requests, ok {}, 429 {}, 503 {}, other {}; goodput {:.2} req/s, {:.0} output tokens/s; Jain {:.3}",
        r["run"].as_str().unwrap_or("?"),
        r["description"].as_str().unwrap_or(""),
        u(&r["requests"]),
        u(&r["ok"]),
        u(&st["429"]),
        u(&st["503"]),
        u(&st["other"]),
        f(&r["goodput_rps"]),
        f(&r["output_tokens_per_s"]),
        f(&r["jain_fairness"]),
    );
    println!(
        "  {:<6} {:>4} {:>5} {:>5} {:>4} {:>4} {:>5}  {:>7} {:>7} {:>9} {:>6}  {:>9}",
        "tenant",
        "band",
        "sent",
        "ok",
        "429",
        "503",
        "other",
        "TTFT50",
        "TTFT99",
        "unloaded",
        "×",
        "served/fair"
    );
    for t in r["tenants"].as_array().into_iter().flatten() {
        println!(
            "  {:<6} {:>4} {:>5} {:>5} {:>4} {:>4} {:>5}  {:>7.3} {:>7.3} {:>9.3} {:>6.2}  {:>9.2}",
            t["tenant"].as_str().unwrap_or("?"),
            t["band"].as_i64().unwrap_or(0),
            u(&t["requests"]),
            u(&t["ok"]),
            u(&t["429"]),
            u(&t["503"]),
            u(&t["other"]),
            f(&t["ttft_p50_s"]),
            f(&t["ttft_p99_s"]),
            f(&t["unloaded_ttft_p99_s"]),
            f(&t["ttft_p99_vs_unloaded"]),
            f(&t["served_over_fair_share"]),
        );
    }
    for b in r["bands"].as_array().into_iter().flatten() {
        let w = &b["gateway_queue_wait_p99_s"];
        println!(
            "  band {}: client TTFT p99 {:.3} s; gateway queue wait p99 {}, dispatched {}, deepest {}",
            b["band"],
            f(&b["client_ttft_p99_s"]),
            if w.is_null() {
                "n/a".to_string()
            } else {
                format!("{:.3} s", f(w))
            },
            opt(&b["gateway_queue_dispatched"]),
            opt(&b["gateway_queue_max_depth"]),
        );
    }
    if r["gateway_queue_metrics"] == true {
        println!("  queue refused by reason: {}", r["gateway_queue_refused"]);
    }
}

/// TTFT p99 bars per tenant: unloaded, then each run.
fn svg(rows: &[Value], unloaded: &[f64]) -> String {
    let series: Vec<(String, Vec<f64>)> =
        std::iter::once(("unloaded".to_string(), unloaded.to_vec()))
            .chain(rows.iter().map(|r| {
                (
                    format!(
                        "{} (Jain {:.2}, {:.1} req/s)",
                        r["run"].as_str().unwrap_or("?"),
                        f(&r["jain_fairness"]),
                        f(&r["goodput_rps"])
                    ),
                    r["tenants"]
                        .as_array()
                        .map(|ts| ts.iter().map(|t| f(&t["ttft_p99_s"])).collect())
                        .unwrap_or_default(),
                )
            }))
            .collect();
    // Log scale from 1 ms: unloaded TTFTs are milliseconds, queued ones seconds.
    const FLOOR: f64 = 0.001;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.01, f64::max);
    let scale = |v: f64| (v.max(FLOOR) / FLOOR).log10() / (max / FLOOR).log10();
    let (w, h, left, bottom, top) = (820.0, 400.0, 60.0, 40.0, 70.0);
    let group = (w - left - 20.0) / TENANTS.len() as f64;
    let bar = group / (series.len() + 1) as f64;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<text x=\"{left}\" y=\"20\" font-size=\"14\">saturation: TTFT p99 (s, log scale) per tenant, of its requests served (lower is better)</text>\n");
    for (si, (name, _)) in series.iter().enumerate() {
        let (col, row) = (si % 2, si / 2);
        s += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            left + col as f64 * 330.0,
            30.0 + row as f64 * 15.0,
            COLORS[si % COLORS.len()],
            left + 13.0 + col as f64 * 330.0,
            39.0 + row as f64 * 15.0
        );
    }
    for (ti, t) in TENANTS.iter().enumerate() {
        for (si, (_, v)) in series.iter().enumerate() {
            let val = v.get(ti).copied().filter(|x| x.is_finite());
            let bh = val.map_or(0.0, |v| (h - bottom - top) * scale(v));
            let x = left + ti as f64 * group + si as f64 * bar + bar / 2.0;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>\n",
                h - bottom - bh,
                bar * 0.9,
                COLORS[si % COLORS.len()],
                x + bar * 0.45,
                h - bottom - bh - 3.0,
                val.map_or("–".to_string(), |v| format!("{v:.2}"))
            );
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}{}</text>\n",
            left + ti as f64 * group + group / 2.0,
            h - bottom + 18.0,
            t.name,
            if t.band != 0 {
                format!(" (band {})", t.band)
            } else {
                String::new()
            }
        );
    }
    s + "</svg>\n"
}

pub fn main(args: Vec<String>) -> ExitCode {
    let mut o = Opts {
        runs: vec![Run::On, Run::Off, Run::Uncapped],
        cap: Cap::Inflight,
        flood: 5.0,
        light: 0.5,
        max_wait: 10,
        batch: BATCH,
        duration: Duration::from_secs(40),
        seed: 7,
    };
    let bad = |m: &str| {
        eprintln!("routebench: {m}\n{USAGE}");
        ExitCode::from(2)
    };
    let mut quick = false;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut v = || args.next();
        match a.as_str() {
            "--saturate" => {}
            "--workload" => match v().as_deref() {
                Some("saturate") => {}
                _ => return bad("--saturate: no other --workload"),
            },
            "--runs" => {
                let list: Option<Vec<Run>> = v()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Run::parse)
                    .collect();
                match list {
                    Some(l) if !l.is_empty() => o.runs = l,
                    _ => return bad("--runs: a list of on, off, uncapped"),
                }
            }
            "--cap" => match v().as_deref() {
                Some("inflight") => o.cap = Cap::Inflight,
                Some("scraped") => o.cap = Cap::Scraped,
                _ => return bad("--cap: inflight or scraped"),
            },
            "--flood" => match v()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|x| *x > 0.0 && *x <= 20.0)
            {
                Some(x) => o.flood = x,
                None => return bad("--flood: a factor above 0, at most 20"),
            },
            "--light" => match v()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|x| *x > 0.0 && *x <= 5.0)
            {
                Some(x) => o.light = x,
                None => return bad("--light: a factor above 0, at most 5"),
            },
            "--max-wait" => match v()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|x| (1..=300).contains(x))
            {
                Some(x) => o.max_wait = x,
                None => return bad("--max-wait: 1 to 300 seconds"),
            },
            "--batch" => match v()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|x| (1..=256).contains(x))
            {
                Some(x) => o.batch = x,
                None => return bad("--batch: 1 to 256"),
            },
            "--duration" => match v()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| (1..=600).contains(s))
            {
                Some(s) => o.duration = Duration::from_secs(s),
                None => return bad("--duration: 1 to 600 seconds"),
            },
            "--seed" => match v().and_then(|v| v.parse().ok()) {
                Some(s) => o.seed = s,
                None => return bad("--seed: a number"),
            },
            "--quick" => quick = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return bad(&format!("--saturate: unknown argument {other}")),
        }
    }
    if quick {
        o.duration = Duration::from_secs(10);
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bench_dir = root.join("target/bench");
    let _ = std::fs::create_dir_all(&bench_dir);
    let bin = std::env::var_os("GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/gateway"));

    let cfgs = pool(o.batch);
    let mid = |(lo, hi): (u64, u64)| (lo + hi) as f64 / 2.0;
    // "user" + the content, at 4 bytes a token.
    let (mean_prompt, mean_output) = (mid(PROMPT) + 1.0, mid(OUTPUT));
    let caps: Vec<f64> = cfgs
        .iter()
        .map(|c| c.capacity_rps(mean_prompt, mean_output))
        .collect();
    let capacity: f64 = caps.iter().sum();
    let equal = capacity / TENANTS.len() as f64;
    let rates: Vec<f64> = TENANTS
        .iter()
        .map(|t| equal * if t.light { o.light } else { o.flood })
        .collect();
    let offered: f64 = rates.iter().sum();
    let sims: Vec<GpuSim> = cfgs.iter().cloned().map(GpuSim::start).collect();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    println!(
        "saturate: mean prompt {mean_prompt:.0} tokens, mean output {mean_output:.0}; pool capacity ≈ {capacity:.1} req/s, offered {offered:.1} req/s ({:.2} × capacity) over {} s",
        offered / capacity,
        o.duration.as_secs()
    );
    for ((c, s), cap) in cfgs.iter().zip(&sims).zip(&caps) {
        println!(
            "  {} on {}: speed {}, batch {}, ≈ {:.2} req/s",
            c.name, s.addr, c.speed, c.max_batch, cap
        );
    }
    println!(
        "  saturated at: {}",
        match o.cap {
            Cap::Inflight => format!("max_inflight = {} per backend (the batch size)", o.batch),
            Cap::Scraped => "queue_saturation = 1 (scraped vllm:num_requests_waiting)".into(),
        }
    );
    let reqs = Arc::new(plan(&o, &rates));
    let keys: Arc<Vec<String>> =
        Arc::new(TENANTS.iter().map(|t| api_key(o.seed, t.name)).collect());
    for (t, spec) in TENANTS.iter().enumerate() {
        println!(
            "  tenant {:<5} band {}: {:.2} req/s ({:.1} × the equal share {equal:.2}), {} requests",
            spec.name,
            spec.band,
            rates[t],
            rates[t] / equal,
            reqs.iter().filter(|r| r.tenant == t).count()
        );
    }

    // Configs, checked: a run the gateway refuses is skipped with its reason.
    let mut confs: Vec<(Run, Conf)> = Vec::new();
    let mut skipped = Vec::new();
    // Every config is checked (the unloaded runs take the first accepted, in
    // this order); only those in --runs are run.
    for r in [Run::On, Run::Off, Run::Uncapped] {
        match write_conf(&bin, &bench_dir, r, &o, &addrs) {
            Ok(c) => confs.push((r, c)),
            Err(e) => {
                if o.runs.contains(&r) {
                    println!(
                        "run `{}`: skipped, the gateway refuses its config: {e}",
                        r.name()
                    );
                    skipped.push(json!({"run": r.name(), "reason": e}));
                }
            }
        }
    }
    let Some((unloaded_run, unloaded_conf)) = confs.first() else {
        eprintln!("routebench: the gateway refuses every config (see above)");
        return ExitCode::FAILURE;
    };

    // Each light tenant alone: its unloaded TTFT.
    let window = o.duration.min(Duration::from_secs(UNLOADED_S));
    println!(
        "\nunloaded: each light tenant alone, its first {} s of arrivals, through the `{}` gateway",
        window.as_secs(),
        unloaded_run.name()
    );
    let mut unloaded = vec![f64::NAN; TENANTS.len()];
    let mut unloaded_rows = Vec::new();
    for (t, spec) in TENANTS.iter().enumerate().filter(|(_, s)| s.light) {
        drain_and_reset(&sims);
        let gw = match start(&bin, unloaded_conf) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("routebench: {e}");
                return ExitCode::FAILURE;
            }
        };
        let pick: Vec<usize> = (0..reqs.len())
            .filter(|&i| reqs[i].tenant == t && reqs[i].at < window)
            .collect();
        let (out, _) = run_plan(
            &reqs,
            &pick,
            unloaded_conf.listen,
            &keys,
            window + Duration::from_secs(120),
        );
        drop(gw);
        let ttft: Vec<f64> = out.iter().filter(|d| d.ok).map(|d| d.ttft).collect();
        unloaded[t] = pct(&ttft, 0.99);
        let ok = ttft.len();
        println!(
            "  {:<5} {} requests, ok {ok}: TTFT p50 {:.3} s, p99 {:.3} s",
            spec.name,
            out.len(),
            pct(&ttft, 0.5),
            unloaded[t]
        );
        unloaded_rows.push(json!({"tenant": spec.name, "requests": out.len(), "ok": ok,
            "ttft_p50_s": num(pct(&ttft, 0.5)), "ttft_p99_s": num(unloaded[t])}));
    }

    let mut rows = Vec::new();
    for &r in &o.runs {
        let Some((_, conf)) = confs.iter().find(|(x, _)| *x == r) else {
            continue;
        };
        match measure(&bin, conf, r, &o, &sims, &reqs, &keys, &unloaded) {
            Ok(row) => rows.push(row),
            Err(e) => {
                println!("run `{}`: failed: {e}", r.name());
                skipped.push(json!({"run": r.name(), "reason": e}));
            }
        }
    }

    // Light tenants' TTFT p99 under the flood vs unloaded (the 2× bar).
    if !rows.is_empty() {
        println!("\nlight tenants' TTFT p99 ÷ unloaded (≤ 2 = within 2× of unloaded):");
        print!("  {:<10}", "run");
        for t in TENANTS.iter().filter(|t| t.light) {
            print!(" {:>7}", t.name);
        }
        println!();
        for r in &rows {
            print!("  {:<10}", r["run"].as_str().unwrap_or("?"));
            for (t, spec) in TENANTS.iter().enumerate() {
                if spec.light {
                    print!(" {:>7.2}", f(&r["tenants"][t]["ttft_p99_vs_unloaded"]));
                }
            }
            println!();
        }
    }

    let json_path = bench_dir.join("routing-saturate.json");
    let svg_path = bench_dir.join("routing-saturate.svg");
    let results = json!({
        "scenario": "saturate",
        "pool": cfgs.iter().zip(&addrs).zip(&caps).map(|((c, a), cap)| json!({"name": c.name, "addr": a.to_string(),
            "speed": c.speed, "max_batch": c.max_batch, "kv_tokens": c.kv_tokens, "capacity_rps": cap})).collect::<Vec<_>>(),
        "capacity_rps": capacity, "offered_rps": offered, "offered_over_capacity": offered / capacity,
        "duration_s": o.duration.as_secs(), "seed": o.seed,
        "saturation": match o.cap { Cap::Inflight => json!({"by": "max_inflight", "max_inflight": o.batch}),
            Cap::Scraped => json!({"by": "queue_saturation (scraped vllm:num_requests_waiting)", "queue_saturation": 1,
                "metrics_interval": "50ms", "metrics_max_age": "200ms"}) },
        "queue": {"max_requests": 4096, "max_bytes": 64u64 << 20, "max_wait_s": o.max_wait, "fairness": "tenant", "client_priority": false},
        "algorithm": "gpu_aware",
        "tenants": TENANTS.iter().enumerate().map(|(t, s)| json!({"tenant": s.name, "band": s.band,
            "rate_rps": rates[t], "times_equal_share": rates[t] / equal,
            "requests": reqs.iter().filter(|r| r.tenant == t).count()})).collect::<Vec<_>>(),
        "prompt_tokens": [PROMPT.0, PROMPT.1], "output_tokens": [OUTPUT.0, OUTPUT.1],
        "stream": true, "arrivals": "poisson per tenant (open loop), no retries",
        "queue_wait_source": "gateway_queue_wait_seconds histogram (admin /metrics), difference over the run, interpolated within buckets",
        "fairness_index": "Jain over x_i = served_i / maxmin_share_i, in estimated tokens (prompt + max_tokens); shares of the run's served total",
        "unloaded": {"config": unloaded_run.name(), "window_s": window.as_secs(), "tenants": unloaded_rows},
        "runs": rows, "skipped": skipped,
    });
    let _ = std::fs::write(&svg_path, svg(&rows, &unloaded));
    let _ = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    );
    println!(
        "\nresults: {}\nchart:   {}\nconfigs: {}",
        json_path.display(),
        svg_path.display(),
        bench_dir.join("routing-saturate-<run>.toml").display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_min_water_fills() {
        let s = max_min(&[10.0, 1.0, 1.0], 6.0);
        assert_eq!(s, vec![4.0, 1.0, 1.0]);
        let s = max_min(&[10.0, 1.0], 20.0);
        assert_eq!(s, vec![10.0, 1.0]);
        assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn histogram_quantile_interpolates() {
        let after = vec![(0.1, 50.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        let before = vec![(0.1, 0.0), (1.0, 0.0), (f64::INFINITY, 0.0)];
        let q = quantile(0.5, &after, Some(&before)).unwrap();
        assert!((q - 0.1).abs() < 1e-9);
        let q = quantile(0.75, &after, Some(&before)).unwrap();
        assert!((q - 0.55).abs() < 1e-9);
        let m = queue_metrics(
            "gateway_queue_wait_seconds_bucket{band=\"1\",cluster=\"pool\",le=\"+Inf\"} 3\n\
             gateway_queue_refused_total{cluster=\"pool\",reason=\"timeout\"} 2\n",
        );
        assert_eq!(m.wait["1"], vec![(f64::INFINITY, 3.0)]);
        assert_eq!(m.refused["timeout"], 2.0);
    }
}
