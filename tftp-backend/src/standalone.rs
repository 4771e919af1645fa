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
    files::{Refusal, Root},
    rto::Budget,
    service::{self, Config},
    tid::TransferSocket,
    transfer::{Next, ReadTransfer, WriteNext, WriteTransfer},
    window::WindowSender,
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

/// The limits with the block size lowered to what fits the path MTU toward the client (RFC
/// 2348: a block must not make the datagram fragment), when the kernel knows it.
fn clamped_to_path_mtu(config: &Config, socket: &TransferSocket) -> Config {
    let mut config = config.clone();
    if let Some(mtu) = socket.path_mtu() {
        config.limits = config.limits.fit_path_mtu(mtu, 0);
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
                Ok((mut transfer, negotiated)) => {
                    info!(%client, file = filename, "write");
                    transfer.defer_commit();
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
    // Its buffer holds `BATCH_BYTES` whatever the window, so a lock-step transfer reads once per
    // ~20 blocks, not per block, and serves a retransmission from memory.
    let mut window = WindowSender::for_transfer(&transfer, BATCH_BYTES);
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
                    window.send(socket, &transfer, &(), first, last).await?;
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

/// Largest DATA batch a transfer holds (for a window of 16 blocks of 1468 bytes: all of it).
const BATCH_BYTES: usize = 32 << 10;

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
                WriteNext::Complete(n) => {
                    // The fsync takes as long as the disk needs for the whole file: off the
                    // runtime's thread, which serves every other transfer.
                    let Some(job) = transfer.take_commit() else { return Ok(()) };
                    if let Err((code, message)) = tokio::task::spawn_blocking(move || job.run()).await? {
                        return send_error(socket, out, &Refusal { code, message }).await;
                    }
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
