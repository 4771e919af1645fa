//! The maps of `balance` (names and types from xdp-lb-common) and small accessors.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use xdp_lb_common::{
    Backend, BackendSeen, BalanceCounter, ClientKey, Counter, Health, KeptData, KeptRequest, LbConfig, Session, SessionEvent,
    maps::{BACKEND_FACING, EVENT_CHANGED, EVENT_UNKNOWN, MAX_BACKENDS, MAX_KEPT_DATA, MAX_KEPT_REQUESTS, MAX_LB_IFACES, MAX_PREFIXES, MAX_SESSIONS, RequestPace, gcra, prefix_of},
};

#[btf_map]
pub static LB_COUNTERS: PerCpuArray<Counter, { BalanceCounter::COUNT }> = PerCpuArray::new();

#[btf_map]
pub static LB_CONFIG: Array<LbConfig, 1> = Array::new();

#[btf_map]
pub static LB_BACKENDS: Array<Backend, MAX_BACKENDS> = Array::new();

#[btf_map]
pub static LB_SEEN: Array<BackendSeen, MAX_BACKENDS> = Array::new();

#[btf_map]
pub static LB_LOAD: Array<u64, MAX_BACKENDS> = Array::new();

/// The agent's verdicts and flap damping per backend. Only the agent writes it; it lives in
/// the object so that it is created and pinned with the others.
#[btf_map]
pub static LB_HEALTH: Array<Health, MAX_BACKENDS> = Array::new();

/// This balancer's MAC on each interface it is attached to (key: ifindex), written by the agent.
#[btf_map]
pub static LB_OWN_MACS: HashMap<u32, [u8; 6], 64> = HashMap::new();

/// The interfaces that face the backends (ifindex -> `BACKEND_FACING`), written by the agent
/// from `--backend-iface`. Not pinned: each agent writes it before it attaches.
#[btf_map]
pub static LB_BACKEND_IFACES: HashMap<u32, u32, MAX_LB_IFACES> = HashMap::new();

/// Whether `ifindex` faces the backends (`LB_BACKEND_IFACES`).
#[inline(always)]
pub fn faces_backends(ifindex: u32) -> bool {
    // SAFETY: a plain hash lookup; the value is copied out at once.
    unsafe { LB_BACKEND_IFACES.get(&ifindex) }.is_some_and(|flag| *flag == BACKEND_FACING)
}

/// Whether a frame arriving on `ifindex` is addressed to this balancer (or the agent has not
/// said which MAC is ours there). Multicast and broadcast are never steered traffic.
#[inline(always)]
pub fn addressed_to_us(ifindex: u32, dst: [u8; 6]) -> bool {
    // SAFETY: plain read of a map value.
    match unsafe { LB_OWN_MACS.get(&ifindex) } {
        Some(ours) => *ours == dst,
        None => dst[0] & 1 == 0,
    }
}

/// Per-source request pacing (GCRA), one entry per client address; the least recently seen
/// addresses are forgotten first.
#[btf_map]
pub static LB_RATE: LruHashMap<[u8; 4], RequestPace, MAX_SESSIONS> = LruHashMap::new();

/// Per-network request pacing (GCRA), one entry per /24.
#[btf_map]
pub static LB_PREFIX_RATE: LruHashMap<[u8; 4], RequestPace, MAX_PREFIXES> = LruHashMap::new();

/// This balancer's budget of new sessions, one GCRA pace per CPU (no atomics: each CPU's
/// share of the rate is the agent's division).
#[btf_map]
pub static LB_SESSION_BUDGET: PerCpuArray<RequestPace, 1> = PerCpuArray::new();

/// Per-CPU staging slot where a new session is built before insertion: a `Session` is too
/// large for the BPF stack next to everything else.
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<Session, 1> = PerCpuArray::new();

#[btf_map]
pub static LB_SESSIONS: LruHashMap<ClientKey, Session, MAX_SESSIONS> = LruHashMap::new();

/// The request of each session that has no context yet (see `KeptRequest`).
#[btf_map]
pub static LB_REQUESTS: LruHashMap<ClientKey, KeptRequest, MAX_KEPT_REQUESTS> = LruHashMap::new();

/// Per-CPU staging slot where a request is copied before it is kept: a `KeptRequest` is larger
/// than the BPF stack.
#[btf_map]
pub static LB_REQUEST_SCRATCH: PerCpuArray<KeptRequest, 1> = PerCpuArray::new();

