//! Network impairment for kernels without the netem qdisc.
//!
//! - **Random loss** with nftables: a `bridge` family table in the namespace that holds the
//!   bridges drops a share of the frames they forward (`numgen random mod 100 < N drop`), on
//!   every bridge or on one, optionally sparing the TFTP setup ([`random_loss`],
//!   [`install_loss`]); [`loss_dropped`] reads the rule's counter.
//! - **Delay, duplication, reordering** (and loss too, if wanted) with a userspace [`Relay`]: a
//!   namespace spliced into one bridge port. The port's veth end moves into it and a new veth
//!   pair connects it back to the bridge; two AF_PACKET sockets, one on each side, pass every
//!   frame across after a fixed delay, some of them twice, some held back longer so that later
//!   frames overtake them.
//!
//! ```text
//!  before:  host eth0 ─── port ─ bridge
//!  after:   host eth0 ─── port ⟨relay⟩ tobr ─── port+"i" ─ bridge      (relay in its namespace)
//! ```
//!
//! Everything lives in namespaces the test created and goes with them.

use std::{
    collections::BinaryHeap,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Error, Netns, Result, io_error, veth_pair};

/// The nftables table (bridge family) that holds the loss rule.
const TABLE: &str = "xdp_lb_impair";
/// MTU of the relay's links: the topologies' links carry 1600.
const MTU: &str = "1600";
/// Large enough for any frame a veth with MTU 1600 delivers (no GRO on these links).
const FRAME_BUFFER: usize = 65_536;
/// The relay's interface towards the bridge (the host's side keeps the port's name).
const UPLINK: &str = "tobr";

/// Drops `percent` % of the frames every bridge of `ns` forwards, in both directions, chosen at
/// random per frame. Replaces an earlier rule of this module in `ns`.
pub fn random_loss(ns: &Netns, percent: u8) -> Result<()> {
    install_loss(ns, &Loss { percent, bridge: None, spare_tftp_setup: false })
}

/// A loss rule: which frames, how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss<'a> {
    /// Share of the frames dropped, chosen at random per frame.
    pub percent: u8,
    /// Only frames this bridge forwards (those entering it through one of the ports it has
    /// now); `None`: every bridge of the namespace.
    pub bridge: Option<&'a str>,
    /// Drop only UDP frames, and never a TFTP request (to port 69), an OACK or the ACK of block
    /// 0. atftp aborts on a second OACK, which the server sends when the client's ACK of the
    /// first is lost (a stock server too); and behind xdp-lb a request repeated after a lost
    /// one (or held up while ARP resolves) makes two OACKs from the same TID. Tests that
    /// measure the steady state spare the setup; ARP then passes too.
    pub spare_tftp_setup: bool,
}

/// Installs `loss` in `ns` (replacing an earlier rule of this module).
pub fn install_loss(ns: &Netns, loss: &Loss<'_>) -> Result<()> {
    if loss.percent > 100 {
        return Err(invalid(format!("loss of {} %", loss.percent)));
    }
    clear_loss(ns)?;
    ns.exec("nft", &["add", "table", "bridge", TABLE])?;
    ns.exec("nft", &["add", "chain", "bridge", TABLE, "forward", "{ type filter hook forward priority 0 ; policy accept ; }"])?;
    let percent = loss.percent.to_string();
    // `meta ibrname` needs nft_meta_bridge, which this kernel lacks: match the bridge's ports
    // instead (every frame the bridge forwards entered it through one of them).
    let ports = match loss.bridge {
        Some(bridge) => {
            let listing = ns.ip(&["-br", "link", "show", "master", bridge])?;
            let names: Vec<String> = listing
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .map(|name| format!("\"{}\"", name.split('@').next().unwrap_or(name)))
                .collect();
            if names.is_empty() {
                return Err(invalid(format!("bridge {bridge} has no ports")));
            }
            Some(format!("{{ {} }}", names.join(", ")))
        }
        None => None,
    };
    let mut rule = vec!["add", "rule", "bridge", TABLE, "forward"];
    if let Some(ports) = &ports {
        rule.extend(["iifname", ports]);
    }
    if loss.spare_tftp_setup {
        // @th,64,…: the first bytes of the UDP payload (opcode, block).
        rule.extend(["udp", "dport", "!=", "69", "@th,64,16", "!=", "6", "@th,64,32", "!=", "0x00040000"]);
    }
    rule.extend(["numgen", "random", "mod", "100", "<", &percent, "counter", "drop"]);
    ns.exec("nft", &rule).map(drop)
}

