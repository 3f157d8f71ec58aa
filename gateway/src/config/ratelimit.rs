//! `[ratelimit]`: the settings, as the operator writes them. See README
//! "Rate limits and quotas".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Sink};

/// One level's limits. Every field is optional (0 = no such limit).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Requests admitted at once above the rate (0: one second's worth).
    pub burst: u64,
    /// Sustained cost (estimated tokens) per minute.
    pub tokens_per_minute: f64,
    /// Tokens admitted at once above the rate (0: one minute's worth).
    pub token_burst: u64,
    /// Requests in flight at once (a long generation holds its slot to the end).
    pub concurrency: u32,
    /// Long-window quotas (tenant level only), counted per UTC day / month.
    pub requests_per_day: u64,
    pub tokens_per_day: u64,
    pub requests_per_month: u64,
    pub tokens_per_month: u64,
    /// With `[ratelimit.redis]`: what this level does while Redis is unreachable
    /// (tenant and model levels; the others are always local).
    pub on_redis_failure: FailMode,
    /// End a stream whose output takes the caller past this level's token
    /// rate or token quota (a final SSE error event, `token_quota_exceeded`).
    pub cut_streams: bool,
}

impl LimitSettings {
    pub fn has_quota(&self) -> bool {
        self.requests_per_day > 0
            || self.tokens_per_day > 0
            || self.requests_per_month > 0
            || self.tokens_per_month > 0
    }
}

/// Fail open (keep serving on this node's own counts) or closed (refuse with 503).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

/// Which rate-limit headers responses carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-09).
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    XRatelimit,
    /// Only `Retry-After` on 429.
    None,
}

/// A tenant class (e.g. free, pro, internal): overrides of the principal and tenant levels.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassSettings {
    pub principal: Option<LimitSettings>,
    pub tenant: Option<LimitSettings>,
    /// Queue band of this class's requests when a cluster is saturated
    /// (`[clusters.X.queue]`; higher first; a route's `priority` wins).
    pub priority: i32,
}

/// How a request's cost (in tokens) is estimated up front.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CostSettings {
    /// Output budget assumed when a request declares no `max_tokens`.
    pub default_max_tokens: u64,
    /// Cost multiplier per model name (default 1.0): a 70B model costs more than an 8B one.
    pub model_weights: BTreeMap<String, f64>,
    /// Correct the up-front charge from the `usage` the backend reports.
    pub correct_from_usage: bool,
    /// Streamed OpenAI chat/completions requests that don't ask for their
    /// usage (`stream_options.include_usage`) are sent asking for it, and
    /// the usage-only final event is removed before it reaches the client:
    /// every stream's cost is then settled on the backend's own count.
    pub stream_usage: bool,
}

impl Default for CostSettings {
    fn default() -> Self {
        CostSettings {
            default_max_tokens: 256,
            model_weights: BTreeMap::new(),
            correct_from_usage: true,
            stream_usage: true,
        }
    }
}

/// Repeat offenders go to the XDP blocklist.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationSettings {
    pub enabled: bool,
    /// Refusals of one client address within `window` that trigger a block.
    pub refusals: u32,
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// First block's TTL; doubled on each repeat offence, up to `max_block_ttl`.
    #[serde(deserialize_with = "duration")]
    pub block_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_block_ttl: Duration,
    /// Never block an address that also carries this many well-behaved
    /// principals (a shared NAT / corporate proxy).
    pub max_good_principals: u32,
}

impl Default for EscalationSettings {
    fn default() -> Self {
        EscalationSettings {
            enabled: false,
            refusals: 100,
            window: Duration::from_secs(10),
            block_ttl: Duration::from_secs(60),
            max_block_ttl: Duration::from_secs(3600),
            max_good_principals: 2,
        }
    }
}

/// `[ratelimit.redis]`: share the tenant and model levels across gateways.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `host:port`; empty: no Redis.
    pub address: String,
    /// How often local consumption is pushed and the fleet's pulled.
    #[serde(deserialize_with = "duration")]
    pub sync_interval: Duration,
    /// Connect / reply timeout for one sync.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Prefix of every key the gateway writes.
    pub key_prefix: String,
    /// Sent with AUTH when set.
    pub password: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            address: String::new(),
            sync_interval: Duration::from_millis(50),
            timeout: Duration::from_millis(250),
            key_prefix: "gateway:rl:".into(),
            password: String::new(),
        }
    }
}

