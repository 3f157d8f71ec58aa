//! Differential: the real XDP program in the kernel (BPF_PROG_TEST_RUN,
//! root) against a model of the verdict it must give, frame by frame: the
//! action (drop/pass) and the one counter that rises. The program comes
//! from a release build's OUT_DIR (`GATEWAY_XDP_OBJECT`, which `cargo
//! xtask fuzz` sets: this ASan build can't build the BPF object itself).
//!
//! Set up: TCP 8080 and UDP 8443 are the gateway's; 203.0.113.7 and
//! 2001:db8::bad blocked; 198.51.100.9's block expired; 10.0.0.0/8 and
//! fd00::/8 allowlisted, 10.9.9.9 blocked but allowlisted; enforce mode,
//! no quotas (their buckets depend on time).
#![no_main]
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;

use gateway::xdp::kernel::{Loaded, Sizes};
use gateway_common::{BlockEntry, BlockReason, Counter, XdpConfig, MODE_ENFORCE};

const PASS: u32 = 2;
const DROP: u32 = 1;

fn program() -> &'static Mutex<Loaded> {
    static P: OnceLock<Mutex<Loaded>> = OnceLock::new();
    P.get_or_init(|| {
        let path = std::env::var("GATEWAY_XDP_OBJECT").expect(
            "GATEWAY_XDP_OBJECT: the XDP object of a release build (cargo xtask fuzz sets it)",
        );
        let object = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut k = Loaded::load_object(
            &object,
            Sizes {
                blocked: 64,
                tracked_sources: 64,
                allow: 16,
            },
        )
        .expect("load the XDP program (root)");
        k.set_ports(&[(6, 8080), (17, 8443)]).unwrap();
        k.set_config(XdpConfig {
            mode: MODE_ENFORCE,
            ..Default::default()
        })
        .unwrap();
        k.allow("10.0.0.0/8".parse().unwrap()).unwrap();
        k.allow("fd00::/8".parse().unwrap()).unwrap();
        let forever = BlockEntry {
            expires_ns: u64::MAX,
            reason: BlockReason::Manual as u32,
            _pad: 0,
        };
        for a in ["203.0.113.7", "2001:db8::bad", "10.9.9.9"] {
            k.block(a.parse().unwrap(), forever).unwrap();
        }
        k.block(
            "198.51.100.9".parse().unwrap(),
            BlockEntry {
                expires_ns: 1,
                ..forever
            },
        )
        .unwrap();
        Mutex::new(k)
    })
}

/// The model's view of the maps.
fn blocked(a: IpAddr) -> Option<bool> {
    // Some(live)
    match gateway::syntax::canonical(a).to_string().as_str() {
        "203.0.113.7" | "2001:db8::bad" | "10.9.9.9" => Some(true),
        "198.51.100.9" => Some(false),
        _ => None,
    }
}

