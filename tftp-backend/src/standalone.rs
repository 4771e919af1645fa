//! Standalone mode: a plain TFTP server. Requests arrive on the service port; each transfer
//! gets a socket of its own on a new port (its TID, RFC 1350) and a task that runs it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{net::UdpSocket, sync::Mutex};
use tracing::{debug, info, warn};

use crate::{
    alarm::Alarm,
    batch::SendBatch,
    files::{Refusal, Root},
    rto::Budget,
    service::{self, Config},
    tid::TransferSocket,
    transfer::{Next, ReadTransfer, WriteNext, WriteTransfer},
    wire::{ErrorCode, MAX_PACKET, Packet, Repr},
};

/// Buffer for everything but DATA: RFC 1350's classic packet size.
const SMALL_PACKET: usize = 516;

pub async fn run(socket: UdpSocket, root: Root, config: Config) -> anyhow::Result<()> {
    let root = Arc::new(Mutex::new(root));
    let budget = Arc::new(std::sync::Mutex::new(Budget::new(config.retransmit_budget, Instant::now())));
    let config = Arc::new(config);
    let local_ip = socket.local_addr()?.ip();
    let mut buf = vec![0u8; MAX_PACKET];
    let active = Arc::new(AtomicUsize::new(0));
    let mut out = vec![0u8; SMALL_PACKET];
    loop {
        let (len, client) = socket.recv_from(&mut buf).await.context("receiving requests")?;
        if active.load(Ordering::Relaxed) >= config.max_transfers {
            // Refused from the service port, before a transfer port or a file is opened.
            debug!(%client, "busy: request refused");
            let end = service::emit_at(&Repr::Error { code: service::BUSY.code, message: service::BUSY.message }, &mut out, 0);
            let _ = socket.send_to(&out[..end], client).await;
            continue;
        }
        let request = buf[..len].to_vec();
        let (root, config, budget) = (Arc::clone(&root), Arc::clone(&config), Arc::clone(&budget));
        let slot = Active::take(&active);
        tokio::spawn(async move {
            if let Err(error) = serve(&request, client, local_ip, &root, &config, &budget).await {
                debug!(%client, %error, "transfer ended with an error");
            }
            drop(slot);
        });
    }
}

/// One transfer counted in `active` while it lives.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn take(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(active))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// IPv4 and UDP headers and the TFTP DATA header: what a block adds on the wire.
const DATA_OVERHEAD: usize = 20 + 8 + 4;

/// The limits with the block size lowered to what fits the path MTU toward the client (RFC
/// 2348: a block must not make the datagram fragment), when the kernel knows it.
fn clamped_to_path_mtu(config: &Config, socket: &TransferSocket) -> Config {
    let mut config = config.clone();
    if let Some(fits) = socket.path_mtu().and_then(|mtu| mtu.checked_sub(DATA_OVERHEAD)) {
        let smallest = u16::try_from(crate::options::BLKSIZE_MIN).unwrap_or(8);
        let fits = u16::try_from(fits).unwrap_or(u16::MAX).max(smallest);
        config.limits.max_blksize = config.limits.max_blksize.min(fits);
    }
    config
}

/// Runs one transfer from its request to the end.
async fn serve(request: &[u8], client: SocketAddr, local_ip: std::net::IpAddr, root: &Mutex<Root>, config: &Config, budget: &SharedBudget) -> anyhow::Result<()> {
    let socket = TransferSocket::bind(local_ip, client).context("binding a transfer port")?;
    let config = &clamped_to_path_mtu(config, &socket);
    // Requests, errors, ACKs and OACKs fit in 512 bytes; DATA gets a buffer sized to the
    // negotiated block in `read`, so thousands of transfers do not each hold 128 KiB.
    let mut out = vec![0u8; SMALL_PACKET];
    let repr = match Packet::parse(request) {
        Ok(repr) => repr,
        Err(error) => {
            debug!(%client, %error, "malformed request");
            return send_error(&socket, &mut out, &Refusal { code: ErrorCode::IllegalOperation, message: "malformed request" }).await;
        }
    };
    match repr {
        Repr::Rrq { filename, mode, options } => {
            let opened = service::open_read(&mut *root.lock().await, config, filename, mode, &options);
            match opened {
                Ok((transfer, negotiated)) => {
                    info!(%client, file = filename, size = transfer.size(), "read");
                    read(&socket, transfer, negotiated.oack, budget).await
                }
                Err(refusal) => send_error(&socket, &mut out, &refusal).await,
            }
        }
        Repr::Wrq { filename, mode, options } => {
            let opened = service::open_write(&*root.lock().await, config, filename, mode, &options);
            match opened {
                Ok((transfer, negotiated)) => {
                    info!(%client, file = filename, "write");
                    let first = if negotiated.oack.is_empty() { Repr::Ack { block: 0 } } else { Repr::Oack { options: negotiated.oack } };
                    write(&socket, &mut out, transfer, &first, budget).await
                }
                Err(refusal) => send_error(&socket, &mut out, &refusal).await,
            }
        }
        _ => send_error(&socket, &mut out, &Refusal { code: ErrorCode::IllegalOperation, message: "expected a request" }).await,
    }
}

