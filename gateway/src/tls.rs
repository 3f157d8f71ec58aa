//! Stage 2 — TLS termination (rustls, ring provider): TLS 1.3 and 1.2 with
//! rustls' modern-only suites (AEAD, forward secrecy), several certificates
//! chosen by SNI (with a default for clients that send none), ALPN
//! `http/1.1`, session resumption (stateless tickets with rotating keys, and a
//! session cache), optional mutual TLS against a CA bundle.
//!
//! Certificates reload without dropping connections: on SIGHUP, on
//! `POST /tls/reload`, and when the files change (polled). A bad or
//! mismatched key is refused with the file named; the certificates in force
//! stay. Handshakes already done keep their keys; new ones get the new set.
//!
//! Outcome of the stage: a [`ServerConnection`] ready to carry HTTP, or the
//! connection is closed (timeout or TLS error, counted by kind).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
pub use rustls::ServerConnection;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{ClientAuth, TlsSettings, TlsVersion};

/// One certificate chain and its key, as loaded.
struct Loaded {
    cert_file: PathBuf,
    key: Arc<CertifiedKey>,
}

/// The certificates in force; replaced whole on reload.
struct Set {
    certs: Vec<Loaded>,
    /// SNI name → index into `certs`, filled on first use (positive matches
    /// only, bounded: random names can't grow it).
    by_name: RwLock<HashMap<String, usize>>,
}

const SNI_CACHE_MAX: usize = 4096;

/// Picks the certificate for a handshake by SNI; the first configured one
/// for clients without SNI or with a name no certificate covers.
pub struct Resolver {
    set: RwLock<Arc<Set>>,
    files: Vec<(PathBuf, PathBuf)>,
    /// Newest modification time seen across the files (reload polling).
    stamp: RwLock<Option<SystemTime>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("files", &self.files)
            .finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.read().unwrap_or_else(|p| p.into_inner()).clone();
        let first = set.certs.first()?.key.clone();
        let Some(name) = hello.server_name() else {
            return Some(first);
        };
        if let Some(&i) = set
            .by_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Some(set.certs[i].key.clone());
        }
        let Ok(sni) = ServerName::try_from(name) else {
            return Some(first);
        };
        for (i, c) in set.certs.iter().enumerate() {
            let Some(leaf) = c.key.cert.first() else {
                continue;
            };
            let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else {
                continue;
            };
            if ee.verify_is_valid_for_subject_name(&sni).is_ok() {
                let mut cache = set.by_name.write().unwrap_or_else(|p| p.into_inner());
                if cache.len() < SNI_CACHE_MAX {
                    cache.insert(name.to_string(), i);
                }
                return Some(c.key.clone());
            }
        }
        Some(first)
    }
}

fn load_one(cert: &Path, key: &Path) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: unusable key: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        format!(
            "{} does not match the certificate in {} ({e})",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Loaded {
        cert_file: cert.to_path_buf(),
        key: Arc::new(ck),
    })
}

/// TLS to a cluster's backends: the rustls client configuration and the
/// name their certificates must carry (the SNI sent).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// ALPN `http/1.1` (HTTP routes).
    pub config: Arc<rustls::ClientConfig>,
    /// The same, ALPN `h2` (gRPC routes).
    pub h2: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

impl Upstream {
    /// From `[clusters.X.tls]`; `first`: the cluster's first backend
    /// (`host:port`), whose host is the default name.
    pub fn new(
        t: &crate::config::UpstreamTls,
        first: Option<&str>,
        base: &Path,
    ) -> Result<Upstream, String> {
        let at = |p: &Path| base.join(p);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if t.verify {
            let ca = at(t
                .ca
                .as_deref()
                .ok_or("a CA bundle (ca) is needed to verify the backends")?);
            let mut roots = RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no CA certificate in the file", ca.display()));
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        };
        let mut config = match (&t.client_cert, &t.client_key) {
            (Some(c), Some(k)) => {
                let loaded = load_one(&at(c), &at(k))?;
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                    (*loaded.key).clone(),
                )))
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        let host = match (&t.server_name, first) {
            (Some(n), _) => n.clone(),
            (None, Some(b)) => b
                .rsplit_once(':')
                .map_or(b, |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_string(),
            (None, None) => return Err("no server_name and no backend to take it from".into()),
        };
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("server_name `{host}` is not a DNS name or an IP address"))?;
        Ok(Upstream {
            config: Arc::new(config),
            h2: Arc::new(h2),
            name,
        })
    }
}

