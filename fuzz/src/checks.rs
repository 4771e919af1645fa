//! What each fuzz target checks on one input. Every function must return normally for every
//! input: a panic (a failed assertion included) is a finding.
//!
//! Used by the libFuzzer targets in `fuzz/fuzz_targets/` and, on stable Rust, by
//! `tftp-backend/tests/fuzz_corpus.rs` (which includes this file by path), so it depends only on
//! `tftp-backend`'s library, `xdp-lb-common` and `bytemuck`.

use tftp_backend::{
    options::{BLKSIZE_MAX, BLKSIZE_MIN, DEFAULT_BLKSIZE, Limits, negotiate},
    wire::{MAX_PACKET, Options, Packet, Repr},
};
use xdp_lb_common::{
    SteeringHeader,
    steering::{STEERING_MAGIC, expand_block},
};

/// TFTP wire format: parsing untrusted bytes never panics; whatever parses emits into exactly
/// `buffer_len` bytes, re-parses to the same message and emits the same bytes again (emission
/// is canonical); a buffer one byte short is refused, not overrun.
pub fn wire(data: &[u8]) {
    if let Ok(packet) = Packet::new_checked(data) {
        // The typed view's accessors on their own, as the transfer code calls them.
        let _ = (packet.opcode(), packet.block());
    }
    let Ok(repr) = Packet::parse(data) else { return };
    let len = repr.buffer_len();
    let mut first = vec![0u8; len];
    let Some(written) = repr.emit(&mut first) else {
        assert!(len > MAX_PACKET, "emit refused a {len}-byte message of {repr:?}");
        return;
    };
    assert_eq!(written, len, "emit wrote other than buffer_len for {repr:?}");
    assert!(len <= MAX_PACKET);
    let again = Packet::parse(&first).unwrap_or_else(|e| panic!("emitted {repr:?} does not parse: {e}"));
    assert_eq!(again, repr, "parse(emit(parse(x))) != parse(x)");
    let mut second = vec![0u8; again.buffer_len()];
    assert_eq!(again.emit(&mut second), Some(len));
    assert_eq!(first, second, "emission is not canonical");
    assert_eq!(repr.emit(&mut second[..len - 1]), None, "a short buffer must be refused");
}

/// Steering header as the steered backend reads a datagram: the first 64 bytes are the header
/// (any bit pattern is a valid `SteeringHeader`), each accessor reads its documented offset,
/// block arithmetic stays in range, and the rest is a TFTP packet ([`wire`]).
pub fn steering(data: &[u8]) {
    let Some(prefix) = data.get(..SteeringHeader::LEN) else {
        // Too short for a header: the backend drops it; the kernel reads nothing either.
        assert!(bytemuck::try_from_bytes::<SteeringHeader>(data).is_err());
        return;
    };
    let header: SteeringHeader =
        *bytemuck::try_from_bytes(prefix).expect("64 bytes with alignment 1 are always a header");
    assert_eq!(bytemuck::bytes_of(&header), prefix, "the header is its bytes");
    let be16 = |at: usize| u16::from_be_bytes([prefix[at], prefix[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]]);
    let be64 = |at: usize| u64::from(be32(at)) << 32 | u64::from(be32(at + 4));
    assert_eq!(header.has_magic(), prefix[..4] == STEERING_MAGIC);
    assert_eq!(header.flags, prefix[4]);
    for bit in 0..8 {
        assert_eq!(header.has_flag(1 << bit), prefix[4] & (1 << bit) != 0);
    }
    assert_eq!((header.mode, header.options, header.timeout), (prefix[5], prefix[6], prefix[7]));
    assert_eq!(header.client_ip, prefix[8..12]);
    assert_eq!((header.client_port(), header.vip_port()), (be16(12), be16(14)));
    assert_eq!(header.vip_ip, prefix[16..20]);
    assert_eq!(header.block(), be32(20));
    assert_eq!((header.blksize(), header.windowsize()), (be16(24), be16(26)));
    assert_eq!(header.path_hash(), be64(28));
    assert_eq!(header.digest, prefix[36..52]);
    assert_eq!(header.file_size(), be64(52));

    // Widening a client's 16-bit ACK with the header's block as the highest block sent.
    let sent = header.block();
    let wire_block = be16(60);
    let wide = expand_block(wire_block, sent);
    assert_eq!(wide & 0xffff, u32::from(wire_block), "expand_block changed the low 16 bits");
    if u32::from(wire_block) <= sent || sent >= 0x1_0000 {
        assert!(wide <= sent && sent - wide < 0x1_0000, "expand_block({wire_block}, {sent}) = {wide}");
    } else {
        assert!(wide > sent && wide - sent < 0x1_0000, "expand_block({wire_block}, {sent}) = {wide}");
    }

    // What the LB does with a header: reset it for a client, set the block.
    let mut copy = header;
    copy.set_block(!sent);
    assert_eq!(copy.block(), !sent);
    copy.reset_for_client(header.client_ip, header.client_port, header.vip_ip, header.vip_port());
    assert_eq!(
        copy,
        SteeringHeader::for_client(header.client_ip, header.client_port(), header.vip_ip, header.vip_port())
    );
    assert!(copy.has_magic() && copy.flags == 0 && copy.block() == 0);

    wire(&data[SteeringHeader::LEN..]);
}

