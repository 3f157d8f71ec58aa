//! The rate-limit stage: token buckets (GCRA) at several levels at once —
//! principal, tenant, route, model, client address — on request counts and
//! on cost (estimated tokens), concurrency limits, day/month quotas per
//! tenant, escalation of repeat offenders to the XDP blocklist, and (with
//! Redis) tenant and model limits shared by a fleet of gateways.
//!
//! State is process-wide and survives config reloads ([`Limiter`]); the
//! limits themselves are per configuration generation ([`Policies`]). Every
//! key's bucket is one `AtomicU64` (its theoretical arrival time), updated
//! by compare-and-swap: exact across workers, no lock beyond the map shard's
//! read lock on the lookup.

pub use crate::config::ratelimit as config;
pub mod quota;
pub mod redis;
pub mod usage;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

pub use config::{FailMode, HeaderStyle, LimitSettings, RateLimitSettings};
use quota::{QuotaLimits, QuotaState};

/// The levels, in the order a request is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ip = 0,
    Principal = 1,
    Tenant = 2,
    Route = 3,
    Model = 4,
}

pub const LEVELS: [Level; 5] = [
    Level::Ip,
    Level::Principal,
    Level::Tenant,
    Level::Route,
    Level::Model,
];

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ip => "ip",
            Level::Principal => "principal",
            Level::Tenant => "tenant",
            Level::Route => "route",
            Level::Model => "model",
        }
    }

    /// Shared through Redis when it is configured.
    pub fn synced(self) -> bool {
        matches!(self, Level::Tenant | Level::Model)
    }
}

/// A GCRA bucket shape: one unit every `t_ns`, `burst` units at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub t_ns: u64,
    pub burst: u64,
    pub tau_ns: u64,
}

impl Gcra {
    /// `rate` units per `per`, `burst` at once (0: one `per`'s worth, at least 1).
    pub fn new(rate: f64, per: Duration, burst: u64) -> Option<Gcra> {
        if rate <= 0.0 {
            return None;
        }
        let t_ns = ((per.as_nanos() as f64 / rate).round() as u64).max(1);
        let burst = if burst == 0 {
            (rate.ceil() as u64).max(1)
        } else {
            burst
        };
        Some(Gcra {
            t_ns,
            burst,
            tau_ns: t_ns.saturating_mul(burst),
        })
    }

    /// Seconds to refill the whole burst: the `w` of the policy header.
    pub fn window_s(&self) -> u64 {
        self.tau_ns.div_ceil(1_000_000_000).max(1)
    }

    /// Take `cost` units (capped at the burst: a bigger request needs a full
    /// bucket rather than never passing). Ok(remaining units, ns until full)
    /// or Err(ns until it would pass).
    #[inline]
    pub fn take(&self, cell: &AtomicU64, cost: u64, now: u64) -> Result<(u64, u64), u64> {
        let inc = cost.min(self.burst).saturating_mul(self.t_ns);
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now).saturating_add(inc);
            let ahead = new - now;
            if ahead > self.tau_ns {
                return Err(ahead - self.tau_ns);
            }
            match cell.compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(((self.tau_ns - ahead) / self.t_ns, ahead)),
                Err(x) => tat = x,
            }
        }
    }

    /// What [`Gcra::take`] would answer for `cost` now, without taking:
    /// `Some(ns until it would pass)` when it would refuse.
    #[inline]
    pub fn would_wait(&self, cell: &AtomicU64, cost: u64, now: u64) -> Option<u64> {
        let inc = cost.min(self.burst).saturating_mul(self.t_ns);
        let ahead = cell.load(Ordering::Relaxed).max(now).saturating_add(inc) - now;
        (ahead > self.tau_ns).then(|| ahead - self.tau_ns)
    }

    /// Give back (or charge more than) what was taken: `units` may be negative.
    pub fn adjust(&self, cell: &AtomicU64, units: i64) {
        let d = units.unsigned_abs().saturating_mul(self.t_ns);
        if units >= 0 {
            cell.fetch_add(d, Ordering::AcqRel);
        } else {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(d))
            });
        }
    }
}

/// One level's limits, resolved.
#[derive(Debug, Clone, Default)]
pub struct LevelPolicy {
    pub requests: Option<Gcra>,
    pub tokens: Option<Gcra>,
    pub concurrency: u32,
    pub quota: QuotaLimits,
    pub fail_closed: bool,
    /// Streams are ended when their output passes this level's token budget.
    pub cut_streams: bool,
}

