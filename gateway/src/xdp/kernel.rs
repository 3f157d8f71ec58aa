//! The kernel side of the front door: load the embedded XDP object, size and
//! fill its maps, attach it to interfaces, read its counters, and run it on
//! test packets (`BPF_PROG_TEST_RUN`).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use gateway_common::{
    maps, BlockEntry, BlockReason, Counter, IpKey, XdpConfig, PORT_TCP, PORT_UDP, V4_MAPPED_PREFIX,
};

use super::Cidr;

/// The XDP object gateway/build.rs built; empty when built with `AYA_BUILD_SKIP=1`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

/// Why the XDP program isn't running (the gateway goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this gateway was built without the XDP program (AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("the kernel refused the XDP object (no CAP_BPF/CAP_NET_ADMIN, or a kernel without BPF?): {0}")]
    Object(String),
    #[error("the kernel refused the XDP program: {0}")]
    Program(String),
    #[error("a map is missing or has the wrong type: {0}")]
    Map(String),
    #[error("cannot attach to {interface}: {error}")]
    Attach { interface: String, error: String },
}

/// Map capacities, set before the object is loaded.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub blocked: u32,
    pub tracked_sources: u32,
    pub allow: u32,
}

/// How a program ended up attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

impl Attached {
    pub fn as_str(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        }
    }
}

/// A loaded (maybe not yet attached) front-door program with its maps.
/// Dropping it detaches the program from every interface (aya holds each
/// attachment as a bpf_link, which the kernel also releases if the process
/// dies: a crashed gateway leaves nothing attached).
pub struct Loaded {
    ebpf: Ebpf,
    ports: Array<MapData, u8>,
    blocklist: HashMap<MapData, IpKey, BlockEntry>,
    blocklist_v4: HashMap<MapData, [u8; 4], BlockEntry>,
    allowlist: LpmTrie<MapData, [u8; 16], u8>,
    config: Array<MapData, XdpConfig>,
    counters: PerCpuArray<MapData, u64>,
    block_drops: PerCpuArray<MapData, u64>,
    watch: PerCpuArray<MapData, gateway_common::WatchState>,
    /// Links taken over from a gateway being replaced (see `takeover`):
    /// open for as long as this program runs there.
    taken: Vec<std::os::fd::OwnedFd>,
}

/// What else happened while attaching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    None,
    /// Native mode refused by the driver (why): attached generic.
    FellBack(String),
    /// A running gateway held the interface: its link now runs this
    /// program (the old program's id).
    TookOver(u32),
}

impl Loaded {
    /// Load the embedded program into the kernel (not attached anywhere yet).
    pub fn load(sizes: Sizes) -> Result<Loaded, LoadError> {
        Self::load_object(OBJECT, sizes)
    }

    /// Load a front-door object given as bytes (the embedded one, or — for
    /// the XDP fuzz target, built without it — the file gateway/build.rs
    /// left in a release build's OUT_DIR).
    pub fn load_object(object: &[u8], sizes: Sizes) -> Result<Loaded, LoadError> {
        if object.is_empty() {
            return Err(LoadError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::BLOCKLIST, sizes.blocked)
            .map_max_entries(maps::BLOCKLIST_V4, sizes.blocked)
            .map_max_entries(maps::QUOTA, sizes.tracked_sources)
            .map_max_entries(maps::ALLOWLIST, sizes.allow)
            .load(object)
            .map_err(|e| LoadError::Object(e.to_string()))?;
        for name in [
            gateway_common::PROGRAM,
            gateway_common::TRAFFIC_PROGRAM,
            "gateway_pass",
            "gateway_drop",
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| LoadError::Program(format!("{name} not in the object")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| LoadError::Program(e.to_string()))?;
            prog.load().map_err(|e| LoadError::Program(e.to_string()))?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| LoadError::Map(format!("{name} not in the object")))
        };
        let ports = take(maps::PORTS)?;
        let blocklist = take(maps::BLOCKLIST)?;
        let blocklist_v4 = take(maps::BLOCKLIST_V4)?;
        let allowlist = take(maps::ALLOWLIST)?;
        let config = take(maps::CONFIG)?;
        let counters = take(maps::COUNTERS)?;
        let block_drops = take(maps::BLOCK_DROPS)?;
        let watch = take(maps::WATCH)?;
        let map_err = |e: aya::maps::MapError| LoadError::Map(e.to_string());
        Ok(Loaded {
            ports: Array::try_from(ports).map_err(map_err)?,
            blocklist: HashMap::try_from(blocklist).map_err(map_err)?,
            blocklist_v4: HashMap::try_from(blocklist_v4).map_err(map_err)?,
            allowlist: LpmTrie::try_from(allowlist).map_err(map_err)?,
            config: Array::try_from(config).map_err(map_err)?,
            counters: PerCpuArray::try_from(counters).map_err(map_err)?,
            block_drops: PerCpuArray::try_from(block_drops).map_err(map_err)?,
            watch: PerCpuArray::try_from(watch).map_err(map_err)?,
            taken: Vec::new(),
            ebpf,
        })
    }

