//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH`: a few system calls for the table,
//! where walking it key by key (what aya 0.14 offers) costs two per entry. The agent reads its
//! session table every sync interval; with 20 000 sessions (a request flood) the walk took
//! longer than the interval and starved the agent's watchdog and heartbeat answers.
//!
//! aya has no batch operations, so this is the one raw `bpf(2)` call of the agent; the
//! attribute layout is the kernel's stable UAPI (`union bpf_attr`, the `batch` member).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::MapData;
use bytemuck::Pod;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a (non-per-CPU) hash map whose keys are `K` and values `V`. An error means
/// the kernel refused batch lookups (older than 5.6, or another map type): walk the map then.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(std::io::Error::other)?;
    let mut keys = vec![K::zeroed(); CHUNK];
    let mut values = vec![V::zeroed(); CHUNK];
    // The kernel's cursor between calls (a bucket index for hash maps; room for any).
    let (mut token, mut next_token) = (0u64, 0u64);
    let mut all = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { std::ptr::from_ref(&token) as u64 },
            out_batch: std::ptr::from_mut(&mut next_token) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(CHUNK).unwrap_or(u32::MAX),
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: bpf(2) with an attribute of the documented layout whose pointers address
        // buffers of `count` keys and values (and a cursor) that outlive the call.
        let result = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, std::ptr::from_mut(&mut attr), size_of::<BatchAttr>())
        };
        let error = (result < 0).then(std::io::Error::last_os_error);
        let done = error.as_ref().is_some_and(|e| e.raw_os_error() == Some(libc::ENOENT));
        if let Some(error) = error.filter(|_| !done) {
            return Err(error);
        }
        let got = usize::try_from(attr.count).unwrap_or(0).min(CHUNK);
        all.extend(keys[..got].iter().copied().zip(values[..got].iter().copied()));
        if done {
            return Ok(all);
        }
        token = next_token;
        first = false;
    }
}
