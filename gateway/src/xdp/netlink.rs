//! Just enough rtnetlink to find and remove a stale XDP program on an
//! interface: one attached through netlink (not a bpf_link) outlives the
//! process that attached it, so a gateway that ran on a kernel without XDP
//! links, or another tool, can leave one behind. The gateway replaces only a
//! program of its own name (`gateway_xdp`); anything else is an error.

use std::io;

const IFLA_XDP: u16 = 43;
const NLA_F_NESTED: u16 = 1 << 15;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// An XDP program attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    /// `XDP_ATTACHED_*`: 1 driver, 2 generic (skb), 3 hardware.
    pub mode: u8,
}

struct Socket(i32);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closing the fd this struct owns.
        unsafe { libc::close(self.0) };
    }
}

fn open() -> io::Result<Socket> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Socket(fd))
}

/// nlmsghdr + ifinfomsg for `ifindex`, then `attrs` (already encoded).
fn message(kind: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 16 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
                                              // ifinfomsg: family, pad, type, index, flags, change
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(attrs);
    m
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut a = Vec::with_capacity((len + 3) & !3);
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

/// Send one request, return the replies' payloads (after each nlmsghdr);
/// a negative `NLMSG_ERROR` is turned into the error.
fn request(msg: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let s = open()?;
    // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and an address that live for the call.
    let r = unsafe {
        libc::sendto(
            s.0,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: recv into a buffer we own, no larger than it.
        let n = unsafe { libc::recv(s.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < 16 || len > rest.len() {
                return Err(io::Error::other("malformed netlink reply"));
            }
            let payload = &rest[16..len];
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                    if code < 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    // An ACK ends a request that asked for one.
                    return Ok(out);
                }
                _ => out.push((kind, payload.to_vec())),
            }
            let next = ((len + 3) & !3).min(rest.len());
            rest = &rest[next..];
        }
        // RTM_GETLINK for one interface answers with one message, no DONE.
        if !out.is_empty() {
            return Ok(out);
        }
    }
}

/// Iterate `(type, payload)` over netlink attributes.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, payload))
    })
}

/// The XDP program attached to `ifindex` through netlink, if any (a
/// program attached through a bpf_link is reported too).
pub fn attached(ifindex: u32) -> io::Result<Option<AttachedProgram>> {
    let msg = message(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16, ifindex, &[]);
    for (kind, payload) in request(&msg)? {
        if kind != libc::RTM_NEWLINK || payload.len() < 16 {
            continue;
        }
        for (t, xdp) in attrs(&payload[16..]) {
            if t != IFLA_XDP {
                continue;
            }
            let mut mode = 0u8;
            let mut id = 0u32;
            for (t, v) in attrs(xdp) {
                match t {
                    IFLA_XDP_ATTACHED if !v.is_empty() => mode = v[0],
                    IFLA_XDP_PROG_ID if v.len() >= 4 => {
                        id = u32::from_ne_bytes(v[0..4].try_into().unwrap())
                    }
                    _ => {}
                }
            }
            if mode != 0 && id != 0 {
                return Ok(Some(AttachedProgram { id, mode }));
            }
        }
    }
    Ok(None)
}

/// Detach whatever netlink-attached XDP program `ifindex` has in `mode`.
/// Fails with EBUSY when it is held by a bpf_link (a live process owns it).
pub fn detach(ifindex: u32, mode: u8) -> io::Result<()> {
    let flags = match mode {
        XDP_ATTACHED_DRV => XDP_FLAGS_DRV_MODE,
        XDP_ATTACHED_SKB => XDP_FLAGS_SKB_MODE,
        XDP_ATTACHED_HW => XDP_FLAGS_HW_MODE,
        _ => 0,
    };
    let mut inner = attr(IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    inner.extend(attr(IFLA_XDP_FLAGS, &flags.to_ne_bytes()));
    let nested = attr(IFLA_XDP | NLA_F_NESTED, &inner);
    let msg = message(
        libc::RTM_SETLINK,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        ifindex,
        &nested,
    );
    request(&msg).map(|_| ())
}

/// The name of loaded BPF program `id` (empty when unknown).
pub fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(String::from))
        .unwrap_or_default()
}
