//! A load balancer's side of the active/backup pair: it answers the switch's heartbeats (which
//! say whether it is active), and mirrors its sessions to the peer balancer while it is active.
//!
//! Sync is soft state: the active balancer sends what changed since its last sync every
//! `--sync-ms`, every session once a second, and forgets for sessions that ended; the backup
//! applies them to its own `LB_SESSIONS`, so its kernel already knows every transfer when the
//! switch swaps. Sessions the kernel creates or moves, and the moment the first reply teaches
//! a session its transfer context, are announced through the `LB_EVENTS` ring buffer and
//! mirrored at once, so even a transfer that started a moment before the failure is known to
//! the backup with its file and options (its block may lag: backends trust the client's ACK).
//! A session the backup still misses is relearned from the first reply its backend sends (see
//! `relearn` in the kernel program).

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, net::UdpSocket, sync::mpsc};
use tracing::{debug, info, warn};
use xdp_lb_common::{ClientKey, Session, SessionEvent, maps::BACKEND_UNUSED};

use crate::{
    clock::monotonic_ns,
    control_auth::{AuthArgs, Control, Received, Stats},
    maps::{self, LbMaps},
    pair_wire::{Keyring, Message, Sender},
};

#[derive(clap::Args, Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PairArgs {
    /// The other load balancer of the pair: the ADDR:PORT of its --control-port. While this
    /// balancer is active it mirrors its sessions there. Both must list the same --backend
    /// addresses in the same order.
    #[arg(long, value_name = "ADDR:PORT")]
    pub peer: Option<SocketAddrV4>,

    /// UDP port on --address for the switch's heartbeats and the peer's session sync.
    #[arg(long, default_value_t = 6970)]
    pub control_port: u16,

    /// Interval of the session sync to the peer (ms). New and moved sessions go at once.
    #[arg(long, default_value_t = 25)]
    pub sync_ms: u64,

    #[command(flatten)]
    #[serde(flatten)]
    pub auth: AuthArgs,
}

/// What the switch last said about this balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No switch heard from yet: steers what reaches it, mirrors nothing.
    Alone,
    Active,
    Backup,
}

/// What a control datagram did, for the agent to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairEvent {
    /// The switch just made this balancer active: it takes over the transfers the peer served.
    Promoted,
    /// The switch just made this balancer the backup.
    Demoted,
    /// A heartbeat that left the role as it was (answered).
    Heartbeat,
    /// Sessions from the active peer, written into this balancer's table.
    Synced,
    /// Sessions the active peer no longer has, removed here too.
    Forgotten,
    /// Sync from the peer, ignored because this balancer is the active one.
    SyncIgnored,
    /// The peer's periodic `Hello`: its keys agree with ours.
    PeerHello,
    /// A datagram that failed the checks, or the other side's notice that ours did.
    Dropped,
}

/// The role a heartbeat gives and the event it is: `Promoted` or `Demoted` when it changes the
/// role, else `Heartbeat`.
fn role_change(current: Role, active: bool) -> (Role, PairEvent) {
    let role = if active { Role::Active } else { Role::Backup };
    let event = match (current == role, role) {
        (true, _) => PairEvent::Heartbeat,
        (false, Role::Active) => PairEvent::Promoted,
        (false, _) => PairEvent::Demoted,
    };
    (role, event)
}

/// What was last sent to the peer about a session, to send only changes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Sent {
    backend: u32,
    block: u32,
    flags: u8,
}

impl Sent {
    fn of(session: &Session) -> Self {
        Self { backend: session.backend, block: session.header.block(), flags: session.header.flags }
    }
}

/// The first of the agent's `control_*` slots in `LB_COUNTERS`.
const CONTROL_COUNTERS: u32 = xdp_lb_common::BalanceCounter::ControlAccepted as u32;

/// A `Hello` goes to the peer this often.
const HELLO_EVERY: Duration = Duration::from_secs(1);

/// Every session is sent again this often, so a restarted peer catches up.
const FULL_SYNC: Duration = Duration::from_secs(1);

