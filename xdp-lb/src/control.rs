//! The load balancer's decisions, as pure functions over what the maps say: when a backend is
//! dead or alive again, where a session goes. The agent does the I/O; this is unit-tested.
//!
//! A death verdict needs evidence of death, not of one client's behaviour. Every datagram a
//! live backend reads is answered (`HEARD` when it asks for nothing), and the kernel resets a
//! peer's unanswered count on any answer, heartbeats included. So the verdicts are by age only
//! (steered packets unanswered for `dead_after`, or silence), never by how many packets a
//! client sent: a count is what one client controls. And each verdict also needs a heartbeat
//! that this agent itself sent and that stayed unanswered for `probe_timeout`: an agent that
//! could not run (an overloaded machine) sent no heartbeats and so gathered no evidence.
//! A peer that dies and comes back again and again is held out longer each time (`Damping`).
//! And a peer that has lately come back from a silence of x is allowed 2x before a verdict
//! (`Patience`, up to `--dead-after-max-ms`): on an overloaded machine answers are late, not
//! missing, and a dead peer never comes back to teach a longer allowance.

use std::time::Duration;

use xdp_lb_common::{
    ClientKey, Health, Session, SteeringHeader,
    maps::{BACKEND_DEAD, BACKEND_LIVE, MAX_BACKENDS},
    steering::{FLAG_CLIENT_SENT, FLAG_HAS_CONTEXT, FLAG_NUDGE},
    tftp::{DATA_HEADER_LEN, OPCODE_DATA},
};

/// When to declare a backend dead.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Packets steered to a backend unanswered for this long, while clients wait: dead.
    pub dead_after: Duration,
    /// A heartbeat of this agent's unanswered this long is needed for any verdict.
    pub probe_timeout: Duration,
    /// The most `Patience` may extend `dead_after` and `silent_after` to.
    pub dead_after_max: Duration,
    /// No answer at all (heartbeats included) for this long: dead, even without sessions.
    /// With sessions, `dead_after` applies: heartbeats keep a live backend's answers younger,
    /// and a windowed client sends nothing while it waits for the rest of a window, so
    /// silence is the only sign when a backend dies mid-window.
    pub silent_after: Duration,
}

/// Watchdog settings, the same for the switch (judging load balancers) and a load balancer
/// (judging backends).
#[derive(clap::Args, Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WatchdogArgs {
    /// How often the watchdog reads the kernel's counters (ms).
    #[arg(long, default_value_t = 25)]
    pub tick_ms: u64,

    /// A peer whose packets stay unanswered this long, or that falls silent this long while
    /// clients wait on it, is dead (ms).
    #[arg(long, default_value_t = 100)]
    pub dead_after_ms: u64,

    /// Interval of the heartbeats that detect idle deaths and revivals (ms).
    #[arg(long, default_value_t = 20)]
    pub probe_interval_ms: u64,

    /// No verdict without a heartbeat that has stayed unanswered this long: the evidence that
    /// the peer, and not this agent, stopped (ms). Keep it below --dead-after-ms minus
    /// --probe-interval-ms, or it delays detection.
    #[arg(long, default_value_t = 50)]
    pub probe_timeout_ms: u64,

    /// A peer declared dead again within this many seconds of its previous death counts as
    /// flapping: its hold-down doubles. 0: no flap damping.
    #[arg(long, default_value_t = 60)]
    pub flap_window_secs: u64,

    /// Hold-down of a flapping peer on its second death within the window, doubled for each
    /// further one (ms). The first death is not held: a peer that answers again is back at
    /// once.
    #[arg(long, default_value_t = 1000)]
    pub flap_hold_ms: u64,

    /// Longest hold-down of a flapping peer (ms).
    #[arg(long, default_value_t = 60_000)]
    pub flap_hold_max_ms: u64,

    /// Longest allowance for a peer that has lately come back from long silences (an overloaded
    /// machine): twice the longest such silence, from --dead-after-ms up to this (ms).
    #[arg(long, default_value_t = 1000)]
    pub dead_after_max_ms: u64,

    /// Real-time (SCHED_RR) priority of the agent, so that busy CPUs do not delay its
    /// heartbeats and ticks; 0: normal scheduling.
    #[arg(long, default_value_t = 10)]
    pub rt_priority: u8,

    /// A peer silent this long, heartbeats included, is dead even when no client waits (ms).
    #[arg(long, default_value_t = 300)]
    pub silent_after_ms: u64,
}

