//! Decision counters: one per-CPU array slot per outcome, so every path through a program is
//! visible from userspace (`xdp-lb status`, `bpftool map dump pinned ...`).

use bytemuck::{Pod, Zeroable};

/// One counter slot: packets and bytes that took one path through a program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds one packet of `len` bytes.
    #[inline(always)]
    pub fn record(&mut self, len: u64) {
        self.packets += 1;
        self.bytes += len;
    }

    /// Sum of two slots (used to fold per-CPU values in userspace).
    #[must_use]
    pub fn merged(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// Declares the counter enum, its `ALL` table and its names in one place.
macro_rules! counters {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$doc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$doc])* $variant,)+ }

        impl $name {
            /// All counters in index order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];
            /// Number of slots in the counter map.
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake-case name, used by `xdp-lb status` and its JSON output.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $text,)+ }
            }
        }
    };
}

/// `counters!` with the agent's control-message slots appended: both agents count their
/// control messages (see xdp-lb/src/control_auth.rs) at the end of their program's counter
/// map, under the same names.
macro_rules! counters_with_control_slots {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        counters! {
            $(#[$meta])*
            pub enum $name {
                $($body)*
                // Written by the agent, not the program: its control messages (heartbeats, role
                // changes, session sync; see xdp-lb/src/control_auth.rs). Packets only.
                /// Control messages accepted (authentic, addressed here, fresh, new).
                ControlAccepted => "control_accepted",
                /// Dropped: not a control message of this version.
                ControlMalformed => "control_malformed",
                /// Dropped: unsigned (`--insecure-control` sender) while this agent has a key.
                ControlUnauthenticated => "control_unauthenticated",
                /// Dropped: signed with a key id this agent does not hold.
                ControlUnknownKey => "control_unknown_key",
                /// Dropped: the MAC does not match (another key, or forged or altered bytes).
                ControlBadMac => "control_bad_mac",
                /// Dropped: authentic but addressed to another agent.
                ControlMisaddressed => "control_misaddressed",
                /// Dropped: authentic but its time is beyond `--control-max-skew-ms`.
                ControlStale => "control_stale",
                /// Dropped: authentic but not newer than the last accepted from its sender.
                ControlReplayed => "control_replayed",
                /// Of the authentication failures, those from a known peer's address (the other
                /// balancer; for the switch, either balancer).
                ControlPeerAuthFailed => "control_peer_auth_failed",
                /// Rejection notices received: another agent drops this one's messages.
                ControlRejectedByOther => "control_rejected_by_other",
            }
        }
    };
}

counters_with_control_slots! {
    /// Every decision the `balance` program makes, as an index into its counter map. Each packet
    /// increments `Received` and exactly one other counter. The `control_*` slots at the end
    /// are the agent's, not the program's.
    pub enum BalanceCounter {
        /// Every packet the program saw.
        Received => "received",
        /// Passed to the stack: not IPv4 (ARP, IPv6, ...).
        PassNotIpv4 => "pass_not_ipv4",
        /// Passed to the stack: IPv4 but not UDP.
        PassNotUdp => "pass_not_udp",
        /// Passed to the stack: UDP not for the VIP's TFTP ports nor the steering port.
        PassNotService => "pass_not_service",
        /// Dropped: a header ran past the end of the packet.
        DropTruncated => "drop_truncated",
        /// Dropped: for the service, but fragmented or with IP options (cannot be steered).
        DropFragmentOrOptions => "drop_fragment_or_options",
        /// Dropped: to VIP port 69 but not an RRQ or WRQ.
        DropNotRequest => "drop_not_request",
        /// An RRQ or WRQ created (or restarted) a session.
        NewSession => "new_session",
        /// A client packet steered to its backend.
        ToBackend => "to_backend",
        /// A backend reply steered to its client.
        ToClient => "to_client",
        /// A client packet found its backend not live and moved the session in the kernel.
        Moved => "moved",
        /// Dropped: client packet to a TID without a session.
        DropNoSession => "drop_no_session",
        /// Dropped: no live backend (with a known MAC) to steer to.
        DropNoBackend => "drop_no_backend",
        /// Dropped: to the steering port, but not from a registered backend.
        DropUnknownSource => "drop_unknown_source",
        /// Dropped: from a backend, without a valid steering header.
        DropBadHeader => "drop_bad_header",
        /// Dropped: reply from a backend that no longer serves the session.
        DropStaleBackend => "drop_stale_backend",
        /// Backend heartbeat answer: recorded and passed to the agent's socket.
        Heartbeat => "heartbeat",
        /// The backend ended a session; the LB forgot it.
        SessionFinished => "session_finished",
        /// Dropped: the kernel refused to grow or shrink the packet.
        DropAdjustHead => "drop_adjust_head",
        /// A registered backend's reply for a client without a session created it (after a
        /// load balancer takeover or an eviction), then went to the client.
        Relearned => "relearned",
        /// Dropped: a reply for a session whose way to the client is unknown and the kernel's
        /// routing table has no resolved next hop for it yet.
        DropNoRoute => "drop_no_route",
        /// Dropped: a request from a client address over its request rate (flood guard).
        DropRateLimited => "drop_rate_limited",
        /// Passed untouched: a unicast frame for another host's MAC (a bridge flooding frames
        /// for a peer that went away); steering it would answer in the peer's name.
        PassNotOurs => "pass_not_ours",
        /// Dropped: a backend reply longer than one TFTP packet of its block size. A
        /// segmentation-offload super-packet that reached the program whole (a backend sending
        /// with `--segment-offload` over a link that does not cut it into datagrams first):
        /// forwarded, it would hand the client several blocks as one.
        DropOversize => "drop_oversize",
        /// A backend's header-only `HEARD` reply (a datagram that needed no answer): recorded
        /// as its answer for the watchdog, then dropped.
        BackendHeard => "backend_heard",
        /// Dropped: a request from a /24 over its networks's request rate (flood guard against
        /// many addresses, spoofed ones included).
        DropPrefixRateLimited => "drop_prefix_rate_limited",
        /// Dropped: a request over this balancer's budget of new sessions a second, all
        /// addresses together (flood guard of last resort).
        DropSessionBudget => "drop_session_budget",
        /// Dropped: from a registered backend's address and port, but on an interface that
        /// does not face the backends (`--backend-iface`): a host on the clients' side speaking
        /// for a backend. Nothing learned, no watchdog touched.
        DropBackendWrongSide => "drop_backend_wrong_side",
        /// An RRQ or WRQ created (or restarted) a session, but its request is not kept in
        /// `LB_REQUESTS` (longer than `REQUEST_KEPT_MAX`, or the table refused it): should its
        /// backend die before answering, the new one gets a nudge it cannot act on, and the
        /// client's retransmission is what recovers.
        NewSessionUnkept => "new_session_unkept",
        /// An upload's DATA steered to its backend (as `to_backend` would count it) but not kept
        /// in `LB_UPLOAD_DATA` (longer than `DATA_KEPT_MAX`, or the table refused it): should
        /// the backend die with it, the replica gets a plain nudge, and a lock-step client's
        /// own timer is what recovers.
        UploadDataUnkept => "upload_data_unkept",
    }
}

