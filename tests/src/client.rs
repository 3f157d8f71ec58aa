//! A raw HTTP/1.1 client over a plain TcpStream: tests send exact bytes
//! (smuggling vectors, partial heads) and read exactly what came back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was chunked on the wire.
    pub chunked: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Check the gateway's error shape and return its `type`.
    pub fn error_type(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "no error.message in {v}");
        assert!(e["request_id"].is_string(), "no error.request_id in {v}");
        assert_eq!(
            self.header("x-request-id"),
            e["request_id"].as_str(),
            "x-request-id header must match the body"
        );
        e["type"].as_str().expect("error.type").to_string()
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.read_response()
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 64 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "timed out waiting for the gateway; got so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }
            Err(_) => 0,
        }
    }

    /// Read a response head only (e.g. `100 Continue`), leaving the rest buffered.
    pub fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                return (status, headers);
            }
            if self.fill() == 0 {
                panic!(
                    "connection closed before a response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// Read one complete response (skipping 1xx), following its framing.
    pub fn read_response(&mut self) -> Response {
        self.read_response_to(false)
    }

    pub fn read_response_to(&mut self, head_request: bool) -> Response {
        let (mut status, mut headers) = self.read_head();
        while (100..200).contains(&status) {
            (status, headers) = self.read_head();
        }
        let h = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        let chunked = h("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if head_request || status == 204 || status == 304 {
        } else if chunked {
            loop {
                let line = self.read_line();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    while !self.read_line().is_empty() {}
                    break;
                }
                self.need(size + 2);
                body.extend_from_slice(&self.buf[..size]);
                assert_eq!(
                    &self.buf[size..size + 2],
                    b"\r\n",
                    "chunk not followed by CRLF"
                );
                self.buf.drain(..size + 2);
            }
        } else if let Some(cl) = h("content-length") {
            let n: usize = cl.parse().expect("content-length");
            self.need(n);
            body = self.buf.drain(..n).collect();
        } else {
            while self.fill() > 0 {}
            body = std::mem::take(&mut self.buf);
        }
        Response {
            status,
            headers,
            body,
            chunked,
        }
    }

    /// Read one line (without CRLF) of a chunked body.
    pub fn read_line(&mut self) -> String {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return l;
            }
            if self.fill() == 0 {
                panic!(
                    "connection closed mid-line; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// Read the next chunk of a chunked body as it arrives (None at the last chunk).
    pub fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let line = self.read_line();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            while !self.read_line().is_empty() {}
            return None;
        }
        self.need(size + 2);
        let d = self.buf[..size].to_vec();
        self.buf.drain(..size + 2);
        Some(d)
    }

    fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            if self.fill() == 0 {
                panic!("connection closed with {} of {n} bytes", self.buf.len());
            }
        }
    }

    /// Whether the server closed the connection (EOF) within `within`.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut tmp = [0u8; 4096];
        let r = loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => break true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        break false;
                    }
                }
                Err(_) => break true,
            }
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        r
    }

    /// Bytes received but not parsed.
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.read_response()
}

/// curl (a client written by others) over h2c with prior knowledge, `args`
/// before the URL: (HTTP version, status, body).
pub fn curl_h2c(addr: SocketAddr, path: &str, args: &[&str]) -> (String, u16, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(args)
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl runs");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap();
    let tail = String::from_utf8_lossy(&body[nl + 1..]).to_string();
    body.truncate(nl);
    let (v, code) = tail.split_once(' ').unwrap();
    (v.to_string(), code.parse().unwrap(), body)
}
