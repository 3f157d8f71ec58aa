//! The XDP program, table-driven: each fixture is a frame, what it is, the
//! verdict the program must give and the one counter that must rise. Frames
//! go through the real program in the kernel with BPF_PROG_TEST_RUN (needs
//! root / CAP_BPF, as CI has).

use gateway::xdp::kernel::{Loaded, Sizes};
use gateway_common::{
    BlockEntry, BlockReason, Counter, XdpConfig, MODE_ENFORCE, MODE_MONITOR, WATCH_DROPS,
};
use gateway_tests::packet::{self, ext_header, frag_header, v4, v6, Frame, ACK, SYN};

const PASS: u32 = 2;
const DROP: u32 = 1;
const PORT: u16 = 8080;
const UDP_PORT: u16 = 8443;
const TCP: u8 = 6;
const UDP: u8 = 17;

struct Fixture {
    what: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    counter: Counter,
}

fn fx(what: &'static str, frame: Vec<u8>, verdict: u32, counter: Counter) -> Fixture {
    Fixture {
        what,
        frame,
        verdict,
        counter,
    }
}

const CLIENT: &str = "192.0.2.10";
const BLOCKED: &str = "203.0.113.7";
const EXPIRED: &str = "198.51.100.9";
const ALLOWED: &str = "10.1.2.3";
const BLOCKED_ALLOWED: &str = "10.9.9.9";
const GW: &str = "192.0.2.1";
const CLIENT6: &str = "2001:db8::10";
const BLOCKED6: &str = "2001:db8::bad";
const GW6: &str = "2001:db8::1";

fn syn4(src: &str, port: u16) -> Vec<u8> {
    Frame::new()
        .ipv4(v4(src), v4(GW), TCP, &[], 0)
        .tcp(40000, port, SYN)
        .finish()
}

fn ack4(src: &str) -> Vec<u8> {
    Frame::new()
        .ipv4(v4(src), v4(GW), TCP, &[], 0)
        .tcp(40000, PORT, ACK)
        .payload(b"GET / HTTP/1.1\r\n")
        .finish()
}

fn syn6(src: &str, ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    Frame::new()
        .ipv6(v6(src), v6(GW6), TCP, ext)
        .tcp(40000, PORT, SYN)
        .finish()
}

/// A program with ports 8080/tcp and 8443/udp, 10.0.0.0/8 and fd00::/8
/// allowlisted, two blocked sources and one expired block.
fn program(config: XdpConfig) -> Loaded {
    let mut k = Loaded::load(Sizes {
        blocked: 1024,
        tracked_sources: 1024,
        allow: 64,
    })
    .expect("load the XDP program (run as root: CI does)");
    k.set_ports(&[(TCP, PORT), (UDP, UDP_PORT)]).unwrap();
    k.set_config(config).unwrap();
    k.allow("10.0.0.0/8".parse().unwrap()).unwrap();
    k.allow("fd00::/8".parse().unwrap()).unwrap();
    let forever = BlockEntry {
        expires_ns: u64::MAX,
        reason: BlockReason::Manual as u32,
        _pad: 0,
    };
    k.block(BLOCKED.parse().unwrap(), forever).unwrap();
    k.block(
        BLOCKED6.parse().unwrap(),
        BlockEntry {
            reason: BlockReason::RateLimit as u32,
            ..forever
        },
    )
    .unwrap();
    // Blocked, then allowlisted (a reload can add a CIDR over a block).
    k.block(BLOCKED_ALLOWED.parse().unwrap(), forever).unwrap();
    // Expired a long time ago (1 ns after boot).
    k.block(
        EXPIRED.parse().unwrap(),
        BlockEntry {
            expires_ns: 1,
            ..forever
        },
    )
    .unwrap();
    k
}

fn enforce() -> XdpConfig {
    XdpConfig {
        mode: MODE_ENFORCE,
        ..Default::default()
    }
}

