//! Where maps are pinned, and checks that the pin directory is usable.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Directory of one role's pinned maps.
pub fn role_dir(pin_root: &Path, role: &str) -> PathBuf {
    pin_root.join(role)
}

/// Where the XDP link of `iface` is pinned in a role directory: `<role dir>/link-<iface>`.
pub fn link_path(role_dir: &Path, iface: &str) -> PathBuf {
    role_dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// File-name prefix of pinned XDP links in a role directory.
pub const LINK_PREFIX: &str = "link-";

/// The interfaces that have a link pinned in `role_dir` (empty when it does not exist).
pub fn pinned_link_interfaces(role_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(role_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.strip_prefix(LINK_PREFIX).map(str::to_owned))
        .collect()
}

/// Creates the role directory and checks that it lives on a bpffs, so pinning cannot fail later
/// with an obscure error.
pub fn prepare_role_dir(pin_root: &Path, role: &str) -> anyhow::Result<PathBuf> {
    let dir = role_dir(pin_root, role);
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the pin directory {}; is bpffs mounted (`mount -t bpf bpf /sys/fs/bpf`, or `cargo xtask setup`)?",
            dir.display()
        )
    })?;
    if !is_bpffs(&dir)? {
        bail!(
            "{} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does), or pass --pin-root on a bpffs",
            dir.display()
        );
    }
    Ok(dir)
}

fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let stat = nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}
