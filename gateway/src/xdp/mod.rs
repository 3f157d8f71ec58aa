//! Stage 0 — the front door: refuse blocked and over-quota client addresses
//! before anything else runs.
//!
//! With `[xdp] interfaces` set, the XDP program (`gateway-ebpf`) does it at
//! the NIC: packets are dropped before the kernel allocates anything for
//! them. Without XDP (not configured, no CAP_BPF, no such interface, a build
//! without the program), the gateway says so once, exports
//! `gateway_xdp_enabled 0`, and enforces blocks at accept by closing the
//! connection ([`FrontDoor::refuses`]).
//!
//! [`FrontDoor`] is the one handle to the blocklist, for the admin API, the
//! CLI, and the rate limiter's escalation ([`FrontDoor::block`] with
//! [`BlockReason::RateLimit`]). The userspace copy is the source of truth; the
//! kernel map mirrors it. A maintenance thread expires blocks every second and
//! folds the program's per-CPU counters into Prometheus.

pub mod kernel;
mod netlink;
mod state;
mod takeover;
pub mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use gateway_common::BlockReason;
use gateway_common::{BlockEntry, Counter, XdpConfig, MODE_ENFORCE, MODE_MONITOR};

pub use crate::config::Cidr;
use crate::config::{Checked, XdpMode, XdpSettings};
use crate::metrics::Metrics;
pub use crate::syntax::canonical;
use kernel::{Loaded, Sizes};
pub use watch::WatchOpts;

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A blocked address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addr: IpAddr,
    pub reason: BlockReason,
    /// Monotonic ns; `None`: as long as the config lists it.
    pub expires_ns: Option<u64>,
}

impl Block {
    /// Seconds left, rounded up; `None` for config blocks.
    pub fn ttl_left(&self, now: u64) -> Option<u64> {
        self.expires_ns
            .map(|e| e.saturating_sub(now).div_ceil(1_000_000_000))
    }
}

/// Why [`FrontDoor::block`] refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("{0} is allowlisted ([xdp] allow); allowlisted addresses are never blocked")]
    Allowlisted(IpAddr),
    #[error("the blocklist is full ({0} addresses, [xdp] max_blocked)")]
    Full(u32),
    #[error("ttl must be between 1s and [xdp] max_block_ttl ({0}s)")]
    Ttl(u64),
    #[error("{0} is blocked by the config file; remove it there and reload")]
    Static(IpAddr),
    #[error("the kernel refused the update: {0}")]
    Kernel(String),
}

/// Where the front door runs, for `/xdp/stats` and the log.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// (interface, "native" | "generic").
    pub attached: Vec<(String, &'static str)>,
    /// Why XDP is not running, when it isn't.
    pub fallback: Option<String>,
}

/// What the accept-time check reads: replaced wholesale on every change, so
/// the check takes one read lock and no allocation.
#[derive(Default)]
struct View {
    blocks: HashMap<IpAddr, Option<u64>>,
    allow: Vec<Cidr>,
    enforce: bool,
}

struct State {
    blocks: HashMap<IpAddr, Block>,
    kernel: Option<Loaded>,
    settings: XdpSettings,
    allow: Vec<Cidr>,
    last_counters: [u64; Counter::COUNT],
    last_block_drops: [u64; BlockReason::COUNT],
    last_watch_suppressed: u64,
    /// Open watch streams and what each asked for.
    watchers: Vec<(u64, WatchOpts)>,
    /// Run-time blocks changed since they were last saved (`[xdp] state_file`).
    dirty: bool,
}

impl State {
    /// `[xdp]` and the open watchers, as the program reads them.
    fn kernel_config(&self) -> XdpConfig {
        let mut c = kernel_config(&self.settings);
        (c.watch_one_in, c.watch_what, c.watch_max_per_sec) = watch::merged(&self.watchers);
        c
    }
}