/// Drops `percent` % of the UDP datagrams `ns` receives, loopback included, chosen at random
/// per datagram: with client and server on one loopback, each direction loses that share (the
/// bench's lossy path, `cargo xtask bench --only loss`). Replaces an earlier rule of this
/// module in `ns`.
pub fn input_loss(ns: &Netns, percent: u8) -> Result<()> {
    if percent > 100 {
        return Err(invalid(format!("loss of {percent} %")));
    }
    clear_loss(ns)?;
    ns.exec("nft", &["add", "table", "inet", TABLE])?;
    ns.exec("nft", &["add", "chain", "inet", TABLE, "input", "{ type filter hook input priority 0 ; policy accept ; }"])?;
    let percent = percent.to_string();
    ns.exec("nft", &["add", "rule", "inet", TABLE, "input", "meta", "l4proto", "udp", "numgen", "random", "mod", "100", "<", &percent, "counter", "drop"])
        .map(drop)
}

/// Removes the loss rules from `ns` (no error if there are none).
pub fn clear_loss(ns: &Netns) -> Result<()> {
    for family in FAMILIES {
        if ns.exec("nft", &["list", "table", family, TABLE]).is_ok() {
            ns.exec("nft", &["delete", "table", family, TABLE])?;
        }
    }
    Ok(())
}

/// The tables of this module's rules: bridged frames (`install_loss`), input (`input_loss`).
const FAMILIES: [&str; 2] = ["bridge", "inet"];

/// Frames (or datagrams) the loss rule of `ns` has dropped so far (its counter).
pub fn loss_dropped(ns: &Netns) -> Result<u64> {
    for family in FAMILIES {
        if let Ok(listing) = ns.exec("nft", &["list", "table", family, TABLE]) {
            return Ok(counter_packets(&listing).unwrap_or(0));
        }
    }
    Err(invalid(format!("no loss rule in {}", ns.name())))
}

/// The packet count of the first `counter packets N` in an nft listing.
fn counter_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(word) = words.next() {
        if word == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

fn invalid(what: String) -> Error {
    Error::Io { what, source: std::io::Error::from(std::io::ErrorKind::InvalidInput) }
}

/// What the relay does to each frame, independently per frame and per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Impairment {
    /// Every frame waits this long before it leaves (one way).
    pub delay: Duration,
    /// Share of frames sent twice (the copy right after the original).
    pub duplicate_percent: u8,
    /// Share of frames held back `hold_back` longer than the delay: the frames behind them
    /// overtake them.
    pub reorder_percent: u8,
    pub hold_back: Duration,
    /// Share of frames dropped.
    pub loss_percent: u8,
    /// Never duplicate a TFTP request (to port 69), an OACK or the ACK of block 0. atftp aborts
    /// on a second OACK whatever its source, so a network duplicate of the OACK ends any atftp
    /// download; and behind xdp-lb a duplicated request makes two OACKs from the same TID (a
    /// stock server's second OACK would come from another port, which the client ignores).
    pub spare_tftp_setup: bool,
}

impl Impairment {
    /// Frames pass unchanged (but through userspace).
    pub const NONE: Self = Self {
        delay: Duration::ZERO,
        duplicate_percent: 0,
        reorder_percent: 0,
        hold_back: Duration::ZERO,
        loss_percent: 0,
        spare_tftp_setup: false,
    };
}

/// What the relay did, summed over both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Frames received on either side.
    pub received: u64,
    /// Frames sent on (copies included).
    pub sent: u64,
    pub duplicated: u64,
    pub held_back: u64,
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    duplicated: AtomicU64,
    held_back: AtomicU64,
    dropped: AtomicU64,
}

/// A userspace relay spliced into a bridge port (see the module documentation). Dropping it
/// stops its threads and deletes its namespace, which removes the host's link too: drop it
/// with (or after) the topology.
pub struct Relay {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    netns: Netns,
}

