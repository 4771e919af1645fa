//! The steered backend's session table: its transfers by the client key of the steering
//! header, and the downloads that ended here lately. Only a cache: a transfer it lacks is
//! served from the header alone.

use std::{collections::HashMap, fmt, net::SocketAddr, time::Instant};

use xdp_lb_common::{
    SteeringHeader,
    steering::{OPTION_BLKSIZE, OPTION_TIMEOUT, OPTION_TSIZE, OPTION_WINDOWSIZE},
};

use super::decide::{Known, Seen};
use crate::{
    completed::{self, Completed},
    steered::replica::Link,
    transfer::{ReadTransfer, WriteTransfer},
    wire::Options,
};

/// A session's name in every steering header: the client's IPv4 address and port, and the
/// VIP port it sent to (network byte order, as in the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub client_ip: [u8; 4],
    pub client_port: [u8; 2],
    pub vip_port: [u8; 2],
}

impl SessionKey {
    pub const fn of(header: &SteeringHeader) -> Self {
        Self { client_ip: header.client_ip, client_port: header.client_port, vip_port: header.vip_port }
    }
}

/// `client-ip:client-port`, for logs.
impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", std::net::Ipv4Addr::from(self.client_ip), u16::from_be_bytes(self.client_port))
    }
}

pub enum Kind {
    Read(ReadTransfer),
    Write(Upload),
    /// This backend keeps the copy of an upload another backend (the primary) serves.
    Replica(Copy),
}

/// An upload served here.
pub struct Upload {
    pub transfer: WriteTransfer,
    /// The file as the client names it (the replicas' requests name it too).
    pub filename: String,
    /// The copy on another backend, if the upload is replicated.
    pub replica: Option<Replica>,
    /// Peers that refused this upload's copy, and a dead primary it was taken over from:
    /// never asked again for it.
    pub excluded: Vec<SocketAddr>,
    /// Replicas lost or found silent since one last answered.
    pub replica_tries: u8,
    /// An acknowledgement held until the replica has its block: the block, and whether it is
    /// the last (the file is in place here).
    pub held: Option<(u32, bool)>,
    /// Its fsync and rename run: nothing is acknowledged meanwhile.
    pub committing: bool,
    /// The last block is with the replica, which moves its copy into place first; this
    /// backend's own commit follows its ACK.
    pub replica_commits_first: bool,
    /// Reads back what was written, for the replica and, once complete, for the other backends.
    pub reader: std::fs::File,
}

/// An upload's replica, from the serving backend.
pub struct Replica {
    pub link: Link,
    /// It holds every block the client has been acknowledged; until then (a new replica being
    /// copied what came before) the client does not wait for it.
    pub caught_up: bool,
}

/// A copy of an upload served by `primary`.
pub struct Copy {
    pub transfer: WriteTransfer,
    pub filename: String,
    pub primary: SocketAddr,
    /// The last block arrived: the file is in place here. Kept a while so that, should the
    /// primary die before acknowledging it to the client, the client's repeat is answered.
    pub landed: bool,
    /// Its fsync and rename run: a repeated last block waits for their answer.
    pub committing: bool,
    /// Highest block ACKed to the primary.
    pub answered: u32,
    /// Reads it back (for a replica of its own, should it take the upload over).
    pub reader: std::fs::File,
}

pub struct Session {
    pub kind: Kind,
    /// Template for replies: client key, VIP, and the transfer context.
    pub header: SteeringHeader,
    /// Where replies go: the LB that sent the latest packet of this session.
    pub lb: SocketAddr,
    /// The options of the request that opened a download here (None: resumed from a header,
    /// or an upload), to tell a copy of that request from a new one.
    pub requested: Option<Options>,
}

impl Session {
    /// The options an OACK repeats: those negotiated for the session (tsize from the size).
    pub fn oack(&self) -> Options {
        let h = &self.header;
        let bits = h.options;
        Options {
            blksize: (bits & OPTION_BLKSIZE != 0).then(|| u32::from(h.blksize())),
            timeout: (bits & OPTION_TIMEOUT != 0).then(|| u32::from(h.timeout)),
            tsize: (bits & OPTION_TSIZE != 0).then(|| match &self.kind {
                Kind::Read(t) => t.size(),
                Kind::Write(_) | Kind::Replica(_) => h.file_size(),
            }),
            windowsize: (bits & OPTION_WINDOWSIZE != 0).then(|| u32::from(h.windowsize())),
        }
    }
}

pub struct Sessions {
    sessions: HashMap<SessionKey, Session>,
    /// Downloads that ended here with the client's last ACK (see `completed.rs`).
    completed: Completed<SessionKey>,
}

impl Sessions {
    pub fn new() -> Self {
        Self { sessions: HashMap::new(), completed: Completed::new(completed::REMEMBER_FOR, completed::CAPACITY) }
    }

    /// What the table knows of `key` at `now`, for the decision on its datagram.
    pub fn seen(&self, key: SessionKey, now: Instant) -> Seen {
        let session = self.sessions.get(&key).map(|session| match &session.kind {
            Kind::Read(transfer) => Known::Read { acked: transfer.acked(), path_hash: session.header.path_hash, requested: session.requested },
            Kind::Write(_) => Known::Write,
            Kind::Replica(_) => Known::Replica,
        });
        Seen { session, completed: session.is_none() && self.completed.contains(&key, now), transfers: self.sessions.len() }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn contains(&self, key: SessionKey) -> bool {
        self.sessions.contains_key(&key)
    }

    pub fn get(&self, key: SessionKey) -> Option<&Session> {
        self.sessions.get(&key)
    }

    pub fn get_mut(&mut self, key: SessionKey) -> Option<&mut Session> {
        self.sessions.get_mut(&key)
    }

    pub fn insert(&mut self, key: SessionKey, session: Session) {
        self.completed.forget(&key);
        self.sessions.insert(key, session);
    }

    pub fn remove(&mut self, key: SessionKey) -> Option<Session> {
        self.sessions.remove(&key)
    }

    /// A download of `key` ended here with the client's last ACK at `now`.
    pub fn completed(&mut self, key: SessionKey, now: Instant) {
        self.completed.remember(key, now);
    }
}

#[cfg(test)]
mod tests {
    use xdp_lb_common::SteeringHeader;

    use super::SessionKey;

    #[test]
    fn a_key_names_the_client_and_the_vip_port_of_a_header() {
        let header = SteeringHeader::for_client([10, 9, 8, 7], 40_000, [10, 9, 8, 1], 69);
        let key = SessionKey::of(&header);
        assert_eq!(key, SessionKey { client_ip: [10, 9, 8, 7], client_port: 40_000u16.to_be_bytes(), vip_port: 69u16.to_be_bytes() });
        assert_eq!(key.to_string(), "10.9.8.7:40000");
        let other_vip_port = SteeringHeader::for_client([10, 9, 8, 7], 40_000, [10, 9, 8, 1], 6969);
        assert_ne!(SessionKey::of(&other_vip_port), key);
    }
}
