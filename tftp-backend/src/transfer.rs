//! Transfer state machines, independent of sockets: which blocks to send after an ACK or a
//! timeout, where a block lives in the file, and how uploads reach the disk. Blocks are counted
//! with 32 bits (the wire's 16-bit numbers roll over after 65535); block `n` starts at byte
//! `(n - 1) * blksize`, so a transfer can resume at any block knowing only the file and the
//! options.

use std::{
    fs::File,
    io::Write as _,
    ops::RangeInclusive,
    os::unix::fs::FileExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use xdp_lb_common::steering::expand_block;

use crate::{
    netascii,
    rto::{Clock, Pace, RttEstimate},
    wire::ErrorCode,
};

/// Where the bytes of a read come from: the file itself (octet), or its netascii form.
pub enum Source {
    File(File),
    Memory(Vec<u8>),
}

impl Source {
    /// Reads the netascii form of a file (whole; such files are small text).
    pub fn netascii(file: &File, limit: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        if len > limit {
            return Err(std::io::Error::other("file too large for netascii"));
        }
        let mut local = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut local, 0)?;
        Ok(Self::Memory(netascii::encode(&local)))
    }

    pub fn len(&self) -> std::io::Result<u64> {
        Ok(match self {
            Self::File(f) => f.metadata()?.len(),
            Self::Memory(m) => m.len() as u64,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Self::File(f) => read_up_to(f, buf, offset),
            Self::Memory(m) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(m.len());
                let n = buf.len().min(m.len() - start);
                buf[..n].copy_from_slice(&m[start..start + n]);
                Ok(n)
            }
        }
    }
}

/// Reads `buf.len()` bytes of `file` at `offset`, fewer only where the file ends (a read may
/// return less than asked without being at the end).
pub fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// What to do after an event of a read transfer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send these blocks (block 0 means the OACK).
    Send(RangeInclusive<u32>),
    /// The client acknowledged the last block.
    Finished,
    /// Nothing to send (a stale or duplicate ACK).
    Nothing,
    /// Retries exhausted: abandon the transfer.
    GiveUp,
}

impl Next {
    /// How many datagrams it sends.
    #[must_use]
    pub fn datagrams(&self) -> u32 {
        match self {
            Self::Send(blocks) => blocks.end().saturating_sub(*blocks.start()) + 1,
            _ => 0,
        }
    }
}

/// A download in progress.
pub struct ReadTransfer {
    source: Source,
    size: u64,
    pub blksize: u16,
    pub windowsize: u16,
    /// The last block: a short (possibly empty) one ends the transfer.
    last: u32,
    /// Highest block the client acknowledged (0: none, or only the OACK).
    acked: u32,
    /// Highest block sent.
    sent: u32,
    /// Round-trip estimate, the send being timed, retransmissions since the last progress.
    clock: Clock,
    /// An OACK was (or is to be) sent and not acknowledged yet.
    oack_pending: bool,
    /// When the first answer (the OACK, or the first DATA) last went out: a repeated request
    /// soon after is a copy of the first.
    first_sent: Option<Instant>,
    /// Blocks after the last ACK may have been lost with a failed server or balancer (after a
    /// nudge or a resume): the next ACK gets a whole window, not only blocks never sent.
    resync: bool,
    /// The blocks last sent a second time (a window resent after a nudge, a timeout or a
    /// repeated ACK) and how many times, until an ACK shows how many of them the client
    /// already had.
    resent: Option<(u32, u32, u32)>,
    /// Repeats of the ACK of `acked` still to be taken as echoes of that resend, not as news
    /// of a loss. EDK2 (every UEFI PXE client) answers each DATA it did not expect with an ACK
    /// of its last block in order, so resent blocks the client had come back as as many equal
    /// ACKs; resending a window for each made every copy answer again, and after a failover
    /// one 528 KiB download grew into 160 000 DATA packets.
    echoes: u32,
    /// When a repeated ACK was last answered during the quiet gap (see `on_ack`).
    quiet_answer: Option<Instant>,
    /// The last ACK covered everything sent: a late ACK after it more likely went missing
    /// than the window did, so the first timeout resends only the window's last block (a
    /// tail probe, which a client answers with an ACK showing what it holds).
    whole: bool,
}

impl ReadTransfer {
    /// A new transfer; with `oack` the first thing sent is the OACK (block 0), else DATA 1.
    pub fn new(source: Source, blksize: u16, windowsize: u16, oack: bool, pace: Pace) -> std::io::Result<Self> {
        let size = source.len()?;
        let blksize = blksize.max(1);
        let last = u32::try_from(size / u64::from(blksize) + 1).map_err(|_| std::io::Error::other("file too large for 32-bit blocks"))?;
        Ok(Self {
            source,
            size,
            blksize,
            windowsize: windowsize.max(1),
            last,
            acked: 0,
            sent: 0,
            clock: Clock::new(pace),
            oack_pending: oack,
            first_sent: None,
            resync: false,
            resent: None,
            echoes: 0,
            quiet_answer: None,
            whole: true,
        })
    }

