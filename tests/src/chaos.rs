//! Chaos under load: a gateway in front of two simulated GPU servers
//! (`gpu-sim` processes), with Redis-synced rate limits and a TLS listener,
//! under steady mixed load, while one fault at a time is injected. Shared
//! by `cargo xtask chaos` (long windows, a report) and `tests/chaos.rs`
//! (short windows, the promises asserted).
//!
//! Load: threads, each on its own keep-alive connection, cycling through
//! three kinds of request: an idempotent `GET /health` (relayed to a
//! backend), a streamed chat completion over plain HTTP and one over TLS.
//! Every request is a [`Sample`]: when it started and ended and how it
//! ended ([`Outcome`]): a stream counts as whole only when its last event
//! (`data: [DONE]`) and the chunked terminator arrived.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gateway::{bin, free_port, temp_dir};
use crate::redis::Redis;
use crate::tls::{write_pair, Ca, ClientOpts};
use crate::{Driver, Gateway, Spec};

/// One simulated GPU server process (killable, freezable).
pub struct Sim {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Sim {
    pub fn start(addr: SocketAddr) -> Sim {
        let child = Command::new(bin("GPU_SIM_BIN", "gpu-sim"))
            .args([
                "--listen",
                &addr.to_string(),
                "--max-batch",
                "64",
                "--step-ms",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gpu-sim");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "gpu-sim did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sim {
            child: Some(child),
            addr,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Sim::start(self.addr);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGSTOP: the process keeps its sockets, the kernel keeps accepting
    /// connections for it, and nothing answers.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
    }
}

/// Everything the faults act on.
pub struct Rig {
    pub gateway: Gateway,
    pub sims: Vec<Sim>,
    pub redis: Redis,
    pub tls_addr: SocketAddr,
    pub ca_pem: String,
    ca: Ca,
    pki: PathBuf,
}

/// The gateway's config body (after `[server]`/`[admin]`/`[log]`).
fn body(sims: &[SocketAddr], redis: u16, tls_port: u16, pki: &std::path::Path) -> String {
    let backends: Vec<String> = sims.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[clusters.gpu]
backends = [{backends}]
[clusters.gpu.balance]
algorithm = "least_request"
engine = "vllm"
metrics_interval = "100ms"
health_path = "/health"
health_interval = "250ms"
eject_after = 2
ejection = "1s"
warmup = "0s"

[[models]]
name = "sim"

[[routes]]
name = "health"
path_prefix = "/health"
methods = ["GET"]
cluster = "gpu"
[routes.timeouts]
upstream_connect = "500ms"
upstream_response = "1s"

[[routes]]
name = "chat"
path_prefix = "/v1/"
protocol = "openai"
cluster = "gpu"
[routes.timeouts]
upstream_connect = "500ms"

[ratelimit.redis]
address = "127.0.0.1:{redis}"
sync_interval = "50ms"
timeout = "200ms"
[ratelimit.model]
requests_per_second = 100000
burst = 100000
on_redis_failure = "open"

[tls]
listen = ["127.0.0.1:{tls_port}"]
reload_check = "200ms"
[[tls.certificates]]
cert = "{d}/api.crt"
key = "{d}/api.key"
"#,
        backends = backends.join(", "),
        d = pki.display()
    )
}

impl Rig {
    pub fn start(driver: Driver) -> Rig {
        let dir = temp_dir("chaos");
        let sims: Vec<Sim> = (0..2)
            .map(|_| Sim::start(format!("127.0.0.1:{}", free_port()).parse().unwrap()))
            .collect();
        let redis = Redis::start_on(free_port(), &dir);
        let ca = Ca::new("chaos CA");
        write_pair(&dir, "api", &ca.leaf(&["api.test"]));
        let tls_port = free_port();
        let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
        let text = body(&addrs, redis.port, tls_port, &dir);
        let mut spec = Spec::new(driver, &text);
        spec.server_extra = "shutdown_grace = \"20s\"";
        let gateway = Gateway::start(spec);
        gateway.wait_metric(&["gateway_ratelimit_redis_up"], 1.0);
        Rig {
            gateway,
            sims,
            redis,
            tls_addr: format!("127.0.0.1:{tls_port}").parse().unwrap(),
            ca_pem: ca.pem.clone(),
            ca,
            pki: dir,
        }
    }

    /// The gateway's account of failures: its access lines with a 5xx and
    /// its warnings (the last 20: those of the fault just ended).
    pub fn why(&self) -> String {
        let log = self.gateway.log_text();
        let mut lines: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| l.contains("\"status\":5") || l.contains("\"level\":\"WARN\""))
            .take(20)
            .collect();
        lines.reverse();
        lines.join("\n")
    }

    /// Write a freshly issued certificate for the TLS listener (picked up
    /// within `reload_check`).
    pub fn rotate_certificate(&self) {
        write_pair(&self.pki, "api", &self.ca.leaf(&["api.test"]));
    }
}

/// The kinds of request the load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `GET /health`, relayed to a backend: idempotent.
    Get,
    /// A streamed chat completion over plain HTTP/1.1.
    Stream,
    /// The same over TLS.
    TlsStream,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// An answer with this status (not 200).
    Status(u16),
    /// The connection could not be made (refused, or TLS handshake failed).
    Refused,
    /// The connection broke before a response head.
    Broken,
    /// A 200 stream that ended before its last event.
    Cut,
    /// No answer within the client's timeout.
    Timeout,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub kind: Kind,
    pub start: Instant,
    pub end: Instant,
    pub outcome: Outcome,
}

/// The load: threads sending until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

const CHAT: &str = r#"{"model":"sim","messages":[{"role":"user","content":"tell me a short story about the sea"}],"max_tokens":24,"stream":true}"#;

impl Load {
    pub fn start(rig: &Rig, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let tls = ClientOpts::trusting(&rig.ca_pem).config();
        let handles = (0..threads)
            .map(|i| {
                let (stop, samples, tls) = (stop.clone(), samples.clone(), tls.clone());
                let (plain, tls_addr) = (rig.gateway.addr, rig.tls_addr);
                std::thread::spawn(move || {
                    let kind = match i % 3 {
                        0 => Kind::Get,
                        1 => Kind::Stream,
                        _ => Kind::TlsStream,
                    };
                    let mut conn: Option<Box<dyn ReadWrite>> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let outcome = one(kind, &mut conn, plain, tls_addr, &tls);
                        let s = Sample {
                            kind,
                            start,
                            end: Instant::now(),
                            outcome,
                        };
                        samples.lock().unwrap().push(s);
                        if outcome != Outcome::Ok {
                            conn = None;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads: handles,
            samples,
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let s = self.samples.lock().unwrap().clone();
        s
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn connect(
    kind: Kind,
    plain: SocketAddr,
    tls_addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Option<Box<dyn ReadWrite>> {
    if kind == Kind::TlsStream {
        let c = crate::tls::connect(tls_addr, "api.test", tls.clone()).ok()?;
        c.tls.sock.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
        return Some(Box::new(c.tls));
    }
    let s = TcpStream::connect_timeout(&plain, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
    s.set_nodelay(true).ok()?;
    Some(Box::new(s))
}

/// How long a client waits for any byte before calling it a timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn one(
    kind: Kind,
    conn: &mut Option<Box<dyn ReadWrite>>,
    plain: SocketAddr,
    tls_addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> Outcome {
    if conn.is_none() {
        *conn = connect(kind, plain, tls_addr, tls);
    }
    let Some(c) = conn.as_mut() else {
        return Outcome::Refused;
    };
    let req = match kind {
        Kind::Get => "GET /health HTTP/1.1\r\nhost: chaos\r\n\r\n".to_string(),
        _ => format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: api.test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        ),
    };
    if c.write_all(req.as_bytes())
        .and_then(|()| c.flush())
        .is_err()
    {
        return Outcome::Broken;
    }
    match read_response(c.as_mut()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Outcome::Timeout
        }
        Err(_) => Outcome::Broken,
        Ok((200, _, false)) => Outcome::Cut,
        Ok((200, body, true)) if kind != Kind::Get && !body.ends_with(b"data: [DONE]\n\n") => {
            Outcome::Cut
        }
        Ok((200, _, true)) => Outcome::Ok,
        Ok((status, _, _)) => Outcome::Status(status),
    }
}

/// Status, body (de-chunked), and whether the body ended as framed (a
/// response cut short gives what arrived and `false`).
fn read_response(c: &mut dyn ReadWrite) -> std::io::Result<(u16, Vec<u8>, bool)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = c.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head.contains("transfer-encoding: chunked");
    let len: Option<usize> = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse().ok())
    });
    let mut raw = buf[head_end..].to_vec();
    let mut read_more = |raw: &mut Vec<u8>| -> bool {
        match c.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                raw.extend_from_slice(&tmp[..n]);
                true
            }
        }
    };
    if let Some(len) = len.filter(|_| !chunked) {
        while raw.len() < len {
            if !read_more(&mut raw) {
                return Ok((status, raw, false));
            }
        }
        raw.truncate(len);
        return Ok((status, raw, true));
    }
    if !chunked {
        return Ok((status, raw, true));
    }
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = raw[at..].windows(2).position(|w| w == b"\r\n") else {
            if !read_more(&mut raw) {
                return Ok((status, body, false));
            }
            continue;
        };
        let size = std::str::from_utf8(&raw[at..at + eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else {
            return Ok((status, body, false));
        };
        let need = at + eol + 2 + size + 2;
        while raw.len() < need {
            if !read_more(&mut raw) {
                return Ok((status, body, false));
            }
        }
        if size == 0 {
            return Ok((status, body, true));
        }
        body.extend_from_slice(&raw[at + eol + 2..at + eol + 2 + size]);
        at = need;
    }
}

/// What a fault did to the requests that overlapped its window.
#[derive(Debug, Default)]
pub struct Report {
    pub name: String,
    /// Requests that started in the window, per kind: (total, ok).
    pub by_kind: std::collections::BTreeMap<Kind, (u64, u64)>,
    /// Failures by kind and outcome.
    pub failures: std::collections::BTreeMap<(Kind, Outcome), u64>,
    /// Seconds from the fault to the end of the last failed request (0: none failed).
    pub recovery_s: f64,
    /// Slowest request in the window.
    pub slowest: Duration,
}

impl Report {
    /// The samples that overlap `[from, to]`.
    pub fn of(name: &str, samples: &[Sample], from: Instant, to: Instant) -> Report {
        let mut r = Report {
            name: name.to_string(),
            ..Report::default()
        };
        for s in samples.iter().filter(|s| s.end >= from && s.start <= to) {
            let e = r.by_kind.entry(s.kind).or_default();
            e.0 += 1;
            if s.outcome == Outcome::Ok {
                e.1 += 1;
            } else {
                *r.failures.entry((s.kind, s.outcome)).or_default() += 1;
                r.recovery_s = r
                    .recovery_s
                    .max(s.end.saturating_duration_since(from).as_secs_f64());
            }
            r.slowest = r.slowest.max(s.end - s.start);
        }
        r
    }

    pub fn failed(&self, kind: Kind) -> u64 {
        self.failures
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn cut(&self) -> u64 {
        self.failures
            .iter()
            .filter(|((_, o), _)| *o == Outcome::Cut)
            .map(|(_, n)| n)
            .sum()
    }

    /// One line for the table.
    pub fn line(&self) -> String {
        let total: u64 = self.by_kind.values().map(|v| v.0).sum();
        let ok: u64 = self.by_kind.values().map(|v| v.1).sum();
        let fails: Vec<String> = self
            .failures
            .iter()
            .map(|((k, o), n)| format!("{k:?}/{o:?}={n}"))
            .collect();
        format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} |",
            self.name,
            total,
            ok,
            if fails.is_empty() {
                "-".into()
            } else {
                fails.join(" ")
            },
            self.cut(),
            self.recovery_s,
            self.slowest.as_secs_f64()
        )
    }
}

/// The faults, one at a time; `scale` stretches every wait (1.0: the short
/// form the tests use, seconds long).
pub struct Faults {
    pub scale: f64,
}

impl Faults {
    fn wait(&self, secs: f64) {
        std::thread::sleep(Duration::from_secs_f64(secs * self.scale));
    }

