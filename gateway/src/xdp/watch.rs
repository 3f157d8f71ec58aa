//! The XDP watch stream: sampled verdicts from the packet path, for an
//! operator looking at what the front door does right now
//! (`gateway xdp watch`, `GET /xdp/watch`).
//!
//! Off by default. A [`Watcher`] turns it on for as long as it lives: the
//! program then writes one verdict in `one_in` (at random), at most
//! `max_per_second` per CPU, to `aya-log`'s ring buffer. A reader thread
//! parses each record into an [`Event`] and puts it in the [`Hub`], a bounded
//! ring every watcher reads from its own cursor (a slow watcher loses the
//! oldest events and is told how many, it never holds anything up). With
//! several watchers the kernel samples at the finest rate any of them asked
//! for, and each one's own cap is applied here.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gateway_common::{BlockReason, Counter, NO_REASON, WATCH_DROPS, WATCH_PASSES};

use crate::metrics::Metrics;

/// Events the hub keeps for watchers that are behind.
const RING: usize = 4096;

/// One sampled verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    pub counter: Counter,
    /// Why the source is blocked, for verdicts about a block.
    pub block: Option<BlockReason>,
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub port: u16,
    pub src: IpAddr,
}

impl Event {
    /// Parse the program's record, `c=8 r=0 p=6 d=8080 s=203.0.113.7`
    /// (`gateway_common::WATCH_FIELDS`); `None` for anything else.
    pub fn parse(msg: &str, at: SystemTime) -> Option<Event> {
        let mut fields = [None; 5];
        for part in msg.split_ascii_whitespace() {
            let (k, v) = part.split_once('=')?;
            let i = gateway_common::WATCH_FIELDS.iter().position(|f| *f == k)?;
            if fields[i].replace(v).is_some() {
                return None;
            }
        }
        let [Some(c), Some(r), Some(p), Some(d), Some(s)] = fields else {
            return None;
        };
        let counter = *Counter::ALL.get(c.parse::<usize>().ok()?)?;
        let r: u32 = r.parse().ok()?;
        let block = match r {
            NO_REASON => None,
            r => Some(BlockReason::from_u32(r)?),
        };
        Some(Event {
            at,
            counter,
            block,
            proto: p.parse().ok()?,
            port: d.parse().ok()?,
            src: crate::syntax::canonical(s.parse().ok()?),
        })
    }

    /// Dropped, or would have been in monitor mode.
    pub fn is_drop(&self) -> bool {
        self.counter.labels().0 != "pass"
    }

    pub fn json(&self) -> serde_json::Value {
        let (verdict, reason) = self.counter.labels();
        let ms = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        serde_json::json!({
            "ts_ms": ms,
            "verdict": verdict,
            "reason": reason,
            "block": self.block.map(|b| b.as_str()),
            "src": self.src.to_string(),
            "proto": match self.proto { 6 => "tcp", 17 => "udp", _ => "other" },
            "port": self.port,
        })
    }
}

/// What a watcher asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOpts {
    /// Sample one verdict in this many (1: every one).
    pub one_in: u32,
    /// Include passed packets on the gateway's ports, not only drops.
    pub passes: bool,
    /// Events per second at most, per CPU in the kernel and for this watcher.
    pub max_per_second: u32,
}

impl Default for WatchOpts {
    fn default() -> Self {
        WatchOpts {
            one_in: 1,
            passes: false,
            max_per_second: 20,
        }
    }
}

/// The kernel settings that serve every open watcher: the finest sampling,
/// every kind anyone watches, the highest cap (each watcher then applies
/// its own); all zero when nobody watches.
pub fn merged(watchers: &[(u64, WatchOpts)]) -> (u32, u32, u32) {
    let mut one_in = 0;
    let mut what = 0;
    let mut max = 0;
    for (_, o) in watchers {
        one_in = if one_in == 0 {
            o.one_in
        } else {
            one_in.min(o.one_in)
        };
        what |= WATCH_DROPS | if o.passes { WATCH_PASSES } else { 0 };
        max = max.max(o.max_per_second);
    }
    (one_in, what, max)
}

struct Ring {
    events: VecDeque<(u64, Event)>,
    /// Sequence number of the next event pushed.
    next: u64,
}

