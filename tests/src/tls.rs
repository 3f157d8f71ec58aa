//! Certificates and a real TLS client for the TLS tests and benches: a CA
//! (rcgen), leaf certificates it signs (ECDSA, or RSA through the openssl
//! CLI since ring can't generate RSA keys), PEM files on disk, and a rustls
//! client that speaks HTTP/1.1 over TLS to the gateway.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority that signs leaves.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let pem = cert.pem();
        Ca { cert, key, pem }
    }

    /// A leaf for `names` (DNS SANs) with an ECDSA P-256 key: (cert PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        self.sign(names, key)
    }

    /// A leaf with a 2048-bit RSA key (made by `openssl genpkey`).
    pub fn rsa_leaf(&self, names: &[&str], dir: &Path) -> (String, String) {
        let path = dir.join(format!("rsa-{}.key", names.join("_")));
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl genpkey");
        let pem = std::fs::read_to_string(&path).unwrap();
        let key = KeyPair::from_pem(&pem).unwrap();
        self.sign(names, key)
    }

    fn sign(&self, names: &[&str], key: KeyPair) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate (no DNS names; CN = `name`).
    pub fn client(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Write `(cert, key)` PEMs to `dir/name.crt` and `dir/name.key`.
pub fn write_pair(dir: &Path, name: &str, pair: &(String, String)) -> (PathBuf, PathBuf) {
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, &pair.0).unwrap();
    std::fs::write(&k, &pair.1).unwrap();
    (c, k)
}

/// The DER of the first certificate in a PEM string.
pub fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Client settings for [`connect`].
#[derive(Clone)]
pub struct ClientOpts {
    pub roots: Vec<String>,
    pub client_cert: Option<(String, String)>,
    pub tls12_only: bool,
    pub tls13_only: bool,
    pub alpn: Vec<Vec<u8>>,
}

impl ClientOpts {
    pub fn trusting(ca_pem: &str) -> ClientOpts {
        ClientOpts {
            roots: vec![ca_pem.to_string()],
            client_cert: None,
            tls12_only: false,
            tls13_only: false,
            alpn: vec![b"http/1.1".to_vec()],
        }
    }

    /// A rustls client config; keep and reuse it to resume sessions.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for pem in &self.roots {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else if self.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let mut c = match &self.client_cert {
            None => b.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .map(|c| c.unwrap())
                        .collect();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                b.with_client_auth_cert(chain, key).unwrap()
            }
        };
        c.alpn_protocols = self.alpn.clone();
        Arc::new(c)
    }
}

/// An open TLS connection to the gateway.
pub struct TlsClient {
    pub tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

/// Connect to `addr` with SNI `name`, and finish the handshake.
pub fn connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let server = ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(config, server).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(TlsClient { tls })
}

impl TlsClient {
    /// The server's leaf certificate (DER).
    pub fn peer_cert(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }

    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.tls.conn.alpn_protocol().map(|a| a.to_vec())
    }

    pub fn resumed(&self) -> bool {
        matches!(
            self.tls.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        )
    }

    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.tls.conn.protocol_version()
    }

    /// One keep-alive GET; returns (status, body).
    pub fn get(&mut self, path: &str, host: &str) -> std::io::Result<(u16, Vec<u8>)> {
        write!(self.tls, "GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n")?;
        self.tls.flush()?;
        self.read_response()
    }

    /// One keep-alive POST of `body`; returns (status, response body).
    pub fn post(&mut self, path: &str, host: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        write!(
            self.tls,
            "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )?;
        for chunk in body.chunks(1 << 20) {
            self.tls.write_all(chunk)?;
        }
        self.tls.flush()?;
        self.read_response()
    }

    fn read_response(&mut self) -> std::io::Result<(u16, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = self.tls.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = self.tls.read(&mut chunk)?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, buf[end + 4..end + 4 + len].to_vec()));
            }
        }
    }
}
