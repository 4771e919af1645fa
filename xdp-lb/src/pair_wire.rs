//! The agents' own messages, on each load balancer's control port: the switch's heartbeats
//! (which also tell a balancer whether it is active), the session sync between the two
//! balancers, and the notice an agent sends back when it rejects a message.
//!
//! ```text
//! datagram = ControlHeader (24 bytes) | payload | MAC (32 bytes)
//! MAC      = HMAC-SHA-256(key named by key_id, ControlHeader | payload)
//! ```
//!
//! The header names the key (`key_id`), the sender's role, a sequence number (the sender's
//! clock, in ns since the UNIX epoch, strictly increasing per sender) and the recipient's
//! control address, so a message cannot be replayed to the other balancer nor, once a later
//! one arrived, to the same one. This module only seals and opens datagrams: whether a
//! sequence number is new and fresh, and whether the recipient is this agent, is decided by
//! [`crate::control_auth::Guard`] with state this module does not keep.
//!
//! Sessions travel as the same Pod structs the kernel keeps in `LB_SESSIONS`, except that
//! `last_client_ns` carries the session's age (ns since the client's last packet), not a time
//! on the sender's clock.
//!
//! No panics: `open` reads untrusted bytes only through bounds-checked slices, and checks the
//! MAC before it reads any payload.

use std::net::{Ipv4Addr, SocketAddrV4};

use bytemuck::{Pod, Zeroable};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use xdp_lb_common::{ClientKey, Session};

/// "xdp-lb control", version 2: version 1 (`XLC1`) had no MAC, sequence nor recipient.
pub const MAGIC: [u8; 4] = *b"XLC2";

/// Largest datagram the agents send: fits a 1500-byte MTU with IP and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;

/// Bytes of the MAC after the payload (a full HMAC-SHA-256 output: nothing is truncated).
pub const MAC_LEN: usize = 32;

/// `key_id` of a message sent without a key (`--insecure-control`): its MAC bytes are zero.
pub const NO_KEY: u8 = 0;

const KIND_HEARTBEAT_ACTIVE: u8 = 1;
const KIND_HEARTBEAT_BACKUP: u8 = 2;
const KIND_UPSERT: u8 = 3;
const KIND_FORGET: u8 = 4;
const KIND_REJECTED: u8 = 5;
const KIND_HELLO: u8 = 6;

const UPSERT_LEN: usize = size_of::<ClientKey>() + size_of::<Session>();
const FORGET_LEN: usize = size_of::<ClientKey>();
const REJECTED_LEN: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ControlHeader {
    pub magic: [u8; 4],
    pub kind: u8,
    /// Entries after the header (sync messages), 0 for heartbeats.
    pub count: u8,
    /// The key the MAC is made with ([`NO_KEY`]: none).
    pub key_id: u8,
    /// [`Sender`] as a byte.
    pub sender: u8,
    /// Big-endian: the sender's clock in ns since the UNIX epoch, strictly increasing.
    pub seq: [u8; 8],
    /// The recipient's control address and port.
    pub to_ip: [u8; 4],
    pub to_port: [u8; 2],
    pub pad: [u8; 2],
}

pub const HEADER_LEN: usize = size_of::<ControlHeader>();

/// Who sends a message: the receiver keeps the last sequence number of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    Switch = 1,
    Balancer = 2,
}

impl Sender {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Switch),
            2 => Some(Self::Balancer),
            _ => None,
        }
    }
}

/// Why a receiver rejected a message (also the payload of [`Message::Rejected`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a control message of this version: bad magic, truncated, bad length or kind.
    Malformed = 1,
    /// Sent without a key (`--insecure-control`) to an agent that has one.
    Unauthenticated = 2,
    /// Made with a key id the receiver does not hold.
    UnknownKey = 3,
    /// The MAC does not match: another key under the same id, or altered bytes.
    BadMac = 4,
    /// Addressed to another agent.
    Misaddressed = 5,
    /// Its time is further from the receiver's clock than `--control-max-skew-ms`.
    Stale = 6,
    /// Its sequence number is not above the last one accepted from its sender.
    Replayed = 7,
}

