//! An upload's copy on another backend, seen from the backend that sends it: the replica of a
//! live upload (every block the client sends, before the client is acknowledged), or a push of
//! a finished upload to a backend that lacks it. Both speak the same replication messages on
//! the steering socket (`FLAG_REPLICA`): a WRQ that opens the copy, the blocks as TFTP DATA,
//! and the peer's cumulative ACKs. Pure: the blocks available, the ACKs and the clock in, what
//! to send out; the event loop (`mod.rs`) reads the blocks from the file and sends them.

use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    time::{Duration, Instant},
};

/// Blocks sent to the peer beyond its last ACK.
const IN_FLIGHT: u32 = 64;
/// First wait for the peer's ACK; doubled per retry. The peers share a LAN with the balancers:
/// an answer takes well under a millisecond.
const FIRST_WAIT: Duration = Duration::from_millis(10);
/// Retries before the peer counts as gone (10 + 20 + 40 + 80 + 160 ms after the first send).
const RETRIES: u32 = 4;
/// The last block's ACK comes after the peer's fsync and rename, which take as long as the
/// disk needs to write the file: it is awaited this long.
const LAST_BLOCK_PATIENCE: Duration = Duration::from_secs(30);

/// What to send the peer now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// The request that opens the copy.
    Open,
    /// These blocks.
    Blocks(RangeInclusive<u32>),
    Nothing,
    /// The peer did not answer: it is gone (or unreachable) for this copy.
    GiveUp,
}

/// One copy in progress toward `peer`.
#[derive(Clone, Debug)]
pub struct Link {
    pub peer: SocketAddr,
    /// The peer answered the request (its ACK 0).
    opened: bool,
    /// Highest block the peer holds in order.
    acked: u32,
    /// Highest block sent.
    sent: u32,
    /// Highest block available to send.
    have: u32,
    /// The last block of the file, once known.
    last: Option<u32>,
    retries: u32,
    /// When the oldest unanswered message went out (the last block's patience counts from it).
    waiting_since: Option<Instant>,
}

impl Link {
    #[must_use]
    pub fn new(peer: SocketAddr) -> Self {
        Self { peer, opened: false, acked: 0, sent: 0, have: 0, last: None, retries: 0, waiting_since: None }
    }

    /// The first message: the request.
    pub fn open(&mut self, now: Instant) -> Send {
        self.waiting_since = Some(now);
        Send::Open
    }

    #[must_use]
    pub const fn opened(&self) -> bool {
        self.opened
    }

    /// Highest block the peer holds.
    #[must_use]
    pub const fn acked(&self) -> u32 {
        self.acked
    }

    /// The peer holds the whole file (its last block answered after its fsync and rename).
    #[must_use]
    pub fn complete(&self) -> bool {
        self.last.is_some_and(|last| self.opened && self.acked >= last)
    }

    /// Blocks up to `have` can be sent; `last`: the file ends with block `last`.
    pub fn available(&mut self, have: u32, last: Option<u32>, now: Instant) -> Send {
        self.have = self.have.max(have);
        self.last = self.last.or(last);
        self.more(now)
    }

    /// The peer acknowledged `block` (0: the request).
    pub fn on_ack(&mut self, block: u32, now: Instant) -> Send {
        if !self.opened {
            self.opened = true;
        } else if block <= self.acked {
            // A duplicate answers a resend: what follows goes when its turn comes.
            return Send::Nothing;
        }
        self.acked = block.min(self.sent.max(self.acked));
        self.retries = 0;
        self.waiting_since = (self.acked < self.sent).then_some(now);
        self.more(now)
    }

    fn more(&mut self, now: Instant) -> Send {
        if !self.opened {
            return Send::Nothing;
        }
        let until = self.have.min(self.acked + IN_FLIGHT);
        if until <= self.sent {
            return Send::Nothing;
        }
        let first = self.sent + 1;
        self.sent = until;
        self.waiting_since.get_or_insert(now);
        Send::Blocks(first..=until)
    }