/// The backend-wide retransmission budget, shared by every transfer's task.
type SharedBudget = std::sync::Mutex<Budget>;

/// What ended a wait for the client.
enum Heard {
    /// A datagram of this length is in the buffer.
    Datagram(usize),
    /// The retransmission timer fired, nothing was queued, and the budget allows a resend.
    Timeout,
}

/// Waits up to `wait` for the client. When the alarm rings, input already queued is read
/// first (under load a task may wake for its alarm after its answer arrived: no loss), and a
/// retransmission waits for the backend-wide budget.
async fn hear(socket: &TransferSocket, alarm: &mut Alarm, buf: &mut [u8], wait: Duration, budget: &SharedBudget) -> std::io::Result<Heard> {
    let mut deadline = Instant::now() + wait;
    loop {
        tokio::select! {
            biased;
            received = socket.recv(buf) => return received.map(Heard::Datagram),
            rang = alarm.until(deadline) => rang?,
        }
        if let Some(received) = socket.try_recv(buf) {
            return received.map(Heard::Datagram);
        }
        let now = Instant::now();
        match budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner).allow(now) {
            Ok(()) => return Ok(Heard::Timeout),
            Err(later) => deadline = now + later,
        }
    }
}

/// Charges a timer-driven retransmission's datagrams to the budget.
fn charge(budget: &SharedBudget, datagrams: u32) {
    budget.lock().unwrap_or_else(std::sync::PoisonError::into_inner).charge(datagrams);
}

async fn read(socket: &TransferSocket, mut transfer: ReadTransfer, oack: crate::wire::Options, budget: &SharedBudget) -> anyhow::Result<()> {
    // The client only sends ACKs and ERRORs (a repeated request reaches the service port); a
    // longer ERROR is cut, fails to parse, and the retry limit ends the transfer.
    let mut buf = vec![0u8; SMALL_PACKET];
    let mut window = Window::new(&transfer);
    let mut alarm = Alarm::new().context("creating a timer")?;
    let mut next = transfer.start(Instant::now());
    loop {
        match next {
            Next::Send(blocks) => {
                let (mut first, last) = blocks.into_inner();
                if first == 0 {
                    let end = service::emit_at(&Repr::Oack { options: oack }, &mut buf, 0);
                    socket.send(&buf[..end]).await?;
                    first = 1;
                }
                if first <= last {
                    window.send(socket, &transfer, first, last).await?;
                }
            }
            Next::Finished => return Ok(()),
            Next::GiveUp => {
                warn!("client stopped answering; transfer abandoned");
                return Ok(());
            }
            Next::Nothing => {}
        }
        next = match hear(socket, &mut alarm, &mut buf, transfer.wait(), budget).await? {
            Heard::Timeout => {
                let next = transfer.on_timeout(Instant::now());
                charge(budget, next.datagrams());
                next
            }
            Heard::Datagram(len) => match Packet::parse(&buf[..len]) {
                Ok(Repr::Ack { block }) => {
                    let block = transfer.widen(block);
                    transfer.on_ack(block, false, Instant::now())
                }
                Ok(Repr::Error { .. }) => return Ok(()),
                _ => Next::Nothing,
            },
        };
    }
}

