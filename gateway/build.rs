//! Builds the XDP program (`gateway-ebpf`) with aya-build (nightly +
//! `rust-src` + `bpf-linker`, see DEVELOPERS.md) and leaves the object in
//! `OUT_DIR/gateway-ebpf`, where `xdp::OBJECT` embeds it.
//!
//! `AYA_BUILD_SKIP=1` builds a gateway without XDP (an empty object): it runs
//! with the userspace fallback and says so at start.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=../gateway-common/src");
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
