//! Backend choice and bookkeeping: which backends are usable, the least loaded one, and the
//! session counts per backend. (Their watchdog records are `watchdog`'s.)

use xdp_lb_common::maps::{BACKEND_LIVE, MAX_BACKENDS};

use crate::maps::{LB_BACKENDS, LB_LOAD, LB_SEEN, atomic_add};

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
