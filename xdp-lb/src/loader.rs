//! Loading the embedded kernel object and attaching its programs.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use tracing::{debug, info, warn};

use crate::pins;

/// The kernel programs, built by build.rs from xdp-lb-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-lb"));

/// How to attach XDP programs (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode when the driver supports it, generic otherwise: the kernel decides.
    #[default]
    Auto,
    /// Native XDP in the driver; fails on drivers without XDP support.
    Native,
    /// Generic XDP in the network stack: works on every interface, slower.
    Skb,
}

impl From<AttachMode> for XdpMode {
    fn from(mode: AttachMode) -> Self {
        match mode {
            AttachMode::Auto => Self::Default,
            AttachMode::Native => Self::Driver,
            AttachMode::Skb => Self::Skb,
        }
    }
}

/// Loads the object, re-adopting maps already pinned in `pin_dir` (so a restarted agent keeps
/// the state of the one before it) and pinning the others there.
pub fn load_pinned(pin_dir: &Path, maps: &[&'static str]) -> anyhow::Result<Ebpf> {
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    for &name in maps {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader
        .load(OBJECT)
        .context("failed to load the eBPF object (run as root on a kernel with BPF and BTF)")?;
    start_kernel_log(&mut ebpf);
    Ok(ebpf)
}

/// The XDP links of one program, each pinned at `<pin dir>/link-<iface>`.
///
/// A pinned link keeps the program attached, steering from the pinned maps, after the agent
/// dies; the next agent finds the pin and swaps its own program into the link (`bpf_link_update`,
/// atomic: no packet sees an interface without a program). Only [`PinnedLinks::detach`] (clean
/// shutdown) removes the pins; dropping the value otherwise, as an agent that exits with an
/// error does, leaves them in place like a crash would.
#[derive(Debug)]
pub struct PinnedLinks {
    links: Vec<(PathBuf, FdLink)>,
}

impl PinnedLinks {
    /// Clean shutdown: removes every pin and closes the links, which detaches the program.
    pub fn detach(self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for (path, link) in self.links {
            if let Err(error) = std::fs::remove_file(&path) {
                failed.push(format!("{}: {error}", path.display()));
            }
            drop(link);
            debug!(pin = %path.display(), "link unpinned and closed");
        }
        if !failed.is_empty() {
            bail!("cannot remove the pinned XDP links ({}); the program stays attached until they are removed", failed.join("; "));
        }
        Ok(())
    }

    /// Pins of the links held (for logs).
    pub fn paths(&self) -> Vec<&Path> {
        self.links.iter().map(|(path, _)| path.as_path()).collect()
    }
}

/// Loads the XDP program `name` and attaches it to each interface through a link pinned in
/// `pin_dir` (see [`PinnedLinks`]).
///
/// - A link already pinned for an interface (a previous agent was killed) is re-adopted: the
///   program in it is replaced atomically, so steering never stops.
/// - If that link was attached in another mode than `mode` asks for (`auto` accepts any), this
///   is an error that says so: changing the mode needs a detach, which is a clean shutdown of
///   the running agent (or removing the pin), never something done behind the user's back.
/// - A pin whose interface is gone (the link is defunct) is removed and a new link created.
/// - Links pinned for interfaces that are no longer listed are unpinned, which detaches them.
/// - Kernels without XDP links (before 5.9) get a netlink attachment, which is not pinned.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    name: &str,
    interfaces: &[String],
    mode: AttachMode,
    pin_dir: &Path,
) -> anyhow::Result<PinnedLinks> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not an XDP program"))?;
    program
        .load()
        .with_context(|| format!("the kernel rejected program {name}"))?;
    for iface in pins::pinned_link_interfaces(pin_dir) {
        if !interfaces.contains(&iface) {
            let path = pins::link_path(pin_dir, &iface);
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            warn!(iface, pin = %path.display(), "interface no longer listed: its pinned link removed, program detached there");
        }
    }
    let mut links = PinnedLinks { links: Vec::new() };
    let mut created = Vec::new();
    for iface in interfaces {
        let path = pins::link_path(pin_dir, iface);
        let result = attach_one(program, name, iface, mode, &path);
        match result {
            Ok(Some((link, fresh))) => {
                if fresh {
                    created.push(path.clone());
                }
                links.links.push((path, link));
            }
            Ok(None) => {}
            Err(error) => {
                // Undo only what this call created; re-adopted links stay as they were.
                for path in &created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(error);
            }
        }
    }
    Ok(links)
}

