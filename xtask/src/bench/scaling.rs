//! `--only scaling`: 1, 10, 100 and 1000 (`--quick`: up to 100) concurrent downloads of a
//! small file through the LB ([`LbTopology`], one steered backend), the atftp clients spread
//! over a few client namespaces. Per level, a fresh LB agent (`--requests-per-sec 0`: the
//! per-source pacing would otherwise hold back a namespace's hundred requests) and a fresh
//! backend, so that their peak memory (VmHWM) is that level's. Figures: aggregate goodput from
//! the first client started to the last one done, and VmRSS / VmHWM of the LB agent and of the
//! backend (`/proc/<pid>/status`). Sessions live in the LB's BPF maps (kernel memory,
//! preallocated), not in the agent's RSS. A table and `scaling-<unix time>.png`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Process,
    clients::Client,
    files::{make_file, sha256},
    topology::{LbTopology, VIP},
};
use serde_json::json;

use super::report::Report;

const CLIENT: Client = Client::Atftp { blksize: 1468, windowsize: 16 };
const SIZE: usize = 256 << 10;
const FILE: &str = "small.bin";
/// Client namespaces (addresses); level / NAMESPACES atftp processes in each.
const NAMESPACES: usize = 10;

/// Memory of one process, KiB.
#[derive(Clone, Copy, Default)]
struct Memory {
    idle_rss: u64,
    peak_rss: u64,
    hwm: u64,
}

struct Level {
    transfers: usize,
    seconds: f64,
    lb: Memory,
    backend: Memory,
}

impl Level {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    fn mb_s(&self) -> f64 {
        (SIZE * self.transfers) as f64 / self.seconds / 1e6
    }
}