impl Relay {
    /// Splices a relay into `port` of `bridge` (both in `bridges`), in a new namespace named
    /// `name`. The host at the other end of `port` keeps its interface, addresses and routes.
    pub fn insert(bridges: &Netns, bridge: &str, port: &str, name: &str, impairment: Impairment) -> Result<Self> {
        for percent in [impairment.duplicate_percent, impairment.reorder_percent, impairment.loss_percent] {
            if percent > 100 {
                return Err(invalid(format!("impairment of {percent} %")));
            }
        }
        let netns = Netns::new(name)?;
        // No IPv6: the relay's own stack must not add router solicitations and the like.
        netns.exec("sysctl", &["-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
        bridges.ip(&["link", "set", port, "netns", name])?;
        let uplink = format!("{port}i");
        veth_pair(&netns, UPLINK, bridges, &uplink)?;
        bridges.ip(&["link", "set", &uplink, "mtu", MTU])?;
        bridges.ip(&["link", "set", &uplink, "master", bridge])?;
        for iface in [port, UPLINK] {
            netns.ip(&["link", "set", iface, "mtu", MTU, "promisc", "on", "up"])?;
        }
        let (host_side, bridge_side) = netns.enter(|| Ok::<_, Error>((packet_socket(port)?, packet_socket(UPLINK)?)))??;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let host_side = Arc::new(host_side);
        let bridge_side = Arc::new(bridge_side);
        let mut threads = Vec::new();
        for (seed, from, to) in [(0x9e37_79b9_7f4a_7c15_u64, &host_side, &bridge_side), (0xd1b5_4a32_d192_ed03, &bridge_side, &host_side)] {
            let (from, to) = (Arc::clone(from), Arc::clone(to));
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            let seed = seed ^ u64::from(std::process::id()) ^ now_nanos();
            threads.push(std::thread::spawn(move || relay(&from, &to, impairment, seed, &stop, &counters)));
        }
        Ok(Self { stop, counters, threads, netns })
    }

    #[must_use]
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    #[must_use]
    pub fn stats(&self) -> RelayStats {
        let c = &self.counters;
        RelayStats {
            received: c.received.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
            held_back: c.held_back.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One bound AF_PACKET socket: receives every frame arriving on the interface, sends frames out
/// of it.
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

/// Opens a raw packet socket on `iface` of the calling thread's namespace.
fn packet_socket(iface: &str) -> Result<PacketSocket> {
    let name = std::ffi::CString::new(iface).map_err(|_| invalid(format!("interface name {iface:?}")))?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let ifindex = i32::try_from(ifindex).ok().filter(|&i| i > 0).ok_or_else(|| {
        io_error(format!("no interface {iface}"))(std::io::Error::last_os_error())
    })?;
    let all = i32::from(u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be());
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, all) };
    if raw < 0 {
        return Err(io_error("AF_PACKET socket")(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let address = link_address(ifindex, all);
    // SAFETY: a valid sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const address).cast(), socklen::<libc::sockaddr_ll>())
    };
    if bound != 0 {
        return Err(io_error(format!("bind AF_PACKET socket to {iface}"))(std::io::Error::last_os_error()));
    }
    Ok(PacketSocket { fd, ifindex })
}

fn link_address(ifindex: i32, protocol: i32) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    address.sll_protocol = u16::try_from(protocol).unwrap_or_default();
    address.sll_ifindex = ifindex;
    address
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A frame waiting for its time; the heap pops the earliest (then the first queued).
struct Pending {
    due: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Passes frames from `from` to `to` with `impairment` until `stop`.
fn relay(from: &PacketSocket, to: &PacketSocket, impairment: Impairment, seed: u64, stop: &AtomicBool, counters: &Counters) {
    let mut random = XorShift(seed | 1);
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    let mut seq = 0_u64;
    let mut buffer = vec![0_u8; FRAME_BUFFER];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.peek().is_some_and(|p| p.due <= now) {
            if let Some(pending) = queue.pop()
                && send(to, &pending.frame)
            {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Wake for the next due frame (rounded up to the next millisecond), at the latest in
        // 10 ms to look at `stop`.
        let wait = queue.peek().map_or(Duration::from_millis(10), |p| p.due.saturating_duration_since(now)).min(Duration::from_millis(10));
        let millis = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(10);
        if !readable(from, millis) {
            continue;
        }
        while let Some(length) = receive(from, &mut buffer) {
            counters.received.fetch_add(1, Ordering::Relaxed);
            if random.percent(impairment.loss_percent) {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let arrived = Instant::now();
            let mut due = arrived + impairment.delay;
            if random.percent(impairment.reorder_percent) {
                due += impairment.hold_back;
                counters.held_back.fetch_add(1, Ordering::Relaxed);
            }
            let spared = impairment.spare_tftp_setup && is_tftp_setup(&buffer[..length]);
            let copies = if random.percent(impairment.duplicate_percent) && !spared {
                counters.duplicated.fetch_add(1, Ordering::Relaxed);
                2
            } else {
                1
            };
            for _ in 0..copies {
                seq += 1;
                queue.push(Pending { due, seq, frame: buffer[..length].to_vec() });
            }
        }
    }
}

/// An IPv4/UDP frame carrying a TFTP request (to port 69), an OACK (opcode 6) or the ACK of
/// block 0 (the frames [`Loss::spare_tftp_setup`] spares too).
fn is_tftp_setup(frame: &[u8]) -> bool {
    const ETHERNET: usize = 14;
    let Some(ip) = frame.get(ETHERNET..) else { return false };
    if frame.get(12..14) != Some(&[0x08, 0x00]) || ip.len() < 20 || ip[9] != 17 {
        return false;
    }
    let Some(udp) = ip.get(usize::from(ip[0] & 0x0f) * 4..) else { return false };
    let (Some(port), Some(start)) = (udp.get(2..4), udp.get(8..12)) else { return false };
    port == [0, 69] || start[..2] == [0, 6] || start == [0, 4, 0, 0]
}

/// Waits up to `millis` for a frame on `socket`.
fn readable(socket: &PacketSocket, millis: i32) -> bool {
    let mut poll = libc::pollfd { fd: socket.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
    if ready < 0 {
        // Interrupted, or the namespace is going away: do not spin.
        std::thread::sleep(Duration::from_millis(1));
    }
    ready > 0
}

/// The next frame that arrived on the socket's interface (not one leaving it), without waiting.
fn receive(socket: &PacketSocket, buffer: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_length = socklen::<libc::sockaddr_ll>();
        // SAFETY: buffer and address are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                socket.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&raw mut from).cast(),
                &raw mut from_length,
            )
        };
        let n = usize::try_from(n).ok()?;
        if from.sll_pkttype == libc::PACKET_OUTGOING || n > buffer.len() {
            continue;
        }
        return Some(n);
    }
}

/// Sends one frame out of the socket's interface; false if the kernel refused it.
fn send(socket: &PacketSocket, frame: &[u8]) -> bool {
    let address = link_address(socket.ifindex, 0);
    // SAFETY: frame and address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            socket.fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const address).cast(),
            socklen::<libc::sockaddr_ll>(),
        )
    };
    usize::try_from(n).is_ok_and(|sent| sent == frame.len())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0))
}

/// xorshift64: enough randomness to pick frames.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `percent` %.
    fn percent(&mut self, percent: u8) -> bool {
        percent > 0 && self.next() % 100 < u64::from(percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_is_read_from_the_listing() {
        let listing = "table bridge xdp_lb_impair {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tnumgen random mod 100 < 5 counter packets 42 bytes 6300 drop\n\t}\n}\n";
        assert_eq!(counter_packets(listing), Some(42));
        assert_eq!(counter_packets("table bridge x {}"), None);
    }

    #[test]
    fn percent_picks_about_that_share() {
        let mut random = XorShift(12345);
        let hits = (0..100_000).filter(|_| random.percent(5)).count();
        assert!((4_000..6_000).contains(&hits), "{hits} of 100000 at 5 %");
        assert!(!(0..1000).any(|_| random.percent(0)));
        assert!((0..1000).all(|_| random.percent(100)));
    }

    #[test]
    fn tftp_setup_frames_are_recognised() {
        let frame = |dport: u16, opcode: u8| {
            let mut f = vec![0_u8; 12];
            f.extend([0x08, 0x00]);
            let mut ip = vec![0_u8; 20];
            ip[0] = 0x45;
            ip[9] = 17;
            f.extend(ip);
            f.extend([0x9c, 0x40]);
            f.extend(dport.to_be_bytes());
            f.extend([0, 20, 0, 0, 0, opcode, 0, 1]);
            f
        };
        assert!(is_tftp_setup(&frame(69, 1)), "RRQ");
        assert!(is_tftp_setup(&frame(40_000, 6)), "OACK");
        assert!(!is_tftp_setup(&frame(40_000, 3)), "DATA");
        assert!(!is_tftp_setup(&frame(40_000, 4)), "ACK 1");
        let mut ack0 = frame(40_000, 4);
        *ack0.last_mut().unwrap() = 0;
        assert!(is_tftp_setup(&ack0), "ACK 0");
        let mut arp = frame(69, 1);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_tftp_setup(&arp), "not IPv4");
        assert!(!is_tftp_setup(&frame(69, 1)[..30]), "truncated");
    }

    #[test]
    fn earliest_frame_pops_first_then_queue_order() {
        let t = Instant::now();
        let mut heap = BinaryHeap::new();
        for (due, seq) in [(5, 1), (1, 2), (5, 3), (0, 4)] {
            heap.push(Pending { due: t + Duration::from_millis(due), seq, frame: Vec::new() });
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|p| p.seq)).collect();
        assert_eq!(order, [4, 2, 1, 3]);
    }
}
