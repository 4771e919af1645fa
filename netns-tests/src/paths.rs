//! Workspace binaries and bpffs pin directories.

use std::path::{Path, PathBuf};

use crate::{Result, io_error, run};

/// Path of a workspace binary (`xdp-lb`, `tftp-backend`) in the same target directory as the
/// running test, or in `$XDP_LB_BIN_DIR`. Panics with a hint when it has not been built.
#[must_use]
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("XDP_LB_BIN_DIR").map_or_else(
        || {
            // The test runs as target/<profile>/deps/<test>-<hash>.
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent().and_then(Path::parent).map(Path::to_path_buf).expect("target dir")
        },
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo xtask test` (it builds the workspace first) or `cargo build --release`",
        path.display()
    );
    path
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted already.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(io_error("read /proc/self/mounts"))?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).map(drop)
}

/// A per-run pin root under /sys/fs/bpf/xdp-lb, removed (with everything pinned in it) on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> Result<Self> {
        ensure_bpffs()?;
        let path = PathBuf::from("/sys/fs/bpf/xdp-lb").join(name);
        std::fs::create_dir_all(&path).map_err(io_error(format!("create {}", path.display())))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("netns-tests: cleanup of {} failed: {error}", self.path.display());
        }
        // Leave /sys/fs/bpf/xdp-lb itself only if another run still uses it.
        let _ = std::fs::remove_dir(self.path.parent().unwrap_or(&self.path));
    }
}
