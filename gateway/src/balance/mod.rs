//! The balance stage: which backend of the request's pool serves it.
//!
//! Load signals per backend, shared by every worker ([`BackendLoad`]):
//! requests in flight from this gateway, EWMAs of latency, time to first
//! byte and per-slot service time (latency ÷ concurrency: the inverse of
//! the backend's throughput), and what the model server says about itself —
//! queue, running batch, KV-cache use — scraped from its `/metrics`
//! ([`scrape`]) or read from an ORCA `endpoint-load-metrics` response
//! header. Health: passive ejection after consecutive failures, with
//! backoff; active checks by the scraper.
//!
//! Algorithms, per cluster ([`Algorithm`]): `round_robin`, `least_request`
//! (power of two choices on in-flight), `gie_like` (the Kubernetes Inference
//! Gateway's default scorers: queue and KV cache, weight 2 each, from
//! scraped metrics only) and `gpu_aware` (this gateway's: the expected delay
//! `(occupancy + 1) × service time`, occupancy from live in-flight counts
//! and fresh server metrics, KV-cache pressure and saturation, cold-start
//! ramp, LoRA affinity).

pub mod fleet;
pub mod prefix;
pub mod queue;
pub mod scrape;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::config::{Algorithm, BalanceSettings, Engine};

/// The largest running batch taken as a server's batch size.
const MAX_BATCH: u32 = 4096;

/// Milliseconds on the monotonic clock (never 0: 0 means "never").
pub fn now_ms() -> u64 {
    crate::xdp::monotonic_ns() / 1_000_000 + 1
}

/// One backend's load and health, shared by every worker (and kept across
/// reloads while the backend stays in its cluster).
#[derive(Debug)]
pub struct BackendLoad {
    pub addr: SocketAddr,
    /// Requests from this gateway in flight (all workers).
    pub inflight: AtomicU32,
    /// EWMAs, ns: request latency, time to first byte, per-slot service time.
    pub latency_ns: AtomicU64,
    pub ttfb_ns: AtomicU64,
    pub service_ns: AtomicU64,
    /// EWMA of latency per output token (requests with a declared budget).
    pub token_ns: AtomicU64,
    /// The largest running batch the server has reported (its batch size, learned).
    pub batch_seen: AtomicU32,
    pub completed: AtomicU64,
    /// From the server (scrape or ORCA header): queued, running, KV use ‰, when (ms; 0 never).
    pub waiting: AtomicU32,
    pub running: AtomicU32,
    pub kv_permille: AtomicU32,
    pub reported_ms: AtomicU64,
    /// `inflight` when the server last reported: what was sent since is
    /// not in its report yet.
    pub inflight_at_report: AtomicU32,
    /// LoRA adapters the server has loaded (vLLM `lora_requests_info`).
    pub adapters: Mutex<Vec<String>>,
    /// Health: consecutive failures, ejected until (ms), ejections in a row,
    /// active check verdict, since when it takes traffic (ms, cold start).
    pub failures: AtomicU32,
    pub ejected_until: AtomicU64,
    pub ejections: AtomicU32,
    pub healthy: AtomicBool,
    pub since_ms: AtomicU64,
    /// Drained by an operator (admin API): no new requests; in-flight ones finish.
    pub draining: AtomicBool,
    /// EWMA of the time to the first body byte (the first token of a
    /// stream: vLLM sends the head before it), ns.
    pub ttft_ns: AtomicU64,
    /// Prefill time per prompt token not in the cache, ns (learned from
    /// time to first token, biased to its low values: queueing inflates it).
    pub prefill_ns: AtomicU64,
    /// KV blocks the engine says it has (`num_gpu_blocks`; 0: not reported).
    pub cache_blocks: AtomicU32,
    /// The prefix index's model of its cache: blocks it has had to
    /// allocate for what was sent to it (all workers), and its entries' key
    /// ([`prefix::Holder`]).
    pub cache_clock: AtomicU64,
    pub index_key: u64,
    /// EWMA of the time between a stream's events (inter-token time), ns.
    pub itl_ns: AtomicU64,
    /// Streams from this gateway in flight (all workers).
    pub streams: AtomicU32,
    /// Stream events (tokens) relayed from this backend, and the time spent
    /// relaying them after each stream's first (ns), for tokens per second.
    pub stream_tokens: AtomicU64,
    pub stream_ns: AtomicU64,
}

impl BackendLoad {
    pub fn new(addr: SocketAddr) -> BackendLoad {
        BackendLoad {
            addr,
            inflight: AtomicU32::new(0),
            latency_ns: AtomicU64::new(0),
            ttfb_ns: AtomicU64::new(0),
            service_ns: AtomicU64::new(0),
            token_ns: AtomicU64::new(0),
            batch_seen: AtomicU32::new(0),
            completed: AtomicU64::new(0),
            waiting: AtomicU32::new(0),
            running: AtomicU32::new(0),
            kv_permille: AtomicU32::new(0),
            reported_ms: AtomicU64::new(0),
            inflight_at_report: AtomicU32::new(0),
            adapters: Mutex::new(Vec::new()),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            since_ms: AtomicU64::new(now_ms()),
            draining: AtomicBool::new(false),
            ttft_ns: AtomicU64::new(0),
            prefill_ns: AtomicU64::new(0),
            cache_blocks: AtomicU32::new(0),
            cache_clock: AtomicU64::new(0),
            index_key: prefix::holder_key(&addr),
            itl_ns: AtomicU64::new(0),
            streams: AtomicU32::new(0),
            stream_tokens: AtomicU64::new(0),
            stream_ns: AtomicU64::new(0),
        }
    }

    /// The prefix index's view of this backend now; `blocks` its cache
    /// size when the engine hasn't said.
    pub fn holder(&self, blocks: u32) -> prefix::Holder {
        let n = match self.cache_blocks.load(Ordering::Relaxed) {
            0 => blocks,
            n => n,
        };
        prefix::Holder {
            key: self.index_key,
            clock: self.cache_clock.load(Ordering::Relaxed),
            blocks: u64::from(n),
        }
    }

    /// `blocks` more blocks allocated in its cache for a request sent to
    /// it: the clock value the request's prompt is stamped with.
    pub fn allocate(&self, blocks: u64) -> u64 {
        self.cache_clock.fetch_add(blocks, Ordering::Relaxed) + blocks
    }

