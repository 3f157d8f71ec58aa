//! `loadbench`: plain HTTP/1.1 reverse proxying, side by side in one run —
//! the backend directly, the gateway, HAProxy and nginx — under `wrk`.
//!
//! The backend (nginx, one worker) and wrk share the first CPU; each proxy,
//! one worker/thread, gets the second CPU to itself (the others sit idle
//! while one is measured). Targets are measured in rounds, the order rotating
//! each round, with an unmeasured warm-up before each run; medians are
//! reported. Results land in `target/bench/` (`results.json`, `throughput.svg`).
//!
//! With `--validation`, the same harness measures instead what the gateway's
//! validation stage costs: the gateway as a plain proxy (`gateway-passthrough`,
//! the configuration above) against the gateway validating every request
//! (`gateway-validated`: an `openai` route and a model catalogue naming the
//! model the load asks for), both in front of the same backend, same load;
//! results in `target/bench/validation.json`.
//!
//! With `--ratelimit`, what the rate-limit stage costs on a load that stays
//! under every limit: the validating gateway as above against the same with
//! `[ratelimit]` address, route and model levels (request and token buckets,
//! a concurrency limit, escalation on, headers on every response); results
//! in `target/bench/ratelimit.json`.
//!
//! With `--workers 1,2,4`, how the gateway scales with its worker count: the
//! plain-proxy gateway alone, started once per count listed (`--workers N`),
//! same backend and load for all, in rounds with rotating order; per count
//! the median req/s, the ratio to the first count listed, and the gateway's
//! CPU per request. The client side (backend + wrk) keeps the CPUs the
//! largest gateway leaves, sized to them (nginx workers, wrk threads); a
//! gateway with N workers gets N CPUs of its own when there are N + 1 or more,
//! else it shares the client's and the output says the ratio is not a clean
//! scaling figure. Results in `target/bench/scaling.json`.
//!
//! Usually run as `cargo xtask bench`, which builds the gateway first.

use std::env;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use gateway_benches::procs::{self, Server};
use gateway_benches::report::{self, Measured, Sample};
use gateway_benches::targets::{self, Placement, Ports, Tools};
use gateway_benches::wrk::Load;
use gateway_benches::Result;
use serde_json::json;

const USAGE: &str = "\
usage: loadbench [--validation | --ratelimit | --workers N,N,...] [--quick] [--rounds N] [--duration SECS] [--connections C] [--warmup SECS] [--port-base P]

  --validation       measure the validation stage instead: the gateway as a plain proxy vs the
                     gateway checking every chat completion (openai route + model catalogue),
                     same backend, same load, alternating rounds (target/bench/validation.json)
  --ratelimit        measure the rate-limit stage: the validating gateway vs the same with rate,
                     token, concurrency limits and escalation that the load stays under
                     (target/bench/ratelimit.json)
  --workers N,N,...  measure how the gateway scales with its worker count: the plain-proxy gateway
                     started with `--workers N` for each N listed (up to 8 counts, each 1 to 256),
                     same backend and load, rotating rounds; req/s, ratio to the first N, CPU per
                     request (target/bench/scaling.json). Backend + wrk keep the CPUs the largest
                     gateway leaves (at least one); a gateway with N workers gets N CPUs of its
                     own when the machine has N + 1 or more, else it shares (flagged in the output)

  --rounds N         rounds over all targets; medians are reported (default 3)
  --duration SECS    measured seconds per target per round (default 10)
  --connections C    wrk connections (default 64)
  --warmup SECS      unmeasured load before each measured run (default 2)
  --baseline BIN     also measure the gateway built from BIN (another build: before/after a change)
                     in the same rounds, on P+84 (admin P+1903); skipped when not given
  --port-base P      loopback ports used: backend P, gateway P+80 (admin P+1901),
                     HAProxy P+81, nginx P+82, validating gateway P+83 (admin P+1902),
                     --workers gateways P+100.. (admin P+1910..)
                     (default 18000)
  --quick            smoke test: 1 round of 3 s, 1 s warm-up

env: GATEWAY_BIN (default <workspace>/target/release/gateway)
";