    fn program(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .expect("checked at load")
            .try_into()
            .expect("checked at load")
    }

    fn program_fd(&mut self, name: &str) -> io::Result<std::os::fd::RawFd> {
        self.program(name)
            .fd()
            .map(|fd| fd.as_fd().as_raw_fd())
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Attach the front door to `interface`: native first (unless `generic`
    /// is asked for), then generic with the reason in the note; or, when a
    /// running gateway holds the interface, take its link over.
    pub fn attach(
        &mut self,
        interface: &str,
        generic: bool,
    ) -> Result<(Attached, Note), LoadError> {
        let fail = |error: String| LoadError::Attach {
            interface: interface.to_string(),
            error,
        };
        if let Some((held, ifindex)) = replace_stale(interface)? {
            let fd = self
                .program_fd(gateway_common::PROGRAM)
                .map_err(|e| fail(e.to_string()))?;
            let link = super::takeover::take_over(held.id, ifindex, fd).map_err(|e| {
                fail(format!("a running gateway holds this interface (program id {}) and taking it over failed: {e}", held.id))
            })?;
            self.taken.push(link);
            let mode = if held.mode == 2 {
                Attached::Generic
            } else {
                Attached::Native
            };
            return Ok((mode, Note::TookOver(held.id)));
        }
        let prog = self.program(gateway_common::PROGRAM);
        let fail = |e: aya::programs::ProgramError| fail(e.to_string());
        if !generic {
            match prog.attach(interface, XdpMode::Driver) {
                Ok(_) => return Ok((Attached::Native, Note::None)),
                Err(e @ aya::programs::ProgramError::UnknownInterface { .. }) => {
                    return Err(fail(e))
                }
                Err(e) => {
                    let why = e.to_string();
                    return prog
                        .attach(interface, XdpMode::Skb)
                        .map(|_| (Attached::Generic, Note::FellBack(why)))
                        .map_err(fail);
                }
            }
        }
        prog.attach(interface, XdpMode::Skb)
            .map(|_| (Attached::Generic, Note::None))
            .map_err(fail)
    }

    /// Pin program `name` at `path` on a bpffs (inspection with bpftool or
    /// `ip link set dev X xdp pinned PATH`; the tests use it to stage a
    /// netlink-attached program).
    pub fn pin(&mut self, name: &str, path: &std::path::Path) -> Result<(), LoadError> {
        self.program(name)
            .pin(path)
            .map_err(|e| LoadError::Program(e.to_string()))
    }

    /// Attach one of the bench-only programs (`gateway_pass`, `gateway_drop`, `gateway_trafficgen`).
    pub fn attach_program(
        &mut self,
        name: &str,
        interface: &str,
        mode: XdpMode,
    ) -> Result<(), LoadError> {
        self.program(name)
            .attach(interface, mode)
            .map(|_| ())
            .map_err(|e| LoadError::Attach {
                interface: interface.to_string(),
                error: e.to_string(),
            })
    }

    /// Mark `(protocol, port)` pairs (IPPROTO_TCP = 6, IPPROTO_UDP = 17) as the gateway's.
    pub fn set_ports(&mut self, ports: &[(u8, u16)]) -> io::Result<()> {
        for &(proto, port) in ports {
            let bit = if proto == libc::IPPROTO_UDP as u8 {
                PORT_UDP
            } else {
                PORT_TCP
            };
            let old = self.ports.get(&(port as u32), 0).map_err(map_io)?;
            self.ports.set(port as u32, old | bit, 0).map_err(map_io)?;
        }
        Ok(())
    }

    pub fn set_config(&mut self, c: XdpConfig) -> io::Result<()> {
        self.config.set(0, c, 0).map_err(map_io)
    }

    pub fn block(&mut self, addr: IpAddr, entry: BlockEntry) -> io::Result<()> {
        match ip_key(addr).as_v4() {
            Some(v4) => self.blocklist_v4.insert(v4, entry, 0),
            None => self.blocklist.insert(ip_key(addr), entry, 0),
        }
        .map_err(map_io)
    }

    /// Remove a block; removing one that isn't there is fine.
    pub fn unblock(&mut self, addr: IpAddr) -> io::Result<()> {
        ok_if_absent(match ip_key(addr).as_v4() {
            Some(v4) => self.blocklist_v4.remove(&v4),
            None => self.blocklist.remove(&ip_key(addr)),
        })
    }

    pub fn allow(&mut self, c: Cidr) -> io::Result<()> {
        self.allowlist.insert(&lpm_key(c), 1, 0).map_err(map_io)
    }

    pub fn disallow(&mut self, c: Cidr) -> io::Result<()> {
        ok_if_absent(self.allowlist.remove(&lpm_key(c)))
    }

    /// Per-verdict counters, summed over CPUs, indexed by `Counter as usize`.
    pub fn counters(&self) -> [u64; Counter::COUNT] {
        let mut out = [0u64; Counter::COUNT];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// The reader of the watch stream's ring buffer (`aya-log` records, one
    /// per sampled verdict), handing each record to `logger`. Once per
    /// program: the ring buffer moves into the reader.
    pub fn watch_reader<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, LoadError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|e| LoadError::Map(format!("{}: {e}", maps::AYA_LOGS)))
    }

    /// Sampled verdicts not written because a CPU's per-second cap was reached.
    pub fn watch_suppressed(&self) -> u64 {
        self.watch
            .get(&0, 0)
            .map(|v| v.iter().map(|s| s.suppressed).sum())
            .unwrap_or(0)
    }

    /// Packets dropped (or would-drop in monitor mode) per block reason.
    pub fn block_drops(&self) -> [u64; BlockReason::COUNT] {
        let mut out = [0u64; BlockReason::COUNT];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.block_drops.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// The traffic generator's target interface (bench only).
    pub fn set_traffic_target(&mut self, ifindex: u32) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map_mut(gateway_common::TRAFFIC_TARGET)
            .ok_or_else(|| LoadError::Map("TRAFFIC_TARGET".into()))?;
        let mut arr: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|e| LoadError::Map(e.to_string()))?;
        arr.set(0, ifindex, 0)
            .map_err(|e| LoadError::Map(e.to_string()))
    }

