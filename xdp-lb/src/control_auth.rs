//! Authentication of the agents' control messages (`pair_wire`): the key file, the checks a
//! receiver makes with state (addressed to it, fresh, not replayed), and what an agent counts,
//! logs and answers when it rejects a message.
//!
//! Key file: one key per line, `<id> <secret in hex>`, `#` starts a comment. The id (1-255)
//! travels in every message; the secret has 32 to 64 bytes. The first key signs and every key
//! verifies, so a rotation is: add the new key as the second line everywhere, restart the
//! agents; move it to the first line everywhere, restart; remove the old one. The file must not
//! be readable by group or others.
//!
//! A rejected message is dropped and counted by reason; the agent logs it (at most once per
//! `LOG_EVERY` per reason) and, for a key, address or clock problem, sends the sender a
//! `Rejected` notice (at most once per `NOTICE_EVERY` per address) naming the reason and the
//! key ids it holds, so a key mismatch shows at both ends: in the logs from the first message
//! on, and in `xdp-lb status`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::pair_wire::{Envelope, Key, Keyring, Message, NO_KEY, Reason, Seal, Sender, Sequencer, WireError};

/// Rejections of one reason are logged at most this often (with the number left unlogged).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Rejection notices go to one address at most this often (they must not make an agent a
/// reflector for spoofed sources, nor keep a mis-keyed balancer looking alive to the switch).
const NOTICE_EVERY: Duration = Duration::from_secs(1);

/// Senders remembered for `NOTICE_EVERY`; beyond, the table starts again.
const NOTICE_TABLE: usize = 256;

/// Shortest and longest secret.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 32..=64;

#[derive(clap::Args, Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuthArgs {
    /// File with this deployment's control keys, shared by the switch and both balancers: one
    /// key a line, `<id> <hex secret>` (id 1-255, 32-64 bytes; e.g. `echo "1 $(openssl rand
    /// -hex 32)"`), mode 600. The first key signs heartbeats, role changes and session sync;
    /// every key (at most two, during a rotation) verifies.
    #[arg(long, value_name = "FILE")]
    pub control_key_file: Option<PathBuf>,

    /// Start without --control-key-file: control messages are neither signed nor checked, so
    /// anyone who reaches the control port can change roles and sessions. Only for a private,
    /// isolated control network.
    #[arg(long)]
    pub insecure_control: bool,

    /// A control message whose time is further than this from this host's clock is rejected
    /// as stale (ms): the hosts' clocks must agree this well (NTP). 0: only the sequence check
    /// (replays of messages older than the last accepted one are still rejected).
    #[arg(long, default_value_t = 30_000)]
    pub control_max_skew_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(
        "no --control-key-file: heartbeats, role changes and session sync would be unauthenticated; \
         give a key file (see `xdp-lb balance --help`, docs/SECURITY.md) or --insecure-control"
    )]
    Missing,
    #[error("cannot read the control key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the control key file {path} is readable by group or others (mode {mode:o}): chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {problem}")]
    Line { path: PathBuf, line: usize, problem: String },
    #[error("the control key file {path} holds no key")]
    Empty { path: PathBuf },
    #[error("the control key file {path} holds {count} keys: at most two (the signing one and, during a rotation, the other)")]
    TooMany { path: PathBuf, count: usize },
}

impl AuthArgs {
    /// The keys named by the flags (an empty ring with --insecure-control and no file).
    pub fn keyring(&self) -> Result<Keyring, KeyFileError> {
        match &self.control_key_file {
            Some(path) => load_keyring(path),
            None if self.insecure_control => Ok(Keyring::default()),
            None => Err(KeyFileError::Missing),
        }
    }

    #[must_use]
    pub fn max_skew(&self) -> Duration {
        Duration::from_millis(self.control_max_skew_ms)
    }
}

