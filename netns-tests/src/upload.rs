//! Uploads through the full topology: which backend serves one and which keeps its replica,
//! how far it got (the bytes in the temporary files the backends write before the rename),
//! and what it left in every backend's root.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use xdp_lb_common::status::BackendState;

use crate::{
    Result,
    clients::{Client, expect_download},
    cluster::Cluster,
    files::sha256,
    pair_topology::client_addr,
    wait_for,
    watch::Growth,
};

/// How tftp-backend names an upload's temporary file, beside the target.
pub const TEMPORARY_PREFIX: &str = ".tftp-upload-";

/// The upload temporaries in `root` (not below it: the tests upload to the root).
#[must_use]
pub fn temporaries(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<PathBuf> =
        entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(TEMPORARY_PREFIX)).map(|e| e.path()).collect();
    found.sort();
    found
}

/// The size of the largest upload temporary in `root` (0: none).
#[must_use]
pub fn temporary_bytes(root: &Path) -> u64 {
    temporaries(root).iter().filter_map(|t| std::fs::metadata(t).ok()).map(|m| m.len()).max().unwrap_or(0)
}

/// Watches an upload's progress: the largest temporary in any of `roots`. A replica that takes
/// over continues the copy it holds, so the figure grows on across a backend's death (and
/// stops while nobody writes: the stall).
#[must_use]
pub fn watch_progress(roots: Vec<PathBuf>) -> Growth {
    Growth::watch_with(move || roots.iter().map(|r| temporary_bytes(r)).max().unwrap_or(0))
}

/// Waits until `progress` saw `bytes`; false after `timeout`.
#[must_use]
pub fn wait_for_progress(progress: &Growth, bytes: u64, timeout: Duration) -> bool {
    wait_for("upload progress", timeout.as_secs().max(1), || (progress.bytes() >= bytes).then_some(())).is_ok()
}

/// Client `client`'s session at the active balancer: (that balancer, the backend serving it).
/// `None` while the balancer has none.
#[must_use]
pub fn serving(cluster: &Cluster, client: usize) -> Option<(usize, usize)> {
    let active = cluster.topo.active_lb().ok()?;
    let address: Ipv4Addr = client_addr(client).parse().ok()?;
    // The freshest: an earlier transfer of the client may still be in the table.
    let session = cluster.topo.lb_status(active).ok()?.sessions.into_iter().filter(|s| *s.client.ip() == address).min_by_key(|s| s.idle_ms)?;
    Some((active, usize::try_from(session.backend).ok()?))
}

/// The replica of an upload served by `serving`: another running backend whose root holds an
/// upload temporary (with roots of their own, only the two copies write one). `None` if no
/// other backend writes one.
#[must_use]
pub fn replica(cluster: &Cluster, serving: usize) -> Option<usize> {
    (0..cluster.backends.len())
        .filter(|&i| i != serving && cluster.backends[i].is_some())
        .find(|&i| !temporaries(&cluster.topo.backend_root(i)).is_empty())
}

/// What one root holds of an upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootState {
    pub root: PathBuf,
    /// The SHA-256 of the file under the upload's name (`None`: there is none).
    pub sha256: Option<String>,
    /// Upload temporaries left in the root.
    pub temporaries: Vec<PathBuf>,
}

impl RootState {
    #[must_use]
    pub fn read(root: &Path, name: &str) -> Self {
        let file = root.join(name);
        let sha256 = file.exists().then(|| sha256(&file).unwrap_or_else(|e| format!("unreadable: {e}")));
        Self { root: root.to_path_buf(), sha256, temporaries: temporaries(root) }
    }
}

/// What is wrong with the roots after an upload of a file whose SHA-256 is `want`: a root with
/// temporaries, with other bytes under the name, or (where `every_root_holds_it`) without
/// the file. Empty: nothing.
#[must_use]
pub fn problems(states: &[RootState], want: &str, every_root_holds_it: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for state in states {
        let root = state.root.display();
        match &state.sha256 {
            Some(got) if got != want => problems.push(format!("{root}: the file differs (SHA-256 {got}, the client's {want})")),
            None if every_root_holds_it => problems.push(format!("{root}: the file is missing")),
            _ => {}
        }
        if !state.temporaries.is_empty() {
            problems.push(format!("{root}: temporaries left: {:?}", state.temporaries));
        }
    }
    problems
}

