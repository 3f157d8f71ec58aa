//! A simulated GPU model server, for tests and the routing bench (never in
//! the gateway): it behaves like vLLM on one GPU, in real time.
//!
//! - **Continuous batching**: an engine thread runs decode steps; each step
//!   admits waiting requests while the batch has room (`max_batch`) and the
//!   KV cache can hold them (below), then produces one token for every
//!   running request. A step takes `step_ms + per_seq_ms × running` plus, for
//!   newly admitted requests, `prefill_ms_per_1k_tokens × uncached prompt /
//!   1000`, all divided by `speed` (heterogeneous GPUs). Requests beyond the
//!   batch wait in a FIFO queue (head-of-line: the queue's front waits for
//!   room, nothing overtakes it).
//! - **KV cache with automatic prefix caching, like vLLM's**: `kv_tokens / 16`
//!   blocks of 16 tokens. The prompt as the engine sees it — for chat, each
//!   message's role followed by its content (a string, or the `text` of its
//!   text parts), in order; for completions, `prompt` — is cut into 64-byte
//!   blocks (16 tokens at 4 bytes a token); each full block is named by a
//!   chained 64-bit hash (previous block's hash + the block's bytes; the
//!   chain is seeded with the request's `model` and its `cache_salt`, when
//!   present). The last partial block is never cached. A running request
//!   holds its full prompt blocks (reference-counted: a block shared by
//!   running requests is held once), its partial prompt block and
//!   `ceil(output / 16)` output blocks, all reserved at admission (so a
//!   running request is never preempted). Admission waits until those
//!   blocks not already held by someone fit in the blocks not held by a
//!   running request — cached blocks nobody holds count as free: they stay
//!   cached, in LRU order (a finished request's tail blocks first, as vLLM
//!   frees them), until evicted to make room. Prefill costs only the prompt
//!   past the cached prefix: the longest run of leading full blocks already
//!   cached (at most `prompt − 1` tokens: the last token is always computed).
//! - **Requests**: `POST /v1/chat/completions` and `/v1/completions`
//!   (OpenAI): the prompt is the engine's text above at 4 bytes a token, the
//!   output is exactly `max_tokens` tokens (default 16); `"stream": true`
//!   streams one SSE event per token (and, as vLLM, a final usage-only event
//!   only when `stream_options.include_usage` is true; a stream whose
//!   client hangs up is aborted). A `usage` object reports the counts
//!   (with `prompt_tokens_details.cached_tokens`). `GET /health` → 200;
//!   `POST /reset_prefix_cache` drops every cached block nobody holds (as
//!   vLLM's endpoint); `GET /metrics` → Prometheus text with vLLM's names
//!   (`vllm:num_requests_running`, `vllm:num_requests_waiting`,
//!   `vllm:kv_cache_usage_perc` and `vllm:gpu_cache_usage_perc` = blocks held
//!   by running requests ÷ all blocks, `vllm:request_success_total`,
//!   `vllm:prefix_cache_queries_total` (prompt tokens looked up),
//!   `vllm:prefix_cache_hits_total` (of those, found cached),
//!   `vllm:cache_config_info{block_size,num_gpu_blocks}`) or, with another
//!   `engine`, SGLang's, TGI's or Triton's.
//! - Deterministic given its parameters: no randomness inside; the load's
//!   seed decides prompts and lengths.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Tokens per KV block (vLLM's default block size).
pub const BLOCK_TOKENS: u64 = 16;
/// Bytes of prompt text per token (the simulator's tokenizer).
pub const BYTES_PER_TOKEN: u64 = 4;
/// Bytes of prompt text per KV block.
pub const BLOCK_BYTES: usize = (BLOCK_TOKENS * BYTES_PER_TOKEN) as usize;

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
    /// Tokens generated for a request that sets no `max_tokens` (a real
    /// engine runs to its end-of-sequence token).
    pub default_output: u64,
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
            default_output: 16,
        }
    }
}

