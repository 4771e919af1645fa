//! `cargo xtask demo --pxe`: a QEMU machine network-boots Linux through the full topology while
//! the active load balancer, then the backend serving the kernel, are killed during the kernel's
//! download. Shows each event as it happens, the firmware's console lines, and a timeline.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netns_tests::{
    boot::{BOOT_TIMEOUT, Firmware, Machine, booted, make_boot_files, milestones, next_reply_after, progress, start_dhcp},
    cluster::{Agents, Cluster},
    pair_topology::{PairTopology, SWITCH_CLIENT_SIDE, VIP, backend_addr, lb_addr},
};

/// As many backends as the main demo: one to kill, two to carry on.
const BACKENDS: usize = 3;

/// A failure to inject, at a percentage of the kernel's download.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kill {
    ActiveLb,
    ServingBackend,
}

impl Kill {
    const fn label(self) -> &'static str {
        match self {
            Self::ActiveLb => "active LB",
            Self::ServingBackend => "serving backend",
        }
    }
}

/// What `--firmware` can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BootFirmware {
    /// SeaBIOS and iPXE (a script, then kernel and initramfs with iPXE's TFTP).
    Ipxe,
    /// OVMF (EDK2's UEFI PXE fetches GRUB, GRUB fetches kernel and initramfs).
    Uefi,
    /// SeaBIOS and iPXE start PXELINUX, whose own TFTP fetches kernel and initramfs.
    Pxelinux,
    /// U-Boot on an arm64 machine: a script, whose `tftpboot` fetches the arm64 kernel and
    /// initramfs, checks their CRC-32 and boots them.
    Uboot,
}

impl BootFirmware {
    const fn firmware(self) -> Firmware {
        match self {
            Self::Ipxe => Firmware::Ipxe,
            Self::Uefi => Firmware::UefiGrub,
            Self::Pxelinux => Firmware::Pxelinux,
            Self::Uboot => Firmware::UBoot,
        }
    }
}

/// One line of the timeline: when (since the machine was powered on) and what.
struct Event {
    at: Duration,
    text: String,
}

/// Boots one machine with `firmware`, killing what `kills` names when the kernel's download
/// reaches each percentage; stops early when `interrupted` is set (Ctrl-C).
pub fn run(firmware: BootFirmware, kills: &[(Kill, u8)], interrupted: &AtomicBool) -> anyhow::Result<()> {
    let begun = Instant::now();
    let firmware = firmware.firmware();
    // The file whose download the failures are timed by.
    let kernel = firmware.kernel();
    let mut planned = kills.to_vec();
    planned.sort_by_key(|&(_, at)| at);
    let plan: Vec<String> = planned.iter().map(|(kill, at)| format!("{} at {at}%", kill.label())).collect();
    println!("=== PXE boot ({firmware:?}) through the switch, 2 LBs and {BACKENDS} backends; kills planned: {} of {kernel}", plan.join(", "));
    let topo = PairTopology::new(1, BACKENDS).context("creating namespaces (are you root?)")?;
    let mut cluster = Cluster::try_start_on(topo, &Agents::default())?;
    let files = make_boot_files(&cluster.topo.root, 2 << 20, 77)?;
    let kernel_bytes = std::fs::metadata(cluster.topo.root.join(kernel))?.len();
    let dhcp = start_dhcp(&cluster.topo.switch, &cluster.topo.prefix.name("dhcp"), "eth0", ("10.78.0.100", "10.78.0.149"), SWITCH_CLIENT_SIDE, firmware.boot_file())?;
    println!("    ready in {:.1} s: VIP {VIP}, LB {} active; dnsmasq offers {} as the boot file", begun.elapsed().as_secs_f64(), lb_addr(0), firmware.boot_file());
    let mut machine = Machine::start(cluster.topo.bridges(), "br0", &cluster.topo.prefix, "m0", firmware, "52:54:00:4c:42:01")?;
    let mut events = vec![Event { at: Duration::ZERO, text: "machine powered on".to_owned() }];
    let say = |events: &mut Vec<Event>, at: Duration, text: String| {
        println!("  [+{:6.3} s] {text}", at.as_secs_f64());
        events.push(Event { at, text });
    };
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut first_seen = false;
    for &(fail, percent) in &planned {
        let share = f64::from(percent) / 100.0;
        let (active, serving, blksize) = loop {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted; cleaning up");
            }
            if let Some(found) = progress(&cluster, kernel, kernel_bytes, share) {
                break found;
            }
            if !first_seen && progress(&cluster, kernel, kernel_bytes, 0.0).is_some() {
                first_seen = true;
                say(&mut events, machine.started.elapsed(), format!("the firmware requests {kernel} ({} MiB) through the VIP", kernel_bytes >> 20));
            }
            if Instant::now() > deadline || !machine.qemu.is_running() {
                bail!("{kernel} never reached {percent}%\n{}\n{}", machine.qemu.log(), cluster.logs());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let killed = Instant::now();
        let what = match fail {
            Kill::ActiveLb => {
                cluster.kill_lb(active);
                format!("killed the ACTIVE LB {} (SIGKILL of its agent, link down)", lb_addr(active))
            }
            Kill::ServingBackend => {
                cluster.kill_backend(serving);
                format!("killed the SERVING backend {} (SIGKILL)", backend_addr(serving))
            }
        };
        say(&mut events, machine.started.elapsed(), format!("{what} at {percent}% of {kernel} (blksize {blksize})"));
        match next_reply_after(&cluster, killed, Duration::from_secs(10)) {
            Some(stall) => say(&mut events, machine.started.elapsed(), format!("data flows again, {} ms after the kill", stall.as_millis())),
            None => say(&mut events, machine.started.elapsed(), "no data for 10 s after the kill".to_owned()),
        }
    }
    let console = machine.wait(BOOT_TIMEOUT.saturating_sub(machine.started.elapsed())).map_err(|e| anyhow::anyhow!("{e}\n--- dhcp\n{}\n{}", dhcp.log(), cluster.logs()))?;
    let (ran, digest) = booted(&console);
    let intact = digest.as_deref() == Some(files.payload_sha256.as_str());
    say(&mut events, machine.started.elapsed(), format!("powered off: /init ran {ran}, payload digest {}", if intact { "matches" } else { "DIFFERS" }));
    println!("\n    console:");
    for line in milestones(&console) {
        println!("      {line}");
    }
    println!("\n{}", timeline(&events));
    println!("demo took {:.1} s; namespaces, processes and pinned maps removed", begun.elapsed().as_secs_f64());
    if !(ran && intact) {
        bail!("the machine did not boot with the right initramfs; console:\n{console}");
    }
    Ok(())
}

/// The events as a markdown table, with the time since the previous one.
fn timeline(events: &[Event]) -> String {
    let mut table = String::from("| at | since the previous | event |\n|---:|---:|---|\n");
    let mut previous = Duration::ZERO;
    for event in events {
        let _ = writeln!(table, "| {:.3} s | {} ms | {} |", event.at.as_secs_f64(), event.at.saturating_sub(previous).as_millis(), event.text);
        previous = event.at;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_counts_from_one_event_to_the_next() {
        let events = [Event { at: Duration::ZERO, text: "on".into() }, Event { at: Duration::from_millis(1500), text: "kill".into() }];
        let table = timeline(&events);
        assert!(table.contains("| 1.500 s | 1500 ms | kill |"), "{table}");
        assert_eq!(table.lines().count(), 4);
    }
}
