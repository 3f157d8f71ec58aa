//! A fleet of gateways agreeing on where prefixes are: each gateway's
//! prefix index learns what the *other* gateways in front of the same pool
//! sent where, through the fleet's Redis (`[ratelimit.redis]`), never on a
//! request's path.
//!
//! - A worker that sends a prompt to a backend indexes it locally at once
//!   (as without a fleet) and appends the placement — the backend's
//!   address, the blocks its cache had to allocate, the prompt's block
//!   hashes (the first [`MAX_SYNC_BLOCKS`]) — to its cluster's outbox
//!   ([`SharedPrefix::record`]): a short lock, no I/O.
//! - One thread per process, every `sync_interval`: one `XADD` of
//!   everything in the outboxes to the stream `{key_prefix}prefix` (capped
//!   at about [`STREAM_LEN`] entries), then one `XREAD` of what the others
//!   added since. A placement made by another gateway is applied as if made
//!   here: the backend's cache clock advances by what it allocated, and the
//!   blocks are indexed there at that clock ([`SharedPrefix::apply`]).
//! - So every gateway's index, and its model of every backend's eviction,
//!   converges on the fleet's within about one interval, and a shared
//!   prefix is kept on the backend the first gateway chose, whichever
//!   gateway its later requests reach.
//!
//! Bounded: an outbox holds at most [`OUTBOX_BYTES`] (more is dropped and
//! counted); entries from Redis are parsed defensively (a malformed one is
//! skipped, counted). Redis down: each gateway routes on its own index (as
//! with no fleet), reconnecting with backoff; placements made meanwhile are
//! not shared (a routing hint, not state that must survive).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::prefix::{Holder, PrefixIndex};
use super::{BackendLoad, BalanceSettings};
use crate::config::ratelimit::RedisSettings;
use crate::ratelimit::redis::{Conn, Link, Reply};

/// Block hashes shared per placement (16 tokens each: 32k tokens). Longer
/// prompts are shared up to there; the gateway that placed them knows all.
pub const MAX_SYNC_BLOCKS: usize = 2048;
/// An outbox's most bytes between two syncs (per cluster), and a sync's
/// entry's (all clusters): well under the 1 MiB a Redis reply may carry
/// here, so that every entry can be read back.
pub const OUTBOX_BYTES: usize = 256 << 10;
/// About how many entries (one per gateway per sync) the stream keeps.
pub const STREAM_LEN: usize = 2000;
/// Entries read per sync (the rest next time): at most 16 MiB.
const READ_COUNT: usize = 64;
/// How far back a starting gateway reads the fleet's placements.
const HISTORY: Duration = Duration::from_secs(5);
/// The wire format's version byte (first in every entry).
const VERSION: u8 = 1;

/// A prefix-aware cluster's index, with what the fleet needs: its current
/// backends (to apply others' placements) and its outbox.
pub struct SharedPrefix {
    pub index: PrefixIndex,
    cluster: String,
    members: RwLock<Vec<Arc<BackendLoad>>>,
    default_blocks: AtomicU32,
    share: AtomicBool,
    /// Encoded placements not sent yet, and how many.
    outbox: Mutex<(Vec<u8>, u64)>,
    /// Placements dropped, the outbox being full (taken by the sync).
    dropped: AtomicU64,
}

impl std::fmt::Debug for SharedPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPrefix")
            .field("cluster", &self.cluster)
            .field("index", &self.index)
            .finish()
    }
}

impl SharedPrefix {
    pub fn new(cluster: &str, entries: usize) -> SharedPrefix {
        SharedPrefix {
            index: PrefixIndex::new(entries),
            cluster: cluster.to_string(),
            members: RwLock::new(Vec::new()),
            default_blocks: AtomicU32::new(1),
            share: AtomicBool::new(false),
            outbox: Mutex::new((Vec::new(), 0)),
            dropped: AtomicU64::new(0),
        }
    }