struct Settings {
    rounds: usize,
    duration: u64,
    connections: u32,
    warmup: u64,
    port_base: u16,
    /// `--validation`: passthrough gateway vs validating gateway.
    validation: bool,
    /// `--ratelimit`: validating gateway vs the same with rate limits.
    ratelimit: bool,
    /// `--workers`: the gateway's worker counts to compare, in the order given
    /// (the first is the base of the ratios); empty for the other modes.
    workers: Vec<usize>,
    /// `--baseline BIN`: also measure the gateway built from BIN, same rounds.
    baseline: bool,
}

/// `--workers 1,2,4`: distinct counts, 1 to 256 each, at most
/// [`targets::MAX_SCALING_RUNS`] of them (each gateway has its own ports).
fn parse_workers(v: &str) -> Result<Vec<usize>> {
    let mut out: Vec<usize> = Vec::new();
    for part in v.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .ok_or(format!(
                "--workers {v}: `{part}` is not a count from 1 to 256"
            ))?;
        if out.contains(&n) {
            return Err(format!("--workers {v}: {n} is listed twice"));
        }
        out.push(n);
    }
    if out.len() > targets::MAX_SCALING_RUNS {
        return Err(format!(
            "--workers {v}: at most {} counts",
            targets::MAX_SCALING_RUNS
        ));
    }
    Ok(out)
}

fn parse_args() -> Result<Option<Settings>> {
    let mut s = Settings {
        rounds: 3,
        duration: 10,
        connections: 64,
        warmup: 2,
        port_base: 18000,
        validation: false,
        ratelimit: false,
        workers: Vec::new(),
        baseline: false,
    };
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<u64> {
            let v = inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v}: not a whole number"))
        };
        match flag.as_str() {
            "--rounds" => s.rounds = value("--rounds")? as usize,
            "--duration" => s.duration = value("--duration")?,
            "--connections" => s.connections = value("--connections")? as u32,
            "--warmup" => s.warmup = value("--warmup")?,
            "--port-base" => {
                s.port_base = u16::try_from(value("--port-base")?)
                    .ok()
                    .filter(|p| (1024..=63_000).contains(p))
                    .ok_or("--port-base: 1024 to 63000")?
            }
            "--validation" => s.validation = true,
            "--workers" => {
                let v = inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or("--workers needs a value (e.g. 1,2,4)")?;
                s.workers = parse_workers(&v)?;
            }
            "--ratelimit" => s.ratelimit = true,
            "--baseline" => {
                let v = inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or("--baseline needs the path of a gateway binary")?;
                if !std::path::Path::new(&v).is_file() {
                    return Err(format!("--baseline {v}: no such file"));
                }
                // Read by targets::start_gateway_baseline.
                env::set_var("GATEWAY_BASELINE_BIN", &v);
                s.baseline = true;
            }
            "--quick" => {
                s.rounds = 1;
                s.duration = 3;
                s.warmup = 1;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
        }
    }
    // Bounded in count and time, whatever is asked.
    if !(1..=20).contains(&s.rounds) {
        return Err("--rounds: 1 to 20".into());
    }
    if !(1..=120).contains(&s.duration) {
        return Err("--duration: 1 to 120 seconds".into());
    }
    // HAProxy is configured with `maxconn 4096`.
    if !(1..=4_000).contains(&s.connections) {
        return Err("--connections: 1 to 4000".into());
    }
    if s.warmup > 30 {
        return Err("--warmup: 0 to 30 seconds".into());
    }
    if !s.workers.is_empty() && (s.validation || s.ratelimit) {
        return Err(
            "--workers measures the plain-proxy gateway: not with --validation / --ratelimit"
                .into(),
        );
    }
    Ok(Some(s))
}

