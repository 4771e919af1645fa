//! The one sender of a read's windows, for both modes: DATA blocks leave a batch at a time, one
//! file read and one system call for up to a window (a UDP_SEGMENT sendmsg, else sendmmsg:
//! `batch.rs`). Blocks are read back to back into one buffer, each datagram's header (the
//! [`Prefix`] of the mode, then the DATA header emitted by [`Repr::Data`]) into another, and the
//! system call gathers each datagram from its header and its block: nothing is copied.
//!
//! What differs between the modes is a parameter: what precedes each DATA (nothing standalone,
//! the steering header steered), where the datagrams go and what a failed send does ([`Link`]),
//! and whether the buffer keeps blocks read ahead (a sender of one transfer) or not (one
//! shared by all). The blocks come from a download's file, or from an upload's temporary read
//! back for its copy on another backend ([`Blocks`]).

use std::io;

use xdp_lb_common::SteeringHeader;

use crate::{
    batch::SendBatch,
    transfer::ReadTransfer,
    wire::{DATA_HEADER_LEN, Repr},
};

/// A file sent block by block: a download's, or an upload's as far as it is written.
pub trait Blocks {
    fn blksize(&self) -> u16;
    /// Reads blocks `first..first + count` into `buf` (up to its length); returns the bytes
    /// read, fewer than the blocks only at the file's end.
    fn read_blocks(&self, first: u32, count: u32, buf: &mut [u8]) -> io::Result<usize>;
}

impl Blocks for ReadTransfer {
    fn blksize(&self) -> u16 {
        self.blksize
    }

    fn read_blocks(&self, first: u32, count: u32, buf: &mut [u8]) -> io::Result<usize> {
        Self::read_blocks(self, first, count, buf)
    }
}

/// What a mode puts before each DATA.
pub trait Prefix {
    /// Its length, the same for every block.
    const LEN: usize;
    /// Writes the prefix of block `n` (32-bit) into `out`, [`Self::LEN`] bytes.
    fn write(&self, n: u32, out: &mut [u8]);
}

/// Standalone: nothing precedes DATA.
impl Prefix for () {
    const LEN: usize = 0;
    fn write(&self, _: u32, _: &mut [u8]) {}
}

/// Steered: the session's steering header, carrying the block it precedes.
impl Prefix for SteeringHeader {
    const LEN: usize = Self::LEN;
    fn write(&self, n: u32, out: &mut [u8]) {
        let mut header = *self;
        header.set_block(n);
        out.copy_from_slice(bytemuck::bytes_of(&header));
    }
}

/// Where a window goes, and what a failed send does to it.
pub trait Link {
    /// Sends `datagrams` (each a header and a payload, every one but the last `segment` bytes
    /// long) with `batch`, without waiting; returns how many the kernel took (at least one),
    /// or `WouldBlock` while the socket's buffer is full.
    fn try_send<'a>(&self, batch: &mut SendBatch, segment: usize, datagrams: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> io::Result<usize>;

    /// Waits until a send refused with `WouldBlock` may be tried again.
    async fn ready(&self) -> io::Result<()>;

    /// A send failed with `error`: `Err` ends the window with it, `Ok` skips the first datagram
    /// not taken and goes on with the next.
    fn failed(&self, error: io::Error) -> io::Result<()>;
}

/// Whether the buffer keeps what a file read brought beyond the batch asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reads {
    /// Every file read fills the buffer, and later batches it holds are served from memory: a
    /// lock-step transfer reads once per bufferful, not per block, and a retransmission costs
    /// no read. Only for a sender owned by one transfer.
    Ahead,
    /// Each batch is read from the file when it is sent, nothing more: a sender shared by
    /// every transfer (steered), whose buffer holds another transfer's blocks by the next call.
    AsNeeded,
}

/// Which blocks the buffer holds (`Reads::Ahead`): from `first`, `read` bytes of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    first: u32,
    read: usize,
}

/// The buffers and system-call arguments of windows with prefix `P`, allocated once.
pub struct WindowSender<P: Prefix> {
    /// The DATA of a batch, back to back (one file read).
    blocks: Vec<u8>,
    held: Option<Held>,
    reads: Reads,
    /// Each datagram's prefix and DATA header, `P::LEN + DATA_HEADER_LEN` bytes apiece.
    headers: Vec<u8>,
    batch: SendBatch,
    /// Most datagrams per system call.
    max_blocks: usize,
    prefix: std::marker::PhantomData<fn(&P)>,
}

impl<P: Prefix> WindowSender<P> {
    /// The sender of one transfer's windows: its buffer is whole blocks, `bytes` of them (one
    /// block at least) whatever the window, filled by every file read (`Reads::Ahead`); a
    /// system call sends at most a window.
    pub fn for_transfer(transfer: &ReadTransfer, bytes: usize) -> Self {
        let blksize = usize::from(transfer.blksize);
        let held = (bytes / blksize).max(1);
        Self::new(blksize * held, held.min(usize::from(transfer.windowsize)), Reads::Ahead)
    }

