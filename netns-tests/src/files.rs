//! Test files with reproducible pseudo-random content, and their digests.

use std::{io::Write as _, path::Path};

use sha2::{Digest as _, Sha256};

use crate::{Result, io_error};

/// Writes `size` bytes of pseudo-random content (xorshift, from `seed`) to `path`.
pub fn make_file(path: &Path, size: usize, seed: u64) -> Result<()> {
    let mut state = seed | 1;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_error(format!("create {}", path.display())))?);
    let mut left = size;
    while left > 0 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        let n = left.min(8);
        file.write_all(&bytes[..n]).map_err(io_error("write test file"))?;
        left -= n;
    }
    file.flush().map_err(io_error("write test file"))
}

/// SHA-256 of a file, hex.
pub fn sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error(format!("read {}", path.display())))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Opens a test's served directory to the unprivileged user the server becomes after binding
/// (`tftp-backend` gives up root): readable by all, and with `uploads` writable by all too
/// (sticky, like /tmp). `tempfile::tempdir` makes 0700 directories, which that user cannot read.
pub fn share_dir(path: &Path, uploads: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if uploads { 0o1777 } else { 0o755 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(format!("chmod {}", path.display())))
}
