//! Backend choice and bookkeeping: which backends are usable, the least loaded one, the session
//! counts per backend, and the watchdog.

use xdp_lb_common::{
    BackendSeen,
    maps::{BACKEND_LIVE, MAX_BACKENDS},
};

use crate::maps::{LB_BACKENDS, LB_LOAD, LB_SEEN, atomic_add, now_ns};

/// A backend takes sessions when the agent calls it live and its MAC has been learned (from a
/// heartbeat answer), so frames can be addressed to it.
#[inline(always)]
pub fn usable(id: u32) -> bool {
    let live = LB_BACKENDS.get(id).is_some_and(|b| b.state == BACKEND_LIVE);
    live && LB_SEEN.get(id).is_some_and(|s| s.mac != [0; 6])
}

/// The usable backend with the fewest sessions, if any.
#[inline(always)]
pub fn least_loaded() -> Option<u32> {
    let mut best: Option<(u32, u64)> = None;
    for id in 0..MAX_BACKENDS as u32 {
        if !usable(id) {
            continue;
        }
        let load = LB_LOAD.get(id).copied().unwrap_or(u64::MAX);
        if best.is_none_or(|(_, best_load)| load < best_load) {
            best = Some((id, load));
        }
    }
    best.map(|(id, _)| id)
}

/// The id of the registered backend with this address and port.
#[inline(always)]
pub fn find(ip: [u8; 4], port: [u8; 2]) -> Option<u32> {
    for id in 0..MAX_BACKENDS as u32 {
        if let Some(b) = LB_BACKENDS.get(id)
            && b.ip == ip
            && b.port == port
            && b.ip != [0; 4]
        {
            return Some(id);
        }
    }
    None
}

/// One more session on `id`.
#[inline(always)]
pub fn add_session(id: u32) {
    if let Some(load) = LB_LOAD.get_ptr_mut(id) {
        atomic_add(load, 1);
    }
}

/// One session fewer on `id` (never below zero: the agent may have recounted meanwhile).
#[inline(always)]
pub fn remove_session(id: u32) {
    if let Some(load) = LB_LOAD.get_ptr_mut(id) {
        // SAFETY: map value pointer from a successful lookup.
        if unsafe { *load } > 0 {
            atomic_add(load, u64::MAX);
        }
    }
}

/// Records a packet steered to `id`: the watchdog counts it until the backend answers.
#[inline(always)]
pub fn sent_to(id: u32) -> Option<*mut BackendSeen> {
    let seen = LB_SEEN.get_ptr_mut(id)?;
    // SAFETY: map value pointer from a successful lookup; fields are racy counters by design.
    unsafe {
        let now = now_ns();
        if (*seen).unanswered == 0 {
            (*seen).unanswered_since_ns = now;
        }
        (*seen).last_sent_ns = now;
        atomic_add(&raw mut (*seen).unanswered, 1);
        atomic_add(&raw mut (*seen).packets_to, 1);
    }
    Some(seen)
}

/// Records a packet from `id`: it is alive, and its frames teach us how to reach it.
#[inline(always)]
pub fn answered_by(id: u32, mac: [u8; 6], lb_mac: [u8; 6], ifindex: u32) {
    let Some(seen) = LB_SEEN.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        (*seen).unanswered = 0;
        (*seen).last_answer_ns = now_ns();
        (*seen).mac = mac;
        (*seen).lb_mac = lb_mac;
        (*seen).ifindex = ifindex;
        atomic_add(&raw mut (*seen).packets_from, 1);
    }
}
