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

/// Every decision the `balance` program makes, as an index into its counter map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceCounter {
    /// Every packet the program saw.
    Received = 0,
    /// Passed to the stack: not IPv4 (ARP, IPv6, ...).
    PassNotIpv4,
    /// Passed to the stack: IPv4 but not UDP.
    PassNotUdp,
    /// Passed to the stack: UDP not addressed to the TFTP service.
    PassNotService,
    /// Passed to the stack: UDP to the TFTP service (steering comes with the balancer).
    PassService,
    /// Dropped: a header ran past the end of the packet.
    DropTruncated,
}

impl BalanceCounter {
    /// Number of slots in the counter map.
    pub const COUNT: usize = 6;

    /// All counters in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Received,
        Self::PassNotIpv4,
        Self::PassNotUdp,
        Self::PassNotService,
        Self::PassService,
        Self::DropTruncated,
    ];

    /// Stable snake-case name, used by `xdp-lb status` and its JSON output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::PassNotIpv4 => "pass_not_ipv4",
            Self::PassNotUdp => "pass_not_udp",
            Self::PassNotService => "pass_not_service",
            Self::PassService => "pass_service",
            Self::DropTruncated => "drop_truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BalanceCounter;

    #[test]
    fn all_is_in_index_order() {
        for (i, c) in BalanceCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} is out of order");
        }
    }
}
