//! Flow control (`[clusters.X.queue]`): when no backend of a cluster can
//! take a request ([`BackendLoad::headroom`] is 0 everywhere), it waits
//! here instead of being answered 503, and is dispatched as soon as there
//! is room — a response finished (its in-flight count released), a fresh
//! report from the model server, a backend back from ejection.
//!
//! Order, as the Inference Extension's flow control orders it: bands by
//! priority, higher first, strictly; within a band, fair shares between
//! flows (a tenant, a principal, or one flow for all — `fairness`) by
//! start-time fair queueing on each request's estimated tokens (the
//! virtual-clock form of deficit counting, without its quantum's bursts),
//! so a tenant sending long prompts gets as many tokens through as one
//! sending short ones, not as many requests; within a flow, arrival order.
//!
//! Bounds: `max_requests` waiting and `max_bytes` held (one more → 429),
//! `max_wait` (→ 503), both with `Retry-After`; a client that hangs up
//! leaves at once. Nothing grows beyond them: a flow's entry goes with its
//! last request.
//!
//! One logical queue per cluster, shared by every worker (one mutex), not
//! per-worker queues with stealing: connections land on workers by the
//! kernel's hash, so a tenant on few connections would get its worker's
//! share rather than the fleet's, and a band could be served on one worker
//! while a higher one waits on another. The mutex is taken only while
//! requests wait: an empty queue with room costs two atomic loads per
//! request.
//!
//! Dispatch hands out grants, not backends: a granted request still goes
//! through the balance stage's pick, and counts against the queue's room
//! (`in_transit`) until it is in flight at a backend, so one freed slot
//! lets one request through, not every waiter at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::{now_ms, BackendLoad, BalanceSettings};
use crate::config::QueueSettings;

/// A request's cost (estimated tokens) counts at most this much: one
/// enormous request delays its own flow, not the band's clock.
const MAX_COST: u64 = 1 << 20;
/// Waiters look for a departed client, and pump the queue when nobody else
/// has lately, this often.
pub const TICK: Duration = Duration::from_millis(50);

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const LEFT: u8 = 2;

/// One waiting request.
#[derive(Debug)]
pub struct Ticket {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
    pub band: i32,
    flow: Arc<str>,
    cost: u64,
    seq: u64,
    bytes: u64,
    pub enqueued: Instant,
}

impl Ticket {
    fn grant(&self) {
        self.state.store(GRANTED, Ordering::Release);
        if let Some(w) = lock(&self.waker).take() {
            w.wake();
        }
    }

    pub fn granted(&self) -> bool {
        self.state.load(Ordering::Acquire) == GRANTED
    }

    /// Resolves when the ticket is granted (from any worker).
    pub fn wait(&self) -> Granted<'_> {
        Granted(self)
    }
}

pub struct Granted<'a>(&'a Ticket);

