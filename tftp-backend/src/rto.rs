//! When to retransmit: each transfer's round-trip time estimated from its own exchanges (RFC
//! 6298: SRTT and RTTVAR, Karn's rule), the timeout that follows from it with exponential
//! backoff, and the backend-wide budget that keeps many transfers retransmitting at once from
//! adding to the congestion that made them lose packets. Pure logic over `Instant`s the caller
//! passes in.
//!
//! A lost DATA or ACK used to cost the transfer's whole timeout (1 s by default): at 1% loss a
//! lock-step download ran ~300 times slower. With the estimate it costs a few round trips, and
//! the floor keeps a timer from firing before a client on a busy machine can answer.

use std::time::{Duration, Instant};

/// Retransmissions without progress before a transfer is abandoned, once the waits have grown
/// to the transfer's timeout (the quicker ones before do not count).
pub const MAX_RETRIES: u8 = 6;

/// The clock's granularity in RFC 6298's `max(G, 4 * RTTVAR)`: the timers are timerfds
/// (`alarm.rs`), late by the kernel's timer slack (50 µs) and a wakeup.
const GRANULARITY: Duration = Duration::from_micros(100);

/// Unit of the estimate as the steering header carries it.
const WIRE_UNIT_MICROS: u64 = 50;

/// A transfer's retransmission bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// The shortest wait before a retransmission, whatever the round trip (`--rto-min-ms`).
    pub floor: Duration,
    /// The negotiated timeout (RFC 2349) or `--timeout-ms`: the wait before any estimate, and
    /// the longest the estimate alone may make it.
    pub timeout: Duration,
    /// The client asked for `timeout`: it retransmits on that timer too.
    pub negotiated: bool,
}

/// Smoothed round-trip time and its variation (RFC 6298 2.2-2.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RttEstimate {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimate {
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                self.rttvar = (self.rttvar * 3 + srtt.abs_diff(rtt)) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The retransmission timeout: the transfer's timeout until a round trip was measured.
    #[must_use]
    pub fn rto(self, pace: Pace) -> Duration {
        self.srtt.map_or(pace.timeout, |srtt| (srtt + GRANULARITY.max(self.rttvar * 4)).clamp(pace.floor.min(pace.timeout), pace.timeout))
    }

    #[cfg(test)]
    #[must_use]
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Four bytes for the steering header: SRTT and RTTVAR in units of 50 µs (saturating at
    /// ~3.3 s), zero SRTT for no estimate.
    #[must_use]
    pub fn to_wire(self) -> [u8; 4] {
        let units = |d: Duration| u16::try_from(d.as_micros() / u128::from(WIRE_UNIT_MICROS)).unwrap_or(u16::MAX);
        let Some(srtt) = self.srtt else { return [0; 4] };
        let [a, b] = units(srtt).max(1).to_be_bytes();
        let [c, d] = units(self.rttvar).to_be_bytes();
        [a, b, c, d]
    }

    #[must_use]
    pub fn from_wire(bytes: [u8; 4]) -> Self {
        let srtt = u16::from_be_bytes([bytes[0], bytes[1]]);
        let rttvar = u16::from_be_bytes([bytes[2], bytes[3]]);
        let duration = |units: u16| Duration::from_micros(u64::from(units) * WIRE_UNIT_MICROS);
        Self { srtt: (srtt != 0).then(|| duration(srtt)), rttvar: duration(rttvar) }
    }
}

/// Quick retransmissions after the estimated timeout, doubling, before the server goes quiet.
/// A lost DATA is repaired by the first (99 times in 100 at 1% loss); three unanswered mean
/// the client is waiting for its own timer: atftp answers no copy of a block it has, so a lost
/// ACK is repaired only by its retransmission after 5 s of silence, which the quick resends
/// kept postponing (13 s per lost ACK in a lossy boot storm).
pub const QUICK: u8 = 3;

/// The wait before the next retransmission after `retries` unanswered ones, or `None` when the
/// transfer should be abandoned. `QUICK` waits doubling from the estimated timeout (never
/// beyond the transfer's timeout), then quiet ones from `quiet_wait`, doubling up to 16 times
/// the timeout (RFC 1123 4.2.3.2), `MAX_RETRIES` of them. A lost packet costs a few round
/// trips; a client that only retransmits after a quiet gap gets one at once.
#[must_use]
pub fn wait(rto: Duration, pace: Pace, retries: u8) -> Option<Duration> {
    if retries < QUICK {
        return Some((rto * (1 << retries)).min(pace.timeout));
    }
    quiet_wait(pace, retries - QUICK)
}

