//! `[[models]]`: the model catalogue the validation stage resolves requests
//! against, and the pools that serve each model.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, load_schema_file, valid_name, ClusterConfig, Sink};
use crate::catalog::{Catalog, Model, ModelLimits, Version};

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

/// The pools each model names (`cluster`, `version_clusters`, `split`,
/// `shadow`) exist, and its split and shadow are sound.
pub(super) fn check_model_pools(
    models: &[ModelConfig],
    clusters: &BTreeMap<String, ClusterConfig>,
    sink: &mut Sink,
) {
    for (i, m) in models.iter().enumerate() {
        if let Some(c) = &m.cluster {
            if !clusters.contains_key(c) {
                sink.err(format!("models[{i}].cluster"), format!("no cluster `{c}`"));
            }
        }
        for (v, c) in &m.version_clusters {
            if !clusters.contains_key(c) {
                sink.err(
                    format!("models[{i}].version_clusters.{v}"),
                    format!("no cluster `{c}`"),
                );
            }
            if !m.versions.contains(v) {
                sink.err(
                    format!("models[{i}].version_clusters.{v}"),
                    format!("`{v}` is not one of the model's versions"),
                );
            }
        }
        for (j, t) in m.split.iter().enumerate() {
            if !clusters.contains_key(&t.cluster) {
                sink.err(
                    format!("models[{i}].split[{j}].cluster"),
                    format!("no cluster `{}`", t.cluster),
                );
            }
        }
        if let Some(sh) = &m.shadow {
            check_shadow(i, sh, clusters, sink);
        }
        if !m.split.is_empty() && m.split.iter().all(|t| t.weight == 0) {
            sink.err(
                format!("models[{i}].split"),
                "at least one weight must be above 0",
            );
        }
    }
}

fn check_shadow(
    i: usize,
    sh: &ShadowTarget,
    clusters: &BTreeMap<String, ClusterConfig>,
    sink: &mut Sink,
) {
    if !clusters.contains_key(&sh.cluster) {
        sink.err(
            format!("models[{i}].shadow.cluster"),
            format!("no cluster `{}`", sh.cluster),
        );
    }
    if !(sh.fraction > 0.0 && sh.fraction <= 1.0) || sh.max_inflight == 0 || sh.timeout.is_zero() {
        sink.err(
            format!("models[{i}].shadow"),
            "fraction is in (0, 1], max_inflight and timeout above 0",
        );
    }
}

/// The catalogue: each model's name, versions, limits and schema (schema
/// paths are relative to `base`, the config file's directory).
pub(super) fn check_catalog(models: &[ModelConfig], base: &Path, sink: &mut Sink) -> Catalog {
    let mut catalog = Vec::new();
    let mut names = HashSet::new();
    for (i, m) in models.iter().enumerate() {
        let key = format!("models[{i}]");
        if !valid_name(&m.name) {
            sink.err(
                format!("{key}.name"),
                "model names use letters, digits, '-', '_' and '.'",
            );
        }
        if !names.insert(m.name.clone()) {
            sink.err(
                format!("{key}.name"),
                format!("model `{}` is defined twice", m.name),
            );
        }
        catalog.push(check_model(&key, m, base, sink));
    }
    Catalog::new(catalog)
}

/// One `[[models]]` entry (`key` is `models[i]`), as the catalogue holds it.
fn check_model(key: &str, m: &ModelConfig, base: &Path, sink: &mut Sink) -> Model {
    let mut versions = Vec::new();
    for (j, v) in m.versions.iter().enumerate() {
        match Version::parse(v) {
            Some(v) => versions.push(v),
            None => sink.err(
                format!("{key}.versions[{j}]"),
                format!("`{v}` is not a version such as \"1\", \"1.2\" or \"1.2.3\""),
            ),
        }
    }
    if versions.is_empty() {
        sink.err(
            format!("{key}.versions"),
            "list at least one deployed version",
        );
    }
    versions.sort();
    for (k, r) in [("temperature", m.temperature), ("top_p", m.top_p)] {
        if r.is_some_and(|[lo, hi]| !(lo.is_finite() && hi.is_finite() && lo <= hi)) {
            sink.err(format!("{key}.{k}"), "give [low, high] with low <= high");
        }
    }
    let schema = match m.schema.as_deref().map(|p| load_schema_file(&base.join(p))) {
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            sink.err(format!("{key}.schema"), e);
            None
        }
        None => None,
    };
    let d = ModelLimits::default();
    Model {
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
    }
}
