//! Typed configuration: one TOML file → CLI overrides → [`Config::validate`].
//!
//! Every key is typed, unknown keys are errors, and every error names the
//! file, the line and the key, and says how to fix it. Each pipeline stage
//! receives only its own slice (`Limits`, `Timeouts`, a `ClusterConfig`, …).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use crate::catalog::{Catalog, Model, ModelLimits, Version};

/// The configuration `gateway run` uses when no file is given
/// (`gateway config default` prints it).
pub const DEFAULT_CONFIG: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The model catalogue the validation stage resolves requests against.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// The XDP front door: blocklist, allowlist and per-source quotas at the NIC.
    #[serde(default)]
    pub xdp: XdpSettings,
    /// TLS termination.
    #[serde(default)]
    pub tls: TlsSettings,
    /// Authentication: JWT issuers, API keys, client certificates.
    #[serde(default)]
    pub authn: AuthnSettings,
    /// Authorization rules (default deny once authentication is configured).
    #[serde(default)]
    pub authz: AuthzSettings,
    /// Rate limits, cost limits, concurrency limits and quotas.
    #[serde(default)]
    pub ratelimit: crate::ratelimit::RateLimitSettings,
}

/// How a client may prove who it is (`routes.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    Mtls,
}

/// Names of the headers that carry the identity to the backend ("" = not sent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub principal: String,
    pub tenant: String,
    pub roles: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            principal: "x-gateway-principal".into(),
            tenant: "x-gateway-tenant".into(),
            roles: "x-gateway-roles".into(),
        }
    }
}

/// One JWT issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerSettings {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Allowed algorithms (RS256, RS384, PS256, ES256, ES384, EdDSA, HS256); the token's `alg` must be one.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Find the JWKS through `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub oidc_discovery: bool,
    /// CA bundle for an https JWKS/discovery URL (default: the system's).
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// HS256 only: the shared secret (at least 32 bytes).
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// An unknown `kid` triggers a JWKS fetch at most this often.
    #[serde(default = "default_unknown_kid", deserialize_with = "duration")]
    pub unknown_kid_refetch: Duration,
    /// Clock skew allowed on `exp`, `nbf`, `iat`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_unknown_kid() -> Duration {
    Duration::from_secs(30)
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_tenant_claim() -> String {
    "tenant".into()
}
fn default_roles_claim() -> String {
    "roles".into()
}

/// An API-key client: several key digests (rotation), one identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyClient {
    pub client: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Hex SHA-256 of each active key (`printf %s "$KEY" | sha256sum`).
    pub sha256: Vec<String>,
}

/// A client certificate (by SHA-256 fingerprint of its DER) and its identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsClient {
    /// Hex SHA-256 of the certificate's DER (pins one certificate) ...
    #[serde(default)]
    pub sha256: Option<String>,
    /// ... or a name the certificate carries: a URI SAN (SPIFFE ID), DNS SAN,
    /// e-mail SAN or the subject CN (any certificate from the CA with it).
    #[serde(default)]
    pub name: Option<String>,
    pub client: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

/// `[authn]`: see README "Authentication and authorization".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthnSettings {
    pub jwt: Vec<JwtIssuerSettings>,
    pub api_keys: Vec<ApiKeyClient>,
    pub mtls_clients: Vec<MtlsClient>,
    /// Header carrying an API key (a non-JWT `Authorization: Bearer` works too).
    pub api_key_header: String,
    /// Longest bearer token or API key accepted (401 beyond).
    pub max_token_bytes: usize,
    /// Verified tokens cached per worker.
    pub token_cache_entries: usize,
    /// Pass `Authorization` / the API-key header on to the backend.
    pub forward_credentials: bool,
    pub identity_headers: IdentityHeaders,
}

impl Default for AuthnSettings {
    fn default() -> Self {
        AuthnSettings {
            jwt: Vec::new(),
            api_keys: Vec::new(),
            mtls_clients: Vec::new(),
            api_key_header: "x-api-key".into(),
            max_token_bytes: 8192,
            token_cache_entries: 10_000,
            forward_credentials: false,
            identity_headers: IdentityHeaders::default(),
        }
    }
}

/// One authorization rule: who (tenants/roles/principals), what (models), how (scopes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    pub id: String,
    /// Any of these tenants; "*" = any authenticated caller; absent = no tenant condition.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Any of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Any of these principals.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Model name patterns (`*` anywhere); "*" also covers requests without a model, "" only those.
    #[serde(default = "star")]
    pub models: Vec<String>,
    /// Scopes granted: "infer" (model routes), "admin".
    #[serde(default = "infer")]
    pub scopes: Vec<String>,
    /// JWT claims that must have these values.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Authentication methods the identity must have come from ("jwt",
    /// "api_key", "mtls"); absent = any. Keeps a principal name from one
    /// method (a JWT `sub`) from matching another's (a certificate name).
    #[serde(default)]
    pub methods: Vec<String>,
}

fn star() -> Vec<String> {
    vec!["*".into()]
}
fn infer() -> Vec<String> {
    vec!["infer".into()]
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzSettings {
    pub rules: Vec<AuthzRule>,
}

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// Client certificates (mutual TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Not asked for.
    #[default]
    None,
    /// Asked for; verified against `client_ca` when given; a client without one is let through.
    Optional,
    /// Required and verified against `client_ca`; the handshake fails without one.
    Required,
}

/// `[[tls.listeners]]`: mutual TLS for one TLS listener, in place of the
/// `[tls]` default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// One of `tls.listen`.
    pub listen: String,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub client_ca: Option<PathBuf>,
}

