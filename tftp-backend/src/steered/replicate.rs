//! The steered loop's side of upload replication (issue 17; ARCHITECTURE.md, "Uploads"): the
//! serving backend copies every block to a replica and acknowledges the client only once the
//! replica has it; the replica takes the upload over when a balancer sends it the client's
//! packets (the primary died); a finished upload is pushed to every other peer. The messages
//! are steering datagrams flagged `FLAG_REPLICA`, from backend to backend; their decisions are
//! `replica.rs`'s (a link's sends) and `replica::may_acknowledge` (when the client hears).

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    time::Instant,
};

use tokio::io::Interest;

use tracing::{debug, info, warn};
use xdp_lb_common::{
    SteeringHeader,
    steering::{FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_REPLICA},
};

use super::{
    Steered,
    frame::{HEADER, reply, steering_header, tftp_packet},
    replica::{self, Link, Send},
    session::{Copy, Kind, Replica, Session, SessionKey, Upload},
};
use crate::{
    batch::SendBatch,
    files::Refusal,
    service::{self, Context},
    transfer::WriteNext,
    window::{self, Blocks},
    wire::{ErrorCode, MAX_PACKET, Mode, Options, Packet, Repr},
};

/// A copy not fed for this long is abandoned (its primary and the client are gone); a landed
/// one is forgotten after it.
pub const COPY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Replicas an upload may lose (or find silent) in a row before it ends with an ERROR: with
/// 310 ms per silent one, about two seconds without a second copy anywhere.
const REPLICA_TRIES: u8 = 6;

/// A peer that did not answer a link is tried after the others for this long.
const SILENT_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A finished upload on its way to a peer that lacks it.
pub struct Push {
    link: Link,
    template: SteeringHeader,
    filename: String,
    blksize: u16,
    reader: std::fs::File,
    /// The file's last block.
    last: u32,
    /// Times the push started again after its peer went silent.
    restarts: u32,
    /// When it starts again: its peer went silent (`replica::push_restart_after`).
    resume_at: Option<Instant>,
}

impl Push {
    fn new(peer: SocketAddr, template: SteeringHeader, file: &Finished<'_>, reader: std::fs::File, now: Instant) -> (Self, Send) {
        let mut push = Self { link: Link::new(peer), template, filename: file.filename.to_owned(), blksize: file.blksize, reader, last: file.last, restarts: 0, resume_at: None };
        let send = push.open(now);
        (push, send)
    }

    /// A fresh link, from the request: the peer's copy starts over (`open_copy`).
    fn open(&mut self, now: Instant) -> Send {
        self.link = Link::new(self.link.peer);
        let send = self.link.open(now);
        let _ = self.link.available(self.last, Some(self.last), now);
        send
    }

    fn deadline(&self) -> Option<Instant> {
        self.resume_at.or_else(|| self.link.deadline())
    }

    fn on_timeout(&mut self, now: Instant) -> Send {
        match self.resume_at {
            Some(at) if at > now => Send::Nothing,
            Some(_) => {
                self.resume_at = None;
                self.open(now)
            }
            None => self.link.on_timeout(now),
        }
    }

    /// Any answer: the peer lives, and the link carries on from it.
    fn on_ack(&mut self, block: u32, now: Instant) -> Send {
        self.resume_at = None;
        self.link.on_ack(block, now)
    }

    /// Its link gave up on a silent peer: when it starts again, if it does.
    fn restart_later(&mut self, now: Instant) -> Option<Instant> {
        let at = now + replica::push_restart_after(self.restarts)?;
        self.restarts += 1;
        self.resume_at = Some(at);
        Some(at)
    }
}

/// A finished upload, to push: its name, its blocks (`1..=last` of `blksize`) and a handle to
/// read them.
struct Finished<'a> {
    filename: &'a str,
    blksize: u16,
    reader: &'a std::fs::File,
    last: u32,
}

/// A refusal that ends the client's upload when its replica reports it: the same limits hold
/// on every backend, so the upload could land nowhere.
fn ends_the_upload(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::DiskFull | ErrorCode::FileExists)
}

/// A replica's answer to its old primary's DATA once it serves the upload itself.
const TAKEN_OVER: &str = "this backend serves the upload now";

const NO_REPLICA: Refusal = Refusal { code: ErrorCode::NotDefined, message: "no backend can keep a copy of the upload" };

