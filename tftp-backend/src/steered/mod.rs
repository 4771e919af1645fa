//! Steered mode: one UDP socket receives packets from load balancers, each a steering header
//! followed by a TFTP packet. Sessions are keyed by the client key in the header, and are only
//! a cache: an ACK for a session this backend never saw is served from the header alone.
//! One event loop (here), one timer queue, buffers reused for every packet. What a datagram
//! asks for is decided apart from the I/O (`decide.rs`, over the table of `session.rs`);
//! requests waiting for a file's digest are set aside (`digest.rs`). DATA leaves a window at a
//! time through the sender both modes share (`window.rs`), each block after its steering
//! header: one file read and one sendmmsg(2) for up to a window, or with `--segment-offload`
//! one UDP_SEGMENT send (`batch.rs`).
//!
//! Every datagram with a valid steering header gets at least one answer, because the LB's
//! watchdog counts unanswered packets: DATA, OACK, ACK, ERROR, a header-only `FINISHED` when
//! the transfer is over, or a header-only `HEARD` when the datagram asks for nothing now (a
//! duplicate or stale ACK, a repeated request, a request waiting for its file's digest). So a
//! client that repeats itself, however fast, never makes a live backend look dead.
//! (An upload's DATA whose ACK waits for the replica gets that ACK, a round trip later.)

mod decide;
mod digest;
mod frame;
mod replica;
mod replicate;
mod session;

use std::{collections::HashMap, io, net::SocketAddr, os::fd::AsFd as _, time::Instant};

use anyhow::Context as _;
use tokio::{io::Interest, net::UdpSocket, sync::mpsc};
use tracing::{debug, info, warn};
use xdp_lb_common::{
    SteeringHeader,
    steering::{FLAG_FINISHED, FLAG_HAS_CONTEXT, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_REPLICA},
};

use self::{
    decide::{AckPlan, Action, decide},
    digest::Digests,
    frame::{HEADER, reply, steering_header, tftp_packet},
    replicate::Push,
    session::{Kind, Session, SessionKey, Sessions, Upload},
};
use crate::{
    alarm::Alarm,
    allowed::AllowedBalancers,
    batch::SendBatch,
    files::Refusal,
    rto::{Budget, RttEstimate},
    service::{self, Config, Context},
    timer::TimerQueue,
    transfer::{Next, WriteNext},
    window::{Link, WindowSender},
    wire::{ErrorCode, MAX_PACKET, Mode, Options, Packet, Repr},
};

/// Most bytes of DATA read and sent in one batch: a window of 16 blocks of 1468 bytes, and at
/// least one block of the largest size.
const BATCH_BYTES: usize = 64 << 10;
/// Most datagrams per sendmmsg or UDP_SEGMENT send.
const BATCH_BLOCKS: usize = 64;
/// Most queued datagrams read before expired timers are handled.
const QUEUED_FIRST: usize = 4096;

/// The limits with the block size lowered so that DATA, after its steering header, fits a
/// path MTU of `mtu` bytes toward the balancers (`--path-mtu`): a balancer cannot steer IP
/// fragments.
#[must_use]
pub fn fit_path_mtu(limits: crate::options::Limits, mtu: usize) -> crate::options::Limits {
    limits.fit_path_mtu(mtu, HEADER)
}