    /// This configuration generation's backends and settings.
    pub fn configure(&self, loads: &[Arc<BackendLoad>], s: &BalanceSettings) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = loads.to_vec();
        self.default_blocks
            .store(s.prefix_cache_blocks, Ordering::Relaxed);
        self.share.store(s.prefix_fleet_sync, Ordering::Relaxed);
    }

    /// Whether placements made here are shared with the fleet.
    pub fn shared(&self) -> bool {
        self.share.load(Ordering::Relaxed)
    }

    /// `loads` (a cluster's backends, in order) as the index sees them now.
    pub fn holders(&self, loads: &[Arc<BackendLoad>]) -> Vec<Holder> {
        let d = self.default_blocks.load(Ordering::Relaxed);
        loads.iter().map(|l| l.holder(d)).collect()
    }

    /// A placement made here, for the fleet (when this cluster shares):
    /// `blocks` went to `to`, whose cache allocated `allocated` blocks for
    /// it. False when the outbox is full (dropped).
    pub fn record(&self, to: SocketAddr, blocks: &[u64], allocated: u64) -> bool {
        if !self.shared() || blocks.is_empty() {
            return true;
        }
        let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        let n = blocks.len().min(MAX_SYNC_BLOCKS);
        if out.0.len() + 64 + n * 8 > OUTBOX_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        encode(&mut out.0, &to, allocated, &blocks[..n]);
        out.1 += 1;
        true
    }

    /// The placements waiting to go, and how many.
    fn take_outbox(&self) -> (Vec<u8>, u64) {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Another gateway sent `blocks` to `to`, which allocated `allocated`
    /// blocks for it: advance `to`'s cache clock and index them there.
    /// False when `to` isn't one of this cluster's backends here.
    pub fn apply(&self, to: SocketAddr, blocks: &[u64], allocated: u64) -> bool {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        let Some(at) = members.iter().position(|l| l.addr == to) else {
            return false;
        };
        let stamp = members[at].allocate(allocated);
        let holders = self.holders(&members);
        self.index.insert(blocks, &holders, at, stamp);
        true
    }
}

/// One placement: address (4 or 6, the IP's bytes, the port), allocated
/// blocks, block hashes. No allocation (a worker calls it per request).
fn encode(out: &mut Vec<u8>, to: &SocketAddr, allocated: u64, blocks: &[u64]) {
    match to.ip() {
        std::net::IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&to.port().to_le_bytes());
    out.extend_from_slice(&(allocated.min(u64::from(u32::MAX)) as u32).to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u16).to_le_bytes());
    for b in blocks {
        out.extend_from_slice(&b.to_le_bytes());
    }
}

/// A placement as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub to: SocketAddr,
    pub allocated: u64,
    pub blocks: Vec<u64>,
}

/// A sync's entry: the version, then per cluster with placements: its
/// name's length (u8) and name, the bytes of its placements (u32 LE), the
/// placements.
pub fn entry(clusters: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut e = vec![VERSION];
    for (name, body) in clusters {
        if body.is_empty() || name.len() > 255 {
            continue;
        }
        e.push(name.len() as u8);
        e.extend_from_slice(name.as_bytes());
        e.extend_from_slice(&(body.len() as u32).to_le_bytes());
        e.extend_from_slice(body);
    }
    e
}

/// A reader of untrusted bytes: every read bounds-checked.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
}

/// An entry's placements by cluster name; `None` when malformed (nothing of
/// it is used).
pub fn parse_entry(e: &[u8]) -> Option<Vec<(String, Vec<Placement>)>> {
    let mut r = Bytes(e);
    if r.u8()? != VERSION {
        return None;
    }
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let n = r.u8()? as usize;
        let name = std::str::from_utf8(r.take(n)?).ok()?.to_string();
        let len = r.u32()? as usize;
        let mut body = Bytes(r.take(len)?);
        let mut placements = Vec::new();
        while !body.0.is_empty() {
            let ip: std::net::IpAddr = match body.u8()? {
                4 => <[u8; 4]>::try_from(body.take(4)?).ok()?.into(),
                6 => <[u8; 16]>::try_from(body.take(16)?).ok()?.into(),
                _ => return None,
            };
            let to = SocketAddr::new(ip, body.u16()?);
            let allocated = u64::from(body.u32()?);
            let count = body.u16()? as usize;
            if count > MAX_SYNC_BLOCKS {
                return None;
            }
            let raw = body.take(count * 8)?;
            let blocks = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            placements.push(Placement {
                to,
                allocated,
                blocks,
            });
        }
        out.push((name, placements));
    }
    Some(out)
}