impl SimConfig {
    /// Completed requests per second this server sustains for requests of
    /// `prompt` + `output` tokens at a full batch (the pool-capacity math of the bench).
    /// `prompt` is the prefilled part: the whole prompt with no cache hit.
    pub fn capacity_rps(&self, prompt: f64, output: f64) -> f64 {
        let b = self.max_batch as f64;
        let step = (self.step_ms + self.per_seq_ms * b) / self.speed;
        // Per request: `output` decode steps shared by the batch, plus its prefill.
        let per_req_ms =
            output * step / b + self.prefill_ms_per_1k_tokens * prompt / 1000.0 / self.speed;
        1000.0 / per_req_ms
    }

    /// KV blocks of this server (`kv_tokens / 16`).
    pub fn num_blocks(&self) -> u64 {
        self.kv_tokens / BLOCK_TOKENS
    }
}

/// The prompt as the engine sees it: for chat, each message's role then its
/// content (a string, or the `text` of its text parts), in order; for
/// completions, `prompt` (a string, or strings concatenated).
pub fn engine_prompt(body: &serde_json::Value) -> Vec<u8> {
    let mut text = Vec::new();
    match body.get("messages").and_then(|m| m.as_array()) {
        Some(msgs) => {
            for m in msgs {
                if let Some(role) = m.get("role").and_then(|r| r.as_str()) {
                    text.extend_from_slice(role.as_bytes());
                }
                match m.get("content") {
                    Some(serde_json::Value::String(s)) => text.extend_from_slice(s.as_bytes()),
                    Some(serde_json::Value::Array(parts)) => {
                        for p in parts {
                            if let Some(t) = p.get("text").and_then(|t| t.as_str()) {
                                text.extend_from_slice(t.as_bytes());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        None => match body.get("prompt") {
            Some(serde_json::Value::String(s)) => text.extend_from_slice(s.as_bytes()),
            Some(serde_json::Value::Array(ps)) => {
                for p in ps.iter().filter_map(|p| p.as_str()) {
                    text.extend_from_slice(p.as_bytes());
                }
            }
            _ => {}
        },
    }
    text
}

/// FNV-1a over `bytes` continuing from `h`, then a SplitMix64 finish.
fn hash_bytes(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h ^ 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The chained hashes of the prompt's full blocks: block i's is
/// hash(block i−1's hash, its 64 bytes); the chain starts from the model name
/// and the `cache_salt` (so different models or salts never share). Unique.
pub fn block_hashes(model: &str, salt: Option<&str>, prompt: &[u8]) -> Vec<u64> {
    let mut seed = model.as_bytes().to_vec();
    seed.push(0xff);
    if let Some(s) = salt {
        seed.push(1);
        seed.extend_from_slice(s.as_bytes());
    }
    let mut prev = hash_bytes(0, &seed);
    let mut seen = HashSet::new();
    let mut v = Vec::with_capacity(prompt.len() / BLOCK_BYTES);
    let mut buf = Vec::with_capacity(8 + BLOCK_BYTES);
    for b in prompt.chunks_exact(BLOCK_BYTES) {
        buf.clear();
        buf.extend_from_slice(&prev.to_le_bytes());
        buf.extend_from_slice(b);
        prev = hash_bytes(prev, &buf);
        // A repeat (a 64-bit collision) ends the chain: a request holds each block once.
        if !seen.insert(prev) {
            break;
        }
        v.push(prev);
    }
    v
}

/// The KV blocks: full prompt blocks by hash (reference-counted, cached
/// after release until evicted, LRU), the rest (partial prompt blocks,
/// output blocks) counted as private to their request.
#[derive(Debug)]
struct BlockPool {
    total: u64,
    /// Cached full blocks: hash → (holders, LRU sequence while unheld).
    blocks: HashMap<u64, (u32, u64)>,
    /// The unheld cached blocks, oldest release first: sequence → hash.
    lru: BTreeMap<u64, u64>,
    seq: u64,
    /// Cached blocks with at least one holder.
    shared_held: u64,
    /// Uncached blocks held by running requests.
    private: u64,
}

impl BlockPool {
    fn new(total: u64) -> Self {
        BlockPool {
            total,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            seq: 0,
            shared_held: 0,
            private: 0,
        }
    }

    /// Blocks held by running requests.
    fn held(&self) -> u64 {
        self.shared_held + self.private
    }

    /// Blocks neither held nor cached.
    fn free(&self) -> u64 {
        self.total
            .saturating_sub(self.held())
            .saturating_sub(self.lru.len() as u64)
    }

    /// Leading blocks already cached (held or not), of at most `max`.
    fn cached_prefix(&self, hashes: &[u64], max: usize) -> usize {
        hashes
            .iter()
            .take(max)
            .take_while(|h| self.blocks.contains_key(h))
            .count()
    }

    /// Blocks a request would take from the unheld ones (free or evictable):
    /// its prompt blocks nobody holds now, plus its private blocks.
    fn need(&self, hashes: &[u64], private: u64) -> u64 {
        let unheld = hashes
            .iter()
            .filter(|h| self.blocks.get(h).is_none_or(|b| b.0 == 0))
            .count() as u64;
        unheld + private
    }

    /// Take the request's blocks: hold the cached ones, evict LRU blocks for
    /// the new ones (never more than needed), count the private ones.
    fn allocate(&mut self, hashes: &[u64], private: u64) {
        let mut missing = 0u64;
        for h in hashes {
            match self.blocks.get_mut(h) {
                Some(b) => {
                    if b.0 == 0 {
                        self.lru.remove(&b.1);
                        self.shared_held += 1;
                    }
                    b.0 += 1;
                }
                None => missing += 1,
            }
        }
        while self.free() < missing + private {
            let Some((_, h)) = self.lru.pop_first() else {
                break; // over-committed: a lone request bigger than the cache
            };
            self.blocks.remove(&h);
        }
        for h in hashes {
            if let Entry::Vacant(e) = self.blocks.entry(*h) {
                e.insert((1, 0));
                self.shared_held += 1;
            }
        }
        self.private += private;
    }

    /// Give the request's blocks back: cached ones nobody holds any more join
    /// the LRU, tail blocks first (evicted before the prefix they extend).
    fn release(&mut self, hashes: &[u64], private: u64) {
        for h in hashes.iter().rev() {
            if let Some(b) = self.blocks.get_mut(h) {
                b.0 -= 1;
                if b.0 == 0 {
                    self.seq += 1;
                    b.1 = self.seq;
                    self.lru.insert(self.seq, *h);
                    self.shared_held -= 1;
                }
            }
        }
        self.private -= private;
    }

    /// Drop every cached block nobody holds.
    fn reset(&mut self) {
        for (_, h) in std::mem::take(&mut self.lru) {
            self.blocks.remove(&h);
        }
    }
}

/// Where a token (or the end) goes: the connection thread waiting on it.
enum Event {
    /// Admitted to the batch; this many prompt tokens were cached.
    Admitted(u64),
    Token,
    Done,
}

struct Job {
    prompt: u64,
    output: u64,
    produced: u64,
    /// The prompt's full blocks (chained hashes).
    hashes: Vec<u64>,
    /// Its uncached blocks: the partial prompt block and the output blocks.
    private: u64,
    tx: mpsc::Sender<Event>,
}

struct EngineState {
    waiting: VecDeque<Job>,
    running: Vec<Job>,
    pool: BlockPool,
}

pub struct Stats {
    pub completed: AtomicU64,
    pub requests: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (at admission).
    pub prefix_queries: AtomicU64,
    /// Of those, tokens found cached.
    pub prefix_hits: AtomicU64,
    /// Prompt tokens prefilled (computed): queries − hits.
    pub prefill_tokens: AtomicU64,
    /// Requests abandoned mid-generation because their client hung up
    /// (vLLM aborts them the same way).
    pub aborted: AtomicU64,
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
        let blocks = cfg.num_blocks();
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(EngineState {
                waiting: VecDeque::new(),
                running: Vec::new(),
                pool: BlockPool::new(blocks),
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: Stats {
                completed: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                prefix_queries: AtomicU64::new(0),
                prefix_hits: AtomicU64::new(0),
                prefill_tokens: AtomicU64::new(0),
                aborted: AtomicU64::new(0),
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

    /// Requests aborted because their client (the gateway) hung up.
    pub fn aborted(&self) -> u64 {
        self.shared.stats.aborted.load(Ordering::SeqCst)
    }

    /// (running, waiting) now.
    pub fn load(&self) -> (usize, usize) {
        let st = self.shared.state.lock().unwrap();
        (st.running.len(), st.waiting.len())
    }

    /// (`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`):
    /// prompt tokens looked up, and found cached, since the start.
    pub fn prefix_cache(&self) -> (u64, u64) {
        let s = &self.shared.stats;
        (
            s.prefix_queries.load(Ordering::SeqCst),
            s.prefix_hits.load(Ordering::SeqCst),
        )
    }

    /// Prompt tokens prefilled (not served from the cache) since the start.
    pub fn prefill_tokens(&self) -> u64 {
        self.shared.stats.prefill_tokens.load(Ordering::SeqCst)
    }

    /// KV blocks of this server.
    pub fn num_blocks(&self) -> u64 {
        self.shared.cfg.num_blocks()
    }

    /// KV blocks held by running requests (a shared block counts once).
    pub fn blocks_in_use(&self) -> u64 {
        self.shared.state.lock().unwrap().pool.held()
    }

    /// Full prompt blocks in the prefix cache, held or not.
    pub fn cached_blocks(&self) -> u64 {
        self.shared.state.lock().unwrap().pool.blocks.len() as u64
    }

    /// Drop every cached block no running request holds (vLLM's
    /// `/reset_prefix_cache`); how many were dropped.
    pub fn reset_prefix_cache(&self) -> u64 {
        let mut st = self.shared.state.lock().unwrap();
        let n = st.pool.lru.len() as u64;
        st.pool.reset();
        n
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
        // Admit from the queue (FIFO) while the batch and the KV cache allow:
        // the blocks it would take from the unheld ones (free or evictable)
        // must fit beside the held ones (a lone request is always admitted).
        let mut prefill_tokens = 0;
        while st.running.len() < cfg.max_batch {
            let Some(front) = st.waiting.front() else {
                break;
            };
            let need = st.pool.need(&front.hashes, front.private);
            if st.pool.held() + need > st.pool.total && !st.running.is_empty() {
                break;
            }
            let j = st.waiting.pop_front().expect("front exists");
            // The last prompt token is always computed (as vLLM).
            let max_hit = ((j.prompt - 1) / BLOCK_TOKENS) as usize;
            let hit = st.pool.cached_prefix(&j.hashes, max_hit) as u64 * BLOCK_TOKENS;
            st.pool.allocate(&j.hashes, j.private);
            s.stats.prefix_queries.fetch_add(j.prompt, Ordering::SeqCst);
            s.stats.prefix_hits.fetch_add(hit, Ordering::SeqCst);
            s.stats
                .prefill_tokens
                .fetch_add(j.prompt - hit, Ordering::SeqCst);
            prefill_tokens += j.prompt - hit;
            let _ = j.tx.send(Event::Admitted(hit));
            st.running.push(j);
        }
        let n = st.running.len() as f64;
        drop(st);
        let ms = (cfg.step_ms
            + cfg.per_seq_ms * n
            + cfg.prefill_ms_per_1k_tokens * prefill_tokens as f64 / 1000.0)
            / cfg.speed;
        std::thread::sleep(Duration::from_secs_f64(ms / 1000.0));
        let mut guard = s.state.lock().unwrap();
        let EngineState { running, pool, .. } = &mut *guard;
        running.retain_mut(|j| {
            j.produced += 1;
            let alive = j.tx.send(Event::Token).is_ok();
            if j.produced >= j.output || !alive {
                let _ = j.tx.send(Event::Done);
                pool.release(&j.hashes, j.private);
                if alive {
                    s.stats.completed.fetch_add(1, Ordering::SeqCst);
                } else {
                    s.stats.aborted.fetch_add(1, Ordering::SeqCst);
                }
                return false;
            }
            true
        });
    }
}

fn metrics(s: &Shared) -> String {
    let st = s.state.lock().unwrap();
    let (running, waiting) = (st.running.len(), st.waiting.len());
    let blocks = st.pool.total;
    let kv = (st.pool.held() as f64 / blocks.max(1) as f64).min(1.0);
    drop(st);
    let done = s.stats.completed.load(Ordering::SeqCst);
    let queries = s.stats.prefix_queries.load(Ordering::SeqCst);
    let hits = s.stats.prefix_hits.load(Ordering::SeqCst);
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
             # TYPE vllm:request_success_total counter\nvllm:request_success_total{{finished_reason=\"length\",model_name=\"{model}\"}} {done}.0\n\
             # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n# TYPE vllm:prefix_cache_queries_total counter\n\
             vllm:prefix_cache_queries_total{{model_name=\"{model}\"}} {queries}.0\n\
             # HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n# TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{{model_name=\"{model}\"}} {hits}.0\n\
             # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{BLOCK_TOKENS}\",num_gpu_blocks=\"{blocks}\"}} 1\n"
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
            ("POST", "/reset_prefix_cache") => {
                s.state.lock().unwrap().pool.reset();
                respond(&mut w, 200, "application/json", b"{}", keep)?
            }
            ("POST", "/v1/chat/completions") | ("POST", "/v1/completions") => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let text = engine_prompt(&v);
                let prompt = (text.len() as u64).div_ceil(BYTES_PER_TOKEN).max(1);
                let model = v
                    .get("model")
                    .and_then(|m| m.as_str())
                    .unwrap_or(&s.cfg.name);
                let salt = v.get("cache_salt").and_then(|m| m.as_str());
                let hashes = block_hashes(model, salt, &text);
                let output = v
                    .get("max_tokens")
                    .and_then(|m| m.as_u64())
                    .unwrap_or(s.cfg.default_output)
                    .max(1);
                let stream = v.get("stream").and_then(|x| x.as_bool()) == Some(true);
                // As vLLM: a stream reports usage only when asked.
                let usage = !stream
                    || v.pointer("/stream_options/include_usage")
                        == Some(&serde_json::Value::Bool(true));
                generate(&mut w, s, prompt, hashes, (output, usage), stream, keep)?;
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
    hashes: Vec<u64>,
    (output, report_usage): (u64, bool),
    stream: bool,
    keep: bool,
) -> std::io::Result<()> {
    s.stats.requests.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    // Prompt blocks past the full ones (the partial block), plus the output's.
    let private = prompt
        .div_ceil(BLOCK_TOKENS)
        .saturating_sub(hashes.len() as u64)
        + output.div_ceil(BLOCK_TOKENS);
    {
        let mut st = s.state.lock().unwrap();
        st.waiting.push_back(Job {
            prompt,
            output,
            produced: 0,
            hashes,
            private,
            tx,
        });
    }
    s.wake.notify_all();
    let model = &s.cfg.name;
    if stream {
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
    }
    let (mut n, mut cached) = (0, 0);
    // Tokens until Done (or the engine is gone).
    loop {
        match rx.recv() {
            Ok(Event::Admitted(c)) => cached = c,
            Ok(Event::Token) => {
                n += 1;
                if stream {
                    let ev = format!(
                        "data: {{\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{n} \"}}}}]}}\n\n"
                    );
                    chunk(w, ev.as_bytes())?;
                }
            }
            Ok(Event::Done) | Err(_) => break,
        }
    }
    let usage = format!(
        "{{\"prompt_tokens\":{prompt},\"completion_tokens\":{n},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":{cached}}}}}",
        prompt + n
    );
    if stream {
        if report_usage {
            let ev = format!("data: {{\"object\":\"chat.completion.chunk\",\"model\":\"{model}\",\"choices\":[],\"usage\":{usage}}}\n\n");
            chunk(w, ev.as_bytes())?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Distinct, deterministic text of `n` bytes (`tag` makes it differ from the first byte).
    fn text(tag: char, n: usize) -> String {
        let mut s = String::with_capacity(n);
        let mut i = 0u32;
        while s.len() < n {
            s.push_str(&format!("{tag}{i} "));
            i += 1;
        }
        s.truncate(n);
        s
    }

    fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    /// A non-streamed chat completion of `messages` (role, content); its usage.
    fn chat(
        sim: &GpuSim,
        messages: &[(&str, &str)],
        max_tokens: u64,
        extra: &str,
    ) -> serde_json::Value {
        let msgs: Vec<_> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        let body = serde_json::json!({"model": "m", "messages": msgs, "max_tokens": max_tokens});
        let mut body = body.to_string();
        if !extra.is_empty() {
            body.pop();
            body = format!("{body},{extra}}}");
        }
        let out = http(sim.addr, "POST", "/v1/chat/completions", &body);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let json = &out[out.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v["usage"].clone()
    }

    fn fast(kv_tokens: u64) -> SimConfig {
        SimConfig {
            kv_tokens,
            step_ms: 1.0,
            per_seq_ms: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn engine_prompt_is_roles_and_contents_in_order() {
        let v = serde_json::json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "there"}]},
        ]});
        assert_eq!(engine_prompt(&v), b"systembe briefuserhi there");
        assert_eq!(engine_prompt(&serde_json::json!({"prompt": "abc"})), b"abc");
        // Chained: a block's hash depends on every block before it, the model and the salt.
        let a = block_hashes("m", None, text('a', 200).as_bytes());
        assert_eq!(
            a.len(),
            3,
            "200 bytes: 3 full blocks, the partial one is not hashed"
        );
        let mut other_first = text('a', 200).into_bytes();
        other_first[0] = b'z';
        let b = block_hashes("m", None, &other_first);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_ne!(block_hashes("m2", None, text('a', 64).as_bytes()), a[..1]);
        assert_ne!(
            block_hashes("m", Some("s"), text('a', 64).as_bytes()),
            a[..1]
        );
        assert_eq!(block_hashes("m", None, text('a', 64).as_bytes()), a[..1]);
    }

    #[test]
    fn repeated_prefix_hits_the_cache() {
        let sim = GpuSim::start(fast(32_768));
        // "system" + 634 bytes: exactly 10 blocks; then "user" + 100 bytes.
        let sys = text('s', 634);
        let (q1, q2) = (text('a', 100), text('b', 100));
        let u1 = chat(&sim, &[("system", &sys), ("user", &q1)], 1, "");
        assert_eq!(u1["prompt_tokens"], 186, "744 bytes at 4 a token");
        assert_eq!(u1["prompt_tokens_details"]["cached_tokens"], 0);
        let u2 = chat(&sim, &[("system", &sys), ("user", &q2)], 1, "");
        assert_eq!(
            u2["prompt_tokens_details"]["cached_tokens"], 160,
            "the system prompt's 10 blocks"
        );
        assert_eq!(sim.prefix_cache(), (372, 160));
        // The same conversation again: every full block but the one holding the last token.
        let u3 = chat(&sim, &[("system", &sys), ("user", &q2)], 1, "");
        assert_eq!(
            u3["prompt_tokens_details"]["cached_tokens"], 176,
            "11 full blocks"
        );
        // Another salt (or model) shares nothing.
        let u4 = chat(
            &sim,
            &[("system", &sys), ("user", &q2)],
            1,
            r#""cache_salt":"tenant-b""#,
        );
        assert_eq!(u4["prompt_tokens_details"]["cached_tokens"], 0);
        // Reset: the unheld cached blocks are gone.
        assert_eq!(sim.cached_blocks(), 12 + 11);
        assert_eq!(sim.reset_prefix_cache(), 23);
        let u5 = chat(&sim, &[("system", &sys), ("user", &q2)], 1, "");
        assert_eq!(u5["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[test]
    fn prefill_is_charged_for_the_uncached_part_only() {
        let sim = GpuSim::start(SimConfig {
            prefill_ms_per_1k_tokens: 400.0,
            ..fast(32_768)
        });
        // "system" + 6394 bytes = 100 blocks (1600 tokens); "user" + 40 bytes.
        let sys = text('s', 6394);
        let t = Instant::now();
        chat(&sim, &[("system", &sys), ("user", &text('a', 40))], 1, "");
        let cold = t.elapsed().as_secs_f64();
        assert_eq!(sim.prefill_tokens(), 1611);
        let t = Instant::now();
        chat(&sim, &[("system", &sys), ("user", &text('b', 40))], 1, "");
        let warm = t.elapsed().as_secs_f64();
        assert_eq!(
            sim.prefill_tokens() - 1611,
            11,
            "only the question is prefilled"
        );
        // Cold: 1611 tokens × 0.4 ms ≈ 644 ms; warm: 11 tokens ≈ 4 ms.
        assert!(cold >= 0.6, "cold {cold}");
        assert!(cold - warm > 0.4, "cold {cold} warm {warm}");
    }

    #[test]
    fn lru_evicts_the_oldest_unheld_blocks_tail_first() {
        // 20 blocks. Each prompt: "user" + 516 bytes = 8 full blocks + a partial one; 1 output block.
        let sim = GpuSim::start(fast(20 * BLOCK_TOKENS));
        assert_eq!(sim.num_blocks(), 20);
        let (a, b, c) = (text('a', 516), text('b', 516), text('c', 516));
        let hit = |t: &str| {
            chat(&sim, &[("user", t)], 1, "")["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(hit(&a), 0);
        assert_eq!(hit(&b), 0);
        assert_eq!(sim.cached_blocks(), 16, "A and B stay cached, unheld");
        // C needs 10 blocks: 4 free, so 6 of A's are evicted, A's tail first.
        assert_eq!(hit(&c), 0);
        assert_eq!(sim.cached_blocks(), 18);
        assert_eq!(hit(&b), 128, "B was not evicted");
        assert_eq!(hit(&a), 32, "only A's first two blocks survived");
        // A's 6 new blocks + 2 private: 2 free, so 6 evicted, all C's (released
        // before B's re-use), tail first: C keeps its first two.
        assert_eq!(hit(&c), 32);
        // And C's turn evicted 6 of B's (now the oldest), tail first.
        assert_eq!(hit(&b), 32);
        assert_eq!(sim.blocks_in_use(), 0);
    }

    #[test]
    fn a_shared_prefix_is_held_once_by_running_requests() {
        let sim = GpuSim::start(SimConfig {
            step_ms: 10.0,
            ..fast(32_768)
        });
        // "system" + 506 bytes = 8 blocks shared; "user" + 76 bytes: one more full block, one partial.
        let sys = Arc::new(text('s', 506));
        let addr = sim.addr;
        let hs: Vec<_> = ['a', 'b']
            .into_iter()
            .enumerate()
            .map(|(i, tag)| {
                let sys = sys.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50 * i as u64));
                    let body = serde_json::json!({"model": "m", "max_tokens": 160, "messages": [
                        {"role": "system", "content": *sys}, {"role": "user", "content": text(tag, 76)}]});
                    http(addr, "POST", "/v1/chat/completions", &body.to_string())
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sim.load() != (2, 0) {
            assert!(Instant::now() < deadline, "both running");
            std::thread::sleep(Duration::from_millis(5));
        }
        // 8 shared + 2 × (1 own full + 1 partial + 10 output) = 32, not 40.
        assert_eq!(sim.blocks_in_use(), 32);
        let m = http(sim.addr, "GET", "/metrics", "");
        assert!(
            m.contains("vllm:kv_cache_usage_perc{model_name=\"sim\"} 0.015625\n"),
            "{m}"
        );
        for h in hs {
            assert!(h.join().unwrap().starts_with("HTTP/1.1 200"));
        }
        assert_eq!(sim.blocks_in_use(), 0);
        assert_eq!(sim.cached_blocks(), 10, "8 shared + 1 own each");
        assert_eq!(sim.prefix_cache(), (2 * 148, 128));
    }

    #[test]
    fn metrics_report_prefix_cache_counters() {
        let sim = GpuSim::start(fast(32_768));
        let sys = text('s', 634);
        chat(&sim, &[("system", &sys), ("user", &text('a', 100))], 1, "");
        chat(&sim, &[("system", &sys), ("user", &text('b', 100))], 1, "");
        let m = http(sim.addr, "GET", "/metrics", "");
        for line in [
            "# TYPE vllm:prefix_cache_queries_total counter\n",
            "vllm:prefix_cache_queries_total{model_name=\"sim\"} 372.0\n",
            "# TYPE vllm:prefix_cache_hits_total counter\n",
            "vllm:prefix_cache_hits_total{model_name=\"sim\"} 160.0\n",
            "# TYPE vllm:cache_config_info gauge\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"2048\"} 1\n",
            "vllm:kv_cache_usage_perc{model_name=\"sim\"} 0\n",
            "vllm:gpu_cache_usage_perc{model_name=\"sim\"} 0\n",
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"sim\"} 2.0\n",
        ] {
            assert!(m.contains(line), "{line} in\n{m}");
        }
        let r = http(sim.addr, "POST", "/reset_prefix_cache", "");
        assert!(r.starts_with("HTTP/1.1 200"));
        assert_eq!(sim.cached_blocks(), 0);
    }
}