pub struct Steered {
    socket: UdpSocket,
    root: crate::files::Root,
    config: Config,
    sessions: Sessions,
    timers: TimerQueue<SessionKey>,
    out: Vec<u8>,
    /// Every session's windows: one buffer read as each batch is sent (`Reads::AsNeeded`).
    window: WindowSender<SteeringHeader>,
    /// `--segment-offload`: windows may leave as UDP_SEGMENT super-packets (see `send_blocks`).
    segment_offload: bool,
    digests: Digests,
    /// Datagrams sent so far: a datagram whose handling sent none is answered `HEARD`.
    replies: u64,
    /// Timer-driven retransmissions left to this backend (`--retransmit-budget`).
    budget: Budget,
    /// The balancers this backend takes steering datagrams from (`--lb`).
    allowed: AllowedBalancers,
    /// The other backends (`--peer`): uploads keep their replica there.
    peers: Vec<SocketAddr>,
    /// The peers this backend takes replication datagrams from.
    allowed_peers: AllowedBalancers,
    /// Finished uploads on their way to peers that lack them.
    pushes: HashMap<(SessionKey, SocketAddr), Push>,
    /// When each replication link (an upload's replica, a push) waits for its peer.
    link_timers: TimerQueue<(SessionKey, SocketAddr)>,
    /// Peers that lately left a link unanswered, and when.
    silent_peers: HashMap<SocketAddr, Instant>,
    /// Copies with an ACK due to their primary since the last `flush_replication`.
    acks_due: Vec<SessionKey>,
    /// Uploads with blocks for their replica since the last `flush_replication`.
    copies_due: Vec<SessionKey>,
    /// The buffer a replication request is built in.
    link_out: Vec<u8>,
    /// The datagram being handled is an upload's DATA whose ACK is held for the replica: that
    /// ACK, a replica's round trip later, is its answer (no `HEARD` before it).
    answer_held: bool,
    /// Uploads whose fsync and rename ran (`commit`), with the result.
    commits: (mpsc::UnboundedSender<Committed>, mpsc::UnboundedReceiver<Committed>),
}