/// The roots of the backends still running (`cluster.backends[i]` is some), each read for `name`.
#[must_use]
pub fn surviving_roots(cluster: &Cluster, name: &str) -> Vec<RootState> {
    (0..cluster.backends.len()).filter(|&i| cluster.backends[i].is_some()).map(|i| RootState::read(&cluster.topo.backend_root(i), name)).collect()
}

/// Every backend's root, running or not, each read for `name`.
#[must_use]
pub fn all_roots(cluster: &Cluster, name: &str) -> Vec<RootState> {
    cluster.topo.backend_roots().iter().map(|r| RootState::read(r, name)).collect()
}

/// Proves that every running backend serves its copy of `name`: downloads it through the VIP
/// (client `client`, `how`), checks it against `source`, finds the backend that served it (the
/// one whose log gained a read of it: the balancer forgets a finished session), kills that one
/// and waits until the balancer calls it dead, until one backend is left (the last download is
/// served by it, and it stays up). Returns the backends in the order they served.
pub fn download_from_each_backend(cluster: &mut Cluster, client: usize, how: Client, name: &str, source: &Path) -> Result<Vec<usize>> {
    let mut served = Vec::new();
    loop {
        let before = reads_logged(cluster, name);
        let local = cluster.local(&format!("check-{}-{name}", served.len()));
        let download = cluster.download(client, how, name, &local);
        let what = format!("download {} of {name} after the upload", served.len() + 1);
        expect_download(download, &local, source, Duration::from_secs(30), &what, || cluster.logs());
        let after = reads_logged(cluster, name);
        let readers: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
        let [backend] = readers[..] else {
            panic!("{what}: not one running backend logged a read of it but {readers:?} (checked before: {served:?})\n{}", cluster.logs());
        };
        assert!(!served.contains(&backend), "{what}: served by backend {backend} again, which was killed");
        served.push(backend);
        if cluster.backends.iter().filter(|b| b.is_some()).count() == 1 {
            return Ok(served);
        }
        let active = cluster.topo.active_lb()?;
        cluster.kill_backend(backend);
        wait_for(&format!("balancer {active} to call backend {backend} dead"), 20, || {
            (cluster.topo.lb_status(active).ok()?.backends.get(backend)?.state != BackendState::Live).then_some(())
        })?;
    }
}

/// How many reads of `name` each backend has logged (`read ... file=NAME` at info; 0 for a
/// backend not running).
fn reads_logged(cluster: &Cluster, name: &str) -> Vec<usize> {
    cluster
        .backends
        .iter()
        .map(|b| b.as_ref().map_or(0, |b| b.log().lines().filter(|l| l.contains(" read ") && l.contains(name)).count()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(crate::RunPrefix::new().name(name));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_root_shows_the_uploaded_file_and_the_temporaries_beside_it() {
        let root = scratch("upload-root");
        std::fs::write(root.join("up.bin"), b"abc").unwrap();
        std::fs::write(root.join(".tftp-upload-x1"), b"abcd").unwrap();
        std::fs::write(root.join("other.bin"), b"zzzzzzz").unwrap();
        let state = RootState::read(&root, "up.bin");
        assert_eq!(state.sha256.as_deref(), Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        assert_eq!(state.temporaries, [root.join(".tftp-upload-x1")]);
        assert_eq!(temporary_bytes(&root), 4);
        assert_eq!(RootState::read(&root, "missing.bin").sha256, None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn problems_name_each_root_that_misses_the_file_differs_or_keeps_a_temporary() {
        let state = |root: &str, sha: Option<&str>, temporaries: &[&str]| RootState {
            root: root.into(),
            sha256: sha.map(str::to_owned),
            temporaries: temporaries.iter().map(PathBuf::from).collect(),
        };
        let states = [state("/b0", Some("aa"), &[]), state("/b1", None, &[]), state("/b2", Some("bb"), &["/b2/.tftp-upload-1"])];
        let every = problems(&states, "aa", true);
        assert_eq!(every.len(), 3, "{every:?}");
        assert!(every[0].starts_with("/b1: the file is missing"), "{every:?}");
        assert!(every[1].starts_with("/b2: the file differs"), "{every:?}");
        assert!(every[2].starts_with("/b2: temporaries left"), "{every:?}");
        assert_eq!(problems(&states, "aa", false).len(), 2, "a missing file is allowed");
        assert!(problems(&states[..1], "aa", true).is_empty());
    }
}