pub fn run(quick: bool, png: &Path, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let levels: &[usize] = if quick { &[1, 10, 100] } else { &[1, 10, 100, 1000] };
    let topo = LbTopology::new(NAMESPACES, 1).context("creating namespaces (root?)")?;
    let source = topo.root.join(FILE);
    make_file(&source, SIZE, 13)?;
    let digest = sha256(&source)?;
    let bar = ProgressBar::new(levels.iter().sum::<usize>() as u64)
        .with_style(ProgressStyle::with_template("{spinner} scaling [{bar:30}] {pos}/{len} downloads {elapsed_precise} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut results = Vec::new();
    for &transfers in levels {
        bar.set_message(format!("{transfers} concurrent"));
        results.push(level(&topo, transfers, &digest, &bar)?);
    }
    bar.finish_and_clear();

    report.line(format!(
        "\n### Scaling: concurrent downloads through xdp-lb ({} KiB each, {}, one steered backend, {NAMESPACES} client addresses)\n",
        SIZE >> 10,
        CLIENT.name()
    ));
    report.line("| transfers | time | aggregate MB/s | vs 1 transfer | LB agent RSS idle → peak (HWM) | backend RSS idle → peak (HWM) |");
    report.line("|---:|---:|---:|---:|---:|---:|");
    let mib = |kib: u64| {
        #[expect(clippy::cast_precision_loss, reason = "KiB of a process")]
        let m = kib as f64 / 1024.0;
        m
    };
    let one = results.first().map_or(1.0, Level::mb_s);
    for l in &results {
        report.line(format!(
            "| {} | {:.2} s | {:.1} | {:.2} | {:.1} → {:.1} MiB ({:.1}) | {:.1} → {:.1} MiB ({:.1}) |",
            l.transfers,
            l.seconds,
            l.mb_s(),
            l.mb_s() / one,
            mib(l.lb.idle_rss),
            mib(l.lb.peak_rss),
            mib(l.lb.hwm),
            mib(l.backend.idle_rss),
            mib(l.backend.peak_rss),
            mib(l.backend.hwm),
        ));
    }
    report.line(
        "\nTime: first client started to last client done (starting the clients included). RSS sampled every 10 ms; \
         HWM: VmHWM at the end. The LB's sessions are in BPF maps (kernel memory), not in the agent's RSS.",
    );
    let chart = match plot(&results, png) {
        Ok(()) => {
            report.line(format!("\nChart: {}", png.display()));
            Some(png.display().to_string())
        }
        Err(error) => {
            eprintln!("no scaling chart: {error:#}");
            None
        }
    };
    Ok(json!({
        "size": SIZE, "client": CLIENT.name(), "client_namespaces": NAMESPACES, "chart": chart,
        "rows": results.iter().map(|l| json!({
            "transfers": l.transfers, "seconds": l.seconds, "mb_s": l.mb_s(),
            "lb_agent_kib": { "idle_rss": l.lb.idle_rss, "peak_rss": l.lb.peak_rss, "hwm": l.lb.hwm },
            "backend_kib": { "idle_rss": l.backend.idle_rss, "peak_rss": l.backend.peak_rss, "hwm": l.backend.hwm },
        })).collect::<Vec<_>>(),
    }))
}

/// One level: fresh agent and backend, `transfers` downloads at once, all checked.
fn level(topo: &LbTopology, transfers: usize, digest: &str, bar: &ProgressBar) -> anyhow::Result<Level> {
    let backend = topo.start_backend(0)?;
    let agent = topo.start_lb(&["--requests-per-sec", "0"])?;
    netns_tests::topology::wait_answering("the backend live", 1, || topo.status().ok()).with_context(|| agent.log())?;
    let pids = [agent.pid(), backend.pid()];
    // The processes start as `nsenter`, which execs the program: measure the program.
    for (pid, name) in pids.iter().zip(["xdp-lb", "tftp-backend"]) {
        netns_tests::wait_for(&format!("pid {pid} to be {name}"), 5, || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            name.starts_with(comm.trim()).then_some(())
        })?;
    }
    let idle = pids.map(|pid| status_kib(pid, "VmRSS:").unwrap_or(0));
    let sampler = Sampler::start(pids);

    let locals: Vec<PathBuf> = (0..transfers).map(|i| std::env::temp_dir().join(topo.prefix.name(&format!("s{i}")))).collect();
    let started = Instant::now();
    let mut downloads = Vec::with_capacity(transfers);
    for (i, local) in locals.iter().enumerate() {
        let command = CLIENT.download(&topo.clients[i % NAMESPACES], VIP, 69, FILE, local);
        downloads.push(Process::spawn(topo.prefix.name(&format!("scale-dl{i}")), command)?);
    }
    let deadline = started + Duration::from_secs(120 + transfers as u64 / 5);
    let mut errors = Vec::new();
    for (i, download) in downloads.iter_mut().enumerate() {
        match download.wait(deadline.saturating_duration_since(Instant::now())) {
            Some(status) if status.success() => {}
            Some(status) => errors.push(format!("client {i}: {status}: {}", download.log().trim())),
            None => errors.push(format!("client {i}: not done in time")),
        }
        bar.inc(1);
    }
    let seconds = started.elapsed().as_secs_f64();
    let peaks = sampler.stop();
    let hwm = pids.map(|pid| status_kib(pid, "VmHWM:").unwrap_or(0));
    drop(downloads);
    for (i, local) in locals.iter().enumerate() {
        if errors.len() < 5 && !sha256(local).is_ok_and(|d| d == digest) {
            errors.push(format!("client {i}: missing or different file"));
        }
        let _ = std::fs::remove_file(local);
    }
    if !errors.is_empty() {
        bail!("{transfers} concurrent: {} failed: {}\n{}", errors.len(), errors.iter().take(5).cloned().collect::<Vec<_>>().join("; "), agent.log());
    }
    let memory = |i: usize| Memory { idle_rss: idle[i], peak_rss: peaks[i].max(idle[i]), hwm: hwm[i] };
    Ok(Level { transfers, seconds, lb: memory(0), backend: memory(1) })
}

/// A field in KiB from /proc/<pid>/status (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field))?.split_whitespace().next()?.parse().ok()
}

