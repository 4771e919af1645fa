//! The watchdog's bookkeeping for one peer — a backend in `LB_SEEN` for `balance`, a load
//! balancer in `SW_SEEN` for `switch` (`LbSeen` is `BackendSeen`) — written once so that both
//! agents judge their peers from the same record, kept by the same rules.
//!
//! Fields are racy counters by design: another CPU may record a packet at the same time; the
//! agent reads ages and counts, not exact sequences.

use xdp_lb_common::BackendSeen;

use crate::maps::{atomic_add, now_ns};

/// Where a peer's own frame came from: its MAC (or its router's), ours on that link, the link.
/// The MACs by reference, read where the frame holds them (a copy would be staged byte by byte
/// on the BPF stack).
pub struct Link<'a> {
    pub mac: &'a [u8; 6],
    pub our_mac: &'a [u8; 6],
    pub ifindex: u32,
}

/// Records a packet sent to the peer: the watchdog counts it until the peer answers.
#[inline(always)]
pub fn sent_to(seen: &mut BackendSeen) {
    let now = now_ns();
    if seen.unanswered == 0 {
        seen.unanswered_since_ns = now;
    }
    seen.last_sent_ns = now;
    atomic_add(&raw mut seen.unanswered, 1);
    atomic_add(&raw mut seen.packets_to, 1);
}

/// Records a packet from the peer: it is alive, and when the frame is its own (`learned`),
/// it shows how to reach the peer.
#[inline(always)]
pub fn answered_by(seen: &mut BackendSeen, learned: Option<Link<'_>>) {
    seen.unanswered = 0;
    seen.last_answer_ns = now_ns();
    atomic_add(&raw mut seen.packets_from, 1);
    // Only unicast addresses are learned: a peer's multicast (or a forged zero or group
    // address) would flood or black-hole every packet steered to it. The answer counts anyway.
    if let Some(link) = learned
        && is_unicast(link.mac)
        && is_unicast(link.our_mac)
    {
        seen.mac = *link.mac;
        seen.lb_mac = *link.our_mac;
        seen.ifindex = link.ifindex;
    }
}

/// A MAC a single host can have: not all zeros, group bit clear.
#[inline(always)]
fn is_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}
