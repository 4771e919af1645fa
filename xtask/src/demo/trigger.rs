//! The demo's bookkeeping, apart from its processes: when a planned failure is due, where it
//! landed, and what the stall after it was. Pure (samples of a file's size over time in,
//! verdicts out), unit-tested without root.

use std::time::{Duration, Instant};

use netns_tests::watch::stall_until;

/// A gap shorter than this after a failure is no stall (the sampler polls every 2 ms, and
/// windows arrive in bursts).
pub const NO_STALL: Duration = Duration::from_millis(20);

/// Data has to flow this long after a gap before the stall counts as over.
pub const FLOWING_AGAIN: Duration = Duration::from_millis(200);

/// Whether a failure planned at `percent` of a transfer of `size` bytes is due once `received`
/// bytes have arrived.
#[must_use]
pub fn due(received: u64, size: u64, percent: u8) -> bool {
    u128::from(received) * 100 >= u128::from(size) * u128::from(percent)
}

/// The share of a transfer (in percent) that `received` bytes are.
#[must_use]
pub fn percent(received: u64, size: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a percentage for people")]
    let share = received as f64 * 100.0 / size.max(1) as f64;
    share
}

/// What followed a failure in one transfer, once it is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aftermath {
    /// Data went on: no gap of `NO_STALL` or more.
    NoStall { longest: Duration },
    /// Data stopped for `stalled` and came back at `at`.
    Resumed { at: Instant, stalled: Duration },
    /// The next failure came `after` this one, before data had come back: the stalls overlap,
    /// and `stalled` is only this one's share.
    Overlapped { after: Duration, stalled: Duration },
    /// The transfer ended before data came back (or the failure hit it at its very end).
    Ended { stalled: Duration },
}

impl Aftermath {
    /// The longest time without data after the failure (until the next one, if it overlapped).
    #[must_use]
    pub fn gap(self) -> Duration {
        match self {
            Self::NoStall { longest: gap } | Self::Resumed { stalled: gap, .. } | Self::Overlapped { stalled: gap, .. } | Self::Ended { stalled: gap } => gap,
        }
    }
}

/// Whether the stall after the failure at `since` is settled at `now`, and how: the next
/// failure came (at `next`), the transfer ended, or data has flowed for `FLOWING_AGAIN` after
/// the longest gap so far. `None`: not yet.
#[must_use]
pub fn settle(samples: &[(Instant, u64)], since: Instant, next: Option<Instant>, ended: bool, now: Instant) -> Option<Aftermath> {
    let last = samples.last().map_or(now, |s| s.0);
    let end = next.unwrap_or(if ended { last } else { now });
    let (gap, resumed) = stall_until(samples, since, end);
    let flowing = resumed.is_some_and(|r| now.saturating_duration_since(r) >= FLOWING_AGAIN);
    if let Some(next) = next {
        // Data that had not come back by the next failure, or came back only just before it,
        // had no time to show this failure's stall alone.
        let back_for = resumed.map_or(Duration::ZERO, |r| next.saturating_duration_since(r));
        if resumed.is_none() || back_for < NO_STALL.min(gap) {
            return Some(Aftermath::Overlapped { after: next.saturating_duration_since(since), stalled: gap });
        }
    } else if !ended && !flowing {
        return None;
    }
    Some(match resumed {
        _ if gap < NO_STALL => Aftermath::NoStall { longest: gap },
        Some(at) => Aftermath::Resumed { at, stalled: gap },
        None => Aftermath::Ended { stalled: gap },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Samples every 2 ms from `t0 + from` to `t0 + to` (ms), growing by 1 KiB each.
    fn growth(t0: Instant, from: u64, to: u64) -> Vec<(Instant, u64)> {
        (from..to).step_by(2).map(|ms| (t0 + MS * u32::try_from(ms).unwrap(), ms * 1024)).collect()
    }

    #[test]
    fn a_failure_is_due_at_its_share_of_the_file() {
        assert!(!due(29, 100, 30));
        assert!(due(30, 100, 30));
        assert!(due(64 << 20, 64 << 20, 100));
        assert!((percent(16 << 20, 64 << 20) - 25.0).abs() < 1e-9);
        assert!(!due(u64::MAX / 2, u64::MAX, 100), "no overflow");
    }

    #[test]
    fn a_stall_is_measured_until_data_flows_again() {
        let t0 = Instant::now();
        let mut samples = growth(t0, 0, 100);
        samples.extend(growth(t0, 210, 500));
        let kill = t0 + MS * 100;
        assert_eq!(settle(&samples, kill, None, false, t0 + MS * 300), None, "back for 90 ms: not settled yet");
        let after = settle(&samples, kill, None, false, t0 + MS * 420).expect("settled");
        assert_eq!(after, Aftermath::Resumed { at: t0 + MS * 210, stalled: MS * 110 });
    }

    #[test]
    fn a_transfer_that_never_paused_had_no_stall() {
        let t0 = Instant::now();
        let samples = growth(t0, 0, 600);
        let after = settle(&samples, t0 + MS * 100, None, false, t0 + MS * 590).expect("settled");
        assert!(matches!(after, Aftermath::NoStall { .. }), "{after:?}");
        assert!(after.gap() < NO_STALL);
    }

    /// The demo once reported "no stall after the LB kill" when the backend kill came 16 ms
    /// later: the gap cut at the next failure was short. Two failures closer than the first
    /// one's stall are reported as overlapping, with the first one's share.
    #[test]
    fn a_second_failure_before_data_came_back_is_an_overlap_not_no_stall() {
        let t0 = Instant::now();
        let mut samples = growth(t0, 0, 100);
        samples.extend(growth(t0, 240, 600));
        let (first, second) = (t0 + MS * 100, t0 + MS * 116);
        let after = settle(&samples, first, Some(second), false, t0 + MS * 120).expect("settled by the next failure");
        assert_eq!(after, Aftermath::Overlapped { after: MS * 16, stalled: MS * 16 });
        // The second failure's own stall is measured from it.
        let second_after = settle(&samples, second, None, false, t0 + MS * 500).expect("settled");
        assert_eq!(second_after, Aftermath::Resumed { at: t0 + MS * 240, stalled: MS * 124 });
    }

    #[test]
    fn a_failure_with_data_back_well_before_the_next_one_stands_alone() {
        let t0 = Instant::now();
        let mut samples = growth(t0, 0, 100);
        samples.extend(growth(t0, 210, 600));
        let after = settle(&samples, t0 + MS * 100, Some(t0 + MS * 400), false, t0 + MS * 410).expect("settled");
        assert_eq!(after, Aftermath::Resumed { at: t0 + MS * 210, stalled: MS * 110 });
    }

    #[test]
    fn a_transfer_that_ended_while_stalled_reports_the_stall() {
        let t0 = Instant::now();
        let samples = growth(t0, 0, 100);
        let after = settle(&samples, t0 + MS * 50, None, true, t0 + MS * 300).expect("settled");
        assert!(matches!(after, Aftermath::NoStall { .. }), "ended right after: {after:?}");
        let samples = growth(t0, 0, 40);
        let after = settle(&samples, t0 + MS * 50, None, true, t0 + MS * 300).expect("settled");
        assert!(matches!(after, Aftermath::NoStall { .. }), "the failure came after its last byte: {after:?}");
    }
}
