//! `tftp-backend`: a TFTP server that can continue any transfer at a block offset.
//!
//! Standalone it is a plain RFC 1350/2347/2348/2349/7440 server. With `--steered` it sits
//! behind xdp-lb's load balancers: every packet carries the steering header, and an ACK for a
//! transfer this server never saw is served from that header alone.
mod alarm;
mod batch;
mod completed;
mod files;
mod netascii;
mod rto;
mod service;
mod standalone;
mod steered;
mod tid;
mod timer;
mod transfer;

// Wire format and negotiation live in the library (fuzzed there); `crate::wire` and
// `crate::options` keep working for the binary's modules through this import.
use tftp_backend::{options, wire};

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tracing::info;

/// A TFTP server that resumes any transfer at a block offset.
#[derive(Parser)]
#[expect(clippy::struct_excessive_bools, reason = "independent command-line switches")]
#[command(name = "tftp-backend", version, about, long_about = None)]
struct Cli {
    /// Directory served; no request reaches outside it (`..`, absolute paths and symlinks
    /// leading out are refused).
    #[arg(long, value_name = "DIR")]
    root: PathBuf,

    /// Address and port to listen on. Standalone: the TFTP service port (69); steered: the
    /// port the load balancers send to.
    #[arg(long, default_value = "0.0.0.0:69", value_name = "ADDR:PORT")]
    listen: SocketAddr,

    /// Behind xdp-lb: expect the steering header on every packet, answer to the load balancer.
    #[arg(long)]
    steered: bool,

    /// Steered: while several transfers share this backend, send each window toward the load
    /// balancer as one UDP segmentation offload (UDP_SEGMENT) super-packet that the kernel or
    /// the NIC cuts into datagrams on the way out, instead of one datagram per block (sendmmsg):
    /// less CPU per block. A lone transfer still goes datagram by datagram (its window's first
    /// block leaves sooner). Only where the way to the balancers cuts the super-packet before
    /// their XDP program: a physical NIC does; veth passes it on whole unless tx offloads are
    /// off on the backend's interface or a port before the balancer (`ethtool -K IFACE tx
    /// off`). Over a link that hands the balancer super-packets uncut, windows are lost (the
    /// balancer's program drops each it sees and counts `drop_oversize` in `xdp-lb status`):
    /// transfers stall, they never receive wrong bytes.
    #[arg(long, requires = "steered")]
    segment_offload: bool,

    /// Accept uploads (WRQ). They are written to a temporary file and moved into place only
    /// when complete and on disk.
    #[arg(long)]
    allow_upload: bool,

    /// Let uploads replace existing files (atomically). Without it an existing name is refused.
    #[arg(long, requires = "allow_upload")]
    allow_overwrite: bool,

    /// Largest block size granted (RFC 2348). Keep DATA within the path MTU: 1468 for 1500.
    #[arg(long, default_value_t = 1468, value_parser = clap::value_parser!(u16).range(8..=65464))]
    max_blksize: u16,

    /// Largest window granted (RFC 7440).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    max_windowsize: u16,

    /// Retransmission timeout when the client negotiates none, in milliseconds: the wait
    /// before the first retransmission until a round trip was measured, and the longest the
    /// measured round trip alone may make it (later retries back off beyond it).
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,

    /// Shortest wait before a retransmission, in milliseconds (fractions allowed), however
    /// short the measured round trip (RFC 6298's minimum RTO, lowered for LANs): a lost DATA
    /// or ACK of a lock-step transfer costs about this much, against tens of microseconds per
    /// block on a LAN. Raise it where clients answer late without loss (slow firmware on a
    /// busy host): a wait that ends before the ACK arrives sends a block twice. After three
    /// unanswered resends the server waits for the client's own retransmission (twice the
    /// negotiated timeout, or 6 s); OACKs are resent only then.
    #[arg(long, default_value = "0.5", value_parser = parse_millis)]
    rto_min_ms: Duration,

    /// Most timer-driven retransmissions per second, in datagrams, across every transfer of
    /// this server (a token bucket holding a tenth of a second's worth). When a link is
    /// congested, all its transfers lose packets at once; this keeps their retransmissions
    /// from adding much to it. Resends a client's ACK asks for are not charged. 0: no limit.
    #[arg(long, default_value_t = 20_000)]
    retransmit_budget: u32,
}

/// A duration in milliseconds, fractions allowed (`0.25`: 250 µs).
fn parse_millis(text: &str) -> Result<Duration, String> {
    let ms: f64 = text.parse().map_err(|e| format!("{text:?} is not a number of milliseconds: {e}"))?;
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|e| format!("{text:?} is not a duration in milliseconds: {e}"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let root = files::Root::new(&cli.root).with_context(|| format!("cannot serve {}", cli.root.display()))?;
    let config = service::Config {
        limits: options::Limits { max_blksize: cli.max_blksize, max_windowsize: cli.max_windowsize },
        allow_upload: cli.allow_upload,
        allow_overwrite: cli.allow_overwrite,
        timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        rto_min: cli.rto_min_ms,
        retransmit_budget: cli.retransmit_budget,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind(cli.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cli.listen))?;
        widen_buffers(&socket);
        info!(listen = %cli.listen, root = %root.dir().display(), steered = cli.steered, "serving");
        if cli.steered {
            steered::Steered::new(socket, root, config, cli.segment_offload).run().await
        } else {
            standalone::run(socket, root, config).await
        }
    })
}

/// Socket buffers of the service port. Steered, one socket carries every transfer's ACKs and
/// windows, and standalone, every request arrives on it: the kernel default (~208 KiB, ~270
/// datagrams) overflowed with 1000 transfers at once, and a lost ACK costs a timeout. Root may
/// exceed `net.core.rmem_max` (SO_RCVBUFFORCE); otherwise the kernel caps the request there.
fn widen_buffers(socket: &tokio::net::UdpSocket) {
    #[expect(clippy::cast_possible_truncation, reason = "the size of an int")]
    const SOCKLEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;
    use std::os::fd::AsRawFd as _;
    let bytes: libc::c_int = 8 << 20;
    let fd = socket.as_raw_fd();
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let set = |option| {
            // SAFETY: setsockopt reads an int from a pointer to a live local of that size.
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const bytes).cast(), SOCKLEN) == 0 }
        };
        if !set(force) && !set(plain) {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot enlarge the socket buffers");
        }
    }
}