/// Samples the VmRSS of two processes every 10 ms on a thread, keeping the highest.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<[AtomicU64; 2]>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pids: [u32; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (flag, max) = (Arc::clone(&stop), Arc::clone(&peaks));
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for (pid, peak) in pids.iter().zip(max.iter()) {
                    if let Some(kib) = status_kib(*pid, "VmRSS:") {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self { stop, peaks, thread }
    }

    fn stop(self) -> [u64; 2] {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        [self.peaks[0].load(Ordering::Relaxed), self.peaks[1].load(Ordering::Relaxed)]
    }
}

type LevelChart<'a> = plotters::chart::ChartContext<
    'a,
    plotters::prelude::BitMapBackend<'a>,
    plotters::coord::cartesian::Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A panel with one x position per level (`n` of them, labelled by `formatter`) and a y axis
/// from 0 to `top`.
fn level_axes<'a>(
    panel: &plotters::drawing::DrawingArea<plotters::prelude::BitMapBackend<'a>, plotters::coord::Shift>,
    (caption, x_desc, y_desc): (&str, &str, &str),
    n: f64,
    top: f64,
    formatter: &dyn Fn(&f64) -> String,
) -> anyhow::Result<LevelChart<'a>> {
    use plotters::prelude::*;
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.3..n - 0.7, 0.0..top)?;
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a handful of levels")]
    let labels = n as usize + 2;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels)
        .x_label_formatter(formatter)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    Ok(chart)
}

/// Two panels: aggregate goodput, and peak RSS of the LB agent and the backend, by number of
/// concurrent transfers (one x position per level).
fn plot(levels: &[Level], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let root = BitMapBackend::new(png, (1400, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    #[expect(clippy::cast_precision_loss, reason = "a handful of levels")]
    let n = levels.len() as f64;
    let labels: Vec<String> = levels.iter().map(|l| l.transfers.to_string()).collect();
    let formatter = |x: &f64| crate::plot::category(&labels, *x);
    #[expect(clippy::cast_precision_loss, reason = "a handful of levels; KiB of a process")]
    let series = |value: &dyn Fn(&Level) -> f64| -> Vec<(f64, f64)> { levels.iter().enumerate().map(|(i, l)| (i as f64, value(l))).collect() };
    let blue = RGBColor(0, 114, 178);
    let orange = RGBColor(230, 159, 0);

    let goodput = series(&Level::mb_s);
    let top = goodput.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let axes = |panel, caption, x_desc, y_desc, top| level_axes(panel, (caption, x_desc, y_desc), n, top, &formatter);
    let mut chart = axes(&panels[0], "aggregate goodput through xdp-lb, MB/s", "concurrent transfers (256 KiB each)", "MB/s", top)?;
    chart.draw_series(std::iter::once(PathElement::new(goodput.clone(), blue.stroke_width(2))))?;
    chart.draw_series(goodput.iter().map(|&p| Circle::new(p, 4, blue.filled())))?;

    #[expect(clippy::cast_precision_loss, reason = "KiB of a process")]
    let lb = series(&|l| l.lb.hwm as f64 / 1024.0);
    #[expect(clippy::cast_precision_loss, reason = "KiB of a process")]
    let backend = series(&|l| l.backend.hwm as f64 / 1024.0);
    let top = lb.iter().chain(&backend).map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = axes(&panels[1], "peak memory (VmHWM), MiB", "concurrent transfers", "MiB", top)?;
    for (name, points, color) in [("LB agent (xdp-lb balance)", lb, blue), ("backend (tftp-backend --steered)", backend, orange)] {
        chart
            .draw_series(std::iter::once(PathElement::new(points.clone(), color.stroke_width(2))))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    crate::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}