/// The retransmission timer of most clients that negotiate no `timeout` (tftp-hpa, atftp,
/// U-Boot: 5 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits that leave the client room for its own retransmission: twice the negotiated timeout,
/// or without one a second longer than the usual client timer; then doubling, up to 16 times
/// the timeout; `None` after `MAX_RETRIES`.
///
/// An OACK is resent only on this schedule: a client that sees a second OACK after it
/// acknowledged the first aborts (atftp), and under load its acknowledgement may only be late.
/// Every client retransmits by itself, its request if the OACK was lost (answered with the
/// OACK again, `ReadTransfer::on_repeated_request`), its ACK if that was.
#[must_use]
pub fn quiet_wait(pace: Pace, retries: u8) -> Option<Duration> {
    let first = if pace.negotiated { pace.timeout * 2 } else { (pace.timeout * 2).max(CLIENT_TIMEOUT + Duration::from_secs(1)) };
    let longest = first.max(pace.timeout.saturating_mul(16));
    (retries <= MAX_RETRIES).then(|| first.saturating_mul(1 << retries.min(4)).min(longest))
}

/// One transfer's retransmission clock: the estimate, the send being timed, the backoff in
/// effect and the retransmissions since the last progress.
#[derive(Clone, Debug)]
pub struct Clock {
    pub pace: Pace,
    pub rtt: RttEstimate,
    /// The block (or, for uploads, the acknowledgement) whose answer gives the next sample,
    /// and when it went out: the first block of what went out new, so that an ACK from inside
    /// a window (a gap ACK) measures too; timing the window's last block, which a tail probe
    /// resends, left windowed transfers over a lossy link without a sample and on the 1 s
    /// timeout for good. Cleared when that block goes out again: an answer to a packet sent
    /// twice says nothing about either send (Karn). Resends of other blocks leave it.
    timed: Option<(u32, Instant)>,
    /// Doublings of the timeout in effect: kept across progress until a new sample (Karn's
    /// algorithm). A client that got slower would otherwise see every block sent twice, each
    /// ACK ambiguous, and the estimate would never learn the new round trip.
    backoff: u8,
    /// Retransmissions since the peer last made progress: the transfer is abandoned when
    /// the waits for as many have run out.
    retries: u8,
    /// The timed send that a resend voided, kept to tell later whether the resend was needed.
    doubt: Option<Doubt>,
    /// The shortest wait this transfer's client has shown it needs: a client that stalls now
    /// and then (a VM whose CPU the host takes away, firmware polling its NIC) answers late
    /// without any loss, and a timer set from its usual fast answers resent a block at each
    /// stall (8% of a GRUB download on a loaded host). Raised by a resend that proved
    /// needless, halved after `LEARNED_FLOOR_DECAY` clean samples.
    learned_floor: Duration,
    /// Clean samples since the learned floor was set or last halved.
    clean: u16,
}

/// A resend of the timed block, while its answers tell whether it was needed.
#[derive(Clone, Copy, Debug)]
struct Doubt {
    block: u32,
    /// When the block first went out.
    sent: Instant,
    /// When the first answer covering it came, if one did.
    answered: Option<Instant>,
}

/// The least round trip the first answer (the answer to an OACK, or to ACK 0 of an upload)
/// stands for. It measures the path, not how long the client takes with a block: U-Boot under
/// emulation answered its OACK within a millisecond but took ~10 ms for its first block, and a
/// DATA 1 resent at 5 ms used up the one repeated ACK U-Boot sends per block (`tftp_last_nack`
/// in its `net/tftp.c`), so a resend after a balancer's death later got no answer and the boot
/// waited for U-Boot's 5 s timer. The DATA samples that follow bring the estimate down.
pub const FIRST_ANSWER_FLOOR: Duration = Duration::from_millis(20);

/// Clean samples after which the learned floor is halved.
const LEARNED_FLOOR_DECAY: u16 = 64;

impl Clock {
    #[must_use]
    pub fn new(pace: Pace) -> Self {
        Self { pace, rtt: RttEstimate::default(), timed: None, backoff: 0, retries: 0, doubt: None, learned_floor: Duration::ZERO, clean: 0 }
    }

