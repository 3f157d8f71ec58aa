//! Types shared by the XDP program (`gateway-ebpf`) and the gateway's
//! userspace control plane. Defined once, `#[repr(C)]`, so both sides agree
//! on the bytes in every BPF map without a "keep in sync" comment.
//!
//! Conventions: addresses are stored in **network byte order** exactly as
//! they appear on the wire; ports and times in **host byte order**; times are
//! `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns()` returns and
//! `clock_gettime(CLOCK_MONOTONIC)` reads in userspace).
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

/// Map names, as the userspace looks them up in the loaded object.
pub mod maps {
    /// `Array<u8>` of 65536, indexed by destination port (host byte order):
    /// [`PORT_TCP`](crate::PORT_TCP) | [`PORT_UDP`](crate::PORT_UDP) for the
    /// gateway's listening ports, 0 elsewhere. An array, not a hash: the JIT
    /// inlines its lookup.
    pub const PORTS: &str = "PORTS";
    /// `HashMap<IpKey, BlockEntry>`: blocked IPv6 source addresses.
    pub const BLOCKLIST: &str = "BLOCKLIST";
    /// `HashMap<[u8; 4], BlockEntry>`: blocked IPv4 source addresses
    /// (network byte order), also matched for IPv4-mapped IPv6 sources. A
    /// 4-byte key hashes in one round instead of three: IPv4 floods are the
    /// common case and this lookup is on every packet.
    pub const BLOCKLIST_V4: &str = "BLOCKLIST_V4";
    /// `LpmTrie<[u8; 16], u8>`: sources that are never dropped.
    pub const ALLOWLIST: &str = "ALLOWLIST";
    /// `LruHashMap<IpKey, QuotaState>`: per-source token buckets.
    pub const QUOTA: &str = "QUOTA";
    /// `Array<XdpConfig>` with one element: mode and rates.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>` indexed by [`Counter`](crate::Counter).
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<u64>` indexed by [`BlockReason`](crate::BlockReason):
    /// packets dropped (or, in monitor mode, that would have been) per reason.
    pub const BLOCK_DROPS: &str = "BLOCK_DROPS";
    /// `PerCpuArray<WatchState>` with one element: the watch stream's
    /// per-CPU rate cap (see [`XdpConfig::watch_one_in`](crate::XdpConfig)).
    pub const WATCH: &str = "WATCH";
    /// The `aya-log` ring buffer the sampled verdicts are written to.
    pub const AYA_LOGS: &str = "AYA_LOGS";
}

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "gateway_xdp";
/// A second, trivial program in the same object: redirects every frame to
/// the interface in [`maps::TRAFFIC_TARGET`]. Only the XDP bench uses it, as
/// a packet generator through `BPF_PROG_TEST_RUN` with live frames.
pub const TRAFFIC_PROGRAM: &str = "gateway_trafficgen";
/// `Array<u32>` with one element: the ifindex the traffic generator sends to.
pub const TRAFFIC_TARGET: &str = "TRAFFIC_TARGET";

/// A source address, IPv4 stored as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    /// Network byte order.
    pub addr: [u8; 16],
}

impl IpKey {
    /// The key for an IPv4 address given in network byte order.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        IpKey { addr }
    }
    pub const fn v6(octets: [u8; 16]) -> Self {
        IpKey { addr: octets }
    }

    /// The IPv4 address, when this is an IPv4-mapped address.
    #[inline(always)]
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        // Byte by byte: a slice comparison becomes a memcmp call, which BPF lacks.
        let zero = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9];
        if zero == 0 && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

/// Prefix length added to an IPv4 CIDR's length when stored in the
/// allowlist trie as an IPv4-mapped address (96 bits of `::ffff:`).
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Why a source address is blocked.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// Added by an operator through the admin API or `gateway xdp block`.
    Manual = 0,
    /// Listed in the config file (`[xdp] blocks`).
    Config = 1,
    /// Escalated by the rate limiter after repeated refusals.
    RateLimit = 2,
}

impl BlockReason {
    pub const COUNT: usize = 3;
    pub const ALL: [BlockReason; Self::COUNT] = [
        BlockReason::Manual,
        BlockReason::Config,
        BlockReason::RateLimit,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(BlockReason::Manual),
            1 => Some(BlockReason::Config),
            2 => Some(BlockReason::RateLimit),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            BlockReason::Manual => "manual",
            BlockReason::Config => "config",
            BlockReason::RateLimit => "rate_limit",
        }
    }
}

/// A blocklist entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockEntry {
    /// Monotonic ns after which the entry no longer blocks; `u64::MAX`: never.
    pub expires_ns: u64,
    /// A [`BlockReason`] as u32.
    pub reason: u32,
    pub _pad: u32,
}

/// Token-bucket state per source address, as GCRA: each bucket is one
/// "theoretical arrival time". A packet conforms when `tat - now <= tolerance`,
/// and then moves `tat` forward by one emission interval. One u64 per bucket,
/// no division in the packet path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuotaState {
    /// Monotonic ns: theoretical arrival time of the next SYN.
    pub syn_tat: u64,
    /// Monotonic ns: theoretical arrival time of the next packet.
    pub pkt_tat: u64,
}

/// What the program does with a packet it would drop.
pub const MODE_MONITOR: u32 = 1;
pub const MODE_ENFORCE: u32 = 2;

/// Runtime configuration, element 0 of [`maps::CONFIG`]. All zero (the state
/// before userspace writes it) means: monitor nothing, pass everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpConfig {
    /// [`MODE_MONITOR`] or [`MODE_ENFORCE`]; anything else passes every packet.
    pub mode: u32,
    pub _pad: u32,
    /// ns between SYNs at the sustained rate (1e9 / rate); 0: no SYN quota.
    pub syn_interval_ns: u64,
    /// How far ahead of now a source's SYN `tat` may run: interval × (burst − 1).
    pub syn_tolerance_ns: u64,
    /// ns between packets at the sustained rate; 0: no packet quota.
    pub pkt_interval_ns: u64,
    /// As `syn_tolerance_ns`, for packets.
    pub pkt_tolerance_ns: u64,
    /// Monotonic ns at most a few seconds in the past, refreshed by
    /// userspace every second: blocks expiring well after it need no clock
    /// read in the packet path. 0: unknown (the clock is always read).
    pub clock_floor_ns: u64,
    /// The watch stream (`gateway xdp watch`): 0 = off (the default; the
    /// packet path pays one compare), 1 = every verdict that `watch_what`
    /// selects, N = one in N of them, chosen at random.
    pub watch_one_in: u32,
    /// [`WATCH_DROPS`] | [`WATCH_PASSES`]: which verdicts are sampled.
    pub watch_what: u32,
    /// Sampled verdicts written per second per CPU at most; the rest are
    /// counted in [`WatchState::suppressed`].
    pub watch_max_per_sec: u32,
    pub _pad2: u32,
}

/// [`XdpConfig::watch_what`] bits: drops and monitor-mode would-drops.
pub const WATCH_DROPS: u32 = 1;
/// [`XdpConfig::watch_what`] bits: packets passed on the gateway's ports.
pub const WATCH_PASSES: u32 = 2;

/// Per-CPU state of the watch stream's rate cap: a one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WatchState {
    /// Monotonic ns at which the current window began.
    pub window_ns: u64,
    /// Verdicts written in the current window.
    pub written: u32,
    pub _pad: u32,
    /// Sampled verdicts not written because the window was full (monotonic).
    pub suppressed: u64,
}

/// The sampled-verdict log line, `aya-log` formatted: the userspace watch
/// parses exactly these fields (`xdp::watch`), so both sides name them here.
/// `c` is the [`Counter`], `r` the [`BlockReason`] (or [`NO_REASON`]), `p`
/// the IP protocol, `d` the destination port, `s` the source address.
pub const WATCH_FIELDS: [&str; 5] = ["c", "r", "p", "d", "s"];
/// `r` of a verdict that isn't about a block.
pub const NO_REASON: u32 = 255;

/// [`maps::PORTS`] value bits.
pub const PORT_TCP: u8 = 1;
pub const PORT_UDP: u8 = 2;

/// One per verdict and reason; index into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4/IPv6 (ARP, LLDP, …).
    PassNotIp = 0,
    /// Headers truncated or not parseable: passed, never dropped.
    PassMalformed = 1,
    /// Not TCP/UDP, or an IPv6 extension chain the program doesn't walk.
    PassOtherProtocol = 2,
    /// A non-first fragment: no ports to match on.
    PassFragment = 3,
    /// Not to one of the gateway's ports.
    PassOtherPort = 4,
    /// Source in the allowlist, and it would otherwise have been dropped
    /// (blocked or over quota).
    PassAllowlisted = 5,
    /// Source blocked, but the entry has expired.
    PassExpiredBlock = 6,
    /// Checked and within quota.
    Pass = 7,
    /// Dropped: source blocked.
    DropBlocked = 8,
    /// Dropped: SYN over the per-source connection quota.
    DropSynQuota = 9,
    /// Dropped: packet over the per-source packet quota.
    DropPacketQuota = 10,
    /// Monitor mode: would have dropped (blocked).
    MonitorBlocked = 11,
    /// Monitor mode: would have dropped (SYN quota).
    MonitorSynQuota = 12,
    /// Monitor mode: would have dropped (packet quota).
    MonitorPacketQuota = 13,
}

impl Counter {
    pub const COUNT: usize = 14;
    pub const ALL: [Counter; Self::COUNT] = [
        Counter::PassNotIp,
        Counter::PassMalformed,
        Counter::PassOtherProtocol,
        Counter::PassFragment,
        Counter::PassOtherPort,
        Counter::PassAllowlisted,
        Counter::PassExpiredBlock,
        Counter::Pass,
        Counter::DropBlocked,
        Counter::DropSynQuota,
        Counter::DropPacketQuota,
        Counter::MonitorBlocked,
        Counter::MonitorSynQuota,
        Counter::MonitorPacketQuota,
    ];

    /// `(verdict, reason)` labels for the Prometheus counter.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Counter::PassNotIp => ("pass", "not_ip"),
            Counter::PassMalformed => ("pass", "malformed"),
            Counter::PassOtherProtocol => ("pass", "other_protocol"),
            Counter::PassFragment => ("pass", "fragment"),
            Counter::PassOtherPort => ("pass", "other_port"),
            Counter::PassAllowlisted => ("pass", "allowlisted"),
            Counter::PassExpiredBlock => ("pass", "expired_block"),
            Counter::Pass => ("pass", "ok"),
            Counter::DropBlocked => ("drop", "blocked"),
            Counter::DropSynQuota => ("drop", "syn_quota"),
            Counter::DropPacketQuota => ("drop", "packet_quota"),
            Counter::MonitorBlocked => ("would_drop", "blocked"),
            Counter::MonitorSynQuota => ("would_drop", "syn_quota"),
            Counter::MonitorPacketQuota => ("would_drop", "packet_quota"),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain #[repr(C)] structs of integers with explicit padding
    // fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::BlockEntry {}
    unsafe impl aya::Pod for super::QuotaState {}
    unsafe impl aya::Pod for super::XdpConfig {}
    unsafe impl aya::Pod for super::WatchState {}
}
