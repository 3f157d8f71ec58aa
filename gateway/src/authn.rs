//! Stage 3 — authentication: who is calling. Three methods, each a route
//! may accept (`routes.auth`): JWT bearer tokens, API keys, and TLS client
//! certificates. Outcome: an [`Identity`] (principal, tenant, roles) that
//! travels with the request, or 401 with `WWW-Authenticate` and a reason in
//! metrics and logs only (RFC 6750 §3.1: the client learns "invalid_token",
//! never whether it was the signature, the expiry or the audience).
//!
//! JWT: the token's `alg` never picks the key type. Each issuer has an
//! explicit algorithm allowlist; a key is only tried with the allowlisted
//! algorithms of its own family (no `none`, no HS/RS confusion); keys come
//! from a JWKS file or URL (OIDC discovery too), refreshed in the background;
//! an unknown `kid` asks the refresher for a new fetch (rate limited) and the
//! request is refused, never blocked on the network. `exp`/`nbf`/`iat` with
//! leeway, `iss` and `aud` must match. Verified tokens are cached per worker
//! (bounded, never past `exp`), so a hot client pays one signature check.
//!
//! API keys: stored as SHA-256 digests only; several per client (rotation);
//! revocation through the admin API applies to the next request on every
//! worker (one shared table, replaced on change).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::codec::RequestHead;
use crate::config::{AuthMethod, AuthnSettings, JwtIssuerSettings};

/// Who is calling, as later stages and the backend see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// JWT `sub`, API-key client name, or certificate fingerprint / mapped client.
    pub principal: String,
    pub tenant: String,
    pub roles: Vec<String>,
    /// "jwt", "api_key", "mtls", or "anonymous".
    pub method: &'static str,
    /// JWT claims (string values), for policy conditions.
    pub claims: Vec<(String, String)>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            principal: String::new(),
            tenant: String::new(),
            roles: Vec::new(),
            method: "anonymous",
            claims: Vec::new(),
        }
    }
}

/// Why authentication failed. `reason` is for metrics and logs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthnError {
    /// No credentials at all (RFC 6750: no `error` attribute then).
    pub missing: bool,
    pub reason: &'static str,
}

impl AuthnError {
    fn missing() -> AuthnError {
        AuthnError {
            missing: true,
            reason: "missing_credentials",
        }
    }
    fn invalid(reason: &'static str) -> AuthnError {
        AuthnError {
            missing: false,
            reason,
        }
    }

    /// The `WWW-Authenticate` value for the 401.
    pub fn challenge(&self) -> &'static str {
        if self.missing {
            "Bearer realm=\"gateway\""
        } else {
            "Bearer realm=\"gateway\", error=\"invalid_token\""
        }
    }
}

/// One issuer's verification keys, by `kid`.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<IssuerKey>>,
    /// Keys without a `kid`: tried for tokens without one.
    unnamed: Vec<Arc<IssuerKey>>,
}

struct IssuerKey {
    key: DecodingKey,
    /// The issuer's allowlisted algorithms of this key's family.
    validation: Validation,
}

enum JwksSource {
    File(PathBuf),
    Url(String),
    Discovery(String),
    /// HS256 with a shared secret: no JWKS.
    Secret,
}

struct Issuer {
    cfg: JwtIssuerSettings,
    keys: RwLock<Arc<KeySet>>,
    source: JwksSource,
    /// Last fetch attempt (for the unknown-kid rate limit).
    last_fetch: Mutex<Option<Instant>>,
    /// Set by a worker that saw an unknown kid; the refresher fetches soon.
    wanted: std::sync::atomic::AtomicBool,
    /// SHA-256 of the JWKS document in force (to notice real changes).
    jwks_digest: Mutex<Option<[u8; 32]>>,
}

/// An API-key client.
#[derive(Debug)]
struct KeyClient {
    client: String,
    tenant: String,
    roles: Vec<String>,
}

#[derive(Default)]
struct KeyTable {
    by_digest: HashMap<[u8; 32], Arc<KeyClient>>,
}