    /// Picks a transfer up where another server left it: everything up to `sent` went out,
    /// over a path whose round trip the other server estimated as `rtt`.
    pub fn resume(source: Source, blksize: u16, windowsize: u16, sent: u32, pace: Pace, rtt: RttEstimate) -> std::io::Result<Self> {
        let mut t = Self::new(source, blksize, windowsize, false, pace)?;
        t.sent = sent.min(t.last);
        t.resync = true;
        t.clock.rtt = rtt;
        Ok(t)
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    #[must_use]
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// The round-trip estimate, for the steering header.
    #[must_use]
    pub fn rtt(&self) -> RttEstimate {
        self.clock.rtt
    }

    /// Takes note that blocks up to `sent` went out from another server (this one's copy of the
    /// transfer is older than the balancer's view): the client's ACKs up to there are valid, and
    /// what followed this server's last ACK may be lost, so the next ACK gets a whole window.
    pub fn catch_up(&mut self, sent: u32) {
        if sent > self.sent {
            self.sent = sent.min(self.last);
            self.resync = true;
        }
    }

    /// Retransmissions since the client last made progress.
    #[cfg(test)]
    #[must_use]
    pub fn retries(&self) -> u8 {
        self.clock.retries()
    }

    /// How long to wait for the client before the next retransmission.
    #[must_use]
    pub fn wait(&self) -> Duration {
        self.clock.wait(self.oack_pending)
    }

    /// Highest block the client acknowledged.
    pub fn acked(&self) -> u32 {
        self.acked
    }

    /// The first thing to send.
    pub fn start(&mut self, now: Instant) -> Next {
        if self.oack_pending {
            return self.send_oack(now);
        }
        self.window_after(0, now)
    }

    /// The client repeated its request before acknowledging anything. Within half the timeout
    /// of the first answer it is a copy of the first request (a duplicating network), and a
    /// second OACK would abort the client; later, the first answer was lost (with a failed
    /// balancer, say), and the client asks again sooner than the server's timer would resend
    /// it: the OACK, or DATA 1 of a transfer without options.
    pub fn on_repeated_request(&mut self, now: Instant) -> Next {
        let lost = self.first_sent.is_some_and(|at| now.saturating_duration_since(at) >= self.clock.pace.timeout / 2);
        if !lost {
            return Next::Nothing;
        }
        if self.oack_pending {
            self.clock.resent(0, 0);
            return self.send_oack(now);
        }
        if self.acked == 0 && self.sent > 0 {
            return self.window_after(0, now);
        }
        Next::Nothing
    }

    /// A balancer that took over nudges a transfer whose first answer no reply of it ever
    /// passed (its session has no context, and the client sent nothing to its TID): the
    /// client still waits for that answer, and sends nothing more before its own timer
    /// (GRUB, in the data phase, never). Sends it again now: the OACK, which the client cannot
    /// have had, or the window after a block the client acknowledged.
    pub fn on_unanswered_nudge(&mut self, now: Instant) -> Next {
        if self.oack_pending {
            return self.send_oack(now);
        }
        self.on_ack(self.acked, true, now)
    }

    fn send_oack(&mut self, now: Instant) -> Next {
        if self.first_sent.is_some() {
            self.clock.resent(0, 0);
        } else {
            self.clock.sent(0, now);
        }
        self.first_sent = Some(now);
        Next::Send(0..=0)
    }

    /// Widens a 16-bit ACK to the 32-bit counter, relative to what was sent.
    #[must_use]
    pub fn widen(&self, wire: u16) -> u32 {
        expand_block(wire, self.sent)
    }

    /// The client acknowledged `block` (32-bit) at `now`. `nudge`: the load balancer asks to
    /// resend what follows now, even if the ACK looks like a duplicate (the session just moved
    /// here).
    ///
    /// Windows (RFC 7440): an ACK that moves forward but not to the end of what was sent is a
    /// gap ACK and resends from the gap at once, unless it falls inside blocks resent lately:
    /// then it is an echo of that resend, the client is going on with the resent blocks in
    /// flight, and only new blocks are added (resending them again would put every later
    /// window out of phase with the client's count and send half of each twice). A repeated
    /// ACK signals loss and resends from the block after it; with a window of one it waits
    /// for the timer instead (no Sorcerer's Apprentice).
    pub fn on_ack(&mut self, block: u32, nudge: bool, now: Instant) -> Next {
        // A nudge carries the balancer's view, which may lag behind the ACKs this server saw.
        let block = if nudge { block.max(self.acked) } else { block };
        if block > self.sent && !nudge {
            if !self.resync || block > self.last {
                // Acknowledges something never sent: stale from an old transfer; ignore.
                return Next::Nothing;
            }
            // Resumed (or nudged) from a balancer's view of the transfer, which lags behind the
            // client when the balancer's session was mirrored a moment before a failover: the
            // blocks up to the client's ACK did go out, from the server that failed.
            self.sent = block;
        }
        if !nudge {
            self.clock.answered(block, now);
        }
        if block >= self.last {
            self.acked = self.last;
            return Next::Finished;
        }
        // A nudge of block 0 while the OACK waits for its ACK comes from a balancer that saw
        // the OACK pass (its session has the context) or the client send to its TID: the client
        // has the OACK, and its ACK 0 was lost with the failed balancer. It goes on as that
        // ACK (a second OACK would abort atftp); `on_unanswered_nudge` is the other case.
        // An ACK inside blocks resent lately may be an echo of that resend (the client had
        // them); any other ACK short of what was sent is a gap ACK.
        let echo_of_resend = self.resent.is_some_and(|(first, _, _)| block >= first);
        if let Some((first, last, copies)) = self.resent
            && block >= first
        {
            // The client holds the resent blocks up to `block`: each copy was a duplicate to
            // it, answered with an ACK of `block`, this one included.
            self.echoes = (block.min(last) - first + 1).saturating_mul(copies) - 1;
            self.resent = None;
        }
        let forward = block > self.acked || (block == 0 && self.oack_pending);
        self.oack_pending = false;
        self.whole = block >= self.sent;
        if nudge || (forward && (block >= self.sent || self.resync)) {
            self.resync = nudge;
            self.acked = block;
            self.clock.progress();
            self.quiet_answer = None;
            return self.window_after(block, now);
        }
        if forward {
            self.acked = block;
            self.clock.progress();
            self.quiet_answer = None;
            if !echo_of_resend {
                // A gap ACK: the block after `block` was lost, and the client (atftp, EDK2,
                // RFC 7440) drops every block until it comes, so nothing in flight can help:
                // resend from the gap now (waiting for the timer cost a timeout per lost block).
                // The client held none of the resent blocks, so they bring no echoes.
                let next = self.resend_from_gap(block, now);
                self.resent = None;
                return next;
            }
            // An echo of a resend: the client went on from `block` with the resent blocks that
            // followed it, and counts its window from there.
            let last = block.saturating_add(u32::from(self.windowsize)).min(self.last);
            if last <= self.sent {
                return Next::Nothing;
            }
            let first = self.sent + 1;
            self.sent = last;
            self.clock.sent(first, now);
            return Next::Send(first..=last);
        }
        let answered_lately = self.quiet_answer.is_some_and(|at| now.saturating_duration_since(at) < self.clock.pace.timeout / 2);
        if block == self.acked && self.clock.quiet() && !answered_lately {
            // The server has gone quiet after its quick resends went unanswered: this repeat
            // is the client's own retransmission, not an answer to a copy from here, and what
            // it asks for was lost again. Clients retransmit a timeout apart, so one answer
            // per half timeout: a client repeating its ACK every millisecond gets no DATA for
            // each (no Sorcerer's Apprentice).
            self.echoes = 0;
            self.quiet_answer = Some(now);
            return self.window_after(block, now);
        }
        if block == self.acked && self.windowsize > 1 {
            if self.echoes > 0 {
                self.echoes -= 1;
                return Next::Nothing;
            }
            // A block after `block` was lost.
            return self.resend_from_gap(block, now);
        }
        if self.windowsize == 1 {
            self.clock.repeated(block, now);
        }
        Next::Nothing
    }

    /// Resends the window after `block`, the last the client holds in order. The blocks sent
    /// behind the gap that arrive may each be answered with that same ACK (EDK2), the one that
    /// asked included: one resend answers them all.
    fn resend_from_gap(&mut self, block: u32, now: Instant) -> Next {
        let behind_the_gap = self.sent.saturating_sub(block + 1);
        let next = self.window_after(block, now);
        self.echoes = behind_the_gap.saturating_sub(1);
        next
    }

    /// The retransmission timer fired (after the input queued for this transfer was read).
    pub fn on_timeout(&mut self, now: Instant) -> Next {
        if !self.clock.expired(self.oack_pending) {
            return Next::GiveUp;
        }
        if self.oack_pending {
            return self.send_oack(now);
        }
        if self.clock.retries() == 1 && self.whole && self.sent > self.acked + 1 {
            // The window went out whole after a complete ACK; its ACK is late. Its last block
            // alone tells whether the window or the ACK was lost: the client answers it with
            // the ACK of what it holds (a gap ACK, or the whole window).
            self.clock.resent(self.sent, self.sent);
            return Next::Send(self.sent..=self.sent);
        }
        self.window_after(self.acked, now)
    }

    /// Sends the window after `acked`; blocks in it that went out before are a resend, which
    /// the client may answer once per block it already had (see `echoes`).
    fn window_after(&mut self, acked: u32, now: Instant) -> Next {
        if acked == 0 {
            self.first_sent = Some(now);
        }
        let first = acked + 1;
        let last = acked.saturating_add(u32::from(self.windowsize)).min(self.last);
        if first <= self.sent {
            self.clock.resent(first, last.min(self.sent));
            self.resent = match self.resent {
                Some((f, l, copies)) if f == first => Some((f, l, copies + 1)),
                _ => Some((first, last.min(self.sent), 1)),
            };
        }
        if last > self.sent {
            self.clock.sent(self.sent.max(acked) + 1, now);
        }
        self.sent = self.sent.max(last);
        Next::Send(first..=last)
    }

    /// Reads blocks `first..first + count` (1-based) back to back into `buf` with one read;
    /// returns the bytes read (fewer than `count * blksize` only at the end of the file).
    pub fn read_blocks(&self, first: u32, count: u32, buf: &mut [u8]) -> std::io::Result<usize> {
        let offset = u64::from(first.saturating_sub(1)) * u64::from(self.blksize);
        let want = (u64::from(count) * u64::from(self.blksize)).min(self.size.saturating_sub(offset));
        let len = usize::try_from(want).unwrap_or(usize::MAX).min(buf.len());
        let got = self.source.read_at(&mut buf[..len], offset)?;
        if got != len {
            return Err(std::io::Error::other("file shrank during the transfer"));
        }
        Ok(len)
    }
}

/// What to do after DATA of an upload.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteNext {
    /// Acknowledge this block (16-bit, as on the wire).
    Ack(u16),
    /// The file is complete and in place; acknowledge this last block.
    Done(u16),
    /// The last block is written (this block, with [`WriteTransfer::defer_commit`]): the file
    /// is made durable and moved into place by [`WriteTransfer::take_commit`]'s job.
    Complete(u16),
    /// Out of order or duplicate within the window: nothing (our timer re-acknowledges).
    Nothing,
    /// Failed: send this error and drop the transfer.
    Fail(ErrorCode, &'static str),
}

/// An upload in progress: written to a temporary file beside the target, made durable and
/// moved into place only when complete. Dropped unfinished, it leaves nothing behind.
/// How much one upload may put on disk (`--max-upload-bytes`, `--min-free-mib`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest file accepted, in bytes (as stored, after netascii decoding).
    pub max_bytes: Option<u64>,
    /// Free space the filesystem keeps, in bytes: no upload goes below it.
    pub min_free: u64,
}