impl Reason {
    pub const ALL: [Self; 7] =
        [Self::Malformed, Self::Unauthenticated, Self::UnknownKey, Self::BadMac, Self::Misaddressed, Self::Stale, Self::Replayed];

    fn from_byte(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == byte)
    }

    /// Whether the message failed authentication (a key problem or a forger), as opposed to
    /// an authentic message refused for its address or time.
    #[must_use]
    pub const fn is_auth_failure(self) -> bool {
        matches!(self, Self::Unauthenticated | Self::UnknownKey | Self::BadMac)
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unauthenticated => "unauthenticated",
            Self::UnknownKey => "unknown_key",
            Self::BadMac => "bad_mac",
            Self::Misaddressed => "misaddressed",
            Self::Stale => "stale",
            Self::Replayed => "replayed",
        }
    }
}

/// A message, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// From the switch: whether the receiving balancer is the active one. Answered with the
    /// same bytes, so the switch hears it alive.
    Heartbeat { active: bool },
    /// From the peer balancer: sessions to create or update.
    Upsert(Vec<(ClientKey, Session)>),
    /// From the peer balancer: sessions that ended.
    Forget(Vec<ClientKey>),
    /// From the peer balancer, every second whatever its role: nothing to act on, but it shows
    /// from the start whether the two balancers' keys agree (sync only flows from an active
    /// balancer that holds sessions).
    Hello,
    /// An agent's notice that it rejected a message from us, and which key ids it holds
    /// (0: none), so a key mismatch shows on both sides. Never answered with another notice.
    Rejected { reason: Reason, their_key_id: u8, key_ids: [u8; 2] },
}

/// What the header of an authentic (or, without a key, accepted) datagram says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub key_id: u8,
    pub sender: Sender,
    pub seq: u64,
    pub to: SocketAddrV4,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shorter than a control header and its MAC")]
    Truncated,
    #[error("not an xdp-lb control message of this version (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("unknown sender role {0}")]
    UnknownSender(u8),
    #[error("{count} entries announced, {len} bytes of them present")]
    BadLength { count: u8, len: usize },
    #[error("sent without a key (--insecure-control) to an agent that requires one")]
    Unauthenticated,
    #[error("made with key id {key_id}, which this agent does not hold")]
    UnknownKey { key_id: u8 },
    #[error("MAC does not match key id {key_id} (another key under that id, or altered bytes)")]
    BadMac { key_id: u8 },
}

impl WireError {
    /// The reason counted and reported for this error.
    #[must_use]
    pub const fn reason(&self) -> Reason {
        match self {
            Self::Unauthenticated => Reason::Unauthenticated,
            Self::UnknownKey { .. } => Reason::UnknownKey,
            Self::BadMac { .. } => Reason::BadMac,
            Self::Truncated | Self::BadMagic(_) | Self::UnknownKind(_) | Self::UnknownSender(_) | Self::BadLength { .. } => {
                Reason::Malformed
            }
        }
    }
}

/// A control key: an id (1-255) that travels in every message, and the secret.
#[derive(Clone)]
pub struct Key {
    pub id: u8,
    /// HMAC keyed with the secret, inner and outer pads already hashed: each message clones it
    /// (two SHA-256 blocks fewer per message than keying anew).
    keyed: Hmac<Sha256>,
}

impl Key {
    #[must_use]
    pub fn new(id: u8, secret: &[u8]) -> Self {
        // HMAC takes a key of any length.
        let keyed = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        Self { id, keyed }
    }

    fn mac(&self) -> Hmac<Sha256> {
        self.keyed.clone()
    }

    /// A short public name of the secret, for logs: operators compare it between hosts
    /// without showing the key.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"xdp-lb control key fingerprint");
        mac.finalize().into_bytes()[..6].iter().fold(String::new(), |mut hex, b| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
            hex
        })
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key {{ id: {}, fingerprint: {} }}", self.id, self.fingerprint())
    }
}