/// One certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[tls]`: see README "TLS".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Addresses that speak TLS (server.listen stays plaintext).
    pub listen: Vec<String>,
    /// Certificates; the first is the default for clients without (or with an unknown) SNI.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    /// From accept to a finished handshake; over it the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// TLS 1.3 session tickets (stateless resumption; keys rotate every 6 h).
    pub session_tickets: bool,
    /// Server-side session cache entries (resumption without tickets).
    pub session_cache: usize,
    pub client_auth: ClientAuth,
    /// CA bundle (PEM) client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// How often to check the certificate files for changes; "0s": only on SIGHUP.
    #[serde(deserialize_with = "duration")]
    pub reload_check: Duration,
    /// Per-listener client authentication (overrides `client_auth`/`client_ca`).
    pub listeners: Vec<TlsListener>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            listen: Vec::new(),
            certificates: Vec::new(),
            min_version: TlsVersion::V1_2,
            handshake_timeout: Duration::from_secs(10),
            session_tickets: true,
            session_cache: 10_000,
            client_auth: ClientAuth::None,
            client_ca: None,
            reload_check: Duration::from_secs(5),
            listeners: Vec::new(),
        }
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpAttach {
    /// In the driver (fastest); falls back to `generic` with a warning when the driver can't.
    #[default]
    Native,
    /// In the kernel stack after the skb is built (works on any interface; slower).
    Generic,
}

/// What the XDP program does with packets it would drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpMode {
    /// Drop them.
    #[default]
    Enforce,
    /// Count them as `would_drop`, drop nothing (also at accept).
    Monitor,
}

/// `[xdp]`: see README "XDP front door".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdpSettings {
    /// Interfaces to attach to; empty: XDP off, blocks are enforced at accept only.
    pub interfaces: Vec<String>,
    pub attach: XdpAttach,
    pub mode: XdpMode,
    /// New TCP connections (SYNs) per second per source address; 0: no SYN quota.
    pub syn_rate: u32,
    /// SYNs a source may send at once above the rate.
    pub syn_burst: u32,
    /// Packets per second per source address to the gateway's ports; 0: no packet quota.
    pub packet_rate: u32,
    pub packet_burst: u32,
    /// CIDRs never dropped or refused (health checkers, internal networks).
    pub allow: Vec<String>,
    /// Addresses blocked for as long as this config is in force.
    pub block: Vec<String>,
    /// TTL of a block added without one (admin API, CLI).
    #[serde(deserialize_with = "duration")]
    pub default_block_ttl: Duration,
    /// Longest TTL a block may be given.
    #[serde(deserialize_with = "duration")]
    pub max_block_ttl: Duration,
    /// Blocklist capacity (addresses); a block beyond it is refused.
    pub max_blocked: u32,
    /// Source addresses whose quota is tracked at once (LRU: the least recent is forgotten).
    pub max_tracked_sources: u32,
    /// Allowlist capacity (CIDRs).
    pub max_allow: u32,
}

impl Default for XdpSettings {
    fn default() -> Self {
        XdpSettings {
            interfaces: Vec::new(),
            attach: XdpAttach::Native,
            mode: XdpMode::Enforce,
            syn_rate: 1000,
            syn_burst: 2000,
            packet_rate: 0,
            packet_burst: 0,
            allow: Vec::new(),
            block: Vec::new(),
            default_block_ttl: Duration::from_secs(3600),
            max_block_ttl: Duration::from_secs(30 * 24 * 3600),
            max_blocked: 65536,
            max_tracked_sources: 262144,
            max_allow: 1024,
        }
    }
}

/// What a route's requests are, for the validation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Forwarded as is; only the generic checks (content type, size, optional schema).
    #[default]
    Passthrough,
    /// OpenAI-compatible: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `GET /v1/models`.
    Openai,
    /// KServe v2 / Open Inference Protocol REST: `/v2/models/{name}[/versions/{v}]/infer`, metadata, ready.
    Kserve,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Deployed versions (`"1"`, `"1.2"`, `"1.2.3"`); a request for `latest` gets the highest.
    #[serde(default = "default_versions")]
    pub versions: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Prompt + output tokens the model's context holds (prompt estimated at 4 bytes a token).
    #[serde(default)]
    pub context_tokens: Option<u64>,
    /// Highest `max_tokens` a request may ask for.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// Allowed `temperature` range, default [0, 2].
    #[serde(default)]
    pub temperature: Option<[f64; 2]>,
    /// Allowed `top_p` range, default [0, 1].
    #[serde(default)]
    pub top_p: Option<[f64; 2]>,
    /// Highest `n` (completions per request), default 16.
    #[serde(default)]
    pub max_n: Option<u64>,
    /// JSON Schema file every request body for this model must match (path relative to the config file).
    #[serde(default)]
    pub schema: Option<String>,
    /// The pool serving this model: its requests go to this cluster, whatever the route's.
    #[serde(default)]
    pub cluster: Option<String>,
    /// The pool serving each version, for requests that name their version
    /// (`x-model-version`, `model@1.2`, KServe `/versions/`).
    #[serde(default)]
    pub version_clusters: BTreeMap<String, String>,
    /// Weighted split of the requests that don't name a version, across
    /// pools (a canary at 5, then 50, then 100).
    #[serde(default)]
    pub split: Vec<SplitTarget>,
    /// Split by a hash of the caller's principal (or address when
    /// anonymous): a client stays on one side of an A/B test.
    #[serde(default)]
    pub sticky: bool,
    /// Mirror a fraction of this model's requests to another pool; its
    /// answers are discarded, their status and latency recorded.
    #[serde(default)]
    pub shadow: Option<ShadowTarget>,
}

/// `[models.shadow]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowTarget {
    pub cluster: String,
    /// 0..1 of the model's requests (those whose body was read whole).
    pub fraction: f64,
    /// Mirrored requests in flight at once, per worker; more are skipped.
    #[serde(default = "default_shadow_max_inflight")]
    pub max_inflight: usize,
    /// A mirrored exchange is abandoned after this long.
    #[serde(default = "default_shadow_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_shadow_max_inflight() -> usize {
    32
}

fn default_shadow_timeout() -> Duration {
    Duration::from_secs(300)
}

/// One side of a model's traffic split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitTarget {
    pub cluster: String,
    pub weight: u32,
}

