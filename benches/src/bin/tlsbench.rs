//! `cargo xtask bench tls`: the gateway and HAProxy 2.6 terminating TLS 1.3
//! on one pinned thread each, in front of the same nginx backend, under the
//! same wrk load (keep-alive, https), in three scenarios:
//!
//! - `tls`: TLS only;
//! - `jwt-distinct`: TLS + an ES256 JWT on every request, a different token
//!   each time (no cache can help: every request is a signature check);
//! - `jwt-hot`: TLS + ES256 JWTs from a set of 16 (what real clients do: one
//!   token for its lifetime), where the gateway's verified-token cache works.
//!
//! Both check the same things: signature with the allowlisted algorithm,
//! `exp`, `iss`, `aud`. Each target is started fresh for each run (the
//! gateway's token cache starts empty), rounds alternate targets, medians
//! are reported with the gateway ÷ HAProxy ratios. Results in
//! `target/bench/tls.json`.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway_benches::procs::{self, pinned, Server};
use gateway_benches::report::median;
use gateway_benches::targets::{self, Placement, Ports, Tools};
use gateway_benches::wrk::{self, Load, WrkResult};
use gateway_tests::jwt::{claims, jwks, SigningKey};
use gateway_tests::tls::{write_pair, Ca};

type Result<T = ()> = std::result::Result<T, String>;

const ISS: &str = "https://idp.bench";
const AUD: &str = "inference";
/// Distinct tokens made per run: more than either proxy verifies in a run.
const DISTINCT: usize = 120_000;
const HOT: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Tls,
    JwtDistinct,
    JwtHot,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Tls => "tls",
            Scenario::JwtDistinct => "jwt-distinct",
            Scenario::JwtHot => "jwt-hot",
        }
    }
    fn jwt(self) -> bool {
        self != Scenario::Tls
    }
}

struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    combined: PathBuf,
    jwks: PathBuf,
    pubkey: PathBuf,
    distinct: PathBuf,
    hot: PathBuf,
}

fn prepare(dir: &Path) -> Result<Files> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let ca = Ca::new("bench CA");
    let leaf = ca.leaf(&["bench.test"]);
    let (cert, key) = write_pair(dir, "server", &leaf);
    let combined = dir.join("server-combined.pem");
    std::fs::write(&combined, format!("{}{}", leaf.0, leaf.1)).map_err(|e| e.to_string())?;
    let sk = SigningKey::es256("bench-1");
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks(&[&sk])).map_err(|e| e.to_string())?;
    let pubkey = dir.join("es256-pub.pem");
    std::fs::write(&pubkey, &sk.public_pem).map_err(|e| e.to_string())?;
    let make = |n: usize, tag: &str| -> String {
        let mut out = String::with_capacity(n * 300);
        for i in 0..n {
            let _ = writeln!(
                out,
                "{}",
                sk.sign(&claims(ISS, AUD, &format!("{tag}-{i}"), "bench"))
            );
        }
        out
    };
    eprintln!("tlsbench: signing {DISTINCT} distinct ES256 tokens ...");
    let distinct = dir.join("tokens-distinct.txt");
    std::fs::write(&distinct, make(DISTINCT, "user")).map_err(|e| e.to_string())?;
    let hot = dir.join("tokens-hot.txt");
    std::fs::write(&hot, make(HOT, "hot")).map_err(|e| e.to_string())?;
    Ok(Files {
        dir: dir.to_path_buf(),
        cert,
        key,
        combined,
        jwks: jwks_path,
        pubkey,
        distinct,
        hot,
    })
}

fn script(f: &Files, s: Scenario) -> Result<PathBuf> {
    let requests = match s {
        Scenario::Tls => "wrk.method = \"GET\"\n".to_string(),
        _ => {
            let file = if s == Scenario::JwtHot {
                &f.hot
            } else {
                &f.distinct
            };
            format!(
                "local tokens = {{}}\n\
                 for line in io.lines(\"{}\") do tokens[#tokens + 1] = line end\n\
                 local i = 0\n\
                 request = function()\n\
                 \x20 i = i + 1\n\
                 \x20 if i > #tokens then i = 1 end\n\
                 \x20 return wrk.format(\"GET\", \"/\", {{[\"Authorization\"] = \"Bearer \" .. tokens[i]}})\n\
                 end\n",
                file.display()
            )
        }
    };
    wrk::write_custom_script(&f.dir, &format!("{}.lua", s.name()), &requests)
}

