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
/// `Health` slots: the agent's verdicts on each backend and its flap damping (the kernel
/// never reads it; pinned for `xdp-lb status` and the next agent).
pub const MAP_LB_HEALTH: &str = "LB_HEALTH";
/// Active sessions per backend (u64), incremented by `balance`, recounted by the agent.
pub const MAP_LB_LOAD: &str = "LB_LOAD";
/// `ClientKey` -> `Session`, LRU.
pub const MAP_LB_SESSIONS: &str = "LB_SESSIONS";
/// `ClientKey` -> `KeptRequest` (LRU): the request of each session still waiting for its
/// backend's first answer.
pub const MAP_LB_REQUESTS: &str = "LB_REQUESTS";
/// `ClientKey` -> `KeptData` (LRU): the last DATA of each upload's client, for the replica
/// the upload moves to should its backend die.
pub const MAP_LB_UPLOAD_DATA: &str = "LB_UPLOAD_DATA";
/// Interface index -> the MAC of this balancer's interface, written by the agent: frames to
/// other MACs are not steered.
pub const MAP_LB_OWN_MACS: &str = "LB_OWN_MACS";
/// Interface index -> `BACKEND_FACING`, written by the agent (`--backend-iface`): only frames
/// arriving there may speak for a backend.
pub const MAP_LB_BACKEND_IFACES: &str = "LB_BACKEND_IFACES";

/// Client IPv4 address -> `RequestPace` (LRU): the per-source request rate limit.
pub const MAP_LB_RATE: &str = "LB_RATE";
/// /24 prefix -> `RequestPace` (LRU): the per-network request rate limit.
pub const MAP_LB_PREFIX_RATE: &str = "LB_PREFIX_RATE";
/// Per-CPU `RequestPace`: this balancer's budget of new sessions.
pub const MAP_LB_SESSION_BUDGET: &str = "LB_SESSION_BUDGET";

/// Ring buffer of client keys whose session the kernel created or moved: the agent mirrors them
/// to the peer load balancer at once instead of waiting for its next sync.
pub const MAP_LB_EVENTS: &str = "LB_EVENTS";

/// The XDP program of the switch.
pub const PROGRAM_SWITCH: &str = "switch";
/// Subdirectory of the pin root for the switch role.
pub const ROLE_SWITCH: &str = "switch";
/// Per-CPU decision counters of `switch`, indexed by [`crate::SwitchCounter`].
pub const MAP_SW_COUNTERS: &str = "SW_COUNTERS";
/// `SwitchConfig` at index 0, written by the switch agent.
pub const MAP_SW_CONFIG: &str = "SW_CONFIG";
/// `LbSeen` for each of the two load balancers, written by `switch`.
pub const MAP_SW_SEEN: &str = "SW_SEEN";
/// `Health` of each of the two load balancers: the switch agent's verdicts and flap damping.
pub const MAP_SW_HEALTH: &str = "SW_HEALTH";
/// `ClientKey` -> `bpf_ktime_get_ns` of its last packet (LRU): clients in flight.
pub const MAP_SW_CLIENTS: &str = "SW_CLIENTS";
/// `ClientKey` -> `SwitchRequest` (LRU): the latest request each client sent, for the agent
/// to steer again should the balancer it went to have died with it.
pub const MAP_SW_REQUESTS: &str = "SW_REQUESTS";
/// Interface index -> `LB_FACING`, written by the switch agent (`--lb-iface`): only frames
/// arriving there may speak for a load balancer or the VIP.
pub const MAP_SW_LB_IFACES: &str = "SW_LB_IFACES";