/// The keys of a deployment: the first signs, each verifies (two during a rotation). Empty:
/// `--insecure-control`, nothing is signed nor checked.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// `keys[0]` signs. The caller checks that ids are distinct and not [`NO_KEY`].
    #[must_use]
    pub fn new(keys: Vec<Key>) -> Self {
        Self { keys }
    }

    #[must_use]
    pub fn is_insecure(&self) -> bool {
        self.keys.is_empty()
    }

    #[must_use]
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The ids this ring accepts, for a rejection notice (0: none).
    #[must_use]
    pub fn ids(&self) -> [u8; 2] {
        [self.keys.first().map_or(NO_KEY, |k| k.id), self.keys.get(1).map_or(NO_KEY, |k| k.id)]
    }

    fn signing(&self) -> Option<&Key> {
        self.keys.first()
    }
}

/// Where and as whom a message goes.
#[derive(Clone, Copy, Debug)]
pub struct Seal<'a> {
    pub keys: &'a Keyring,
    pub sender: Sender,
    pub seq: u64,
    pub to: SocketAddrV4,
}

impl Message {
    /// Checks a datagram's header and MAC with `keys`, then parses its payload. Without keys
    /// (`--insecure-control`), nothing is checked but the format.
    pub fn open(datagram: &[u8], keys: &Keyring) -> Result<(Envelope, Self), WireError> {
        let header: ControlHeader =
            bytemuck::try_pod_read_unaligned(datagram.get(..HEADER_LEN).ok_or(WireError::Truncated)?)
                .map_err(|_| WireError::Truncated)?;
        if header.magic != MAGIC {
            return Err(WireError::BadMagic(header.magic));
        }
        let signed_len = datagram.len().checked_sub(MAC_LEN).filter(|n| *n >= HEADER_LEN).ok_or(WireError::Truncated)?;
        let (signed, tag) = datagram.split_at(signed_len);
        if !keys.is_insecure() {
            if header.key_id == NO_KEY {
                return Err(WireError::Unauthenticated);
            }
            let key = keys.keys.iter().find(|k| k.id == header.key_id).ok_or(WireError::UnknownKey { key_id: header.key_id })?;
            let mut mac = key.mac();
            mac.update(signed);
            // Constant time (`subtle`), over the whole tag.
            mac.verify_slice(tag).map_err(|_| WireError::BadMac { key_id: header.key_id })?;
        }
        let sender = Sender::from_byte(header.sender).ok_or(WireError::UnknownSender(header.sender))?;
        let envelope = Envelope {
            key_id: header.key_id,
            sender,
            seq: u64::from_be_bytes(header.seq),
            to: SocketAddrV4::new(Ipv4Addr::from(header.to_ip), u16::from_be_bytes(header.to_port)),
        };
        let body = &signed[HEADER_LEN..];
        let entries = |size: usize| {
            if body.len() == size * usize::from(header.count) {
                Ok(body.chunks_exact(size))
            } else {
                Err(WireError::BadLength { count: header.count, len: body.len() })
            }
        };
        let message = match header.kind {
            KIND_HEARTBEAT_ACTIVE | KIND_HEARTBEAT_BACKUP => {
                if !body.is_empty() || header.count != 0 {
                    return Err(WireError::BadLength { count: header.count, len: body.len() });
                }
                Self::Heartbeat { active: header.kind == KIND_HEARTBEAT_ACTIVE }
            }
            KIND_HELLO => {
                if !body.is_empty() || header.count != 0 {
                    return Err(WireError::BadLength { count: header.count, len: body.len() });
                }
                Self::Hello
            }
            KIND_UPSERT => Self::Upsert(
                entries(UPSERT_LEN)?
                    .map(|entry| {
                        let (key, session) = entry.split_at(FORGET_LEN);
                        (bytemuck::pod_read_unaligned(key), bytemuck::pod_read_unaligned(session))
                    })
                    .collect(),
            ),
            KIND_FORGET => Self::Forget(entries(FORGET_LEN)?.map(bytemuck::pod_read_unaligned).collect()),
            KIND_REJECTED => {
                let mut entries = entries(REJECTED_LEN)?;
                let (Some(notice), 1) = (entries.next(), header.count) else {
                    return Err(WireError::BadLength { count: header.count, len: body.len() });
                };
                let reason = Reason::from_byte(notice[0]).ok_or(WireError::UnknownKind(header.kind))?;
                Self::Rejected { reason, their_key_id: notice[1], key_ids: [notice[2], notice[3]] }
            }
            kind => return Err(WireError::UnknownKind(kind)),
        };
        Ok((envelope, message))
    }