    /// Something new went out, from `block` on; timed unless a sample is pending already.
    pub fn sent(&mut self, block: u32, now: Instant) {
        if self.timed.is_none() {
            self.timed = Some((block, now));
        }
    }

    /// Blocks `first..=last` went out again (Karn's rule).
    pub fn resent(&mut self, first: u32, last: u32) {
        if let Some((block, sent)) = self.timed
            && (first..=last).contains(&block)
        {
            self.timed = None;
            self.doubt = Some(Doubt { block, sent, answered: None });
        }
    }

    /// The peer answered up to `block`: a sample if that covers the timed send.
    pub fn answered(&mut self, block: u32, now: Instant) {
        if let Some(doubt) = &mut self.doubt
            && block >= doubt.block
            && doubt.answered.is_none()
        {
            doubt.answered = Some(now);
        }
        if let Some((timed, at)) = self.timed
            && block >= timed
        {
            let rtt = now.saturating_duration_since(at);
            self.rtt.sample(if timed == 0 { rtt.max(FIRST_ANSWER_FLOOR) } else { rtt });
            self.timed = None;
            self.backoff = 0;
            self.clean = self.clean.saturating_add(1);
            if self.clean >= LEARNED_FLOOR_DECAY {
                self.learned_floor /= 2;
                self.clean = 0;
            }
        }
    }

    /// A lock-step client repeated its ACK of `block` at `now`. Right after the first ACK of a
    /// resent block (within a timeout's estimate), the repeat is the client's answer to the
    /// copy: it had the first one, the resend was needless, and the first ACK answered the
    /// first send: a true sample (RFC 3522's idea, with the duplicate for a timestamp). The
    /// estimate takes it and the floor rises to it.
    pub fn repeated(&mut self, block: u32, now: Instant) {
        let Some(Doubt { block: doubted, sent, answered: Some(answered) }) = self.doubt else { return };
        if block != doubted || now.saturating_duration_since(answered) > self.rtt.rto(self.pace) {
            return;
        }
        let rtt = answered.saturating_duration_since(sent);
        self.rtt.sample(rtt);
        self.learned_floor = self.learned_floor.max(rtt + rtt / 4).min(self.pace.timeout);
        self.clean = 0;
        self.backoff = 0;
        self.doubt = None;
    }

    /// The peer made progress: it is alive, the give-up count starts again. The backoff stays
    /// (Karn), but never beyond the quick resends: a transfer whose every window needs a
    /// repair may go long without a clean sample, and must not wait seconds per window.
    pub fn progress(&mut self) {
        self.retries = 0;
        self.backoff = self.backoff.min(QUICK - 1);
    }

    #[must_use]
    pub fn retries(&self) -> u8 {
        self.retries
    }

    /// The quick resends are spent: the server waits quietly for the client's own
    /// retransmission.
    #[must_use]
    pub fn quiet(&self) -> bool {
        self.backoff.max(self.retries) >= QUICK
    }

    /// The timer fired with nothing heard: false when the transfer should be abandoned.
    pub fn expired(&mut self, oack: bool) -> bool {
        self.retries = self.retries.saturating_add(1);
        self.backoff = self.backoff.saturating_add(1);
        self.schedule(oack, self.retries).is_some()
    }

    /// The wait before the next retransmission (`oack`: of an OACK, see `quiet_wait`).
    #[must_use]
    pub fn wait(&self, oack: bool) -> Duration {
        let longest = self.pace.timeout.saturating_mul(16);
        self.schedule(oack, self.backoff.max(self.retries)).unwrap_or(longest)
    }

    fn schedule(&self, oack: bool, step: u8) -> Option<Duration> {
        let learned = Pace { floor: self.pace.floor.max(self.learned_floor), ..self.pace };
        if oack { quiet_wait(self.pace, step) } else { wait(self.rtt.rto(learned), self.pace, step) }
    }
}

/// The backend-wide budget of timer-driven retransmissions, a token bucket of datagrams. When
/// many transfers lose packets at once the cause is usually a link or a switch buffer that is
/// already full (a rack powering on), and each transfer's own backoff does not stop a thousand
/// of them from resending a window every few milliseconds. Retransmissions beyond the budget
/// wait for it, and the waiting transfers' clocks do not count it as a retry. Resends that a
/// client's ACK asks for (a gap) are paced by the client and not charged.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Datagrams per second (`--retransmit-budget`).
    rate: u32,
    /// Tokens now (may go negative: a window is sent whole and paid for after).
    tokens: f64,
    at: Instant,
}

