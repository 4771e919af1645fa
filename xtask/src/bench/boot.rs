//! `--only boot`: real boot firmware through the full topology (issue 16's figures). Each
//! firmware of the boot suite (iPXE, UEFI PXE + GRUB, PXELINUX, U-Boot on arm64) boots a QEMU
//! machine (TCG) through a fresh cluster (switch, LB pair, three steered backends) in each
//! scenario: no failure, the active LB killed at half of the kernel, the serving backend killed
//! there, the active LB killed at the kernel's request (before its first answer). The boot and
//! the kill are the suite's own ([`boot_through`]); the machine's traffic is dumped to a pcap
//! and read back ([`Capture`]).
//!
//! Per boot: whether it completed (`/init` ran and printed the payload's digest), the time from
//! power-on to power-off, the kernel's transfer (first to last DATA the machine received), the
//! stall after the failure (the balancers delivered nothing: [`boot_through`]'s 3 s window),
//! the longest the machine waited for the server during the kernel (from the pcap), the TFTP
//! ERRORs on its wire by sender and code (EDK2's probe abort, ERROR 8 from the client, is the
//! only one expected), and U-Boot's own timeouts.

use std::{
    collections::BTreeMap,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use netns_tests::{
    boot::{Failure, Firmware, boot_through, booted, make_boot_files, uboot_timeouts},
    capture::Capture,
    cluster::{Agents, Cluster},
    pair_topology::{PairTopology, VIP},
};
use serde_json::json;

use super::report::{Report, min_median_max};

const FIRMWARE: [Firmware; 4] = [Firmware::Ipxe, Firmware::UefiGrub, Firmware::Pxelinux, Firmware::UBoot];
/// The payload inside the initramfs, as in the boot suite.
const PAYLOAD_BYTES: usize = 2 << 20;

fn firmware_name(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::Ipxe => "iPXE",
        Firmware::UefiGrub => "UEFI PXE (EDK2) + GRUB",
        Firmware::Pxelinux => "PXELINUX (started by iPXE)",
        Firmware::UBoot => "U-Boot (arm64)",
    }
}

fn firmware_key(firmware: Firmware) -> &'static str {
    match firmware {
        Firmware::Ipxe => "ipxe",
        Firmware::UefiGrub => "uefi_grub",
        Firmware::Pxelinux => "pxelinux",
        Firmware::UBoot => "uboot",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    NoFailure,
    LbMidKernel,
    BackendMidKernel,
    LbAtKernelRequest,
    LbDeadAtFirstRequest,
}

const SCENARIOS: [Scenario; 5] = [Scenario::NoFailure, Scenario::LbMidKernel, Scenario::BackendMidKernel, Scenario::LbAtKernelRequest, Scenario::LbDeadAtFirstRequest];

impl Scenario {
    const fn label(self) -> &'static str {
        match self {
            Self::NoFailure => "no failure",
            Self::LbMidKernel => "active LB killed mid-kernel",
            Self::BackendMidKernel => "serving backend killed mid-kernel",
            Self::LbAtKernelRequest => "active LB killed at the kernel's request",
            Self::LbDeadAtFirstRequest => "active LB dead at the first request, no verdict yet",
        }
    }

    const fn key(self) -> &'static str {
        match self {
            Self::NoFailure => "none",
            Self::LbMidKernel => "lb_mid_kernel",
            Self::BackendMidKernel => "backend_mid_kernel",
            Self::LbAtKernelRequest => "lb_at_kernel_request",
            Self::LbDeadAtFirstRequest => "lb_dead_at_first_request",
        }
    }

    fn failure(self, firmware: Firmware) -> Failure {
        let file = firmware.kernel();
        match self {
            Self::NoFailure => Failure::None,
            Self::LbMidKernel => Failure::ActiveBalancer { file, share: 0.5 },
            Self::BackendMidKernel => Failure::ServingBackend { file, share: 0.5 },
            Self::LbAtKernelRequest => Failure::ActiveBalancer { file, share: 0.0 },
            Self::LbDeadAtFirstRequest => Failure::BalancerDeadAtFirstRequest,
        }
    }
}

/// One boot's figures; `None` where it could not be measured (no pcap, no failure, no boot).
#[derive(Clone, Debug, Default)]
struct Figures {
    booted: bool,
    /// Why it did not boot, in one line.
    why: Option<String>,
    powered_off_s: Option<f64>,
    kernel_s: Option<f64>,
    kernel_longest_wait_ms: Option<f64>,
    stall_ms: Option<f64>,
    /// ERROR packets by sender, code and file.
    errors: BTreeMap<ErrorKey, usize>,
    uboot_timeouts: Option<usize>,
}

