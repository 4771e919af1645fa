//! `cargo xtask bench --only backend`: goodput of tftp-backend (standalone) against the two
//! stock Debian servers, tftpd-hpa and atftpd, on the same files with the same stock clients.
//!
//! Everything runs on loopback (127.0.0.1, a free port per server) and on ONE CPU, servers and
//! clients alike: in a VM a wakeup across CPUs costs an IPI and a VM exit, which made lock-step
//! figures jump between ~5 and ~25 MB/s run to run depending on where the scheduler placed the
//! client. On one CPU the figures are stable and compare what each server costs per byte.
//!
//! Every download is checked against the SHA-256 of its source: a mismatch or a failed client is
//! a failure of the run, never a number. Results: a markdown table (MB/s and the ratio to
//! tftpd-hpa), `backend-<unix time>.json` and `backend-<unix time>.png` in the results dir.

use std::{
    collections::BTreeMap,
    net::UdpSocket,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Process, RunPrefix,
    clients::Client,
    files::{make_file, sha256},
};
use serde_json::json;

use crate::{cargo::release_dir, setup::tftpd_hpa};

const HOST: &str = "127.0.0.1";

/// The servers compared, in table order; tftpd-hpa is the reference. The storm bench
/// (`storm.rs`) starts the same three the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    TftpdHpa,
    Atftpd,
    Backend,
}

impl Kind {
    pub(super) const ALL: [Self; 3] = [Self::TftpdHpa, Self::Atftpd, Self::Backend];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::TftpdHpa => "tftpd-hpa",
            Self::Atftpd => "atftpd",
            Self::Backend => "tftp-backend",
        }
    }

    /// RFC 7440. tftpd-hpa ignores the option and answers lock-step.
    pub(super) const fn has_windowsize(self) -> bool {
        !matches!(self, Self::TftpdHpa)
    }

    /// The server serving `root` on `host:port`.
    pub(crate) fn command(self, root: &Path, host: &str, port: u16) -> anyhow::Result<Command> {
        let command = match self {
            Self::Backend => {
                let mut c = Command::new(release_dir()?.join("tftp-backend"));
                c.arg("--root").arg(root).args(["--listen", &format!("{host}:{port}")]);
                c.env("RUST_LOG", "warn");
                c
            }
            Self::TftpdHpa => {
                // -L: foreground; -u root: Debian's `tftp` user need not exist here.
                let mut c = Command::new(tftpd_hpa());
                c.args(["-L", "-u", "root", "-a", &format!("{host}:{port}"), "-s"]).arg(root);
                c
            }
            Self::Atftpd => {
                let mut c = Command::new("atftpd");
                c.args(["--daemon", "--no-fork", "--user", "root.root", "--logfile", "-", "--verbose=1"]);
                c.args(["--port", &port.to_string(), "--bind-address", host]).arg(root);
                c
            }
        };
        Ok(command)
    }
}

/// A client program with its options, as one row of the table.
#[derive(Clone, Copy, Debug)]
pub(super) struct ClientCase {
    pub(super) client: Client,
    pub(super) program: &'static str,
    pub(super) blksize: u16,
    pub(super) windowsize: u16,
}

impl ClientCase {
    pub(super) const fn atftp(blksize: u16, windowsize: u16) -> Self {
        Self { client: Client::Atftp { blksize, windowsize }, program: "atftp", blksize, windowsize }
    }

    pub(super) fn label(&self) -> String {
        format!("{} {}/{}", self.program, self.blksize, self.windowsize)
    }
}

/// Every client configuration: atftp covers blksize and windowsize; curl has blksize only;
/// tftp-hpa negotiates nothing (512, lock-step).
fn client_cases() -> Vec<ClientCase> {
    vec![
        ClientCase::atftp(512, 1),
        ClientCase::atftp(1468, 1),
        ClientCase::atftp(512, 16),
        ClientCase::atftp(1468, 16),
        ClientCase { client: Client::Curl { blksize: 512 }, program: "curl", blksize: 512, windowsize: 1 },
        ClientCase { client: Client::Curl { blksize: 1468 }, program: "curl", blksize: 1468, windowsize: 1 },
        ClientCase { client: Client::TftpHpa, program: "tftp-hpa", blksize: 512, windowsize: 1 },
    ]
}

/// Cells moving more than this (50 × 64 MiB) keep blksize 1468 only: in 512-byte blocks lock-step
/// they are 6.5 million round trips per server, most of a full run's time.
const ONLY_LARGE_BLOCKS_ABOVE: usize = 1 << 30;

