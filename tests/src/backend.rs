//! A real HTTP/1.1 backend on loopback (std threads, one per connection),
//! independent of the gateway's code, with behaviours chosen by path:
//!
//! Behaviours are chosen by the last path segment (`/any/prefix/slow` is `/slow`).
//!
//! | path | behaviour |
//! |---|---|
//! | any other | 200 JSON: method, path, headers seen, body length and FNV-1a hash (the body is streamed, never stored) |
//! | `/v1/chat/completions` | OpenAI-style completion with `usage`; `"stream": true` in the body → SSE token stream (usage in a last event with `stream_options.include_usage`) |
//! | `/sse?n=N&gap_ms=M` | chunked `text/event-stream`, N events M ms apart |
//! | `/sse-gated` | one event, then waits for [`Backend::release`], then `[DONE]` |
//! | `/slow?ms=M` | waits M ms, then 200 |
//! | `/generate?ms=M` | "generates" for M ms, watching its connection; a caller that hangs up is counted in `aborted` |
//! | `/chunked?n=N&size=S` | chunked response of N chunks of S bytes |
//! | `/close?bytes=N` | N bytes, no Content-Length, ends by closing |
//! | `/big?bytes=N` | N bytes with Content-Length |
//! | `/reset` | head announcing 100000 bytes, 10 bytes, then RST |
//! | `/drop` | reads the request, closes without answering |
//! | `/json-chunked` | a small JSON object sent chunked |
//! | `/te-gzip` | a response with `Transfer-Encoding: gzip, chunked` |
//! | `/reject-upload` | answers 413 as soon as the head arrives, never reads the body, closes |
//! | `/v1/completions`, `/v1/embeddings`, `/v1/responses` | OpenAI-shaped answers with `usage` |
//! | `/v1/audio/transcriptions` | `{"text": "<body length> <body FNV-1a>"}` (the upload arrived whole) |
//! | `/v2/models/{m}/infer` | Triton-like identity model: each input back as `OUT_<name>`, in binary form (Triton's binary tensor extension) when it came in binary, else as JSON `data` |

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// `/generate` requests whose caller went away before the answer (like vLLM's abort on disconnect).
    pub aborted: AtomicUsize,
    gate: Mutex<usize>,
    gate_cv: Condvar,
    stop: AtomicBool,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    /// Identifies this backend in its JSON answers (`"backend"`).
    pub name: String,
}

impl Backend {
    /// Start on a free loopback port.
    pub fn start(name: &str) -> Backend {
        Self::start_on("127.0.0.1:0", name)
    }

