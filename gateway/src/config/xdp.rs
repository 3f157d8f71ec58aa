//! `[xdp]`: the front door's settings, and [`Cidr`], the parsed form of its
//! allowlist entries.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, Sink};
use crate::syntax::canonical;

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpAttach {
    /// In the driver (fastest); falls back to `generic` with a warning when the driver can't.
    #[default]
    Native,
    /// In the kernel stack after the skb is built (works on any interface; slower).
    Generic,
}

/// What the XDP program does with packets it would drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpMode {
    /// Drop them.
    #[default]
    Enforce,
    /// Count them as `would_drop`, drop nothing (also at accept).
    Monitor,
}

/// `[xdp]`: see README "XDP front door".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdpSettings {
    /// Interfaces to attach to; empty: XDP off, blocks are enforced at accept only.
    pub interfaces: Vec<String>,
    pub attach: XdpAttach,
    pub mode: XdpMode,
    /// New TCP connections (SYNs) per second per source address; 0: no SYN quota.
    pub syn_rate: u32,
    /// SYNs a source may send at once above the rate.
    pub syn_burst: u32,
    /// Packets per second per source address to the gateway's ports; 0: no packet quota.
    pub packet_rate: u32,
    pub packet_burst: u32,
    /// CIDRs never dropped or refused (health checkers, internal networks).
    pub allow: Vec<String>,
    /// Addresses blocked for as long as this config is in force.
    pub block: Vec<String>,
    /// TTL of a block added without one (admin API, CLI).
    #[serde(deserialize_with = "duration")]
    pub default_block_ttl: Duration,
    /// Longest TTL a block may be given.
    #[serde(deserialize_with = "duration")]
    pub max_block_ttl: Duration,
    /// Blocklist capacity (addresses); a block beyond it is refused.
    pub max_blocked: u32,
    /// Source addresses whose quota is tracked at once (LRU: the least recent is forgotten).
    pub max_tracked_sources: u32,
    /// Allowlist capacity (CIDRs).
    pub max_allow: u32,
    /// The most sampled verdicts per second per CPU that a watch stream
    /// (`gateway xdp watch`) may ask for; 0: watching is disabled.
    pub watch_max_per_second: u32,
    /// Watch streams open at once at most.
    pub max_watchers: u32,
    /// Blocks added at run time (admin API, CLI, rate-limit escalation) are
    /// kept here with their expiry and restored at start; empty: not kept.
    pub state_file: std::path::PathBuf,
}

impl Default for XdpSettings {
    fn default() -> Self {
        XdpSettings {
            interfaces: Vec::new(),
            attach: XdpAttach::Native,
            mode: XdpMode::Enforce,
            syn_rate: 1000,
            syn_burst: 2000,
            packet_rate: 0,
            packet_burst: 0,
            allow: Vec::new(),
            block: Vec::new(),
            default_block_ttl: Duration::from_secs(3600),
            max_block_ttl: Duration::from_secs(30 * 24 * 3600),
            max_blocked: 65536,
            max_tracked_sources: 262144,
            max_allow: 1024,
            watch_max_per_second: 100,
            max_watchers: 4,
            state_file: std::path::PathBuf::new(),
        }
    }
}

/// An IPv4 or IPv6 network, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, canonical(a)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr =
            canonical(a.parse::<IpAddr>().map_err(|_| {
                format!("`{s}` is not a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\"")
            })?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return Err(format!("`{s}`: the prefix length must be 0..={max}")),
            },
        };
        let c = Cidr { addr, len };
        // Store the network address: host bits set is almost always a typo.
        if !c.contains(addr) || network(c) != addr {
            return Err(format!(
                "`{s}` has host bits set; did you mean {}/{len}?",
                network(c)
            ));
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn network(c: Cidr) -> IpAddr {
    match c.addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - c.len as u32).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - c.len as u32).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

/// `[xdp]`, checked: the allowlist and the blocklist, parsed.
pub(super) fn check_xdp(x: &XdpSettings, sink: &mut Sink) -> (Vec<Cidr>, Vec<IpAddr>) {
    let mut allow = Vec::new();
    for (i, c) in x.allow.iter().enumerate() {
        match c.parse::<Cidr>() {
            Ok(c) => allow.push(c),
            Err(e) => sink.err(format!("xdp.allow[{i}]"), e),
        }
    }
    let mut block = Vec::new();
    for (i, a) in x.block.iter().enumerate() {
        match a.parse::<IpAddr>() {
            Ok(a) if allow.iter().any(|c| c.contains(a)) => sink.err(
                format!("xdp.block[{i}]"),
                format!("`{a}` is also in xdp.allow; allowlisted addresses are never blocked"),
            ),
            Ok(a) => block.push(a),
            Err(_) => sink.err(
                format!("xdp.block[{i}]"),
                format!("`{a}` is not an IPv4 or IPv6 address"),
            ),
        }
    }
    check_xdp_sizes(x, sink);
    (allow, block)
}

/// Interface names, quotas, TTLs and map capacities.
fn check_xdp_sizes(x: &XdpSettings, sink: &mut Sink) {
    for (i, name) in x.interfaces.iter().enumerate() {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            sink.err(
                format!("xdp.interfaces[{i}]"),
                format!("`{name}` is not an interface name"),
            );
        }
    }
    for (key, rate, burst) in [
        ("xdp.syn_burst", x.syn_rate, x.syn_burst),
        ("xdp.packet_burst", x.packet_rate, x.packet_burst),
    ] {
        if rate > 0 && burst < 1 {
            sink.err(key, "must be at least 1 when the rate is set");
        }
    }
    if x.default_block_ttl.is_zero() || x.default_block_ttl > x.max_block_ttl {
        sink.err(
            "xdp.default_block_ttl",
            "must be more than 0s and at most xdp.max_block_ttl",
        );
    }
    for (key, v) in [
        ("xdp.max_blocked", x.max_blocked),
        ("xdp.max_tracked_sources", x.max_tracked_sources),
        ("xdp.max_allow", x.max_allow),
    ] {
        if !(1..=16_777_216).contains(&v) {
            sink.err(key, "must be between 1 and 16777216");
        }
    }
    if x.watch_max_per_second > 100_000 {
        sink.err("xdp.watch_max_per_second", "must be at most 100000");
    }
    if !(1..=64).contains(&x.max_watchers) {
        sink.err("xdp.max_watchers", "must be between 1 and 64");
    }
    if x.allow.len() > x.max_allow as usize {
        sink.err(
            "xdp.allow",
            format!("more CIDRs than xdp.max_allow ({})", x.max_allow),
        );
    }
    if x.block.len() > x.max_blocked as usize {
        sink.err(
            "xdp.block",
            format!("more addresses than xdp.max_blocked ({})", x.max_blocked),
        );
    }
}
