//! `cargo xtask <command>`: the project's automation, in plain Rust so it runs
//! wherever cargo does (the alias lives in `.cargo/config.toml`).
//!
//! Every command prints each step before running it and exits non-zero on the
//! first failure.
#![deny(unsafe_op_in_unsafe_fn)]

mod demo;
mod dist;
mod fuzz;

use std::env;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup                 install what's missing: apt packages (haproxy, nginx, redis, wrk, curl, iproute2, nftables,
                        LLVM 22), nightly rust-src, bpf-linker (the XDP program's toolchain)
  test                  setup, release builds, the whole test suite, compile the criterion benches, and
                        fuzz every parser briefly (fixed seed, 30,000 runs or 20 s each)
  dist                  the Debian package: target/dist/gateway_<version>_<arch>.deb (binary,
                        systemd unit, /etc/gateway/gateway.toml, man page, shell completions)
  fuzz [--seconds N] [TARGET...]
                        coverage-guided fuzzing (libFuzzer + AddressSanitizer, nightly) of the parsers: HTTP/1
                        request and response heads, chunked bodies, SSE filter + usage scan (split-invariant),
                        metrics scrapes and ORCA, the config loader, KServe gRPC messages, X.509 names, JSON
                        bodies against a DOM (json_differential), authn, the XDP program against a model (xdp,
                        root); kept
                        crash inputs replayed first (fuzz/regressions/); N seconds each (default 60);
                        --smoke: committed seeds only, fixed seed and run count (what `test` runs)
  run [--load] [GATEWAY ARGS]
                        the demo: three simulated GPUs (127.0.0.1:8001-8003) behind the gateway on
                        127.0.0.1:8080 (OpenAI route, model catalogue, demo API key, rate limit,
                        prefix- and GPU-aware routing), with curl and OpenAI SDK lines to try;
                        --load drives a little traffic so the metrics move
  bench tls [--rounds N] [--duration SECS] [--connections C]
                        TLS 1.3 termination vs HAProxy 2.6 (one pinned thread each): TLS only, + ES256 JWT with
                        a distinct token per request, + ES256 JWT from a hot set (target/bench/tls.json)
  bench h2 [--rounds N] [--duration SECS] [--connections C] [--streams M] [--quick]
                        HTTP/2 front (h2c), HTTP/1.1 backend: the gateway vs HAProxy 2.6 vs nginx, one pinned
                        worker each, h2load 64 conns x 10 streams; gRPC unary via the gateway vs direct
                        (target/bench/h2.json)
  bench xdp [--pps N] [--seconds S]
                        SYN flood from one netns to the gateway's, dropped by XDP vs nftables vs the
                        userspace fallback: pps, softirq ns/packet, legitimate goodput kept (target/bench/xdp.json)
  bench [--validation | --ratelimit | --workers N,N,...] [--baseline BIN] [--quick] [--rounds N] [--duration SECS] [--connections C]
        [--warmup SECS] [--port-base P]
                        load benchmark: backend direct vs gateway vs HAProxy vs nginx (see target/bench/);
                        --validation: the gateway as a plain proxy vs validating every chat completion
                        (target/bench/validation.json); --ratelimit: the validating gateway vs the same with
                        rate/token/concurrency limits the load stays under (target/bench/ratelimit.json);
                        --workers 1,2,4: the gateway alone with each worker count, req/s and the ratio to the
                        first count (target/bench/scaling.json); --baseline BIN: a second gateway build
                        measured in the same rounds (before/after a change)
  bench routing [--workload mixed|shared_prefix|multi_turn|no_prefix] [--policies LIST] [--gateways N]
        [--duration SECS] [--loads 0.6,0.8,0.9] [--seed N] [--quick] [--groups G] [--popularity zipf|uniform]
        [--system-tokens N] [--turns N]
                        simulated GPU pool (vLLM-like prefix cache) behind the gateway: the balancing algorithms
                        under open-loop Poisson load; mixed (default): round_robin vs least_request vs gie_like
                        vs gpu_aware, p50/p99, TTFT (target/bench/routing.json, .svg); shared_prefix, multi_turn,
                        no_prefix: also gie_prefix, prefix_aware and `pin` (client-side affinity), TTFT
                        p50/p90/p99, prefix cache hit ratio (target/bench/routing-<workload>.json, .svg);
                        --gateways 2: two gateways in front of the same pool
  bench routing --saturate [--runs on,off,uncapped] [--cap inflight|scraped] [--flood F] [--light L]
        [--max-wait SECS] [--batch N] [--duration SECS] [--seed N] [--quick]
                        flow control past capacity (1.4×): five tenants (API keys), one flooding at 5× its equal
                        share, one in a higher band; the gateway with [clusters.X.queue] (fair by tenant) vs the
                        same saturation without a queue (503 at once) vs no saturation cap; goodput, 429/503,
                        per-tenant TTFT vs unloaded, queue wait p99 per band, Jain's fairness index
                        (target/bench/routing-saturate.json, .svg); also --workload saturate
  chaos [--scale S] [--threads N] [--reload-seconds N] [--connections N] [--soak-minutes N] [--no-faults]
                        faults under steady load (GETs, SSE streams over HTTP and TLS) against a gateway in front
                        of two gpu-sim processes with Redis-synced limits: backend killed, backend frozen
                        (SIGSTOP), Redis killed, config reloaded every second for a minute, TLS certificate
                        rotated, SIGTERM drain; per fault: requests, failures by class, streams cut, recovery
                        (target/bench/chaos.md); S stretches every window (default 3); first, resource
                        exhaustion: RSS per idle connection, a light client's p99 under N idle / N slowloris
                        connections, slow uploads, slow readers, 300 streams; --soak-minutes: RSS trend
  cargo bench -p gateway-benches --bench ratelimit
                        criterion: one limiter decision on 1 core, all levels, the same key from every core
";

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    let outcome = match command.as_deref() {
        Some("setup") => setup(),
        Some("test") => test(),
        Some("run") => demo::run(&rest),
        Some("dist") => dist::dist().map(|_| ()),
        Some("fuzz") => fuzz::fuzz(&rest),
        Some("bench") => bench(&rest),
        Some("chaos") => chaos(&rest),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        None => Err(format!("no command given\n\n{USAGE}")),
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// setup

/// How a missing prerequisite gets installed.
enum Install {
    /// Debian packages, installed with `apt-get install`.
    Apt(&'static [&'static str]),
    /// The nightly toolchain's `rust-src` component (the XDP program is
    /// built with `-Z build-std=core`).
    RustSrc,
    /// `bpf-linker`, built against Debian's LLVM 22 (`cargo install`, about
    /// 5 minutes on 2 cores; skipped when present).
    BpfLinker,
    /// Python packages from PyPI (`python3 -m pip install`): clients written
    /// by others that the tests drive the gateway with.
    Pip(&'static [&'static str]),
}