fn main() -> ExitCode {
    procs::install_stop_handlers();
    let settings = match parse_args() {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadbench: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = if settings.workers.is_empty() {
        run(&settings)
    } else {
        run_scaling(&settings)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadbench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A proxy (or the backend itself, for `direct`) and where wrk sends load.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// `None` for `direct`: the backend is measured without a proxy.
    server: Option<Server>,
    /// Count the process's children too (nginx: master + worker).
    with_children: bool,
    /// Set once the proxy has died: no more runs.
    dead: Option<String>,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ sits in the workspace")
        .to_path_buf()
}

/// The target directory, `target/bench/` and a fresh `target/bench/run/`.
fn prepare_dirs() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let root = workspace_root();
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d));
    let bench_dir = target_dir.join("bench");
    let run_dir = bench_dir.join("run");
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir)
            .map_err(|e| format!("cannot clear {}: {e}", run_dir.display()))?;
    }
    fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    Ok((target_dir, bench_dir, run_dir))
}

fn run(s: &Settings) -> Result {
    let (target_dir, bench_dir, run_dir) = prepare_dirs()?;

    let tools = Tools::find(&target_dir);
    let gateway_bin = tools
        .gateway
        .clone()
        .unwrap_or_else(|| target_dir.join("release/gateway"));
    let wrk_bin = tools
        .wrk
        .clone()
        .ok_or("wrk not found: run `cargo xtask setup`")?;
    if tools.nginx.is_none() {
        return Err("nginx not found (it is the backend): run `cargo xtask setup`".into());
    }

    let cpus = procs::allowed_cpus();
    let ports = Ports { base: s.port_base };
    let place = match (cpus.as_slice(), &tools.taskset) {
        ([a, b, ..], Some(_)) => Placement {
            client_cpu: Some(*a),
            proxy_cpu: Some(*b),
            ports,
        },
        _ => {
            println!(
                "note: not pinning (allowed CPUs {cpus:?}, taskset {:?}): numbers will be noisier",
                tools.taskset
            );
            Placement {
                client_cpu: None,
                proxy_cpu: None,
                ports,
            }
        }
    };

    let stage = s.validation || s.ratelimit;
    let used: Vec<SocketAddr> = if stage {
        ports.validation().to_vec()
    } else {
        ports.all().to_vec()
    };
    for a in used {
        procs::ensure_port_free(a)?;
    }

    println!(
        "pinning: backend + wrk on CPU {}, proxy under test on CPU {}",
        place.client_cpu.map_or("any".into(), |c| c.to_string()),
        place.proxy_cpu.map_or("any".into(), |c| c.to_string())
    );

    let ready = Duration::from_secs(10);
    let mut backend = targets::start_backend(&tools, place, &run_dir)?;
    backend
        .wait_ready(ports.backend(), "/", ready)
        .map_err(|e| format!("backend: {e}"))?;

    let mut list: Vec<Target> = Vec::new();
    if !stage {
        list.push(Target {
            name: "direct",
            addr: ports.backend(),
            server: None,
            with_children: false,
            dead: None,
        });
    }
    let mut skipped: Vec<String> = Vec::new();
    type Start = fn(&Tools, Placement, &std::path::Path) -> Result<Server>;
    let proxies: Vec<(&'static str, SocketAddr, bool, bool, Start)> = if s.ratelimit {
        vec![
            (
                VALIDATED,
                ports.gateway_validated(),
                tools.gateway.is_some(),
                false,
                targets::start_gateway_validated,
            ),
            (
                LIMITED,
                ports.gateway(),
                tools.gateway.is_some(),
                false,
                targets::start_gateway_limited,
            ),
        ]
    } else if s.validation {
        vec![
            (
                PASSTHROUGH,
                ports.gateway(),
                tools.gateway.is_some(),
                false,
                targets::start_gateway,
            ),
            (
                VALIDATED,
                ports.gateway_validated(),
                tools.gateway.is_some(),
                false,
                targets::start_gateway_validated,
            ),
        ]
    } else {
        vec![
            (
                "gateway",
                ports.gateway(),
                tools.gateway.is_some(),
                false,
                targets::start_gateway,
            ),
            (
                "gateway-baseline",
                ports.gateway_baseline(),
                s.baseline,
                false,
                targets::start_gateway_baseline,
            ),
            (
                "haproxy",
                ports.haproxy(),
                tools.haproxy.is_some(),
                false,
                targets::start_haproxy,
            ),
            (
                "nginx",
                ports.nginx(),
                true,
                true,
                targets::start_nginx_proxy,
            ),
        ]
    };
    for (name, addr, present, with_children, start) in proxies {
        if name == "gateway-baseline" && !present {
            continue; // not asked for
        }
        if !present {
            let why = match name {
                n if n.starts_with("gateway") => {
                    format!(
                        "{} not found (build it: cargo build --release -p gateway)",
                        gateway_bin.display()
                    )
                }
                _ => format!("{name} not found on PATH (cargo xtask setup)"),
            };
            println!("skipping {name}: {why}");
            skipped.push(format!("{name}: {why}"));
            continue;
        }
        let started = start(&tools, place, &run_dir).and_then(|mut srv| {
            srv.wait_ready(addr, "/", ready)?;
            if name == VALIDATED || name == LIMITED {
                check_validating(addr).map_err(|e| format!("{e}; {}", srv.log_tail(10)))?;
            }
            Ok(srv)
        });
        enlist(started, name, addr, with_children, &mut list, &mut skipped)?;
    }

    if stage && list.len() < 2 {
        return Err(format!(
            "--validation / --ratelimit need both gateways running: {}",
            skipped.join("; ")
        ));
    }

    println!(
        "measuring {} target(s): {} round(s) × ({} s warm-up + {} s), wrk -t1 -c{}; about {} s",
        list.len(),
        s.rounds,
        s.warmup,
        s.duration,
        s.connections,
        s.rounds as u64 * list.len() as u64 * (s.warmup + s.duration)
    );
    let script = gateway_benches::wrk::write_script(&run_dir)?;
    let load = Load {
        wrk: &wrk_bin,
        taskset: tools.taskset.as_deref(),
        cpus: place.client_cpu.as_slice(),
        threads: 1,
        script: &script,
        connections: s.connections,
        scheme: "http",
        path: "/v1/chat/completions",
    };

    let started_at = SystemTime::now();
    let clock = Instant::now();
    let samples = measure_rounds(&mut list, &mut backend, &load, s)?;

    let names: Vec<&'static str> = list.iter().map(|t| t.name).collect();
    let summaries = report::summarize(&names, &samples);
    let versions = json!({
        "gateway": tools.gateway.as_deref().map(|g| procs::version_line(g, &["--version"])),
        "haproxy": tools.haproxy.as_deref().filter(|_| !stage).map(|h| procs::version_line(h, &["-v"])),
        "nginx": tools.nginx.as_deref().map(|n| procs::version_line(n, &["-v"])),
        "wrk": procs::version_line(&wrk_bin, &["-v"]),
    });
    let meta = json!({
        "mode": if s.ratelimit { "ratelimit" } else if s.validation { "validation" } else { "proxies" },
        "timestamp": report::rfc3339_utc(started_at),
        "elapsed_s": clock.elapsed().as_secs_f64(),
        "machine": { "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()), "allowed_cpus": cpus },
        "versions": versions,
        "settings": {
            "rounds": s.rounds, "duration_s": s.duration, "warmup_s": s.warmup,
            "connections": s.connections, "wrk_threads": 1,
            "client_cpu": place.client_cpu, "proxy_cpu": place.proxy_cpu, "port_base": s.port_base,
            "request": format!("POST /v1/chat/completions, {}-byte JSON body", gateway_benches::wrk::REQUEST_BODY.len()),
            "response_body_bytes": targets::BACKEND_BODY.len(),
        },
        "skipped": skipped,
        "dead": list.iter().filter_map(|t| t.dead.as_ref().map(|d| json!({"target": t.name, "why": d}))).collect::<Vec<_>>(),
    });
    if stage {
        return report_stage(
            s.ratelimit,
            meta,
            &samples,
            &summaries,
            &bench_dir,
            &run_dir,
            place.ports,
            &list,
            &skipped,
        );
    }
    let results = report::results_json(meta, &samples, &summaries);
    let json_path = bench_dir.join("results.json");
    write_json(&json_path, &results)?;
    let subtitle = format!(
        "wrk -t1 -c{} · median of {} × {} s · one proxy core · {} CPUs",
        s.connections,
        s.rounds,
        s.duration,
        cpus.len()
    );
    let svg_path = bench_dir.join("throughput.svg");
    fs::write(&svg_path, report::svg(&summaries, &subtitle))
        .map_err(|e| format!("{}: {e}", svg_path.display()))?;

    println!();
    print!("{}", report::table(&summaries));
    println!();
    print_casualties(&list, &skipped);
    println!("raw rounds: {}", json_path.display());
    println!("chart:      {}", svg_path.display());
    println!("logs:       {}", run_dir.display());
    Ok(())
    // `list` and `backend` drop here: every server is stopped.
}

/// `--workers`: the plain-proxy gateway once per worker count listed, all in
/// front of one backend, under one load; `scaling.json` and the table.
fn run_scaling(s: &Settings) -> Result {
    let (target_dir, bench_dir, run_dir) = prepare_dirs()?;
    let tools = Tools::find(&target_dir);
    let gateway_bin = tools.gateway.clone().ok_or_else(|| {
        format!(
            "{} not found (build it: cargo build --release -p gateway, or set GATEWAY_BIN)",
            target_dir.join("release/gateway").display()
        )
    })?;
    let wrk_bin = tools
        .wrk
        .clone()
        .ok_or("wrk not found: run `cargo xtask setup`")?;
    if tools.nginx.is_none() {
        return Err("nginx not found (it is the backend): run `cargo xtask setup`".into());
    }

    let cpus = procs::allowed_cpus();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ports = Ports { base: s.port_base };
    let plan = targets::scaling_placement(&cpus, &s.workers, tools.taskset.is_some());
    let max = s.workers.iter().copied().max().unwrap_or(1);
    // Backend workers and wrk threads: one per client CPU, so the client
    // side grows with the machine; unpinned, what the largest gateway leaves.
    let client_n = if plan.client.is_empty() {
        cpus.len().saturating_sub(max).max(1)
    } else {
        plan.client.len()
    };
    // wrk gives each thread connections / threads of them: at least one each.
    let wrk_threads = client_n.min(s.connections as usize) as u32;

    let mut used = vec![ports.backend()];
    for i in 0..s.workers.len() {
        used.extend([ports.gateway_scaled(i), ports.gateway_scaled_admin(i)]);
    }
    for a in used {
        procs::ensure_port_free(a)?;
    }

    // Said before the run and again under the table: a ratio measured on
    // shared CPUs mixes the gateway's scaling with the load generator losing CPU.
    let mut warnings: Vec<String> = Vec::new();
    if plan.client.is_empty() {
        warnings.push(format!(
            "not pinning (allowed CPUs {cpus:?}, taskset {:?}): the gateway, the backend and wrk \
             all share the CPUs; the ratios are not clean scaling figures",
            tools.taskset
        ));
    } else {
        println!(
            "pinning: backend (nginx, {client_n} worker(s)) + wrk ({wrk_threads} thread(s)) on CPU {}",
            procs::cpu_list(&plan.client)
        );
        for g in &plan.gateways {
            println!(
                "pinning: gateway --workers {} on CPU {}{}",
                g.workers,
                procs::cpu_list(&g.cpus),
                if g.shared {
                    " (shared with backend + wrk)"
                } else {
                    ""
                }
            );
            if g.shared {
                warnings.push(format!(
                    "--workers {}: the gateway shares CPU(s) with the backend and wrk (this machine \
                     allows {} CPU(s); a clean figure for {} workers needs {}): its ratio is not a \
                     clean scaling figure, the extra workers take CPU from the load generator",
                    g.workers,
                    cpus.len(),
                    g.workers,
                    g.workers + 1
                ));
            }
        }
    }
    for g in plan.gateways.iter().filter(|g| g.oversubscribed) {
        warnings.push(format!(
            "--workers {}: more workers than CPUs ({}): some workers share a CPU",
            g.workers,
            cpus.len().max(1)
        ));
    }
    for w in &warnings {
        println!("WARNING: {w}");
    }

    let ready = Duration::from_secs(10);
    let mut backend = targets::start_backend_on(&tools, ports, &plan.client, client_n, &run_dir)?;
    backend
        .wait_ready(ports.backend(), "/", ready)
        .map_err(|e| format!("backend: {e}"))?;

    let mut list: Vec<Target> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for (i, g) in plan.gateways.iter().enumerate() {
        // Target names are `&'static str` all through the report; a handful
        // of short names, once per run: leaking them is the simple way.
        let name: &'static str = Box::leak(format!("gateway-w{}", g.workers).into_boxed_str());
        let addr = ports.gateway_scaled(i);
        let started = targets::start_gateway_scaled(&tools, ports, i, g.workers, &g.cpus, &run_dir)
            .and_then(|mut srv| {
                srv.wait_ready(addr, "/", ready)?;
                Ok(srv)
            });
        enlist(started, name, addr, false, &mut list, &mut skipped)?;
    }
    if list.is_empty() {
        return Err(format!("no gateway started: {}", skipped.join("; ")));
    }

    println!(
        "measuring {} worker count(s): {} round(s) × ({} s warm-up + {} s), wrk -t{} -c{}; about {} s",
        list.len(),
        s.rounds,
        s.warmup,
        s.duration,
        wrk_threads,
        s.connections,
        s.rounds as u64 * list.len() as u64 * (s.warmup + s.duration)
    );
    let script = gateway_benches::wrk::write_script(&run_dir)?;
    let load = Load {
        wrk: &wrk_bin,
        taskset: tools.taskset.as_deref(),
        cpus: &plan.client,
        threads: wrk_threads,
        script: &script,
        connections: s.connections,
        scheme: "http",
        path: "/v1/chat/completions",
    };
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let samples = measure_rounds(&mut list, &mut backend, &load, s)?;

    let names: Vec<&'static str> = list.iter().map(|t| t.name).collect();
    let summaries = report::summarize(&names, &samples);
    let mut rows: Vec<report::ScalingRow> = plan
        .gateways
        .iter()
        .map(|g| report::ScalingRow {
            workers: g.workers,
            cpus: g.cpus.clone(),
            shared: g.shared,
            oversubscribed: g.oversubscribed,
            summary: summaries
                .iter()
                .find(|x| x.target == format!("gateway-w{}", g.workers))
                .cloned(),
            ratio: None,
        })
        .collect();
    report::scaling_ratios(&mut rows);

    let meta = json!({
        "mode": "scaling",
        "timestamp": report::rfc3339_utc(started_at),
        "elapsed_s": clock.elapsed().as_secs_f64(),
        "machine": { "nproc": nproc, "allowed_cpus": cpus },
        "versions": {
            "gateway": procs::version_line(&gateway_bin, &["--version"]),
            "nginx": tools.nginx.as_deref().map(|n| procs::version_line(n, &["-v"])),
            "wrk": procs::version_line(&wrk_bin, &["-v"]),
        },
        "settings": {
            "workers": s.workers, "ratio_base_workers": s.workers[0],
            "rounds": s.rounds, "duration_s": s.duration, "warmup_s": s.warmup,
            "connections": s.connections, "wrk_threads": wrk_threads,
            "backend_workers": client_n, "client_cpus": plan.client, "port_base": s.port_base,
            "request": format!("POST /v1/chat/completions, {}-byte JSON body", gateway_benches::wrk::REQUEST_BODY.len()),
            "response_body_bytes": targets::BACKEND_BODY.len(),
            "gateway_command": format!(
                "gateway run --listen {} --upstream {} --workers N --admin {} --no-access-log",
                ports.gateway_scaled(0), ports.backend(), ports.gateway_scaled_admin(0)
            ),
        },
        "warnings": warnings,
        "skipped": skipped,
        "dead": list.iter().filter_map(|t| t.dead.as_ref().map(|d| json!({"target": t.name, "why": d}))).collect::<Vec<_>>(),
    });
    let mut results = report::results_json(meta, &samples, &summaries);
    results["scaling"] = report::scaling_json(&rows);
    let json_path = bench_dir.join("scaling.json");
    write_json(&json_path, &results)?;

    println!();
    print!("{}", report::scaling_table(&rows));
    println!(
        "nproc {nproc} (allowed CPUs {}); backend (nginx, {client_n} worker(s)) + wrk (-t{wrk_threads} -c{}) on CPU {}; \
         scaling = req/s over that of --workers {}; cores = gateway CPU µs/req × req/s",
        procs::cpu_list(&cpus),
        s.connections,
        if plan.client.is_empty() { "any".into() } else { procs::cpu_list(&plan.client) },
        s.workers[0]
    );
    if rows.iter().any(|r| r.shared) {
        println!("* shares CPUs with the backend and wrk: NOT a clean scaling figure");
    }
    for w in &warnings {
        println!("WARNING: {w}");
    }
    print_casualties(&list, &skipped);
    println!("raw rounds: {}", json_path.display());
    println!("logs:       {}", run_dir.display());
    Ok(())
    // `list` and `backend` drop here: every server is stopped.
}

/// A proxy that started joins the targets; one that didn't is skipped (and
/// said so), unless the run is being stopped.
fn enlist(
    started: Result<Server>,
    name: &'static str,
    addr: SocketAddr,
    with_children: bool,
    list: &mut Vec<Target>,
    skipped: &mut Vec<String>,
) -> Result {
    match started {
        Ok(srv) => {
            println!("{name}: ready on {addr} (pid {})", srv.pid());
            list.push(Target {
                name,
                addr,
                server: Some(srv),
                with_children,
                dead: None,
            });
        }
        Err(e) if procs::stop_requested() => return Err(e),
        Err(e) => {
            println!("skipping {name}: failed to start: {e}");
            skipped.push(format!("{name}: failed to start: {e}"));
        }
    }
    Ok(())
}

/// The targets that died during the run, and those never started.
fn print_casualties(list: &[Target], skipped: &[String]) {
    for t in list {
        if let Some(d) = &t.dead {
            println!("{}: DIED during the run: {d}", t.name);
        }
    }
    for sk in skipped {
        println!("skipped {sk}");
    }
}

/// Write a results document, pretty-printed.
fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// Every target once per round, the order rotating each round so no target
/// always runs first (or right after another); one line per run as it ends.
fn measure_rounds(
    list: &mut [Target],
    backend: &mut Server,
    load: &Load,
    s: &Settings,
) -> Result<Vec<Sample>> {
    let mut samples: Vec<Sample> = Vec::new();
    let width = list.iter().map(|t| t.name.len()).max().unwrap_or(0).max(8);
    for round in 0..s.rounds {
        // Rotate the order so no target always runs first (or right after another).
        let n = list.len();
        for k in 0..n {
            let t = &mut list[(k + round) % n];
            if procs::stop_requested() {
                return Err("interrupted".into());
            }
            if t.dead.is_some() {
                continue;
            }
            let outcome = measure(t, backend, load, s);
            // wrk prints partial numbers on Ctrl-C: do not show them as a result.
            if procs::stop_requested() {
                return Err("interrupted".into());
            }
            match &outcome {
                Ok(m) => println!(
                    "round {}/{} {:<width$} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {}  errors {} non-2xx {}",
                    round + 1,
                    s.rounds,
                    t.name,
                    m.wrk.rps(),
                    m.wrk.p50_us / 1e3,
                    m.wrk.p99_us / 1e3,
                    m.proxy_cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1} µs/req")),
                    m.wrk.socket_errors(),
                    m.wrk.non_2xx
                ),
                Err(e) => println!("round {}/{} {:<width$} FAILED: {e}", round + 1, s.rounds, t.name),
            }
            samples.push(Sample {
                round: round + 1,
                target: t.name,
                outcome,
            });
            if backend.exited().is_some() {
                return Err(format!("the backend died: {}", backend.log_tail(15)));
            }
        }
    }
    Ok(samples)
}

