//! `tftp-backend`: a TFTP server that can continue any transfer at a block offset.
//!
//! Standalone it is a plain RFC 1350/2347/2348/2349/7440 server. With `--steered` it sits
//! behind xdp-lb's load balancers: every packet carries the steering header, and an ACK for a
//! transfer this server never saw is served from that header alone.
mod alarm;
mod allowed;
mod batch;
mod completed;
mod files;
mod netascii;
mod privilege;
mod rto;
mod service;
mod standalone;
mod steered;
mod tid;
mod timer;
mod transfer;
mod window;

// Wire format and negotiation live in the library (fuzzed there); `crate::wire` and
// `crate::options` keep working for the binary's modules through this import.
use tftp_backend::{options, wire};

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use nix::unistd::AccessFlags;
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

    /// Steered: a load balancer's address on the backend network (repeat it for each, both of
    /// a pair). Datagrams from any other address are dropped before their steering header is
    /// read (a forged header could resume any file toward its sender), and logged at most once
    /// a second with the count.
    #[arg(long = "lb", value_name = "ADDR", requires = "steered", required_if_eq("steered", "true"))]
    lbs: Vec<IpAddr>,

    /// Steered, with --allow-upload: another backend of the cluster, by the address and port it
    /// listens on (repeat it for each; the same list on every backend, less itself). An octet
    /// upload then keeps a copy on one of them, its replica: each block is acknowledged to the
    /// client only once the replica has it, the balancer moves the upload to the replica if this
    /// backend dies, and the finished file goes to every peer. Replication datagrams from any
    /// other address are dropped.
    #[arg(long = "peer", value_name = "ADDR:PORT", requires = "allow_upload")]
    peers: Vec<std::net::SocketAddr>,

    /// The user to run as once the socket is bound (tftp-hpa's `-u`). Default when started as
    /// root: `tftp`, or `nobody` if there is no `tftp` user. The served files must be readable
    /// by this user, and with --allow-upload the upload directories writable by it; uploads
    /// are owned by it.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,

    /// Serve as root when started as root (not recommended: a parser bug would then run as
    /// root). Without it, a server started as root always changes user.
    #[arg(long)]
    allow_root: bool,

    /// File mode creation mask for uploads, in octal: an upload is created with mode 0666
    /// minus these bits (022: rw-r--r--).
    #[arg(long, default_value = "022", value_parser = parse_umask, value_name = "OCTAL")]
    umask: u32,

    /// Largest upload accepted, in bytes. A client that announces a larger tsize is refused at
    /// once; one that sends more gets ERROR 3 (disk full or allocation exceeded) when it
    /// crosses it, and nothing stays on disk. Default: no limit.
    #[arg(long, value_name = "BYTES", requires = "allow_upload")]
    max_upload_bytes: Option<u64>,

    /// Most transfers at once (downloads and uploads). A new request beyond it gets ERROR 0
    /// "server busy, try again later" at once, before any file or port is opened: memory and
    /// open files stay bounded under a flood of requests. Steered, transfers that move here
    /// from a failed backend are still taken (they are not new). The open-file limit is
    /// raised to its hard limit at start; each transfer holds one or two descriptors.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    max_transfers: u32,

    /// Free space, in MiB, that uploads leave on the filesystem of the upload: an upload that
    /// would go below it gets ERROR 3 and nothing stays on disk (checked every MiB written).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    min_free_mib: u64,

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

    /// Largest block size granted (RFC 2348). Keep DATA within the path MTU: 1468 for 1500
    /// (standalone lowers it to the path MTU toward each client by itself, steered to
    /// --path-mtu).
    #[arg(long, default_value_t = 1468, value_parser = clap::value_parser!(u16).range(8..=65464))]
    max_blksize: u16,

    /// Steered: the MTU of the path toward the load balancers, in bytes. There every DATA
    /// datagram carries the 64-byte steering header, and a balancer cannot steer IP fragments
    /// (it drops them), so the block size granted is lowered to fit: this MTU less 96 bytes
    /// (IPv4 20, UDP 8, steering header 64, TFTP 4), 1404 for 1500; never raised above
    /// --max-blksize. Default: the smallest MTU of the routes toward the --lb addresses, or
    /// 1500 where the kernel has no route yet.
    #[arg(long, value_name = "BYTES", requires = "steered", value_parser = clap::value_parser!(u16).range(576..))]
    path_mtu: Option<u16>,

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