/// `verify = false`: every certificate is taken (signatures still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn newest_mtime(files: &[(PathBuf, PathBuf)]) -> Option<SystemTime> {
    files
        .iter()
        .flat_map(|(c, k)| [c, k])
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

impl Resolver {
    /// Load every configured certificate, or say which file is wrong.
    pub fn load(s: &TlsSettings) -> Result<Resolver, String> {
        let files: Vec<(PathBuf, PathBuf)> = s
            .certificates
            .iter()
            .map(|c| (c.cert.clone(), c.key.clone()))
            .collect();
        let set = Self::load_set(&files)?;
        Ok(Resolver {
            stamp: RwLock::new(newest_mtime(&files)),
            set: RwLock::new(Arc::new(set)),
            files,
        })
    }

    fn load_set(files: &[(PathBuf, PathBuf)]) -> Result<Set, String> {
        let mut certs = Vec::new();
        for (c, k) in files {
            certs.push(load_one(c, k)?);
        }
        if certs.is_empty() {
            return Err("no certificates configured".into());
        }
        Ok(Set {
            certs,
            by_name: RwLock::new(HashMap::new()),
        })
    }

    /// Re-read the files; on any error keep the certificates in force.
    pub fn reload(&self) -> Result<usize, String> {
        let set = Self::load_set(&self.files)?;
        let n = set.certs.len();
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = newest_mtime(&self.files);
        Ok(n)
    }

    /// Reload when a file changed since the last load (polled).
    pub fn reload_if_changed(&self) -> Option<Result<usize, String>> {
        let now = newest_mtime(&self.files);
        let seen = *self.stamp.read().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now != seen {
            return Some(self.reload());
        }
        None
    }

    /// The certificate files in force (for /tls/status and logs).
    pub fn files(&self) -> Vec<PathBuf> {
        let set = self.set.read().unwrap_or_else(|p| p.into_inner()).clone();
        set.certs.iter().map(|c| c.cert_file.clone()).collect()
    }
}

/// The TLS stage's shared state: the rustls configs every worker uses (the
/// `[tls]` default, and one per `[[tls.listeners]]` entry). Rebuilt on
/// reload (new handshakes get the new one; established connections keep
/// theirs).
pub struct Tls {
    pub config: Arc<ServerConfig>,
    /// Listeners with their own client authentication.
    pub listeners: Vec<(SocketAddr, Arc<ServerConfig>)>,
    /// `tls.listen` as configured now. A socket bound under an earlier
    /// config (the listen list needs a restart) that is no longer in it gets
    /// no handshake: its client-auth policy may have been removed with it.
    pub listen: Vec<SocketAddr>,
    pub resolver: Arc<Resolver>,
    pub handshake_timeout: Duration,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certificates", &self.resolver.files())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Resumption state kept across reloads (a SIGHUP must not make every
/// client do a full handshake again), per client-authentication policy: a
/// ticket or cached session issued under one policy never resumes under
/// another (no resuming past a newly required client certificate).
struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

fn resumption(policy: String, cache_size: usize) -> Result<Arc<Resumption>, String> {
    static KEPT: std::sync::Mutex<Vec<(String, Arc<Resumption>)>> =
        std::sync::Mutex::new(Vec::new());
    let key = format!("{policy} cache={cache_size}");
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, r)) = kept.iter().find(|(k, _)| *k == key) {
        return Ok(r.clone());
    }
    let r = Arc::new(Resumption {
        // TLS 1.3 tickets, keys rotated every 6 h (rustls' ticketer).
        ticketer: rustls::crypto::ring::Ticketer::new().map_err(|e| format!("tls: {e}"))?,
        cache: rustls::server::ServerSessionMemoryCache::new(cache_size),
    });
    // Bounded: a policy no longer in the config is dropped after a few reloads.
    if kept.len() >= 16 {
        kept.remove(0);
    }
    kept.push((key, r.clone()));
    Ok(r)
}

impl Tls {
    /// Build from `[tls]`; errors name the file or setting.
    pub fn new(s: &TlsSettings) -> Result<Tls, String> {
        let resolver = Arc::new(Resolver::load(s)?);
        let config = server_config(s, &resolver, s.client_auth, s.client_ca.as_deref())?;
        let mut listeners = Vec::new();
        for l in &s.listeners {
            let addr: SocketAddr = l
                .listen
                .parse()
                .map_err(|_| format!("tls.listeners: `{}` is not an IP:port", l.listen))?;
            let c = server_config(s, &resolver, l.client_auth, l.client_ca.as_deref())?;
            listeners.push((addr, Arc::new(c)));
        }
        let listen = s.listen.iter().filter_map(|a| a.parse().ok()).collect();
        Ok(Tls {
            config: Arc::new(config),
            listeners,
            listen,
            resolver,
            handshake_timeout: s.handshake_timeout,
        })
    }