/// Reads and checks a key file.
pub fn load_keyring(path: &Path) -> Result<Keyring, KeyFileError> {
    use std::os::unix::fs::MetadataExt as _;
    let read = |source| KeyFileError::Read { path: path.to_owned(), source };
    let mode = std::fs::metadata(path).map_err(read)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path: path.to_owned(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let keys = parse_keys(&text).map_err(|(line, problem)| KeyFileError::Line { path: path.to_owned(), line, problem })?;
    match keys.len() {
        0 => Err(KeyFileError::Empty { path: path.to_owned() }),
        1 | 2 => Ok(Keyring::new(keys)),
        count => Err(KeyFileError::TooMany { path: path.to_owned(), count }),
    }
}

/// The keys of a key file's text, or the 1-based line and what is wrong with it.
pub fn parse_keys(text: &str) -> Result<Vec<Key>, (usize, String)> {
    let mut keys: Vec<Key> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fail = |problem: String| (n + 1, problem);
        let mut fields = line.split_whitespace();
        let (Some(id), Some(hex), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(fail("expected `<id> <hex secret>`".into()));
        };
        let id: u8 = id.parse().ok().filter(|id| *id != NO_KEY).ok_or_else(|| fail(format!("key id `{id}`: expected 1-255")))?;
        let secret = decode_hex(hex).ok_or_else(|| fail("the secret is not hex".into()))?;
        if !SECRET_BYTES.contains(&secret.len()) {
            return Err(fail(format!("the secret has {} bytes, expected {} to {}", secret.len(), SECRET_BYTES.start(), SECRET_BYTES.end())));
        }
        if keys.iter().any(|k| k.id == id) {
            return Err(fail(format!("key id {id} given twice")));
        }
        keys.push(Key::new(id, &secret));
    }
    Ok(keys)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// The checks that need memory: the message is for this agent, its time is near this host's,
/// and its sequence number is above the last one accepted from its sender.
#[derive(Clone, Debug)]
pub struct Guard {
    me: SocketAddrV4,
    max_skew_ns: u64,
    /// Last sequence number accepted from each `Sender`.
    last: [u64; 2],
}

impl Guard {
    #[must_use]
    pub fn new(me: SocketAddrV4, max_skew: Duration) -> Self {
        Self { me, max_skew_ns: u64::try_from(max_skew.as_nanos()).unwrap_or(u64::MAX), last: [0; 2] }
    }

    /// Accepts an authentic message at `now_ns` (UNIX epoch), remembering its sequence number,
    /// or says why not.
    pub fn admit(&mut self, envelope: &Envelope, now_ns: u64) -> Result<(), Reason> {
        if envelope.to != self.me {
            return Err(Reason::Misaddressed);
        }
        if self.max_skew_ns != 0 && envelope.seq.abs_diff(now_ns) > self.max_skew_ns {
            return Err(Reason::Stale);
        }
        let last = &mut self.last[envelope.sender as usize - 1];
        if envelope.seq <= *last {
            return Err(Reason::Replayed);
        }
        *last = envelope.seq;
        Ok(())
    }
}

/// What an agent counts about its control messages (written to its counter map, see
/// [`Stats::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    /// By `Reason` (index `reason - 1`).
    pub rejected: [u64; Reason::ALL.len()],
    /// Authentication failures of messages from a known peer's address (the other balancer,
    /// or for the switch either balancer): the keys differ, or someone forges that address.
    pub peer_auth_failed: u64,
    /// Rejection notices received: another agent drops this one's messages.
    pub rejected_by_other: u64,
}

impl Stats {
    /// Number of counter slots, in the order of [`Stats::counters`].
    pub const SLOTS: usize = 3 + Reason::ALL.len();

    /// The names of the slots, as `xdp-lb status` shows them.
    pub const NAMES: [&str; Self::SLOTS] = [
        "control_accepted",
        "control_malformed",
        "control_unauthenticated",
        "control_unknown_key",
        "control_bad_mac",
        "control_misaddressed",
        "control_stale",
        "control_replayed",
        "control_peer_auth_failed",
        "control_rejected_by_other",
    ];

    /// The values of the slots, in the order of `NAMES`.
    #[must_use]
    pub fn counters(&self) -> [u64; Self::SLOTS] {
        let mut out = [0; Self::SLOTS];
        out[0] = self.accepted;
        out[1..=Reason::ALL.len()].copy_from_slice(&self.rejected);
        out[Self::SLOTS - 2] = self.peer_auth_failed;
        out[Self::SLOTS - 1] = self.rejected_by_other;
        out
    }

