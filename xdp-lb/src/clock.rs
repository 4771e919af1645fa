//! The agents' clock: CLOCK_MONOTONIC, the clock of the kernel's `bpf_ktime_get_ns`, so times
//! the agents take and times the kernel programs store in the maps compare directly.

use nix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC in ns.
#[must_use]
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux: clock_gettime cannot fail for it.
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |now| {
        u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_forward() {
        let before = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = monotonic_ns();
        assert!(before > 0);
        assert!(after >= before + 2_000_000, "{before} -> {after}");
    }
}
