//! Control key files for one run's agents (`xdp-lb --control-key-file`): in the temporary
//! directory, mode 600, named with the run's prefix, removed on drop.

use std::{
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::{Result, RunPrefix, io_error};

pub struct ControlKey {
    path: PathBuf,
}

impl ControlKey {
    /// A file with one fresh random key under `id`.
    pub fn random(prefix: &RunPrefix, name: &str, id: u8) -> Result<Self> {
        Self::with_text(prefix, name, &format!("{id} {}\n", random_hex(32)?))
    }

    /// A file with exactly `text` (several keys, or a deliberately wrong one).
    pub fn with_text(prefix: &RunPrefix, name: &str, text: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(prefix.name(&format!("-{name}.key")));
        std::fs::write(&path, text).map_err(io_error(format!("write {}", path.display())))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(format!("chmod 600 {}", path.display())))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key lines of the file (to build a rotation file from two of them).
    pub fn text(&self) -> Result<String> {
        std::fs::read_to_string(&self.path).map_err(io_error(format!("read {}", self.path.display())))
    }
}

impl Drop for ControlKey {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `bytes` random bytes from the kernel, in hex.
pub fn random_hex(bytes: usize) -> Result<String> {
    let mut secret = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(io_error("read /dev/urandom"))?;
    Ok(secret.iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}
