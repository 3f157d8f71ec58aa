//! `routebench`: GPU-aware routing, compared through the gateway.
//!
//! A pool of simulated GPU model servers (`gateway_tests::gpusim`: continuous
//! batching, a queue, prefill and decode costs, a KV cache of 16-token blocks
//! with vLLM-like automatic prefix caching, vLLM's metric names) of mixed
//! speed and batch size sits behind the gateway, one cluster over the same
//! servers per algorithm: `round_robin`, `least_request` (P2C on in-flight),
//! `gie_like` (the Kubernetes Inference Gateway's default scorers: queue
//! weight 2 `(max−q)/(max−min)`, KV cache weight 2 `1−kv`, metrics scraped
//! every 50 ms, older than 200 ms ignored), `gpu_aware` (the gateway's own)
//! and, where the gateway has them, the prefix-cache-aware `gie_prefix` and
//! `prefix_aware`. Open-loop Poisson arrivals, streamed (SSE) so time to
//! first token is measured; every algorithm gets the same arrivals (same
//! seed), one after the other, with the servers drained and their prefix
//! caches emptied in between.
//!
//! Workloads (`--workload`):
//! - `mixed` (default): prompts of 50..1500 tokens, every one distinct,
//!   outputs of 8/32/64/128 tokens, at 60 %, 80 % and 90 % of the pool's
//!   capacity; one gateway for every algorithm. Results: `routing.json` and
//!   `routing.svg` (p99 latency per load and algorithm).
//! - `shared_prefix` (as kubernetes-sigs/inference-perf's): G groups (48),
//!   each a long system prompt of its own (1,500 tokens) followed by short
//!   questions (50..100 tokens), group popularity Zipf (s = 1) or uniform,
//!   outputs 16..128 tokens.
//! - `multi_turn`: conversations (a system prompt of 400 tokens of their own,
//!   then turns): turn k's messages are turn k−1's plus its answer plus a new
//!   question; the next turn is sent a think time (exponential, mean 1 s)
//!   after the previous answer ends; conversations start as a Poisson
//!   process and interleave.
//! - `no_prefix`: the control, `shared_prefix`'s lengths and arrivals with
//!   every prompt distinct.
//!
//! The prefix workloads run at 75 % of the pool's capacity (counted with the
//! whole prompt prefilled, no cache hit), restart the gateway(s) for each
//! algorithm (no learned state carried over), and add `pin`: the client-side
//! reference that sends each group (conversation) straight to one server —
//! a fixed assignment, heaviest groups first to the server with the most
//! capacity left — bypassing the gateway. Per algorithm: TTFT p50/p90/p99,
//! end-to-end p50/p99, output tokens/s, the prefix cache hit ratio (the
//! servers' `vllm:prefix_cache_hits_total` ÷ `queries_total` over the run),
//! errors. Results: `routing-<workload>.json` and `.svg` in `target/bench/`.
//! `--gateways 2` puts two gateway processes (same clusters) in front of the
//! same pool, each request sent to one of them at random (seeded); they
//! share their prefix placements through a redis-server the bench starts
//! (`[ratelimit.redis]`), unless `--fleet-sync off`.
//!
//! `--saturate` (or `--workload saturate`): flow control when the pool is
//! over capacity — five tenants (API keys), one flooding at 5× its equal
//! share, offered load 1.4× capacity; the gateway with a queue (fairness
//! by tenant, one tenant in a higher band) vs without (503 at once) vs no
//! saturation cap; goodput, refusals, per-tenant TTFT against its unloaded
//! TTFT, queue wait p99 per band, Jain's fairness index. See
//! [`saturate`] (`routebench/saturate.rs`); results in
//! `target/bench/routing-saturate.json` and `.svg`.
//!
//! Usually run as `cargo xtask bench routing`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use serde_json::{json, Value};

#[path = "routebench/saturate.rs"]
mod saturate;

const USAGE: &str = "usage: routebench [--workload mixed|shared_prefix|multi_turn|no_prefix] [--policies LIST]
                  [--gateways N] [--fleet-sync on|off] [--free-prefill] [--duration SECS] [--loads LIST] [--seed N] [--quick]
                  [--groups G] [--popularity zipf|uniform] [--system-tokens N] [--turns N]
       routebench --saturate [--runs on,off,uncapped] [--cap inflight|scraped] [--flood F] [--light L]
                  [--max-wait SECS] [--batch N] [--duration SECS] [--seed N] [--quick]
                  (routebench --saturate --help)

  --workload W       mixed (default): prompts 50..1500 tokens, every one distinct, outputs 8/32/64/128;
                     shared_prefix: G groups, each a long system prompt of its own followed by short
                     questions (50..100 tokens), outputs 16..128, group popularity Zipf (s = 1) or uniform;
                     multi_turn: conversations, each turn = the previous turn's messages + its answer + a
                     new question, sent a think time (mean 1 s) after the previous answer, interleaved;
                     no_prefix: the control, shared_prefix's lengths and arrivals, every prompt distinct
  --policies LIST    what to compare, each algorithm a gateway cluster (default for mixed:
                     round_robin,least_request,gie_like,gpu_aware; for the others also gie_prefix,
                     prefix_aware and pin); `pin`: the client sends each group (conversation) straight to
                     one server, a fixed capacity-weighted assignment, bypassing the gateway. An
                     algorithm the gateway refuses is skipped, with its reason
  --gateways N       N gateway processes with the same clusters in front of the same pool, each request
                     sent to one of them at random (seeded); rows named `POLICY xN` (default 1)
  --free-prefill      the floor: the same arrivals on servers whose prefill costs nothing (every
                     prompt as if cached), to see how far any cache-aware routing could go
  --fleet-sync on|off with --gateways N > 1: the gateways share their prefix placements through a
                     redis-server the bench starts (on, the default) or each keeps its own (off)
  --duration SECS    seconds of arrivals (conversation starts for multi_turn) per run (default 40)
  --loads LIST       fractions of the pool's capacity, whole prompts prefilled (default 0.6,0.8,0.9 for
                     mixed, 0.75 for the others)
  --seed N           arrivals, lengths, texts and gateway choices (default 7)
  --quick            10 s per run, one load (0.8 for mixed, 0.75 for the others)
  --groups G         shared_prefix: groups (default 48)
  --popularity P     shared_prefix: zipf (default, s = 1) or uniform
  --system-tokens N  shared_prefix, no_prefix: the system prompt's tokens (default 1500)
  --turns N          multi_turn: turns per conversation (default 6)

