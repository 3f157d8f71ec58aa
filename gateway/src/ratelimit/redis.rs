//! Fleet-wide limits through Redis: a background thread pushes what this
//! gateway consumed on the tenant and model levels (and the tenant quotas)
//! every `sync_interval`, in one atomic Lua script, and takes back the
//! fleet's totals. A request never waits on Redis: it is judged on the
//! local view, at most one sync old.
//!
//! Error bound: between two syncs each of N gateways admits on a view that
//! lacks the others' consumption since the last sync, so a shared limit can
//! be exceeded by at most (N − 1) × (what one gateway admits in one
//! `sync_interval` + its burst). With 2 gateways at 50 ms and 100 req/s,
//! that is 5 requests over the burst.
//!
//! Redis down: every level keeps its local bucket (fail open) or, where
//! configured `on_redis_failure = "closed"`, refuses with 503; the thread
//! reconnects with backoff (100 ms doubling to 5 s) and logs each change.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::RedisSettings;
use super::{quota, Level, Limiter};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// KEYS[i] with ARGV kind ('g': GCRA theoretical arrival time in µs, add
/// `amount` and return the debt ahead of Redis's clock; 'c': counter, add
/// `amount` and return the total), amount, TTL (ms for 'g', s for 'c').
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local kind = ARGV[3*i-2]
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[3*i-1])
    if tat < now then tat = now end
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', tonumber(ARGV[3*i]) + math.floor((tat - now) / 1000))
    out[i] = tat - now
  else
    out[i] = redis.call('INCRBY', KEYS[i], ARGV[3*i-1])
    redis.call('EXPIRE', KEYS[i], ARGV[3*i])
  end
end
return out
"#;

/// A RESP reply.
#[derive(Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A minimal blocking RESP2 connection.
pub struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn connect(addr: &str, timeout: Duration, password: &str) -> std::io::Result<Conn> {
        let sa = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("address resolves to nothing"))?;
        let s = TcpStream::connect_timeout(&sa, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            r: BufReader::new(s),
        };
        if !password.is_empty() {
            if let Reply::Error(e) = c.call(&[b"AUTH", password.as_bytes()])? {
                return Err(std::io::Error::other(format!("AUTH: {e}")));
            }
        }
        Ok(c)
    }

    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut out = Vec::with_capacity(64 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.r.get_mut().write_all(&out)?;
        read_reply(&mut self.r, 0)
    }
}

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

fn read_reply(r: &mut BufReader<TcpStream>, depth: usize) -> std::io::Result<Reply> {
    if depth > 8 {
        return Err(bad("reply nested too deep"));
    }
    let mut line = Vec::new();
    r.by_ref().take(1 << 16).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "Redis closed the connection",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("truncated reply"));
    }
    line.truncate(line.len() - 2);
    let (t, rest) = line.split_first().ok_or_else(|| bad("empty reply"))?;
    let text = String::from_utf8_lossy(rest).into_owned();
    let int = || text.parse::<i64>().map_err(|_| bad("bad integer"));
    Ok(match t {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Int(int()?),
        b'$' => {
            let n = int()?;
            if n < 0 {
                Reply::Bulk(None)
            } else if n > 1 << 20 {
                return Err(bad("bulk reply too large"));
            } else {
                let mut b = vec![0; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Reply::Bulk(Some(b))
            }
        }
        b'*' => {
            let n = int()?;
            if n > 1 << 20 {
                return Err(bad("array reply too large"));
            }
            let mut v = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                v.push(read_reply(r, depth + 1)?);
            }
            Reply::Array(v)
        }
        _ => return Err(bad("unknown reply type")),
    })
}

/// One key pushed in a sync, and where its answer goes.
enum Item {
    Bucket {
        state: Arc<super::KeyState>,
        tokens: bool,
        pushed_ns: i64,
    },
    Quota {
        state: Arc<quota::QuotaState>,
        index: usize,
        pushed: i64,
    },
}

/// A sync thread's connection to Redis, kept across rounds: connected when
/// needed, dropped when a round fails, with the backoff to wait before the
/// next try (100 ms, doubling to 5 s; reset by a round that succeeds).
pub struct Link {
    conn: Option<Conn>,
    backoff: Duration,
}