impl WatchdogArgs {
    #[must_use]
    pub fn policy(&self) -> Policy {
        Policy {
            dead_after: Duration::from_millis(self.dead_after_ms),
            probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            silent_after: Duration::from_millis(self.silent_after_ms),
            dead_after_max: Duration::from_millis(self.dead_after_max_ms.max(self.dead_after_ms)),
        }
    }

    #[must_use]
    pub fn damping(&self) -> Damping {
        Damping {
            window: Duration::from_secs(self.flap_window_secs),
            hold: Duration::from_millis(self.flap_hold_ms),
            max_hold: Duration::from_millis(self.flap_hold_max_ms),
        }
    }

    /// The tick interval as a duration.
    #[must_use]
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms.max(1))
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
    /// How long the oldest heartbeat this agent sent to it since its last answer has waited
    /// (0: every heartbeat sent is answered, or none was sent).
    pub probe_waiting_ns: u64,
    /// The silence it lately came back from, doubled (`Patience::allowance`; 0: none).
    pub patience_ns: u64,
    /// Its IPv4 address and steering port, as steering headers name a replica.
    pub address: ([u8; 4], [u8; 2]),
}

/// How long a peer was silent and then answered again, lately: the longest such silence,
/// halved every `PATIENCE_HALF_LIFE`. Learned only while the peer is live and the agent ran on
/// time, so a death (which ends in a verdict, not an answer) or the agent's own absence teach
/// nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Patience {
    longest: Duration,
    last_answer_ns: u64,
    observed_ns: u64,
}

/// How fast a learned silence is forgotten once the machine is quiet again.
pub const PATIENCE_HALF_LIFE: Duration = Duration::from_secs(20);

impl Patience {
    /// At a tick: the peer's last answer. `learn` is false when the gap since the previous
    /// tick says nothing about the peer (the agent was late, or the peer is not live).
    pub fn observe(&mut self, now_ns: u64, last_answer_ns: u64, learn: bool) {
        if self.observed_ns != 0 {
            let elapsed = Duration::from_nanos(now_ns.saturating_sub(self.observed_ns));
            self.longest = self.longest.mul_f64(0.5f64.powf(elapsed.as_secs_f64() / PATIENCE_HALF_LIFE.as_secs_f64()));
        }
        self.observed_ns = now_ns;
        if learn && self.last_answer_ns != 0 && last_answer_ns > self.last_answer_ns {
            self.longest = self.longest.max(Duration::from_nanos(last_answer_ns - self.last_answer_ns));
        }
        self.last_answer_ns = self.last_answer_ns.max(last_answer_ns);
    }

    /// Forgets the answers seen so far (the peer died: the silence that killed it is no
    /// lesson, and a revived peer starts afresh).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Twice the longest silence the peer lately came back from.
    #[must_use]
    pub fn allowance(&self) -> u64 {
        nanos(self.longest.saturating_mul(2))
    }
}

/// The oldest heartbeat sent to a peer that no answer has covered yet. Anything the peer sends
/// after a heartbeat left answers it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Probe {
    oldest_unanswered_ns: u64,
}

impl Probe {
    /// A heartbeat left at `now_ns`; the peer's last answer was at `last_answer_ns`.
    pub fn sent(&mut self, now_ns: u64, last_answer_ns: u64) {
        if self.oldest_unanswered_ns == 0 || last_answer_ns >= self.oldest_unanswered_ns {
            self.oldest_unanswered_ns = now_ns;
        }
    }

    /// How long the oldest unanswered heartbeat has waited at `now_ns`.
    #[must_use]
    pub fn waiting(self, now_ns: u64, last_answer_ns: u64) -> u64 {
        if self.oldest_unanswered_ns == 0 || last_answer_ns >= self.oldest_unanswered_ns {
            0
        } else {
            now_ns.saturating_sub(self.oldest_unanswered_ns)
        }
    }

    /// Forgets the heartbeats sent so far: after this agent itself could not run for a while,
    /// their silence is no evidence (the peer shared the overloaded machine); the next ones are.
    pub fn forget(&mut self) {
        self.oldest_unanswered_ns = 0;
    }
}

/// Whether a tick came so late that the agent itself was starved: longer than two ticks (and
/// the heartbeats they would have sent) after the previous one.
#[must_use]
pub fn tick_was_late(previous_ns: u64, now_ns: u64, tick: Duration) -> bool {
    previous_ns != 0 && now_ns.saturating_sub(previous_ns) > 2 * nanos(tick)
}

/// Flap damping: a peer that dies again within `window` of its previous death is held out of
/// the active set for `hold` after that death, doubled for each further flap, at most
/// `max_hold` (the exponential hold-down of routing daemons' flap damping).
#[derive(Clone, Copy, Debug)]
pub struct Damping {
    pub window: Duration,
    pub hold: Duration,
    pub max_hold: Duration,
}

