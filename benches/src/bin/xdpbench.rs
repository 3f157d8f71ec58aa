//! `cargo xtask bench xdp`: a flood of TCP SYNs from one network namespace to
//! the gateway's, dropped (a) by the gateway's XDP program, (b) by an
//! equivalent nftables rule (netdev ingress hook, the earliest nftables can
//! act; and inet prerouting at raw priority, the usual placement), (c) by the gateway's userspace fallback (the kernel TCP stack takes
//! every SYN; the gateway closes what completes at accept). For each: packets
//! per second dropped, softirq CPU ns per flood packet, and the goodput a
//! legitimate client keeps during the flood against its no-flood goodput.
//!
//! Frames are sent the way a NIC driver delivers them: `BPF_PROG_TEST_RUN`
//! with `BPF_F_TEST_XDP_LIVE_FRAMES` on a redirect program, into the client
//! veth, so they arrive at the gateway's veth as xdp_frames, not as skbs a
//! socket sender would have built (which veth copies before XDP runs, hiding
//! XDP's advantage). Arms (b) and (c) attach a pass-everything XDP program
//! to the gateway's veth so the path into the stack is the same.
//!
//! Subcommands (the orchestrator runs the first two inside namespaces):
//!   xdpbench flood IFACE DST_MAC SRC_IP DST_IP PORT PPS SECONDS
//!   xdpbench pass IFACE             (attach gateway_pass until stdin closes)
//!   xdpbench run [--pps N] [--seconds S] [--out DIR]
//!
//! Per arm: goodput without a flood; then the flood alone at full speed
//! (one core) for CPU per packet; then goodput while the generator runs at
//! `--pps` (default 300k SYN/s) with its frames discarded at the sender, and
//! while they are delivered. "kept" = delivered ÷ discarded: what the drop
//! path costs the legitimate client, with the rig's own sending cost (which
//! a NIC doesn't have) on both sides; "kept/idle" divides by no generator.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aya::programs::XdpMode;
use gateway::xdp::kernel::{Loaded, Sizes};
use gateway_tests::netns::{metric, NetPair};
use gateway_tests::packet::{v4, Frame, SYN};

const PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:9901";
const ATTACKER: &str = "10.201.90.66";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("flood") => flood(&args[1..]),
        Some("pass") => pass(&args[1..]),
        Some("run") => run(&args[1..]),
        Some("prog") => prog().map(|rows| {
            for (what, ns) in rows {
                println!("{ns:>6} ns  {what}");
            }
        }),
        _ => Err(
            "usage: xdpbench run [--pps N] [--seconds S] [--out DIR] (flood|pass are internal)"
                .into(),
        ),
    };
    if let Err(e) = r {
        eprintln!("xdpbench: {e}");
        std::process::exit(1);
    }
}

type Result<T = ()> = std::result::Result<T, String>;

fn sizes() -> Sizes {
    Sizes {
        blocked: 1024,
        tracked_sources: 1024,
        allow: 16,
    }
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(format!("no interface {name} in this namespace"));
    }
    Ok(i)
}