/// `[ratelimit]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Per authenticated principal (API-key client, JWT subject, certificate identity).
    pub principal: Option<LimitSettings>,
    /// Per tenant (and its day/month quotas).
    pub tenant: Option<LimitSettings>,
    /// Per route, all clients together.
    pub route: Option<LimitSettings>,
    /// Per model, all clients together (the default for every model).
    pub model: Option<LimitSettings>,
    /// Per client address.
    pub ip: Option<LimitSettings>,
    /// Per-model overrides of the model level, by model name.
    pub models: BTreeMap<String, LimitSettings>,
    /// Tenant classes, by name.
    pub classes: BTreeMap<String, ClassSettings>,
    /// Which class each tenant is in.
    pub tenant_classes: BTreeMap<String, String>,
    /// Class of tenants not listed ("" = the plain levels).
    pub default_class: String,
    pub cost: CostSettings,
    pub headers: HeaderStyle,
    /// Also send the headers on admitted requests (not only on 429).
    pub headers_on_success: bool,
    /// Keys tracked per level; beyond it, new keys share one overflow bucket.
    pub max_keys: usize,
    /// Where day/month quota counts are kept across restarts ("" = not kept).
    pub state_file: PathBuf,
    #[serde(deserialize_with = "duration")]
    pub persist_interval: Duration,
    pub escalation: EscalationSettings,
    pub redis: RedisSettings,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            principal: None,
            tenant: None,
            route: None,
            model: None,
            ip: None,
            models: BTreeMap::new(),
            classes: BTreeMap::new(),
            tenant_classes: BTreeMap::new(),
            default_class: String::new(),
            cost: CostSettings::default(),
            headers: HeaderStyle::Ietf,
            headers_on_success: true,
            max_keys: 100_000,
            state_file: PathBuf::new(),
            persist_interval: Duration::from_secs(5),
            escalation: EscalationSettings::default(),
            redis: RedisSettings::default(),
        }
    }
}

impl RateLimitSettings {
    /// Every level's settings with the key it is configured under, for checks.
    pub fn all_levels(&self) -> Vec<(String, &LimitSettings)> {
        let mut v = Vec::new();
        for (k, l) in [
            ("principal", &self.principal),
            ("tenant", &self.tenant),
            ("route", &self.route),
            ("model", &self.model),
            ("ip", &self.ip),
        ] {
            if let Some(l) = l {
                v.push((format!("ratelimit.{k}"), l));
            }
        }
        for (m, l) in &self.models {
            v.push((format!("ratelimit.models.{m}"), l));
        }
        for (c, cs) in &self.classes {
            if let Some(l) = &cs.principal {
                v.push((format!("ratelimit.classes.{c}.principal"), l));
            }
            if let Some(l) = &cs.tenant {
                v.push((format!("ratelimit.classes.{c}.tenant"), l));
            }
        }
        v
    }

    /// Each level's rates, quotas and Redis failure mode.
    fn check_levels(&self, sink: &mut Sink) {
        for (key, l) in self.all_levels() {
            let valid = |r: f64| r >= 0.0 && r.is_finite();
            if !valid(l.requests_per_second) || !valid(l.tokens_per_minute) {
                sink.err(key.clone(), "rates must be finite and not negative");
            }
            if l.requests_per_second > 0.0 && l.requests_per_second < 1e-6 {
                sink.err(key.clone(), "requests_per_second below 1e-6 is not a rate");
            }
            if l.has_quota() && !key.ends_with("tenant") {
                sink.err(
                    key.clone(),
                    "day/month quotas are per tenant: set them under [ratelimit.tenant] or a class's tenant",
                );
            }
            if l.on_redis_failure == FailMode::Closed
                && !(key.ends_with("tenant") || key.contains(".model"))
            {
                sink.err(
                    key.clone(),
                    "only the tenant and model levels are shared through Redis",
                );
            }
        }
    }

    fn check_classes_and_cost(&self, sink: &mut Sink) {
        for (t, c) in &self.tenant_classes {
            if !self.classes.contains_key(c) {
                sink.err(
                    format!("ratelimit.tenant_classes.{t}"),
                    format!("no class `{c}` under [ratelimit.classes]"),
                );
            }
        }
        if !self.default_class.is_empty() && !self.classes.contains_key(&self.default_class) {
            sink.err(
                "ratelimit.default_class",
                format!(
                    "no class `{}` under [ratelimit.classes]",
                    self.default_class
                ),
            );
        }
        for (m, w) in &self.cost.model_weights {
            if !(*w > 0.0 && w.is_finite()) {
                sink.err(
                    format!("ratelimit.cost.model_weights.{m}"),
                    "a cost weight must be a positive number",
                );
            }
        }
        if self.max_keys == 0 {
            sink.err("ratelimit.max_keys", "must be at least 1");
        }
    }

    fn check_escalation_and_redis(&self, sink: &mut Sink) {
        let e = &self.escalation;
        if e.max_good_principals > 8 {
            sink.err(
                "ratelimit.escalation.max_good_principals",
                "at most 8 (the distinct principals tracked per address)",
            );
        }
        if e.enabled && (e.refusals == 0 || e.window.is_zero() || e.block_ttl.is_zero()) {
            sink.err(
                "ratelimit.escalation",
                "refusals, window and block_ttl must be above zero",
            );
        }
        if e.enabled && e.max_block_ttl < e.block_ttl {
            sink.err(
                "ratelimit.escalation.max_block_ttl",
                "must be at least block_ttl",
            );
        }
        let r = &self.redis;
        if !r.address.is_empty() && (r.sync_interval.is_zero() || r.timeout.is_zero()) {
            sink.err(
                "ratelimit.redis",
                "sync_interval and timeout must be above zero",
            );
        }
    }

    /// Anything configured at all.
    pub fn enabled(&self) -> bool {
        !self.all_levels().is_empty() || self.escalation.enabled
    }
}

/// `[ratelimit]`, checked.
pub(super) fn check_ratelimit(s: &RateLimitSettings, sink: &mut Sink) {
    s.check_levels(sink);
    s.check_classes_and_cost(sink);
    s.check_escalation_and_redis(sink);
}