impl Damping {
    /// Records a death verdict at `now_ns` in `health`; returns the hold-down it earns (zero
    /// for a first death, or one after a quiet window).
    pub fn on_death(&self, now_ns: u64, health: &mut Health) -> Duration {
        let flapping = health.last_verdict_ns != 0 && now_ns.saturating_sub(health.last_verdict_ns) < nanos(self.window);
        health.flaps = if flapping { health.flaps.saturating_add(1) } else { 1 };
        health.verdicts += 1;
        health.last_verdict_ns = now_ns;
        let hold = self.hold_for(health.flaps);
        health.held_until_ns = if hold.is_zero() { 0 } else { now_ns.saturating_add(nanos(hold)) };
        hold
    }

    /// The hold-down after the `flaps`-th death within the window.
    #[must_use]
    pub fn hold_for(&self, flaps: u32) -> Duration {
        if flaps <= 1 {
            return Duration::ZERO;
        }
        let doublings = (flaps - 2).min(30);
        self.hold.saturating_mul(1 << doublings).min(self.max_hold)
    }
}

/// Whether a peer that answers again may return at `now_ns`: its hold-down is over, or no
/// other peer is usable (a flapping peer serves better than none).
#[must_use]
pub fn may_return(now_ns: u64, health: &Health, others_usable: bool) -> bool {
    now_ns >= health.held_until_ns || !others_usable
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// Steered packets unanswered for `for_ms`.
    Unanswered { for_ms: u64, packets: u64 },
    /// No answer, not even to heartbeats, for `for_ms`.
    Silent { for_ms: u64 },
}

impl std::fmt::Display for DeathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unanswered { for_ms, packets } => write!(f, "{packets} packet(s) unanswered for {for_ms} ms"),
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
            if b.probe_waiting_ns <= nanos(policy.probe_timeout) {
                // Every heartbeat this agent sent long enough ago was answered (or it sent
                // none: it could not run): no evidence of death, whatever the counters say.
                return Judgement::Keep;
            }
            let patient = |allowed: Duration| b.patience_ns.clamp(nanos(allowed), nanos(policy.dead_after_max).max(nanos(allowed)));
            if b.unanswered > 0 {
                let waiting = now_ns.saturating_sub(b.unanswered_since_ns);
                if waiting > patient(policy.dead_after) {
                    return Judgement::Die(DeathReason::Unanswered { for_ms: ms(waiting), packets: b.unanswered });
                }
            }
            let silent = now_ns.saturating_sub(b.last_answer_ns);
            let allowed = patient(if b.sessions > 0 { policy.dead_after } else { policy.silent_after });
            if silent > allowed {
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

/// What a tick decided about one peer, damping applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Keep,
    /// Declared dead; held out for `hold` (zero: not held) once it answers again.
    Died { reason: DeathReason, hold: Duration },
    /// Answers again and may return to the active set.
    Revived,
}

/// The failure detector's memory across ticks, for a set of peers (a balancer's backends, the
/// switch's two balancers): the ticks' timing, each peer's oldest unanswered heartbeat and
/// its patience. The agents do the I/O around it; both use this one copy.
#[derive(Clone, Debug)]
pub struct Detector {
    policy: Policy,
    damping: Damping,
    tick: Duration,
    last_tick_ns: u64,
    probes: Vec<Probe>,
    patience: Vec<Patience>,
    /// Requests counted so far and when (see `note_requests`).
    requests: Option<(u64, u64)>,
    /// Until when a request flood counts as in progress (CLOCK_MONOTONIC ns).
    flood_until_ns: u64,
}

/// Requests a second (new sessions and paced ones) beyond which a flood is in progress: the
/// backends and the machine are busy answering it, so every peer gets `FLOOD_PATIENCE` times
/// `--dead-after-ms` until `FLOOD_LINGERS` after it. Real sites see tens of requests a second
/// even in boot storms of thousands of machines spread over minutes.
pub const FLOOD_REQUESTS_PER_SEC: u64 = 1000;
pub const FLOOD_PATIENCE: u32 = 3;
pub const FLOOD_LINGERS: Duration = Duration::from_secs(5);

impl Detector {
    #[must_use]
    pub fn new(peers: usize, args: &WatchdogArgs) -> Self {
        Self {
            policy: args.policy(),
            damping: args.damping(),
            tick: args.tick(),
            last_tick_ns: 0,
            probes: vec![Probe::default(); peers],
            patience: vec![Patience::default(); peers],
            requests: None,
            flood_until_ns: 0,
        }
    }