counters_with_control_slots! {
    /// Every decision the `switch` program makes, as an index into its counter map. Each packet
    /// increments `Received` and exactly one other counter. The `control_*` slots at the end
    /// are the agent's, not the program's.
    pub enum SwitchCounter {
        /// Every packet the program saw.
        Received => "received",
        /// Passed to the stack: not IPv4 (ARP, IPv6, ...).
        PassNotIpv4 => "pass_not_ipv4",
        /// Passed to the stack: IPv4 but not UDP.
        PassNotUdp => "pass_not_udp",
        /// Passed to the stack: neither for the VIP nor from a load balancer.
        PassOther => "pass_other",
        /// Dropped: a header ran past the end of the packet.
        DropTruncated => "drop_truncated",
        /// Dropped: for the VIP, but fragmented or with IP options.
        DropFragmentOrOptions => "drop_fragment_or_options",
        /// Dropped: for the VIP, but the active load balancer's MAC is not known yet.
        DropNoLb => "drop_no_lb",
        /// A client packet steered to the active load balancer.
        ToLb => "to_lb",
        /// A load balancer's reply steered to its client.
        ToClient => "to_client",
        /// A load balancer's reply passed to the stack: no resolved route to the client yet.
        ToClientByStack => "to_client_by_stack",
        /// A load balancer's own traffic (heartbeat answers, sync): recorded, passed.
        FromLb => "from_lb",
        /// Dropped: a frame with a load balancer's or the VIP's source address on an interface
        /// that does not face the balancers (`--lb-iface`): a client-side host speaking for a
        /// balancer. Nothing learned, no watchdog touched.
        DropSpoofedLb => "drop_spoofed_lb",
        /// A request (RRQ or WRQ to port 69) kept in `SW_REQUESTS` as it went to the active
        /// load balancer (also counted as `to_lb`).
        RequestKept => "request_kept",
        /// A request steered but not kept: longer than `REQUEST_KEPT_MAX`, or the table refused
        /// it (also counted as `to_lb`). A balancer dying with it leaves it to the client's timer.
        RequestUnkept => "request_unkept",
        /// Written by the agent: requests it steered again to the new active balancer at a swap
        /// (the dead one may have lost them; see `SwitchRequest`).
        RequestReplayed => "request_replayed",
    }
}

#[cfg(test)]
mod tests {
    use super::{BalanceCounter, SwitchCounter};

    #[test]
    fn all_is_in_index_order() {
        for (i, c) in BalanceCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} is out of order");
        }
        for (i, c) in SwitchCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} is out of order");
        }
    }

    #[test]
    fn both_agents_have_the_same_control_slots_last() {
        let balance = &BalanceCounter::ALL[BalanceCounter::ControlAccepted as usize..];
        let switch = &SwitchCounter::ALL[SwitchCounter::ControlAccepted as usize..];
        assert_eq!(balance.len(), switch.len());
        for (b, s) in balance.iter().zip(switch) {
            assert_eq!(b.name(), s.name());
            assert!(b.name().starts_with("control_"));
        }
        assert!(!BalanceCounter::ALL[BalanceCounter::ControlAccepted as usize - 1].name().starts_with("control_"));
    }
}