/// One prerequisite, present when `check` says so.
struct Prereq {
    name: &'static str,
    check: fn() -> Option<String>,
    install: Install,
    why: &'static str,
}

fn on_path(name: &'static str) -> impl Fn() -> Option<String> {
    move || find_program(name).map(|p| p.display().to_string())
}

/// LLVM 22 development files bpf-linker links against.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Everything the project needs outside cargo. Append to extend `setup`.
const PREREQS: &[Prereq] = &[
    Prereq {
        name: "haproxy",
        check: || on_path("haproxy")(),
        install: Install::Apt(&["haproxy"]),
        why: "load-bench peer",
    },
    Prereq {
        name: "redis-server",
        check: || on_path("redis-server")(),
        install: Install::Apt(&["redis-server"]),
        why: "fleet-wide rate limits: tests run two gateways against a real Redis",
    },
    Prereq {
        name: "nginx",
        check: || on_path("nginx")(),
        install: Install::Apt(&["nginx"]),
        why: "load-bench backend and peer",
    },
    Prereq {
        name: "wrk",
        check: || on_path("wrk")(),
        install: Install::Apt(&["wrk"]),
        why: "load generator",
    },
    Prereq {
        name: "curl",
        check: || on_path("curl")(),
        install: Install::Apt(&["curl"]),
        why: "tests (clients in network namespaces), `cargo xtask run` examples",
    },
    Prereq {
        name: "ip",
        check: || on_path("ip")(),
        install: Install::Apt(&["iproute2"]),
        why: "XDP tests and bench (network namespaces, veth)",
    },
    Prereq {
        name: "nft",
        check: || on_path("nft")(),
        install: Install::Apt(&["nftables"]),
        why: "XDP bench peer (nftables drop)",
    },
    Prereq {
        name: "bpftool",
        check: || on_path("bpftool")(),
        install: Install::Apt(&["bpftool"]),
        why: "XDP bench: the program's own run time",
    },
    Prereq {
        name: "testssl",
        check: || on_path("testssl")(),
        install: Install::Apt(&["testssl.sh"]),
        why: "TLS test: no weak protocol, cipher or known vulnerability",
    },
    Prereq {
        name: "openssl",
        check: || on_path("openssl")(),
        install: Install::Apt(&["openssl"]),
        why: "tests: RSA keys",
    },
    Prereq {
        name: "g++",
        check: || on_path("g++")(),
        install: Install::Apt(&["g++"]),
        why: "fuzzing: libFuzzer is C++",
    },
    Prereq {
        name: "nghttp2-client",
        check: || on_path("h2load")(),
        install: Install::Apt(&["nghttp2-client"]),
        why: "tests: HTTP/2 clients (nghttp, h2load) against the h2c listener",
    },
    Prereq {
        name: "chromium",
        check: || on_path("chromium")(),
        install: Install::Apt(&["chromium"]),
        why: "tests: the admin dashboard in a real (headless) browser",
    },
    Prereq {
        name: "python3",
        check: || python_imports("import pip"),
        install: Install::Apt(&["python3", "python3-pip"]),
        why: "tests: the Python clients (OpenAI SDK, tritonclient) run on it",
    },
    Prereq {
        name: "py-clients",
        check: || python_imports(
            "import openai, tritonclient.http, tritonclient.grpc, h2, grpc; from grpc_health.v1 import health_pb2",
        ),
        // grpcio-health-checking 1.76+ is generated for protobuf 7, which
        // tritonclient[grpc] does not take yet.
        install: Install::Pip(&[
            "openai",
            "tritonclient[http,grpc]",
            "h2",
            "grpcio",
            "grpcio-health-checking<1.76",
        ]),
        why: "tests: the OpenAI Python SDK and tritonclient (HTTP and gRPC) through the gateway; h2 crafts HTTP/2 frames; grpcio on both sides of gRPC routes",
    },
    Prereq {
        name: "llvm-22",
        check: || {
            Path::new("/usr/lib/llvm-22/bin/llvm-config")
                .exists()
                .then(|| "/usr/lib/llvm-22".into())
        },
        install: Install::Apt(LLVM_PACKAGES),
        why: "bpf-linker links against it",
    },
    Prereq {
        name: "rust-src",
        check: nightly_rust_src,
        install: Install::RustSrc,
        why: "builds the XDP program (nightly -Z build-std=core)",
    },
    Prereq {
        name: "bpf-linker",
        check: bpf_linker,
        install: Install::BpfLinker,
        why: "links the XDP program",
    },
];

