//! `--only lb`: goodput of 1 and 20 concurrent downloads over three paths in the same
//! topology ([`LbTopology`]: clients, the LB host and backends on one bridge), same client,
//! same file:
//!
//! - **direct**: the client asks a standalone `tftp-backend` on its own address;
//! - **nftables**: what a user would build today without xdp-lb: the LB host DNATs `VIP:69` to
//!   the same standalone backend, and the kernel's TFTP conntrack helper (`nf_conntrack_tftp`,
//!   with `nf_nat_tftp`) expects the reply from the server's transfer port and NATs it back to
//!   the VIP. The backend routes the clients via the LB host, as it would through its gateway;
//! - **xdp-lb**: `balance` on the LB host, the backend in steered mode.
//!
//! If the kernel path cannot work here (no helper, nft refused the ruleset, the download
//! failed), the table says so with the reason instead of a number.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Process,
    clients::{Client, first_answers},
    files::make_file,
    topology::{LB_ADDR, LbTopology, VIP, backend_addr, client_addr},
};
use serde_json::json;

use super::report::{Report, min_median_max};
use crate::cargo::release_dir;

const CLIENT: Client = Client::Atftp { blksize: 1468, windowsize: 16 };

/// One path's measurement: goodput, and the CPU time the whole machine spent per MB delivered
/// (clients, servers, agents and the kernel's packet work together: on one machine every hop
/// runs on the same CPUs, so a path that costs more per packet leaves less for the rest).
#[derive(Clone, Copy)]
struct Measured {
    mb_s: f64,
    cpu_ms_per_mb: f64,
}

/// One path's figure in one row, or why there is none.
enum Figure {
    Rate(Measured),
    Failed(String),
}

impl Figure {
    const fn measured(&self) -> Option<Measured> {
        match self {
            Self::Rate(m) => Some(*m),
            Self::Failed(_) => None,
        }
    }

    fn rate(&self) -> Option<f64> {
        self.measured().map(|m| m.mb_s)
    }

