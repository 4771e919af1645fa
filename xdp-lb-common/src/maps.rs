//! Keys and values of the load balancer's maps. Who writes what is part of each type's doc; see
//! also docs/ARCHITECTURE.md.

use bytemuck::{Pod, Zeroable};

use crate::SteeringHeader;

/// Most backends one load balancer steers to (a constant bound for the kernel's loops).
pub const MAX_BACKENDS: usize = 16;
/// Most sessions one load balancer tracks; the least recently used is evicted beyond that.
pub const MAX_SESSIONS: usize = 65_536;

/// Server ports on the VIP that transfers get (their TID): `TID_BASE .. TID_BASE + TID_SPAN`.
pub const TID_BASE: u16 = 20_000;
pub const TID_SPAN: u16 = 40_000;

/// The client key: the client's IPv4 address and UDP port, as on the wire. Every packet of a
/// transfer from the client carries it, so it names the session.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ClientKey {
    pub ip: [u8; 4],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

impl ClientKey {
    #[must_use]
    pub fn new(ip: [u8; 4], port: [u8; 2]) -> Self {
        Self { ip, port, pad: [0; 2] }
    }

    /// The transfer's server port on the VIP. A function of the client key alone, so every load
    /// balancer derives the same TID for a client without sharing state. Two clients may share a
    /// TID: packets are matched by client key, not by TID.
    #[must_use]
    pub fn tid(&self) -> u16 {
        let ip = u32::from_be_bytes(self.ip);
        let port = u32::from(u16::from_be_bytes(self.port));
        // Multiplicative hash (Knuth), then reduce into the TID range.
        let mixed = (ip ^ port.rotate_left(16) ^ port).wrapping_mul(2_654_435_761);
        let offset = (mixed >> 8) % u32::from(TID_SPAN);
        #[expect(clippy::cast_possible_truncation, reason = "offset < TID_SPAN fits in u16")]
        let offset = offset as u16;
        TID_BASE + offset
    }
}

/// Load balancer settings, entry 0 of `LB_CONFIG`. Written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LbConfig {
    /// The service address clients send to.
    pub vip: [u8; 4],
    /// This LB's own address toward the backends: source of steered packets, and where
    /// backends answer.
    pub steer_addr: [u8; 4],
    /// UDP port on `steer_addr` where backends answer.
    pub steer_port: [u8; 2],
    pub pad: [u8; 6],
    /// Requests from one client address are admitted one per `request_interval_ns` on
    /// average (GCRA; 0: no limit) ...
    pub request_interval_ns: u64,
    /// ... with bursts up to this much ahead of that pace (`(burst - 1) × interval`).
    pub request_burst_ns: u64,
    /// The same for all addresses of one /24 together (`LB_PREFIX_RATE`; 0: no limit): a
    /// flood from many (spoofed) addresses of a network.
    pub prefix_interval_ns: u64,
    pub prefix_burst_ns: u64,
    /// The same for every request this balancer admits, per CPU (`LB_SESSION_BUDGET`; the
    /// agent divides the rate among the CPUs; 0: no limit): new sessions a second, whatever
    /// their addresses.
    pub budget_interval_ns: u64,
    pub budget_burst_ns: u64,
}

/// When the next request from a client address is due at the configured pace (GCRA's
/// theoretical arrival time), value of `LB_RATE` keyed by the IPv4 address, of
/// `LB_PREFIX_RATE` keyed by its /24, and of the per-CPU `LB_SESSION_BUDGET`. Written by
/// `balance` only.
pub type RequestPace = u64;

/// Entries of `LB_PREFIX_RATE`: every /24 of IPv4 space would be 16 Mi; the networks heard
/// from least recently are forgotten first.
pub const MAX_PREFIXES: usize = 16_384;

