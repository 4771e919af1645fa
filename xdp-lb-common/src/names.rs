//! Names of programs and maps, and where they are pinned, so no side spells one by hand.
//!
//! BPF object names are limited to 15 bytes; every name here fits.

/// The XDP program of a load balancer.
pub const PROGRAM_BALANCE: &str = "balance";

/// Per-CPU decision counters of the `balance` program, indexed by [`crate::BalanceCounter`].
pub const MAP_LB_COUNTERS: &str = "LB_COUNTERS";

/// Default bpffs directory under which every role pins its maps, one subdirectory per role.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/xdp-lb";

/// Subdirectory of the pin root for the load balancer role.
pub const ROLE_BALANCE: &str = "balance";

/// `LbConfig` at index 0, written by the agent.
pub const MAP_LB_CONFIG: &str = "LB_CONFIG";
/// `Backend` slots, written by the agent.
pub const MAP_LB_BACKENDS: &str = "LB_BACKENDS";
/// `BackendSeen` slots, written by `balance` (watchdog, learned MACs).
pub const MAP_LB_SEEN: &str = "LB_SEEN";
/// Active sessions per backend (u64), incremented by `balance`, recounted by the agent.
pub const MAP_LB_LOAD: &str = "LB_LOAD";
/// `ClientKey` -> `Session`, LRU.
pub const MAP_LB_SESSIONS: &str = "LB_SESSIONS";
