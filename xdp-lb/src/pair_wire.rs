//! The agents' own messages, on each load balancer's control port: the switch's heartbeats
//! (which also tell a balancer whether it is active) and the session sync between the two
//! balancers. Every message starts with an 8-byte [`ControlHeader`]; sessions travel as the
//! same Pod structs the kernel keeps in `LB_SESSIONS`, except that `last_client_ns` carries the
//! session's age (ns since the client's last packet), not a time on the sender's clock.

use bytemuck::{Pod, Zeroable};
use xdp_lb_common::{ClientKey, Session};

/// "xdp-lb control", version 1.
pub const MAGIC: [u8; 4] = *b"XLC1";

/// Largest datagram the agents send: fits a 1500-byte MTU with IP and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;

const KIND_HEARTBEAT_ACTIVE: u8 = 1;
const KIND_HEARTBEAT_BACKUP: u8 = 2;
const KIND_UPSERT: u8 = 3;
const KIND_FORGET: u8 = 4;

const UPSERT_LEN: usize = size_of::<ClientKey>() + size_of::<Session>();
const FORGET_LEN: usize = size_of::<ClientKey>();

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ControlHeader {
    pub magic: [u8; 4],
    pub kind: u8,
    /// Entries after the header (sync messages), 0 for heartbeats.
    pub count: u8,
    pub pad: [u8; 2],
}

const HEADER_LEN: usize = size_of::<ControlHeader>();

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
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shorter than a control header")]
    Truncated,
    #[error("not an xdp-lb control message (bad magic)")]
    BadMagic,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("{count} entries announced, {len} bytes of them present")]
    BadLength { count: u8, len: usize },
}

impl Message {
    pub fn parse(datagram: &[u8]) -> Result<Self, WireError> {
        let header: ControlHeader =
            bytemuck::try_pod_read_unaligned(datagram.get(..HEADER_LEN).ok_or(WireError::Truncated)?)
                .map_err(|_| WireError::Truncated)?;
        if header.magic != MAGIC {
            return Err(WireError::BadMagic);
        }
        let body = &datagram[HEADER_LEN..];
        let entries = |size: usize| {
            if body.len() == size * usize::from(header.count) {
                Ok(body.chunks_exact(size))
            } else {
                Err(WireError::BadLength { count: header.count, len: body.len() })
            }
        };
        match header.kind {
            KIND_HEARTBEAT_ACTIVE => Ok(Self::Heartbeat { active: true }),
            KIND_HEARTBEAT_BACKUP => Ok(Self::Heartbeat { active: false }),
            KIND_UPSERT => Ok(Self::Upsert(
                entries(UPSERT_LEN)?
                    .map(|entry| {
                        let (key, session) = entry.split_at(FORGET_LEN);
                        (bytemuck::pod_read_unaligned(key), bytemuck::pod_read_unaligned(session))
                    })
                    .collect(),
            )),
            KIND_FORGET => Ok(Self::Forget(entries(FORGET_LEN)?.map(bytemuck::pod_read_unaligned).collect())),
            kind => Err(WireError::UnknownKind(kind)),
        }
    }

    /// The message as datagrams of at most [`MAX_DATAGRAM`] bytes (sync messages split).
    #[must_use]
    pub fn emit(&self) -> Vec<Vec<u8>> {
        match self {
            Self::Heartbeat { active } => {
                let kind = if *active { KIND_HEARTBEAT_ACTIVE } else { KIND_HEARTBEAT_BACKUP };
                vec![header(kind, 0).to_vec()]
            }
            Self::Upsert(sessions) => chunked(KIND_UPSERT, sessions, UPSERT_LEN, |out, (key, session)| {
                out.extend_from_slice(bytemuck::bytes_of(key));
                out.extend_from_slice(bytemuck::bytes_of(session));
            }),
            Self::Forget(keys) => chunked(KIND_FORGET, keys, FORGET_LEN, |out, key| {
                out.extend_from_slice(bytemuck::bytes_of(key));
            }),
        }
    }
}

fn header(kind: u8, count: u8) -> [u8; HEADER_LEN] {
    bytemuck::cast(ControlHeader { magic: MAGIC, kind, count, pad: [0; 2] })
}

fn chunked<T>(kind: u8, items: &[T], size: usize, put: impl Fn(&mut Vec<u8>, &T)) -> Vec<Vec<u8>> {
    let per_datagram = ((MAX_DATAGRAM - HEADER_LEN) / size).min(usize::from(u8::MAX));
    items
        .chunks(per_datagram)
        .map(|chunk| {
            let count = u8::try_from(chunk.len()).unwrap_or(u8::MAX);
            let mut out = Vec::with_capacity(HEADER_LEN + size * chunk.len());
            out.extend_from_slice(&header(kind, count));
            for item in chunk {
                put(&mut out, item);
            }
            out
        })
        .collect()
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

    #[test]
    fn heartbeats_round_trip() {
        for active in [true, false] {
            let datagrams = Message::Heartbeat { active }.emit();
            assert_eq!(datagrams.len(), 1);
            assert_eq!(Message::parse(&datagrams[0]), Ok(Message::Heartbeat { active }));
        }
    }

    #[test]
    fn many_sessions_split_into_datagrams_that_fit_and_round_trip() {
        let sessions: Vec<_> = (0..100).map(session).collect();
        let datagrams = Message::Upsert(sessions.clone()).emit();
        assert!(datagrams.len() > 1);
        let mut back = Vec::new();
        for datagram in &datagrams {
            assert!(datagram.len() <= MAX_DATAGRAM);
            match Message::parse(datagram) {
                Ok(Message::Upsert(part)) => back.extend(part),
                other => panic!("not an upsert: {other:?}"),
            }
        }
        assert_eq!(back, sessions);
        let keys: Vec<_> = sessions.iter().map(|(k, _)| *k).collect();
        let forget = Message::Forget(keys.clone()).emit();
        let back: Vec<ClientKey> = forget
            .iter()
            .flat_map(|d| match Message::parse(d) {
                Ok(Message::Forget(part)) => part,
                other => panic!("not a forget: {other:?}"),
            })
            .collect();
        assert_eq!(back, keys);
    }

    #[test]
    fn bad_datagrams_are_refused() {
        assert_eq!(Message::parse(b"XLC"), Err(WireError::Truncated));
        assert_eq!(Message::parse(b"NOPE\x01\x00\x00\x00"), Err(WireError::BadMagic));
        assert_eq!(Message::parse(b"XLC1\x09\x00\x00\x00"), Err(WireError::UnknownKind(9)));
        let mut upsert = Message::Upsert(vec![session(1), session(2)]).emit().remove(0);
        upsert.pop();
        assert_eq!(Message::parse(&upsert), Err(WireError::BadLength { count: 2, len: 2 * UPSERT_LEN - 1 }));
        assert_eq!(
            Message::parse(b"XLC1\x04\x01\x00\x00abc"),
            Err(WireError::BadLength { count: 1, len: 3 })
        );
    }
}
