//! The HTTP/1.1 connection driver: it owns a client connection, reads and
//! parses one request head at a time ([`head`]), hands each request to the
//! pipeline ([`crate::pipeline::run`]), answers refusals and the gateway's
//! own answers in HTTP/1.1 ([`answer`]), and decides whether the connection
//! carries another request or closes (lingering after an error answer so
//! the answer is not lost to an RST).

mod answer;
mod head;

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::net::TcpStream;

use crate::io::Conn;
use crate::pipeline::{self, Incoming, Refusal, Scratch, Served};
use crate::worker::Worker;

use answer::After;
use head::Next;

/// Serve every request of one client connection, in order.
/// `tls`: the TLS listener's address, for a connection accepted on one.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    w: Rc<Worker>,
    tls: Option<SocketAddr>,
) {
    let _ = stream.set_nodelay(true);
    let Some(mut client) = open(stream, peer, &w, tls).await else {
        return;
    };
    if tls.is_none() && w.current().shared.h2c {
        match sniff_h2(&mut client, &w).await {
            Some(true) => {
                let (tcp, read) = client.into_parts();
                crate::http2::serve_h2c(tcp, read, peer, w).await;
                return;
            }
            Some(false) => {}
            None => return,
        }
    }
    // TLS: the client chose HTTP/2 by ALPN.
    if client.tls_session().and_then(|t| t.alpn_protocol()) == Some(b"h2") {
        crate::http2::serve_tls(client, peer, w).await;
        return;
    }
    let conn_id = w.conn_id();
    let mut rq = Incoming::new(peer);
    rq.tls = client
        .tls_session()
        .and_then(|s| s.protocol_version())
        .map(tls_version);
    let mut s = Scratch::default();
    let mut first = true;
    let linger = loop {
        let next = head::read(&mut client, &mut rq.head, &w, conn_id, first).await;
        // The configuration this request runs under, start to end: taken when
        // its head has arrived (a reload while the connection idled applies).
        let cur = w.current();
        let served = match next {
            Next::Close => break false,
            Next::Reject(e) => {
                rq.begin(None, &w, &cur);
                let r = Refusal {
                    must_close: true,
                    ..Refusal::from_error(e.into())
                };
                answer::refuse(&mut client, &r, &rq, &w, &cur, &mut s, false).await;
                break true;
            }
            Next::Request => {
                first = false;
                rq.begin(Some(client.pending()), &w, &cur);
                pipeline::run(&mut client, &mut rq, &w, &cur, &mut s).await
            }
        };
        let after = match served {
            Ok(Served::Relayed { keep_alive }) => After::from_keep_alive(keep_alive),
            Ok(Served::Answer { body, admission }) => {
                let after = answer::own(&mut client, &rq, &w, &cur, &body, &mut s).await;
                // Its concurrency slots go back now that the answer is out.
                drop(admission);
                after
            }
            Err(r) => {
                let head_only = rq.head.is_head;
                answer::refuse(&mut client, &r, &rq, &w, &cur, &mut s, head_only).await
            }
        };
        s.trim();
        match after {
            After::Next if !w.draining.get() => {}
            After::Next | After::Close => break false,
            After::Linger => break true,
        }
    };
    w.mark_busy(conn_id);
    // TLS: say goodbye properly (an EOF without close_notify looks like truncation).
    client.close_notify().await;
    if linger {
        answer::linger_close(&mut client).await;
    }
}

/// Does the connection open with HTTP/2's preface (h2c, prior knowledge)?
/// Reads only until the bytes differ from it or all of it is there (they
/// stay pending for the driver that serves them); `None`: closed or silent.
async fn sniff_h2(client: &mut Conn, w: &Worker) -> Option<bool> {
    let wait = w.current().shared.timeouts.client_header;
    loop {
        let p = client.pending();
        let n = p.len().min(crate::http2::PREFACE.len());
        if p[..n] != crate::http2::PREFACE[..n] {
            return Some(false);
        }
        if n == crate::http2::PREFACE.len() {
            return Some(true);
        }
        match client.fill_timeout(wait).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// A TLS version as the access log names it.
fn tls_version(v: rustls::ProtocolVersion) -> &'static str {
    match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "other",
    }
}

/// The connection as the codec reads it: plaintext, or after a finished
/// TLS handshake on a TLS listener (`None`: it failed, counted and logged).
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    w: &Worker,
    tls: Option<SocketAddr>,
) -> Option<Conn> {
    let cur = w.current();
    let Some(local) = tls else {
        return Some(Conn::new(stream, cur.shared.buffer_size));
    };
    let t = cur.shared.tls.as_ref()?;
    crate::tls::terminate(
        stream,
        peer,
        local,
        t,
        cur.shared.buffer_size,
        &cur.shared.metrics,
    )
    .await
}
