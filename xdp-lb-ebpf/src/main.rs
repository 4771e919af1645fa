//! xdp-lb's XDP programs. Kept small and boring: parse, decide, count every decision, act.
//! Bounded loops only, explicit bounds checks, and logic that can live in userspace lives there.
#![no_std]
#![no_main]
// The BPF target has no `target_has_atomic`, so `AtomicU64::fetch_add` does not exist there;
// the intrinsic lowers to the BPF atomic add instruction. The crate is built with
// RUSTC_BOOTSTRAP=1 anyway (for -Z build-std=core).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics: see above")]

mod backends;
mod encap;
mod kept;
mod maps;
mod parse;
mod route;
mod session;
mod steer;
mod switch;
mod watchdog;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use xdp_lb_common::{BalanceCounter, SwitchCounter};

/// The load balancer's XDP entry point: steers TFTP transfers between clients and backends.
#[xdp]
pub fn balance(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    maps::count(BalanceCounter::Received, len);
    let (counter, action) = steer::balance(&ctx);
    maps::count(counter, len);
    action
}

/// The switch's XDP entry point: client traffic for the VIP to the active load balancer,
/// replies back to the clients.
#[xdp]
pub fn switch(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    switch::count(SwitchCounter::Received, len);
    let (counter, action) = switch::switch(&ctx);
    switch::count(counter, len);
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
