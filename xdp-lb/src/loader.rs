//! Loading the embedded kernel object and attaching its programs.

use std::path::Path;

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader, programs::{Xdp, XdpMode}};
use tracing::{debug, warn};

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

/// Loads the XDP program `name` and attaches it to each interface.
pub fn attach_xdp(
    ebpf: &mut Ebpf,
    name: &str,
    interfaces: &[String],
    mode: AttachMode,
) -> anyhow::Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not an XDP program"))?;
    program
        .load()
        .with_context(|| format!("the kernel rejected program {name}"))?;
    for iface in interfaces {
        program.attach(iface, mode.into()).with_context(|| {
            format!("failed to attach {name} to {iface} in {mode:?} mode (does the interface exist? try --xdp-mode skb)")
        })?;
        debug!(program = name, iface, ?mode, "attached");
    }
    Ok(())
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