/// What one sync did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    pub sent: u64,
    /// Placements not sent: the outbox was full.
    pub dropped: u64,
    pub applied: u64,
    /// Placements for a cluster or backend this gateway doesn't have.
    pub unknown: u64,
    /// Entries that didn't parse.
    pub malformed: u64,
}

/// Apply an entry another gateway wrote to the local indexes.
pub fn apply_entry(e: &[u8], local: &[Arc<SharedPrefix>], done: &mut Synced) {
    let Some(clusters) = parse_entry(e) else {
        done.malformed += 1;
        return;
    };
    for (name, placements) in clusters {
        let here = local.iter().find(|s| s.cluster == name && s.shared());
        for p in placements {
            match here {
                Some(s) if s.apply(p.to, &p.blocks, p.allocated) => done.applied += 1,
                _ => done.unknown += 1,
            }
        }
    }
}

/// The sync's state: where it has read the stream to, who it is.
pub struct FleetSync {
    id: String,
    key: String,
    last: String,
}

impl FleetSync {
    pub fn new(key_prefix: &str, id: u64) -> FleetSync {
        FleetSync {
            id: format!("{id:016x}"),
            key: format!("{key_prefix}prefix"),
            last: String::new(),
        }
    }

    /// Where a new reader starts: [`HISTORY`] before Redis's clock (stream
    /// ids are Redis's milliseconds; this host's clock may differ).
    fn start(&mut self, c: &mut Conn) -> std::io::Result<()> {
        let Reply::Array(t) = c.call(&[b"TIME"])? else {
            return Err(std::io::Error::other("TIME did not answer a list"));
        };
        let secs = match t.first() {
            Some(Reply::Bulk(Some(s))) => std::str::from_utf8(s)
                .ok()
                .and_then(|s| s.parse::<u64>().ok()),
            _ => None,
        }
        .ok_or_else(|| std::io::Error::other("TIME answered no seconds"))?;
        let ms = (secs * 1000).saturating_sub(HISTORY.as_millis() as u64);
        self.last = format!("{ms}-0");
        Ok(())
    }

    /// Push the outboxes, pull and apply what the others pushed.
    pub fn once(&mut self, c: &mut Conn, local: &[Arc<SharedPrefix>]) -> std::io::Result<Synced> {
        let mut done = Synced::default();
        if self.last.is_empty() {
            self.start(c)?;
        }
        let mut bodies: Vec<(&str, Vec<u8>)> = Vec::new();
        for s in local.iter().filter(|s| s.shared()) {
            done.dropped += s.dropped.swap(0, Ordering::Relaxed);
            let (body, n) = s.take_outbox();
            let size: usize = bodies.iter().map(|(c, b)| c.len() + b.len() + 5).sum();
            if size + body.len() + s.cluster.len() + 5 > OUTBOX_BYTES {
                done.dropped += n;
            } else if n > 0 {
                done.sent += n;
                bodies.push((s.cluster.as_str(), body));
            }
        }
        if !bodies.is_empty() {
            let e = entry(&bodies);
            let len = STREAM_LEN.to_string();
            let r = c.call(&[
                b"XADD",
                self.key.as_bytes(),
                b"MAXLEN",
                b"~",
                len.as_bytes(),
                b"*",
                b"g",
                self.id.as_bytes(),
                b"d",
                &e,
            ])?;
            if let Reply::Error(e) = r {
                return Err(std::io::Error::other(format!("XADD: {e}")));
            }
        }
        let count = READ_COUNT.to_string();
        let r = c.call(&[
            b"XREAD",
            b"COUNT",
            count.as_bytes(),
            b"STREAMS",
            self.key.as_bytes(),
            self.last.as_bytes(),
        ])?;
        let entries = match r {
            Reply::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                Reply::Array(mut kv) if kv.len() == 2 => match kv.swap_remove(1) {
                    Reply::Array(entries) => entries,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            },
            Reply::Error(e) => return Err(std::io::Error::other(format!("XREAD: {e}"))),
            _ => Vec::new(),
        };
        for en in entries {
            let Reply::Array(mut parts) = en else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop();
            if let Some(Reply::Bulk(Some(id))) = parts.pop() {
                if let Ok(id) = String::from_utf8(id) {
                    self.last = id;
                }
            }
            let Some(Reply::Array(fields)) = fields else {
                continue;
            };
            let (mut from, mut data) = (None, None);
            for kv in fields.chunks(2) {
                if let [Reply::Bulk(Some(k)), Reply::Bulk(Some(v))] = kv {
                    match k.as_slice() {
                        b"g" => from = Some(v),
                        b"d" => data = Some(v),
                        _ => {}
                    }
                }
            }
            if from.is_some_and(|g| g.as_slice() == self.id.as_bytes()) {
                continue;
            }
            match data {
                Some(d) => apply_entry(d, local, &mut done),
                None => done.malformed += 1,
            }
        }
        Ok(done)
    }
}