/// GCRA (the generic cell rate algorithm): with the pace's next due time `due` (`None`: none
/// yet), whether a request at `now` is admitted, and the due time to store if so. Each request
/// moves the due time one `interval` on; one further ahead than `burst` of `now` means too many
/// too fast. `interval` 0: no limit.
#[must_use]
pub const fn gcra(due: Option<RequestPace>, now: u64, interval: u64, burst: u64) -> Option<RequestPace> {
    if interval == 0 {
        return Some(0);
    }
    let due = match due {
        Some(due) if due > now => due,
        _ => now,
    };
    if due - now > burst { None } else { Some(due + interval) }
}

/// Key of `LB_PREFIX_RATE`: the /24 of an IPv4 address.
#[must_use]
pub const fn prefix_of(ip: [u8; 4]) -> [u8; 4] {
    [ip[0], ip[1], ip[2], 0]
}

/// GCRA parameters `(interval, burst)` in ns for `per_sec` requests a second with bursts of
/// `burst`, shared by `shares` independent buckets (per-CPU: each takes `1/shares` of the
/// rate and of the burst, at least one request). `per_sec` 0: no limit.
#[must_use]
pub fn pace(per_sec: u32, burst: u32, shares: u32) -> (u64, u64) {
    if per_sec == 0 {
        return (0, 0);
    }
    let shares = u64::from(shares.max(1));
    let interval = (1_000_000_000 * shares / u64::from(per_sec)).max(1);
    let burst = (u64::from(burst) / shares).max(1);
    (interval, interval * (burst - 1))
}

#[cfg(test)]
mod pace_tests {
    use super::{gcra, pace, prefix_of};

    #[test]
    fn gcra_admits_the_burst_then_the_pace() {
        let (interval, burst) = pace(10, 3, 1);
        assert_eq!((interval, burst), (100_000_000, 200_000_000));
        let mut due = None;
        let admitted: std::vec::Vec<bool> = (0..5)
            .map(|_| match gcra(due, 1_000, interval, burst) {
                Some(next) => {
                    due = Some(next);
                    true
                }
                None => false,
            })
            .collect();
        assert_eq!(admitted, [true, true, true, false, false], "a burst of three at once");
        assert!(gcra(due, 1_000 + interval, interval, burst).is_some(), "one more after an interval");
        assert_eq!(gcra(None, 5, 0, 0), Some(0), "no limit");
    }

    #[test]
    fn a_per_cpu_share_divides_rate_and_burst() {
        assert_eq!(pace(1000, 100, 4), (4_000_000, 4_000_000 * 24));
        assert_eq!(pace(1000, 1, 4), (4_000_000, 0), "at least one request per bucket");
        assert_eq!(pace(0, 100, 4), (0, 0));
        assert_eq!(prefix_of([10, 1, 2, 3]), [10, 1, 2, 0]);
    }
}

/// State of a backend slot in `LB_BACKENDS`.
pub const BACKEND_UNUSED: u8 = 0;
/// Takes new sessions.
pub const BACKEND_LIVE: u8 = 1;
/// Declared dead by the agent (or not yet answered a probe): takes nothing; its sessions move.
pub const BACKEND_DEAD: u8 = 2;

/// A backend, entry of `LB_BACKENDS` (index = backend id). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub ip: [u8; 4],
    /// Its steered-mode service port.
    pub port: [u8; 2],
    /// `BACKEND_UNUSED`, `BACKEND_LIVE` or `BACKEND_DEAD`.
    pub state: u8,
    pub pad: u8,
}

/// What the kernel sees of a backend, entry of `LB_BACKEND_SEEN` (index = backend id). Written
/// by `balance` only; the agent reads it for its watchdog.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendSeen {
    /// Watchdog: packets steered to the backend since it last answered.
    pub unanswered: u64,
    /// `bpf_ktime_get_ns` when `unanswered` last rose from zero.
    pub unanswered_since_ns: u64,
    /// `bpf_ktime_get_ns` of its last packet (reply or heartbeat).
    pub last_answer_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet steered to it.
    pub last_sent_ns: u64,
    pub packets_to: u64,
    pub packets_from: u64,
    /// Learned from its frames: its MAC (or its router's), ours on that link, and the link.
    pub mac: [u8; 6],
    pub lb_mac: [u8; 6],
    pub ifindex: u32,
}

