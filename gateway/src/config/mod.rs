//! Typed configuration: one TOML file → CLI overrides → [`Config::validate`].
//!
//! Every key is typed, unknown keys are errors, and every error names the
//! file, the line and the key, and says how to fix it. Each pipeline stage
//! receives only its own slice (`Limits`, `Timeouts`, a `ClusterConfig`, …).
//!
//! This module owns every settings type: plain serde data, one file per
//! section, each with its own checks ([`Config::check`] lists them in
//! order). It depends on no pipeline stage — the stages import their slice
//! from here — and builds nothing that loads keys or certificates: that is
//! the `generation` module's work, from the [`Checked`] form this produces.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::catalog::Catalog;

pub mod authn;
pub mod clusters;
pub mod models;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod tls;
pub mod xdp;

pub use authn::{
    ApiKeyClient, AuthnSettings, AuthzRule, AuthzSettings, IdentityHeaders, JwtIssuerSettings,
    MtlsClient,
};
pub use clusters::{
    resolve_all, Algorithm, BalanceSettings, ClusterConfig, Engine, Fairness, QueueSettings,
    UpstreamHttp, UpstreamTls,
};
pub use models::{ModelConfig, ShadowTarget, SplitTarget};
pub use ratelimit::RateLimitSettings;
pub use routes::{AuthMethod, Protocol, RouteConfig, RouteTimeouts};
pub use server::{
    AdminConfig, DriverChoice, Http2Settings, Limits, LogConfig, LogFormat, ServerConfig, Timeouts,
    TracingConfig, Workers, MAX_HEADERS,
};
pub use tls::{CertificateFiles, ClientAuth, TlsListener, TlsSettings, TlsVersion};
pub use xdp::{Cidr, XdpAttach, XdpMode, XdpSettings};

/// The configuration `gateway run` uses when no file is given
/// (`gateway config default` prints it).
pub const DEFAULT_CONFIG: &str = include_str!("../../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// HTTP/2 connections from clients (`server.h2c`).
    #[serde(default)]
    pub http2: Http2Settings,
    #[serde(default)]
    pub log: LogConfig,
    /// OpenTelemetry traces (OTLP/HTTP).
    #[serde(default)]
    pub tracing: TracingConfig,
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
    pub ratelimit: RateLimitSettings,
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

/// Where validation reports problems: each with the file, and the line of
/// its key in the source.
pub struct Sink<'a> {
    text: &'a str,
    file: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
    errors: Vec<ConfigError>,
}

impl<'a> Sink<'a> {
    /// `text` is the source of `file` (for line numbers).
    pub fn new(text: &'a str, file: &'a str) -> Sink<'a> {
        Sink {
            text,
            file,
            doc: toml_edit::ImDocument::parse(text).ok(),
            errors: Vec::new(),
        }
    }

    /// The file checked, as named in messages.
    pub fn file(&self) -> &str {
        self.file
    }

    /// Report a problem with `key` (a dotted path such as `routes[2].cluster`).
    pub fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let line = self
            .doc
            .as_ref()
            .and_then(|d| locate(d, &key))
            .map(|off| line_of(self.text, off));
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            key,
            message: message.into(),
        });
    }

    /// `value` when nothing was reported, else every problem, in order.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

/// The checked, resolved form of a configuration: plain data every stage is
/// built from (the `generation` module adds the built TLS and
/// authentication stages).
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: Config,
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub clusters: BTreeMap<String, Vec<SocketAddr>>,
    pub catalog: Catalog,
    /// Compiled JSON Schema of each route (by route index), if it has one.
    pub route_schemas: Vec<Option<Arc<jsonschema::Validator>>>,
    /// `[xdp] allow`, parsed.
    pub xdp_allow: Vec<Cidr>,
    /// `[xdp] block`, parsed.
    pub xdp_block: Vec<IpAddr>,
    /// `[tls] listen`, parsed.
    pub tls_listen: Vec<SocketAddr>,
    /// `[tls]` with its files resolved against the config file's directory.
    pub tls_settings: TlsSettings,
    /// `[authn]` with its files resolved against the config file's directory.
    pub authn_settings: AuthnSettings,
}

