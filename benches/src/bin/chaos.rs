//! `cargo xtask chaos [--scale S] [--threads N] [--reload-seconds N]`: the
//! long form of `tests/chaos.rs`. Under steady mixed load (idempotent GETs,
//! streamed chat completions over HTTP and over TLS), one fault at a time:
//! a backend killed and restarted, a backend frozen (SIGSTOP) and resumed,
//! Redis killed and restarted, the config reloaded every second for a
//! minute, the TLS certificate rotated, SIGTERM drain. Per fault: requests,
//! ok, failures by kind and outcome, streams cut, recovery time, slowest
//! request; printed as a table and written to target/bench/chaos.md.

use std::time::Duration;

use gateway_tests::chaos::{self, Faults, Load, Rig, TABLE_HEAD};
use gateway_tests::Driver;

fn main() {
    let mut scale = 3.0;
    let mut threads = 9;
    let mut reload_seconds = 60u64;
    let mut connections = 10_000usize;
    let mut soak_minutes = 0u64;
    let mut faults = true;
    let mut out = std::path::PathBuf::from("target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--scale" => scale = v().parse().expect("--scale S"),
            "--threads" => threads = v().parse().expect("--threads N"),
            "--reload-seconds" => reload_seconds = v().parse().expect("--reload-seconds N"),
            "--out" => out = v().into(),
            "--connections" => connections = v().parse().expect("--connections N"),
            "--soak-minutes" => soak_minutes = v().parse().expect("--soak-minutes N"),
            "--no-faults" => faults = false,
            other => {
                eprintln!("chaos: unknown argument {other}\nusage: chaos [--scale S] [--threads N] [--reload-seconds N] [--connections N] [--soak-minutes N] [--no-faults] [--out DIR]");
                std::process::exit(2);
            }
        }
    }
    chaos::raise_fd_limit();
    let mut rig = Rig::start(Driver::Auto);
    let exhaustion = exhaustion(&rig, connections);
    if soak_minutes > 0 {
        let soak = soak(&rig, threads, soak_minutes);
        let _ = std::fs::create_dir_all(&out);
        let _ = std::fs::write(out.join("soak.md"), &soak);
        println!("{soak}");
    }
    if !faults {
        let _ = std::fs::create_dir_all(&out);
        let _ = std::fs::write(out.join("exhaustion.md"), &exhaustion);
        println!("{exhaustion}");
        return;
    }
    let load = Load::start(&rig, threads);
    let f = Faults { scale };
    let mut lines = vec![TABLE_HEAD.to_string()];
    let mut show = |l: String| {
        println!("{l}");
        lines.push(l);
    };
    println!("{TABLE_HEAD}");
    show(f.kill_backend(&mut rig, &load).line());
    let r = f.freeze_backend(&mut rig, &load);
    if r.failed(chaos::Kind::Get) > 0 {
        eprintln!(
            "idempotent requests failed; the gateway says:\n{}",
            rig.why()
        );
    }
    show(r.line());
    show(f.kill_redis(&mut rig, &load).line());
    show(
        f.reloads(
            &mut rig,
            &load,
            Duration::from_secs(1),
            reload_seconds as usize,
        )
        .line(),
    );
    show(f.rotate_certificates(&mut rig, &load, 5).line());
    let (r, exit) = f.drain(&mut rig, &load);
    show(r.line());
    let samples = load.stop();
    let total = samples.len();
    let text = format!(
        "{}\n\n{total} requests in all; the gateway exited after SIGTERM with {exit:?}\n\n{exhaustion}\n",
        lines.join("\n")
    );
    let _ = std::fs::create_dir_all(&out);
    let path = out.join("chaos.md");
    std::fs::write(&path, &text).expect("write the report");
    println!(
        "\n{total} requests; exit after SIGTERM: {exit:?}; report in {}",
        path.display()
    );
}