/// DATA of a read, several blocks per file read and per system call: blocks are read back to
/// back into `buf`, their headers written to `headers`, and one system call gathers each packet
/// from its header and its block (a UDP_SEGMENT sendmsg, else sendmmsg: `batch`). A window of
/// 16 costs one read and one send instead of 16 of each, and nothing is copied. A file read
/// fills `buf` (`BATCH_BYTES`) whatever the window, so a lock-step transfer reads once per ~20
/// blocks, not per block, and serves a retransmission from memory; all of it is allocated with
/// the transfer.
struct Window {
    buf: Vec<u8>,
    /// Which blocks `buf` holds: the first, and the bytes read from it on.
    held: Option<(u32, usize)>,
    headers: Vec<[u8; 4]>,
    sender: SendBatch,
    blksize: usize,
    /// Blocks per system call: at most a window.
    batch: u32,
}

/// Largest DATA batch a transfer holds (for a window of 16 blocks of 1468 bytes: all of it).
const BATCH_BYTES: usize = 32 << 10;

impl Window {
    fn new(transfer: &ReadTransfer) -> Self {
        let blksize = usize::from(transfer.blksize);
        let held = (BATCH_BYTES / blksize).max(1);
        let batch = u32::try_from(held).unwrap_or(u32::MAX).min(u32::from(transfer.windowsize));
        let blocks = batch as usize;
        Self { buf: vec![0u8; blksize * held], held: None, headers: vec![[0u8; 4]; blocks], sender: SendBatch::new(blocks), blksize, batch }
    }

    /// Where blocks `first..first + count` start in `buf`, reading from the file at `first`
    /// when `buf` does not hold them all; and how many bytes from there are the file's.
    fn hold(&mut self, transfer: &ReadTransfer, first: u32, count: u32) -> std::io::Result<(usize, usize)> {
        let blocks_held = u32::try_from(self.buf.len() / self.blksize).unwrap_or(u32::MAX);
        if let Some((start, read)) = self.held {
            // A read short of `buf` met the file's end: the blocks after it are empty, held too.
            if first >= start && first.saturating_add(count) <= start.saturating_add(blocks_held) {
                let at = (first - start) as usize * self.blksize;
                return Ok((at, read.saturating_sub(at)));
            }
        }
        let read = transfer.read_blocks(first, blocks_held, &mut self.buf)?;
        self.held = Some((first, read));
        Ok((0, read))
    }

    /// Sends blocks `first..=last`.
    async fn send(&mut self, socket: &TransferSocket, transfer: &ReadTransfer, first: u32, last: u32) -> anyhow::Result<()> {
        let mut n = first;
        while n <= last {
            let count = (last - n + 1).min(self.batch);
            let (at, read) = self.hold(transfer, n, count)?;
            for (header, block) in self.headers.iter_mut().zip(n..n + count) {
                let block = (block & 0xffff) as u16;
                header[..2].copy_from_slice(&3u16.to_be_bytes());
                header[2..].copy_from_slice(&block.to_be_bytes());
            }
            let (buf, blksize) = (&self.buf[at..], self.blksize);
            let packet = |i: usize| {
                let at = i * blksize;
                (&self.headers[i][..], &buf[at..at + read.saturating_sub(at).min(blksize)])
            };
            // The kernel may take fewer than all (a full send buffer): send the rest again.
            let mut sent = 0;
            while sent < count as usize {
                let packets = (sent..count as usize).map(packet);
                sent += socket.send_with(|fd| self.sender.send(fd, 4 + blksize, packets.clone())).await?;
            }
            n += count;
        }
        Ok(())
    }
}