impl LevelPolicy {
    fn new(s: &LimitSettings) -> LevelPolicy {
        LevelPolicy {
            requests: Gcra::new(s.requests_per_second, Duration::from_secs(1), s.burst),
            tokens: Gcra::new(s.tokens_per_minute, Duration::from_secs(60), s.token_burst),
            concurrency: s.concurrency,
            quota: QuotaLimits {
                requests_per_day: s.requests_per_day,
                tokens_per_day: s.tokens_per_day,
                requests_per_month: s.requests_per_month,
                tokens_per_month: s.tokens_per_month,
            },
            fail_closed: s.on_redis_failure == FailMode::Closed,
            cut_streams: s.cut_streams,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct ClassPolicy {
    principal: Option<LevelPolicy>,
    tenant: Option<LevelPolicy>,
}

/// The limits of one configuration generation.
#[derive(Debug, Clone)]
pub struct Policies {
    levels: [Option<LevelPolicy>; 5],
    models: HashMap<String, LevelPolicy>,
    classes: HashMap<String, ClassPolicy>,
    tenant_class: HashMap<String, String>,
    default_class: Option<String>,
    weights: HashMap<String, f64>,
    pub default_max_tokens: u64,
    pub correct_from_usage: bool,
    pub headers: HeaderStyle,
    pub headers_on_success: bool,
    escalation: Option<config::EscalationSettings>,
    /// Some level limits cost (tokens): requests are charged their estimate.
    pub counts_tokens: bool,
}

impl Policies {
    pub fn new(s: &RateLimitSettings) -> Policies {
        let lp = |l: &Option<LimitSettings>| l.as_ref().map(LevelPolicy::new);
        let mut p = Policies {
            levels: [
                lp(&s.ip),
                lp(&s.principal),
                lp(&s.tenant),
                lp(&s.route),
                lp(&s.model),
            ],
            models: s
                .models
                .iter()
                .map(|(m, l)| (m.clone(), LevelPolicy::new(l)))
                .collect(),
            classes: s
                .classes
                .iter()
                .map(|(c, cs)| {
                    (
                        c.clone(),
                        ClassPolicy {
                            principal: lp(&cs.principal),
                            tenant: lp(&cs.tenant),
                        },
                    )
                })
                .collect(),
            tenant_class: s.tenant_classes.clone().into_iter().collect(),
            default_class: (!s.default_class.is_empty()).then(|| s.default_class.clone()),
            weights: s.cost.model_weights.clone().into_iter().collect(),
            default_max_tokens: s.cost.default_max_tokens,
            correct_from_usage: s.cost.correct_from_usage,
            headers: s.headers,
            headers_on_success: s.headers_on_success,
            escalation: s.escalation.enabled.then(|| s.escalation.clone()),
            counts_tokens: false,
        };
        p.counts_tokens = p.any_token_limit();
        p
    }

    /// Whether any token (cost) limit is configured, i.e. cost matters.
    fn any_token_limit(&self) -> bool {
        let any = |l: &Option<LevelPolicy>| {
            l.as_ref().is_some_and(|l| {
                l.tokens.is_some() || l.quota.tokens_per_day > 0 || l.quota.tokens_per_month > 0
            })
        };
        self.levels.iter().any(any)
            || self.models.values().any(|l| l.tokens.is_some())
            || self
                .classes
                .values()
                .any(|c| any(&c.principal) || any(&c.tenant))
    }

    /// A request's up-front cost in tokens: (prompt + output budget) × the model's weight.
    pub fn cost(&self, model: &str, prompt_tokens: u64, max_tokens: Option<u64>) -> u64 {
        let raw = prompt_tokens.saturating_add(max_tokens.unwrap_or(self.default_max_tokens));
        self.weigh(model, raw)
    }

    /// Tokens × the model's weight, at most [`MAX_COST`] (a client's
    /// `max_tokens` must not overflow a counter).
    pub fn weigh(&self, model: &str, tokens: u64) -> u64 {
        let t = match self.weights.get(model) {
            Some(w) => (tokens as f64 * w).ceil() as u64,
            None => tokens,
        };
        t.min(MAX_COST)
    }

    fn level(&self, level: Level, s: &Subject<'_>) -> Option<&LevelPolicy> {
        let class = || {
            if self.classes.is_empty() {
                return None;
            }
            self.tenant_class
                .get(s.tenant)
                .or(self.default_class.as_ref())
                .and_then(|c| self.classes.get(c))
        };
        match level {
            Level::Principal if !s.principal.is_empty() => class()
                .and_then(|c| c.principal.as_ref())
                .or(self.levels[1].as_ref()),
            Level::Tenant if !s.tenant.is_empty() => class()
                .and_then(|c| c.tenant.as_ref())
                .or(self.levels[2].as_ref()),
            Level::Principal | Level::Tenant => None,
            Level::Model if s.model.is_empty() => None,
            Level::Model => self.models.get(s.model).or(self.levels[4].as_ref()),
            Level::Ip => self.levels[0].as_ref(),
            Level::Route => self.levels[3].as_ref(),
        }
    }
}

/// Who and what a request is, for the limiter.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub ip: IpAddr,
    pub principal: &'a str,
    pub tenant: &'a str,
    pub route: &'a str,
    pub model: &'a str,
    /// Up-front cost in tokens (0: the request has none, e.g. not an OpenAI body).
    pub tokens: u64,
}

impl Subject<'_> {
    /// The address level's key: 4 bytes for IPv4 (also IPv4-mapped), 16 for IPv6.
    fn ip_key(&self, buf: &mut [u8; 16]) -> usize {
        match crate::xdp::canonical(self.ip) {
            IpAddr::V4(a) => {
                buf[..4].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                buf.copy_from_slice(&a.octets());
                16
            }
        }
    }

    fn key_str(&self, level: Level) -> &str {
        match level {
            Level::Ip => "",
            Level::Principal => self.principal,
            Level::Tenant => self.tenant,
            Level::Route => self.route,
            Level::Model => self.model,
        }
    }
}

/// The largest cost one request is charged (2^40 tokens): sums of such
/// charges stay far from u64 and i64 overflow.
pub const MAX_COST: u64 = 1 << 40;

/// Slots for the distinct well-behaved principals seen from one address.
const GOOD_SLOTS: usize = 8;

/// One key's state at one level.
#[derive(Debug, Default)]
pub struct KeyState {
    /// Theoretical arrival times (ns on the limiter's clock) of the request and token buckets.
    req: AtomicU64,
    tok: AtomicU64,
    inflight: AtomicU32,
    /// Synced levels: bucket increments (ns) taken here and not yet pushed to Redis.
    pending_req: AtomicI64,
    pending_tok: AtomicI64,
    /// Last time this key had something to push (ns).
    touched: AtomicU64,
    /// Escalation (address level): refusals in the current window, its end,
    /// the offences so far, and hashes of well-behaved principals.
    refusals: AtomicU32,
    window_end: AtomicU64,
    offences: AtomicU32,
    good: [AtomicU64; GOOD_SLOTS],
    /// Not forgotten (swept) before this time (ns).
    keep_until: AtomicU64,
}

impl KeyState {
    fn idle(&self, now: u64) -> bool {
        self.req.load(Ordering::Relaxed) <= now
            && self.tok.load(Ordering::Relaxed) <= now
            && self.inflight.load(Ordering::Relaxed) == 0
            && self.pending_req.load(Ordering::Relaxed) == 0
            && self.pending_tok.load(Ordering::Relaxed) == 0
            && self.keep_until.load(Ordering::Relaxed) <= now
    }
}

/// A key's state while a decision uses it: a read guard on its map shard
/// (no reference-count traffic on the hot path), or the overflow bucket.
enum Held<'a> {
    Map(dashmap::mapref::one::Ref<'a, Box<[u8]>, Arc<KeyState>>),
    Own(Arc<KeyState>),
}

impl std::ops::Deref for Held<'_> {
    type Target = KeyState;
    fn deref(&self) -> &KeyState {
        match self {
            Held::Map(r) => r.value(),
            Held::Own(a) => a,
        }
    }
}