/// Sizes, concurrency and repeats of a run.
struct Plan {
    files: Vec<(String, usize)>,
    concurrency: Vec<usize>,
    /// Runs per cell (the median counts) for cells of at most `heavy` bytes in all; three
    /// times as many for cells of the smallest file to one client (see `repeats`).
    repeats: usize,
    /// Cells moving more than this many bytes in all run once, and with atftp only.
    heavy: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self { files: vec![("1m.bin".into(), 1 << 20), ("8m.bin".into(), 8 << 20)], concurrency: vec![1, 10], repeats: 3, heavy: 64 << 20 }
        } else {
            Self { files: vec![("1m.bin".into(), 1 << 20), ("64m.bin".into(), 64 << 20)], concurrency: vec![1, 50], repeats: 5, heavy: 256 << 20 }
        }
    }

    /// Runs of `cell` per server. A download of the smallest file by one client lasts
    /// 5–50 ms, and one of them moves by ±20% with the machine's moment (curl's even comes in
    /// two speeds): three times the runs steady its median at the cost of a few seconds.
    fn repeats(&self, cell: &Cell) -> usize {
        let bytes = cell.size * cell.clients;
        if bytes > self.heavy {
            1
        } else if cell.clients == 1 && Some(cell.size) == self.files.iter().map(|(_, size)| *size).min() {
            3 * self.repeats
        } else {
            self.repeats
        }
    }
}

/// Outcome of one server in one cell.
#[derive(Clone, Debug)]
pub(super) enum Outcome {
    /// Median MB/s and every run's figure.
    Rate(f64, Vec<f64>),
    /// The server does not support the option (tftpd-hpa and windowsize).
    NotApplicable,
    Failed(String),
}

impl Outcome {
    fn rate(&self) -> Option<f64> {
        match self {
            Self::Rate(r, _) => Some(*r),
            _ => None,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Rate(median, runs) => json!({ "mb_s": median, "runs_mb_s": runs }),
            Self::NotApplicable => json!("n/a"),
            Self::Failed(why) => json!({ "failed": why }),
        }
    }
}

pub(super) struct Cell {
    pub(super) file: String,
    pub(super) size: usize,
    pub(super) clients: usize,
    pub(super) case: ClientCase,
    pub(super) outcomes: BTreeMap<Kind, Outcome>,
}

impl Cell {
    /// The servers that can serve the cell's client setting (a window needs RFC 7440).
    fn servers(&self) -> Vec<Kind> {
        Kind::ALL.into_iter().filter(|k| self.case.windowsize == 1 || k.has_windowsize()).collect()
    }
}

