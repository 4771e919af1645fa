//! The fixed headers in front of every packet xdp-lb steers: Ethernet, IPv4 without options,
//! UDP. One 42-byte Pod struct so the kernel reads and writes them in one bounds-checked access,
//! and tests build packets with the same definition.

use bytemuck::{Pod, Zeroable};

use crate::checksum;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Version 4, header length 5 words: no IP options.
pub const IPV4_VIHL_NO_OPTIONS: u8 = 0x45;
/// The IPv4 flags-and-fragment-offset bits that make a packet a fragment (more fragments,
/// offset): a fragment cannot be steered by port.
pub const IPV4_FRAGMENT_BITS: u16 = 0x3fff;
/// TTL of the packets the kernel programs rewrite (as a host sends them).
pub const IPV4_TTL: u8 = 64;

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HEADER_LEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HEADER_LEN: usize = 8;

/// Ethernet + IPv4 (no options) + UDP headers; every multi-byte field in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FrameHeaders {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub eth_type: [u8; 2],
    pub ip_vihl: u8,
    pub ip_tos: u8,
    pub ip_len: [u8; 2],
    pub ip_id: [u8; 2],
    pub ip_frag: [u8; 2],
    pub ip_ttl: u8,
    pub ip_proto: u8,
    pub ip_check: [u8; 2],
    pub ip_src: [u8; 4],
    pub ip_dst: [u8; 4],
    pub udp_src: [u8; 2],
    pub udp_dst: [u8; 2],
    pub udp_len: [u8; 2],
    pub udp_check: [u8; 2],
}

impl FrameHeaders {
    pub const LEN: usize = Self::UDP_OFFSET + UDP_HEADER_LEN;
    /// Offset of the IPv4 header.
    pub const IP_OFFSET: usize = ETH_HEADER_LEN;
    /// Offset of the UDP header.
    pub const UDP_OFFSET: usize = Self::IP_OFFSET + IPV4_HEADER_LEN;
    /// Offset of the UDP payload.
    pub const PAYLOAD_OFFSET: usize = Self::LEN;

    #[must_use]
    pub fn ip_len(&self) -> u16 {
        u16::from_be_bytes(self.ip_len)
    }

    #[must_use]
    pub fn udp_len(&self) -> u16 {
        u16::from_be_bytes(self.udp_len)
    }

    #[must_use]
    pub fn udp_src_port(&self) -> u16 {
        u16::from_be_bytes(self.udp_src)
    }

    #[must_use]
    pub fn udp_dst_port(&self) -> u16 {
        u16::from_be_bytes(self.udp_dst)
    }

    /// True for an unfragmented IPv4 packet without options carrying UDP.
    #[must_use]
    pub fn is_plain_ipv4_udp(&self) -> bool {
        // More-fragments flag or a fragment offset: a fragment cannot be steered by port.
        let fragmented = u16::from_be_bytes(self.ip_frag) & IPV4_FRAGMENT_BITS != 0;
        self.eth_type == ETHERTYPE_IPV4.to_be_bytes()
            && self.ip_vihl == IPV4_VIHL_NO_OPTIONS
            && self.ip_proto == IPPROTO_UDP
            && !fragmented
    }

    /// Sum of the UDP-checksummed fields a steering rewrite can change: the pseudo-header's
    /// addresses and length, and the UDP header's ports and length (so the length twice).
    /// Summed before and after a rewrite to update the checksum incrementally. Written out
    /// field by field: no temporaries on the 512-byte BPF stack.
    #[inline(always)]
    fn udp_rewritten_sum(&self) -> u32 {
        word(self.ip_src[0], self.ip_src[1])
            + word(self.ip_src[2], self.ip_src[3])
            + word(self.ip_dst[0], self.ip_dst[1])
            + word(self.ip_dst[2], self.ip_dst[3])
            + word(self.udp_src[0], self.udp_src[1])
            + word(self.udp_dst[0], self.udp_dst[1])
            + 2 * word(self.udp_len[0], self.udp_len[1])
    }

    /// Rewrites addresses and ports, grows or shrinks both lengths by `payload_delta` bytes, and
    /// fixes both checksums. `payload_removed` and `payload_added` are the word sums of payload
    /// bytes removed from or added to the front of the UDP payload (the steering header), which
    /// must be a whole number of 16-bit words so the rest of the payload keeps its alignment.
    #[inline(always)]
    #[expect(clippy::too_many_arguments, reason = "each is one rewritten field; a struct would only rename them")]
    pub fn rewrite(
        &mut self,
        ip_src: [u8; 4],
        ip_dst: [u8; 4],
        udp_src: [u8; 2],
        udp_dst: [u8; 2],
        payload_delta: i16,
        payload_removed: u32,
        payload_added: u32,
    ) {
        let before = self.udp_rewritten_sum() + payload_removed;
        self.ip_src = ip_src;
        self.ip_dst = ip_dst;
        self.udp_src = udp_src;
        self.udp_dst = udp_dst;
        self.ip_len = self.ip_len().wrapping_add_signed(payload_delta).to_be_bytes();
        self.udp_len = self.udp_len().wrapping_add_signed(payload_delta).to_be_bytes();
        self.ip_ttl = IPV4_TTL;
        let after = self.udp_rewritten_sum() + payload_added;
        let udp_check = u16::from_be_bytes(self.udp_check);
        self.udp_check = checksum::update_udp(udp_check, before, after).to_be_bytes();
        self.fill_ip_checksum();
    }