/// Attaches `program` to `iface` through the link pinned at `path`, re-adopting it when it
/// exists. The link and whether it is new; `None` when the kernel only offers netlink.
fn attach_one(
    program: &mut Xdp,
    name: &str,
    iface: &str,
    mode: AttachMode,
    path: &Path,
) -> anyhow::Result<Option<(FdLink, bool)>> {
    let ifindex = interface_index(iface)?;
    if path.exists()
        && let Some(link) = readopt(program, name, iface, ifindex, mode, path)?
    {
        return Ok(Some((link, false)));
    }
    let id = program.attach(iface, mode.into()).with_context(|| {
        format!(
            "failed to attach {name} to {iface} in {mode:?} mode (does the interface exist? is another XDP program attached: `ip link show dev {iface}`? try --xdp-mode skb)"
        )
    })?;
    let link = program.take_link(id).context("taking the new XDP link")?;
    let Ok(link) = FdLink::try_from(link) else {
        // A netlink attachment: the conversion dropped (detached) it. Attach again, unpinned.
        warn!(iface, "this kernel has no XDP links (Linux < 5.9): attached by netlink, not pinned; a restarted agent cannot re-adopt it");
        program.attach(iface, mode.into()).with_context(|| format!("failed to attach {name} to {iface} by netlink"))?;
        return Ok(None);
    };
    let pinned = link.pin(path).with_context(|| format!("cannot pin the XDP link of {iface} at {}", path.display()))?;
    info!(program = name, iface, ?mode, pin = %path.display(), "attached, link pinned");
    Ok(Some((FdLink::from(pinned), true)))
}

/// Re-adopts the link pinned at `path`: checks it is an XDP link on `iface` in a compatible
/// mode, then swaps `program` into it. `None` when the pin was stale and has been removed.
fn readopt(
    program: &mut Xdp,
    name: &str,
    iface: &str,
    ifindex: u32,
    mode: AttachMode,
    path: &Path,
) -> anyhow::Result<Option<FdLink>> {
    let pin = path.display();
    let link: FdLink = PinnedLink::from_pin(path)
        .with_context(|| format!("cannot open the pinned link {pin}"))?
        .into();
    let linked_to = link_ifindex(&link).with_context(|| format!("cannot inspect the pinned link {pin}"))?;
    if linked_to == 0 {
        drop(link);
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale pin {pin}"))?;
        warn!(iface, pin = %pin, "the pinned link's interface is gone: pin removed, attaching anew");
        return Ok(None);
    }
    if linked_to != ifindex {
        bail!(
            "the link pinned at {pin} is attached to interface index {linked_to}, not to {iface} (index {ifindex}); was the interface renamed? Stop the agent that owns it, or remove the pin (`rm {pin}`, which detaches that program)"
        );
    }
    let attached = attached_mode(ifindex).with_context(|| format!("cannot read the XDP mode of {iface}"))?;
    if !mode.accepts(attached) {
        bail!(
            "the program left running on {iface} by the previous agent (link pinned at {pin}) is attached in {} mode, but --xdp-mode {} was asked. Changing the mode needs a detach: restart with --xdp-mode {} to re-adopt it without a gap, or stop the running agent cleanly (SIGTERM) or remove the pin (`rm {pin}`) and start again",
            mode_name(attached),
            mode.name(),
            mode_name(attached),
        );
    }
    let link = XdpLink::try_from(link).with_context(|| format!("{pin} is not an XDP link"))?;
    let id = program
        .attach_to_link(link)
        .with_context(|| format!("cannot replace the program in the pinned link {pin}"))?;
    let link = FdLink::try_from(program.take_link(id).context("taking the re-adopted link")?)
        .context("the re-adopted link is not an fd link")?;
    info!(program = name, iface, mode = mode_name(attached), pin = %pin, "re-adopted the pinned link: program replaced in place");
    Ok(Some(link))
}

impl AttachMode {
    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }

    /// Whether a program attached in kernel mode `attached` (`XDP_ATTACHED_*`) satisfies this.
    fn accepts(self, attached: u8) -> bool {
        match self {
            Self::Auto => true,
            Self::Native => attached == XDP_ATTACHED_DRV,
            Self::Skb => attached == XDP_ATTACHED_SKB,
        }
    }
}

const XDP_ATTACHED_NONE: u8 = 0;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;