/// The events read from the kernel, for every watcher to read at its own pace.
pub struct Hub {
    ring: Mutex<Ring>,
    arrived: Condvar,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(RING),
                next: 0,
            }),
            arrived: Condvar::new(),
        }
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn push(&self, e: Event) {
        let mut r = self.lock();
        if r.events.len() == RING {
            r.events.pop_front();
        }
        let seq = r.next;
        r.events.push_back((seq, e));
        r.next += 1;
        drop(r);
        self.arrived.notify_all();
    }

    /// The next sequence number: where a new watcher starts.
    pub fn head(&self) -> u64 {
        self.lock().next
    }

    /// Events from `cursor` on, waiting up to `timeout` for the first;
    /// returns them, the new cursor and how many were lost to the ring's
    /// bound since `cursor`.
    pub fn read(&self, cursor: u64, timeout: Duration) -> (Vec<Event>, u64, u64) {
        let mut r = self.lock();
        if r.next == cursor {
            r = self
                .arrived
                .wait_timeout_while(r, timeout, |r| r.next == cursor)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let first = r.events.front().map(|(s, _)| *s).unwrap_or(r.next);
        let lost = first.saturating_sub(cursor);
        let from = cursor.max(first);
        let skip = (from - first) as usize;
        let out = r.events.iter().skip(skip).map(|(_, e)| e.clone()).collect();
        (out, r.next, lost)
    }
}

/// The `log::Log` the `aya-log` reader hands records to: parses each into an
/// [`Event`] for the hub, counts it, and logs it at debug level
/// (`RUST_LOG=gateway::xdp::watch=debug`).
pub struct Sink {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
}

impl log::Log for Sink {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args().to_string();
        match Event::parse(&msg, SystemTime::now()) {
            Some(e) => {
                self.metrics.xdp_watch_events.inc();
                let (verdict, reason) = e.counter.labels();
                tracing::debug!(verdict, reason, client = %e.src, port = e.port, proto = e.proto, "xdp verdict sampled");
                self.hub.push(e);
            }
            None => tracing::warn!(record = %msg, "unexpected record from the XDP program"),
        }
    }

    fn flush(&self) {}
}

/// Read the ring buffer until `stop` says so: wake on its fd (or every
/// 250 ms to check `stop`), hand every record to the sink.
pub fn read_loop<T: log::Log>(mut reader: aya_log::EbpfLogger<T>, stop: impl Fn() -> bool) {
    use std::os::fd::AsRawFd;
    let fd = reader.as_raw_fd();
    while !stop() {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 250) };
        if n > 0 {
            reader.flush();
        }
    }
}

/// A watcher's own cap: events per second, over one-second windows.
pub struct Cap {
    max: u32,
    window: Instant,
    taken: u32,
    /// Events over the cap, not passed on.
    pub skipped: u64,
}

impl Cap {
    pub fn new(max: u32) -> Cap {
        Cap {
            max,
            window: Instant::now(),
            taken: 0,
            skipped: 0,
        }
    }

    pub fn admit(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.taken = 0;
        }
        if self.taken >= self.max {
            self.skipped += 1;
            return false;
        }
        self.taken += 1;
        true
    }
}

/// `gateway xdp watch`: open `path` on the admin API and print each line
/// as it comes (as a table row, or as sent with `json`); the exit code.
pub fn follow(admin: &str, path: &str, bearer: Option<&str>, json: bool) -> std::io::Result<i32> {
    use std::io::{BufRead, Write};
    use std::net::ToSocketAddrs;
    let addr = admin
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    let auth = bearer
        .map(|b| format!("authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nhost: {admin}\r\n{auth}connection: close\r\n\r\n"
    )?;
    let mut r = std::io::BufReader::new(c);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    if status != 200 {
        let mut body = String::new();
        std::io::Read::read_to_string(&mut r, &mut body)?;
        eprintln!(
            "gateway xdp watch: the gateway answered {status}: {}",
            body.trim()
        );
        return Ok(1);
    }
    let out = std::io::stdout();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(0);
        }
        let mut o = out.lock();
        if json {
            o.write_all(line.as_bytes())?;
        } else if let Some(row) = render(line.trim_end()) {
            writeln!(o, "{row}")?;
        }
        o.flush()?;
    }
}

