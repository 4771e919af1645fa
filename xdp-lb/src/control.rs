//! The load balancer's decisions, as pure functions over what the maps say: when a backend is
//! dead or alive again, where a session goes. The agent does the I/O; this is unit-tested.

use std::time::Duration;

use xdp_lb_common::{
    ClientKey, Session, SteeringHeader,
    maps::{BACKEND_DEAD, BACKEND_LIVE, MAX_BACKENDS},
    steering::{FLAG_HAS_CONTEXT, FLAG_NUDGE},
};

/// When to declare a backend dead.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Packets steered to a backend unanswered for this long, while clients wait: dead.
    pub dead_after: Duration,
    /// Unanswered packets per client with a session on the backend beyond this: dead.
    pub per_client_threshold: u64,
    /// No answer at all (heartbeats included) for this long: dead, even without sessions.
    /// With sessions, `dead_after` applies: heartbeats keep a live backend's answers younger,
    /// and a windowed client sends nothing while it waits for the rest of a window, so
    /// silence is the only sign when a backend dies mid-window.
    pub silent_after: Duration,
}

/// Watchdog settings, the same for the switch (judging load balancers) and a load balancer
/// (judging backends).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct WatchdogArgs {
    /// How often the watchdog reads the kernel's counters (ms).
    #[arg(long, default_value_t = 25)]
    pub tick_ms: u64,

    /// A peer whose packets stay unanswered this long, or that falls silent this long while
    /// clients wait on it, is dead (ms).
    #[arg(long, default_value_t = 100)]
    pub dead_after_ms: u64,

    /// A peer with more unanswered packets per waiting client than this is dead.
    #[arg(long, default_value_t = 8)]
    pub watchdog_per_client: u64,

    /// Interval of the heartbeats that detect idle deaths and revivals (ms).
    #[arg(long, default_value_t = 20)]
    pub probe_interval_ms: u64,

    /// A peer silent this long, heartbeats included, is dead even when no client waits (ms).
    #[arg(long, default_value_t = 300)]
    pub silent_after_ms: u64,
}

impl WatchdogArgs {
    #[must_use]
    pub fn policy(&self) -> Policy {
        Policy {
            dead_after: Duration::from_millis(self.dead_after_ms),
            per_client_threshold: self.watchdog_per_client,
            silent_after: Duration::from_millis(self.silent_after_ms),
        }
    }

    /// The watchdog's and the heartbeats' timers.
    #[must_use]
    pub fn intervals(&self) -> (tokio::time::Interval, tokio::time::Interval) {
        (
            tokio::time::interval(Duration::from_millis(self.tick_ms.max(1))),
            tokio::time::interval(Duration::from_millis(self.probe_interval_ms.max(1))),
        )
    }
}

/// One backend as the agent sees it at a tick.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendView {
    pub state: u8,
    pub unanswered: u64,
    pub unanswered_since_ns: u64,
    pub last_answer_ns: u64,
    pub mac_known: bool,
    pub sessions: u64,
    /// When the agent declared it dead (0: never, or dead since the agent started).
    pub dead_since_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// Steered packets unanswered for `for_ms`.
    Unanswered { for_ms: u64, packets: u64 },
    /// More unanswered packets per client than the threshold.
    PerClient { packets: u64, clients: u64 },
    /// No answer, not even to heartbeats, for `for_ms`.
    Silent { for_ms: u64 },
}

impl std::fmt::Display for DeathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unanswered { for_ms, packets } => write!(f, "{packets} packet(s) unanswered for {for_ms} ms"),
            Self::PerClient { packets, clients } => write!(f, "{packets} unanswered packet(s) for {clients} client(s)"),
            Self::Silent { for_ms } => write!(f, "silent for {for_ms} ms"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    Keep,
    Die(DeathReason),
    Revive,
}

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sessions whose client sent nothing for this long get no nudge after a takeover or a move.
/// Such a client either waits on its own retransmission timer (its next packet reaches the new
/// balancer or backend, which carries on from there) or has left: a download whose FINISHED
/// notice was lost with a failed balancer, or a client that gave up. A nudge would make a
/// backend resend a window to nobody, again at each of its timeouts.
pub const NUDGE_WITHIN: Duration = Duration::from_secs(2);

/// Whether a session's client was heard from recently enough at `now_ns` to nudge its backend.
#[must_use]
pub fn worth_nudging(now_ns: u64, session: &Session) -> bool {
    now_ns.saturating_sub(session.last_client_ns) < nanos(NUDGE_WITHIN)
}