    /// Seed what isn't measured yet from the engine's own histograms: time
    /// to first token, inter-token time, and prefill per token (its mean
    /// TTFT over its mean prompt), so speed is known before the first
    /// stream through this gateway.
    pub fn cold_start(&self, sp: scrape::Speed) {
        let seed = |cell: &AtomicU64, v: f64| {
            if v.is_finite() && v > 0.0 {
                let _ = cell.compare_exchange(
                    0,
                    (v as u64).max(1),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        };
        seed(&self.ttft_ns, sp.ttft_s * 1e9);
        if let Some(t) = sp.tpot_s {
            seed(&self.itl_ns, t * 1e9);
        }
        if let Some(p) = sp.prompt_tokens.filter(|&p| p >= 1.0) {
            seed(&self.prefill_ns, sp.ttft_s * 1e9 / p);
        }
    }

    /// A stream ended: `events` SSE events relayed, the last `after_first`
    /// after the first one.
    pub fn stream_done(&self, events: u64, after_first: Duration) {
        if events < 2 {
            return;
        }
        let ns = after_first.as_nanos() as u64;
        ewma(&self.itl_ns, ns / (events - 1));
        self.stream_tokens.fetch_add(events - 1, Ordering::Relaxed);
        self.stream_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The first body byte came `ttft` after the request was sent, which
    /// had `uncached` prompt tokens to prefill as far as the gateway knows.
    pub fn first_token(&self, ttft: Duration, uncached: u64) {
        let t = ttft.as_nanos() as u64;
        ewma(&self.ttft_ns, t);
        // Short prompts say more about step time than about prefill.
        if uncached >= 256 {
            let per_token = t / uncached;
            let _ = self
                .prefill_ns
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |old| {
                    Some(match old {
                        0 => per_token.max(1),
                        // Down fast, up slowly: a queued request's TTFT
                        // overstates prefill.
                        o if per_token < o => (o + per_token) / 2,
                        o => (o * 15 + per_token) / 16,
                    })
                });
        }
    }

    /// Server-reported load, when younger than `max_age`.
    pub fn reported(&self, now: u64, max_age: Duration) -> Option<(u32, u32, f64)> {
        let at = self.reported_ms.load(Ordering::Acquire);
        (at != 0 && now.saturating_sub(at) <= max_age.as_millis() as u64).then(|| {
            (
                self.waiting.load(Ordering::Relaxed),
                self.running.load(Ordering::Relaxed),
                f64::from(self.kv_permille.load(Ordering::Relaxed)) / 1000.0,
            )
        })
    }

    pub fn report(&self, waiting: Option<u32>, running: Option<u32>, kv: Option<f64>) {
        if let Some(w) = waiting {
            self.waiting.store(w, Ordering::Relaxed);
        }
        if let Some(r) = running {
            self.running.store(r, Ordering::Relaxed);
            // A batch beyond any real server's is a bogus report, not a size.
            if r <= MAX_BATCH {
                self.batch_seen.fetch_max(r, Ordering::Relaxed);
            }
        }
        if let Some(k) = kv {
            self.kv_permille
                .store((k.clamp(0.0, 1.0) * 1000.0) as u32, Ordering::Relaxed);
        }
        self.inflight_at_report
            .store(self.inflight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.reported_ms.store(now_ms(), Ordering::Release);
    }

    /// How many more requests this backend takes before it is saturated
    /// (`u32::MAX`: no bound known). Saturated: at `max_inflight`, or —
    /// fresh reports only — KV cache at `kv_saturation` or
    /// `queue_saturation` waiting, counting as waiting what was sent since
    /// the report beyond the batch slots it had free.
    pub fn headroom(&self, s: &BalanceSettings, now: u64) -> u32 {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let mut room = match s.max_inflight {
            0 => u32::MAX,
            cap => cap.saturating_sub(inflight),
        };
        if let Some((waiting, running, kv)) = self.reported(now, s.metrics_max_age) {
            if kv >= s.kv_saturation {
                return 0;
            }
            let sent = inflight.saturating_sub(self.inflight_at_report.load(Ordering::Relaxed));
            let free = self
                .batch_seen
                .load(Ordering::Relaxed)
                .saturating_sub(running);
            let waiting = waiting.saturating_add(sent.saturating_sub(free));
            room = room.min(s.queue_saturation.saturating_sub(waiting));
        }
        room
    }

    pub fn available(&self, now: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// A request finished: `latency` end to end, `ttfb` to the response
    /// head, `concurrency` in flight here when it was sent (itself included),
    /// `tokens` its declared output budget (0: unknown).
    pub fn complete(
        &self,
        latency: Duration,
        ttfb: Option<Duration>,
        concurrency: u32,
        tokens: u64,
    ) {
        let l = latency.as_nanos() as u64;
        if let Some(per_token) = l.checked_div(tokens) {
            ewma(&self.token_ns, per_token);
        }
        ewma(&self.latency_ns, l);
        if let Some(t) = ttfb {
            ewma(&self.ttfb_ns, t.as_nanos() as u64);
        }
        ewma(&self.service_ns, l / u64::from(concurrency.max(1)));
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// A success resets the failure count; `eject_after` failures in a row
    /// eject for `ejection` × 2^(ejections in a row), at most `max`.
    /// Returns the ejection when this failure caused one.
    pub fn outcome(&self, ok: bool, s: &BalanceSettings) -> Option<Duration> {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            if self.ejections.load(Ordering::Relaxed) > 0
                && self.ejected_until.load(Ordering::Relaxed) <= now_ms()
            {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if s.eject_after == 0 || n < s.eject_after {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let k = self.ejections.fetch_add(1, Ordering::AcqRel);
        let d = s
            .ejection
            .saturating_mul(1u32 << k.min(16))
            .min(s.max_ejection);
        let now = now_ms();
        self.ejected_until
            .store(now + d.as_millis() as u64, Ordering::Release);
        // Re-admitted with a ramp, like a new backend.
        self.since_ms
            .store(now + d.as_millis() as u64, Ordering::Relaxed);
        Some(d)
    }
}

/// EWMA with α = 1/8 (the first sample sets it).
fn ewma(cell: &AtomicU64, sample: u64) {
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |old| {
        Some(if old == 0 {
            sample.max(1)
        } else {
            (old * 7 + sample) / 8
        })
    });
}

/// A cluster's retry budget (process-wide): each request deposits
/// `retry_budget` of a retry, up to `retry_reserve` + what was deposited;
/// a retry takes one whole. Kept in thousandths.
#[derive(Debug)]
pub struct RetryBudget {
    milli: std::sync::atomic::AtomicI64,
}

impl RetryBudget {
    fn new(reserve: u32) -> RetryBudget {
        RetryBudget {
            milli: std::sync::atomic::AtomicI64::new(i64::from(reserve) * 1000),
        }
    }

    /// One request's share; the balance is capped at `reserve` + 100 retries' worth.
    pub fn deposit(&self, s: &BalanceSettings) {
        let add = (s.retry_budget.clamp(0.0, 1.0) * 1000.0) as i64;
        if add == 0 {
            return;
        }
        let cap = (i64::from(s.retry_reserve) + 100) * 1000;
        // Full (the usual state without failures): a read, no write to a
        // line every worker shares.
        if self.milli.load(Ordering::Relaxed) >= cap {
            return;
        }
        let _ = self
            .milli
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                Some((v + add).min(cap))
            });
    }

    /// Take one retry, if the budget has it.
    pub fn try_take(&self) -> bool {
        self.milli
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                (v >= 1000).then_some(v - 1000)
            })
            .is_ok()
    }
}

/// The most entries a cluster's prefix index has (8 bytes each: 128 MiB),
/// whatever the caches' sizes (configured or reported by the engines).
pub const MAX_INDEX_SLOTS: usize = 1 << 24;

/// Every backend's load, by (cluster, address), and each cluster's retry
/// budget: outlives config generations.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<(String, SocketAddr), Arc<BackendLoad>>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    queues: Mutex<HashMap<String, Arc<queue::FlowQueue>>>,
    prefixes: Mutex<HashMap<String, Arc<fleet::SharedPrefix>>>,
}

impl Registry {
    /// The cluster's queue (`[clusters.X.queue]`), set to this generation's
    /// backends and settings; requests waiting in it stay across reloads.
    pub fn queue(
        &self,
        cluster: &str,
        loads: &[Arc<BackendLoad>],
        b: &BalanceSettings,
        q: &crate::config::QueueSettings,
    ) -> Arc<queue::FlowQueue> {
        let fq = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.to_string())
            .or_insert_with(|| Arc::new(queue::FlowQueue::new(cluster)))
            .clone();
        fq.configure(loads, b, q);
        fq
    }

    /// Every cluster queue, by cluster name.
    pub fn queues(&self) -> Vec<Arc<queue::FlowQueue>> {
        let mut v: Vec<_> = self
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        v
    }