    /// The kernel's count of requests (ever) at `now_ns`: a rate above
    /// `FLOOD_REQUESTS_PER_SEC`, measured over at least a second, is a flood in progress.
    /// Returns whether one is.
    pub fn note_requests(&mut self, now_ns: u64, total: u64) -> bool {
        match self.requests {
            Some((since_ns, count)) if now_ns.saturating_sub(since_ns) >= 1_000_000_000 => {
                let per_sec = total.saturating_sub(count).saturating_mul(1_000_000_000) / now_ns.saturating_sub(since_ns).max(1);
                if per_sec > FLOOD_REQUESTS_PER_SEC {
                    self.flood_until_ns = now_ns.saturating_add(nanos(FLOOD_LINGERS));
                }
                self.requests = Some((now_ns, total));
            }
            Some(_) => {}
            None => self.requests = Some((now_ns, total)),
        }
        now_ns < self.flood_until_ns
    }

    /// A heartbeat to peer `id` just left.
    pub fn probe_sent(&mut self, id: usize, now_ns: u64, last_answer_ns: u64) {
        if let Some(probe) = self.probes.get_mut(id) {
            probe.sent(now_ns, last_answer_ns);
        }
    }

    /// Starts a tick; returns how late it is when the agent itself could not run (its
    /// heartbeats so far are then forgotten: their silence is no evidence).
    pub fn begin_tick(&mut self, now_ns: u64) -> Option<Duration> {
        let late = tick_was_late(self.last_tick_ns, now_ns, self.tick).then(|| Duration::from_nanos(now_ns - self.last_tick_ns));
        if late.is_some() {
            self.probes.iter_mut().for_each(Probe::forget);
        }
        self.last_tick_ns = now_ns;
        late
    }

    /// Fills in what the detector knows of peer `id` (its heartbeat, its patience) and learns
    /// from its answers, unless this tick is late.
    pub fn observe(&mut self, id: usize, now_ns: u64, view: &mut BackendView, late: bool) {
        let (Some(probe), Some(patience)) = (self.probes.get(id), self.patience.get_mut(id)) else { return };
        patience.observe(now_ns, view.last_answer_ns, !late && view.state == BACKEND_LIVE);
        view.patience_ns = patience.allowance();
        if now_ns < self.flood_until_ns {
            view.patience_ns = view.patience_ns.max(nanos(self.policy.dead_after.saturating_mul(FLOOD_PATIENCE)));
        }
        view.probe_waiting_ns = probe.waiting(now_ns, view.last_answer_ns);
    }