/// The agent's record of its verdicts on one peer (a backend in `LB_HEALTH`, a load balancer in
/// `SW_HEALTH`, same index as its watchdog slot). Written by the agent only (the kernel never
/// reads it) and pinned, so `xdp-lb status` shows it and a restarted agent keeps damping a
/// flapping peer instead of forgetting its history.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Health {
    /// Death verdicts, ever.
    pub verdicts: u64,
    /// Returns to the active set, ever.
    pub revivals: u64,
    /// Deaths within the damping window of each other: the hold-down doubles with each.
    pub flaps: u32,
    pub pad: u32,
    /// CLOCK_MONOTONIC ns of the last death verdict (0: none).
    pub last_verdict_ns: u64,
    /// CLOCK_MONOTONIC ns before which the peer is held out even if it answers (0: not held).
    pub held_until_ns: u64,
}

/// A transfer in flight, value of `LB_SESSIONS` keyed by [`ClientKey`]. Created by `balance` on
/// a request, updated from backend replies; the agent rewrites `backend` to move it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Session {
    /// The header sent to the backend with each client packet: client key, VIP and TID, and the
    /// transfer context learned from the backend's replies.
    pub header: SteeringHeader,
    /// Backend id (index into `LB_BACKENDS`).
    pub backend: u32,
    /// Interface the client's frames arrive on; replies leave there.
    pub ifindex: u32,
    /// Next hop toward the client (source MAC of its frames) and our MAC on that link.
    pub client_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    /// Block number of the client's last ACK, as on the wire.
    pub last_ack: [u8; 2],
    pub pad: [u8; 2],
    /// `bpf_ktime_get_ns` of the client's last packet.
    pub last_client_ns: u64,
}

/// Longest request (RRQ or WRQ, opcode included) `LB_REQUESTS` keeps. Firmware and tools ask a
/// path and a few options in far less; a longer request opens its session all the same, only
/// not kept (counted as `new_session_unkept`).
pub const REQUEST_KEPT_MAX: usize = 512;
/// Entries of `LB_REQUESTS`: a request is kept only until its session learns its context (the
/// backend's first answer), so only sessions in their first moments hold one.
pub const MAX_KEPT_REQUESTS: usize = 4096;

/// The request that opened a session, value of `LB_REQUESTS` keyed by [`ClientKey`]: its TFTP
/// payload as the client sent it. Written by `balance` when a request opens or restarts a
/// session, removed when the session learns its context or finishes. When the session's
/// backend dies before its first answer, the agent sends this request to the new backend, which
/// answers it as a fresh one (a context-less nudge would tell it nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KeptRequest {
    /// Bytes of `bytes` that hold the request (1 ..= `REQUEST_KEPT_MAX`).
    pub len: u16,
    pub pad: [u8; 6],
    pub bytes: [u8; REQUEST_KEPT_MAX],
}

impl KeptRequest {
    /// The request as the client sent it; `None` for an entry that holds none.
    #[must_use]
    pub fn request(&self) -> Option<&[u8]> {
        self.bytes.get(..usize::from(self.len)).filter(|bytes| !bytes.is_empty())
    }
}

/// Longest client DATA (opcode and block number included) `LB_UPLOAD_DATA` keeps: a power of
/// two, so the kernel bounds its copy with a mask, above the largest DATA a client sends at
/// MTU 1500 (blksize 1468: 1472 bytes) and the largest a steered backend grants with the
/// 64-byte header on a 1500 path (1404: `Limits::fit_path_mtu`). A longer one (a jumbo-frame
/// client) is steered but not kept (`upload_data_unkept`).
pub const DATA_KEPT_MAX: usize = 2048;
/// Entries of `LB_UPLOAD_DATA`: one per upload in flight; an upload's entry goes with its
/// session (finished, or restarted by a new request), the least recently used first beyond.
pub const MAX_KEPT_DATA: usize = 4096;

