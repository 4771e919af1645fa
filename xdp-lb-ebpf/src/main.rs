//! xdp-lb's XDP programs. Kept small: parse, decide, count every decision, act.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{bindings::xdp_action, btf_maps::PerCpuArray, macros::{btf_map, xdp}, programs::XdpContext};
use xdp_lb_common::{BalanceCounter, Counter, TFTP_PORT};

use crate::parse::{Layer, PacketDescription};

/// Decision counters of `balance`, indexed by [`BalanceCounter`].
#[btf_map]
static LB_COUNTERS: PerCpuArray<Counter, { BalanceCounter::COUNT }> = PerCpuArray::new();

/// The load balancer's XDP entry point.
#[xdp]
pub fn balance(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    count(BalanceCounter::Received, len);
    let (counter, action) = decide(&parse::describe(&ctx));
    count(counter, len);
    action
}

/// Maps a packet description to the counter it increments and the action taken.
fn decide(packet: &PacketDescription) -> (BalanceCounter, u32) {
    match packet.layer {
        Layer::Truncated => (BalanceCounter::DropTruncated, xdp_action::XDP_DROP),
        Layer::NotIpv4 => (BalanceCounter::PassNotIpv4, xdp_action::XDP_PASS),
        Layer::NotUdp => (BalanceCounter::PassNotUdp, xdp_action::XDP_PASS),
        Layer::Udp if packet.dst_port == TFTP_PORT => {
            (BalanceCounter::PassService, xdp_action::XDP_PASS)
        }
        Layer::Udp => (BalanceCounter::PassNotService, xdp_action::XDP_PASS),
    }
}

#[inline(always)]
fn count(counter: BalanceCounter, len: u64) {
    if let Some(slot) = LB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the per-CPU slot belongs to this CPU for the duration of the program.
        unsafe { (*slot).record(len) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
