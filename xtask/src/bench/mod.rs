//! `cargo xtask bench`: performance figures measured side by side in one run, printed as
//! markdown tables with ratios and saved under the results directory (`bench-<unix time>.json`,
//! `bench-<unix time>.md`, and a PNG per charted section). Sections (`--only` picks some):
//!
//! - `xdp`: cost per packet of each path through `balance` (BPF_PROG_TEST_RUN, `xdp-lb bench-xdp`);
//! - `control`: cost of the MAC (HMAC-SHA-256) per control message, sealing and opening,
//!   against the same messages without a key (`xdp-lb bench-control`);
//! - `lb`: goodput of 1 and 20 clients direct from a backend, through the kernel path a user
//!   would build today (nftables DNAT + the TFTP conntrack helper) and through xdp-lb
//!   ([`goodput`]);
//! - `backend`: tftp-backend against tftpd-hpa and atftpd on loopback ([`backend`]);
//! - `loss`: the same servers and clients with 1% of the datagrams lost each way
//!   ([`loss`]);
//! - `failover`: the active LB, then the serving backend, killed at 50% of a download through
//!   the full pair topology, stall and DATA sent twice over many runs ([`failover`]);
//! - `scaling`: 1 to 1000 concurrent small transfers through the LB, aggregate goodput and the
//!   memory of the LB agent and the backend ([`scaling`]);
//! - `storm`: a boot storm, 100 and 1000 clients started within a second, each fetching a
//!   kernel and an initrd, lock-step and windowsize 4, without and with 1% loss, from
//!   tftp-backend, tftpd-hpa, atftpd and dnsmasq alone and through xdp-lb: time to the last
//!   client, p50 / p99, failures, goodput, CPU per MB ([`storm`]; about an hour, `--quick` a
//!   few minutes).
//! - `upload`: upload goodput direct to a standalone tftp-backend, through xdp-lb without and
//!   with replication (`--peer`), lock-step and windowsize 16, and the stall after the serving
//!   backend is killed mid-upload ([`upload`]).
//! - `boot`: real boot firmware (iPXE, UEFI PXE + GRUB, PXELINUX, U-Boot) booting a QEMU
//!   machine through the full topology, without a failure and with the active LB or the
//!   serving backend killed during the kernel: boot completed, time to power-off, the kernel's
//!   transfer, the stall, TFTP errors on the machine's wire ([`boot`]; `--runs` boots per cell).
//!
//! Speed targets appear only here, as ratios from one run; tests never time anything.

mod backend;
mod boot;
mod failover;
mod goodput;
mod loss;
mod report;
mod scaling;
mod storm;
mod upload;

use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::cargo::release_dir;
use report::Report;

