//! `--only failover`: failures in the middle of a download through the full topology
//! ([`PairTopology`]: switch, active and backup LB, three steered backends), over many runs:
//!
//! - **LB failure**: at 50% of the download the ACTIVE load balancer is killed as in
//!   `netns-tests/tests/pair.rs` (SIGKILL of its agent, its link down); the switch promotes the
//!   backup. After the run it comes back (link up, a new agent) as the backup.
//! - **backend failure**: at 50% the backend serving the download is SIGKILLed; the active LB
//!   moves the session. After the run it is restarted and every backend is warmed up again.
//!
//! Per run: the stall (the longest time the downloaded file did not grow after the kill) and
//! the DATA sent twice (replies both LBs delivered, counters `to_client` + `relearned`, minus
//! the packets the file needs). Every file must arrive whole and identical.
//!
//! Each backend computes a file's digest on its first request for it (cached in memory), so
//! before the runs and after each backend restart every backend is warmed up with a download
//! of the file: a stall then measures the failover, not a cold cache.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Process,
    clients::Client,
    cluster::{Agents, Cluster},
    files::{make_file, sha256},
    pair_topology::{PairTopology, VIP},
    watch::{Growth, stall_after, wait_for_size},
};
use serde_json::json;

use super::report::{Report, min_median_max};

/// The stall target of a failover (issue 4): the client sees no gap longer than this.
const TARGET_MS: f64 = 250.0;
const BACKENDS: usize = 3;
const BLKSIZE: u16 = 1468;
const CLIENT: Client = Client::Atftp { blksize: BLKSIZE, windowsize: 16 };
const FILE: &str = "failover.bin";
/// The runs kill the same balancers and backends every few seconds on purpose: with flap
/// damping on, each death after the first would hold the revived peer out longer (1 s, 2 s, ...
/// 60 s), and a run would start without it. Every agent here runs without damping.
const NO_DAMPING: &[&str] = &["--flap-window-secs", "0"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    Lb,
    Backend,
}

impl Failure {
    const fn label(self) -> &'static str {
        match self {
            Self::Lb => "active LB killed (SIGKILL + link down)",
            Self::Backend => "serving backend killed (SIGKILL)",
        }
    }

    const fn key(self) -> &'static str {
        match self {
            Self::Lb => "lb",
            Self::Backend => "backend",
        }
    }
}

/// One run's figures.
struct Outcome {
    stall_ms: f64,
    twice_packets: u64,
}

/// The cluster, with the file the runs download.
struct Running {
    cluster: Cluster,
    size: usize,
    digest: String,
}

impl Running {
    fn start(size: usize) -> anyhow::Result<Self> {
        let topo = PairTopology::new(1, BACKENDS).context("creating namespaces (root?)")?;
        let source = topo.root.join(FILE);
        make_file(&source, size, 9)?;
        let digest = sha256(&source)?;
        let cluster = Cluster::try_start_on(topo, &Agents { lb_args: NO_DAMPING, switch_args: NO_DAMPING, ..Agents::default() })?;
        let running = Self { cluster, size, digest };
        for lb in 0..2 {
            running.wait_backends_live(lb)?;
        }
        Ok(running)
    }

    /// Agent logs, for failure messages.
    fn logs(&self) -> String {
        self.cluster.logs()
    }

    /// For a stall over the target: when the file stood still (ms after the kill), and the
    /// warnings and failover milestones of every agent's log (who died, who took over).
    fn explain(&self, samples: &[(Instant, u64)], killed_at: Instant) -> String {
        let since_kill = |at: Instant| at.saturating_duration_since(killed_at).as_millis();
        let gaps = samples
            .windows(2)
            .filter(|w| w[1].0 > killed_at && w[1].0 - w[0].0 > Duration::from_millis(50))
            .map(|w| format!("no growth {}..{} ms after the kill, at {} bytes", since_kill(w[0].0), since_kill(w[1].0), w[0].1));
        let agents = self.logs();
        let events = agents.lines().filter(|l| l.starts_with("---") || l.contains("WARN") || l.contains("first DATA")).map(str::to_owned);
        gaps.chain(events).collect::<Vec<_>>().join("\n")
    }

    fn wait_backends_live(&self, lb: usize) -> anyhow::Result<()> {
        netns_tests::topology::wait_answering(&format!("{BACKENDS} live backends at balancer {lb}"), BACKENDS, || self.cluster.topo.lb_status(lb).ok())
            .with_context(|| self.logs())
    }

    fn wait_lbs_reachable(&self) -> anyhow::Result<()> {
        Ok(self.cluster.await_lbs_reachable(&[0, 1])?)
    }

