//! A small blocking HTTP(S) GET for the control plane's background threads
//! (JWKS, OIDC discovery). Never used on a worker thread.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Largest document fetched.
const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);
/// Debian's system CA bundle, used for https when no `ca` is given.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// GET `url` (http or https): the body of a 200, or why not.
pub fn get(url: &str, ca: Option<&Path>) -> Result<String, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: only http:// and https:// URLs"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h.trim_matches(['[', ']']),
            p.parse::<u16>().map_err(|_| format!("{url}: bad port"))?,
        ),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or(format!("{url}: no address"))?;
    let sock = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    sock.set_read_timeout(Some(TIMEOUT)).ok();
    sock.set_write_timeout(Some(TIMEOUT)).ok();
    // HTTP/1.0: the body ends at close, never chunked.
    let req = format!("GET {path} HTTP/1.0\r\nhost: {authority}\r\naccept: application/json\r\nuser-agent: inference-gateway\r\n\r\n");
    let raw = if tls {
        let config = client_config(ca)?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{url}: {e}"))?;
        let conn =
            rustls::ClientConnection::new(config, name).map_err(|e| format!("{url}: {e}"))?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        read_all(&mut s, url)?
    } else {
        let mut s = sock;
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        read_all(&mut s, url)?
    };
    let text = String::from_utf8(raw).map_err(|_| format!("{url}: not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("{url}: not an HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{url}: HTTP {status}"));
    }
    Ok(body.to_string())
}

fn read_all(s: &mut impl Read, url: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > MAX_BODY {
                    return Err(format!("{url}: larger than {MAX_BODY} bytes"));
                }
            }
            // A server that closes without close_notify still sent a whole HTTP/1.0 body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
}

fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = ca.unwrap_or(Path::new(SYSTEM_CAS));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .flatten()
    {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificates", path.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