pub struct Pair {
    role: Role,
    peer: Option<SocketAddrV4>,
    /// Bound to the control port: heartbeats in and out, sync in and out.
    socket: UdpSocket,
    sent: HashMap<ClientKey, Sent>,
    last_full: Instant,
    /// When the last periodic sync started and how long it took: a large table (a request
    /// flood) makes each sync costly, and syncing no more often than `SYNC_DUTY` of the time
    /// keeps the agent free for its heartbeats and watchdog.
    last_sync: Option<(Instant, Duration)>,
    /// Sessions the peer's sync brought that this balancer's table did not hold: a backup's
    /// view of the requests the active one receives (its request-flood signal).
    pub mirrored_new: u64,
    /// Seals what goes out, checks what comes in (keys, recipient, replays), counts rejections.
    control: Control,
    /// When the last `Hello` went to the peer.
    last_hello: Option<Instant>,
    /// Whether an authentic message from the peer arrived yet (logged once).
    peer_heard: bool,
    /// Whether writing the control counters failed (logged once).
    counters_failed: bool,
}

/// A periodic sync starts again only after `SYNC_DUTY` times its last cost has passed (at most
/// about a fifth of the agent's time). The mirror's blocks may then lag more; backends trust the
/// client's ACK, and new, moved and first-context sessions go at once anyway (`announce`).
const SYNC_DUTY: u32 = 5;

impl Pair {
    /// Binds the control port. `keys` come from `args.auth` (read before the program is
    /// attached, so a bad key file stops the agent before it changes anything); the counters
    /// continue from those a previous agent left in `maps`.
    pub async fn bind(address: std::net::Ipv4Addr, args: &PairArgs, keys: Keyring, maps: &LbMaps) -> anyhow::Result<Self> {
        let me = SocketAddrV4::new(address, args.control_port);
        let socket = UdpSocket::bind(me).await.with_context(|| format!("cannot bind the control port {me}"))?;
        let stats = Stats::from_counters(&maps::agent_counters(&maps.counters, CONTROL_COUNTERS, Stats::SLOTS));
        let peers = args.peer.map(|peer| *peer.ip()).into_iter().collect();
        let control = Control::new(keys, Sender::Balancer, me, args.auth.max_skew(), peers, stats);
        control.log_keys("balance");
        Ok(Self {
            role: Role::Alone,
            peer: args.peer,
            socket,
            sent: HashMap::new(),
            last_full: Instant::now(),
            last_sync: None,
            mirrored_new: 0,
            control,
            last_hello: None,
            peer_heard: false,
            counters_failed: false,
        })
    }

    /// Writes the control counters to the counter map (for `xdp-lb status`) if they changed. A
    /// failure (a counter map pinned by an older version, without these slots) is logged once
    /// and does not stop the agent.
    pub fn write_counters(&mut self, maps: &mut LbMaps) {
        if self.control.take_dirty()
            && let Err(error) = maps::write_agent_counters(&mut maps.counters, CONTROL_COUNTERS, &self.control.stats.counters())
            && !std::mem::replace(&mut self.counters_failed, true)
        {
            warn!(error = format!("{error:#}"), "control counters not written: `xdp-lb status` will not show them (a counter map pinned by an older version? remove the pins and restart)");
        }
    }

    /// What the switch last said about this balancer.
    #[must_use]
    pub fn role(&self) -> Role {
        self.role
    }