/// An ERROR by (sent by the machine, code, the file its transfer had asked for).
type ErrorKey = (bool, u16, String);

/// The ERRORs a firmware's boot may show: EDK2 aborts its size probe of a file (ERROR 8 from
/// the client); GRUB looks for `grub.cfg-<MAC>` and `grub.cfg-<address in hex, shorter and
/// shorter>` before `grub.cfg`, and for its module lists (`x86_64-efi/*.lst`: the image has its
/// modules built in), and PXELINUX for its configuration by UUID, MAC and address prefixes
/// before `pxelinux.cfg/default` (ERROR 1, file not found, for each name tried).
fn expected_error(firmware: Firmware, (from_client, code, file): &ErrorKey) -> bool {
    let module_list = || file.starts_with("x86_64-efi/") && Path::new(file).extension().is_some_and(|e| e == "lst");
    match firmware {
        Firmware::UefiGrub => (*from_client && *code == 8) || (!*from_client && *code == 1 && (file.starts_with("grub.cfg-") || module_list())),
        Firmware::Pxelinux => !*from_client && *code == 1 && file.starts_with("pxelinux.cfg/") && file != "pxelinux.cfg/default",
        Firmware::Ipxe | Firmware::UBoot => false,
    }
}

/// The errors as "server ERROR 1 ×9 (pxelinux.cfg/01-52-54-00-4c-42-01, ... 9 files)";
/// "none" when there were none.
fn errors_text(errors: &BTreeMap<ErrorKey, usize>) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    let mut by_code: BTreeMap<(bool, u16), (usize, Vec<&str>)> = BTreeMap::new();
    for ((from_client, code, file), n) in errors {
        let entry = by_code.entry((*from_client, *code)).or_default();
        entry.0 += n;
        entry.1.push(file);
    }
    by_code
        .iter()
        .map(|(&(from_client, code), (n, files))| {
            let files = match files.as_slice() {
                [one] => (*one).to_owned(),
                [first, ..] => format!("{first}, ... {} files", files.len()),
                [] => String::new(),
            };
            format!("{} ERROR {code} ×{n} ({files})", if from_client { "client" } else { "server" })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Values as "v" for one run, "min / median / max" for more; "-" for none.
fn spread(values: &[f64], decimals: usize) -> String {
    match values {
        [] => "-".to_owned(),
        [one] => format!("{one:.decimals$}"),
        _ => {
            let (min, median, max) = min_median_max(values);
            format!("{min:.decimals$} / {median:.decimals$} / {max:.decimals$}")
        }
    }
}

fn median(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| min_median_max(values).1)
}

/// `value / base` of the medians, "-" without both.
fn ratio(value: &[f64], base: &[f64]) -> String {
    median(value).zip(median(base)).filter(|(_, b)| *b > 0.0).map_or_else(|| "-".to_owned(), |(v, b)| format!("{:.2}", v / b))
}

/// The figures of one boot through a fresh cluster, its traffic dumped to `pcap` (removed
/// afterwards). An error here is the harness's (no topology); a boot that fails is a figure.
fn boot_once(firmware: Firmware, scenario: Scenario, pcap: &Path) -> anyhow::Result<Figures> {
    let topo = PairTopology::new(1, 3).context("creating namespaces (root?)")?;
    let mut cluster = Cluster::try_start_on(topo, &Agents::default())?;
    let files = make_boot_files(&cluster.topo.root, PAYLOAD_BYTES, 77)?;
    // The harness's failure injection asserts like a test: a panic there is this boot's failure.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot_through(&mut cluster, firmware, scenario.failure(firmware), Some(pcap))))
        .map_err(|panic| panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "(panic)".to_owned()))
        .and_then(|run| run.map_err(|e| e.to_string()));
    let capture = Capture::read(pcap, VIP.parse()?);
    let _ = std::fs::remove_file(pcap);
    let mut figures = Figures::default();
    if let Ok(capture) = &capture {
        figures.errors = capture.errors();
        if let Some(kernel) = capture.transfer(firmware.kernel()) {
            figures.kernel_s = Some(kernel.duration().as_secs_f64());
            figures.kernel_longest_wait_ms = Some(kernel.longest_gap.as_secs_f64() * 1e3);
        }
    }
    match run {
        Ok(run) => {
            let (ran, digest) = booted(&run.console);
            figures.booted = ran && digest.as_deref() == Some(files.payload_sha256.as_str());
            if !figures.booted {
                figures.why = Some(if ran { "the payload's digest differs".to_owned() } else { "/init did not run".to_owned() });
            }
            figures.powered_off_s = Some(run.powered_off_after.as_secs_f64());
            figures.stall_ms = run.stall.map(|s| s.as_secs_f64() * 1e3);
            if firmware == Firmware::UBoot {
                figures.uboot_timeouts = Some(uboot_timeouts(&run.console).iter().map(|(_, n)| n).sum());
            }
        }
        Err(why) => figures.why = Some(why.lines().next().unwrap_or_default().to_owned()),
    }
    if let Err(error) = capture
        && figures.why.is_none()
    {
        figures.why = Some(format!("no capture: {error}"));
    }
    Ok(figures)
}