/// Why a round failed: connecting (`"connect"`) or the round itself
/// (`"sync"`), and the error.
pub type Failed = (&'static str, std::io::Error);

impl Default for Link {
    fn default() -> Self {
        Link {
            conn: None,
            backoff: Duration::from_millis(100),
        }
    }
}

impl Link {
    /// One round on the connection (connecting first when needed).
    pub fn round<T>(
        &mut self,
        s: &RedisSettings,
        f: impl FnOnce(&mut Conn) -> std::io::Result<T>,
    ) -> Result<T, Failed> {
        if self.conn.is_none() {
            let c =
                Conn::connect(&s.address, s.timeout, &s.password).map_err(|e| ("connect", e))?;
            self.conn = Some(c);
        }
        let c = self.conn.as_mut().expect("connected above");
        match f(c) {
            Ok(v) => {
                self.backoff = Duration::from_millis(100);
                Ok(v)
            }
            Err(e) => {
                self.conn = None;
                Err(("sync", e))
            }
        }
    }

    /// After a failed round: wait the backoff, double it.
    pub fn back_off(&mut self) {
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
    }
}

/// Start the sync thread.
pub fn spawn(
    limiter: Arc<Limiter>,
    s: RedisSettings,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ratelimit-redis".into())
        .spawn(move || run(&limiter, &s, &metrics, &shutdown))
        .map(|_| ())
}

fn run(limiter: &Limiter, s: &RedisSettings, metrics: &Metrics, shutdown: &Shutdown) {
    let mut link = Link::default();
    let mut up: Option<bool> = None;
    let mut revocations_synced = Instant::now() - REVOCATION_SYNC;
    let mut set_up = |v: bool, why: &str| {
        if up != Some(v) {
            up = Some(v);
            limiter.redis_up.store(v, Ordering::Release);
            metrics.ratelimit_redis_up.set(i64::from(v));
            if v {
                tracing::info!(
                    address = s.address.as_str(),
                    "rate limits: Redis reachable, fleet-wide limits in force"
                );
            } else {
                tracing::warn!(address = s.address.as_str(), error = why, "rate limits: Redis unreachable, using local counts (fail-closed levels refuse)");
            }
        }
    };
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let round = link.round(s, |c| {
            if revocations_synced.elapsed() >= REVOCATION_SYNC {
                revocations_synced = Instant::now();
                sync_revocations(c, &s.key_prefix)?;
            }
            sync_once(limiter, s, c)
        });
        match round {
            Ok(()) => {
                set_up(true, "");
                metrics
                    .ratelimit_redis_sync
                    .observe(started.elapsed().as_secs_f64());
            }
            Err((stage, e)) => {
                metrics
                    .ratelimit_redis_errors
                    .with_label_values(&[stage])
                    .inc();
                set_up(false, &e.to_string());
                link.back_off();
                continue;
            }
        }
        std::thread::sleep(s.sync_interval.saturating_sub(started.elapsed()));
    }
}

/// How often the fleet's revoked API keys are read (a revocation reaches
/// every gateway within about this plus one sync).
const REVOCATION_SYNC: Duration = Duration::from_millis(500);

/// Publish the API keys revoked here (`SADD {prefix}revoked`) and apply the
/// ones the fleet revoked (`SMEMBERS`).
pub fn sync_revocations(c: &mut Conn, prefix: &str) -> std::io::Result<()> {
    let key = format!("{prefix}revoked");
    let mine = crate::revocations::take_unpublished();
    if !mine.is_empty() {
        let hexes: Vec<String> = mine.iter().map(|d| crate::syntax::hex(d)).collect();
        let mut args: Vec<&[u8]> = vec![b"SADD", key.as_bytes()];
        args.extend(hexes.iter().map(|h| h.as_bytes()));
        match c.call(&args) {
            Ok(Reply::Int(_)) => {}
            other => {
                crate::revocations::unpublish(mine);
                return Err(bad(&format!("SADD answered {other:?}")));
            }
        }
    }
    let Reply::Array(members) = c.call(&[b"SMEMBERS", key.as_bytes()])? else {
        return Err(bad("SMEMBERS did not answer a list"));
    };
    let fleet = members.into_iter().filter_map(|m| match m {
        Reply::Bulk(Some(b)) => std::str::from_utf8(&b)
            .ok()
            .and_then(crate::syntax::parse_hex32),
        _ => None,
    });
    let n = crate::revocations::apply_remote(fleet);
    if n > 0 {
        tracing::info!(revoked = n, "API keys revoked by the fleet applied");
    }
    Ok(())
}

