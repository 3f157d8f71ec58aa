//! Overlapping restarts: a new gateway started while the old one still
//! holds the interface takes the front door over without a gap.
//!
//! 1. Before attaching, it reads the blocks out of the running program's
//!    maps ([`blocks_of`]) and puts them in its own, so its program drops
//!    the same sources from its first packet.
//! 2. It then swaps its program into the old one's bpf_link in one step
//!    (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`: only if the old program is
//!    still the one attached) and keeps a descriptor of that link
//!    ([`take_over`]). The interface never runs without a front door: the
//!    old program until the swap, the new one after. When the old process
//!    exits, its descriptor closes, and the link lives on through the new
//!    one's; when the new one exits or dies, the link goes with it.
//!
//! Blocks the old process adds after the swap reach only its own maps (it
//! is being replaced: send it SIGTERM once the new one is ready).

use std::io;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use aya::maps::{HashMap, Map, MapData};
use gateway_common::{maps, BlockEntry, IpKey};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_F_REPLACE: u32 = 1 << 2;

/// `union bpf_attr`, large enough for the members used here (the kernel
/// checks that the bytes past the member it reads are zero).
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed;
    // the commands used here only read it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A descriptor for a kernel object the `*_GET_FD_BY_ID` command `cmd` names.
fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 32]);
    a.0[0] = id;
    let fd = bpf(cmd, &mut a)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The blocks in the maps of the front-door program `prog_id` (another
/// gateway's, running or left behind): address and entry, IPv4 as IPv4.
pub fn blocks_of(prog_id: u32) -> Result<Vec<(IpAddr, BlockEntry)>, String> {
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .ok_or("the program is gone")?;
    let ids = prog
        .map_ids()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let mut out = Vec::new();
    for id in ids {
        let Ok(info) = aya::maps::MapInfo::from_id(id) else {
            continue;
        };
        let name = info.name_as_str().unwrap_or("").to_string();
        if name != maps::BLOCKLIST && name != maps::BLOCKLIST_V4 {
            continue;
        }
        let data = MapData::from_id(id).map_err(|e| e.to_string())?;
        if name == maps::BLOCKLIST_V4 {
            let m: HashMap<_, [u8; 4], BlockEntry> =
                HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
            for (k, v) in m.iter().filter_map(Result::ok) {
                out.push((IpAddr::from(k), v));
            }
        } else {
            let m: HashMap<_, IpKey, BlockEntry> =
                HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
            for (k, v) in m.iter().filter_map(Result::ok) {
                out.push((crate::syntax::canonical(IpAddr::from(k.addr)), v));
            }
        }
    }
    Ok(out)
}

/// The interface an XDP link is attached to (`bpf_link_info.xdp.ifindex`).
fn link_ifindex(link: &OwnedFd) -> io::Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the
    // per-type union, whose `xdp` member starts with ifindex.
    let mut info = [0u64; 16];
    let mut a = Attr([0; 32]);
    a.0[0] = std::os::fd::AsRawFd::as_raw_fd(link) as u32;
    a.0[1] = std::mem::size_of_val(&info) as u32;
    let ptr = info.as_mut_ptr() as u64;
    a.0[2] = ptr as u32;
    a.0[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    Ok(info[2] as u32)
}

/// Swap `new_prog` into the XDP bpf_link that holds `old_prog_id` on
/// interface `ifindex`, atomically and only if that program is still the
/// one attached; the link's descriptor, which keeps it alive for as long as
/// it is open.
pub fn take_over(old_prog_id: u32, ifindex: u32, new_prog: RawFd) -> io::Result<OwnedFd> {
    let link = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| {
            l.program_id() == old_prog_id
                && l.link_type().ok() == Some(aya::programs::links::LinkType::Xdp)
        })
        .filter_map(|l| fd_by_id(BPF_LINK_GET_FD_BY_ID, l.id()).ok())
        .find(|fd| link_ifindex(fd).ok() == Some(ifindex))
        .ok_or_else(|| {
            io::Error::other("no bpf_link holds the running program on this interface")
        })?;
    let old = fd_by_id(BPF_PROG_GET_FD_BY_ID, old_prog_id)?;
    let mut a = Attr([0; 32]);
    a.0[0] = std::os::fd::AsRawFd::as_raw_fd(&link) as u32;
    a.0[1] = new_prog as u32;
    a.0[2] = BPF_F_REPLACE;
    a.0[3] = std::os::fd::AsRawFd::as_raw_fd(&old) as u32;
    bpf(BPF_LINK_UPDATE, &mut a)?;
    Ok(link)
}
