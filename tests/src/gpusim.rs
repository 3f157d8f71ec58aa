//! A simulated GPU model server, for tests and the routing bench (never in
//! the gateway): it behaves like vLLM on one GPU, in real time.
//!
//! - **Continuous batching**: an engine thread runs decode steps; each step
//!   admits waiting requests while the batch has room (`max_batch`) and the
//!   KV cache can hold them (prompt + output budget ≤ free blocks), then
//!   produces one token for every running request. A step takes
//!   `step_ms + per_seq_ms × running` plus, for newly admitted requests,
//!   `prefill_ms_per_1k_tokens × prompt / 1000`, all divided by `speed`
//!   (heterogeneous GPUs). Requests beyond the batch wait in a FIFO queue.
//! - **Requests**: `POST /v1/chat/completions` and `/v1/completions`
//!   (OpenAI): the prompt is `messages[].content` / `prompt` at 4 bytes a
//!   token, the output is exactly `max_tokens` tokens (default 16);
//!   `"stream": true` streams one SSE event per token. A `usage` object
//!   reports the counts. `GET /health` → 200; `GET /metrics` → Prometheus
//!   text with vLLM's names (`vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
//!   `vllm:gpu_cache_usage_perc`, `vllm:request_success_total`) or, with
//!   another `engine`, SGLang's, TGI's or Triton's.
//! - Deterministic given its parameters: no randomness inside; the load's
//!   seed decides prompts and lengths.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub name: String,
    pub engine: String,
    pub max_batch: usize,
    pub kv_tokens: u64,
    pub step_ms: f64,
    pub per_seq_ms: f64,
    pub prefill_ms_per_1k_tokens: f64,
    pub speed: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            name: "sim".into(),
            engine: "vllm".into(),
            max_batch: 8,
            kv_tokens: 32_768,
            step_ms: 10.0,
            per_seq_ms: 0.5,
            prefill_ms_per_1k_tokens: 20.0,
            speed: 1.0,
        }
    }
}

impl SimConfig {
    /// Completed requests per second this server sustains for requests of
    /// `prompt` + `output` tokens at a full batch (the pool-capacity math of the bench).
    pub fn capacity_rps(&self, prompt: f64, output: f64) -> f64 {
        let b = self.max_batch as f64;
        let step = (self.step_ms + self.per_seq_ms * b) / self.speed;
        // Per request: `output` decode steps shared by the batch, plus its prefill.
        let per_req_ms =
            output * step / b + self.prefill_ms_per_1k_tokens * prompt / 1000.0 / self.speed;
        1000.0 / per_req_ms
    }
}

/// Where a token (or the end) goes: the connection thread waiting on it.
enum Event {
    Token,
    Done,
}

struct Job {
    prompt: u64,
    output: u64,
    produced: u64,
    tx: mpsc::Sender<Event>,
}

#[derive(Default)]
struct EngineState {
    waiting: VecDeque<Job>,
    running: Vec<Job>,
    kv_used: u64,
}

pub struct Stats {
    pub completed: AtomicU64,
    pub requests: AtomicU64,
}

struct Shared {
    cfg: SimConfig,
    state: Mutex<EngineState>,
    wake: Condvar,
    stop: AtomicBool,
    stats: Stats,
}

/// A running simulator; stops when dropped.
pub struct GpuSim {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl GpuSim {
    pub fn start(cfg: SimConfig) -> GpuSim {
        Self::start_on("127.0.0.1:0", cfg)
    }

    pub fn start_on(addr: &str, cfg: SimConfig) -> GpuSim {
        let listener = TcpListener::bind(addr).expect("bind gpu-sim");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(EngineState::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: Stats {
                completed: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            },
        });
        let s = shared.clone();
        std::thread::spawn(move || engine(&s));
        let s = shared.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(c, &s);
                });
            }
        });
        GpuSim { addr, shared }
    }

    pub fn completed(&self) -> u64 {
        self.shared.stats.completed.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.shared.stats.requests.load(Ordering::SeqCst)
    }

    /// (running, waiting) now.
    pub fn load(&self) -> (usize, usize) {
        let st = self.shared.state.lock().unwrap();
        (st.running.len(), st.waiting.len())
    }
}

impl Drop for GpuSim {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let _ = TcpStream::connect(self.addr);
    }
}