    /// Continues from counters a previous agent left (same order).
    #[must_use]
    pub fn from_counters(values: &[u64]) -> Self {
        let at = |i: usize| values.get(i).copied().unwrap_or(0);
        let mut rejected = [0; Reason::ALL.len()];
        for (i, r) in rejected.iter_mut().enumerate() {
            *r = at(1 + i);
        }
        Self { accepted: at(0), rejected, peer_auth_failed: at(Self::SLOTS - 2), rejected_by_other: at(Self::SLOTS - 1) }
    }
}

/// What became of a received datagram.
#[derive(Debug)]
pub enum Received {
    /// Authentic, for this agent, new: act on it.
    Accepted(Message),
    /// Dropped (counted, logged); `notice` is to be sent back to the sender, if any.
    Dropped { reason: Option<Reason>, notice: Option<Vec<u8>> },
}

/// One agent's side of the control protocol: seals what it sends, opens and checks what it
/// receives, counts and reports.
pub struct Control {
    keys: Keyring,
    sender: Sender,
    seq: Sequencer,
    guard: Guard,
    /// Addresses whose authentication failures count as `peer_auth_failed`.
    peers: Vec<Ipv4Addr>,
    pub stats: Stats,
    /// Whether `stats` changed since the last `take_dirty`.
    dirty: bool,
    notices: HashMap<IpAddr, Instant>,
    logged: HashMap<Reason, (Instant, u64)>,
    logged_notice: Option<(Instant, u64)>,
}

impl Control {
    /// `me`: this agent's control address (the recipient its messages must name); `peers`: the
    /// known senders whose key problems `status` reports.
    #[must_use]
    pub fn new(keys: Keyring, sender: Sender, me: SocketAddrV4, max_skew: Duration, peers: Vec<Ipv4Addr>, stats: Stats) -> Self {
        Self {
            keys,
            sender,
            seq: Sequencer::default(),
            guard: Guard::new(me, max_skew),
            peers,
            stats,
            dirty: false,
            notices: HashMap::new(),
            logged: HashMap::new(),
            logged_notice: None,
        }
    }

    /// Logs the keys at start: hosts whose fingerprints differ will reject each other.
    pub fn log_keys(&self, role: &str) {
        if self.keys.is_insecure() {
            warn!(role, "control messages are neither signed nor checked (--insecure-control): anyone reaching the control port can change roles and sessions");
            return;
        }
        let keys: Vec<String> = self.keys.keys().iter().map(|k| format!("{}:{}", k.id, k.fingerprint())).collect();
        info!(role, signing = self.keys.ids()[0], keys = ?keys, "control messages authenticated (HMAC-SHA-256); key id:fingerprint must match on the switch and both balancers");
    }

    /// The datagrams of `message` to `to`, sealed.
    pub fn seal(&mut self, message: &Message, to: SocketAddrV4) -> Vec<Vec<u8>> {
        let seq = self.seq.take(crate::pair_wire::unix_ns(), message.datagrams());
        message.seal(&Seal { keys: &self.keys, sender: self.sender, seq, to })
    }

    /// Whether counters changed since the last call (to write them to the map).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Opens and checks a datagram from `from`.
    pub fn receive(&mut self, datagram: &[u8], from: SocketAddr) -> Received {
        self.receive_at(datagram, from, crate::pair_wire::unix_ns(), Instant::now())
    }

