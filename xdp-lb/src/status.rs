//! `xdp-lb status`: what the pinned maps say, as a table or JSON.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use aya::maps::{Map, MapData, PerCpuArray};
use serde::Serialize;
use xdp_lb_common::{
    BalanceCounter, Counter,
    names::{MAP_LB_COUNTERS, ROLE_BALANCE},
};

use crate::pins;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table (for scripts and tests).
    #[arg(long)]
    json: bool,
}

/// Everything `status` reports. A role whose maps are not pinned is `None`.
#[derive(Serialize)]
struct Status {
    balance: Option<RoleStatus>,
}

#[derive(Serialize)]
struct RoleStatus {
    pin_dir: String,
    counters: Vec<NamedCounter>,
}

#[derive(Serialize)]
struct NamedCounter {
    name: &'static str,
    packets: u64,
    bytes: u64,
}

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let status = Status {
        balance: read_balance(pin_root)?,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &status)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, pin_root, &status)?;
    }
    Ok(())
}

fn read_balance(pin_root: &Path) -> anyhow::Result<Option<RoleStatus>> {
    let dir = pins::role_dir(pin_root, ROLE_BALANCE);
    let path = dir.join(MAP_LB_COUNTERS);
    if !path.exists() {
        return Ok(None);
    }
    let counters = read_counters(&path)?;
    Ok(Some(RoleStatus {
        pin_dir: dir.display().to_string(),
        counters: BalanceCounter::ALL
            .iter()
            .zip(counters)
            .map(|(which, c)| NamedCounter {
                name: which.name(),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect(),
    }))
}

/// Reads a pinned per-CPU counter array, summing each slot over all CPUs.
fn read_counters(path: &Path) -> anyhow::Result<Vec<Counter>> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("cannot open pinned map {} (are you root?)", path.display()))?;
    let map = Map::from_map_data(data)?;
    let array = PerCpuArray::<_, Counter>::try_from(map)
        .with_context(|| format!("{} is not a per-CPU counter array", path.display()))?;
    array
        .iter()
        .map(|per_cpu| {
            let per_cpu = per_cpu.with_context(|| format!("reading {}", path.display()))?;
            Ok(per_cpu.iter().fold(Counter::default(), |sum, c| sum.merged(*c)))
        })
        .collect()
}

fn print_table(out: &mut impl std::io::Write, pin_root: &Path, status: &Status) -> anyhow::Result<()> {
    let Some(balance) = &status.balance else {
        writeln!(
            out,
            "balance: no maps pinned under {} (no load balancer has run with this --pin-root)",
            pins::role_dir(pin_root, ROLE_BALANCE).display()
        )?;
        return Ok(());
    };
    writeln!(out, "balance ({})", balance.pin_dir)?;
    writeln!(out, "  {:<20} {:>14} {:>16}", "counter", "packets", "bytes")?;
    for c in &balance.counters {
        writeln!(out, "  {:<20} {:>14} {:>16}", c.name, c.packets, c.bytes)?;
    }
    Ok(())
}
