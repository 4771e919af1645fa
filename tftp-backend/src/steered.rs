//! Steered mode: one UDP socket receives packets from load balancers, each a steering header
//! followed by a TFTP packet. Sessions are keyed by the client key in the header, and are only
//! a cache: an ACK for a session this backend never saw is served from the header alone.
//! One event loop, one timer queue, buffers reused for every packet. DATA leaves a window at a
//! time through the sender both modes share (`window.rs`), each block after its steering
//! header: one file read and one sendmmsg(2) for up to a window, or with `--segment-offload`
//! one UDP_SEGMENT send (`batch.rs`).
//!
//! Every datagram with a valid steering header gets at least one answer, because the LB's
//! watchdog counts unanswered packets: DATA, OACK, ACK, ERROR, a header-only `FINISHED` when
//! the transfer is over, or a header-only `HEARD` when the datagram asks for nothing now (a
//! duplicate or stale ACK, a repeated request, a request waiting for its file's digest). So a
//! client that repeats itself, however fast, never makes a live backend look dead.

use std::{collections::HashMap, fs::File, io, net::SocketAddr, os::fd::AsFd as _, time::Instant};

use anyhow::Context as _;
use tokio::{io::Interest, net::UdpSocket, sync::mpsc};
use tracing::{debug, info, warn};
use xdp_lb_common::{
    SteeringHeader,
    steering::{FLAG_FINISHED, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_NUDGE},
};

use crate::{
    alarm::Alarm,
    allowed::AllowedBalancers,
    batch::SendBatch,
    completed::{self, Completed},
    files::{self, FileId, Refusal, Root},
    rto::{Budget, RttEstimate},
    service::{self, Config, Context},
    timer::TimerQueue,
    transfer::{Next, ReadTransfer, WriteNext, WriteTransfer},
    window::{Link, WindowSender},
    wire::{ErrorCode, MAX_PACKET, Packet, Repr},
};

/// Client IPv4, client port, VIP port: the session's name in every header.
type Key = ([u8; 4], [u8; 2], [u8; 2]);

const HEADER: usize = SteeringHeader::LEN;

/// Most bytes of DATA read and sent in one batch: a window of 16 blocks of 1468 bytes, and at
/// least one block of the largest size.
const BATCH_BYTES: usize = 64 << 10;
/// Most datagrams per sendmmsg or UDP_SEGMENT send.
const BATCH_BLOCKS: usize = 64;
/// Most queued datagrams read before expired timers are handled.
const QUEUED_FIRST: usize = 4096;

enum Kind {
    Read(ReadTransfer),
    Write(WriteTransfer),
}

struct Session {
    kind: Kind,
    /// Template for replies: client key, VIP, and the transfer context.
    header: SteeringHeader,
    /// Where replies go: the LB that sent the latest packet of this session.
    lb: SocketAddr,
}

/// A datagram set aside until its file's digest is computed.
type Deferred = (Vec<u8>, SocketAddr);

pub struct Steered {
    socket: UdpSocket,
    root: Root,
    config: Config,
    sessions: HashMap<Key, Session>,
    timers: TimerQueue<Key>,
    out: Vec<u8>,
    /// Every session's windows: one buffer read as each batch is sent.
    window: WindowSender<SteeringHeader>,
    /// `--segment-offload`: windows may leave as UDP_SEGMENT super-packets (see `send_blocks`).
    segment_offload: bool,
    /// Datagrams waiting for a digest being computed off the loop, by file.
    waiting: HashMap<FileId, Vec<Deferred>>,
    digested: (mpsc::UnboundedSender<FileId>, mpsc::UnboundedReceiver<FileId>),
    /// Downloads that ended here with the client's last ACK (see `completed.rs`).
    completed: Completed<Key>,
    /// Datagrams sent so far: a datagram whose handling sent none is answered `HEARD`.
    replies: u64,
    /// Timer-driven retransmissions left to this backend (`--retransmit-budget`).
    budget: Budget,
    /// The balancers this backend takes steering datagrams from (`--lb`).
    allowed: AllowedBalancers,
}

/// DATA goes to the balancer that sent the session's latest packet, on the one steering
/// socket. A datagram the kernel refuses is skipped, as a failed `send_to` would be: the
/// transfer's retransmission repairs it.
struct ToBalancer<'s> {
    socket: &'s UdpSocket,
    lb: SocketAddr,
}

