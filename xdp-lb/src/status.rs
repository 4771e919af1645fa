//! `xdp-lb status`: what the pinned maps say, as tables or JSON.

use std::{
    io::Write as _,
    net::SocketAddrV4,
    path::Path,
};

use xdp_lb_common::{
    BackendSeen, BalanceCounter, Counter, Health, SwitchCounter,
    status::{BackendState, BackendStatus, BalanceStatus, ControlStatus, HealthStatus, LbRole, LbStatus, NamedCounter, PeerWatch, SessionStatus, Status, SwitchStatus},
    maps::{BACKEND_DEAD, BACKEND_LIVE, BACKEND_UNUSED, MAX_BACKENDS},
    names::{MAP_LB_COUNTERS, MAP_SW_COUNTERS, ROLE_BALANCE, ROLE_SWITCH},
};

use crate::{
    clock::monotonic_ns,
    control_auth::Stats,
    maps::{LbMaps, SwitchMaps},
    pair_wire::Reason,
    pins,
};

/// Clients whose last packet is younger than this count as in flight in the switch's report.
const CLIENT_WINDOW_NS: u64 = 2_000_000_000;

/// Sessions listed in the table before it is cut (JSON lists all).
const TABLE_SESSIONS: usize = 40;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of tables (for scripts and tests).
    #[arg(long)]
    json: bool,
}

/// The control report from the counters; `peer` names the known senders ("the peer
/// balancer", "a load balancer").
fn control_status(counters: &[NamedCounter], peer: &str, others: &str) -> ControlStatus {
    let at = |name: &str| counters.iter().find(|c| c.name == name).map_or(0, |c| c.packets);
    let stats = Stats::from_counters(&Stats::NAMES.map(at));
    let rejected = Reason::ALL.iter().map(|r| (r.name().to_owned(), stats.rejected[*r as usize - 1])).collect();
    let auth_failed: u64 = Reason::ALL.iter().filter(|r| r.is_auth_failure()).map(|r| stats.rejected[*r as usize - 1]).sum();
    let mut warnings = Vec::new();
    if stats.peer_auth_failed > 0 {
        warnings.push(format!(
            "{peer}'s messages fail authentication ({} messages): its control key differs from this agent's (compare the key fingerprints both agents log at start), or someone forges its address",
            stats.peer_auth_failed
        ));
    }
    let from_others = auth_failed - stats.peer_auth_failed.min(auth_failed);
    if from_others > 0 {
        warnings.push(format!("{from_others} control messages from {others} failed authentication (a key mismatch there, or forgeries): dropped"));
    }
    if stats.rejected_by_other > 0 {
        warnings.push(format!(
            "another agent rejected this agent's control messages ({} notices): see this agent's log for which one and why",
            stats.rejected_by_other
        ));
    }
    for (reason, what) in [(Reason::Misaddressed, "addressed to another agent (check --lb/--peer)"), (Reason::Stale, "stale (clocks apart, or replays)"), (Reason::Replayed, "replayed")] {
        let n = stats.rejected[reason as usize - 1];
        if n > 0 {
            warnings.push(format!("{n} authentic control messages dropped as {what}"));
        }
    }
    ControlStatus { accepted: stats.accepted, rejected, peer_auth_failed: stats.peer_auth_failed, rejected_by_other: stats.rejected_by_other, warnings }
}

/// What the watchdog saw of a peer and the agent's health record of it, as reported.
fn peer_watch(now: u64, seen: &BackendSeen, h: &Health) -> PeerWatch {
    PeerWatch {
        unanswered: seen.unanswered,
        last_answer_ms_ago: (seen.last_answer_ns != 0).then(|| ms_ago(now, seen.last_answer_ns)),
        packets_to: seen.packets_to,
        packets_from: seen.packets_from,
        health: HealthStatus {
            verdicts: h.verdicts,
            revivals: h.revivals,
            flaps: h.flaps,
            last_verdict_ms_ago: (h.last_verdict_ns != 0).then(|| ms_ago(now, h.last_verdict_ns)),
            held_for_ms: (h.held_until_ns > now).then(|| (h.held_until_ns - now) / 1_000_000),
        },
    }
}

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let dir = pins::role_dir(pin_root, ROLE_BALANCE);
    let balance = if dir.join(MAP_LB_COUNTERS).exists() { Some(read_balance(&dir)?) } else { None };
    let switch_dir = pins::role_dir(pin_root, ROLE_SWITCH);
    let switch = if switch_dir.join(MAP_SW_COUNTERS).exists() { Some(read_switch(&switch_dir)?) } else { None };
    let status = Status { switch, balance };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &status)?;
        writeln!(out)?;
    } else {
        print_tables(&mut out, &dir, &status)?;
    }
    Ok(())
}

