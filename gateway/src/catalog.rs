//! The model catalogue: which models exist, which versions are deployed,
//! whether they are enabled, and their per-model request limits. The
//! validation stage resolves every request's model and version here.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A deployed version: dotted numbers (`1`, `1.2`, `1.2.3`), compared numerically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    parts: Vec<u64>,
    raw: String,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        if s.is_empty() || s.len() > 32 {
            return None;
        }
        let s2 = s.strip_prefix('v').unwrap_or(s);
        let parts: Option<Vec<u64>> = s2
            .split('.')
            .map(|p| {
                p.parse::<u64>()
                    .ok()
                    .filter(|_| !p.is_empty() && p.len() <= 9)
            })
            .collect();
        let mut parts = parts?;
        if parts.is_empty() || parts.len() > 4 {
            return None;
        }
        // 1.2 == 1.2.0 when comparing.
        while parts.len() > 1 && parts.last() == Some(&0) {
            parts.pop();
        }
        Some(Version {
            parts,
            raw: s.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// What a request asks for: `latest`, a pinned version, or "this one or later".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionReq {
    Latest,
    Exact(Version),
    AtLeast(Version),
}

impl VersionReq {
    /// `latest`, `1.2` (pinned), `>=1.2` (1.2 or later), `^1.2`… no: only these three forms.
    pub fn parse(s: &str) -> Option<VersionReq> {
        let s = s.trim();
        if s.is_empty() || s == "latest" {
            return Some(VersionReq::Latest);
        }
        if let Some(rest) = s.strip_prefix(">=") {
            return Version::parse(rest.trim()).map(VersionReq::AtLeast);
        }
        Version::parse(s).map(VersionReq::Exact)
    }
}

/// Limits a model puts on what it is asked to do.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    /// Prompt + output tokens the model's context holds.
    pub context_tokens: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub temperature: (f64, f64),
    pub top_p: (f64, f64),
    pub max_n: u64,
}

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            context_tokens: None,
            max_output_tokens: None,
            temperature: (0.0, 2.0),
            top_p: (0.0, 1.0),
            max_n: 16,
        }
    }
}

pub struct Model {
    pub name: String,
    /// Deployed versions, ascending.
    pub versions: Vec<Version>,
    pub enabled: bool,
    pub limits: ModelLimits,
    /// Compiled once at load (and on reload), never per request.
    pub schema: Option<Arc<jsonschema::Validator>>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("versions", &self.versions)
            .field("enabled", &self.enabled)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

/// Why a model reference did not resolve. Unknown and disabled models look
/// the same to the client (404) but not in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    UnknownModel,
    Disabled,
    NoSuchVersion,
    BadVersion,
}

impl Unresolved {
    pub fn reason(self) -> &'static str {
        match self {
            Unresolved::UnknownModel => "model_not_found",
            Unresolved::Disabled => "model_disabled",
            Unresolved::NoSuchVersion => "version_not_found",
            Unresolved::BadVersion => "invalid_version",
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    models: BTreeMap<String, Arc<Model>>,
}

impl Catalog {
    pub fn new(models: Vec<Model>) -> Catalog {
        Catalog {
            models: models
                .into_iter()
                .map(|m| (m.name.clone(), Arc::new(m)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Whether the catalogue has a model of this name (enabled or not).
    pub fn contains(&self, name: &str) -> bool {
        self.models.contains_key(name)
    }

    /// Enabled models, by name.
    pub fn enabled(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values().filter(|m| m.enabled)
    }

    /// Resolve `name` and a version requirement to a deployed version.
    pub fn resolve(
        &self,
        name: &str,
        req: &VersionReq,
    ) -> Result<(&Arc<Model>, &Version), Unresolved> {
        let m = self.models.get(name).ok_or(Unresolved::UnknownModel)?;
        if !m.enabled {
            return Err(Unresolved::Disabled);
        }
        let v = match req {
            VersionReq::Latest => m.versions.last(),
            VersionReq::Exact(want) => m.versions.iter().find(|v| v.parts == want.parts),
            VersionReq::AtLeast(min) => m.versions.iter().rev().find(|v| v.parts >= min.parts),
        };
        v.map(|v| (m, v)).ok_or(Unresolved::NoSuchVersion)
    }

    /// Resolve an OpenAI-style `model` field: `name`, or `name@latest`,
    /// `name@1.2`, `name@>=1.2`; `header` (`x-model-version`) overrides the suffix.
    pub fn resolve_ref(
        &self,
        model: &str,
        header: Option<&str>,
    ) -> Result<(&Arc<Model>, &Version), Unresolved> {
        let (name, suffix) = match model.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (model, None),
        };
        let spec = header.or(suffix).unwrap_or("latest");
        let req = VersionReq::parse(spec).ok_or(Unresolved::BadVersion)?;
        self.resolve(name, &req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, versions: &[&str], enabled: bool) -> Model {
        let mut vs: Vec<Version> = versions
            .iter()
            .map(|v| Version::parse(v).unwrap())
            .collect();
        vs.sort();
        Model {
            name: name.into(),
            versions: vs,
            enabled,
            limits: ModelLimits::default(),
            schema: None,
        }
    }

    #[test]
    fn version_resolution() {
        let c = Catalog::new(vec![
            model("llama", &["1.0", "1.2.0", "1.10", "2"], true),
            model("off", &["1"], false),
        ]);
        let r = |m: &str, h: Option<&str>| {
            c.resolve_ref(m, h)
                .map(|(m, v)| format!("{}@{}", m.name, v))
        };
        assert_eq!(r("llama", None).unwrap(), "llama@2");
        assert_eq!(r("llama@latest", None).unwrap(), "llama@2");
        assert_eq!(r("llama@1.2", None).unwrap(), "llama@1.2.0");
        assert_eq!(r("llama@1.2.0", None).unwrap(), "llama@1.2.0");
        assert_eq!(r("llama@>=1.3", None).unwrap(), "llama@2");
        assert_eq!(r("llama@>=1.10", None).unwrap(), "llama@2");
        assert_eq!(r("llama", Some("1.10")).unwrap(), "llama@1.10");
        assert_eq!(r("llama@1.5", None), Err(Unresolved::NoSuchVersion));
        assert_eq!(r("llama@>=3", None), Err(Unresolved::NoSuchVersion));
        assert_eq!(r("llama@x.y", None), Err(Unresolved::BadVersion));
        assert_eq!(r("nope", None), Err(Unresolved::UnknownModel));
        assert_eq!(r("off", None), Err(Unresolved::Disabled));
        assert!(Version::parse("1.10").unwrap() > Version::parse("1.9").unwrap());
    }
}
