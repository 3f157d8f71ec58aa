//! `[[routes]]`: which requests go to which cluster, what their bodies must
//! be, and who may send them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{load_schema_file, opt_duration, valid_name, ClusterConfig, Sink};
use crate::syntax::{media_type, parse_pointer};

/// How a client may prove who it is (`routes.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    Mtls,
}

/// What a route's requests are, for the validation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Forwarded as is; only the generic checks (content type, size, optional schema).
    #[default]
    Passthrough,
    /// OpenAI-compatible (as vLLM serves it): chat, completions, embeddings,
    /// responses, rerank/score/classify/pooling, tokenize, audio uploads,
    /// `GET /v1/models`; errors as OpenAI's API writes them.
    Openai,
    /// KServe v2 / Open Inference Protocol REST: `/v2/models/{name}[/versions/{v}]/infer`
    /// (JSON or Triton's binary tensor extension), metadata, ready;
    /// errors as `{"error": "<message>"}`.
    Kserve,
    /// gRPC over HTTP/2 (h2c clients), relayed frame by frame to an h2c
    /// cluster with its trailers; refusals as gRPC statuses in trailers.
    Grpc,
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
    /// Queue band of this route's requests when its cluster is saturated
    /// (`[clusters.X.queue]`; higher first); unset: the caller's tenant
    /// class's `priority`.
    #[serde(default)]
    pub priority: Option<i32>,
}

/// Each route's match (host, path, methods), name and cluster.
pub(super) fn check_routes(
    routes: &[RouteConfig],
    clusters: &BTreeMap<String, ClusterConfig>,
    sink: &mut Sink,
) {
    if routes.is_empty() {
        sink.err(
            "routes",
            "add at least one [[routes]] entry naming a cluster",
        );
    }
    let mut names = HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if !clusters.contains_key(&r.cluster) {
            let known: Vec<_> = clusters.keys().cloned().collect();
            sink.err(
                format!("{key}.cluster"),
                format!(
                    "no cluster `{}`; define [clusters.{}] or use one of: {}",
                    r.cluster,
                    r.cluster,
                    known.join(", ")
                ),
            );
        }
        check_match(&key, r, sink);
        if let Some(n) = &r.name {
            if !valid_name(n) {
                sink.err(
                    format!("{key}.name"),
                    "route names use letters, digits, '-', '_' and '.'",
                );
            }
            if !names.insert(n.clone()) {
                sink.err(
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
                sink.err(format!("{key}.timeouts.{k}"), "must be more than 0");
            }
        }
    }
}

/// A route's path, host and methods (`key` is `routes[i]`).
fn check_match(key: &str, r: &RouteConfig, sink: &mut Sink) {
    if r.path_prefix.is_some() && r.path_exact.is_some() {
        sink.err(key, "give path_prefix or path_exact, not both");
    }
    for (k, p) in [
        ("path_prefix", &r.path_prefix),
        ("path_exact", &r.path_exact),
    ] {
        if let Some(p) = p {
            if !p.starts_with('/') {
                sink.err(format!("{key}.{k}"), format!("`{p}` must start with '/'"));
            }
        }
    }
    if let Some(h) = &r.host {
        let bare = h.strip_prefix("*.").unwrap_or(h);
        if bare.is_empty() || bare.contains('*') || bare.contains('/') || bare.contains(' ') {
            sink.err(
                format!("{key}.host"),
                format!("`{h}` must be a host name like \"api.example.com\" or \"*.example.com\""),
            );
        }
    }
    if let Some(ms) = &r.methods {
        if ms.is_empty() {
            sink.err(
                format!("{key}.methods"),
                "leave methods out to allow any, or list at least one",
            );
        }
        for (j, m) in ms.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                sink.err(
                    format!("{key}.methods[{j}]"),
                    format!("`{m}` must be an upper-case method such as \"POST\""),
                );
            }
        }
    }
}

/// What each route's bodies must be: its JSON Schema (compiled; the path is
/// relative to `base`, the config file's directory), content types, the
/// response fields it drops, and a catalogue for `openai`/`kserve`.
pub(super) fn check_bodies(
    routes: &[RouteConfig],
    has_models: bool,
    base: &Path,
    sink: &mut Sink,
) -> Vec<Option<Arc<jsonschema::Validator>>> {
    let mut schemas = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        schemas.push(
            match r.schema.as_deref().map(|p| load_schema_file(&base.join(p))) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    sink.err(format!("routes[{i}].schema"), e);
                    None
                }
                None => None,
            },
        );
        for (j, ct) in r.content_types.iter().flatten().enumerate() {
            if media_type(ct.as_bytes()).is_none() {
                sink.err(
                    format!("routes[{i}].content_types[{j}]"),
                    format!("`{ct}` is not a media type such as \"application/json\""),
                );
            }
        }
        // The first bad pointer, as the response filter would report it.
        if let Err(e) = r
            .response_drop_fields
            .iter()
            .try_for_each(|p| parse_pointer(p).map(drop))
        {
            sink.err(format!("routes[{i}].response_drop_fields"), e);
        }
        if matches!(r.protocol, Protocol::Openai | Protocol::Kserve) && !has_models {
            sink.err(
                format!("routes[{i}].protocol"),
                "an openai or kserve route needs a model catalogue: add [[models]] entries",
            );
        }
    }
    schemas
}

/// A route is anonymous or lists auth methods, not both.
pub(super) fn check_route_auth(routes: &[RouteConfig], sink: &mut Sink) {
    for (i, r) in routes.iter().enumerate() {
        if r.anonymous && r.auth.is_some() {
            sink.err(
                format!("routes[{i}].anonymous"),
                "a route is either anonymous or lists auth methods, not both",
            );
        }
    }
}