    fn receive_at(&mut self, datagram: &[u8], from: SocketAddr, now_ns: u64, now: Instant) -> Received {
        self.dirty = true;
        let notice = Message::peek_is_rejection(datagram);
        let opened = Message::open(datagram, &self.keys);
        let (envelope, message) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                let reason = error.reason();
                self.count(reason, from);
                if notice {
                    self.stats.rejected_by_other += 1;
                    self.log_forged_notice(datagram, from, &error, now);
                    return Received::Dropped { reason: Some(reason), notice: None };
                }
                self.log_rejection(reason, from, &error.to_string(), now);
                return Received::Dropped { reason: Some(reason), notice: self.notice(reason, NoticeTo::from(&error, datagram), from, now) };
            }
        };
        if let Message::Rejected { reason, their_key_id, key_ids } = message {
            // Authentic: the other agent holds one of our keys, yet refuses our messages
            // (another key signs there, our address or clock is off). Not answered.
            self.stats.rejected_by_other += 1;
            if self.log_due_notice(now) {
                warn!(%from, reason = reason.name(), their_key_ids = ?key_ids, our_signing_key = their_key_id,
                    "another agent rejects this agent's control messages: {}", advice(reason));
            }
            return Received::Dropped { reason: None, notice: None };
        }
        if let Err(reason) = self.guard.admit(&envelope, now_ns) {
            self.count(reason, from);
            let detail = match reason {
                Reason::Misaddressed => format!("addressed to {}, this agent is {}", envelope.to, self.guard.me),
                Reason::Stale => format!("{} ms off this host's clock", envelope.seq.abs_diff(now_ns) / 1_000_000),
                _ => format!("sequence {} not above the last accepted", envelope.seq),
            };
            self.log_rejection(reason, from, &detail, now);
            let to = NoticeTo { key_id: envelope.key_id };
            let notice = if reason == Reason::Replayed { None } else { self.notice(reason, to, from, now) };
            return Received::Dropped { reason: Some(reason), notice };
        }
        self.stats.accepted += 1;
        Received::Accepted(message)
    }

    /// The switch's side: a balancer's echo of a heartbeat (the switch's own bytes, checked and
    /// counted, not acted on: the kernel already took the frame as an answer), or its notice.
    pub fn receive_echo(&mut self, datagram: &[u8], from: SocketAddr) {
        if Message::peek_is_rejection(datagram) {
            let _ = self.receive(datagram, from);
            return;
        }
        self.dirty = true;
        let now = Instant::now();
        match Message::open(datagram, &self.keys) {
            Ok((_, Message::Heartbeat { .. })) => self.stats.accepted += 1,
            Ok(_) => {
                self.count(Reason::Malformed, from);
                self.log_rejection(Reason::Malformed, from, "a balancer sent the switch something other than a heartbeat echo", now);
            }
            Err(error) => {
                let reason = error.reason();
                self.count(reason, from);
                self.log_rejection(reason, from, &format!("heartbeat echo: {error}"), now);
            }
        }
    }

    fn count(&mut self, reason: Reason, from: SocketAddr) {
        self.stats.rejected[reason as usize - 1] += 1;
        if reason.is_auth_failure() && matches!(from.ip(), IpAddr::V4(ip) if self.peers.contains(&ip)) {
            self.stats.peer_auth_failed += 1;
        }
    }

    /// A notice for `from`, unless one went there within `NOTICE_EVERY`, or the reason says
    /// nothing useful to a legitimate sender (garbage, replays).
    fn notice(&mut self, reason: Reason, to: NoticeTo, from: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let SocketAddr::V4(from_v4) = from else { return None };
        if matches!(reason, Reason::Malformed | Reason::Replayed) {
            return None;
        }
        if self.notices.get(&from.ip()).is_some_and(|last| now.duration_since(*last) < NOTICE_EVERY) {
            return None;
        }
        if self.notices.len() >= NOTICE_TABLE {
            self.notices.clear();
        }
        self.notices.insert(from.ip(), now);
        let message = Message::Rejected { reason, their_key_id: to.key_id, key_ids: self.keys.ids() };
        self.seal(&message, from_v4).into_iter().next()
    }

    fn log_rejection(&mut self, reason: Reason, from: SocketAddr, detail: &str, now: Instant) {
        let entry = self.logged.entry(reason).or_insert((now.checked_sub(LOG_EVERY).unwrap_or(now), 0));
        if now.duration_since(entry.0) < LOG_EVERY && entry.1 != 0 {
            entry.1 += 1;
            return;
        }
        let unlogged = entry.1.saturating_sub(1);
        *entry = (now, 1);
        let peer = matches!(from.ip(), IpAddr::V4(ip) if self.peers.contains(&ip));
        warn!(%from, reason = reason.name(), peer, unlogged_since_last = unlogged, key_ids = ?self.keys.ids(),
            "control message dropped: {detail}; {}", advice(reason));
    }

    fn log_due_notice(&mut self, now: Instant) -> bool {
        match &mut self.logged_notice {
            Some((at, n)) if now.duration_since(*at) < LOG_EVERY => {
                *n += 1;
                false
            }
            slot => {
                *slot = Some((now, 0));
                true
            }
        }
    }

    fn log_forged_notice(&mut self, datagram: &[u8], from: SocketAddr, error: &WireError, now: Instant) {
        if !self.log_due_notice(now) {
            return;
        }
        // What it claims, unverified.
        let claimed = match Message::open(datagram, &Keyring::default()) {
            Ok((_, Message::Rejected { reason, key_ids, .. })) => format!("{} (it claims key ids {key_ids:?})", reason.name()),
            _ => "unreadable".to_owned(),
        };
        warn!(%from, %error, claimed,
            "another agent rejects this agent's control messages, and its own notice fails authentication here: the control keys differ between the two hosts (compare the key fingerprints logged at start), or someone forges notices");
    }
}