    /// Run the front-door program once on `packet` (an Ethernet frame);
    /// returns the XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2).
    pub fn test_run(&mut self, packet: &[u8]) -> io::Result<u32> {
        self.test_run_repeat(packet, 1).map(|(action, _)| action)
    }

    /// Run the front-door program `repeat` times on `packet`; returns the
    /// XDP action and the kernel-measured mean ns per run.
    pub fn test_run_repeat(&mut self, packet: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
        let fd = self.program_fd(gateway_common::PROGRAM)?;
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ..Default::default()
        };
        bpf_test_run(&mut attr)?;
        Ok((attr.retval, attr.duration))
    }

    /// Send `count` copies of `frame` out of the interface the traffic
    /// generator targets, as live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): the
    /// frames enter the peer like frames from a NIC driver (bench only).
    /// `ingress_ifindex` is any interface in the caller's namespace.
    pub fn send_live_frames(
        &mut self,
        frame: &[u8],
        count: u32,
        ingress_ifindex: u32,
    ) -> io::Result<()> {
        let fd = self.program_fd(gateway_common::TRAFFIC_PROGRAM)?;
        let ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            ingress_ifindex,
            ..Default::default()
        };
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: count,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: &ctx as *const XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: 64,
            ..Default::default()
        };
        bpf_test_run(&mut attr)
    }
}

