//! Packets kept for a later resend: the bounded copy of a packet's TFTP payload into a map
//! value's buffer, shared by the balancer (`LB_REQUESTS`, `LB_UPLOAD_DATA`) and the switch
//! (`SW_REQUESTS`).

use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use xdp_lb_common::KeptRequest;

/// Copies the `len` bytes at `offset` in the packet into `buf`, whose size `N` is a power of
/// two. The length copied; `None` (nothing copied) when the payload is empty, longer than the
/// buffer, or runs past the packet.
#[inline(always)]
pub fn copy_payload<const N: usize>(ctx: &XdpContext, buf: &mut [u8; N], offset: usize, len: usize) -> Option<u16> {
    const { assert!(N.is_power_of_two() && N <= u16::MAX as usize) };
    if len == 0 || len > N {
        return None;
    }
    // The same value as `len`, in a form the verifier sees bounded by the buffer (1 ..= N).
    let bounded = ((len - 1) & (N - 1)) + 1;
    // SAFETY: the helper copies `bounded` bytes from the packet into the buffer, which holds
    // `N`; it fails (nothing kept) if the packet is shorter.
    let copied = unsafe { bpf_xdp_load_bytes(ctx.ctx, offset as u32, buf.as_mut_ptr().cast(), bounded as u32) };
    (copied == 0).then_some(bounded as u16)
}

/// [`copy_payload`] into a `KeptRequest`, its length set. False when nothing was kept.
#[inline(always)]
pub fn copy_request(ctx: &XdpContext, kept: &mut KeptRequest, offset: usize, len: usize) -> bool {
    let Some(copied) = copy_payload(ctx, &mut kept.bytes, offset, len) else { return false };
    kept.len = copied;
    true
}