impl Held<'_> {
    /// The bucket shared by keys beyond `max_keys`: never escalated on.
    fn is_overflow(&self) -> bool {
        matches!(self, Held::Own(_))
    }

    /// A reference that outlives the decision (concurrency slots, cost correction).
    fn arc(&self) -> Arc<KeyState> {
        match self {
            Held::Map(r) => r.value().clone(),
            Held::Own(a) => a.clone(),
        }
    }
}

/// What each level has taken so far in one decision (its key, the request
/// and token buckets), to give back if a later level refuses.
type Taken<'a> = [TakenSlot<'a>; 5];

/// One level's entry in [`Taken`].
type TakenSlot<'a> = (Option<Held<'a>>, Option<Gcra>, Option<Gcra>);

/// Keeps `shown` as the policy to show when its `share` left (per million)
/// is the smallest so far.
#[inline]
fn keep_most_restrictive(best: &mut Option<(u64, Shown)>, share: u64, shown: Shown) {
    if best.is_none_or(|(b, _)| share < b) {
        *best = Some((share, shown));
    }
}

/// The request-rate check of one level: `Ok` once one request is taken
/// (pending for Redis when `sync`, its policy offered to `best`), or the
/// refusal with the time to retry.
#[inline]
fn take_request(
    st: &KeyState,
    g: Gcra,
    level: Level,
    now: u64,
    sync: bool,
    best: &mut Option<(u64, Shown)>,
) -> Result<(), Refusal> {
    match g.take(&st.req, 1, now) {
        Ok((remaining, ahead)) => {
            if sync {
                st.pending_req.fetch_add(g.t_ns as i64, Ordering::Relaxed);
                st.touched.store(now, Ordering::Relaxed);
            }
            let shown = Shown {
                level,
                window: "",
                quota: g.burst,
                window_s: g.window_s(),
                remaining,
                reset_s: ahead.div_ceil(1_000_000_000),
            };
            // The most restrictive: the smallest share left.
            let share = remaining * 1_000_000 / g.burst.max(1);
            keep_most_restrictive(best, share, shown);
            Ok(())
        }
        Err(wait) => Err(over_request_rate(
            level,
            g,
            wait.div_ceil(1_000_000_000).max(1),
        )),
    }
}

/// A request-rate refusal at `level`: retry in `retry` seconds, nothing left.
#[inline]
fn over_request_rate(level: Level, g: Gcra, retry: u64) -> Refusal {
    Refusal {
        level,
        limit: Limit::Requests,
        retry_after_s: retry,
        shown: Some(Shown {
            level,
            window: "",
            quota: g.burst,
            window_s: g.window_s(),
            remaining: 0,
            reset_s: retry,
        }),
    }
}

/// The token-rate check of one level: `Ok` once `tokens` are taken
/// (pending for Redis when `sync`), or the refusal with the time to retry.
#[inline]
fn take_tokens(
    st: &KeyState,
    g: Gcra,
    tokens: u64,
    level: Level,
    now: u64,
    sync: bool,
) -> Result<(), Refusal> {
    match g.take(&st.tok, tokens, now) {
        Ok(_) => {
            if sync {
                st.pending_tok
                    .fetch_add((tokens.min(g.burst) * g.t_ns) as i64, Ordering::Relaxed);
                st.touched.store(now, Ordering::Relaxed);
            }
            Ok(())
        }
        Err(wait) => Err(Refusal {
            level,
            limit: Limit::Tokens,
            retry_after_s: wait.div_ceil(1_000_000_000).max(1),
            shown: None,
        }),
    }
}

/// The concurrency check of one level: the slot taken (released when the
/// admission drops), or the refusal when `limit` are already in flight.
#[inline]
fn take_slot(st: &Held<'_>, limit: u32, level: Level) -> Result<Arc<KeyState>, Refusal> {
    let n = st.inflight.fetch_add(1, Ordering::AcqRel);
    if n >= limit {
        st.inflight.fetch_sub(1, Ordering::AcqRel);
        return Err(Refusal {
            level,
            limit: Limit::Concurrency,
            retry_after_s: 1,
            shown: None,
        });
    }
    Ok(st.arc())
}

/// The keys of one level.
type MapHasher = foldhash::fast::RandomState;

struct LevelMap {
    map: DashMap<Box<[u8]>, Arc<KeyState>, MapHasher>,
    /// Shared by new keys once `max_keys` are tracked.
    overflow: Arc<KeyState>,
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    Concurrency,
    RequestsPerDay,
    TokensPerDay,
    RequestsPerMonth,
    TokensPerMonth,
    /// A fail-closed level while Redis is unreachable.
    Unavailable,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrency => "concurrency",
            Limit::RequestsPerDay => "requests_per_day",
            Limit::TokensPerDay => "tokens_per_day",
            Limit::RequestsPerMonth => "requests_per_month",
            Limit::TokensPerMonth => "tokens_per_month",
            Limit::Unavailable => "redis_unavailable",
        }
    }
}

/// What a client is told about one policy (the headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub level: Level,
    /// Policy name suffix: "" (requests), "day", "month".
    pub window: &'static str,
    pub quota: u64,
    pub window_s: u64,
    pub remaining: u64,
    pub reset_s: u64,
}

impl Shown {
    fn name(&self, out: &mut String) {
        out.push_str(self.level.as_str());
        if !self.window.is_empty() {
            out.push('-');
            out.push_str(self.window);
        }
    }

    /// The header lines (each ending in CRLF) for `style`.
    pub fn write_headers(&self, style: HeaderStyle, out: &mut String) {
        match style {
            HeaderStyle::None => {}
            HeaderStyle::Ietf => {
                out.push_str("ratelimit-policy: \"");
                self.name(out);
                let _ = write!(
                    out,
                    "\";q={};w={}\r\nratelimit: \"",
                    self.quota, self.window_s
                );
                self.name(out);
                let _ = write!(out, "\";r={};t={}\r\n", self.remaining, self.reset_s);
            }
            HeaderStyle::XRatelimit => {
                let _ = write!(
                    out,
                    "x-ratelimit-limit: {}\r\nx-ratelimit-remaining: {}\r\nx-ratelimit-reset: {}\r\n",
                    self.quota, self.remaining, self.reset_s
                );
            }
        }
    }
}