/// The two gateways of a `--validation` run.
const PASSTHROUGH: &str = "gateway-passthrough";
const VALIDATED: &str = "gateway-validated";
/// `--ratelimit`'s second gateway.
const LIMITED: &str = "gateway-ratelimited";

/// Before measuring it, make sure the validating gateway does validate: the
/// load's request goes through (200), the same request for a model outside
/// the catalogue is refused by the gateway itself (404).
fn check_validating(addr: SocketAddr) -> Result {
    let path = "/v1/chat/completions";
    let body = gateway_benches::wrk::REQUEST_BODY;
    let model = targets::request_model()?;
    match procs::post_json_status(addr, path, body)? {
        200 => {}
        code => {
            return Err(format!(
                "the bench request was answered {code}, not 200: is `{model}` in the catalogue?"
            ))
        }
    }
    let unknown = body.replacen(&format!("\"{model}\""), "\"not-in-the-catalogue\"", 1);
    match procs::post_json_status(addr, path, &unknown)? {
        404 => Ok(()),
        code => Err(format!(
            "a request for an unknown model was answered {code}, not 404: validation is not on"
        )),
    }
}

/// `--validation` / `--ratelimit`: the table, the cost of the stage,
/// `validation.json` / `ratelimit.json`.
#[allow(clippy::too_many_arguments)]
fn report_stage(
    ratelimit: bool,
    mut meta: serde_json::Value,
    samples: &[Sample],
    summaries: &[report::Summary],
    bench_dir: &std::path::Path,
    run_dir: &std::path::Path,
    ports: Ports,
    list: &[Target],
    skipped: &[String],
) -> Result {
    let (base, measured, file, label) = if ratelimit {
        (VALIDATED, LIMITED, "ratelimit.json", "rate-limit cost")
    } else {
        (PASSTHROUGH, VALIDATED, "validation.json", "validation cost")
    };
    let find = |name: &str| summaries.iter().find(|s| s.target == name);
    let cost = find(base)
        .zip(find(measured))
        .and_then(|(p, v)| report::validation_cost(p, v));
    let model = targets::request_model()?;
    meta["validated_config"] = json!(targets::gateway_validated_config(ports, &model));
    if ratelimit {
        meta["ratelimited_config"] = json!(targets::gateway_limited_config(ports, &model));
    }
    meta["passthrough_command"] = json!(format!(
        "gateway run --listen {} --upstream {} --workers 1 --admin {} --no-access-log",
        ports.gateway(),
        ports.backend(),
        ports.gateway_admin()
    ));
    let mut results = report::results_json(meta, samples, summaries);
    results[if ratelimit {
        "ratelimit_cost"
    } else {
        "validation_cost"
    }] = report::validation_cost_json(cost.as_ref());
    let json_path = bench_dir.join(file);
    write_json(&json_path, &results)?;

    println!();
    print!(
        "{}",
        report::validation_table(summaries, cost.as_ref(), label)
    );
    println!();
    for t in list {
        if let Some(d) = &t.dead {
            println!("{}: DIED during the run: {d}", t.name);
        }
    }
    for sk in skipped {
        println!("skipped {sk}");
    }
    println!("raw rounds: {}", json_path.display());
    println!(
        "config:     {}",
        run_dir.join(format!("{measured}/gateway.toml")).display()
    );
    println!("logs:       {}", run_dir.display());
    Ok(())
}