/// The free space is looked up again every this many bytes written, and the floor kept with
/// this much to spare, so it is never crossed between two looks.
pub const FREE_SPACE_STEP: u64 = 1 << 20;

/// Why an upload stopped early for lack of room (TFTP ERROR 3).
pub const TOO_LARGE: &str = "file larger than this server accepts";
pub const NO_ROOM: &str = "not enough free space on this server";

impl UploadLimits {
    /// Whether `written` bytes, plus `more`, stay within the size limit.
    #[must_use]
    pub fn fits(&self, written: u64, more: u64) -> bool {
        self.max_bytes.is_none_or(|max| written.saturating_add(more) <= max)
    }

    /// Whether writing from `written` to `written + more` crosses a point where the free space
    /// is looked up (the first byte included).
    #[must_use]
    pub const fn free_space_due(written: u64, more: u64) -> bool {
        written == 0 || written / FREE_SPACE_STEP != (written + more) / FREE_SPACE_STEP
    }

    /// Whether `available` bytes of free space leave room for the next step above the floor.
    #[must_use]
    pub const fn room(&self, available: u64) -> bool {
        available >= self.min_free.saturating_add(FREE_SPACE_STEP)
    }
}

/// Free bytes for unprivileged users on the filesystem holding `file`.
#[allow(clippy::useless_conversion, reason = "fsblkcnt_t and c_ulong are 32 bits wide on some targets")]
fn available(file: &File) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::fstatvfs(file).map_err(std::io::Error::from)?;
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

pub struct WriteTransfer {
    temp: Option<tempfile::NamedTempFile>,
    target: PathBuf,
    pub blksize: u16,
    pub windowsize: u16,
    /// Last block received in order.
    received: u32,
    netascii: Option<netascii::Decoder>,
    overwrite: bool,
    /// The transfer began with an OACK, which is resent more rarely (see `rto::quiet_wait`).
    oack: bool,
    clock: Clock,
    decoded: Vec<u8>,
    limits: UploadLimits,
    /// Bytes in the temporary file so far.
    written: u64,
    /// The last block leaves the fsync and the rename to the caller (`Complete`).
    defer_commit: bool,
}

/// Making a complete upload durable and moving it into place: an fsync, which takes as long as
/// the disk needs for the whole file, so that an event loop can run it on another thread.
pub struct Commit {
    temp: tempfile::NamedTempFile,
    target: PathBuf,
    overwrite: bool,
    /// The netascii decoder's last bytes.
    tail: Vec<u8>,
}

/// What a new upload is: where it goes and how it was negotiated.
#[derive(Clone, Copy, Debug)]
pub struct WriteSetup {
    pub blksize: u16,
    pub windowsize: u16,
    pub netascii: bool,
    pub overwrite: bool,
    /// The first answer is an OACK, not ACK 0.
    pub oack: bool,
    pub pace: Pace,
    pub limits: UploadLimits,
}

