//! `cargo xtask fuzz [--seconds N] [TARGET...]`: coverage-guided fuzzing of
//! the gateway's parsers with libFuzzer (`fuzz/`, on the nightly toolchain
//! the XDP build installs, with AddressSanitizer and SanitizerCoverage —
//! the flags cargo-fuzz would pass, so cargo-fuzz itself is not needed).
//!
//! Each target first replays its regression inputs (`fuzz/regressions/
//! TARGET/`: every crash ever found, kept), then fuzzes for N seconds from
//! its committed seeds (`fuzz/corpus/TARGET/`) plus what earlier runs found
//! (`target/fuzz/corpus/TARGET/`). A crash fails the run and leaves its
//! input in `target/fuzz/artifacts/TARGET/`; copy it into the regressions
//! once fixed. Prints executions per second and corpus size per target.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_step, target_dir, workspace_root, Result};
// `xdp` needs root and a release build (crate::is_root, crate::build_gateway).

/// Every fuzz target (`fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [&str; 12] = [
    "http_request",
    "chunked",
    "http_response",
    "sse_usage",
    "scrape",
    "config",
    "kserve_grpc",
    "x509",
    "json_differential",
    "authn",
    "xdp",
    "h2_frames",
];

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

pub fn fuzz(args: &[String]) -> Result {
    let mut seconds = 60u64;
    let mut smoke = false;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--seconds needs a number")?
            }
            // `cargo xtask test`: from the committed seeds only, a fixed seed
            // and number of runs, so CI's verdict doesn't depend on luck.
            "--smoke" => smoke = true,
            t if TARGETS.contains(&t) => chosen.push(t.to_string()),
            other => {
                return Err(format!(
                    "unknown fuzz target or argument `{other}`; targets: {}",
                    TARGETS.join(", ")
                ))
            }
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let root = workspace_root();
    let out = target_dir().join("fuzz");
    if chosen.iter().any(|t| t == "xdp") {
        if crate::is_root() {
            // The XDP target runs the real program: a release build's object.
            crate::build_gateway()?;
            let object =
                xdp_object().ok_or("no XDP object in target/release/build after the build")?;
            std::env::set_var("GATEWAY_XDP_OBJECT", object);
        } else {
            println!("fuzz: skipping `xdp` (it loads the XDP program: run as root)");
            chosen.retain(|t| t != "xdp");
        }
    }
    build(&root, &out)?;
    let mut report = Vec::new();
    for t in &chosen {
        report.push(run_target(&root, &out, t, seconds, smoke)?);
    }
    println!("\nfuzz: {seconds} s per target");
    println!(
        "{:<14} {:>12} {:>10} {:>10}",
        "target", "execs/s", "corpus", "new"
    );
    for (t, execs, corpus, new) in &report {
        println!("{t:<14} {execs:>12} {corpus:>10} {new:>10}");
    }
    Ok(())
}

/// Build every target with libFuzzer's instrumentation.
fn build(root: &Path, out: &Path) -> Result {
    let flags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg",
        "fuzzing",
        "-Zsanitizer=address",
        "-Cdebug-assertions",
        "-Coverflow-checks",
    ]
    .join(" ");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "build",
        "--release",
        "--bins",
        "--target",
        TRIPLE,
    ])
    .arg("--manifest-path")
    .arg(root.join("fuzz/Cargo.toml"))
    .env("RUSTFLAGS", flags)
    .env("CARGO_TARGET_DIR", out.join("build"))
    .env("AYA_BUILD_SKIP", "1");
    run_step(&mut cmd)
}

/// Replay the regressions, then fuzz: (target, execs/s, corpus, new units).
fn run_target(
    root: &Path,
    out: &Path,
    t: &str,
    seconds: u64,
    smoke: bool,
) -> Result<(String, u64, u64, u64)> {
    let bin = out.join("build").join(TRIPLE).join("release").join(t);
    let regressions = root.join("fuzz/regressions").join(t);
    let files = inputs(&regressions);
    if !files.is_empty() {
        let mut cmd = Command::new(&bin);
        cmd.args(&files);
        run_step(&mut cmd).map_err(|e| format!("{t}: a kept crash input fails again: {e}"))?;
    }
    let corpus = out
        .join(if smoke { "smoke-corpus" } else { "corpus" })
        .join(t);
    let artifacts = out.join("artifacts").join(t);
    if smoke {
        let _ = std::fs::remove_dir_all(&corpus);
    }
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let seeds = root.join("fuzz/corpus").join(t);
    let mut cmd = Command::new(&bin);
    cmd.arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .args(if smoke {
            vec!["-seed=1", "-runs=30000"]
        } else {
            vec![]
        })
        .arg("-max_len=65536")
        .arg("-rss_limit_mb=2048");
    println!("$ fuzz {t} ({seconds} s)");
    let o = cmd.output().map_err(|e| format!("{t}: {e}"))?;
    let log = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "fuzz target {t} found a crash (input in {}):\n{}",
            artifacts.display(),
            tail.join("\n")
        ));
    }
    let stat = |k: &str| -> u64 {
        log.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').next_back())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let size = inputs(&corpus).len() as u64;
    Ok((
        t.to_string(),
        stat("stat::average_exec_per_sec"),
        size,
        stat("stat::new_units_added"),
    ))
}

/// The newest `gateway-ebpf` object a release build of the gateway left.
fn xdp_object() -> Option<PathBuf> {
    let dir = target_dir().join("release/build");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join("out/gateway-ebpf"))
        .filter(|p| p.metadata().is_ok_and(|m| m.len() > 0))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
