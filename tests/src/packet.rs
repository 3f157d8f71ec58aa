//! Ethernet frames built byte by byte, for the XDP program's packet fixtures
//! and the XDP flood bench. Checksums are computed (IPv4 header) where a
//! kernel on the receiving end would check them; TCP/UDP checksums are left
//! zero except where [`Frame::tcp_checksum`] is asked for.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// A frame under construction: `Frame::new(...).vlan(..).ipv4(..).tcp(..)`.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Offset of the IP header's start, once one is added.
    l3: Option<usize>,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlans: Vec<(u16, u16)>,
}

impl Default for Frame {
    fn default() -> Self {
        Frame::new()
    }
}

impl Frame {
    pub fn new() -> Frame {
        Frame {
            bytes: Vec::new(),
            l3: None,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
        }
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Frame {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Add a VLAN tag (`tpid` 0x8100 or 0x88A8) in front of the payload.
    pub fn vlan(mut self, tpid: u16, id: u16) -> Frame {
        self.vlans.push((tpid, id));
        self
    }

    fn ethernet(&mut self, ether_type: u16) {
        self.bytes.extend_from_slice(&self.dst_mac);
        self.bytes.extend_from_slice(&self.src_mac);
        let vlans = std::mem::take(&mut self.vlans);
        for (tpid, id) in vlans {
            self.bytes.extend_from_slice(&tpid.to_be_bytes());
            // The tag's inner ethertype is written by the next tag or the payload.
            self.bytes.extend_from_slice(&id.to_be_bytes());
        }
        self.bytes.extend_from_slice(&ether_type.to_be_bytes());
    }

    /// Just an Ethernet header with `ether_type` and `payload`.
    pub fn raw(mut self, ether_type: u16, payload: &[u8]) -> Frame {
        self.ethernet(ether_type);
        self.bytes.extend_from_slice(payload);
        self
    }

    /// IPv4 header: `options` (a multiple of 4 bytes), `frag` = the 16-bit
    /// flags+fragment-offset field.
    pub fn ipv4(
        mut self,
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        options: &[u8],
        frag: u16,
    ) -> Frame {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40);
        self.ethernet(ETH_P_IP);
        let l3 = self.bytes.len();
        self.l3 = Some(l3);
        let ihl = 5 + options.len() / 4;
        self.bytes.push(0x40 | ihl as u8);
        self.bytes.push(0);
        self.bytes.extend_from_slice(&[0, 0]); // total length, fixed up in `finish`
        self.bytes.extend_from_slice(&[0x12, 0x34]);
        self.bytes.extend_from_slice(&frag.to_be_bytes());
        self.bytes.push(64);
        self.bytes.push(proto);
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(&src);
        self.bytes.extend_from_slice(&dst);
        self.bytes.extend_from_slice(options);
        self
    }

    /// IPv6 header, then `ext` extension headers as (next-header value of
    /// this header's type, raw bytes); `proto` is the final next header.
    pub fn ipv6(mut self, src: [u8; 16], dst: [u8; 16], proto: u8, ext: &[(u8, Vec<u8>)]) -> Frame {
        self.ethernet(ETH_P_IPV6);
        let l3 = self.bytes.len();
        self.l3 = Some(l3);
        self.bytes.extend_from_slice(&[0x60, 0, 0, 0]);
        self.bytes.extend_from_slice(&[0, 0]); // payload length, fixed up in `finish`
        let first = ext.first().map(|e| e.0).unwrap_or(proto);
        self.bytes.push(first);
        self.bytes.push(64);
        self.bytes.extend_from_slice(&src);
        self.bytes.extend_from_slice(&dst);
        for (i, (_, raw)) in ext.iter().enumerate() {
            let next = ext.get(i + 1).map(|e| e.0).unwrap_or(proto);
            let mut raw = raw.clone();
            raw[0] = next;
            self.bytes.extend_from_slice(&raw);
        }
        self
    }

    pub fn tcp(mut self, src_port: u16, dst_port: u16, flags: u8) -> Frame {
        self.bytes.extend_from_slice(&src_port.to_be_bytes());
        self.bytes.extend_from_slice(&dst_port.to_be_bytes());
        self.bytes.extend_from_slice(&1u32.to_be_bytes()); // seq
        self.bytes.extend_from_slice(&0u32.to_be_bytes()); // ack
        self.bytes.push(5 << 4);
        self.bytes.push(flags);
        self.bytes.extend_from_slice(&64240u16.to_be_bytes());
        self.bytes.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        self
    }

    pub fn udp(mut self, src_port: u16, dst_port: u16, payload: &[u8]) -> Frame {
        self.bytes.extend_from_slice(&src_port.to_be_bytes());
        self.bytes.extend_from_slice(&dst_port.to_be_bytes());
        self.bytes
            .extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(payload);
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Frame {
        self.bytes.extend_from_slice(p);
        self
    }

    /// Fix up IP lengths and the IPv4 header checksum.
    pub fn finish(mut self) -> Vec<u8> {
        if let Some(l3) = self.l3 {
            let version = self.bytes[l3] >> 4;
            if version == 4 {
                let total = (self.bytes.len() - l3) as u16;
                self.bytes[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                let ihl = (self.bytes[l3] & 0x0f) as usize * 4;
                let sum = checksum(&self.bytes[l3..l3 + ihl]);
                self.bytes[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            } else {
                let payload = (self.bytes.len() - l3 - 40) as u16;
                self.bytes[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
            }
        }
        self.bytes
    }

    /// As [`finish`](Self::finish), plus a valid TCP checksum (the segment
    /// must start right after a 20-byte IPv4 header), so a real stack
    /// accepts the SYN.
    pub fn finish_with_tcp_checksum(self) -> Vec<u8> {
        let l3 = self.l3.expect("an IP header");
        let mut b = self.finish();
        let ihl = (b[l3] & 0x0f) as usize * 4;
        let l4 = l3 + ihl;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&b[l3 + 12..l3 + 20]);
        pseudo.push(0);
        pseudo.push(6);
        pseudo.extend_from_slice(&((b.len() - l4) as u16).to_be_bytes());
        pseudo.extend_from_slice(&b[l4..]);
        let sum = checksum(&pseudo);
        b[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv6 extension header of `len8` 8-octet units after the first 8
/// (hop-by-hop, routing, destination options), padded with PadN.
pub fn ext_header(len8: u8) -> Vec<u8> {
    let mut v = vec![0u8; (len8 as usize + 1) * 8];
    v[1] = len8;
    v[2] = 1; // PadN
    v[3] = (v.len() - 4) as u8;
    v
}

/// IPv6 fragment header with `offset` in 8-octet units and the M flag.
pub fn frag_header(offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | more as u16;
    let mut v = vec![0u8; 8];
    v[2..4].copy_from_slice(&field.to_be_bytes());
    v[4..8].copy_from_slice(&0xabcdu32.to_be_bytes());
    v
}

pub fn v4(a: &str) -> [u8; 4] {
    match a.parse::<IpAddr>().expect("IPv4 literal") {
        IpAddr::V4(a) => a.octets(),
        _ => panic!("{a} is not IPv4"),
    }
}

pub fn v6(a: &str) -> [u8; 16] {
    match a.parse::<IpAddr>().expect("IPv6 literal") {
        IpAddr::V6(a) => a.octets(),
        _ => panic!("{a} is not IPv6"),
    }
}