/// Why [`FrontDoor::watch`] refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    #[error("the XDP program is not running here ({0}): there is nothing to watch")]
    NotRunning(String),
    #[error("watching is disabled ([xdp] watch_max_per_second = 0)")]
    Disabled,
    #[error("{0} watch streams are open already ([xdp] max_watchers)")]
    TooMany(u32),
}

/// The blocklist and the XDP program behind it; see the module docs.
pub struct FrontDoor {
    state: Mutex<State>,
    view: RwLock<Arc<View>>,
    /// False while the blocklist is empty: the accept check is one load.
    any_blocked: AtomicBool,
    status: Status,
    metrics: Arc<Metrics>,
    /// Sampled verdicts for the watchers.
    hub: Arc<watch::Hub>,
    next_watcher: AtomicU64,
    /// Set by [`FrontDoor::detach`]: the watch reader thread stops.
    detached: AtomicBool,
}

impl FrontDoor {
    /// Load and attach the XDP program when `[xdp] interfaces` is set; fall
    /// back to accept-time enforcement, logged once, when that fails.
    pub fn start(r: &Checked, metrics: Arc<Metrics>) -> Arc<FrontDoor> {
        let s = &r.config.xdp;
        let mut status = Status::default();
        let mut adopted = Vec::new();
        let kernel = if s.interfaces.is_empty() {
            status.fallback = Some("no [xdp] interfaces configured".into());
            tracing::info!("XDP off (no [xdp] interfaces); blocks are enforced at accept");
            None
        } else {
            match Self::load(r, &mut status) {
                Ok((k, blocks)) => {
                    adopted = blocks;
                    Some(k)
                }
                Err(e) => {
                    status.attached.clear();
                    status.fallback = Some(e.to_string());
                    tracing::warn!(error = %e, "XDP unavailable; blocks are enforced at accept instead (no packet-level quota)");
                    None
                }
            }
        };
        let hub = Arc::new(watch::Hub::default());
        let mut kernel = kernel;
        let reader = kernel.as_mut().and_then(|k| {
            let sink = watch::Sink {
                hub: hub.clone(),
                metrics: metrics.clone(),
            };
            k.watch_reader(sink)
                .map_err(|e| tracing::warn!(error = %e, "the XDP watch stream is unavailable"))
                .ok()
        });
        metrics.xdp_enabled.set(kernel.is_some() as i64);
        for (iface, mode) in &status.attached {
            metrics
                .xdp_attached
                .with_label_values(&[iface.as_str(), mode])
                .set(1);
        }
        let fd = Arc::new(FrontDoor {
            state: Mutex::new(State {
                blocks: HashMap::new(),
                kernel,
                settings: s.clone(),
                allow: Vec::new(),
                last_counters: [0; Counter::COUNT],
                last_block_drops: [0; BlockReason::COUNT],
                last_watch_suppressed: 0,
                watchers: Vec::new(),
                dirty: false,
            }),
            view: RwLock::new(Arc::new(View::default())),
            any_blocked: AtomicBool::new(false),
            status,
            metrics,
            hub,
            next_watcher: AtomicU64::new(1),
            detached: AtomicBool::new(false),
        });
        if let Some(reader) = reader {
            let weak = Arc::downgrade(&fd);
            let spawned = std::thread::Builder::new()
                .name("gateway-xdp-watch".into())
                .spawn(move || {
                    watch::read_loop(reader, || {
                        weak.upgrade()
                            .is_none_or(|fd| fd.detached.load(Ordering::Relaxed))
                    })
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the XDP watch reader");
            }
        }
        fd.apply(r);
        if fd.lock().kernel.is_none() {
            // Without XDP the saved blocks still hold, at accept.
            adopted = saved_blocks(&s.state_file);
        }
        fd.adopt(adopted);
        fd
    }

    /// Take in the blocks a restart carries over (saved in `[xdp]
    /// state_file`, or read from the front door this one took over), before
    /// the first connection is accepted.
    fn adopt(&self, blocks: Vec<Block>) {
        if blocks.is_empty() {
            return;
        }
        let mut st = self.lock();
        let mut adopted = 0;
        for b in blocks {
            // The config's own block on an address stays (it never expires).
            if st
                .blocks
                .get(&b.addr)
                .is_some_and(|held| held.reason == BlockReason::Config)
            {
                continue;
            }
            match self.insert_locked(&mut st, b) {
                Ok(()) => adopted += 1,
                Err(e) => {
                    tracing::warn!(client = %b.addr, error = %e, "a carried-over block was not restored")
                }
            }
        }
        self.publish(&st);
        tracing::info!(
            blocks = adopted,
            "XDP blocks carried over from before the restart"
        );
    }

    /// Write the run-time blocks to `[xdp] state_file` when they changed.
    fn save_locked(&self, st: &mut State) {
        if !st.dirty || st.settings.state_file.as_os_str().is_empty() {
            return;
        }
        let (now, unix_ms) = (monotonic_ns(), state::now_unix_ms());
        let blocks: Vec<state::Saved> = st
            .blocks
            .values()
            .filter(|b| b.reason != BlockReason::Config)
            .filter_map(|b| {
                let left_ms = b.expires_ns?.saturating_sub(now) / 1_000_000;
                Some(state::Saved {
                    addr: b.addr,
                    reason: b.reason,
                    expires_unix_ms: unix_ms + left_ms,
                })
            })
            .collect();
        match state::save(&st.settings.state_file, &blocks) {
            Ok(()) => st.dirty = false,
            Err(e) => {
                tracing::error!(file = %st.settings.state_file.display(), error = %e, "cannot save the XDP blocks")
            }
        }
    }

    /// Open a watch stream: the program samples verdicts for as long as the
    /// returned [`Watcher`] lives (`gateway xdp watch`, `GET /xdp/watch`).
    pub fn watch(self: &Arc<Self>, mut opts: WatchOpts) -> Result<Watcher, WatchError> {
        let mut st = self.lock();
        if st.kernel.is_none() {
            let why = self
                .status
                .fallback
                .clone()
                .unwrap_or_else(|| "detached".into());
            return Err(WatchError::NotRunning(why));
        }
        if st.settings.watch_max_per_second == 0 {
            return Err(WatchError::Disabled);
        }
        if st.watchers.len() >= st.settings.max_watchers as usize {
            return Err(WatchError::TooMany(st.settings.max_watchers));
        }
        opts.one_in = opts.one_in.max(1);
        opts.max_per_second = opts
            .max_per_second
            .clamp(1, st.settings.watch_max_per_second);
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        st.watchers.push((id, opts));
        self.push_watch_config(&mut st);
        tracing::info!(target: "audit", event = "xdp_watch", action = "start", one_in = opts.one_in, passes = opts.passes, max_per_second = opts.max_per_second, "XDP watch stream opened");
        Ok(Watcher {
            cursor: self.hub.head(),
            cap: watch::Cap::new(opts.max_per_second),
            fd: self.clone(),
            id,
            opts,
            lost: 0,
        })
    }

    /// Sampled verdicts the kernel did not write (its per-CPU cap), so far.
    pub fn watch_suppressed(&self) -> u64 {
        self.lock()
            .kernel
            .as_ref()
            .map(|k| k.watch_suppressed())
            .unwrap_or(0)
    }

    fn push_watch_config(&self, st: &mut State) {
        self.metrics.xdp_watchers.set(st.watchers.len() as i64);
        let c = st.kernel_config();
        if let Some(k) = st.kernel.as_mut() {
            if let Err(e) = k.set_config(c) {
                tracing::error!(error = %e, "XDP config update (watch) failed");
            }
        }
    }

    /// Load the program, fill its maps (ports, config, allowlist, config
    /// blocks, saved blocks, and the blocks of a front door already running
    /// on the interfaces: see `takeover`), then attach it: it drops the
    /// same sources from its first packet. Returns the adopted blocks.
    fn load(r: &Checked, status: &mut Status) -> Result<(Loaded, Vec<Block>), kernel::LoadError> {
        let s = &r.config.xdp;
        let map_err = |e: std::io::Error| kernel::LoadError::Map(e.to_string());
        let mut k = Loaded::load(Sizes {
            blocked: s.max_blocked,
            tracked_sources: s.max_tracked_sources,
            allow: s.max_allow,
        })?;
        let ports: Vec<(u8, u16)> = r
            .listen
            .iter()
            .chain(&r.tls_listen)
            .map(|a| (libc::IPPROTO_TCP as u8, a.port()))
            .collect();
        k.set_ports(&ports).map_err(map_err)?;
        k.set_config(kernel_config(s)).map_err(map_err)?;
        for c in &r.xdp_allow {
            k.allow(*c).map_err(map_err)?;
        }
        let forever = BlockEntry {
            expires_ns: u64::MAX,
            reason: BlockReason::Config as u32,
            _pad: 0,
        };
        for a in &r.xdp_block {
            k.block(canonical(*a), forever).map_err(map_err)?;
        }
        let mut adopted = saved_blocks(&s.state_file);
        for iface in &s.interfaces {
            let Some(id) = kernel::front_door_on(iface) else {
                continue;
            };
            match takeover::blocks_of(id) {
                Ok(blocks) => adopted.extend(blocks.into_iter().filter_map(|(addr, e)| {
                    let reason = BlockReason::from_u32(e.reason)?;
                    (reason != BlockReason::Config && e.expires_ns != u64::MAX).then_some(Block {
                        addr,
                        reason,
                        expires_ns: Some(e.expires_ns),
                    })
                })),
                Err(e) => {
                    tracing::warn!(interface = %iface, program_id = id, error = %e, "cannot read the running front door's blocks")
                }
            }
        }
        let now = monotonic_ns();
        let configured: Vec<IpAddr> = r.xdp_block.iter().map(|a| canonical(*a)).collect();
        adopted.retain(|b| {
            b.expires_ns.is_some_and(|e| e > now)
                && !r.xdp_allow.iter().any(|c| c.contains(b.addr))
                && !configured.contains(&b.addr)
        });
        // Room left beside the config's blocks; one that doesn't fit is
        // skipped (and logged), it doesn't stop the front door.
        adopted.truncate((s.max_blocked as usize).saturating_sub(configured.len()));
        adopted.retain(|b| {
            let entry = BlockEntry {
                expires_ns: b.expires_ns.unwrap_or(u64::MAX),
                reason: b.reason as u32,
                _pad: 0,
            };
            k.block(b.addr, entry)
                .map_err(|e| tracing::warn!(client = %b.addr, error = %e, "a carried-over block did not fit in the XDP map"))
                .is_ok()
        });
        for iface in &s.interfaces {
            let generic = s.attach == crate::config::XdpAttach::Generic;
            let (mode, note) = k.attach(iface, generic)?;
            match note {
                kernel::Note::None => {}
                kernel::Note::FellBack(why) => {
                    tracing::warn!(interface = %iface, error = %why, "native XDP refused by the driver; attached in generic (skb) mode, which is slower")
                }
                kernel::Note::TookOver(id) => {
                    tracing::warn!(interface = %iface, program_id = id, blocks = adopted.len(), "took the XDP front door over from a running gateway (its blocks came along); stop the old one now")
                }
            }
            tracing::info!(interface = %iface, mode = mode.as_str(), ports = ?ports, "XDP front door attached");
            status.attached.push((iface.clone(), mode.as_str()));
        }
        Ok((k, adopted))
    }

    /// Apply a (re)loaded config: mode and rates, the allowlist, and the
    /// config's static blocks (added, and removed when no longer listed).
    /// Interfaces and map sizes only change on a restart.
    pub fn apply(&self, r: &Checked) {
        let mut st = self.lock();
        let s = &r.config.xdp;
        st.settings.mode = s.mode;
        st.settings.syn_rate = s.syn_rate;
        st.settings.syn_burst = s.syn_burst;
        st.settings.packet_rate = s.packet_rate;
        st.settings.packet_burst = s.packet_burst;
        st.settings.default_block_ttl = s.default_block_ttl;
        st.settings.max_block_ttl = s.max_block_ttl;
        st.settings.watch_max_per_second = s.watch_max_per_second;
        st.settings.max_watchers = s.max_watchers;
        // Open watchers keep watching within the new ceiling.
        let ceiling = s.watch_max_per_second;
        for (_, o) in st.watchers.iter_mut() {
            o.max_per_second = o.max_per_second.min(ceiling);
        }
        let old_allow = std::mem::replace(&mut st.allow, r.xdp_allow.clone());
        let config = st.kernel_config();
        if let Some(k) = st.kernel.as_mut() {
            let mut fails = Vec::new();
            if let Err(e) = k.set_config(config) {
                fails.push(e.to_string());
            }
            for c in old_allow.iter().filter(|c| !r.xdp_allow.contains(c)) {
                if let Err(e) = k.disallow(*c) {
                    fails.push(e.to_string());
                }
            }
            for c in &r.xdp_allow {
                if let Err(e) = k.allow(*c) {
                    fails.push(e.to_string());
                }
            }
            for e in fails {
                tracing::error!(error = %e, "XDP map update failed");
            }
        }
        // Static blocks: drop the ones no longer listed, add the new ones.
        let gone: Vec<IpAddr> = st
            .blocks
            .values()
            .filter(|b| b.reason == BlockReason::Config && !r.xdp_block.contains(&b.addr))
            .map(|b| b.addr)
            .collect();
        for a in gone {
            self.remove_locked(&mut st, a, "unblock");
        }
        for &a in &r.xdp_block {
            let b = Block {
                addr: canonical(a),
                reason: BlockReason::Config,
                expires_ns: None,
            };
            if let Err(e) = self.insert_locked(&mut st, b) {
                tracing::error!(client = %a, error = %e, "cannot apply a configured block");
            }
        }
        self.publish(&st);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `addr` for `ttl` (the configured default when `None`). The one
    /// entry point for every source: admin API, CLI, and the rate limiter's
    /// escalation (`BlockReason::RateLimit`). Re-blocking an address sets
    /// the new TTL. Takes effect at the NIC at once and at accept on every
    /// worker before this returns.
    pub fn block(
        &self,
        addr: IpAddr,
        ttl: Option<Duration>,
        reason: BlockReason,
    ) -> Result<Block, BlockError> {
        let addr = canonical(addr);
        let mut st = self.lock();
        let ttl = ttl.unwrap_or(st.settings.default_block_ttl);
        if ttl.is_zero() || ttl > st.settings.max_block_ttl {
            return Err(BlockError::Ttl(st.settings.max_block_ttl.as_secs()));
        }
        if st
            .blocks
            .get(&addr)
            .is_some_and(|b| b.reason == BlockReason::Config)
        {
            return Err(BlockError::Static(addr));
        }
        let b = Block {
            addr,
            reason,
            expires_ns: Some(monotonic_ns().saturating_add(ttl.as_nanos() as u64)),
        };
        self.insert_locked(&mut st, b)?;
        self.publish(&st);
        tracing::warn!(target: "audit", event = "block", client = %addr, reason = reason.as_str(), ttl_s = ttl.as_secs(), "client address blocked");
        Ok(b)
    }

    /// Remove a block (not a configured one: that is the config's to change).
    /// `Ok(false)` when the address wasn't blocked.
    pub fn unblock(&self, addr: IpAddr) -> Result<bool, BlockError> {
        let addr = canonical(addr);
        let mut st = self.lock();
        match st.blocks.get(&addr) {
            None => return Ok(false),
            Some(b) if b.reason == BlockReason::Config => return Err(BlockError::Static(addr)),
            Some(_) => {}
        }
        self.remove_locked(&mut st, addr, "unblock");
        self.publish(&st);
        tracing::warn!(target: "audit", event = "unblock", client = %addr, "client address unblocked");
        Ok(true)
    }

    /// Every block in force, ordered by address.
    pub fn list(&self) -> Vec<Block> {
        let mut v: Vec<Block> = self.lock().blocks.values().copied().collect();
        v.sort_by_key(|b| b.addr);
        v
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Whether `addr` is in the allowlist (never blocked, never escalated).
    pub fn allowlisted(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        let view = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        view.allow.iter().any(|c| c.contains(addr))
    }

    /// The accept-time check: true when a connection from `addr` must be
    /// closed at once (blocked, unexpired, not allowlisted, enforce mode).
    pub fn refuses(&self, addr: IpAddr) -> bool {
        if !self.any_blocked.load(Ordering::Relaxed) {
            return false;
        }
        let view = self.view.read().unwrap_or_else(|p| p.into_inner()).clone();
        let addr = canonical(addr);
        let refused = view.enforce
            && match view.blocks.get(&addr) {
                None => false,
                Some(None) => true,
                Some(Some(exp)) => monotonic_ns() < *exp,
            }
            && !view.allow.iter().any(|c| c.contains(addr));
        if refused {
            self.metrics
                .accept_refused
                .with_label_values(&["blocked"])
                .inc();
        }
        refused
    }

    /// Expire blocks whose TTL is over and fold the program's counters into
    /// the metrics. The maintenance thread calls it every second; `/metrics`
    /// before rendering.
    pub fn tick(&self) {
        let now = monotonic_ns();
        let mut st = self.lock();
        let expired: Vec<IpAddr> = st
            .blocks
            .values()
            .filter(|b| b.expires_ns.is_some_and(|e| e <= now))
            .map(|b| b.addr)
            .collect();
        for a in &expired {
            self.remove_locked(&mut st, *a, "expire");
            tracing::info!(target: "audit", event = "expire", client = %a, "block expired");
        }
        if !expired.is_empty() {
            self.publish(&st);
        }
        self.save_locked(&mut st);
        let config = st.kernel_config();
        let State {
            kernel,
            last_counters,
            last_block_drops,
            last_watch_suppressed,
            ..
        } = &mut *st;
        if let Some(k) = kernel.as_mut() {
            // Refresh the program's clock floor (see XdpConfig::clock_floor_ns).
            if let Err(e) = k.set_config(config) {
                tracing::error!(error = %e, "XDP config refresh failed");
            }
        }
        if let Some(k) = kernel.as_ref() {
            let now = k.counters();
            for (c, (n, last)) in Counter::ALL
                .iter()
                .zip(now.iter().zip(last_counters.iter_mut()))
            {
                if *n > *last {
                    let (verdict, reason) = c.labels();
                    self.metrics
                        .xdp_packets
                        .with_label_values(&[verdict, reason])
                        .inc_by(*n - *last);
                    *last = *n;
                }
            }
            let suppressed = k.watch_suppressed();
            if suppressed > *last_watch_suppressed {
                self.metrics
                    .xdp_watch_suppressed
                    .inc_by(suppressed - *last_watch_suppressed);
                *last_watch_suppressed = suppressed;
            }
            let drops = k.block_drops();
            for (r, (n, last)) in BlockReason::ALL
                .iter()
                .zip(drops.iter().zip(last_block_drops.iter_mut()))
            {
                if *n > *last {
                    self.metrics
                        .xdp_block_drops
                        .with_label_values(&[r.as_str()])
                        .inc_by(*n - *last);
                    *last = *n;
                }
            }
        }
    }

    /// The program's counters now: `(verdict, reason, packets)`; empty without XDP.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let st = self.lock();
        match st.kernel.as_ref() {
            None => Vec::new(),
            Some(k) => Counter::ALL
                .iter()
                .zip(k.counters())
                .map(|(c, n)| {
                    let (v, r) = c.labels();
                    (v, r, n)
                })
                .collect(),
        }
    }

    /// Start the once-a-second maintenance thread.
    pub fn spawn_maintenance(self: &Arc<Self>) -> std::io::Result<()> {
        let fd = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("gateway-xdp".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                match fd.upgrade() {
                    Some(fd) => fd.tick(),
                    None => return,
                }
            })
            .map(|_| ())
    }

    /// Detach from every interface now (shutdown); later blocks apply at accept only.
    pub fn detach(&self) {
        let mut st = self.lock();
        self.save_locked(&mut st);
        self.detached.store(true, Ordering::Relaxed);
        if st.kernel.take().is_some() {
            self.metrics.xdp_enabled.set(0);
            for (iface, mode) in &self.status.attached {
                self.metrics
                    .xdp_attached
                    .with_label_values(&[iface.as_str(), mode])
                    .set(0);
            }
            tracing::info!("XDP front door detached");
        }
    }

    fn insert_locked(&self, st: &mut State, b: Block) -> Result<(), BlockError> {
        if st.allow.iter().any(|c| c.contains(b.addr)) {
            return Err(BlockError::Allowlisted(b.addr));
        }
        let previous = st.blocks.get(&b.addr).copied();
        if previous.is_none() && st.blocks.len() >= st.settings.max_blocked as usize {
            self.metrics
                .xdp_block_events
                .with_label_values(&["refused_full", b.reason.as_str()])
                .inc();
            return Err(BlockError::Full(st.settings.max_blocked));
        }
        if let Some(k) = st.kernel.as_mut() {
            let entry = BlockEntry {
                expires_ns: b.expires_ns.unwrap_or(u64::MAX),
                reason: b.reason as u32,
                _pad: 0,
            };
            k.block(b.addr, entry)
                .map_err(|e| BlockError::Kernel(e.to_string()))?;
        }
        st.blocks.insert(b.addr, b);
        st.dirty |= b.reason != BlockReason::Config;
        if let Some(p) = previous {
            self.metrics
                .xdp_blocked
                .with_label_values(&[p.reason.as_str()])
                .dec();
        }
        self.metrics
            .xdp_blocked
            .with_label_values(&[b.reason.as_str()])
            .inc();
        self.metrics
            .xdp_block_events
            .with_label_values(&["block", b.reason.as_str()])
            .inc();
        Ok(())
    }

    fn remove_locked(&self, st: &mut State, addr: IpAddr, action: &str) {
        let Some(b) = st.blocks.remove(&addr) else {
            return;
        };
        st.dirty |= b.reason != BlockReason::Config;
        if let Some(k) = st.kernel.as_mut() {
            if let Err(e) = k.unblock(addr) {
                tracing::error!(client = %addr, error = %e, "cannot remove a block from the XDP map");
            }
        }
        self.metrics
            .xdp_blocked
            .with_label_values(&[b.reason.as_str()])
            .dec();
        self.metrics
            .xdp_block_events
            .with_label_values(&[action, b.reason.as_str()])
            .inc();
    }

    fn publish(&self, st: &State) {
        let view = View {
            blocks: st.blocks.values().map(|b| (b.addr, b.expires_ns)).collect(),
            allow: st.allow.clone(),
            enforce: st.settings.mode == XdpMode::Enforce,
        };
        self.any_blocked
            .store(!view.blocks.is_empty(), Ordering::Relaxed);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }
}

/// The unexpired blocks saved in `[xdp] state_file` (none when it is unset,
/// missing or unreadable: logged).
fn saved_blocks(path: &std::path::Path) -> Vec<Block> {
    if path.as_os_str().is_empty() {
        return Vec::new();
    }
    let saved = match state::load(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the saved XDP blocks; starting without them");
            return Vec::new();
        }
    };
    let (now, unix_ms) = (monotonic_ns(), state::now_unix_ms());
    saved
        .into_iter()
        .filter_map(|b| {
            let left_ms = b.expires_unix_ms.checked_sub(unix_ms).filter(|l| *l > 0)?;
            Some(Block {
                addr: canonical(b.addr),
                reason: b.reason,
                expires_ns: Some(now.saturating_add(left_ms.saturating_mul(1_000_000))),
            })
        })
        .collect()
}

