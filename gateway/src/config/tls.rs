//! `[tls]`: TLS termination, as written. Checked here; the TLS stage itself
//! (certificates loaded) is built from the result by the `generation` module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Sink};

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// Client certificates (mutual TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Not asked for.
    #[default]
    None,
    /// Asked for; verified against `client_ca` when given; a client without one is let through.
    Optional,
    /// Required and verified against `client_ca`; the handshake fails without one.
    Required,
}

/// `[[tls.listeners]]`: mutual TLS for one TLS listener, in place of the
/// `[tls]` default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// One of `tls.listen`.
    pub listen: String,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub client_ca: Option<PathBuf>,
}

/// One certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[tls]`: see README "TLS".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Addresses that speak TLS (server.listen stays plaintext).
    pub listen: Vec<String>,
    /// Certificates; the first is the default for clients without (or with an unknown) SNI.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    /// From accept to a finished handshake; over it the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// TLS 1.3 session tickets (stateless resumption; keys rotate every 6 h).
    pub session_tickets: bool,
    /// Offer HTTP/2 by ALPN (`h2`, preferred, then `http/1.1`); a client
    /// that picks it is served as HTTP/2 (`[http2]` limits).
    pub http2: bool,
    /// Server-side session cache entries (resumption without tickets).
    pub session_cache: usize,
    pub client_auth: ClientAuth,
    /// CA bundle (PEM) client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// How often to check the certificate files for changes; "0s": only on SIGHUP.
    #[serde(deserialize_with = "duration")]
    pub reload_check: Duration,
    /// Per-listener client authentication (overrides `client_auth`/`client_ca`).
    pub listeners: Vec<TlsListener>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            listen: Vec::new(),
            certificates: Vec::new(),
            min_version: TlsVersion::V1_2,
            handshake_timeout: Duration::from_secs(10),
            session_tickets: true,
            http2: true,
            session_cache: 10_000,
            client_auth: ClientAuth::None,
            client_ca: None,
            reload_check: Duration::from_secs(5),
            listeners: Vec::new(),
        }
    }
}

/// `[tls]`, checked: the TLS addresses (none shared with `listen` or the
/// admin listener), and the settings with their files resolved against
/// `base` (the config file's directory).
pub(super) fn check_tls(
    tls: &TlsSettings,
    listen: &[SocketAddr],
    admin: SocketAddr,
    base: &Path,
    sink: &mut Sink,
) -> (Vec<SocketAddr>, TlsSettings) {
    let mut tls_listen = Vec::new();
    for (i, a) in tls.listen.iter().enumerate() {
        match a.parse::<SocketAddr>() {
            Ok(sa) if listen.contains(&sa) => sink.err(
                format!("tls.listen[{i}]"),
                format!(
                    "{sa} is also in server.listen; an address speaks TLS or plaintext, not both"
                ),
            ),
            Ok(sa) => tls_listen.push(sa),
            Err(_) => sink.err(
                format!("tls.listen[{i}]"),
                format!("`{a}` is not an IP:port such as \"0.0.0.0:8443\""),
            ),
        }
    }
    if tls_listen.contains(&admin) {
        sink.err(
            "admin.listen",
            "the admin listener must not share an address with tls.listen",
        );
    }
    let mut settings = tls.clone();
    for c in &mut settings.certificates {
        c.cert = base.join(&c.cert);
        c.key = base.join(&c.key);
    }
    settings.client_ca = settings.client_ca.map(|p| base.join(p));
    if settings.handshake_timeout.is_zero() {
        sink.err(
            "tls.handshake_timeout",
            "must be more than 0s, e.g. \"10s\"",
        );
    }
    if settings.client_auth != ClientAuth::None && settings.client_ca.is_none() {
        sink.err("tls.client_auth", "mutual TLS needs tls.client_ca (the CA bundle client certificates are checked against)");
    }
    check_listeners(&mut settings.listeners, &tls_listen, base, sink);
    if !tls_listen.is_empty() && settings.certificates.is_empty() {
        sink.err(
            "tls.certificates",
            "tls.listen is set: give at least one [[tls.certificates]] cert/key pair",
        );
    }
    (tls_listen, settings)
}

/// `[[tls.listeners]]`: each names one of `tls.listen`, once.
fn check_listeners(
    listeners: &mut [TlsListener],
    tls_listen: &[SocketAddr],
    base: &Path,
    sink: &mut Sink,
) {
    let mut overridden = Vec::new();
    for (i, l) in listeners.iter_mut().enumerate() {
        l.client_ca = l.client_ca.take().map(|p| base.join(p));
        match l.listen.parse::<SocketAddr>() {
            Ok(sa) if !tls_listen.contains(&sa) => sink.err(
                format!("tls.listeners[{i}].listen"),
                format!("{sa} is not in tls.listen"),
            ),
            Ok(sa) if overridden.contains(&sa) => sink.err(
                format!("tls.listeners[{i}].listen"),
                format!("{sa} has two [[tls.listeners]] entries"),
            ),
            Ok(sa) => overridden.push(sa),
            Err(_) => sink.err(
                format!("tls.listeners[{i}].listen"),
                format!("`{}` is not an IP:port such as \"0.0.0.0:9443\"", l.listen),
            ),
        }
        if l.client_auth != ClientAuth::None && l.client_ca.is_none() {
            sink.err(
                format!("tls.listeners[{i}].client_auth"),
                "mutual TLS needs client_ca (the CA bundle client certificates are checked against)",
            );
        }
    }
}
