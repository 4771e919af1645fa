//! `cargo xtask demo`: the load balancer and three backends in network namespaces, concurrent
//! downloads with stock clients, and the serving backend of the first transfer killed halfway.
//! Live progress bars, failure events as they happen, and a table at the end.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use netns_tests::{
    Process,
    clients::Client,
    files::{make_file, sha256},
    topology::{LbTopology, VIP, client_addr},
    watch::{Growth, stall_after},
};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the file every client downloads, in MiB.
    #[arg(long, default_value_t = 32)]
    size_mib: usize,
    /// Number of concurrent downloads (clients alternate between atftp and curl).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Run without killing a backend.
    #[arg(long)]
    no_failure: bool,
}

struct Transfer {
    client: Client,
    local: PathBuf,
    process: Process,
    bar: ProgressBar,
    growth: Option<Growth>,
    started: Instant,
    finished: Option<Duration>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; the harness reads it when it locates binaries.
    unsafe { std::env::set_var("XDP_LB_BIN_DIR", crate::cargo::release_dir()?) };
    let size = args.size_mib * 1024 * 1024;
    println!("building the topology: {} client(s), 1 load balancer, 3 backends", args.clients.max(1));
    let topo = LbTopology::new(args.clients.max(1), 3).context("creating namespaces (root?)")?;
    let source = topo.root.join("boot.img");
    make_file(&source, size, 42)?;
    let mut backends: Vec<Option<Process>> = (0..3).map(|i| topo.start_backend(i).map(Some)).collect::<Result<_, _>>()?;
    let agent = topo.start_lb(&[])?;
    wait_live(&topo, 3)?;
    println!("load balancer up: VIP {VIP}, 3 live backends");

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>28} [{bar:40}] {bytes:>10}/{total_bytes} {bytes_per_sec:>12}")?
        .progress_chars("=> ");
    let mut transfers: Vec<Transfer> = (0..args.clients.max(1))
        .map(|i| {
            let client = if i % 2 == 0 { Client::Atftp { blksize: 1468, windowsize: 16 } } else { Client::Curl { blksize: 1468 } };
            let local = std::env::temp_dir().join(topo.prefix.name(&format!("demo{i}")));
            let command = client.download(&topo.clients[i], VIP, 69, "boot.img", &local);
            let process = Process::spawn(topo.prefix.name(&format!("demo-client{i}")), command)?;
            let bar = bars.add(ProgressBar::new(size as u64).with_style(style.clone()).with_prefix(client.name()));
            Ok(Transfer { client, growth: Some(Growth::watch(local.clone())), local, process, bar, started: Instant::now(), finished: None })
        })
        .collect::<anyhow::Result<_>>()?;

    let mut failure: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while transfers.iter().any(|t| t.finished.is_none()) {
        if Instant::now() > deadline {
            bail!("transfers did not finish within 5 minutes");
        }
        for t in &mut transfers {
            let len = std::fs::metadata(&t.local).map_or(0, |m| m.len());
            t.bar.set_position(len);
            if t.finished.is_none() && !t.process.is_running() {
                t.finished = Some(t.started.elapsed());
                t.bar.finish();
            }
        }
        let first = std::fs::metadata(&transfers[0].local).map_or(0, |m| m.len());
        if !args.no_failure
            && failure.is_none()
            && first >= (size / 2) as u64
            && let Some(id) = serving_backend(&topo)
        {
            if let Some(mut backend) = backends[id].take() {
                backend.kill_hard();
            }
            failure = Some(Instant::now());
            bars.println(format!(">>> killed backend {id} (SIGKILL) with the first transfer at 50%"))?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(bars);
    report(&mut transfers, &source, failure)?;
    println!("\nload balancer log (failover events):");
    for line in agent.log().lines().filter(|l| l.contains("dead") || l.contains("active set")) {
        println!("  {line}");
    }
    println!("cleaning up namespaces, processes and pinned maps");
    Ok(())
}

fn report(transfers: &mut [Transfer], source: &std::path::Path, failure: Option<Instant>) -> anyhow::Result<()> {
    let expected = sha256(source)?;
    println!("\n| client | size | time | goodput | stall after failure | SHA-256 |");
    println!("|---|---|---|---|---|---|");
    let mut all_ok = true;
    for t in transfers {
        let samples = t.growth.take().map(Growth::stop).unwrap_or_default();
        let ok = t.process.wait(Duration::from_secs(1)).is_some_and(|s| s.success()) && sha256(&t.local)? == expected;
        all_ok &= ok;
        let time = t.finished.unwrap_or_default();
        let size = std::fs::metadata(&t.local).map_or(0, |m| m.len());
        let stall = failure.map_or_else(|| "-".to_owned(), |at| format!("{} ms", stall_after(&samples, at).as_millis()));
        #[expect(clippy::cast_precision_loss, reason = "display only")]
        let (mib, goodput) = (size as f64 / 1_048_576.0, size as f64 / time.as_secs_f64().max(1e-9) / 1e6);
        println!(
            "| {} | {mib:.1} MiB | {:.2} s | {goodput:.1} MB/s | {stall} | {} |",
            t.client.name(),
            time.as_secs_f64(),
            if ok { "match" } else { "MISMATCH" }
        );
        let _ = std::fs::remove_file(&t.local);
    }
    if !all_ok {
        bail!("a transfer failed or differs from the source");
    }
    Ok(())
}

fn wait_live(topo: &LbTopology, n: usize) -> anyhow::Result<()> {
    netns_tests::wait_for("live backends", 20, || {
        let status = topo.status().ok()?;
        let live = status["balance"]["backends"].as_array()?.iter().filter(|b| b["state"] == "live").count();
        (live >= n).then_some(())
    })?;
    Ok(())
}

/// The backend serving the first client's session, from the LB's table.
fn serving_backend(topo: &LbTopology) -> Option<usize> {
    let status = topo.status().ok()?;
    let prefix = format!("{}:", client_addr(0));
    let session = status["balance"]["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["client"].as_str().is_some_and(|c| c.starts_with(&prefix)))?
        .clone();
    usize::try_from(session["backend"].as_u64()?).ok()
}