/// What a notice says about the rejected message.
#[derive(Clone, Copy)]
struct NoticeTo {
    key_id: u8,
}

impl NoticeTo {
    fn from(error: &WireError, datagram: &[u8]) -> Self {
        let key_id = match error {
            WireError::UnknownKey { key_id } | WireError::BadMac { key_id } => *key_id,
            _ => datagram.get(6).copied().unwrap_or(NO_KEY),
        };
        Self { key_id }
    }
}

fn advice(reason: Reason) -> &'static str {
    match reason {
        Reason::Malformed => "not a control message of this version (an agent of another xdp-lb version, or noise)",
        Reason::Unauthenticated => "the sender runs with --insecure-control and this agent has a key: give both the same --control-key-file",
        Reason::UnknownKey => "the sender signs with a key id this agent does not hold: the control key files differ (a rotation half done?), or a forger",
        Reason::BadMac => "the sender's key under this id differs from this agent's (compare the key fingerprints logged at start), or the message was forged or altered",
        Reason::Misaddressed => "check that --lb and --peer name the balancers' --address and --control-port",
        Reason::Stale => "the hosts' clocks differ by more than --control-max-skew-ms (run NTP), or an old message was replayed",
        Reason::Replayed => "a copy of a message already accepted (a replay, or a duplicate on the network)",
    }
}

/// One row of `xdp-lb bench-control`: mean ns to seal and to open one datagram of a message,
/// without a key (format only) and with HMAC-SHA-256.
#[derive(Debug, serde::Serialize)]
pub struct BenchRow {
    pub message: &'static str,
    pub bytes: usize,
    pub seal_plain_ns: f64,
    pub seal_mac_ns: f64,
    pub open_plain_ns: f64,
    pub open_mac_ns: f64,
}

fn seal_for(keys: &Keyring, to: SocketAddrV4) -> Seal<'_> {
    Seal { keys, sender: Sender::Balancer, seq: 1, to }
}

