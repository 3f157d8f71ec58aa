//! Stage 8 — route: host + path + method → a named upstream cluster.
//!
//! Outcome: `Some(&Route)` → continue to the upstream stage; `None` → 404.
//!
//! Precedence (like Envoy virtual hosts): routes for the exact host first,
//! then wildcard hosts (`*.example.com`, longest suffix first), then routes
//! with no host; inside each group, the order of the config file. The path is
//! matched on its raw bytes, before `?`.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{Config, Timeouts};

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Position in the config's `[[routes]]` (indexes per-route rules).
    pub index: usize,
    /// Index into the worker's cluster list.
    pub cluster: usize,
    pub cluster_name: String,
    matcher: PathMatch,
    methods: Option<Vec<String>>,
    pub max_request_body_bytes: u64,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// `None` = no limit.
    pub total_timeout: Option<Duration>,
    /// Authentication methods accepted (every one when the route lists none).
    pub auth: Vec<crate::config::AuthMethod>,
    /// No credentials needed, no authorization.
    pub anonymous: bool,
    /// Queue band when its cluster is saturated (`None`: the tenant class's).
    pub priority: Option<i32>,
}

#[derive(Debug, Clone)]
enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl Route {
    fn matches(&self, path: &[u8], method: &[u8]) -> bool {
        let path_ok = match &self.matcher {
            PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
            PathMatch::Exact(p) => path == p.as_bytes(),
        };
        path_ok
            && self
                .methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|m| m.as_bytes() == method))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    exact_hosts: HashMap<String, Vec<usize>>,
    /// (suffix including the dot, route indexes), longest suffix first.
    wildcard_hosts: Vec<(String, Vec<usize>)>,
    any_host: Vec<usize>,
}

impl Router {
    /// Build from a validated config; `cluster_names` gives the cluster index order.
    pub fn new(config: &Config, cluster_names: &[String]) -> Router {
        let mut r = Router::default();
        let t: &Timeouts = &config.timeouts;
        for (i, rc) in config.routes.iter().enumerate() {
            let cluster = cluster_names
                .iter()
                .position(|c| *c == rc.cluster)
                .expect("validated: cluster exists");
            let matcher = match (&rc.path_exact, &rc.path_prefix) {
                (Some(p), _) => PathMatch::Exact(p.clone()),
                (None, Some(p)) => PathMatch::Prefix(p.clone()),
                (None, None) => PathMatch::Prefix("/".into()),
            };
            let total = rc.timeouts.total.unwrap_or(t.total);
            r.routes.push(Route {
                name: rc.name.clone().unwrap_or_else(|| format!("route{i}")),
                index: i,
                cluster,
                cluster_name: rc.cluster.clone(),
                matcher,
                methods: rc.methods.clone(),
                max_request_body_bytes: rc
                    .max_request_body_bytes
                    .unwrap_or(config.limits.max_request_body_bytes),
                connect_timeout: rc.timeouts.upstream_connect.unwrap_or(t.upstream_connect),
                response_timeout: rc.timeouts.upstream_response.unwrap_or(t.upstream_response),
                total_timeout: (!total.is_zero()).then_some(total),
                auth: rc.auth.clone().unwrap_or_else(|| {
                    use crate::config::AuthMethod;
                    vec![AuthMethod::Jwt, AuthMethod::ApiKey, AuthMethod::Mtls]
                }),
                anonymous: rc.anonymous,
                priority: rc.priority,
            });
            match rc.host.as_deref().map(str::to_ascii_lowercase) {
                None => r.any_host.push(i),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => match r.wildcard_hosts.iter_mut().find(|(s, _)| s == suffix) {
                        Some((_, v)) => v.push(i),
                        None => r.wildcard_hosts.push((suffix.to_string(), vec![i])),
                    },
                    None => r.exact_hosts.entry(h).or_default().push(i),
                },
            }
        }
        r.wildcard_hosts
            .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        r
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Find the route for a request. `host` is the raw Host header (port and
    /// case are normalised here); `target` the raw request target.
    pub fn route(&self, host: &[u8], target: &[u8], method: &[u8]) -> Option<&Route> {
        let path = match memchr::memchr(b'?', target) {
            Some(q) => &target[..q],
            // `OPTIONS *` asks about the server as a whole: route it like `/`.
            None if target == b"*" => b"/",
            None => target,
        };
        let host = strip_port(host);
        let mut lower = [0u8; 256];
        let host_known = host.len() <= lower.len();
        if host_known && (!self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty()) {
            let n = host.len();
            for (d, s) in lower[..n].iter_mut().zip(host) {
                *d = s.to_ascii_lowercase();
            }
            let h = std::str::from_utf8(&lower[..n]).unwrap_or("");
            if let Some(ids) = self.exact_hosts.get(h) {
                if let Some(r) = self.first(ids, path, method) {
                    return Some(r);
                }
            }
            for (suffix, ids) in &self.wildcard_hosts {
                if h.len() > suffix.len() && h.ends_with(suffix.as_str()) {
                    if let Some(r) = self.first(ids, path, method) {
                        return Some(r);
                    }
                }
            }
        }
        self.first(&self.any_host, path, method)
    }

    fn first(&self, ids: &[usize], path: &[u8], method: &[u8]) -> Option<&Route> {
        ids.iter()
            .map(|&i| &self.routes[i])
            .find(|r| r.matches(path, method))
    }
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match memchr::memchr(b']', host) {
            Some(e) => &host[..=e],
            None => host,
        };
    }
    match memchr::memrchr(b':', host) {
        Some(c) => &host[..c],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let c = Config::parse(toml, "t").unwrap();
        let names: Vec<String> = c.clusters.keys().cloned().collect();
        Router::new(&c, &names)
    }

