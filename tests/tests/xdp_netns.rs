//! End to end at a real (virtual) NIC: the gateway in one network namespace
//! with XDP on its veth, clients in another. A blocked client's packets are
//! dropped at XDP (the gateway never accepts), another client is served,
//! unblocking restores service, TTLs expire, a killed gateway leaves nothing
//! attached, and without XDP the block is enforced at accept.
//! Needs root (CI runs as root), iproute2 and curl.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::gateway::{bin, gateway_bin};
use gateway_tests::netns::{metric, NetPair};

const PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:9901";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The demo backend in the gateway namespace, once it answers (a busy CI
/// host can take a while to start it, and a gateway started before it
/// would answer its first requests with 502).
fn start_backend(net: &NetPair) -> Proc {
    let child = NetPair::cmd(&net.gw, bin("DEMO_BACKEND_BIN", "demo-backend"))
        .args(["--listen", "127.0.0.1:8000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo-backend");
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while net.curl_gw("http://127.0.0.1:8000/v1/models").is_empty() {
        assert!(
            Instant::now() < deadline,
            "demo-backend not up in the namespace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

fn start_gateway(net: &NetPair, xdp_interfaces: &[&str]) -> Proc {
    start_gateway_with(net, xdp_interfaces, "")
}

/// The gateway in the gateway namespace, with `extra` lines in `[xdp]`.
fn start_gateway_with(net: &NetPair, xdp_interfaces: &[&str], extra: &str) -> Proc {
    start_gateway_at(net, xdp_interfaces, extra, ADMIN)
}

/// As `start_gateway_with`, its admin listener on `admin`.
fn start_gateway_at(net: &NetPair, xdp_interfaces: &[&str], extra: &str, admin: &str) -> Proc {
    let ifaces: Vec<String> = xdp_interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    let config = format!(
        r#"
[server]
listen = ["{gw}:{PORT}"]
workers = 1
[admin]
listen = "{admin}"
[log]
access_log = false
[clusters.demo]
backends = ["127.0.0.1:8000"]
[[routes]]
path_prefix = "/"
cluster = "demo"
[xdp]
interfaces = [{ifaces}]
syn_rate = 0
{extra}
"#,
        gw = net.gw_ip,
        ifaces = ifaces.join(", ")
    );
    let mut path = config_path(net, xdp_interfaces.len());
    if admin != ADMIN {
        path.set_file_name(format!("gateway-{}.toml", admin.replace([':', '.'], "-")));
    }
    std::fs::write(&path, config).unwrap();
    let child = NetPair::cmd(&net.gw, gateway_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gateway");
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !net
        .curl_gw(&format!("http://{admin}/readyz"))
        .contains("ready")
    {
        assert!(
            Instant::now() < deadline,
            "gateway not ready in the namespace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// Where a test's gateway config lives (one per namespace and interface count).
fn config_path(net: &NetPair, interfaces: usize) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-xdp-{}-{interfaces}", net.gw));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("gateway.toml")
}

fn xdp_cli(net: &NetPair, args: &[&str]) -> (bool, String) {
    let out = NetPair::cmd(&net.gw, gateway_bin())
        .arg("xdp")
        .args(args)
        .output()
        .expect("run gateway xdp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The gateway's metrics, after the workers' 200 ms shard flush.
fn metrics(net: &NetPair) -> String {
    std::thread::sleep(Duration::from_millis(400));
    net.curl_gw(&format!("http://{ADMIN}/metrics"))
}

fn url(net: &NetPair) -> String {
    format!("http://{}:{PORT}/v1/models", net.gw_ip)
}

fn served(net: &NetPair, from: &str) -> bool {
    served_within(net, from, 5)
}

/// Whether a request from `from` gets a 200 within `secs` (tried again
/// while time is left, so one connection lost to a busy host isn't read as
/// a drop; a dropped client never gets one).
fn served_within(net: &NetPair, from: &str, secs: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs.into());
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs() as u32;
        let (code, status, _) = net.curl_from(from, &url(net), left.max(1));
        if code == 0 && status == 200 {
            return true;
        }
        if Instant::now() + Duration::from_millis(200) >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn blocked_client_is_dropped_at_xdp_and_others_are_served() {
    let net = NetPair::new("a", 71, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    let gw = start_gateway(&net, &[&net.gw_if]);

    let (ok, stats) = xdp_cli(&net, &["stats"]);
    assert!(ok, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert_eq!(stats["enabled"], true, "{stats}");
    assert_eq!(
        stats["attached"][0]["interface"],
        net.gw_if.as_str(),
        "{stats}"
    );
    assert_eq!(
        stats["attached"][0]["mode"], "native",
        "veth takes native XDP: {stats}"
    );
    assert!(
        net.gw_link().contains("xdp"),
        "program visible on the link: {}",
        net.gw_link()
    );

    assert!(
        served(&net, &good) && served(&net, &bad),
        "both clients served before any block"
    );

    let (ok, out) = xdp_cli(&net, &["block", &bad, "--ttl", "1h"]);
    assert!(ok, "block: {out}");
    assert!(out.contains("\"reason\": \"manual\""), "{out}");
    let before = metrics(&net);
    let accepted_before = metric(&before, "gateway_connections_accepted_total", "");

    let (code, status, _) = net.curl_from(&bad, &url(&net), 2);
    assert_eq!(
        (code, status),
        (28, 0),
        "blocked client: SYNs dropped, curl times out (exit 28)"
    );
    let after = metrics(&net);
    assert_eq!(
        metric(&after, "gateway_connections_accepted_total", ""),
        accepted_before,
        "the gateway never accepted the blocked client's connection"
    );
    let dropped = metric(
        &after,
        "gateway_xdp_packets_total",
        r#"reason="blocked",verdict="drop""#,
    );
    assert!(dropped >= 1.0, "XDP drop counter rose: {dropped}");
    assert!(
        metric(
            &after,
            "gateway_xdp_blocked_packets_total",
            r#"reason="manual""#
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &after,
            "gateway_accept_refused_total",
            r#"reason="blocked""#
        ),
        0.0,
        "XDP did the work, not accept"
    );
    assert_eq!(
        metric(&after, "gateway_xdp_blocked_sources", r#"reason="manual""#),
        1.0
    );

    assert!(
        served(&net, &good),
        "the other client is still served during the block"
    );

    let (ok, list) = xdp_cli(&net, &["list"]);
    assert!(ok && list.contains(&bad), "list shows the block: {list}");
    let (ok, out) = xdp_cli(&net, &["unblock", &bad]);
    assert!(ok, "unblock: {out}");
    assert!(served(&net, &bad), "unblocking restores service");
    let (ok, out) = xdp_cli(&net, &["unblock", &bad]);
    assert!(
        !ok && out.contains("404"),
        "unblocking twice says it wasn't blocked: {out}"
    );

    // A short TTL ends by itself.
    let (ok, out) = xdp_cli(&net, &["block", &bad, "--ttl", "2s"]);
    assert!(ok, "{out}");
    assert!(!served_within(&net, &bad, 1), "blocked for its TTL");
    std::thread::sleep(Duration::from_millis(3200));
    assert!(served(&net, &bad), "served again after the TTL");
    let m = metrics(&net);
    assert_eq!(
        metric(
            &m,
            "gateway_xdp_block_events_total",
            r#"action="expire",reason="manual""#
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "gateway_xdp_blocked_sources", r#"reason="manual""#),
        0.0
    );

    // Bad input is refused with a clear error, not applied.
    let (ok, out) = xdp_cli(&net, &["block", "not-an-ip"]);
    assert!(
        !ok && out.contains("400") && out.contains("not an IPv4 or IPv6 address"),
        "{out}"
    );
    let (ok, out) = xdp_cli(&net, &["block", &bad, "--ttl", "400d"]);
    assert!(!ok && out.contains("max_block_ttl"), "{out}");

    // A gateway killed outright leaves no program behind (bpf_link dies
    // with the process), and a new one attaches cleanly.
    let mut gw = gw;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(gw.0.id() as i32, libc::SIGKILL) };
    let _ = gw.0.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.gw_link().contains("prog/xdp") {
        assert!(
            Instant::now() < deadline,
            "XDP still attached after SIGKILL: {}",
            net.gw_link()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _gw2 = start_gateway(&net, &[&net.gw_if]);
    assert!(served(&net, &good), "restarted gateway serves");
    let (_, stats) = xdp_cli(&net, &["stats"]);
    assert!(
        stats.contains("\"native\""),
        "restarted gateway re-attached: {stats}"
    );
}

#[test]
fn without_xdp_blocks_are_enforced_at_accept() {
    let net = NetPair::new("b", 72, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    let _gw = start_gateway(&net, &[]);

    let (ok, stats) = xdp_cli(&net, &["stats"]);
    assert!(ok, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["enabled"], false, "{stats}");
    assert!(
        stats["fallback"]
            .as_str()
            .unwrap()
            .contains("no [xdp] interfaces"),
        "{stats}"
    );
    assert_eq!(metric(&metrics(&net), "gateway_xdp_enabled", ""), 0.0);
    assert!(!net.gw_link().contains("prog/xdp"));

    let (ok, out) = xdp_cli(&net, &["block", &bad]);
    assert!(ok, "{out}");
    let (code, status, _) = net.curl_from(&bad, &url(&net), 3);
    assert!(
        code != 0 && code != 28 && status == 0,
        "closed at accept, at once (curl exit {code})"
    );
    assert!(
        metric(
            &metrics(&net),
            "gateway_accept_refused_total",
            r#"reason="blocked""#
        ) >= 1.0
    );
    assert!(served(&net, &good), "the other client is served");
    let (ok, _) = xdp_cli(&net, &["unblock", &bad]);
    assert!(ok);
    assert!(served(&net, &bad), "unblocked");

    // Nothing to watch without the program: refused with the reason.
    let (ok, out) = xdp_cli(&net, &["watch", "--seconds", "1"]);
    assert!(
        !ok && out.contains("409") && out.contains("not running"),
        "{out}"
    );
}

/// `gateway xdp watch`: while it runs, sampled verdicts (source, reason,
/// port) arrive as they happen; when it ends, the program stops sampling.
#[test]
fn xdp_watch_streams_sampled_verdicts_only_while_open() {
    let net = NetPair::new("i", 79, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    let _gw = start_gateway(&net, &[&net.gw_if]);
    let (ok, out) = xdp_cli(&net, &["block", &bad]);
    assert!(ok, "{out}");

    let watch = NetPair::cmd(&net.gw, gateway_bin())
        .args(["xdp", "watch", "--json", "--passes", "--seconds", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gateway xdp watch");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&metrics(&net), "gateway_xdp_watchers", "") < 1.0 {
        assert!(Instant::now() < deadline, "the watch never opened");
    }
    assert!(served(&net, &good), "the other client is served");
    let (code, _, _) = net.curl_from(&bad, &url(&net), 2);
    assert_ne!(code, 0, "the blocked client is dropped");
    let out = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(lines[0]["watching"]["passes"], true, "{stdout}");
    assert!(
        lines.last().unwrap()["end"]["events"].as_u64().unwrap() >= 2,
        "{stdout}"
    );
    let port = PORT as u64;
    let dropped = lines
        .iter()
        .find(|l| l["src"] == bad.as_str())
        .unwrap_or_else(|| panic!("no verdict for {bad}: {stdout}"));
    assert_eq!(
        (
            &dropped["verdict"],
            &dropped["reason"],
            &dropped["block"],
            &dropped["proto"],
            dropped["port"].as_u64()
        ),
        (
            &"drop".into(),
            &"blocked".into(),
            &"manual".into(),
            &"tcp".into(),
            Some(port)
        ),
        "{stdout}"
    );
    let passed = lines
        .iter()
        .find(|l| l["src"] == good.as_str())
        .unwrap_or_else(|| panic!("no verdict for {good}: {stdout}"));
    assert_eq!(
        (&passed["verdict"], &passed["reason"]),
        (&"pass".into(), &"ok".into()),
        "{stdout}"
    );

    // Closed: the gauge falls, and the program samples nothing more.
    let m = metrics(&net);
    assert_eq!(metric(&m, "gateway_xdp_watchers", ""), 0.0);
    let events = metric(&m, "gateway_xdp_watch_events_total", "");
    assert!(events >= 2.0, "{events}");
    let _ = net.curl_from(&bad, &url(&net), 2);
    assert!(served(&net, &good));
    assert_eq!(
        metric(&metrics(&net), "gateway_xdp_watch_events_total", ""),
        events,
        "no sampling once the watch is closed"
    );
}

#[test]
fn missing_interface_falls_back_and_says_so() {
    let net = NetPair::new("c", 73, 1);
    let _backend = start_backend(&net);
    let _gw = start_gateway(&net, &["nosuchif0"]);
    let (_, stats) = xdp_cli(&net, &["stats"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["enabled"], false, "{stats}");
    assert!(
        stats["fallback"].as_str().unwrap().contains("nosuchif0"),
        "{stats}"
    );
    assert!(served(&net, &net.cl_ips[0].clone()), "serves without XDP");
}

#[test]
fn monitor_mode_blocks_nothing_but_counts() {
    let net = NetPair::new("d", 74, 1);
    let bad = net.cl_ips[0].clone();
    let _backend = start_backend(&net);
    let _gw = start_gateway_with(&net, &[&net.gw_if], "mode = \"monitor\"");
    let (ok, out) = xdp_cli(&net, &["block", &bad]);
    assert!(ok, "{out}");
    assert!(served(&net, &bad), "monitor mode drops nothing");
    let m = metrics(&net);
    assert!(
        metric(
            &m,
            "gateway_xdp_packets_total",
            r#"reason="blocked",verdict="would_drop""#
        ) >= 1.0,
        "counted as would_drop"
    );
    assert_eq!(
        metric(&m, "gateway_accept_refused_total", r#"reason="blocked""#),
        0.0
    );
}

/// Stage `program` attached to the gateway-side interface through netlink
/// (as a gateway on a kernel without XDP links, or another tool, leaves
/// it): pin it on a bpffs, then `ip link set ... xdpdrv pinned`.
fn stage_netlink_program(net: &NetPair, program: &str) -> std::path::PathBuf {
    // A bpffs of our own outside /sys: `ip -n` remounts /sys for the
    // namespace, which would hide /sys/fs/bpf.
    let fs = std::env::temp_dir().join(format!("gwtest-bpffs-{}", net.gw));
    std::fs::create_dir_all(&fs).unwrap();
    if !std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .contains(&format!(" {} bpf", fs.display()))
    {
        let ok = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&fs)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a bpffs at {}", fs.display());
    }
    let pin = fs.join(program);
    let _ = std::fs::remove_file(&pin);
    let mut k = gateway::xdp::kernel::Loaded::load(gateway::xdp::kernel::Sizes {
        blocked: 16,
        tracked_sources: 16,
        allow: 16,
    })
    .expect("load");
    k.pin(program, &pin).expect("pin");
    let out = std::process::Command::new("ip")
        .args([
            "-n", &net.gw, "link", "set", "dev", &net.gw_if, "xdpdrv", "pinned",
        ])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip link set xdpdrv pinned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        net.gw_link().contains("prog/xdp"),
        "staged: {}",
        net.gw_link()
    );
    pin
}

#[test]
fn stale_front_door_program_is_replaced_but_a_foreign_one_is_not() {
    let net = NetPair::new("e", 75, 1);
    let _backend = start_backend(&net);

    // A gateway_xdp left behind through netlink: replaced on attach.
    let pin = stage_netlink_program(&net, "gateway_xdp");
    {
        let _gw = start_gateway(&net, &[&net.gw_if]);
        let (_, stats) = xdp_cli(&net, &["stats"]);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(stats["enabled"], true, "stale program replaced: {stats}");
        assert!(served(&net, &net.cl_ips[0].clone()));
    }
    let _ = std::fs::remove_file(&pin);

    // Someone else's program: left alone, the gateway falls back and says why.
    let _ = std::process::Command::new("ip")
        .args([
            "-n", &net.gw, "link", "set", "dev", &net.gw_if, "xdp", "off",
        ])
        .status();
    let pin = stage_netlink_program(&net, "gateway_pass");
    let _gw = start_gateway(&net, &[&net.gw_if]);
    let (_, stats) = xdp_cli(&net, &["stats"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["enabled"], false, "{stats}");
    assert!(
        stats["fallback"]
            .as_str()
            .unwrap()
            .contains("another XDP program is attached"),
        "{stats}"
    );
    assert!(
        net.gw_link().contains("prog/xdp"),
        "the foreign program is still attached"
    );
    assert!(served(&net, &net.cl_ips[0].clone()), "served without XDP");
    let _ = std::fs::remove_file(&pin);
    if let Some(fs) = pin.parent() {
        let _ = std::process::Command::new("umount").arg(fs).status();
        let _ = std::fs::remove_dir(fs);
    }
}

#[test]
fn reload_applies_config_blocks_and_mode() {
    let net = NetPair::new("f", 76, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    let gw = start_gateway(&net, &[&net.gw_if]);
    assert!(served(&net, &bad));

    // Add a config block and SIGHUP: dropped at XDP, listed as "config",
    // and not removable through the API (the file owns it).
    rewrite_xdp(&net, &format!("block = [\"{bad}\"]"));
    // SAFETY: kill(2) on our own child's pid ("ip netns exec" execs the gateway).
    unsafe { libc::kill(gw.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !served_within(&net, &bad, 1),
        "config block applied on reload"
    );
    assert!(served(&net, &good));
    let (_, list) = xdp_cli(&net, &["list"]);
    assert!(list.contains(&bad) && list.contains("\"config\""), "{list}");
    let (ok, out) = xdp_cli(&net, &["unblock", &bad]);
    assert!(
        !ok && out.contains("409"),
        "config blocks change in the file: {out}"
    );

    // Monitor mode on reload: the same block now only counts.
    rewrite_xdp(&net, &format!("block = [\"{bad}\"]\nmode = \"monitor\""));
    unsafe { libc::kill(gw.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(served(&net, &bad), "monitor mode drops nothing");

    // Block removed from the file: gone.
    rewrite_xdp(&net, "");
    unsafe { libc::kill(gw.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let (_, list) = xdp_cli(&net, &["list"]);
    assert!(!list.contains(&bad), "{list}");
    assert!(served(&net, &bad));
}

/// Rewrite the running gateway's config with `extra` in `[xdp]`.
fn rewrite_xdp(net: &NetPair, extra: &str) {
    let path = config_path(net, 1);
    let text = std::fs::read_to_string(&path).unwrap();
    let head = text.split("[xdp]").next().unwrap();
    std::fs::write(
        &path,
        format!(
            "{head}[xdp]\ninterfaces = [\"{}\"]\nsyn_rate = 0\n{extra}\n",
            net.gw_if
        ),
    )
    .unwrap();
}

#[test]
fn rate_limit_escalation_blocks_at_xdp_until_the_ttl_ends() {
    let net = NetPair::new("g", 77, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    // Two requests per address, then refusals; the third refusal in 10 s
    // puts the address in the XDP blocklist for 3 s.
    let _gw = start_gateway_with(
        &net,
        &[&net.gw_if],
        "\n[ratelimit.ip]\nrequests_per_second = 0.01\nburst = 2\n\
         [ratelimit.escalation]\nenabled = true\nrefusals = 3\nwindow = \"10s\"\nblock_ttl = \"3s\"\n",
    );
    for i in 0..2 {
        assert_eq!(net.curl_from(&bad, &url(&net), 5).1, 200, "request {i}");
    }
    for i in 0..3 {
        assert_eq!(net.curl_from(&bad, &url(&net), 5).1, 429, "refusal {i}");
    }
    // Now its SYNs die at the NIC; the other client is served.
    let (code, status, _) = net.curl_from(&bad, &url(&net), 2);
    assert_eq!((code, status), (28, 0), "dropped at XDP: curl times out");
    assert!(served(&net, &good));
    let m = metrics(&net);
    assert_eq!(
        metric(
            &m,
            "gateway_ratelimit_escalations_total",
            r#"result="blocked""#
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "gateway_xdp_blocked_sources", r#"reason="rate_limit""#),
        1.0
    );
    assert!(
        metric(
            &m,
            "gateway_xdp_blocked_packets_total",
            r#"reason="rate_limit""#
        ) >= 1.0,
        "dropped by XDP, counted under the rate-limit reason"
    );
    assert_eq!(
        metric(&m, "gateway_accept_refused_total", r#"reason="blocked""#),
        0.0,
        "XDP did the work, not accept"
    );
    // The TTL ends: the address reaches the gateway again (and is still
    // over its rate: 429, not a timeout).
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (code, status, _) = net.curl_from(&bad, &url(&net), 1);
        if code == 0 {
            assert_eq!(status, 429);
            break;
        }
        assert!(Instant::now() < deadline, "block never expired");
    }
    let m = metrics(&net);
    assert_eq!(
        metric(&m, "gateway_xdp_blocked_sources", r#"reason="rate_limit""#),
        0.0
    );
}

/// An overlapping restart: a second gateway started while the first holds
/// the interface takes the front door over (its blocks included) by
/// swapping its program into the first one's link; the blocked client is
/// dropped throughout; the first one exits and the link stays; the second
/// one's exit takes the program off the interface.
#[test]
fn a_new_gateway_takes_the_front_door_over_without_a_gap() {
    let net = NetPair::new("j", 80, 2);
    let (good, bad) = (net.cl_ips[0].clone(), net.cl_ips[1].clone());
    let _backend = start_backend(&net);
    let mut old = start_gateway(&net, &[&net.gw_if]);
    let (ok, out) = xdp_cli(&net, &["block", &bad, "--ttl", "1h"]);
    assert!(ok, "{out}");
    assert!(served(&net, &good));
    let prog_before = net.gw_link();

    const NEW_ADMIN: &str = "127.0.0.1:9902";
    let mut new = start_gateway_at(&net, &[&net.gw_if], "", NEW_ADMIN);
    let (ok, stats) = xdp_cli(&net, &["--admin", NEW_ADMIN, "stats"]);
    assert!(ok, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["enabled"], true,
        "the new gateway runs the front door: {stats}"
    );
    let (ok, list) = xdp_cli(&net, &["--admin", NEW_ADMIN, "list"]);
    assert!(
        ok && list.contains(&bad) && list.contains("manual"),
        "the block came along: {list}"
    );
    assert_ne!(
        net.gw_link(),
        prog_before,
        "another program now runs on the link"
    );
    assert_eq!(
        net.curl_from(&bad, &url(&net), 2).0,
        28,
        "still dropped after the swap"
    );
    assert!(served(&net, &good));

    // The old one is stopped as an operator would (SIGTERM: drain, detach);
    // the link stays, with the new program.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(old.0.id() as i32, libc::SIGTERM) };
    let _ = old.0.wait();
    assert!(
        net.gw_link().contains("prog/xdp"),
        "still attached: {}",
        net.gw_link()
    );
    assert_eq!(
        net.curl_from(&bad, &url(&net), 2).0,
        28,
        "still dropped after the old one exited"
    );
    assert!(served(&net, &good), "served by the new gateway");
    let m = net.curl_gw(&format!("http://{NEW_ADMIN}/metrics"));
    assert!(
        metric(
            &m,
            "gateway_xdp_packets_total",
            r#"reason="blocked",verdict="drop""#
        ) >= 1.0,
        "the new program dropped them"
    );

    let _ = new.0.kill();
    let _ = new.0.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.gw_link().contains("prog/xdp") {
        assert!(
            Instant::now() < deadline,
            "the last gateway's exit leaves nothing attached"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
