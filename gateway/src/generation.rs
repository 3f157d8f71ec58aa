//! One configuration generation: the checked configuration plus the stages
//! that must be *built* from it before it can serve — the TLS stage
//! (certificates and keys loaded and matched) and the authentication stage
//! (JWT key sets, API-key digests, client-certificate identities).
//!
//! This is where the configuration meets the stages: [`crate::config`]
//! only checks data (and imports no stage); [`Resolved`] runs those checks
//! and then builds TLS and authn, reporting their failures at the same keys
//! (`tls.certificates`, `authn`) in the same error list, so `gateway
//! check-config`, startup and reload all see one list of problems. A
//! reload publishes a new [`Resolved`]; each worker builds its own state
//! from it.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use crate::authn::Authn;
use crate::config::{
    AuthnSettings, AuthzSettings, Build, Checked, Config, ConfigErrors, Sink, TlsSettings,
};
use crate::tls::Tls;

/// A checked configuration with its TLS and authentication stages built.
/// Derefs to the [`Checked`] data (`r.config`, `r.listen`, …).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub checked: Checked,
    /// The TLS stage, built (certificates loaded and checked) when `[tls] listen` is set.
    pub tls: Option<Arc<Tls>>,
    /// The authentication stage, when any method is configured.
    pub authn: Option<Arc<Authn>>,
    /// TLS to backends, by cluster name (`[clusters.X.tls]`).
    pub upstream_tls: std::collections::HashMap<String, crate::tls::Upstream>,
}

impl Deref for Resolved {
    type Target = Checked;
    fn deref(&self) -> &Checked {
        &self.checked
    }
}

impl DerefMut for Resolved {
    fn deref_mut(&mut self) -> &mut Checked {
        &mut self.checked
    }
}

impl Resolved {
    /// Parse, validate and build a file.
    pub fn from_file(path: &Path) -> Result<Resolved, ConfigErrors> {
        let (c, text) = Config::load(path)?;
        Resolved::from_config(c, &text, &path.display().to_string())
    }

    pub fn from_str(text: &str, file: &str) -> Result<Resolved, ConfigErrors> {
        Resolved::from_config(Config::parse(text, file)?, text, file)
    }

    /// Validate a parsed configuration (`text` is its source, for line
    /// numbers) and build its stages, each right after its section's checks
    /// (its errors stand where they did when checks and builds were one
    /// pass). The stages are built even when earlier checks found problems,
    /// so that every problem is reported at once.
    pub fn from_config(c: Config, text: &str, file: &str) -> Result<Resolved, ConfigErrors> {
        let mut sink = Sink::new(text, file);
        let mut stages = Stages::default();
        let checked = c.check(&mut sink, &mut stages);
        sink.finish(Resolved {
            checked,
            tls: stages.tls,
            authn: stages.authn,
            upstream_tls: stages.upstream_tls,
        })
    }
}

/// The stages built while the configuration is checked.
#[derive(Default)]
struct Stages {
    tls: Option<Arc<Tls>>,
    authn: Option<Arc<Authn>>,
    upstream_tls: std::collections::HashMap<String, crate::tls::Upstream>,
}

impl Build for Stages {
    /// Each `[clusters.X.tls]`: its CA bundle and client certificate loaded.
    fn upstream_tls(
        &mut self,
        clusters: &std::collections::BTreeMap<String, crate::config::ClusterConfig>,
        base: &Path,
        sink: &mut Sink,
    ) {
        for (name, c) in clusters {
            let Some(t) = &c.tls else { continue };
            match crate::tls::Upstream::new(t, c.backends.first().map(String::as_str), base) {
                Ok(u) => {
                    self.upstream_tls.insert(name.clone(), u);
                }
                Err(e) => sink.err(format!("clusters.{name}.tls"), e),
            }
        }
    }

    /// The TLS stage, when there are TLS listeners and certificates for them
    /// (no certificates is a configuration error already reported).
    fn tls(&mut self, listen: &[SocketAddr], settings: &TlsSettings, sink: &mut Sink) {
        if listen.is_empty() || settings.certificates.is_empty() {
            return;
        }
        match Tls::new(settings) {
            Ok(t) => self.tls = Some(Arc::new(t)),
            Err(e) => sink.err("tls.certificates", e),
        }
    }

    /// The authentication stage, when any method is configured.
    fn authn(&mut self, settings: &AuthnSettings, authz: &AuthzSettings, sink: &mut Sink) {
        match Authn::new(settings, authz.policy_claims()) {
            Ok(a) if a.configured() => self.authn = Some(Arc::new(a)),
            Ok(_) => {}
            Err(e) => sink.err("authn", e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;

    #[test]
    fn default_config_builds() {
        let r = Resolved::from_str(DEFAULT_CONFIG, "default").unwrap();
        assert!(!r.listen.is_empty());
        assert!(r.clusters.contains_key("demo"));
        assert!(r.tls.is_none());
    }

    #[test]
    fn build_errors_join_the_check_errors() {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n\n[[routes]]\ncluster = \"b\"\n\n\
                    [tls]\nlisten = [\"127.0.0.1:1\"]\n[[tls.certificates]]\ncert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\n";
        let e = Resolved::from_str(text, "x.toml").unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"routes[0].cluster"), "{e}");
        assert!(keys.contains(&"tls.certificates"), "{e}");
        // Checking alone does not load certificates.
        let e = Checked::from_str(text, "x.toml").unwrap_err();
        assert!(e.0.iter().all(|e| e.key != "tls.certificates"), "{e}");
    }

    #[test]
    fn a_build_error_stands_where_its_section_is_checked() {
        // TLS is checked (and built) before the authz rules.
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n\n[[routes]]\ncluster = \"a\"\n\n\
                    [tls]\nlisten = [\"127.0.0.1:1\"]\n[[tls.certificates]]\ncert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\n\n\
                    [[authz.rules]]\nid = \"\"\n";
        let e = Resolved::from_str(text, "x.toml").unwrap_err();
        let at = |k: &str| e.0.iter().position(|e| e.key == k);
        let (tls, rule) = (at("tls.certificates"), at("authz.rules[0].id"));
        assert!(tls.is_some() && rule.is_some(), "{e}");
        assert!(tls < rule, "{e}");
    }
}