fn start_gateway(
    tools: &Tools,
    place: Placement,
    f: &Files,
    s: Scenario,
    listen: SocketAddr,
) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let auth = if s.jwt() {
        format!(
            "[[authn.jwt]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\nalgorithms = [\"ES256\"]\njwks_file = \"{}\"\n\
             [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n",
            f.jwks.display()
        )
    } else {
        String::new()
    };
    let cfg = format!(
        "[server]\nlisten = []\nworkers = 1\npin_workers = false\n[admin]\nlisten = \"{admin}\"\n[log]\naccess_log = false\nlevel = \"warn\"\n\
         [tls]\nlisten = [\"{listen}\"]\nmin_version = \"1.3\"\n[[tls.certificates]]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [clusters.b]\nbackends = [\"{backend}\"]\n[[routes]]\npath_prefix = \"/\"\ncluster = \"b\"\nanonymous = {anon}\n{auth}",
        admin = place.ports.gateway_admin(),
        cert = f.cert.display(),
        key = f.key.display(),
        backend = place.ports.backend(),
        anon = !s.jwt(),
    );
    let path = f.dir.join(format!("gateway-{}.toml", s.name()));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    cmd.arg("run").arg("--config").arg(&path);
    Server::spawn("gateway", cmd, &f.dir.join("gateway.log"))
}

fn start_haproxy(
    tools: &Tools,
    place: Placement,
    f: &Files,
    s: Scenario,
    listen: SocketAddr,
) -> Result<Server> {
    let haproxy = tools.haproxy.as_deref().ok_or("haproxy not found")?;
    let jwt = if s.jwt() {
        format!(
            "    http-request set-var(txn.bearer) http_auth_bearer\n\
             \x20   http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
             \x20   http-request deny deny_status 401 unless {{ var(txn.alg) -m str ES256 }}\n\
             \x20   http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{pubkey}\") -m int 1 }}\n\
             \x20   http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {ISS} }}\n\
             \x20   http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {AUD} }}\n\
             \x20   http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
             \x20   http-request set-var(txn.now) date()\n\
             \x20   http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}\n",
            pubkey = f.pubkey.display()
        )
    } else {
        String::new()
    };
    let conf = format!(
        "global\n    nbthread 1\n    maxconn 4096\n\n\
         defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    timeout http-request 10s\n    timeout http-keep-alive 30s\n\n\
         frontend fe\n    bind {listen} ssl crt {crt} alpn http/1.1 ssl-min-ver TLSv1.3\n{jwt}    default_backend be\n\n\
         backend be\n    server backend {backend}\n",
        crt = f.combined.display(),
        backend = place.ports.backend(),
    );
    let path = f.dir.join(format!("haproxy-{}.cfg", s.name()));
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), haproxy);
    cmd.arg("-f").arg(&path).arg("-db");
    Server::spawn("haproxy", cmd, &f.dir.join("haproxy.log"))
}