    /// A sender shared by every transfer: up to `max_blocks` datagrams per system call, each
    /// batch read into a buffer of `bytes` (at least one block of every transfer it serves)
    /// as it is sent (`Reads::AsNeeded`).
    pub fn shared(bytes: usize, max_blocks: usize) -> Self {
        Self::new(bytes, max_blocks, Reads::AsNeeded)
    }

    fn new(buffer: usize, max_blocks: usize, reads: Reads) -> Self {
        let max_blocks = max_blocks.max(1);
        Self {
            blocks: vec![0; buffer],
            held: None,
            reads,
            headers: vec![0; max_blocks * (P::LEN + DATA_HEADER_LEN)],
            batch: SendBatch::new(max_blocks),
            max_blocks,
            prefix: std::marker::PhantomData,
        }
    }

    /// Lets (or stops) batches to an explicit destination leave as one UDP_SEGMENT
    /// super-packet (see [`SendBatch::segment_send_to`]).
    pub const fn segment_send_to(&mut self, on: bool) {
        self.batch.segment_send_to(on);
    }

    /// Sends DATA blocks `first..=last` of `transfer` over `link`, each after `prefix`. An error
    /// is a failed file read, or a failed send that `link` ends the window with.
    pub async fn send(&mut self, link: &impl Link, transfer: &impl Blocks, prefix: &P, first: u32, last: u32) -> io::Result<()> {
        let blksize = usize::from(transfer.blksize());
        let per_batch = u32::try_from((self.blocks.len() / blksize).clamp(1, self.max_blocks)).unwrap_or(1);
        let stride = P::LEN + DATA_HEADER_LEN;
        let mut n = first;
        while n <= last {
            let count = (last - n + 1).min(per_batch);
            let (at, read) = self.hold(transfer, n, count)?;
            for (slot, block) in self.headers.chunks_exact_mut(stride).zip(n..n + count) {
                let (before, data) = slot.split_at_mut(P::LEN);
                prefix.write(block, before);
                // The DATA header alone: the block itself is the datagram's second part.
                #[expect(clippy::cast_possible_truncation, reason = "the wire carries the low 16 bits of the block number")]
                Repr::Data { block: block as u16, data: &[] }.emit(data);
            }
            let (headers, blocks) = (&self.headers, &self.blocks[at..]);
            let packet = |i: usize| {
                let from = i * blksize;
                (&headers[i * stride..(i + 1) * stride], &blocks[from..from + read.saturating_sub(from).min(blksize)])
            };
            // The kernel may take fewer than all (a full send buffer): send the rest again.
            let mut sent = 0;
            while sent < count as usize {
                let packets = (sent..count as usize).map(packet);
                match link.try_send(&mut self.batch, stride + blksize, packets) {
                    Ok(taken) => sent += taken,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => link.ready().await?,
                    Err(error) => {
                        link.failed(error)?;
                        sent += 1;
                    }
                }
            }
            n += count;
        }
        Ok(())
    }

    /// Where blocks `first..first + count` start in the buffer, reading them from the file
    /// unless it holds them all; and how many bytes from there are the file's.
    fn hold(&mut self, transfer: &impl Blocks, first: u32, count: u32) -> io::Result<(usize, usize)> {
        let blksize = usize::from(transfer.blksize());
        let blocks_held = u32::try_from(self.blocks.len() / blksize).unwrap_or(u32::MAX);
        if let Some(Held { first: start, read }) = self.held {
            // A read short of the buffer met the file's end: the blocks after it are empty,
            // held too.
            if first >= start && first.saturating_add(count) <= start.saturating_add(blocks_held) {
                let at = (first - start) as usize * blksize;
                return Ok((at, read.saturating_sub(at)));
            }
        }
        let span = match self.reads {
            Reads::Ahead => blocks_held,
            Reads::AsNeeded => count,
        };
        let read = transfer.read_blocks(first, span, &mut self.blocks)?;
        if self.reads == Reads::Ahead {
            self.held = Some(Held { first, read });
        }
        Ok((0, read))
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, io, net::UdpSocket, os::fd::AsFd as _, time::Duration};

    use super::{Held, Link, Prefix, WindowSender};
    use crate::{
        batch::SendBatch,
        transfer::{ReadTransfer, Source},
    };

    /// What the standalone mode holds per transfer.
    const BATCH_BYTES: usize = 32 << 10;

