//! `xdp-lb status`: what the pinned maps say, as tables or JSON.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use serde::Serialize;
use xdp_lb_common::{
    BalanceCounter,
    maps::{BACKEND_DEAD, BACKEND_LIVE, BACKEND_UNUSED, MAX_BACKENDS},
    names::{MAP_LB_COUNTERS, ROLE_BALANCE},
};

use crate::{balance::monotonic_ns, maps::LbMaps, pins};

/// Sessions listed in the table before it is cut (JSON lists all).
const TABLE_SESSIONS: usize = 40;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of tables (for scripts and tests).
    #[arg(long)]
    json: bool,
}

/// Everything `status` reports. A role whose maps are not pinned is `None`.
#[derive(Serialize)]
struct Status {
    balance: Option<BalanceStatus>,
}

#[derive(Serialize)]
struct BalanceStatus {
    pin_dir: String,
    vip: Ipv4Addr,
    address: SocketAddrV4,
    backends: Vec<BackendStatus>,
    sessions: Vec<SessionStatus>,
    counters: Vec<NamedCounter>,
}

#[derive(Serialize)]
struct BackendStatus {
    id: usize,
    address: SocketAddrV4,
    state: &'static str,
    sessions: u64,
    /// Watchdog: packets sent since it last answered.
    unanswered: u64,
    /// Milliseconds since it last answered (`None`: never).
    last_answer_ms_ago: Option<u64>,
    packets_to: u64,
    packets_from: u64,
}

#[derive(Serialize)]
struct SessionStatus {
    client: SocketAddrV4,
    tid: u16,
    backend: u32,
    /// Highest block the backend has sent (32-bit counter).
    block: u32,
    last_ack: u16,
    blksize: u16,
    windowsize: u16,
    path_hash: String,
    idle_ms: u64,
}

#[derive(Serialize)]
struct NamedCounter {
    name: &'static str,
    packets: u64,
    bytes: u64,
}

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let dir = pins::role_dir(pin_root, ROLE_BALANCE);
    let balance = if dir.join(MAP_LB_COUNTERS).exists() { Some(read_balance(&dir)?) } else { None };
    let status = Status { balance };
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
                BACKEND_LIVE => "live",
                BACKEND_DEAD => "dead",
                _ => "unused",
            },
            sessions: maps.load(id_u32)?,
            unanswered: seen.unanswered,
            last_answer_ms_ago: (seen.last_answer_ns != 0).then(|| ms_ago(now, seen.last_answer_ns)),
            packets_to: seen.packets_to,
            packets_from: seen.packets_from,
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
    let counters = BalanceCounter::ALL
        .iter()
        .zip(maps.counters()?)
        .map(|(which, c)| NamedCounter { name: which.name(), packets: c.packets, bytes: c.bytes })
        .collect();
    Ok(BalanceStatus {
        pin_dir: dir.display().to_string(),
        vip: config.vip.into(),
        address: SocketAddrV4::new(config.steer_addr.into(), u16::from_be_bytes(config.steer_port)),
        backends,
        sessions,
        counters,
    })
}

fn print_tables(out: &mut impl std::io::Write, dir: &Path, status: &Status) -> anyhow::Result<()> {
    let Some(b) = &status.balance else {
        writeln!(out, "balance: no maps pinned under {} (no load balancer has run with this --pin-root)", dir.display())?;
        return Ok(());
    };
    writeln!(out, "balance ({})  vip {}  steering address {}", b.pin_dir, b.vip, b.address)?;
    writeln!(out, "\nbackends")?;
    writeln!(out, "  {:>2}  {:<21} {:<5} {:>8} {:>10} {:>12} {:>12} {:>12}", "id", "address", "state", "sessions", "unanswered", "last answer", "packets to", "packets from")?;
    for be in &b.backends {
        let last = be.last_answer_ms_ago.map_or_else(|| "never".to_owned(), |ms| format!("{ms} ms ago"));
        writeln!(out, "  {:>2}  {:<21} {:<5} {:>8} {:>10} {:>12} {:>12} {:>12}", be.id, be.address, be.state, be.sessions, be.unanswered, last, be.packets_to, be.packets_from)?;
    }
    writeln!(out, "\nsessions ({})", b.sessions.len())?;
    writeln!(out, "  {:<21} {:>5} {:>7} {:>10} {:>8} {:>7} {:>6} {:<16} {:>9}", "client", "tid", "backend", "block", "last ack", "blksize", "window", "file", "idle")?;
    for s in b.sessions.iter().take(TABLE_SESSIONS) {
        writeln!(out, "  {:<21} {:>5} {:>7} {:>10} {:>8} {:>7} {:>6} {:<16} {:>6} ms", s.client, s.tid, s.backend, s.block, s.last_ack, s.blksize, s.windowsize, s.path_hash, s.idle_ms)?;
    }
    if b.sessions.len() > TABLE_SESSIONS {
        writeln!(out, "  ... {} more (see --json)", b.sessions.len() - TABLE_SESSIONS)?;
    }
    writeln!(out, "\ncounters")?;
    writeln!(out, "  {:<26} {:>14} {:>16}", "decision", "packets", "bytes")?;
    for c in &b.counters {
        writeln!(out, "  {:<26} {:>14} {:>16}", c.name, c.packets, c.bytes)?;
    }
    Ok(())
}