impl Link for ToBalancer<'_> {
    fn try_send<'a>(&self, batch: &mut SendBatch, _segment: usize, datagrams: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> io::Result<usize> {
        // `send_to` takes the segment size from the first datagram. Through `try_io`, so that a
        // full buffer clears the socket's readiness and `ready` waits for the kernel.
        self.socket.try_io(Interest::WRITABLE, || batch.send_to(self.socket.as_fd(), self.lb, datagrams))
    }

    async fn ready(&self) -> io::Result<()> {
        self.socket.writable().await
    }

    fn failed(&self, error: io::Error) -> io::Result<()> {
        debug!(%error, "send failed");
        Ok(())
    }
}

impl Steered {
    /// `segment_offload`: send windows as UDP_SEGMENT super-packets (`--segment-offload`);
    /// `allowed`: who may send steering datagrams (`--lb`).
    #[must_use]
    pub fn new(socket: UdpSocket, root: Root, config: Config, segment_offload: bool, allowed: AllowedBalancers) -> Self {
        let budget = Budget::new(config.retransmit_budget, Instant::now());
        Self {
            socket,
            root,
            config,
            sessions: HashMap::new(),
            timers: TimerQueue::new(),
            out: vec![0; HEADER + MAX_PACKET],
            window: WindowSender::shared(BATCH_BYTES.max(MAX_PACKET), BATCH_BLOCKS),
            segment_offload,
            waiting: HashMap::new(),
            digested: mpsc::unbounded_channel(),
            completed: Completed::new(completed::REMEMBER_FOR, completed::CAPACITY),
            replies: 0,
            budget,
            allowed,
        }
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut buf = vec![0u8; HEADER + MAX_PACKET];
        let mut alarm = Alarm::new().context("creating the retransmission timer")?;
        loop {
            let deadline = self.timers.next_deadline();
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let (len, from) = received.context("receiving from the steering socket")?;
                    self.receive(&buf[..len], from).await;
                }
                Some(id) = self.digested.1.recv() => {
                    for (datagram, from) in self.waiting.remove(&id).unwrap_or_default() {
                        self.datagram(&datagram, from).await;
                    }
                }
                rang = until(&mut alarm, deadline) => {
                    rang.context("waiting for the retransmission timer")?;
                    // Input already queued comes first: under load an ACK waits in the receive
                    // queue past its transfer's timer, and a resend then repairs nothing (a
                    // second OACK makes atftp abort). A timer that fired while the answer was
                    // waiting is no loss.
                    for _ in 0..QUEUED_FIRST {
                        let Ok((len, from)) = self.socket.try_recv_from(&mut buf) else { break };
                        self.receive(&buf[..len], from).await;
                    }
                    self.expire().await;
                }
            }
        }
    }

    async fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        // Before anything reads the header: a forged one could make this backend look a file
        // up, hash it, and stream it to the sender.
        if let Err(report) = self.allowed.check(from, Instant::now()) {
            if let Some(r) = report {
                warn!(from = %r.from, dropped = r.since_last, total = r.total, "dropped steering datagrams from a sender not named by --lb");
            }
            return;
        }
        if self.defer_until_digested(datagram, from) {
            // Its real answer comes once the digest is known, perhaps seconds later (a deferred
            // datagram has a valid header: `file_to_digest` parsed it).
            if let Some(header) = steering_header(datagram) {
                self.heard(&header, from).await;
            }
        } else {
            self.datagram(datagram, from).await;
        }
    }

    /// A request, or an ACK to resume, for a file whose digest is not cached yet waits while a
    /// blocking thread hashes the file: hashing a large file here would stall every other
    /// transfer and the heartbeats (the balancers would call this backend dead). Returns
    /// whether the datagram was set aside.
    fn defer_until_digested(&mut self, datagram: &[u8], from: SocketAddr) -> bool {
        let Some(file) = self.file_to_digest(datagram) else { return false };
        let Ok(id) = files::file_id(&file) else { return false };
        let waiting = self.waiting.entry(id).or_default();
        waiting.push((datagram.to_vec(), from));
        if waiting.len() == 1 {
            let (cache, done) = (self.root.digest_cache(), self.digested.0.clone());
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

    /// The file a datagram needs the digest of, if that digest is not cached.
    fn file_to_digest(&mut self, datagram: &[u8]) -> Option<File> {
        let header = steering_header(datagram)?;
        if !header.has_magic() || header.has_flag(FLAG_FROM_BACKEND | FLAG_HEARTBEAT) {
            return None;
        }
        let relative = match Packet::parse(&datagram[HEADER..]).ok()? {
            Repr::Rrq { filename, .. } => Root::relative(filename).ok()?,
            Repr::Ack { .. } if header.has_flag(FLAG_HAS_CONTEXT) => {
                let key = (header.client_ip, header.client_port, header.vip_port);
                if self.sessions.contains_key(&key) {
                    return None;
                }
                self.root.find_by_hash(header.path_hash)?
            }
            _ => return None,
        };
        let (file, _) = self.root.open_read(&relative).ok()?;
        self.root.cached_digest(&file).is_none().then_some(file)
    }

    async fn datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(header) = steering_header(datagram) else {
            debug!(%from, len = datagram.len(), "dropped: no steering header");
            return;
        };
        if !header.has_magic() || header.has_flag(FLAG_FROM_BACKEND) {
            debug!(%from, "dropped: bad steering header");
            return;
        }
        if header.has_flag(FLAG_HEARTBEAT) {
            let mut echo = header;
            echo.flags = FLAG_FROM_BACKEND | FLAG_HEARTBEAT;
            self.send_header(&echo, from).await;
            return;
        }
        let key = (header.client_ip, header.client_port, header.vip_port);
        let replies = self.replies;
        match Packet::parse(&datagram[HEADER..]) {
            Ok(repr) => self.tftp(key, header, repr, from).await,
            Err(error) => {
                debug!(%from, %error, "malformed TFTP packet");
                self.refuse(key, &header, from, &Refusal { code: ErrorCode::IllegalOperation, message: "malformed packet" }).await;
            }
        }
        if self.replies == replies {
            self.heard(&header, from).await;
        }
    }

    /// Tells the balancer that sent a datagram with `header` it was read and needs no reply now.
    async fn heard(&mut self, header: &SteeringHeader, from: SocketAddr) {
        let mut reply = *header;
        reply.flags = FLAG_FROM_BACKEND | FLAG_HEARD;
        self.send_header(&reply, from).await;
    }

    async fn tftp(&mut self, key: Key, header: SteeringHeader, repr: Repr<'_>, from: SocketAddr) {
        match repr {
            Repr::Rrq { filename, mode, options } => {
                if self.duplicate_request(key, filename) {
                    // A repeated or duplicated RRQ while the first one's OACK or DATA 1 is
                    // outstanding: a second OACK from the same TID makes clients abort, so
                    // only a repeat well after the OACK (lost, then) gets it again.
                    let next = match self.sessions.get_mut(&key) {
                        Some(Session { kind: Kind::Read(transfer), .. }) => transfer.on_repeated_request(Instant::now()),
                        _ => Next::Nothing,
                    };
                    debug!(client = ?key.0, port = u16::from_be_bytes(key.1), file = filename, ?next, "repeated request");
                    self.read_next(key, next).await;
                    return;
                }
                self.forget(key);
                if self.busy() {
                    self.refuse(key, &header, from, &service::BUSY).await;
                    return;
                }
                match service::open_read_with_context(&mut self.root, &self.config, filename, mode, &options) {
                    Ok((mut transfer, context)) => {
                        info!(client = ?key.0, port = u16::from_be_bytes(key.1), file = filename, "read");
                        let first = transfer.start(Instant::now());
                        self.insert(key, header, &context, Kind::Read(transfer), from);
                        self.read_next(key, first).await;
                    }
                    Err(refusal) => self.refuse(key, &header, from, &refusal).await,
                }
            }
            Repr::Wrq { filename, mode, options } => {
                self.forget(key);
                if self.busy() {
                    self.refuse(key, &header, from, &service::BUSY).await;
                    return;
                }
                match service::open_write(&self.root, &self.config, filename, mode, &options) {
                    Ok((transfer, negotiated)) => {
                        info!(client = ?key.0, file = filename, "write");
                        let context = Context { mode, negotiated, path_hash: [0; 8], digest: [0; 16], size: 0 };
                        self.insert(key, header, &context, Kind::Write(transfer), from);
                        if negotiated.oack.is_empty() {
                            self.send_tftp(key, &Repr::Ack { block: 0 }, 0).await;
                        } else {
                            self.send_tftp(key, &Repr::Oack { options: negotiated.oack }, 0).await;
                        }
                        if let Some(Session { kind: Kind::Write(transfer), .. }) = self.sessions.get_mut(&key) {
                            transfer.start(Instant::now());
                        }
                        self.arm(key);
                    }
                    Err(refusal) => self.refuse(key, &header, from, &refusal).await,
                }
            }
            Repr::Ack { block } => self.ack(key, header, block, from).await,
            Repr::Data { block, data } => self.data(key, &header, block, data, from).await,
            Repr::Error { code, message } => {
                debug!(client = ?key.0, ?code, message, "client aborted");
                self.forget(key);
                self.finished(&header, from).await;
            }
            Repr::Oack { .. } => {
                let refusal = Refusal { code: ErrorCode::IllegalOperation, message: "unexpected OACK" };
                self.refuse(key, &header, from, &refusal).await;
            }
        }
    }

    /// Whether an RRQ repeats the request of a read from the same client that has not
    /// progressed past its first answer.
    fn duplicate_request(&self, key: Key, filename: &str) -> bool {
        let Some(session) = self.sessions.get(&key) else { return false };
        let Kind::Read(transfer) = &session.kind else { return false };
        let same_file = Root::relative(filename).is_ok_and(|relative| files::path_hash(&relative) == session.header.path_hash);
        same_file && transfer.acked() == 0
    }

    async fn ack(&mut self, key: Key, header: SteeringHeader, wire: u16, from: SocketAddr) {
        if !self.sessions.contains_key(&key) && self.completed.contains(&key, Instant::now()) {
            // A late final ACK, or a balancer nudging a download that ended here: the client
            // has every block. FINISHED makes the balancer forget the session.
            debug!(client = ?key.0, "ACK for a download that finished here");
            self.finished(&header, from).await;
            return;
        }
        if !self.sessions.contains_key(&key) {
            // Never seen here: continue from the header (the transfer moved to this backend).
            if !header.has_flag(FLAG_HAS_CONTEXT) {
                if header.has_flag(FLAG_NUDGE) {
                    // A balancer that took over asks every backend it may concern; the client
                    // is not waiting on this one.
                    debug!(client = ?key.0, "nudge for a transfer not served here");
                    return;
                }
                let refusal = Refusal { code: ErrorCode::UnknownTransferId, message: "unknown transfer" };
                self.refuse(key, &header, from, &refusal).await;
                return;
            }
            let context = Context::from_header(&header);
            let limits = self.config.limits;
            if context.negotiated.blksize > limits.max_blksize || context.negotiated.windowsize > limits.max_windowsize {
                // Beyond what this server would have negotiated: a forged or foreign header, not
                // a transfer to resume (it could make this server send huge windows).
                let refusal = Refusal { code: ErrorCode::OptionRefused, message: "options beyond this server's limits" };
                self.refuse(key, &header, from, &refusal).await;
                return;
            }
            match service::resume_read(&mut self.root, &self.config, &context, header.block(), RttEstimate::from_wire(header.rtt)) {
                Ok(transfer) => {
                    info!(client = ?key.0, block = header.block(), "resuming a transfer started elsewhere");
                    self.insert(key, header, &context, Kind::Read(transfer), from);
                }
                Err(refusal) => {
                    warn!(client = ?key.0, reason = refusal.message, "cannot resume");
                    self.refuse(key, &header, from, &refusal).await;
                    return;
                }
            }
        }
        let Some(session) = self.sessions.get_mut(&key) else { return };
        session.lb = from;
        let next = match &mut session.kind {
            Kind::Read(transfer) => {
                let block = if header.has_flag(FLAG_NUDGE) && !header.has_flag(FLAG_HAS_CONTEXT) {
                    // A balancer that lacks the context knows nothing of the blocks either:
                    // resend from this server's own state.
                    transfer.acked()
                } else {
                    // The LB's view of what was sent bounds the widening after a move; a
                    // transfer that moved away and back has a stale copy here.
                    if header.has_flag(FLAG_HAS_CONTEXT) {
                        transfer.catch_up(header.block());
                    }
                    xdp_lb_common::steering::expand_block(wire, transfer.sent())
                };
                let next = transfer.on_ack(block, header.has_flag(FLAG_NUDGE), Instant::now());
                debug!(client = ?key.0, port = u16::from_be_bytes(key.1), block, nudge = header.has_flag(FLAG_NUDGE), ?next, wait = ?transfer.wait(), "ack");
                next
            }
            Kind::Write(_) => Next::Nothing,
        };
        self.read_next(key, next).await;
    }

    async fn data(&mut self, key: Key, header: &SteeringHeader, block: u16, data: &[u8], from: SocketAddr) {
        let Some(Session { kind: Kind::Write(transfer), lb, .. }) = self.sessions.get_mut(&key) else {
            let refusal = Refusal { code: ErrorCode::UnknownTransferId, message: "unknown transfer" };
            self.refuse(key, header, from, &refusal).await;
            return;
        };
        *lb = from;
        match transfer.on_data(block, data, Instant::now()) {
            WriteNext::Ack(n) => {
                self.send_tftp(key, &Repr::Ack { block: n }, 0).await;
                self.arm(key);
            }
            WriteNext::Done(n) => {
                self.send_tftp(key, &Repr::Ack { block: n }, 0).await;
                self.forget(key);
                self.finished(header, from).await;
            }
            WriteNext::Nothing => {}
            WriteNext::Fail(code, message) => {
                self.forget(key);
                self.refuse(key, header, from, &Refusal { code, message }).await;
            }
        }
    }

    /// Sends what a read transfer asks for, or ends it.
    async fn read_next(&mut self, key: Key, next: Next) {
        match next {
            Next::Send(blocks) => {
                let (mut first, last) = blocks.into_inner();
                if first == 0 {
                    if !self.send_oack(key).await {
                        return;
                    }
                    first = 1;
                }
                if first <= last && !self.send_blocks(key, first, last).await {
                    return;
                }
                self.arm(key);
            }
            Next::Finished | Next::GiveUp => {
                if matches!(next, Next::Finished) {
                    self.completed.remember(key, Instant::now());
                }
                if let Some(session) = self.forget(key) {
                    self.finished(&session.header, session.lb).await;
                }
            }
            Next::Nothing => {}
        }
    }

    /// Sends the OACK of a read (its block 0); false if the session is gone.
    async fn send_oack(&mut self, key: Key) -> bool {
        let Some(session) = self.sessions.get(&key) else { return false };
        let Kind::Read(transfer) = &session.kind else { return false };
        let mut header = session.header;
        header.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT;
        header.set_block(0);
        header.rtt = transfer.rtt().to_wire();
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&header));
        let end = service::emit_at(&Repr::Oack { options: session_oack(session) }, &mut self.out, HEADER);
        let lb = session.lb;
        self.replies += 1;
        if let Err(error) = self.socket.send_to(&self.out[..end], lb).await {
            debug!(%error, "send failed");
        }
        true
    }

    /// Sends DATA blocks `first..=last` of a read, a batch per file read and per system call;
    /// false if the session is gone (or its file failed, which ends it).
    async fn send_blocks(&mut self, key: Key, first: u32, last: u32) -> bool {
        let Some(session) = self.sessions.get(&key) else { return false };
        let Kind::Read(transfer) = &session.kind else { return false };
        let mut prefix = session.header;
        prefix.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT;
        // The balancer keeps it with the session: a backend that takes the transfer over
        // starts from this estimate, not from the 1 s timeout.
        prefix.rtt = transfer.rtt().to_wire();
        // One super-packet per window saves CPU per block, but the window's first block leaves
        // only once all are built and cut: a lone transfer, bound by its round trip rather than
        // by CPU, loses goodput that way (ARCHITECTURE.md, "Segmentation offload toward the
        // balancer"). So only while other transfers share this backend.
        self.window.segment_send_to(self.segment_offload && self.sessions.len() > 1);
        self.replies += 1;
        let link = ToBalancer { socket: &self.socket, lb: session.lb };
        if let Err(error) = self.window.send(&link, transfer, &prefix, first, last).await {
            warn!(%error, "read failed");
            if let Some(s) = self.forget(key) {
                self.refuse(key, &s.header, s.lb, &Refusal { code: ErrorCode::NotDefined, message: "read error" }).await;
            }
            return false;
        }
        true
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        while let Some(key) = self.timers.pop_expired(now) {
            let Some(session) = self.sessions.get_mut(&key) else { continue };
            if let Err(later) = self.budget.allow(now) {
                // Over the budget: the retransmission waits, and is not counted as a retry.
                self.timers.schedule(key, now + later);
                continue;
            }
            match &mut session.kind {
                Kind::Read(transfer) => {
                    let next = transfer.on_timeout(now);
                    debug!(client = ?key.0, port = u16::from_be_bytes(key.1), ?next, wait = ?transfer.wait(), "timer expired");
                    self.budget.charge(next.datagrams());
                    self.read_next(key, next).await;
                }
                Kind::Write(transfer) => {
                    if transfer.on_timeout() {
                        let block = transfer.last_ack();
                        self.budget.charge(1);
                        self.send_tftp(key, &Repr::Ack { block }, 0).await;
                        self.arm(key);
                    } else if let Some(session) = self.forget(key) {
                        self.finished(&session.header, session.lb).await;
                    }
                }
            }
        }
    }

    /// Whether a new request must be refused (`--max-transfers`). Transfers resumed from a
    /// header are not refused: they are transfers in flight moving here from a dead backend.
    fn busy(&self) -> bool {
        if self.sessions.len() < self.config.max_transfers {
            return false;
        }
        debug!(transfers = self.sessions.len(), "busy: request refused");
        true
    }

    fn insert(&mut self, key: Key, header: SteeringHeader, context: &Context, kind: Kind, lb: SocketAddr) {
        let mut template = header;
        context.write_into(&mut template);
        self.completed.forget(&key);
        self.sessions.insert(key, Session { kind, header: template, lb });
    }

    fn forget(&mut self, key: Key) -> Option<Session> {
        self.timers.cancel(&key);
        self.sessions.remove(&key)
    }

    fn arm(&mut self, key: Key) {
        if let Some(session) = self.sessions.get(&key) {
            let wait = match &session.kind {
                Kind::Read(transfer) => transfer.wait(),
                Kind::Write(transfer) => transfer.wait(),
            };
            self.timers.schedule(key, Instant::now() + wait);
        }
    }

    /// Sends a TFTP message of a session, with its header.
    async fn send_tftp(&mut self, key: Key, repr: &Repr<'_>, block: u32) {
        let Some(session) = self.sessions.get(&key) else { return };
        let mut header = session.header;
        header.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT;
        header.set_block(block);
        let lb = session.lb;
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&header));
        let end = service::emit_at(repr, &mut self.out, HEADER);
        self.replies += 1;
        let _ = self.socket.send_to(&self.out[..end], lb).await;
    }

    /// Sends a TFTP ERROR, then tells the LB the transfer is over.
    async fn refuse(&mut self, _key: Key, header: &SteeringHeader, to: SocketAddr, refusal: &Refusal) {
        let mut reply = *header;
        reply.flags = FLAG_FROM_BACKEND | (header.flags & FLAG_HAS_CONTEXT);
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&reply));
        let end = service::emit_at(&Repr::Error { code: refusal.code, message: refusal.message }, &mut self.out, HEADER);
        self.replies += 1;
        let _ = self.socket.send_to(&self.out[..end], to).await;
        self.finished(header, to).await;
    }

    async fn finished(&mut self, header: &SteeringHeader, to: SocketAddr) {
        let mut done = *header;
        done.flags = FLAG_FROM_BACKEND | FLAG_FINISHED | (header.flags & FLAG_HAS_CONTEXT);
        self.send_header(&done, to).await;
    }

    async fn send_header(&mut self, header: &SteeringHeader, to: SocketAddr) {
        self.replies += 1;
        if let Err(error) = self.socket.send_to(bytemuck::bytes_of(header), to).await {
            debug!(%error, %to, "send failed");
        }
    }
}

