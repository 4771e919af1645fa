//! Loading the embedded kernel object and attaching its programs.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use netlink_packet_route::link::XdpAttached;
use tracing::{debug, info, warn};

use crate::{ifaces, pins};

/// The kernel programs, built by build.rs from xdp-lb-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-lb"));

/// How to attach XDP programs (`--xdp-mode`).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    let ifindex = ifaces::interface_index(iface)?;
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
    let attached = ifaces::xdp_attached(ifindex).with_context(|| format!("cannot read the XDP mode of {iface}"))?;
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

    /// Whether a program attached in kernel mode `attached` satisfies this.
    fn accepts(self, attached: XdpAttached) -> bool {
        match self {
            Self::Auto => true,
            Self::Native => attached == XdpAttached::Driver,
            Self::Skb => attached == XdpAttached::SocketBuffer,
        }
    }
}

fn mode_name(attached: XdpAttached) -> &'static str {
    match attached {
        XdpAttached::None => "no",
        XdpAttached::Driver => "native",
        XdpAttached::SocketBuffer => "skb",
        XdpAttached::Hardware => "offload",
        _ => "multiple",
    }
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
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_err() {
        debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