/// Runs the section: prints the table, writes JSON and PNG into `out`, returns the JSON.
pub fn run(quick: bool, out: &Path) -> anyhow::Result<serde_json::Value> {
    let plan = Plan::new(quick);
    let prefix = RunPrefix::new();
    let dirs = Dirs::new(&prefix)?;
    let mut digests = BTreeMap::new();
    for (seed, (name, size)) in (11..).zip(&plan.files) {
        let path = dirs.root.join(name);
        make_file(&path, *size, seed)?;
        digests.insert(name.clone(), sha256(&path)?);
    }
    let cpu = bench_cpu()?;
    let servers = Kind::ALL
        .iter()
        .map(|&kind| Server::start(kind, HOST, &dirs.root, &prefix, cpu).map(|s| (kind, s)))
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;

    let mut cells = Vec::new();
    for (file, size) in &plan.files {
        for &clients in &plan.concurrency {
            for case in client_cases() {
                let heavy = size * clients > plan.heavy;
                if heavy && (case.program != "atftp" || (size * clients > ONLY_LARGE_BLOCKS_ABOVE && case.blksize < 1468)) {
                    continue;
                }
                cells.push(Cell { file: file.clone(), size: *size, clients, case, outcomes: BTreeMap::new() });
            }
        }
    }
    let total = cells
        .iter()
        .map(|c| plan.repeats(c) * c.servers().len())
        .sum::<usize>();
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{spinner} backend goodput [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(120));
    for cell in &mut cells {
        let repeats = plan.repeats(cell);
        let kinds = cell.servers();
        let mut runs: BTreeMap<Kind, Result<Vec<f64>, String>> = kinds.iter().map(|&k| (k, Ok(Vec::new()))).collect();
        // The servers take turns, run after run: a slow moment of the machine hits all of them.
        for _ in 0..repeats {
            for &kind in &kinds {
                let Some(Ok(rates)) = runs.get_mut(&kind) else { continue };
                bar.set_message(format!("{} ← {} × {} {}", kind.name(), cell.clients, cell.case.label(), cell.file));
                match measure(&servers[&kind], cell, &digests[&cell.file], &dirs.downloads, cpu, download_limit(cell)) {
                    Ok(rate) => rates.push(rate),
                    Err(error) => {
                        let why = format!("{error:#}");
                        bar.suspend(|| eprintln!("FAILED: {} ← {} × {} {}: {why}", kind.name(), cell.clients, cell.case.label(), cell.file));
                        runs.insert(kind, Err(why));
                    }
                }
                bar.inc(1);
            }
        }
        for kind in Kind::ALL {
            let outcome = match runs.remove(&kind) {
                None => Outcome::NotApplicable,
                Some(Err(why)) => Outcome::Failed(why),
                Some(Ok(rates)) => Outcome::Rate(super::report::min_median_max(&rates).1, rates),
            };
            cell.outcomes.insert(kind, outcome);
        }
    }
    bar.finish_and_clear();
    drop(servers);

    print_table(&cells, cpu);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let png = out.join(format!("backend-{stamp}.png"));
    let chart = match plot(&cells, &png) {
        Ok(()) => Some(png.display().to_string()),
        Err(error) => {
            eprintln!("no chart: {error:#}");
            None
        }
    };
    let results = json!({
        "unix_time": stamp,
        "quick": quick,
        "host": HOST,
        "cpu": cpu,
        "note": "servers and clients pinned to one CPU; MB/s = 10^6 bytes/s of all clients together, every download checked by SHA-256",
        "files": plan.files.iter().map(|(n, s)| json!({ "name": n, "size": s, "sha256": digests[n] })).collect::<Vec<_>>(),
        "chart": chart,
        "rows": cells.iter().map(row_json).collect::<Vec<_>>(),
    });
    let path = out.join(format!("backend-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!("\nbackend results saved to {}{}", path.display(), chart.map_or_else(String::new, |c| format!(" and {c}")));
    let failed = cells.iter().flat_map(|c| c.outcomes.values()).filter(|o| matches!(o, Outcome::Failed(_))).count();
    if failed > 0 {
        bail!("{failed} backend goodput measurement(s) failed (see FAILED above)");
    }
    Ok(results)
}

/// The served directory and the clients' download directory, removed on drop.
pub(crate) struct Dirs {
    pub(crate) root: PathBuf,
    pub(crate) downloads: PathBuf,
}

impl Dirs {
    pub(crate) fn new(prefix: &RunPrefix) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let dirs = Self {
            root: std::env::temp_dir().join(prefix.name("-bench-root")),
            downloads: std::env::temp_dir().join(prefix.name("-bench-dl")),
        };
        for dir in [&dirs.root, &dirs.downloads] {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        // atftpd and tftpd-hpa want a world-readable tree.
        std::fs::set_permissions(&dirs.root, std::fs::Permissions::from_mode(0o755))?;
        Ok(dirs)
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        for dir in [&self.root, &self.downloads] {
            if let Err(error) = std::fs::remove_dir_all(dir) {
                eprintln!("cleanup of {} failed: {error}", dir.display());
            }
        }
    }
}

/// A server under test, stopped by PID on drop.
pub(super) struct Server {
    host: String,
    port: u16,
    _process: Process,
}

impl Server {
    /// Starts `kind` on `host` (an address of the calling thread's network namespace).
    pub(super) fn start(kind: Kind, host: &str, root: &Path, prefix: &RunPrefix, cpu: usize) -> anyhow::Result<Self> {
        let port = free_port(host)?;
        let mut command = kind.command(root, host, port)?;
        pin(&mut command, cpu);
        let mut process = Process::spawn(prefix.name(&format!("-bench-{}", kind.name())), command)?;
        if let Err(error) = wait_ready(host, port) {
            let log = process.log();
            process.stop();
            bail!("{} did not answer on {host}:{port}: {error:#}\n{log}", kind.name());
        }
        Ok(Self { host: host.to_owned(), port, _process: process })
    }
}

/// A UDP port of `host` that was free a moment ago.
fn free_port(host: &str) -> anyhow::Result<u16> {
    Ok(UdpSocket::bind((host, 0))?.local_addr()?.port())
}

/// Waits until the server on `host:port` answers a read request for a missing file (with an
/// ERROR). The request leaves from the calling thread's network namespace.
pub(crate) fn wait_ready(host: &str, port: u16) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let request = b"\x00\x01xl-bench-no-such-file\x00octet\x00";
    let mut buf = [0u8; 600];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        socket.send_to(request, (host, port))?;
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && n >= 2
            && buf[..2] == [0, 5]
        {
            return Ok(());
        }
    }
    bail!("no ERROR for a missing file within 10 s")
}

