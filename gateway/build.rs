//! Builds the XDP program (`gateway-ebpf`) with aya-build (nightly +
//! `rust-src` + `bpf-linker`, see DEVELOPERS.md) and leaves the object in
//! `OUT_DIR/gateway-ebpf`, where `xdp::OBJECT` embeds it.
//!
//! `AYA_BUILD_SKIP=1` builds a gateway without XDP (an empty object): it runs
//! with the userspace fallback and says so at start.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=../gateway-common/src");
    version_with_revision();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out.join("gateway-ebpf");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(&object, b"").expect("write empty eBPF object");
    }
    if let Err(e) = aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir: "../gateway-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    ) {
        panic!(
            "building the XDP program failed: {e:#}\n\
             needs: rustup toolchain nightly with rust-src, and bpf-linker \
             (`cargo xtask setup` installs both); AYA_BUILD_SKIP=1 builds without XDP"
        );
    }
}

/// `GATEWAY_VERSION` for `gateway --version`: the package version and the
/// git revision it was built from (`+dirty` with uncommitted changes;
/// `unknown` outside a git checkout).
fn version_with_revision() {
    for f in ["../.git/HEAD", "../.git/index"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(r) if !r.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{r}+dirty")
            } else {
                r
            }
        }
        _ => "unknown".into(),
    };
    println!(
        "cargo:rustc-env=GATEWAY_VERSION={} (git {rev})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}