fn run(k: &mut Loaded, fixtures: Vec<Fixture>) {
    for f in fixtures {
        let before = k.counters();
        let verdict = k
            .test_run(&f.frame)
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", f.what));
        let after = k.counters();
        assert_eq!(
            verdict, f.verdict,
            "{}: verdict (1 = drop, 2 = pass)",
            f.what
        );
        for c in Counter::ALL {
            let delta = after[c as usize] - before[c as usize];
            let want = (c == f.counter) as u64;
            assert_eq!(
                delta, want,
                "{}: counter {:?} moved by {delta}, expected {want}",
                f.what, c
            );
        }
    }
}

#[test]
fn parsing_and_blocklist_fixtures() {
    let mut k = program(enforce());
    let mut opts = vec![1u8; 8]; // 8 bytes of NOP options
    opts[7] = 0; // end of options
    run(
        &mut k,
        vec![
            fx(
                "IPv4 SYN to the gateway port from an unknown client",
                syn4(CLIENT, PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "IPv4 data segment from an unknown client",
                ack4(CLIENT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "IPv4 SYN from a blocked client",
                syn4(BLOCKED, PORT),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IPv4 data from a blocked client (established flows die too)",
                ack4(BLOCKED),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "blocked client, other port: not ours",
                syn4(BLOCKED, 22),
                PASS,
                Counter::PassOtherPort,
            ),
            fx(
                "expired block: passed and counted",
                syn4(EXPIRED, PORT),
                PASS,
                Counter::PassExpiredBlock,
            ),
            fx(
                "allowlisted source, nothing against it: plain pass",
                syn4(ALLOWED, PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "blocked but allowlisted: the allowlist wins",
                syn4(BLOCKED_ALLOWED, PORT),
                PASS,
                Counter::PassAllowlisted,
            ),
            fx(
                "IPv4 with 8 bytes of options, blocked",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &opts, 0)
                    .tcp(1, PORT, SYN)
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "802.1Q VLAN, blocked",
                Frame::new()
                    .vlan(packet::ETH_P_8021Q, 100)
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0)
                    .tcp(1, PORT, SYN)
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "QinQ (802.1ad + 802.1Q), blocked",
                Frame::new()
                    .vlan(packet::ETH_P_8021AD, 10)
                    .vlan(packet::ETH_P_8021Q, 100)
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0)
                    .tcp(1, PORT, SYN)
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "three VLAN tags: not walked, passed",
                Frame::new()
                    .vlan(packet::ETH_P_8021AD, 10)
                    .vlan(packet::ETH_P_8021Q, 100)
                    .vlan(packet::ETH_P_8021Q, 200)
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0)
                    .tcp(1, PORT, SYN)
                    .finish(),
                PASS,
                Counter::PassOtherProtocol,
            ),
            fx(
                "first IPv4 fragment (MF, offset 0) of a blocked client: has ports, dropped",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0x2000)
                    .tcp(1, PORT, ACK)
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "later IPv4 fragment: no ports, passed",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0x0010)
                    .payload(&[0u8; 32])
                    .finish(),
                PASS,
                Counter::PassFragment,
            ),
            fx(
                "ARP",
                Frame::new().raw(packet::ETH_P_ARP, &[0u8; 28]).finish(),
                PASS,
                Counter::PassNotIp,
            ),
            fx(
                "ICMP from a blocked client: not TCP/UDP",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), 1, &[], 0)
                    .payload(&[8, 0, 0, 0, 0, 0, 0, 0])
                    .finish(),
                PASS,
                Counter::PassOtherProtocol,
            ),
            fx(
                "UDP to the gateway's UDP port from a blocked client",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), UDP, &[], 0)
                    .udp(5000, UDP_PORT, b"quic?")
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "UDP to 8080 (only TCP is ours there)",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), UDP, &[], 0)
                    .udp(5000, PORT, b"x")
                    .finish(),
                PASS,
                Counter::PassOtherPort,
            ),
            fx(
                "truncated: IPv4 header cut at 10 bytes",
                Frame::new()
                    .raw(packet::ETH_P_IP, &[0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6])
                    .finish(),
                PASS,
                Counter::PassMalformed,
            ),
            fx(
                "truncated: IHL says 60 bytes of header, frame has 24",
                Frame::new()
                    .raw(packet::ETH_P_IP, &{
                        let mut h = syn4(BLOCKED, PORT)[14..38].to_vec();
                        h[0] = 0x4f;
                        h
                    })
                    .finish(),
                PASS,
                Counter::PassMalformed,
            ),
            fx(
                "truncated TCP header from an unknown source: passed",
                syn4(CLIENT, PORT)[..14 + 20 + 4].to_vec(),
                PASS,
                Counter::PassMalformed,
            ),
            fx(
                "truncated TCP header from a blocked source: no ports, still dropped",
                syn4(BLOCKED, PORT)[..14 + 20 + 4].to_vec(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "tiny first fragment (8 bytes of TCP) from a blocked source: dropped, so no SYN reassembles",
                Frame::new()
                    .ipv4(v4(BLOCKED), v4(GW), TCP, &[], 0x2000)
                    .payload(&syn4(BLOCKED, PORT)[34..42])
                    .finish(),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IHL below 5 is not IPv4",
                Frame::new()
                    .raw(packet::ETH_P_IP, &{
                        let mut h = syn4(BLOCKED, PORT)[14..].to_vec();
                        h[0] = 0x44;
                        h
                    })
                    .finish(),
                PASS,
                Counter::PassMalformed,
            ),
            fx(
                "IPv6 SYN from an unknown client",
                syn6(CLIENT6, &[]),
                PASS,
                Counter::Pass,
            ),
            fx(
                "IPv6 SYN from a blocked client",
                syn6(BLOCKED6, &[]),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IPv6 hop-by-hop + destination options, blocked",
                syn6(BLOCKED6, &[(0, ext_header(0)), (60, ext_header(1))]),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IPv6 first fragment (offset 0), blocked",
                syn6(BLOCKED6, &[(44, frag_header(0, true))]),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IPv6 later fragment: no ports",
                Frame::new()
                    .ipv6(v6(BLOCKED6), v6(GW6), TCP, &[(44, frag_header(10, false))])
                    .payload(&[0u8; 24])
                    .finish(),
                PASS,
                Counter::PassFragment,
            ),
            fx(
                "IPv6 with five extension headers from a blocked source: no ports, still dropped",
                syn6(
                    BLOCKED6,
                    &[
                        (0, ext_header(0)),
                        (60, ext_header(0)),
                        (43, ext_header(0)),
                        (60, ext_header(0)),
                        (60, ext_header(0)),
                    ],
                ),
                DROP,
                Counter::DropBlocked,
            ),
            fx(
                "IPv6 from fd00::/8 (allowlisted), not blocked",
                syn6("fd00::5", &[]),
                PASS,
                Counter::Pass,
            ),
            fx(
                "IPv6 header truncated",
                syn6(BLOCKED6, &[])[..14 + 30].to_vec(),
                PASS,
                Counter::PassMalformed,
            ),
            fx(
                "IPv4-mapped source inside an IPv6 header is an IPv6 packet, not the IPv4 client",
                syn6("::ffff:203.0.113.7", &[]),
                DROP,
                Counter::DropBlocked,
            ),
        ],
    );
    // Drops per block reason: the ten IPv4 (and IPv4-mapped) drops above
    // hit the manual block, the four IPv6 ones the rate-limit block.
    let drops = k.block_drops();
    assert_eq!(
        drops[BlockReason::Manual as usize],
        10,
        "manual-block drops: {drops:?}"
    );
    assert_eq!(
        drops[BlockReason::RateLimit as usize],
        4,
        "rate-limit-block drops: {drops:?}"
    );
    assert_eq!(
        drops[BlockReason::Config as usize],
        0,
        "config-block drops: {drops:?}"
    );
}

