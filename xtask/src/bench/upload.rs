//! `--only upload`: upload goodput and the stall after a backend kill (issue 17), in the full
//! topology ([`PairTopology`]: switch, LB pair, three steered backends with roots of their own),
//! same client, same file:
//!
//! - **direct**: the client uploads to a standalone `tftp-backend --allow-upload` on backend 0's
//!   host, routed through the switch host's kernel (the same hops, without the balancer);
//! - **xdp-lb**: through the VIP to steered backends without `--peer` (no replication);
//! - **xdp-lb + replication**: the same with `--peer` naming every other backend.
//!
//! With lock-step (atftp blksize 1428, no windowsize) and windowsize 16; the paths in turn,
//! round after round, medians. Then, with replication, the serving backend SIGKILLed at 50% of
//! a windowed upload: the stall is the longest time no upload temporary grew in any root.
//! A path that cannot be measured (a backend that does not take `--peer` yet, an upload that
//! fails) shows "not measured" with the reason.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netns_tests::{
    Process,
    clients::{Client, Ending},
    cluster::{Agents, Cluster},
    files::{make_file, sha256},
    pair_topology::{PairTopology, SWITCH_CLIENT_SIDE, SWITCH_LB_SIDE, Uploads, VIP, backend_addr},
    upload::{serving, wait_for_progress, watch_progress},
    watch::stall_after,
};
use serde_json::json;

use super::report::{Report, min_median_max};

const CLIENTS: [Client; 2] = [Client::AtftpLockStep { blksize: 1428 }, Client::Atftp { blksize: 1428, windowsize: 16 }];
const PATHS: [&str; 3] = ["direct", "xdp-lb", "xdp-lb + replication"];
/// Rounds of the three paths; on a 2-CPU VM one measurement moves by ±20%.
const ROUNDS: usize = 3;
/// Issue 17's targets: replication costs at most a fifth of the goodput through the balancers,
/// and a backend's death stalls an upload at most this long.
const TARGET_RATIO: f64 = 0.8;
const TARGET_STALL_MS: f64 = 250.0;
/// The runs kill backends on purpose: without damping a revived one is taken back at once.
const NO_DAMPING: &[&str] = &["--flap-window-secs", "0"];

/// One path's goodputs with one client (MB/s per round), or why there are none.
type Cell = Result<Vec<f64>, String>;

fn median(cell: &Cell) -> Option<f64> {
    cell.as_ref().ok().filter(|v| !v.is_empty()).map(|v| min_median_max(v).1)
}

/// Adds a measurement to a cell; the first failure ends the cell.
fn record(cell: &mut Cell, measured: anyhow::Result<f64>) {
    if let Ok(values) = cell {
        match measured {
            Ok(rate) => values.push(rate),
            Err(error) => *cell = Err(format!("{error:#}")),
        }
    }
}

