//! What `xdp-lb status --json` reports, typed once: the agent serializes these structs, and the
//! tests, benches and the demo deserialize them, so nobody indexes the JSON by strings (feature
//! `status`, userspace only).

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    string::String,
    vec::Vec,
};

use serde::{Deserialize, Serialize};

use crate::{BalanceCounter, SwitchCounter};

/// Everything `status` reports. A role whose maps are not pinned is `None`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub switch: Option<SwitchStatus>,
    pub balance: Option<BalanceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwitchStatus {
    pub pin_dir: String,
    pub vip: Ipv4Addr,
    pub clients_in_flight: u64,
    pub lbs: Vec<LbStatus>,
    pub counters: Vec<NamedCounter>,
    pub control: ControlStatus,
}

impl SwitchStatus {
    /// The slot of the balancer the switch steers to.
    #[must_use]
    pub fn active(&self) -> Option<usize> {
        self.lbs.iter().position(|lb| lb.role == LbRole::Active)
    }

    /// One of the switch program's counters.
    #[must_use]
    pub fn counter(&self, counter: SwitchCounter) -> NamedCounter {
        find(&self.counters, counter.name())
    }
}

/// The agent's control messages: what it accepted and rejected (the `control_*` counters),
/// and what that means, a sentence each (a key mismatch above all).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlStatus {
    pub accepted: u64,
    /// Rejected messages by reason (`bad_mac`, `unknown_key`, `replayed`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Of the authentication failures, those from the peer's address.
    pub peer_auth_failed: u64,
    /// Rejection notices another agent sent this one.
    pub rejected_by_other: u64,
    pub warnings: Vec<String>,
}

impl ControlStatus {
    /// Messages rejected for `reason` (0 when none were).
    #[must_use]
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(reason).copied().unwrap_or(0)
    }
}

/// A balancer's part in the switch's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbRole {
    Active,
    Backup,
}

impl fmt::Display for LbRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Active => "active",
            Self::Backup => "backup",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LbStatus {
    pub address: Ipv4Addr,
    pub role: LbRole,
    /// Its MAC has been learned from its own frames (it has answered at least once).
    pub reachable: bool,
    #[serde(flatten)]
    pub watch: PeerWatch,
}

/// What the watchdog knows of a peer (a balancer at the switch, a backend at a balancer), and
/// the agent's verdicts on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerWatch {
    /// Packets sent to it since it last answered.
    pub unanswered: u64,
    /// Milliseconds since it last answered (`None`: never).
    pub last_answer_ms_ago: Option<u64>,
    pub packets_to: u64,
    pub packets_from: u64,
    pub health: HealthStatus,
}

/// The agent's verdicts on a peer and its flap damping.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthStatus {
    /// Death verdicts, ever (a false one is a bug: see docs/SECURITY.md).
    pub verdicts: u64,
    pub revivals: u64,
    /// Deaths within the damping window of each other.
    pub flaps: u32,
    pub last_verdict_ms_ago: Option<u64>,
    /// Held out of the active set for this much longer though it answers (`None`: not held).
    pub held_for_ms: Option<u64>,
}

impl HealthStatus {
    /// "3 (held 2000 ms)" for the tables.
    #[must_use]
    pub fn cell(&self) -> String {
        match self.held_for_ms {
            Some(ms) => std::format!("{} (held {ms} ms)", self.verdicts),
            None => std::format!("{}", self.verdicts),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BalanceStatus {
    pub pin_dir: String,
    pub vip: Ipv4Addr,
    pub address: SocketAddrV4,
    pub backends: Vec<BackendStatus>,
    pub sessions: Vec<SessionStatus>,
    pub counters: Vec<NamedCounter>,
    pub control: ControlStatus,
}

impl BalanceStatus {
    /// Backends the agent holds live.
    #[must_use]
    pub fn live_backends(&self) -> usize {
        self.backends.iter().filter(|b| b.state == BackendState::Live).count()
    }

    /// One of the balancer program's counters.
    #[must_use]
    pub fn counter(&self, counter: BalanceCounter) -> NamedCounter {
        find(&self.counters, counter.name())
    }
}

/// A backend slot's state in the balancer's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Live,
    Dead,
    Unused,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Live => "live",
            Self::Dead => "dead",
            Self::Unused => "unused",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub id: usize,
    pub address: SocketAddrV4,
    pub state: BackendState,
    pub sessions: u64,
    #[serde(flatten)]
    pub watch: PeerWatch,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub client: SocketAddrV4,
    pub tid: u16,
    pub backend: u32,
    /// Highest block the backend has sent (32-bit counter).
    pub block: u32,
    pub last_ack: u16,
    pub blksize: u16,
    pub windowsize: u16,
    pub path_hash: String,
    pub idle_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCounter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// The counter named `name` (zero when the agent did not report it).
fn find(counters: &[NamedCounter], name: &str) -> NamedCounter {
    counters.iter().find(|c| c.name == name).cloned().unwrap_or_else(|| NamedCounter { name: name.into(), ..NamedCounter::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_states_read_as_the_words_the_json_has_always_used() {
        assert_eq!(serde_json::to_string(&LbRole::Active).unwrap(), "\"active\"");
        assert_eq!(serde_json::from_str::<BackendState>("\"dead\"").unwrap(), BackendState::Dead);
        assert_eq!(std::format!("{:<7}|", LbRole::Backup), "backup |");
    }

    #[test]
    fn the_watchdogs_fields_stay_at_the_top_of_a_peers_json() {
        let health = HealthStatus { verdicts: 1, revivals: 0, flaps: 0, last_verdict_ms_ago: None, held_for_ms: None };
        let watch = PeerWatch { unanswered: 2, last_answer_ms_ago: Some(3), packets_to: 4, packets_from: 5, health };
        let backend = BackendStatus { id: 0, address: "10.0.0.1:7000".parse().unwrap(), state: BackendState::Live, sessions: 0, watch };
        let json = serde_json::to_value(&backend).unwrap();
        assert_eq!((json["unanswered"].as_u64(), json["health"]["verdicts"].as_u64()), (Some(2), Some(1)), "{json}");
        let back: BackendStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.watch.packets_from, 5);
    }

    #[test]
    fn a_counter_is_found_by_its_enum_and_a_missing_one_reads_zero() {
        let counters = std::vec![NamedCounter { name: "to_client".into(), packets: 3, bytes: 30 }];
        assert_eq!(find(&counters, BalanceCounter::ToClient.name()).packets, 3);
        assert_eq!(find(&counters, BalanceCounter::ToBackend.name()), NamedCounter { name: "to_backend".into(), packets: 0, bytes: 0 });
    }
}