    /// The kind byte of a datagram, read without any check (to tell a rejection notice, which
    /// is never answered, from the rest).
    #[must_use]
    pub fn peek_is_rejection(datagram: &[u8]) -> bool {
        datagram.get(..5).is_some_and(|h| h[..4] == MAGIC && h[4] == KIND_REJECTED)
    }

    /// The message as sealed datagrams of at most [`MAX_DATAGRAM`] bytes (sync messages split),
    /// numbered from `seal.seq` up, one number each ([`Message::datagrams`] of them; see
    /// [`Sequencer`]).
    #[must_use]
    pub fn seal(&self, seal: &Seal<'_>) -> Vec<Vec<u8>> {
        let mut seq = seal.seq;
        let mut next = || {
            let this = seq;
            seq += 1;
            this
        };
        let mut out = match self {
            Self::Heartbeat { active } => {
                let kind = if *active { KIND_HEARTBEAT_ACTIVE } else { KIND_HEARTBEAT_BACKUP };
                vec![header(seal, kind, 0, next()).to_vec()]
            }
            Self::Hello => vec![header(seal, KIND_HELLO, 0, next()).to_vec()],
            Self::Upsert(sessions) => chunked(seal, KIND_UPSERT, sessions, UPSERT_LEN, &mut next, |out, (key, session)| {
                out.extend_from_slice(bytemuck::bytes_of(key));
                out.extend_from_slice(bytemuck::bytes_of(session));
            }),
            Self::Forget(keys) => chunked(seal, KIND_FORGET, keys, FORGET_LEN, &mut next, |out, key| {
                out.extend_from_slice(bytemuck::bytes_of(key));
            }),
            Self::Rejected { reason, their_key_id, key_ids } => {
                let mut out = header(seal, KIND_REJECTED, 1, next()).to_vec();
                out.extend_from_slice(&[*reason as u8, *their_key_id, key_ids[0], key_ids[1]]);
                vec![out]
            }
        };
        for datagram in &mut out {
            let tag = match seal.keys.signing() {
                Some(key) => {
                    let mut mac = key.mac();
                    mac.update(datagram);
                    mac.finalize().into_bytes().into()
                }
                None => [0; MAC_LEN],
            };
            datagram.extend_from_slice(&tag);
        }
        out
    }

    /// How many sequence numbers [`Message::seal`] uses for this message.
    #[must_use]
    pub fn datagrams(&self) -> u64 {
        let count = |n: usize, size: usize| n.div_ceil(per_datagram(size)).max(1) as u64;
        match self {
            Self::Heartbeat { .. } | Self::Hello | Self::Rejected { .. } => 1,
            Self::Upsert(sessions) => count(sessions.len(), UPSERT_LEN),
            Self::Forget(keys) => count(keys.len(), FORGET_LEN),
        }
    }
}

fn header(seal: &Seal<'_>, kind: u8, count: u8, seq: u64) -> [u8; HEADER_LEN] {
    bytemuck::cast(ControlHeader {
        magic: MAGIC,
        kind,
        count,
        key_id: seal.keys.signing().map_or(NO_KEY, |k| k.id),
        sender: seal.sender as u8,
        seq: seq.to_be_bytes(),
        to_ip: seal.to.ip().octets(),
        to_port: seal.to.port().to_be_bytes(),
        pad: [0; 2],
    })
}

fn per_datagram(size: usize) -> usize {
    ((MAX_DATAGRAM - HEADER_LEN - MAC_LEN) / size).min(usize::from(u8::MAX))
}