fn bpf_linker() -> Option<String> {
    on_path("bpf-linker")().or_else(cargo_bin("bpf-linker"))
}

fn cargo_bin(name: &'static str) -> impl Fn() -> Option<String> {
    move || {
        let home = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let p = home.join("bin").join(name);
        p.exists().then(|| p.display().to_string())
    }
}

/// Whether `python3` runs `code` (imports) cleanly.
fn python_imports(code: &'static str) -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", code])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".into())
}

fn nightly_rust_src() -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    src.exists().then(|| src.display().to_string())
}

fn setup() -> Result {
    let mut missing = Vec::new();
    for p in PREREQS {
        match (p.check)() {
            Some(at) => println!("setup: {:<10} ok      {at}", p.name),
            None => {
                println!("setup: {:<10} missing ({})", p.name, p.why);
                missing.push(p);
            }
        }
    }
    if missing.is_empty() {
        println!("setup: all prerequisites present");
        return Ok(());
    }

    let apt_missing: Vec<&str> = missing
        .iter()
        .filter_map(|p| match p.install {
            Install::Apt(pkgs) => Some(pkgs),
            _ => None,
        })
        .flatten()
        .copied()
        // bpf-linker builds against LLVM 22: ask for it with bpf-linker.
        .chain(
            missing
                .iter()
                .any(|p| matches!(p.install, Install::BpfLinker))
                .then_some(LLVM_PACKAGES)
                .into_iter()
                .flatten()
                .copied(),
        )
        .collect();
    if !apt_missing.is_empty() {
        let sudo = if is_root() {
            None
        } else {
            find_program("sudo")
        };
        if !is_root() && sudo.is_none() {
            return Err(format!(
                "missing prerequisites and not root (no sudo either): install them with \
                 `apt-get install -y {}`",
                apt_missing.join(" ")
            ));
        }
        let apt = |args: &[&str]| {
            let mut c = match &sudo {
                Some(s) => {
                    let mut c = Command::new(s);
                    c.arg("apt-get");
                    c
                }
                None => Command::new("apt-get"),
            };
            c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        run_step(&mut apt(&["update", "-qq"]))?;
        let mut install_args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        install_args.extend(&apt_missing);
        run_step(&mut apt(&install_args))?;
    }
    if missing
        .iter()
        .any(|p| matches!(p.install, Install::RustSrc))
    {
        run_step(Command::new("rustup").args([
            "component",
            "add",
            "--toolchain",
            "nightly",
            "rust-src",
        ]))?;
    }
    if missing
        .iter()
        .any(|p| matches!(p.install, Install::BpfLinker))
    {
        run_step(
            Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }

    let pip: Vec<&str> = missing
        .iter()
        .filter_map(|p| match p.install {
            Install::Pip(pkgs) => Some(pkgs),
            _ => None,
        })
        .flatten()
        .copied()
        .collect();
    if !pip.is_empty() {
        let mut args = vec![
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ];
        args.extend(&pip);
        // A Debian-managed Python refuses installs outside a venv (PEP 668):
        // the tests want these packages where `python3` finds them.
        if run_step(Command::new("python3").args(&args)).is_err() {
            args.push("--break-system-packages");
            run_step(Command::new("python3").args(&args))?;
        }
    }

    let still: Vec<&str> = PREREQS
        .iter()
        .filter(|p| (p.check)().is_none())
        .map(|p| p.name)
        .collect();
    if !still.is_empty() {
        return Err(format!("still missing after setup: {}", still.join(", ")));
    }
    println!("setup: done");
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Look a program up on PATH, then in the sbin directories a non-root PATH
/// often lacks (Debian puts haproxy and nginx in /usr/sbin).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

// ---------------------------------------------------------------------------
// test

fn test() -> Result {
    // The XDP program can't be built without nightly rust-src and
    // bpf-linker, and the XDP tests need iproute2 and curl: setup must succeed.
    setup()?;
    build_release_binaries()?;
    let target = target_dir();
    let mut failed = Vec::new();
    let mut tests = cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "gateway-benches",
        // Every test binary runs: one failure doesn't hide the others.
        "--no-fail-fast",
        "--",
        "--test-threads=2",
    ]);
    tests
        .env("GATEWAY_BIN", target.join("release/gateway"))
        .env("DEMO_BACKEND_BIN", target.join("release/demo-backend"));
    if let Err(e) = run_step(&mut tests) {
        failed.push(e);
    }
    // The Debian package, installed and checked (root on a Debian-like host: CI).
    if is_root() && find_program("dpkg-deb").is_some() {
        if let Err(e) = dist::dist().and_then(|deb| dist::check_installed(&deb)) {
            failed.push(format!("dist: {e}"));
        }
    } else {
        println!("xtask test: not root or no dpkg: the Debian package is not built and installed");
    }
    // Compile, never run, the criterion benches so they cannot rot.
    if let Err(e) = run_step(&mut cargo(&["build", "-p", "gateway-benches", "--benches"])) {
        failed.push(e);
    }
    // Every fuzz target briefly, its kept crash inputs first.
    let smoke: Vec<String> = ["--smoke", "--seconds", "20"].map(String::from).to_vec();
    if let Err(e) = fuzz::fuzz(&smoke) {
        failed.push(format!("fuzz: {e}"));
    }
    if failed.is_empty() {
        println!("xtask test: all passed");
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

/// `--flag value` or `--flag=value` from a raw argument list.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_string());
        }
    }
    None
}