    /// Computes the IPv4 header checksum from scratch (20 bytes, no options).
    #[inline(always)]
    pub fn fill_ip_checksum(&mut self) {
        let sum = word(self.ip_vihl, self.ip_tos)
            + word(self.ip_len[0], self.ip_len[1])
            + word(self.ip_id[0], self.ip_id[1])
            + word(self.ip_frag[0], self.ip_frag[1])
            + word(self.ip_ttl, self.ip_proto)
            + word(self.ip_src[0], self.ip_src[1])
            + word(self.ip_src[2], self.ip_src[3])
            + word(self.ip_dst[0], self.ip_dst[1])
            + word(self.ip_dst[2], self.ip_dst[3]);
        self.ip_check = checksum::complete(sum).to_be_bytes();
    }
}

impl FrameHeaders {
    /// The headers of a UDP datagram carrying `payload`, as a host sends it (DF, TTL 64), both
    /// checksums filled. For the agents and tests that build whole frames, not for the kernel.
    #[must_use]
    pub fn for_udp(
        (eth_src, eth_dst): ([u8; 6], [u8; 6]),
        (ip_src, sport): ([u8; 4], u16),
        (ip_dst, dport): ([u8; 4], u16),
        payload: &[u8],
    ) -> Option<Self> {
        let udp_len = u16::try_from(UDP_HEADER_LEN + payload.len()).ok()?;
        let ip_len = u16::try_from(IPV4_HEADER_LEN + UDP_HEADER_LEN + payload.len()).ok()?;
        let mut headers = Self {
            eth_dst,
            eth_src,
            eth_type: ETHERTYPE_IPV4.to_be_bytes(),
            ip_vihl: IPV4_VIHL_NO_OPTIONS,
            ip_tos: 0,
            ip_len: ip_len.to_be_bytes(),
            ip_id: [0, 1],
            ip_frag: [0x40, 0],
            ip_ttl: IPV4_TTL,
            ip_proto: IPPROTO_UDP,
            ip_check: [0; 2],
            ip_src,
            ip_dst,
            udp_src: sport.to_be_bytes(),
            udp_dst: dport.to_be_bytes(),
            udp_len: udp_len.to_be_bytes(),
            udp_check: [0; 2],
        };
        headers.fill_ip_checksum();
        // Pseudo-header, UDP header (checksum field zero), payload.
        let sum = headers.udp_rewritten_sum() + u32::from(IPPROTO_UDP) + u32::from(fold_slice(payload, 0));
        headers.udp_check = match checksum::complete(sum) {
            0 => 0xffff,
            other => other,
        }
        .to_be_bytes();
        Some(headers)
    }
}

const _: () = assert!(size_of::<FrameHeaders>() == FrameHeaders::LEN);

#[inline(always)]
fn word(high: u8, low: u8) -> u32 {
    u32::from(u16::from_be_bytes([high, low]))
}

/// Checks a whole Ethernet/IPv4/UDP frame the slow way: true when both the IPv4 header checksum
/// and the UDP checksum (0 = absent, accepted) verify over the entire packet. For tests and
/// tools, not for the kernel's per-packet path.
#[must_use]
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip_ok = frame.get(FrameHeaders::IP_OFFSET..FrameHeaders::UDP_OFFSET).is_some_and(|ip| fold_slice(ip, 0) == 0xffff);
    let udp_check = frame.get(40..42);
    ip_ok && (udp_check == Some(&[0, 0]) || udp_checksum(frame) == udp_check.map(|c| u16::from_be_bytes([c[0], c[1]])))
}

/// The UDP checksum a frame should carry (computed over pseudo-header, header with a zero
/// checksum field, and payload), or `None` if the frame is shorter than its UDP length says.
/// For tests and tools that build frames.
#[must_use]
pub fn udp_checksum(frame: &[u8]) -> Option<u16> {
    let headers = bytemuck::try_from_bytes::<FrameHeaders>(frame.get(..FrameHeaders::LEN)?).ok()?;
    let udp_len = usize::from(headers.udp_len());
    let udp = frame.get(FrameHeaders::UDP_OFFSET..FrameHeaders::UDP_OFFSET + udp_len)?;
    let (src, dst) = (headers.ip_src, headers.ip_dst);
    let pseudo = word(src[0], src[1]) + word(src[2], src[3]) + word(dst[0], dst[1]) + word(dst[2], dst[3])
        + u32::from(IPPROTO_UDP)
        + u32::from(headers.udp_len());
    // Sum with the checksum field itself left out.
    let sum = u32::from(fold_slice(&udp[..6], pseudo)) + u32::from(fold_slice(udp.get(8..)?, 0));
    match checksum::complete(sum) {
        0 => Some(0xffff),
        other => Some(other),
    }
}