Every run gets the same arrivals; in between, the servers are drained and their prefix caches
emptied (the prefix workloads also restart the gateways). Results: a table, and in target/bench/
routing.json + routing.svg (mixed) or routing-<workload>.json + routing-<workload>.svg.

--saturate (or --workload saturate): flow control over capacity, one tenant flooding: the gateway with
a queue (fair by tenant) vs without (503 at once) vs no saturation cap (routing-saturate.json, .svg).

env: GATEWAY_BIN (default <workspace>/target/release/gateway); ROUTEBENCH_BALANCE: extra
`[clusters.X.balance]` settings for every policy, `;`-separated (e.g. prefix_stickiness = 2);
ROUTEBENCH_GATEWAY_LOGS=FILE: the gateways' logs, access logs included, appended to FILE
";

/// The algorithms, in the order they are reported.
const MIXED_POLICIES: [&str; 4] = ["round_robin", "least_request", "gie_like", "gpu_aware"];
const PREFIX_POLICIES: [&str; 7] = [
    "round_robin",
    "least_request",
    "gie_like",
    "gpu_aware",
    "gie_prefix",
    "prefix_aware",
    "pin",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Mixed,
    SharedPrefix,
    MultiTurn,
    NoPrefix,
}

impl Workload {
    fn parse(s: &str) -> Option<Workload> {
        Some(match s {
            "mixed" => Workload::Mixed,
            "shared_prefix" => Workload::SharedPrefix,
            "multi_turn" => Workload::MultiTurn,
            "no_prefix" => Workload::NoPrefix,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Workload::Mixed => "mixed",
            Workload::SharedPrefix => "shared_prefix",
            Workload::MultiTurn => "multi_turn",
            Workload::NoPrefix => "no_prefix",
        }
    }
}

struct Opts {
    workload: Workload,
    duration: Duration,
    seed: u64,
    groups: usize,
    zipf: bool,
    system_tokens: u64,
    turns: usize,
}

/// The pool: mixed GPUs (speed) and batch sizes; the last one is slow. For
/// the prefix workloads the KV caches are smaller (32k, 24k, 16k, 16k
/// tokens) than all the groups' prefixes together (48 × 1,500 = 72k): no
/// server can keep every prefix, so where a request goes decides its hits.
fn pool(w: Workload) -> Vec<SimConfig> {
    let sim = |name: &str, speed: f64, max_batch: usize, kv_tokens: u64| SimConfig {
        name: name.into(),
        engine: "vllm".into(),
        max_batch,
        kv_tokens: if w == Workload::Mixed {
            65_536
        } else {
            kv_tokens
        },
        step_ms: 10.0,
        per_seq_ms: 0.5,
        prefill_ms_per_1k_tokens: 20.0,
        speed,
        ..SimConfig::default()
    };
    vec![
        sim("h100-a", 1.0, 16, 32_768),
        sim("a100-b", 0.7, 8, 24_576),
        sim("l40-c", 0.45, 8, 16_384),
        sim("t4-d", 0.2, 4, 16_384),
    ]
}

/// mixed: prompt tokens uniform in 50..1500; output tokens 8, 32, 64 or 128 (equally likely).
const OUTPUTS: [u64; 4] = [8, 32, 64, 128];
const PROMPT: (u64, u64) = (50, 1500);
/// The prefix workloads: questions of 50..=100 tokens, outputs of 16..=128.
const QUESTION: (u64, u64) = (50, 100);
const OUTPUT: (u64, u64) = (16, 128);
/// multi_turn: each conversation's own system prompt; mean think time.
const CONV_SYSTEM_TOKENS: u64 = 400;
const THINK_S: f64 = 1.0;

struct Rng(u64);
impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(
            (seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                | 1,
        )
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Exponential with this mean.
    fn exp(&mut self, mean: f64) -> f64 {
        -self.unit().ln() * mean
    }
}

/// `n` bytes of random lowercase words (4 bytes a token at the simulator):
/// JSON-safe, and two such texts share no 64-byte block.
fn words(r: &mut Rng, n: usize) -> String {
    let mut s = Vec::with_capacity(n + 8);
    while s.len() < n {
        let x = r.next();
        for i in 0..8 {
            let b = (x >> (i * 8)) as u8;
            s.push(if b < 40 { b' ' } else { b'a' + b % 26 });
        }
    }
    s.truncate(n);
    String::from_utf8(s).expect("ascii")
}

/// One request: its body and, for a conversation's later turns, the think
/// time after the previous answer.
struct Req {
    think: Duration,
    body: String,
    output: u64,
    /// Which gateway gets it (with --gateways N).
    gw: usize,
}

/// A group's requests, or a conversation's turns, or one mixed request.
struct Conv {
    start: Duration,
    group: usize,
    reqs: Vec<Req>,
}

struct Plan {
    convs: Vec<Conv>,
    /// Per group: its share of the requests (the pin assignment's weights).
    weights: Vec<f64>,
    requests: usize,
}

fn chat(messages: &[Value], output: u64) -> String {
    json!({"model": "m", "messages": messages, "max_tokens": output, "stream": true}).to_string()
}

/// Mean prompt and output tokens of a workload (the whole prompt as the simulator counts it).
fn mean_lengths(o: &Opts) -> (f64, f64) {
    let mid = |(lo, hi): (u64, u64)| (lo + hi) as f64 / 2.0;
    let (q, out) = (mid(QUESTION) * 4.0 + 4.0, mid(OUTPUT));
    match o.workload {
        Workload::Mixed => (
            mid(PROMPT) + 1.0,
            OUTPUTS.iter().sum::<u64>() as f64 / OUTPUTS.len() as f64,
        ),
        Workload::SharedPrefix | Workload::NoPrefix => {
            ((6.0 + o.system_tokens as f64 * 4.0 + q) / 4.0, out)
        }
        Workload::MultiTurn => {
            // Turn k (0-based): system + k + 1 questions + k answers; averaged over the turns.
            let t = o.turns as f64;
            let bytes = 6.0
                + CONV_SYSTEM_TOKENS as f64 * 4.0
                + (t + 1.0) / 2.0 * q
                + (t - 1.0) / 2.0 * (9.0 + out * 4.0);
            (bytes / 4.0, out)
        }
    }
}

/// The arrivals of one load: `rate` requests a second over `o.duration`.
fn plan(o: &Opts, rate: f64, gateways: usize) -> Plan {
    let mut r = Rng::new(o.seed, 1); // times, lengths, groups
    let mut text = Rng::new(o.seed, 2); // texts
    let mut gwr = Rng::new(o.seed, 3); // gateway choices
    let mut gw = || (gwr.next() % gateways as u64) as usize;
    let end = o.duration.as_secs_f64();
    let mut convs = Vec::new();
    let mut t = 0.0;
    match o.workload {
        Workload::Mixed => loop {
            t += r.exp(1.0 / rate);
            if t >= end || convs.len() >= 20_000 {
                break;
            }
            let prompt = PROMPT.0 + r.next() % (PROMPT.1 - PROMPT.0);
            let output = OUTPUTS[(r.next() % 4) as usize];
            let content = words(&mut text, (prompt * 4) as usize);
            convs.push(Conv {
                start: Duration::from_secs_f64(t),
                group: convs.len(),
                reqs: vec![Req {
                    think: Duration::ZERO,
                    body: chat(&[json!({"role": "user", "content": content})], output),
                    output,
                    gw: gw(),
                }],
            });
        },
        Workload::SharedPrefix | Workload::NoPrefix => {
            let g = o.groups;
            let w: Vec<f64> = (0..g)
                .map(|i| if o.zipf { 1.0 / (i + 1) as f64 } else { 1.0 })
                .collect();
            let total: f64 = w.iter().sum();
            let mut cdf = Vec::with_capacity(g);
            let mut acc = 0.0;
            for x in &w {
                acc += x / total;
                cdf.push(acc);
            }
            let sys_bytes = (o.system_tokens * 4) as usize;
            let systems: Vec<String> = (0..g)
                .map(|i| words(&mut Rng::new(o.seed, 1000 + i as u64), sys_bytes))
                .collect();
            loop {
                t += r.exp(1.0 / rate);
                if t >= end || convs.len() >= 20_000 {
                    break;
                }
                let u = r.unit();
                let group = cdf.partition_point(|&c| c < u).min(g - 1);
                let question = words(&mut text, (r.range(QUESTION) * 4) as usize);
                let output = r.range(OUTPUT);
                let system = if o.workload == Workload::SharedPrefix {
                    systems[group].clone()
                } else {
                    words(&mut text, sys_bytes)
                };
                convs.push(Conv {
                    start: Duration::from_secs_f64(t),
                    group,
                    reqs: vec![Req {
                        think: Duration::ZERO,
                        body: chat(
                            &[
                                json!({"role": "system", "content": system}),
                                json!({"role": "user", "content": question}),
                            ],
                            output,
                        ),
                        output,
                        gw: gw(),
                    }],
                });
            }
            let requests = convs.len();
            return Plan {
                convs,
                weights: w.iter().map(|x| x / total).collect(),
                requests,
            };
        }
        Workload::MultiTurn => {
            let turns = o.turns.max(1);
            loop {
                t += r.exp(turns as f64 / rate);
                if t >= end || convs.len() >= 5_000 {
                    break;
                }
                let mut messages = vec![
                    json!({"role": "system", "content": words(&mut text, (CONV_SYSTEM_TOKENS * 4) as usize)}),
                ];
                let mut reqs = Vec::with_capacity(turns);
                for k in 0..turns {
                    let think = if k == 0 { 0.0 } else { r.exp(THINK_S) };
                    let output = r.range(OUTPUT);
                    messages.push(json!({"role": "user", "content": words(&mut text, (r.range(QUESTION) * 4) as usize)}));
                    reqs.push(Req {
                        think: Duration::from_secs_f64(think),
                        body: chat(&messages, output),
                        output,
                        gw: gw(),
                    });
                    // The answer, as the client would send it back: as long as the output.
                    messages.push(json!({"role": "assistant", "content": words(&mut text, (output * 4) as usize)}));
                }
                convs.push(Conv {
                    start: Duration::from_secs_f64(t),
                    group: convs.len(),
                    reqs,
                });
            }
        }
    }
    let n = convs.len().max(1);
    let requests = convs.iter().map(|c| c.reqs.len()).sum();
    Plan {
        convs,
        weights: vec![1.0 / n as f64; n],
        requests,
    }
}

/// `pin`: groups, heaviest first, each to the server whose share of the
/// load would stay the lowest relative to its capacity.
fn pin_map(weights: &[f64], capacities: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut load = vec![0.0; capacities.len()];
    let mut map = vec![0; weights.len()];
    for g in order {
        let s = (0..capacities.len())
            .min_by(|&a, &b| {
                ((load[a] + weights[g]) / capacities[a])
                    .total_cmp(&((load[b] + weights[g]) / capacities[b]))
            })
            .expect("a server");
        load[s] += weights[g];
        map[g] = s;
    }
    map
}

#[derive(Default, Clone)]
struct Outcome {
    ok: bool,
    latency: f64,
    ttft: f64,
    tokens: u64,
}

/// One streamed chat completion: (TTFT to the first SSE data event, latency) in seconds.
fn one(to: SocketAddr, host: &str, body: &str, output: u64) -> Outcome {
    let started = Instant::now();
    let run = || -> std::io::Result<Outcome> {
        let mut s = TcpStream::connect(to)?;
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
            tokens: if ok { output } else { 0 },
        })
    };
    run().unwrap_or_default()
}