    const CONF: &str = r#"
[clusters.a]
backends = ["127.0.0.1:1"]
[clusters.b]
backends = ["127.0.0.1:2"]
[clusters.c]
backends = ["127.0.0.1:3"]

[[routes]]
name = "health"
path_exact = "/healthz"
cluster = "c"

[[routes]]
name = "api-chat"
host = "api.example.com"
path_prefix = "/v1/chat"
methods = ["POST"]
cluster = "a"

[[routes]]
name = "wild"
host = "*.example.com"
path_prefix = "/"
cluster = "b"

[[routes]]
name = "fallback"
path_prefix = "/v1/"
cluster = "c"
"#;

    #[test]
    fn precedence_and_matching() {
        let r = router(CONF);
        let name = |h: &str, p: &str, m: &str| {
            r.route(h.as_bytes(), p.as_bytes(), m.as_bytes())
                .map(|r| r.name.clone())
        };
        assert_eq!(
            name("API.example.com:443", "/v1/chat/completions", "POST").as_deref(),
            Some("api-chat")
        );
        // Method mismatch falls through to the wildcard host.
        assert_eq!(
            name("api.example.com", "/v1/chat/completions", "GET").as_deref(),
            Some("wild")
        );
        assert_eq!(
            name("x.example.com", "/anything", "GET").as_deref(),
            Some("wild")
        );
        // The bare domain does not match `*.example.com`.
        assert_eq!(
            name("example.com", "/v1/models", "GET").as_deref(),
            Some("fallback")
        );
        assert_eq!(name("other", "/healthz", "GET").as_deref(), Some("health"));
        assert_eq!(
            name("other", "/healthz?x", "GET").as_deref(),
            Some("health")
        );
        assert_eq!(name("other", "/healthzz", "GET"), None);
        assert_eq!(name("other", "/v2/x", "GET"), None);
        assert_eq!(
            name("[::1]:8080", "/v1/x", "GET").as_deref(),
            Some("fallback")
        );
    }
}
