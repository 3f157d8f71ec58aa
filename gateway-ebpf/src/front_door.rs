//! The gateway's front door at the NIC.
//!
//! `gateway_xdp`: parse → decide → count. Every packet ends in exactly one
//! counted verdict (`Counter`); anything the parser can't make sense of is
//! passed, never dropped, so a parser gap can't black-hole traffic.
//!
//! Decision for a packet to one of the gateway's ports: blocked (unexpired)
//! → drop; over the per-source SYN or packet quota → drop; else pass. A
//! drop becomes a pass when the source is allowlisted (the LPM lookup is
//! only paid on that rare path). In monitor mode "drop" is counted as
//! "would drop" and the packet passes.
//!
//! No logging per packet: a log line per dropped packet would turn a flood
//! into a flood of log events. The one exception is the opt-in watch stream
//! (`gateway xdp watch`): while an operator watches, a random sample of the
//! verdicts on the gateway's ports, capped per CPU per second, goes through
//! `aya-log`'s ring buffer. While nobody watches (`watch_one_in == 0`, the
//! default) the packet path pays one compare on the config it already read.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use gateway_common::{
    BlockEntry, BlockReason, Counter, IpKey, QuotaState, WatchState, XdpConfig, MODE_ENFORCE,
    NO_REASON, PORT_TCP, PORT_UDP, WATCH_DROPS, WATCH_PASSES,
};

// Sizes here are defaults; userspace resizes every map before load
// (`[xdp] max_*` in the config).
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);
// Blocklists are plain hashes, not LRU: an LRU map may evict an entry
// before it is full (per-CPU free lists), silently lifting a block; userspace
// bounds the count (`[xdp] max_blocked`) and removes expired entries.
#[map]
static BLOCKLIST: HashMap<IpKey, BlockEntry> = HashMap::with_max_entries(65536, 0);
#[map]
static BLOCKLIST_V4: HashMap<[u8; 4], BlockEntry> = HashMap::with_max_entries(65536, 0);
#[map]
static ALLOWLIST: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(1024, 0);
#[map]
static QUOTA: LruHashMap<IpKey, QuotaState> = LruHashMap::with_max_entries(262144, 0);
#[map]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT as u32, 0);
#[map]
static BLOCK_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BlockReason::COUNT as u32, 0);
#[map]
static WATCH: PerCpuArray<WatchState> = PerCpuArray::with_max_entries(1, 0);
#[map]
static TRAFFIC_TARGET: Array<u32> = Array::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
/// How stale `XdpConfig::clock_floor_ns` may be (userspace refreshes it every second).
const CLOCK_GRACE_NS: u64 = 3_000_000_000;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// What the parser learned about a packet it could read to the L4 ports.
struct Flow {
    src: IpKey,
    /// The IPv4 source (also for an IPv4-mapped IPv6 source).
    v4: Option<[u8; 4]>,
    proto: u8,
    dst_port: u16,
    /// A TCP SYN without ACK: a new connection attempt.
    syn: bool,
}

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    let (action, counter) = match parse(&ctx) {
        Ok(flow) => {
            let (action, counter, reason) = decide(&flow);
            // Packets to other ports are never watched; for ours the
            // watch switch is one load and compare (an inlined array lookup).
            if counter != Counter::PassOtherPort
                && CONFIG.get(0).is_some_and(|c| c.watch_one_in != 0)
            {
                watch(&ctx, &flow, counter, reason);
            }
            (action, counter)
        }
        Err(Unparsed { counter, src: None }) => (xdp_action::XDP_PASS, counter),
        // Ports unreadable but the source known (a first fragment too short
        // for its TCP header, an IPv6 header chain longer than we walk): a
        // blocked source is dropped anyway, or fragmenting would get around
        // the block; anyone else passes.
        Err(Unparsed {
            counter,
            src: Some(src),
        }) => match blocked(&src) {
            Some(reason) => {
                let enforce = CONFIG.get(0).is_some_and(|c| c.mode == MODE_ENFORCE);
                count(&BLOCK_DROPS, reason);
                verdict(enforce, Counter::DropBlocked, Counter::MonitorBlocked)
            }
            None => (xdp_action::XDP_PASS, counter),
        },
    };
    count(&COUNTERS, counter as u32);
    action
}

/// Why a packet wasn't parsed to its ports, and its source when known.
struct Unparsed {
    counter: Counter,
    src: Option<Src>,
}

impl From<Counter> for Unparsed {
    fn from(counter: Counter) -> Self {
        Unparsed { counter, src: None }
    }
}