    pub fn start_on(addr: &str, name: &str) -> Backend {
        let listener = TcpListener::bind(addr).expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        let n = name.to_string();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let n = n.clone();
                std::thread::spawn(move || {
                    let _ = serve(c, &s, &n);
                });
            }
        });
        Backend {
            addr,
            stats,
            name: name.to_string(),
        }
    }

    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }

    pub fn aborted(&self) -> usize {
        self.stats.aborted.load(Ordering::SeqCst)
    }

    /// Let one `/sse-gated` response finish.
    pub fn release(&self) {
        *self.stats.gate.lock().unwrap() += 1;
        self.stats.gate_cv.notify_all();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stats.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

struct Req {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn q(&self, k: &str, default: u64) -> u64 {
        self.query
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

fn fnv1a(h: &mut u64, data: &[u8]) {
    for &b in data {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x100000001b3);
    }
}

pub const FNV_INIT: u64 = 0xcbf29ce484222325;

/// FNV-1a of a byte string, as the backend reports it.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h = FNV_INIT;
    fnv1a(&mut h, data);
    h
}

fn serve(c: TcpStream, s: &Stats, name: &str) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::with_capacity(64 * 1024, c);
    loop {
        let Some(req) = read_head(&mut r)? else {
            return Ok(());
        };
        if req.path.ends_with("/reject-upload") {
            respond_json(
                &mut w,
                413,
                &serde_json::json!({"error": "too large for this backend"}),
                false,
            )?;
            w.flush()?;
            // Leave the body unread; closing with unread data resets the connection.
            std::thread::sleep(Duration::from_millis(100));
            return Ok(());
        }
        // Stream the body through a hash; keep a copy only when small (chat bodies).
        let mut hash = FNV_INIT;
        let mut len = 0u64;
        let mut small = Vec::new();
        read_body(&mut r, &req, |d| {
            fnv1a(&mut hash, d);
            len += d.len() as u64;
            let keep = if req.path.ends_with("/infer") {
                8 << 20
            } else {
                64 * 1024
            };
            if small.len() < keep {
                small.extend_from_slice(d);
            }
        })?;
        // Counted once the whole request (head and body) has arrived.
        s.requests.fetch_add(1, Ordering::SeqCst);
        let keep = req.keep_alive;
        // Behaviour by the last path segment, so route prefixes can be put in front.
        const OPENAI: [&str; 6] = [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/audio/transcriptions",
            "/v1/audio/translations",
        ];
        let behaviour = if OPENAI.contains(&req.path.as_str()) {
            req.path.as_str()
        } else {
            &req.path[req.path.rfind('/').unwrap_or(0)..]
        };
        match behaviour {
            "/drop" => return Ok(()),
            "/reset" => {
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789")?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(50));
                let l = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on our own socket with a valid linger struct.
                unsafe {
                    use std::os::fd::AsRawFd;
                    libc::setsockopt(
                        w.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&l as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                }
                return Ok(());
            }
            "/slow" => {
                std::thread::sleep(Duration::from_millis(req.q("ms", 1000)));
                respond_json(
                    &mut w,
                    200,
                    &serde_json::json!({"backend": name, "slept_ms": req.q("ms", 1000)}),
                    keep,
                )?;
            }
            "/generate" => {
                let until = std::time::Instant::now() + Duration::from_millis(req.q("ms", 5000));
                let mut gone = false;
                while std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                    let mut b = [0u8; 1];
                    // SAFETY: non-blocking peek on our own socket.
                    let n = unsafe {
                        use std::os::fd::AsRawFd;
                        libc::recv(
                            w.as_raw_fd(),
                            b.as_mut_ptr().cast(),
                            1,
                            libc::MSG_PEEK | libc::MSG_DONTWAIT,
                        )
                    };
                    if n == 0 {
                        gone = true;
                        break;
                    }
                }
                if gone {
                    s.aborted.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                respond_json(
                    &mut w,
                    200,
                    &serde_json::json!({"backend": name, "generated": true}),
                    keep,
                )?;
            }
            "/sse" => {
                let n = req.q("n", 5);
                let gap = req.q("gap_ms", 100);
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
                for i in 0..n {
                    chunk(&mut w, format!("data: {{\"token\":{i}}}\n\n").as_bytes())?;
                    std::thread::sleep(Duration::from_millis(gap));
                }
                chunk(&mut w, b"data: [DONE]\n\n")?;
                w.write_all(b"0\r\n\r\n")?;
            }
            "/sse-gated" => {
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
                chunk(&mut w, b"data: {\"token\":0}\n\n")?;
                let g = s.gate.lock().unwrap();
                let (mut g, _) = s
                    .gate_cv
                    .wait_timeout_while(g, Duration::from_secs(20), |n| *n == 0)
                    .unwrap();
                *g = g.saturating_sub(1);
                drop(g);
                chunk(&mut w, b"data: [DONE]\n\n")?;
                w.write_all(b"0\r\n\r\n")?;
            }
            "/json-chunked" => {
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")?;
                chunk(&mut w, br#"{"id":"secret-internal","keep":"#)?;
                chunk(&mut w, br#"1}"#)?;
                w.write_all(b"0\r\n\r\n")?;
            }
            "/te-gzip" => {
                w.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n")?;
                chunk(&mut w, b"not really gzip")?;
                w.write_all(b"0\r\n\r\n")?;
            }
            "/chunked" => {
                let n = req.q("n", 4);
                let size = req.q("size", 1000) as usize;
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
                for i in 0..n {
                    chunk(&mut w, &vec![b'a' + (i % 26) as u8; size])?;
                }
                w.write_all(b"0\r\n\r\n")?;
            }
            "/close" => {
                let n = req.q("bytes", 1000) as usize;
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n")?;
                w.write_all(&vec![b'z'; n])?;
                return Ok(());
            }
            "/big" => {
                let n = req.q("bytes", 1 << 20) as usize;
                write!(w, "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\n\r\n")?;
                let n = if req.method == "HEAD" { 0 } else { n };
                let block = vec![b'b'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(block.len());
                    w.write_all(&block[..k])?;
                    left -= k;
                }
            }
            "/v1/chat/completions" => {
                let body: serde_json::Value =
                    serde_json::from_slice(&small).unwrap_or(serde_json::Value::Null);
                let model = body["model"].as_str().unwrap_or("demo").to_string();
                if body["stream"].as_bool() == Some(true) {
                    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")?;
                    for (i, tok) in ["Hello", " from", " the", " demo", " backend", "."]
                        .iter()
                        .enumerate()
                    {
                        let ev = serde_json::json!({"id":"chatcmpl-demo","object":"chat.completion.chunk","model":model,
                            "choices":[{"index":0,"delta":{"content":tok},"finish_reason":null}]});
                        chunk(&mut w, format!("data: {ev}\n\n").as_bytes())?;
                        std::thread::sleep(Duration::from_millis(20 + 5 * i as u64));
                    }
                    if body["stream_options"]["include_usage"].as_bool() == Some(true) {
                        let ev = serde_json::json!({"id":"chatcmpl-demo","object":"chat.completion.chunk","model":model,"choices":[],
                            "usage":{"prompt_tokens":len / 4,"completion_tokens":6,"total_tokens":len / 4 + 6}});
                        chunk(&mut w, format!("data: {ev}\n\n").as_bytes())?;
                    }
                    chunk(&mut w, b"data: [DONE]\n\n")?;
                    w.write_all(b"0\r\n\r\n")?;
                } else {
                    let v = serde_json::json!({"id":"chatcmpl-demo","object":"chat.completion","model":model,"backend":name,
                        "choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the demo backend."},"finish_reason":"stop"}],
                        "usage":{"prompt_tokens":len / 4,"completion_tokens":6,"total_tokens":len / 4 + 6}});
                    respond_json(&mut w, 200, &v, keep)?;
                }
            }
            "/v1/completions" | "/v1/embeddings" | "/v1/responses" => {
                let body: serde_json::Value =
                    serde_json::from_slice(&small).unwrap_or(serde_json::Value::Null);
                let model = body["model"].as_str().unwrap_or("demo").to_string();
                let usage = serde_json::json!({"prompt_tokens":len / 4,"completion_tokens":6,"total_tokens":len / 4 + 6,
                    "input_tokens":len / 4,"output_tokens":6});
                let mut v = match behaviour {
                    "/v1/completions" => {
                        serde_json::json!({"id":"cmpl-demo","object":"text_completion","model":model,
                        "choices":[{"index":0,"text":"Hello from the demo backend.","finish_reason":"stop"}],"usage":usage})
                    }
                    "/v1/embeddings" => serde_json::json!({"object":"list","model":model,
                        "data":[{"object":"embedding","index":0,"embedding":[0.25,-0.5,1.0]}],"usage":usage}),
                    _ => {
                        serde_json::json!({"id":"resp_demo","object":"response","model":model,"status":"completed",
                        "output":[{"type":"message","id":"msg_1","role":"assistant","status":"completed",
                            "content":[{"type":"output_text","text":"Hello from the demo backend.","annotations":[]}]}],
                        "usage":usage})
                    }
                };
                // What arrived, beside the answer (clients ignore unknown fields).
                v["body_len"] = len.into();
                v["headers"] = req
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::String(v.clone())))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                respond_json(&mut w, 200, &v, keep)?;
            }
            "/v1/audio/transcriptions" | "/v1/audio/translations" => {
                let v = serde_json::json!({"text": format!("{len} {hash:016x}")});
                respond_json(&mut w, 200, &v, keep)?;
            }
            "/infer" => {
                let header_len = req
                    .header("inference-header-content-length")
                    .and_then(|v| v.parse().ok());
                let (head, out) = kserve_identity(&small, header_len, &req.path);
                w.write_all(head.as_bytes())?;
                w.write_all(&out)?;
            }
            _ => {
                let headers: serde_json::Map<String, serde_json::Value> = req
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), serde_json::Value::String(v.clone())))
                    .collect();
                let v = serde_json::json!({
                    "backend": name, "method": req.method, "path": req.path,
                    "headers": headers, "body_len": len, "body_fnv": format!("{hash:016x}"),
                });
                respond_json(&mut w, 200, &v, keep)?;
            }
        }
        w.flush()?;
        if !keep {
            return Ok(());
        }
    }
}