    /// The balancer the switch calls active.
    fn active_lb(&self) -> anyhow::Result<usize> {
        self.cluster.topo.switch_status()?.active().context("no active balancer")
    }

    fn local(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(self.cluster.topo.prefix.name(name))
    }

    fn download(&self, local: &std::path::Path) -> anyhow::Result<Process> {
        let name = self.cluster.topo.prefix.name(&format!("dl-{}", local.file_name().unwrap_or_default().to_string_lossy()));
        Ok(Process::spawn(name, CLIENT.download(&self.cluster.topo.clients[0], VIP, 69, FILE, local))?)
    }

    /// Waits for a download and checks its content; removes the file.
    fn finish(&self, mut download: Process, local: &std::path::Path, what: &str) -> anyhow::Result<()> {
        let exit = download.wait(Duration::from_secs(120));
        let ok = exit.is_some_and(|e| e.success()) && sha256(local).is_ok_and(|d| d == self.digest);
        let _ = std::fs::remove_file(local);
        if !ok {
            bail!("{what}: the download failed or differs ({exit:?}):\n{}\n{}", download.log(), self.logs());
        }
        Ok(())
    }

    /// One download per backend at once (least-loaded spreads them), so that every backend has
    /// the file's digest cached.
    fn warm_up(&self) -> anyhow::Result<()> {
        let downloads = (0..BACKENDS)
            .map(|i| {
                let local = self.local(&format!("warm{i}"));
                Ok((self.download(&local)?, local))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (download, local) in downloads {
            self.finish(download, &local, "warm-up")?;
        }
        Ok(())
    }

    /// Sessions at balancer `lb` as (client, backend, idle ms).
    fn sessions(&self, lb: usize) -> anyhow::Result<Vec<(SocketAddrV4, Option<usize>, u64)>> {
        Ok(self.cluster.topo.lb_status(lb)?.sessions.into_iter().map(|s| (s.client, usize::try_from(s.backend).ok(), s.idle_ms)).collect())
    }

    /// One download with `failure` injected at 50%, then the killed part brought back.
    fn run(&mut self, failure: Failure, run: usize) -> anyhow::Result<Outcome> {
        let before = self.cluster.delivered();
        let active = self.active_lb()?;
        let clients_before: Vec<SocketAddrV4> = self.sessions(active)?.into_iter().map(|s| s.0).collect();
        let local = self.local(&format!("failover-{}-{run}", failure.key()));
        let download = self.download(&local)?;
        let growth = Growth::watch(local.clone());
        if !wait_for_size(&local, (self.size / 2) as u64, Duration::from_secs(60)) {
            bail!("run {run}: the download did not reach 50%:\n{}\n{}", download.log(), self.logs());
        }
        // What was killed: the balancer or the backend at this index.
        let killed = match failure {
            Failure::Lb => {
                self.cluster.topo.fail_lb(active, self.cluster.lbs[active].take())?;
                active
            }
            Failure::Backend => {
                let serving = self
                    .sessions(active)?
                    .into_iter()
                    .filter(|s| !clients_before.contains(&s.0))
                    .min_by_key(|s| s.2)
                    .and_then(|s| s.1)
                    .with_context(|| format!("run {run}: no session in flight at balancer {active}"))?;
                if let Some(mut backend) = self.cluster.backends[serving].take() {
                    backend.kill_hard();
                }
                serving
            }
        };
        let killed_at = Instant::now();
        self.finish(download, &local, &format!("run {run}"))?;
        let samples = growth.stop();
        let outcome = self.outcome(&samples, killed_at, before);
        if outcome.stall_ms > TARGET_MS {
            eprintln!("run {run} ({}): stall {:.0} ms over the target\n{}", failure.label(), outcome.stall_ms, self.explain(&samples, killed_at));
        }
        match failure {
            Failure::Lb => {
                self.cluster.topo.plug_lb(killed)?;
                self.cluster.lbs[killed] = Some(self.cluster.topo.start_lb(killed, NO_DAMPING)?);
                self.wait_backends_live(killed)?;
                self.wait_lbs_reachable()?;
            }
            Failure::Backend => {
                self.cluster.backends[killed] = Some(self.cluster.topo.start_backend(killed)?);
                for lb in 0..2 {
                    self.wait_backends_live(lb)?;
                }
                self.warm_up()?;
            }
        }
        Ok(outcome)
    }

    fn outcome(&self, samples: &[(Instant, u64)], killed_at: Instant, before: u64) -> Outcome {
        // One OACK and size / blksize + 1 DATA are needed; every further reply was a resend.
        let needed = self.size as u64 / u64::from(BLKSIZE) + 2;
        let delivered = self.cluster.delivered() - before;
        Outcome { stall_ms: stall_after(samples, killed_at).as_secs_f64() * 1e3, twice_packets: delivered.saturating_sub(needed) }
    }
}

pub fn run(quick: bool, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let runs = if quick { 3 } else { 20 };
    let size: usize = if quick { 32 << 20 } else { 64 << 20 };
    let mut running = Running::start(size)?;
    running.warm_up()?;
    let kinds = [Failure::Lb, Failure::Backend];
    let bar = ProgressBar::new((runs * kinds.len()) as u64).with_style(ProgressStyle::with_template("{spinner} failover [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut results = Vec::new();
    for kind in kinds {
        let mut outcomes = Vec::new();
        for run in 0..runs {
            bar.set_message(format!("{}, run {}", kind.label(), run + 1));
            outcomes.push(running.run(kind, run)?);
            bar.inc(1);
        }
        results.push((kind, outcomes));
    }
    bar.finish_and_clear();
    drop(running);

    report.line(format!(
        "\n### Failover: killed at 50% of a download through the switch and the LB pair ({runs} runs each, {} MiB, {})\n",
        size >> 20,
        CLIENT.name()
    ));
    report.line("| failure | stall min | median | max | target | DATA sent twice min | median | max |");
    report.line("|---|---:|---:|---:|---|---:|---:|---:|");
    let kib = |packets: f64| packets * f64::from(BLKSIZE) / 1024.0;
    let mut json_rows = Vec::new();
    for (kind, outcomes) in &results {
        let stalls: Vec<f64> = outcomes.iter().map(|o| o.stall_ms).collect();
        #[expect(clippy::cast_precision_loss, reason = "packet counts")]
        let twice: Vec<f64> = outcomes.iter().map(|o| o.twice_packets as f64).collect();
        let (s_min, s_med, s_max) = min_median_max(&stalls);
        let (t_min, t_med, t_max) = min_median_max(&twice);
        let met = stalls.iter().filter(|&&s| s <= TARGET_MS).count();
        report.line(format!(
            "| {} | {s_min:.0} ms | {s_med:.0} ms | {s_max:.0} ms | ≤ {TARGET_MS:.0} ms: {met}/{} runs, max/target {:.2} | {t_min:.0} ({:.0} KiB) | {t_med:.0} ({:.0} KiB) | {t_max:.0} ({:.0} KiB) |",
            kind.label(),
            outcomes.len(),
            s_max / TARGET_MS,
            kib(t_min),
            kib(t_med),
            kib(t_max),
        ));
        json_rows.push(json!({
            "failure": kind.key(), "runs": outcomes.len(),
            "stall_ms": stalls, "stall_ms_min": s_min, "stall_ms_median": s_med, "stall_ms_max": s_max,
            "runs_within_target": met,
            "twice_packets": twice, "twice_packets_min": t_min, "twice_packets_median": t_med, "twice_packets_max": t_max,
        }));
    }
    report.line(
        "\nStall: longest time the file did not grow after the kill (sampled every 2 ms). DATA sent twice: packets \
         (and KiB of payload) both LBs delivered beyond the OACK and DATA the file needs.",
    );
    let quiet = false_positives(quick, report)?;
    Ok(json!({ "runs": runs, "size": size, "client": CLIENT.name(), "target_stall_ms": TARGET_MS, "rows": json_rows, "false_positives": quiet }))
}

/// One false-positive scenario: what it did, for how long, and what the detectors concluded.
struct Quiet {
    scenario: String,
    seconds: f64,
    verdicts: netns_tests::cluster::Verdicts,
}

/// The detector's false positives: storms and floods that must not fail over live peers, through
/// the full topology, each with real downloads beside it. Target: no verdict at all.
pub fn false_positives(quick: bool, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    // The cluster harness asserts like a test; a failure there is this section's error.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure_false_positives(quick)))
        .map_err(|panic| anyhow::anyhow!("false-positive run failed: {}", panic.downcast_ref::<String>().map_or("(panic)", String::as_str)))?
        .map(|rows| report_false_positives(&rows, report))
}

fn measure_false_positives(quick: bool) -> anyhow::Result<Vec<Quiet>> {
    use netns_tests::{
        storm::{Storm, StormPlan, lock_step_download, spoofed_requests},
    };
    let cluster = Cluster::start(3, BACKENDS);
    let storm_file = cluster.file("storm.bin", 4 << 20, 61);
    let beside = cluster.file("beside.bin", 8 << 20, 62);
    let expected = std::fs::read(&storm_file)?;
    let vip: std::net::Ipv4Addr = VIP.parse()?;
    let saturated = Duration::from_secs(if quick { 10 } else { 30 });
    let bar = ProgressBar::new(4).with_style(ProgressStyle::with_template("{spinner} false positives [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut rows = Vec::new();
    let mut measure = |scenario: &str, body: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        bar.set_message(scenario.to_owned());
        let before = cluster.verdicts();
        let started = Instant::now();
        body()?;
        let after = cluster.verdicts();
        let verdicts = netns_tests::cluster::Verdicts {
            backends: after.backends - before.backends,
            balancers: after.balancers - before.balancers,
            swaps: after.swaps - before.swaps,
            lines: after.lines.into_iter().skip(before.lines.len()).collect(),
        };
        rows.push(Quiet { scenario: scenario.to_owned(), seconds: started.elapsed().as_secs_f64(), verdicts });
        bar.inc(1);
        Ok(())
    };
    for (storm, label) in [(Storm::DuplicateAck, "1000 duplicate ACKs, 1 ms apart"), (Storm::StaleAck, "1000 stale ACK 0s, 1 ms apart")] {
        measure(label, &mut || {
            let local = cluster.local("beside-storm");
            let mut stock = cluster.download(1, Client::TftpHpa, "beside.bin", &local);
            let plan = StormPlan { storm, at_block: 400, copies: 1000, spacing: Duration::from_millis(1) };
            let got = cluster.topo.clients[0].enter(|| lock_step_download(vip, "storm.bin", BLKSIZE, &plan, Duration::from_secs(60)))??;
            anyhow::ensure!(got.data == expected, "the storming client's file differs");
            anyhow::ensure!(stock.wait(Duration::from_secs(60)).is_some_and(|s| s.success()), "the download beside the storm failed");
            anyhow::ensure!(sha256(&local)? == sha256(&beside)?, "the download beside the storm differs");
            Ok(())
        })?;
    }
    measure("20 000 requests from 2 000 spoofed addresses in 1 s, then 4 s of their retransmissions", &mut || {
        let local = cluster.local("beside-flood");
        let mut stock = cluster.download(1, Client::TftpHpa, "beside.bin", &local);
        cluster.topo.clients[2].enter(|| spoofed_requests(vip, "beside.bin", std::net::Ipv4Addr::new(10, 79, 0, 1), 2000, 20_000, Duration::from_secs(1)))??;
        anyhow::ensure!(stock.wait(Duration::from_secs(60)).is_some_and(|s| s.success()), "the download beside the flood failed");
        anyhow::ensure!(sha256(&local)? == sha256(&beside)?, "the download beside the flood differs");
        std::thread::sleep(Duration::from_secs(4));
        Ok(())
    })?;
    let label = format!("both CPUs saturated (stress-ng, 8 workers) for {} s, 3 clients downloading", saturated.as_secs());
    measure(&label, &mut || {
        let mut stress = std::process::Command::new("stress-ng");
        stress.args(["--cpu", "8", "--timeout", &format!("{}s", saturated.as_secs()), "--quiet"]);
        let mut stress = Process::spawn(cluster.topo.prefix.name("stress"), stress)?;
        let started = Instant::now();
        while started.elapsed() < saturated {
            let downloads: Vec<_> = (0..3).map(|i| (cluster.local(&format!("sat-{i}")), i)).map(|(local, i)| (cluster.download(i, CLIENT, "beside.bin", &local), local)).collect();
            for (mut download, local) in downloads {
                anyhow::ensure!(download.wait(Duration::from_secs(120)).is_some_and(|s| s.success()), "a download under load failed");
                anyhow::ensure!(sha256(&local)? == sha256(&beside)?, "a download under load differs");
            }
        }
        stress.stop();
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(rows)
}

fn report_false_positives(rows: &[Quiet], report: &mut Report) -> serde_json::Value {
    report.line("\n### Failure detector: false positives (target 0 verdicts per minute)\n");
    report.line("| scenario | lasted | backend verdicts | balancer verdicts | swaps | verdicts per minute |");
    report.line("|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for row in rows {
        let v = &row.verdicts;
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let per_minute = (v.backends + v.balancers) as f64 * 60.0 / row.seconds.max(1e-3);
        report.line(format!("| {} | {:.1} s | {} | {} | {} | {per_minute:.1} |", row.scenario, row.seconds, v.backends, v.balancers, v.swaps));
        for line in &v.lines {
            report.line(format!("|  ↳ {} | | | | | |", line.replace('|', "/")));
        }
        json_rows.push(json!({
            "scenario": row.scenario, "seconds": row.seconds, "backend_verdicts": v.backends,
            "balancer_verdicts": v.balancers, "swaps": v.swaps, "verdicts_per_minute": per_minute,
        }));
    }
    json!(json_rows)
}