    /// When to look again, if anything waits for an answer.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        let since = self.waiting_since?;
        if self.waiting_on_last() {
            return Some(since + LAST_BLOCK_PATIENCE);
        }
        // Each retry waits twice as long as the one before: 10, 30, 70, ... ms after the first send.
        Some(since + FIRST_WAIT * ((2 << self.retries) - 1))
    }

    fn waiting_on_last(&self) -> bool {
        self.opened && self.last.is_some_and(|last| self.sent >= last && self.acked + 1 >= last)
    }

    /// The deadline passed: resend what is unanswered, or give up.
    pub fn on_timeout(&mut self, now: Instant) -> Send {
        if self.deadline().is_none_or(|at| at > now) {
            return Send::Nothing;
        }
        if self.waiting_on_last() || self.retries >= RETRIES {
            return Send::GiveUp;
        }
        self.retries += 1;
        if !self.opened {
            return Send::Open;
        }
        // Go back to the first unanswered block (the peer keeps blocks in order only).
        self.sent = self.acked;
        match self.more(now) {
            Send::Nothing => Send::GiveUp,
            send => send,
        }
    }
}

/// A push whose peer went silent (its link gave up) starts again from its request after this
/// long, doubled per restart: the finished file is not urgent, but without it the peer answers
/// a download of the name "file not found" for good. A peer that is only slow (a loaded
/// machine, a pause longer than a link's 310 ms) gets it late; one that is down gets eight
/// tries over about two minutes, then the push is given up (logged).
const PUSH_FIRST_RESTART: Duration = Duration::from_millis(500);
const PUSH_RESTARTS: u32 = 8;

/// When a push whose link gave up for the `restarts`-th time (0: the first) starts again, if
/// it does.
#[must_use]
pub fn push_restart_after(restarts: u32) -> Option<Duration> {
    (restarts < PUSH_RESTARTS).then(|| PUSH_FIRST_RESTART * (1 << restarts))
}

/// Whether the client may be acknowledged up to `block` now. While the replica catches up
/// (a new replica is being copied what the client has been acknowledged already), it may:
/// the copy so far is all this backend's, and holding the client back for the whole catch-up
/// would cost it its own timeout. Once caught up, the client waits for the replica.
#[must_use]
pub fn may_acknowledge(block: u32, replica: Option<(&Link, bool)>) -> bool {
    match replica {
        None => true,
        Some((link, caught_up)) => !caught_up || (link.opened() && link.acked() >= block),
    }
}