/// The sync thread: every `sync_interval` while the gateway runs.
pub fn spawn(
    registry: Arc<super::Registry>,
    redis: RedisSettings,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Arc<crate::shutdown::Shutdown>,
    id: u64,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("prefix-fleet".into())
        .spawn(move || run(&registry, &redis, &metrics, &shutdown, id))
        .map(|_| ())
}

fn run(
    registry: &super::Registry,
    redis: &RedisSettings,
    m: &crate::metrics::Metrics,
    shutdown: &crate::shutdown::Shutdown,
    id: u64,
) {
    let mut sync = FleetSync::new(&redis.key_prefix, id);
    let mut link = Link::default();
    let mut up: Option<bool> = None;
    let mut set_up = |v: bool, why: &str| {
        if up == Some(v) {
            return;
        }
        up = Some(v);
        m.prefix_fleet_up.set(i64::from(v));
        if v {
            tracing::info!(
                address = redis.address.as_str(),
                "prefix fleet: sharing placements through Redis"
            );
        } else {
            tracing::warn!(
                address = redis.address.as_str(),
                error = why,
                "prefix fleet: Redis unreachable, routing on this gateway's own index"
            );
        }
    };
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let local: Vec<Arc<SharedPrefix>> = registry
            .shared_prefixes()
            .into_iter()
            .filter(|s| s.shared())
            .collect();
        if local.is_empty() {
            std::thread::sleep(redis.sync_interval);
            continue;
        }
        match link.round(redis, |c| sync.once(c, &local)) {
            Ok(d) => {
                set_up(true, "");
                for (what, n) in [
                    ("sent", d.sent),
                    ("dropped", d.dropped),
                    ("applied", d.applied),
                    ("unknown", d.unknown),
                    ("malformed", d.malformed),
                ] {
                    if n > 0 {
                        m.prefix_fleet.with_label_values(&[what]).inc_by(n);
                    }
                }
            }
            Err((_, e)) => {
                set_up(false, &e.to_string());
                link.back_off();
                continue;
            }
        }
        std::thread::sleep(redis.sync_interval.saturating_sub(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn settings() -> BalanceSettings {
        BalanceSettings {
            prefix_cache_blocks: 1000,
            ..BalanceSettings::default()
        }
    }

    #[test]
    fn placements_round_trip_and_malformed_entries_are_refused() {
        let s = SharedPrefix::new("c", 1024);
        s.configure(&[Arc::new(BackendLoad::new(addr(1)))], &settings());
        assert!(s.record(addr(1), &[1, 2, 3], 40));
        assert!(s.record("[::1]:9".parse().unwrap(), &[7], 2));
        let (body, n) = s.take_outbox();
        assert_eq!(n, 2);
        let e = entry(&[("c", body), ("empty", Vec::new())]);
        let parsed = parse_entry(&e).expect("parses");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "c");
        assert_eq!(
            parsed[0].1,
            vec![
                Placement {
                    to: addr(1),
                    allocated: 40,
                    blocks: vec![1, 2, 3]
                },
                Placement {
                    to: "[::1]:9".parse().unwrap(),
                    allocated: 2,
                    blocks: vec![7]
                },
            ]
        );
        // Every truncation (past the version: an empty entry), a wrong
        // version, garbage: refused whole.
        assert_eq!(parse_entry(&e[..1]), Some(Vec::new()));
        for cut in 2..e.len() {
            assert_eq!(parse_entry(&e[..cut]), None, "cut at {cut}");
        }
        let mut v2 = e.clone();
        v2[0] = 2;
        assert_eq!(parse_entry(&v2), None);
        assert_eq!(parse_entry(b"\x01\x05hello\xff\xff\xff\xff"), None);
        // A long prompt is shared up to MAX_SYNC_BLOCKS.
        let long: Vec<u64> = (0..MAX_SYNC_BLOCKS as u64 + 10).collect();
        assert!(s.record(addr(1), &long, 5));
        let e = entry(&[("c", s.take_outbox().0)]);
        assert_eq!(
            parse_entry(&e).unwrap()[0].1[0].blocks.len(),
            MAX_SYNC_BLOCKS
        );
    }

    #[test]
    fn a_placement_from_the_fleet_is_indexed_and_advances_the_clock() {
        let loads: Vec<Arc<BackendLoad>> = (1..=3)
            .map(|p| Arc::new(BackendLoad::new(addr(p))))
            .collect();
        let here = Arc::new(SharedPrefix::new("c", 4096));
        here.configure(&loads, &settings());
        let there = SharedPrefix::new("c", 4096);
        there.configure(&loads, &settings());
        let blocks: Vec<u64> = (100..150).collect();
        // Made on the other gateway: its outbox, through an entry.
        assert!(there.record(addr(2), &blocks, 60));
        let e = entry(&[("c", there.take_outbox().0), ("other", vec![0u8; 0])]);
        let mut done = Synced::default();
        apply_entry(&e, std::slice::from_ref(&here), &mut done);
        assert_eq!(done.applied, 1);
        assert_eq!(loads[1].cache_clock.load(Ordering::Relaxed), 60);
        let m = here.index.matches(&blocks, &here.holders(&loads));
        assert_eq!(m.per_backend, vec![0, 50, 0]);
        // Unknown backend or cluster: counted, nothing indexed.
        there.record(addr(9), &blocks, 1);
        let e = entry(&[("c", there.take_outbox().0)]);
        apply_entry(&e, std::slice::from_ref(&here), &mut done);
        there.record(addr(1), &blocks, 1);
        let e = entry(&[("elsewhere", there.take_outbox().0)]);
        apply_entry(&e, std::slice::from_ref(&here), &mut done);
        apply_entry(b"\x07junk", std::slice::from_ref(&here), &mut done);
        assert_eq!((done.unknown, done.malformed), (2, 1));
        let m = here.index.matches(&blocks, &here.holders(&loads));
        assert_eq!(m.per_backend, vec![0, 50, 0]);
        // A cluster that doesn't share neither records nor applies.
        here.configure(
            &loads,
            &BalanceSettings {
                prefix_fleet_sync: false,
                ..settings()
            },
        );
        assert!(here.record(addr(1), &blocks, 1));
        assert_eq!(here.take_outbox().1, 0);
    }

    #[test]
    fn the_outbox_is_bounded() {
        let s = SharedPrefix::new("c", 64);
        s.configure(&[], &settings());
        let blocks = vec![1u64; MAX_SYNC_BLOCKS];
        let mut kept = 0;
        while s.record(addr(1), &blocks, 1) {
            kept += 1;
            assert!(kept < 1000, "never refuses");
        }
        assert!(s.take_outbox().0.len() <= OUTBOX_BYTES);
        assert!(s.record(addr(1), &blocks, 1), "room again once taken");
    }
}
