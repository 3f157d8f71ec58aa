//! `[authn]` and `[authz]`: who a caller is and what it may do, as written.
//! Checked here; the authentication stage itself (key sets loaded) is built
//! from the result by the `generation` module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Sink};

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
    /// API keys revoked through the admin API are kept here across restarts
    /// (read at start; a change needs a restart). Empty: not kept.
    pub revocations_file: std::path::PathBuf,
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
            revocations_file: std::path::PathBuf::new(),
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

impl AuthzSettings {
    /// The JWT claims any rule tests, sorted, each once (the authentication
    /// stage keeps these from a verified token).
    pub fn policy_claims(&self) -> Vec<String> {
        self.rules
            .iter()
            .flat_map(|r| r.claims.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

/// `[authn]`, checked; returned with its files resolved against `base` (the
/// config file's directory).
pub(super) fn check_authn(authn: &AuthnSettings, base: &Path, sink: &mut Sink) -> AuthnSettings {
    let mut settings = authn.clone();
    for j in &mut settings.jwt {
        j.jwks_file = j.jwks_file.take().map(|p| base.join(p));
        j.jwks_ca = j.jwks_ca.take().map(|p| base.join(p));
        j.hs256_secret_file = j.hs256_secret_file.take().map(|p| base.join(p));
        if j.algorithms.is_empty() {
            sink.err(
                "authn.jwt",
                format!(
                    "issuer {}: list the allowed algorithms, e.g. [\"ES256\"]",
                    j.issuer
                ),
            );
        }
        if j.audiences.is_empty() {
            sink.err(
                "authn.jwt",
                format!("issuer {}: list the accepted audiences", j.issuer),
            );
        }
    }
    if settings.max_token_bytes < 256 || settings.token_cache_entries == 0 {
        sink.err(
            "authn.max_token_bytes",
            "max_token_bytes must be at least 256 and token_cache_entries at least 1",
        );
    }
    settings
}

/// `[authz]`: every rule has an id.
pub(super) fn check_authz(authz: &AuthzSettings, sink: &mut Sink) {
    for (i, r) in authz.rules.iter().enumerate() {
        if r.id.is_empty() {
            sink.err(
                format!("authz.rules[{i}].id"),
                "give each rule an id (it names the decision in the audit log)",
            );
        }
    }
}
