//! A small blocking HTTP(S) GET for the control plane's background threads
//! (JWKS, OIDC discovery, model-server metrics and health checks). Never
//! used on a worker thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
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
    let req = request(authority, path, "application/json");
    let (status, raw) = if tls {
        let config = client_config(ca)?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{url}: {e}"))?;
        let conn =
            rustls::ClientConnection::new(config, name).map_err(|e| format!("{url}: {e}"))?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        read_response(&mut s).map_err(|e| format!("{url}: {e}"))?
    } else {
        let mut s = sock;
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        read_response(&mut s).map_err(|e| format!("{url}: {e}"))?
    };
    if status != 200 {
        return Err(format!("{url}: HTTP {status}"));
    }
    String::from_utf8(raw).map_err(|_| format!("{url}: not UTF-8"))
}

/// GET `path` from `addr` over plain HTTP, every step bounded by `timeout`
/// (model servers' `/metrics` and health checks): the status and the body.
pub fn get_addr(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request(&addr.to_string(), path, "text/plain").as_bytes())?;
    let (status, body) = read_response(&mut s)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/1.0 GET: the body ends at close (or its Content-Length), never chunked.
fn request(authority: &str, path: &str, accept: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nhost: {authority}\r\naccept: {accept}\r\nuser-agent: inference-gateway\r\n\r\n")
}

/// One response: its status and body, read to its Content-Length (a server
/// that keeps the connection open must not turn every read into a timeout)
/// or to EOF, at most [`MAX_BODY`].
fn read_response(s: &mut impl Read) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 16384];
    // Where the body ends, once the head says.
    let mut end: Option<usize> = None;
    loop {
        if end.is_some_and(|e| buf.len() >= e) {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_BODY {
                    return Err(std::io::Error::other(format!(
                        "larger than {MAX_BODY} bytes"
                    )));
                }
                if end.is_none() {
                    if let Some(h) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                        end = Some(
                            head.lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .map_or(usize::MAX, |l| l.saturating_add(h + 4)),
                        );
                    }
                }
            }
            // A server that closes without close_notify still sent a whole HTTP/1.0 body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    let h = memchr::memmem::find(&buf, b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
    let status = std::str::from_utf8(&buf[..h])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let mut body = buf.split_off(h + 4);
    if let Some(e) = end.filter(|&e| e != usize::MAX) {
        body.truncate(e - h - 4);
    }
    Ok((status, body))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_end_at_content_length_or_eof() {
        // A server that keeps the connection open: stop at Content-Length.
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more";
        assert_eq!(read_response(&mut r).unwrap(), (200, b"hello".to_vec()));
        // No length: the body ends at close.
        let mut r: &[u8] = b"HTTP/1.0 503 Busy\r\nx: y\r\n\r\nslow down";
        assert_eq!(read_response(&mut r).unwrap(), (503, b"slow down".to_vec()));
        // A length past what came: what came (the caller sees a short body).
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\nab";
        assert_eq!(read_response(&mut r).unwrap().1, b"ab".to_vec());
        let mut r: &[u8] = b"<html>not http";
        assert!(read_response(&mut r).is_err());
    }
}