/// Resource exhaustion: `n` idle keep-alive connections (RSS per
/// connection), `n` slowloris connections, and many concurrent SSE
/// streams, each while a light client measures its latency against its
/// unloaded latency. Returns the report (markdown).
fn exhaustion(rig: &Rig, n: usize) -> String {
    let g = &rig.gateway;
    let window = Duration::from_secs(5);
    let mut rows = vec![
        "| condition | light client p50 ms | p99 ms | p99 vs unloaded | failed | gateway RSS MiB |"
            .to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    let mut row = |what: &str, (p50, p99, failed): (Duration, Duration, u64), base: Duration| {
        let r = format!(
            "| {what} | {:.2} | {:.2} | {:.2}× | {failed} | {:.1} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p99.as_secs_f64() / base.as_secs_f64().max(1e-6),
            g.rss_kib() as f64 / 1024.0
        );
        println!("{r}");
        rows.push(r);
    };
    let base = chaos::light_client(g.addr, window);
    row("unloaded", base, base.1);
    let rss0 = g.rss_kib();
    let idle = chaos::open_many(g.addr, n, true);
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = g.rss_kib();
    let held = g.metric(&["gateway_active_connections"]) as usize;
    let per_conn = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / held.max(1) as f64;
    row(
        &format!(
            "{} idle keep-alive connections opened, {held} held",
            idle.len()
        ),
        chaos::light_client(g.addr, window),
        base.1,
    );
    drop(idle);
    std::thread::sleep(Duration::from_secs(1));
    let mut slow = chaos::open_many(g.addr, n, false);
    let opened = slow.len();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                chaos::drip(&mut slow);
            }
            slow.len()
        })
    };
    row(
        &format!("{opened} slowloris connections (a byte every 2 s)"),
        chaos::light_client(g.addr, window),
        base.1,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let left = dripper.join().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(1));
    let uploads = chaos::open_slow_uploads(g.addr, 1000);
    let opened_uploads = uploads.len();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dripper = {
        let stop = stop.clone();
        let mut uploads = uploads;
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(2));
                chaos::drip(&mut uploads);
            }
        })
    };
    row(
        &format!("{opened_uploads} slow uploads (a body byte every 2 s)"),
        chaos::light_client(g.addr, window),
        base.1,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = dripper.join();
    let readers = chaos::open_slow_readers(g.addr, 300);
    std::thread::sleep(Duration::from_secs(2));
    row(
        &format!(
            "{} slow readers of long streams (never read)",
            readers.len()
        ),
        chaos::light_client(g.addr, window),
        base.1,
    );
    drop(readers);
    std::thread::sleep(Duration::from_secs(1));
    let streams = chaos::open_streams(g.addr, 1000);
    std::thread::sleep(Duration::from_secs(2));
    let open = g.metric(&["gateway_active_connections"]) as usize;
    row(
        &format!("1000 clients each reading a long SSE stream ({open} connections open)"),
        chaos::light_client(g.addr, window),
        base.1,
    );
    let streamed = streams.stop();
    std::thread::sleep(Duration::from_secs(1));
    // Not an exhaustion case: 300 clients in a closed loop (GETs and
    // streams back to back) take every CPU cycle of a small machine.
    let streams = Load::start(rig, 300);
    std::thread::sleep(Duration::from_secs(1));
    row(
        "300 clients in a closed loop (GETs and streams back to back: CPU saturation)",
        chaos::light_client(g.addr, window),
        base.1,
    );
    let s = streams.stop();
    let ok = s.iter().filter(|x| x.outcome == chaos::Outcome::Ok).count();
    let shed = g.metric(&["gateway_connections_shed_total"]);
    format!(
        "{}\n\nRSS per idle keep-alive connection: {per_conn:.0} bytes ({rss0} KiB before, {rss1} KiB with {held} held).\n\
         Slowloris: {opened} opened, {left} still open when the dripping stopped; connections shed at max_connections: {shed}.\n\
         Long streams: {streamed} response bytes read. Closed loop: {} requests, {ok} ok.\n",
        rows.join("\n"),
        s.len()
    )
}

/// Mixed load for `minutes`, the gateway's RSS sampled every 10 s; the
/// trend (least-squares slope) over the second half, when warm.
fn soak(rig: &Rig, threads: usize, minutes: u64) -> String {
    let load = Load::start(rig, threads);
    let start = std::time::Instant::now();
    let mut pts: Vec<(f64, f64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(minutes * 60) {
        std::thread::sleep(Duration::from_secs(10));
        pts.push((
            start.elapsed().as_secs_f64() / 60.0,
            rig.gateway.rss_kib() as f64 / 1024.0,
        ));
    }
    let samples = load.stop();
    let half: Vec<(f64, f64)> = pts[pts.len() / 2..].to_vec();
    let n = half.len() as f64;
    let (mx, my) = (
        half.iter().map(|p| p.0).sum::<f64>() / n,
        half.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let slope = half.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
        / half
            .iter()
            .map(|p| (p.0 - mx).powi(2))
            .sum::<f64>()
            .max(1e-9);
    let failed = samples
        .iter()
        .filter(|s| s.outcome != chaos::Outcome::Ok)
        .count();
    let (lo, hi) = pts
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), p| (l.min(p.1), h.max(p.1)));
    format!(
        "Soak: {minutes} min of mixed load ({} requests, {failed} failed); RSS {lo:.1}–{hi:.1} MiB, \
         second-half trend {slope:+.3} MiB/min (first {:.1} MiB, last {:.1} MiB)\n",
        samples.len(),
        pts.first().map(|p| p.1).unwrap_or(0.0),
        pts.last().map(|p| p.1).unwrap_or(0.0)
    )
}