impl WriteTransfer {
    /// The temporary file is created readable and writable by all, less the process umask
    /// (`--umask`): it becomes the uploaded file as it is.
    pub fn new(target: PathBuf, setup: WriteSetup) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let WriteSetup { blksize, windowsize, netascii, overwrite, oack, pace, limits } = setup;
        let dir = target.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
        let temp = tempfile::Builder::new().prefix(".tftp-upload-").permissions(std::fs::Permissions::from_mode(0o666)).tempfile_in(dir)?;
        Ok(Self {
            temp: Some(temp),
            target,
            blksize: blksize.max(1),
            windowsize: windowsize.max(1),
            received: 0,
            netascii: netascii.then(netascii::Decoder::default),
            overwrite,
            oack,
            clock: Clock::new(pace),
            decoded: Vec::new(),
            limits,
            written: 0,
            defer_commit: false,
        })
    }

    /// The first answer (OACK or ACK 0) went out at `now`.
    pub fn start(&mut self, now: Instant) {
        self.clock.sent(0, now);
    }

    /// Where the upload goes.
    #[must_use]
    pub fn target(&self) -> &std::path::Path {
        &self.target
    }

    /// Whether its first answer is an OACK (else ACK 0).
    #[must_use]
    pub const fn oack_first(&self) -> bool {
        self.oack
    }

    /// Last block received in order, in the transfer's 32-bit count.
    #[must_use]
    pub const fn received(&self) -> u32 {
        self.received
    }

    /// A second handle on the file being written (it stays valid once the file is moved into
    /// place), to read back what was written: an upload's copy for another backend.
    pub fn reader(&self) -> std::io::Result<File> {
        self.temp.as_ref().ok_or_else(|| std::io::Error::other("upload already finished"))?.as_file().try_clone()
    }

    /// Acknowledge every `windowsize` blocks from now on (a replica that takes the upload over
    /// from its primary, which it acknowledged block by block).
    pub fn set_windowsize(&mut self, windowsize: u16) {
        self.windowsize = windowsize.max(1);
    }

    /// The block to acknowledge now (after the request, or on a timeout).
    #[must_use]
    pub fn last_ack(&self) -> u16 {
        (self.received & 0xffff) as u16
    }

    /// How long to wait for the client's next DATA before acknowledging again.
    #[must_use]
    pub fn wait(&self) -> Duration {
        self.clock.wait(self.oack && self.received == 0)
    }

    /// Counts a timeout, after which the last acknowledgement goes out again; false once
    /// retries are exhausted.
    pub fn on_timeout(&mut self) -> bool {
        self.clock.resent(self.received, self.received);
        self.clock.expired(self.oack && self.received == 0)
    }

    /// DATA `wire` arrived at `now`.
    pub fn on_data(&mut self, wire: u16, data: &[u8], now: Instant) -> WriteNext {
        let block = expand_block(wire, self.received + 1);
        if block != self.received + 1 || data.len() > usize::from(self.blksize) {
            // A duplicate or a gap: RFC 7440 asks to acknowledge the last in-order block.
            if block <= self.received {
                return WriteNext::Nothing;
            }
            self.clock.resent(self.received, self.received);
            return WriteNext::Ack(self.last_ack());
        }
        self.clock.answered(self.received, now);
        self.clock.progress();
        if let Err((code, message)) = self.append(data) {
            // Removed before the client hears of the failure, not when the transfer is
            // dropped after the ERROR went out: a client that looks right after it (or an
            // operator's script) finds nothing.
            self.temp = None;
            return WriteNext::Fail(code, message);
        }
        self.received = block;
        if data.len() < usize::from(self.blksize) {
            if self.defer_commit {
                return WriteNext::Complete(self.last_ack());
            }
            return match self.commit() {
                Ok(()) => WriteNext::Done(self.last_ack()),
                Err(refusal) => WriteNext::Fail(refusal.0, refusal.1),
            };
        }
        if self.received.is_multiple_of(u32::from(self.windowsize)) {
            self.clock.sent(self.received, now);
            WriteNext::Ack(self.last_ack())
        } else {
            WriteNext::Nothing
        }
    }

    /// Appends a block, within the upload limits (a failed upload's temporary file goes with
    /// the transfer).
    fn append(&mut self, data: &[u8]) -> Result<(), (ErrorCode, &'static str)> {
        let Some(temp) = self.temp.as_mut() else { return Err((ErrorCode::NotDefined, "upload already finished")) };
        let bytes = match self.netascii.as_mut() {
            Some(decoder) => {
                self.decoded.clear();
                decoder.decode(data, &mut self.decoded);
                &self.decoded[..]
            }
            None => data,
        };
        let more = bytes.len() as u64;
        if !self.limits.fits(self.written, more) {
            return Err((ErrorCode::DiskFull, TOO_LARGE));
        }
        if UploadLimits::free_space_due(self.written, more) && !available(temp.as_file()).is_ok_and(|free| self.limits.room(free)) {
            return Err((ErrorCode::DiskFull, NO_ROOM));
        }
        temp.write_all(bytes).map_err(|e| if e.raw_os_error() == Some(libc_enospc()) { (ErrorCode::DiskFull, NO_ROOM) } else { (ErrorCode::NotDefined, "cannot write the file") })?;
        self.written += more;
        Ok(())
    }

    /// The last block returns [`WriteNext::Complete`] from now on, and the caller runs the
    /// commit ([`WriteTransfer::take_commit`]) where it likes.
    pub fn defer_commit(&mut self) {
        self.defer_commit = true;
    }

    /// The job that makes the complete upload durable and moves it into place (once).
    pub fn take_commit(&mut self) -> Option<Commit> {
        let temp = self.temp.take()?;
        let mut tail = Vec::new();
        if let Some(decoder) = self.netascii.as_mut() {
            decoder.finish(&mut tail);
        }
        Some(Commit { temp, target: self.target.clone(), overwrite: self.overwrite, tail })
    }

    fn commit(&mut self) -> Result<(), (ErrorCode, &'static str)> {
        self.take_commit().ok_or((ErrorCode::NotDefined, "upload already finished"))?.run()
    }
}