/// A session whose fsync and rename ran, and how it went.
type Committed = (SessionKey, Result<(), (ErrorCode, &'static str)>);

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
    /// `allowed`: who may send steering datagrams (`--lb`); `peers`: the other backends, which
    /// keep replicas of the uploads (`--peer`).
    #[must_use]
    pub fn new(socket: UdpSocket, root: crate::files::Root, config: Config, segment_offload: bool, allowed: AllowedBalancers, peers: Vec<SocketAddr>) -> Self {
        let budget = Budget::new(config.retransmit_budget, Instant::now());
        Self {
            socket,
            root,
            config,
            sessions: Sessions::new(),
            timers: TimerQueue::new(),
            out: vec![0; HEADER + MAX_PACKET],
            window: WindowSender::shared(BATCH_BYTES.max(MAX_PACKET), BATCH_BLOCKS),
            segment_offload,
            digests: Digests::new(),
            replies: 0,
            budget,
            allowed,
            allowed_peers: AllowedBalancers::new(peers.iter().map(SocketAddr::ip).collect()),
            peers,
            pushes: HashMap::new(),
            link_timers: TimerQueue::new(),
            silent_peers: HashMap::new(),
            acks_due: Vec::new(),
            copies_due: Vec::new(),
            link_out: Vec::new(),
            answer_held: false,
            commits: mpsc::unbounded_channel(),
        }
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut buf = vec![0u8; HEADER + MAX_PACKET];
        let mut alarm = Alarm::new().context("creating the retransmission timer")?;
        loop {
            let deadline = match (self.timers.next_deadline(), self.link_timers.next_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    let (len, from) = received.context("receiving from the steering socket")?;
                    self.receive(&buf[..len], from).await;
                    // What else is queued, before the replicas hear of it: one copy of the
                    // blocks and one ACK per burst, not per datagram.
                    for _ in 0..BATCH_BLOCKS {
                        let Ok((len, from)) = self.socket.try_recv_from(&mut buf) else { break };
                        self.receive(&buf[..len], from).await;
                    }
                }
                Some((key, result)) = self.commits.1.recv() => self.committed(key, result).await,
                ready = self.digests.ready() => {
                    for (datagram, from) in ready {
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
                    self.expire_links().await;
                }
            }
            self.flush_replication().await;
        }
    }

    async fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        if steering_header(datagram).is_some_and(|h| h.has_magic() && h.has_flag(FLAG_REPLICA)) {
            if let Err(report) = self.allowed_peers.check(from, Instant::now()) {
                if let Some(r) = report {
                    warn!(from = %r.from, dropped = r.since_last, total = r.total, "dropped replication datagrams from a sender not named by --peer");
                }
                return;
            }
            return self.replication(datagram, from).await;
        }
        // Before anything reads the header: a forged one could make this backend look a file
        // up, hash it, and stream it to the sender.
        if let Err(report) = self.allowed.check(from, Instant::now()) {
            if let Some(r) = report {
                warn!(from = %r.from, dropped = r.since_last, total = r.total, "dropped steering datagrams from a sender not named by --lb");
            }
            return;
        }
        if self.digests.defer(&mut self.root, &self.sessions, datagram, from) {
            // Its real answer comes once the digest is known, perhaps seconds later (a deferred
            // datagram has a valid header: the deferral parsed it).
            if let Some(header) = steering_header(datagram) {
                self.heard(&header, from).await;
            }
        } else {
            self.datagram(datagram, from).await;
        }
    }

    async fn datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(header) = steering_header(datagram) else {
            debug!(%from, len = datagram.len(), "dropped: no steering header");
            return;
        };
        let key = SessionKey::of(&header);
        let seen = self.sessions.seen(key, Instant::now());
        let mut action = decide(&header, Packet::parse(tftp_packet(datagram)), &seen, &self.config);
        let replies = self.replies;
        if action == Action::Promote {
            self.promote(key, &header, from).await;
            if !self.sessions.contains(key) {
                // A copy that had landed answered the client's last block and is done: the
                // datagram (that block again) asks for nothing more.
                return;
            }
            action = decide(&header, Packet::parse(tftp_packet(datagram)), &self.sessions.seen(key, Instant::now()), &self.config);
        }
        if let Action::Drop(why) = action {
            debug!(%from, why, "dropped: bad steering header");
            return;
        }
        self.act(key, header, action, from).await;
        let held = std::mem::take(&mut self.answer_held);
        if self.replies == replies && !held {
            self.heard(&header, from).await;
        }
    }

    /// Carries out the decision on a datagram of `key` with `header`, from the balancer `from`.
    async fn act(&mut self, key: SessionKey, header: SteeringHeader, action: Action<'_>, from: SocketAddr) {
        match action {
            // A promotion is carried out before the decision is made again (`datagram`).
            Action::Drop(_) | Action::Promote => {}
            Action::Echo => self.send_header(&reply(&header, FLAG_HEARTBEAT), from).await,
            Action::Malformed(error) => {
                debug!(%from, %error, "malformed TFTP packet");
                self.refuse(&header, from, &Refusal { code: ErrorCode::IllegalOperation, message: "malformed packet" }).await;
            }
            Action::Ignored(why) => debug!(client = %key, why, "ignored"),
            Action::Refuse(refusal) => self.refuse(&header, from, &refusal).await,
            Action::Busy => {
                self.forget(key);
                debug!(transfers = self.sessions.len(), "busy: request refused");
                self.refuse(&header, from, &service::BUSY).await;
            }
            Action::RepeatedRequest { filename } => {
                // Only a repeat well after the first answer (lost, then) gets it again, through
                // the balancer the repeat came by: after a failover the first one is gone.
                let next = match self.sessions.get_mut(key) {
                    Some(Session { kind: Kind::Read(transfer), lb, .. }) => {
                        *lb = from;
                        transfer.on_repeated_request(Instant::now())
                    }
                    _ => Next::Nothing,
                };
                debug!(client = %key, file = filename, ?next, "repeated request");
                self.read_next(key, next).await;
            }
            Action::UnansweredRequest { filename } => {
                let next = match self.sessions.get_mut(key) {
                    Some(Session { kind: Kind::Read(transfer), lb, .. }) => {
                        *lb = from;
                        transfer.on_unanswered_nudge(Instant::now())
                    }
                    _ => Next::Nothing,
                };
                debug!(client = %key, file = filename, ?next, "request resent by a balancer that passed no answer");
                self.read_next(key, next).await;
            }
            Action::Read { filename, mode, options } => self.open_read(key, header, (filename, mode, &options), from).await,
            Action::Write { filename, mode, options } => self.open_write(key, header, (filename, mode, &options), from).await,
            Action::Ack(plan) => self.ack(key, plan, from).await,
            Action::Resume { context, ack } => {
                match service::resume_read(&mut self.root, &self.config, &context, header.block(), RttEstimate::from_wire(header.rtt)) {
                    Ok(transfer) => {
                        info!(client = %key, block = header.block(), "resuming a transfer started elsewhere");
                        self.insert(key, header, &context, Kind::Read(transfer), from, None);
                    }
                    Err(refusal) => {
                        warn!(client = %key, reason = refusal.message, "cannot resume");
                        self.refuse(&header, from, &refusal).await;
                        return;
                    }
                }
                self.ack(key, ack, from).await;
            }
            Action::AckToUpload { nudge } => {
                let Some(Session { lb, .. }) = self.sessions.get_mut(key) else { return };
                *lb = from;
                // A new balancer took over: the client may wait on an acknowledgement the old
                // one lost.
                if nudge {
                    self.acknowledge_again(key).await;
                }
            }

            Action::AlreadyFinished => {
                // FINISHED makes the balancer forget the session.
                debug!(client = %key, "ACK for a download that finished here");
                self.finished(&header, from).await;
            }
            Action::NudgeElsewhere => {
                // Perhaps its request waits here for a digest: answered through `from` then.
                self.digests.redirect(key, from);
                debug!(client = %key, "nudge for a transfer not served here");
            }
            Action::Data { block, data } => self.data(key, block, data, from).await,
            Action::HandedData { block, data } => {
                let replies = self.replies;
                self.data(key, block, data, from).await;
                // A block held here already, or one inside a window: the client still hears.
                if self.replies == replies {
                    self.acknowledge_again(key).await;
                }
            }
            Action::ClientAborted { code, message } => {
                debug!(client = %key, ?code, message, "client aborted");
                self.forget(key);
                self.finished(&header, from).await;
            }
        }
    }

    async fn open_read(&mut self, key: SessionKey, header: SteeringHeader, (filename, mode, options): (&str, Mode, &Options), from: SocketAddr) {
        self.forget(key);
        match service::open_read_with_context(&mut self.root, &self.config, filename, mode, options) {
            Ok((mut transfer, context)) => {
                info!(client = %key, file = filename, "read");
                let first = transfer.start(Instant::now());
                self.insert(key, header, &context, Kind::Read(transfer), from, Some(*options));
                self.read_next(key, first).await;
            }
            Err(refusal) => self.refuse(&header, from, &refusal).await,
        }
    }

    async fn open_write(&mut self, key: SessionKey, header: SteeringHeader, (filename, mode, options): (&str, Mode, &Options), from: SocketAddr) {
        self.forget(key);
        match service::open_write(&self.root, &self.config, filename, mode, options) {
            Ok((mut transfer, negotiated)) => {
                info!(client = %key, file = filename, "write");
                transfer.defer_commit();
                let Ok(reader) = transfer.reader() else {
                    return self.refuse(&header, from, &Refusal { code: ErrorCode::NotDefined, message: "cannot read the upload back" }).await;
                };
                let context = Context { mode, negotiated, path_hash: [0; 8], digest: [0; 16], size: 0 };
                let replicated = self.replicates(mode);
                // The first answer waits for the replica to open its copy.
                let held = replicated.then_some((0, false));
                let upload = Upload { transfer, filename: filename.to_owned(), replica: None, excluded: Vec::new(), replica_tries: 0, held, committing: false, replica_commits_first: false, reader };
                self.insert(key, header, &context, Kind::Write(upload), from, None);
                if let Some(session) = self.sessions.get_mut(key) {
                    session.header.set_upload_replica(None);
                }
                if replicated {
                    if !self.start_replica(key, Instant::now()).await {
                        self.forget(key);
                        self.refuse(&header, from, &Refusal { code: ErrorCode::NotDefined, message: "no backend can keep a copy of the upload" }).await;
                    }
                    return;
                }
                if negotiated.oack.is_empty() {
                    self.send_tftp(key, &Repr::Ack { block: 0 }, 0).await;
                } else {
                    self.send_tftp(key, &Repr::Oack { options: negotiated.oack }, 0).await;
                }
                if let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get_mut(key) {
                    upload.transfer.start(Instant::now());
                }
                self.arm(key);
            }
            Err(refusal) => self.refuse(&header, from, &refusal).await,
        }
    }

    /// An ACK of a download served here, now from `from`.
    async fn ack(&mut self, key: SessionKey, plan: AckPlan, from: SocketAddr) {
        let Some(Session { kind: Kind::Read(transfer), lb, .. }) = self.sessions.get_mut(key) else { return };
        *lb = from;
        let block = plan.block(transfer);
        let next = if plan.unanswered() { transfer.on_unanswered_nudge(Instant::now()) } else { transfer.on_ack(block, plan.nudge, Instant::now()) };
        debug!(client = %key, block, nudge = plan.nudge, ?next, wait = ?transfer.wait(), "ack");
        self.read_next(key, next).await;
    }

    /// DATA of an upload: written, then acknowledged once the replica (if any) has it; the
    /// last block is made durable and moved into place off the event loop first (`commit`).
    async fn data(&mut self, key: SessionKey, block: u16, data: &[u8], from: SocketAddr) {
        let Some(Session { kind: Kind::Write(upload), lb, .. }) = self.sessions.get_mut(key) else { return };
        *lb = from;
        let replicated = upload.replica.is_some();
        let next = upload.transfer.on_data(block, data, Instant::now());
        let received = upload.transfer.received();
        match next {
            WriteNext::Ack(_) => upload.held = Some((received, false)),
            WriteNext::Done(_) => upload.held = Some((received, true)),
            WriteNext::Nothing => {}
            WriteNext::Complete(_) => return self.complete(key).await,
            WriteNext::Fail(code, message) => return self.fail_upload(key, &Refusal { code, message }).await,
        }
        if next == WriteNext::Nothing {
            // Within a window the burst's blocks leave together at its end
            // (`flush_replication`): the replica writes the window while the client sends it.
            if replicated {
                self.copies_due.push(key);
            }
            return;
        }
        if replicated {
            // Before the client's ACK: a replica still catching up is not outrun by a client
            // that answers it at once, and it holds this block before the client's next.
            self.replicate_data(key).await;
        }
        self.acknowledge(key).await;
        // Still held: the replica's ACK releases it, a round trip later, and it answers this
        // datagram for the balancer's watchdog then (a `HEARD` now would cost every
        // lock-step block a datagram more; the watchdog acts only on unanswered heartbeats,
        // which this loop answers meanwhile).
        self.answer_held = matches!(self.sessions.get(key), Some(Session { kind: Kind::Write(Upload { held: Some(_), .. }), .. }));
    }

    /// Acknowledges again to the client of `key`'s upload what the replica allows, unless an
    /// acknowledgement waits for the replica or the commit (it goes when they are done).
    async fn acknowledge_again(&mut self, key: SessionKey) {
        let Some(Session { kind: Kind::Write(upload), .. }) = self.sessions.get(key) else { return };
        if upload.held.is_none() && !upload.committing && !upload.replica_commits_first {
            let block = allowed_ack(upload);
            self.send_tftp(key, &Repr::Ack { block: (block & 0xffff) as u16 }, block).await;
        }
    }

    /// Runs the fsync and rename of `key`'s complete upload (or copy) on a blocking thread: an
    /// fsync takes as long as the disk needs for the whole file, and meanwhile this loop must
    /// answer heartbeats and serve the other transfers. `committed` goes on from its result.
    fn commit(&mut self, key: SessionKey) {
        let job = match self.sessions.get_mut(key) {
            Some(Session { kind: Kind::Write(upload), .. }) => {
                upload.committing = true;
                upload.transfer.take_commit()
            }
            Some(Session { kind: Kind::Replica(copy), .. }) => {
                copy.committing = true;
                copy.transfer.take_commit()
            }
            _ => None,
        };
        let Some(job) = job else { return };
        let done = self.commits.0.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.send((key, job.run()));
        });
    }

    /// Sends what a read transfer asks for, or ends it.
    async fn read_next(&mut self, key: SessionKey, next: Next) {
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
                    self.sessions.completed(key, Instant::now());
                }
                if let Some(session) = self.forget(key) {
                    self.finished(&session.header, session.lb).await;
                }
            }
            Next::Nothing => {}
        }
    }

    /// Sends the OACK of a read (its block 0); false if the session is gone.
    async fn send_oack(&mut self, key: SessionKey) -> bool {
        let Some(session) = self.sessions.get(key) else { return false };
        let Kind::Read(transfer) = &session.kind else { return false };
        let mut header = reply(&session.header, FLAG_HAS_CONTEXT);
        header.set_block(0);
        header.rtt = transfer.rtt().to_wire();
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&header));
        let end = service::emit_at(&Repr::Oack { options: session.oack() }, &mut self.out, HEADER);
        let lb = session.lb;
        self.replies += 1;
        if let Err(error) = self.socket.send_to(&self.out[..end], lb).await {
            debug!(%error, "send failed");
        }
        true
    }

    /// Sends DATA blocks `first..=last` of a read, a batch per file read and per system call;
    /// false if the session is gone (or its file failed, which ends it).
    async fn send_blocks(&mut self, key: SessionKey, first: u32, last: u32) -> bool {
        let Some(session) = self.sessions.get(key) else { return false };
        let Kind::Read(transfer) = &session.kind else { return false };
        let mut prefix = reply(&session.header, FLAG_HAS_CONTEXT);
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
                self.refuse(&s.header, s.lb, &Refusal { code: ErrorCode::NotDefined, message: "read error" }).await;
            }
            return false;
        }
        true
    }

    async fn expire(&mut self) {
        let now = Instant::now();
        while let Some(key) = self.timers.pop_expired(now) {
            let Some(session) = self.sessions.get_mut(key) else { continue };
            if let Err(later) = self.budget.allow(now) {
                // Over the budget: the retransmission waits, and is not counted as a retry.
                self.timers.schedule(key, now + later);
                continue;
            }
            match &mut session.kind {
                Kind::Read(transfer) => {
                    let next = transfer.on_timeout(now);
                    debug!(client = %key, ?next, wait = ?transfer.wait(), "timer expired");
                    self.budget.charge(next.datagrams());
                    self.read_next(key, next).await;
                }
                Kind::Write(upload) => {
                    // While an acknowledgement is held for the replica (or the fsync runs) the
                    // client is not late: nothing is resent, but the wait counts, so that an
                    // upload whose client went elsewhere (a balancer moved it) ends here too.
                    let waiting = upload.held.is_some() || upload.committing || upload.replica_commits_first;
                    if upload.transfer.on_timeout() {
                        if !waiting {
                            let block = allowed_ack(upload);
                            self.budget.charge(1);
                            self.send_tftp(key, &Repr::Ack { block: (block & 0xffff) as u16 }, block).await;
                        }
                        self.probe_replica(key).await;
                        self.arm(key);
                    } else if let Some(session) = self.forget(key) {
                        if let Kind::Write(Upload { replica: Some(r), .. }) = &session.kind {
                            self.abort_copy(&session.header, r.link.peer).await;
                        }
                        self.finished(&session.header, session.lb).await;
                    }
                }
                // Its primary and the client are gone (or it landed long ago): nothing is kept.
                Kind::Replica(_) => {
                    debug!(client = %key, "copy abandoned");
                    self.forget(key);
                }
            }
        }
    }

    fn insert(&mut self, key: SessionKey, header: SteeringHeader, context: &Context, kind: Kind, lb: SocketAddr, requested: Option<Options>) {
        let mut template = header;
        context.write_into(&mut template);
        self.sessions.insert(key, Session { kind, header: template, lb, requested });
    }

    fn forget(&mut self, key: SessionKey) -> Option<Session> {
        self.timers.cancel(&key);
        self.sessions.remove(key)
    }

    fn arm(&mut self, key: SessionKey) {
        if let Some(session) = self.sessions.get(key) {
            let wait = match &session.kind {
                Kind::Read(transfer) => transfer.wait(),
                Kind::Write(upload) => upload.transfer.wait(),
                Kind::Replica(_) => replicate::COPY_IDLE,
            };
            self.timers.schedule(key, Instant::now() + wait);
        }
    }

    /// Sends a TFTP message of a session, with its header.
    async fn send_tftp(&mut self, key: SessionKey, repr: &Repr<'_>, block: u32) {
        let Some(session) = self.sessions.get(key) else { return };
        let mut header = reply(&session.header, FLAG_HAS_CONTEXT);
        header.set_block(block);
        let lb = session.lb;
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&header));
        let end = service::emit_at(repr, &mut self.out, HEADER);
        self.replies += 1;
        let _ = self.socket.send_to(&self.out[..end], lb).await;
    }

    /// Sends a TFTP ERROR, then tells the LB the transfer is over.
    async fn refuse(&mut self, header: &SteeringHeader, to: SocketAddr, refusal: &Refusal) {
        let error = reply(header, header.flags & FLAG_HAS_CONTEXT);
        self.out[..HEADER].copy_from_slice(bytemuck::bytes_of(&error));
        let end = service::emit_at(&Repr::Error { code: refusal.code, message: refusal.message }, &mut self.out, HEADER);
        self.replies += 1;
        let _ = self.socket.send_to(&self.out[..end], to).await;
        self.finished(header, to).await;
    }

    async fn finished(&mut self, header: &SteeringHeader, to: SocketAddr) {
        self.send_header(&reply(header, FLAG_FINISHED | (header.flags & FLAG_HAS_CONTEXT)), to).await;
    }

    /// Tells the balancer that sent a datagram with `header` it was read and needs no reply now.
    async fn heard(&mut self, header: &SteeringHeader, from: SocketAddr) {
        self.send_header(&reply(header, FLAG_HEARD), from).await;
    }

    async fn send_header(&mut self, header: &SteeringHeader, to: SocketAddr) {
        self.replies += 1;
        if let Err(error) = self.socket.send_to(bytemuck::bytes_of(header), to).await {
            debug!(%error, %to, "send failed");
        }
    }
}