/// The authentication stage's shared state (all workers).
pub struct Authn {
    settings: AuthnSettings,
    issuers: Vec<Issuer>,
    api_keys: RwLock<Arc<KeyTable>>,
    /// mTLS certificate fingerprint (SHA-256 of the leaf DER) → client.
    mtls: HashMap<[u8; 32], Arc<KeyClient>>,
    /// mTLS certificate name (URI/DNS/e-mail SAN or CN) → client.
    mtls_names: HashMap<String, Arc<KeyClient>>,
    /// JWT claims the authorization rules test.
    policy_claims: Vec<String>,
}

impl std::fmt::Debug for Authn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authn")
            .field("issuers", &self.issuers.len())
            .field(
                "api_key_clients",
                &self.api_keys.read().map(|t| t.by_digest.len()).unwrap_or(0),
            )
            .finish()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Constant-time equality of two digests.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut d = 0u8;
    for i in 0..32 {
        d |= a[i] ^ b[i];
    }
    std::hint::black_box(d) == 0
}

pub use crate::syntax::{hex, parse_hex32};

fn family_algs(
    allowed: &[Algorithm],
    family: jsonwebtoken::jwk::AlgorithmParameters,
) -> Vec<Algorithm> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    allowed
        .iter()
        .copied()
        .filter(|a| {
            matches!(
                (&family, a),
                (
                    P::RSA(_),
                    Algorithm::RS256
                        | Algorithm::RS384
                        | Algorithm::RS512
                        | Algorithm::PS256
                        | Algorithm::PS384
                        | Algorithm::PS512
                ) | (P::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                    | (P::OctetKeyPair(_), Algorithm::EdDSA)
            )
        })
        .collect()
}

impl Issuer {
    fn validation(&self, algs: Vec<Algorithm>) -> Validation {
        let mut v = Validation::new(algs[0]);
        v.algorithms = algs;
        v.leeway = self.cfg.leeway.as_secs();
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&self.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v
    }

    /// Parse a JWKS document into keys usable with this issuer's algorithms.
    fn keyset(&self, text: &str) -> Result<KeySet, String> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut ks = KeySet::default();
        for jwk in &set.keys {
            let algs = family_algs(&self.cfg.algorithms, jwk.algorithm.clone());
            if algs.is_empty() {
                continue; // a key of a family this issuer doesn't allow
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let k = Arc::new(IssuerKey {
                key,
                validation: self.validation(algs),
            });
            match &jwk.common.key_id {
                Some(kid) => {
                    ks.by_kid.insert(kid.clone(), k);
                }
                None => ks.unnamed.push(k),
            }
        }
        if ks.by_kid.is_empty() && ks.unnamed.is_empty() {
            return Err("no key in the JWKS matches the issuer's allowed algorithms".into());
        }
        Ok(ks)
    }

    /// Fetch (file or URL) and install the keys.
    fn refresh(&self) -> Result<usize, String> {
        *self.last_fetch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let text = match &self.source {
            JwksSource::Secret => return Ok(0),
            JwksSource::File(p) => {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
            }
            JwksSource::Url(u) => crate::fetch::get(u, self.cfg.jwks_ca.as_deref())?,
            JwksSource::Discovery(iss) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    iss.trim_end_matches('/')
                );
                let doc = crate::fetch::get(&url, self.cfg.jwks_ca.as_deref())?;
                let v: serde_json::Value =
                    serde_json::from_str(&doc).map_err(|e| format!("{url}: {e}"))?;
                let jwks = v["jwks_uri"]
                    .as_str()
                    .ok_or(format!("{url}: no jwks_uri"))?;
                crate::fetch::get(jwks, self.cfg.jwks_ca.as_deref())?
            }
        };
        let ks = self.keyset(&text)?;
        let n = ks.by_kid.len() + ks.unnamed.len();
        let digest = sha256(text.as_bytes());
        let mut last = self.jwks_digest.lock().unwrap_or_else(|p| p.into_inner());
        if *last != Some(digest) {
            // A changed key set (a key withdrawn, say) invalidates every
            // worker's verified-token cache.
            *last = Some(digest);
            KEY_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        drop(last);
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ks);
        Ok(n)
    }
}

