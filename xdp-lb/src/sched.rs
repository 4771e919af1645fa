//! The agents' scheduling: they judge peers by how quickly answers come, so they must run on
//! time on a machine whose CPUs are busy with the data path or anything else. Like keepalived's
//! VRRP process, they run under the real-time round-robin policy at a modest priority; they
//! sleep nearly all the time (timers and sockets), so they take little from other work.

use tracing::{info, warn};

/// Puts this process (and every thread it starts later) under SCHED_RR at `priority` (1..=99);
/// 0 leaves normal scheduling. Without the privilege it warns and goes on at normal priority.
pub fn realtime(priority: u8) {
    if priority == 0 {
        return;
    }
    let param = libc::sched_param { sched_priority: i32::from(priority.min(99)) };
    // SAFETY: sched_setscheduler(2) on this process with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &raw const param) } == 0 {
        info!(priority, "running under SCHED_RR");
    } else {
        let error = std::io::Error::last_os_error();
        warn!(%error, priority, "cannot use SCHED_RR: an overloaded machine may delay the watchdog (run as root, or --rt-priority 0)");
    }
}
