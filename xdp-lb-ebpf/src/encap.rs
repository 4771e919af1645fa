//! Pushing and popping the steering header: the packet's front grows or shrinks by the
//! header's length (`bpf_xdp_adjust_head`), the Ethernet/IPv4/UDP headers move, the frame is
//! readdressed and both checksums are fixed. Mechanics only, as Katran keeps `pckt_encap.h`
//! apart from `balancer.bpf.c`: which addresses and which header is `steer`'s decision.
//!
//! Headers are rewritten in place in the packet and copied between packet and map memory
//! directly: the BPF stack is 512 bytes, and these structs are large.

use core::ptr::copy_nonoverlapping;

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use xdp_lb_common::{FrameHeaders, SteeringHeader, checksum::fold};

use crate::parse::ptr_at;

const HEADER_LEN: usize = SteeringHeader::LEN;
/// Signed forms for the helper's and the rewrite's length arithmetic (64 fits both).
const HEADER_DELTA: i16 = SteeringHeader::LEN as i16;
const HEADER_ADJUST: i32 = SteeringHeader::LEN as i32;

/// The addresses a frame leaves with, every field as on the wire. References, not copies: the
/// bytes go from map or packet memory straight into the headers (a copy would be staged byte by
/// byte on the BPF stack).
pub struct Addresses<'a> {
    pub eth_dst: &'a [u8; 6],
    pub eth_src: &'a [u8; 6],
    pub ip_src: &'a [u8; 4],
    pub ip_dst: &'a [u8; 4],
    pub udp_src: &'a [u8; 2],
    pub udp_dst: &'a [u8; 2],
}

/// Why a push or pop did not happen; the packet is to be dropped either way.
pub enum Failed {
    /// `bpf_xdp_adjust_head` refused, or the headers are not inside the packet after it.
    AdjustHead,
    /// The packet does not hold the headers where the steering header ends.
    Short,
}

/// Inserts `header`, with `flags` instead of its own, between the UDP header and the payload,
/// and readdresses the frame to `to`.
#[inline(always)]
pub fn push(ctx: &XdpContext, header: &SteeringHeader, flags: u8, to: &Addresses<'_>) -> Result<(), Failed> {
    // SAFETY: helper on our own context; every packet pointer is derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -HEADER_ADJUST) } != 0 {
        return Err(Failed::AdjustHead);
    }
    let (Some(frame), Some(old), Some(pushed)) = (
        ptr_at::<FrameHeaders>(ctx, 0),
        ptr_at::<FrameHeaders>(ctx, HEADER_LEN),
        ptr_at::<SteeringHeader>(ctx, FrameHeaders::PAYLOAD_OFFSET),
    ) else {
        return Err(Failed::AdjustHead);
    };
    // SAFETY: all three ranges were bounds-checked just above; the types have alignment 1; the
    // old headers (64..106) and their new place (0..42) do not overlap, and the steering header
    // (42..106) is written only after the old headers were copied out of its place.
    let (frame, pushed) = unsafe {
        copy_nonoverlapping(old, frame, 1);
        copy_nonoverlapping(header, pushed, 1);
        (&mut *frame, &mut *pushed)
    };
    pushed.flags = flags;
    let added = header_sum(pushed);
    readdress(frame, to, HEADER_DELTA, 0, added);
    Ok(())
}

/// Removes the steering header `header` that follows `frame`'s headers at the front of the
/// packet, and readdresses the frame to `to`.
///
/// The headers are readdressed in their old place and moved afterwards, so `to` may still point
/// into the steering header (whose tail the moved headers overwrite).
#[inline(always)]
pub fn pop(ctx: &XdpContext, frame: &mut FrameHeaders, header: &SteeringHeader, to: &Addresses<'_>) -> Result<(), Failed> {
    let removed = header_sum(header);
    readdress(frame, to, -HEADER_DELTA, removed, 0);
    let Some(moved) = ptr_at::<FrameHeaders>(ctx, HEADER_LEN) else {
        return Err(Failed::Short);
    };
    // SAFETY: bounds-checked just above; 0..42 and 64..106 do not overlap; alignment 1.
    unsafe { copy_nonoverlapping(frame, moved, 1) };
    // SAFETY: helper on our own context; no packet pointer is used afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, HEADER_ADJUST) } != 0 {
        return Err(Failed::AdjustHead);
    }
    Ok(())
}

/// Writes `to` into the headers and fixes lengths and checksums for `delta` payload bytes whose
/// word sums are `removed` and `added`.
#[inline(always)]
fn readdress(frame: &mut FrameHeaders, to: &Addresses<'_>, delta: i16, removed: u32, added: u32) {
    frame.eth_dst = *to.eth_dst;
    frame.eth_src = *to.eth_src;
    frame.rewrite(*to.ip_src, *to.ip_dst, *to.udp_src, *to.udp_dst, delta, removed, added);
}

/// Word sum of a steering header (in packet or map memory) for the incremental UDP checksum.
/// The kernel's `bpf_csum_diff` sums it: an unrolled sum of 64 unaligned bytes would not fit
/// the BPF registers and spill past the 512-byte stack.
#[inline(always)]
fn header_sum(header: &SteeringHeader) -> u32 {
    let to = core::ptr::from_ref(header).cast::<u32>().cast_mut();
    // SAFETY: reads HEADER_LEN bytes of a live header; the verifier checks the range. (The
    // helper subtracts `from` and adds `to`: the header goes in `to`.)
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, to, HEADER_LEN as u32, 0) };
    // The helper sums native-endian (little-endian) words; a ones' complement sum of byte-swapped
    // words is the byte-swapped sum (RFC 1071), so fold and swap back to network order.
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a 32-bit partial sum")]
    let sum = sum as u32;
    u32::from(fold(sum).swap_bytes())
}