/// A token's payload (parsed once into a map: serde's `flatten` would buffer
/// it twice).
type Claims = serde_json::Map<String, serde_json::Value>;

/// A verified token, cached per worker.
struct Cached {
    identity: Arc<Identity>,
    /// Unix seconds after which the cache must not serve it (its `exp`).
    exp: u64,
    /// [`KEY_EPOCH`] when verified: a reload or a key-set change since makes it a miss.
    epoch: u64,
}

/// Bumped by every new authentication config (reload) and every JWKS
/// change: cached verifications from before no longer count.
static KEY_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Per-worker cache of verified tokens (the whole token is the key: no
/// collision can ever map one token to another's identity).
pub struct TokenCache {
    map: HashMap<Box<str>, Cached>,
    max: usize,
}

impl TokenCache {
    pub fn new(max: usize) -> TokenCache {
        TokenCache {
            map: HashMap::new(),
            max,
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authn {
    /// Build from `[authn]`: API keys, mTLS clients, issuers (their keys are
    /// loaded now: a bad JWKS file or unreachable URL fails the start).
    pub fn new(s: &AuthnSettings, policy_claims: Vec<String>) -> Result<Authn, String> {
        // A new configuration (a reload): no cached verification carries over.
        KEY_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Release);
        let mut table = KeyTable::default();
        for (i, k) in s.api_keys.iter().enumerate() {
            let client = Arc::new(KeyClient {
                client: k.client.clone(),
                tenant: k.tenant.clone(),
                roles: k.roles.clone(),
            });
            if k.sha256.is_empty() {
                return Err(format!(
                    "authn.api_keys[{i}]: give at least one sha256 digest"
                ));
            }
            for d in &k.sha256 {
                let digest = parse_hex32(d).ok_or(format!(
                    "authn.api_keys[{i}]: `{d}` is not a 64-hex-digit SHA-256"
                ))?;
                if crate::revocations::is_revoked(&digest) {
                    continue; // revoked through the admin API (here, earlier, or by the fleet)
                }
                if table.by_digest.insert(digest, client.clone()).is_some() {
                    return Err(format!("authn.api_keys[{i}]: a key digest is listed twice"));
                }
            }
        }
        let mut mtls = HashMap::new();
        let mut mtls_names = HashMap::new();
        for (i, c) in s.mtls_clients.iter().enumerate() {
            let client = Arc::new(KeyClient {
                client: c.client.clone(),
                tenant: c.tenant.clone(),
                roles: c.roles.clone(),
            });
            match (&c.sha256, &c.name) {
                (Some(fp), None) => {
                    let d = parse_hex32(fp).ok_or(format!(
                        "authn.mtls_clients[{i}]: `{fp}` is not a SHA-256 fingerprint"
                    ))?;
                    mtls.insert(d, client);
                }
                (None, Some(name)) => {
                    mtls_names.insert(name.clone(), client);
                }
                _ => {
                    return Err(format!(
                        "authn.mtls_clients[{i}]: give either sha256 or name"
                    ))
                }
            }
        }
        let mut issuers = Vec::new();
        for (i, j) in s.jwt.iter().enumerate() {
            let source = match (&j.jwks_file, &j.jwks_url, j.oidc_discovery, &j.hs256_secret_file) {
                (Some(f), None, false, None) => JwksSource::File(f.clone()),
                (None, Some(u), false, None) => JwksSource::Url(u.clone()),
                (None, None, true, None) => JwksSource::Discovery(j.issuer.clone()),
                (None, None, false, Some(_)) => JwksSource::Secret,
                _ => {
                    return Err(format!(
                        "authn.jwt[{i}]: give exactly one of jwks_file, jwks_url, oidc_discovery = true, hs256_secret_file"
                    ))
                }
            };
            let issuer = Issuer {
                cfg: j.clone(),
                keys: RwLock::new(Arc::new(KeySet::default())),
                source,
                last_fetch: Mutex::new(None),
                wanted: std::sync::atomic::AtomicBool::new(false),
                jwks_digest: Mutex::new(None),
            };
            if let Some(p) = &j.hs256_secret_file {
                if j.algorithms != [Algorithm::HS256] {
                    return Err(format!("authn.jwt[{i}]: a shared secret needs algorithms = [\"HS256\"] and nothing else"));
                }
                let secret = std::fs::read(p)
                    .map_err(|e| format!("authn.jwt[{i}]: {}: {e}", p.display()))?;
                let secret = secret.trim_ascii().to_vec();
                if secret.len() < 32 {
                    return Err(format!(
                        "authn.jwt[{i}]: the HS256 secret must be at least 32 bytes"
                    ));
                }
                let k = Arc::new(IssuerKey {
                    key: DecodingKey::from_secret(&secret),
                    validation: issuer.validation(vec![Algorithm::HS256]),
                });
                *issuer.keys.write().unwrap() = Arc::new(KeySet {
                    by_kid: HashMap::new(),
                    unnamed: vec![k],
                });
            } else {
                if j.algorithms
                    .iter()
                    .any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
                {
                    return Err(format!("authn.jwt[{i}]: HS* algorithms need hs256_secret_file (never a public JWKS)"));
                }
                issuer
                    .refresh()
                    .map_err(|e| format!("authn.jwt[{i}] ({}): {e}", j.issuer))?;
            }
            issuers.push(issuer);
        }
        Ok(Authn {
            settings: s.clone(),
            issuers,
            api_keys: RwLock::new(Arc::new(table)),
            mtls,
            mtls_names,
            policy_claims,
        })
    }

    /// Whether any method is configured (else every route is anonymous).
    pub fn configured(&self) -> bool {
        !self.issuers.is_empty()
            || !self.settings.api_keys.is_empty()
            || !self.mtls.is_empty()
            || !self.mtls_names.is_empty()
    }

    /// Authenticate a request. `accepted`: the route's methods.
    pub fn authenticate(
        &self,
        buf: &[u8],
        head: &mut RequestHead,
        accepted: &[AuthMethod],
        client_cert: Option<&[u8]>,
        cache: &RefCell<TokenCache>,
    ) -> Result<Arc<Identity>, AuthnError> {
        let mut bearer: Option<&[u8]> = None;
        let mut api_key: Option<&[u8]> = None;
        let key_header = self.settings.api_key_header.as_bytes();
        let (mut authorizations, mut api_keys) = (0, 0);
        for h in head.headers.iter_mut() {
            let name = &buf[h.name.clone()];
            if name.eq_ignore_ascii_case(b"authorization") {
                authorizations += 1;
                let v = buf[h.value.clone()].trim_ascii();
                if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                    bearer = Some(v[7..].trim_ascii());
                }
                h.drop |= !self.settings.forward_credentials;
            } else if name.eq_ignore_ascii_case(key_header) {
                api_keys += 1;
                api_key = Some(buf[h.value.clone()].trim_ascii());
                h.drop |= !self.settings.forward_credentials;
            } else if is_identity_header(&self.settings.identity_headers, name) {
                // Client-supplied copies of the identity headers never reach the backend.
                h.drop = true;
            }
        }
        if authorizations > 1 || api_keys > 1 {
            // Which one would a backend read? Refuse rather than guess.
            return Err(AuthnError::invalid("repeated_credentials"));
        }
        self.authenticate_credentials(bearer, api_key, accepted, client_cert, cache)
    }

    /// The header name API keys come in (the admin listener reads it too).
    pub fn api_key_header(&self) -> &str {
        &self.settings.api_key_header
    }

    /// Authenticate from the credentials a request carried: the
    /// `Authorization: Bearer` value and the API-key header's.
    pub fn authenticate_credentials<'a>(
        &self,
        bearer: Option<&'a [u8]>,
        mut api_key: Option<&'a [u8]>,
        accepted: &[AuthMethod],
        client_cert: Option<&[u8]>,
        cache: &RefCell<TokenCache>,
    ) -> Result<Arc<Identity>, AuthnError> {
        let accepts = |m: AuthMethod| accepted.contains(&m);
        // A bearer that looks like a JWT (three dot-separated parts) is a JWT;
        // otherwise a bearer is an API key (OpenAI clients send keys that way).
        if let Some(b) = bearer {
            if b.len() > self.settings.max_token_bytes {
                return Err(AuthnError::invalid("token_too_large"));
            }
            let is_jwt = b.iter().filter(|&&c| c == b'.').count() == 2;
            if is_jwt && accepts(AuthMethod::Jwt) {
                let token =
                    std::str::from_utf8(b).map_err(|_| AuthnError::invalid("malformed_token"))?;
                return self.verify_jwt(token, cache);
            }
            if !is_jwt && accepts(AuthMethod::ApiKey) && api_key.is_none() {
                api_key = Some(b);
            }
        }
        if let Some(k) = api_key {
            if accepts(AuthMethod::ApiKey) {
                return self.check_api_key(k);
            }
        }
        if accepts(AuthMethod::Mtls) {
            if let Some(leaf) = client_cert {
                let fp = sha256(leaf);
                let subject = crate::x509::subject(leaf).unwrap_or_default();
                // Policies may test the certificate's names as claims.
                let claims = self
                    .policy_claims
                    .iter()
                    .filter_map(|k| match k.as_str() {
                        "cert_cn" => Some((k.clone(), subject.common_name.clone()?)),
                        "cert_name" => Some((k.clone(), subject.primary()?.to_string())),
                        _ => None,
                    })
                    .collect();
                let mapped = self
                    .mtls
                    .get(&fp)
                    .or_else(|| subject.names().find_map(|n| self.mtls_names.get(n)));
                return Ok(Arc::new(match mapped {
                    Some(c) => Identity {
                        principal: c.client.clone(),
                        tenant: c.tenant.clone(),
                        roles: c.roles.clone(),
                        method: "mtls",
                        claims,
                    },
                    None => Identity {
                        principal: subject
                            .primary()
                            .map(String::from)
                            .unwrap_or_else(|| format!("cert:{}", hex(&fp[..16]))),
                        tenant: String::new(),
                        roles: Vec::new(),
                        method: "mtls",
                        claims,
                    },
                }));
            }
        }
        if bearer.is_some() || api_key.is_some() {
            // Credentials of a kind this route doesn't take.
            return Err(AuthnError::invalid("method_not_accepted"));
        }
        Err(AuthnError::missing())
    }

    fn check_api_key(&self, key: &[u8]) -> Result<Arc<Identity>, AuthnError> {
        if key.is_empty() || key.len() > self.settings.max_token_bytes {
            return Err(AuthnError::invalid("bad_api_key"));
        }
        let digest = sha256(key);
        let table = self
            .api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The map compares digests (which say nothing about the key); the
        // final check is constant-time anyway.
        match table.by_digest.get_key_value(&digest) {
            Some((stored, c)) if ct_eq(stored, &digest) => Ok(Arc::new(Identity {
                principal: c.client.clone(),
                tenant: c.tenant.clone(),
                roles: c.roles.clone(),
                method: "api_key",
                claims: Vec::new(),
            })),
            _ => Err(AuthnError::invalid("unknown_api_key")),
        }
    }

    /// Verify a JWT, the per-worker cache first (public for the criterion bench).
    pub fn verify_jwt(
        &self,
        token: &str,
        cache: &RefCell<TokenCache>,
    ) -> Result<Arc<Identity>, AuthnError> {
        let now = now_unix();
        let epoch = KEY_EPOCH.load(std::sync::atomic::Ordering::Acquire);
        if let Some(c) = cache.borrow().map.get(token) {
            if now < c.exp && c.epoch == epoch {
                return Ok(c.identity.clone());
            }
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthnError::invalid("malformed_token"))?;
        // `iss` picks the issuer (from the unverified payload; the signature
        // check below then binds it). One issuer: no need to peek.
        let issuer = if self.issuers.len() == 1 {
            &self.issuers[0]
        } else {
            let iss = peek_iss(token).ok_or(AuthnError::invalid("malformed_token"))?;
            self.issuers
                .iter()
                .find(|i| i.cfg.issuer == iss)
                .ok_or(AuthnError::invalid("unknown_issuer"))?
        };
        let keys = issuer
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let candidates: Vec<Arc<IssuerKey>> = match &header.kid {
            Some(kid) => match keys.by_kid.get(kid) {
                Some(k) => vec![k.clone()],
                None if !keys.unnamed.is_empty() => keys.unnamed.clone(),
                None => {
                    issuer
                        .wanted
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(AuthnError::invalid("unknown_kid"));
                }
            },
            None => keys.unnamed.clone(),
        };
        let mut last = AuthnError::invalid("no_key");
        for k in candidates {
            if !k.validation.algorithms.contains(&header.alg) {
                last = AuthnError::invalid("algorithm_not_allowed");
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => {
                    let c = data.claims;
                    let leeway = issuer.cfg.leeway.as_secs();
                    let int = |k: &str| c.get(k).and_then(serde_json::Value::as_u64);
                    if int("iat").is_some_and(|iat| iat > now + leeway) {
                        return Err(AuthnError::invalid("issued_in_future"));
                    }
                    let exp = int("exp").unwrap_or(0);
                    let identity = Arc::new(self.identity_from(issuer, c));
                    let mut cache = cache.borrow_mut();
                    if cache.map.len() >= cache.max {
                        // Drop the expired first; if still full, start over (bounded, simple).
                        cache.map.retain(|_, v| v.exp > now);
                        if cache.map.len() >= cache.max {
                            cache.map.clear();
                        }
                    }
                    cache.map.insert(
                        token.into(),
                        Cached {
                            identity: identity.clone(),
                            exp,
                            epoch,
                        },
                    );
                    return Ok(identity);
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = AuthnError::invalid(match e.kind() {
                        K::ExpiredSignature => "expired",
                        K::ImmatureSignature => "not_yet_valid",
                        K::InvalidIssuer => "wrong_issuer",
                        K::InvalidAudience => "wrong_audience",
                        K::InvalidSignature => "bad_signature",
                        K::InvalidAlgorithm => "algorithm_not_allowed",
                        K::MissingRequiredClaim(_) => "missing_claim",
                        _ => "malformed_token",
                    });
                }
            }
        }
        Err(last)
    }

    fn identity_from(&self, issuer: &Issuer, c: Claims) -> Identity {
        let s = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let tenant = c
            .get(&issuer.cfg.tenant_claim)
            .and_then(s)
            .unwrap_or_default();
        let roles = match c.get(&issuer.cfg.roles_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(s).collect(),
            Some(serde_json::Value::String(r)) => r.split_whitespace().map(String::from).collect(),
            _ => Vec::new(),
        };
        // Only the claims a policy looks at travel with the identity.
        let claims = self
            .policy_claims
            .iter()
            .filter_map(|k| Some((k.clone(), s(c.get(k)?)?)))
            .collect();
        Identity {
            principal: c.get("sub").and_then(s).unwrap_or_default(),
            tenant,
            roles,
            method: "jwt",
            claims,
        }
    }

    /// Revoke an API key by its SHA-256 digest: the client it belonged to
    /// and whether the revocation was saved (`[authn] revocations_file`), or
    /// `None` when no configured key has that digest. The revocation is
    /// process-wide, survives config reloads, is saved for restarts when a
    /// file is configured, and reaches the fleet through Redis when
    /// `[ratelimit.redis]` is (see `revocations`).
    pub fn revoke_api_key(&self, digest: [u8; 32]) -> Option<(String, Result<(), String>)> {
        // Only a configured key is revoked; recorded first, so a table being
        // built by a concurrent reload skips it too.
        if !self.has_key(&digest) {
            return None;
        }
        let saved = crate::revocations::add(digest).map(|_| ());
        let client = self.drop_key(digest)?;
        if let Err(e) = &saved {
            tracing::error!(error = %e, "revoked, but the revocation could not be saved: it holds until a restart");
        }
        tracing::warn!(target: "audit", event = "revoke_api_key", client = client.as_str(), key = %hex(&digest[..8]), source = "admin", "API key revoked");
        Some((client, saved))
    }

    /// Take a key revoked elsewhere (`source`: "fleet", another gateway
    /// through Redis; "file", before a restart) out of the table in force;
    /// the client it belonged to, if it was in it.
    pub fn revoked_elsewhere(&self, digest: [u8; 32], source: &'static str) -> Option<String> {
        let client = self.drop_key(digest)?;
        tracing::warn!(target: "audit", event = "revoke_api_key", client = client.as_str(), key = %hex(&digest[..8]), source, "API key revoked");
        Some(client)
    }

    fn has_key(&self, digest: &[u8; 32]) -> bool {
        self.api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_digest
            .contains_key(digest)
    }

    fn drop_key(&self, digest: [u8; 32]) -> Option<String> {
        let mut g = self.api_keys.write().unwrap_or_else(|p| p.into_inner());
        let mut t = KeyTable {
            by_digest: g.by_digest.clone(),
        };
        let c = t.by_digest.remove(&digest)?;
        *g = Arc::new(t);
        Some(c.client.clone())
    }

    /// (client, tenant, first 16 hex digits of each key digest), for the admin API.
    pub fn list_api_keys(&self) -> Vec<(String, String, String)> {
        let t = self
            .api_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut v: Vec<_> = t
            .by_digest
            .iter()
            .map(|(d, c)| (c.client.clone(), c.tenant.clone(), hex(&d[..8])))
            .collect();
        v.sort();
        v
    }

    /// The background JWKS refresher: every `jwks_refresh`, and soon after a
    /// worker saw an unknown `kid` (at most once per `unknown_kid_refetch`).
    pub fn spawn_refresher(self: &Arc<Self>) -> std::io::Result<()> {
        if self
            .issuers
            .iter()
            .all(|i| matches!(i.source, JwksSource::Secret))
        {
            return Ok(());
        }
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("gateway-jwks".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let Some(a) = me.upgrade() else { return };
                for i in &a.issuers {
                    if matches!(i.source, JwksSource::Secret) {
                        continue;
                    }
                    let last = *i.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
                    let since = last.map(|l| l.elapsed()).unwrap_or(Duration::MAX);
                    let wanted = i.wanted.load(std::sync::atomic::Ordering::Relaxed);
                    if since >= i.cfg.jwks_refresh || (wanted && since >= i.cfg.unknown_kid_refetch) {
                        i.wanted.store(false, std::sync::atomic::Ordering::Relaxed);
                        match i.refresh() {
                            Ok(n) => tracing::debug!(issuer = %i.cfg.issuer, keys = n, "JWKS refreshed"),
                            Err(e) => tracing::warn!(issuer = %i.cfg.issuer, error = %e, "JWKS refresh failed; keeping the keys in force"),
                        }
                    }
                }
            })
            .map(|_| ())
    }
}

