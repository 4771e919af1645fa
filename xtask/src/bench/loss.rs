//! `cargo xtask bench --only loss`: the servers and stock clients of the `backend` section over
//! a lossy path: a client namespace and a server namespace the bench creates, joined by a
//! veth, each dropping a share of the UDP datagrams it receives at random (an nftables rule,
//! `impair::input_loss`; this kernel has no netem), so each direction loses that share.
//! Servers and clients run on one CPU as in `backend`. Lossless and lossy runs are measured in
//! the same run, servers taking turns.
//!
//! What it answers: how much of its lossless goodput a server keeps at 1% loss. A server that
//! waits a fixed timeout (1 s) for each lost DATA or ACK of a lock-step transfer keeps almost
//! nothing; tftp-backend's timer follows the measured round trip. Stock servers at 1% loss are
//! run once per cell, with a time limit (atftpd's lock-step downloads take minutes): a cell
//! that runs out of it shows the goodput it would have had to beat (`<`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    Netns, RunPrefix,
    files::{make_file, sha256},
    impair::{clear_loss, input_loss, loss_dropped},
    veth_pair,
};
use serde_json::json;

use super::{
    backend::{Cell, ClientCase, Dirs, Kind, Server, bench_cpu, download_limit, mb, measure},
    report::{Report, min_median_max},
};

/// Loss rates measured, in percent of the datagrams each way.
const LOSSES: [u8; 2] = [0, 1];

/// The clients: lock-step as most boot firmware (tftp-hpa at 512 bytes, curl at 1468) and a
/// window of 16 (atftp).
fn cases() -> [ClientCase; 3] {
    [
        ClientCase { client: netns_tests::clients::Client::TftpHpa, program: "tftp-hpa", blksize: 512, windowsize: 1 },
        ClientCase { client: netns_tests::clients::Client::Curl { blksize: 1468 }, program: "curl", blksize: 1468, windowsize: 1 },
        ClientCase::atftp(1468, 16),
    ]
}

/// One row: a client case at one loss rate, each server's runs in MB/s (or why not).
struct Row {
    case: ClientCase,
    loss: u8,
    runs: BTreeMap<Kind, Result<Vec<f64>, String>>,
}

impl Row {
    fn median(&self, kind: Kind) -> Option<f64> {
        match self.runs.get(&kind)? {
            Ok(runs) if !runs.is_empty() => Some(min_median_max(runs).1),
            _ => None,
        }
    }
}

/// Sizes and repeats.
struct Plan {
    size: usize,
    /// Runs of tftp-backend per row, and of every server without loss.
    repeats: usize,
    /// Time limit of one lossy download from a stock server.
    limit: Duration,
}