fn wait_for_port(child: &mut KillOnDrop, addr: SocketAddr, limit: Duration) -> Result {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.child.try_wait() {
            return Err(format!(
                "{} exited during startup with {status}",
                child.name
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not listen on {addr} within {limit:?}",
        child.name
    ))
}

// ---------------------------------------------------------------------------
// bench

/// Every argument (`--validation`, `--quick`, …) goes to loadbench as given.
fn bench(args: &[String]) -> Result {
    setup()?;
    if args.first().map(String::as_str) == Some("xdp") {
        return bench_xdp(&args[1..]);
    }
    match args.first().map(String::as_str) {
        Some("routing") => return bench_bin("routebench", &args[1..], &[]),
        Some("h2") => return bench_bin("h2bench", &args[1..], &[]),
        Some("tls") => {
            let out = target_dir().join("bench").display().to_string();
            return bench_bin("tlsbench", &args[1..], &["--out", &out]);
        }
        _ => {}
    }
    build_gateway()?;
    let mut cmd = cargo(&[
        "run",
        "--release",
        "-p",
        "gateway-benches",
        "--bin",
        "loadbench",
        "--",
    ]);
    cmd.args(args)
        .env("GATEWAY_BIN", target_dir().join("release/gateway"));
    println!("$ {}", show(&cmd));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    // The harness handles Ctrl-C itself (it stops its servers); wait for it.
    ignore_sigint();
    let status = child
        .wait()
        .map_err(|e| format!("waiting for loadbench: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("loadbench exited with {status}"))
    }
}

/// Build the gateway and the bench binary `name`, then run it with `args`
/// and `extra` (it finds the gateway through `GATEWAY_BIN`).
fn bench_bin(name: &str, args: &[String], extra: &[&str]) -> Result {
    build_gateway()?;
    let target = target_dir();
    let mut cmd = Command::new(build_bench_bin(name)?);
    cmd.args(args)
        .args(extra)
        .env("GATEWAY_BIN", target.join("release/gateway"))
        .current_dir(workspace_root());
    run_step(&mut cmd)
}

/// `cargo build --release` one binary of gateway-benches; its path.
fn build_bench_bin(name: &str) -> Result<PathBuf> {
    run_step(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "gateway-benches",
        "--bin",
        name,
    ]))?;
    Ok(target_dir().join("release").join(name))
}