fn fold_slice(bytes: &[u8], mut sum: u32) -> u16 {
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum = u32::from(checksum::fold(sum + u32::from(word)));
    }
    checksum::fold(sum)
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::{FrameHeaders, checksums_valid};
    use crate::checksum;

    #[test]
    fn a_built_udp_frame_carries_valid_checksums() {
        for payload in [&b""[..], b"\x00\x01a\x00octet\x00", b"odd"] {
            let headers = FrameHeaders::for_udp(([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]), ([10, 1, 2, 3], 4711), ([10, 9, 8, 7], 69), payload).unwrap();
            let mut out: Vec<u8> = bytemuck::bytes_of(&headers).to_vec();
            out.extend_from_slice(payload);
            assert!(checksums_valid(&out), "{payload:?}");
            assert_eq!((headers.udp_len(), headers.ip_len()), (u16::try_from(8 + payload.len()).unwrap(), u16::try_from(28 + payload.len()).unwrap()));
        }
        assert!(FrameHeaders::for_udp(([0; 6], [0; 6]), ([0; 4], 1), ([0; 4], 2), &std::vec![0; 65_508]).is_none(), "longer than an IPv4 packet");
    }

    /// A frame with valid checksums: headers, then `payload`.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let udp_len = u16::try_from(8 + payload.len()).unwrap();
        let mut headers = FrameHeaders {
            eth_dst: [2, 0, 0, 0, 0, 1],
            eth_src: [2, 0, 0, 0, 0, 2],
            eth_type: [8, 0],
            ip_vihl: 0x45,
            ip_tos: 0,
            ip_len: (udp_len + 20).to_be_bytes(),
            ip_id: [0x12, 0x34],
            ip_frag: [0x40, 0],
            ip_ttl: 63,
            ip_proto: 17,
            ip_check: [0, 0],
            ip_src: [10, 1, 2, 3],
            ip_dst: [10, 9, 8, 7],
            udp_src: 4711u16.to_be_bytes(),
            udp_dst: 69u16.to_be_bytes(),
            udp_len: udp_len.to_be_bytes(),
            udp_check: [0, 0],
        };
        headers.fill_ip_checksum();
        let mut out: Vec<u8> = bytemuck::bytes_of(&headers).to_vec();
        out.extend_from_slice(payload);
        // Fill the UDP checksum from scratch: sum with the field zero, then complement.
        let pseudo = 0x0a01 + 0x0203 + 0x0a09 + 0x0807 + 17 + u32::from(udp_len);
        let sum = out[34..].chunks(2).fold(pseudo, |s, c| {
            s + u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        });
        out[40..42].copy_from_slice(&checksum::complete(sum).to_be_bytes());
        out
    }

    #[test]
    fn is_42_bytes_with_alignment_one() {
        assert_eq!(size_of::<FrameHeaders>(), FrameHeaders::LEN);
        assert_eq!(align_of::<FrameHeaders>(), 1);
    }

    #[test]
    fn reference_frames_verify_and_corruption_is_caught() {
        let mut f = frame(b"\x00\x04\x00\x07 odd-length payload");
        assert!(checksums_valid(&f));
        f[50] ^= 1;
        assert!(!checksums_valid(&f));
    }

    #[test]
    fn rewrite_removing_the_front_of_the_payload_keeps_checksums_valid() {
        let steering = [0xabu8; 64];
        let tftp = b"\x00\x03\x00\x01some data of odd length!";
        let mut payload = steering.to_vec();
        payload.extend_from_slice(tftp);
        let original = frame(&payload);
        let mut headers = *bytemuck::from_bytes::<FrameHeaders>(&original[..42]);
        headers.rewrite(
            [192, 0, 2, 1],
            [198, 51, 100, 7],
            20_123u16.to_be_bytes(),
            5555u16.to_be_bytes(),
            -64,
            checksum::sum_words(&steering),
            0,
        );
        let mut rewritten: Vec<u8> = bytemuck::bytes_of(&headers).to_vec();
        rewritten.extend_from_slice(tftp);
        assert!(checksums_valid(&rewritten));
    }

    #[test]
    fn rewrite_inserting_a_header_keeps_checksums_valid() {
        let tftp = b"\x00\x04\x00\x09";
        let original = frame(tftp);
        let steering = [0x5au8; 64];
        let mut headers = *bytemuck::from_bytes::<FrameHeaders>(&original[..42]);
        headers.rewrite([10, 0, 0, 1], [10, 0, 0, 2], 6969u16.to_be_bytes(), 7000u16.to_be_bytes(), 64, 0, checksum::sum_words(&steering));
        let mut rewritten: Vec<u8> = bytemuck::bytes_of(&headers).to_vec();
        rewritten.extend_from_slice(&steering);
        rewritten.extend_from_slice(tftp);
        assert!(checksums_valid(&rewritten));
    }
}