impl Budget {
    #[must_use]
    pub fn new(rate: u32, now: Instant) -> Self {
        Self { rate, tokens: f64::from(Self::burst_of(rate)), at: now }
    }

    /// A tenth of a second's worth.
    fn burst_of(rate: u32) -> u32 {
        (rate / 10).max(1)
    }

    /// Whether a retransmission may go now, else how long until it may.
    pub fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(Self::burst_of(self.rate)));
        if self.tokens > 0.0 {
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(missing / f64::from(self.rate)).max(Duration::from_millis(1)))
    }

    /// Pays for the `datagrams` of an allowed retransmission (the balance may go negative: a
    /// window is sent whole).
    pub fn charge(&mut self, datagrams: u32) {
        if self.rate != 0 {
            self.tokens -= f64::from(datagrams);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pace() -> Pace {
        Pace { floor: 2 * MS, timeout: 1000 * MS, negotiated: false }
    }

    #[test]
    fn a_quick_answer_to_the_oack_does_not_make_the_first_block_resend_within_ms() {
        let pace = Pace { floor: Duration::from_micros(500), timeout: Duration::from_secs(5), negotiated: true };
        let t = Instant::now();
        let mut clock = Clock::new(pace);
        clock.sent(0, t);
        clock.answered(0, t + Duration::from_micros(300));
        assert!(clock.rtt.rto(pace) >= FIRST_ANSWER_FLOOR * 2, "U-Boot takes ~10 ms with its first block: {:?}", clock.rtt.rto(pace));
        let mut now = t + Duration::from_millis(1);
        for block in 1..=40 {
            clock.sent(block, now);
            now += Duration::from_micros(300);
            clock.answered(block, now);
        }
        assert!(clock.rtt.rto(pace) < Duration::from_millis(5), "DATA samples bring it down: {:?}", clock.rtt.rto(pace));
    }

    #[test]
    fn the_first_sample_sets_srtt_and_half_of_it_as_variation() {
        let mut e = RttEstimate::default();
        assert_eq!(e.rto(pace()), 1000 * MS, "no sample: the transfer's timeout");
        e.sample(100 * MS);
        assert_eq!(e.rto(pace()), 300 * MS, "SRTT + 4 * RTTVAR = 100 + 4 * 50");
        e.sample(100 * MS);
        // RTTVAR = 3/4 * 50 + 1/4 * 0 = 37.5; SRTT = 100.
        assert_eq!(e.rto(pace()), 250 * MS);
    }

    #[test]
    fn a_fast_link_is_held_at_the_floor_and_a_slow_one_at_the_timeout() {
        let mut fast = RttEstimate::default();
        for _ in 0..20 {
            fast.sample(Duration::from_micros(80));
        }
        assert_eq!(fast.rto(pace()), 2 * MS, "80 µs round trips: the floor");
        let mut slow = RttEstimate::default();
        slow.sample(3000 * MS);
        assert_eq!(slow.rto(pace()), 1000 * MS, "never beyond the timeout");
    }

    #[test]
    fn a_few_quick_waits_then_quiet_ones_that_outlast_the_clients_timer() {
        let waits = |rto, pace| (0..20).map_while(|r| wait(rto, pace, r)).map(|d: Duration| d.as_millis()).collect::<Vec<_>>();
        assert_eq!(waits(2 * MS, pace()), [2, 4, 8, 6000, 12_000, 16_000, 16_000, 16_000, 16_000, 16_000]);
        assert_eq!(waits(1000 * MS, pace())[..4], [1000, 1000, 1000, 6000], "no estimate: the timeout, then quiet");
        let negotiated = Pace { negotiated: true, ..pace() };
        let quiet = |pace| (0..20).map_while(|r| quiet_wait(pace, r)).map(|d| d.as_secs()).collect::<Vec<_>>();
        assert_eq!(quiet(pace()), [6, 12, 16, 16, 16, 16, 16], "no timeout negotiated: after the usual 5 s");
        assert_eq!(quiet(negotiated), [2, 4, 8, 16, 16, 16, 16], "twice the client's timer");
    }

    #[test]
    fn karns_rule_takes_no_sample_from_a_resent_block() {
        let t0 = Instant::now();
        let mut clock = Clock::new(pace());
        clock.sent(1, t0);
        clock.resent(1, 1);
        clock.answered(1, t0 + 500 * MS);
        assert_eq!(clock.rtt.srtt(), None, "ambiguous: no sample");
        clock.sent(2, t0 + 500 * MS);
        clock.sent(3, t0 + 501 * MS);
        clock.answered(2, t0 + 510 * MS);
        assert_eq!(clock.rtt.srtt(), Some(10 * MS), "timed from the first new send");
        clock.answered(3, t0 + 520 * MS);
        assert_eq!(clock.rtt.srtt(), Some(10 * MS), "block 3 was not timed");
        // A window 4..=8 timed by its first block; a tail probe of 8 leaves the timing, and a
        // gap ACK of 5 from inside the window measures.
        clock.sent(4, t0 + 600 * MS);
        clock.resent(8, 8);
        clock.answered(5, t0 + 620 * MS);
        assert!(clock.rtt.srtt() > Some(10 * MS), "block 4 went once: a sample");
    }

    #[test]
    fn expiries_back_off_and_give_up() {
        let mut clock = Clock::new(pace());
        let mut expiries = 0;
        while clock.expired(false) {
            expiries += 1;
        }
        assert_eq!(expiries, QUICK + MAX_RETRIES);
        clock.progress();
        assert_eq!(clock.wait(false), 1000 * MS, "progress keeps the backoff (Karn), within the quick resends");
        clock.sent(9, Instant::now());
        clock.answered(9, Instant::now());
        assert!(clock.wait(false) < 1000 * MS, "a new sample ends it");
    }

    /// A client that became slower than the timer: every block went out twice and each ACK
    /// was ambiguous. The backoff stays until a block sent once is answered, so the estimate
    /// learns the new round trip instead of resending every block forever.
    #[test]
    fn the_backoff_lasts_until_a_clean_sample() {
        let t0 = Instant::now();
        let mut clock = Clock::new(pace());
        // DATA blocks (the first answer's floor is another test's).
        for i in 1..=8 {
            clock.sent(i, t0);
            clock.answered(i, t0 + MS);
        }
        let quick = clock.wait(false);
        assert!(quick <= 3 * MS, "{quick:?}");
        clock.sent(9, t0);
        assert!(clock.expired(false));
        clock.resent(9, 9);
        clock.answered(9, t0 + 20 * MS);
        clock.progress();
        assert_eq!(clock.wait(false), quick * 2, "ambiguous answer: still backed off");
        clock.sent(10, t0 + 20 * MS);
        clock.answered(10, t0 + 40 * MS);
        assert!(clock.wait(false) > quick * 2, "the slower round trip is learned: {:?}", clock.wait(false));
    }

    #[test]
    fn the_estimate_survives_the_steering_header() {
        let mut e = RttEstimate::default();
        assert_eq!(RttEstimate::from_wire(e.to_wire()), e, "no estimate travels as none");
        e.sample(Duration::from_micros(1200));
        let back = RttEstimate::from_wire(e.to_wire());
        assert_eq!(back.srtt(), Some(Duration::from_micros(1200)), "whole units travel exactly");
        assert_eq!(back.rto(pace()), e.rto(pace()));
        e.sample(Duration::from_secs(60));
        assert_eq!(RttEstimate::from_wire(e.to_wire()).srtt(), Some(Duration::from_micros(u64::from(u16::MAX) * 50)), "saturates");
    }

    #[test]
    fn the_budget_lets_a_burst_through_then_paces() {
        let t0 = Instant::now();
        let mut budget = Budget::new(1000, t0);
        assert_eq!(budget.allow(t0), Ok(()));
        budget.charge(64);
        assert_eq!(budget.allow(t0), Ok(()), "100 tokens: a window may overdraw them");
        budget.charge(64);
        let wait = budget.allow(t0).unwrap_err();
        assert!(wait >= 28 * MS && wait <= 30 * MS, "28 tokens owed: {wait:?}");
        assert_eq!(budget.allow(t0 + 30 * MS), Ok(()));
        let mut unlimited = Budget::new(0, t0);
        unlimited.charge(1_000_000);
        assert_eq!(unlimited.allow(t0), Ok(()), "0: no budget");
    }
}