/// `chaos`: faults under load (benches/src/bin/chaos.rs).
fn chaos(args: &[String]) -> Result {
    setup()?;
    build_gateway()?;
    build_test_bin("gpu-sim")?;
    let target = target_dir();
    let mut cmd = Command::new(build_bench_bin("chaos")?);
    cmd.args(args)
        .args(["--out", &target.join("bench").display().to_string()])
        .env("GATEWAY_BIN", target.join("release/gateway"))
        .env("GPU_SIM_BIN", target.join("release/gpu-sim"))
        .current_dir(workspace_root());
    run_step(&mut cmd)
}

/// `bench xdp`: SYN flood dropped by XDP vs nftables vs the userspace
/// fallback, in network namespaces (root). See benches/src/bin/xdpbench.rs.
fn bench_xdp(args: &[String]) -> Result {
    if !is_root() {
        return Err(
            "bench xdp builds network namespaces and loads XDP programs: run it as root".into(),
        );
    }
    build_release_binaries()?;
    let target = target_dir();
    let mut cmd = Command::new(build_bench_bin("xdpbench")?);
    cmd.arg("run")
        .args(args)
        .args(["--out", &target.join("bench").display().to_string()])
        .env("GATEWAY_BIN", target.join("release/gateway"))
        .env("DEMO_BACKEND_BIN", target.join("release/demo-backend"))
        .current_dir(workspace_root());
    run_step(&mut cmd)
}

// ---------------------------------------------------------------------------
// helpers

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    c.args(args).current_dir(workspace_root());
    c
}

/// The gateway, release build; without the XDP program, saying so, when
/// its toolchain isn't installed (the demo and the package still work).
fn build_gateway_any() -> Result {
    let mut gw = cargo(&["build", "--release", "-p", "gateway", "--bin", "gateway"]);
    if nightly_rust_src().is_none() || bpf_linker().is_none() {
        println!(
            "note: the eBPF toolchain (nightly rust-src, bpf-linker) is not installed: building \
             without the XDP program (the front door is off; everything else works). \
             `cargo xtask setup` installs it."
        );
        gw.env("AYA_BUILD_SKIP", "1");
    }
    run_step(&mut gw)
}

fn build_gateway() -> Result {
    run_step(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "gateway",
        "--bin",
        "gateway",
    ]))
}

/// The gateway and the tests crate's demo backend, release builds.
fn build_release_binaries() -> Result {
    build_gateway()?;
    build_test_bin("demo-backend")
}

/// A release build of one of the tests crate's binaries (`demo-backend`, `gpu-sim`).
fn build_test_bin(name: &str) -> Result {
    run_step(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "gateway-tests",
        "--bin",
        name,
    ]))
}

/// Print a command, run it to completion, fail unless it exits 0.
fn run_step(cmd: &mut Command) -> Result {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", show(cmd)))
    }
}

fn show(cmd: &Command) -> String {
    let envs: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    let mut parts = envs;
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Have the kernel send `signal` to the child if xtask dies first, however it dies.
fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: the closure runs between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn ignore_sigint() {
    // SAFETY: installing SIG_IGN has no handler code to be unsafe in.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// A child process that is killed and reaped when dropped, on every exit path.
struct KillOnDrop {
    name: &'static str,
    child: Child,
}

impl KillOnDrop {
    fn spawn(name: &'static str, mut cmd: Command) -> Result<KillOnDrop> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", show(&cmd)))?;
        Ok(KillOnDrop { name, child })
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