/// The last DATA an upload's client sent, value of `LB_UPLOAD_DATA` keyed by [`ClientKey`]: its
/// TFTP packet as the client sent it. Written by `balance` on each DATA of a session whose
/// context says upload (`MODE_UPLOAD`), in place; removed when the session finishes or a new
/// request restarts it. When the upload's backend dies, the DATA the client sent it may be
/// lost with it, and a lock-step client (tftp-hpa) waits for that block's ACK, ignoring a
/// repeat of the one before: the agent hands this DATA to the replica it moves the upload to,
/// with the nudge.
///
/// The kernel copies each DATA over the last, so a lookup that races a copy could read the
/// bytes of two: the kernel writes `started` (the last field) before the bytes and `done`
/// (the first) after them, and a lookup, which copies the value in address order, holds one
/// DATA's bytes only if it read the two equal ([`KeptData::data`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KeptData {
    /// Number of the last copy finished.
    pub done: u32,
    /// Bytes of `bytes` that hold the DATA (0: none; up to `DATA_KEPT_MAX`).
    pub len: u16,
    pub pad: [u8; 2],
    pub bytes: [u8; DATA_KEPT_MAX],
    /// Number of the last copy begun.
    pub started: u32,
    pub pad_end: u32,
}

impl KeptData {
    /// The DATA as the client sent it; `None` for an entry that holds none or was read while
    /// the kernel copied the next one over it.
    #[must_use]
    pub fn data(&self) -> Option<&[u8]> {
        if self.done != self.started {
            return None;
        }
        self.bytes.get(..usize::from(self.len)).filter(|bytes| !bytes.is_empty())
    }
}

/// A record of the `LB_EVENTS` ring buffer: something about a client's session the agent must
/// act on now rather than at its next tick.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionEvent {
    pub key: ClientKey,
    /// `EVENT_CHANGED` or `EVENT_UNKNOWN`.
    pub kind: u32,
}

/// The kernel created, relearned or moved the session, or learned its context: mirror it to
/// the peer balancer.
pub const EVENT_CHANGED: u32 = 1;
/// A client packet arrived for a session this balancer does not have: ask the backends.
pub const EVENT_UNKNOWN: u32 = 2;

/// Load balancers one switch steers to: the active one and its backup (slots of
/// `SwitchConfig::lbs`, `SW_SEEN` and `SW_HEALTH`).
pub const LB_SLOTS: usize = 2;

/// The switch's settings, entry 0 of `SW_CONFIG`. Written by the switch agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SwitchConfig {
    /// The service address whose traffic goes to the active load balancer.
    pub vip: [u8; 4],
    /// The two load balancers' own addresses (not the VIP): frames from them teach the switch
    /// their MACs, and their replies mark them alive.
    pub lbs: [[u8; 4]; LB_SLOTS],
    /// Index into `lbs` of the active load balancer; the other is the backup.
    pub active: u32,
}

/// Entries of `SW_REQUESTS`: requests of the last moments, one per client (LRU).
pub const MAX_SWITCH_REQUESTS: usize = 4096;

/// A request the switch steered to the active balancer, value of `SW_REQUESTS` keyed by
/// [`ClientKey`] (the client's latest): a balancer that dies between its last answer and the
/// switch's verdict takes the requests steered to it meanwhile along, and their clients would
/// wait for their own timers (seconds, and some firmware gives up). At the swap the switch
/// agent steers the requests that are still their client's last packet (`SW_CLIENTS` has no
/// later one) to the new active balancer, exactly as the kernel would have.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SwitchRequest {
    /// `bpf_ktime_get_ns` when it was steered: the same stamp `SW_CLIENTS` got for it.
    pub steered_ns: u64,
    /// The balancer it was steered to (slot of [`SwitchConfig::lbs`]).
    pub lb_slot: u32,
    pub pad: u32,
    /// Its TFTP payload as the client sent it.
    pub request: KeptRequest,
}