impl Commit {
    /// fsync, then move into place: atomically replacing with --allow-overwrite, else linking
    /// (which fails if the name exists) and unlinking the temporary name.
    pub fn run(self) -> Result<(), (ErrorCode, &'static str)> {
        let Self { mut temp, target, overwrite, tail } = self;
        temp.write_all(&tail).map_err(|_| (ErrorCode::DiskFull, "cannot write the file"))?;
        temp.as_file().sync_all().map_err(|_| (ErrorCode::DiskFull, "cannot sync the file"))?;
        if overwrite {
            temp.persist(&target).map_err(|_| (ErrorCode::AccessViolation, "cannot move the file into place"))?;
        } else {
            temp.persist_noclobber(&target).map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    (ErrorCode::FileExists, "file already exists")
                } else {
                    (ErrorCode::AccessViolation, "cannot move the file into place")
                }
            })?;
        }
        if let Some(dir) = target.parent().and_then(|d| File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

const fn libc_enospc() -> i32 {
    28
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::rto::{MAX_RETRIES, QUICK};

    const MS: Duration = Duration::from_millis(1);
    const PACE: Pace = Pace { floor: Duration::from_millis(2), timeout: Duration::from_secs(1), negotiated: false };

    fn now() -> Instant {
        Instant::now()
    }

    fn source(len: usize) -> Source {
        Source::Memory((0..len).map(|i| u8::try_from(i % 251).unwrap()).collect())
    }

    /// A balancer's mirrored session can lag behind the client: the header says 100 blocks
    /// went out, the client has 500. The server that resumes from the header must take the
    /// client's ACK of 500 as the truth, not as a stale ACK of something never sent (it stalled
    /// the transfer for good: the client ignores the old window it gets again).
    #[test]
    fn a_resumed_transfer_believes_a_client_ahead_of_the_balancers_view() {
        let mut t = ReadTransfer::resume(source(1_000_000), 512, 16, 100, PACE, RttEstimate::default()).unwrap();
        assert_eq!(t.on_ack(84, true, now()), Next::Send(85..=100), "the nudge resends the window the header names");
        assert_eq!(t.on_ack(500, false, now()), Next::Send(501..=516), "the client is further on");
        assert_eq!(t.on_ack(516, false, now()), Next::Send(517..=532));
        // Once in step again, an ACK of something never sent is stale as before.
        assert_eq!(t.on_ack(9000, false, now()), Next::Nothing);
    }

    /// EDK2 acknowledges every DATA it did not expect with an ACK of its last block in order.
    /// After a nudge resent a window the client partly had, its equal ACKs are echoes of that
    /// one resend: one window answers them all, not one each (which multiplied the copies
    /// without end). A repeat beyond the echoes is news of a loss again.
    #[test]
    fn the_echoes_of_a_resent_window_get_one_answer() {
        let mut t = ReadTransfer::new(source(360 * 1468), 1468, 4, false, PACE).unwrap();
        t.start(now());
        assert_eq!(t.on_ack(4, false, now()), Next::Send(5..=8));
        assert_eq!(t.on_ack(8, false, now()), Next::Send(9..=12));
        // A balancer took over with a view of block 4: the nudge resends 5..8, which the
        // client (at 12) had; it answers each with ACK 12.
        assert_eq!(t.on_ack(4, true, now()), Next::Send(9..=12), "from the later of the nudge and the last ACK seen");
        assert_eq!(t.on_ack(12, false, now()), Next::Send(13..=16));
        for echo in 0..3 {
            assert_eq!(t.on_ack(12, false, now()), Next::Nothing, "echo {echo} of the resent window");
        }
        assert_eq!(t.on_ack(16, false, now()), Next::Send(17..=20), "progress as usual");
        // Block 17 lost: the client answers 18, 19 and 20 with ACK 16 each. One resend.
        assert_eq!(t.on_ack(16, false, now()), Next::Send(17..=20));
        assert_eq!(t.on_ack(16, false, now()), Next::Nothing, "the answer to 19");
        assert_eq!(t.on_ack(16, false, now()), Next::Nothing, "the answer to 20");
        assert_eq!(t.on_ack(16, false, now()), Next::Send(17..=20), "a repeat beyond them: the resend was lost too");
        // Both resends arrive; the client had 18..20 from the first window: ACK 20 comes back
        // once per copy of 18..20 and for 17's completion of the window, 7 times in all.
        assert_eq!(t.on_ack(20, false, now()), Next::Send(21..=24));
        for echo in 0..7 {
            assert_eq!(t.on_ack(20, false, now()), Next::Nothing, "echo {echo} of the two resends");
        }
        assert_eq!(t.on_ack(24, false, now()), Next::Send(25..=28));
    }

    #[test]
    fn retransmissions_back_off_and_progress_resets_them() {
        let mut t = ReadTransfer::new(source(10_000), 512, 4, false, PACE).unwrap();
        t.start(now());
        assert_eq!(t.wait(), 1000 * MS, "no round trip measured yet: the timeout");
        assert_eq!((t.on_timeout(now()), t.retries()), (Next::Send(4..=4), 1), "first a probe of the window's tail");
        assert_eq!(t.wait(), 1000 * MS, "doubling, but never beyond the timeout while quick");
        assert_eq!(t.on_timeout(now()), Next::Send(1..=4), "then the window");
        assert_eq!(t.retries(), 2);
        t.on_ack(4, false, now());
        assert_eq!(t.retries(), 0, "an ACK that moves forward starts the backoff again");
    }

    /// A lost block costs a few round trips, not the 1 s timeout: the timer follows the round
    /// trips the ACKs measure, down to the floor, and doubles while nothing comes back.
    #[test]
    fn the_timer_follows_the_measured_round_trip() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(100 * 512), 512, 1, false, PACE).unwrap();
        t.start(t0);
        let mut at = t0;
        for block in 1..=10 {
            at += 3 * MS;
            assert_eq!(t.on_ack(block, false, at), Next::Send(block + 1..=block + 1));
        }
        let rto = t.wait();
        assert!(rto > 3 * MS && rto < 10 * MS, "3 ms round trips: {rto:?}");
        assert_eq!(t.on_timeout(at + rto), Next::Send(11..=11));
        assert_eq!(t.wait(), rto * 2, "backed off");
        // Karn: the ACK of the resent block says nothing of the round trip, and the backoff
        // stays until one that does.
        let at = at + 500 * MS;
        assert_eq!(t.on_ack(11, false, at), Next::Send(12..=12));
        assert_eq!(t.wait(), rto * 2, "no sample from the resent block");
        assert_eq!(t.on_ack(12, false, at + 3 * MS), Next::Send(13..=13));
        assert!(t.wait() <= rto, "a clean sample of the same round trip: {:?}", t.wait());
    }

    /// Over a lossy link nearly every window of 16 needs a repair, which resends its blocks:
    /// the round trip must still be measured, from the first block of the window, by an ACK
    /// from inside it (atftp's gap ACK), or the timer stays at the 1 s timeout for good.
    #[test]
    fn a_window_that_needed_a_repair_still_measures_the_round_trip() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(100 * 1468), 1468, 16, false, PACE).unwrap();
        assert_eq!(t.start(t0), Next::Send(1..=16));
        assert_eq!(t.wait(), 1000 * MS);
        // Block 5 lost: the client ACKs 4 once when 6 arrives.
        assert_eq!(t.on_ack(4, false, t0 + 20 * MS), Next::Send(5..=20), "from the gap at once");
        assert_eq!(t.wait(), 60 * MS, "SRTT 20 ms + 4 * RTTVAR 10 ms");
        assert_eq!(t.on_timeout(t0 + 80 * MS), Next::Send(5..=20), "after a partial ACK: the window from the gap");
    }

    #[test]
    fn a_resumed_transfer_starts_from_the_previous_servers_estimate() {
        let mut rtt = RttEstimate::default();
        rtt.sample(4 * MS);
        let t = ReadTransfer::resume(source(100_000), 512, 4, 50, PACE, rtt).unwrap();
        assert_eq!(t.wait(), rtt.rto(PACE));
        assert!(t.wait() < 20 * MS);
    }

    /// A second OACK aborts atftp: it waits for the client's own timer, and a repeated request gets
    /// one only when it cannot be a copy of the first (half the timeout after the OACK).
    #[test]
    fn the_oack_is_resent_rarely() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(10_000), 512, 4, true, PACE).unwrap();
        assert_eq!(t.start(t0), Next::Send(0..=0));
        assert_eq!(t.wait(), 6000 * MS, "OACK: after the client's own 5 s timer");
        assert_eq!(t.on_repeated_request(t0 + 10 * MS), Next::Nothing, "a copy of the request");
        assert_eq!(t.on_repeated_request(t0 + 600 * MS), Next::Send(0..=0), "the client asks again: the OACK was lost");
        assert_eq!(t.on_repeated_request(t0 + 700 * MS), Next::Nothing, "that answer is 100 ms old");
        assert_eq!(t.on_timeout(t0 + 2600 * MS), Next::Send(0..=0));
        assert_eq!(t.on_ack(0, false, t0 + 2601 * MS), Next::Send(1..=4));
        assert_eq!(t.on_repeated_request(t0 + 3000 * MS), Next::Nothing, "acknowledged: never again");
        assert!(t.wait() >= 1000 * MS, "the ACK of a resent OACK is no sample");
    }

    /// tftp-hpa asks no options: its first answer is DATA 1. Lost with a failed balancer, it
    /// comes again on the repeated request (a copy of the request soon after gets nothing).
    #[test]
    fn a_repeated_request_well_after_data_1_gets_it_again() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(10_000), 512, 1, false, PACE).unwrap();
        assert_eq!(t.start(t0), Next::Send(1..=1));
        assert_eq!(t.on_repeated_request(t0 + 10 * MS), Next::Nothing, "a copy of the request");
        assert_eq!(t.on_repeated_request(t0 + 600 * MS), Next::Send(1..=1), "DATA 1 was lost");
        assert_eq!(t.on_repeated_request(t0 + 700 * MS), Next::Nothing, "that answer is 100 ms old");
        assert_eq!(t.on_ack(1, false, t0 + 701 * MS), Next::Send(2..=2));
        assert_eq!(t.on_repeated_request(t0 + 3000 * MS), Next::Nothing, "acknowledged: never again");
    }

    /// atftp aborts on a second OACK. A takeover's nudge of block 0 from a balancer that saw the
    /// OACK pass means the client's ACK 0 was lost: DATA follows, no OACK.
    #[test]
    fn a_nudge_after_the_oack_passed_goes_on_as_its_ack() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(10_000), 512, 4, true, PACE).unwrap();
        assert_eq!(t.start(t0), Next::Send(0..=0));
        assert_eq!(t.on_ack(0, true, t0 + 150 * MS), Next::Send(1..=4));
        assert_eq!(t.on_repeated_request(t0 + 900 * MS), Next::Send(1..=4), "the OACK counts as acknowledged: DATA again, never a second OACK");
    }

    /// GRUB never retransmits in the data phase, and every client waits for its own timer when
    /// the first answer was lost with a failed balancer: a takeover's nudge of a session no
    /// reply of which passed the balancers sends that answer again at once.
    #[test]
    fn an_unanswered_nudge_sends_the_first_answer_again() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(10_000), 512, 4, true, PACE).unwrap();
        assert_eq!(t.start(t0), Next::Send(0..=0));
        assert_eq!(t.on_unanswered_nudge(t0 + 150 * MS), Next::Send(0..=0), "the OACK again");
        assert_eq!(t.on_repeated_request(t0 + 200 * MS), Next::Nothing, "the client's repeat crossed it");
        assert_eq!(t.on_ack(0, false, t0 + 201 * MS), Next::Send(1..=4));
        let mut plain = ReadTransfer::new(source(10_000), 512, 1, false, PACE).unwrap();
        assert_eq!(plain.start(t0), Next::Send(1..=1));
        assert_eq!(plain.on_unanswered_nudge(t0 + 150 * MS), Next::Send(1..=1), "DATA 1 again");
    }

    /// The first exchange gives the first sample: a transfer with options measures the OACK,
    /// taken as at least `FIRST_ANSWER_FLOOR` (a client takes longer with a block than with
    /// an OACK).
    #[test]
    fn the_oack_exchange_gives_the_first_sample() {
        let t0 = now();
        let mut t = ReadTransfer::new(source(10_000), 512, 1, true, PACE).unwrap();
        t.start(t0);
        t.on_ack(0, false, t0 + 30 * MS);
        assert_eq!(t.wait(), 90 * MS, "SRTT 30 + 4 * RTTVAR 15");
        let mut quick = ReadTransfer::new(source(10_000), 512, 1, true, PACE).unwrap();
        quick.start(t0);
        quick.on_ack(0, false, t0 + MS);
        assert_eq!(quick.wait(), 60 * MS, "an OACK answered in 1 ms counts as 20 (SRTT 20 + 4 * RTTVAR 10)");
    }

    #[test]
    fn lock_step_download_with_exact_multiple_ends_with_an_empty_block() {
        let mut t = ReadTransfer::new(source(1024), 512, 1, false, PACE).unwrap();
        assert_eq!(t.start(now()), Next::Send(1..=1));
        assert_eq!(t.on_ack(1, false, now()), Next::Send(2..=2));
        assert_eq!(t.on_ack(2, false, now()), Next::Send(3..=3));
        let mut buf = [0u8; 512];
        assert_eq!(t.read_blocks(3, 1, &mut buf).unwrap(), 0, "the terminating empty block");
        assert_eq!(t.on_ack(3, false, now()), Next::Finished);
    }

    #[test]
    fn a_stale_copy_catches_up_with_the_balancers_view() {
        // This server sent up to 8 and saw ACK 4; the transfer then ran elsewhere up to 20.
        let mut t = ReadTransfer::new(source(100 * 100), 100, 4, false, PACE).unwrap();
        t.start(now());
        t.on_ack(4, false, now());
        assert_eq!(t.sent(), 8);
        assert_eq!(t.on_ack(16, false, now()), Next::Nothing, "beyond what this copy sent: stale");
        t.catch_up(20);
        assert_eq!(t.on_ack(16, false, now()), Next::Send(17..=20), "after catching up, a whole window");
        t.catch_up(10);
        assert_eq!(t.sent(), 20, "never backwards");
    }

    #[test]
    fn windows_and_partial_acks() {
        let mut t = ReadTransfer::new(source(10 * 100 + 5), 100, 4, true, PACE).unwrap();
        assert_eq!(t.start(now()), Next::Send(0..=0), "OACK first");
        assert_eq!(t.on_ack(0, false, now()), Next::Send(1..=4));
        assert_eq!(t.on_ack(2, false, now()), Next::Send(3..=6), "a gap ACK: resend from the gap at once");
        assert_eq!(t.on_ack(2, false, now()), Next::Send(3..=6), "a repeated ACK means loss again: resend after it");
        assert_eq!(t.on_ack(4, false, now()), Next::Send(7..=8), "inside the resend: an echo, new blocks only");
        assert_eq!(t.on_timeout(now()), Next::Send(5..=8));
        assert_eq!(t.on_ack(9, false, now()), Next::Nothing, "beyond what was sent");
        assert_eq!(t.on_ack(6, false, now()), Next::Send(9..=10), "inside the timer's resend: an echo too");
        assert_eq!(t.on_ack(10, false, now()), Next::Send(11..=11));
        assert_eq!(t.on_ack(11, false, now()), Next::Finished);
    }

    /// A client that stalls now and then without losing anything (GRUB in a VM on a busy
    /// host) answers a block late, after the timer resent it, and then answers the copy too.
    /// That second ACK shows the resend was needless: the timer learns the stall and stops
    /// resending at every one.
    #[test]
    fn a_needless_resend_raises_the_floor_to_the_stall_it_showed() {
        // Twenty blocks answered 100 µs after each went out; block 21 went out at the time
        // returned.
        let fast = || {
            let mut t = ReadTransfer::new(source(1000 * 512), 512, 1, false, PACE).unwrap();
            let mut at = now();
            t.start(at);
            for block in 1..=20 {
                at += MS / 10;
                assert_eq!(t.on_ack(block, false, at), Next::Send(block + 1..=block + 1));
            }
            (t, at)
        };
        let (mut t, at) = fast();
        assert_eq!(t.wait(), PACE.floor, "100 µs round trips: the floor");
        // The client stalls 10 ms; the timer resends block 21.
        assert_eq!(t.on_timeout(at + PACE.floor), Next::Send(21..=21));
        let answered = at + 10 * MS;
        assert_eq!(t.on_ack(21, false, answered), Next::Send(22..=22));
        assert_eq!(t.on_ack(21, false, answered + MS / 20), Next::Nothing, "the answer to the copy");
        assert!(t.wait() >= 10 * MS, "the stall is the least wait now: {:?}", t.wait());
        // A repeat long after (the client's own timer: block 22 lost) proves nothing.
        let (mut u, at) = fast();
        u.on_timeout(at + PACE.floor);
        u.on_ack(21, false, at + 3 * MS);
        assert_eq!(u.on_ack(21, false, at + 1003 * MS), Next::Nothing);
        assert!(u.wait() < 10 * MS, "no needless resend shown: {:?}", u.wait());
    }

    /// A lost block costs one round trip, not a timer: the first ACK short of the window is a
    /// gap ACK (the client drops everything after the gap) and resends from the gap at once.
    /// EDK2 answers each of the 11 blocks behind the gap with that ACK: one resend for all.
    #[test]
    fn a_gap_ack_resends_from_the_gap_at_once_and_once() {
        let mut t = ReadTransfer::new(source(100 * 1468), 1468, 16, false, PACE).unwrap();
        assert_eq!(t.start(now()), Next::Send(1..=16));
        assert_eq!(t.on_ack(4, false, now()), Next::Send(5..=20), "block 5 lost: from the gap, now");
        for echo in 0..10 {
            assert_eq!(t.on_ack(4, false, now()), Next::Nothing, "EDK2's answer {echo} to a block behind the gap");
        }
        assert_eq!(t.on_ack(4, false, now()), Next::Send(5..=20), "one more: the resend lost block 5 again");
        assert_eq!(t.on_ack(20, false, now()), Next::Send(21..=36), "in phase with the client's count");
        // The window's ACK was lost: the tail probe's answer shows a gap at 30.
        assert_eq!(t.on_timeout(now()), Next::Send(36..=36));
        assert_eq!(t.on_ack(29, false, now()), Next::Send(30..=45), "a probe's gap answer resends at once too");
    }

    #[test]
    fn lock_step_duplicates_wait_for_the_timer() {
        let mut t = ReadTransfer::new(source(2000), 512, 1, false, PACE).unwrap();
        t.start(now());
        assert_eq!(t.on_ack(1, false, now()), Next::Send(2..=2));
        assert_eq!(t.on_ack(1, false, now()), Next::Nothing, "no Sorcerer's Apprentice");
    }

    /// Once the quick resends went unanswered the server is quiet for seconds, waiting for the
    /// client's own retransmission: a repeated ACK then is that retransmission, and gets the
    /// block at once (it used to wait out the quiet gap: 6 s stalls in the lossy tests).
    #[test]
    fn a_repeated_ack_in_the_quiet_gap_is_answered_at_once() {
        let mut t = ReadTransfer::new(source(20 * 512), 512, 1, false, PACE).unwrap();
        t.start(now());
        assert_eq!(t.on_ack(1, false, now()), Next::Send(2..=2));
        for _ in 0..QUICK {
            assert_eq!(t.on_timeout(now()), Next::Send(2..=2));
        }
        assert!(t.wait() >= 6000 * MS, "quiet: {:?}", t.wait());
        let at = now();
        assert_eq!(t.on_ack(1, false, at), Next::Send(2..=2), "the client's retransmission");
        assert_eq!(t.on_ack(1, false, at + MS), Next::Nothing, "a storm of repeats: one answer per half timeout");
        assert_eq!(t.on_ack(1, false, at + 600 * MS), Next::Send(2..=2), "the client's next retransmission");
        let mut w = ReadTransfer::new(source(100 * 512), 512, 4, false, PACE).unwrap();
        w.start(now());
        assert_eq!(w.on_ack(4, false, now()), Next::Send(5..=8));
        for _ in 0..QUICK {
            w.on_timeout(now());
        }
        assert_eq!(w.on_ack(4, false, now()), Next::Send(5..=8), "windowed: no echo counting either");
        // Progress keeps the backoff just short of quiet (Karn): one more expiry is quiet
        // again, though only one retry since the progress.
        assert_eq!(w.on_ack(8, false, now()), Next::Send(9..=12));
        w.on_timeout(now());
        assert!(w.wait() >= 6000 * MS);
        assert_eq!(w.on_ack(8, false, now()), Next::Send(9..=12), "quiet by the backoff, not the retry count");
    }

    #[test]
    fn resume_from_the_middle_reads_the_right_bytes_and_nudge_resends() {
        let data: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i * 7 % 256).unwrap()).collect();
        let mut t = ReadTransfer::resume(Source::Memory(data.clone()), 1000, 2, 3, PACE, RttEstimate::default()).unwrap();
        assert_eq!(t.on_ack(2, true, now()), Next::Send(3..=4), "nudge: resend after the ACK now");
        let mut buf = [0u8; 1000];
        assert_eq!(t.read_blocks(4, 1, &mut buf).unwrap(), 1000);
        assert_eq!(&buf[..], &data[3000..4000]);
        assert_eq!(t.on_ack(4, false, now()), Next::Send(5..=6));
        assert_eq!(t.read_blocks(6, 1, &mut buf).unwrap(), 0);
    }

    #[test]
    fn read_blocks_reads_a_window_at_once_and_stops_at_the_end() {
        let data: Vec<u8> = (0..1050u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let t = ReadTransfer::new(Source::Memory(data.clone()), 100, 4, false, PACE).unwrap();
        let mut buf = [0u8; 400];
        assert_eq!(t.read_blocks(3, 4, &mut buf).unwrap(), 400);
        assert_eq!(&buf[..], &data[200..600]);
        assert_eq!(t.read_blocks(10, 4, &mut buf).unwrap(), 150, "blocks 10 and 11 (short), 12 and 13 past the end");
        assert_eq!(&buf[..150], &data[900..]);
        assert_eq!(t.read_blocks(12, 1, &mut buf).unwrap(), 0);
    }

    #[test]
    fn rollover_widens_16_bit_acks() {
        let mut t = ReadTransfer::new(source(70_000 * 8), 8, 1, false, PACE).unwrap();
        t.sent = 65_536;
        assert_eq!(t.widen(0), 65_536);
        assert_eq!(t.widen(65_535), 65_535);
    }

    #[test]
    fn timeouts_give_up_after_the_retry_limit() {
        let mut t = ReadTransfer::new(source(10), 512, 1, false, PACE).unwrap();
        t.start(now());
        for _ in 0..QUICK + MAX_RETRIES {
            assert_eq!(t.on_timeout(now()), Next::Send(1..=1));
        }
        assert_eq!(t.on_timeout(now()), Next::GiveUp);
    }

    #[test]
    fn upload_lands_only_when_complete_and_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("up.bin");
        let mut w = WriteTransfer::new(target.clone(), write_setup(UploadLimits::default())).unwrap();
        assert_eq!(w.on_data(1, b"abcd", now()), WriteNext::Ack(1));
        assert_eq!(w.on_data(1, b"abcd", now()), WriteNext::Nothing);
        assert!(!target.exists(), "nothing in place before the end");
        assert_eq!(w.on_data(2, b"ef", now()), WriteNext::Done(2));
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");

        let mut again = WriteTransfer::new(target.clone(), write_setup(UploadLimits::default())).unwrap();
        assert_eq!(again.on_data(1, b"x", now()), WriteNext::Fail(ErrorCode::FileExists, "file already exists"));
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");

        let aborted = WriteTransfer::new(dir.path().join("gone.bin"), write_setup(UploadLimits::default())).unwrap();
        drop(aborted);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "an aborted upload leaves nothing");
        let mut f = File::create(dir.path().join("x")).unwrap();
        f.write_all(b"").unwrap();
    }

    /// The steered loop and the standalone server run the fsync of a finished upload off their
    /// event loop: the last block only reports it complete, and the job puts it in place.
    #[test]
    fn a_deferred_commit_lands_the_file_only_when_its_job_runs() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("later.bin");
        let mut w = WriteTransfer::new(target.clone(), write_setup(UploadLimits::default())).unwrap();
        w.defer_commit();
        assert_eq!(w.on_data(1, b"abcd", now()), WriteNext::Ack(1));
        assert_eq!(w.on_data(2, b"ef", now()), WriteNext::Complete(2));
        assert!(!target.exists(), "not in place before the job ran");
        let job = w.take_commit().expect("one job");
        assert!(w.take_commit().is_none(), "only one");
        job.run().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
    }

    fn write_setup(limits: UploadLimits) -> WriteSetup {
        WriteSetup { blksize: 4, windowsize: 1, netascii: false, overwrite: false, oack: false, pace: PACE, limits }
    }

    /// Only the temporary file of the upload is left in `dir` (or nothing).
    fn files_in(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn an_upload_beyond_the_size_limit_fails_with_disk_full_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("big.bin");
        let mut w = WriteTransfer::new(target.clone(), write_setup(UploadLimits { max_bytes: Some(10), min_free: 0 })).unwrap();
        assert_eq!(w.on_data(1, b"abcd", now()), WriteNext::Ack(1));
        assert_eq!(w.on_data(2, b"efgh", now()), WriteNext::Ack(2));
        assert_eq!(w.on_data(3, b"ijkl", now()), WriteNext::Fail(ErrorCode::DiskFull, TOO_LARGE), "12 bytes > 10");
        assert!(files_in(dir.path()).is_empty(), "the temporary file is gone before the ERROR is sent: {:?}", files_in(dir.path()));
        drop(w);

        let mut exact = WriteTransfer::new(target.clone(), write_setup(UploadLimits { max_bytes: Some(10), min_free: 0 })).unwrap();
        assert_eq!(exact.on_data(1, b"abcd", now()), WriteNext::Ack(1));
        assert_eq!(exact.on_data(2, b"efgh", now()), WriteNext::Ack(2));
        assert_eq!(exact.on_data(3, b"ij", now()), WriteNext::Done(3), "exactly the limit is accepted");
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdefghij");
    }

    #[test]
    fn an_upload_that_would_eat_into_the_free_space_floor_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let free = available(&File::open(dir.path()).unwrap()).unwrap();
        let mut w = WriteTransfer::new(dir.path().join("f.bin"), write_setup(UploadLimits { max_bytes: None, min_free: free })).unwrap();
        assert_eq!(w.on_data(1, b"abcd", now()), WriteNext::Fail(ErrorCode::DiskFull, NO_ROOM), "the first block is checked");
        drop(w);
        assert!(files_in(dir.path()).is_empty());
    }

    #[test]
    fn free_space_is_looked_up_once_per_step() {
        assert!(UploadLimits::free_space_due(0, 512), "the first block");
        assert!(!UploadLimits::free_space_due(512, 512));
        assert!(UploadLimits::free_space_due(FREE_SPACE_STEP - 100, 512), "crossing a step");
        assert!(!UploadLimits::free_space_due(FREE_SPACE_STEP, 512));
        let floor = UploadLimits { max_bytes: None, min_free: 64 << 20 };
        assert!(floor.room((64 << 20) + FREE_SPACE_STEP), "the floor and a step to spare");
        assert!(!floor.room((64 << 20) + FREE_SPACE_STEP - 1));
        assert!(UploadLimits::default().fits(u64::MAX - 1, 1), "no size limit");
    }
}