    /// The cluster's prefix index, sized for its backends' caches (the
    /// engines' reported sizes, else `prefix_cache_blocks` each), four
    /// entries a cache block; kept across reloads unless that size moves
    /// past ½–4× the table's. Set to this generation's backends (the
    /// fleet's placements are applied to them).
    pub fn prefix_index(
        &self,
        cluster: &str,
        loads: &[Arc<BackendLoad>],
        s: &BalanceSettings,
    ) -> Arc<fleet::SharedPrefix> {
        let blocks: u64 = loads
            .iter()
            .map(|l| l.holder(s.prefix_cache_blocks).blocks)
            .sum();
        let want = (blocks as usize)
            .saturating_mul(4)
            .clamp(1, MAX_INDEX_SLOTS)
            .next_power_of_two();
        let mut map = self.prefixes.lock().unwrap_or_else(|p| p.into_inner());
        let ix = match map.get(cluster) {
            // Kept unless the caches' size moved a lot (an engine's report
            // replacing the configured guess): what it knows survives reloads.
            Some(ix)
                if ix.index.capacity() >= want / 2
                    && ix.index.capacity() <= want.saturating_mul(4) =>
            {
                ix.clone()
            }
            _ => {
                let ix = Arc::new(fleet::SharedPrefix::new(cluster, want));
                map.insert(cluster.to_string(), ix.clone());
                ix
            }
        };
        ix.configure(loads, s);
        ix
    }

    /// Every prefix-aware cluster's index (the fleet sync's).
    pub fn shared_prefixes(&self) -> Vec<Arc<fleet::SharedPrefix>> {
        self.prefixes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn budget(&self, cluster: &str, s: &BalanceSettings) -> Arc<RetryBudget> {
        self.budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cluster.to_string())
            .or_insert_with(|| Arc::new(RetryBudget::new(s.retry_reserve)))
            .clone()
    }

    pub fn get(&self, cluster: &str, addr: SocketAddr) -> Arc<BackendLoad> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((cluster.to_string(), addr))
            .or_insert_with(|| Arc::new(BackendLoad::new(addr)))
            .clone()
    }

    /// A backend's state, if it is in that cluster.
    pub fn find(&self, cluster: &str, addr: SocketAddr) -> Option<Arc<BackendLoad>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(cluster.to_string(), addr))
            .cloned()
    }

    /// Every backend, by cluster and address.
    pub fn all(&self) -> Vec<(String, Arc<BackendLoad>)> {
        let mut v: Vec<_> = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((c, _), l)| (c.clone(), l.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, a.1.addr).cmp(&(&b.0, b.1.addr)));
        v
    }

    /// Forget backends no longer in any cluster (after a reload) and no
    /// longer held by any configuration generation.
    pub fn retain(&self, keep: &[(String, SocketAddr)]) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, v| keep.contains(k) || Arc::strong_count(v) > 1);
    }
}

/// Where a model's requests go (`[[models]] cluster`, `version_clusters`,
/// `split`, `sticky`), by cluster index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPools {
    pub default: Option<usize>,
    pub versions: HashMap<String, usize>,
    /// (cluster, cumulative weight).
    pub split: Vec<(usize, u64)>,
    pub total: u64,
    pub sticky: bool,
    /// Mirror: (cluster, fraction in millionths, max in flight per worker, timeout).
    pub shadow: Option<(usize, u32, usize, Duration)>,
}

impl ModelPools {
    pub fn new(
        m: &crate::config::ModelConfig,
        index: impl Fn(&str) -> Option<usize>,
    ) -> ModelPools {
        let mut cum = 0;
        let split = m
            .split
            .iter()
            .filter(|t| t.weight > 0)
            .filter_map(|t| {
                cum += u64::from(t.weight);
                Some((index(&t.cluster)?, cum))
            })
            .collect();
        ModelPools {
            default: m.cluster.as_deref().and_then(&index),
            versions: m
                .version_clusters
                .iter()
                .filter_map(|(v, c)| Some((v.clone(), index(c)?)))
                .collect(),
            split,
            total: cum,
            sticky: m.sticky,
            shadow: m.shadow.as_ref().and_then(|sh| {
                Some((
                    index(&sh.cluster)?,
                    (sh.fraction * 1e6) as u32,
                    sh.max_inflight,
                    sh.timeout,
                ))
            }),
        }
    }

    /// The pool for a request: its named version's pool; else, unless it
    /// named a version, a side of the split (by a stable hash of
    /// `sticky_key` when sticky, at random otherwise); else the model's pool.
    pub fn cluster(
        &self,
        version: &str,
        pinned: bool,
        sticky_key: &str,
        rng: &Rng,
    ) -> Option<usize> {
        if pinned {
            if let Some(&c) = self.versions.get(version) {
                return Some(c);
            }
        } else if self.total > 0 {
            let x = if self.sticky {
                fnv1a(sticky_key.as_bytes()) % self.total
            } else {
                rng.below(self.total as usize) as u64
            };
            return self.split.iter().find(|(_, cum)| x < *cum).map(|(c, _)| *c);
        }
        self.default
    }
}

/// FNV-1a: stable across workers, processes and restarts (sticky splits).
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Why no backend was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// Every candidate was tried already.
    Exhausted,
    /// Every healthy candidate is saturated: shed (503 + Retry-After).
    Saturated,
}

/// A small xorshift PRNG per worker (P2C choices, tie breaks).
#[derive(Debug)]
pub struct Rng(std::cell::Cell<u64>);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(std::cell::Cell::new(seed | 1))
    }

    pub fn below(&self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n.max(1) as u64) as usize
    }

    pub fn next_u64(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.set(x);
        x
    }
}

/// What the prefix index knows about a request's prompt, for the
/// prefix-aware algorithms.
#[derive(Debug, Clone, Copy)]
pub struct PrefixView<'a> {
    /// The prompt's block hashes ([`prefix::BlockHasher`]).
    pub blocks: &'a [u64],
    /// How far each backend holds them, by the index.
    pub matches: &'a prefix::Matches,
    /// The prompt's size in tokens (estimated).
    pub prompt_tokens: u64,
}

impl PrefixView<'_> {
    /// Prompt tokens the index says `i` holds, and the home's bonus (the
    /// anchor's worth, at the prompt's home only): where every worker and
    /// gateway would place a prefix wins a near tie, so they converge
    /// there without talking.
    fn credit_tokens(&self, i: usize, home: Option<usize>) -> (u64, u64) {
        let own = u64::from(self.matches.per_backend.get(i).copied().unwrap_or(0));
        let bonus = if home == Some(i) {
            prefix::ANCHOR_BLOCKS as u64 * prefix::BLOCK_TOKENS
        } else {
            0
        };
        (
            (own * prefix::BLOCK_TOKENS).min(self.prompt_tokens.max(1)),
            bonus,
        )
    }
}

/// Pick a backend index of `loads` not in `tried` (a bitmask of indexes
/// tried already; pools above 64 backends treat the rest as untried).
/// `size` is the request's declared output budget in tokens (0: unknown);
/// `prefix`, what the prefix index knows (prefix-aware algorithms).
#[allow(clippy::too_many_arguments)]
pub fn pick(
    s: &BalanceSettings,
    loads: &[Arc<BackendLoad>],
    tried: u64,
    model: &str,
    size: u64,
    prefix: Option<&PrefixView<'_>>,
    rr: &std::cell::Cell<usize>,
    rng: &Rng,
) -> Result<usize, NoPick> {
    let now = now_ms();
    let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
    // Ejected, drained or failing active checks: out, unless no backend at
    // all is available (then every untried one is a candidate: better a
    // chance than a 502). Available ones that were tried (or are at their
    // connection limit) don't let the unavailable ones in.
    let any_available = loads.iter().any(|b| b.available(now));
    let mut cand: Vec<usize> = (0..loads.len())
        .filter(|&i| untried(i) && (!any_available || loads[i].available(now)))
        .collect();
    if cand.is_empty() {
        return Err(NoPick::Exhausted);
    }
    // Saturated backends take nothing (the cluster's queue holds it, or 503).
    cand.retain(|&i| loads[i].headroom(s, now) > 0);
    if cand.is_empty() {
        return Err(NoPick::Saturated);
    }
    match s.algorithm {
        Algorithm::RoundRobin => {
            let start = rr.get();
            rr.set(start.wrapping_add(1));
            Ok(cand[start % cand.len()])
        }
        Algorithm::LeastRequest => Ok(p2c(&cand, rng, |i| {
            f64::from(loads[i].inflight.load(Ordering::Relaxed))
        })),
        Algorithm::GieLike => gie_like(s, loads, &cand, now, None, rng),
        Algorithm::GiePrefix => gie_like(s, loads, &cand, now, prefix, rng),
        Algorithm::GpuAware => gpu_aware(s, loads, &cand, now, model, size, None, rng),
        Algorithm::PrefixAware => gpu_aware(s, loads, &cand, now, model, size, prefix, rng),
    }
}

