//! `cargo xtask bench h2`: HTTP/2 from clients, side by side. h2load
//! (nghttp2) drives the gateway, HAProxy 2.6 and nginx, each one pinned
//! worker with an HTTP/2 front (h2c, prior knowledge) and an HTTP/1.1
//! keep-alive pool to the same nginx backend, 64 connections × 10 streams;
//! rounds alternate targets and medians are reported: requests/s, latency
//! p50/p99 (from h2load's per-request log), proxy CPU per request, and the
//! ratios to HAProxy. Then gRPC unary calls (a grpcio health server, the
//! standard `grpc.health.v1.Health/Check`) through the gateway's gRPC route
//! vs direct, with h2load sending the framed message. Results in
//! `target/bench/h2.json`.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_benches::procs::{self, pinned, Server};
use gateway_benches::report::median;
use gateway_benches::targets::{self, Placement, Ports, Tools};

type Result<T = ()> = std::result::Result<T, String>;

const USAGE: &str =
    "usage: h2bench [--rounds N] [--duration SECS] [--connections C] [--streams M] [--quick]";

#[derive(Clone, Copy)]
struct Settings {
    rounds: usize,
    duration: u64,
    connections: usize,
    streams: usize,
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    ok: u64,
    failed: u64,
}

fn main() -> std::process::ExitCode {
    let s = match args() {
        Ok(Some(s)) => s,
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    procs::install_stop_handlers();
    match run(&s) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("h2bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn args() -> Result<Option<Settings>> {
    let mut s = Settings {
        rounds: 3,
        duration: 8,
        connections: 64,
        streams: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--rounds" => s.rounds = num("--rounds")?.max(1) as usize,
            "--duration" => s.duration = num("--duration")?.max(1),
            "--connections" => s.connections = num("--connections")?.max(1) as usize,
            "--streams" => s.streams = num("--streams")?.max(1) as usize,
            "--quick" => {
                s.rounds = 1;
                s.duration = 4;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(s))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(s: &Settings) -> Result {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let tools = Tools::find(&target);
    let h2load =
        procs::find_program("h2load").ok_or("h2load not found (apt-get install nghttp2-client)")?;
    let run_dir = target.join("bench/h2-run");
    fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    let cpus = procs::allowed_cpus();
    let place = Placement {
        client_cpu: cpus.first().copied().filter(|_| cpus.len() > 1),
        proxy_cpu: cpus.get(1).copied(),
        ports: Ports { base: 18600 },
    };
    let p = place.ports;
    let mut backend = targets::start_backend(&tools, place, &run_dir)?;
    backend.wait_ready(p.backend(), "/", Duration::from_secs(10))?;
    let mut names = Vec::new();
    let mut servers: Vec<(String, SocketAddr, Server, bool)> = Vec::new();
    let mut gw = start_gateway(&tools, place, &run_dir)?;
    gw.wait_ready(p.gateway_admin(), "/readyz", Duration::from_secs(10))?;
    servers.push(("gateway".into(), p.gateway(), gw, false));
    match start_haproxy(&tools, place, &run_dir) {
        Ok(mut h) => {
            std::thread::sleep(Duration::from_millis(500));
            if h.exited().is_none() {
                servers.push(("haproxy".into(), p.haproxy(), h, false));
            }
        }
        Err(e) => eprintln!("haproxy skipped: {e}"),
    }
    match start_nginx(&tools, place, &run_dir) {
        Ok(mut n) => {
            std::thread::sleep(Duration::from_millis(500));
            if n.exited().is_none() {
                servers.push(("nginx".into(), p.nginx(), n, true));
            }
        }
        Err(e) => eprintln!("nginx skipped: {e}"),
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); servers.len()];
    for round in 0..s.rounds {
        for (i, (name, addr, server, children)) in servers.iter().enumerate() {
            let r = load(
                &h2load,
                place,
                *addr,
                server,
                *children,
                s,
                &run_dir,
                &format!("http://{addr}/"),
                &[],
            )?;
            println!(
                "round {} {name:8} {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  {:.1} µs CPU/req  ({} ok, {} failed)",
                round + 1,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_us_per_req,
                r.ok,
                r.failed
            );
            results[i].push(r);
        }
    }
    let med =
        |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect()).unwrap_or(0.0);
    let mut table = Vec::new();
    let hap = servers.iter().position(|x| x.0 == "haproxy");
    println!(
        "\nHTTP/2 front, HTTP/1.1 backend, {} conns × {} streams, medians of {} rounds:",
        s.connections, s.streams, s.rounds
    );
    for (i, (name, ..)) in servers.iter().enumerate() {
        let (rps, p99, cpu) = (
            med(&results[i], |r| r.rps),
            med(&results[i], |r| r.p99_ms),
            med(&results[i], |r| r.cpu_us_per_req),
        );
        let vs = hap.map(|h| rps / med(&results[h], |r| r.rps).max(1.0));
        println!(
            "  {name:8} {rps:>9.0} req/s  p50 {:.2} ms  p99 {p99:.2} ms  {cpu:.1} µs CPU/req  {}",
            med(&results[i], |r| r.p50_ms),
            vs.map_or(String::new(), |v| format!("{v:.2}× HAProxy"))
        );
        names.push(name.clone());
        table.push(serde_json::json!({
            "target": name, "rps": rps, "p50_ms": med(&results[i], |r| r.p50_ms), "p99_ms": p99,
            "cpu_us_per_request": cpu, "vs_haproxy": vs,
        }));
    }
    drop(servers);
    let grpc = grpc_bench(&tools, &h2load, place, s, &run_dir);
    let grpc_json = match &grpc {
        Ok((direct, through)) => {
            println!(
                "\ngRPC unary (grpc.health.v1.Health/Check, grpcio server): direct {:.0} req/s p99 {:.2} ms; through the gateway {:.0} req/s p99 {:.2} ms ({:.2}× direct)",
                direct.rps,
                direct.p99_ms,
                through.rps,
                through.p99_ms,
                through.rps / direct.rps.max(1.0)
            );
            serde_json::json!({"direct_rps": direct.rps, "direct_p99_ms": direct.p99_ms,
                "gateway_rps": through.rps, "gateway_p99_ms": through.p99_ms,
                "gateway_cpu_us_per_request": through.cpu_us_per_req, "ratio": through.rps / direct.rps.max(1.0)})
        }
        Err(e) => {
            eprintln!("gRPC part skipped: {e}");
            serde_json::json!({"skipped": e})
        }
    };
    let out = target.join("bench/h2.json");
    let doc = serde_json::json!({
        "connections": s.connections, "streams": s.streams, "rounds": s.rounds, "duration_s": s.duration,
        "http2": table, "grpc_unary": grpc_json,
    });
    fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).map_err(|e| e.to_string())?;
    println!("results: {}", out.display());
    Ok(())
}

/// One h2load run against `url`: throughput, latency percentiles from its
/// per-request log, and `server`'s CPU per request.
#[allow(clippy::too_many_arguments)]
fn load(
    h2load: &Path,
    place: Placement,
    addr: SocketAddr,
    server: &Server,
    children: bool,
    s: &Settings,
    dir: &Path,
    url: &str,
    extra: &[String],
) -> Result<Run> {
    let log = dir.join(format!("h2load-{}.log", addr.port()));
    let _ = fs::remove_file(&log);
    let cpu0 = server.cpu_seconds(children).unwrap_or(0.0);
    let mut cmd = pinned(place.client_cpu, None, h2load);
    cmd.args([
        "-c",
        &s.connections.to_string(),
        "-m",
        &s.streams.to_string(),
        "-D",
        &s.duration.to_string(),
        "--warm-up-time",
        "1",
        "--log-file",
    ])
    .arg(&log)
    .args(extra)
    .arg(url);
    let out = cmd.output().map_err(|e| format!("h2load: {e}"))?;
    let cpu = server.cpu_seconds(children).unwrap_or(0.0) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|x| x.trim_end_matches(" req/s").parse::<f64>().ok())
        .ok_or_else(|| format!("h2load against {addr}: no result\n{text}"))?;
    let (ok, failed) = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .map(|l| {
            let n = |k: &str| {
                l.split(", ")
                    .find(|p| p.trim().ends_with(k))
                    .and_then(|p| p.trim().split(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            (n("succeeded"), n("failed") + n("errored"))
        })
        .unwrap_or((0, 0));
    let mut lat: Vec<f64> = fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.parse::<f64>().ok())
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
            / 1000.0
    };
    let total = (rps * s.duration as f64).max(1.0);
    Ok(Run {
        rps,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        cpu_us_per_req: cpu * 1e6 / total,
        ok,
        failed,
    })
}

fn start_gateway(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join("gateway");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let p = place.ports;
    let conf = format!(
        "[server]\nlisten = [\"{}\"]\nworkers = 1\nh2c = true\n[admin]\nlisten = \"{}\"\n[log]\naccess_log = false\n\
         [http2]\nmax_concurrent_streams = 256\n\
         [clusters.b]\nbackends = [\"{}\"]\npool_max_idle = 1024\nmax_connections = 1024\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n",
        p.gateway(),
        p.gateway_admin(),
        p.backend()
    );
    fs::write(dir.join("gateway.toml"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    cmd.arg("run").arg("--config").arg(dir.join("gateway.toml"));
    Server::spawn("gateway", cmd, &dir.join("gateway.log"))
}

fn start_haproxy(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let haproxy = tools.haproxy.as_deref().ok_or("haproxy not found")?;
    let dir = run_dir.join("haproxy");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let p = place.ports;
    let conf = format!(
        "global\n    nbthread 1\n    maxconn 4096\ndefaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n\
         \x20   timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
         frontend fe\n    bind {} proto h2\n    default_backend be\nbackend be\n    server backend {}\n",
        p.haproxy(),
        p.backend()
    );
    fs::write(dir.join("haproxy.cfg"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), haproxy);
    cmd.arg("-f").arg(dir.join("haproxy.cfg")).arg("-db");
    Server::spawn("haproxy", cmd, &dir.join("haproxy.log"))
}

fn start_nginx(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let nginx = tools.nginx.as_deref().ok_or("nginx not found")?;
    let dir = run_dir.join("nginx");
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let p = place.ports;
    let (d, t) = (dir.display(), tmp.display());
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  fastcgi_temp_path {t}/f;\n  uwsgi_temp_path {t}/u;\n  scgi_temp_path {t}/s;\n\
         \x20 http2_max_concurrent_streams 256;\n  keepalive_requests 1000000;\n\
         \x20 upstream backend {{ server {}; keepalive 128; keepalive_requests 100000; }}\n\
         \x20 server {{ listen {} http2; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        p.backend(),
        p.nginx()
    );
    fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), nginx);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"));
    Server::spawn("nginx", cmd, &dir.join("stdout.log"))
}

/// gRPC unary through the gateway's gRPC route vs direct, against a grpcio
/// health server (4 threads, on the client CPU).
fn grpc_bench(
    tools: &Tools,
    h2load: &Path,
    place: Placement,
    s: &Settings,
    run_dir: &Path,
) -> Result<(Run, Run)> {
    let py = root().join("tests/py/grpc_pair.py");
    let port = place.ports.base + 90;
    let mut cmd = pinned(place.client_cpu, None, Path::new("python3"));
    cmd.arg(&py).args(["server", &port.to_string()]);
    let server = Server::spawn("grpcio", cmd, &run_dir.join("grpcio.log"))?;
    std::thread::sleep(Duration::from_secs(2));
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join("gateway-grpc");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let listen = SocketAddr::from(([127, 0, 0, 1], place.ports.base + 91));
    let admin = SocketAddr::from(([127, 0, 0, 1], place.ports.base + 92));
    let conf = format!(
        "[server]\nlisten = [\"{listen}\"]\nworkers = 1\nh2c = true\n[admin]\nlisten = \"{admin}\"\n[log]\naccess_log = false\n\
         [clusters.g]\nbackends = [\"127.0.0.1:{port}\"]\n[[routes]]\nname = \"grpc\"\npath_prefix = \"/\"\nprotocol = \"grpc\"\ncluster = \"g\"\n"
    );
    fs::write(dir.join("gateway.toml"), conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    cmd.arg("run").arg("--config").arg(dir.join("gateway.toml"));
    let mut gw = Server::spawn("gateway (grpc)", cmd, &dir.join("gateway.log"))?;
    gw.wait_ready(admin, "/readyz", Duration::from_secs(10))?;
    // An empty HealthCheckRequest, gRPC-framed.
    let msg = run_dir.join("grpc-msg.bin");
    fs::write(&msg, [0u8, 0, 0, 0, 0]).map_err(|e| e.to_string())?;
    let extra: Vec<String> = [
        "-d",
        &msg.display().to_string(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let small = Settings {
        connections: 8,
        streams: 8,
        ..*s
    };
    let path = "/grpc.health.v1.Health/Check";
    let direct = load(
        h2load,
        place,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &server,
        false,
        &small,
        run_dir,
        &format!("http://127.0.0.1:{port}{path}"),
        &extra,
    )?;
    let through = load(
        h2load,
        place,
        listen,
        &gw,
        false,
        &small,
        run_dir,
        &format!("http://{listen}{path}"),
        &extra,
    )?;
    Ok((direct, through))
}
