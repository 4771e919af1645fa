//! `--only storm`: a boot storm. N clients (100 and 1000; `--quick`: 20 and 100) start within
//! one second, and each downloads a "kernel" and then an "initrd", as a rack of machines does
//! when it powers on, from five servers in turn in the same run:
//!
//! - **tftp-backend** (standalone), **tftpd-hpa**, **atftpd** and **dnsmasq**, each alone in a
//!   namespace on one bridge with the clients ([`LbTopology`]; its balancer stays idle): one
//!   server, what a site runs today;
//! - **xdp-lb**: the full topology ([`Cluster`]: switch, active and backup balancer, three
//!   steered backends), the clients asking the VIP.
//!
//! Two client modes: lock-step at blksize 1468 (atftp asking for blksize only, as most firmware
//! does) and windowsize 4 (EDK2's default; atftp), each with no loss and with 1% loss in each
//! direction on the clients' segment (the nftables rule of [`netns_tests::impair`] on the
//! bridge the clients hang on; it spares the TFTP setup, which atftp cannot repeat, see
//! [`Loss::spare_tftp_setup`]). The clients share [`NAMESPACES`] namespaces (addresses), each
//! its own UDP port.
//!
//! Per cell: the time from the first client's start to the last one's end, p50 and p99 of the
//! clients' completion times, failures (a client that exits with an error, one still running
//! at the cell's limit, which is killed, or a file whose size or SHA-256 differs: every file is
//! checked; a direct server that exits during a storm is noted with the end of its log and
//! started again for the next one), datagrams the server's host dropped for full receive
//! buffers, aggregate goodput, and CPU time per MB delivered: the server's ([`CpuGroup`]: a
//! cgroup holding its processes and every child they fork; for xdp-lb its backends and
//! agents) and the whole machine's (`/proc/stat`: clients, kernel, and whatever else runs).
//! Every server runs at a higher priority than the clients ([`SERVER_NICE`]), and the clients
//! in the idle scheduling class ([`idle_class`]): on a site they are other machines.
//! A table, the ratios the targets name (printed, never asserted), notes (the agents'
//! verdict lines; the five slowest clients of the largest storms, to see what a tail waits on),
//! `storm-<unix time>.json` and `storm-<unix time>.png`. File sizes and why: [`Plan::new`];
//! some cells only: [`Selection`].

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Netns, Process, RunPrefix,
    clients::{Client, first_answers},
    cluster::{Agents, Cluster},
    files::{make_file, sha256},
    impair::{Loss, clear_loss, install_loss, loss_dropped},
    pair_topology::{PairTopology, VIP},
    topology::{LbTopology, backend_addr},
};
use serde_json::json;
use xdp_lb_common::BalanceCounter;

use super::{
    backend::{Dirs, Kind, wait_ready},
    report::Report,
};

/// Client namespaces (addresses) per topology; client `i` runs in namespace `i % NAMESPACES`.
/// 1000 clients are 50 per address, within the balancer's default per-source request burst
/// (100), as a real storm of one machine per address is.
const NAMESPACES: usize = 20;
/// Steered backends behind the balancers.
const BACKENDS: usize = 3;
const BLKSIZE: u16 = 1468;
const TFTP_PORT: u16 = 69;
/// Loss in each direction on the clients' segment, percent.
const LOSSES: [u8; 2] = [0, 1];
/// Every server is set up for this many concurrent transfers (dnsmasq's default is 50,
/// atftpd's 100).
const MAX_TRANSFERS: &str = "4096";

/// The servers, in table order; tftp-backend standalone is the reference ("direct").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Server {
    /// tftp-backend standalone (the reference, "direct").
    #[value(name = "tftp-backend")]
    Backend,
    #[value(name = "tftpd-hpa")]
    TftpdHpa,
    Atftpd,
    Dnsmasq,
    /// The full topology: switch, balancer pair, three steered backends.
    #[value(name = "xdp-lb")]
    XdpLb,
}

impl Server {
    const ALL: [Self; 5] = [Self::Backend, Self::TftpdHpa, Self::Atftpd, Self::Dnsmasq, Self::XdpLb];
    /// The servers that run alone, in the direct topology's server namespaces `0..`.
    const DIRECT: [Self; 4] = [Self::Backend, Self::TftpdHpa, Self::Atftpd, Self::Dnsmasq];

    const fn name(self) -> &'static str {
        match self {
            Self::Backend => "tftp-backend",
            Self::TftpdHpa => "tftpd-hpa",
            Self::Atftpd => "atftpd",
            Self::Dnsmasq => "dnsmasq",
            Self::XdpLb => "xdp-lb",
        }
    }

    /// The command of a direct server on `host:69` serving `root`. The three servers the
    /// backend bench compares start as there, atftpd with more threads than its default 100;
    /// dnsmasq serves TFTP only (`--port=0`: no DNS). Retransmission timeouts stay the
    /// servers' own: 1 s, but 5 s for atftpd, which gives up after 5 of them. With 1 s it
    /// gave up on clients after 5 s of silence, while atftp, which answers only the first
    /// copy of a block it already has, waits 5 s before it asks again (`--quick` lost 2 of 100
    /// clients that way at 1% loss).
    fn command(self, root: &Path, host: &str) -> anyhow::Result<Command> {
        let kind = match self {
            Self::Backend => Kind::Backend,
            Self::TftpdHpa => Kind::TftpdHpa,
            Self::Atftpd => Kind::Atftpd,
            Self::Dnsmasq => {
                let mut c = Command::new("dnsmasq");
                c.args(["--keep-in-foreground", "--port=0", "--conf-file=/dev/null", "--pid-file=", "--user=root"]);
                c.args(["--bind-interfaces", &format!("--listen-address={host}"), "--enable-tftp", "--quiet-tftp", "--log-facility=-"]);
                c.arg(format!("--tftp-root={}", root.display())).arg(format!("--tftp-max={MAX_TRANSFERS}"));
                return Ok(c);
            }
            Self::XdpLb => bail!("xdp-lb runs as the cluster, not as one command"),
        };
        let mut command = kind.command(root, host, TFTP_PORT)?;
        if self == Self::Atftpd {
            command.args(["--maxthread", MAX_TRANSFERS]);
        }
        Ok(command)
    }
}

/// How the clients fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// blksize 1468, no windowsize (most firmware).
    LockStep,
    /// windowsize 4 (EDK2's default).
    #[value(name = "windowsize4")]
    Window,
}

impl Mode {
    const ALL: [Self; 2] = [Self::LockStep, Self::Window];

    const fn client(self) -> Client {
        match self {
            Self::LockStep => Client::AtftpLockStep { blksize: BLKSIZE },
            Self::Window => Client::Atftp { blksize: BLKSIZE, windowsize: 4 },
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::LockStep => "lock-step",
            Self::Window => "windowsize 4",
        }
    }
}

/// Client counts, file sizes and the time limit of a run.
struct Plan {
    counts: Vec<usize>,
    /// (kernel, initrd) bytes per client at the smallest count, without loss and with loss;
    /// `k` times the clients fetch files `k` times smaller ([`Plan::sizes`]).
    sizes: [(usize, usize); 2],
    /// A client not done this long after the first one started is killed and failed.
    limit: Duration,
}

impl Plan {
    /// The storm is 1000 clients × (4 + 16) MiB. Here two CPUs move a lock-step storm at
    /// about 25 MB/s (the clients' own CPU per block is most of it), so 20 GiB would take a
    /// quarter of an hour per cell and 40 cells ten hours. Every storm of a loss therefore moves
    /// the same bytes: 100 clients fetch the 4 + 16 MiB, 1000 clients a tenth of it
    /// each (a cell of ~2 GiB, one to two minutes). With 1% loss each lost packet costs its
    /// client about a retransmission timeout (1 s), ~280 of them per 20 MiB lock-step, whatever
    /// the number of clients: lossy storms move a quarter of the bytes (1 + 4 MiB per client
    /// at 100 clients, ~70 losses each). The full run takes about an hour.
    fn new(quick: bool) -> Self {
        if quick {
            Self { counts: vec![20, 100], sizes: [(1 << 20, 4 << 20), (64 << 10, 256 << 10)], limit: Duration::from_secs(120) }
        } else {
            Self { counts: vec![100, 1000], sizes: [(4 << 20, 16 << 20), (1 << 20, 4 << 20)], limit: Duration::from_secs(600) }
        }
    }