fn engine(s: &Shared) {
    let cfg = &s.cfg;
    loop {
        let mut st = s.state.lock().unwrap();
        while st.running.is_empty() && st.waiting.is_empty() {
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            st = s
                .wake
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        // Admit from the queue (FIFO) while the batch and the KV cache allow.
        let mut prefill_tokens = 0;
        while st.running.len() < cfg.max_batch {
            let Some(front) = st.waiting.front() else {
                break;
            };
            let need = front.prompt + front.output;
            if st.kv_used + need > cfg.kv_tokens && !st.running.is_empty() {
                break;
            }
            let j = st.waiting.pop_front().expect("front exists");
            st.kv_used += need;
            prefill_tokens += j.prompt;
            st.running.push(j);
        }
        let n = st.running.len() as f64;
        drop(st);
        let ms = (cfg.step_ms
            + cfg.per_seq_ms * n
            + cfg.prefill_ms_per_1k_tokens * prefill_tokens as f64 / 1000.0)
            / cfg.speed;
        std::thread::sleep(Duration::from_secs_f64(ms / 1000.0));
        let mut st = s.state.lock().unwrap();
        let mut freed = 0;
        st.running.retain_mut(|j| {
            j.produced += 1;
            let alive = j.tx.send(Event::Token).is_ok();
            if j.produced >= j.output || !alive {
                let _ = j.tx.send(Event::Done);
                freed += j.prompt + j.output;
                if alive {
                    s.stats.completed.fetch_add(1, Ordering::SeqCst);
                }
                return false;
            }
            true
        });
        st.kv_used -= freed;
    }
}

fn metrics(s: &Shared) -> String {
    let st = s.state.lock().unwrap();
    let (running, waiting) = (st.running.len(), st.waiting.len());
    let kv = st.kv_used as f64 / s.cfg.kv_tokens as f64;
    drop(st);
    let done = s.stats.completed.load(Ordering::SeqCst);
    let model = &s.cfg.name;
    match s.cfg.engine.as_str() {
        "sglang" => format!(
            "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{{model_name=\"{model}\"}} {running}\n\
             # TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{{model_name=\"{model}\"}} {waiting}\n\
             # TYPE sglang:token_usage gauge\nsglang:token_usage{{model_name=\"{model}\"}} {kv}\n"
        ),
        "tgi" => format!(
            "# TYPE tgi_queue_size gauge\ntgi_queue_size {waiting}\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size {running}\n"
        ),
        "triton" => format!(
            "# TYPE nv_inference_pending_request_count gauge\nnv_inference_pending_request_count{{model=\"{model}\",version=\"1\"}} {waiting}\n\
             # TYPE nv_gpu_utilization gauge\nnv_gpu_utilization{{gpu_uuid=\"GPU-sim\"}} {}\n\
             # TYPE nv_gpu_memory_used_bytes gauge\nnv_gpu_memory_used_bytes{{gpu_uuid=\"GPU-sim\"}} {}\n",
            if running > 0 { 1.0 } else { 0.0 },
            (kv * 80e9) as u64
        ),
        _ => format!(
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n# TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{model_name=\"{model}\"}} {running}.0\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n# TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}.0\n\
             # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n\
             # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{{model_name=\"{model}\"}} {kv}\n\
             # TYPE vllm:request_success_total counter\nvllm:request_success_total{{finished_reason=\"length\",model_name=\"{model}\"}} {done}.0\n"
        ),
    }
}

fn serve(c: TcpStream, s: &Shared) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut len = 0usize;
        let mut keep = true;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                }
                if k == "connection" && v.eq_ignore_ascii_case("close") {
                    keep = false;
                }
            }
        }
        let mut body = vec![0; len.min(16 << 20)];
        r.read_exact(&mut body)?;
        let path = path.split('?').next().unwrap_or("").to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => respond(
                &mut w,
                200,
                "text/plain; version=0.0.4",
                metrics(s).as_bytes(),
                keep,
            )?,
            ("GET", "/health") | ("GET", "/v1/models") => {
                respond(&mut w, 200, "application/json", b"{}", keep)?
            }
            ("POST", "/v1/chat/completions") | ("POST", "/v1/completions") => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let text_len: usize = match v.get("messages").and_then(|m| m.as_array()) {
                    Some(msgs) => msgs
                        .iter()
                        .filter_map(|m| m.get("content").and_then(|c| c.as_str()))
                        .map(str::len)
                        .sum(),
                    None => v.get("prompt").and_then(|p| p.as_str()).map_or(0, str::len),
                };
                let prompt = (text_len as u64).div_ceil(4).max(1);
                let output = v
                    .get("max_tokens")
                    .and_then(|m| m.as_u64())
                    .unwrap_or(16)
                    .max(1);
                let stream = v.get("stream").and_then(|x| x.as_bool()) == Some(true);
                generate(&mut w, s, prompt, output, stream, keep)?;
            }
            _ => respond(
                &mut w,
                404,
                "application/json",
                b"{\"error\":\"not found\"}",
                keep,
            )?,
        }
        if !keep {
            return Ok(());
        }
    }
}

fn generate(
    w: &mut TcpStream,
    s: &Shared,
    prompt: u64,
    output: u64,
    stream: bool,
    keep: bool,
) -> std::io::Result<()> {
    s.stats.requests.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    {
        let mut st = s.state.lock().unwrap();
        st.waiting.push_back(Job {
            prompt,
            output,
            produced: 0,
            tx,
        });
    }
    s.wake.notify_all();
    let model = &s.cfg.name;
    if stream {
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
    }
    let mut n = 0;
    // Tokens until Done (or the engine is gone).
    while let Ok(Event::Token) = rx.recv() {
        n += 1;
        if stream {
            let ev = format!(
                "data: {{\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{n} \"}}}}]}}\n\n"
            );
            chunk(w, ev.as_bytes())?;
        }
    }
    let usage = format!(
        "{{\"prompt_tokens\":{prompt},\"completion_tokens\":{n},\"total_tokens\":{}}}",
        prompt + n
    );
    if stream {
        let ev = format!("data: {{\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[],\"usage\":{usage}}}\n\n");
        chunk(w, ev.as_bytes())?;
        chunk(w, b"data: [DONE]\n\n")?;
        w.write_all(b"0\r\n\r\n")?;
        w.flush()
    } else {
        let body = format!(
            "{{\"object\":\"chat.completion\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{n} tokens\"}},\"finish_reason\":\"length\"}}],\"usage\":{usage}}}"
        );
        respond(w, 200, "application/json", body.as_bytes(), keep)
    }
}

fn chunk(w: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

fn respond(
    w: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
    keep: bool,
) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status} {}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{}\r\n",
        if status == 200 { "OK" } else { "Not Found" },
        body.len(),
        if keep { "" } else { "connection: close\r\n" }
    )?;
    w.write_all(body)?;
    w.flush()
}
