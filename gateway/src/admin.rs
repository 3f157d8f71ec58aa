//! Admin listener on its own thread (blocking I/O; it serves scrapes and
//! probes, not traffic): `GET /metrics`, `GET /healthz`, `GET /readyz`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::server::Health;

/// Bind now (so a bad address fails the start) and serve on a thread.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("gateway-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = handle(c, &metrics, &health) {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(())
}

fn handle(mut c: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let (method, path) = loop {
        let r = c.read(&mut buf[n..])?;
        if r == 0 {
            return Ok(());
        }
        n += r;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if n < buf.len() => continue,
            _ => return respond(&mut c, 400, "text/plain", b"bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut c, 405, "text/plain", b"method not allowed\n");
    }
    match path {
        "/metrics" => respond(&mut c, 200, "text/plain; version=0.0.4", &metrics.render()),
        "/healthz" => respond(&mut c, 200, "text/plain", b"ok\n"),
        "/readyz" if health.ready() => respond(&mut c, 200, "text/plain", b"ready\n"),
        "/readyz" => respond(&mut c, 503, "text/plain", b"not ready\n"),
        _ => respond(&mut c, 404, "text/plain", b"not found\n"),
    }
}

fn respond(c: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    c.flush()
}