    fn text(&self, of: impl Fn(Measured) -> f64, digits: usize) -> String {
        match self {
            Self::Rate(m) => format!("{:.*}", digits, of(*m)),
            Self::Failed(_) => "not measured ¹".into(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Rate(m) => json!(m.mb_s),
            Self::Failed(why) => json!({ "failed": why }),
        }
    }
}

/// Rounds per client count: the three paths measured in turn, again and again, and the median
/// of each reported. On a 2-CPU VM one measurement moves by ±20%; interleaving spreads the
/// machine's slow moments over all paths.
const ROUNDS: usize = 3;

/// One client count's figures: medians over the rounds.
struct Row {
    clients: usize,
    direct: Measured,
    nft: Figure,
    through: Measured,
    /// Each round's xdp-lb / direct goodput: lowest, median, highest.
    through_vs_direct: (f64, f64, f64),
}

pub fn run(quick: bool, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let size = if quick { 16 << 20 } else { 64 << 20 };
    let topo = LbTopology::new(1, 1).context("creating namespaces (root?)")?;
    make_file(&topo.root.join("bench.bin"), size, 7)?;
    let bar = ProgressBar::new(6 * ROUNDS as u64).with_style(ProgressStyle::with_template("{spinner} goodput [{pos}/{len}] {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut rows = Vec::new();
    for clients in [1, 20] {
        let mut rounds = Vec::new();
        for round in 1..=ROUNDS {
            let progress = |path: &str| bar.set_message(format!("{path}, {clients} client(s), round {round} of {ROUNDS}"));
            rounds.push(one_round(&topo, clients, size, &bar, progress)?);
        }
        rows.push(median_row(clients, &rounds));
    }
    bar.finish_and_clear();

    report.line(format!(
        "\n### Goodput: direct vs nftables DNAT + TFTP conntrack helper vs xdp-lb ({} MiB per client, {}, MB/s of all clients together, medians of {ROUNDS} interleaved rounds)\n",
        size >> 20,
        CLIENT.name()
    ));
    report.line("| clients | direct | nftables + helper | xdp-lb | nftables / direct | xdp-lb / direct (rounds) | xdp-lb / nftables |");
    report.line("|---:|---:|---:|---:|---:|---:|---:|");
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or_else(|| "-".into(), |(a, b)| format!("{:.2}", a / b));
    for row in &rows {
        report.line(format!(
            "| {} | {:.1} | {} | {:.1} | {} | {:.2} ({:.2}–{:.2}) | {} |",
            row.clients,
            row.direct.mb_s,
            row.nft.text(|m| m.mb_s, 1),
            row.through.mb_s,
            ratio(row.nft.rate(), Some(row.direct.mb_s)),
            row.through_vs_direct.1,
            row.through_vs_direct.0,
            row.through_vs_direct.2,
            ratio(Some(row.through.mb_s), row.nft.rate()),
        ));
    }
    report.line("\nCPU time per MB delivered, the whole machine (busy time from /proc/stat: clients, servers, agents, kernel; medians):\n");
    report.line("| clients | direct | nftables + helper | xdp-lb | xdp-lb / direct |");
    report.line("|---:|---:|---:|---:|---:|");
    for row in &rows {
        report.line(format!(
            "| {} | {:.2} ms | {} ms | {:.2} ms | {:.2} |",
            row.clients,
            row.direct.cpu_ms_per_mb,
            row.nft.text(|m| m.cpu_ms_per_mb, 2),
            row.through.cpu_ms_per_mb,
            row.through.cpu_ms_per_mb / row.direct.cpu_ms_per_mb,
        ));
    }
    let failures: Vec<String> = rows.iter().filter_map(|row| match &row.nft {
        Figure::Failed(why) => Some(format!("{} client(s): {why}", row.clients)),
        Figure::Rate(_) => None,
    }).collect();
    if !failures.is_empty() {
        report.line(format!("\n¹ the nftables path did not work here: {}", failures.join("; ")));
    }
    report.line(
        "\nnftables: `dnat to BACKEND:69` for `VIP:69` and `ct helper set \"tftp\"` on the LB host (forwarding on), \
         the backend routes clients via the LB host; the same standalone tftp-backend as \"direct\". \
         xdp-lb: `balance` (generic XDP) and tftp-backend --steered --segment-offload.",
    );
    Ok(json!({
        "size": size,
        "client": CLIENT.name(),
        "rounds": ROUNDS,
        "rows": rows.iter().map(|row| json!({
            "clients": row.clients, "direct_mb_s": row.direct.mb_s, "nftables_mb_s": row.nft.to_json(), "xdp_lb_mb_s": row.through.mb_s,
            "xdp_lb_vs_direct": row.through_vs_direct.1,
            "xdp_lb_vs_direct_range": [row.through_vs_direct.0, row.through_vs_direct.2],
            "nftables_vs_direct": row.nft.rate().map(|r| r / row.direct.mb_s),
            "xdp_lb_vs_nftables": row.nft.rate().map(|r| row.through.mb_s / r),
            "cpu_ms_per_mb": { "direct": row.direct.cpu_ms_per_mb, "nftables": row.nft.measured().map(|m| m.cpu_ms_per_mb), "xdp_lb": row.through.cpu_ms_per_mb },
        })).collect::<Vec<_>>(),
    }))
}

/// The three paths once each, in turn: direct, nftables, xdp-lb.
fn one_round(topo: &LbTopology, clients: usize, size: usize, bar: &ProgressBar, progress: impl Fn(&str)) -> anyhow::Result<(Measured, Figure, Measured)> {
    progress("direct");
    let (direct, nft) = {
        let _server = standalone_backend(topo)?;
        let direct = measure(topo, &backend_addr(0), clients, size)?;
        bar.inc(1);
        progress("nftables DNAT + conntrack helper");
        let nft = match kernel_path(topo, clients, size) {
            Ok(measured) => Figure::Rate(measured),
            Err(error) => {
                bar.suspend(|| eprintln!("nftables path, {clients} client(s): {error:#}"));
                Figure::Failed(format!("{error:#}"))
            }
        };
        bar.inc(1);
        (direct, nft)
    };
    progress("through xdp-lb");
    let through = {
        let _backend = topo.start_backend(0)?;
        let agent = topo.start_lb(&[])?;
        netns_tests::topology::wait_answering("the backend live", 1, || topo.status().ok()).with_context(|| agent.log())?;
        // A steered backend hashes a file at its first request (the digest travels in the
        // transfer's context) and caches the digest; a standalone one never does. Hash it
        // before the clock starts, so that both paths are timed in the steady state.
        topo.clients[0].enter(|| first_answers(VIP, 69, "bench.bin", &[], 1, Duration::from_secs(30)))??;
        measure(topo, VIP, clients, size)?
    };
    bar.inc(1);
    Ok((direct, nft, through))
}

/// Medians over the rounds; the nftables path counts as failed if it failed in any.
fn median_row(clients: usize, rounds: &[(Measured, Figure, Measured)]) -> Row {
    let median = |values: Vec<f64>| min_median_max(&values).1;
    let medians = |paths: Vec<Measured>| Measured {
        mb_s: median(paths.iter().map(|m| m.mb_s).collect()),
        cpu_ms_per_mb: median(paths.iter().map(|m| m.cpu_ms_per_mb).collect()),
    };
    let failed = rounds.iter().find_map(|(_, nft, _)| match nft {
        Figure::Failed(why) => Some(why.clone()),
        Figure::Rate(_) => None,
    });
    let nft = match failed {
        Some(why) => Figure::Failed(why),
        None => Figure::Rate(medians(rounds.iter().filter_map(|(_, nft, _)| nft.measured()).collect())),
    };
    let ratios: Vec<f64> = rounds.iter().map(|(direct, _, through)| through.mb_s / direct.mb_s).collect();
    Row {
        clients,
        direct: medians(rounds.iter().map(|r| r.0).collect()),
        nft,
        through: medians(rounds.iter().map(|r| r.2).collect()),
        through_vs_direct: min_median_max(&ratios),
    }
}

/// The standalone backend on port 69 of backend 0 (stopped on drop).
fn standalone_backend(topo: &LbTopology) -> anyhow::Result<Process> {
    let mut command = topo.backends[0].command(release_dir()?.join("tftp-backend"));
    command.arg("--root").arg(&topo.root).args(["--listen", &format!("{}:69", backend_addr(0))]);
    command.env("RUST_LOG", "warn");
    let process = Process::spawn(topo.prefix.name("standalone"), command)?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(process)
}

/// Name of the nftables table the kernel path adds to the LB namespace.
const TABLE: &str = "xlbench";

/// The kernel path set up in the LB namespace and on backend 0; undone on drop (the
/// namespaces go with the topology in any case).
struct KernelPath<'a> {
    topo: &'a LbTopology,
}

impl<'a> KernelPath<'a> {
    fn new(topo: &'a LbTopology) -> anyhow::Result<Self> {
        if !std::path::Path::new("/sys/module/nf_conntrack_tftp").exists() {
            // Built as a module: load it (built in, it shows up under /sys/module anyway).
            netns_tests::run("modprobe", &["nf_conntrack_tftp"]).context("modprobe nf_conntrack_tftp (the TFTP conntrack helper)")?;
        }
        let path = Self { topo };
        topo.lb.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0"])?;
        topo.backends[0].ip(&["route", "add", &format!("{}/32", client_addr(0)), "via", LB_ADDR])?;
        let backend = backend_addr(0);
        let ruleset = format!(
            "table ip {TABLE} {{
  ct helper tftp {{ type \"tftp\" protocol udp; }}
  chain to_backend {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} udp dport 69 dnat to {backend}:69
  }}
  chain assign_helper {{
    type filter hook prerouting priority filter; policy accept;
    ip daddr {backend} udp dport 69 ct state new ct helper set \"tftp\"
  }}
}}
"
        );
        let file = std::env::temp_dir().join(topo.prefix.name("-nft.conf"));
        std::fs::write(&file, ruleset)?;
        let loaded = topo.lb.exec("nft", &["-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        loaded.context("nft -f (DNAT + ct helper tftp)")?;
        Ok(path)
    }

    /// Transfers the TFTP helper carried: connections from the backend's transfer port that
    /// the kernel created from the helper's expectation and NATed back to the VIP (original
    /// direction from the backend, reply direction to the VIP).
    fn helped(&self) -> usize {
        let from_backend = format!("src={}", backend_addr(0));
        let to_vip = format!("dst={VIP} ");
        self.topo.lb.exec("cat", &["/proc/net/nf_conntrack"]).map_or(0, |table| {
            table.lines().filter(|l| l.split_whitespace().find(|f| f.starts_with("src=")).is_some_and(|f| f == from_backend) && l.contains(&to_vip)).count()
        })
    }
}

impl Drop for KernelPath<'_> {
    fn drop(&mut self) {
        let _ = self.topo.lb.exec("nft", &["delete", "table", "ip", TABLE]);
        let _ = self.topo.lb.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=0"]);
        let _ = self.topo.backends[0].ip(&["route", "del", &format!("{}/32", client_addr(0))]);
    }
}

/// Goodput through the kernel path (the standalone backend must be running).
fn kernel_path(topo: &LbTopology, clients: usize, size: usize) -> anyhow::Result<Measured> {
    let path = KernelPath::new(topo)?;
    let rate = measure(topo, VIP, clients, size)?;
    let helped = path.helped();
    if helped < clients {
        bail!("only {helped} of {clients} transfers went through the TFTP conntrack helper (NATed expected connections)");
    }
    Ok(rate)
}

/// Aggregate goodput in MB/s of `clients` concurrent downloads of the file from `server`, and
/// the machine's CPU time per MB; every download must arrive whole.
fn measure(topo: &LbTopology, server: &str, clients: usize, size: usize) -> anyhow::Result<Measured> {
    let busy_before = busy_cpu_seconds()?;
    let started = Instant::now();
    let downloads = (0..clients)
        .map(|i| {
            let local = std::env::temp_dir().join(topo.prefix.name(&format!("bench{i}")));
            let command = CLIENT.download(&topo.clients[0], server, 69, "bench.bin", &local);
            Ok((Process::spawn(topo.prefix.name(&format!("bench-dl{i}")), command)?, local))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut failure = None;
    for (mut download, local) in downloads {
        let status = download.wait(Duration::from_secs(120));
        let got = std::fs::metadata(&local).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&local);
        if failure.is_none() && (status.is_none_or(|s| !s.success()) || got != size as u64) {
            failure = Some(format!("download from {server} failed ({status:?}, {got} of {size} bytes): {}", download.log().trim()));
        }
    }
    if let Some(failure) = failure {
        bail!(failure);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let busy = busy_cpu_seconds()? - busy_before;
    #[expect(clippy::cast_precision_loss, reason = "a byte count")]
    let mb = (size * clients) as f64 / 1e6;
    Ok(Measured { mb_s: mb / elapsed, cpu_ms_per_mb: busy * 1e3 / mb })
}

/// CPU time the machine spent busy since boot, all CPUs together (the first line of
/// /proc/stat: user, nice, system, irq, softirq and steal; idle and iowait excluded).
pub(super) fn busy_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let ticks: Vec<u64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0)).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| ticks.get(i)).sum();
    Ok(ticks_to_seconds(busy))
}

/// Clock ticks (`/proc` CPU times) in seconds.
pub(super) fn ticks_to_seconds(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "ticks since boot")]
    let seconds = ticks as f64 / per_second as f64;
    seconds
}