#[derive(clap::Args)]
#[command(after_help = "\
Sections: xdp (XDP cost per packet), control (MAC cost per control message, with vs without a \
key), lb (goodput direct / nftables DNAT + conntrack helper / \
xdp-lb, 1 and 20 clients), backend (tftp-backend vs tftpd-hpa vs atftpd), loss (the same at 0% \
and 1% loss each way: lock-step and windowsize 16), failover (active LB \
and serving backend killed at 50%, stall and DATA sent twice), scaling (1..1000 concurrent \
transfers, goodput and RSS), storm (boot storm: 100 and 1000 clients started within 1 s, each \
fetching a kernel then an initrd, lock-step and windowsize 4, 0% and 1% loss, from tftp-backend, \
tftpd-hpa, atftpd and dnsmasq alone and through xdp-lb; time to the last client, p50/p99, \
failures, goodput, CPU per MB; about an hour, --quick a few minutes), upload (upload goodput \
direct / through xdp-lb / through xdp-lb with replication, lock-step and windowsize 16, and the \
stall after the serving backend is killed mid-upload), boot (iPXE, UEFI PXE + GRUB, PXELINUX and \
U-Boot boot a QEMU machine with no failure, the active LB or the serving backend killed mid-kernel, \
the active LB killed at the kernel's request: boot completed, power-off time, kernel transfer, \
stall, TFTP errors on the wire; 16 boots of 10-40 s, --quick: iPXE, 2 scenarios).

Output: markdown tables on stdout; bench-<time>.json and bench-<time>.md (the same tables, \
machine and date) in --out, plus backend-<time>.{json,png}, loss-<time>.png, scaling-<time>.png, \
storm-<time>.{json,png}, upload-<time>.png and boot-<time>.png. Needs root \
(network namespaces, XDP). docs/BENCHMARKS.md explains each figure.")]
pub struct Args {
    /// Smaller files, fewer repeats (failover: 3 runs each instead of 20; scaling: up to 100
    /// transfers instead of 1000; storm: 20 and 100 clients, files of a few hundred KiB; boot: iPXE
    /// only, without a failure and with the active LB killed mid-kernel): a few minutes instead of
    /// the full run.
    #[arg(long)]
    quick: bool,
    /// Directory for the results (JSON, markdown, PNG).
    #[arg(long, default_value = "results")]
    out: std::path::PathBuf,
    /// Boots per firmware and scenario in section `boot` (min / median / max when more than one).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Run only these sections (comma-separated, e.g. `--only lb,scaling`); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    #[command(flatten)]
    storm: storm::Selection,
}

/// Sections of `cargo xtask bench`, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// XDP cost per packet of each path through `balance`.
    Xdp,
    /// Cost of the MAC per control message (seal and open, with vs without a key).
    Control,
    /// Goodput of 1 and 20 clients: direct, nftables DNAT + conntrack helper, xdp-lb.
    Lb,
    /// tftp-backend vs tftpd-hpa vs atftpd (loopback).
    Backend,
    /// The same servers at 0% and 1% loss each way: goodput kept under loss.
    Loss,
    /// Stall and DATA sent twice when the active LB, then the serving backend, is killed.
    Failover,
    /// 1, 10, 100, 1000 concurrent transfers: aggregate goodput, RSS of LB agent and backend.
    Scaling,
    /// Boot storm: 100 and 1000 clients fetching a kernel and an initrd, five servers.
    Storm,
    /// Upload goodput direct / through xdp-lb / with replication, and the stall after a backend kill.
    Upload,
    /// Boot firmware through the topology: boot completed, times, stall, TFTP errors on the wire.
    Boot,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; the harness reads it when it locates binaries.
    unsafe { std::env::set_var("XDP_LB_BIN_DIR", release_dir()?) };
    let section = |s: Section| args.only.is_empty() || args.only.contains(&s);
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let machine = machine();
    let mut report = Report::default();
    report.line(format!(
        "## xdp-lb benchmarks{}\n\nMachine: {} CPUs ({}), {} GiB RAM, Linux {}; date {} (unix {stamp}).",
        if args.quick { " (--quick)" } else { "" },
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["mem_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        date(),
    ));
    // A section that fails is reported and the others still run: a long run keeps its figures.
    let mut failed = Vec::new();
    let mut run_section = |name: Section, report: &mut Report, body: &mut dyn FnMut(&mut Report) -> anyhow::Result<serde_json::Value>| {
        if !section(name) {
            return serde_json::Value::Null;
        }
        body(report).unwrap_or_else(|error| {
            let label = clap::ValueEnum::to_possible_value(&name).map_or_else(String::new, |v| v.get_name().to_owned());
            report.line(format!("\n### Section `{label}` failed\n\n{error:#}"));
            failed.push(label);
            json!({ "failed": format!("{error:#}") })
        })
    };
    let xdp = run_section(Section::Xdp, &mut report, &mut |report| Ok(json!(xdp_costs(if args.quick { 200_000 } else { 2_000_000 }, report)?)));
    let control = run_section(Section::Control, &mut report, &mut |report| control_costs(if args.quick { 20_000 } else { 200_000 }, report));
    let goodput = run_section(Section::Lb, &mut report, &mut |report| goodput::run(args.quick, report));
    let backend = run_section(Section::Backend, &mut report, &mut |report| {
        let backend = backend::run(args.quick, &args.out)?;
        report.line("\n### TFTP servers on loopback\n");
        report.line(format!(
            "Table on stdout (not repeated here); figures in backend-{}.json, chart {}.",
            backend["unix_time"],
            backend["chart"].as_str().unwrap_or("(none)")
        ));
        Ok(backend)
    });
    let loss = run_section(Section::Loss, &mut report, &mut |report| loss::run(args.quick, &args.out, report));
    let failover = run_section(Section::Failover, &mut report, &mut |report| failover::run(args.quick, report));
    let scaling = run_section(Section::Scaling, &mut report, &mut |report| {
        scaling::run(args.quick, &args.out.join(format!("scaling-{stamp}.png")), report)
    });
    let storm = run_section(Section::Storm, &mut report, &mut |report| storm::run(args.quick, &args.storm, &args.out, stamp, report));
    let upload = run_section(Section::Upload, &mut report, &mut |report| upload::run(args.quick, &args.out, report));
    let boot = run_section(Section::Boot, &mut report, &mut |report| boot::run(args.quick, args.runs, &args.out, stamp, report));
    let path = args.out.join(format!("bench-{stamp}.json"));
    let results = json!({
        "unix_time": stamp, "quick": args.quick, "machine": machine,
        "xdp_ns_per_packet": xdp, "control_mac": control, "goodput": goodput, "backend": backend, "loss": loss, "failover": failover, "scaling": scaling,
        "storm": storm, "upload": upload, "boot": boot,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    let markdown = args.out.join(format!("bench-{stamp}.md"));
    std::fs::write(&markdown, &report.markdown)?;
    println!("\nresults saved to {} and {}", path.display(), markdown.display());
    if !failed.is_empty() {
        bail!("section(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// CPUs, CPU model, memory and kernel of this machine, for the record.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).and_then(|l| l.split_once(':')).map_or("unknown", |(_, m)| m.trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu": cpu,
        "mem_gib": mem_kib.div_ceil(1 << 20),
        "kernel": kernel.trim(),
    })
}

/// Today's date (UTC) as `date` prints it, for the report.
fn date() -> String {
    Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().map_or_else(|_| "?".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Mean ns per packet per path, with the ratio to Katran's published ~119 ns for its XDP path.
fn xdp_costs(repeat: u32, report: &mut Report) -> anyhow::Result<Vec<serde_json::Value>> {
    let output = Command::new(release_dir()?.join("xdp-lb"))
        .args(["bench-xdp", "--repeat", &repeat.to_string()])
        .output()
        .context("run xdp-lb bench-xdp")?;
    if !output.status.success() {
        bail!("xdp-lb bench-xdp failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let rows: Vec<serde_json::Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    report.line(format!("\n### XDP cost per packet (BPF_PROG_TEST_RUN, {repeat} runs per path)\n"));
    report.line("| path | ns/packet | vs Katran's 119 ns |");
    report.line("|---|---:|---:|");
    for row in &rows {
        let ns = row["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
        report.line(format!("| {} | {ns:.0} | {:.2} |", row["path"].as_str().unwrap_or("?"), ns / 119.0));
    }
    Ok(rows)
}

/// Mean ns to seal and to open one datagram of each control message, without a key and with
/// HMAC-SHA-256, and their ratio.
fn control_costs(repeat: u32, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(release_dir()?.join("xdp-lb"))
        .args(["bench-control", "--repeat", &repeat.to_string()])
        .output()
        .context("run xdp-lb bench-control")?;
    if !output.status.success() {
        bail!("xdp-lb bench-control failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let rows: Vec<serde_json::Value> = String::from_utf8(output.stdout)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    report.line(format!("\n### Control messages: cost of the MAC ({repeat} runs each)\n"));
    report.line("| message | bytes | seal, no key (ns) | seal, HMAC (ns) | ratio | open, no key (ns) | open, HMAC (ns) | ratio |");
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let ns = |field: &str| row[field].as_f64().unwrap_or(f64::NAN);
        let (seal, seal_mac, open, open_mac) = (ns("seal_plain_ns"), ns("seal_mac_ns"), ns("open_plain_ns"), ns("open_mac_ns"));
        report.line(format!(
            "| {} | {} | {seal:.0} | {seal_mac:.0} | {:.1} | {open:.0} | {open_mac:.0} | {:.1} |",
            row["message"].as_str().unwrap_or("?"),
            row["bytes"],
            seal_mac / seal,
            open_mac / open,
        ));
    }
    Ok(json!(rows))
}