/// The candidate with the lowest cost (`None`: skipped), ties at random.
fn cheapest(
    cand: &[usize],
    rng: &Rng,
    mut cost: impl FnMut(usize) -> Option<f64>,
) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    let mut ties = 0usize;
    for &i in cand {
        let Some(c) = cost(i) else { continue };
        match best {
            Some((b, _)) if c > b + 1e-9 => {}
            Some((b, _)) if (c - b).abs() <= 1e-9 => {
                ties += 1;
                // Reservoir choice among equals.
                if rng.below(ties + 1) == 0 {
                    best = Some((c, i));
                }
            }
            _ => {
                best = Some((c, i));
                ties = 0;
            }
        }
    }
    best.map(|b| b.1)
}

/// Power of two choices: the lower cost of two distinct random candidates.
fn p2c(cand: &[usize], rng: &Rng, cost: impl Fn(usize) -> f64) -> usize {
    if cand.len() == 1 {
        return cand[0];
    }
    let a = rng.below(cand.len());
    let mut b = rng.below(cand.len() - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (cand[a], cand[b]);
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}

/// The Kubernetes Inference Gateway's default: queue scorer (weight 2,
/// `(max − q) / (max − min)`, 1 when all equal) + KV-cache scorer (weight 2,
/// `1 − kv`), highest total wins, ties at random. Backends without fresh
/// metrics are left out; none fresh → a random candidate. With `prefix`
/// (`gie_prefix`), the endpoint picker's prefix scorer too: weight 3 ×
/// the share of the prompt's blocks the backend was sent (its approximate
/// index, no fleet prior).
fn gie_like(
    s: &BalanceSettings,
    loads: &[Arc<BackendLoad>],
    cand: &[usize],
    now: u64,
    prefix: Option<&PrefixView<'_>>,
    rng: &Rng,
) -> Result<usize, NoPick> {
    let fresh: Vec<(usize, f64, f64)> = cand
        .iter()
        .filter_map(|&i| {
            loads[i]
                .reported(now, s.metrics_max_age)
                .map(|(w, _, kv)| (i, f64::from(w), kv))
        })
        .collect();
    if fresh.is_empty() {
        return Ok(cand[rng.below(cand.len())]);
    }
    let (minq, maxq) = fresh.iter().fold((f64::MAX, f64::MIN), |(lo, hi), f| {
        (lo.min(f.1), hi.max(f.1))
    });
    let prefix_score = |i: usize| {
        prefix.map_or(0.0, |p| {
            let n = p.blocks.len().max(1) as f64;
            f64::from(p.matches.per_backend.get(i).copied().unwrap_or(0)) / n
        })
    };
    let score = |i: usize, q: f64, kv: f64| {
        let qs = if maxq > minq {
            (maxq - q) / (maxq - minq)
        } else {
            1.0
        };
        3.0 * prefix_score(i) + 2.0 * qs + 2.0 * (1.0 - kv)
    };
    // Highest score = lowest negated score.
    let ids: Vec<usize> = fresh.iter().map(|f| f.0).collect();
    let by_id = |i: usize| fresh.iter().find(|f| f.0 == i).map(|f| -score(i, f.1, f.2));
    Ok(cheapest(&ids, rng, by_id).unwrap_or(ids[0]))
}

/// The gateway's own: the lowest expected completion time. Occupancy is the
/// larger of this gateway's live in-flight count and the server's fresh
/// running + queued count (other gateways' load shows there). With the
/// request's output budget known (OpenAI `max_tokens`) and the backend's
/// batch size learned from its reports, that is the wait for a batch slot
/// — `max(0, occupancy + 1 − batch) × service` — plus `budget × per-token
/// latency` (EWMA per backend): long generations go to fast GPUs, short
/// ones can fill slow ones. Otherwise `(occupancy + 1) × service`, service
/// being the per-slot service time (EWMA of latency ÷ concurrency, the
/// inverse of throughput). Unknown EWMAs take the slowest measured value. Saturated backends
/// (queue ≥ `queue_saturation` or KV ≥ `kv_saturation`, fresh metrics only)
/// are skipped; KV pressure above 80 % raises the cost; a backend within its
/// `warmup` gets a growing share; one holding the requested LoRA adapter is
/// preferred. Full scan (pools are small); ties at random.
///
/// With `prefix`, the same costs feed [`prefix_aware`].
#[allow(clippy::too_many_arguments)]
fn gpu_aware(
    s: &BalanceSettings,
    loads: &[Arc<BackendLoad>],
    cand: &[usize],
    now: u64,
    model: &str,
    size: u64,
    prefix: Option<&PrefixView<'_>>,
    rng: &Rng,
) -> Result<usize, NoPick> {
    // A backend not measured yet is assumed as slow as the slowest measured
    // one (it may be a slow GPU): its first requests are the measurement.
    let slowest = |f: &dyn Fn(&BackendLoad) -> u64| {
        cand.iter().map(|&i| f(&loads[i])).max().unwrap_or(0) as f64
    };
    let mean = match slowest(&|b| b.service_ns.load(Ordering::Relaxed)) {
        0.0 => 1_000_000.0,
        m => m,
    };
    let mean_token = slowest(&|b| b.token_ns.load(Ordering::Relaxed));
    let Some(p) = prefix else {
        let cost = |i: usize| expected_ns(s, &loads[i], now, model, size, mean, mean_token);
        return cheapest(cand, rng, cost).ok_or(NoPick::Saturated);
    };
    let parts = |i: usize| expected(s, &loads[i], now, model, size, mean, mean_token);
    prefix_aware(s, loads, cand, p, rng, parts)
}

/// `prefix_aware`: each backend's cost is its expected completion time
/// (`gpu_aware`'s model) plus the prefill of what the prefix index says it
/// doesn't hold of the prompt, plus the wait for a batch slot and that
/// prefill again (the first token's delay), plus that prefill ×
/// `prefix_stickiness` × the requests running there (a miss stalls their
/// steps; a hit doesn't), less a small bonus at the prompt's home
/// ([`prefix::home`], weighted by capacity, the same in every worker and
/// gateway). Backends whose expected completion time is over `(1 +
/// prefix_max_slowdown)` × the soonest's — unless within the fastest
/// backend's mean latency — are left out: the end-to-end tail isn't traded
/// for cache hits. A shared prefix held nowhere (evicted everywhere) goes
/// home unless home costs clearly more. The lowest cost wins. A new prompt
/// (its first blocks never sent anywhere), and any prompt until a backend
/// has been timed, is routed as `gpu_aware` routes it, or home on a near
/// tie. A backend not timed yet counts as slower by its first tokens'
/// prefill speed against the quickest's (at least twice while others are
/// timed).
fn prefix_aware(
    s: &BalanceSettings,
    loads: &[Arc<BackendLoad>],
    cand: &[usize],
    p: &PrefixView<'_>,
    rng: &Rng,
    parts: impl Fn(usize) -> Option<Parts>,
) -> Result<usize, NoPick> {
    let costs: Vec<(usize, Parts)> = cand
        .iter()
        .filter_map(|&i| parts(i).map(|c| (i, c)))
        .collect();
    if costs.is_empty() {
        return Err(NoPick::Saturated);
    }
    let fastest = lowest_measured(loads, cand, |b| &b.service_ns);
    let ok: Vec<usize> = costs.iter().map(|c| c.0).collect();
    // A backend not timed yet (no completion measured) may be the pool's
    // slowest GPU: its estimate borrows the slowest timed speed, or none.
    // Its first tokens say more: its prefill per token against the
    // fastest's is how much slower it is. Its expected time counts that
    // many times (at least twice while others are timed), so that neither
    // its cache nor its being home parks a long answer there before its
    // speed is known. Its short answers are the measurement.
    let timed = |i: usize| loads[i].service_ns.load(Ordering::Relaxed) > 0;
    let any_timed = ok.iter().any(|&i| timed(i));
    let quickest_prefill = lowest_measured(loads, &ok, |b| &b.prefill_ns);
    let doubt = |i: usize| {
        if timed(i) {
            return 1.0;
        }
        let slower = match loads[i].prefill_ns.load(Ordering::Relaxed) {
            p if p > 0 && quickest_prefill > 0.0 => p as f64 / quickest_prefill,
            _ => 1.0,
        };
        slower.max(if any_timed { 2.0 } else { 1.0 })
    };
    let home = prefix::home(p.blocks, &addrs(loads), &capacity_weights(loads), &ok);
    if !p.matches.anchor_seen || !any_timed {
        // A new prompt: nothing to gain from any cache, so `gpu_aware`'s
        // choice — or home on a near tie (it may turn out shared, and
        // every worker and gateway agrees on home). The same while no
        // backend has been timed: times are then only relative loads
        // (a default service time), nothing a cache's saving can be
        // weighed against — a hot prefix would pile onto whichever GPU
        // got it first, however slow.
        let total = |i: usize| {
            costs
                .iter()
                .find(|c| c.0 == i)
                .map(|c| c.1.total * doubt(i))
        };
        let best = ok.iter().filter_map(|&i| total(i)).fold(f64::MAX, f64::min);
        if let Some(h) = home {
            // Home's bonus: the prefill of its anchor blocks (once times
            // are known).
            let bonus = if any_timed {
                p.credit_tokens(h, home).1 as f64 * prefill_per_token(s, &loads[h], fastest)
            } else {
                0.0
            };
            if total(h).is_some_and(|t| t - bonus <= best * NEW_HOME_TOLERANCE) {
                return Ok(h);
            }
        }
        return cheapest(&ok, rng, total).ok_or(NoPick::Saturated);
    }
    // (backend, its own completion time, the cost of sending it there)
    let judged = |&(i, c): &(usize, Parts)| {
        let (held, bonus) = p.credit_tokens(i, home);
        let per_token = prefill_per_token(s, &loads[i], fastest);
        let prefill = p.prompt_tokens.saturating_sub(held) as f64 * per_token;
        // The prefill stalls the steps of every request running there: a
        // miss costs the batch, not only this request.
        let stalled = if c.batch > 0.0 {
            c.occupancy.min(c.batch)
        } else {
            c.occupancy
        };
        let own = (c.total + prefill) * doubt(i);
        let cost = own + c.wait + prefill * (1.0 + s.prefix_stickiness * stalled)
            - bonus as f64 * per_token;
        (i, own, cost)
    };
    let judged: Vec<(usize, f64, f64)> = costs.iter().map(judged).collect();
    // No backend whose completion time is far off the best's, however much
    // its cache saves: the tail of end-to-end latency is set there.
    let fastest_done = judged.iter().map(|j| j.1).fold(f64::MAX, f64::min);
    // A request that finishes within the pool's typical time anyway (the
    // fastest backend's mean latency) isn't what sets the tail.
    let typical = lowest_measured(loads, &ok, |b| &b.latency_ns);
    let limit = (fastest_done * (1.0 + s.prefix_max_slowdown)).max(typical);
    let allowed: Vec<usize> = judged
        .iter()
        .filter(|j| j.1 <= limit)
        .map(|j| j.0)
        .collect();
    let cost = |i: usize| judged.iter().find(|j| j.0 == i).map(|j| j.2);
    if let Some(h) = home.filter(|h| p.matches.longest == 0 && allowed.contains(h)) {
        // A shared prefix held nowhere (evicted everywhere since): home,
        // where every worker and gateway would send it, unless clearly
        // worse.
        let best = allowed
            .iter()
            .filter_map(|&i| cost(i))
            .fold(f64::MAX, f64::min);
        if cost(h).is_some_and(|c| c <= best + (HOME_TOLERANCE - 1.0) * best.abs()) {
            return Ok(h);
        }
    }
    cheapest(&allowed, rng, cost).ok_or(NoPick::Saturated)
}

/// A prompt held nowhere goes home while home's cost is within this factor
/// of the best: one sent before (shared, evicted since), and a new one
/// (`gpu_aware`'s cost).
const HOME_TOLERANCE: f64 = 1.25;
const NEW_HOME_TOLERANCE: f64 = 1.05;

/// The lowest measured value (0: unmeasured) of an EWMA among the
/// backends `of`, as f64 (0.0 when none is measured).
fn lowest_measured(
    loads: &[Arc<BackendLoad>],
    of: &[usize],
    field: impl Fn(&BackendLoad) -> &AtomicU64,
) -> f64 {
    of.iter()
        .map(|&i| field(&loads[i]).load(Ordering::Relaxed))
        .filter(|&v| v > 0)
        .min()
        .unwrap_or(0) as f64
}

/// Prefill time per prompt token at `b`, ns: learned from its streams' time
/// to first token, else `prefill_per_1k_tokens` scaled by how much slower
/// than the fastest it serves.
fn prefill_per_token(s: &BalanceSettings, b: &BackendLoad, fastest: f64) -> f64 {
    match b.prefill_ns.load(Ordering::Relaxed) {
        0 => {
            let base = s.prefill_per_1k_tokens.as_nanos() as f64 / 1000.0;
            let service = b.service_ns.load(Ordering::Relaxed) as f64;
            let slower = if fastest > 0.0 && service > 0.0 {
                service / fastest
            } else {
                1.0
            };
            base * slower
        }
        v => v as f64,
    }
}

/// Each backend's share of the pool's capacity for the home's weighted
/// hashing: its batch ÷ its per-token latency (tokens per second), rounded
/// to a power of √2 so that gateways measuring slightly different values
/// still agree. Equal weights until every backend has been measured.
fn capacity_weights(loads: &[Arc<BackendLoad>]) -> Vec<f64> {
    let raw: Vec<f64> = loads
        .iter()
        .map(|b| {
            let batch = f64::from(b.batch_seen.load(Ordering::Relaxed));
            let token = b.token_ns.load(Ordering::Relaxed) as f64;
            if batch > 0.0 && token > 0.0 {
                batch / token
            } else {
                0.0
            }
        })
        .collect();
    if raw.iter().any(|&w| w <= 0.0) {
        return vec![1.0; loads.len()];
    }
    raw.iter()
        .map(|w| 2f64.powf((w.log2() * 2.0).round() / 2.0))
        .collect()
}

fn addrs(loads: &[Arc<BackendLoad>]) -> Vec<SocketAddr> {
    loads.iter().map(|b| b.addr).collect()
}

/// One backend's expected completion time for a request, ns (`None`:
/// saturated, skip it): see [`gpu_aware`].
fn expected_ns(
    s: &BalanceSettings,
    b: &BackendLoad,
    now: u64,
    model: &str,
    size: u64,
    mean: f64,
    mean_token: f64,
) -> Option<f64> {
    expected(s, b, now, model, size, mean, mean_token).map(|e| e.total)
}

/// A backend's expected completion time for a request and what it is made
/// of (ns), for the prefix-aware cost.
#[derive(Debug, Clone, Copy)]
struct Parts {
    total: f64,
    /// Of it, the wait for a batch slot.
    wait: f64,
    /// Requests it is running or holding (its occupancy before this one).
    occupancy: f64,
    /// Its batch size as learned (0: unknown).
    batch: f64,
}

/// [`expected_ns`] with its parts.
fn expected(
    s: &BalanceSettings,
    b: &BackendLoad,
    now: u64,
    model: &str,
    size: u64,
    mean: f64,
    mean_token: f64,
) -> Option<Parts> {
    let mut occ = f64::from(b.inflight.load(Ordering::Relaxed));
    let mut cost_mul = 1.0;
    // The batch size is the largest running batch ever reported; a server
    // that has never been full reports less than it has. One that says it
    // queues nothing has room for at least one more.
    let mut batch = f64::from(b.batch_seen.load(Ordering::Relaxed));
    if let Some((waiting, running, kv)) = b.reported(now, s.metrics_max_age) {
        // (A saturated backend never gets here: `pick` leaves it out.)
        occ = occ.max(f64::from(waiting) + f64::from(running));
        if kv > 0.8 {
            cost_mul *= 1.0 + (kv - 0.8) * 5.0;
        }
        if waiting == 0 && batch > 0.0 {
            batch = batch.max(f64::from(running) + 1.0);
        }
    }
    let service = match b.service_ns.load(Ordering::Relaxed) {
        0 => mean,
        v => v as f64,
    };
    let since = b.since_ms.load(Ordering::Relaxed);
    let warm = s.warmup.as_millis() as u64;
    if warm > 0 && now < since + warm {
        // From 4× the cost at admission down to 1× after `warmup`.
        let left = (since + warm - now.max(since)) as f64 / warm as f64;
        cost_mul *= 1.0 + 3.0 * left;
    }
    if !model.is_empty()
        && b.adapters
            .lock()
            .map(|a| a.iter().any(|x| x == model))
            .unwrap_or(false)
    {
        cost_mul *= 0.8;
    }
    let token = match b.token_ns.load(Ordering::Relaxed) {
        0 => mean_token,
        v => v as f64,
    };
    let (total, wait) = if size > 0 && token > 0.0 && batch > 0.0 {
        let wait = (occ + 1.0 - batch).max(0.0) * service;
        ((wait + size as f64 * token) * cost_mul, wait * cost_mul)
    } else {
        ((occ + 1.0) * service * cost_mul, occ * service * cost_mul)
    };
    Some(Parts {
        total,
        wait,
        occupancy: occ,
        batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn pool(n: usize) -> Vec<Arc<BackendLoad>> {
        (0..n)
            .map(|i| {
                let b = BackendLoad::new(format!("127.0.0.1:{}", 9000 + i).parse().unwrap());
                b.since_ms.store(0, Ordering::Relaxed);
                Arc::new(b)
            })
            .collect()
    }

    fn settings(a: Algorithm) -> BalanceSettings {
        BalanceSettings {
            algorithm: a,
            warmup: Duration::ZERO,
            ..Default::default()
        }
    }

    #[test]
    fn round_robin_skips_tried_and_ejected() {
        let p = pool(3);
        let s = settings(Algorithm::RoundRobin);
        let (rr, rng) = (Cell::new(0), Rng::new(1));
        let picks: Vec<usize> = (0..3)
            .map(|_| pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2]);
        p[1].ejected_until
            .store(now_ms() + 60_000, Ordering::Relaxed);
        for _ in 0..4 {
            assert_ne!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 1);
        }
        // The available ones tried already: an ejected one isn't tried instead.
        assert_eq!(
            pick(&s, &p, 0b101, "", 0, None, &rr, &rng),
            Err(NoPick::Exhausted)
        );
        // Nothing available at all: every untried backend is a candidate.
        for b in &p {
            b.ejected_until.store(now_ms() + 60_000, Ordering::Relaxed);
        }
        assert_eq!(
            pick(&s, &p, 0b101, "", 0, None, &rr, &rng).unwrap(),
            1,
            "better a chance than a 502"
        );
        assert_eq!(
            pick(&s, &p, 0b111, "", 0, None, &rr, &rng),
            Err(NoPick::Exhausted)
        );
    }

    #[test]
    fn least_request_prefers_fewer_in_flight() {
        let p = pool(2);
        p[0].inflight.store(10, Ordering::Relaxed);
        let s = settings(Algorithm::LeastRequest);
        let (rr, rng) = (Cell::new(0), Rng::new(7));
        for _ in 0..20 {
            assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 1);
        }
    }

    #[test]
    fn gie_like_scores_queue_and_kv_and_ignores_stale() {
        let p = pool(3);
        p[0].report(Some(10), Some(4), Some(0.2));
        p[1].report(Some(0), Some(4), Some(0.9));
        p[2].report(Some(2), Some(4), Some(0.1));
        // 0: 2·0 + 2·0.8 = 1.6; 1: 2·1 + 2·0.1 = 2.2; 2: 2·0.8 + 2·0.9 = 3.4.
        let s = settings(Algorithm::GieLike);
        let (rr, rng) = (Cell::new(0), Rng::new(3));
        assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 2);
        // Stale metrics are not trusted: with 2's report too old, 1 wins.
        let s = BalanceSettings {
            metrics_max_age: Duration::from_millis(20),
            ..s
        };
        std::thread::sleep(Duration::from_millis(40));
        p[0].report(Some(10), Some(4), Some(0.2));
        p[1].report(Some(0), Some(4), Some(0.9));
        assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 1);
        // Nothing fresh: any candidate (random), never an error.
        std::thread::sleep(Duration::from_millis(40));
        assert!(pick(&s, &p, 0, "", 0, None, &rr, &rng).is_ok());
    }

    #[test]
    fn gpu_aware_weighs_speed_sheds_saturated_and_prefers_adapters() {
        let p = pool(2);
        // 0 is twice as fast per slot; equal occupancy → 0.
        p[0].service_ns.store(100, Ordering::Relaxed);
        p[1].service_ns.store(200, Ordering::Relaxed);
        let s = settings(Algorithm::GpuAware);
        let (rr, rng) = (Cell::new(0), Rng::new(5));
        assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 0);
        // With 2 in flight on 0 (cost 300) vs 0 on 1 (cost 200): 1.
        p[0].inflight.store(2, Ordering::Relaxed);
        assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 1);
        // The server says 1 is busy (fresh): occupancy 5 → cost 1200: back to 0.
        p[1].report(Some(1), Some(4), Some(0.5));
        assert_eq!(pick(&s, &p, 0, "", 0, None, &rr, &rng).unwrap(), 0);
        // Both saturated: shed.
        p[0].report(Some(100), Some(8), Some(0.5));
        p[1].report(Some(0), Some(8), Some(0.99));
        assert_eq!(
            pick(&s, &p, 0, "", 0, None, &rr, &rng),
            Err(NoPick::Saturated)
        );
        // LoRA affinity breaks a tie.
        let q = pool(2);
        *q[1].adapters.lock().unwrap() = vec!["sql-lora".into()];
        for _ in 0..10 {
            assert_eq!(pick(&s, &q, 0, "sql-lora", 0, None, &rr, &rng).unwrap(), 1);
        }
    }

    #[test]
    fn model_pools_split_pin_and_stick() {
        let m: crate::config::ModelConfig = toml::from_str(
            "name = \"llama\"\nversions = [\"1.0\", \"2.0\"]\ncluster = \"stable\"\nversion_clusters = { \"2.0\" = \"canary\" }\n\
             split = [{ cluster = \"stable\", weight = 90 }, { cluster = \"canary\", weight = 10 }]\n",
        )
        .unwrap();
        let idx = |c: &str| match c {
            "stable" => Some(0),
            "canary" => Some(1),
            _ => None,
        };
        let p = ModelPools::new(&m, idx);
        let rng = Rng::new(42);
        assert_eq!(
            p.cluster("2.0", true, "", &rng),
            Some(1),
            "pinned to 2.0's pool"
        );
        assert_eq!(
            p.cluster("1.0", true, "", &rng),
            Some(0),
            "pinned, no version pool: the model's"
        );
        let canary = (0..10_000)
            .filter(|_| p.cluster("2.0", false, "", &rng) == Some(1))
            .count();
        assert!((800..1200).contains(&canary), "10 % ± 2: {canary}");
        let sticky = ModelPools { sticky: true, ..p };
        let first = sticky.cluster("2.0", false, "alice", &rng);
        for _ in 0..100 {
            assert_eq!(sticky.cluster("2.0", false, "alice", &rng), first);
        }
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|i| sticky.cluster("2.0", false, &format!("user-{i}"), &rng))
            .collect();
        assert_eq!(spread.len(), 2, "principals land on both sides");
    }

    #[test]
    fn retry_budget_is_a_fraction_of_requests_plus_a_reserve() {
        let s = BalanceSettings {
            retry_budget: 0.25,
            retry_reserve: 2,
            ..Default::default()
        };
        let b = RetryBudget::new(s.retry_reserve);
        assert!(b.try_take() && b.try_take(), "the reserve");
        assert!(!b.try_take());
        for _ in 0..3 {
            b.deposit(&s);
        }
        assert!(!b.try_take(), "0.75 of a retry");
        b.deposit(&s);
        assert!(b.try_take(), "four requests bought one retry");
        let none = BalanceSettings {
            retry_budget: 0.0,
            retry_reserve: 0,
            ..Default::default()
        };
        let b = RetryBudget::new(0);
        b.deposit(&none);
        assert!(!b.try_take());
    }

    #[test]
    fn ejection_backs_off_and_success_resets() {
        let b = BackendLoad::new("127.0.0.1:1".parse().unwrap());
        let s = BalanceSettings {
            eject_after: 3,
            ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
            ..Default::default()
        };
        assert_eq!(b.outcome(false, &s), None);
        assert_eq!(b.outcome(true, &s), None, "a success in between resets");
        assert_eq!(b.outcome(false, &s), None);
        assert_eq!(b.outcome(false, &s), None);
        assert_eq!(b.outcome(false, &s), Some(Duration::from_secs(1)));
        assert!(!b.available(now_ms()));
        for _ in 0..2 {
            b.outcome(false, &s);
        }
        assert_eq!(
            b.outcome(false, &s),
            Some(Duration::from_secs(2)),
            "doubled"
        );
        for _ in 0..2 {
            b.outcome(false, &s);
        }
        assert_eq!(b.outcome(false, &s), Some(Duration::from_secs(3)), "capped");
    }

    /// A prompt of `n` blocks (`tag`: which prompt), and what an index
    /// where backend `at` was sent `k` of them (for each `(at, k)`) knows.
    fn prompt(
        p: &[Arc<BackendLoad>],
        tag: u8,
        n: usize,
        held: &[(usize, usize)],
    ) -> (Vec<u64>, prefix::Matches) {
        let mut h = prefix::BlockHasher::new("m", None, usize::MAX);
        h.write(&vec![tag; n * prefix::BLOCK_BYTES]);
        let blocks = h.finish();
        let ix = prefix::PrefixIndex::new(1 << 16);
        for &(at, k) in held {
            let holders: Vec<_> = p.iter().map(|b| b.holder(1 << 14)).collect();
            ix.insert(&blocks[..k], &holders, at, p[at].allocate(k as u64));
        }
        let holders: Vec<_> = p.iter().map(|b| b.holder(1 << 14)).collect();
        let m = ix.matches(&blocks, &holders);
        (blocks, m)
    }

    fn view<'a>(blocks: &'a [u64], m: &'a prefix::Matches) -> PrefixView<'a> {
        PrefixView {
            blocks,
            matches: m,
            prompt_tokens: blocks.len() as u64 * prefix::BLOCK_TOKENS,
        }
    }

    #[test]
    fn prefix_aware_stays_with_the_cache_until_waiting_there_costs_more() {
        let p = pool(2);
        // Equal speed; 50 µs of prefill a token (80 ms for the whole prompt).
        for b in &p {
            b.service_ns.store(10_000_000, Ordering::Relaxed);
            b.prefill_ns.store(50_000, Ordering::Relaxed);
        }
        let s = BalanceSettings {
            prefix_stickiness: 1.0,
            ..settings(Algorithm::PrefixAware)
        };
        let (rr, rng) = (Cell::new(0), Rng::new(9));
        // The prompt's home holds 90 of its 100 blocks: 8 ms of prefill
        // there, 80 ms elsewhere (twice: its own first token, and its
        // completion), plus the stall it puts on what runs there.
        let (blocks, _) = prompt(&p, b'x', 100, &[]);
        let at = prefix::home(&blocks, &addrs(&p), &[1.0; 2], &[0, 1]).unwrap();
        let (blocks, m) = prompt(&p, b'x', 100, &[(at, 90)]);
        let v = view(&blocks, &m);
        for _ in 0..10 {
            assert_eq!(pick(&s, &p, 0, "m", 0, Some(&v), &rr, &rng).unwrap(), at);
        }
        // Plain gpu_aware is blind to it: a tie, either one.
        let g = settings(Algorithm::GpuAware);
        let picks: std::collections::HashSet<usize> = (0..40)
            .map(|_| pick(&g, &p, 0, "m", 0, None, &rr, &rng).unwrap())
            .collect();
        assert_eq!(picks.len(), 2);
        // Five more in flight there (≈ 140 ms: waits, and 5 stalled by its
        // prefill) is still worth it against 170 ms elsewhere…
        p[at].inflight.store(5, Ordering::Relaxed);
        assert_eq!(pick(&s, &p, 0, "m", 0, Some(&v), &rr, &rng).unwrap(), at);
        // …seven more is not.
        p[at].inflight.store(7, Ordering::Relaxed);
        assert_eq!(
            pick(&s, &p, 0, "m", 0, Some(&v), &rr, &rng).unwrap(),
            1 - at
        );
        // Held only elsewhere (home was busy once): it stays with the cache.
        p[at].inflight.store(0, Ordering::Relaxed);
        let (blocks2, m2) = prompt(&p, b'x', 100, &[(1 - at, 90)]);
        let v2 = view(&blocks2, &m2);
        assert_eq!(
            pick(&s, &p, 0, "m", 0, Some(&v2), &rr, &rng).unwrap(),
            1 - at
        );
        // A prompt with nothing shared (never seen) goes by load, home
        // winning only a near tie.
        let (fresh, m3) = prompt(&p, b'y', 100, &[]);
        let v3 = view(&fresh, &m3);
        let h3 = prefix::home(&fresh, &addrs(&p), &[1.0; 2], &[0, 1]).unwrap();
        assert_eq!(pick(&s, &p, 0, "m", 0, Some(&v3), &rr, &rng).unwrap(), h3);
        p[h3].inflight.store(1, Ordering::Relaxed);
        assert_eq!(
            pick(&s, &p, 0, "m", 0, Some(&v3), &rr, &rng).unwrap(),
            1 - h3
        );
    }

    #[test]
    fn prefix_aware_keeps_long_answers_off_a_slow_cached_backend() {
        let p = pool(2);
        // 0: fast (10 ms a token), holds nothing; 1: three times slower,
        // holds the whole prompt. Batches of 8, both idle.
        for (b, token) in p.iter().zip([10_000_000u64, 30_000_000]) {
            b.service_ns.store(token, Ordering::Relaxed);
            b.token_ns.store(token, Ordering::Relaxed);
            b.batch_seen.store(8, Ordering::Relaxed);
            b.prefill_ns.store(50_000, Ordering::Relaxed);
        }
        let s = settings(Algorithm::PrefixAware);
        let (rr, rng) = (Cell::new(0), Rng::new(5));
        let (blocks, m) = prompt(&p, b'z', 100, &[(1, 100)]);
        let v = view(&blocks, &m);
        // 4 tokens: 120 ms there with the cache against 40 + 80 ms of
        // prefill here (and a stall for everything running here): the cache.
        assert_eq!(pick(&s, &p, 0, "m", 4, Some(&v), &rr, &rng).unwrap(), 1);
        // 100 tokens: 3 s there against 1.08 s here: the fast one, however
        // much the cache would save.
        assert_eq!(pick(&s, &p, 0, "m", 100, Some(&v), &rr, &rng).unwrap(), 0);
    }

    #[test]
    fn prefix_aware_parks_no_long_answer_on_a_backend_not_timed_yet() {
        let p = pool(2);
        // 0: timed, 20 ms a token; 1: never timed (it may be a slow GPU),
        // holds the whole prompt. Batches of 8, both idle.
        for b in &p {
            b.batch_seen.store(8, Ordering::Relaxed);
            b.prefill_ns.store(50_000, Ordering::Relaxed);
        }
        p[0].service_ns.store(20_000_000, Ordering::Relaxed);
        p[0].token_ns.store(20_000_000, Ordering::Relaxed);
        let s = settings(Algorithm::PrefixAware);
        let (rr, rng) = (Cell::new(0), Rng::new(3));
        let (blocks, m) = prompt(&p, b'u', 100, &[(1, 100)]);
        let v = view(&blocks, &m);
        // 30 tokens: 1 would be as fast as 0 if as fast as the slowest
        // timed one, and it has the cache; not knowing, it isn't trusted
        // with a long answer.
        assert_eq!(pick(&s, &p, 0, "m", 30, Some(&v), &rr, &rng).unwrap(), 0);
        // A short one is worth its cache (and times it).
        assert_eq!(pick(&s, &p, 0, "m", 4, Some(&v), &rr, &rng).unwrap(), 1);
        // Its first tokens say its prefill is 5× slower than 0's: even a
        // 10-token answer isn't worth its cache now.
        p[1].prefill_ns.store(250_000, Ordering::Relaxed);
        assert_eq!(pick(&s, &p, 0, "m", 10, Some(&v), &rr, &rng).unwrap(), 0);
        // Timed as fast as 0: the long one goes to the cache too.
        p[1].service_ns.store(20_000_000, Ordering::Relaxed);
        p[1].token_ns.store(20_000_000, Ordering::Relaxed);
        assert_eq!(pick(&s, &p, 0, "m", 30, Some(&v), &rr, &rng).unwrap(), 1);
        // Nothing timed anywhere yet (a fresh start): load decides, not a
        // cache whose worth can't be weighed yet.
        let q = pool(2);
        let (blocks, m) = prompt(&q, b'u', 100, &[(1, 100)]);
        let v = view(&blocks, &m);
        q[1].inflight.store(2, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(pick(&s, &q, 0, "m", 30, Some(&v), &rr, &rng).unwrap(), 0);
        }
    }

    #[test]
    fn the_prefix_index_is_sized_by_the_caches_within_a_cap() {
        let r = Registry::default();
        let p = pool(4);
        let s = BalanceSettings {
            prefix_cache_blocks: 1000,
            ..settings(Algorithm::PrefixAware)
        };
        let ix = r.prefix_index("c", &p, &s);
        assert_eq!(ix.index.capacity(), 16_384, "4 entries a block, rounded up");
        assert!(Arc::ptr_eq(&ix, &r.prefix_index("c", &p, &s)), "kept");
        // An engine reporting a bigger cache: a bigger table next time.
        p[0].cache_blocks.store(10_000, Ordering::Relaxed);
        assert_eq!(r.prefix_index("c", &p, &s).index.capacity(), 65_536);
        // However big the caches say they are, the table is capped.
        for b in &p {
            b.cache_blocks.store(u32::MAX, Ordering::Relaxed);
        }
        assert_eq!(
            r.prefix_index("c", &p, &s).index.capacity(),
            MAX_INDEX_SLOTS
        );
    }

    #[test]
    fn gie_prefix_adds_the_prefix_share_to_queue_and_kv() {
        let p = pool(2);
        p[0].report(Some(0), Some(4), Some(0.2));
        p[1].report(Some(3), Some(4), Some(0.2));
        let (rr, rng) = (Cell::new(0), Rng::new(3));
        // Queue alone: 0 (score 2 + 1.6 vs 0 + 1.6).
        assert_eq!(
            pick(&settings(Algorithm::GieLike), &p, 0, "", 0, None, &rr, &rng).unwrap(),
            0
        );
        // 1 holds the whole prompt: 3 × 1 outweighs the queue's 2.
        let (blocks, m) = prompt(&p, b'g', 20, &[(1, 20)]);
        let s = settings(Algorithm::GiePrefix);
        assert_eq!(
            pick(&s, &p, 0, "", 0, Some(&view(&blocks, &m)), &rr, &rng).unwrap(),
            1
        );
        // Half of it: 1.5 < 2: back to 0.
        let (blocks, m) = prompt(&p, b'h', 20, &[(1, 10)]);
        assert_eq!(
            pick(&s, &p, 0, "", 0, Some(&view(&blocks, &m)), &rr, &rng).unwrap(),
            0
        );
    }

    #[test]
    fn a_shared_prefix_goes_home_where_no_gateway_has_sent_it() {
        // Two gateways' indexes, each knowing only its own sends: one never
        // sent the prefix, the other sent it home. Both send it home.
        let p = pool(4);
        for b in &p {
            b.service_ns.store(10_000_000, Ordering::Relaxed);
            b.prefill_ns.store(50_000, Ordering::Relaxed);
        }
        let s = settings(Algorithm::PrefixAware);
        let (rr, rng) = (Cell::new(0), Rng::new(11));
        let (blocks, _) = prompt(&p, b'w', 40, &[]);
        let cand: Vec<usize> = (0..4).collect();
        let home = prefix::home(&blocks, &addrs(&p), &[1.0; 4], &cand).unwrap();
        for held in [vec![], vec![(home, 40)]] {
            let (blocks, m) = prompt(&p, b'w', 40, &held);
            assert_eq!(
                pick(&s, &p, 0, "m", 0, Some(&view(&blocks, &m)), &rr, &rng).unwrap(),
                home
            );
        }
        // Sent elsewhere once and evicted there since (that cache allocated
        // more than it holds): held nowhere, so home again.
        let other = (home + 1) % 4;
        let holders = || p.iter().map(|b| b.holder(1 << 14)).collect::<Vec<_>>();
        let ix = prefix::PrefixIndex::new(1 << 12);
        ix.insert(&blocks, &holders(), other, p[other].allocate(40));
        assert_eq!(ix.matches(&blocks, &holders()).per_backend[other], 40);
        p[other].allocate(1 << 14);
        let m = ix.matches(&blocks, &holders());
        assert_eq!((m.longest, m.anchor_seen), (0, true));
        assert_eq!(
            pick(&s, &p, 0, "m", 0, Some(&view(&blocks, &m)), &rr, &rng).unwrap(),
            home
        );
    }
}
