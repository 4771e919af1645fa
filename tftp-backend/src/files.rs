//! The served directory: resolving request paths safely inside it, file identity (path hash and
//! content digest, as the steering header carries them), and the catalog that finds a file by
//! its path hash for transfers this backend never saw start.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
};

use sha2::{Digest as _, Sha256};

use crate::wire::ErrorCode;

/// Entries the catalog walk visits at most (bounds the work a miss can cause).
const CATALOG_WALK_LIMIT: usize = 100_000;

/// A file's identity for the digest cache: device, inode, size, modification time (ns). A
/// change of content changes the last two.
pub type FileId = (u64, u64, u64, i64);

/// Content digests by file identity, shared with the threads that compute them (hashing a
/// large file must not stall a server's event loop).
pub type DigestCache = Arc<Mutex<HashMap<FileId, [u8; 16]>>>;

/// The identity of an open file.
pub fn file_id(file: &File) -> std::io::Result<FileId> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino(), meta.size(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000))
}

/// First 16 bytes of SHA-256 of the file's content, computed and stored in `cache`.
pub fn compute_digest(cache: &DigestCache, file: &File) -> std::io::Result<[u8; 16]> {
    let id = file_id(file)?;
    let mut hasher = Sha256::new();
    let mut reader = file.try_clone()?;
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&hasher.finalize()[..16]);
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, digest);
    Ok(digest)
}

/// A refusal with the TFTP error to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: &'static str,
}

impl Refusal {
    const fn new(code: ErrorCode, message: &'static str) -> Self {
        Self { code, message }
    }
}

/// First 8 bytes of SHA-256 of a path relative to the root.
#[must_use]
pub fn path_hash(relative: &str) -> [u8; 8] {
    let digest = Sha256::digest(relative.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

pub struct Root {
    dir: PathBuf,
    catalog: HashMap<[u8; 8], String>,
    /// Content digests by file identity: recomputed when the file changes.
    digests: DigestCache,
}

impl Root {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        Ok(Self { dir: dir.canonicalize()?, catalog: HashMap::new(), digests: DigestCache::default() })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The normalized relative path of a request: `/`-separated, no leading `/`, no `.` or
    /// `..`, not empty.
    pub fn relative(name: &str) -> Result<String, Refusal> {
        let mut parts = Vec::new();
        for component in Path::new(name).components() {
            match component {
                Component::Normal(part) => parts.push(part.to_str().ok_or(Refusal::new(ErrorCode::AccessViolation, "bad path"))?),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(Refusal::new(ErrorCode::AccessViolation, "path leaves the served directory"));
                }
            }
        }
        if parts.is_empty() || name.contains('\\') {
            return Err(Refusal::new(ErrorCode::AccessViolation, "bad path"));
        }
        Ok(parts.join("/"))
    }

    /// Opens a file for reading; symlinks may not lead outside the root.
    pub fn open_read(&mut self, relative: &str) -> Result<(File, PathBuf), Refusal> {
        let joined = self.dir.join(relative);
        let real = joined.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Refusal::new(ErrorCode::FileNotFound, "file not found"),
            _ => Refusal::new(ErrorCode::AccessViolation, "cannot access file"),
        })?;
        if !real.starts_with(&self.dir) {
            return Err(Refusal::new(ErrorCode::AccessViolation, "path leaves the served directory"));
        }
        let file = File::open(&real).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Refusal::new(ErrorCode::FileNotFound, "file not found"),
            _ => Refusal::new(ErrorCode::AccessViolation, "cannot read file"),
        })?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(Refusal::new(ErrorCode::AccessViolation, "not a regular file"));
        }
        self.catalog.insert(path_hash(relative), relative.to_owned());
        Ok((file, real))
    }

    /// Where an upload of `relative` goes: its final path, checked to stay inside the root.
    pub fn write_target(&self, relative: &str) -> Result<PathBuf, Refusal> {
        let joined = self.dir.join(relative);
        let parent = joined.parent().ok_or(Refusal::new(ErrorCode::AccessViolation, "bad path"))?;
        let real_parent = parent
            .canonicalize()
            .map_err(|_| Refusal::new(ErrorCode::AccessViolation, "directory does not exist"))?;
        if !real_parent.starts_with(&self.dir) {
            return Err(Refusal::new(ErrorCode::AccessViolation, "path leaves the served directory"));
        }
        let name = joined.file_name().ok_or(Refusal::new(ErrorCode::AccessViolation, "bad path"))?;
        let target = real_parent.join(name);
        // A symlink at the target would make the rename replace the link, not its target; refuse.
        if target.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Refusal::new(ErrorCode::AccessViolation, "target is a symlink"));
        }
        Ok(target)
    }

    /// First 16 bytes of SHA-256 of the file's content, cached while the file is unchanged
    /// (computed here, blocking, on a miss).
    pub fn digest(&mut self, file: &File) -> std::io::Result<[u8; 16]> {
        match self.cached_digest(file) {
            Some(digest) => Ok(digest),
            None => compute_digest(&self.digests, file),
        }
    }

    /// The file's digest if it is cached and the file unchanged.
    #[must_use]
    pub fn cached_digest(&self, file: &File) -> Option<[u8; 16]> {
        let id = file_id(file).ok()?;
        self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id).copied()
    }

    /// The digest cache, for computing digests off the caller's thread.
    #[must_use]
    pub fn digest_cache(&self) -> DigestCache {
        Arc::clone(&self.digests)
    }

    /// The relative path whose hash is `hash`: from the catalog, else by walking the root once.
    pub fn find_by_hash(&mut self, hash: [u8; 8]) -> Option<String> {
        if let Some(path) = self.catalog.get(&hash) {
            return Some(path.clone());
        }
        let mut stack = vec![(self.dir.clone(), String::new())];
        let mut visited = 0;
        while let Some((dir, prefix)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                visited += 1;
                if visited > CATALOG_WALK_LIMIT {
                    return None;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
                let relative = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    stack.push((entry.path(), relative));
                } else {
                    let h = path_hash(&relative);
                    self.catalog.insert(h, relative.clone());
                    if h == hash {
                        return Some(relative);
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_normalized_and_escapes_refused() {
        assert_eq!(Root::relative("/boot//pxe.0").unwrap(), "boot/pxe.0");
        assert_eq!(Root::relative("./a/./b").unwrap(), "a/b");
        for bad in ["../etc/passwd", "a/../../b", "", "/", "a\\b"] {
            assert_eq!(Root::relative(bad).unwrap_err().code, ErrorCode::AccessViolation, "{bad:?}");
        }
    }

    #[test]
    fn symlinks_may_not_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
        std::fs::write(dir.path().join("inside"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("inside"), dir.path().join("alias")).unwrap();
        let mut root = Root::new(dir.path()).unwrap();
        assert_eq!(root.open_read("escape").unwrap_err().code, ErrorCode::AccessViolation);
        assert!(root.open_read("alias").is_ok());
        assert_eq!(root.open_read("missing").unwrap_err().code, ErrorCode::FileNotFound);
        assert_eq!(root.write_target("escape").unwrap_err().code, ErrorCode::AccessViolation);
    }

    #[test]
    fn catalog_finds_files_by_hash_after_a_walk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f.bin"), b"content").unwrap();
        let mut root = Root::new(dir.path()).unwrap();
        assert_eq!(root.find_by_hash(path_hash("sub/f.bin")).as_deref(), Some("sub/f.bin"));
        assert_eq!(root.find_by_hash([0; 8]), None);
    }
}