fn default_versions() -> Vec<String> {
    vec!["1".into()]
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses the proxy listens on; every worker binds each with SO_REUSEPORT.
    pub listen: Vec<String>,
    /// `"auto"` (one per online CPU) or a number.
    pub workers: Workers,
    /// Pin worker N to the Nth CPU the process may run on.
    pub pin_workers: bool,
    /// `auto` (io_uring, falling back to epoll), `io_uring` or `epoll`.
    pub driver: DriverChoice,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Client connections allowed at once, over all workers.
    pub max_connections: usize,
    /// Bytes of read buffer per connection side (client, upstream).
    pub buffer_size: usize,
    /// Keep a client-supplied `X-Forwarded-For` and append to it (only behind a trusted L4 balancer).
    pub trust_forwarded_headers: bool,
    /// Listen backlog per worker socket.
    pub backlog: i32,
    /// Backend host names are re-resolved this often; a change reloads the
    /// configuration (a Kubernetes headless Service). "0s" = only at start.
    #[serde(deserialize_with = "duration")]
    pub dns_refresh: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec!["127.0.0.1:8080".into()],
            workers: Workers::Auto,
            pin_workers: true,
            driver: DriverChoice::Auto,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 10_000,
            buffer_size: 64 * 1024,
            trust_forwarded_headers: false,
            backlog: 1024,
            dns_refresh: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(usize),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n >= 1 => Ok(Workers::Count(n as usize)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "workers = {n}: use \"auto\" or a number of at least 1"
            ))),
            Raw::S(s) if s == "auto" => Ok(Workers::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "workers = \"{s}\": use \"auto\" or a number of at least 1"
            ))),
        }
    }
}

impl Workers {
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    Auto,
    #[serde(alias = "iouring", alias = "io-uring")]
    #[value(name = "io_uring", alias = "io-uring", alias = "iouring")]
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`); keep it on loopback.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9901".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `gateway=debug`, … (`RUST_LOG` overrides it).
    pub level: String,
    /// One `access` event per request.
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".into(),
            access_log: true,
        }
    }
}

/// Limits on what a client may send. Each has a safe default and is enforced by the codec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes of request line + headers; over it → 431 (or 414 when the request line alone is over `max_uri_bytes`).
    pub max_header_bytes: usize,
    /// Number of request headers; over it → 431.
    pub max_headers: usize,
    /// Bytes of request target; over it → 414.
    pub max_uri_bytes: usize,
    /// Bytes of request body; over it → 413. Routes may override.
    pub max_request_body_bytes: u64,
    /// Bytes of an upstream response head; over it → 502.
    pub max_response_header_bytes: usize,
    /// Headers in an upstream response head; over it → 502.
    pub max_response_headers: usize,
    /// JSON request bodies are read whole to be checked: at most this many bytes → 413.
    pub max_json_body_bytes: u64,
    /// Deepest nesting of a JSON body → 400.
    pub json_max_depth: usize,
    /// Most values (of any kind) in a JSON body → 413.
    pub json_max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_request_body_bytes: 64 * 1024 * 1024,
            max_response_header_bytes: 32 * 1024,
            max_response_headers: 128,
            max_json_body_bytes: 16 * 1024 * 1024,
            json_max_depth: 64,
            json_max_elements: 2 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its head (slowloris guard) → 408 + close.
    #[serde(deserialize_with = "duration")]
    pub client_header: Duration,
    /// How long a keep-alive client connection may sit idle between requests.
    #[serde(deserialize_with = "duration")]
    pub client_idle: Duration,
    /// Longest gap between two reads of a request body → 408 + close.
    #[serde(deserialize_with = "duration")]
    pub client_body: Duration,
    /// TCP connect to a backend → next backend, then 502.
    #[serde(deserialize_with = "duration")]
    pub upstream_connect: Duration,
    /// From the request sent to the response head, and longest gap between response body reads → 504.
    #[serde(deserialize_with = "duration")]
    pub upstream_response: Duration,
    /// Whole exchange, request head to last response byte → 504 (0 = no limit).
    #[serde(deserialize_with = "duration")]
    pub total: Duration,
    /// Longest a write to a client or a backend may make no progress (a peer
    /// that stopped reading) before the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub send: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(10),
            client_idle: Duration::from_secs(60),
            client_body: Duration::from_secs(60),
            upstream_connect: Duration::from_secs(2),
            upstream_response: Duration::from_secs(300),
            total: Duration::from_secs(0),
            send: Duration::from_secs(60),
        }
    }
}

/// Per-route timeout overrides (inference can take minutes on one route and milliseconds on another).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    #[serde(default, deserialize_with = "opt_duration")]
    pub upstream_connect: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub upstream_response: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub total: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each backend, resolved at load.
    pub backends: Vec<String>,
    /// Idle keep-alive connections kept per backend per worker.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// An idle pooled connection older than this is closed. Keep it under the
    /// backend's own keep-alive timeout (uvicorn, under vLLM, closes after 5 s).
    #[serde(default = "default_pool_idle_timeout", deserialize_with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Open connections (in use + idle) to each backend, per worker. At the
    /// limit a request tries the next backend, then waits up to the connect
    /// timeout for a free one, then gets 503 + Retry-After.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How a backend is picked (`[clusters.X.balance]`), health and load signals.
    #[serde(default)]
    pub balance: crate::balance::BalanceSettings,
}

fn default_max_connections() -> usize {
    512
}

fn default_pool_max_idle() -> usize {
    64
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(4)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and logs; defaults to `route<N>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Exact host (`api.example.com`), wildcard (`*.example.com`), or absent for any host.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Allowed methods; absent = any.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    pub cluster: String,
    #[serde(default)]
    pub max_request_body_bytes: Option<u64>,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// `passthrough` (default), `openai` or `kserve`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Media types a request body may have (415 otherwise); default `["application/json"]`
    /// for `openai` and `kserve`, anything for `passthrough`. Types with a known
    /// signature (images, audio, PDF) are checked against the body's first bytes.
    #[serde(default)]
    pub content_types: Option<Vec<String>>,
    /// JSON Schema file a JSON request body on this route must match (relative to the config file).
    #[serde(default)]
    pub schema: Option<String>,
    /// JSON pointers removed from JSON responses and from each JSON event of an SSE stream.
    #[serde(default)]
    pub response_drop_fields: Vec<String>,
    /// Authentication methods this route accepts; absent = every configured one.
    #[serde(default)]
    pub auth: Option<Vec<AuthMethod>>,
    /// No credentials needed (and no authorization) on this route.
    #[serde(default)]
    pub anonymous: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); write it like \"250ms\", \"10s\" or \"5m\"")
    })
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A configuration problem an operator can act on: where, which key, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: ", self.file, l)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