/// An open watch stream; see [`FrontDoor::watch`]. Dropping it turns the
/// sampling off (or back to what the other watchers asked for).
pub struct Watcher {
    fd: Arc<FrontDoor>,
    id: u64,
    opts: WatchOpts,
    cursor: u64,
    cap: watch::Cap,
    /// Events this watcher missed because it read slower than they came.
    pub lost: u64,
}

impl Watcher {
    /// The next events, waiting up to `timeout` for one: only the kinds this
    /// watcher asked for, within its own per-second cap.
    pub fn next(&mut self, timeout: Duration) -> Vec<watch::Event> {
        let (events, cursor, lost) = self.fd.hub.read(self.cursor, timeout);
        self.cursor = cursor;
        self.lost += lost;
        events
            .into_iter()
            .filter(|e| self.opts.passes || e.is_drop())
            .filter(|_| self.cap.admit())
            .collect()
    }

    /// Events over this watcher's own cap (the kernel's cap is the metric
    /// `gateway_xdp_watch_suppressed_total`).
    pub fn skipped(&self) -> u64 {
        self.cap.skipped
    }

    pub fn opts(&self) -> WatchOpts {
        self.opts
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut st = self.fd.lock();
        st.watchers.retain(|(id, _)| *id != self.id);
        self.fd.push_watch_config(&mut st);
        tracing::info!(target: "audit", event = "xdp_watch", action = "stop", "XDP watch stream closed");
    }
}