impl Steered {
    /// The peer to keep `key`'s copy on: the peers in turn from a place the key picks (uploads
    /// spread over them), skipping `excluded`; one that lately did not answer comes last (each
    /// try at a dead peer costs the client a few hundred ms).
    pub(super) fn candidate(&self, key: SessionKey, excluded: &[SocketAddr]) -> Option<SocketAddr> {
        let n = self.peers.len();
        let start = usize::from(u16::from_be_bytes(key.client_port)) + usize::from(key.client_ip[3]);
        let now = Instant::now();
        let silent = |peer: &SocketAddr| self.silent_peers.get(peer).is_some_and(|at| now.duration_since(*at) < SILENT_FOR);
        let order = (0..n).map(|i| self.peers[(start + i) % n]).filter(|peer| !excluded.contains(peer));
        order.clone().find(|peer| !silent(peer)).or_else(|| order.clone().next())
    }

    /// Whether uploads of `mode` are replicated: octet ones with a peer. (A netascii upload is
    /// decoded on the way to disk: blocks of the file are not the client's blocks, so no
    /// replica could continue it.)
    pub(super) fn replicates(&self, mode: Mode) -> bool {
        !self.peers.is_empty() && mode == Mode::Octet
    }

    /// Opens `key`'s copy on the next candidate; false if none is left.
    pub(super) async fn start_replica(&mut self, key: SessionKey, now: Instant) -> bool {
        let excluded = match self.sessions.get(key) {
            Some(Session { kind: Kind::Write(upload), .. }) => upload.excluded.clone(),
            _ => return false,
        };
        let Some(peer) = self.candidate(key, &excluded) else { return false };
        let Some(Session { kind: Kind::Write(upload), header, .. }) = self.sessions.get_mut(key) else { return false };
        let mut link = Link::new(peer);
        let send = link.open(now);
        let caught_up = upload.transfer.received() == 0;
        upload.replica = Some(Replica { link, caught_up });
        // Until it caught up, no balancer must take it for a replica.
        header.set_upload_replica(None);
        debug!(client = %key, %peer, caught_up, "replica chosen");
        self.send_link(key, peer, send).await;
        true
    }