fn chunked<T>(
    seal: &Seal<'_>,
    kind: u8,
    items: &[T],
    size: usize,
    next: &mut impl FnMut() -> u64,
    put: impl Fn(&mut Vec<u8>, &T),
) -> Vec<Vec<u8>> {
    items
        .chunks(per_datagram(size))
        .map(|chunk| {
            let count = u8::try_from(chunk.len()).unwrap_or(u8::MAX);
            let mut out = Vec::with_capacity(HEADER_LEN + size * chunk.len() + MAC_LEN);
            out.extend_from_slice(&header(seal, kind, count, next()));
            for item in chunk {
                put(&mut out, item);
            }
            out
        })
        .collect()
}

/// A sender's sequence numbers: its clock in ns since the UNIX epoch, but always above the
/// last one used, so two messages in the same nanosecond (or a clock stepped back a little)
/// still count up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequencer {
    last: u64,
}

impl Sequencer {
    /// The first number for a message of `n` datagrams, at `now_ns` (UNIX epoch).
    pub fn take(&mut self, now_ns: u64, n: u64) -> u64 {
        let first = now_ns.max(self.last + 1);
        self.last = first + n.max(1) - 1;
        first
    }
}

/// Nanoseconds since the UNIX epoch on this host's clock.
#[must_use]
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use xdp_lb_common::SteeringHeader;

    use super::*;

    fn session(n: u16) -> (ClientKey, Session) {
        let key = ClientKey::new([10, 0, 0, 50], n.to_be_bytes());
        let mut session: Session = Zeroable::zeroed();
        session.header = SteeringHeader::for_client(key.ip, n, [10, 0, 0, 100], key.tid());
        session.header.set_block(u32::from(n) * 1000);
        session.backend = u32::from(n % 3);
        (key, session)
    }

    fn ring(keys: &[(u8, &[u8])]) -> Keyring {
        Keyring::new(keys.iter().map(|(id, secret)| Key::new(*id, secret)).collect())
    }

    const TO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 6970);

    fn seal(keys: &Keyring) -> Seal<'_> {
        Seal { keys, sender: Sender::Switch, seq: 1_700_000_000_000_000_000, to: TO }
    }

    #[test]
    fn heartbeats_round_trip_with_their_envelope() {
        let keys = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        for active in [true, false] {
            let datagrams = Message::Heartbeat { active }.seal(&seal(&keys));
            assert_eq!(datagrams.len(), 1);
            assert_eq!(datagrams[0].len(), HEADER_LEN + MAC_LEN);
            let (envelope, message) = Message::open(&datagrams[0], &keys).unwrap();
            assert_eq!(message, Message::Heartbeat { active });
            assert_eq!(envelope, Envelope { key_id: 1, sender: Sender::Switch, seq: seal(&keys).seq, to: TO });
        }
    }

    #[test]
    fn many_sessions_split_into_datagrams_that_fit_and_round_trip() {
        let keys = ring(&[(7, b"a deployment key of 32 bytes ok!")]);
        let sessions: Vec<_> = (0..100).map(session).collect();
        let upsert = Message::Upsert(sessions.clone());
        let datagrams = upsert.seal(&seal(&keys));
        assert!(datagrams.len() > 1);
        assert_eq!(datagrams.len() as u64, upsert.datagrams());
        let mut back = Vec::new();
        for (i, datagram) in datagrams.iter().enumerate() {
            assert!(datagram.len() <= MAX_DATAGRAM);
            match Message::open(datagram, &keys) {
                Ok((envelope, Message::Upsert(part))) => {
                    assert_eq!(envelope.seq, seal(&keys).seq + i as u64, "one sequence number per datagram");
                    back.extend(part);
                }
                other => panic!("not an upsert: {other:?}"),
            }
        }
        assert_eq!(back, sessions);
        let keys_only: Vec<_> = sessions.iter().map(|(k, _)| *k).collect();
        let back: Vec<ClientKey> = Message::Forget(keys_only.clone())
            .seal(&seal(&keys))
            .iter()
            .flat_map(|d| match Message::open(d, &keys) {
                Ok((_, Message::Forget(part))) => part,
                other => panic!("not a forget: {other:?}"),
            })
            .collect();
        assert_eq!(back, keys_only);
    }

    #[test]
    fn changing_any_byte_fails_the_check() {
        let keys = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        for message in [
            Message::Heartbeat { active: false },
            Message::Hello,
            Message::Upsert(vec![session(1), session(2)]),
            Message::Forget(vec![session(3).0]),
        ] {
            let datagram = message.seal(&seal(&keys)).remove(0);
            for at in 0..datagram.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut tampered = datagram.clone();
                    tampered[at] ^= flip;
                    let result = Message::open(&tampered, &keys);
                    assert!(result.is_err(), "byte {at} ^ {flip:#x} of {message:?} still opens: {result:?}");
                }
            }
        }
        // In particular the role: "backup" turned into "active" by the kind byte alone.
        let mut forged = Message::Heartbeat { active: false }.seal(&seal(&keys)).remove(0);
        forged[4] = KIND_HEARTBEAT_ACTIVE;
        assert_eq!(Message::open(&forged, &keys), Err(WireError::BadMac { key_id: 1 }));
    }

    #[test]
    fn the_wrong_key_fails_and_an_unknown_id_is_named() {
        let ours = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        let same_id_other_secret = ring(&[(1, b"another secret under the same id")]);
        let other_id = ring(&[(2, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        let datagram = Message::Heartbeat { active: true }.seal(&seal(&same_id_other_secret)).remove(0);
        assert_eq!(Message::open(&datagram, &ours), Err(WireError::BadMac { key_id: 1 }));
        let datagram = Message::Heartbeat { active: true }.seal(&seal(&other_id)).remove(0);
        assert_eq!(Message::open(&datagram, &ours), Err(WireError::UnknownKey { key_id: 2 }));
        assert_eq!(WireError::UnknownKey { key_id: 2 }.reason(), Reason::UnknownKey);
    }

    #[test]
    fn unsigned_messages_are_refused_by_an_agent_with_a_key() {
        let ours = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        let insecure = Keyring::default();
        let datagram = Message::Heartbeat { active: true }.seal(&seal(&insecure)).remove(0);
        assert_eq!(Message::open(&datagram, &ours), Err(WireError::Unauthenticated));
        // An insecure agent checks the format only.
        assert!(Message::open(&datagram, &insecure).is_ok());
        let signed = Message::Heartbeat { active: true }.seal(&seal(&ours)).remove(0);
        assert!(Message::open(&signed, &insecure).is_ok());
    }

    #[test]
    fn rotation_accepts_both_keys_and_signs_with_the_first() {
        let old = (1, b"the old key, still accepted......".as_slice());
        let new = (2, b"the new key, now signing.........".as_slice());
        let before = ring(&[old]);
        let during_sends_old = ring(&[old, new]);
        let during_sends_new = ring(&[new, old]);
        let after = ring(&[new]);
        let heartbeat = Message::Heartbeat { active: true };
        for (sender, receiver, ok) in [
            (&before, &during_sends_old, true),
            (&during_sends_old, &before, true),
            (&during_sends_old, &during_sends_new, true),
            (&during_sends_new, &during_sends_old, true),
            (&during_sends_new, &after, true),
            (&after, &during_sends_new, true),
            (&before, &after, false),
            (&after, &before, false),
        ] {
            let datagram = heartbeat.seal(&seal(sender)).remove(0);
            assert_eq!(Message::open(&datagram, receiver).is_ok(), ok, "{:?} -> {:?}", sender.ids(), receiver.ids());
        }
        assert_eq!(heartbeat.seal(&seal(&during_sends_new))[0][6], 2, "the first key signs");
    }

    #[test]
    fn a_truncated_or_extended_mac_fails() {
        let keys = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        for message in [Message::Heartbeat { active: true }, Message::Upsert(vec![session(1)])] {
            let datagram = message.seal(&seal(&keys)).remove(0);
            for cut in 1..=MAC_LEN {
                let short = &datagram[..datagram.len() - cut];
                assert!(Message::open(short, &keys).is_err(), "{cut} MAC bytes cut still opens");
            }
            let mut long = datagram.clone();
            long.push(0);
            assert!(Message::open(&long, &keys).is_err());
        }
        let heartbeat = Message::Heartbeat { active: true }.seal(&seal(&keys)).remove(0);
        assert_eq!(Message::open(&heartbeat[..HEADER_LEN + MAC_LEN - 1], &keys), Err(WireError::Truncated));
    }

    #[test]
    fn hellos_round_trip() {
        let keys = ring(&[(3, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        let datagram = Message::Hello.seal(&seal(&keys)).remove(0);
        assert_eq!(Message::open(&datagram, &keys).unwrap().1, Message::Hello);
    }

    #[test]
    fn rejection_notices_round_trip() {
        let keys = ring(&[(3, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        for reason in Reason::ALL {
            let notice = Message::Rejected { reason, their_key_id: 9, key_ids: [3, 0] };
            let datagram = notice.seal(&seal(&keys)).remove(0);
            assert!(Message::peek_is_rejection(&datagram));
            assert_eq!(Message::open(&datagram, &keys).unwrap().1, notice);
        }
        assert!(!Message::peek_is_rejection(&Message::Heartbeat { active: true }.seal(&seal(&keys))[0]));
    }

    /// The no-panic contract on arbitrary bytes, and on valid datagrams with bytes changed,
    /// cut or appended, opened without a key so that parsing reaches the payload.
    #[test]
    #[expect(clippy::cast_possible_truncation, reason = "random bytes and indices from a 64-bit generator")]
    fn no_input_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let keys = ring(&[(1, b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1")]);
        let none = Keyring::default();
        let valid: Vec<Vec<u8>> = [
            Message::Heartbeat { active: true },
            Message::Hello,
            Message::Upsert(vec![session(1), session(2)]),
            Message::Forget(vec![session(1).0]),
            Message::Rejected { reason: Reason::BadMac, their_key_id: 1, key_ids: [1, 2] },
        ]
        .iter()
        .map(|m| m.seal(&seal(&none)).remove(0))
        .collect();
        for i in 0..200_000u32 {
            let mut datagram = if i % 2 == 0 {
                valid[(next() % valid.len() as u64) as usize].clone()
            } else {
                (0..next() % 300).map(|_| next() as u8).collect()
            };
            match next() % 4 {
                0 if !datagram.is_empty() => {
                    let at = (next() % datagram.len() as u64) as usize;
                    datagram[at] = next() as u8;
                }
                1 => datagram.truncate((next() % (datagram.len() as u64 + 1)) as usize),
                2 => datagram.extend((0..next() % 120).map(|_| next() as u8)),
                _ => {}
            }
            let _ = Message::open(&datagram, &none);
            let _ = Message::open(&datagram, &keys);
            let _ = Message::peek_is_rejection(&datagram);
        }
    }

    #[test]
    fn sequence_numbers_count_up_even_when_the_clock_does_not() {
        let mut seq = Sequencer::default();
        assert_eq!(seq.take(1000, 1), 1000);
        assert_eq!(seq.take(1000, 3), 1001, "same nanosecond");
        assert_eq!(seq.take(500, 1), 1004, "clock stepped back");
        assert_eq!(seq.take(2000, 1), 2000);
    }

    #[test]
    fn bad_datagrams_are_refused() {
        let none = Keyring::default();
        let mut good = Message::Heartbeat { active: true }.seal(&seal(&none)).remove(0);
        assert_eq!(Message::open(b"XLC", &none), Err(WireError::Truncated));
        let mut old = good.clone();
        old[..4].copy_from_slice(b"XLC1");
        assert_eq!(Message::open(&old, &none), Err(WireError::BadMagic(*b"XLC1")));
        good[4] = 9;
        assert_eq!(Message::open(&good, &none), Err(WireError::UnknownKind(9)));
        good[4] = KIND_HEARTBEAT_ACTIVE;
        good[7] = 3;
        assert_eq!(Message::open(&good, &none), Err(WireError::UnknownSender(3)));
        let mut upsert = Message::Upsert(vec![session(1), session(2)]).seal(&seal(&none)).remove(0);
        upsert.pop();
        assert_eq!(Message::open(&upsert, &none), Err(WireError::BadLength { count: 2, len: 2 * UPSERT_LEN - 1 }));
    }
}