/// Whether a copy answers its primary after a burst of blocks in which it received up to
/// `received`, having answered up to `answered`; `windowsize`: the client's, from the blocks'
/// headers; `repeat`: a block of the burst added nothing (a resend, or a probe of a quiet
/// client), which the primary waits on. The primary needs an ACK where it holds the client's:
/// at the end of each of the client's windows (lock-step: every block). Blocks within a window
/// go unanswered, so that a window costs the primary one ACK to read, not one per block; half
/// the flight at most, so that the link never waits for room.
#[must_use]
pub fn copy_answers(received: u32, answered: u32, windowsize: u16, repeat: bool) -> bool {
    repeat || received.is_multiple_of(u32::from(windowsize.max(1))) || received.saturating_sub(answered) >= IN_FLIGHT / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn link() -> (Link, Instant) {
        (Link::new("10.77.0.12:6969".parse().unwrap()), Instant::now())
    }

    #[test]
    fn blocks_follow_the_open_and_stay_within_the_flight() {
        let (mut l, t) = link();
        assert_eq!(l.open(t), Send::Open);
        assert_eq!(l.available(3, None, t), Send::Nothing, "nothing before the peer opened the copy");
        assert_eq!(l.on_ack(0, t), Send::Blocks(1..=3));
        assert_eq!(l.available(100, None, t), Send::Blocks(4..=64), "at most 64 blocks unanswered");
        assert_eq!(l.on_ack(10, t), Send::Blocks(65..=74));
        assert_eq!(l.on_ack(10, t), Send::Nothing, "a duplicate ACK");
        assert_eq!(l.acked(), 10);
    }

    #[test]
    fn an_unanswered_block_is_resent_from_the_first_unanswered_then_the_peer_is_given_up() {
        let (mut l, t) = link();
        l.open(t);
        l.on_ack(0, t);
        l.available(5, None, t);
        l.on_ack(2, t);
        assert_eq!(l.on_timeout(t + 5 * MS), Send::Nothing, "not yet");
        assert_eq!(l.on_timeout(t + 10 * MS), Send::Blocks(3..=5));
        let mut resends = 1;
        let now = loop {
            let now = l.deadline().unwrap();
            match l.on_timeout(now) {
                Send::Blocks(_) => resends += 1,
                Send::GiveUp => break now,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(resends, RETRIES);
        assert!(now - t < Duration::from_millis(400), "a dead peer is known within a few hundred ms, took {:?}", now - t);
    }

    #[test]
    fn an_unanswered_request_is_repeated_then_given_up() {
        let (mut l, t) = link();
        l.open(t);
        assert_eq!(l.on_timeout(t + 10 * MS), Send::Open);
        for _ in 1..RETRIES {
            assert_eq!(l.on_timeout(l.deadline().unwrap()), Send::Open);
        }
        assert_eq!(l.on_timeout(l.deadline().unwrap()), Send::GiveUp);
    }

    #[test]
    fn the_last_block_is_awaited_through_the_peers_fsync_and_then_the_copy_is_complete() {
        let (mut l, t) = link();
        l.open(t);
        l.on_ack(0, t);
        assert_eq!(l.available(4, Some(4), t), Send::Blocks(1..=4));
        l.on_ack(3, t);
        assert!(!l.complete());
        assert_eq!(l.on_timeout(t + Duration::from_secs(1)), Send::Nothing, "a slow fsync is no death");
        l.on_ack(4, t + Duration::from_secs(2));
        assert!(l.complete());
        assert_eq!(l.deadline(), None);
    }

    #[test]
    fn an_ack_beyond_what_was_sent_counts_only_what_was_sent() {
        let (mut l, t) = link();
        l.open(t);
        l.on_ack(0, t);
        l.available(2, None, t);
        l.on_ack(9, t);
        assert_eq!(l.acked(), 2);
    }

    #[test]
    fn a_copy_answers_at_the_clients_window_ends_and_repeats_only() {
        assert!((1..=5).all(|b| copy_answers(b, b - 1, 1, false)), "lock-step: every block");
        let answered: Vec<u32> = (1..=40).filter(|&b| copy_answers(b, 0, 16, false)).collect();
        assert_eq!(answered, [16, 32, 33, 34, 35, 36, 37, 38, 39, 40], "window ends, and beyond half the flight unanswered");
        assert!(!copy_answers(20, 16, 16, false), "within a window");
        assert!(copy_answers(20, 20, 16, true), "a resend or a probe is answered");
        assert!(copy_answers(7, 6, 0, false), "no windowsize in the header: lock-step");
    }

    #[test]
    fn a_push_to_a_silent_peer_starts_again_later_and_later_then_gives_up() {
        let after: Vec<Option<Duration>> = (0..=PUSH_RESTARTS).map(push_restart_after).collect();
        assert_eq!(after[0], Some(Duration::from_millis(500)));
        assert_eq!(after[1], Some(Duration::from_secs(1)));
        assert_eq!(after[7], Some(Duration::from_secs(64)));
        assert_eq!(after[8], None);
        let total: Duration = after.iter().flatten().sum();
        assert!(total > Duration::from_secs(100) && total < Duration::from_secs(150), "{total:?}");
    }

    #[test]
    fn the_client_waits_for_a_caught_up_replica_only() {
        let (mut l, t) = link();
        assert!(may_acknowledge(7, None), "no replica (none configured, or netascii)");
        l.open(t);
        assert!(!may_acknowledge(0, Some((&l, true))), "not even the first answer before the replica opened");
        assert!(may_acknowledge(7, Some((&l, false))), "catching up: this backend's copy suffices meanwhile");
        l.on_ack(0, t);
        l.available(7, None, t);
        l.on_ack(6, t);
        assert!(may_acknowledge(6, Some((&l, true))));
        assert!(!may_acknowledge(7, Some((&l, true))));
    }
}