    /// The client's DATA of `key` was written: its replica gets what its link allows now, the
    /// blocks together (one file read, one system call). Called at a burst's end within a
    /// window, not at the window's, so that the replica writes the window while the client
    /// still sends it; at once for the block an ACK is due for.
    pub(super) async fn replicate_data(&mut self, key: SessionKey) {
        let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key) else { return };
        let have = copyable(upload);
        let Some(replica) = upload.replica.as_mut() else { return };
        let peer = replica.link.peer;
        let send = replica.link.available(have, None, Instant::now());
        self.send_link(key, peer, send).await;
    }

    /// What a link asks to send toward `peer` for `key` (the upload's replica, or a push).
    pub(super) async fn send_link(&mut self, key: SessionKey, peer: SocketAddr, send: Send) {
        match &send {
            Send::Nothing => return,
            // Boxed: losing a replica opens the next one, which sends through here.
            Send::GiveUp => return Box::pin(self.link_lost(key, peer, None)).await,
            Send::Open | Send::Blocks(_) => {}
        }
        self.emit_link(key, peer, &send).await;
        self.arm_link(key, peer);
    }

    /// Sends the datagrams of `send` to `peer`: the request, or the blocks read back from the
    /// file (a batch per read and per system call, as a download's windows).
    async fn emit_link(&mut self, key: SessionKey, peer: SocketAddr, send: &Send) {
        // Apart, so that the file and the header stay borrowed while the sender is used.
        let Self { sessions, pushes, window, socket, segment_offload, link_out: out, .. } = self;
        // A push announces the finished file's size (tsize): see `open_copy`.
        let (template, filename, blksize, timeout, reader, tsize) = match sessions.get(key) {
            Some(Session { kind: Kind::Write(upload), header, .. }) if upload.replica.as_ref().is_some_and(|r| r.link.peer == peer) => {
                (*header, upload.filename.as_str(), upload.transfer.blksize, header.timeout, &upload.reader, None)
            }
            _ => match pushes.get(&(key, peer)) {
                Some(push) => (push.template, push.filename.as_str(), push.blksize, push.template.timeout, &push.reader, push.reader.metadata().ok().map(|m| m.len())),
                None => return,
            },
        };
        let mut header = template;
        header.flags = FLAG_REPLICA | (template.flags & FLAG_HAS_CONTEXT);
        match send {
            Send::Open => {
                let options = Options { blksize: Some(u32::from(blksize)), timeout: (timeout != 0).then_some(u32::from(timeout)), tsize, ..Options::default() };
                header.set_block(0);
                out.resize(HEADER + MAX_PACKET, 0);
                out[..HEADER].copy_from_slice(bytemuck::bytes_of(&header));
                let end = service::emit_at(&Repr::Wrq { filename, mode: Mode::Octet, options }, out, HEADER);
                if let Err(error) = socket.send_to(&out[..end], peer).await {
                    debug!(%error, %peer, "replication send failed");
                }
            }
            Send::Blocks(blocks) => {
                // Peers read each datagram of a super-packet apart, as a balancer does.
                window.segment_send_to(*segment_offload);
                let link = ToPeer { socket, peer };
                if let Err(error) = window.send(&link, &Written { reader, blksize }, &header, *blocks.start(), *blocks.end()).await {
                    warn!(client = %key, %error, "cannot read the upload back for its copy");
                }
            }
            Send::Nothing | Send::GiveUp => {}
        }
    }

    fn arm_link(&mut self, key: SessionKey, peer: SocketAddr) {
        let deadline = match self.sessions.get(key) {
            Some(Session { kind: Kind::Write(Upload { replica: Some(r), .. }), .. }) if r.link.peer == peer => r.link.deadline(),
            _ => self.pushes.get(&(key, peer)).and_then(Push::deadline),
        };
        match deadline {
            Some(at) => self.link_timers.schedule((key, peer), at),
            None => self.link_timers.cancel(&(key, peer)),
        }
    }

    /// Links whose answer is late.
    pub(super) async fn expire_links(&mut self) {
        let now = Instant::now();
        while let Some((key, peer)) = self.link_timers.pop_expired(now) {
            let send = match self.sessions.get_mut(key) {
                Some(Session { kind: Kind::Write(Upload { replica: Some(r), .. }), .. }) if r.link.peer == peer => r.link.on_timeout(now),
                _ => match self.pushes.get_mut(&(key, peer)) {
                    Some(push) => push.on_timeout(now),
                    None => continue,
                },
            };
            self.send_link(key, peer, send).await;
        }
    }

    /// `peer` did not answer `key`'s link, or refused it (`refused`).
    async fn link_lost(&mut self, key: SessionKey, peer: SocketAddr, refused: Option<Refusal>) {
        self.link_timers.cancel(&(key, peer));
        if let Some(push) = self.pushes.get_mut(&(key, peer)) {
            if refused.is_none()
                && let Some(at) = push.restart_later(Instant::now())
            {
                info!(client = %key, %peer, file = push.filename, restarts = push.restarts, "a peer did not answer the finished upload's copy: it is sent again later");
                self.link_timers.schedule((key, peer), at);
                return;
            }
            self.pushes.remove(&(key, peer));
            warn!(client = %key, %peer, refused = refused.map(|r| r.message), "a peer did not take the finished upload");
            return;
        }
        let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key) else { return };
        if upload.replica.as_ref().is_none_or(|r| r.link.peer != peer) {
            return;
        }
        upload.replica = None;
        upload.replica_tries += 1;
        let tries = upload.replica_tries;
        match &refused {
            // A peer that refused is never asked again for this upload.
            Some(_) => upload.excluded.push(peer),
            // One that did not answer may only be slow (a loaded machine): it is asked again,
            // after the others, until the tries run out.
            None => {
                self.silent_peers.insert(peer, Instant::now());
            }
        }
        if let Some(refusal) = refused.filter(|r| ends_the_upload(r.code)) {
            warn!(client = %key, %peer, reason = refusal.message, "the upload's replica refused it");
            return self.fail_upload(key, &refusal).await;
        }
        warn!(client = %key, %peer, tries, "the upload's replica is gone: another one is chosen");
        if tries > REPLICA_TRIES || !self.start_replica(key, Instant::now()).await {
            self.fail_upload(key, &NO_REPLICA).await;
        }
    }

    /// The client of `key`'s upload is quiet: the replica gets its last block again. A copy
    /// answers it as a repeat; a replica that a balancer made the upload's server (this backend
    /// was declared dead, wrongly) answers `TAKEN_OVER`, and this backend lets the upload go.
    pub(super) async fn probe_replica(&mut self, key: SessionKey) {
        let Some(Session { kind: Kind::Write(Upload { replica: Some(r), .. }), .. }) = self.sessions.get(key) else { return };
        let (peer, block) = (r.link.peer, r.link.acked());
        if block == 0 {
            return;
        }
        self.emit_link(key, peer, &Send::Blocks(block..=block)).await;
    }

    /// Ends `key`'s upload with `refusal` to its client; its copy is dropped too.
    /// A file already moved into place here is taken back (the replica refused it: that name
    /// holds another upload there), so nothing of a failed upload stays under its name.
    pub(super) async fn fail_upload(&mut self, key: SessionKey, refusal: &Refusal) {
        if let Some(session) = self.forget(key) {
            if let Kind::Write(upload) = &session.kind {
                if let Some(r) = &upload.replica {
                    self.abort_copy(&session.header, r.link.peer).await;
                }
                if matches!(upload.held, Some((_, true))) {
                    retract(upload.transfer.target(), &upload.reader);
                }
            }
            self.refuse(&session.header, session.lb, refusal).await;
        }
    }

    /// Tells `peer` to drop its copy of the session of `header`.
    pub(super) async fn abort_copy(&mut self, header: &SteeringHeader, peer: SocketAddr) {
        self.link_timers.cancel(&(SessionKey::of(header), peer));
        let mut h = *header;
        h.flags = FLAG_REPLICA;
        self.send_repr(&h, &Repr::Error { code: ErrorCode::NotDefined, message: "upload ended" }, peer).await;
    }

    /// Acknowledges to the client what the replica allows: the held acknowledgement, once the
    /// replica has its block; after the last one, the upload is over and goes to the others.
    pub(super) async fn acknowledge(&mut self, key: SessionKey) {
        let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key) else { return };
        let Some((block, last)) = upload.held.filter(|_| !upload.committing) else { return };
        if !replica::may_acknowledge(block, upload.replica.as_ref().map(|r| (&r.link, r.caught_up))) {
            return;
        }
        upload.held = None;
        let first = block == 0;
        let oack = upload.transfer.oack_first();
        if first {
            upload.transfer.start(Instant::now());
        }
        let wire = (block & 0xffff) as u16;
        if first && oack {
            let options = self.sessions.get(key).map(Session::oack).unwrap_or_default();
            self.send_tftp(key, &Repr::Oack { options }, 0).await;
        } else {
            self.send_tftp(key, &Repr::Ack { block: wire }, block).await;
        }
        if last {
            self.landed(key).await;
        } else {
            self.arm(key);
        }
    }

    /// The upload of `key` is in place here and on its replica, and the client has its last
    /// acknowledgement: the balancer forgets it, the peers that lack it get it.
    async fn landed(&mut self, key: SessionKey) {
        let Some(session) = self.forget(key) else { return };
        self.finished(&session.header, session.lb).await;
        let Kind::Write(upload) = session.kind else { return };
        let mut holders = upload.excluded.clone();
        // A replica still catching up (a new one after a takeover, when the rest of the upload
        // came faster than its copy of the start) holds part of the file: it gets the push too,
        // whose request replaces its copy, or its temporary would be all it ever had.
        if let Some(r) = upload.replica.as_ref().filter(|r| r.link.complete()) {
            holders.push(r.link.peer);
        }
        info!(client = %key, file = upload.filename, "upload landed");
        let file = Finished { filename: &upload.filename, blksize: upload.transfer.blksize, reader: &upload.reader, last: upload.transfer.received() };
        self.push_everywhere(key, &session.header, &file, &holders).await;
    }

    /// Sends the finished `file` to every peer not in `skip`.
    async fn push_everywhere(&mut self, key: SessionKey, header: &SteeringHeader, file: &Finished<'_>, skip: &[SocketAddr]) {
        let now = Instant::now();
        for peer in self.peers.clone() {
            if skip.contains(&peer) {
                continue;
            }
            let Ok(reader) = file.reader.try_clone() else { continue };
            let mut template = *header;
            template.set_upload_replica(None);
            let (push, send) = Push::new(peer, template, file, reader, now);
            self.pushes.insert((key, peer), push);
            self.send_link(key, peer, send).await;
        }
    }

    /// A replication datagram from a peer (`--peer`).
    pub(super) async fn replication(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(header) = steering_header(datagram) else { return };
        let key = SessionKey::of(&header);
        let packet = Packet::parse(tftp_packet(datagram));
        if header.has_flag(FLAG_FROM_BACKEND) {
            // An answer to one of this backend's links.
            match packet {
                Ok(Repr::Ack { .. }) => self.link_ack(key, from, header.block()).await,
                Ok(Repr::Error { message, .. }) if message == TAKEN_OVER => {
                    if matches!(self.sessions.get(key), Some(Session { kind: Kind::Write(Upload { replica: Some(r), .. }), .. }) if r.link.peer == from) {
                        warn!(client = %key, peer = %from, "the upload's replica serves it now (a balancer moved it): dropped here");
                        self.forget(key);
                    }
                }
                Ok(Repr::Error { code, message }) => {
                    debug!(client = %key, %from, ?code, message, "a peer refused a copy");
                    let refusal = Refusal { code, message: if ends_the_upload(code) { refusal_text(code) } else { "refused" } };
                    self.link_lost(key, from, Some(refusal)).await;
                }
                _ => debug!(client = %key, %from, "unexpected replication answer"),
            }
            return;
        }
        match packet {
            Ok(Repr::Wrq { filename, options, .. }) => self.open_copy(key, &header, filename, &options, from).await,
            Ok(Repr::Data { block, data }) => self.copy_data(key, &header, block, data, from).await,
            Ok(Repr::Error { .. }) => {
                if let Some(Session { kind: Kind::Replica(c), .. }) = self.sessions.get(key)
                    && c.primary == from
                {
                    debug!(client = %key, landed = c.landed, "the primary ended the upload: its copy goes");
                    if c.landed {
                        retract(c.transfer.target(), &c.reader);
                    }
                    self.forget(key);
                }
            }
            _ => debug!(client = %key, %from, "unexpected replication datagram"),
        }
    }

    async fn link_ack(&mut self, key: SessionKey, from: SocketAddr, block: u32) {
        let now = Instant::now();
        self.silent_peers.remove(&from);
        let send = match self.sessions.get_mut(key) {
            Some(Session { kind: Kind::Write(upload), header, .. }) if upload.replica.as_ref().is_some_and(|r| r.link.peer == from) => {
                upload.replica_tries = 0;
                let received = upload.transfer.received();
                let have = copyable(upload);
                let Some(r) = upload.replica.as_mut() else { return };
                let mut send = r.link.on_ack(block, now);
                if send == Send::Nothing {
                    send = r.link.available(have, None, now);
                }
                let address = replica_address(from);
                if r.link.opened() && r.link.acked() >= received && header.replica() != Some(address) {
                    r.caught_up = true;
                    // From now on a balancer may move the upload there.
                    header.set_upload_replica(Some(address));
                    debug!(client = %key, peer = %from, block = received, "the upload's replica holds every acknowledged block");
                }
                send
            }
            _ => match self.pushes.get_mut(&(key, from)) {
                Some(push) => {
                    let send = push.on_ack(block, now);
                    if push.link.complete() {
                        info!(client = %key, peer = %from, file = push.filename, "finished upload copied");
                        self.pushes.remove(&(key, from));
                        self.link_timers.cancel(&(key, from));
                        return;
                    }
                    send
                }
                None => return,
            },
        };
        self.send_link(key, from, send).await;
        if let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key)
            && upload.replica_commits_first
            && upload.replica.as_ref().is_some_and(|r| r.link.complete())
        {
            upload.replica_commits_first = false;
            return self.commit(key);
        }
        self.acknowledge(key).await;
    }

    /// The last block of `key`'s upload is written. Of the two backends that hold the upload,
    /// the one with the lower address moves its file into place first, then the other: two
    /// uploads of one name at once then meet at one backend first whichever pairs they have,
    /// so exactly one of them wins (with each moving into place first where it was written,
    /// two crossed pairs would both find the name taken at their second). A replica that goes
    /// first and then the primary fails takes its file back (`RETRACT`).
    pub(super) async fn complete(&mut self, key: SessionKey) {
        let own = self.socket.local_addr().ok();
        let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key) else { return };
        let received = upload.transfer.received();
        match upload.replica.as_mut() {
            Some(replica) if replica.caught_up && own.is_some_and(|own| replica.link.peer < own) => {
                upload.replica_commits_first = true;
                let peer = replica.link.peer;
                let send = replica.link.available(received, Some(received), Instant::now());
                self.send_link(key, peer, send).await;
            }
            _ => self.commit(key),
        }
    }

    /// The primary `from` opens a copy of `key`'s upload here.
    async fn open_copy(&mut self, key: SessionKey, header: &SteeringHeader, filename: &str, options: &Options, from: SocketAddr) {
        if let Some(Session { kind: Kind::Replica(copy), .. }) = self.sessions.get(key)
            && copy.primary == from
            && copy.transfer.received() == 0
        {
            // A repeated request: its answer was lost.
            return self.answer_copy(key, 0).await;
        }
        self.forget(key);
        // A push (its request announces the size) is an upload that won on its two backends:
        // it replaces what it finds, a racing upload's file that the loser takes back (by its
        // inode, so never the push's) or none; a live copy finds the name taken like any
        // upload, which decides a race of two uploads.
        let mut config = self.config.clone();
        config.allow_overwrite |= options.tsize.is_some();
        match service::open_write(&self.root, &config, filename, Mode::Octet, options) {
            Ok((mut transfer, negotiated)) if options.blksize.is_none_or(|b| b == u32::from(negotiated.blksize)) => {
                // Its primary hears of every block.
                transfer.set_windowsize(1);
                let Ok(reader) = transfer.reader() else {
                    return self.refuse_copy(header, from, ErrorCode::NotDefined, "cannot read the copy back").await;
                };
                let context = Context { mode: Mode::Octet, negotiated, path_hash: [0; 8], digest: [0; 16], size: 0 };
                transfer.defer_commit();
                let copy = Copy { transfer, filename: filename.to_owned(), primary: from, landed: false, committing: false, answered: 0, reader };
                self.insert(key, *header, &context, Kind::Replica(copy), from, None);
                debug!(client = %key, file = filename, primary = %from, "keeping a copy");
                self.timers.schedule(key, Instant::now() + COPY_IDLE);
                self.answer_copy(key, 0).await;
            }
            Ok(_) => self.refuse_copy(header, from, ErrorCode::OptionRefused, "block size beyond this server's limits").await,
            Err(refusal) => self.refuse_copy(header, from, refusal.code, refusal.message).await,
        }
    }

    async fn copy_data(&mut self, key: SessionKey, header: &SteeringHeader, block: u16, data: &[u8], from: SocketAddr) {
        let copy = match self.sessions.get_mut(key) {
            Some(Session { kind: Kind::Replica(copy), .. }) => copy,
            // This copy became the upload (a balancer sent the client here): the old primary,
            // alive after all, is told so and lets it go.
            Some(Session { kind: Kind::Write(_), .. }) => return self.refuse_copy(header, from, ErrorCode::UnknownTransferId, TAKEN_OVER).await,
            _ => return self.refuse_copy(header, from, ErrorCode::UnknownTransferId, "no copy of this upload here").await,
        };
        if copy.committing {
            // Its answer comes once the file is durable and in place.
            return;
        }
        if copy.primary != from || copy.landed {
            let received = copy.transfer.received();
            return self.answer_copy(key, received).await;
        }
        let before = copy.transfer.received();
        let next = copy.transfer.on_data(block, data, Instant::now());
        self.timers.schedule(key, Instant::now() + COPY_IDLE);
        let received = copy.transfer.received();
        match next {
            WriteNext::Fail(code, message) => {
                self.forget(key);
                self.refuse_copy(header, from, code, message).await;
            }
            WriteNext::Complete(_) => self.commit(key),
            _ if replica::copy_answers(received, copy.answered, header.windowsize(), received == before) => self.acks_due.push(key),
            _ => {}
        }
    }

    /// Sends the replicas the blocks and the primaries the ACKs of what came in the burst of
    /// datagrams just read: once per burst, not per datagram.
    pub(super) async fn flush_replication(&mut self) {
        let mut copies = std::mem::take(&mut self.copies_due);
        copies.sort_unstable();
        copies.dedup();
        for &key in &copies {
            self.replicate_data(key).await;
        }
        copies.clear();
        self.copies_due = copies;
        let mut acks = std::mem::take(&mut self.acks_due);
        acks.sort_unstable();
        acks.dedup();
        for key in acks {
            // A copy whose last block came in the burst answers only once it is in place.
            if let Some(Session { kind: Kind::Replica(copy), .. }) = self.sessions.get(key)
                && !copy.committing
            {
                let received = copy.transfer.received();
                self.answer_copy(key, received).await;
            }
        }
    }

    /// The fsync and rename of `key`'s upload or copy ran, with `result`.
    pub(super) async fn committed(&mut self, key: SessionKey, result: Result<(), (ErrorCode, &'static str)>) {
        let now = Instant::now();
        match self.sessions.get_mut(key) {
            Some(Session { kind: Kind::Write(upload), .. }) => {
                upload.committing = false;
                if let Err((code, message)) = result {
                    return self.fail_upload(key, &Refusal { code, message }).await;
                }
                let received = upload.transfer.received();
                upload.held = Some((received, true));
                if let Some(replica) = upload.replica.as_mut() {
                    let peer = replica.link.peer;
                    let send = replica.link.available(received, Some(received), now);
                    self.send_link(key, peer, send).await;
                }
                self.acknowledge(key).await;
            }
            Some(Session { kind: Kind::Replica(copy), header, .. }) => {
                copy.committing = false;
                match result {
                    Ok(()) => {
                        copy.landed = true;
                        debug!(client = %key, file = copy.filename, "copy landed");
                        let received = copy.transfer.received();
                        self.answer_copy(key, received).await;
                    }
                    Err((code, message)) => {
                        let (header, primary) = (*header, copy.primary);
                        self.forget(key);
                        self.refuse_copy(&header, primary, code, message).await;
                    }
                }
            }
            // Gone meanwhile (its client or primary gave up): what ran stays as it ran.
            _ => debug!(client = %key, ok = result.is_ok(), "commit of a finished session"),
        }
    }

    /// ACKs `block` of `key`'s copy to its primary.
    async fn answer_copy(&mut self, key: SessionKey, block: u32) {
        let Some(Session { kind: Kind::Replica(copy), header, .. }) = self.sessions.get_mut(key) else { return };
        copy.answered = copy.answered.max(block);
        let primary = copy.primary;
        let mut h = reply(header, FLAG_REPLICA);
        h.set_block(block);
        self.send_repr(&h, &Repr::Ack { block: (block & 0xffff) as u16 }, primary).await;
    }

    async fn refuse_copy(&mut self, header: &SteeringHeader, to: SocketAddr, code: ErrorCode, message: &str) {
        debug!(client = %SessionKey::of(header), %to, message, "copy refused");
        self.send_repr(&reply(header, FLAG_REPLICA), &Repr::Error { code, message }, to).await;
    }

    async fn send_repr(&mut self, header: &SteeringHeader, repr: &Repr<'_>, to: SocketAddr) {
        let mut out = [0u8; HEADER + 600];
        out[..HEADER].copy_from_slice(bytemuck::bytes_of(header));
        let end = service::emit_at(repr, &mut out, HEADER);
        if let Err(error) = self.socket.send_to(&out[..end], to).await {
            debug!(%error, %to, "replication send failed");
        }
    }

    /// A balancer sends the client's packets of `key`'s upload here: its primary is gone and
    /// this backend serves it from now on, with a replica of its own (`Action::AckToUpload` or
    /// `Action::HandedData` then answers the datagram); a copy that had landed
    /// answers the client's last block and goes to the other peers.
    pub(super) async fn promote(&mut self, key: SessionKey, header: &SteeringHeader, from: SocketAddr) {
        let Some(session) = self.forget(key) else { return };
        let Kind::Replica(copy) = session.kind else { return };
        let Copy { mut transfer, filename, primary, landed, reader, .. } = copy;
        info!(client = %key, file = filename, %primary, block = transfer.received(), landed, "taking the upload over from its primary");
        transfer.set_windowsize(header.windowsize());
        let mut template = *header;
        template.set_upload_replica(None);
        let last = transfer.received();
        let blksize = transfer.blksize;
        let upload = Upload { transfer, filename, replica: None, excluded: vec![primary], replica_tries: 0, held: None, committing: false, replica_commits_first: false, reader };
        self.sessions.insert(key, Session { kind: Kind::Write(upload), header: template, lb: from, requested: None });
        if landed {
            self.send_tftp(key, &Repr::Ack { block: (last & 0xffff) as u16 }, last).await;
            let Some(session) = self.forget(key) else { return };
            self.finished(&session.header, from).await;
            if let Kind::Write(upload) = &session.kind {
                let file = Finished { filename: &upload.filename, blksize, reader: &upload.reader, last };
                self.push_everywhere(key, &session.header, &file, &[primary]).await;
            }
            return;
        }
        // The datagram is decided again: a nudge is answered with the last acknowledgement, DATA
        // with its own.
        self.arm(key);
        if !self.start_replica(key, Instant::now()).await {
            warn!(client = %key, "no peer left for a new replica: the upload goes on with one copy");
        }
    }
}