/// A source address: the 16-byte key, and the IPv4 address for IPv4 (and IPv4-mapped) sources.
#[derive(Clone, Copy)]
struct Src {
    key: IpKey,
    v4: Option<[u8; 4]>,
}

/// The reason of an unexpired block on `src`.
#[inline(always)]
fn blocked(src: &Src) -> Option<u32> {
    // SAFETY: copied out at once.
    let entry = match src.v4 {
        Some(v4) => unsafe { BLOCKLIST_V4.get(&v4) }.copied(),
        None => unsafe { BLOCKLIST.get(&src.key) }.copied(),
    }?;
    // SAFETY: read-only monotonic clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    (now < entry.expires_ns && ALLOWLIST.get(Key::new(128, src.key.addr)).is_none())
        .then_some(entry.reason)
}

/// Bench-only packet generator (see `gateway_common::TRAFFIC_PROGRAM`).
#[xdp]
pub fn gateway_trafficgen(_ctx: XdpContext) -> u32 {
    match TRAFFIC_TARGET.get(0) {
        // SAFETY: a helper call with plain integer arguments.
        Some(&ifindex) if ifindex != 0 => unsafe { bpf_redirect(ifindex, 0) as u32 },
        _ => xdp_action::XDP_DROP,
    }
}

/// Bench-only: a program that passes everything, for measuring what the
/// kernel stack (nftables, the userspace fallback) costs behind a NIC
/// that delivers frames the way a driver with XDP does.
#[xdp]
pub fn gateway_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Bench-only: drops everything, touching nothing: the floor a drop costs on
/// this path, against which the front door's own cost is read.
#[xdp]
pub fn gateway_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and XDP runs with preemption disabled: no
        // concurrent writer.
        unsafe { *slot += 1 };
    }
}

/// The `N` bytes at `offset` into the packet, or `None` when the packet is
/// too short. Every header is read whole through the one pointer that was
/// bounds-checked: the verifier tracks the check per pointer, and reading a
/// field through a pointer the compiler derived separately fails to verify.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    // SAFETY: the N bytes at start + offset are inside the packet (checked above).
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn parse(ctx: &XdpContext) -> Result<Flow, Unparsed> {
    let eth = load::<ETH_HLEN>(ctx, 0).ok_or(Counter::PassMalformed)?;
    let mut ether_type = be16(&eth, 12);
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1Q, or 802.1ad QinQ outer + 802.1Q inner).
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag = load::<4>(ctx, l3).ok_or(Counter::PassMalformed)?;
        ether_type = be16(&tag, 2);
        l3 += 4;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3),
        ETH_P_IPV6 => parse_ipv6(ctx, l3),
        ETH_P_8021Q | ETH_P_8021AD => Err(Counter::PassOtherProtocol.into()),
        _ => Err(Counter::PassNotIp.into()),
    }
}

fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Flow, Unparsed> {
    let ip = load::<20>(ctx, l3).ok_or(Counter::PassMalformed)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(Counter::PassMalformed.into());
    }
    // The whole header, options included, must be there.
    if ctx.data() + l3 + ihl > ctx.data_end() {
        return Err(Counter::PassMalformed.into());
    }
    if be16(&ip, 6) & 0x1fff != 0 {
        // Not the first fragment: no L4 header to read ports from.
        return Err(Counter::PassFragment.into());
    }
    let v4 = [ip[12], ip[13], ip[14], ip[15]];
    let src = Src {
        key: IpKey::v4(v4),
        v4: Some(v4),
    };
    parse_l4(ctx, l3 + ihl, ip[9], src.key, src.v4).map_err(|c| with_src(c, src))
}

fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Flow, Unparsed> {
    let ip = load::<40>(ctx, l3).ok_or(Counter::PassMalformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Counter::PassMalformed.into());
    }
    let mut next = ip[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    let mut off = l3 + 40;
    // Walk up to four extension headers (RFC 8200 §4); a longer chain is
    // passed as "other protocol" rather than guessed at.
    for _ in 0..4 {
        match next {
            // Hop-by-hop, routing, destination options, fragment, AH: all
            // start with (next header, length); read the first 8 octets.
            0 | 43 | 60 | 44 | 51 => {}
            _ => break,
        }
        let ext = load::<8>(ctx, off).ok_or(Counter::PassMalformed)?;
        let len = match next {
            // Fragment header: 8 octets; only the first fragment carries ports.
            44 => {
                if be16(&ext, 2) >> 3 != 0 {
                    return Err(Counter::PassFragment.into());
                }
                8
            }
            // Authentication header: length in 4-octet units, minus 2 (RFC 4302 §2.2).
            51 => (ext[1] as usize + 2) * 4,
            // Length in 8-octet units, not counting the first 8.
            _ => (ext[1] as usize + 1) * 8,
        };
        next = ext[0];
        off += len;
    }
    let key = IpKey::v6(src);
    let src = Src {
        key,
        v4: key.as_v4(),
    };
    if matches!(next, 0 | 43 | 60 | 44 | 51) {
        // A longer chain than we walk: no ports, but the source is known.
        return Err(Unparsed {
            counter: Counter::PassOtherProtocol,
            src: Some(src),
        });
    }
    parse_l4(ctx, off, next, src.key, src.v4).map_err(|c| with_src(c, src))
}