async fn write(socket: &TransferSocket, out: &mut [u8], mut transfer: WriteTransfer, first: &Repr<'_>, budget: &SharedBudget) -> anyhow::Result<()> {
    // One byte more than a full DATA packet, so an oversized one is seen as such, not cut.
    let mut buf = vec![0u8; (5 + usize::from(transfer.blksize)).min(MAX_PACKET + 1)];
    let mut alarm = Alarm::new().context("creating a timer")?;
    let end = service::emit_at(first, out, 0);
    socket.send(&out[..end]).await?;
    transfer.start(Instant::now());
    loop {
        let received = match hear(socket, &mut alarm, &mut buf, transfer.wait(), budget).await? {
            Heard::Timeout => {
                if !transfer.on_timeout() {
                    warn!("client stopped sending; upload abandoned");
                    return Ok(());
                }
                // Repeat the last acknowledgement (or the OACK before any data).
                let end = if transfer.last_ack() == 0 { service::emit_at(first, out, 0) } else { service::emit_at(&Repr::Ack { block: transfer.last_ack() }, out, 0) };
                socket.send(&out[..end]).await?;
                charge(budget, 1);
                continue;
            }
            Heard::Datagram(len) => len,
        };
        match Packet::parse(&buf[..received]) {
            Ok(Repr::Data { block, data }) => match transfer.on_data(block, data, Instant::now()) {
                WriteNext::Ack(n) => {
                    let end = service::emit_at(&Repr::Ack { block: n }, out, 0);
                    socket.send(&out[..end]).await?;
                }
                WriteNext::Done(n) => {
                    let end = service::emit_at(&Repr::Ack { block: n }, out, 0);
                    socket.send(&out[..end]).await?;
                    info!("upload complete");
                    return Ok(());
                }
                WriteNext::Nothing => {}
                WriteNext::Fail(code, message) => return send_error(socket, out, &Refusal { code, message }).await,
            },
            Ok(Repr::Error { .. }) => return Ok(()),
            _ => {}
        }
    }
}

async fn send_error(socket: &TransferSocket, out: &mut [u8], refusal: &Refusal) -> anyhow::Result<()> {
    let end = service::emit_at(&Repr::Error { code: refusal.code, message: refusal.message }, out, 0);
    socket.send(&out[..end]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{BATCH_BYTES, Window};
    use crate::transfer::{ReadTransfer, Source};

    /// 100 blocks of 1000 bytes, the block size a transfer of it negotiated.
    fn transfer(windowsize: u16) -> (Vec<u8>, ReadTransfer) {
        let data: Vec<u8> = (0..100_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let transfer = ReadTransfer::new(Source::Memory(data.clone()), 1000, windowsize, false, crate::rto::Pace { floor: std::time::Duration::from_millis(2), timeout: std::time::Duration::from_secs(1), negotiated: false }).unwrap();
        (data, transfer)
    }

    /// The bytes of block `n` (1-based) that `hold` pointed at.
    fn block(window: &Window, (at, read): (usize, usize)) -> &[u8] {
        &window.buf[at..at + read.min(window.blksize)]
    }

    #[test]
    fn a_lock_step_read_holds_the_blocks_ahead_and_reads_again_only_past_them() {
        let (data, t) = transfer(1);
        let mut window = Window::new(&t);
        let ahead = BATCH_BYTES / 1000;
        assert_eq!(window.batch, 1, "lock-step: one block per send");
        let first = window.hold(&t, 1, 1).unwrap();
        assert_eq!(block(&window, first), &data[..1000]);
        assert_eq!(window.held.map(|(start, _)| start), Some(1));
        for n in [2, 17, u32::try_from(ahead).unwrap(), 1] {
            let at = window.hold(&t, n, 1).unwrap();
            let from = (n as usize - 1) * 1000;
            assert_eq!(block(&window, at), &data[from..from + 1000], "block {n}");
            assert_eq!(window.held.map(|(start, _)| start), Some(1), "block {n} came from memory");
        }
        let past = u32::try_from(ahead + 1).unwrap();
        let at = window.hold(&t, past, 1).unwrap();
        assert_eq!(block(&window, at), &data[ahead * 1000..(ahead + 1) * 1000]);
        assert_eq!(window.held.map(|(start, _)| start), Some(past), "read again from the block asked for");
    }

    #[test]
    fn the_end_of_the_file_is_held_with_its_empty_last_block() {
        let (data, t) = transfer(16);
        let mut window = Window::new(&t);
        // Blocks 91..=100 and the empty block 101 that ends a file of whole blocks.
        let at = window.hold(&t, 91, 11).unwrap();
        assert_eq!(at, (0, 10_000));
        assert_eq!(&window.buf[..10_000], &data[90_000..]);
        let last = window.hold(&t, 101, 1).unwrap();
        assert_eq!((last.1, window.held.map(|(start, _)| start)), (0, Some(91)), "empty, and from memory");
        // A window starting before what is held reads again.
        let at = window.hold(&t, 90, 2).unwrap();
        assert_eq!(block(&window, at), &data[89_000..90_000]);
        assert_eq!(window.held.map(|(start, _)| start), Some(90));
    }
}