pub fn run(quick: bool, out: &Path, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let size = if quick { 16 << 20 } else { 64 << 20 };
    let kills = if quick { 1 } else { 3 };
    let source = std::env::temp_dir().join(netns_tests::RunPrefix::new().name("upload-bench.bin"));
    make_file(&source, size, 41)?;
    let digest = sha256(&source)?;
    let bench = Bench { source: source.clone(), digest, size };
    let (cells, stalls) = measure_all(&bench, kills)?;
    let _ = std::fs::remove_file(&source);

    report.line(format!(
        "\n### Upload goodput: direct vs xdp-lb vs xdp-lb with replication ({} MiB, atftp blksize 1428, MB/s, medians of {ROUNDS} rounds)\n",
        size >> 20
    ));
    report.line("| client | direct | xdp-lb | xdp-lb + replication | xdp-lb / direct | replication / xdp-lb (target ≥ 0.8) |");
    report.line("|---|---:|---:|---:|---:|---:|");
    let text = |cell: &Cell| median(cell).map_or_else(|| "not measured ¹".to_owned(), |m| format!("{m:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b));
    for (c, client) in CLIENTS.into_iter().enumerate() {
        let replicated = ratio(median(&cells[2][c]), median(&cells[1][c]));
        let verdict = match median(&cells[2][c]).zip(median(&cells[1][c])) {
            Some((r, t)) if r / t >= TARGET_RATIO => " ✓",
            Some(_) => " ✗",
            None => "",
        };
        report.line(format!(
            "| {} | {} | {} | {} | {} | {replicated}{verdict} |",
            client.name(),
            text(&cells[0][c]),
            text(&cells[1][c]),
            text(&cells[2][c]),
            ratio(median(&cells[1][c]), median(&cells[0][c])),
        ));
    }
    let stall_text = match &stalls {
        Ok(v) if !v.is_empty() => {
            let (min, mid, max) = min_median_max(v);
            format!("{min:.0} / {mid:.0} / {max:.0} ms (min / median / max of {}; target ≤ {TARGET_STALL_MS:.0} ms)", v.len())
        }
        _ => "not measured ¹".to_owned(),
    };
    report.line(format!("\nStall after the serving backend is SIGKILLed at 50% of a windowed upload, with replication: {stall_text}"));
    // (what, why) per figure not measured; one footnote per distinct reason.
    let reasons: Vec<(String, &String)> = cells
        .iter()
        .zip(PATHS)
        .flat_map(|(row, path)| row.iter().zip(CLIENTS).filter_map(move |(cell, client)| cell.as_ref().err().map(|why| (format!("{path} ({})", client.name()), why))))
        .chain(stalls.as_ref().err().map(|why| ("the stall".to_owned(), why)))
        .collect();
    let mut footnotes: Vec<(String, Vec<String>)> = Vec::new();
    for (what, why) in reasons {
        let why = summary(why);
        match footnotes.iter_mut().find(|(known, _)| *known == why) {
            Some((_, whats)) => whats.push(what),
            None => footnotes.push((why, vec![what])),
        }
    }
    for (why, whats) in &footnotes {
        report.line(format!("\n¹ {}: {why}", whats.join(", ")));
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let png = out.join(format!("upload-{stamp}.png"));
    let chart = match plot(&cells, &png) {
        Ok(()) => Some(png.display().to_string()),
        Err(error) => {
            eprintln!("upload chart: {error:#}");
            None
        }
    };
    report.line(format!("\nChart: {}", chart.as_deref().unwrap_or("(none)")));
    let cell_json = |cell: &Cell| match cell {
        Ok(values) => json!({ "mb_s": values, "median": median(cell) }),
        Err(why) => json!({ "failed": why }),
    };
    Ok(json!({
        "size": size,
        "rounds": ROUNDS,
        "chart": chart,
        "rows": CLIENTS.iter().enumerate().map(|(c, client)| json!({
            "client": client.name(),
            "direct": cell_json(&cells[0][c]),
            "xdp_lb": cell_json(&cells[1][c]),
            "xdp_lb_replicated": cell_json(&cells[2][c]),
            "replicated_vs_xdp_lb": median(&cells[2][c]).zip(median(&cells[1][c])).map(|(r, t)| r / t),
        })).collect::<Vec<_>>(),
        "stall_after_backend_kill_ms": match &stalls { Ok(v) => json!(v), Err(why) => json!({ "failed": why }) },
    }))
}

/// Every path with every client, round after round, then the stalls: `cells[path][client]`.
fn measure_all(bench: &Bench, kills: usize) -> anyhow::Result<([[Cell; 2]; 3], Cell)> {
    // cells[path][client]
    let mut cells: [[Cell; 2]; 3] = std::array::from_fn(|_| [Ok(Vec::new()), Ok(Vec::new())]);
    {
        let cluster = start(Uploads { own_roots: true, ..Uploads::default() })?;
        let direct = Direct::start(&cluster);
        for _ in 0..ROUNDS {
            for (c, client) in CLIENTS.into_iter().enumerate() {
                match &direct {
                    Ok(direct) => record(&mut cells[0][c], bench.measure(&cluster, client, &backend_addr(0), std::slice::from_ref(&direct.root), false)),
                    Err(why) => cells[0][c] = Err(format!("{why:#}")),
                }
                record(&mut cells[1][c], bench.measure(&cluster, client, VIP, &cluster.topo.backend_roots(), false));
            }
        }
    }
    let mut stalls: Cell = Ok(Vec::new());
    match start(Uploads::replicated()) {
        Ok(mut cluster) => {
            for _ in 0..ROUNDS {
                for (c, client) in CLIENTS.into_iter().enumerate() {
                    record(&mut cells[2][c], bench.measure(&cluster, client, VIP, &cluster.topo.backend_roots(), true));
                }
            }
            for _ in 0..kills {
                record(&mut stalls, bench.stall_after_backend_kill(&mut cluster));
            }
        }
        Err(error) => {
            let why = format!("the replicating cluster did not start: {error:#}");
            cells[2] = [Err(why.clone()), Err(why.clone())];
            stalls = Err(why);
        }
    }
    Ok((cells, stalls))
}

/// A reason in one line: a cluster's failure carries every agent's log, of which the first
/// `error:` line (a backend that refused its arguments) is kept.
fn summary(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default().trim_end_matches("; logs:");
    match text.lines().skip(1).find(|l| l.trim_start().starts_with("error:")) {
        Some(error) => format!("{first} ({})", error.trim()),
        None => first.to_owned(),
    }
}

fn start(uploads: Uploads) -> anyhow::Result<Cluster> {
    let topo = PairTopology::with_uploads(1, 3, uploads).context("creating namespaces (root?)")?;
    Ok(Cluster::try_start_on(topo, &Agents { lb_args: NO_DAMPING, switch_args: NO_DAMPING, ..Agents::default() })?)
}

/// The standalone backend of the direct path on backend 0's host, its root, and the routes
/// between the client and that host through the switch host (stopped and removed with the
/// topology).
struct Direct {
    root: PathBuf,
    _server: Process,
}

impl Direct {
    fn start(cluster: &Cluster) -> anyhow::Result<Self> {
        let topo = &cluster.topo;
        topo.clients[0].ip(&["route", "add", "10.77.0.0/24", "via", SWITCH_CLIENT_SIDE])?;
        topo.backends[0].ip(&["route", "add", "10.78.0.0/24", "via", SWITCH_LB_SIDE])?;
        let root = topo.root.join("direct");
        std::fs::create_dir_all(&root)?;
        netns_tests::files::share_dir(&root, true)?;
        let mut command = topo.backends[0].command(netns_tests::binary("tftp-backend"));
        command.arg("--root").arg(&root).args(["--listen", &format!("{}:69", backend_addr(0)), "--allow-upload"]);
        command.env("RUST_LOG", "warn");
        let mut server = Process::spawn(topo.prefix.name("direct"), command)?;
        std::thread::sleep(Duration::from_millis(300));
        if !server.is_running() {
            bail!("the standalone backend exited: {}", server.log());
        }
        Ok(Self { root, _server: server })
    }
}

/// The file every upload sends.
struct Bench {
    source: PathBuf,
    digest: String,
    size: usize,
}

/// A fresh remote name per upload (no overwrite).
fn remote_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("bench-{}.bin", NEXT.fetch_add(1, Ordering::Relaxed))
}

impl Bench {
    /// Goodput in MB/s of one upload with `client` to `server`; the upload must end well and
    /// land whole in one of `roots` (from which it is removed again).
    fn measure(&self, cluster: &Cluster, client: Client, server: &str, roots: &[PathBuf], replicated: bool) -> anyhow::Result<f64> {
        let remote = remote_name();
        let started = Instant::now();
        let mut upload = self.upload(cluster, client, server, &remote)?;
        self.finish(&mut upload, client, server)?;
        let elapsed = started.elapsed().as_secs_f64();
        let landed = roots.iter().any(|r| sha256(&r.join(&remote)).is_ok_and(|d| d == self.digest));
        // A replicated upload is pushed to the other backends after its last ACK: the next
        // upload starts once every backend has it, so that it does not share the CPUs with
        // the pushes of the one before.
        let everywhere = || roots.iter().all(|r| r.join(&remote).exists() && netns_tests::upload::temporaries(r).is_empty());
        let settle = Instant::now();
        while replicated && !everywhere() && settle.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        for root in roots {
            let _ = std::fs::remove_file(root.join(&remote));
        }
        if !landed {
            bail!("the upload of {remote} to {server} ended well but is in none of {roots:?}");
        }
        #[expect(clippy::cast_precision_loss, reason = "a byte count")]
        Ok(self.size as f64 / 1e6 / elapsed)
    }

    fn upload(&self, cluster: &Cluster, client: Client, server: &str, remote: &str) -> anyhow::Result<Process> {
        let command = client.upload(&cluster.topo.clients[0], server, 69, &self.source, remote);
        Ok(Process::spawn(cluster.topo.prefix.name(&format!("bench-ul-{remote}")), command)?)
    }

    fn finish(&self, upload: &mut Process, client: Client, server: &str) -> anyhow::Result<()> {
        let status = upload.wait(Duration::from_secs(300)).with_context(|| format!("an upload to {server} not done after 300 s"))?;
        match client.ending(status, &upload.log()) {
            Ending::Done => Ok(()),
            other => bail!("{} upload of {} bytes to {server}: {other:?}", client.name(), self.size),
        }
    }

    /// A windowed upload with the serving backend SIGKILLed at 50%: the stall in ms. The backend
    /// is restarted afterwards.
    fn stall_after_backend_kill(&self, cluster: &mut Cluster) -> anyhow::Result<f64> {
        let client = CLIENTS[1];
        let remote = remote_name();
        let progress = watch_progress(cluster.topo.backend_roots());
        let mut upload = self.upload(cluster, client, VIP, &remote)?;
        if !wait_for_progress(&progress, (self.size / 2) as u64, Duration::from_secs(120)) {
            bail!("the upload did not reach 50%: {}", upload.log());
        }
        let (_, backend) = serving(cluster, 0).context("no session of the upload at the active balancer")?;
        cluster.kill_backend(backend);
        let killed_at = Instant::now();
        self.finish(&mut upload, client, VIP)?;
        let stall = stall_after(&progress.stop(), killed_at);
        for root in cluster.topo.backend_roots() {
            let _ = std::fs::remove_file(root.join(&remote));
        }
        cluster.backends[backend] = Some(cluster.topo.start_backend(backend)?);
        for lb in 0..2 {
            cluster.await_backends_live(lb, 3)?;
        }
        Ok(stall.as_secs_f64() * 1e3)
    }
}

/// Bars per client, one per path (linear MB/s).
fn plot(cells: &[[Cell; 2]; 3], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let root = BitMapBackend::new(png, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = cells.iter().flatten().filter_map(median).fold(1.0, f64::max) * 1.15;
    let labels: Vec<String> = CLIENTS.iter().map(|c| c.name()).collect();
    let formatter = |x: &f64| crate::plot::category(&labels, *x);
    let mut chart = ChartBuilder::on(&root)
        .caption("Upload goodput, MB/s (higher is better)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..1.5, 0.0..top)?;
    chart.configure_mesh().disable_x_mesh().x_labels(4).x_label_formatter(&formatter).y_desc("MB/s").label_style(("sans-serif", 13)).draw()?;
    let colors = [RGBColor(120, 120, 120), RGBColor(230, 159, 0), RGBColor(0, 114, 178)];
    for (slot, ((row, path), color)) in cells.iter().zip(PATHS).zip(colors).enumerate() {
        let rates = row.iter().enumerate().filter_map(|(i, cell)| Some((i, median(cell)?)));
        crate::plot::bar_series(&mut chart, (slot, PATHS.len()), rates, path, color)?;
    }
    crate::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_keeps_its_first_line_and_the_first_error_of_the_logs() {
        let failed = "x: timed out after 20 s waiting for 3 live backends; logs:\n--- switch\nok\n--- backend 0\nerror: unexpected argument '--peer' found\n";
        assert_eq!(summary(failed), "x: timed out after 20 s waiting for 3 live backends (error: unexpected argument '--peer' found)");
        assert_eq!(summary("an upload failed\nmore"), "an upload failed");
    }

    #[test]
    fn a_cell_keeps_its_rates_until_the_first_failure() {
        let mut cell: Cell = Ok(Vec::new());
        record(&mut cell, Ok(2.0));
        record(&mut cell, Ok(4.0));
        record(&mut cell, Ok(3.0));
        assert_eq!(median(&cell), Some(3.0));
        record(&mut cell, Err(anyhow::anyhow!("gone")));
        record(&mut cell, Ok(5.0));
        assert_eq!(cell, Err("gone".to_owned()));
        assert_eq!(median(&cell), None);
    }
}