/// Send SYNs out of IFACE at PPS for SECONDS; print the count sent.
fn flood(a: &[String]) -> Result {
    let [iface, mac, src, dst, port, pps, secs, deliver] = a else {
        return Err("flood IFACE DST_MAC SRC_IP DST_IP PORT PPS SECONDS deliver|discard".into());
    };
    let mac: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or(0))
        .collect();
    let mac: [u8; 6] = mac.try_into().map_err(|_| "bad MAC")?;
    let frame = Frame::new()
        .macs([0x02, 0, 0, 0, 0, 0x66], mac)
        .ipv4(v4(src), v4(dst), 6, &[], 0)
        .tcp(40000, port.parse().map_err(|_| "port")?, SYN)
        .finish_with_tcp_checksum();
    let pps: u64 = pps.parse().map_err(|_| "pps")?;
    let secs: f64 = secs.parse().map_err(|_| "seconds")?;
    let mut k = Loaded::load(sizes()).map_err(|e| e.to_string())?;
    let idx = ifindex(iface)?;
    // "discard": the generator drops every frame it makes (target 0): the
    // sender's CPU cost without the flood, for the goodput baseline.
    let target = if deliver == "deliver" { idx } else { 0 };
    k.set_traffic_target(target).map_err(|e| e.to_string())?;
    // Batches of 256 paced to the rate: the sender's CPU stays bounded, so the
    // legitimate client's goodput measures the drop path, not a starved core.
    // Each live-frames call costs ~20 ms of setup in the kernel: big batches,
    // paced, so a modest rate is a steady stream of bursts ≤ 100 ms apart.
    let batch: u32 = (pps / 10).clamp(1024, 65536) as u32;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut sent: u64 = 0;
    while Instant::now() < end {
        k.send_live_frames(&frame, batch, idx)
            .map_err(|e| format!("live frames: {e}"))?;
        sent += batch as u64;
        let due = start + Duration::from_secs_f64(sent as f64 / pps as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    println!("{sent} {:.3}", start.elapsed().as_secs_f64());
    Ok(())
}

/// The front-door program alone, configured as in the `xdp` arm, timed by
/// the kernel over 2M runs per frame (`BPF_PROG_TEST_RUN`, repeat): ns per
/// packet for each kind of packet, without the NIC path around it.
fn prog() -> Result<Vec<(&'static str, u32)>> {
    use gateway_common::{BlockEntry, BlockReason};
    let mut k = Loaded::load(sizes()).map_err(|e| e.to_string())?;
    k.set_ports(&[(6, PORT)]).map_err(|e| e.to_string())?;
    let settings = gateway::config::XdpSettings::default();
    k.set_config(gateway::xdp::kernel_config(&settings))
        .map_err(|e| e.to_string())?;
    for c in ["192.168.0.0/16", "fd00::/8"] {
        k.allow(c.parse().map_err(|e: String| e)?)
            .map_err(|e| e.to_string())?;
    }
    let entry = BlockEntry {
        expires_ns: u64::MAX,
        reason: BlockReason::Manual as u32,
        _pad: 0,
    };
    k.block(ATTACKER.parse().unwrap(), entry)
        .map_err(|e| e.to_string())?;
    k.block("2001:db8::66".parse().unwrap(), entry)
        .map_err(|e| e.to_string())?;
    let syn = |src: &str| {
        Frame::new()
            .ipv4(v4(src), v4("10.201.90.1"), 6, &[], 0)
            .tcp(40000, PORT, SYN)
            .finish()
    };
    let frames: Vec<(&'static str, Vec<u8>)> = vec![
        ("IPv4 SYN, blocked source (drop)", syn(ATTACKER)),
        (
            "IPv4 SYN, unknown source (SYN quota checked, pass)",
            syn("10.201.90.2"),
        ),
        (
            "IPv4 ACK, unknown source (pass)",
            Frame::new()
                .ipv4(v4("10.201.90.2"), v4("10.201.90.1"), 6, &[], 0)
                .tcp(40000, PORT, gateway_tests::packet::ACK)
                .finish(),
        ),
        (
            "IPv4 SYN, other port (pass)",
            Frame::new()
                .ipv4(v4(ATTACKER), v4("10.201.90.1"), 6, &[], 0)
                .tcp(40000, 22, SYN)
                .finish(),
        ),
        (
            "IPv6 SYN, blocked source (drop)",
            Frame::new()
                .ipv6(
                    gateway_tests::packet::v6("2001:db8::66"),
                    gateway_tests::packet::v6("2001:db8::1"),
                    6,
                    &[],
                )
                .tcp(40000, PORT, SYN)
                .finish(),
        ),
    ];
    let mut rows = Vec::new();
    for (what, f) in frames {
        let (_, ns) = k
            .test_run_repeat(&f, 2_000_000)
            .map_err(|e| format!("test run: {e}"))?;
        rows.push((what, ns));
    }
    Ok(rows)
}

/// Attach a bench program (gateway_pass or gateway_drop) to IFACE until stdin closes.
fn pass(a: &[String]) -> Result {
    let [iface, program] = a else {
        return Err("pass IFACE PROGRAM".into());
    };
    let mut k = Loaded::load(sizes()).map_err(|e| e.to_string())?;
    k.attach_program(program, iface, XdpMode::Driver)
        .map_err(|e| e.to_string())?;
    println!("attached");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_bin(var: &str, name: &str) -> PathBuf {
    gateway_tests::gateway::bin(var, name)
}

/// Summed softirq jiffies of every CPU (/proc/stat, USER_HZ).
fn softirq_jiffies() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or("");
    // cpu user nice system idle iowait irq softirq
    cpu.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

#[derive(Debug, Clone, Copy)]
enum Arm {
    /// An XDP program that drops everything and does nothing else: the floor.
    Floor,
    Xdp,
    /// netdev ingress hook: the earliest (cheapest) place nftables can drop.
    Nftables,
    /// inet prerouting at raw priority (before conntrack).
    NftablesPrerouting,
    /// inet filter input, priority 0: where most hosts keep their rules.
    NftablesInput,
    Userspace,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Floor => "xdp-floor",
            Arm::Xdp => "xdp",
            Arm::Nftables => "nft-ingress",
            Arm::NftablesPrerouting => "nft-prerouting",
            Arm::NftablesInput => "nft-input",
            Arm::Userspace => "userspace",
        }
    }
}