/// An L4 parse failure, keeping the source when the failure is a
/// truncated transport header (so a blocked source is still dropped).
#[inline(always)]
fn with_src(counter: Counter, src: Src) -> Unparsed {
    Unparsed {
        counter,
        src: (counter == Counter::PassMalformed).then_some(src),
    }
}

fn parse_l4(
    ctx: &XdpContext,
    l4: usize,
    proto: u8,
    src: IpKey,
    v4: Option<[u8; 4]>,
) -> Result<Flow, Counter> {
    match proto {
        IPPROTO_TCP => {
            // The full fixed header (20 bytes) must be present.
            let tcp = load::<20>(ctx, l4).ok_or(Counter::PassMalformed)?;
            Ok(Flow {
                src,
                v4,
                proto,
                dst_port: be16(&tcp, 2),
                syn: tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN,
            })
        }
        IPPROTO_UDP => {
            let udp = load::<8>(ctx, l4).ok_or(Counter::PassMalformed)?;
            Ok(Flow {
                src,
                v4,
                proto,
                dst_port: be16(&udp, 2),
                syn: false,
            })
        }
        _ => Err(Counter::PassOtherProtocol),
    }
}

/// `(action, counter, block reason or NO_REASON)` for a packet.
fn decide(flow: &Flow) -> (u32, Counter, u32) {
    let bit = if flow.proto == IPPROTO_TCP {
        PORT_TCP
    } else {
        PORT_UDP
    };
    let done = |(action, counter): (u32, Counter), reason: u32| (action, counter, reason);
    match PORTS.get(flow.dst_port as u32) {
        Some(bits) if bits & bit != 0 => {}
        _ => return done((xdp_action::XDP_PASS, Counter::PassOtherPort), NO_REASON),
    }
    let Some(config) = CONFIG.get(0) else {
        return done((xdp_action::XDP_PASS, Counter::Pass), NO_REASON);
    };
    let enforce = config.mode == MODE_ENFORCE;

    let mut passed = Counter::Pass;
    // SAFETY: the entry is copied out at once; a concurrent update from
    // userspace at worst gives the previous or the next value.
    let entry = match flow.v4 {
        // SAFETY: as below.
        Some(v4) => unsafe { BLOCKLIST_V4.get(&v4) }.copied(),
        None => unsafe { BLOCKLIST.get(&flow.src) }.copied(),
    };
    if let Some(entry) = entry {
        // Reading the clock costs ~20 ns a packet (a third of a bare drop),
        // so it is read only for entries that may have expired: userspace
        // writes `clock_floor_ns` (a past "now") every second, and an entry
        // expiring more than CLOCK_GRACE_NS after it can't have expired yet.
        // Block TTLs are seconds long: the coarse clock is plenty.
        let live = entry.expires_ns > config.clock_floor_ns.saturating_add(CLOCK_GRACE_NS)
            // SAFETY: read-only monotonic clock.
            || unsafe { bpf_ktime_get_coarse_ns() } < entry.expires_ns;
        if live {
            if allowlisted(flow) {
                return done(
                    (xdp_action::XDP_PASS, Counter::PassAllowlisted),
                    entry.reason,
                );
            }
            count(&BLOCK_DROPS, entry.reason);
            let v = verdict(enforce, Counter::DropBlocked, Counter::MonitorBlocked);
            return done(v, entry.reason);
        }
        passed = Counter::PassExpiredBlock;
    }

    // Only packets a quota applies to pay for the clock and the bucket.
    if (flow.syn && config.syn_interval_ns != 0) || config.pkt_interval_ns != 0 {
        // SAFETY: read-only monotonic clock.
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(over) = over_quota(flow, config, now) {
            if allowlisted(flow) {
                return done((xdp_action::XDP_PASS, Counter::PassAllowlisted), NO_REASON);
            }
            return done(over_verdict(enforce, over), NO_REASON);
        }
    }
    done((xdp_action::XDP_PASS, passed), NO_REASON)
}