/// The block an upload may acknowledge again (after a timeout, or to a balancer that took
/// over): the last one received, but no further than its caught-up replica holds.
fn allowed_ack(upload: &Upload) -> u32 {
    let received = upload.transfer.received();
    match &upload.replica {
        Some(r) if r.caught_up => received.min(r.link.acked()),
        _ => received,
    }
}

/// Returns at `deadline`, never without one.
async fn until(alarm: &mut Alarm, deadline: Option<Instant>) -> std::io::Result<()> {
    match deadline {
        Some(at) => alarm.until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::{HEADER, fit_path_mtu};
    use crate::options::{DATA_OVERHEAD, Limits};

    /// iPXE asks blksize 1432, U-Boot 1468: on a 1500-byte path toward the balancer both get
    /// 1404, so that each DATA with its steering header is exactly one unfragmented datagram.
    #[test]
    fn ipxe_and_uboot_blocks_fit_a_1500_byte_path_with_the_steering_header() {
        let limits = fit_path_mtu(Limits::default(), 1500);
        assert_eq!(limits.max_blksize, 1404);
        assert_eq!(usize::from(limits.max_blksize) + HEADER + DATA_OVERHEAD, 1500);
        assert_eq!(fit_path_mtu(Limits::default(), 1600).max_blksize, 1468, "the test topology's links: --max-blksize stands");
    }
}