/// The options an OACK repeats: those negotiated for the session (tsize from the size).
fn session_oack(session: &Session) -> crate::wire::Options {
    let h = &session.header;
    let bits = h.options;
    crate::wire::Options {
        blksize: (bits & xdp_lb_common::steering::OPTION_BLKSIZE != 0).then(|| u32::from(h.blksize())),
        timeout: (bits & xdp_lb_common::steering::OPTION_TIMEOUT != 0).then(|| u32::from(h.timeout)),
        tsize: (bits & xdp_lb_common::steering::OPTION_TSIZE != 0).then(|| match &session.kind {
            Kind::Read(t) => t.size(),
            Kind::Write(_) => h.file_size(),
        }),
        windowsize: (bits & xdp_lb_common::steering::OPTION_WINDOWSIZE != 0).then(|| u32::from(h.windowsize())),
    }
}

/// The steering header at the front of a datagram, if it is long enough for one.
fn steering_header(datagram: &[u8]) -> Option<SteeringHeader> {
    datagram.get(..HEADER).and_then(|h| bytemuck::try_from_bytes::<SteeringHeader>(h).ok()).copied()
}

/// Returns at `deadline`, never without one.
async fn until(alarm: &mut Alarm, deadline: Option<Instant>) -> std::io::Result<()> {
    match deadline {
        Some(at) => alarm.until(at).await,
        None => std::future::pending().await,
    }
}
