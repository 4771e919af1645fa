//! Requests kept for a later resend: the bounded copy of a packet's TFTP payload into a
//! `KeptRequest`, shared by the balancer (`LB_REQUESTS`) and the switch (`SW_REQUESTS`).

use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use xdp_lb_common::{KeptRequest, maps::REQUEST_KEPT_MAX};

/// Copies the `len` bytes at `offset` in the packet into `kept`. False (nothing kept) when the
/// payload is empty, longer than `REQUEST_KEPT_MAX`, or runs past the packet.
#[inline(always)]
pub fn copy_request(ctx: &XdpContext, kept: &mut KeptRequest, offset: usize, len: usize) -> bool {
    if len == 0 || len > REQUEST_KEPT_MAX {
        return false;
    }
    // The same value as `len`, in a form the verifier sees bounded by the buffer (1 ..= MAX).
    let bounded = ((len - 1) & (REQUEST_KEPT_MAX - 1)) + 1;
    // SAFETY: the helper copies `bounded` bytes from the packet into the buffer, which holds
    // `REQUEST_KEPT_MAX`; it fails (nothing kept) if the packet is shorter.
    let copied = unsafe { bpf_xdp_load_bytes(ctx.ctx, offset as u32, kept.bytes.as_mut_ptr().cast(), bounded as u32) };
    if copied != 0 {
        return false;
    }
    kept.len = bounded as u16;
    true
}