fn allowlisted(a: IpAddr) -> bool {
    match gateway::syntax::canonical(a) {
        IpAddr::V4(v) => v.octets()[0] == 10,
        IpAddr::V6(v) => v.octets()[0] == 0xfd,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What the parser learns before the verdict: ports (a flow), or a counter
/// and maybe the source (Unparsed).
enum Parsed {
    Flow { src: IpAddr, proto: u8, port: u16 },
    Unparsed(Counter, Option<IpAddr>),
}

fn l4(f: &[u8], at: usize, proto: u8, src: IpAddr) -> Parsed {
    let need = match proto {
        6 => 20,
        17 => 8,
        _ => return Parsed::Unparsed(Counter::PassOtherProtocol, None),
    };
    if f.len() < at + need {
        // A truncated transport header keeps the source (a blocked one is dropped).
        return Parsed::Unparsed(Counter::PassMalformed, Some(src));
    }
    Parsed::Flow {
        src,
        proto,
        port: be16(f, at + 2),
    }
}

fn parse(f: &[u8]) -> Parsed {
    use Counter::*;
    if f.len() < 14 {
        return Parsed::Unparsed(PassMalformed, None);
    }
    let mut et = be16(f, 12);
    let mut l3 = 14;
    for _ in 0..2 {
        if et != 0x8100 && et != 0x88a8 {
            break;
        }
        if f.len() < l3 + 4 {
            return Parsed::Unparsed(PassMalformed, None);
        }
        et = be16(f, l3 + 2);
        l3 += 4;
    }
    match et {
        0x0800 => {
            if f.len() < l3 + 20 {
                return Parsed::Unparsed(PassMalformed, None);
            }
            let ihl = (f[l3] & 0x0f) as usize * 4;
            if f[l3] >> 4 != 4 || ihl < 20 || f.len() < l3 + ihl {
                return Parsed::Unparsed(PassMalformed, None);
            }
            if be16(f, l3 + 6) & 0x1fff != 0 {
                return Parsed::Unparsed(PassFragment, None);
            }
            let src = IpAddr::from([f[l3 + 12], f[l3 + 13], f[l3 + 14], f[l3 + 15]]);
            l4(f, l3 + ihl, f[l3 + 9], src)
        }
        0x86dd => {
            if f.len() < l3 + 40 {
                return Parsed::Unparsed(PassMalformed, None);
            }
            if f[l3] >> 4 != 6 {
                return Parsed::Unparsed(PassMalformed, None);
            }
            let mut next = f[l3 + 6];
            let src: [u8; 16] = f[l3 + 8..l3 + 24].try_into().unwrap();
            let src = IpAddr::from(src);
            let mut off = l3 + 40;
            let ext = |n: u8| matches!(n, 0 | 43 | 60 | 44 | 51);
            for _ in 0..4 {
                if !ext(next) {
                    break;
                }
                if f.len() < off + 8 {
                    return Parsed::Unparsed(PassMalformed, None);
                }
                let len = match next {
                    44 => {
                        if be16(f, off + 2) >> 3 != 0 {
                            return Parsed::Unparsed(PassFragment, None);
                        }
                        8
                    }
                    51 => (f[off + 1] as usize + 2) * 4,
                    _ => (f[off + 1] as usize + 1) * 8,
                };
                next = f[off];
                off += len;
            }
            if ext(next) {
                return Parsed::Unparsed(PassOtherProtocol, Some(src));
            }
            l4(f, off, next, src)
        }
        0x8100 | 0x88a8 => Parsed::Unparsed(PassOtherProtocol, None),
        _ => Parsed::Unparsed(PassNotIp, None),
    }
}

/// (action, counter) the program must give.
fn expected(f: &[u8]) -> (u32, Counter) {
    match parse(f) {
        Parsed::Unparsed(c, None) => (PASS, c),
        Parsed::Unparsed(c, Some(src)) => match blocked(src) {
            Some(true) if !allowlisted(src) => (DROP, Counter::DropBlocked),
            _ => (PASS, c),
        },
        Parsed::Flow { src, proto, port } => {
            let ours = (proto == 6 && port == 8080) || (proto == 17 && port == 8443);
            if !ours {
                return (PASS, Counter::PassOtherPort);
            }
            match blocked(src) {
                Some(true) if allowlisted(src) => (PASS, Counter::PassAllowlisted),
                Some(true) => (DROP, Counter::DropBlocked),
                Some(false) => (PASS, Counter::PassExpiredBlock),
                None => (PASS, Counter::Pass),
            }
        }
    }
}

fuzz_target!(|frame: &[u8]| {
    // The kernel refuses test frames shorter than an Ethernet header or
    // longer than a page: nothing to compare there.
    if frame.len() < 14 || frame.len() > 1500 {
        return;
    }
    let mut k = program().lock().unwrap();
    let before = k.counters();
    let action = k.test_run(frame).expect("BPF_PROG_TEST_RUN");
    let after = k.counters();
    let moved: Vec<Counter> = Counter::ALL
        .iter()
        .copied()
        .filter(|c| after[*c as usize] != before[*c as usize])
        .collect();
    let (want_action, want_counter) = expected(frame);
    assert_eq!(
        (action, moved.as_slice()),
        (want_action, &[want_counter][..]),
        "frame {frame:02x?}"
    );
});