/// Removes the file at `target` if it is still the one `reader` reads (same inode): a failed
/// upload's, not one that replaced it since.
fn retract(target: &std::path::Path, reader: &std::fs::File) {
    use std::os::unix::fs::MetadataExt as _;
    let ours = reader.metadata().map(|m| m.ino());
    if std::fs::metadata(target).map(|m| m.ino()).ok() == ours.ok() && std::fs::remove_file(target).is_ok() {
        warn!(file = %target.display(), "a failed upload taken back from its place");
    }
}

/// The blocks of `upload` its replica may have now: all that came, but the last one only once
/// this backend's commit ran when it moves the file into place first (`complete`). A replica
/// given the last block earlier would commit meanwhile, out of the order that settles two
/// uploads of one name, and, silent through its fsync while the link does not know that block
/// is the last, be given up as dead.
fn copyable(upload: &Upload) -> u32 {
    let received = upload.transfer.received();
    if upload.committing { received.saturating_sub(1) } else { received }
}

/// The replica field of a header for the peer at `address`.
fn replica_address(address: SocketAddr) -> ([u8; 4], [u8; 2]) {
    match address {
        SocketAddr::V4(v4) => (v4.ip().octets(), v4.port().to_be_bytes()),
        SocketAddr::V6(v6) => (v6.ip().to_ipv4_mapped().map_or([0; 4], |ip| ip.octets()), v6.port().to_be_bytes()),
    }
}