pub fn run(quick: bool, out: &Path, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let plan = if quick {
        Plan { size: 256 << 10, repeats: 3, limit: Duration::from_secs(40) }
    } else {
        Plan { size: 1 << 20, repeats: 5, limit: Duration::from_secs(150) }
    };
    let prefix = RunPrefix::new();
    let path = Link::new(&prefix)?;
    let dirs = Dirs::new(&prefix)?;
    let file = "lossy.bin";
    make_file(&dirs.root.join(file), plan.size, 51)?;
    let digest = sha256(&dirs.root.join(file))?;
    let cpu = bench_cpu()?;
    let servers = path.server.enter(|| {
        Kind::ALL
            .iter()
            .map(|&kind| Server::start(kind, SERVER, &dirs.root, &prefix, cpu).map(|s| (kind, s)))
            .collect::<anyhow::Result<BTreeMap<_, _>>>()
    })??;
    let rows = path.client.enter(|| measure_all(&path, &servers, &plan, &dirs, file, &digest, cpu))??;
    drop(servers);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    print_table(&rows, plan.size, report);
    let png = out.join(format!("loss-{stamp}.png"));
    let chart = match plot(&rows, &png) {
        Ok(()) => Some(png.display().to_string()),
        Err(error) => {
            eprintln!("no chart: {error:#}");
            None
        }
    };
    Ok(json!({
        "unix_time": stamp,
        "size": plan.size,
        "chart": chart,
        "note": "client and server namespaces over a veth, both pinned to one CPU; loss = share of UDP datagrams each side drops at input",
        "rows": rows.iter().map(|row| json!({
            "client": row.case.label(),
            "loss_percent": row.loss,
            "servers": row.runs.iter().map(|(kind, runs)| (kind.name().to_owned(), match runs {
                Ok(runs) => json!({ "runs_mb_s": runs }),
                Err(why) => json!({ "failed": why }),
            })).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    }))
}

/// The server's address on the veth.
const SERVER: &str = "10.99.77.1";

/// The two namespaces and the veth between them (deleted with them on drop).
struct Link {
    client: Netns,
    server: Netns,
}

impl Link {
    fn new(prefix: &RunPrefix) -> anyhow::Result<Self> {
        let path = Self { client: Netns::new(prefix.name("lossc"))?, server: Netns::new(prefix.name("losss"))? };
        veth_pair(&path.server, "eth0", &path.client, "eth0")?;
        path.server.add_address("eth0", &format!("{SERVER}/24"))?;
        path.client.add_address("eth0", "10.99.77.2/24")?;
        Ok(path)
    }

    /// Each side drops `percent` % of the UDP datagrams it receives.
    fn lose(&self, percent: u8) -> anyhow::Result<()> {
        for ns in [&self.client, &self.server] {
            if percent == 0 { clear_loss(ns) } else { input_loss(ns, percent) }.context("loss rule")?;
        }
        Ok(())
    }

    fn dropped(&self) -> u64 {
        [&self.client, &self.server].iter().map(|ns| loss_dropped(ns).unwrap_or(0)).sum()
    }
}

/// Runs every row from the client namespace (the calling thread has joined it).
fn measure_all(path: &Link, servers: &BTreeMap<Kind, Server>, plan: &Plan, dirs: &Dirs, file: &str, digest: &str, cpu: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = LOSSES
        .iter()
        .flat_map(|&loss| cases().map(|case| Row { case, loss, runs: BTreeMap::new() }))
        .collect();
    let runs_of = |kind: Kind, loss: u8| if loss == 0 || kind == Kind::Backend { plan.repeats } else { 1 };
    let total: usize = rows.iter().map(|r| Kind::ALL.iter().filter(|k| serves(**k, &r.case)).map(|&k| runs_of(k, r.loss)).sum::<usize>()).sum();
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template(
        "{spinner} goodput over loss [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(120));
    for row in &mut rows {
        path.lose(row.loss)?;
        let cell = Cell { file: file.to_owned(), size: plan.size, clients: 1, case: row.case, outcomes: BTreeMap::new() };
        let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| serves(*k, &row.case)).collect();
        let rounds = kinds.iter().map(|&k| runs_of(k, row.loss)).max().unwrap_or(1);
        // The servers take turns, run after run: a slow moment of the machine hits all.
        for round in 0..rounds {
            for &kind in kinds.iter().filter(|&&k| round < runs_of(k, row.loss)) {
                let runs = row.runs.entry(kind).or_insert_with(|| Ok(Vec::new()));
                let Ok(rates) = runs else { continue };
                bar.set_message(format!("{} ← {} at {}% loss", kind.name(), row.case.label(), row.loss));
                let limit = if row.loss == 0 { download_limit(&cell) } else { plan.limit };
                match measure(&servers[&kind], &cell, digest, &dirs.downloads, cpu, limit) {
                    Ok(rate) => rates.push(rate),
                    Err(error) => {
                        let why = if format!("{error:#}").contains("still running") {
                            format!("slower than {:.3} MB/s (no end within {} s)", mb(plan.size) / limit.as_secs_f64(), limit.as_secs())
                        } else {
                            format!("{error:#}")
                        };
                        bar.suspend(|| eprintln!("{} ← {} at {}% loss: {why}", kind.name(), row.case.label(), row.loss));
                        *runs = Err(why);
                    }
                }
                bar.inc(1);
            }
        }
        if row.loss > 0 {
            let dropped = path.dropped();
            bar.suspend(|| println!("{} at {}% loss: {dropped} datagrams dropped", row.case.label(), row.loss));
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// tftpd-hpa has no windowsize (RFC 7440).
fn serves(kind: Kind, case: &ClientCase) -> bool {
    case.windowsize == 1 || kind.has_windowsize()
}

fn print_table(rows: &[Row], size: usize, report: &mut Report) {
    use std::fmt::Write as _;

    report.line(format!("\n### Goodput over a lossy path (MB/s, one client, {} KiB file; median of the runs, stock servers once at 1%)\n", size >> 10));
    report.line("| client | loss | tftpd-hpa | atftpd | tftp-backend (min/median/max) | tftp-backend lossy / lossless | tftp-backend / tftpd-hpa |");
    report.line("|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let text = |kind: Kind| match row.runs.get(&kind) {
            None => "n/a".to_owned(),
            Some(Err(why)) if why.starts_with("slower than") => format!("< {}", why.trim_start_matches("slower than ").split(' ').next().unwrap_or("?")),
            Some(Err(_)) => "FAILED".to_owned(),
            Some(Ok(runs)) if kind == Kind::Backend && runs.len() > 1 => {
                let (min, median, max) = min_median_max(runs);
                format!("{min:.2} / **{median:.2}** / {max:.2}")
            }
            Some(Ok(_)) => format!("{:.3}", row.median(kind).unwrap_or(f64::NAN)),
        };
        let lossless = rows.iter().find(|r| r.loss == 0 && r.case.label() == row.case.label()).and_then(|r| r.median(Kind::Backend));
        let own = match (row.loss, row.median(Kind::Backend), lossless) {
            (0, _, _) => "-".to_owned(),
            (_, Some(lossy), Some(lossless)) => format!("{:.2}", lossy / lossless),
            _ => "-".to_owned(),
        };
        let hpa = match (row.median(Kind::Backend), hpa_bound(row)) {
            (Some(backend), Some((hpa, bound))) => format!("{}{}", if bound { "> " } else { "" }, ratio(backend / hpa)),
            _ => "-".to_owned(),
        };
        report.line(format!(
            "| {} | {}% | {} | {} | {} | {own} | {hpa} |",
            row.case.label(),
            row.loss,
            text(Kind::TftpdHpa),
            text(Kind::Atftpd),
            text(Kind::Backend)
        ));
    }
    report.line("\nTargets (issue 18), at 1% loss:");
    for row in rows.iter().filter(|r| r.loss > 0) {
        let lossless = rows.iter().find(|r| r.loss == 0 && r.case.label() == row.case.label()).and_then(|r| r.median(Kind::Backend));
        let own = row.median(Kind::Backend).zip(lossless).map(|(a, b)| a / b);
        let mut line = format!("- {}: tftp-backend keeps {} of its lossless goodput (target ≥ 0.5)", row.case.label(), own.map_or("?".into(), |r| format!("{r:.2}")));
        if row.case.windowsize == 1 {
            let hpa = row.median(Kind::Backend).zip(hpa_bound(row)).map(|(b, (h, bound))| format!("{}{}×", if bound { "> " } else { "" }, ratio(b / h)));
            let _ = write!(line, "; {} tftpd-hpa (target ≥ 20×)", hpa.unwrap_or_else(|| "?".into()));
        }
        report.line(line);
    }
}

/// A ratio with two decimals, or none from 10 up (lossy stock servers are hundreds of times
/// slower).
fn ratio(r: f64) -> String {
    if r < 10.0 { format!("{r:.2}") } else { format!("{r:.0}") }
}

/// tftpd-hpa's goodput in a row, or the bound it stayed under (true) when it ran out of time.
fn hpa_bound(row: &Row) -> Option<(f64, bool)> {
    match row.runs.get(&Kind::TftpdHpa)? {
        Ok(_) => Some((row.median(Kind::TftpdHpa)?, false)),
        Err(why) => why.strip_prefix("slower than ")?.split(' ').next()?.parse().ok().map(|bound| (bound, true)),
    }
}

/// Bars per client case at each loss rate, one per server, on a log scale (the lossy stock
/// servers are two to three orders of magnitude below the rest).
fn plot(rows: &[Row], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let root = BitMapBackend::new(png, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = rows.iter().flat_map(|r| Kind::ALL.map(|k| r.median(k))).flatten().fold(1.0, f64::max) * 2.0;
    #[expect(clippy::cast_precision_loss, reason = "a handful of rows")]
    let n = rows.len() as f64;
    let labels: Vec<String> = rows.iter().map(|r| format!("{} {}%", r.case.label(), r.loss)).collect();
    let formatter = |x: &f64| crate::plot::category(&labels, *x);
    let mut chart = ChartBuilder::on(&root)
        .caption("Goodput over a lossy path, MB/s (log scale; higher is better)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, (0.001..top).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() + 2)
        .x_label_formatter(&formatter)
        .y_desc("MB/s")
        .label_style(("sans-serif", 13))
        .draw()?;
    let colors = [RGBColor(120, 120, 120), RGBColor(230, 159, 0), RGBColor(0, 114, 178)];
    for (slot, (kind, color)) in Kind::ALL.iter().zip(colors).enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "three servers")]
        let offset = -0.39 + 0.26 * slot as f64;
        let bars = rows.iter().enumerate().filter_map(|(i, row)| {
            let rate = row.median(*kind)?;
            #[expect(clippy::cast_precision_loss, reason = "a handful of rows")]
            let x = i as f64 + offset;
            Some(Rectangle::new([(x, 0.001), (x + 0.24, rate)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(kind.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    crate::plot::draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}
