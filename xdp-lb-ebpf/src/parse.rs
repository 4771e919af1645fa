//! Packet parsing: describes the packet, decides nothing.

use core::mem;

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
};
use xdp_lb_common::frame::{ETHERTYPE_IPV4, IPV4_FRAGMENT_BITS};

/// EtherType of IPv4 in network byte order as it sits in the header.
const ETH_P_IP_BE: u16 = ETHERTYPE_IPV4.to_be();

/// How far down the stack the packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// A header the packet claims to have runs past its end.
    Truncated,
    NotIpv4,
    NotUdp,
    Udp,
}

/// What the parser learned about a packet.
pub struct PacketDescription {
    pub layer: Layer,
    /// IPv4 destination (zero below the IP layer).
    pub dst_ip: [u8; 4],
    /// UDP destination port, host byte order (0 below the UDP layer).
    pub dst_port: u16,
    /// Unfragmented, no IP options: the fixed `FrameHeaders` layout applies.
    pub plain: bool,
}

impl PacketDescription {
    const fn at(layer: Layer) -> Self {
        Self { layer, dst_ip: [0; 4], dst_port: 0, plain: false }
    }
}

/// Returns a pointer to a `T` at `offset` if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Copies a `T` out of the packet at `offset` (unaligned), if it lies inside.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; the read is unaligned-safe.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// Describes Ethernet / IPv4 / UDP, as far as the packet goes.
#[inline(always)]
pub fn describe(ctx: &XdpContext) -> PacketDescription {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return PacketDescription::at(Layer::Truncated);
    };
    // SAFETY: ptr_at checked that the header is inside the packet.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return PacketDescription::at(Layer::NotIpv4);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return PacketDescription::at(Layer::Truncated);
    };
    // SAFETY: as above.
    // `ihl()` is already in bytes.
    let (version, proto, ip_len) = unsafe { ((*ip).version(), (*ip).proto, usize::from((*ip).ihl())) };
    if version != 4 {
        // An IPv4 EtherType with another version is not ours to interpret.
        return PacketDescription::at(Layer::NotIpv4);
    }
    if proto != IpProto::Udp as u8 {
        return PacketDescription::at(Layer::NotUdp);
    }
    if ip_len < Ipv4Hdr::LEN {
        return PacketDescription::at(Layer::Truncated);
    }
    let Some(udp) = ptr_at::<UdpHdr>(ctx, EthHdr::LEN + ip_len) else {
        return PacketDescription::at(Layer::Truncated);
    };
    // SAFETY: as above.
    let (dst_ip, frags) = unsafe { ((*ip).dst_addr, u16::from_be_bytes((*ip).frags)) };
    PacketDescription {
        layer: Layer::Udp,
        dst_ip,
        // SAFETY: as above.
        dst_port: unsafe { (*udp).dst_port() },
        // More-fragments flag or an offset: a fragment cannot be steered by port.
        plain: ip_len == Ipv4Hdr::LEN && frags & IPV4_FRAGMENT_BITS == 0,
    }
}
