//! `cargo xtask chaos [--scale S] [--threads N] [--reload-seconds N]`: the
//! long form of `tests/chaos.rs`. Under steady mixed load (idempotent GETs,
//! streamed chat completions over HTTP and over TLS), one fault at a time:
//! a backend killed and restarted, a backend frozen (SIGSTOP) and resumed,
//! Redis killed and restarted, the config reloaded every second for a
//! minute, the TLS certificate rotated, SIGTERM drain. Per fault: requests,
//! ok, failures by kind and outcome, streams cut, recovery time, slowest
//! request; printed as a table and written to target/bench/chaos.md.

use std::time::Duration;

use gateway_tests::chaos::{Faults, Load, Rig, TABLE_HEAD};
use gateway_tests::Driver;

fn main() {
    let mut scale = 3.0;
    let mut threads = 9;
    let mut reload_seconds = 60u64;
    let mut out = std::path::PathBuf::from("target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--scale" => scale = v().parse().expect("--scale S"),
            "--threads" => threads = v().parse().expect("--threads N"),
            "--reload-seconds" => reload_seconds = v().parse().expect("--reload-seconds N"),
            "--out" => out = v().into(),
            other => {
                eprintln!("chaos: unknown argument {other}\nusage: chaos [--scale S] [--threads N] [--reload-seconds N] [--out DIR]");
                std::process::exit(2);
            }
        }
    }
    let mut rig = Rig::start(Driver::Auto);
    let load = Load::start(&rig, threads);
    let f = Faults { scale };
    let mut lines = vec![TABLE_HEAD.to_string()];
    let mut show = |l: String| {
        println!("{l}");
        lines.push(l);
    };
    println!("{TABLE_HEAD}");
    show(f.kill_backend(&mut rig, &load).line());
    show(f.freeze_backend(&mut rig, &load).line());
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
        "{}\n\n{total} requests in all; the gateway exited after SIGTERM with {exit:?}\n",
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