    /// Judges peer `id` and applies flap damping to its `health` (the caller writes it back and
    /// the new state when the outcome is not `Keep`). `others_usable`: another peer could take
    /// its place (else a held peer returns anyway).
    pub fn decide(&mut self, id: usize, now_ns: u64, view: &BackendView, health: &mut Health, others_usable: bool) -> Outcome {
        match judge(now_ns, view, &self.policy) {
            Judgement::Keep => Outcome::Keep,
            Judgement::Revive if !may_return(now_ns, health, others_usable) => Outcome::Keep,
            Judgement::Revive => {
                health.revivals += 1;
                health.held_until_ns = 0;
                Outcome::Revived
            }
            Judgement::Die(reason) => {
                if let Some(patience) = self.patience.get_mut(id) {
                    patience.reset();
                }
                Outcome::Died { reason, hold: self.damping.on_death(now_ns, health) }
            }
        }
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

/// The datagram that hands a session's request (as `LB_REQUESTS` kept it) to its new backend:
/// the session's header flagged `NUDGE` (without context: no answer passed this balancer),
/// then the request, as the kernel steers a client's repeated request to a backend it moves
/// the session to. For a session whose backend died before its first answer: the new backend
/// holds nothing to resend on a nudge, but answers this as a fresh request, and the client,
/// which has had no answer yet, takes that answer as the first. A backend that does hold the
/// read (the session moved away and back) sends its first answer again.
#[must_use]
pub fn resend_request(session: &Session, request: &[u8]) -> Vec<u8> {
    let mut header: SteeringHeader = session.header;
    header.flags = (session.header.flags & FLAG_HAS_CONTEXT) | FLAG_NUDGE;
    let mut datagram = bytemuck::bytes_of(&header).to_vec();
    datagram.extend_from_slice(request);
    datagram
}

/// The datagram that hands an upload's last client DATA (as `LB_UPLOAD_DATA` kept it) to the
/// replica the upload moved to: the session's header flagged `NUDGE`, then the DATA, as the
/// kernel steers a client's packet to a backend it moves the session to. The DATA the client
/// sent the dead backend may have died with it, and a lock-step client (tftp-hpa) waits for
/// that block's ACK and ignores a repeat of the one before, which is all a plain nudge could
/// get from a replica that lacks the block. The replica takes it as the client's (written if
/// new, acknowledged either way). `None` (a plain nudge then) unless it is a DATA the client
/// may still wait on: within one window after the last block the backend acknowledged (the
/// header's `block` for an upload); an older one, say of an earlier upload from the same
/// port, must not be written into this one.
#[must_use]
pub fn hand_over_data(session: &Session, data: &[u8]) -> Option<Vec<u8>> {
    let head = data.get(..DATA_HEADER_LEN)?;
    if u16::from_be_bytes([head[0], head[1]]) != OPCODE_DATA || !session.header.is_upload() {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "the low 16 bits: the block number on the wire")]
    let acked = session.header.block() as u16;
    let ahead = u16::from_be_bytes([head[2], head[3]]).wrapping_sub(acked);
    if !(1..=session.header.windowsize().max(1)).contains(&ahead) {
        return None;
    }
    let mut header: SteeringHeader = session.header;
    header.flags = (session.header.flags & FLAG_HAS_CONTEXT) | FLAG_NUDGE;
    let mut datagram = bytemuck::bytes_of(&header).to_vec();
    datagram.extend_from_slice(data);
    Some(datagram)
}

/// The nudge that asks every live backend about a client that sent to its TID (`vip:tid`)
/// while this balancer had no session for it. The backend holding the transfer resends from
/// its own state; `CLIENT_SENT` tells it the client holds the first answer already, so an OACK
/// awaiting its ACK is taken as acknowledged (a second OACK would abort atftp).
#[must_use]
pub fn nudge_unknown(key: ClientKey, vip: [u8; 4]) -> Vec<u8> {
    let mut session: Session = bytemuck::Zeroable::zeroed();
    session.header.reset_for_client(key.ip, key.port, vip, key.tid());
    let mut datagram = nudge(&session);
    datagram[..SteeringHeader::LEN].copy_from_slice(bytemuck::bytes_of(&SteeringHeader { flags: FLAG_CLIENT_SENT | FLAG_NUDGE, ..session.header }));
    datagram
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn policy() -> Policy {
        Policy {
            dead_after: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(50),
            silent_after: Duration::from_millis(300),
            dead_after_max: Duration::from_millis(1000),
        }
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

    /// A live backend last heard at `last_answer_ns`, with a heartbeat unanswered long enough
    /// for a verdict (the cases below are about the other evidence).
    fn live(last_answer_ns: u64) -> BackendView {
        BackendView { state: BACKEND_LIVE, mac_known: true, last_answer_ns, probe_waiting_ns: 60 * MS, ..BackendView::default() }
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

    /// One client's storm (a thousand duplicate ACKs within a few ms) is a count, and a count
    /// is what a client controls: it is no verdict while the packets are younger than
    /// `dead_after`.
    #[test]
    fn many_unanswered_packets_from_one_client_are_no_verdict() {
        let storm = BackendView { unanswered: 1000, unanswered_since_ns: 990 * MS, sessions: 1, ..live(990 * MS) };
        assert_eq!(judge(1000 * MS, &storm, &policy()), Judgement::Keep);
    }

    /// Without a heartbeat of this agent's waiting past `probe_timeout` there is no verdict:
    /// an agent that could not run (an overloaded machine) sent none, and what its counters
    /// show is its own absence as much as the peer's.
    #[test]
    fn no_verdict_without_an_unanswered_heartbeat() {
        let stale = BackendView { unanswered: 3, unanswered_since_ns: 700 * MS, sessions: 2, ..live(700 * MS) };
        assert!(matches!(judge(1000 * MS, &stale, &policy()), Judgement::Die(_)));
        for waiting in [0, 10 * MS, 50 * MS] {
            let asleep = BackendView { probe_waiting_ns: waiting, ..stale };
            assert_eq!(judge(1000 * MS, &asleep, &policy()), Judgement::Keep, "heartbeat waiting {waiting} ns");
        }
    }

    #[test]
    fn a_heartbeat_waits_from_its_first_unanswered_sending() {
        let mut probe = Probe::default();
        assert_eq!(probe.waiting(100 * MS, 0), 0, "nothing sent yet");
        probe.sent(100 * MS, 90 * MS);
        probe.sent(120 * MS, 90 * MS);
        assert_eq!(probe.waiting(170 * MS, 90 * MS), 70 * MS, "from the first of the unanswered ones");
        assert_eq!(probe.waiting(170 * MS, 125 * MS), 0, "an answer after it covers it");
        probe.sent(140 * MS, 125 * MS);
        assert_eq!(probe.waiting(160 * MS, 125 * MS), 20 * MS, "a new one after the answer starts over");
        probe.forget();
        assert_eq!(probe.waiting(500 * MS, 125 * MS), 0, "forgotten after the agent itself was late");
    }

    /// A peer that came back from silences of up to 120 ms (an overloaded machine) is allowed
    /// 240 ms; never more than `dead_after_max`, never less than `dead_after`; the lesson
    /// fades once the machine is quiet.
    #[test]
    fn a_peer_that_came_back_from_long_silences_is_allowed_longer_ones() {
        let mut patience = Patience::default();
        for (now, answer) in [(1000, 990), (1025, 1020), (1150, 1140), (1175, 1170)] {
            patience.observe(now * MS, answer * MS, true);
        }
        let allowance = patience.allowance();
        assert!((239 * MS..=240 * MS).contains(&allowance), "twice the 120 ms silence, barely decayed: {allowance}");
        let slow = BackendView { unanswered: 2, unanswered_since_ns: 1000 * MS, sessions: 1, patience_ns: allowance, ..live(1000 * MS) };
        assert_eq!(judge(1200 * MS, &slow, &policy()), Judgement::Keep, "200 ms: within the allowance");
        assert!(matches!(judge(1300 * MS, &slow, &policy()), Judgement::Die(_)), "300 ms: beyond it");
        let huge = BackendView { patience_ns: 10_000 * MS, ..slow };
        assert!(matches!(judge(2100 * MS, &huge, &policy()), Judgement::Die(_)), "capped at dead_after_max");
        // Twenty seconds later the lesson is half forgotten, and a gap seen while the agent was
        // late teaches nothing.
        patience.observe(21_175 * MS, 21_170 * MS, false);
        assert!((119 * MS..=121 * MS).contains(&patience.allowance()), "{}", patience.allowance());
        patience.reset();
        assert_eq!(patience.allowance(), 0);
    }

    #[test]
    fn a_tick_is_late_when_the_agent_could_not_run() {
        let tick = Duration::from_millis(25);
        assert!(!tick_was_late(0, 1000 * MS, tick), "the first tick");
        assert!(!tick_was_late(1000 * MS, 1030 * MS, tick));
        assert!(tick_was_late(1000 * MS, 1160 * MS, tick));
    }

    #[test]
    fn flapping_peers_are_held_out_longer_each_time() {
        let damping = Damping { window: Duration::from_secs(60), hold: Duration::from_secs(1), max_hold: Duration::from_secs(8) };
        let mut health = Health::default();
        assert_eq!(damping.on_death(10_000 * MS, &mut health), Duration::ZERO, "a first death is not held");
        assert_eq!((health.flaps, health.verdicts, health.held_until_ns), (1, 1, 0));
        assert_eq!(damping.on_death(12_000 * MS, &mut health), Duration::from_secs(1));
        assert_eq!(health.held_until_ns, 13_000 * MS);
        assert_eq!(damping.on_death(14_000 * MS, &mut health), Duration::from_secs(2));
        assert_eq!(damping.on_death(17_000 * MS, &mut health), Duration::from_secs(4));
        assert_eq!(damping.on_death(22_000 * MS, &mut health), Duration::from_secs(8));
        assert_eq!(damping.on_death(31_000 * MS, &mut health), Duration::from_secs(8), "capped");
        assert_eq!(health.flaps, 6);
        // Quiet for longer than the window: a death is a first one again.
        assert_eq!(damping.on_death(100_000 * MS, &mut health), Duration::ZERO);
        assert_eq!((health.flaps, health.verdicts), (1, 7));
    }

    fn args() -> WatchdogArgs {
        WatchdogArgs {
            tick_ms: 25,
            dead_after_ms: 100,
            probe_interval_ms: 20,
            probe_timeout_ms: 50,
            silent_after_ms: 300,
            flap_window_secs: 60,
            flap_hold_ms: 1000,
            flap_hold_max_ms: 60_000,
            dead_after_max_ms: 1000,
            rt_priority: 0,
        }
    }

    /// The detector end to end over ticks: a peer answering every heartbeat lives; one that
    /// falls silent dies once a heartbeat has waited; it returns when it answers, and the second
    /// death within the window holds it for a second.
    #[test]
    fn the_detector_kills_a_silent_peer_revives_it_and_damps_its_flaps() {
        let mut detector = Detector::new(2, &args());
        let mut health = Health::default();
        let mut view = BackendView { state: BACKEND_LIVE, mac_known: true, sessions: 1, ..BackendView::default() };
        let tick = |detector: &mut Detector, now: u64, view: &mut BackendView, health: &mut Health| {
            let late = detector.begin_tick(now * MS).is_some();
            detector.observe(0, now * MS, view, late);
            detector.decide(0, now * MS, view, health, true)
        };
        for now in (1000..1200).step_by(20) {
            view.last_answer_ns = now * MS;
            detector.probe_sent(0, now * MS, now * MS);
            assert_eq!(tick(&mut detector, now, &mut view, &mut health), Outcome::Keep);
        }
        // Silent from 1180 on; heartbeats go on every 20 ms.
        let mut died = None;
        for now in (1200..1400).step_by(20) {
            detector.probe_sent(0, now * MS, view.last_answer_ns);
            if let Outcome::Died { reason, hold } = tick(&mut detector, now, &mut view, &mut health) {
                died = Some((now, reason, hold));
                break;
            }
        }
        let (at, reason, hold) = died.expect("a verdict");
        assert!(at - 1180 <= 125, "detected {} ms after the last answer ({reason})", at - 1180);
        assert_eq!(hold, Duration::ZERO, "a first death is not held");
        view.state = BACKEND_DEAD;
        view.dead_since_ns = at * MS;
        view.last_answer_ns = (at + 30) * MS;
        assert_eq!(tick(&mut detector, at + 40, &mut view, &mut health), Outcome::Revived);
        view.state = BACKEND_LIVE;
        // Answers for two seconds, then falls silent again: the second death within the window.
        let mut now = at + 60;
        while now < at + 2000 {
            view.last_answer_ns = now * MS;
            detector.probe_sent(0, now * MS, now * MS);
            assert_eq!(tick(&mut detector, now, &mut view, &mut health), Outcome::Keep);
            now += 20;
        }
        let second = loop {
            detector.probe_sent(0, now * MS, view.last_answer_ns);
            if let Outcome::Died { hold, .. } = tick(&mut detector, now, &mut view, &mut health) {
                break (now, hold);
            }
            now += 20;
            assert!(now < at + 2500, "no second verdict");
        };
        assert_eq!(second.1, Duration::from_secs(1), "the second death is held a second");
        view.state = BACKEND_DEAD;
        view.dead_since_ns = second.0 * MS;
        // Answers again at once; held until a second after its death.
        let mut revived = None;
        for now in (second.0 + 20..second.0 + 1500).step_by(20) {
            view.last_answer_ns = now * MS;
            if tick(&mut detector, now, &mut view, &mut health) == Outcome::Revived {
                revived = Some(now);
                break;
            }
        }
        let revived = revived.expect("back after the hold");
        assert!((second.0 + 1000..second.0 + 1040).contains(&revived), "back {} ms after the death", revived - second.0);
    }

    /// A request flood makes every peer busy: while one is in progress (and a little after) the
    /// peers get three times `dead_after`; a quiet second ends it.
    #[test]
    fn a_request_flood_earns_every_peer_more_time() {
        let mut detector = Detector::new(1, &args());
        assert!(!detector.note_requests(1000 * MS, 10));
        assert!(!detector.note_requests(1500 * MS, 900), "not a second yet");
        assert!(detector.note_requests(2000 * MS, 3000), "2990 requests in a second");
        let mut view = BackendView { state: BACKEND_LIVE, mac_known: true, sessions: 1, last_answer_ns: 2000 * MS, ..BackendView::default() };
        detector.probe_sent(0, 2010 * MS, 2000 * MS);
        detector.observe(0, 2100 * MS, &mut view, false);
        assert_eq!(view.patience_ns, 300 * MS);
        let mut health = Health::default();
        assert_eq!(detector.decide(0, 2150 * MS, &view, &mut health, true), Outcome::Keep, "150 ms silent during a flood: busy");
        assert!(matches!(detector.decide(0, 2350 * MS, &view, &mut health, true), Outcome::Died { .. }), "350 ms: dead all the same");
        assert!(detector.note_requests(3000 * MS, 3100), "lingers after a quiet second");
        assert!(!detector.note_requests(8000 * MS, 3200), "over");
    }

    #[test]
    fn a_held_peer_returns_after_its_hold_or_when_it_is_the_only_one() {
        let health = Health { held_until_ns: 5_000 * MS, ..Health::default() };
        assert!(!may_return(4_000 * MS, &health, true));
        assert!(may_return(5_000 * MS, &health, true));
        assert!(may_return(4_000 * MS, &health, false), "better a flapping peer than none");
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
        session.header.set_upload_replica(Some(([10, 77, 0, 12], 6969u16.to_be_bytes())));
        let upload: SteeringHeader = *bytemuck::from_bytes(&nudge(&session)[..64]);
        assert!(upload.is_upload(), "an upload stays one, so its replica can take it");
        assert_eq!(upload.replica(), session.header.replica());
    }

    #[test]
    fn a_resent_request_is_the_header_then_the_request_as_the_kernel_steered_it() {
        let key = ClientKey::new([10, 0, 0, 9], 4000u16.to_be_bytes());
        let mut session: Session = bytemuck::Zeroable::zeroed();
        session.header = SteeringHeader::for_client(key.ip, 4000, [10, 0, 0, 1], key.tid());
        let request = b"\x00\x01boot/kernel\x00octet\x00tsize\x000\x00";
        let datagram = resend_request(&session, request);
        let header: SteeringHeader = *bytemuck::from_bytes(&datagram[..64]);
        assert_eq!(header.flags, FLAG_NUDGE, "no context: no answer passed this balancer");
        assert_eq!((header.client_ip, header.client_port, header.vip_port), (key.ip, key.port, key.tid().to_be_bytes()));
        assert_eq!(&datagram[64..], request);
    }

    #[test]
    fn an_uploads_last_data_is_handed_over_only_while_the_client_may_wait_on_it() {
        let key = ClientKey::new([10, 0, 0, 9], 4000u16.to_be_bytes());
        let mut session: Session = bytemuck::Zeroable::zeroed();
        session.header = SteeringHeader::for_client(key.ip, 4000, [10, 0, 0, 1], key.tid());
        session.header.flags = FLAG_HAS_CONTEXT;
        session.header.set_upload_replica(Some(([10, 77, 0, 12], 6969u16.to_be_bytes())));
        session.header.windowsize = 1u16.to_be_bytes();
        // The backend acknowledged block 0x1_0004 (wire 4); the client sent 5 and waits for its ACK.
        session.header.set_block(0x1_0004);
        let data = b"\x00\x03\x00\x05block five";
        let datagram = hand_over_data(&session, data).expect("the next block");
        let header: SteeringHeader = *bytemuck::from_bytes(&datagram[..64]);
        assert_eq!(header.flags, FLAG_HAS_CONTEXT | FLAG_NUDGE, "a nudge: the replica takes the upload over");
        assert!(header.is_upload());
        assert_eq!(header.replica(), session.header.replica());
        assert_eq!(&datagram[64..], data, "the DATA as the client sent it");
        assert_eq!(hand_over_data(&session, b"\x00\x03\x00\x04block four"), None, "acknowledged already: a plain nudge");
        assert_eq!(hand_over_data(&session, b"\x00\x03\x00\x06block six"), None, "beyond the window: not one the client sent after that ACK");
        assert_eq!(hand_over_data(&session, b"\x00\x03\x00"), None, "truncated");
        assert_eq!(hand_over_data(&session, b"\x00\x04\x00\x05"), None, "not a DATA");
        session.header.windowsize = 16u16.to_be_bytes();
        assert!(hand_over_data(&session, b"\x00\x03\x00\x14window end").is_some(), "the last DATA of a window of 16");
        assert_eq!(hand_over_data(&session, b"\x00\x03\x00\x15"), None);
        session.header.set_block(0xffff);
        assert!(hand_over_data(&session, b"\x00\x03\x00\x00rolled over").is_some(), "across the 16-bit rollover");
        let mut download = session;
        download.header.mode = 0;
        assert_eq!(hand_over_data(&download, b"\x00\x03\x00\x00"), None, "not an upload");
    }

    #[test]
    fn a_nudge_about_an_unknown_client_says_the_client_sent_and_names_its_tid() {
        let key = ClientKey::new([10, 0, 0, 9], 4000u16.to_be_bytes());
        let datagram = nudge_unknown(key, [10, 0, 0, 1]);
        let header: SteeringHeader = *bytemuck::from_bytes(&datagram[..64]);
        assert_eq!(header.flags, FLAG_CLIENT_SENT | FLAG_NUDGE, "no context, but the client holds the first answer");
        assert_eq!((header.client_ip, header.client_port, header.vip_ip, header.vip_port), (key.ip, key.port, [10, 0, 0, 1], key.tid().to_be_bytes()));
        assert_eq!(&datagram[64..], &[0, 4, 0, 0]);
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