/// The last DATA of each upload's client (see `KeptData`), written in place.
#[btf_map]
pub static LB_UPLOAD_DATA: LruHashMap<ClientKey, KeptData, MAX_KEPT_DATA> = LruHashMap::new();

/// Per-CPU zeroed slot from which an upload's `LB_UPLOAD_DATA` entry is created (a `KeptData`
/// is larger than the BPF stack). Never written: an entry starts empty.
#[btf_map]
pub static LB_DATA_SCRATCH: PerCpuArray<KeptData, 1> = PerCpuArray::new();

/// Sessions the agent must hear about now: created or moved (mirror them to the peer), or
/// missing (ask the backends). About 2700 records of 12 bytes plus record headers.
#[btf_map]
pub static LB_EVENTS: RingBuf<SessionEvent, { 64 * 1024 }> = RingBuf::new();

/// Tells the agent that `key`'s session is new, moved or has its context now. A full ring only
/// delays the news until the agent's next periodic sync.
#[inline(always)]
pub fn announce(key: &ClientKey) {
    let _ = LB_EVENTS.output(SessionEvent { key: *key, kind: EVENT_CHANGED }, 0);
}

/// Tells the agent that a client sent to its TID without a session here: its backend, which
/// holds the transfer, will answer the agent's nudge and the reply relearns the session.
#[inline(always)]
pub fn report_unknown(key: &ClientKey) {
    let _ = LB_EVENTS.output(SessionEvent { key: *key, kind: EVENT_UNKNOWN }, 0);
}

/// Why a request was not admitted.
pub enum Refused {
    /// Its address is over its pace.
    Address,
    /// Its /24 is over its pace.
    Prefix,
    /// This CPU's share of the balancer's new-session budget is spent.
    Budget,
}

/// Admits a request from `ip` if its address, its /24 and the balancer as a whole keep to
/// their paces (GCRA, `xdp_lb_common::maps::gcra`), checked in that order: a flood from one
/// address spends only its own allowance, one from many addresses of a network that
/// network's, and only a flood from everywhere the budget that every client shares.
/// Concurrent CPUs may let a request or two more through an LRU pace.
#[inline(always)]
pub fn admit_request(ip: [u8; 4], config: &LbConfig) -> Result<(), Refused> {
    let now = now_ns();
    if config.request_interval_ns != 0 {
        // SAFETY: plain read of a map value.
        let due = unsafe { LB_RATE.get(&ip) }.copied();
        let next = gcra(due, now, config.request_interval_ns, config.request_burst_ns).ok_or(Refused::Address)?;
        let _ = LB_RATE.insert(&ip, &next, 0);
    }
    if config.prefix_interval_ns != 0 {
        let prefix = prefix_of(ip);
        // SAFETY: plain read of a map value.
        let due = unsafe { LB_PREFIX_RATE.get(&prefix) }.copied();
        let next = gcra(due, now, config.prefix_interval_ns, config.prefix_burst_ns).ok_or(Refused::Prefix)?;
        let _ = LB_PREFIX_RATE.insert(&prefix, &next, 0);
    }
    if config.budget_interval_ns != 0 {
        let Some(slot) = LB_SESSION_BUDGET.get_ptr_mut(0) else { return Ok(()) };
        // SAFETY: the per-CPU slot belongs to this CPU for the duration of the program.
        let due = unsafe { *slot };
        let next = gcra(Some(due), now, config.budget_interval_ns, config.budget_burst_ns).ok_or(Refused::Budget)?;
        // SAFETY: as above.
        unsafe { *slot = next };
    }
    Ok(())
}

/// Adds one packet of `len` bytes to a decision counter.
#[inline(always)]
pub fn count(counter: BalanceCounter, len: u64) {
    if let Some(slot) = LB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the per-CPU slot belongs to this CPU for the duration of the program.
        unsafe { (*slot).record(len) };
    }
}

/// Atomically adds `value` (wrapping, so `u64::MAX` subtracts one) to a shared map field.
#[inline(always)]
pub fn atomic_add(field: *mut u64, value: u64) {
    // SAFETY: `field` points into a map value, which is 8-byte aligned and lives as long as the
    // map; other CPUs only access it atomically or with plain racy reads.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, value) };
}

/// Monotonic time in ns, the clock the agent compares with (CLOCK_MONOTONIC).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}