/// A umask in octal (`022`, `0o027`).
fn parse_umask(text: &str) -> Result<u32, String> {
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| format!("{text:?} is not an octal mode mask (000 to 777)"))
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
    // Bound (and enlarged, which needs root) before root is given up.
    let socket = std::net::UdpSocket::bind(cli.listen).with_context(|| format!("cannot listen on {}", cli.listen))?;
    widen_buffers(&socket);
    socket.set_nonblocking(true)?;
    let plan = privilege::plan(nix::unistd::geteuid().as_raw(), cli.user.as_deref(), cli.allow_root, privilege::lookup)?;
    privilege::become_user(&plan)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(cli.umask));
    let user = match &plan {
        privilege::Plan::Become { name, .. } => name.clone(),
        privilege::Plan::Stay => privilege::current_user(),
    };
    let root = files::Root::new(&cli.root).with_context(|| format!("cannot serve {} as user {user}", cli.root.display()))?;
    // Checked as the serving user: a root it cannot use would refuse every request instead.
    let (read, write) = (AccessFlags::R_OK | AccessFlags::X_OK, AccessFlags::W_OK | AccessFlags::X_OK);
    nix::unistd::access(root.dir(), read).with_context(|| format!("user {user} cannot read {} (--root)", root.dir().display()))?;
    if cli.allow_upload {
        nix::unistd::access(root.dir(), write).with_context(|| format!("--allow-upload: user {user} cannot write to {}", root.dir().display()))?;
    }
    let config = service::Config {
        limits: options::Limits { max_blksize: cli.max_blksize, max_windowsize: cli.max_windowsize },
        allow_upload: cli.allow_upload,
        allow_overwrite: cli.allow_overwrite,
        timeout: Duration::from_millis(cli.timeout_ms.max(1)),
        rto_min: cli.rto_min_ms,
        retransmit_budget: cli.retransmit_budget,
        upload: transfer::UploadLimits { max_bytes: cli.max_upload_bytes, min_free: cli.min_free_mib.saturating_mul(1 << 20) },
        max_transfers: usize::try_from(cli.max_transfers).unwrap_or(usize::MAX),
    };
    let config = if cli.steered {
        let mtu = cli.path_mtu.map_or_else(|| route_mtu(&cli.lbs).unwrap_or(FALLBACK_MTU), usize::from);
        let limits = steered::fit_path_mtu(config.limits, mtu);
        info!(path_mtu = mtu, max_blksize = limits.max_blksize, "block size fits the path toward the balancers");
        service::Config { limits, ..config }
    } else {
        config
    };
    raise_open_file_limit(cli.max_transfers);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        info!(listen = %cli.listen, root = %root.dir().display(), steered = cli.steered, %user, "serving");
        if cli.steered {
            let allowed = allowed::AllowedBalancers::new(cli.lbs.clone());
            steered::Steered::new(socket, root, config, cli.segment_offload, allowed, cli.peers.clone()).run().await
        } else {
            standalone::run(socket, root, config).await
        }
    })
}

/// The path MTU assumed toward the balancers when the kernel has no route to them yet: Ethernet's.
const FALLBACK_MTU: usize = 1500;

/// The smallest MTU of the routes toward `lbs` (a UDP socket connected to each, which sends
/// nothing; steering is IPv4), if the kernel has a route to any of them.
fn route_mtu(lbs: &[IpAddr]) -> Option<usize> {
    use std::os::fd::AsFd as _;
    lbs.iter()
        .filter_map(|&lb| {
            let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            socket.connect((lb, 9)).ok()?;
            tid::path_mtu(socket.as_fd())
        })
        .min()
}

/// Each transfer holds a file (and standalone, a socket): the usual soft limit of 1024 open
/// files would refuse requests long before `--max-transfers`. Raised to the hard limit.
fn raise_open_file_limit(max_transfers: u32) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = u64::from(max_transfers).saturating_mul(2).saturating_add(64);
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < wanted => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, "cannot raise the open-file limit");
            } else if hard < wanted {
                tracing::warn!(limit = hard, max_transfers, "the open-file limit is below what --max-transfers needs");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}

/// Socket buffers of the service port. Steered, one socket carries every transfer's ACKs and
/// windows, and standalone, every request arrives on it: the kernel default (~208 KiB, ~270
/// datagrams) overflowed with 1000 transfers at once, and a lost ACK costs a timeout. Root may
/// exceed `net.core.rmem_max` (SO_RCVBUFFORCE); otherwise the kernel caps the request there.
fn widen_buffers(socket: &std::net::UdpSocket) {
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
