//! Where maps are pinned, and checks that the pin directory is usable.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// `statfs` magic of the BPF filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))?;
    // SAFETY: statfs only writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type == BPF_FS_MAGIC)
}