    /// Run `inject` with the load on; the report covers the fault and the
    /// settling time after it.
    pub fn run(&self, name: &str, load: &Load, inject: impl FnOnce(&Self)) -> Report {
        self.wait(0.5);
        let from = Instant::now();
        inject(self);
        self.wait(1.5);
        let to = Instant::now();
        // Requests still in flight at `to` finish before they are counted.
        std::thread::sleep(CLIENT_TIMEOUT.min(Duration::from_secs(3)));
        Report::of(name, &load.samples(), from, to)
    }

    pub fn kill_backend(&self, rig: &mut Rig, load: &Load) -> Report {
        let name = format!("backend killed, restarted {:.0} s later", 2.0 * self.scale);
        self.run(&name, load, |f| {
            rig.sims[0].kill();
            f.wait(2.0);
            rig.sims[0].restart();
        })
    }

    pub fn freeze_backend(&self, rig: &mut Rig, load: &Load) -> Report {
        let name = format!("backend frozen (SIGSTOP) {:.0} s", 2.0 * self.scale);
        self.run(&name, load, |f| {
            rig.sims[1].freeze();
            f.wait(2.0);
            rig.sims[1].thaw();
        })
    }

    pub fn kill_redis(&self, rig: &mut Rig, load: &Load) -> Report {
        let name = format!("Redis killed, restarted {:.0} s later", 2.0 * self.scale);
        self.run(&name, load, |f| {
            rig.redis.kill();
            f.wait(2.0);
            rig.redis.restart();
        })
    }

