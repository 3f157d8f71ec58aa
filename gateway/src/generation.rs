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

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use crate::authn::Authn;
use crate::config::{Checked, Config, ConfigErrors, Sink};
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
    /// numbers) and build its stages. The stages are built even when the
    /// checks found problems, so that every problem is reported at once.
    pub fn from_config(c: Config, text: &str, file: &str) -> Result<Resolved, ConfigErrors> {
        let mut sink = Sink::new(text, file);
        let checked = c.check(&mut sink);
        let tls = build_tls(&checked, &mut sink);
        let authn = build_authn(&checked, &mut sink);
        sink.finish(Resolved {
            checked,
            tls,
            authn,
        })
    }
}

/// The TLS stage, when there are TLS listeners and certificates for them
/// (no certificates is a configuration error already reported).
fn build_tls(c: &Checked, sink: &mut Sink) -> Option<Arc<Tls>> {
    if c.tls_listen.is_empty() || c.tls_settings.certificates.is_empty() {
        return None;
    }
    match Tls::new(&c.tls_settings) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            sink.err("tls.certificates", e);
            None
        }
    }
}

/// The authentication stage, when any method is configured.
fn build_authn(c: &Checked, sink: &mut Sink) -> Option<Arc<Authn>> {
    match Authn::new(&c.authn_settings, c.config.authz.policy_claims()) {
        Ok(a) if a.configured() => Some(Arc::new(a)),
        Ok(_) => None,
        Err(e) => {
            sink.err("authn", e);
            None
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
}