/// The cost of the MAC per control message (`cargo xtask bench --only control`): each message
/// sealed and opened `repeat` times without a key and with one.
#[must_use]
pub fn bench(repeat: u32) -> Vec<BenchRow> {
    use std::hint::black_box;

    use xdp_lb_common::{ClientKey, Session};

    let keyed = Keyring::new(vec![Key::new(1, &[0x42; 32])]);
    let plain = Keyring::default();
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 6970);
    let session = |n: u16| (ClientKey::new([10, 0, 0, 50], n.to_be_bytes()), <Session as bytemuck::Zeroable>::zeroed());
    let full = (1400 - crate::pair_wire::HEADER_LEN - crate::pair_wire::MAC_LEN) / (size_of::<ClientKey>() + size_of::<Session>());
    let messages = [
        ("heartbeat", Message::Heartbeat { active: true }),
        ("upsert, 1 session", Message::Upsert(vec![session(1)])),
        ("upsert, full datagram", Message::Upsert((0..u16::try_from(full).unwrap_or(1)).map(session).collect())),
    ];
    let mean_ns = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..repeat {
            f();
        }
        started.elapsed().as_secs_f64() * 1e9 / f64::from(repeat.max(1))
    };
    messages
        .into_iter()
        .map(|(name, message)| {
            let seal_ns = |keys: &Keyring| mean_ns(&mut || drop(black_box(black_box(&message).seal(&seal_for(keys, to)))));
            let datagram = |keys: &Keyring| message.seal(&seal_for(keys, to)).remove(0);
            let (plain_datagram, keyed_datagram) = (datagram(&plain), datagram(&keyed));
            let open_ns = |datagram: &[u8], keys: &Keyring| mean_ns(&mut || drop(black_box(Message::open(black_box(datagram), keys))));
            BenchRow {
                message: name,
                bytes: keyed_datagram.len(),
                seal_plain_ns: seal_ns(&plain),
                seal_mac_ns: seal_ns(&keyed),
                open_plain_ns: open_ns(&plain_datagram, &plain),
                open_mac_ns: open_ns(&keyed_datagram, &keyed),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 6970);
    const OTHER_LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 3), 6970);
    const SWITCH: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 40000));
    const PEER: SocketAddr = SocketAddr::V4(OTHER_LB);
    const NOW: u64 = 1_800_000_000_000_000_000;
    const SKEW: Duration = Duration::from_secs(30);

    fn keys(text: &str) -> Keyring {
        Keyring::new(parse_keys(text).unwrap())
    }

    const K1: &str = "1 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K1_OTHER: &str = "1 ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "2 2222222222222222222222222222222222222222222222222222222222222222";

    fn lb(keys: Keyring) -> Control {
        Control::new(keys, Sender::Balancer, LB, SKEW, vec![*OTHER_LB.ip()], Stats::default())
    }

    fn heartbeat(keys: &Keyring, seq: u64, to: SocketAddrV4, active: bool) -> Vec<u8> {
        Message::Heartbeat { active }.seal(&Seal { keys, sender: Sender::Switch, seq, to }).remove(0)
    }

    fn forget() -> Message {
        Message::Forget(vec![xdp_lb_common::ClientKey::new([10, 78, 0, 50], [0, 69])])
    }

    fn accepted(received: &Received) -> bool {
        matches!(received, Received::Accepted(_))
    }

    #[test]
    fn key_files_parse_with_comments_and_refuse_mistakes() {
        let text = format!("# deployment key\n{K1}   # signs\n\n  {K2}\n");
        let keys = parse_keys(&text).unwrap();
        assert_eq!(keys.iter().map(|k| k.id).collect::<Vec<_>>(), [1, 2]);
        for (bad, line, what) in [
            ("1", 1, "expected"),
            ("0 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", 1, "1-255"),
            ("256 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", 1, "1-255"),
            ("1 0011zz", 1, "hex"),
            ("1 001", 1, "hex"),
            ("1 00112233445566778899aabbccddeeff", 1, "16 bytes"),
            (&format!("{K1}\n{K1_OTHER}"), 2, "twice"),
            ("1 00 extra", 1, "expected"),
        ] {
            let (at, problem) = parse_keys(bad).map(|_| ()).unwrap_err();
            assert_eq!(at, line, "{bad}");
            assert!(problem.contains(what), "{bad}: {problem}");
        }
    }

    #[test]
    fn key_files_must_be_private_and_hold_one_or_two_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xdp-lb-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        assert_eq!(load_keyring(&write("ok", &format!("{K1}\n{K2}\n"), 0o600)).unwrap().ids(), [1, 2]);
        assert!(matches!(load_keyring(&write("open", K1, 0o644)), Err(KeyFileError::Permissions { mode: 0o644, .. })));
        assert!(matches!(load_keyring(&write("empty", "# nothing\n", 0o600)), Err(KeyFileError::Empty { .. })));
        let three = format!("{K1}\n{K2}\n3 {}\n", "33".repeat(32));
        assert!(matches!(load_keyring(&write("three", &three, 0o600)), Err(KeyFileError::TooMany { count: 3, .. })));
        assert!(matches!(load_keyring(&dir.join("absent")), Err(KeyFileError::Read { .. })));
        let error = load_keyring(&write("bad", "1 xyz\n", 0o400)).unwrap_err().to_string();
        assert!(error.contains(":1: "), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
        let args = |file: Option<PathBuf>, insecure| AuthArgs { control_key_file: file, insecure_control: insecure, control_max_skew_ms: 0 };
        assert!(matches!(args(None, false).keyring(), Err(KeyFileError::Missing)));
        assert!(args(None, true).keyring().unwrap().is_insecure());
    }

    #[test]
    fn a_heartbeat_is_accepted_once() {
        let k = keys(K1);
        let mut control = lb(k.clone());
        let datagram = heartbeat(&k, NOW, LB, true);
        assert!(accepted(&control.receive_at(&datagram, SWITCH, NOW, Instant::now())));
        // The same bytes again: a replay. No notice for it.
        let again = control.receive_at(&datagram, SWITCH, NOW + 1000, Instant::now());
        assert!(matches!(again, Received::Dropped { reason: Some(Reason::Replayed), notice: None }), "{again:?}");
        // An older one that was never seen: still below the last accepted.
        let older = heartbeat(&k, NOW - 5, LB, false);
        assert!(matches!(control.receive_at(&older, SWITCH, NOW, Instant::now()), Received::Dropped { reason: Some(Reason::Replayed), .. }));
        assert!(accepted(&control.receive_at(&heartbeat(&k, NOW + 1, LB, false), SWITCH, NOW, Instant::now())));
        assert_eq!(control.stats.accepted, 2);
        assert_eq!(control.stats.rejected[Reason::Replayed as usize - 1], 2);
    }

    #[test]
    fn senders_have_separate_sequences() {
        let k = keys(K1);
        let mut control = lb(k.clone());
        assert!(accepted(&control.receive_at(&heartbeat(&k, NOW + 10, LB, true), SWITCH, NOW, Instant::now())));
        let sync = forget().seal(&Seal { keys: &k, sender: Sender::Balancer, seq: NOW, to: LB }).remove(0);
        assert!(accepted(&control.receive_at(&sync, PEER, NOW, Instant::now())), "the peer's clock is its own");
    }

    #[test]
    fn a_message_for_the_other_balancer_is_refused() {
        let k = keys(K1);
        let mut control = lb(k.clone());
        // The switch's "you are active" to the other balancer, replayed to this one.
        let theirs = heartbeat(&k, NOW, OTHER_LB, true);
        let received = control.receive_at(&theirs, SWITCH, NOW, Instant::now());
        assert!(matches!(received, Received::Dropped { reason: Some(Reason::Misaddressed), notice: Some(_) }), "{received:?}");
    }

    #[test]
    fn stale_messages_are_refused_and_a_zero_skew_checks_only_the_sequence() {
        let k = keys(K1);
        let mut control = lb(k.clone());
        let old = heartbeat(&k, NOW - 31_000_000_000, LB, true);
        assert!(matches!(control.receive_at(&old, SWITCH, NOW, Instant::now()), Received::Dropped { reason: Some(Reason::Stale), .. }));
        let future = heartbeat(&k, NOW + 31_000_000_000, LB, true);
        assert!(matches!(control.receive_at(&future, SWITCH, NOW, Instant::now()), Received::Dropped { reason: Some(Reason::Stale), .. }));
        let mut lenient = Control::new(k, Sender::Balancer, LB, Duration::ZERO, vec![], Stats::default());
        assert!(accepted(&lenient.receive_at(&old, SWITCH, NOW, Instant::now())));
    }

    #[test]
    fn a_forger_without_the_key_changes_nothing_and_is_counted() {
        let ours = keys(K1);
        let mut control = lb(ours);
        let now = Instant::now();
        for forger in [keys(K1_OTHER), keys(K2), Keyring::default()] {
            let forged = heartbeat(&forger, NOW, LB, true);
            let received = control.receive_at(&forged, SWITCH, NOW, now);
            assert!(matches!(received, Received::Dropped { reason: Some(r), .. } if r.is_auth_failure()), "{received:?}");
        }
        assert_eq!(control.stats.rejected[Reason::BadMac as usize - 1], 1);
        assert_eq!(control.stats.rejected[Reason::UnknownKey as usize - 1], 1);
        assert_eq!(control.stats.rejected[Reason::Unauthenticated as usize - 1], 1);
        assert_eq!(control.stats.peer_auth_failed, 0, "from the switch's side, not the peer's");
        let forged = forget().seal(&Seal { keys: &keys(K1_OTHER), sender: Sender::Balancer, seq: NOW, to: LB }).remove(0);
        control.receive_at(&forged, PEER, NOW, now);
        assert_eq!(control.stats.peer_auth_failed, 1);
        assert_eq!(control.stats.accepted, 0);
    }

    #[test]
    fn a_key_mismatch_shows_on_both_sides_through_the_notice() {
        // Two balancers whose files hold different secrets under the same id.
        let mut a = Control::new(keys(K1), Sender::Balancer, OTHER_LB, SKEW, vec![*LB.ip()], Stats::default());
        let mut b = lb(keys(K1_OTHER));
        let sync = a.seal(&forget(), LB).remove(0);
        let now = Instant::now();
        let Received::Dropped { reason: Some(Reason::BadMac), notice: Some(notice) } = b.receive_at(&sync, PEER, crate::pair_wire::unix_ns(), now) else {
            panic!("b accepted a's message");
        };
        assert_eq!(b.stats.peer_auth_failed, 1);
        // a cannot verify b's notice either (b signs with its own key), yet counts it.
        let back = a.receive_at(&notice, SocketAddr::V4(LB), crate::pair_wire::unix_ns(), now);
        assert!(matches!(back, Received::Dropped { notice: None, .. }), "a notice is never answered: {back:?}");
        assert_eq!(a.stats.rejected_by_other, 1);
        assert_eq!(a.stats.peer_auth_failed, 1);
        // One notice per second per address.
        let again = a.seal(&forget(), LB).remove(0);
        assert!(matches!(b.receive_at(&again, PEER, crate::pair_wire::unix_ns(), now), Received::Dropped { notice: None, .. }));
        let later = a.seal(&forget(), LB).remove(0);
        assert!(matches!(b.receive_at(&later, PEER, crate::pair_wire::unix_ns(), now + NOTICE_EVERY), Received::Dropped { notice: Some(_), .. }));
    }

    #[test]
    fn an_authentic_notice_is_counted_and_not_answered() {
        // Same keys, but b's clock is far off: b rejects a's messages as stale and says so.
        let mut a = Control::new(keys(K1), Sender::Balancer, OTHER_LB, SKEW, vec![*LB.ip()], Stats::default());
        let mut b = lb(keys(K1));
        let sync = a.seal(&forget(), LB).remove(0);
        let Received::Dropped { reason: Some(Reason::Stale), notice: Some(notice) } = b.receive_at(&sync, PEER, NOW, Instant::now()) else {
            panic!("not stale");
        };
        assert!(matches!(a.receive_at(&notice, SocketAddr::V4(LB), NOW, Instant::now()), Received::Dropped { reason: None, notice: None }));
        assert_eq!(a.stats.rejected_by_other, 1);
        assert_eq!(a.stats.rejected.iter().sum::<u64>(), 0, "an authentic notice is no rejection");
    }

    #[test]
    fn stats_round_trip_through_counters() {
        let mut stats = Stats { accepted: 5, peer_auth_failed: 2, rejected_by_other: 3, ..Stats::default() };
        stats.rejected[Reason::Stale as usize - 1] = 7;
        assert_eq!(Stats::from_counters(&stats.counters()), stats);
        assert_eq!(Stats::NAMES[Reason::Stale as usize], "control_stale");
        for reason in Reason::ALL {
            assert_eq!(Stats::NAMES[reason as usize], format!("control_{}", reason.name()));
        }
    }
}