    /// The next datagram on the control port (for [`Pair::on_datagram`]).
    pub async fn recv(&self, buffer: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buffer).await
    }

    /// Handles a control datagram: answers heartbeats, applies the peer's sync while this
    /// balancer is not the active one, and says what happened.
    pub async fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr, maps: &mut LbMaps) -> PairEvent {
        let message = match self.control.receive(datagram, from) {
            Received::Accepted(message) => message,
            Received::Dropped { reason, notice } => {
                debug!(%from, reason = reason.map(crate::pair_wire::Reason::name), "control datagram dropped");
                if let Some(notice) = notice
                    && let Err(error) = self.socket.send_to(&notice, from).await
                {
                    debug!(%error, %from, "rejection notice not sent");
                }
                return PairEvent::Dropped;
            }
        };
        match message {
            Message::Heartbeat { active } => {
                if let Err(error) = self.socket.send_to(datagram, from).await {
                    debug!(%error, %from, "heartbeat answer not sent");
                }
                let (role, event) = role_change(self.role, active);
                if role != self.role {
                    info!(?role, switch = %from, "the switch changed this balancer's role");
                    self.role = role;
                    self.sent.clear();
                }
                event
            }
            // The active balancer's table is the truth; a backup mirrors it.
            Message::Upsert(sessions) if self.role != Role::Active => {
                let mut applied = 0;
                for (key, session) in sessions {
                    let new = maps.sessions.get(&key, 0).is_err();
                    if mirror(maps, key, session) {
                        applied += 1;
                        self.mirrored_new += u64::from(new);
                    }
                }
                debug!(applied, %from, "sessions mirrored from the peer");
                PairEvent::Synced
            }
            Message::Forget(keys) if self.role != Role::Active => {
                for key in keys {
                    let _ = maps.sessions.remove(&key);
                }
                PairEvent::Forgotten
            }
            Message::Upsert(_) | Message::Forget(_) => {
                debug!(%from, "sync from the peer ignored: this balancer is active");
                PairEvent::SyncIgnored
            }
            Message::Hello => {
                if !self.peer_heard {
                    self.peer_heard = true;
                    info!(%from, "the peer balancer's control messages authenticate");
                }
                PairEvent::PeerHello
            }
            // Handled (counted, logged) by `Control`.
            Message::Rejected { .. } => PairEvent::Dropped,
        }
    }

    /// Sends the peer what changed since the last sync (everything, once a second).
    pub async fn sync(&mut self, maps: &LbMaps) {
        // Whatever the role: the peer learns at once whether our keys agree.
        if let Some(peer) = self.peer
            && self.last_hello.is_none_or(|at| at.elapsed() >= HELLO_EVERY)
        {
            self.last_hello = Some(Instant::now());
            self.send(peer, &Message::Hello).await;
        }
        let Some(peer) = self.peer.filter(|_| self.role == Role::Active) else {
            return;
        };
        if let Some((started, cost)) = self.last_sync
            && started.elapsed() < cost * SYNC_DUTY
        {
            return;
        }
        let started = Instant::now();
        self.sync_to(peer, maps).await;
        self.last_sync = Some((started, started.elapsed()));
    }

    async fn sync_to(&mut self, peer: SocketAddrV4, maps: &LbMaps) {
        let full = self.last_full.elapsed() >= FULL_SYNC;
        if full {
            self.last_full = Instant::now();
        }
        let sessions = maps.sessions();
        let mut changed = Vec::new();
        let mut present = HashMap::with_capacity(sessions.len());
        let now_ns = monotonic_ns();
        for (key, session) in sessions {
            let now = Sent::of(&session);
            if full || self.sent.get(&key) != Some(&now) {
                changed.push((key, flip_clock(now_ns, session)));
            }
            present.insert(key, now);
        }
        let gone: Vec<ClientKey> = self.sent.keys().filter(|key| !present.contains_key(key)).copied().collect();
        self.sent = present;
        self.send(peer, &Message::Upsert(changed)).await;
        self.send(peer, &Message::Forget(gone)).await;
    }

    /// Mirrors sessions the kernel just created or moved, without waiting for the next sync.
    pub async fn announce(&mut self, keys: &[ClientKey], maps: &LbMaps) {
        let Some(peer) = self.peer.filter(|_| self.role == Role::Active) else {
            return;
        };
        let now_ns = monotonic_ns();
        let sessions: Vec<(ClientKey, Session)> =
            keys.iter().filter_map(|key| Some((*key, maps.sessions.get(key, 0).ok()?))).collect();
        for (key, session) in &sessions {
            self.sent.insert(*key, Sent::of(session));
        }
        let sessions = sessions.into_iter().map(|(key, session)| (key, flip_clock(now_ns, session))).collect();
        self.send(peer, &Message::Upsert(sessions)).await;
    }

    async fn send(&mut self, peer: SocketAddrV4, message: &Message) {
        let empty = matches!(message, Message::Upsert(v) if v.is_empty()) || matches!(message, Message::Forget(v) if v.is_empty());
        if empty {
            return;
        }
        for datagram in self.control.seal(message, peer) {
            if let Err(error) = self.socket.send_to(&datagram, peer).await {
                debug!(%error, %peer, "sync not sent");
            }
        }
    }
}