impl Future for Granted<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.granted() {
            return Poll::Ready(());
        }
        *lock(&self.0.waker) = Some(cx.waker().clone());
        // A grant between the check and the store found no waker.
        if self.0.granted() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Why a request could not join the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_requests` are waiting.
    Requests,
    /// The waiting requests hold `max_bytes`.
    Bytes,
}

#[derive(Debug, Default)]
struct Flow {
    /// Virtual finish tag of its newest request (tokens).
    last_finish: u64,
    /// Waiting requests with their virtual start tags, in arrival order.
    items: VecDeque<(u64, Arc<Ticket>)>,
}

/// One priority band: start-time fair queueing between its flows. A
/// request's start tag is the later of the band's virtual time and its
/// flow's last finish tag; its finish tag adds its cost in tokens; the
/// lowest start tag goes first (ties: arrival). A flow that floods only
/// pushes its own tags ahead; a newcomer starts at the present.
#[derive(Debug, Default)]
struct Band {
    vtime: u64,
    flows: HashMap<Arc<str>, Flow>,
    count: usize,
}

impl Band {
    fn push(&mut self, t: Arc<Ticket>) {
        let f = self.flows.entry(t.flow.clone()).or_default();
        let start = self.vtime.max(f.last_finish);
        f.last_finish = start.saturating_add(t.cost);
        f.items.push_back((start, t));
        self.count += 1;
    }

    /// The request with the lowest start tag.
    fn next(&mut self) -> Option<Arc<Ticket>> {
        let key = self
            .flows
            .iter()
            .filter_map(|(k, f)| f.items.front().map(|(s, t)| ((*s, t.seq), k)))
            .min_by_key(|(tag, _)| *tag)?
            .1
            .clone();
        let f = self.flows.get_mut(&key)?;
        let (start, t) = f.items.pop_front()?;
        if f.items.is_empty() {
            // An idle flow keeps no credit.
            self.flows.remove(&key);
        }
        self.vtime = self.vtime.max(start);
        self.count -= 1;
        Some(t)
    }
}

#[derive(Debug)]
struct Inner {
    /// The cluster's backends and balance rules, of the newest generation.
    loads: Vec<Arc<BackendLoad>>,
    balance: BalanceSettings,
    settings: QueueSettings,
    bands: BTreeMap<Reverse<i32>, Band>,
    bytes: u64,
}

/// One cluster's queue (process-wide; kept across reloads).
#[derive(Debug)]
pub struct FlowQueue {
    pub cluster: String,
    /// Requests waiting (read without the lock on every request).
    waiting: AtomicUsize,
    /// Granted, not yet in flight at a backend.
    in_transit: AtomicU32,
    /// Requests dispatched since start, for the admin view.
    pub dispatched: AtomicU64,
    /// Arrival numbers (ties between equal start tags).
    seq: AtomicU64,
    last_pump_ms: AtomicU64,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests the backends take before every one is saturated (available
/// ones; all of them when none is, as the balance stage's pick does).
pub fn room(loads: &[Arc<BackendLoad>], s: &BalanceSettings) -> u64 {
    let now = now_ms();
    let any = loads.iter().any(|b| b.available(now));
    loads
        .iter()
        .filter(|b| !any || b.available(now))
        .map(|b| u64::from(b.headroom(s, now)))
        .fold(0, u64::saturating_add)
}

impl FlowQueue {
    pub fn new(cluster: &str) -> FlowQueue {
        FlowQueue {
            cluster: cluster.to_string(),
            waiting: AtomicUsize::new(0),
            in_transit: AtomicU32::new(0),
            dispatched: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            last_pump_ms: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                loads: Vec::new(),
                balance: BalanceSettings::default(),
                settings: QueueSettings::default(),
                bands: BTreeMap::new(),
                bytes: 0,
            }),
        }
    }

    /// The cluster as the newest configuration generation has it.
    pub fn configure(&self, loads: &[Arc<BackendLoad>], b: &BalanceSettings, q: &QueueSettings) {
        let mut g = lock(&self.inner);
        g.loads = loads.to_vec();
        g.balance = b.clone();
        g.settings = q.clone();
        drop(g);
        self.pump();
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// May a request that has not queued go straight to the balance stage:
    /// nobody is waiting ahead of it, and a backend has room.
    pub fn open(&self, loads: &[Arc<BackendLoad>], s: &BalanceSettings) -> bool {
        self.waiting() == 0 && room(loads, s) > u64::from(self.in_transit.load(Ordering::Acquire))
    }

    /// Join the queue (then [`pump`](Self::pump): room may have appeared
    /// since the caller looked).
    pub fn enqueue(
        &self,
        band: i32,
        flow: &str,
        cost: u64,
        bytes: u64,
    ) -> Result<Arc<Ticket>, Full> {
        let t = Arc::new(Ticket {
            state: AtomicU8::new(WAITING),
            waker: Mutex::new(None),
            band,
            flow: Arc::from(flow),
            cost: cost.clamp(1, MAX_COST),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            bytes,
            enqueued: Instant::now(),
        });
        {
            let mut g = lock(&self.inner);
            if self.waiting() >= g.settings.max_requests {
                return Err(Full::Requests);
            }
            if g.bytes.saturating_add(bytes) > g.settings.max_bytes {
                return Err(Full::Bytes);
            }
            g.bytes += bytes;
            g.bands.entry(Reverse(band)).or_default().push(t.clone());
            self.waiting.fetch_add(1, Ordering::AcqRel);
        }
        self.pump();
        Ok(t)
    }

    /// Grant as many waiting requests as the backends have room for, in
    /// band, fair-share and arrival order.
    pub fn pump(&self) {
        self.last_pump_ms.store(now_ms(), Ordering::Relaxed);
        if self.waiting() == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        let transit = u64::from(self.in_transit.load(Ordering::Acquire));
        let mut n = room(&g.loads, &g.balance)
            .saturating_sub(transit)
            .min(self.waiting() as u64);
        while n > 0 {
            let Some((&key, _)) = g.bands.iter().find(|(_, b)| b.count > 0) else {
                break;
            };
            let Some(t) = g.bands.get_mut(&key).and_then(Band::next) else {
                break;
            };
            g.bytes -= t.bytes;
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.in_transit.fetch_add(1, Ordering::AcqRel);
            self.dispatched.fetch_add(1, Ordering::Relaxed);
            t.grant();
            n -= 1;
        }
        g.bands.retain(|_, b| b.count > 0);
    }

    /// Pump unless someone did within the last tick (waiters call this on
    /// every tick: reports and ejections change room with no event).
    pub fn pump_if_idle(&self) {
        let last = self.last_pump_ms.load(Ordering::Relaxed);
        if now_ms().saturating_sub(last) >= TICK.as_millis() as u64 {
            self.pump();
        }
    }

    /// Leave the queue (client gone, waited too long). `false`: too late,
    /// it was granted — the caller holds a grant it must give back.
    pub fn leave(&self, t: &Arc<Ticket>) -> bool {
        let mut g = lock(&self.inner);
        if t.granted() {
            return false;
        }
        t.state.store(LEFT, Ordering::Release);
        let g = &mut *g;
        if let Some(b) = g.bands.get_mut(&Reverse(t.band)) {
            if let Some(f) = b.flows.get_mut(&t.flow) {
                if let Some(i) = f.items.iter().position(|x| Arc::ptr_eq(&x.1, t)) {
                    f.items.remove(i);
                    b.count -= 1;
                    g.bytes -= t.bytes;
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                }
                if f.items.is_empty() {
                    b.flows.remove(&t.flow);
                }
            }
        }
        g.bands.retain(|_, b| b.count > 0);
        true
    }

    /// A granted request is in flight at a backend (its room is taken
    /// there now), or gave its grant back (`pump`: the room is free again).
    pub fn arrived(&self, pump: bool) {
        let _ = self
            .in_transit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        if pump {
            self.pump();
        }
    }

    /// Seconds a refused client should wait: how long the oldest waiting
    /// request has waited so far (the queue's present drain time), 1..=60.
    pub fn retry_after(&self) -> u64 {
        let g = lock(&self.inner);
        let oldest = g
            .bands
            .values()
            .flat_map(|b| b.flows.values())
            .filter_map(|f| f.items.front())
            .map(|(_, t)| t.enqueued.elapsed())
            .max()
            .unwrap_or_default();
        oldest.as_secs().clamp(1, 60)
    }

    /// `GET /balance/queues`: this queue's state.
    pub fn snapshot(&self) -> serde_json::Value {
        let g = lock(&self.inner);
        let bands: Vec<serde_json::Value> = g
            .bands
            .iter()
            .map(|(Reverse(p), b)| {
                let mut flows: Vec<serde_json::Value> = b
                    .flows
                    .iter()
                    .map(|(k, f)| {
                        serde_json::json!({
                            "flow": &**k,
                            "waiting": f.items.len(),
                            "next_start_tokens": f.items.front().map_or(0, |x| x.0),
                            "oldest_wait_ms": f.items.front().map_or(0, |x| x.1.enqueued.elapsed().as_millis() as u64),
                        })
                    })
                    .collect();
                flows.sort_by_key(|f| f["next_start_tokens"].as_u64());
                serde_json::json!({"priority": p, "waiting": b.count, "virtual_time_tokens": b.vtime, "flows": flows})
            })
            .collect();
        serde_json::json!({
            "cluster": self.cluster,
            "waiting": self.waiting(),
            "bytes": g.bytes,
            "in_transit": self.in_transit.load(Ordering::Acquire),
            "room": room(&g.loads, &g.balance).min(u64::from(u32::MAX)),
            "dispatched": self.dispatched.load(Ordering::Relaxed),
            "max_requests": g.settings.max_requests,
            "max_bytes": g.settings.max_bytes,
            "max_wait_ms": g.settings.max_wait.as_millis() as u64,
            "fairness": format!("{:?}", g.settings.fairness).to_lowercase(),
            "bands": bands,
        })
    }
}

/// Each caller's queue band from its tenant class
/// (`[ratelimit.classes.NAME] priority`); a route's `priority` wins. The
/// configured bands are the only ones there are: a band a client asks for
/// (`x-gateway-priority`) becomes the highest configured one at or below it,
/// so metric labels never take a value a client chose.
#[derive(Debug, Default)]
pub struct Bands {
    by_tenant: HashMap<String, i32>,
    default: i32,
    /// Every configured band, ascending (0 always among them).
    levels: Vec<i32>,
}

impl Bands {
    pub fn new(r: &crate::config::RateLimitSettings, routes: impl Iterator<Item = i32>) -> Bands {
        let prio = |c: &str| r.classes.get(c).map_or(0, |c| c.priority);
        let mut levels: Vec<i32> = r
            .classes
            .values()
            .map(|c| c.priority)
            .chain(routes)
            .collect();
        levels.push(0);
        levels.sort_unstable();
        levels.dedup();
        Bands {
            by_tenant: r
                .tenant_classes
                .iter()
                .map(|(t, c)| (t.clone(), prio(c)))
                .collect(),
            default: prio(&r.default_class),
            levels,
        }
    }

    /// The band of a request on a route with `route` priority (if set) from `tenant`.
    pub fn band(&self, route: Option<i32>, tenant: &str) -> i32 {
        route.unwrap_or_else(|| *self.by_tenant.get(tenant).unwrap_or(&self.default))
    }

    /// `own`, lowered to what the client asked (`asked`, never raised): the
    /// highest configured band at or below both, else the lowest configured.
    pub fn lowered(&self, own: i32, asked: i32) -> i32 {
        let want = asked.min(own);
        self.levels
            .iter()
            .rev()
            .find(|&&l| l <= want)
            .or(self.levels.first())
            .copied()
            .unwrap_or(own)
            .min(own)
    }
}

/// A granted request's hold on the queue's room until it is in flight at
/// a backend ([`Grant::arrived`]); dropped before that, the room goes to
/// the next waiter.
#[derive(Debug)]
pub struct Grant {
    q: Arc<FlowQueue>,
    done: std::cell::Cell<bool>,
}

impl Grant {
    pub fn new(q: Arc<FlowQueue>) -> Grant {
        Grant {
            q,
            done: std::cell::Cell::new(false),
        }
    }

    /// The request is in flight at a backend: its room is counted there.
    pub fn arrived(&self) {
        if !self.done.replace(true) {
            self.q.arrived(false);
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if !self.done.get() {
            self.q.arrived(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn queue(cap: u32, backends: usize, max_requests: usize) -> (FlowQueue, Vec<Arc<BackendLoad>>) {
        let loads: Vec<Arc<BackendLoad>> = (0..backends)
            .map(|i| {
                let a: SocketAddr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
                let b = Arc::new(BackendLoad::new(a));
                b.inflight.store(cap, Ordering::Relaxed);
                b
            })
            .collect();
        let bal = BalanceSettings {
            max_inflight: cap,
            ..BalanceSettings::default()
        };
        let q = FlowQueue::new("c");
        let settings = QueueSettings {
            max_requests,
            ..QueueSettings::default()
        };
        q.configure(&loads, &bal, &settings);
        (q, loads)
    }

    /// Free one slot on backend 0 and pump: who was granted.
    fn free_one(
        q: &FlowQueue,
        loads: &[Arc<BackendLoad>],
        tickets: &[(&str, Arc<Ticket>)],
    ) -> Vec<String> {
        loads[0].inflight.fetch_sub(1, Ordering::Relaxed);
        q.pump();
        let granted: Vec<String> = tickets
            .iter()
            .filter(|(_, t)| t.granted())
            .map(|(n, _)| n.to_string())
            .collect();
        // The granted one is now in flight there.
        for _ in &granted {
            loads[0].inflight.fetch_add(1, Ordering::Relaxed);
            q.arrived(false);
        }
        granted
    }

    #[test]
    fn saturated_pool_queues_and_a_freed_slot_grants_one_in_order() {
        let (q, loads) = queue(2, 2, 100);
        assert!(!q.open(&loads, &q_bal(&loads)));
        let a1 = q.enqueue(0, "a", 10, 0).unwrap();
        let a2 = q.enqueue(0, "a", 10, 0).unwrap();
        assert!(!a1.granted() && !a2.granted());
        let mut left = vec![("a1", a1.clone()), ("a2", a2.clone())];
        assert_eq!(free_one(&q, &loads, &left), ["a1"]);
        left.remove(0);
        assert_eq!(q.waiting(), 1);
        assert_eq!(free_one(&q, &loads, &left), ["a2"]);
        assert_eq!(q.waiting(), 0);
    }

    fn q_bal(_l: &[Arc<BackendLoad>]) -> BalanceSettings {
        BalanceSettings {
            max_inflight: 2,
            ..BalanceSettings::default()
        }
    }

    #[test]
    fn tenants_share_a_band_fairly_and_a_higher_band_goes_first() {
        let (q, loads) = queue(1, 1, 100);
        let mut all = Vec::new();
        // A floods with 6, then B sends 2, then a high-band request arrives last.
        for i in 0..6 {
            all.push((format!("a{i}"), q.enqueue(0, "a", 100, 0).unwrap()));
        }
        for i in 0..2 {
            all.push((format!("b{i}"), q.enqueue(0, "b", 100, 0).unwrap()));
        }
        all.push(("hi".to_string(), q.enqueue(5, "a", 100, 0).unwrap()));
        let mut order = Vec::new();
        while order.len() < all.len() {
            let view: Vec<(&str, Arc<Ticket>)> = all
                .iter()
                .filter(|(n, _)| !order.contains(n))
                .map(|(n, t)| (n.as_str(), t.clone()))
                .collect();
            let g = free_one(&q, &loads, &view);
            assert_eq!(g.len(), 1, "one slot, one grant: {g:?}");
            order.push(g[0].clone());
        }
        assert_eq!(order[0], "hi");
        // B's two requests come within the first five of the band, not after A's six.
        let b_last = order.iter().position(|n| n == "b1").unwrap();
        assert!(b_last <= 4, "{order:?}");
        // Arrival order within a flow.
        let a: Vec<&String> = order.iter().filter(|n| n.starts_with('a')).collect();
        assert_eq!(a, ["a0", "a1", "a2", "a3", "a4", "a5"]);
    }

    #[test]
    fn fair_share_counts_tokens_not_requests() {
        let (q, loads) = queue(1, 1, 100);
        let mut all = Vec::new();
        // A's requests cost 8,000 tokens each, B's 500.
        for i in 0..3 {
            all.push((format!("a{i}"), q.enqueue(0, "a", 8000, 0).unwrap()));
        }
        for i in 0..12 {
            all.push((format!("b{i}"), q.enqueue(0, "b", 500, 0).unwrap()));
        }
        let mut order = Vec::new();
        while order.len() < all.len() {
            let view: Vec<(&str, Arc<Ticket>)> = all
                .iter()
                .filter(|(n, _)| !order.contains(n))
                .map(|(n, t)| (n.as_str(), t.clone()))
                .collect();
            order.extend(free_one(&q, &loads, &view));
        }
        // In the tokens of A's first request, B's twelve short ones go through.
        let a1 = order.iter().position(|n| n == "a1").unwrap();
        let b11 = order.iter().position(|n| n == "b11").unwrap();
        assert!(b11 < a1, "{order:?}");
    }

    #[test]
    fn bounds_refuse_and_leaving_frees_the_place() {
        let (q, _) = queue(1, 1, 2);
        let t1 = q.enqueue(0, "a", 1, 10).unwrap();
        let _t2 = q.enqueue(0, "b", 1, 10).unwrap();
        assert_eq!(q.enqueue(0, "c", 1, 10).unwrap_err(), Full::Requests);
        assert!(q.leave(&t1));
        assert_eq!(q.waiting(), 1);
        q.enqueue(0, "c", 1, 10).unwrap();
        let snap = q.snapshot();
        assert_eq!(snap["waiting"], 2);
        assert_eq!(snap["bytes"], 20);
        let (q, loads) = queue(1, 1, 100);
        let s = QueueSettings {
            max_bytes: 15,
            ..QueueSettings::default()
        };
        let bal = BalanceSettings {
            max_inflight: 1,
            ..BalanceSettings::default()
        };
        q.configure(&loads, &bal, &s);
        q.enqueue(0, "a", 1, 10).unwrap();
        assert_eq!(q.enqueue(0, "a", 1, 10).unwrap_err(), Full::Bytes);
    }

    #[test]
    fn a_client_can_only_lower_its_band_to_a_configured_one() {
        let mut r = crate::config::RateLimitSettings::default();
        r.classes.insert(
            "gold".into(),
            crate::config::ratelimit::ClassSettings {
                priority: 10,
                ..Default::default()
            },
        );
        r.classes.insert(
            "batch".into(),
            crate::config::ratelimit::ClassSettings {
                priority: -5,
                ..Default::default()
            },
        );
        let b = Bands::new(&r, [3].into_iter());
        assert_eq!(b.lowered(10, 7), 3);
        assert_eq!(b.lowered(10, 99), 10, "never raised");
        assert_eq!(b.lowered(0, -1), -5);
        assert_eq!(
            b.lowered(0, -1_000_000),
            -5,
            "no band below the lowest configured"
        );
        assert_eq!(b.lowered(3, 3), 3);
    }

    #[test]
    fn a_grant_is_room_taken_until_the_request_is_in_flight() {
        let (q, loads) = queue(2, 1, 100);
        let t1 = q.enqueue(0, "a", 1, 0).unwrap();
        let t2 = q.enqueue(0, "a", 1, 0).unwrap();
        loads[0].inflight.store(1, Ordering::Relaxed);
        q.pump();
        q.pump();
        assert!(t1.granted());
        assert!(!t2.granted(), "one slot free, one grant outstanding");
        // The grant is given back unused: the slot goes to the next.
        assert!(!q.leave(&t1));
        q.arrived(true);
        assert!(t2.granted());
    }
}