/// A Triton-like identity model for `POST /v2/models/{m}/infer`: each
/// input comes back as output `OUT_<name>` with the same datatype, shape
/// and values; raw bytes in Triton's binary tensor extension when the input
/// came that way, JSON `data` otherwise. Returns the response head and body.
fn kserve_identity(body: &[u8], header_len: Option<usize>, path: &str) -> (String, Vec<u8>) {
    let json_len = header_len.unwrap_or(body.len()).min(body.len());
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body[..json_len]) else {
        let e = br#"{"error":"backend: the request is not JSON"}"#;
        return (format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", e.len()), e.to_vec());
    };
    let mut binary = &body[json_len..];
    let mut raw_out = Vec::new();
    let mut outputs = Vec::new();
    for i in req["inputs"].as_array().into_iter().flatten() {
        let mut o = serde_json::json!({
            "name": format!("OUT_{}", i["name"].as_str().unwrap_or("")),
            "datatype": i["datatype"], "shape": i["shape"],
        });
        match i["parameters"]["binary_data_size"].as_u64() {
            Some(n) => {
                let n = (n as usize).min(binary.len());
                raw_out.extend_from_slice(&binary[..n]);
                binary = &binary[n..];
                o["parameters"] = serde_json::json!({"binary_data_size": n});
            }
            None => o["data"] = i["data"].clone(),
        }
        outputs.push(o);
    }
    let model = path.split('/').nth(3).unwrap_or("");
    let head = serde_json::json!({"model_name": model, "model_version": "1", "outputs": outputs})
        .to_string();
    let mut out = head.clone().into_bytes();
    if raw_out.is_empty() {
        return (
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                out.len()
            ),
            out,
        );
    }
    out.extend_from_slice(&raw_out);
    (
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ninference-header-content-length: {}\r\ncontent-length: {}\r\n\r\n",
            head.len(),
            out.len()
        ),
        out,
    )
}

fn chunk(w: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

fn respond_json(
    w: &mut TcpStream,
    status: u16,
    v: &serde_json::Value,
    keep: bool,
) -> std::io::Result<()> {
    let body = v.to_string();
    write!(
        w,
        "HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if keep { "" } else { "connection: close\r\n" }
    )
}

fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Req>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let version = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let conn = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.to_ascii_lowercase());
    let keep_alive = version == "HTTP/1.1" && conn.as_deref() != Some("close");
    Ok(Some(Req {
        method,
        path: path.to_string(),
        query,
        headers,
        keep_alive,
    }))
}

fn read_body(
    r: &mut BufReader<TcpStream>,
    req: &Req,
    mut sink: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    line.clear();
                    r.read_line(&mut line)?;
                    if line == "\r\n" || line.is_empty() {
                        return Ok(());
                    }
                }
            }
            let mut left = size;
            while left > 0 {
                let k = left.min(buf.len());
                r.read_exact(&mut buf[..k])?;
                sink(&buf[..k]);
                left -= k;
            }
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    }
    let mut left: u64 = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while left > 0 {
        let k = (left as usize).min(buf.len());
        let n = r.read(&mut buf[..k])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        sink(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}