/// All the errors found in one file, one per line when displayed.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The checked, resolved form every stage is built from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub clusters: BTreeMap<String, Vec<SocketAddr>>,
    pub catalog: Catalog,
    /// Compiled JSON Schema of each route (by route index), if it has one.
    pub route_schemas: Vec<Option<Arc<jsonschema::Validator>>>,
    /// `[xdp] allow`, parsed.
    pub xdp_allow: Vec<crate::xdp::Cidr>,
    /// `[xdp] block`, parsed.
    pub xdp_block: Vec<std::net::IpAddr>,
    /// `[tls] listen`, parsed.
    pub tls_listen: Vec<SocketAddr>,
    /// The TLS stage, built (certificates loaded and checked) when `[tls] listen` is set.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// The authentication stage, when any method is configured.
    pub authn: Option<Arc<crate::authn::Authn>>,
}

impl Config {
    /// Parse TOML text; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        toml::from_str::<Config>(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = key_from_message(e.message());
            ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                key,
                message: e.message().trim().to_string(),
            }])
        })
    }

    pub fn load(path: &Path) -> Result<(Config, String), ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }])
        })?;
        Ok((Config::parse(&text, &file)?, text))
    }

    /// Check every rule and resolve addresses. `text` is the source (for line numbers).
    pub fn validate(self, text: &str, file: &str) -> Result<Resolved, ConfigErrors> {
        let mut errs = Vec::new();
        let doc = toml_edit::ImDocument::parse(text).ok();
        let mut err = |key: String, message: String| {
            let line = doc
                .as_ref()
                .and_then(|d| locate(d, &key))
                .map(|off| line_of(text, off));
            errs.push(ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
            });
        };

        let mut listen = Vec::new();
        if self.server.listen.is_empty() && self.tls.listen.is_empty() {
            err(
                "server.listen".into(),
                "give at least one address, e.g. [\"0.0.0.0:8080\"] (or tls.listen)".into(),
            );
        }
        for (i, a) in self.server.listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(sa) => listen.push(sa),
                Err(_) => err(
                    format!("server.listen[{i}]"),
                    format!("`{a}` is not an IP:port such as \"0.0.0.0:8080\""),
                ),
            }
        }
        let admin = match self.admin.listen.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                err(
                    "admin.listen".into(),
                    format!(
                        "`{}` is not an IP:port such as \"127.0.0.1:9901\"",
                        self.admin.listen
                    ),
                );
                "127.0.0.1:0".parse().unwrap()
            }
        };
        if listen.contains(&admin) {
            err(
                "admin.listen".into(),
                "the admin listener must not share an address with server.listen".into(),
            );
        }
        if self.server.max_connections == 0 {
            err("server.max_connections".into(), "must be at least 1".into());
        }
        if self.server.buffer_size < 4096 || self.server.buffer_size > 16 * 1024 * 1024 {
            err(
                "server.buffer_size".into(),
                "must be between 4096 and 16777216 bytes".into(),
            );
        }
        if self.server.backlog < 1 {
            err("server.backlog".into(), "must be at least 1".into());
        }
        if self.server.shutdown_grace.is_zero() {
            err(
                "server.shutdown_grace".into(),
                "must be more than 0, e.g. \"30s\"".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            err(
                "log.level".into(),
                format!(
                    "`{}` is not a filter; use e.g. \"info\" or \"gateway=debug\"",
                    self.log.level
                ),
            );
        }

        let l = &self.limits;
        for (k, v, min) in [
            ("limits.max_header_bytes", l.max_header_bytes, 256usize),
            ("limits.max_headers", l.max_headers, 4),
            ("limits.max_response_headers", l.max_response_headers, 4),
            ("limits.max_uri_bytes", l.max_uri_bytes, 16),
            (
                "limits.max_response_header_bytes",
                l.max_response_header_bytes,
                256,
            ),
        ] {
            if v < min {
                err(k.into(), format!("must be at least {min}"));
            }
        }
        for (k, v) in [
            ("limits.max_headers", l.max_headers),
            ("limits.max_response_headers", l.max_response_headers),
        ] {
            if v > crate::codec::MAX_HEADERS {
                err(
                    k.into(),
                    format!("must be at most {}", crate::codec::MAX_HEADERS),
                );
            }
        }
        if l.max_header_bytes > self.server.buffer_size {
            err(
                "limits.max_header_bytes".into(),
                format!(
                    "must not exceed server.buffer_size ({})",
                    self.server.buffer_size
                ),
            );
        }
        if l.max_response_header_bytes > self.server.buffer_size {
            err(
                "limits.max_response_header_bytes".into(),
                format!(
                    "must not exceed server.buffer_size ({})",
                    self.server.buffer_size
                ),
            );
        }
        if l.max_uri_bytes > l.max_header_bytes {
            err(
                "limits.max_uri_bytes".into(),
                "must not exceed limits.max_header_bytes".into(),
            );
        }
        let t = &self.timeouts;
        for (k, v) in [
            ("timeouts.client_header", t.client_header),
            ("timeouts.client_idle", t.client_idle),
            ("timeouts.client_body", t.client_body),
            ("timeouts.upstream_connect", t.upstream_connect),
            ("timeouts.upstream_response", t.upstream_response),
            ("timeouts.send", t.send),
        ] {
            if v.is_zero() {
                err(k.into(), "must be more than 0".into());
            }
        }

        let mut clusters = BTreeMap::new();
        for (name, c) in &self.clusters {
            let key = format!("clusters.{name}");
            if !valid_name(name) {
                err(
                    key.clone(),
                    "cluster names use letters, digits, '-', '_' and '.'".into(),
                );
            }
            if c.backends.is_empty() {
                err(
                    format!("{key}.backends"),
                    "give at least one backend, e.g. [\"10.0.0.5:8000\"]".into(),
                );
            }
            if c.max_connections == 0 {
                err(
                    format!("{key}.max_connections"),
                    "must be at least 1".into(),
                );
            }
            if c.pool_max_idle > c.max_connections {
                err(
                    format!("{key}.pool_max_idle"),
                    format!("must not exceed max_connections ({})", c.max_connections),
                );
            }
            if c.pool_idle_timeout.is_zero() {
                err(
                    format!("{key}.pool_idle_timeout"),
                    "must be more than 0".into(),
                );
            }
            let mut addrs = Vec::new();
            for (i, b) in c.backends.iter().enumerate() {
                match resolve_all(b) {
                    Ok(a) => {
                        for x in a {
                            if !addrs.contains(&x) {
                                addrs.push(x);
                            }
                        }
                    }
                    Err(m) => err(format!("{key}.backends[{i}]"), m),
                }
            }
            clusters.insert(name.clone(), addrs);
            let b = &c.balance;
            if b.metrics_max_age < b.metrics_interval
                && b.algorithm.scrapes()
                && !b.metrics_interval.is_zero()
            {
                err(
                    format!("{key}.balance.metrics_max_age"),
                    "must be at least metrics_interval, or every scrape is stale on arrival".into(),
                );
            }
            if !(b.kv_saturation > 0.0 && b.kv_saturation <= 1.0) || b.queue_saturation == 0 {
                err(
                    format!("{key}.balance"),
                    "kv_saturation is a fraction in (0, 1] (1 = never saturated by the KV cache) and queue_saturation at least 1".into(),
                );
            }
            if !(0.0..=1.0).contains(&b.retry_budget) {
                err(
                    format!("{key}.balance.retry_budget"),
                    "a fraction of requests, 0 to 1".into(),
                );
            }
            if b.ejection > b.max_ejection
                || (!b.health_path.is_empty() && b.health_interval.is_zero())
            {
                err(
                    format!("{key}.balance"),
                    "ejection must not exceed max_ejection, and health_interval must be above 0"
                        .into(),
                );
            }
            if !b.metrics_path.starts_with('/')
                || (!b.health_path.is_empty() && !b.health_path.starts_with('/'))
            {
                err(
                    format!("{key}.balance"),
                    "metrics_path and health_path are paths starting with '/'".into(),
                );
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            if let Some(c) = &m.cluster {
                if !self.clusters.contains_key(c) {
                    err(format!("models[{i}].cluster"), format!("no cluster `{c}`"));
                }
            }
            for (v, c) in &m.version_clusters {
                if !self.clusters.contains_key(c) {
                    err(
                        format!("models[{i}].version_clusters.{v}"),
                        format!("no cluster `{c}`"),
                    );
                }
                if !m.versions.contains(v) {
                    err(
                        format!("models[{i}].version_clusters.{v}"),
                        format!("`{v}` is not one of the model's versions"),
                    );
                }
            }
            for (j, t) in m.split.iter().enumerate() {
                if !self.clusters.contains_key(&t.cluster) {
                    err(
                        format!("models[{i}].split[{j}].cluster"),
                        format!("no cluster `{}`", t.cluster),
                    );
                }
            }
            if let Some(sh) = &m.shadow {
                if !self.clusters.contains_key(&sh.cluster) {
                    err(
                        format!("models[{i}].shadow.cluster"),
                        format!("no cluster `{}`", sh.cluster),
                    );
                }
                if !(sh.fraction > 0.0 && sh.fraction <= 1.0)
                    || sh.max_inflight == 0
                    || sh.timeout.is_zero()
                {
                    err(
                        format!("models[{i}].shadow"),
                        "fraction is in (0, 1], max_inflight and timeout above 0".into(),
                    );
                }
            }
            if !m.split.is_empty() && m.split.iter().all(|t| t.weight == 0) {
                err(
                    format!("models[{i}].split"),
                    "at least one weight must be above 0".into(),
                );
            }
        }

        if self.routes.is_empty() {
            err(
                "routes".into(),
                "add at least one [[routes]] entry naming a cluster".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !self.clusters.contains_key(&r.cluster) {
                let known: Vec<_> = self.clusters.keys().cloned().collect();
                err(
                    format!("{key}.cluster"),
                    format!(
                        "no cluster `{}`; define [clusters.{}] or use one of: {}",
                        r.cluster,
                        r.cluster,
                        known.join(", ")
                    ),
                );
            }
            if r.path_prefix.is_some() && r.path_exact.is_some() {
                err(
                    key.clone(),
                    "give path_prefix or path_exact, not both".into(),
                );
            }
            for (k, p) in [
                ("path_prefix", &r.path_prefix),
                ("path_exact", &r.path_exact),
            ] {
                if let Some(p) = p {
                    if !p.starts_with('/') {
                        err(format!("{key}.{k}"), format!("`{p}` must start with '/'"));
                    }
                }
            }
            if let Some(h) = &r.host {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if bare.is_empty() || bare.contains('*') || bare.contains('/') || bare.contains(' ')
                {
                    err(format!("{key}.host"), format!("`{h}` must be a host name like \"api.example.com\" or \"*.example.com\""));
                }
            }
            if let Some(ms) = &r.methods {
                if ms.is_empty() {
                    err(
                        format!("{key}.methods"),
                        "leave methods out to allow any, or list at least one".into(),
                    );
                }
                for (j, m) in ms.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                        err(
                            format!("{key}.methods[{j}]"),
                            format!("`{m}` must be an upper-case method such as \"POST\""),
                        );
                    }
                }
            }
            if let Some(n) = &r.name {
                if !valid_name(n) {
                    err(
                        format!("{key}.name"),
                        "route names use letters, digits, '-', '_' and '.'".into(),
                    );
                }
                if !names.insert(n.clone()) {
                    err(
                        format!("{key}.name"),
                        format!("route name `{n}` is used twice"),
                    );
                }
            }
            for (k, v) in [
                ("upstream_connect", r.timeouts.upstream_connect),
                ("upstream_response", r.timeouts.upstream_response),
            ] {
                if v.is_some_and(|d| d.is_zero()) {
                    err(format!("{key}.timeouts.{k}"), "must be more than 0".into());
                }
            }
        }

        // Models and schemas. Schema paths are relative to the config file.
        let base = Path::new(file)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut models = Vec::new();
        let mut model_names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = format!("models[{i}]");
            if !valid_name(&m.name) {
                err(
                    format!("{key}.name"),
                    "model names use letters, digits, '-', '_' and '.'".into(),
                );
            }
            if !model_names.insert(m.name.clone()) {
                err(
                    format!("{key}.name"),
                    format!("model `{}` is defined twice", m.name),
                );
            }
            let mut versions = Vec::new();
            for (j, v) in m.versions.iter().enumerate() {
                match Version::parse(v) {
                    Some(v) => versions.push(v),
                    None => err(
                        format!("{key}.versions[{j}]"),
                        format!("`{v}` is not a version such as \"1\", \"1.2\" or \"1.2.3\""),
                    ),
                }
            }
            if versions.is_empty() {
                err(
                    format!("{key}.versions"),
                    "list at least one deployed version".into(),
                );
            }
            versions.sort();
            for (k, r) in [("temperature", m.temperature), ("top_p", m.top_p)] {
                if r.is_some_and(|[lo, hi]| !(lo.is_finite() && hi.is_finite() && lo <= hi)) {
                    err(
                        format!("{key}.{k}"),
                        "give [low, high] with low <= high".into(),
                    );
                }
            }
            let schema = match m.schema.as_deref().map(|p| load_schema_file(&base.join(p))) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    err(format!("{key}.schema"), e);
                    None
                }
                None => None,
            };
            let d = ModelLimits::default();
            models.push(Model {
                name: m.name.clone(),
                versions,
                enabled: m.enabled,
                limits: ModelLimits {
                    context_tokens: m.context_tokens,
                    max_output_tokens: m.max_output_tokens,
                    temperature: m.temperature.map(|[a, b]| (a, b)).unwrap_or(d.temperature),
                    top_p: m.top_p.map(|[a, b]| (a, b)).unwrap_or(d.top_p),
                    max_n: m.max_n.unwrap_or(d.max_n),
                },
                schema,
            });
        }
        let mut route_schemas = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            route_schemas.push(
                match r.schema.as_deref().map(|p| load_schema_file(&base.join(p))) {
                    Some(Ok(v)) => Some(v),
                    Some(Err(e)) => {
                        err(format!("routes[{i}].schema"), e);
                        None
                    }
                    None => None,
                },
            );
            for (j, ct) in r.content_types.iter().flatten().enumerate() {
                if crate::validate::magic::media_type(ct.as_bytes()).is_none() {
                    err(
                        format!("routes[{i}].content_types[{j}]"),
                        format!("`{ct}` is not a media type such as \"application/json\""),
                    );
                }
            }
            if let Err(e) = crate::filter::FieldFilter::new(&r.response_drop_fields) {
                err(format!("routes[{i}].response_drop_fields"), e);
            }
            if r.protocol != Protocol::Passthrough && self.models.is_empty() {
                err(
                    format!("routes[{i}].protocol"),
                    "an openai or kserve route needs a model catalogue: add [[models]] entries"
                        .into(),
                );
            }
        }
        if self.limits.json_max_depth == 0 || self.limits.json_max_depth > 1024 {
            err(
                "limits.json_max_depth".into(),
                "must be between 1 and 1024".into(),
            );
        }
        if self.limits.json_max_elements == 0 {
            err(
                "limits.json_max_elements".into(),
                "must be at least 1".into(),
            );
        }

        let x = &self.xdp;
        let mut xdp_allow = Vec::new();
        for (i, c) in x.allow.iter().enumerate() {
            match c.parse::<crate::xdp::Cidr>() {
                Ok(c) => xdp_allow.push(c),
                Err(e) => err(format!("xdp.allow[{i}]"), e),
            }
        }
        let mut xdp_block = Vec::new();
        for (i, a) in x.block.iter().enumerate() {
            match a.parse::<std::net::IpAddr>() {
                Ok(a) if xdp_allow.iter().any(|c| c.contains(a)) => err(
                    format!("xdp.block[{i}]"),
                    format!("`{a}` is also in xdp.allow; allowlisted addresses are never blocked"),
                ),
                Ok(a) => xdp_block.push(a),
                Err(_) => err(
                    format!("xdp.block[{i}]"),
                    format!("`{a}` is not an IPv4 or IPv6 address"),
                ),
            }
        }
        for (i, name) in x.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
                err(
                    format!("xdp.interfaces[{i}]"),
                    format!("`{name}` is not an interface name"),
                );
            }
        }
        for (key, rate, burst) in [
            ("xdp.syn_burst", x.syn_rate, x.syn_burst),
            ("xdp.packet_burst", x.packet_rate, x.packet_burst),
        ] {
            if rate > 0 && burst < 1 {
                err(key.into(), "must be at least 1 when the rate is set".into());
            }
        }
        if x.default_block_ttl.is_zero() || x.default_block_ttl > x.max_block_ttl {
            err(
                "xdp.default_block_ttl".into(),
                "must be more than 0s and at most xdp.max_block_ttl".into(),
            );
        }
        for (key, v) in [
            ("xdp.max_blocked", x.max_blocked),
            ("xdp.max_tracked_sources", x.max_tracked_sources),
            ("xdp.max_allow", x.max_allow),
        ] {
            if !(1..=16_777_216).contains(&v) {
                err(key.into(), "must be between 1 and 16777216".into());
            }
        }
        if x.allow.len() > x.max_allow as usize {
            err(
                "xdp.allow".into(),
                format!("more CIDRs than xdp.max_allow ({})", x.max_allow),
            );
        }
        if x.block.len() > x.max_blocked as usize {
            err(
                "xdp.block".into(),
                format!("more addresses than xdp.max_blocked ({})", x.max_blocked),
            );
        }

        let mut tls_listen = Vec::new();
        for (i, a) in self.tls.listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(sa) if listen.contains(&sa) => err(
                    format!("tls.listen[{i}]"),
                    format!("{sa} is also in server.listen; an address speaks TLS or plaintext, not both"),
                ),
                Ok(sa) => tls_listen.push(sa),
                Err(_) => err(
                    format!("tls.listen[{i}]"),
                    format!("`{a}` is not an IP:port such as \"0.0.0.0:8443\""),
                ),
            }
        }
        if tls_listen.contains(&admin) {
            err(
                "admin.listen".into(),
                "the admin listener must not share an address with tls.listen".into(),
            );
        }
        let mut tls_settings = self.tls.clone();
        for c in &mut tls_settings.certificates {
            c.cert = base.join(&c.cert);
            c.key = base.join(&c.key);
        }
        tls_settings.client_ca = tls_settings.client_ca.map(|p| base.join(p));
        if tls_settings.handshake_timeout.is_zero() {
            err(
                "tls.handshake_timeout".into(),
                "must be more than 0s, e.g. \"10s\"".into(),
            );
        }
        if tls_settings.client_auth != ClientAuth::None && tls_settings.client_ca.is_none() {
            err("tls.client_auth".into(), "mutual TLS needs tls.client_ca (the CA bundle client certificates are checked against)".into());
        }
        let mut overridden = Vec::new();
        for (i, l) in tls_settings.listeners.iter_mut().enumerate() {
            l.client_ca = l.client_ca.take().map(|p| base.join(p));
            match l.listen.parse::<SocketAddr>() {
                Ok(sa) if !tls_listen.contains(&sa) => err(
                    format!("tls.listeners[{i}].listen"),
                    format!("{sa} is not in tls.listen"),
                ),
                Ok(sa) if overridden.contains(&sa) => err(
                    format!("tls.listeners[{i}].listen"),
                    format!("{sa} has two [[tls.listeners]] entries"),
                ),
                Ok(sa) => overridden.push(sa),
                Err(_) => err(
                    format!("tls.listeners[{i}].listen"),
                    format!("`{}` is not an IP:port such as \"0.0.0.0:9443\"", l.listen),
                ),
            }
            if l.client_auth != ClientAuth::None && l.client_ca.is_none() {
                err(
                    format!("tls.listeners[{i}].client_auth"),
                    "mutual TLS needs client_ca (the CA bundle client certificates are checked against)".into(),
                );
            }
        }
        let tls = if tls_listen.is_empty() {
            None
        } else if tls_settings.certificates.is_empty() {
            err(
                "tls.certificates".into(),
                "tls.listen is set: give at least one [[tls.certificates]] cert/key pair".into(),
            );
            None
        } else {
            match crate::tls::Tls::new(&tls_settings) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    err("tls.certificates".into(), e);
                    None
                }
            }
        };

        let mut authn_settings = self.authn.clone();
        for j in &mut authn_settings.jwt {
            j.jwks_file = j.jwks_file.take().map(|p| base.join(p));
            j.jwks_ca = j.jwks_ca.take().map(|p| base.join(p));
            j.hs256_secret_file = j.hs256_secret_file.take().map(|p| base.join(p));
            if j.algorithms.is_empty() {
                err(
                    "authn.jwt".into(),
                    format!(
                        "issuer {}: list the allowed algorithms, e.g. [\"ES256\"]",
                        j.issuer
                    ),
                );
            }
            if j.audiences.is_empty() {
                err(
                    "authn.jwt".into(),
                    format!("issuer {}: list the accepted audiences", j.issuer),
                );
            }
        }
        if authn_settings.max_token_bytes < 256 || authn_settings.token_cache_entries == 0 {
            err(
                "authn.max_token_bytes".into(),
                "max_token_bytes must be at least 256 and token_cache_entries at least 1".into(),
            );
        }
        let policy_claims: Vec<String> = self
            .authz
            .rules
            .iter()
            .flat_map(|r| r.claims.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let authn = match crate::authn::Authn::new(&authn_settings, policy_claims) {
            Ok(a) if a.configured() => Some(Arc::new(a)),
            Ok(_) => None,
            Err(e) => {
                err("authn".into(), e);
                None
            }
        };
        for (i, r) in self.routes.iter().enumerate() {
            if r.anonymous && r.auth.is_some() {
                err(
                    format!("routes[{i}].anonymous"),
                    "a route is either anonymous or lists auth methods, not both".into(),
                );
            }
        }
        for (key, message) in self.ratelimit.check() {
            err(key, message);
        }
        for (i, r) in self.authz.rules.iter().enumerate() {
            if r.id.is_empty() {
                err(
                    format!("authz.rules[{i}].id"),
                    "give each rule an id (it names the decision in the audit log)".into(),
                );
            }
        }

        if errs.is_empty() {
            Ok(Resolved {
                listen,
                admin,
                clusters,
                config: self,
                catalog: Catalog::new(models),
                route_schemas,
                xdp_allow,
                xdp_block,
                tls_listen,
                tls,
                authn,
            })
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

impl Resolved {
    /// Parse, validate and resolve a file.
    pub fn from_file(path: &Path) -> Result<Resolved, ConfigErrors> {
        let (c, text) = Config::load(path)?;
        c.validate(&text, &path.display().to_string())
    }

    pub fn from_str(text: &str, file: &str) -> Result<Resolved, ConfigErrors> {
        Config::parse(text, file)?.validate(text, file)
    }
}

/// Read and compile a JSON Schema file (once, at load).
fn load_schema_file(path: &Path) -> Result<Arc<jsonschema::Validator>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read schema {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("schema {} is not JSON: {e}", path.display()))?;
    jsonschema::validator_for(&value)
        .map(Arc::new)
        .map_err(|e| format!("schema {} is not a valid JSON Schema: {e}", path.display()))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Every address a backend name resolves to (a Kubernetes headless
/// Service answers with one per pod), sorted, without duplicates.
pub fn resolve_all(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if !s.contains(':') {
        return Err(format!("`{s}` needs a port, e.g. \"{s}:8000\""));
    }
    match s.to_socket_addrs() {
        Ok(it) => {
            let mut v: Vec<SocketAddr> = it.collect();
            v.sort();
            v.dedup();
            if v.is_empty() {
                Err(format!("`{s}` resolved to no address"))
            } else {
                Ok(v)
            }
        }
        Err(e) => Err(format!("cannot resolve `{s}`: {e}")),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Pull the offending key out of a serde message like "unknown field `foo`, expected …".
fn key_from_message(msg: &str) -> String {
    for marker in ["unknown field `", "missing field `", "duplicate key `"] {
        if let Some(rest) = msg.split(marker).nth(1) {
            if let Some(end) = rest.find('`') {
                return rest[..end].to_string();
            }
        }
    }
    String::new()
}

/// Byte offset of a dotted key path such as `routes[2].cluster` in the source:
/// the deepest part of the path that exists in the document.
fn locate(doc: &toml_edit::ImDocument<&str>, path: &str) -> Option<usize> {
    let mut item = doc.as_item();
    let mut best = None;
    for seg in path.split('.') {
        let (name, idx) = match seg.find('[') {
            Some(p) => (&seg[..p], seg[p + 1..seg.len() - 1].parse::<usize>().ok()),
            None => (seg, None),
        };
        let Some(next) = item.get(name) else {
            return best;
        };
        item = next;
        best = item.span().map(|s| s.start).or(best);
        if let Some(i) = idx {
            let Some(next) = item.get(i) else { return best };
            item = next;
            best = item.span().map(|s| s.start).or(best);
        }
    }
    best
}

/// Where a config came from, for messages.
pub fn source_name(path: Option<&PathBuf>) -> String {
    path.map(|p| p.display().to_string())
        .unwrap_or_else(|| "<embedded default>".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let r = Resolved::from_str(DEFAULT_CONFIG, "default").unwrap();
        assert!(!r.listen.is_empty());
        assert!(r.clusters.contains_key("demo"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 3\n";
        let e = Config::parse(text, "x.toml").unwrap_err();
        assert_eq!(e.0[0].line, Some(3), "{e}");
        assert_eq!(e.0[0].key, "lisen");
        assert!(e.to_string().starts_with("x.toml:3: `lisen`"), "{e}");
    }

    #[test]
    fn validation_errors_point_at_the_route_line() {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"a\"\n\n[[routes]]\npath_prefix = \"/v1\"\ncluster = \"b\"\n";
        let e = Config::parse(text, "x.toml")
            .unwrap()
            .validate(text, "x.toml")
            .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "routes[1].cluster");
        assert_eq!(e.0[0].line, Some(10), "{e}");
        assert!(e.0[0].message.contains("define [clusters.b]"));
    }

    #[test]
    fn catalogue_and_protocol_rules() {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n\n[[routes]]\nprotocol = \"openai\"\ncluster = \"a\"\n";
        let e = Config::parse(text, "x")
            .unwrap()
            .validate(text, "x")
            .unwrap_err();
        assert_eq!(e.0[0].key, "routes[0].protocol", "{e}");
        let text = format!("{text}\n[[models]]\nname = \"m\"\nversions = [\"1.x\"]\n");
        let e = Config::parse(&text, "x")
            .unwrap()
            .validate(&text, "x")
            .unwrap_err();
        assert_eq!(e.0[0].key, "models[0].versions[0]", "{e}");
        assert_eq!(e.0[0].line, Some(10), "{e}");
        let text = text.replace("1.x", "1.2");
        let r = Config::parse(&text, "x")
            .unwrap()
            .validate(&text, "x")
            .unwrap();
        assert!(r
            .catalog
            .resolve("m", &crate::catalog::VersionReq::Latest)
            .is_ok());
        let bad_schema = format!("{text}schema = \"/nonexistent/schema.json\"\n");
        let e = Config::parse(&bad_schema, "x")
            .unwrap()
            .validate(&bad_schema, "x")
            .unwrap_err();
        assert_eq!(e.0[0].key, "models[0].schema", "{e}");
    }

    #[test]
    fn bad_duration_and_workers_are_rejected() {
        assert!(Config::parse("[timeouts]\nclient_idle = \"ten\"\n", "x").is_err());
        assert!(Config::parse("[server]\nworkers = 0\n", "x").is_err());
        assert!(Config::parse("[server]\nworkers = \"many\"\n", "x").is_err());
        let c = Config::parse("[server]\nworkers = 3\n", "x").unwrap();
        assert_eq!(c.server.workers, Workers::Count(3));
    }

    #[test]
    fn xdp_section_is_checked() {
        let check = |xdp: &str| {
            let text = format!(
                "{}\n{xdp}",
                DEFAULT_CONFIG
                    .replace("[xdp]", "[xdp_unused]")
                    .split("[xdp_unused]")
                    .next()
                    .unwrap()
            );
            Resolved::from_str(&text, "t.toml")
                .map(|r| (r.xdp_allow, r.xdp_block))
                .map_err(|e| e.to_string())
        };
        let (allow, block) = check("[xdp]\nallow = [\"10.0.0.0/8\", \"fd00::/8\"]\nblock = [\"203.0.113.7\", \"2001:db8::1\"]\n").unwrap();
        assert_eq!(allow.len(), 2);
        assert_eq!(block.len(), 2);
        let e = check("[xdp]\nallow = [\"10.0.0.1/8\"]\n").unwrap_err();
        assert!(
            e.contains("xdp.allow[0]") && e.contains("did you mean 10.0.0.0/8"),
            "{e}"
        );
        let e = check("[xdp]\nallow = [\"10.0.0.0/8\"]\nblock = [\"10.1.1.1\"]\n").unwrap_err();
        assert!(
            e.contains("xdp.block[0]") && e.contains("allowlisted"),
            "{e}"
        );
        let e = check("[xdp]\nblock = [\"not-an-ip\"]\n").unwrap_err();
        assert!(e.contains("not an IPv4 or IPv6 address"), "{e}");
        let e = check("[xdp]\nsyn_rate = 10\nsyn_burst = 0\n").unwrap_err();
        assert!(e.contains("xdp.syn_burst"), "{e}");
        let e = check("[xdp]\nmax_blocked = 0\n").unwrap_err();
        assert!(e.contains("xdp.max_blocked"), "{e}");
        let e = check("[xdp]\ndefault_block_ttl = \"40d\"\n").unwrap_err();
        assert!(e.contains("xdp.default_block_ttl"), "{e}");
        let e = check("[xdp]\ninterfaces = [\"eth0/1\"]\n").unwrap_err();
        assert!(e.contains("xdp.interfaces[0]"), "{e}");
        let e = check("[xdp]\nmode = \"drop\"\n").unwrap_err();
        assert!(e.contains("mode") || e.contains("unknown variant"), "{e}");
    }
}
