//! Digest deferral: a request, or an ACK to resume, for a file whose content digest is not
//! cached yet waits while a blocking thread hashes the file. Hashing a large file on the event
//! loop would stall every other transfer and the heartbeats (the balancers would call this
//! backend dead).

use std::{collections::HashMap, fs::File, net::SocketAddr};

use tokio::sync::mpsc;
use tracing::warn;
use xdp_lb_common::steering::{FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARTBEAT};

use super::{
    frame::{steering_header, tftp_packet},
    session::{SessionKey, Sessions},
};
use crate::{
    files::{self, FileId, Root},
    wire::{Packet, Repr},
};

/// A datagram set aside until its file's digest is computed, and its sender.
pub type Deferred = (Vec<u8>, SocketAddr);

pub struct Digests {
    /// Datagrams waiting for a digest being computed off the loop, by file.
    waiting: HashMap<FileId, Vec<Deferred>>,
    done: (mpsc::UnboundedSender<FileId>, mpsc::UnboundedReceiver<FileId>),
}

impl Digests {
    pub fn new() -> Self {
        Self { waiting: HashMap::new(), done: mpsc::unbounded_channel() }
    }

    /// Sets `datagram` aside if it needs the digest of a file that is not cached, and has the
    /// digest computed (once per file however many wait); returns whether it was set aside.
    pub fn defer(&mut self, root: &mut Root, sessions: &Sessions, datagram: &[u8], from: SocketAddr) -> bool {
        let Some(file) = file_to_digest(root, sessions, datagram) else { return false };
        let Ok(id) = files::file_id(&file) else { return false };
        let waiting = self.waiting.entry(id).or_default();
        waiting.push((datagram.to_vec(), from));
        if waiting.len() == 1 {
            let (cache, done) = (root.digest_cache(), self.done.0.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(error) = files::compute_digest(&cache, &file) {
                    // The datagram is handled anyway, and meets the same error there.
                    warn!(%error, "cannot hash a file");
                }
                let _ = done.send(id);
            });
        }
        true
    }

    /// A balancer that took over nudges `key` while its request waits for a digest here: the
    /// answer goes through that balancer when the digest is ready (the request came through
    /// the failed one, and the client would wait for its own retransmission).
    pub fn redirect(&mut self, key: SessionKey, to: SocketAddr) {
        for (datagram, from) in self.waiting.values_mut().flatten() {
            if steering_header(datagram).is_some_and(|header| SessionKey::of(&header) == key) {
                *from = to;
            }
        }
    }

    /// The datagrams whose file was hashed since, once one was (never while none waits).
    pub async fn ready(&mut self) -> Vec<Deferred> {
        // Never closed: `self` holds a sender.
        let Some(id) = self.done.1.recv().await else { return std::future::pending().await };
        self.waiting.remove(&id).unwrap_or_default()
    }
}

/// The file a datagram needs the digest of, if that digest is not cached: a request's, or
/// that of a transfer to resume from its header.
fn file_to_digest(root: &mut Root, sessions: &Sessions, datagram: &[u8]) -> Option<File> {
    let header = steering_header(datagram)?;
    if !header.has_magic() || header.has_flag(FLAG_FROM_BACKEND | FLAG_HEARTBEAT) {
        return None;
    }
    let relative = match Packet::parse(tftp_packet(datagram)).ok()? {
        Repr::Rrq { filename, .. } => Root::relative(filename).ok()?,
        Repr::Ack { .. } if header.has_flag(FLAG_HAS_CONTEXT) => {
            if sessions.contains(SessionKey::of(&header)) {
                return None;
            }
            root.find_by_hash(header.path_hash)?
        }
        _ => return None,
    };
    let (file, _) = root.open_read(&relative).ok()?;
    root.cached_digest(&file).is_none().then_some(file)
}

#[cfg(test)]
mod tests {
    use xdp_lb_common::SteeringHeader;

    use super::{Digests, SessionKey};

    #[test]
    fn a_request_waiting_for_its_digest_is_answered_through_the_balancer_that_took_over() {
        let (old, new): (std::net::SocketAddr, std::net::SocketAddr) = ("10.77.0.2:7000".parse().unwrap(), "10.77.0.3:7000".parse().unwrap());
        let ours = SteeringHeader::for_client([10, 78, 0, 50], 40_000, [10, 77, 9, 100], 20_000);
        let other = SteeringHeader::for_client([10, 78, 0, 51], 40_000, [10, 77, 9, 100], 20_001);
        let mut digests = Digests::new();
        let file: crate::files::FileId = (1, 2, 3, 4);
        digests.waiting.insert(file, vec![(bytemuck::bytes_of(&ours).to_vec(), old), (bytemuck::bytes_of(&other).to_vec(), old)]);
        digests.redirect(SessionKey::of(&ours), new);
        let waiting = &digests.waiting[&file];
        assert_eq!((waiting[0].1, waiting[1].1), (new, old), "only the nudged client's request moves");
    }
}