/// The CPU everything runs on: the last one this process may use.
pub(super) fn bench_cpu() -> anyhow::Result<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pointer and size describe `set`.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: CPU_ISSET only reads the set.
    (0..libc::CPU_SETSIZE as usize).rev().find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).context("no CPU in the affinity mask")
}

/// Makes `command` run on `cpu` only.
fn pin(command: &mut Command, cpu: usize) {
    // SAFETY: the closure runs between fork and exec and only calls sched_setaffinity, which is
    // async-signal-safe, on a set built on the stack.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How long the downloads of a lossless cell may take: generous, 2 MB/s at the very least,
/// plus startup.
pub(super) fn download_limit(cell: &Cell) -> Duration {
    Duration::from_secs(30 + (cell.size * cell.clients / 2_000_000) as u64)
}

/// One measurement: `cell.clients` concurrent downloads of the file; aggregate MB/s from the
/// first start to the last exit. Every download must succeed with the right digest within
/// `limit`.
///
/// Clients are plain children reaped by a blocking `wait` on a thread each, not
/// [`Process`]es: its 10 ms polling would be a quarter of a 1 MiB lock-step download.
pub(super) fn measure(server: &Server, cell: &Cell, digest: &str, downloads: &Path, cpu: usize, limit: Duration) -> anyhow::Result<f64> {
    let total = cell.size * cell.clients;
    let locals: Vec<PathBuf> = (0..cell.clients).map(|i| downloads.join(format!("dl{i}"))).collect();
    for local in &locals {
        let _ = std::fs::remove_file(local);
    }
    let (done, finished) = mpsc::channel();
    let started = Instant::now();
    let mut pids = Vec::new();
    for (i, local) in locals.iter().enumerate() {
        let mut command = cell.case.client.download_here(&server.host, server.port, &cell.file, local);
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        pin(&mut command, cpu);
        let child: Child = command.spawn().with_context(|| format!("start {}", cell.case.program))?;
        pids.push(child.id());
        let done = done.clone();
        std::thread::spawn(move || {
            let output = child.wait_with_output();
            let _ = done.send((i, output, Instant::now()));
        });
    }
    drop(done);
    let mut last = started;
    let mut errors = Vec::new();
    let mut pending: std::collections::BTreeSet<usize> = (0..cell.clients).collect();
    while !pending.is_empty() {
        let Some(left) = limit.checked_sub(started.elapsed()) else { break };
        let Ok((i, output, at)) = finished.recv_timeout(left) else { break };
        pending.remove(&i);
        last = last.max(at);
        match output {
            Ok(output) if output.status.success() => {}
            Ok(output) => errors.push(format!("client {i}: {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim())),
            Err(error) => errors.push(format!("client {i}: {error}")),
        }
    }
    if !pending.is_empty() {
        for &i in &pending {
            if let Ok(pid) = libc::pid_t::try_from(pids[i]) {
                // SAFETY: kill on the PID of our own child, not reaped yet (its waiter has
                // not reported).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Let the waiters reap them.
        while finished.recv_timeout(Duration::from_secs(5)).is_ok() {}
        bail!("{} of {} downloads still running after {} s", pending.len(), cell.clients, limit.as_secs());
    }
    let elapsed = last - started;
    for (i, local) in locals.iter().enumerate() {
        let got = std::fs::metadata(local).map_or(0, |m| m.len());
        if got != cell.size as u64 {
            errors.push(format!("client {i}: {got} bytes instead of {}", cell.size));
        } else if sha256(local)? != digest {
            errors.push(format!("client {i}: SHA-256 mismatch"));
        }
        let _ = std::fs::remove_file(local);
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(mb(total) / elapsed.as_secs_f64())
}

#[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
pub(super) fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// The tftpd-hpa figure a cell compares with: its own, or for a window (which tftpd-hpa does
/// not do) the lock-step figure of the same client, file, blksize and concurrency.
fn reference(cells: &[Cell], cell: &Cell) -> Option<f64> {
    if cell.case.windowsize == 1 {
        return cell.outcomes.get(&Kind::TftpdHpa)?.rate();
    }
    cells
        .iter()
        .find(|c| c.file == cell.file && c.clients == cell.clients && c.case.program == cell.case.program && c.case.blksize == cell.case.blksize && c.case.windowsize == 1)
        .and_then(|c| c.outcomes.get(&Kind::TftpdHpa)?.rate())
}

fn print_table(cells: &[Cell], cpu: usize) {
    println!("\n### TFTP servers: goodput on loopback (MB/s, all clients together; servers and clients on CPU {cpu})\n");
    println!("| file | clients | client | blksize | windowsize | tftpd-hpa | atftpd | tftp-backend | atftpd / tftpd-hpa | tftp-backend / tftpd-hpa |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let cell_text = |o: Option<&Outcome>| match o {
        Some(Outcome::Rate(r, _)) => format!("{r:.1}"),
        Some(Outcome::NotApplicable) => "n/a".into(),
        Some(Outcome::Failed(_)) => "FAILED".into(),
        None => "-".into(),
    };
    for cell in cells {
        let reference = reference(cells, cell);
        let dagger = if cell.case.windowsize > 1 { " †" } else { "" };
        let ratio = |kind: Kind| match (cell.outcomes.get(&kind).and_then(Outcome::rate), reference) {
            (Some(r), Some(h)) => format!("{:.2}{dagger}", r / h),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.file,
            cell.clients,
            cell.case.program,
            cell.case.blksize,
            cell.case.windowsize,
            cell_text(cell.outcomes.get(&Kind::TftpdHpa)),
            cell_text(cell.outcomes.get(&Kind::Atftpd)),
            cell_text(cell.outcomes.get(&Kind::Backend)),
            ratio(Kind::Atftpd),
            ratio(Kind::Backend),
        );
    }
    println!("\n† tftpd-hpa has no windowsize (RFC 7440): ratio to its lock-step figure with the same client and blksize.");
    // The target: at least tftpd-hpa lock-step, three times it with a window of 16.
    let target = |windowsize: u16, factor: f64| {
        let ratios: Vec<f64> = cells
            .iter()
            .filter(|c| c.case.windowsize == windowsize)
            .filter_map(|c| Some(c.outcomes.get(&Kind::Backend)?.rate()? / reference(cells, c)?))
            .collect();
        let met = ratios.iter().filter(|&&r| r >= factor).count();
        let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        // One row moves by a few percent between runs; the geometric mean over the rows does not.
        let rows = f64::from(u32::try_from(ratios.len().max(1)).unwrap_or(u32::MAX));
        let mean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / rows).exp();
        println!(
            "- windowsize {windowsize}: tftp-backend ≥ {factor}× tftpd-hpa in {met}/{} rows (lowest {worst:.2}×, geometric mean {mean:.2}×)",
            ratios.len()
        );
    };
    println!("\nTarget (issue 3):");
    target(1, 1.0);
    target(16, 3.0);
}

fn row_json(cell: &Cell) -> serde_json::Value {
    json!({
        "file": cell.file,
        "size": cell.size,
        "clients": cell.clients,
        "client": cell.case.program,
        "blksize": cell.case.blksize,
        "windowsize": cell.case.windowsize,
        "servers": cell.outcomes.iter().map(|(k, o)| (k.name().to_owned(), o.to_json())).collect::<serde_json::Map<_, _>>(),
    })
}

/// A grouped bar chart: one panel per (file, clients), a group of bars per client setting.
fn plot(cells: &[Cell], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let mut panels: Vec<(String, Vec<&Cell>)> = Vec::new();
    for cell in cells {
        let title = format!("{} × {} client(s)", cell.file, cell.clients);
        match panels.iter_mut().find(|(t, _)| *t == title) {
            Some((_, group)) => group.push(cell),
            None => panels.push((title, vec![cell])),
        }
    }
    let columns = 2;
    let rows = panels.len().div_ceil(columns);
    let height = u32::try_from(rows * 420).unwrap_or(u32::MAX);
    let root = BitMapBackend::new(png, (1600, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let colors = [RGBColor(120, 120, 120), RGBColor(230, 159, 0), RGBColor(0, 114, 178)];
    for ((title, group), area) in panels.iter().zip(root.split_evenly((rows, columns))) {
        let top = group.iter().flat_map(|c| c.outcomes.values().filter_map(Outcome::rate)).fold(1.0, f64::max) * 1.15;
        #[expect(clippy::cast_precision_loss, reason = "a handful of groups")]
        let n = group.len() as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{title}: goodput MB/s (higher is better)"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(55)
            .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)?;
        let labels: Vec<String> = group.iter().map(|c| c.case.label()).collect();
        let formatter = |x: &f64| crate::plot::category(&labels, *x);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(group.len() + 2)
            .x_label_formatter(&formatter)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc("MB/s")
            .label_style(("sans-serif", 13))
            .draw()?;
        for (slot, (kind, color)) in Kind::ALL.iter().zip(colors).enumerate() {
            let rates = group.iter().enumerate().filter_map(|(i, c)| Some((i, c.outcomes.get(kind)?.rate()?)));
            crate::plot::bar_series(&mut chart, (slot, Kind::ALL.len()), rates, kind.name(), color)?;
        }
        crate::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    Ok(())
}