fn ms_ago(now: u64, then: u64) -> u64 {
    now.saturating_sub(then) / 1_000_000
}

fn named(names: impl Iterator<Item = &'static str>, counters: Vec<Counter>) -> Vec<NamedCounter> {
    names.zip(counters).map(|(name, c)| NamedCounter { name: name.to_owned(), packets: c.packets, bytes: c.bytes }).collect()
}

fn read_switch(dir: &Path) -> anyhow::Result<SwitchStatus> {
    let maps = SwitchMaps::open_pinned(dir)?;
    let now = monotonic_ns();
    let config = maps.config()?;
    let mut lbs = Vec::new();
    for slot in 0..2u32 {
        let seen = maps.seen(slot)?;
        lbs.push(LbStatus {
            address: config.lbs[slot as usize].into(),
            role: if slot == config.active & 1 { LbRole::Active } else { LbRole::Backup },
            reachable: seen.mac != [0; 6],
            watch: peer_watch(now, &seen, &maps.health(slot)?),
        });
    }
    let counters = named(SwitchCounter::ALL.iter().map(|c| c.name()), maps.counters()?);
    Ok(SwitchStatus {
        pin_dir: dir.display().to_string(),
        vip: config.vip.into(),
        clients_in_flight: maps.clients_in_flight(now, CLIENT_WINDOW_NS),
        lbs,
        control: control_status(&counters, "a load balancer", "other addresses"),
        counters,
    })
}

fn read_balance(dir: &Path) -> anyhow::Result<BalanceStatus> {
    let maps = LbMaps::open_pinned(dir)?;
    let now = monotonic_ns();
    let config = maps.config.get(&0, 0)?;
    let mut backends = Vec::new();
    for id in 0..MAX_BACKENDS {
        let id_u32 = u32::try_from(id)?;
        let (backend, seen) = (maps.backend(id_u32)?, maps.seen(id_u32)?);
        if backend.state == BACKEND_UNUSED && backend.ip == [0; 4] {
            continue;
        }
        backends.push(BackendStatus {
            id,
            address: SocketAddrV4::new(backend.ip.into(), u16::from_be_bytes(backend.port)),
            state: match backend.state {
                BACKEND_LIVE => BackendState::Live,
                BACKEND_DEAD => BackendState::Dead,
                _ => BackendState::Unused,
            },
            sessions: maps.load(id_u32)?,
            watch: peer_watch(now, &seen, &maps.health.get(&id_u32, 0)?),
        });
    }
    let sessions = maps
        .sessions()
        .into_iter()
        .map(|(key, s)| SessionStatus {
            client: SocketAddrV4::new(key.ip.into(), u16::from_be_bytes(key.port)),
            tid: s.header.vip_port(),
            backend: s.backend,
            block: s.header.block(),
            last_ack: u16::from_be_bytes(s.last_ack),
            blksize: s.header.blksize(),
            windowsize: s.header.windowsize(),
            path_hash: format!("{:016x}", s.header.path_hash()),
            idle_ms: ms_ago(now, s.last_client_ns),
        })
        .collect();
    let counters = named(BalanceCounter::ALL.iter().map(|c| c.name()), maps.counters()?);
    Ok(BalanceStatus {
        pin_dir: dir.display().to_string(),
        vip: config.vip.into(),
        address: SocketAddrV4::new(config.steer_addr.into(), u16::from_be_bytes(config.steer_port)),
        backends,
        sessions,
        control: control_status(&counters, "the peer balancer", "the switch's side or other addresses"),
        counters,
    })
}