/// Writes a session from the peer into our table. The way back to the client is ours to find
/// (our MACs differ from the peer's): kept if we know it already, else left for the kernel to
/// look up. Returns false for a session naming a backend we do not have.
fn mirror(maps: &mut LbMaps, key: ClientKey, mut session: Session) -> bool {
    let registered = maps.backend(session.backend).is_ok_and(|b| b.state != BACKEND_UNUSED);
    if !registered {
        warn!(backend = session.backend, "peer session names an unknown backend: both balancers need the same --backend list");
        return false;
    }
    // The peer sent the session's age; our clock makes it a time again (idle collection, and
    // whether a takeover nudges it).
    session = flip_clock(monotonic_ns(), session);
    // The route to the client is ours (the peer's MACs differ): kept if known, else cleared.
    let (ifindex, client_mac, lb_mac) = match maps.sessions.get(&key, 0) {
        Ok(ours) => {
            if ours.header.block() > session.header.block() {
                session.header.set_block(ours.header.block());
            }
            session.last_client_ns = session.last_client_ns.max(ours.last_client_ns);
            (ours.ifindex, ours.client_mac, ours.lb_mac)
        }
        Err(_) => (0, [0; 6], [0; 6]),
    };
    session.ifindex = ifindex;
    session.client_mac = client_mac;
    session.lb_mac = lb_mac;
    maps.sessions.insert(key, session, 0).is_ok()
}

/// Turns a session's `last_client_ns` from a time on this host's monotonic clock into its age
/// (ns since the client's last packet), the way it travels between the balancers, whose clocks
/// have nothing in common; and back again on arrival: `now - x` is its own inverse.
fn flip_clock(now_ns: u64, mut session: Session) -> Session {
    session.last_client_ns = now_ns.saturating_sub(session.last_client_ns);
    session
}

/// Reads the kernel's `LB_EVENTS` ring buffer into a channel, as they come.
pub fn watch_events(ring: RingBuf<MapData>) -> anyhow::Result<mpsc::Receiver<SessionEvent>> {
    let (tx, rx) = mpsc::channel(4096);
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until the AsyncFd
    // (which owns the ring buffer) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
        .context("cannot poll the LB_EVENTS ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else { return };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let Ok(event) = bytemuck::try_pod_read_unaligned::<SessionEvent>(&item[..item.len().min(size_of::<SessionEvent>())]) else {
                    continue;
                };
                // A full channel only delays the news to the next periodic sync.
                if tx.try_send(event).is_err() && tx.is_closed() {
                    return;
                }
            }
            guard.clear_ready();
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn only_a_heartbeat_that_changes_the_role_is_a_promotion_or_demotion() {
        assert_eq!(role_change(Role::Alone, true), (Role::Active, PairEvent::Promoted));
        assert_eq!(role_change(Role::Backup, true), (Role::Active, PairEvent::Promoted));
        assert_eq!(role_change(Role::Active, true), (Role::Active, PairEvent::Heartbeat), "already active: no second takeover");
        assert_eq!(role_change(Role::Active, false), (Role::Backup, PairEvent::Demoted));
        assert_eq!(role_change(Role::Alone, false), (Role::Backup, PairEvent::Demoted));
        assert_eq!(role_change(Role::Backup, false), (Role::Backup, PairEvent::Heartbeat));
    }

    #[test]
    fn a_session_keeps_its_age_across_clocks() {
        let mut session: Session = bytemuck::Zeroable::zeroed();
        session.last_client_ns = 5 * S;
        // Sent at 7 s on the active balancer's clock: 2 s old.
        let on_the_wire = flip_clock(7 * S, session);
        assert_eq!(on_the_wire.last_client_ns, 2 * S);
        // Received at 100 s on the backup's clock: the client was last heard at 98 s.
        assert_eq!(flip_clock(100 * S, on_the_wire).last_client_ns, 98 * S);
        // A clock younger than the age (a freshly booted peer) saturates at 0, never wraps.
        assert_eq!(flip_clock(S, on_the_wire).last_client_ns, 0);
    }
}