    /// 100 blocks of 1000 bytes, the block size a transfer of it negotiated.
    fn transfer(windowsize: u16) -> (Vec<u8>, ReadTransfer) {
        let data: Vec<u8> = (0..100_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let transfer = ReadTransfer::new(Source::Memory(data.clone()), 1000, windowsize, false, crate::rto::Pace { floor: Duration::from_millis(2), timeout: Duration::from_secs(1), negotiated: false }).unwrap();
        (data, transfer)
    }

    fn ahead(t: &ReadTransfer) -> WindowSender<()> {
        WindowSender::for_transfer(t, BATCH_BYTES)
    }

    /// The bytes of the block that `hold` pointed at.
    fn block<P: Prefix>(window: &WindowSender<P>, (at, read): (usize, usize)) -> &[u8] {
        &window.blocks[at..at + read.min(1000)]
    }

    /// A fixed prefix, its last byte marked with the block's low byte.
    impl Prefix for [u8; 2] {
        const LEN: usize = 2;
        fn write(&self, n: u32, out: &mut [u8]) {
            out.copy_from_slice(self);
            out[1] ^= n.to_le_bytes()[0];
        }
    }

    fn held_from<P: Prefix>(window: &WindowSender<P>) -> Option<u32> {
        window.held.map(|Held { first, .. }| first)
    }

    #[test]
    fn a_lock_step_read_holds_the_blocks_ahead_and_reads_again_only_past_them() {
        let (data, t) = transfer(1);
        let mut window = ahead(&t);
        let ahead = BATCH_BYTES / 1000;
        assert_eq!(window.max_blocks, 1, "lock-step: one block per send");
        let first = window.hold(&t, 1, 1).unwrap();
        assert_eq!(block(&window, first), &data[..1000]);
        assert_eq!(held_from(&window), Some(1));
        for n in [2, 17, u32::try_from(ahead).unwrap(), 1] {
            let at = window.hold(&t, n, 1).unwrap();
            let from = (n as usize - 1) * 1000;
            assert_eq!(block(&window, at), &data[from..from + 1000], "block {n}");
            assert_eq!(held_from(&window), Some(1), "block {n} came from memory");
        }
        let past = u32::try_from(ahead + 1).unwrap();
        let at = window.hold(&t, past, 1).unwrap();
        assert_eq!(block(&window, at), &data[ahead * 1000..(ahead + 1) * 1000]);
        assert_eq!(held_from(&window), Some(past), "read again from the block asked for");
    }

    #[test]
    fn the_end_of_the_file_is_held_with_its_empty_last_block() {
        let (data, t) = transfer(16);
        let mut window = ahead(&t);
        // Blocks 91..=100 and the empty block 101 that ends a file of whole blocks.
        let at = window.hold(&t, 91, 11).unwrap();
        assert_eq!(at, (0, 10_000));
        assert_eq!(&window.blocks[..10_000], &data[90_000..]);
        let last = window.hold(&t, 101, 1).unwrap();
        assert_eq!((last.1, held_from(&window)), (0, Some(91)), "empty, and from memory");
        // A window starting before what is held reads again.
        let at = window.hold(&t, 90, 2).unwrap();
        assert_eq!(block(&window, at), &data[89_000..90_000]);
        assert_eq!(held_from(&window), Some(90));
    }

    #[test]
    fn a_shared_sender_reads_only_the_batch_and_keeps_nothing() {
        let (data, t) = transfer(16);
        let mut window = WindowSender::<()>::shared(64 << 10, 64);
        let at = window.hold(&t, 3, 2).unwrap();
        assert_eq!(at, (0, 2000));
        assert_eq!(&window.blocks[..2000], &data[2000..4000]);
        assert_eq!(held_from(&window), None);
        let at = window.hold(&t, 4, 1).unwrap();
        assert_eq!((at, &window.blocks[..1000]), ((0, 1000), &data[3000..4000]), "read again");
    }

    /// A connected socket; every failure is counted, and skips the datagram.
    struct Connected {
        socket: UdpSocket,
        failures: RefCell<Vec<io::ErrorKind>>,
    }

    impl Link for Connected {
        fn try_send<'a>(&self, batch: &mut SendBatch, segment: usize, datagrams: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> io::Result<usize> {
            batch.send(self.socket.as_fd(), segment, datagrams)
        }

        async fn ready(&self) -> io::Result<()> {
            Ok(())
        }

        fn failed(&self, error: io::Error) -> io::Result<()> {
            self.failures.borrow_mut().push(error.kind());
            Ok(())
        }
    }

    #[test]
    fn each_block_leaves_after_its_prefix_and_data_header() {
        let (data, t) = transfer(16);
        let (a, b) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        a.connect(b.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let link = Connected { socket: a, failures: RefCell::new(Vec::new()) };
        // Batches of 3 over blocks 98..=101: the last two short (100 is whole, 101 empty).
        let mut window = WindowSender::<[u8; 2]>::shared(3000, 3);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(window.send(&link, &t, &[0xaa, 0x00], 98, 101)).unwrap();
        let mut buf = [0u8; 2048];
        for n in 98..=101u32 {
            let len = b.recv(&mut buf).unwrap();
            let from = ((n as usize - 1) * 1000).min(data.len());
            let to = (from + 1000).min(data.len());
            let low = u8::try_from(n).unwrap();
            let expected = [&[0xaa, low][..], &[0, 3, 0, low][..], &data[from..to]].concat();
            assert_eq!(&buf[..len], &expected[..], "block {n}");
        }
        assert!(link.failures.borrow().is_empty());
    }
}