fn print_tables(out: &mut impl std::io::Write, dir: &Path, status: &Status) -> anyhow::Result<()> {
    if let Some(s) = &status.switch {
        print_switch(out, s)?;
    }
    let Some(b) = &status.balance else {
        writeln!(out, "balance: no maps pinned under {} (no load balancer has run with this --pin-root)", dir.display())?;
        return Ok(());
    };
    writeln!(out, "balance ({})  vip {}  steering address {}", b.pin_dir, b.vip, b.address)?;
    writeln!(out, "\nbackends")?;
    writeln!(out, "  {:>2}  {:<21} {:<5} {:>8} {:>10} {:>12} {:>12} {:>12}  verdicts", "id", "address", "state", "sessions", "unanswered", "last answer", "packets to", "packets from")?;
    for be in &b.backends {
        let last = be.watch.last_answer_ms_ago.map_or_else(|| "never".to_owned(), |ms| format!("{ms} ms ago"));
        writeln!(out, "  {:>2}  {:<21} {:<5} {:>8} {:>10} {:>12} {:>12} {:>12}  {}", be.id, be.address, be.state, be.sessions, be.watch.unanswered, last, be.watch.packets_to, be.watch.packets_from, be.watch.health.cell())?;
    }
    writeln!(out, "\nsessions ({})", b.sessions.len())?;
    writeln!(out, "  {:<21} {:>5} {:>7} {:>10} {:>8} {:>7} {:>6} {:<16} {:>9}", "client", "tid", "backend", "block", "last ack", "blksize", "window", "file", "idle")?;
    for s in b.sessions.iter().take(TABLE_SESSIONS) {
        writeln!(out, "  {:<21} {:>5} {:>7} {:>10} {:>8} {:>7} {:>6} {:<16} {:>6} ms", s.client, s.tid, s.backend, s.block, s.last_ack, s.blksize, s.windowsize, s.path_hash, s.idle_ms)?;
    }
    if b.sessions.len() > TABLE_SESSIONS {
        writeln!(out, "  ... {} more (see --json)", b.sessions.len() - TABLE_SESSIONS)?;
    }
    print_control(out, &b.control)?;
    print_counters(out, &b.counters)
}

fn print_control(out: &mut impl std::io::Write, c: &ControlStatus) -> anyhow::Result<()> {
    let rejected: u64 = c.rejected.values().sum();
    writeln!(out, "\ncontrol messages: {} accepted, {rejected} rejected", c.accepted)?;
    for warning in &c.warnings {
        writeln!(out, "  WARNING: {warning}")?;
    }
    Ok(())
}

fn print_switch(out: &mut impl std::io::Write, s: &SwitchStatus) -> anyhow::Result<()> {
    writeln!(out, "switch ({})  vip {}  clients in flight {}", s.pin_dir, s.vip, s.clients_in_flight)?;
    writeln!(out, "\nload balancers")?;
    writeln!(out, "  {:<16} {:<7} {:<9} {:>10} {:>12} {:>12} {:>12}  verdicts", "address", "role", "reachable", "unanswered", "last answer", "packets to", "packets from")?;
    for lb in &s.lbs {
        let last = lb.watch.last_answer_ms_ago.map_or_else(|| "never".to_owned(), |ms| format!("{ms} ms ago"));
        let reachable = if lb.reachable { "yes" } else { "no" };
        writeln!(out, "  {:<16} {:<7} {:<9} {:>10} {:>12} {:>12} {:>12}  {}", lb.address, lb.role, reachable, lb.watch.unanswered, last, lb.watch.packets_to, lb.watch.packets_from, lb.watch.health.cell())?;
    }
    print_control(out, &s.control)?;
    print_counters(out, &s.counters)?;
    writeln!(out)?;
    Ok(())
}

fn print_counters(out: &mut impl std::io::Write, counters: &[NamedCounter]) -> anyhow::Result<()> {
    writeln!(out, "\ncounters")?;
    writeln!(out, "  {:<26} {:>14} {:>16}", "decision", "packets", "bytes")?;
    for c in counters {
        writeln!(out, "  {:<26} {:>14} {:>16}", c.name, c.packets, c.bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(values: &[(&'static str, u64)]) -> Vec<NamedCounter> {
        Stats::NAMES
            .iter()
            .map(|name| NamedCounter { name: (*name).to_owned(), packets: values.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v), bytes: 0 })
            .collect()
    }

    #[test]
    fn a_key_mismatch_with_the_peer_is_a_sentence() {
        let quiet = control_status(&counters(&[("control_accepted", 100)]), "the peer balancer", "others");
        assert!(quiet.warnings.is_empty());
        let status = control_status(
            &counters(&[("control_bad_mac", 7), ("control_unknown_key", 2), ("control_peer_auth_failed", 5), ("control_rejected_by_other", 3), ("control_stale", 1)]),
            "the peer balancer",
            "the switch's side",
        );
        assert_eq!(status.rejected["bad_mac"], 7);
        assert!(status.warnings[0].starts_with("the peer balancer's messages fail authentication (5 messages)"), "{:?}", status.warnings);
        assert!(status.warnings[1].starts_with("4 control messages from the switch's side failed authentication"), "{:?}", status.warnings);
        assert!(status.warnings[2].contains("another agent rejected this agent's control messages (3 notices)"));
        assert!(status.warnings[3].contains("stale"));
    }
}