fn wait_tcp(server: &mut Server, addr: SocketAddr) -> Result {
    for _ in 0..100 {
        if let Some(st) = server.exited() {
            return Err(format!(
                "exited during startup ({st}): {}",
                server.log_tail(10)
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{addr} not listening: {}", server.log_tail(10)))
}

/// `gateway_tls_handshakes_total`, summed, from the admin listener.
fn gateway_handshakes(admin: SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with("gateway_tls_handshakes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Run {
    scenario: Scenario,
    target: &'static str,
    r: WrkResult,
    cpu_us_per_req: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tlsbench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result {
    let mut rounds = 3u32;
    let mut duration = 4u64;
    let mut connections = 64u32;
    let mut out = PathBuf::from("target/bench");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => rounds = val()?.parse().map_err(|_| "--rounds N")?,
            "--duration" => duration = val()?.parse().map_err(|_| "--duration SECS")?,
            "--connections" => connections = val()?.parse().map_err(|_| "--connections C")?,
            "--out" => out = PathBuf::from(val()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let (rounds, duration) = (rounds.clamp(1, 20), duration.clamp(1, 60));
    // nginx and HAProxy get absolute paths in their configs.
    let out = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join(out);
    procs::install_stop_handlers();
    let tools = Tools::find(&out.join(".."));
    let wrk_bin = tools
        .wrk
        .clone()
        .ok_or("wrk not found (cargo xtask setup)")?;
    let cpus = procs::allowed_cpus();
    let ports = Ports { base: 19000 };
    let place = match cpus.as_slice() {
        [a, b, ..] if tools.taskset.is_some() => Placement {
            client_cpu: Some(*a),
            proxy_cpu: Some(*b),
            ports,
        },
        _ => Placement {
            client_cpu: None,
            proxy_cpu: None,
            ports,
        },
    };
    let f = prepare(&out.join("tls-run"))?;
    for a in [
        ports.backend(),
        ports.gateway(),
        ports.haproxy(),
        ports.gateway_admin(),
    ] {
        procs::ensure_port_free(a)?;
    }
    let mut backend = targets::start_backend(&tools, place, &f.dir)?;
    backend.wait_ready(ports.backend(), "/", Duration::from_secs(10))?;

    let mut runs = Vec::new();
    for round in 1..=rounds {
        for scenario in [Scenario::Tls, Scenario::JwtDistinct, Scenario::JwtHot] {
            let script = script(&f, scenario)?;
            for target in ["gateway", "haproxy"] {
                eprintln!(
                    "tlsbench: round {round}/{rounds} {} {target}",
                    scenario.name()
                );
                let addr = if target == "gateway" {
                    ports.gateway()
                } else {
                    ports.haproxy()
                };
                let mut server = if target == "gateway" {
                    start_gateway(&tools, place, &f, scenario, addr)?
                } else {
                    start_haproxy(&tools, place, &f, scenario, addr)?
                };
                wait_tcp(&mut server, addr)?;
                let load = Load {
                    wrk: &wrk_bin,
                    taskset: tools.taskset.as_deref(),
                    cpus: place.client_cpu.as_slice(),
                    threads: 1,
                    script: &script,
                    connections,
                    scheme: "https",
                    path: "/",
                };
                // Warm up (handshakes, caches), then measure with the CPU the proxy used.
                load.run(addr, 1)?;
                let cpu0 = server.cpu_seconds(true).unwrap_or(0.0);
                let r = load.run(addr, duration)?;
                let cpu1 = server.cpu_seconds(true).unwrap_or(0.0);
                let handshakes =
                    (target == "gateway").then(|| gateway_handshakes(ports.gateway_admin()));
                drop(server);
                if r.non_2xx > 0 || r.socket_errors() > 0 {
                    return Err(format!(
                        "{target} {}: {} non-2xx, {} socket errors: the setup is wrong",
                        scenario.name(),
                        r.non_2xx,
                        r.socket_errors()
                    ));
                }
                if scenario == Scenario::JwtDistinct && r.requests as usize > DISTINCT {
                    eprintln!("tlsbench: warning: {target} served more requests than distinct tokens; some repeated");
                }
                let cpu_us_per_req = (cpu1 - cpu0) * 1e6 / r.requests.max(1) as f64;
                if let Some(h) = handshakes {
                    // Keep-alive: one handshake per wrk connection, not per request.
                    eprintln!(
                        "tlsbench: gateway did {h} TLS handshakes for {} requests",
                        r.requests
                    );
                }
                runs.push(Run {
                    scenario,
                    target,
                    r,
                    cpu_us_per_req,
                });
            }
        }
    }

    println!(
        "{:<14} {:<8} {:>10} {:>9} {:>9} {:>12}",
        "scenario", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req"
    );
    let mut json = Vec::new();
    let mut ratios = serde_json::Map::new();
    for scenario in [Scenario::Tls, Scenario::JwtDistinct, Scenario::JwtHot] {
        let mut rps = std::collections::HashMap::new();
        for target in ["gateway", "haproxy"] {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.scenario == scenario && r.target == target)
                .collect();
            let m = |f: &dyn Fn(&Run) -> f64| {
                median(rs.iter().map(|r| f(r)).collect()).unwrap_or(f64::NAN)
            };
            let (q, p50, p99, cpu) = (
                m(&|r| r.r.rps()),
                m(&|r| r.r.p50_us / 1000.0),
                m(&|r| r.r.p99_us / 1000.0),
                m(&|r| r.cpu_us_per_req),
            );
            println!(
                "{:<14} {:<8} {:>10.0} {:>9.2} {:>9.2} {:>12.1}",
                scenario.name(),
                target,
                q,
                p50,
                p99,
                cpu
            );
            rps.insert(target, (q, p99));
            json.push(serde_json::json!({
                "scenario": scenario.name(), "target": target, "rps": q, "p50_ms": p50, "p99_ms": p99, "cpu_us_per_request": cpu,
                "runs": rs.iter().map(|r| serde_json::json!({"rps": r.r.rps(), "p99_ms": r.r.p99_us / 1000.0, "cpu_us_per_request": r.cpu_us_per_req})).collect::<Vec<_>>(),
            }));
        }
        let (g, h) = (rps["gateway"], rps["haproxy"]);
        ratios.insert(scenario.name().into(), serde_json::json!({"rps_gateway_over_haproxy": g.0 / h.0, "p99_gateway_over_haproxy": g.1 / h.1}));
        println!(
            "  {}: gateway ÷ HAProxy req/s {:.2}, p99 {:.2}",
            scenario.name(),
            g.0 / h.0,
            g.1 / h.1
        );
    }
    let tls_h = json
        .iter()
        .find(|j| j["scenario"] == "tls" && j["target"] == "haproxy")
        .and_then(|j| j["rps"].as_f64())
        .unwrap_or(f64::NAN);
    let hot_g = json
        .iter()
        .find(|j| j["scenario"] == "jwt-hot" && j["target"] == "gateway")
        .and_then(|j| j["rps"].as_f64())
        .unwrap_or(f64::NAN);
    println!(
        "  gateway jwt-hot ÷ HAProxy tls-only: {:.2} (bar ≥ 0.8)",
        hot_g / tls_h
    );
    let doc = serde_json::json!({
        "rounds": rounds, "duration_s": duration, "connections": connections,
        "results": json, "ratios": ratios, "gateway_jwt_hot_over_haproxy_tls": hot_g / tls_h,
        "haproxy": tools.haproxy.as_deref().map(|h| procs::version_line(h, &["-v"])),
    });
    let path = out.join("tls.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| e.to_string())?;
    println!("results: {}", path.display());
    drop(backend);
    Ok(())
}