/// Option negotiation: the input is `max_blksize`, `max_windowsize` (2 bytes each), a size
/// flag and a file size (1 + 8), then either an OACK-style option list (`name\0value\0`...) or,
/// when that does not parse, raw option values. The result stays within the RFC ranges and the
/// limits, acknowledges only what was asked, survives the wire, and negotiating the OACK again
/// changes nothing.
pub fn options(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<13>() else { return };
    let limits = Limits {
        max_blksize: u16::from_be_bytes([head[0], head[1]]),
        max_windowsize: u16::from_be_bytes([head[2], head[3]]),
    };
    let size = (head[4] & 1 == 1).then(|| u64::from_be_bytes(head[5..13].try_into().expect("8 bytes")));
    let mut oack = vec![0, 6];
    oack.extend_from_slice(rest);
    if let Ok(Repr::Oack { options }) = Packet::parse(&oack) {
        check_negotiation(&options, limits, size);
    }
    let word = |at: usize| {
        let bytes = rest.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    };
    let raw = Options {
        blksize: word(0),
        timeout: word(4),
        tsize: word(8).map(|high| u64::from(high) << 32 | u64::from(word(12).unwrap_or(0))),
        windowsize: word(16),
    };
    check_negotiation(&raw, limits, size);
}

fn check_negotiation(asked: &Options, limits: Limits, size: Option<u64>) {
    let n = negotiate(asked, limits, size);
    let o = n.oack;
    // Only what the client asked for is acknowledged (RFC 2347).
    assert!(o.blksize.is_none() || asked.blksize.is_some());
    assert!(o.windowsize.is_none() || asked.windowsize.is_some());
    assert!(o.timeout.is_none() || asked.timeout.is_some());
    assert_eq!(o.tsize.is_some(), asked.tsize.is_some());
    // What is acknowledged is what the transfer uses; without it, the RFC 1350 defaults.
    assert_eq!(o.blksize.unwrap_or(u32::from(DEFAULT_BLKSIZE)), u32::from(n.blksize));
    assert_eq!(o.windowsize.unwrap_or(1), u32::from(n.windowsize));
    assert_eq!(o.timeout, n.timeout.map(u32::from));
    assert!((BLKSIZE_MIN..=BLKSIZE_MAX).contains(&u32::from(n.blksize)), "{n:?}");
    if let Some(b) = o.blksize {
        assert!(b <= u32::from(limits.max_blksize).max(BLKSIZE_MIN), "blksize {b} beyond {limits:?}");
        assert!(asked.blksize.is_some_and(|asked| b <= asked), "blksize raised");
    }
    if let Some(w) = o.windowsize {
        assert!((1..=u32::from(limits.max_windowsize.max(1))).contains(&w), "windowsize {w} beyond {limits:?}");
        assert!(asked.windowsize.is_some_and(|asked| w <= asked), "windowsize raised");
    }
    if let Some(t) = o.timeout {
        assert!((1..=255).contains(&t));
    }
    if let Some(t) = o.tsize {
        assert_eq!(t, size.unwrap_or_else(|| asked.tsize.unwrap_or_default()));
    }
    // The OACK goes over the wire intact...
    let repr = Repr::Oack { options: o };
    let mut buf = vec![0u8; repr.buffer_len()];
    assert_eq!(repr.emit(&mut buf), Some(buf.len()));
    assert_eq!(Packet::parse(&buf), Ok(repr));
    // ...and a client that asks again for exactly what was granted gets exactly that.
    assert_eq!(negotiate(&o, limits, size), n, "negotiation is not idempotent");
}