/// Judges one backend at `now_ns` (CLOCK_MONOTONIC, the kernel's `bpf_ktime_get_ns`).
#[must_use]
pub fn judge(now_ns: u64, b: &BackendView, policy: &Policy) -> Judgement {
    match b.state {
        BACKEND_LIVE => {
            if b.unanswered > 0 {
                let waiting = now_ns.saturating_sub(b.unanswered_since_ns);
                if waiting > nanos(policy.dead_after) {
                    return Judgement::Die(DeathReason::Unanswered { for_ms: ms(waiting), packets: b.unanswered });
                }
                let clients = b.sessions.max(1);
                if b.unanswered / clients > policy.per_client_threshold {
                    return Judgement::Die(DeathReason::PerClient { packets: b.unanswered, clients });
                }
            }
            let silent = now_ns.saturating_sub(b.last_answer_ns);
            let allowed = if b.sessions > 0 { policy.dead_after } else { policy.silent_after };
            if silent > nanos(allowed) {
                return Judgement::Die(DeathReason::Silent { for_ms: ms(silent) });
            }
            Judgement::Keep
        }
        BACKEND_DEAD if b.mac_known && b.last_answer_ns > b.dead_since_ns => {
            // Answered since it was declared dead (a heartbeat): back into the active set.
            Judgement::Revive
        }
        _ => Judgement::Keep,
    }
}

/// The live backend with the fewest sessions.
#[must_use]
pub fn least_loaded(views: &[BackendView], loads: &[u64]) -> Option<u32> {
    views
        .iter()
        .zip(loads)
        .enumerate()
        .filter(|(_, (v, _))| v.state == BACKEND_LIVE && v.mac_known)
        .min_by_key(|(_, (_, load))| **load)
        .and_then(|(id, _)| u32::try_from(id).ok())
}

/// Sessions per backend, counted from the session table (the kernel's counts drift when the
/// LRU evicts).
#[must_use]
pub fn count_sessions(sessions: &[(ClientKey, Session)]) -> [u64; MAX_BACKENDS] {
    let mut counts = [0u64; MAX_BACKENDS];
    for (_, session) in sessions {
        if let Some(count) = usize::try_from(session.backend).ok().and_then(|i| counts.get_mut(i)) {
            *count += 1;
        }
    }
    counts
}