#[test]
fn syn_quota_drops_over_burst_and_spares_data_and_others() {
    // 1 SYN/s sustained, burst 3: within one test (well under a second) the
    // 4th SYN from one source is over quota.
    let mut k = program(XdpConfig {
        mode: MODE_ENFORCE,
        syn_interval_ns: 1_000_000_000,
        syn_tolerance_ns: 2_000_000_000,
        ..Default::default()
    });
    let src = "192.0.2.50";
    run(
        &mut k,
        vec![
            fx("SYN 1 of burst 3", syn4(src, PORT), PASS, Counter::Pass),
            fx("SYN 2 of burst 3", syn4(src, PORT), PASS, Counter::Pass),
            fx("SYN 3 of burst 3", syn4(src, PORT), PASS, Counter::Pass),
            fx(
                "SYN 4: over quota",
                syn4(src, PORT),
                DROP,
                Counter::DropSynQuota,
            ),
            fx(
                "SYN 5: still over",
                syn4(src, PORT),
                DROP,
                Counter::DropSynQuota,
            ),
            fx(
                "data on an established connection is not a new connection",
                ack4(src),
                PASS,
                Counter::Pass,
            ),
            fx(
                "another source has its own bucket",
                syn4("192.0.2.51", PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "allowlisted SYN 1",
                syn4(ALLOWED, PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "allowlisted SYN 2",
                syn4(ALLOWED, PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "allowlisted SYN 3",
                syn4(ALLOWED, PORT),
                PASS,
                Counter::Pass,
            ),
            fx(
                "allowlisted SYN 4: over quota, passed as allowlisted",
                syn4(ALLOWED, PORT),
                PASS,
                Counter::PassAllowlisted,
            ),
            fx(
                "other ports have no quota",
                syn4(src, 22),
                PASS,
                Counter::PassOtherPort,
            ),
        ],
    );
}

#[test]
fn packet_quota() {
    let mut k = program(XdpConfig {
        mode: MODE_ENFORCE,
        pkt_interval_ns: 1_000_000_000,
        pkt_tolerance_ns: 1_000_000_000,
        ..Default::default()
    });
    let src = "192.0.2.60";
    run(
        &mut k,
        vec![
            fx("packet 1 of burst 2", ack4(src), PASS, Counter::Pass),
            fx("packet 2 of burst 2", ack4(src), PASS, Counter::Pass),
            fx(
                "packet 3: over the packet quota",
                ack4(src),
                DROP,
                Counter::DropPacketQuota,
            ),
        ],
    );
}

#[test]
fn monitor_mode_counts_but_drops_nothing() {
    let mut k = program(XdpConfig {
        mode: MODE_MONITOR,
        syn_interval_ns: 1_000_000_000,
        syn_tolerance_ns: 0,
        ..Default::default()
    });
    let src = "192.0.2.70";
    run(
        &mut k,
        vec![
            fx(
                "blocked, monitor: would drop",
                syn4(BLOCKED, PORT),
                PASS,
                Counter::MonitorBlocked,
            ),
            fx("SYN 1 of burst 1", syn4(src, PORT), PASS, Counter::Pass),
            fx(
                "SYN 2, monitor: would drop",
                syn4(src, PORT),
                PASS,
                Counter::MonitorSynQuota,
            ),
        ],
    );
    // Switching to enforce at run time takes effect on the next packet.
    k.set_config(XdpConfig {
        mode: MODE_ENFORCE,
        ..Default::default()
    })
    .unwrap();
    run(
        &mut k,
        vec![fx(
            "blocked, enforce",
            syn4(BLOCKED, PORT),
            DROP,
            Counter::DropBlocked,
        )],
    );
}

#[test]
fn unblock_takes_effect_on_the_next_packet() {
    let mut k = program(enforce());
    run(
        &mut k,
        vec![fx(
            "blocked",
            syn4(BLOCKED, PORT),
            DROP,
            Counter::DropBlocked,
        )],
    );
    k.unblock(BLOCKED.parse().unwrap()).unwrap();
    run(
        &mut k,
        vec![fx("unblocked", syn4(BLOCKED, PORT), PASS, Counter::Pass)],
    );
    // Removing an absent entry is not an error.
    k.unblock(BLOCKED.parse().unwrap()).unwrap();
}

#[test]
fn unconfigured_program_passes_everything() {
    // Before userspace writes the config (mode 0), nothing is dropped.
    let mut k = program(XdpConfig::default());
    run(
        &mut k,
        vec![fx(
            "blocked, no mode set",
            syn4(BLOCKED, PORT),
            PASS,
            Counter::MonitorBlocked,
        )],
    );
}

/// Collects the watch stream's records, as `gateway::xdp::watch::Sink` does.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0.lock().unwrap().push(r.args().to_string());
    }
    fn flush(&self) {}
}

/// The watch stream: off, nothing is written; on, drops are written as
/// `gateway::xdp::watch::Event` reads them, up to the per-CPU cap a second
/// and the rest counted as suppressed; passes only when asked for.
#[test]
fn watch_samples_verdicts_within_the_cap() {
    use gateway::xdp::watch::Event;
    let mut k = program(enforce());
    let records = Records::default();
    let mut reader = k.watch_reader(records.clone()).unwrap();
    let frame = syn4(BLOCKED, PORT);
    let take = |reader: &mut aya_log::EbpfLogger<Records>| {
        reader.flush();
        std::mem::take(&mut *records.0.lock().unwrap())
    };

    // Off (the default): nothing written, nothing suppressed.
    assert_eq!(k.test_run_repeat(&frame, 50).unwrap().0, DROP);
    assert!(take(&mut reader).is_empty());
    assert_eq!(k.watch_suppressed(), 0);

    // On, drops only, 5 a second per CPU: a repeated run stays on one CPU.
    k.set_config(XdpConfig {
        watch_one_in: 1,
        watch_what: WATCH_DROPS,
        watch_max_per_sec: 5,
        ..enforce()
    })
    .unwrap();
    assert_eq!(k.test_run_repeat(&frame, 50).unwrap().0, DROP);
    let got = take(&mut reader);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(k.watch_suppressed(), 45);
    let e =
        Event::parse(&got[0], std::time::SystemTime::now()).unwrap_or_else(|| panic!("{}", got[0]));
    assert_eq!(e.counter, Counter::DropBlocked);
    assert_eq!(e.block, Some(BlockReason::Manual));
    assert_eq!((e.proto, e.port), (TCP, PORT));
    assert_eq!(e.src, BLOCKED.parse::<std::net::IpAddr>().unwrap());

    // A pass is not a drop: not sampled unless asked for.
    let suppressed = k.watch_suppressed();
    assert_eq!(k.test_run(&syn4(CLIENT, PORT)).unwrap(), PASS);
    assert!(take(&mut reader).is_empty());
    assert_eq!(k.watch_suppressed(), suppressed);

    // IPv6 sources are written as IPv6; one in 1,000,000 samples ~nothing.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(k.test_run(&syn6(BLOCKED6, &[])).unwrap(), DROP);
    let got = take(&mut reader);
    let e = Event::parse(&got[0], std::time::SystemTime::now()).unwrap();
    assert_eq!(e.src, BLOCKED6.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(e.block, Some(BlockReason::RateLimit));
    k.set_config(XdpConfig {
        watch_one_in: 1_000_000,
        watch_what: WATCH_DROPS,
        watch_max_per_sec: 1000,
        ..enforce()
    })
    .unwrap();
    assert_eq!(k.test_run_repeat(&frame, 200).unwrap().0, DROP);
    assert!(take(&mut reader).len() <= 2);
}