/// The watch stream: when this verdict's kind is watched, sampled (one in
/// `watch_one_in`, at random) and under this CPU's per-second cap, write it
/// to the `aya-log` ring buffer; over the cap, count it as suppressed. A full
/// ring buffer loses the line (the reader is behind): never the packet.
#[inline(never)]
fn watch(ctx: &XdpContext, flow: &Flow, counter: Counter, reason: u32) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    let dropped = matches!(
        counter,
        Counter::DropBlocked
            | Counter::DropSynQuota
            | Counter::DropPacketQuota
            | Counter::MonitorBlocked
            | Counter::MonitorSynQuota
            | Counter::MonitorPacketQuota
    );
    let kind = if dropped { WATCH_DROPS } else { WATCH_PASSES };
    if config.watch_what & kind == 0 {
        return;
    }
    let one_in = config.watch_one_in;
    // SAFETY: a helper without arguments.
    if one_in > 1 && unsafe { bpf_get_prandom_u32() } % one_in != 0 {
        return;
    }
    let Some(state) = WATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; XDP runs with preemption disabled.
    let state = unsafe { &mut *state };
    // SAFETY: read-only monotonic clock.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(state.window_ns) >= 1_000_000_000 {
        state.window_ns = now;
        state.written = 0;
    }
    if state.written >= config.watch_max_per_sec {
        state.suppressed += 1;
        return;
    }
    state.written += 1;
    let (c, p, d) = (counter as u32, flow.proto, flow.dst_port);
    // The field names are gateway_common::WATCH_FIELDS.
    match flow.v4 {
        Some(v4) => aya_log_ebpf::info!(ctx, "c={} r={} p={} d={} s={:i}", c, reason, p, d, v4),
        None => {
            let s = flow.src.addr;
            aya_log_ebpf::info!(ctx, "c={} r={} p={} d={} s={:i}", c, reason, p, d, s)
        }
    }
}

#[inline(always)]
fn allowlisted(flow: &Flow) -> bool {
    ALLOWLIST.get(Key::new(128, flow.src.addr)).is_some()
}

#[inline(always)]
fn verdict(enforce: bool, drop: Counter, monitor: Counter) -> (u32, Counter) {
    if enforce {
        (xdp_action::XDP_DROP, drop)
    } else {
        (xdp_action::XDP_PASS, monitor)
    }
}

#[inline(always)]
fn over_verdict(enforce: bool, over: Counter) -> (u32, Counter) {
    match over {
        Counter::DropSynQuota => verdict(enforce, over, Counter::MonitorSynQuota),
        _ => verdict(enforce, over, Counter::MonitorPacketQuota),
    }
}

/// GCRA per source: `Some(DropSynQuota | DropPacketQuota)` when the packet is
/// over quota. Updates are plain loads and stores: two CPUs racing on one
/// source can each admit a packet the other would have counted, so a burst
/// spread over n CPUs may overshoot by at most n − 1 packets; no lock in the
/// packet path is worth more than that.
fn over_quota(flow: &Flow, config: &XdpConfig, now: u64) -> Option<Counter> {
    let state = match QUOTA.get_ptr_mut(&flow.src) {
        Some(p) => p,
        None => {
            let fresh = QuotaState::default();
            // BPF_NOEXIST: if another CPU created it meanwhile, use theirs.
            let _ = QUOTA.insert(&flow.src, &fresh, 1);
            QUOTA.get_ptr_mut(&flow.src)?
        }
    };
    // SAFETY: `state` points into the map value, valid for this program run.
    let state = unsafe { &mut *state };
    if flow.syn && config.syn_interval_ns != 0 {
        let tat = if state.syn_tat > now {
            state.syn_tat
        } else {
            now
        };
        if tat - now > config.syn_tolerance_ns {
            return Some(Counter::DropSynQuota);
        }
        state.syn_tat = tat + config.syn_interval_ns;
    }
    if config.pkt_interval_ns != 0 {
        let tat = if state.pkt_tat > now {
            state.pkt_tat
        } else {
            now
        };
        if tat - now > config.pkt_tolerance_ns {
            return Some(Counter::DropPacketQuota);
        }
        state.pkt_tat = tat + config.pkt_interval_ns;
    }
    None
}
