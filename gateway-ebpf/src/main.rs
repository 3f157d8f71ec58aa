//! The gateway's XDP object. Built for `bpfel-unknown-none` by
//! `gateway/build.rs` (aya-build) and embedded in the gateway binary; the
//! program itself is in `front_door.rs`.
//!
//! On the host target this crate is only a placeholder binary, so that
//! workspace-wide `cargo check`/`clippy` don't trip over it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod front_door;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("gateway-ebpf is an eBPF object: gateway/build.rs builds it for bpfel-unknown-none");
    std::process::exit(2);
}