/// Push pending consumption, pull the fleet's totals, in one round trip.
pub fn sync_once(limiter: &Limiter, s: &RedisSettings, c: &mut Conn) -> std::io::Result<()> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut argv: Vec<Vec<u8>> = Vec::new();
    let mut items = Vec::new();
    // Keys used in the last 10 s stay in the pull set so a lull doesn't
    // leave a stale view behind.
    for (level, key, st) in limiter.synced_keys(10_000_000_000) {
        for tokens in [false, true] {
            let cell = if tokens {
                &st.pending_tok
            } else {
                &st.pending_req
            };
            let pushed_ns = cell.swap(0, Ordering::AcqRel);
            let mut k = Vec::with_capacity(s.key_prefix.len() + key.len() + 8);
            k.extend_from_slice(s.key_prefix.as_bytes());
            k.extend_from_slice(if level == Level::Tenant { b"t:" } else { b"m:" });
            k.extend_from_slice(&key);
            k.extend_from_slice(if tokens { b":tok" } else { b":req" });
            keys.push(k);
            argv.push(b"g".to_vec());
            argv.push((pushed_ns / 1000).to_string().into_bytes());
            argv.push(b"60000".to_vec());
            items.push(Item::Bucket {
                state: st.clone(),
                tokens,
                pushed_ns,
            });
        }
    }
    let now = quota::now_unix();
    let (month, _, month_left) = quota::month_of(now);
    let day = now / 86_400;
    for (tenant, st) in limiter.quotas.tenants() {
        let (d, m, _) = st.snapshot();
        if d != day && m != month {
            continue;
        }
        for (index, what) in ["d:req", "d:tok", "m:req", "m:tok"].iter().enumerate() {
            let pushed = st.pending[index].swap(0, Ordering::AcqRel);
            let window = if index < 2 { day } else { month };
            keys.push(format!("{}q:{tenant}:{window}:{what}", s.key_prefix).into_bytes());
            argv.push(b"c".to_vec());
            argv.push(pushed.to_string().into_bytes());
            let ttl = if index < 2 {
                86_400 - now % 86_400
            } else {
                month_left
            } + 86_400;
            argv.push(ttl.to_string().into_bytes());
            items.push(Item::Quota {
                state: st.clone(),
                index,
                pushed,
            });
        }
    }
    if keys.is_empty() {
        // Still check the connection, so a dead Redis is noticed while idle.
        return match c.call(&[b"PING"])? {
            Reply::Simple(_) => Ok(()),
            other => Err(bad(&format!("PING answered {other:?}"))),
        };
    }
    let nkeys = keys.len().to_string();
    let mut args: Vec<&[u8]> = vec![b"EVAL", SCRIPT.as_bytes(), nkeys.as_bytes()];
    args.extend(keys.iter().map(|k| k.as_slice()));
    args.extend(argv.iter().map(|a| a.as_slice()));
    let restore = |items: &[Item]| {
        // Not pushed: keep it for the next sync.
        for it in items {
            match it {
                Item::Bucket {
                    state,
                    tokens,
                    pushed_ns,
                } => {
                    let cell = if *tokens {
                        &state.pending_tok
                    } else {
                        &state.pending_req
                    };
                    cell.fetch_add(*pushed_ns, Ordering::AcqRel);
                }
                Item::Quota {
                    state,
                    index,
                    pushed,
                } => {
                    state.pending[*index].fetch_add(*pushed, Ordering::AcqRel);
                }
            }
        }
    };
    let reply = match c.call(&args) {
        Ok(Reply::Array(v)) if v.len() == items.len() => v,
        Ok(other) => {
            restore(&items);
            return Err(bad(&format!("unexpected script reply: {other:?}")));
        }
        Err(e) => {
            restore(&items);
            return Err(e);
        }
    };
    let local_now = limiter.now();
    let mut quota_totals: Vec<(Arc<quota::QuotaState>, [u64; 4])> = Vec::new();
    if reply.iter().any(|r| !matches!(r, Reply::Int(_))) {
        restore(&items);
        return Err(bad("script returned a non-integer"));
    }
    for (it, r) in items.iter().zip(reply) {
        let Reply::Int(v) = r else { continue };
        match it {
            Item::Bucket { state, tokens, .. } => {
                let (cell, since) = if *tokens {
                    (&state.tok, &state.pending_tok)
                } else {
                    (&state.req, &state.pending_req)
                };
                // The fleet's debt, plus what was taken here since the push.
                let debt = (v.max(0) as u64).saturating_mul(1000);
                let since = since.load(Ordering::Acquire).max(0) as u64;
                cell.store(
                    local_now.saturating_add(debt).saturating_add(since),
                    Ordering::Release,
                );
            }
            Item::Quota { state, index, .. } => match quota_totals.last_mut() {
                Some((s, t)) if Arc::ptr_eq(s, state) => t[*index] = v.max(0) as u64,
                _ => {
                    let mut t = [0; 4];
                    t[*index] = v.max(0) as u64;
                    quota_totals.push((state.clone(), t));
                }
            },
        }
    }
    for (st, totals) in quota_totals {
        let since = std::array::from_fn(|i| st.pending[i].load(Ordering::Acquire));
        st.set_from_fleet(totals, since);
    }
    Ok(())
}