/// Where a request goes: (address, host header).
type Target = dyn Fn(&Conv, &Req) -> (SocketAddr, String) + Send + Sync;

/// Start every conversation at its time (open loop: a slow answer never
/// delays another conversation); a conversation's turns one after another.
fn run_plan(plan: &Arc<Plan>, target: Arc<Target>) -> (Vec<Outcome>, f64) {
    let results = Arc::new(Mutex::new(Vec::with_capacity(plan.requests)));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(plan.convs.len());
    for i in 0..plan.convs.len() {
        if let Some(wait) = plan.convs[i].start.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let (plan, results, target) = (plan.clone(), results.clone(), target.clone());
        handles.push(std::thread::spawn(move || {
            let c = &plan.convs[i];
            for req in &c.reqs {
                std::thread::sleep(req.think);
                let (to, host) = target(c, req);
                let o = one(to, &host, &req.body, req.output);
                results.lock().unwrap().push(o);
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let v = std::mem::take(&mut *results.lock().unwrap());
    (v, elapsed)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The fleet's Redis for gateways started together (`--gateways N`): its
/// address and the key prefix of this set of gateways (each set its own,
/// so a fresh set learns nothing from the previous run).
type Fleet<'a> = Option<(SocketAddr, &'a str)>;

fn gateway_config(
    listen: SocketAddr,
    admin: SocketAddr,
    sims: &[SocketAddr],
    policies: &[&str],
    fleet: Fleet<'_>,
) -> String {
    let backends: Vec<String> = sims.iter().map(|a| format!("\"{a}\"")).collect();
    let mut c = format!(
        "[server]\nlisten = [\"{listen}\"]\nworkers = 2\n[admin]\nlisten = \"{admin}\"\n[log]\naccess_log = {}\n\n",
        // With the gateways' logs shown, their access logs too (per-request
        // backend, TTFT, duration: what a tail is made of).
        std::env::var_os("ROUTEBENCH_GATEWAY_LOGS").is_some()
    );
    if let Some((redis, keys)) = fleet {
        c += &format!("[ratelimit.redis]\naddress = \"{redis}\"\nkey_prefix = \"{keys}\"\n\n");
    }
    // Extra `[clusters.X.balance]` lines for every policy (tuning runs).
    let extra = std::env::var("ROUTEBENCH_BALANCE").unwrap_or_default();
    for p in policies {
        c += &format!(
            "[clusters.{p}]\nbackends = [{}]\nmax_connections = 4096\n[clusters.{p}.balance]\nalgorithm = \"{p}\"\nengine = \"vllm\"\n\
             metrics_interval = \"50ms\"\nmetrics_max_age = \"200ms\"\nqueue_saturation = 1000\nwarmup = \"0s\"\n{}\n\n",
            backends.join(", "),
            extra.replace(';', "\n")
        );
    }
    // OpenAI routes over a catalogue: every algorithm sees the same checked
    // request (model, declared max_tokens); only gpu_aware uses the budget.
    c += "[[models]]\nname = \"m\"\ncontext_tokens = 32768\nmax_output_tokens = 4096\n\n";
    for p in policies {
        c += &format!(
            "[[routes]]\nname = \"{p}\"\nhost = \"{p}.bench\"\npath_prefix = \"/\"\ncluster = \"{p}\"\nprotocol = \"openai\"\n[routes.timeouts]\nupstream_response = \"300s\"\n\n"
        );
    }
    c
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Where a gateway's output goes: appended to `ROUTEBENCH_GATEWAY_LOGS`
/// when set, else nowhere.
fn gateway_log() -> Result<Stdio, String> {
    match std::env::var_os("ROUTEBENCH_GATEWAY_LOGS") {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map(Stdio::from)
            .map_err(|e| format!("ROUTEBENCH_GATEWAY_LOGS: {e}")),
        None => Ok(Stdio::null()),
    }
}

/// Gateway processes with the same clusters; killed when dropped.
struct Gateways {
    procs: Vec<Child>,
    addrs: Vec<SocketAddr>,
}

impl Drop for Gateways {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_gateways(
    bin: &Path,
    dir: &Path,
    n: usize,
    policies: &[&str],
    sims: &[SocketAddr],
    redis: Option<SocketAddr>,
) -> Result<Gateways, String> {
    static SETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let keys = format!(
        "routebench:{}:{}:",
        std::process::id(),
        SETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let fleet = redis.filter(|_| n > 1).map(|r| (r, keys.as_str()));
    let mut g = Gateways {
        procs: Vec::new(),
        addrs: Vec::new(),
    };
    for i in 0..n {
        let (listen, admin) = (free_addr(), free_addr());
        let conf = dir.join(if i == 0 {
            "routing-gateway.toml".to_string()
        } else {
            format!("routing-gateway-{i}.toml")
        });
        std::fs::write(&conf, gateway_config(listen, admin, sims, policies, fleet))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&conf)
            .stdout(gateway_log()?)
            .stderr(gateway_log()?)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (cargo build --release -p gateway)",
                    bin.display()
                )
            })?;
        g.procs.push(child);
        g.addrs.push(listen);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, a) in g.addrs.clone().iter().enumerate() {
        while TcpStream::connect(a).is_err() {
            if Instant::now() > deadline || matches!(g.procs[i].try_wait(), Ok(Some(_))) {
                return Err(format!("gateway {i} did not start"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(g)
}

/// Whether the gateway takes a cluster with this algorithm (`check-config`);
/// its reason when not.
fn accepts(bin: &Path, dir: &Path, policy: &str, sims: &[SocketAddr]) -> Result<(), String> {
    let conf = dir.join(format!("routing-check-{policy}.toml"));
    std::fs::write(
        &conf,
        gateway_config(free_addr(), free_addr(), sims, &[policy], None),
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new(bin)
        .arg("check-config")
        .arg(&conf)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e} (cargo build --release -p gateway)",
                bin.display()
            )
        })?;
    let _ = std::fs::remove_file(&conf);
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    Err(text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("refused")
        .trim()
        .to_string())
}

/// Wait until no server has anything queued or running, then empty their prefix caches.
fn drain_and_reset(sims: &[GpuSim]) {
    let idle_by = Instant::now() + Duration::from_secs(300);
    while sims.iter().any(|s| s.load() != (0, 0)) && Instant::now() < idle_by {
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in sims {
        s.reset_prefix_cache();
    }
}

/// One run of `plan` (the servers drained and reset first): its result row.
fn measure(
    sims: &[GpuSim],
    plan: &Arc<Plan>,
    load: f64,
    policy: &str,
    label: &str,
    target: Arc<Target>,
) -> Value {
    drain_and_reset(sims);
    let before: Vec<(u64, (u64, u64))> = sims
        .iter()
        .map(|s| (s.completed(), s.prefix_cache()))
        .collect();
    let (out, elapsed) = run_plan(plan, target);
    let share: Vec<u64> = sims
        .iter()
        .zip(&before)
        .map(|(s, b)| s.completed() - b.0)
        .collect();
    let (mut queries, mut hits) = (0, 0);
    for (s, (_, (q, h))) in sims.iter().zip(&before) {
        let (q2, h2) = s.prefix_cache();
        queries += q2 - q;
        hits += h2 - h;
    }
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.ok).collect();
    let lat: Vec<f64> = ok.iter().map(|o| o.latency).collect();
    let ttft: Vec<f64> = ok.iter().map(|o| o.ttft).collect();
    let tokens: u64 = ok.iter().map(|o| o.tokens).sum();
    let row = json!({
        "load": load, "policy": policy, "label": label, "requests": out.len(), "ok": ok.len(),
        "errors": out.len() - ok.len(),
        // Completed ÷ time from the first arrival to the last answer.
        "throughput_rps": ok.len() as f64 / elapsed,
        "output_tokens_per_s": tokens as f64 / elapsed,
        "p50_s": pct(&lat, 0.5), "p99_s": pct(&lat, 0.99), "mean_s": lat.iter().sum::<f64>() / lat.len().max(1) as f64,
        "ttft_p50_s": pct(&ttft, 0.5), "ttft_p90_s": pct(&ttft, 0.9), "ttft_p99_s": pct(&ttft, 0.99),
        "prefix_cache_queries": queries, "prefix_cache_hits": hits,
        "prefix_hit_ratio": if queries > 0 { hits as f64 / queries as f64 } else { f64::NAN },
        "per_backend": share,
    });
    let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  {:<16} {:>6.3} {:>6.3} {:>6.3}   {:>6.2} {:>6.2}  {:>8.0}  {:>5.1}  {:>6}  {}",
        label,
        f("ttft_p50_s"),
        f("ttft_p90_s"),
        f("ttft_p99_s"),
        f("p50_s"),
        f("p99_s"),
        f("output_tokens_per_s"),
        f("prefix_hit_ratio") * 100.0,
        row["errors"],
        row["per_backend"]
    );
    row
}

fn header() {
    println!(
        "  {:<16} {:>6} {:>6} {:>6}   {:>6} {:>6}  {:>8}  {:>5}  {:>6}  per backend",
        "policy", "TTFT50", "TTFT90", "TTFT99", "e2e50", "e2e99", "out tok/s", "hit %", "errors"
    );
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--saturate")
        || argv
            .windows(2)
            .any(|w| w[0] == "--workload" && w[1] == "saturate")
    {
        return saturate::main(argv);
    }
    let mut o = Opts {
        workload: Workload::Mixed,
        duration: Duration::from_secs(40),
        seed: 7,
        groups: 48,
        zipf: true,
        system_tokens: 1500,
        turns: 6,
    };
    let mut loads: Option<Vec<f64>> = None;
    let mut policies: Option<Vec<String>> = None;
    let mut quick = false;
    let mut gateways = 1usize;
    let mut fleet_sync = true;
    let mut free_prefill = false;
    let mut args = std::env::args().skip(1);
    let bad = |m: &str| {
        eprintln!("routebench: {m}\n{USAGE}");
        ExitCode::from(2)
    };
    while let Some(a) = args.next() {
        let mut v = || args.next();
        match a.as_str() {
            "--workload" => match v().as_deref().and_then(Workload::parse) {
                Some(w) => o.workload = w,
                None => {
                    return bad(
                        "--workload: mixed, shared_prefix, multi_turn, no_prefix or saturate",
                    )
                }
            },
            "--policies" => {
                policies = Some(
                    v().unwrap_or_default()
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--gateways" => match v()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=8).contains(n))
            {
                Some(n) => gateways = n,
                None => return bad("--gateways: 1 to 8"),
            },
            "--free-prefill" => free_prefill = true,
            "--fleet-sync" => match v().as_deref() {
                Some("on") => fleet_sync = true,
                Some("off") => fleet_sync = false,
                _ => return bad("--fleet-sync: on or off"),
            },
            "--duration" => {
                o.duration = Duration::from_secs(
                    v().and_then(|v| v.parse().ok())
                        .filter(|s| (1..=600).contains(s))
                        .unwrap_or(40),
                )
            }
            "--loads" => {
                loads = Some(
                    v().unwrap_or_default()
                        .split(',')
                        .filter_map(|x| x.parse().ok())
                        .filter(|x: &f64| *x > 0.0 && *x <= 1.5)
                        .collect(),
                )
            }
            "--seed" => o.seed = v().and_then(|v| v.parse().ok()).unwrap_or(7),
            "--groups" => match v()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=10_000).contains(n))
            {
                Some(n) => o.groups = n,
                None => return bad("--groups: 1 to 10000"),
            },
            "--popularity" => match v().as_deref() {
                Some("zipf") => o.zipf = true,
                Some("uniform") => o.zipf = false,
                _ => return bad("--popularity: zipf or uniform"),
            },
            "--system-tokens" => match v()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=100_000).contains(n))
            {
                Some(n) => o.system_tokens = n,
                None => return bad("--system-tokens: 1 to 100000"),
            },
            "--turns" => match v()
                .and_then(|v| v.parse().ok())
                .filter(|n| (1..=100).contains(n))
            {
                Some(n) => o.turns = n,
                None => return bad("--turns: 1 to 100"),
            },
            "--quick" => quick = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return bad(&format!("unknown argument {other}")),
        }
    }
    let mixed = o.workload == Workload::Mixed;
    let default_load = if mixed { 0.8 } else { 0.75 };
    if quick {
        o.duration = Duration::from_secs(10);
    }
    let loads = match loads {
        Some(l) => l,
        None if quick => vec![default_load],
        None if mixed => vec![0.6, 0.8, 0.9],
        None => vec![default_load],
    };
    if loads.is_empty() {
        return bad("--loads: fractions such as 0.6,0.8,0.9");
    }
    let policies: Vec<String> = policies.unwrap_or_else(|| {
        if mixed {
            &MIXED_POLICIES[..]
        } else {
            &PREFIX_POLICIES[..]
        }
        .iter()
        .map(|s| s.to_string())
        .collect()
    });
    if let Some(p) = policies
        .iter()
        .find(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return bad(&format!("--policies: `{p}` is not an algorithm name"));
    }
    if policies.is_empty() {
        return bad("--policies: a list such as gie_like,gpu_aware,pin");
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

    let cfgs = pool(o.workload);
    let (mean_prompt, mean_output) = mean_lengths(&o);
    let caps: Vec<f64> = cfgs
        .iter()
        .map(|c| c.capacity_rps(mean_prompt, mean_output))
        .collect();
    let capacity: f64 = caps.iter().sum();
    // --free-prefill: the same arrivals (rates from the real costs) on
    // servers whose prefill costs nothing — every prompt as if cached:
    // the floor no cache-aware routing can go below.
    let sims: Vec<GpuSim> = cfgs
        .iter()
        .cloned()
        .map(|c| SimConfig {
            prefill_ms_per_1k_tokens: if free_prefill {
                0.0
            } else {
                c.prefill_ms_per_1k_tokens
            },
            ..c
        })
        .map(GpuSim::start)
        .collect();
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    println!(
        "workload {}: mean prompt {:.0} tokens, mean output {:.0}; pool capacity ≈ {capacity:.1} req/s (whole prompts prefilled):",
        o.workload.name(),
        mean_prompt,
        mean_output
    );
    for ((c, s), cap) in cfgs.iter().zip(&sims).zip(&caps) {
        println!(
            "  {} on {}: speed {}, batch {}, KV {} tokens ({} blocks), ≈ {:.2} req/s",
            c.name,
            s.addr,
            c.speed,
            c.max_batch,
            c.kv_tokens,
            c.num_blocks(),
            cap
        );
    }

    // The algorithms this gateway takes; pin needs groups.
    let mut run_policies: Vec<String> = Vec::new();
    let mut skipped = Vec::new();
    for p in &policies {
        if p == "pin" {
            if mixed {
                println!("pin: skipped (the mixed workload has no groups)");
                skipped.push(json!({"policy": p, "reason": "no groups in the mixed workload"}));
            } else {
                run_policies.push(p.clone());
            }
            continue;
        }
        match accepts(&gateway_bin, &bench_dir, p, &addrs) {
            Ok(()) => run_policies.push(p.clone()),
            Err(e) => {
                println!("{p}: skipped, the gateway refuses it: {e}");
                skipped.push(json!({"policy": p, "reason": e}));
            }
        }
    }
    let gw_policies: Vec<&str> = run_policies
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "pin")
        .collect();
    // mixed: one set of gateways for every run (as it always was); the prefix
    // workloads: a fresh set per run (no learned prefix state carried over).
    // Two or more gateways share their prefix placements through Redis.
    let redis = (gateways > 1 && fleet_sync).then(|| {
        let port = free_addr().port();
        gateway_tests::redis::Redis::start_on(port, &bench_dir)
    });
    let redis_addr = redis
        .as_ref()
        .map(|r| SocketAddr::from(([127, 0, 0, 1], r.port)));
    let shared_gws = if mixed && !gw_policies.is_empty() {
        match start_gateways(
            &gateway_bin,
            &bench_dir,
            gateways,
            &gw_policies,
            &addrs,
            redis_addr,
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("routebench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let label = |p: &str| {
        if p == "pin" || gateways == 1 {
            p.to_string()
        } else if fleet_sync {
            format!("{p} x{gateways}")
        } else {
            format!("{p} x{gateways} nosync")
        }
    };

    let mut rows = Vec::new();
    for &load in &loads {
        let rate = capacity * load;
        let plan = Arc::new(plan(&o, rate, gateways));
        println!(
            "\nload {:.0} %: {:.1} req/s, {} requests ({} {}) over {} s",
            load * 100.0,
            rate,
            plan.requests,
            plan.convs.len(),
            if o.workload == Workload::MultiTurn {
                "conversations"
            } else {
                "arrivals"
            },
            o.duration.as_secs()
        );
        header();
        let pins = Arc::new(pin_map(&plan.weights, &caps));
        for p in &run_policies {
            let (target, _fresh): (Arc<Target>, Option<Gateways>) = if p == "pin" {
                let (pins, addrs) = (pins.clone(), addrs.clone());
                (
                    Arc::new(move |c: &Conv, _: &Req| (addrs[pins[c.group]], "sim".to_string())),
                    None,
                )
            } else {
                let fresh = if shared_gws.is_none() {
                    match start_gateways(
                        &gateway_bin,
                        &bench_dir,
                        gateways,
                        &[p.as_str()],
                        &addrs,
                        redis_addr,
                    ) {
                        Ok(g) => Some(g),
                        Err(e) => {
                            eprintln!("routebench: {p}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    None
                };
                let gw_addrs = shared_gws
                    .as_ref()
                    .or(fresh.as_ref())
                    .expect("gateways")
                    .addrs
                    .clone();
                let host = format!("{p}.bench");
                (
                    Arc::new(move |_: &Conv, r: &Req| {
                        (gw_addrs[r.gw % gw_addrs.len()], host.clone())
                    }),
                    fresh,
                )
            };
            rows.push(measure(&sims, &plan, load, p, &label(p), target));
        }
    }
    drop(shared_gws);

    let p99 = |load: f64, p: &str| {
        rows.iter()
            .find(|r| r["load"].as_f64() == Some(load) && r["policy"] == p)
            .and_then(|r| r["p99_s"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (json_path, svg_path) = if mixed {
        (
            bench_dir.join("routing.json"),
            bench_dir.join("routing.svg"),
        )
    } else {
        (
            bench_dir.join(format!("routing-{}.json", o.workload.name())),
            bench_dir.join(format!("routing-{}.svg", o.workload.name())),
        )
    };
    let workload = match o.workload {
        Workload::Mixed => {
            json!({"name": "mixed", "prompt_tokens": [PROMPT.0, PROMPT.1], "output_tokens": OUTPUTS})
        }
        Workload::SharedPrefix | Workload::NoPrefix => {
            json!({"name": o.workload.name(), "groups": o.groups,
            "popularity": if o.zipf { "zipf (s = 1)" } else { "uniform" }, "system_prompt_tokens": o.system_tokens,
            "question_tokens": [QUESTION.0, QUESTION.1], "output_tokens": [OUTPUT.0, OUTPUT.1],
            "shared": o.workload == Workload::SharedPrefix})
        }
        Workload::MultiTurn => {
            json!({"name": "multi_turn", "turns": o.turns, "system_prompt_tokens": CONV_SYSTEM_TOKENS,
            "question_tokens": [QUESTION.0, QUESTION.1], "output_tokens": [OUTPUT.0, OUTPUT.1], "think_time_mean_s": THINK_S})
        }
    };
    let mut results = json!({
        "pool": cfgs.iter().zip(&addrs).zip(&caps).map(|((c, a), cap)| json!({"name": c.name, "addr": a.to_string(), "speed": c.speed,
            "max_batch": c.max_batch, "kv_tokens": c.kv_tokens, "capacity_rps": cap})).collect::<Vec<_>>(),
        "capacity_rps": capacity, "duration_s": o.duration.as_secs(), "seed": o.seed, "gateways": gateways, "fleet_sync": gateways > 1 && fleet_sync, "free_prefill": free_prefill,
        "mean_prompt_tokens": mean_prompt, "mean_output_tokens": mean_output,
        "workload": workload, "stream": true, "arrivals": "poisson (open loop)",
        "results": rows, "skipped": skipped,
    });
    if mixed {
        // The bar: gpu_aware p99 ≤ 0.6 × least_request's and ≤ gie_like's, at every load.
        let have = |p: &str| run_policies.iter().any(|x| x == p);
        if have("gpu_aware") && have("least_request") && have("gie_like") {
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
                ratios.push(
                    json!({"load": load, "vs_least_request": g / lr, "vs_gie_like": g / gie}),
                );
            }
            results["p99_ratios"] = json!(ratios);
        }
        let names: Vec<&str> = run_policies.iter().map(String::as_str).collect();
        let _ = std::fs::write(&svg_path, svg_loads(&loads, &names, &|l, p| p99(l, p)));
    } else {
        let _ = std::fs::write(&svg_path, svg_rows(o.workload.name(), &rows));
    }
    let _ = std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    );
    println!(
        "\nresults: {}\nchart:   {}\nconfig:  {}",
        json_path.display(),
        svg_path.display(),
        bench_dir.join("routing-gateway.toml").display()
    );
    ExitCode::SUCCESS
}

const COLORS: [&str; 8] = [
    "#9e9e9e", "#5c6bc0", "#ffa726", "#43a047", "#ab47bc", "#e53935", "#26a69a", "#8d6e63",
];

/// mixed: grouped bars, p99 latency per load, one bar per algorithm.
fn svg_loads(loads: &[f64], policies: &[&str], p99: &dyn Fn(f64, &str) -> f64) -> String {
    let max = loads
        .iter()
        .flat_map(|&l| policies.iter().map(move |p| (l, *p)))
        .map(|(l, p)| p99(l, p))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max);
    let (w, h, left, bottom, top) = (760.0, 360.0, 60.0, 40.0, 40.0);
    let group = (w - left - 20.0) / loads.len() as f64;
    let bar = group / (policies.len() + 1) as f64;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<text x=\"{left}\" y=\"20\" font-size=\"14\">p99 latency (s) by load, through the gateway (lower is better)</text>\n");
    for (gi, &l) in loads.iter().enumerate() {
        for (pi, p) in policies.iter().enumerate() {
            let v = p99(l, p);
            let v = if v.is_finite() { v } else { 0.0 };
            let bh = (h - bottom - top) * v / max;
            let x = left + gi as f64 * group + pi as f64 * bar + bar / 2.0;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{v:.2}</text>\n",
                h - bottom - bh,
                bar * 0.9,
                COLORS[pi % COLORS.len()],
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
    for (pi, p) in policies.iter().enumerate() {
        s += &format!(
            "<rect x=\"{:.1}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"37\">{p}</text>\n",
            left + 230.0 + pi as f64 * 105.0,
            COLORS[pi % COLORS.len()],
            left + 243.0 + pi as f64 * 105.0
        );
    }
    s + "</svg>\n"
}

/// The prefix workloads: per run, TTFT p50 / p90 / p99 bars, the hit ratio under its name.
fn svg_rows(workload: &str, rows: &[Value]) -> String {
    let series = [
        ("ttft_p50_s", "TTFT p50"),
        ("ttft_p90_s", "TTFT p90"),
        ("ttft_p99_s", "TTFT p99"),
    ];
    let val = |r: &Value, k: &str| r[k].as_f64().filter(|v| v.is_finite()).unwrap_or(0.0);
    let max = rows
        .iter()
        .flat_map(|r| series.iter().map(move |(k, _)| val(r, k)))
        .fold(0.01, f64::max);
    let n = rows.len().max(1) as f64;
    let (left, bottom, top) = (60.0, 56.0, 48.0);
    let w = (left + 20.0 + n * 110.0).max(520.0);
    let h = 380.0;
    let group = (w - left - 20.0) / n;
    let bar = group / 4.0;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s += &format!("<text x=\"{left}\" y=\"20\" font-size=\"14\">{workload}: time to first token (s), prefix cache hit % below (lower TTFT is better)</text>\n");
    for (si, (_, name)) in series.iter().enumerate() {
        s += &format!(
            "<rect x=\"{:.1}\" y=\"30\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"39\">{name}</text>\n",
            left + si as f64 * 90.0,
            COLORS[si + 1],
            left + 13.0 + si as f64 * 90.0
        );
    }
    for (gi, r) in rows.iter().enumerate() {
        for (si, (k, _)) in series.iter().enumerate() {
            let v = val(r, k);
            let bh = (h - bottom - top) * v / max;
            let x = left + gi as f64 * group + si as f64 * bar + bar / 2.0;
            s += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{v:.2}</text>\n",
                h - bottom - bh,
                bar * 0.9,
                COLORS[si + 1],
                x + bar * 0.45,
                h - bottom - bh - 3.0
            );
        }
        let cx = left + gi as f64 * group + group / 2.0;
        let load = r["load"].as_f64().unwrap_or(0.0) * 100.0;
        s += &format!(
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">hit {:.0} % · {load:.0} % load</text>\n",
            h - bottom + 16.0,
            r["label"].as_str().unwrap_or("?"),
            h - bottom + 32.0,
            val(r, "prefix_hit_ratio") * 100.0
        );
    }
    s + "</svg>\n"
}