    pub fn reloads(&self, rig: &mut Rig, load: &Load, every: Duration, times: usize) -> Report {
        let name = format!("config reloaded every {every:?}, {times}×");
        self.run(&name, load, |_| {
            for _ in 0..times {
                rig.gateway.reload();
                std::thread::sleep(every);
            }
        })
    }

    pub fn rotate_certificates(&self, rig: &mut Rig, load: &Load, times: usize) -> Report {
        let name = format!("TLS certificate rotated {times}×");
        self.run(&name, load, |f| {
            for _ in 0..times {
                rig.rotate_certificate();
                f.wait(0.5);
            }
        })
    }

    /// SIGTERM with the load on: what was accepted must finish; the report
    /// covers the requests that started before the signal.
    pub fn drain(&self, rig: &mut Rig, load: &Load) -> (Report, Option<std::process::ExitStatus>) {
        self.wait(0.5);
        let at = Instant::now();
        rig.gateway.signal(libc::SIGTERM);
        let exit = rig.gateway.wait_exit(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200));
        let accepted: Vec<Sample> = load
            .samples()
            .into_iter()
            .filter(|s| s.start < at && s.end >= at)
            .collect();
        (
            Report::of(
                "SIGTERM drain (requests in flight at the signal)",
                &accepted,
                at,
                at,
            ),
            exit,
        )
    }
}

pub const TABLE_HEAD: &str = "| fault | requests | ok | failed (kind/outcome=n) | streams cut | recovery s | slowest s |\n|---|---|---|---|---|---|---|";

/// Latencies of a light client: sequential `GET /v1/models` (answered by
/// the gateway from its catalogue: what the gateway itself costs, not the
/// backends' queues) on one keep-alive connection for `window`; its p50
/// and p99 (and failures).
pub fn light_client(addr: SocketAddr, window: Duration) -> (Duration, Duration, u64) {
    let mut lat = Vec::new();
    let mut failed = 0;
    let until = Instant::now() + window;
    let mut conn: Option<TcpStream> = None;
    while Instant::now() < until {
        let t = Instant::now();
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok();
            if let Some(c) = &conn {
                let _ = c.set_read_timeout(Some(CLIENT_TIMEOUT));
            }
        }
        let ok = conn.as_mut().is_some_and(|c| {
            c.write_all(b"GET /health HTTP/1.1\r\nhost: light\r\n\r\n")
                .is_ok()
                && matches!(read_response(c), Ok((200, _, true)))
        });
        if ok {
            lat.push(t.elapsed());
        } else {
            failed += 1;
            conn = None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (q(0.5), q(0.99), failed)
}

/// Raise this process's open-files limit to its hard limit (the harness
/// holds thousands of client connections).
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}

/// Open `n` connections (as fast as the gateway accepts them), each either
/// idle after one request (`keepalive`) or holding a request head that
/// never ends (slowloris: a header line every `drip`, by [`drip`]).
pub fn open_many(addr: SocketAddr, n: usize, keepalive: bool) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            continue;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let first: &[u8] = if keepalive {
            b"GET /health HTTP/1.1\r\nhost: idle\r\n\r\n"
        } else {
            b"GET /slowloris HTTP/1.1\r\nhost: slow\r\n"
        };
        if c.write_all(first).is_err() {
            continue;
        }
        if keepalive && !matches!(read_response(&mut c), Ok((200, _, true))) {
            continue;
        }
        out.push(c);
    }
    out
}