fn mode_name(attached: u8) -> &'static str {
    match attached {
        XDP_ATTACHED_NONE => "no",
        XDP_ATTACHED_DRV => "native",
        XDP_ATTACHED_SKB => "skb",
        XDP_ATTACHED_HW => "offload",
        _ => "multiple",
    }
}

pub fn interface_index(iface: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(iface).with_context(|| format!("interface name {iface:?} contains a NUL byte"))?;
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface} in this network namespace");
    }
    Ok(index)
}

/// The interface index an XDP link is attached to (0 once the interface is gone), from the
/// `ifindex:` line the kernel prints in the link fd's fdinfo. aya does not expose the fd, so
/// the fd is found by the link id.
fn link_ifindex(link: &FdLink) -> anyhow::Result<u32> {
    let wanted = format!("link_id:\t{}", link.info().context("BPF_OBJ_GET_INFO_BY_FD")?.id());
    for entry in std::fs::read_dir("/proc/self/fdinfo").context("read /proc/self/fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else { continue };
        if !text.lines().any(|line| line == wanted) {
            continue;
        }
        let index = text.lines().find_map(|line| line.strip_prefix("ifindex:"));
        return index
            .context("the link's fdinfo has no ifindex (not an XDP link?)")?
            .trim()
            .parse()
            .context("parse the link's ifindex");
    }
    bail!("no open fd of the link found in /proc/self/fdinfo")
}

/// The mode of the XDP program attached to interface `ifindex` (`XDP_ATTACHED_*` from the
/// kernel's `IFLA_XDP` / `IFLA_XDP_ATTACHED`), by an `RTM_GETLINK` netlink request.
fn attached_mode(ifindex: u32) -> anyhow::Result<u8> {
    const IFLA_XDP_ATTACHED: u16 = 2;
    const RTM_NEWLINK: u16 = 16;
    // SAFETY: socket has no memory preconditions; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink socket");
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes), native endian.
    let mut request = [0u8; 32];
    request[0..4].copy_from_slice(&32u32.to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&u16::try_from(libc::NLM_F_REQUEST)?.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[20..24].copy_from_slice(&i32::try_from(ifindex)?.to_ne_bytes());
    // SAFETY: sends the initialised buffer; an unbound netlink socket sends to the kernel.
    let sent = unsafe { libc::send(socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).context("netlink send");
    }
    let mut reply = vec![0u8; 64 * 1024];
    // SAFETY: receives into the buffer we own, at most its length.
    let got = unsafe { libc::recv(socket.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    let got = usize::try_from(got).map_err(|_| std::io::Error::last_os_error()).context("netlink recv")?;
    let reply = &reply[..got];
    let u16_at = |at: usize| reply.get(at..at + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let message_type = u16_at(4).context("short netlink answer")?;
    if message_type == u16::try_from(libc::NLMSG_ERROR)? {
        let errno = reply.get(16..20).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        return Err(std::io::Error::from_raw_os_error(-errno)).context("RTM_GETLINK");
    }
    if message_type != RTM_NEWLINK {
        bail!("unexpected netlink answer type {message_type}");
    }
    // Attributes after nlmsghdr + ifinfomsg; find IFLA_XDP, then IFLA_XDP_ATTACHED inside it.
    let attribute = |from: usize, to: usize, wanted: u16| -> Option<(usize, usize)> {
        let mut at = from;
        while at + 4 <= to {
            let len = usize::from(u16_at(at)?);
            let kind = u16_at(at + 2)? & 0x3fff;
            if len < 4 || at + len > to {
                return None;
            }
            if kind == wanted {
                return Some((at + 4, at + len));
            }
            at += len.next_multiple_of(4);
        }
        None
    };
    let Some((start, end)) = attribute(32, reply.len(), libc::IFLA_XDP) else {
        return Ok(XDP_ATTACHED_NONE);
    };
    Ok(attribute(start, end, IFLA_XDP_ATTACHED).and_then(|(at, _)| reply.get(at).copied()).unwrap_or(XDP_ATTACHED_NONE))
}

/// Forwards aya-log records from the kernel programs to tracing (through the `log` bridge).
fn start_kernel_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            debug!(%error, "kernel programs do not log");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd and is moved into the AsyncFd, so the fd stays
    // open for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        warn!("cannot poll the kernel log ring buffer; kernel log records are lost");
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so loads do not fail there.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