    /// A server-side session for a new connection on the TLS listener `local`.
    pub fn accept(&self, local: SocketAddr) -> Result<ServerConnection, rustls::Error> {
        if !self.listen.contains(&local) {
            return Err(rustls::Error::General(format!(
                "{local} is no longer in tls.listen (restart to apply); handshake refused"
            )));
        }
        let config = self
            .listeners
            .iter()
            .find(|(a, _)| *a == local)
            .map_or(&self.config, |(_, c)| c);
        ServerConnection::new(config.clone())
    }
}

/// One rustls config: `[tls]` with the given client authentication.
fn server_config(
    s: &TlsSettings,
    resolver: &Arc<Resolver>,
    client_auth: ClientAuth,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls: {e}"))?;
    let (builder, policy) = match (client_ca, client_auth) {
        (_, ClientAuth::None) => (builder.with_no_client_auth(), "none".to_string()),
        (None, _) => return Err("tls.client_auth needs tls.client_ca".into()),
        (Some(ca), mode) => {
            // Read once: the roots and the resumption policy key (which
            // includes the bundle's content, so sessions verified under a
            // replaced bundle never resume) come from the same bytes.
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no CA certificate in the file", ca.display()));
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, &pem);
            let hex: String = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if mode == ClientAuth::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            (
                builder.with_client_cert_verifier(
                    v.build().map_err(|e| format!("tls.client_ca: {e}"))?,
                ),
                format!("{mode:?} {} {hex}", ca.display()),
            )
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = if s.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let kept = resumption(policy, s.session_cache)?;
    if s.session_tickets {
        config.ticketer = kept.ticketer.clone();
    }
    config.session_storage = kept.cache.clone();
    // Answer a client's close_notify, and don't keep writing into a dead peer.
    config.send_half_rtt_data = false;
    Ok(config)
}

/// A TLS failure, by kind, for `gateway_tls_handshake_errors_total{kind}`.
pub fn error_kind(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "unexpected_message"
        }
        E::InvalidMessage(_) => "invalid_message",
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(_) => "bad_client_certificate",
        E::PeerIncompatible(_) => "incompatible",
        E::PeerMisbehaved(_) => "misbehaved",
        E::AlertReceived(_) => "alert_received",
        E::DecryptError => "decrypt_error",
        E::NoApplicationProtocol => "no_application_protocol",
        _ => "other",
    }
}

/// Log, then count, a certificate reload (logged first: whoever sees the
/// count finds the event). `trigger`: what asked for it (`file_watch`,
/// `admin_api`).
pub fn note_reload(metrics: &crate::metrics::Metrics, r: &Result<usize, String>, trigger: &str) {
    match r {
        Ok(n) => {
            tracing::info!(certificates = n, trigger, "TLS certificates reloaded");
            metrics.tls_reloads.with_label_values(&["ok"]).inc();
        }
        Err(e) => {
            tracing::error!(error = %e, trigger, "TLS certificate reload refused; the certificates in force stay");
            metrics.tls_reloads.with_label_values(&["error"]).inc();
        }
    }
}

/// Run the handshake for a connection accepted on a TLS listener; `None`
/// when it failed (counted and logged; the connection is closed).
pub async fn terminate(
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    tls: &Tls,
    buffer_size: usize,
    metrics: &crate::metrics::Metrics,
) -> Option<crate::io::Conn> {
    use crate::io::{Conn, HandshakeError};
    let session = match tls.accept(local) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a TLS session");
            return None;
        }
    };
    let mut conn = Conn::new_tls(stream, buffer_size, session);
    match conn.handshake(tls.handshake_timeout).await {
        Ok(()) => {
            let s = conn.tls_session()?;
            let version = match s.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                _ => "other",
            };
            let resumed = matches!(s.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
            metrics
                .tls_handshakes
                .with_label_values(&[version, if resumed { "true" } else { "false" }])
                .inc();
            Some(conn)
        }
        Err(e) => {
            let kind = match &e {
                HandshakeError::Timeout => "timeout",
                HandshakeError::Closed => "closed",
                HandshakeError::Io(_) => "io",
                HandshakeError::Tls(t) => error_kind(t),
            };
            metrics.tls_errors.with_label_values(&[kind]).inc();
            tracing::debug!(client = %peer, kind, error = ?e, "TLS handshake failed");
            None
        }
    }
}