/// `n` connections that each send a chat completion's head and the first
/// bytes of a large body, then one byte at a time ([`drip`]): slow uploads.
pub fn open_slow_uploads(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    open_sending(addr, n, b"POST /v1/chat/completions HTTP/1.1\r\nhost: slow\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"model\":\"sim\",\"messages\":[{\"role\":\"user\",\"content\":\"")
}

/// `n` connections that each ask for a long streamed completion and never
/// read it: slow readers, whose responses back up into the gateway.
pub fn open_slow_readers(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let body = r#"{"model":"sim","messages":[{"role":"user","content":"write a very long story"}],"max_tokens":4000,"stream":true}"#;
    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: slow\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    open_sending(addr, n, req.as_bytes())
}

/// `n` clients each holding one long SSE stream open and reading it as it
/// comes (model-paced generations, the concurrency an inference gateway
/// carries), until [`Streams::stop`]; a stream that ends is asked again.
pub struct Streams {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

pub fn open_streams(addr: SocketAddr, n: usize) -> Streams {
    let body = r#"{"model":"sim","messages":[{"role":"user","content":"write a very long story"}],"max_tokens":4000,"stream":true}"#;
    let req = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: streams\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..n)
        .map(|_| {
            let (stop, req) = (stop.clone(), req.clone());
            std::thread::spawn(move || {
                let mut bytes = 0u64;
                let mut buf = vec![0u8; 16 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    if c.write_all(req.as_bytes()).is_err() {
                        continue;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => bytes += k as u64,
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                }
                bytes
            })
        })
        .collect();
    Streams { stop, threads }
}

impl Streams {
    /// Stop and close every stream; the response bytes read in all.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or(0))
            .sum()
    }
}

/// `n` connections that have each sent `bytes` (those that could).
fn open_sending(addr: SocketAddr, n: usize, bytes: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            c.write_all(bytes).ok()?;
            Some(c)
        })
        .collect()
}

/// One more header byte on every slowloris connection; how many are still open.
pub fn drip(conns: &mut Vec<TcpStream>) -> usize {
    conns.retain_mut(|c| c.write_all(b"x").is_ok());
    conns.len()
}