/// A delete of a key that isn't there is not an error here.
fn ok_if_absent(r: Result<(), aya::maps::MapError>) -> io::Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(map_io(e)),
    }
}

/// "Replace on attach": a front-door program left attached through netlink
/// (it outlives its process, unlike a bpf_link) is removed first; one a live
/// gateway holds through a link is returned, to be taken over. Another
/// program is an error: the gateway never takes an interface from something
/// it didn't load.
fn replace_stale(
    interface: &str,
) -> Result<Option<(super::netlink::AttachedProgram, u32)>, LoadError> {
    let fail = |error: String| LoadError::Attach {
        interface: interface.to_string(),
        error,
    };
    let name = std::ffi::CString::new(interface).map_err(|_| fail("bad interface name".into()))?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(fail("no such interface".into()));
    }
    let Some(p) = super::netlink::attached(ifindex).map_err(|e| fail(format!("netlink: {e}")))?
    else {
        return Ok(None);
    };
    let owner = super::netlink::program_name(p.id);
    if owner != gateway_common::PROGRAM {
        return Err(fail(format!(
            "another XDP program is attached (id {}, name `{owner}`); remove it (`ip link set dev {interface} xdp off`) or pick another interface",
            p.id
        )));
    }
    match super::netlink::detach(ifindex, p.mode) {
        Ok(()) => {
            tracing::warn!(
                interface,
                program_id = p.id,
                "replaced a front-door XDP program left attached by an earlier gateway"
            );
            Ok(None)
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(Some((p, ifindex))),
        Err(e) => Err(fail(format!(
            "cannot remove the stale program id {}: {e}",
            p.id
        ))),
    }
}

fn map_io(e: aya::maps::MapError) -> io::Error {
    io::Error::other(e.to_string())
}

pub fn ip_key(addr: IpAddr) -> IpKey {
    match addr {
        IpAddr::V4(a) => IpKey::v4(a.octets()),
        IpAddr::V6(a) => IpKey::v6(a.octets()),
    }
}

fn lpm_key(c: Cidr) -> Key<[u8; 16]> {
    match c.addr {
        IpAddr::V4(a) => Key::new(V4_MAPPED_PREFIX + c.len as u32, IpKey::v4(a.octets()).addr),
        IpAddr::V6(a) => Key::new(c.len as u32, a.octets()),
    }
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `union bpf_attr`'s `test` member (include/uapi/linux/bpf.h), padded to
/// cover the fields newer kernels check are zero.
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: [u32; 9],
}

/// `struct xdp_md`, the context of an XDP program.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn bpf_test_run(attr: &mut TestRunAttr) -> io::Result<()> {
    // SAFETY: BPF_PROG_TEST_RUN reads the buffers `attr` points to (alive
    // for the call, sizes given) and writes `retval`, `duration` and at most
    // `data_size_out` bytes of `data_out`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The front-door program attached to `interface` now (a running gateway's,
/// or one left behind), if any: its id, to read its blocks before taking over.
pub fn front_door_on(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let p = super::netlink::attached(ifindex).ok()??;
    (super::netlink::program_name(p.id) == gateway_common::PROGRAM).then_some(p.id)
}