impl Config {
    /// Parse TOML text; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        toml::from_str::<Config>(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = key_from_message(e.message());
            // Some syntax errors carry no message of their own (a control
            // character in a comment, found by fuzzing): never an empty one.
            let message = match e.message().trim() {
                "" => "invalid TOML here: a syntax error or a control character".to_string(),
                m => m.to_string(),
            };
            ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
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
    pub fn validate(self, text: &str, file: &str) -> Result<Checked, ConfigErrors> {
        let mut sink = Sink::new(text, file);
        let checked = self.check(&mut sink, &mut ());
        sink.finish(checked)
    }

    /// Check every section, in this order, reporting to `sink`; `build`
    /// builds what it needs from a section right after that section's checks
    /// (so its errors stand in the list where the section's do). What was
    /// resolved comes back either way: whole when nothing was reported.
    pub fn check(self, sink: &mut Sink, build: &mut impl Build) -> Checked {
        let base = Path::new(sink.file())
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let (listen, admin) =
            server::check_server(&self.server, &self.admin, &self.log, &self.tls.listen, sink);
        server::check_head_limits(&self.limits, self.server.buffer_size, sink);
        server::check_timeouts(&self.timeouts, sink);
        server::check_tracing(&self.tracing, sink);
        let clusters = clusters::check_clusters(&self.clusters, sink);
        build.upstream_tls(&self.clusters, &base, sink);
        models::check_model_pools(&self.models, &self.clusters, sink);
        routes::check_routes(&self.routes, &self.clusters, sink);
        let catalog = models::check_catalog(&self.models, &base, sink);
        let has_models = !self.models.is_empty();
        let route_schemas = routes::check_bodies(&self.routes, has_models, &base, sink);
        server::check_json_limits(&self.limits, sink);
        let (xdp_allow, xdp_block) = xdp::check_xdp(&self.xdp, sink);
        let (tls_listen, tls_settings) = tls::check_tls(&self.tls, &listen, admin, &base, sink);
        build.tls(&tls_listen, &tls_settings, sink);
        let authn_settings = authn::check_authn(&self.authn, &base, sink);
        build.authn(&authn_settings, &self.authz, sink);
        routes::check_route_auth(&self.routes, sink);
        ratelimit::check_ratelimit(&self.ratelimit, sink);
        authn::check_authz(&self.authz, sink);
        Checked {
            config: self,
            listen,
            admin,
            clusters,
            catalog,
            route_schemas,
            xdp_allow,
            xdp_block,
            tls_listen,
            tls_settings,
            authn_settings,
        }
    }
}

/// What a caller builds from checked sections while [`Config::check`] runs
/// (`generation.rs`: the TLS certificates, the authentication stage). The
/// defaults build nothing: `()` checks data only.
pub trait Build {
    fn tls(&mut self, _listen: &[SocketAddr], _settings: &TlsSettings, _sink: &mut Sink) {}
    /// TLS to a cluster's backends (`[clusters.X.tls]`; paths under `base`).
    fn upstream_tls(
        &mut self,
        _clusters: &BTreeMap<String, ClusterConfig>,
        _base: &Path,
        _sink: &mut Sink,
    ) {
    }
    fn authn(&mut self, _settings: &AuthnSettings, _authz: &AuthzSettings, _sink: &mut Sink) {}
}

impl Build for () {}

impl Checked {
    pub fn from_str(text: &str, file: &str) -> Result<Checked, ConfigErrors> {
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
    #[test]
    fn a_syntax_error_without_a_message_still_says_what_and_where() {
        // Found by `cargo xtask fuzz config`: a control character in a comment.
        let text = "[server]\n# a comment \x1f here\nworkers = 1\n";
        let e = Config::parse(text, "x.toml").unwrap_err();
        assert!(!e.0[0].message.is_empty());
        assert_eq!(e.0[0].line, Some(2));
    }

    use super::*;

    #[test]
    fn default_config_is_valid() {
        let r = Checked::from_str(DEFAULT_CONFIG, "default").unwrap();
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
            Checked::from_str(&text, "t.toml")
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