    /// (kernel, initrd) bytes per client in a storm of `clients` at `loss`.
    fn sizes(&self, clients: usize, loss: u8) -> (usize, usize) {
        let (kernel, initrd) = self.sizes[usize::from(loss > 0)];
        let fewer = (clients / self.counts[0].max(1)).max(1);
        (kernel / fewer, initrd / fewer)
    }
}

/// Which of a run's storms to run (`--storm-*`; all by default): to repeat a few cells without
/// the hour of the whole table. The file sizes stay the plan's.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Selection {
    /// Storm section: only these client counts, out of the plan's (100 and 1000; with --quick
    /// 20 and 100), e.g. `--storm-clients 1000`.
    #[arg(long = "storm-clients", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Storm section: only these servers, e.g. `--storm-servers tftp-backend,xdp-lb`.
    #[arg(long = "storm-servers", value_enum, value_delimiter = ',')]
    servers: Vec<Server>,
    /// Storm section: only these client modes.
    #[arg(long = "storm-modes", value_enum, value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Storm section: only these losses (percent each way: 0 or 1).
    #[arg(long = "storm-loss", value_delimiter = ',')]
    losses: Vec<u8>,
}

impl Selection {
    /// An error names a count or loss the plan does not have.
    fn check(&self, plan: &Plan) -> anyhow::Result<()> {
        if let Some(count) = self.clients.iter().find(|c| !plan.counts.contains(c)) {
            bail!("--storm-clients {count}: this run's storms have {:?} clients", plan.counts);
        }
        if let Some(loss) = self.losses.iter().find(|l| !LOSSES.contains(l)) {
            bail!("--storm-loss {loss}: the storms run at {LOSSES:?} percent");
        }
        Ok(())
    }

    fn runs(&self, clients: usize, mode: Mode, loss: u8, server: Server) -> bool {
        picks(&self.clients, &clients) && picks(&self.modes, &mode) && picks(&self.losses, &loss) && picks(&self.servers, &server)
    }

    /// The client runs of the storms chosen of `plan` for `servers`, for the progress bar.
    fn clients(&self, plan: &Plan, servers: &[Server]) -> usize {
        let mut sum = 0;
        for &clients in &plan.counts {
            for mode in Mode::ALL {
                for loss in LOSSES {
                    sum += clients * servers.iter().filter(|&&s| self.runs(clients, mode, loss, s)).count();
                }
            }
        }
        sum
    }
}

/// Nothing chosen picks every value.
fn picks<T: PartialEq>(chosen: &[T], value: &T) -> bool {
    chosen.is_empty() || chosen.contains(value)
}

/// A file every client downloads.
struct BootFile {
    name: String,
    size: usize,
    sha256: String,
}

/// The kernel and the initrd of a size pair, made in `roots` (the same bytes in each).
fn boot_files((kernel, initrd): (usize, usize), roots: &[&Path]) -> anyhow::Result<[BootFile; 2]> {
    let make = |what: &str, size: usize, seed: u64| -> anyhow::Result<BootFile> {
        let name = format!("{what}-{}k.img", size >> 10);
        let first = roots[0].join(&name);
        make_file(&first, size, seed)?;
        for root in &roots[1..] {
            std::fs::copy(&first, root.join(&name)).with_context(|| format!("copy {name} to {}", root.display()))?;
        }
        Ok(BootFile { sha256: sha256(&first)?, name, size })
    };
    Ok([make("kernel", kernel, kernel as u64 + 1)?, make("initrd", initrd, initrd as u64 + 2)?])
}

/// Where the clients of one server fetch from, and what counts as its CPU time.
struct Target<'a> {
    server: Server,
    address: String,
    clients: &'a [Netns],
    /// The namespace of the bridge the clients hang on, and that bridge if it has others.
    segment: (&'a Netns, Option<&'a str>),
    /// The server's processes (xdp-lb: its backends and agents), and the cgroup holding them
    /// and their children.
    pids: Vec<u32>,
    /// xdp-lb: its steered backends, whose CPU time is told apart (how evenly the storm
    /// spread); none for a direct server.
    backends: Vec<u32>,
    cpu: Option<&'a CpuGroup>,
    /// The namespaces the server's processes receive in (xdp-lb: its backends').
    hosts: Vec<&'a Netns>,
    /// Whether the server answered a request for windowsize 4 with it (RFC 7440).
    windowsize: bool,
}

/// One cell: a server, a client count, a mode and a loss, and what the storm gave.
struct Cell {
    server: Server,
    clients: usize,
    mode: Mode,
    loss: u8,
    /// Granted windowsize (false: the server answered lock-step).
    windowsize: bool,
    outcome: Result<Measured, String>,
    /// A direct server that exited during the storm: the end of its log (it is restarted for
    /// the next storm).
    exited: Option<String>,
}

/// What one storm measured.
#[derive(Clone, Debug, Default)]
struct Measured {
    /// Completion times (s, from each client's own start) of the clients whose two files arrived
    /// intact, sorted.
    times: Vec<f64>,
    failures: usize,
    /// The first few failures' messages.
    failure_samples: Vec<String>,
    /// The first client's start to the last successful client's end (s).
    last_s: f64,
    /// File bytes delivered and verified.
    bytes: u64,
    /// None without a cgroup to count it.
    server_cpu_s: Option<f64>,
    machine_cpu_s: f64,
    /// Frames the loss rule dropped.
    dropped: u64,
    /// Datagrams the server's hosts dropped for a full socket receive buffer (`RcvbufErrors`).
    rcvbuf_errors: u64,
    /// xdp-lb only: requests the balancers' per-source pacing dropped, and the failure
    /// detectors' verdicts (backends, balancers) during the storm.
    rate_limited: u64,
    verdicts: (usize, usize),
    /// xdp-lb only: CPU time of each steered backend during the storm, s.
    backend_cpu_s: Vec<f64>,
    /// The slowest clients that finished, slowest first: when each started, how long each
    /// download took and what atftp said (what a tail waits on).
    stragglers: Vec<String>,
    /// xdp-lb only: the agents' verdict, swap, flapping and late-tick lines of the storm.
    detector_lines: Vec<String>,
}

/// Stragglers listed per storm.
const STRAGGLERS: usize = 5;

/// The figures of a cell's table row.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Summary {
    last_s: f64,
    p50_s: f64,
    p99_s: f64,
    failures: usize,
    goodput_mb_s: f64,
    server_cpu_ms_per_mb: Option<f64>,
    machine_cpu_ms_per_mb: f64,
}

impl Summary {
    /// None when no client finished.
    fn of(m: &Measured) -> Option<Self> {
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        let mb = m.bytes as f64 / 1e6;
        Some(Self {
            last_s: m.last_s,
            p50_s: percentile(&m.times, 50.0)?,
            p99_s: percentile(&m.times, 99.0)?,
            failures: m.failures,
            goodput_mb_s: mb / m.last_s.max(1e-9),
            server_cpu_ms_per_mb: m.server_cpu_s.map(|cpu| cpu * 1e3 / mb.max(1e-9)),
            machine_cpu_ms_per_mb: m.machine_cpu_s * 1e3 / mb.max(1e-9),
        })
    }

    /// The tail against the middle: the lossy target is at most 3.
    fn tail(&self) -> f64 {
        self.p99_s / self.p50_s.max(1e-9)
    }
}

/// The `p`-th percentile of sorted values, nearest rank (the smallest value with at least `p`%
/// of the values at or below it); None for no values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    #[expect(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a rank within the list")]
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