/// The `iss` claim of an unverified token (to pick its issuer).
fn peek_iss(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["iss"].as_str().map(String::from)
}

/// An identity header name, also spelt with `_` for `-` (CGI-style
/// backends and some proxies treat the two alike).
pub fn is_identity_header(h: &crate::config::IdentityHeaders, name: &[u8]) -> bool {
    let fold = |b: u8| {
        if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        }
    };
    [&h.principal, &h.tenant, &h.roles].iter().any(|n| {
        !n.is_empty()
            && n.len() == name.len()
            && n.bytes().zip(name.iter()).all(|(a, &b)| fold(a) == fold(b))
    })
}

/// Drop client-sent identity headers (every route, authentication or not:
/// a backend set up to trust them must only ever see the gateway's).
pub fn strip_identity_headers(
    h: &crate::config::IdentityHeaders,
    buf: &[u8],
    head: &mut RequestHead,
) {
    for hd in head.headers.iter_mut() {
        if is_identity_header(h, &buf[hd.name.clone()]) {
            hd.drop = true;
        }
    }
}

/// Write the identity headers for the backend.
pub fn write_identity_headers(s: &AuthnSettings, id: &Identity, out: &mut Vec<u8>) {
    let h = &s.identity_headers;
    // Only visible ASCII and spaces (RFC 9110 §5.5): a claim can't inject a header.
    let safe = |v: &str| v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t');
    for (name, value) in [
        (&h.principal, id.principal.clone()),
        (&h.tenant, id.tenant.clone()),
        (&h.roles, id.roles.join(",")),
    ] {
        if !name.is_empty() && !value.is_empty() && safe(&value) {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}