/// A refusal: which level and limit, when to retry, what to show.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub level: Level,
    pub limit: Limit,
    pub retry_after_s: u64,
    pub shown: Option<Shown>,
}

impl Refusal {
    /// 429, or 503 when a fail-closed limit can't be checked.
    pub fn status(&self) -> u16 {
        if self.limit == Limit::Unavailable {
            503
        } else {
            429
        }
    }

    pub fn message(&self) -> &'static str {
        match self.limit {
            Limit::Requests => "too many requests: slow down and retry after the time given",
            Limit::Tokens => "token rate limit reached: slow down and retry after the time given",
            Limit::Concurrency => "too many requests in flight: wait for one to finish",
            Limit::RequestsPerDay | Limit::TokensPerDay => "daily quota used up",
            Limit::RequestsPerMonth | Limit::TokensPerMonth => "monthly quota used up",
            Limit::Unavailable => "rate limiting is temporarily unavailable; retry shortly",
        }
    }
}

/// An admitted request's hold on the limiter: its concurrency slots (given
/// back on drop) and what it was charged (corrected from real usage).
#[derive(Default)]
pub struct Admission {
    /// By level: no allocation per request.
    slots: [Option<Arc<KeyState>>; 5],
    charged: [Option<(Arc<KeyState>, Gcra)>; 5],
    quota: Option<Arc<QuotaState>>,
    /// Tokens charged up front (0: cost not counted).
    pub tokens: u64,
    /// Levels (bit per [`Level`]) whose token budget ends a stream that
    /// outgrows it (`cut_streams`), and the tenant's token quotas, if they do.
    cut: u8,
    cut_quota: Option<QuotaLimits>,
    /// The most restrictive request-rate policy, for the response headers.
    pub shown: Option<Shown>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        for s in self.slots.iter().flatten() {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Process-wide limiter state.
pub struct Limiter {
    epoch: Instant,
    levels: [LevelMap; 5],
    max_keys: usize,
    hasher: std::collections::hash_map::RandomState,
    pub quotas: quota::Quotas,
    /// Tokens served per tenant and model since the start (`GET /usage`).
    pub usage: usage::Book,
    /// Redis reachable (always true without Redis).
    pub redis_up: AtomicBool,
    pub redis_configured: AtomicBool,
    front_door: Option<Arc<crate::xdp::FrontDoor>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    state_file: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl Limiter {
    pub fn new(
        s: &RateLimitSettings,
        front_door: Option<Arc<crate::xdp::FrontDoor>>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Limiter {
        let lm = || LevelMap {
            map: DashMap::with_hasher(MapHasher::default()),
            overflow: Arc::new(KeyState::default()),
        };
        Limiter {
            epoch: Instant::now(),
            levels: [lm(), lm(), lm(), lm(), lm()],
            max_keys: s.max_keys,
            hasher: Default::default(),
            quotas: quota::Quotas::new(s.max_keys),
            usage: usage::Book::default(),
            redis_up: AtomicBool::new(true),
            redis_configured: AtomicBool::new(!s.redis.address.is_empty()),
            front_door,
            metrics,
            state_file: std::sync::Mutex::new(None),
        }
    }

    /// The process's limiter: quotas loaded from the state file, the
    /// maintenance thread (sweep, gauges, persistence) and, with Redis, the
    /// sync thread started.
    pub fn start(
        r: &crate::config::Checked,
        front_door: Arc<crate::xdp::FrontDoor>,
        metrics: Arc<crate::metrics::Metrics>,
        shutdown: Arc<crate::shutdown::Shutdown>,
    ) -> Result<Arc<Limiter>, String> {
        let s = &r.config.ratelimit;
        let l = Arc::new(Limiter::new(s, Some(front_door), Some(metrics.clone())));
        if !s.state_file.as_os_str().is_empty() {
            let n = l
                .quotas
                .load(&s.state_file, quota::now_unix())
                .map_err(|e| {
                    format!(
                        "cannot read the quota state file {}: {e} (move it away to start with empty quotas)",
                        s.state_file.display()
                    )
                })?;
            tracing::info!(file = %s.state_file.display(), tenants = n, "quota counts restored");
            *l.state_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.state_file.clone());
        }
        let persist_every = s.persist_interval.max(Duration::from_secs(1));
        let me = l.clone();
        std::thread::Builder::new()
            .name("ratelimit".into())
            .spawn(move || {
                let mut last_save = Instant::now();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    me.sweep();
                    if let Some(m) = &me.metrics {
                        for (level, n) in me.tracked() {
                            m.ratelimit_tracked
                                .with_label_values(&[level.as_str()])
                                .set(n as i64);
                        }
                    }
                    if last_save.elapsed() >= persist_every {
                        me.persist();
                        last_save = Instant::now();
                    }
                }
            })
            .map_err(|e| format!("cannot start the rate-limit thread: {e}"))?;
        if !s.redis.address.is_empty() {
            redis::spawn(l.clone(), s.redis.clone(), metrics, shutdown)
                .map_err(|e| format!("cannot start the Redis sync thread: {e}"))?;
        }
        Ok(l)
    }

    /// Write the quota counts to the state file (when one is configured).
    pub fn persist(&self) {
        let path = self
            .state_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(p) = path {
            if let Err(e) = self.quotas.save(&p) {
                tracing::error!(file = %p.display(), error = %e, "cannot save quota counts");
            }
        }
    }

    /// Nanoseconds on the limiter's clock.
    #[inline]
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn state(&self, level: Level, key: &[u8]) -> Held<'_> {
        let lm = &self.levels[level as usize];
        if let Some(s) = lm.map.get(key) {
            return Held::Map(s);
        }
        if lm.map.len() >= self.max_keys {
            return Held::Own(lm.overflow.clone());
        }
        Held::Map(lm.map.entry(key.into()).or_default().downgrade())
    }

    fn key_state(&self, level: Level, s: &Subject<'_>) -> Held<'_> {
        if level == Level::Ip {
            let mut b = [0u8; 16];
            let n = s.ip_key(&mut b);
            return self.state(level, &b[..n]);
        }
        self.state(level, s.key_str(level).as_bytes())
    }

    /// Before the request body is read: the refusal [`Limiter::admit_at`]
    /// would give for the request rate of a level that doesn't depend on the
    /// body (ip, principal, tenant, route), for keys already tracked — only
    /// while every level before it has nothing but a request rate (otherwise
    /// the full check might refuse earlier, for another reason). Charges
    /// nothing, so the full check still runs once the body is validated; a
    /// refusal here is exactly the one the full check would give (escalation
    /// counted the same way), minus reading and checking the body.
    pub fn refuse_early(&self, p: &Policies, s: &Subject<'_>, at: Instant) -> Option<Refusal> {
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        let redis_down =
            self.redis_configured.load(Ordering::Relaxed) && !self.redis_up.load(Ordering::Relaxed);
        for level in LEVELS {
            if level == Level::Model {
                continue;
            }
            let Some(lp) = p.level(level, s) else {
                continue;
            };
            if redis_down && lp.fail_closed && level.synced() {
                return None; // the full check answers 503 here
            }
            let Some(g) = lp.requests else {
                if lp.tokens.is_some() || lp.concurrency > 0 {
                    return None;
                }
                continue;
            };
            let mut ip = [0u8; 16];
            let key: &[u8] = if level == Level::Ip {
                let n = s.ip_key(&mut ip);
                &ip[..n]
            } else {
                s.key_str(level).as_bytes()
            };
            let wait = {
                let Some(st) = self.levels[level as usize].map.get(key) else {
                    continue;
                };
                g.would_wait(&st.req, 1, now)
            };
            let Some(wait) = wait else {
                // The full check goes on to this level's cost, concurrency
                // and quota, unknown here (or not peeked): a refusal there
                // would come first, with its own code and escalation rule.
                // Only answer early what the full check would answer.
                if lp.tokens.is_some()
                    || lp.concurrency > 0
                    || (level == Level::Tenant && lp.quota.any())
                {
                    return None;
                }
                continue;
            };
            let retry = wait.div_ceil(1_000_000_000).max(1);
            if let Some(esc) = &p.escalation {
                // No map guard is held here (one lock order).
                let ip = self.key_state(Level::Ip, s);
                if !ip.is_overflow() {
                    self.note_refusal(esc, &ip, s, now);
                }
            }
            return Some(over_request_rate(level, g, retry));
        }
        None
    }

    /// Would `extra` tokens beyond what `a` was charged take its caller
    /// past a token budget that ends streams (`cut_streams`): a token rate
    /// with no room for them now, or a token quota with fewer left.
    pub fn stream_over_budget(&self, a: &Admission, extra: u64) -> bool {
        if extra == 0 {
            return false;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let rate = LEVELS.iter().any(|&l| {
            a.cut & (1 << l as u8) != 0
                && a.charged[l as usize]
                    .as_ref()
                    .is_some_and(|(st, g)| g.would_wait(&st.tok, extra, now).is_some())
        });
        let quota = match (&a.cut_quota, &a.quota) {
            (Some(l), Some(q)) => q.tokens_left(l).is_some_and(|left| left < extra),
            _ => false,
        };
        rate || quota
    }

    /// Whether the admission has a budget that can end its stream.
    pub fn cuts_streams(a: &Admission) -> bool {
        a.cut != 0 || a.cut_quota.is_some()
    }

    /// [`Limiter::admit_at`] now.
    pub fn admit(&self, p: &Policies, s: &Subject<'_>) -> Result<Admission, Refusal> {
        self.admit_at(p, s, Instant::now())
    }

    /// Check every level that applies; charge them all or none.
    /// `at` is when the request arrived (the pipeline has it already: no
    /// second clock read).
    pub fn admit_at(
        &self,
        p: &Policies,
        s: &Subject<'_>,
        at: Instant,
    ) -> Result<Admission, Refusal> {
        let now = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut a = Admission::default();
        a.tokens = s.tokens;
        let synced = self.redis_configured.load(Ordering::Relaxed);
        let redis_down = synced && !self.redis_up.load(Ordering::Relaxed);
        // Taken so far, to give back if a later level refuses.
        let mut taken: Taken<'_> = Default::default();
        let mut best: Option<(u64, Shown)> = None;
        let mut refusal = None;
        for level in LEVELS {
            let Some(lp) = p.level(level, s) else {
                continue;
            };
            if redis_down && lp.fail_closed && level.synced() {
                refusal = Some(Refusal {
                    level,
                    limit: Limit::Unavailable,
                    retry_after_s: 1,
                    shown: None,
                });
                break;
            }
            let st = self.key_state(level, s);
            let slot = &mut taken[level as usize];
            let charged =
                self.charge_level(level, lp, s, &st, now, synced, slot, &mut a, &mut best);
            slot.0 = Some(st);
            if let Err(r) = charged {
                refusal = Some(r);
                break;
            }
        }
        if let Some(r) = refusal {
            // Give back what was taken before the refusal (only successful
            // takes are recorded; the quota is charged last at its level).
            self.give_back_all(&taken, &mut a, s);
            // `a` drops here: its concurrency slots are released. Only the
            // client's own pace counts toward escalation: not a fail-closed
            // level while Redis is down, not a full concurrency slot.
            let ip = taken[Level::Ip as usize].0.take();
            drop(taken);
            self.count_refusal(p, s, &r, ip, now);
            return Err(r);
        }
        for (level, (st, _, tok)) in LEVELS.iter().zip(&taken) {
            if let (Some(st), Some(g)) = (st, tok) {
                a.charged[*level as usize] = Some((st.arc(), *g));
            }
        }
        if let Some(esc) = &p.escalation {
            let ip = taken[Level::Ip as usize].0.take();
            drop(taken);
            let ip = ip.unwrap_or_else(|| self.key_state(Level::Ip, s));
            if !ip.is_overflow() {
                self.note_good(esc, &ip, s.principal, now);
            }
        }
        a.shown = best.map(|b| b.1);
        Ok(a)
    }

    /// One level's checks and charges, in order (request rate, token rate,
    /// concurrency, the tenant's quota): `Ok` when all pass (what was taken
    /// recorded in `slot` and `a`), or the first refusal.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn charge_level(
        &self,
        level: Level,
        lp: &LevelPolicy,
        s: &Subject<'_>,
        st: &Held<'_>,
        now: u64,
        synced: bool,
        slot: &mut TakenSlot<'_>,
        a: &mut Admission,
        best: &mut Option<(u64, Shown)>,
    ) -> Result<(), Refusal> {
        let sync = synced && level.synced();
        if let Some(g) = lp.requests {
            take_request(st, g, level, now, sync, best)?;
            slot.1 = Some(g);
        }
        if let (Some(g), true) = (lp.tokens, s.tokens > 0) {
            take_tokens(st, g, s.tokens, level, now, sync)?;
            slot.2 = Some(g);
        }
        if lp.concurrency > 0 {
            a.slots[level as usize] = Some(take_slot(st, lp.concurrency, level)?);
        }
        if level == Level::Tenant && lp.quota.any() {
            self.charge_quota(&lp.quota, s, level, a, best)?;
            if lp.cut_streams {
                a.cut_quota = Some(lp.quota);
            }
        }
        if lp.cut_streams && lp.tokens.is_some() && s.tokens > 0 {
            a.cut |= 1 << level as u8;
        }
        Ok(())
    }

    /// The tenant's daily and monthly quotas: `Ok` once charged (the
    /// charge held in `a`, its policy offered to `best`), or the refusal.
    #[inline]
    fn charge_quota(
        &self,
        limits: &QuotaLimits,
        s: &Subject<'_>,
        level: Level,
        a: &mut Admission,
        best: &mut Option<(u64, Shown)>,
    ) -> Result<(), Refusal> {
        let q = self.quotas.state(s.tenant);
        match q.charge(limits, 1, s.tokens, quota::now_unix()) {
            Ok(shown) => {
                if let Some((rem, quota, window, window_s, reset_s)) = shown {
                    let share = rem * 1_000_000 / quota.max(1);
                    keep_most_restrictive(
                        best,
                        share,
                        Shown {
                            level,
                            window,
                            quota,
                            window_s,
                            remaining: rem,
                            reset_s,
                        },
                    );
                }
                a.quota = Some(q);
                Ok(())
            }
            Err((limit, retry, shown)) => Err(Refusal {
                level,
                limit,
                retry_after_s: retry,
                shown,
            }),
        }
    }

    /// After a refusal: gives back each level's request and token takes,
    /// then the tenant's quota charge.
    fn give_back_all(&self, taken: &Taken<'_>, a: &mut Admission, s: &Subject<'_>) {
        for (lvl, (st, req, tok)) in taken.iter().enumerate() {
            let Some(st) = st else { continue };
            if let Some(g) = req {
                self.give_back(st, g, true, 1, LEVELS[lvl]);
            }
            if let Some(g) = tok {
                self.give_back(st, g, false, s.tokens, LEVELS[lvl]);
            }
        }
        if let Some(q) = a.quota.take() {
            q.refund(1, s.tokens as i64);
        }
    }

    /// Counts refusal `r` toward the address's escalation when escalation is
    /// on and the refusal was the client's own pace.
    fn count_refusal<'a>(
        &'a self,
        p: &Policies,
        s: &Subject<'_>,
        r: &Refusal,
        ip: Option<Held<'a>>,
        now: u64,
    ) {
        if let (Some(esc), true) = (
            &p.escalation,
            !matches!(r.limit, Limit::Unavailable | Limit::Concurrency),
        ) {
            // No other map's guard is held here (one lock order).
            let ip = ip.unwrap_or_else(|| self.key_state(Level::Ip, s));
            if !ip.is_overflow() {
                self.note_refusal(esc, &ip, s, now);
            }
        }
    }

    fn give_back(&self, st: &KeyState, g: &Gcra, req: bool, units: u64, level: Level) {
        let units = units.min(g.burst) as i64;
        g.adjust(if req { &st.req } else { &st.tok }, -units);
        if level.synced() && self.redis_configured.load(Ordering::Relaxed) {
            let p = if req {
                &st.pending_req
            } else {
                &st.pending_tok
            };
            p.fetch_sub(units * g.t_ns as i64, Ordering::Relaxed);
        }
    }

    /// Correct an admission's token charge from what the backend reported it used.
    pub fn correct(&self, a: &Admission, actual_tokens: u64) {
        let delta = actual_tokens as i64 - a.tokens as i64;
        if delta == 0 || a.tokens == 0 {
            return;
        }
        let synced = self.redis_configured.load(Ordering::Relaxed);
        for (level, (st, g)) in LEVELS
            .iter()
            .zip(&a.charged)
            .filter_map(|(l, c)| Some((l, c.as_ref()?)))
        {
            // A bucket was charged at most its burst: settle against that.
            let d = actual_tokens.min(g.burst) as i64 - a.tokens.min(g.burst) as i64;
            g.adjust(&st.tok, d);
            if synced && level.synced() {
                st.pending_tok
                    .fetch_add(d * g.t_ns as i64, Ordering::Relaxed);
            }
        }
        if let Some(q) = &a.quota {
            q.refund(0, -delta);
        }
    }

    /// The request never reached a backend (no backend, shed, connect
    /// failures): its cost and its quota count go back.
    pub fn refund_unserved(&self, a: &Admission) {
        self.correct(a, 0);
        if let Some(q) = &a.quota {
            q.refund(1, 0);
        }
    }

    fn principal_hash(&self, p: &str) -> u64 {
        self.hasher.hash_one(p) | 1
    }

    /// An admitted principal from this address counts as well-behaved.
    fn note_good(
        &self,
        esc: &config::EscalationSettings,
        ip: &KeyState,
        principal: &str,
        now: u64,
    ) {
        if principal.is_empty() || esc.max_good_principals == 0 {
            return;
        }
        let h = self.principal_hash(principal);
        if ip.good.iter().any(|g| g.load(Ordering::Relaxed) == h) {
            return;
        }
        for g in &ip.good {
            if g.compare_exchange(0, h, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                ip.keep_until
                    .fetch_max(now + 600_000_000_000, Ordering::Relaxed);
                return;
            }
        }
    }

    fn note_refusal(
        &self,
        esc: &config::EscalationSettings,
        ip: &KeyState,
        s: &Subject<'_>,
        now: u64,
    ) {
        if !s.principal.is_empty() {
            let h = self.principal_hash(s.principal);
            for g in &ip.good {
                let _ = g.compare_exchange(h, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        let window = esc.window.as_nanos() as u64;
        let end = ip.window_end.load(Ordering::Acquire);
        let n = if now >= end {
            ip.window_end.store(now + window, Ordering::Release);
            ip.refusals.store(1, Ordering::Release);
            1
        } else {
            ip.refusals.fetch_add(1, Ordering::AcqRel) + 1
        };
        ip.keep_until.fetch_max(now + window, Ordering::Relaxed);
        if n != esc.refusals {
            return;
        }
        // Exactly one refusal crosses the threshold per window: it escalates.
        let good = ip
            .good
            .iter()
            .filter(|g| g.load(Ordering::Relaxed) != 0)
            .count() as u32;
        let count = |result: &str| {
            if let Some(m) = &self.metrics {
                m.ratelimit_escalations.with_label_values(&[result]).inc();
            }
        };
        let Some(fd) = &self.front_door else { return };
        if fd.allowlisted(s.ip) {
            tracing::info!(target: "audit", event = "escalation_skipped", client = %s.ip, reason = "allowlisted", refusals = n, "repeat offender not blocked: address is allowlisted");
            count("allowlisted");
            return;
        }
        if good >= esc.max_good_principals {
            tracing::info!(target: "audit", event = "escalation_skipped", client = %s.ip, reason = "shared_address", good_principals = good, refusals = n, "repeat offender not blocked: the address also carries well-behaved principals");
            count("shared_address");
            return;
        }
        let offences = ip.offences.fetch_add(1, Ordering::AcqRel);
        let ttl = esc
            .block_ttl
            .saturating_mul(1u32 << offences.min(20))
            .min(esc.max_block_ttl);
        ip.keep_until
            .fetch_max(now + (ttl.as_nanos() as u64) * 4, Ordering::Relaxed);
        match fd.block(s.ip, Some(ttl), gateway_common::BlockReason::RateLimit) {
            Ok(_) => {
                tracing::warn!(target: "audit", event = "escalation", client = %s.ip, principal = s.principal, refusals = n,
                    window_s = esc.window.as_secs_f64(), offence = offences + 1, ttl_s = ttl.as_secs(), "repeat offender blocked at the NIC");
                count("blocked");
            }
            Err(e) => {
                tracing::warn!(target: "audit", event = "escalation_failed", client = %s.ip, error = %e, "could not block a repeat offender");
                count("error");
            }
        }
    }

    /// Forget idle keys (full buckets, nothing in flight or unsynced). Run every second.
    pub fn sweep(&self) {
        let now = self.now();
        for lm in &self.levels {
            lm.map
                .retain(|_, s| Arc::strong_count(s) > 1 || !s.idle(now));
        }
        self.quotas.sweep(quota::now_unix());
    }

    /// Keys tracked per level (for the gauge).
    pub fn tracked(&self) -> [(Level, usize); 5] {
        LEVELS.map(|l| (l, self.levels[l as usize].map.len()))
    }

    /// For Redis sync: every key of the synced levels with something to
    /// push or touched within `recent` ns, as (level, key, state).
    pub fn synced_keys(&self, recent: u64) -> Vec<(Level, Vec<u8>, Arc<KeyState>)> {
        let now = self.now();
        let mut v = Vec::new();
        for level in [Level::Tenant, Level::Model] {
            for e in self.levels[level as usize].map.iter() {
                let s = e.value();
                if s.pending_req.load(Ordering::Relaxed) != 0
                    || s.pending_tok.load(Ordering::Relaxed) != 0
                    || now.saturating_sub(s.touched.load(Ordering::Relaxed)) < recent
                {
                    v.push((level, e.key().to_vec(), s.clone()));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(principal: &'a str, tenant: &'a str) -> Subject<'a> {
        Subject {
            ip: "10.0.0.1".parse().unwrap(),
            principal,
            tenant,
            route: "r",
            model: "m",
            tokens: 0,
        }
    }

    fn settings(toml_text: &str) -> RateLimitSettings {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn gcra_burst_then_rate() {
        let g = Gcra::new(10.0, Duration::from_secs(1), 5).unwrap();
        let cell = AtomicU64::new(0);
        let now = 1_000_000_000;
        for i in 0..5 {
            let (rem, _) = g.take(&cell, 1, now).unwrap();
            assert_eq!(rem, 4 - i);
        }
        let wait = g.take(&cell, 1, now).unwrap_err();
        assert_eq!(wait, 100_000_000, "one emission interval");
        // 100 ms later exactly one more fits.
        assert!(g.take(&cell, 1, now + 100_000_000).is_ok());
        assert!(g.take(&cell, 1, now + 100_000_000).is_err());
    }

    #[test]
    fn gcra_cost_is_capped_at_burst_and_adjustable() {
        let g = Gcra::new(600.0, Duration::from_secs(60), 100).unwrap();
        let cell = AtomicU64::new(0);
        let now = 10_000_000_000;
        // A request bigger than the burst needs a full bucket, not never.
        assert!(g.take(&cell, 1000, now).is_ok());
        assert!(g.take(&cell, 1, now).is_err());
        // Giving back 50 units lets 50 through.
        g.adjust(&cell, -50);
        assert!(g.take(&cell, 50, now).is_ok());
        assert!(g.take(&cell, 1, now).is_err());
    }

    #[test]
    fn levels_combine_and_refusal_gives_back() {
        let s = settings(
            "[principal]\nrequests_per_second = 0.001\nburst = 1000\n[tenant]\nrequests_per_second = 1\nburst = 2\n",
        );
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        assert!(l.admit(&p, &subject("a", "t")).is_ok());
        assert!(l.admit(&p, &subject("b", "t")).is_ok());
        let r = l
            .admit(&p, &subject("a", "t"))
            .err()
            .expect("tenant refuses");
        assert_eq!((r.level, r.limit), (Level::Tenant, Limit::Requests));
        assert_eq!(r.status(), 429);
        // Another tenant is unaffected; the principal level got its unit back.
        assert!(l.admit(&p, &subject("a", "u")).is_ok());
        let st = l.key_state(Level::Principal, &subject("a", "t"));
        let g = p.levels[1].as_ref().unwrap().requests.unwrap();
        let (rem, _) = g.take(&st.req, 1, l.now()).unwrap();
        assert_eq!(
            rem,
            1000 - 3,
            "a:t ok, a:u ok, the refused one given back, this one"
        );
    }

    /// The check before the body: refuses exactly when the request-rate
    /// bucket of a caller-only level is empty, and charges nothing.
    #[test]
    fn early_refusal_peeks_without_charging() {
        let s = settings(
            "[tenant]\nrequests_per_second = 0.001\nburst = 2\n[model]\nrequests_per_second = 0.001\nburst = 1\n",
        );
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        let now = Instant::now();
        // Unknown keys: nothing to refuse yet.
        assert!(l.refuse_early(&p, &subject("a", "t"), now).is_none());
        assert!(l.admit_at(&p, &subject("a", "t"), now).is_ok());
        // Peeking many times takes nothing: one more request still passes.
        for _ in 0..5 {
            assert!(l.refuse_early(&p, &subject("a", "t"), now).is_none());
        }
        // (The pipeline passes the request's arrival time to both checks.)
        // The model level (known only after validation) is left to the full check.
        let r = l
            .admit_at(&p, &subject("a", "t"), now)
            .err()
            .expect("model refuses");
        assert_eq!(r.level, Level::Model);
        let mut other_model = subject("a", "t");
        other_model.model = "n";
        assert!(l.admit_at(&p, &other_model, now).is_ok());
        let r = l
            .refuse_early(&p, &subject("b", "t"), now)
            .expect("tenant bucket empty");
        assert_eq!(
            (r.level, r.limit, r.status()),
            (Level::Tenant, Limit::Requests, 429)
        );
        assert!(r.retry_after_s >= 1);
        assert!(l.refuse_early(&p, &subject("b", "u"), now).is_none());
    }

    /// Early refusals are only the ones the full check would give: behind a
    /// level with a concurrency or token limit (not peeked) nothing is
    /// answered early.
    #[test]
    fn early_refusal_stops_behind_limits_it_cannot_peek() {
        let s = settings(
            "[principal]\nconcurrency = 1\n[route]\nrequests_per_second = 0.001\nburst = 1\n",
        );
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        let now = Instant::now();
        let held = l.admit_at(&p, &subject("a", "t"), now).expect("first");
        // The route bucket is empty now, but the full check refuses at the
        // principal's concurrency first (a code that is never escalated).
        assert!(l.refuse_early(&p, &subject("a", "t"), now).is_none());
        let r = l.admit_at(&p, &subject("a", "t"), now).err().unwrap();
        assert_eq!(r.limit, Limit::Concurrency);
        drop(held);
    }

    #[test]
    fn classes_override_levels() {
        let s = settings(
            "default_class = \"free\"\n[tenant_classes]\nbig = \"pro\"\n[classes.free.principal]\nrequests_per_second = 1\nburst = 1\n[classes.pro.principal]\nrequests_per_second = 100\nburst = 100\n",
        );
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        assert!(l.admit(&p, &subject("x", "small")).is_ok());
        assert!(l.admit(&p, &subject("x", "small")).is_err());
        for _ in 0..50 {
            assert!(l.admit(&p, &subject("y", "big")).is_ok());
        }
    }

    #[test]
    fn concurrency_slots_return_on_drop() {
        let s = settings("[principal]\nconcurrency = 2\n");
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        let a = l.admit(&p, &subject("a", "")).unwrap();
        let b = l.admit(&p, &subject("a", "")).unwrap();
        let r = l.admit(&p, &subject("a", "")).err().unwrap();
        assert_eq!(r.limit, Limit::Concurrency);
        drop(a);
        let c = l.admit(&p, &subject("a", "")).unwrap();
        drop((b, c));
        let st = l.key_state(Level::Principal, &subject("a", ""));
        assert_eq!(st.inflight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn token_cost_and_correction() {
        let s = settings(
            "[principal]\ntokens_per_minute = 6000\ntoken_burst = 1000\n[cost]\nmodel_weights = { m = 2.0 }\n",
        );
        let p = Policies::new(&s);
        assert_eq!(p.cost("m", 100, Some(200)), 600);
        assert_eq!(p.cost("other", 100, None), 356);
        assert_eq!(
            p.cost("m", 0, Some(u64::MAX)),
            MAX_COST,
            "a client can't overflow a counter"
        );
        let l = Limiter::new(&s, None, None);
        let mut sub = subject("a", "");
        sub.tokens = 600;
        let a = l.admit(&p, &sub).unwrap();
        assert!(l.admit(&p, &sub).is_err(), "1200 > 1000");
        // It really used 100 tokens: 500 go back and the next fits.
        l.correct(&a, 100);
        assert!(l.admit(&p, &sub).is_ok());
    }

    #[test]
    fn max_keys_overflow_shares_a_bucket() {
        let s = settings("max_keys = 2\n[principal]\nrequests_per_second = 1\nburst = 1\n");
        let p = Policies::new(&s);
        let l = Limiter::new(&s, None, None);
        assert!(l.admit(&p, &subject("a", "")).is_ok());
        assert!(l.admit(&p, &subject("b", "")).is_ok());
        // c and d are new keys beyond max_keys: they share one bucket.
        assert!(l.admit(&p, &subject("c", "")).is_ok());
        assert!(l.admit(&p, &subject("d", "")).is_err());
        assert_eq!(l.tracked()[1].1, 2);
    }

    #[test]
    fn headers_match_the_draft() {
        let sh = Shown {
            level: Level::Tenant,
            window: "",
            quota: 100,
            window_s: 10,
            remaining: 42,
            reset_s: 6,
        };
        let mut out = String::new();
        sh.write_headers(HeaderStyle::Ietf, &mut out);
        assert_eq!(
            out,
            "ratelimit-policy: \"tenant\";q=100;w=10\r\nratelimit: \"tenant\";r=42;t=6\r\n"
        );
        out.clear();
        sh.write_headers(HeaderStyle::XRatelimit, &mut out);
        assert_eq!(
            out,
            "x-ratelimit-limit: 100\r\nx-ratelimit-remaining: 42\r\nx-ratelimit-reset: 6\r\n"
        );
    }

    #[test]
    fn exact_across_threads() {
        let s = settings("[tenant]\nrequests_per_second = 0.000001\nburst = 1000\n");
        let p = Arc::new(Policies::new(&s));
        let l = Arc::new(Limiter::new(&s, None, None));
        let admitted = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let (p, l, admitted) = (p.clone(), l.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if l.admit(&p, &subject("a", "t")).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 1000);
    }
}