pub fn run(quick: bool, selection: &Selection, out: &Path, stamp: u64, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let plan = Plan::new(quick);
    selection.check(&plan)?;
    let prefix = RunPrefix::new();
    let dirs = Dirs::new(&prefix)?;
    let groups = cpu_groups(&prefix);
    let direct = LbTopology::new(NAMESPACES, Server::DIRECT.len()).context("creating namespaces (root?)")?;
    // Every process below is stopped on drop, before the namespaces go.
    let mut servers = Vec::new();
    for (i, server) in Server::DIRECT.into_iter().enumerate() {
        servers.push(start_direct(server, &direct, i, &dirs.root, &prefix.name(&format!("-storm-{}", server.name())), groups[i].as_ref())?);
    }
    let topo = PairTopology::new(NAMESPACES, BACKENDS).context("creating namespaces (root?)")?;
    let cluster = Cluster::try_start_on(topo, &Agents::default()).context("starting the cluster")?;
    let pids: Vec<u32> = cluster.backends.iter().chain(&cluster.lbs).flatten().chain([&cluster.switch]).map(Process::pid).collect();
    pids.iter().try_for_each(|&pid| prioritize(pid))?;
    if let Some(group) = &groups[Server::DIRECT.len()] {
        pids.iter().try_for_each(|&pid| group.add(pid))?;
    }
    let roots = [dirs.root.as_path(), cluster.topo.root.as_path()];
    let mut files = Vec::new();
    for &clients in &plan.counts {
        for loss in LOSSES {
            files.push(((clients, loss), boot_files(plan.sizes(clients, loss), &roots)?));
        }
    }
    let probe = &files[0].1[0].name;

    let mut targets = Vec::new();
    for (i, (server, process)) in Server::DIRECT.into_iter().zip(&servers).enumerate() {
        let address = backend_addr(i);
        let windowsize = grants_windowsize(&direct.clients[0], &address, probe)?;
        let (segment, pids, cpu, hosts) = ((direct.bridge(), None), vec![process.pid()], groups[i].as_ref(), vec![&direct.backends[i]]);
        targets.push(Target { server, address, clients: &direct.clients, segment, pids, backends: Vec::new(), cpu, hosts, windowsize });
    }
    let windowsize = grants_windowsize(&cluster.topo.clients[0], VIP, probe)?;
    let (segment, cpu) = ((cluster.topo.bridges(), Some("br0")), groups[Server::DIRECT.len()].as_ref());
    let hosts = cluster.topo.backends.iter().collect();
    let backends = cluster.backends.iter().flatten().map(Process::pid).collect();
    targets.push(Target { server: Server::XdpLb, address: VIP.to_owned(), clients: &cluster.topo.clients, segment, pids, backends, cpu, hosts, windowsize });

    let kinds: Vec<Server> = targets.iter().map(|t| t.server).collect();
    let bar = ProgressBar::new(selection.clients(&plan, &kinds) as u64)
        .with_style(ProgressStyle::with_template("{spinner} storm [{bar:30}] {pos}/{len} clients {elapsed_precise} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut cells = Vec::new();
    let mut restarts = 0;
    for &clients in &plan.counts {
        for mode in Mode::ALL {
            for loss in LOSSES {
                let Some((_, files)) = files.iter().find(|(storm, _)| *storm == (clients, loss)) else { continue };
                for target in &targets {
                    set_loss(target.segment, loss)?;
                }
                // The servers take turns within each group of cells.
                for t in 0..targets.len() {
                    let target = &targets[t];
                    if !selection.runs(clients, mode, loss, target.server) {
                        continue;
                    }
                    bar.set_message(format!("{} ← {clients} × {}, {loss}% loss", target.server.name(), mode.label()));
                    let outcome = storm(target, files, clients, mode, plan.limit, &dirs.downloads, &cluster, &bar).map_err(|e| format!("{e:#}"));
                    if let Err(why) = &outcome {
                        bar.suspend(|| eprintln!("storm {} ← {clients} × {}, {loss}% loss failed: {why}", target.server.name(), mode.label()));
                    }
                    let windowsize = mode == Mode::Window && target.windowsize;
                    let mut cell = Cell { server: target.server, clients, mode, loss, windowsize, outcome, exited: None };
                    // A direct server that died is started again: each storm gets a server.
                    if let Some(process) = servers.get_mut(t)
                        && !process.is_running()
                    {
                        cell.exited = Some(log_tail(&process.log(), 3));
                        restarts += 1;
                        let name = prefix.name(&format!("-storm-{}-{restarts}", target.server.name()));
                        if let Err(error) = restart(process, &mut targets[t], t, &direct, &dirs.root, &name, groups[t].as_ref()) {
                            bar.suspend(|| eprintln!("{} did not start again: {error:#}", targets[t].server.name()));
                        }
                    }
                    cells.push(cell);
                    // Let the last retransmissions to clients that have left die down.
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    bar.finish_and_clear();
    for target in &targets {
        set_loss(target.segment, 0)?;
    }
    let windowsizes: Vec<(Server, bool)> = targets.iter().map(|t| (t.server, t.windowsize)).collect();
    drop(targets);
    drop(cluster);
    drop(servers);
    drop(groups);

    report_cells(&cells, &plan, &windowsizes, report);
    let chart = chart(&cells, &out.join(format!("storm-{stamp}.png")), report);
    let results = results_json(stamp, quick, &plan, &files, &windowsizes, chart.as_deref(), &cells);
    let path = out.join(format!("storm-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    report.line(format!("\nFigures: {}", path.display()));
    Ok(results)
}

/// The chart of the cells in `png`, named in the report; its path, or None if it could not be drawn.
fn chart(cells: &[Cell], png: &Path, report: &mut Report) -> Option<String> {
    match plot(cells, png) {
        Ok(()) => {
            report.line(format!("\nChart: {}", png.display()));
            Some(png.display().to_string())
        }
        Err(error) => {
            eprintln!("no storm chart: {error:#}");
            None
        }
    }
}

/// Everything a run measured, for `storm-<unix time>.json` (and the section's part of
/// `bench-<unix time>.json`).
fn results_json(
    stamp: u64,
    quick: bool,
    plan: &Plan,
    files: &[((usize, u8), [BootFile; 2])],
    windowsizes: &[(Server, bool)],
    chart: Option<&str>,
    cells: &[Cell],
) -> serde_json::Value {
    json!({
        "unix_time": stamp,
        "quick": quick,
        "client_namespaces": NAMESPACES,
        "limit_s": plan.limit.as_secs(),
        "note": "completion: each client's start to its second download's end; every file checked by size and SHA-256; \
                 server CPU: cpu.stat of a cgroup holding the server's processes and their children; machine CPU: busy time from /proc/stat",
        "files": files.iter().map(|((clients, loss), pair)| json!({
            "clients": clients, "loss_percent": loss,
            "files": pair.iter().map(|f| json!({ "name": f.name, "size": f.size, "sha256": f.sha256 })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "windowsize_granted": windowsizes.iter().map(|(s, w)| (s.name().to_owned(), json!(w))).collect::<serde_json::Map<_, _>>(),
        "chart": chart,
        "cells": cells.iter().map(cell_json).collect::<Vec<_>>(),
    })
}

/// A CPU group per server (in [`Server::ALL`] order), or none if cgroups cannot be made here
/// (then the table has no server CPU figures).
fn cpu_groups(prefix: &RunPrefix) -> Vec<Option<CpuGroup>> {
    let groups: Vec<anyhow::Result<CpuGroup>> = Server::ALL.iter().map(|s| CpuGroup::new(&prefix.name(&format!("-storm-{}", s.name())))).collect();
    if let Some(Err(error)) = groups.iter().find(|g| g.is_err()) {
        eprintln!("storm: no server CPU figures: {error:#}");
    }
    groups.into_iter().map(Result::ok).collect()
}

/// The servers' priority in a storm (nice), above the clients'. On a site the clients are
/// other machines; here up to a thousand atftp processes share the two CPUs with the server,
/// and the scheduler splits a CPU per thread: a server with one thread (tftp-backend,
/// dnsmasq) got about a hundredth of it against 100 clients, one that forks a process per
/// transfer (tftpd-hpa) or starts a thread (atftpd) about half. Every server gets the same,
/// and so does every process of xdp-lb's cluster; children and threads inherit it.
const SERVER_NICE: libc::c_int = -10;

/// Gives server process `pid` (its main thread, whose later threads and children inherit it)
/// the servers' priority.
fn prioritize(pid: u32) -> anyhow::Result<()> {
    // SAFETY: setpriority(2) on the PID of a process this section started; no memory effects.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, SERVER_NICE) } != 0 {
        bail!("cannot renice server {pid} to {SERVER_NICE}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread (a client's: the downloads it starts inherit it, and so does the
/// check of its files) in the idle scheduling class (SCHED_IDLE): it runs when no server wants
/// a CPU, and a server that wakes takes the CPU from it at once. On a site the clients are
/// other machines and their start costs the servers nothing; here a thousand atftp processes
/// start within a second on two CPUs, each runnable one weighing as much as a tenth of a server
/// at [`SERVER_NICE`], and the storms of 2026-12-02 (nice only) saw the steered backends
/// silent for 112-204 ms while the clients started, and 1 to 6 false backend verdicts per
/// 1000-client storm. Every server meets the same clients.
fn idle_class() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (0) with a valid parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a direct server in server namespace `i` of the topology (in its CPU group and at the
/// servers' priority before it serves anything), logging under `name`, and waits until it
/// answers.
fn start_direct(server: Server, topo: &LbTopology, i: usize, root: &Path, name: &str, cpu: Option<&CpuGroup>) -> anyhow::Result<Process> {
    let address = backend_addr(i);
    let command = in_netns(&topo.backends[i], &server.command(root, &address)?);
    let mut process = Process::spawn(name, command)?;
    prioritize(process.pid())?;
    if let Some(group) = cpu {
        group.add(process.pid())?;
    }
    if let Err(error) = topo.clients[0].enter(|| wait_ready(&address, TFTP_PORT))? {
        let log = process.log();
        process.stop();
        bail!("{} did not answer on {address}:{TFTP_PORT}: {error:#}\n{log}", server.name());
    }
    Ok(process)
}

/// Starts direct server `i` again in place of its exited process. If it cannot start, the
/// target keeps the dead PID, and its next storms are "not measured" (not running).
fn restart(process: &mut Process, target: &mut Target<'_>, i: usize, topo: &LbTopology, root: &Path, name: &str, cpu: Option<&CpuGroup>) -> anyhow::Result<()> {
    *process = start_direct(target.server, topo, i, root, name, cpu)?;
    target.pids = vec![process.pid()];
    Ok(())
}

/// `command` (program, arguments, environment) run in `ns`.
fn in_netns(ns: &Netns, command: &Command) -> Command {
    let mut inside = ns.command(command.get_program());
    inside.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => inside.env(key, value),
            None => inside.env_remove(key),
        };
    }
    inside
}

/// Whether the server at `address` answers a request for windowsize 4 with an OACK that grants
/// it (tftpd-hpa and dnsmasq do not implement RFC 7440 and answer lock-step).
fn grants_windowsize(client: &Netns, address: &str, file: &str) -> anyhow::Result<bool> {
    let options = [("blksize", "1468"), ("windowsize", "4")];
    let answers = client.enter(|| first_answers(address, TFTP_PORT, file, &options, 1, Duration::from_secs(10)))??;
    Ok(answers.first().is_some_and(|oack| oack_grants(oack, "windowsize")))
}

/// Whether an OACK names `option` (case-insensitive, as RFC 2347 has it).
fn oack_grants(packet: &[u8], option: &str) -> bool {
    packet.starts_with(&[0, 6]) && packet[2..].split(|&b| b == 0).step_by(2).any(|name| name.eq_ignore_ascii_case(option.as_bytes()))
}

/// Installs `loss` percent on the clients' segment, or removes the rule for 0.
fn set_loss((ns, bridge): (&Netns, Option<&str>), loss: u8) -> anyhow::Result<()> {
    if loss == 0 {
        clear_loss(ns)?;
    } else {
        install_loss(ns, &Loss { percent: loss, bridge, spare_tftp_setup: true })?;
    }
    Ok(())
}

/// A process's pidfd: a signal sent through it reaches that process, or nobody once it has been
/// reaped (its PID might name another process by then).
struct PidFd(OwnedFd);

impl PidFd {
    fn open(pid: u32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open(2) without flags returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::c_long::from(pid), 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0).ok_or_else(std::io::Error::last_os_error)?;
        // SAFETY: a descriptor just returned by pidfd_open, owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn kill(&self) {
        // SAFETY: pidfd_send_signal(2) on our own descriptor, without siginfo or flags.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.0.as_raw_fd(), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) };
    }
}

/// What the clients of one storm share: what they fetch from where, and the means to stop them.
struct Clients<'a> {
    target: &'a Target<'a>,
    files: &'a [BootFile; 2],
    mode: Mode,
    downloads: &'a Path,
    /// Set at the limit: no client starts another download, the running ones are killed.
    expired: AtomicBool,
    /// The download each client is waiting for.
    running: Vec<Mutex<Option<PidFd>>>,
}

/// One client's storm: when it started and ended, and the bytes it got intact or why not.
struct ClientRun {
    client: usize,
    started: Instant,
    finished: Instant,
    /// How long each download took, s.
    took_s: Vec<f64>,
    /// What atftp said on stderr during the downloads that succeeded ([`client_said`]).
    said: String,
    result: Result<u64, String>,
}

impl Clients<'_> {
    /// Client `i`: at `start`, the kernel, then the initrd; then both files checked and removed.
    fn client(&self, i: usize, start: Instant) -> ClientRun {
        if let Err(error) = idle_class() {
            let result = Err(format!("client {i}: SCHED_IDLE: {error}"));
            return ClientRun { client: i, started: start, finished: start, took_s: Vec::new(), said: String::new(), result };
        }
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        let locals = self.files.each_ref().map(|f| self.downloads.join(format!("c{i}-{}", f.name)));
        let (mut took_s, mut said) = (Vec::new(), Vec::new());
        let fetched = self.files.iter().zip(&locals).try_for_each(|(file, local)| {
            let begun = Instant::now();
            let stderr = self.download(i, &file.name, local)?;
            took_s.push(begun.elapsed().as_secs_f64());
            said.push(client_said(&stderr));
            Ok::<_, String>(())
        });
        let finished = Instant::now();
        let result = fetched.and_then(|()| {
            self.files.iter().zip(&locals).try_fold(0, |bytes, (file, local)| {
                let got = std::fs::metadata(local).map_or(0, |m| m.len());
                if got != file.size as u64 {
                    return Err(format!("{}: {got} bytes instead of {}", file.name, file.size));
                }
                if !sha256(local).is_ok_and(|d| d == file.sha256) {
                    return Err(format!("{}: SHA-256 differs", file.name));
                }
                Ok(bytes + got)
            })
        });
        for local in &locals {
            let _ = std::fs::remove_file(local);
        }
        said.retain(|s| !s.is_empty());
        ClientRun { client: i, started, finished, took_s, said: said.join("; "), result: result.map_err(|e| format!("client {i}: {e}")) }
    }

    /// One download by client `i`, killed if the limit passes meanwhile: what the client wrote
    /// on stderr, or why it failed.
    fn download(&self, i: usize, remote: &str, local: &Path) -> Result<String, String> {
        if self.expired.load(Ordering::SeqCst) {
            return Err(format!("{remote}: not started before the limit"));
        }
        let ns = &self.target.clients[i % self.target.clients.len()];
        let mut command = self.mode.client().download(ns, &self.target.address, TFTP_PORT, remote, local);
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = command.spawn().map_err(|e| format!("{remote}: cannot start the client: {e}"))?;
        // Not reaped before `wait_with_output` below: the pidfd names this child.
        let pidfd = PidFd::open(child.id()).map_err(|e| format!("pidfd_open: {e}"))?;
        *self.running[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pidfd);
        // The limit may have passed before the pidfd was in place, after the sweep that kills.
        if self.expired.load(Ordering::SeqCst) {
            self.stop(i);
        }
        let output = child.wait_with_output();
        *self.running[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        match output {
            Ok(output) if output.status.success() => Ok(String::from_utf8_lossy(&output.stderr).into_owned()),
            _ if self.expired.load(Ordering::SeqCst) => Err(format!("{remote}: still running at the limit, killed")),
            Ok(output) => Err(format!("{remote}: {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim())),
            Err(e) => Err(format!("{remote}: {e}")),
        }
    }

    /// Kills client `i`'s download, if one runs.
    fn stop(&self, i: usize) {
        if let Some(pidfd) = &*self.running[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            pidfd.kill();
        }
    }
}

/// One storm: `n` clients of `target` started evenly over one second, each fetching both
/// files; those not done `limit` after the first start are killed.
#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
fn storm(target: &Target<'_>, files: &[BootFile; 2], n: usize, mode: Mode, limit: Duration, downloads: &Path, cluster: &Cluster, bar: &ProgressBar) -> anyhow::Result<Measured> {
    if let Some(pid) = target.pids.iter().find(|&&pid| !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| alive(&stat))) {
        bail!("{} is not running (process {pid} exited)", target.server.name());
    }
    let xdp = target.server == Server::XdpLb;
    let xdp_before = xdp.then(|| (cluster.verdicts(), rate_limited(cluster)));
    let dropped_before = dropped(target.segment.0);
    let rcvbuf_before = rcvbuf_errors(&target.hosts);
    let server_before = target.cpu.and_then(CpuGroup::cpu_seconds);
    let backends_before: Vec<Option<f64>> = target.backends.iter().map(|&pid| process_cpu_seconds(pid)).collect();
    let machine_before = super::goodput::busy_cpu_seconds()?;

    let clients = Clients {
        target,
        files,
        mode,
        downloads,
        expired: AtomicBool::new(false),
        running: (0..n).map(|_| Mutex::new(None)).collect(),
    };
    let (done, finished) = mpsc::channel();
    // A little ahead, so that starting the threads is not part of the spread.
    let first = Instant::now() + Duration::from_millis(100);
    let deadline = first + limit;
    let runs = std::thread::scope(|scope| -> anyhow::Result<Vec<ClientRun>> {
        for i in 0..n {
            let (clients, done) = (&clients, done.clone());
            #[expect(clippy::cast_possible_truncation, reason = "i < n ≤ a few thousand")]
            let start = first + Duration::from_secs(1) * i as u32 / n as u32;
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || {
                    let _ = done.send(clients.client(i, start));
                })
                .context("start a client thread")?;
        }
        drop(done);
        let mut runs = Vec::with_capacity(n);
        while runs.len() < n {
            // Past the limit the killed clients' threads report soon: wait for them without one.
            let next = if clients.expired.load(Ordering::SeqCst) {
                finished.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                finished.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            };
            match next {
                Ok(run) => {
                    runs.push(run);
                    bar.inc(1);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    clients.expired.store(true, Ordering::SeqCst);
                    (0..n).for_each(|i| clients.stop(i));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(runs)
    })?;

    let mut measured = Measured {
        server_cpu_s: target.cpu.and_then(CpuGroup::cpu_seconds).zip(server_before).map(|(after, before)| after - before),
        machine_cpu_s: super::goodput::busy_cpu_seconds()? - machine_before,
        dropped: dropped(target.segment.0).saturating_sub(dropped_before),
        rcvbuf_errors: rcvbuf_errors(&target.hosts).saturating_sub(rcvbuf_before),
        backend_cpu_s: target.backends.iter().zip(&backends_before).filter_map(|(&pid, before)| Some(process_cpu_seconds(pid)? - (*before)?)).collect(),
        ..Measured::default()
    };
    if let Some((verdicts, paced)) = xdp_before {
        let after = cluster.verdicts();
        measured.rate_limited = rate_limited(cluster).saturating_sub(paced);
        measured.verdicts = (after.backends - verdicts.backends, after.balancers - verdicts.balancers);
        measured.detector_lines = after.lines.into_iter().filter(|line| !verdicts.lines.contains(line)).collect();
    }
    let mut slowest: Vec<&ClientRun> = runs.iter().filter(|r| r.result.is_ok()).collect();
    slowest.sort_by_key(|run| std::cmp::Reverse(run.finished - run.started));
    measured.stragglers = slowest.iter().take(STRAGGLERS).map(|run| straggler(run, first)).collect();
    for run in runs {
        match run.result {
            Ok(bytes) => {
                measured.times.push((run.finished - run.started).as_secs_f64());
                measured.last_s = measured.last_s.max((run.finished - first).as_secs_f64());
                measured.bytes += bytes;
            }
            Err(why) => {
                measured.failures += 1;
                if measured.failure_samples.len() < 5 {
                    measured.failure_samples.push(why);
                }
            }
        }
    }
    measured.times.sort_by(f64::total_cmp);
    Ok(measured)
}

/// One finished client for the stragglers' note.
fn straggler(run: &ClientRun, first: Instant) -> String {
    let took: Vec<String> = run.took_s.iter().map(|s| format!("{s:.1}")).collect();
    let said = if run.said.is_empty() { "nothing".to_owned() } else { format!("`{}`", run.said) };
    format!(
        "client {} started at +{:.2} s, done in {:.1} s (downloads {} s); atftp said {said}",
        run.client,
        run.started.saturating_duration_since(first).as_secs_f64(),
        (run.finished - run.started).as_secs_f64(),
        took.join(" + "),
    )
}

/// atftp's stderr in short: each kind of line once with its count, digits folded (`got wrong
/// block <block: N>` ×3), the echo of the options it asked for left out.
fn client_said(stderr: &str) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Option ")) {
        let mut kind = String::with_capacity(line.len());
        for c in line.chars() {
            if !c.is_ascii_digit() {
                kind.push(c);
            } else if !kind.ends_with('N') {
                kind.push('N');
            }
        }
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => kinds.push((kind, 1)),
        }
    }
    let parts: Vec<String> = kinds.into_iter().map(|(kind, count)| if count > 1 { format!("{kind} ×{count}") } else { kind }).collect();
    parts.join("; ")
}

/// CPU time (user and system, all threads) process `pid` used so far, s.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let ticks = stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(super::goodput::ticks_to_seconds(ticks))
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15; the name in parentheses may
/// hold spaces).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.rsplit_once(") ")?.1.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

/// Whether a `/proc/<pid>/stat` line is of a live process (not a zombie waiting to be reaped).
fn alive(stat: &str) -> bool {
    stat.rsplit_once(") ").and_then(|(_, fields)| fields.chars().next()).is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// The last `lines` lines of a log, on one line.
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" / ")
}

/// Datagrams the namespaces' UDP dropped for full receive buffers so far.
fn rcvbuf_errors(hosts: &[&Netns]) -> u64 {
    hosts.iter().filter_map(|ns| udp_rcvbuf_errors(&ns.exec("cat", &["/proc/net/snmp"]).ok()?)).sum()
}

/// `RcvbufErrors` of the `Udp:` lines of `/proc/net/snmp` (a header line, then the values).
fn udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|name| name == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Frames the loss rule of `ns` dropped so far (0 without a rule).
fn dropped(ns: &Netns) -> u64 {
    loss_dropped(ns).unwrap_or(0)
}

/// Requests both balancers dropped for their source's pace (`drop_rate_limited`) so far.
fn rate_limited(cluster: &Cluster) -> u64 {
    cluster
        .topo
        .lb_pins
        .iter()
        .filter_map(|pins| netns_tests::topology::balance_at(pins).ok())
        .map(|status| status.counter(BalanceCounter::DropRateLimited).packets)
        .sum()
}

/// A cgroup (v2) of its own for a server's processes: its `cpu.stat` counts the CPU time of
/// every process in it and of every child they fork, reaped or not (tftpd-hpa forks a child
/// per transfer and ignores SIGCHLD, so their time reaches no parent's `cutime`). Made under
/// this process's own cgroup, without controllers: only the accounting every cgroup has. On
/// drop, what is left in it (a forked child still retransmitting to a client killed at the
/// limit) is killed by PID, and the group removed.
struct CpuGroup {
    path: PathBuf,
}

impl CpuGroup {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let mount = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
            })
            .context("no cgroup2 mount")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 entry in /proc/self/cgroup")?;
        let path = Path::new(&mount).join(own.trim_start_matches('/')).join(name);
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    fn add(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).with_context(|| format!("move {pid} into {}", self.path.display()))
    }

    /// CPU time its processes used so far, s.
    fn cpu_seconds(&self) -> Option<f64> {
        usage_seconds(&std::fs::read_to_string(self.path.join("cpu.stat")).ok()?)
    }

    fn pids(&self) -> Vec<libc::pid_t> {
        std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a process of this group: a server or a child it forked.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(error) = std::fs::remove_dir(&self.path) {
            eprintln!("cleanup of cgroup {} failed: {error}", self.path.display());
        }
    }
}

/// `usage_usec` of a `cpu.stat`, in seconds.
fn usage_seconds(stat: &str) -> Option<f64> {
    let usec: u64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?.trim().parse().ok()?;
    #[expect(clippy::cast_precision_loss, reason = "microseconds of CPU")]
    let seconds = usec as f64 / 1e6;
    Some(seconds)
}

/// A file size as the report gives it: MiB when whole, else KiB.
fn size_text(bytes: usize) -> String {
    if bytes.is_multiple_of(1 << 20) { format!("{} MiB", bytes >> 20) } else { format!("{} KiB", bytes >> 10) }
}

fn cell_title(clients: usize, mode: Mode, loss: u8) -> String {
    format!("{clients} clients, {}, {loss}% loss", mode.label())
}

/// The table row of a cell.
fn table_row(cell: &Cell) -> String {
    let mode = if cell.mode == Mode::Window && !cell.windowsize { format!("{} †", cell.mode.label()) } else { cell.mode.label().to_owned() };
    let head = format!("| {} | {mode} | {}% | {} |", cell.clients, cell.loss, cell.server.name());
    match &cell.outcome {
        Err(_) => format!("{head} not measured ¹ | | | | | | | |"),
        Ok(m) => match Summary::of(m) {
            None => format!("{head} - | - | - | - | **{}** | - | - | - |", m.failures),
            Some(s) => {
                let failures = if s.failures == 0 { "0".to_owned() } else { format!("**{}**", s.failures) };
                format!(
                    "{head} {:.1} s | {:.1} s | {:.1} s | {:.2} | {failures} | {:.1} | {} | {:.2} |",
                    s.last_s,
                    s.p50_s,
                    s.p99_s,
                    s.tail(),
                    s.goodput_mb_s,
                    s.server_cpu_ms_per_mb.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
                    s.machine_cpu_ms_per_mb
                )
            }
        },
    }
}

/// The summary of `server`'s cell in a group, if it was measured and a client finished.
fn summary_of(cells: &[Cell], server: Server, clients: usize, mode: Mode, loss: u8) -> Option<Summary> {
    let cell = cells.iter().find(|c| c.server == server && c.clients == clients && c.mode == mode && c.loss == loss)?;
    Summary::of(cell.outcome.as_ref().ok()?)
}

/// The lines of the targets: for each group, xdp-lb's time to the last client against
/// direct tftp-backend (≤ 1.1×), dnsmasq and tftpd-hpa (< 1×); with loss, xdp-lb's failures (0)
/// and p99 / p50 (≤ 3). A time ratio needs both storms complete (no failure).
fn target_lines(cells: &[Cell]) -> Vec<String> {
    let mut groups: Vec<(usize, Mode, u8)> = Vec::new();
    for cell in cells {
        if !groups.contains(&(cell.clients, cell.mode, cell.loss)) {
            groups.push((cell.clients, cell.mode, cell.loss));
        }
    }
    let mut lines = Vec::new();
    for (clients, mode, loss) in groups {
        let get = |server| summary_of(cells, server, clients, mode, loss);
        let Some(xdp) = get(Server::XdpLb) else {
            lines.push(format!("- {}: xdp-lb not measured", cell_title(clients, mode, loss)));
            continue;
        };
        let versus = [(Server::Backend, 1.1, false), (Server::Dnsmasq, 1.0, true), (Server::TftpdHpa, 1.0, true)].map(|(server, target, better)| {
            let goal = if better { "< 1".to_owned() } else { format!("≤ {target}") };
            let label = if server == Server::Backend { "direct tftp-backend" } else { server.name() };
            let verdict = match get(server) {
                Some(other) if xdp.failures == 0 && other.failures == 0 => {
                    let ratio = xdp.last_s / other.last_s;
                    let met = if better { ratio < target } else { ratio <= target };
                    format!("{ratio:.2}× ({goal}: {})", if met { "met" } else { "NOT met" })
                }
                Some(other) => format!("n/a ({goal}; failures: xdp-lb {}, {} {})", xdp.failures, server.name(), other.failures),
                None => format!("n/a ({goal}; {} not measured)", server.name()),
            };
            format!("vs {label} {verdict}")
        });
        lines.push(format!("- {}: xdp-lb's time to the last client {}", cell_title(clients, mode, loss), versus.join("; ")));
        if loss > 0 {
            let tail = xdp.tail();
            lines.push(format!(
                "  - xdp-lb at {loss}% loss: failures {} (target 0: {}), p99 / p50 {tail:.2} (target ≤ 3: {})",
                xdp.failures,
                if xdp.failures == 0 { "met" } else { "NOT met" },
                if tail <= 3.0 { "met" } else { "NOT met" },
            ));
        }
    }
    lines
}

fn report_cells(cells: &[Cell], plan: &Plan, windowsizes: &[(Server, bool)], report: &mut Report) {
    let storms: Vec<String> = plan
        .counts
        .iter()
        .map(|&clients| {
            let [clean, lossy] = LOSSES.map(|loss| {
                let (kernel, initrd) = plan.sizes(clients, loss);
                format!("{} + {}", size_text(kernel), size_text(initrd))
            });
            format!("{clients} clients: {clean} ({lossy} with loss)")
        })
        .collect();
    report.line(format!(
        "\n### Boot storm: N clients started within 1 s, each fetching a kernel then an initrd ({}); limit {} s\n",
        storms.join("; "),
        plan.limit.as_secs()
    ));
    report.line(
        "Completion: a client's start to the end of its second download. Failures: client errors, clients killed at the limit, \
         and files whose size or SHA-256 differs (every file is checked). Percentiles over the clients that finished. \
         Goodput: verified bytes / time to the last client. CPU per MB: the server's processes (for xdp-lb its 3 backends, \
         2 balancer agents and switch agent; XDP itself runs in softirq, outside them) and the whole machine.\n",
    );
    report.line("| clients | mode | loss | server | last client | p50 | p99 | p99/p50 | failures | goodput MB/s | server CPU ms/MB | machine CPU ms/MB |");
    report.line("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for cell in cells {
        report.line(table_row(cell));
    }
    let lock_step: Vec<&str> = windowsizes.iter().filter(|(_, w)| !w).map(|(s, _)| s.name()).collect();
    if !lock_step.is_empty() {
        report.line(format!("\n† {} did not grant windowsize 4 (no RFC 7440): those clients went lock-step.", lock_step.join(" and ")));
    }
    let broken: Vec<String> = cells
        .iter()
        .filter_map(|c| c.outcome.as_ref().err().map(|why| format!("{} ({}): {why}", c.server.name(), cell_title(c.clients, c.mode, c.loss))))
        .collect();
    if !broken.is_empty() {
        report.line(format!("\n¹ {}", broken.join("; ")));
    }
    let mut notes = Vec::new();
    for cell in cells {
        let what = format!("{} ({})", cell.server.name(), cell_title(cell.clients, cell.mode, cell.loss));
        if let Some(log) = &cell.exited {
            notes.push(format!("- {what}: the server exited during the storm (started again for the next one); its log ends: `{log}`"));
        }
        let Ok(m) = &cell.outcome else { continue };
        if !m.failure_samples.is_empty() {
            notes.push(format!("- {what}: {} failed, e.g. {}", m.failures, m.failure_samples.join("; ")));
        }
        if m.rcvbuf_errors > 0 {
            notes.push(format!("- {what}: the server's host dropped {} datagrams for a full socket receive buffer", m.rcvbuf_errors));
        }
        if m.rate_limited > 0 || m.verdicts != (0, 0) {
            notes.push(format!("- {what}: {} requests paced out, detector verdicts: {} backend, {} balancer", m.rate_limited, m.verdicts.0, m.verdicts.1));
        }
        if !m.backend_cpu_s.is_empty() {
            let each: Vec<String> = m.backend_cpu_s.iter().map(|s| format!("{s:.1}")).collect();
            notes.push(format!("- {what}: CPU of each steered backend {} s", each.join(" / ")));
        }
        for line in &m.detector_lines {
            notes.push(format!("  - {what}, agent: `{line}`"));
        }
        // The target's storms: the largest, through xdp-lb and direct.
        if plan.counts.last() == Some(&cell.clients) && matches!(cell.server, Server::XdpLb | Server::Backend) {
            for line in &m.stragglers {
                notes.push(format!("  - {what}, straggler: {line}"));
            }
        }
    }
    if !notes.is_empty() {
        report.line("\nNotes:\n");
        for note in notes {
            report.line(note);
        }
    }
    report.line("\nTargets (issue 18; printed, never asserted):\n");
    for line in target_lines(cells) {
        report.line(line);
    }
}

fn cell_json(cell: &Cell) -> serde_json::Value {
    let mut row = json!({
        "server": cell.server.name(), "clients": cell.clients, "mode": cell.mode.label(), "loss_percent": cell.loss,
        "windowsize_granted": cell.windowsize,
        "server_exited": cell.exited,
    });
    match &cell.outcome {
        Err(why) => row["failed"] = json!(why),
        Ok(m) => {
            let summary = Summary::of(m);
            row["measured"] = json!({
                "last_client_s": m.last_s,
                "p50_s": summary.map(|s| s.p50_s), "p99_s": summary.map(|s| s.p99_s),
                "failures": m.failures, "failure_samples": m.failure_samples,
                "goodput_mb_s": summary.map(|s| s.goodput_mb_s),
                "bytes_verified": m.bytes,
                "server_cpu_s": m.server_cpu_s, "machine_cpu_s": m.machine_cpu_s,
                "server_cpu_ms_per_mb": summary.map(|s| s.server_cpu_ms_per_mb),
                "machine_cpu_ms_per_mb": summary.map(|s| s.machine_cpu_ms_per_mb),
                "frames_dropped_by_loss_rule": m.dropped,
                "server_udp_rcvbuf_errors": m.rcvbuf_errors,
                "rate_limited_requests": m.rate_limited,
                "detector_verdicts": { "backends": m.verdicts.0, "balancers": m.verdicts.1 },
                "completion_s": m.times,
                "backend_cpu_s": m.backend_cpu_s,
                "stragglers": m.stragglers,
                "detector_lines": m.detector_lines,
            });
        }
    }
    row
}

/// One panel per client count; in each, a group of bars per (mode, loss), a bar per server:
/// the time to the last client, with a black tick at the median client and the failures
/// written above.
fn plot(cells: &[Cell], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let mut counts: Vec<usize> = cells.iter().map(|c| c.clients).collect();
    counts.dedup();
    let groups: Vec<(Mode, u8)> = Mode::ALL.into_iter().flat_map(|m| LOSSES.map(|l| (m, l))).collect();
    let height = u32::try_from(counts.len() * 460).unwrap_or(u32::MAX);
    let root = BitMapBackend::new(png, (1500, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let colors = [RGBColor(0, 114, 178), RGBColor(120, 120, 120), RGBColor(230, 159, 0), RGBColor(0, 158, 115), RGBColor(204, 121, 167)];
    for (&clients, area) in counts.iter().zip(root.split_evenly((counts.len(), 1))) {
        let summaries = |mode, loss| Server::ALL.map(|s| summary_of(cells, s, clients, mode, loss));
        let top = groups.iter().flat_map(|&(m, l)| summaries(m, l)).flatten().map(|s| s.last_s).fold(1.0, f64::max) * 1.2;
        #[expect(clippy::cast_precision_loss, reason = "four groups")]
        let n = groups.len() as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("boot storm, {clients} clients: time to the last client, s (lower is better; tick: median client)"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)?;
        let labels: Vec<String> = groups.iter().map(|&(m, l)| format!("{}, {l}% loss", m.label())).collect();
        let formatter = |x: &f64| crate::plot::category(&labels, *x);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() + 2)
            .x_label_formatter(&formatter)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc("s")
            .label_style(("sans-serif", 14))
            .draw()?;
        for (slot, (server, color)) in Server::ALL.iter().zip(colors).enumerate() {
            #[expect(clippy::cast_precision_loss, reason = "five servers")]
            let offset = -0.4 + 0.16 * slot as f64;
            let bars: Vec<(f64, Summary)> = groups
                .iter()
                .enumerate()
                .filter_map(|(i, &(m, l))| {
                    #[expect(clippy::cast_precision_loss, reason = "four groups")]
                    let x = i as f64 + offset;
                    Some((x, summary_of(cells, *server, clients, m, l)?))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|(x, s)| Rectangle::new([(*x, 0.0), (x + 0.15, s.last_s)], color.filled())))?
                .label(server.name())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
            chart.draw_series(bars.iter().map(|(x, s)| PathElement::new(vec![(*x, s.p50_s), (x + 0.15, s.p50_s)], BLACK.stroke_width(2))))?;
            let failed = bars.iter().filter(|(_, s)| s.failures > 0);
            chart.draw_series(failed.map(|(x, s)| Text::new(format!("{} failed", s.failures), (*x, s.last_s + top * 0.03), ("sans-serif", 12).into_font().color(&RED))))?;
        }
        crate::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_clients_fetch_smaller_files_and_lossy_storms_a_quarter() {
        let plan = Plan::new(false);
        assert_eq!(plan.sizes(100, 0), (4 << 20, 16 << 20));
        assert_eq!(plan.sizes(100, 1), (1 << 20, 4 << 20));
        assert_eq!(plan.sizes(1000, 0), ((4 << 20) / 10, (16 << 20) / 10));
        assert_eq!(plan.sizes(1000, 1), ((1 << 20) / 10, (4 << 20) / 10));
        assert_eq!(size_text(16 << 20), "16 MiB");
        assert_eq!(size_text((4 << 20) / 10), "409 KiB");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0, 7.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[3.0, 7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[4.0], 0.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    fn measured(times: &[f64], failures: usize) -> Measured {
        Measured {
            times: times.to_vec(),
            failures,
            last_s: times.iter().copied().fold(0.0, f64::max) + 0.5,
            bytes: 20_000_000 * times.len() as u64,
            server_cpu_s: Some(2.0),
            machine_cpu_s: 10.0,
            ..Measured::default()
        }
    }

    #[test]
    fn what_a_client_said_is_counted_by_kind() {
        let stderr = "Option blksize = 1468\ntimeout: retrying ...\ngot wrong block <block: 29>, sending extra ACK for <block: 29>\n\
                      got wrong block <block: 301>, sending extra ACK for <block: 301>\ntimeout: retrying ...\n\n";
        assert_eq!(client_said(stderr), "timeout: retrying ... ×2; got wrong block <block: N>, sending extra ACK for <block: N> ×2");
        assert_eq!(client_said("Option blksize = 1468\n"), "");
    }

    #[test]
    fn a_selection_runs_only_the_cells_it_names_of_the_plan() {
        let plan = Plan::new(true);
        let all = Selection::default();
        assert!(all.check(&plan).is_ok() && all.runs(20, Mode::Window, 1, Server::Atftpd));
        let some = Selection { clients: vec![100], servers: vec![Server::XdpLb, Server::Backend], ..Selection::default() };
        assert!(some.check(&plan).is_ok());
        assert!(some.runs(100, Mode::LockStep, 0, Server::XdpLb) && some.runs(100, Mode::Window, 1, Server::Backend));
        assert!(!some.runs(20, Mode::LockStep, 0, Server::XdpLb) && !some.runs(100, Mode::LockStep, 0, Server::Dnsmasq));
        assert!(Selection { clients: vec![1000], ..Selection::default() }.check(&plan).is_err());
        assert!(Selection { losses: vec![3], ..Selection::default() }.check(&plan).is_err());
    }

    #[test]
    fn a_summary_has_the_rates_per_mb_and_the_tail() {
        let s = Summary::of(&measured(&[1.0, 2.0, 3.0, 4.0], 0)).unwrap();
        assert_eq!((s.p50_s, s.p99_s, s.last_s), (2.0, 4.0, 4.5));
        assert!((s.goodput_mb_s - 80.0 / 4.5).abs() < 1e-9);
        assert!((s.server_cpu_ms_per_mb.unwrap() - 2000.0 / 80.0).abs() < 1e-9);
        assert!((s.machine_cpu_ms_per_mb - 10_000.0 / 80.0).abs() < 1e-9);
        assert!((s.tail() - 2.0).abs() < 1e-9);
        assert_eq!(Summary::of(&measured(&[], 3)), None, "nobody finished");
    }

    fn cell(server: Server, loss: u8, times: &[f64], failures: usize) -> Cell {
        Cell { server, clients: 100, mode: Mode::LockStep, loss, windowsize: false, outcome: Ok(measured(times, failures)), exited: None }
    }

    #[test]
    fn targets_compare_xdp_lb_with_direct_dnsmasq_and_tftpd_hpa() {
        let cells = [
            cell(Server::Backend, 0, &[9.5], 0),
            cell(Server::TftpdHpa, 0, &[20.5], 0),
            cell(Server::Dnsmasq, 0, &[9.5], 1),
            cell(Server::XdpLb, 0, &[10.0], 0),
        ];
        let lines = target_lines(&cells);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert!(line.starts_with("- 100 clients, lock-step, 0% loss:"), "{line}");
        assert!(line.contains("vs direct tftp-backend 1.05× (≤ 1.1: met); vs dnsmasq n/a (< 1; failures: xdp-lb 0, dnsmasq 1)"), "{line}");
        assert!(line.ends_with("; vs tftpd-hpa 0.50× (< 1: met)"), "{line}");
    }

    #[test]
    fn lossy_targets_are_failures_and_the_tail() {
        let cells = [cell(Server::Backend, 1, &[10.0], 0), cell(Server::XdpLb, 1, &[10.0, 20.0, 40.0], 2)];
        let lines = target_lines(&cells);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("vs direct tftp-backend n/a (≤ 1.1; failures: xdp-lb 2, tftp-backend 0)"), "{}", lines[0]);
        assert!(lines[0].contains("vs tftpd-hpa n/a (< 1; tftpd-hpa not measured)"), "{}", lines[0]);
        assert_eq!(lines[1], "  - xdp-lb at 1% loss: failures 2 (target 0: NOT met), p99 / p50 2.00 (target ≤ 3: met)");
    }

    #[test]
    fn a_row_shows_failures_and_unmeasured_cells() {
        let row = table_row(&cell(Server::Atftpd, 1, &[1.0, 3.0], 2));
        assert_eq!(row, "| 100 | lock-step | 1% | atftpd | 3.5 s | 1.0 s | 3.0 s | 3.00 | **2** | 11.4 | 50.00 | 250.00 |");
        let mut window = cell(Server::Dnsmasq, 0, &[1.0], 0);
        window.mode = Mode::Window;
        assert!(table_row(&window).starts_with("| 100 | windowsize 4 † | 0% | dnsmasq | 1.5 s |"), "{}", table_row(&window));
        window.outcome = Err("gone".into());
        assert_eq!(table_row(&window), "| 100 | windowsize 4 † | 0% | dnsmasq | not measured ¹ | | | | | | | |");
    }

    #[test]
    fn a_zombie_is_not_alive() {
        assert!(alive("4242 (atftpd) S 4200 4242 4242 0 -1 4194560 120 0"));
        assert!(alive("4242 (a) (b)) R 1 2"));
        assert!(!alive("4242 (atftpd) Z 4200 4242"));
        assert!(!alive("garbage"));
    }

    #[test]
    fn receive_buffer_drops_are_read_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 100 2 7 90 5 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        assert_eq!(udp_rcvbuf_errors(snmp), Some(5));
        assert_eq!(udp_rcvbuf_errors("Ip: 1\n"), None);
        assert_eq!(log_tail("a\n\nb\nc\n", 2), "b / c");
        let stat = "42 (tftp backend) S 1 42 42 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 3 0 1000 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(287));
        assert_eq!(stat_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn cpu_usage_is_read_from_cpu_stat() {
        assert_eq!(usage_seconds("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"), Some(2.5));
        assert_eq!(usage_seconds("user_usec 1\n"), None);
    }

    #[test]
    fn a_run_is_reported_as_a_table_json_and_a_chart() {
        let plan = Plan::new(true);
        let mut exited = cell(Server::Atftpd, 0, &[1.0, 2.0], 98);
        exited.exited = Some("*** bit out of range 0 - FD_SETSIZE on fd_set ***: terminated".into());
        let mut broken = cell(Server::Dnsmasq, 0, &[], 0);
        broken.outcome = Err("dnsmasq is not running (process 7 exited)".into());
        let cells = [cell(Server::Backend, 0, &[1.0, 2.0], 0), exited, broken, cell(Server::XdpLb, 0, &[1.5, 2.0], 0)];
        let windowsizes = [(Server::Backend, true), (Server::Dnsmasq, false)];
        let mut report = Report::default();
        report_cells(&cells, &plan, &windowsizes, &mut report);
        let text = &report.markdown;
        assert!(text.contains("20 clients: 1 MiB + 4 MiB (64 KiB + 256 KiB with loss); 100 clients: 204 KiB + 819 KiB"), "{text}");
        assert!(text.contains("| 100 | lock-step | 0% | atftpd | 2.5 s | 1.0 s | 2.0 s | 2.00 | **98** |"), "{text}");
        assert!(text.contains("the server exited during the storm (started again for the next one); its log ends: `*** bit out of range"), "{text}");
        assert!(text.contains("¹ dnsmasq (100 clients, lock-step, 0% loss): dnsmasq is not running"), "{text}");
        assert!(text.contains("† dnsmasq did not grant windowsize 4"), "{text}");
        assert!(text.contains("xdp-lb's time to the last client vs direct tftp-backend 1.00× (≤ 1.1: met)"), "{text}");

        let json = results_json(1, true, &plan, &[], &windowsizes, Some("chart.png"), &cells);
        assert_eq!(json["cells"][1]["server_exited"], "*** bit out of range 0 - FD_SETSIZE on fd_set ***: terminated");
        assert_eq!(json["cells"][2]["failed"], "dnsmasq is not running (process 7 exited)");
        assert_eq!(json["cells"][3]["measured"]["completion_s"], json!([1.5, 2.0]));
        assert_eq!(json["windowsize_granted"]["dnsmasq"], false);

        let png = std::env::temp_dir().join(format!("xl-storm-chart-test-{}.png", std::process::id()));
        plot(&cells, &png).expect("chart");
        let written = std::fs::metadata(&png).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&png);
        assert!(written > 1000, "{written} bytes");
    }

    #[test]
    fn an_oack_grants_the_options_it_names() {
        let oack = b"\x00\x06blksize\x001468\x00windowsize\x004\x00";
        assert!(oack_grants(oack, "windowsize"));
        assert!(oack_grants(oack, "BLKSIZE"));
        assert!(!oack_grants(b"\x00\x06blksize\x001468\x00", "windowsize"));
        assert!(!oack_grants(b"\x00\x03\x00\x01windowsize\x00", "windowsize"), "DATA is no OACK");
        assert!(!oack_grants(b"\x00\x06blksize\x00windowsize\x00", "windowsize"), "a value is no name");
    }
}