/// `[xdp]` as the program reads it: GCRA intervals and tolerances in ns.
pub fn kernel_config(s: &XdpSettings) -> XdpConfig {
    let gcra = |rate: u32, burst: u32| -> (u64, u64) {
        if rate == 0 {
            return (0, 0);
        }
        let interval = (1_000_000_000u64 / rate as u64).max(1);
        (interval, interval * (burst.max(1) as u64 - 1))
    };
    let (syn_interval_ns, syn_tolerance_ns) = gcra(s.syn_rate, s.syn_burst);
    let (pkt_interval_ns, pkt_tolerance_ns) = gcra(s.packet_rate, s.packet_burst);
    XdpConfig {
        mode: match s.mode {
            XdpMode::Enforce => MODE_ENFORCE,
            XdpMode::Monitor => MODE_MONITOR,
        },
        _pad: 0,
        syn_interval_ns,
        syn_tolerance_ns,
        pkt_interval_ns,
        pkt_tolerance_ns,
        clock_floor_ns: monotonic_ns(),
        watch_one_in: 0,
        watch_what: 0,
        watch_max_per_sec: 0,
        _pad2: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let host: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(host.len, 32);
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.8".parse().unwrap()));
        assert!("10.0.0.1/8"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn gcra_parameters() {
        let mut s = XdpSettings {
            syn_rate: 100,
            syn_burst: 5,
            packet_rate: 0,
            ..Default::default()
        };
        let k = kernel_config(&s);
        assert_eq!(k.mode, MODE_ENFORCE);
        assert_eq!(k.syn_interval_ns, 10_000_000);
        // burst 5: 4 intervals of slack on top of the one being admitted.
        assert_eq!(k.syn_tolerance_ns, 40_000_000);
        assert_eq!((k.pkt_interval_ns, k.pkt_tolerance_ns), (0, 0));
        s.mode = XdpMode::Monitor;
        assert_eq!(kernel_config(&s).mode, MODE_MONITOR);
    }
}