/// Warm up, then measure one target: wrk's numbers and the proxy's CPU per request.
fn measure(
    t: &mut Target,
    backend: &mut Server,
    load: &Load,
    s: &Settings,
) -> std::result::Result<Measured, String> {
    let addr = t.addr;
    if s.warmup > 0 {
        load.run(addr, s.warmup)
            .map_err(|e| format!("warm-up: {e}"))?;
    }
    let cpu =
        |srv: &Option<Server>, children: bool| srv.as_ref().and_then(|p| p.cpu_seconds(children));
    let proxy_before = cpu(&t.server, t.with_children);
    let backend_before = backend.cpu_seconds(true);
    let result = load.run(addr, s.duration);
    let proxy_after = cpu(&t.server, t.with_children);
    let backend_after = backend.cpu_seconds(true);

    if let Some(srv) = t.server.as_mut() {
        if let Some(status) = srv.exited() {
            let why = format!("exited with {status}; {}", srv.log_tail(20));
            t.dead = Some(why.clone());
            return Err(why);
        }
    }
    let wrk = result?;
    let per_req = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) if wrk.requests > 0 => Some((a - b) * 1e6 / wrk.requests as f64),
        _ => None,
    };
    Ok(Measured {
        proxy_cpu_us_per_req: per_req(proxy_before, proxy_after),
        backend_cpu_us_per_req: per_req(backend_before, backend_after),
        wrk,
    })
}