/// Value of `SW_LB_IFACES` (keyed by ifindex) for an interface that faces the load balancers.
/// Written by the switch agent only; an interface without an entry faces clients.
pub const LB_FACING: u32 = 1;

/// Most interfaces `SW_LB_IFACES` holds.
pub const MAX_LB_IFACES: usize = 64;

/// Value of `LB_BACKEND_IFACES` (keyed by ifindex) for an interface of a balancer that faces
/// the backends. Written by the balancer agent only; an interface without an entry faces only
/// clients.
pub const BACKEND_FACING: u32 = 1;

/// What the switch's kernel sees of a load balancer (entry of `SW_SEEN`, index = slot in
/// [`SwitchConfig::lbs`]): the same watchdog and learned next hop as [`BackendSeen`] is for a
/// backend, so both agents judge with one policy.
pub type LbSeen = BackendSeen;

#[cfg(test)]
mod tests {
    use super::{ClientKey, DATA_KEPT_MAX, KeptData, KeptRequest, REQUEST_KEPT_MAX, Session, SwitchRequest, TID_BASE, TID_SPAN};

    #[test]
    fn tid_stays_in_range_and_spreads() {
        let mut seen = std::collections::HashSet::new();
        for port in 1024..3024u16 {
            let tid = ClientKey::new([10, 0, 0, 7], port.to_be_bytes()).tid();
            assert!((TID_BASE..TID_BASE + TID_SPAN).contains(&tid));
            seen.insert(tid);
        }
        assert!(seen.len() > 1900, "only {} distinct TIDs for 2000 clients", seen.len());
    }

    #[test]
    fn session_has_no_implicit_padding() {
        assert_eq!(size_of::<Session>(), 96);
    }

    #[test]
    fn a_kept_request_is_its_first_len_bytes() {
        let mut kept: KeptRequest = bytemuck::Zeroable::zeroed();
        assert_eq!(kept.request(), None, "an empty entry holds no request");
        kept.bytes[..9].copy_from_slice(b"\x00\x01a\x00octet");
        kept.len = 9;
        assert_eq!(kept.request(), Some(&b"\x00\x01a\x00octet"[..]));
        kept.len = u16::try_from(REQUEST_KEPT_MAX + 1).unwrap();
        assert_eq!(kept.request(), None, "a length beyond the buffer is no request");
        assert_eq!(size_of::<KeptRequest>(), 8 + REQUEST_KEPT_MAX, "no implicit padding");
        assert_eq!(size_of::<SwitchRequest>(), 16 + size_of::<KeptRequest>(), "no implicit padding");
    }

    #[test]
    fn kept_data_is_its_first_len_bytes_once_its_copy_finished() {
        let mut kept: KeptData = bytemuck::Zeroable::zeroed();
        assert_eq!(kept.data(), None, "an empty entry holds no DATA");
        kept.bytes[..6].copy_from_slice(b"\x00\x03\x00\x07ab");
        kept.len = 6;
        (kept.started, kept.done) = (3, 3);
        assert_eq!(kept.data(), Some(&b"\x00\x03\x00\x07ab"[..]));
        kept.started = 4;
        assert_eq!(kept.data(), None, "read while the kernel copied the next DATA over it");
        kept.done = 4;
        kept.len = u16::try_from(DATA_KEPT_MAX + 1).unwrap();
        assert_eq!(kept.data(), None, "a length beyond the buffer is no DATA");
        assert_eq!(size_of::<KeptData>(), 16 + DATA_KEPT_MAX, "no implicit padding");
    }
}
