//! A small harness for tests that need real network namespaces, veth pairs and processes.
//!
//! Everything a test creates is named with a per-run prefix (see [`RunPrefix`]) and owned by a
//! guard that removes it on drop, also while unwinding from a failed assertion: namespaces
//! ([`Netns`]), processes started by the test ([`Process`], stopped by PID), and bpffs pin
//! directories ([`PinDir`]). Drop never panics.
//!
//! Processes that need bpffs are started with `nsenter --net=...` rather than `ip netns exec`:
//! the latter also unshares the mount namespace and remounts `/sys`, hiding `/sys/fs/bpf`.
//!
//! Tests that need root fail loudly without it ([`require_root`]); they are never skipped.

pub mod boot;
pub mod capture;
pub mod clients;
pub mod cluster;
pub mod control_key;
pub mod files;
pub mod impair;
mod netns;
mod paths;
mod process;
pub mod pair_topology;
pub mod storm;
pub mod topology;
pub mod upload;
pub mod watch;

pub use control_key::ControlKey;
pub use netns::{IpBatch, Netns, VethEnd, veth_pair};
pub use paths::{PinDir, binary, ensure_bpffs};
pub use process::{Process, raise_thread_priority};

use std::sync::atomic::{AtomicU32, Ordering};

/// Errors of the harness. Tests usually `expect()` them: a harness failure is a test failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A short unique prefix for the names of everything one test creates: `xl` + PID + a counter.
/// Short because interface names are limited to 15 bytes.
#[derive(Clone, Debug)]
pub struct RunPrefix(String);

impl RunPrefix {
    #[must_use]
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(format!("xl{}{n}", std::process::id() % 100_000))
    }

    /// `prefix` + `-` + `suffix`, for a namespace, an interface or a directory.
    #[must_use]
    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.0)
    }
}

impl Default for RunPrefix {
    fn default() -> Self {
        Self::new()
    }
}

/// Panics with a clear message unless running as root: these tests need namespaces and BPF,
/// and a test that cannot run must fail, not pass silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "netns-tests need root (network namespaces, XDP, bpffs); run them as root, e.g. via `cargo xtask test`"
    );
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(io_error(format!("cannot run {program}")))?;
    if !output.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `seconds`.
pub fn wait_for<T>(what: &str, seconds: u64, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                seconds,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