/// The datagram that tells a session's backend to resend what is outstanding now: the
/// session's header flagged `NUDGE`, then the client's last ACK. Without a context (no reply
/// learned yet) only a backend that holds the transfer can act on it; others ignore it.
#[must_use]
pub fn nudge(session: &Session) -> Vec<u8> {
    let mut header: SteeringHeader = session.header;
    header.flags = (session.header.flags & FLAG_HAS_CONTEXT) | FLAG_NUDGE;
    let mut datagram = bytemuck::bytes_of(&header).to_vec();
    datagram.extend_from_slice(&[0, 4, session.last_ack[0], session.last_ack[1]]);
    datagram
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn policy() -> Policy {
        Policy { dead_after: Duration::from_millis(100), per_client_threshold: 8, silent_after: Duration::from_millis(300) }
    }

    #[test]
    fn only_recently_heard_clients_are_nudged() {
        let mut session: Session = bytemuck::Zeroable::zeroed();
        session.last_client_ns = 10_000 * MS;
        assert!(worth_nudging(10_000 * MS, &session));
        assert!(worth_nudging(11_999 * MS, &session));
        assert!(!worth_nudging(12_000 * MS, &session), "quiet for NUDGE_WITHIN");
        // A clock behind the session's (a mirrored age rounded up) counts as just heard.
        assert!(worth_nudging(9_000 * MS, &session));
    }

    fn live(last_answer_ns: u64) -> BackendView {
        BackendView { state: BACKEND_LIVE, mac_known: true, last_answer_ns, ..BackendView::default() }
    }

    #[test]
    fn a_busy_backend_that_answers_lives() {
        let b = BackendView { unanswered: 1, unanswered_since_ns: 990 * MS, sessions: 3, ..live(995 * MS) };
        assert_eq!(judge(1000 * MS, &b, &policy()), Judgement::Keep);
    }

    #[test]
    fn unanswered_for_longer_than_dead_after_is_dead() {
        let b = BackendView { unanswered: 2, unanswered_since_ns: 850 * MS, sessions: 1, ..live(850 * MS) };
        assert_eq!(
            judge(1000 * MS, &b, &policy()),
            Judgement::Die(DeathReason::Unanswered { for_ms: 150, packets: 2 })
        );
    }

    #[test]
    fn too_many_unanswered_per_client_is_dead_before_the_timeout() {
        let b = BackendView { unanswered: 40, unanswered_since_ns: 990 * MS, sessions: 4, ..live(990 * MS) };
        assert_eq!(judge(1000 * MS, &b, &policy()), Judgement::Die(DeathReason::PerClient { packets: 40, clients: 4 }));
        let fewer = BackendView { unanswered: 30, ..b };
        assert_eq!(judge(1000 * MS, &fewer, &policy()), Judgement::Keep);
    }

    #[test]
    fn an_idle_backend_that_misses_heartbeats_is_dead() {
        assert_eq!(judge(1000 * MS, &live(600 * MS), &policy()), Judgement::Die(DeathReason::Silent { for_ms: 400 }));
        assert_eq!(judge(1000 * MS, &live(800 * MS), &policy()), Judgement::Keep);
    }

    #[test]
    fn a_backend_with_sessions_that_falls_silent_is_dead_sooner() {
        let serving = BackendView { sessions: 2, ..live(850 * MS) };
        assert_eq!(judge(1000 * MS, &serving, &policy()), Judgement::Die(DeathReason::Silent { for_ms: 150 }));
        let answering = BackendView { sessions: 2, ..live(950 * MS) };
        assert_eq!(judge(1000 * MS, &answering, &policy()), Judgement::Keep);
    }

    #[test]
    fn a_dead_backend_revives_only_after_answering_again() {
        let dead = BackendView { state: BACKEND_DEAD, mac_known: true, last_answer_ns: 500 * MS, dead_since_ns: 600 * MS, ..BackendView::default() };
        assert_eq!(judge(1000 * MS, &dead, &policy()), Judgement::Keep);
        let answered = BackendView { last_answer_ns: 900 * MS, ..dead };
        assert_eq!(judge(1000 * MS, &answered, &policy()), Judgement::Revive);
        let never_seen = BackendView { state: BACKEND_DEAD, ..BackendView::default() };
        assert_eq!(judge(1000 * MS, &never_seen, &policy()), Judgement::Keep);
    }

    #[test]
    fn least_loaded_skips_dead_and_unreachable_backends() {
        let views = [
            live(1),
            BackendView { state: BACKEND_DEAD, mac_known: true, ..BackendView::default() },
            BackendView { mac_known: false, ..live(1) },
            live(1),
        ];
        assert_eq!(least_loaded(&views, &[5, 0, 0, 2]), Some(3));
        assert_eq!(least_loaded(&views[1..3], &[0, 0]), None);
    }

    #[test]
    fn nudge_carries_the_last_ack_and_the_context_when_known() {
        let key = ClientKey::new([10, 0, 0, 9], 4000u16.to_be_bytes());
        let mut session: Session = bytemuck::Zeroable::zeroed();
        session.header = SteeringHeader::for_client(key.ip, 4000, [10, 0, 0, 1], key.tid());
        let early: SteeringHeader = *bytemuck::from_bytes(&nudge(&session)[..64]);
        assert_eq!(early.flags, FLAG_NUDGE, "no context before the first reply");
        session.header.flags = FLAG_HAS_CONTEXT;
        session.header.set_block(70_000);
        session.last_ack = 4460u16.to_be_bytes();
        let datagram = nudge(&session);
        let header: SteeringHeader = *bytemuck::from_bytes(&datagram[..64]);
        assert_eq!(header.flags, FLAG_HAS_CONTEXT | FLAG_NUDGE);
        assert_eq!(header.block(), 70_000);
        assert_eq!(&datagram[64..], &[0, 4, 0x11, 0x6c]);
    }

    #[test]
    fn sessions_are_counted_per_backend() {
        let mut a: Session = bytemuck::Zeroable::zeroed();
        a.backend = 2;
        let mut b = a;
        b.backend = 99; // out of range: ignored
        let key = ClientKey::default();
        let counts = count_sessions(&[(key, a), (key, a), (key, b)]);
        assert_eq!(counts[2], 2);
        assert_eq!(counts.iter().sum::<u64>(), 2);
    }
}