/// Every firmware in every scenario, `runs` boots each (`--quick`: iPXE without and with the
/// active LB killed mid-kernel).
pub fn run(quick: bool, runs: usize, out: &Path, stamp: u64, report: &mut Report) -> anyhow::Result<serde_json::Value> {
    let firmwares: &[Firmware] = if quick { &FIRMWARE[..1] } else { &FIRMWARE };
    let scenarios: &[Scenario] = if quick { &SCENARIOS[..2] } else { &SCENARIOS };
    let runs = runs.max(1);
    let captures = std::env::temp_dir().join(netns_tests::RunPrefix::new().name("boot-bench"));
    std::fs::create_dir_all(&captures)?;
    let total = firmwares.len() * scenarios.len() * runs;
    let bar = ProgressBar::new(total as u64).with_style(ProgressStyle::with_template("{spinner} boot [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(120));
    // figures[firmware][scenario][run]
    let mut figures: Vec<Vec<Vec<Figures>>> = Vec::new();
    for &firmware in firmwares {
        let mut per_scenario = Vec::new();
        for &scenario in scenarios {
            let mut boots = Vec::new();
            for run in 0..runs {
                bar.set_message(format!("{}, {}, run {}", firmware_name(firmware), scenario.label(), run + 1));
                let pcap = captures.join(format!("{}-{}-{run}.pcap", firmware_key(firmware), scenario.key()));
                boots.push(boot_once(firmware, scenario, &pcap)?);
                bar.inc(1);
            }
            per_scenario.push(boots);
        }
        figures.push(per_scenario);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&captures);

    let rows = report_tables(firmwares, scenarios, &figures, runs, report);
    let png = out.join(format!("boot-{stamp}.png"));
    let chart = match plot(firmwares, scenarios, &figures, &png) {
        Ok(()) => Some(png.display().to_string()),
        Err(error) => {
            eprintln!("boot chart: {error:#}");
            None
        }
    };
    report.line(format!("\nChart: {}", chart.as_deref().unwrap_or("(none)")));
    Ok(json!({ "runs": runs, "payload_bytes": PAYLOAD_BYTES, "chart": chart, "rows": rows }))
}

/// A value of each run where it was measured.
fn values(boots: &[Figures], field: impl Fn(&Figures) -> Option<f64>) -> Vec<f64> {
    boots.iter().filter_map(field).collect()
}

fn report_tables(firmwares: &[Firmware], scenarios: &[Scenario], figures: &[Vec<Vec<Figures>>], runs: usize, report: &mut Report) -> Vec<serde_json::Value> {
    let how = if runs > 1 { format!("min / median / max of {runs} runs") } else { "one run".to_owned() };
    let mut rows = Vec::new();
    for (&firmware, per_scenario) in firmwares.iter().zip(figures) {
        report.line(format!(
            "\n### Boot: {} through the switch, the LB pair and 3 backends ({how}; kernel {}, blksize {})\n",
            firmware_name(firmware),
            firmware.kernel(),
            firmware.kernel_blksize()
        ));
        let uboot = firmware == Firmware::UBoot;
        report.line(format!(
            "| scenario | booted | power-on to power-off (s) | vs no failure | kernel transfer (s) | vs no failure | stall after the failure (ms) | longest wait in the kernel (ms) | TFTP errors on the wire |{}",
            if uboot { " U-Boot timeouts |" } else { "" }
        ));
        report.line(format!("|---|---:|---:|---:|---:|---:|---:|---:|---|{}", if uboot { "---:|" } else { "" }));
        let base_off = values(&per_scenario[0], |f| f.powered_off_s);
        let base_kernel = values(&per_scenario[0], |f| f.kernel_s);
        for (&scenario, boots) in scenarios.iter().zip(per_scenario) {
            let off = values(boots, |f| f.powered_off_s);
            let kernel = values(boots, |f| f.kernel_s);
            let wait = values(boots, |f| f.kernel_longest_wait_ms);
            let stall = values(boots, |f| f.stall_ms);
            let booted = boots.iter().filter(|f| f.booted).count();
            let mut errors: BTreeMap<ErrorKey, usize> = BTreeMap::new();
            for boot in boots {
                for (key, &n) in &boot.errors {
                    *errors.entry(key.clone()).or_default() += n;
                }
            }
            let unexpected = errors.keys().any(|key| !expected_error(firmware, key));
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            let timeouts: Vec<f64> = boots.iter().filter_map(|f| f.uboot_timeouts).map(|n| n as f64).collect();
            let window = |ms: &[f64]| if ms.iter().any(|&m| m >= 3000.0) { format!("{} (≥ 3000: no reply within the window)", spread(ms, 0)) } else { spread(ms, 0) };
            let is_base = scenario == Scenario::NoFailure;
            report.line(format!(
                "| {} | {}{booted}/{} | {} | {} | {} | {} | {} | {} | {}{} |{}",
                scenario.label(),
                if booted == boots.len() { "" } else { "✗ " },
                boots.len(),
                spread(&off, 1),
                ratio(&off, &base_off),
                spread(&kernel, 2),
                ratio(&kernel, &base_kernel),
                if is_base { "-".to_owned() } else { window(&stall) },
                spread(&wait, 0),
                errors_text(&errors),
                if unexpected { " ✗" } else { "" },
                if uboot { format!(" {} |", spread(&timeouts, 0)) } else { String::new() },
            ));
            for why in boots.iter().filter_map(|f| f.why.as_deref()) {
                report.line(format!("|  ↳ {} | | | | | | | | |{}", why.replace('|', "/"), if uboot { " |" } else { "" }));
            }
            rows.push(json!({
                "firmware": firmware_key(firmware), "scenario": scenario.key(),
                "booted": booted, "runs": boots.len(),
                "powered_off_s": off, "powered_off_vs_no_failure": median(&off).zip(median(&base_off)).map(|(v, b)| v / b),
                "kernel_transfer_s": kernel, "kernel_transfer_vs_no_failure": median(&kernel).zip(median(&base_kernel)).map(|(v, b)| v / b),
                "stall_ms": stall, "kernel_longest_wait_ms": wait,
                "tftp_errors": errors.iter().map(|(key, n)| json!({ "from": if key.0 { "client" } else { "server" }, "code": key.1, "file": key.2, "count": n, "expected": expected_error(firmware, key) })).collect::<Vec<_>>(),
                "unexpected_errors": unexpected,
                "uboot_timeouts": timeouts,
                "failures": boots.iter().filter_map(|f| f.why.clone()).collect::<Vec<_>>(),
            }));
        }
    }
    report.line(
        "\nBooted: `/init` ran and printed the payload's digest. Kernel transfer: first to last DATA of the kernel the machine \
         received (its pcap). Stall: the longest time the balancers delivered no reply in the 3 s after the kill. Longest wait: \
         the longest the machine heard nothing from the server for the kernel, from its request to its last DATA (pcap). \
         TFTP errors: ERROR packets on the machine's wire by sender and code, with the files they answered; EDK2's ERROR 8 \
         (its tsize probe aborted) and the ERROR 1 (not found) for the configuration names GRUB tries before grub.cfg (and \
         its module lists) and PXELINUX before pxelinux.cfg/default are expected, any other is marked ✗.",
    );
    rows
}

/// Which figure a chart's panel shows.
type Field = fn(&Figures) -> Option<f64>;

/// Bars per firmware, one per scenario: the kernel's transfer time (s) on the left, the longest
/// wait in it (ms) on the right.
fn plot(firmwares: &[Firmware], scenarios: &[Scenario], figures: &[Vec<Vec<Figures>>], png: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;

    crate::plot::register_font()?;
    let root = BitMapBackend::new(png, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let labels: Vec<String> = firmwares.iter().map(|&f| firmware_name(f).split(" (").next().unwrap_or_default().to_owned()).collect();
    let colors = [RGBColor(120, 120, 120), RGBColor(230, 159, 0), RGBColor(0, 114, 178), RGBColor(0, 158, 115)];
    let panels: [(_, &str, &str, Field); 2] = [
        (&left, "Kernel transfer, s (lower is better)", "s", |f| f.kernel_s),
        (&right, "Longest wait in the kernel's download, ms", "ms", |f| f.kernel_longest_wait_ms),
    ];
    #[expect(clippy::cast_precision_loss, reason = "a handful of firmware")]
    let x_max = firmwares.len() as f64 - 0.5;
    for (area, caption, unit, field) in panels {
        let top = figures.iter().flatten().filter_map(|boots| median(&values(boots, field))).fold(1e-3, f64::max) * 1.25;
        let formatter = |x: &f64| crate::plot::category(&labels, *x);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..x_max, 0.0..top)?;
        chart.configure_mesh().disable_x_mesh().x_labels(firmwares.len() * 2 + 1).x_label_formatter(&formatter).y_desc(unit).label_style(("sans-serif", 13)).draw()?;
        for (slot, (&scenario, color)) in scenarios.iter().zip(colors).enumerate() {
            let medians = figures.iter().enumerate().filter_map(|(i, per_scenario)| Some((i, median(&values(&per_scenario[slot], field))?)));
            crate::plot::bar_series(&mut chart, (slot, scenarios.len()), medians, scenario.label(), color)?;
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
    fn only_edk2s_probe_abort_and_pxelinuxs_configuration_search_are_expected_errors() {
        let error = |from_client: bool, code: u16, file: &str| (from_client, code, file.to_owned());
        assert!(expected_error(Firmware::UefiGrub, &error(true, 8, "grubx64.efi")), "EDK2 aborts its tsize probe with ERROR 8");
        assert!(!expected_error(Firmware::UefiGrub, &error(false, 8, "grubx64.efi")), "from the server it is not the probe's");
        assert!(!expected_error(Firmware::Ipxe, &error(true, 8, "vmlinuz")));
        assert!(!expected_error(Firmware::UBoot, &error(false, 0, "vmlinuz-arm64")));
        assert!(expected_error(Firmware::UefiGrub, &error(false, 1, "grub.cfg-01-52-54-00-4c-42-01")), "GRUB's configuration search");
        assert!(!expected_error(Firmware::UefiGrub, &error(false, 1, "grub.cfg")), "the one GRUB configuration that exists");
        assert!(expected_error(Firmware::UefiGrub, &error(false, 1, "x86_64-efi/command.lst")), "GRUB's module lists");
        assert!(!expected_error(Firmware::UefiGrub, &error(false, 1, "vmlinuz")));
        assert!(expected_error(Firmware::Pxelinux, &error(false, 1, "pxelinux.cfg/0A4E0064")), "a configuration name tried");
        assert!(!expected_error(Firmware::Pxelinux, &error(false, 1, "pxelinux.cfg/default")), "the one configuration that exists");
        assert!(!expected_error(Firmware::Pxelinux, &error(false, 1, "vmlinuz")));
        let errors = BTreeMap::from([(error(true, 8, "grubx64.efi"), 2), (error(false, 1, "pxelinux.cfg/0A"), 1), (error(false, 1, "pxelinux.cfg/0A4"), 1)]);
        assert_eq!(errors_text(&errors), "server ERROR 1 ×2 (pxelinux.cfg/0A, ... 2 files), client ERROR 8 ×2 (grubx64.efi)");
        assert_eq!(errors_text(&BTreeMap::new()), "none");
    }

    #[test]
    fn one_run_shows_its_value_more_show_their_spread_and_ratios_compare_medians() {
        assert_eq!(spread(&[], 1), "-");
        assert_eq!(spread(&[12.345], 1), "12.3");
        assert_eq!(spread(&[3.0, 1.0, 2.0], 0), "1 / 2 / 3");
        assert_eq!(ratio(&[30.0, 10.0, 20.0], &[10.0]), "2.00");
        assert_eq!(ratio(&[1.0], &[]), "-");
    }

    #[test]
    fn every_failure_is_timed_by_the_firmwares_own_kernel() {
        assert_eq!(Scenario::NoFailure.failure(Firmware::Ipxe), Failure::None);
        assert_eq!(Scenario::LbMidKernel.failure(Firmware::UBoot), Failure::ActiveBalancer { file: "vmlinuz-arm64", share: 0.5 });
        assert_eq!(Scenario::BackendMidKernel.failure(Firmware::Pxelinux), Failure::ServingBackend { file: "vmlinuz", share: 0.5 });
        assert_eq!(Scenario::LbAtKernelRequest.failure(Firmware::UefiGrub), Failure::ActiveBalancer { file: "vmlinuz", share: 0.0 });
    }
}