/// One JSON line of the stream as a human reads it; the header and the
/// summary go to stderr.
fn render(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(w) = v.get("watching") {
        eprintln!(
            "watching XDP verdicts: one in {}, {}, at most {}/s per CPU{}",
            w["one_in"],
            if w["passes"] == true {
                "drops and passes"
            } else {
                "drops"
            },
            w["max_per_second"],
            match w["seconds"].as_u64() {
                Some(0) | None => " (Ctrl-C to stop)".to_string(),
                Some(s) => format!(" for {s}s"),
            }
        );
        return None;
    }
    if let Some(e) = v.get("end") {
        eprintln!(
            "{} verdicts shown; {} lost (reading too slowly), {} over this watch's rate, {} over the kernel's per-CPU cap",
            e["events"], e["lost"], e["skipped"], e["suppressed"]
        );
        return None;
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(v["ts_ms"].as_u64()?);
    let block = v["block"]
        .as_str()
        .map(|b| format!(" ({b})"))
        .unwrap_or_default();
    Some(format!(
        "{}  {:<10} {:<14} {:<39} -> {}/{}",
        humantime::format_rfc3339_millis(at),
        v["verdict"].as_str()?,
        format!("{}{block}", v["reason"].as_str()?),
        v["src"].as_str()?,
        v["proto"].as_str()?,
        v["port"]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_junk_does_not() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1500);
        let e = Event::parse("c=8 r=2 p=6 d=8080 s=203.0.113.7", at).unwrap();
        assert_eq!(e.counter, Counter::DropBlocked);
        assert_eq!(e.block, Some(BlockReason::RateLimit));
        assert_eq!((e.proto, e.port), (6, 8080));
        assert_eq!(e.src, "203.0.113.7".parse::<IpAddr>().unwrap());
        assert!(e.is_drop());
        let j = e.json();
        assert_eq!(j["verdict"], "drop");
        assert_eq!(j["reason"], "blocked");
        assert_eq!(j["block"], "rate_limit");
        assert_eq!(j["proto"], "tcp");
        assert_eq!(j["ts_ms"], 1500);
        let v6 = Event::parse("c=7 r=255 p=17 d=53 s=2001:db8::10", at).unwrap();
        assert_eq!(v6.counter, Counter::Pass);
        assert_eq!(v6.block, None);
        assert!(!v6.is_drop());
        // IPv4-mapped sources read as IPv4, like every other address the gateway shows.
        let mapped = Event::parse("c=9 r=255 p=6 d=1 s=::ffff:192.0.2.1", at).unwrap();
        assert_eq!(mapped.src, "192.0.2.1".parse::<IpAddr>().unwrap());
        for bad in [
            "",
            "c=8 r=0 p=6 d=8080",
            "c=99 r=0 p=6 d=8080 s=1.2.3.4",
            "c=8 r=7 p=6 d=8080 s=1.2.3.4",
            "c=8 r=0 p=6 d=70000 s=1.2.3.4",
            "c=8 c=8 r=0 p=6 d=1 s=1.2.3.4",
            "c=8 r=0 p=6 d=1 s=1.2.3.4 x=1",
            "hello world",
        ] {
            assert_eq!(Event::parse(bad, at), None, "{bad}");
        }
    }

    #[test]
    fn the_kernel_serves_every_watcher() {
        assert_eq!(merged(&[]), (0, 0, 0));
        let a = WatchOpts {
            one_in: 10,
            passes: false,
            max_per_second: 5,
        };
        let b = WatchOpts {
            one_in: 3,
            passes: true,
            max_per_second: 50,
        };
        assert_eq!(merged(&[(1, a)]), (10, WATCH_DROPS, 5));
        assert_eq!(
            merged(&[(1, a), (2, b)]),
            (3, WATCH_DROPS | WATCH_PASSES, 50)
        );
    }

    #[test]
    fn rows_read_like_a_table() {
        let e = Event::parse("c=11 r=1 p=6 d=8080 s=203.0.113.7", SystemTime::UNIX_EPOCH).unwrap();
        let row = render(&e.json().to_string()).unwrap();
        assert!(
            row.starts_with("1970-01-01T00:00:00.000Z  would_drop"),
            "{row}"
        );
        assert!(
            row.contains("blocked (config)")
                && row.ends_with("203.0.113.7                             -> tcp/8080"),
            "{row}"
        );
        assert_eq!(
            render(r#"{"watching":{"one_in":1,"passes":false,"max_per_second":20,"seconds":0}}"#),
            None
        );
        assert_eq!(render("not json"), None);
    }

    #[test]
    fn slow_watchers_lose_the_oldest_and_are_told() {
        let hub = Hub::default();
        let e = Event::parse("c=8 r=0 p=6 d=1 s=1.2.3.4", SystemTime::now()).unwrap();
        let start = hub.head();
        for _ in 0..RING + 10 {
            hub.push(e.clone());
        }
        let (got, next, lost) = hub.read(start, Duration::ZERO);
        assert_eq!((got.len(), lost), (RING, 10));
        assert_eq!(next, (RING + 10) as u64);
        let (got, next2, lost) = hub.read(next, Duration::from_millis(20));
        assert_eq!((got.len(), next2, lost), (0, next, 0));
        let mut cap = Cap::new(3);
        let admitted = (0..10).filter(|_| cap.admit()).count();
        assert_eq!((admitted, cap.skipped), (3, 7));
    }
}