struct ArmResult {
    arm: Arm,
    sent: u64,
    flood_secs: f64,
    dropped: u64,
    softirq_ns_per_packet: f64,
    goodput_base: f64,
    /// Goodput while the generator runs with its frames discarded.
    goodput_sender_only: f64,
    goodput_flood: f64,
    /// The front-door program's own run time per packet (kernel BPF stats).
    program_ns: Option<f64>,
}

fn wrk(net: &NetPair, secs: u32) -> Result<f64> {
    let url = format!("http://{}:{PORT}/v1/models", net.gw_ip);
    let out = NetPair::cmd(&net.cl, "wrk")
        .args(["-t1", "-c16", &format!("-d{secs}s"), &url])
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Requests/sec:")
                .map(|v| v.trim().parse::<f64>().ok())
        })
        .flatten()
        .ok_or_else(|| format!("no Requests/sec in wrk output: {text}"))
}

fn gw_mac(net: &NetPair) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", &net.gw, "-j", "link", "show", "dev", &net.gw_if])
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    v[0]["address"]
        .as_str()
        .map(String::from)
        .ok_or("no MAC".into())
}

fn start_gateway(net: &NetPair, dir: &std::path::Path, xdp: bool) -> Result<Proc> {
    let iface = if xdp {
        format!("\"{}\"", net.gw_if)
    } else {
        String::new()
    };
    let cfg = format!(
        "[server]\nlisten = [\"{}:{PORT}\"]\nworkers = 1\n[admin]\nlisten = \"{ADMIN}\"\n[log]\naccess_log = false\nlevel = \"warn\"\n\
         [clusters.demo]\nbackends = [\"127.0.0.1:8000\"]\n[[routes]]\npath_prefix = \"/\"\ncluster = \"demo\"\n\
         [xdp]\ninterfaces = [{iface}]\nallow = [\"192.168.0.0/16\", \"fd00::/8\"]\n",
        net.gw_ip
    );
    let path = dir.join(format!("gateway-{xdp}.toml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let child = NetPair::cmd(&net.gw, env_bin("GATEWAY_BIN", "gateway"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("gateway: {e}"))?;
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !net
        .curl_gw(&format!("http://{ADMIN}/readyz"))
        .contains("ready")
    {
        if Instant::now() > deadline {
            return Err("gateway not ready".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(p)
}

fn block(net: &NetPair, addr: &str) -> Result {
    let out = NetPair::cmd(&net.gw, env_bin("GATEWAY_BIN", "gateway"))
        .args(["xdp", "block", addr, "--ttl", "1h"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("block: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn run_arm(
    net: &NetPair,
    arm: Arm,
    pps: u64,
    secs: u32,
    dir: &std::path::Path,
) -> Result<ArmResult> {
    let self_bin = std::env::current_exe().map_err(|e| e.to_string())?;
    let _gateway = start_gateway(net, dir, matches!(arm, Arm::Xdp))?;
    let mut _pass = None;
    match arm {
        Arm::Xdp => block(net, ATTACKER)?,
        Arm::Floor => {}
        Arm::Userspace => {
            block(net, ATTACKER)?;
        }
        Arm::Nftables | Arm::NftablesPrerouting | Arm::NftablesInput => {
            let rules = if matches!(arm, Arm::Nftables) {
                format!(
                    "table netdev xdpbench {{\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority -500; policy accept;\n    ip saddr {ATTACKER} counter drop\n  }}\n}}\n",
                    net.gw_if
                )
            } else if matches!(arm, Arm::NftablesPrerouting) {
                format!(
                    "table inet xdpbench {{\n  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;\n    ip saddr {ATTACKER} counter drop\n  }}\n}}\n"
                )
            } else {
                format!(
                    "table inet xdpbench {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {ATTACKER} counter drop\n  }}\n}}\n"
                )
            };
            let file = dir.join("xdpbench.nft");
            std::fs::write(&file, rules).map_err(|e| e.to_string())?;
            let out = Command::new("ip")
                .args(["netns", "exec", &net.gw, "nft", "-f"])
                .arg(&file)
                .output()
                .map_err(|e| format!("nft: {e}"))?;
            if !out.status.success() {
                return Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
    }
    if !matches!(arm, Arm::Xdp) {
        // The same xdp_frame → skb path into the stack as with a NIC driver
        // (or, for the floor, a bare drop).
        let program = if matches!(arm, Arm::Floor) {
            "gateway_drop"
        } else {
            "gateway_pass"
        };
        let mut child = NetPair::cmd(&net.gw, &self_bin)
            .args(["pass", &net.gw_if, program])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if !line.contains("attached") {
            return Err("pass program did not attach".into());
        }
        _pass = Some(Proc(child));
    }
    // The floor arm drops everything, the client's packets too: no goodput.
    let floor = matches!(arm, Arm::Floor);
    let goodput_base = if floor { f64::NAN } else { wrk(net, secs)? };
    let mac = gw_mac(net)?;
    let flood_to = |rate: u64, for_secs: u32, deliver: &str| -> Result<(u64, f64, Child)> {
        let child = NetPair::cmd(&net.cl, &self_bin)
            .args([
                "flood",
                &net.cl_if,
                &mac,
                ATTACKER,
                &net.gw_ip,
                &PORT.to_string(),
                &rate.to_string(),
                &for_secs.to_string(),
                deliver,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        Ok((0, 0.0, child))
    };
    let flood = |rate: u64, for_secs: u32| flood_to(rate, for_secs, "deliver");
    let finish = |child: Child| -> Result<(u64, f64)> {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        let sent: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(format!("flood output: {text}"))?;
        Ok((sent, it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0)))
    };

    // CPU per packet: the flood alone, as fast as one core sends it; the
    // idle softirq rate over the same time is subtracted.
    let idle0 = softirq_jiffies();
    std::thread::sleep(Duration::from_secs(2));
    let idle_per_s = (softirq_jiffies() - idle0) as f64 / 2.0;
    let before_metrics = net.curl_gw(&format!("http://{ADMIN}/metrics"));
    let soft0 = softirq_jiffies();
    let (_, _, child) = flood(20_000_000, secs)?;
    let (sent, flood_secs) = finish(child)?;
    let soft1 = softirq_jiffies();
    std::thread::sleep(Duration::from_millis(1200));
    let after_metrics = net.curl_gw(&format!("http://{ADMIN}/metrics"));
    let family = if matches!(arm, Arm::Nftables) {
        "netdev"
    } else {
        "inet"
    };
    let nft_counter = || -> u64 {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &net.gw, "nft", "list", "table", family, "xdpbench",
            ])
            .output();
        let t = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        t.split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let dropped = match arm {
        Arm::Xdp => {
            let l = r#"reason="blocked",verdict="drop""#;
            (metric(&after_metrics, "gateway_xdp_packets_total", l)
                - metric(&before_metrics, "gateway_xdp_packets_total", l)) as u64
        }
        Arm::Nftables | Arm::NftablesPrerouting | Arm::NftablesInput => nft_counter(),
        // The stack consumes every SYN; none reaches the gateway.
        Arm::Userspace | Arm::Floor => sent,
    };

    // Goodput with the generator running but its frames discarded at the
    // sender: the baseline that charges the rig's own sending cost (a NIC
    // delivers for free) to both sides of the comparison.
    let goodput_sender_only = if floor {
        f64::NAN
    } else {
        let (_, _, child) = flood_to(pps, secs + 1, "discard")?;
        std::thread::sleep(Duration::from_millis(500));
        let g = wrk(net, secs)?;
        finish(child)?;
        g
    };

    // Goodput under a paced flood; for the XDP arm, the program's own run
    // time from the kernel's BPF stats (on only for this phase: they cost
    // two clock reads per run).
    let stats = matches!(arm, Arm::Xdp).then(BpfStats::on);
    let before = stats.as_ref().map(|_| program_stats("gateway_xdp"));
    let (_, _, child) = flood(pps, secs + 1)?;
    std::thread::sleep(Duration::from_millis(500));
    let goodput_flood = if floor { f64::NAN } else { wrk(net, secs)? };
    finish(child)?;
    let program_ns = before.map(|(t0, n0)| {
        let (t1, n1) = program_stats("gateway_xdp");
        (t1 - t0) as f64 / (n1 - n0).max(1) as f64
    });
    drop(stats);
    if matches!(
        arm,
        Arm::Nftables | Arm::NftablesPrerouting | Arm::NftablesInput
    ) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &net.gw, "nft", "delete", "table", family, "xdpbench",
            ])
            .status();
    }
    let busy = ((soft1 - soft0) as f64 - idle_per_s * flood_secs).max(0.0);
    let softirq_ns_per_packet = busy / user_hz() * 1e9 / sent.max(1) as f64;
    Ok(ArmResult {
        arm,
        sent,
        flood_secs,
        dropped,
        softirq_ns_per_packet,
        goodput_base,
        goodput_sender_only,
        goodput_flood,
        program_ns,
    })
}

/// `kernel.bpf_stats_enabled` on while this lives.
struct BpfStats;
impl BpfStats {
    fn on() -> BpfStats {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        BpfStats
    }
}
impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
}

/// Summed (run_time_ns, run_cnt) of every loaded program named `name` (bpftool).
fn program_stats(name: &str) -> (u64, u64) {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output();
    let Ok(out) = out else { return (0, 0) };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == name)
        .fold((0, 0), |(t, n), p| {
            (
                t + p["run_time_ns"].as_u64().unwrap_or(0),
                n + p["run_cnt"].as_u64().unwrap_or(0),
            )
        })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run(a: &[String]) -> Result {
    let mut pps: u64 = 300_000;
    let mut secs: u32 = 4;
    let mut rounds: u32 = 3;
    let mut out = PathBuf::from("target/bench");
    let mut it = a.iter();
    while let Some(x) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{x} needs a value"));
        match x.as_str() {
            "--pps" => pps = val()?.parse().map_err(|_| "--pps N")?,
            "--seconds" => secs = val()?.parse().map_err(|_| "--seconds S")?,
            "--rounds" => rounds = val()?.parse().map_err(|_| "--rounds N")?,
            "--out" => out = PathBuf::from(val()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    secs = secs.clamp(1, 60);
    rounds = rounds.clamp(1, 20);
    pps = pps.clamp(1000, 20_000_000);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let net = NetPair::new("x", 90, 1);
    let _backend = Proc(
        NetPair::cmd(&net.gw, env_bin("DEMO_BACKEND_BIN", "demo-backend"))
            .args(["--listen", "127.0.0.1:8000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let arms = [
        Arm::Floor,
        Arm::Xdp,
        Arm::Nftables,
        Arm::NftablesPrerouting,
        Arm::NftablesInput,
        Arm::Userspace,
    ];
    let mut results: Vec<ArmResult> = Vec::new();
    for round in 1..=rounds {
        // Arms interleaved per round: drift on this noisy machine hits all alike.
        for arm in arms {
            eprintln!(
                "xdpbench: round {round}/{rounds} arm {} (full-speed flood, then {pps} SYN/s with a client, {secs}s each) ...",
                arm.name()
            );
            results.push(run_arm(&net, arm, pps, secs, &out)?);
        }
    }
    println!(
        "{:<15} {:>11} {:>14} {:>11} {:>10} {:>11} {:>10} {:>8} {:>9}",
        "arm (median)",
        "flood pps",
        "softirq ns/pkt",
        "program ns",
        "rps idle",
        "rps sender",
        "rps flood",
        "kept",
        "kept/idle"
    );
    let mut json = Vec::new();
    let mut cpu = std::collections::HashMap::new();
    for arm in arms {
        let rs: Vec<&ArmResult> = results
            .iter()
            .filter(|r| r.arm.name() == arm.name())
            .collect();
        let m = |f: &dyn Fn(&ArmResult) -> f64| median(rs.iter().map(|r| f(r)).collect());
        let pps_real = m(&|r| r.sent as f64 / r.flood_secs);
        let ns = m(&|r| r.softirq_ns_per_packet);
        let prog = m(&|r| r.program_ns.unwrap_or(f64::NAN));
        let base = m(&|r| r.goodput_base);
        let flood = m(&|r| r.goodput_flood);
        let kept = m(&|r| r.goodput_flood / r.goodput_sender_only);
        let kept_raw = m(&|r| r.goodput_flood / r.goodput_base);
        let sender = m(&|r| r.goodput_sender_only);
        cpu.insert(arm.name(), ns);
        let opt = |v: f64, w: usize, p: usize| {
            if v.is_nan() {
                format!("{:>w$}", "-")
            } else {
                format!("{v:>w$.p$}")
            }
        };
        let pct = |v: f64, w: usize| {
            if v.is_nan() {
                format!("{:>w$}", "-")
            } else {
                format!("{:>w$.1}%", v * 100.0, w = w - 1)
            }
        };
        println!(
            "{:<15} {:>11.0} {:>14.1} {} {} {} {} {} {}",
            arm.name(),
            pps_real,
            ns,
            opt(prog, 11, 1),
            opt(base, 10, 0),
            opt(sender, 11, 0),
            opt(flood, 10, 0),
            pct(kept, 8),
            pct(kept_raw, 9)
        );
        json.push(serde_json::json!({
            "arm": arm.name(),
            "flood_pps": pps_real,
            "softirq_ns_per_packet": ns,
            "program_ns_per_packet": if prog.is_nan() { serde_json::Value::Null } else { serde_json::json!(prog) },
            "goodput_rps_no_flood": if base.is_nan() { serde_json::Value::Null } else { serde_json::json!(base) },
            "goodput_rps_flood": if flood.is_nan() { serde_json::Value::Null } else { serde_json::json!(flood) },
            "goodput_rps_sender_only": if sender.is_nan() { serde_json::Value::Null } else { serde_json::json!(sender) },
            "goodput_kept": if kept.is_nan() { serde_json::Value::Null } else { serde_json::json!(kept) },
            "goodput_kept_vs_idle": if kept_raw.is_nan() { serde_json::Value::Null } else { serde_json::json!(kept_raw) },
            "rounds": rs.iter().map(|r| serde_json::json!({
                "sent": r.sent, "dropped": r.dropped, "flood_secs": r.flood_secs,
                "softirq_ns_per_packet": r.softirq_ns_per_packet, "program_ns_per_packet": r.program_ns,
                "goodput_rps_no_flood": r.goodput_base, "goodput_rps_sender_only": r.goodput_sender_only,
                "goodput_rps_flood": r.goodput_flood,
            })).collect::<Vec<_>>(),
        }));
    }
    let x = cpu["xdp"];
    let (n, p, i, f) = (
        cpu["nft-ingress"],
        cpu["nft-prerouting"],
        cpu["nft-input"],
        cpu["xdp-floor"],
    );
    println!(
        "xdp ÷ nftables CPU per packet: {:.2} vs netdev ingress, {:.2} vs inet prerouting, {:.2} vs inet input (bar ≤ 0.25); \
         the bare-drop floor of this path is {f:.0} ns ({:.2} of netdev ingress)",
        x / n,
        x / p,
        x / i,
        f / n
    );
    let doc = serde_json::json!({
        "pps": pps, "seconds": secs, "rounds": rounds, "arms": json,
        "xdp_over_nft_ingress_cpu": x / n, "xdp_over_nft_prerouting_cpu": x / p,
        "xdp_over_nft_input_cpu": x / i, "floor_over_nft_ingress_cpu": f / n,
    });
    let path = out.join("xdp.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| e.to_string())?;
    println!("results: {}", path.display());
    Ok(())
}