fn refusal_text(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::DiskFull => crate::transfer::NO_ROOM,
        _ => "file already exists",
    }
}

/// An upload's file as far as it is written, read back for a copy: every block up to the
/// link's `have` is whole but the upload's last.
struct Written<'a> {
    reader: &'a std::fs::File,
    blksize: u16,
}

impl Blocks for Written<'_> {
    fn blksize(&self) -> u16 {
        self.blksize
    }

    fn read_blocks(&self, first: u32, count: u32, buf: &mut [u8]) -> std::io::Result<usize> {
        let offset = u64::from(first.saturating_sub(1)) * u64::from(self.blksize);
        let want = (count as usize * usize::from(self.blksize)).min(buf.len());
        crate::transfer::read_up_to(self.reader, &mut buf[..want], offset)
    }
}

/// Replication datagrams go straight to the peer; one the kernel refuses is skipped (the
/// link's timer sends it again).
struct ToPeer<'s> {
    socket: &'s tokio::net::UdpSocket,
    peer: SocketAddr,
}

impl window::Link for ToPeer<'_> {
    fn try_send<'a>(&self, batch: &mut SendBatch, _segment: usize, datagrams: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> std::io::Result<usize> {
        self.socket.try_io(Interest::WRITABLE, || batch.send_to(self.socket.as_fd(), self.peer, datagrams))
    }

    async fn ready(&self) -> std::io::Result<()> {
        self.socket.writable().await
    }

    fn failed(&self, error: std::io::Error) -> std::io::Result<()> {
        debug!(%error, peer = %self.peer, "replication send failed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Blocks as _, Written, replica_address};

    #[test]
    fn an_upload_is_read_back_by_blocks_as_far_as_it_is_written() {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let written = Written { reader: &file, blksize: 1000 };
        let mut buf = vec![0u8; 4000];
        // Blocks 2 and 3: one whole, then the short last one.
        assert_eq!(written.read_blocks(2, 2, &mut buf).unwrap(), 1500);
        assert_eq!(&buf[..1500], &data[1000..]);
        // No more than the blocks asked for, nor than the buffer holds.
        assert_eq!(written.read_blocks(1, 1, &mut buf).unwrap(), 1000);
        assert_eq!(written.read_blocks(1, 3, &mut buf[..1200]).unwrap(), 1200);
        assert_eq!(&buf[..1200], &data[..1200]);
        // Past the end: nothing.
        assert_eq!(written.read_blocks(4, 1, &mut buf).unwrap(), 0);
    }

    #[test]
    fn a_peer_address_becomes_the_headers_replica_field() {
        assert_eq!(replica_address("10.77.0.12:6969".parse().unwrap()), ([10, 77, 0, 12], 6969u16.to_be_bytes()));
        assert_eq!(replica_address("[::ffff:10.77.0.13]:7000".parse().unwrap()), ([10, 77, 0, 13], 7000u16.to_be_bytes()));
    }
}
