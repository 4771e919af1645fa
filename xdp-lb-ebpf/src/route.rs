//! Next hops from the kernel's routing and neighbour tables (`bpf_fib_lookup`), for packets
//! whose way out no earlier frame showed: replies to clients a load balancer learned from its
//! peer or from a backend, and the switch's replies to clients.
//!
//! The kernel answers only when forwarding is enabled on the ingress interface and the next
//! hop's MAC is resolved; otherwise the caller counts the miss.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use xdp_lb_common::frame::IPPROTO_UDP;

const AF_INET: u8 = 2;
/// `BPF_FIB_LKUP_RET_SUCCESS`: route found and neighbour resolved.
const FOUND: i64 = 0;

/// Where a frame to some address leaves: the interface, our MAC there, the next hop's MAC.
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The next hop toward `dst` for a UDP packet from `src` of `ip_len` bytes.
#[inline(always)]
pub fn toward(ctx: &XdpContext, src: [u8; 4], dst: [u8; 4], ip_len: u16) -> Option<NextHop> {
    // SAFETY: a struct of integers and unions of integers: all-zero is valid.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64-byte struct")]
    let size = size_of::<bpf_fib_lookup>() as i32;
    // SAFETY: helper on our own context with a live, correctly sized parameter struct.
    let rc = unsafe { fib_lookup(ctx.ctx.cast(), &raw mut params, size, 0) };
    if rc != FOUND {
        return None;
    }
    Some(NextHop { ifindex: params.ifindex, src_mac: params.smac, dst_mac: params.dmac })
}

/// Back out of the interface the packet came in on, or redirected to another one.
#[inline(always)]
pub fn egress(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call; returns XDP_REDIRECT on success, XDP_ABORTED otherwise.
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "the helper returns an XDP action")]
    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
    action
}
