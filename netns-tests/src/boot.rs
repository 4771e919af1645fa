//! Real boot firmware as clients: a QEMU machine (TCG: there is no KVM here) whose network
//! card sits on a tap device in the clients' segment of the full topology, dnsmasq (DHCP only)
//! handing it an address, the switch as its router and the VIP as next-server, and files the
//! firmware fetches through the VIP: a Linux kernel (Debian's, unpacked by `cargo xtask setup`)
//! and an initramfs whose `/init` prints the SHA-256 of a payload it carries and a marker,
//! then powers the machine off. A damaged kernel does not boot; a damaged initramfs prints
//! another digest.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::{Error, Netns, Process, Result, RunPrefix, cluster::Cluster, io_error, pair_topology::VIP, run};

/// Where `cargo xtask setup` unpacks Debian's kernel image.
pub const KERNEL: &str = "/opt/xdp-lb-tools/kernel/vmlinuz";
/// The static busybox the initramfs runs (`busybox-static`).
const BUSYBOX: &str = "/bin/busybox";
/// iPXE's ROM for QEMU's e1000 card (`ipxe-qemu`), started by SeaBIOS.
const IPXE_E1000: &str = "/usr/lib/ipxe/qemu/efi-e1000.rom";
/// EDK2's UEFI firmware for QEMU (`ovmf`).
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// GRUB's EFI modules (`grub-efi-amd64-bin`), for a network boot image made with grub-mkimage.
const GRUB_EFI_MODULES: &str = "/usr/lib/grub/x86_64-efi";
/// PXELINUX for BIOS PXE (`pxelinux`): the build on the PXE stack's UDP API with syslinux's own
/// TFTP client (`lpxelinux.0` would bring lwIP and HTTP instead).
const PXELINUX: &str = "/usr/lib/PXELINUX/pxelinux.0";
/// Its second stage (`syslinux-common`), which reads the configuration and loads the kernel.
const LDLINUX: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";

/// The kernel command line every loader passes: the console on the serial port (the test
/// reads it), early output so that a damaged kernel shows its decompressor's verdict.
const KERNEL_ARGS: &str = "console=ttyS0 earlyprintk=ttyS0 quiet panic=-1 rdinit=/init";

/// The line `/init` prints once it ran, and the one before it with the payload's digest.
pub const BOOTED: &str = "XDPLB-BOOTED";
pub const PAYLOAD: &str = "XDPLB-PAYLOAD";

/// The files a machine boots, in the backends' root.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// SHA-256 (hex) of the payload inside the initramfs.
    pub payload_sha256: String,
}

/// Puts the kernel, an initramfs with a `payload_bytes` payload, and each firmware's loader
/// and configuration (the iPXE script `boot.ipxe`, GRUB, PXELINUX) into `root`.
pub fn make_boot_files(root: &Path, payload_bytes: usize, seed: u64) -> Result<BootFiles> {
    for needed in [KERNEL, BUSYBOX, IPXE_E1000, OVMF, GRUB_EFI_MODULES, PXELINUX, LDLINUX] {
        if !Path::new(needed).exists() {
            return Err(io_error(format!("{needed} is missing: run `cargo xtask setup` (the boot suite needs it)"))(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )));
        }
    }
    let kernel = root.join("vmlinuz");
    std::fs::copy(KERNEL, &kernel).map_err(io_error(format!("copy {KERNEL}")))?;
    let tree = std::env::temp_dir().join(RunPrefix::new().name("initramfs"));
    let result = initramfs(&tree, &root.join("initrd.img"), payload_bytes, seed);
    let _ = std::fs::remove_dir_all(&tree);
    let payload_sha256 = result?;
    let script = format!(
        "#!ipxe\nkernel tftp://{VIP}/vmlinuz {KERNEL_ARGS}\ninitrd tftp://{VIP}/initrd.img\nboot\n"
    );
    std::fs::write(root.join("boot.ipxe"), script).map_err(io_error("write boot.ipxe"))?;
    grub_image(root)?;
    pxelinux(root)?;
    Ok(BootFiles { kernel, initrd: root.join("initrd.img"), payload_sha256 })
}

/// GRUB for UEFI network boot: `grubx64.efi` (what EDK2's PXE fetches and starts), whose prefix
/// is the VIP over TFTP, and the `grub.cfg` it reads there, which fetches the kernel and the
/// initramfs with GRUB's own TFTP client.
fn grub_image(root: &Path) -> Result<()> {
    let prefix = format!("(tftp,{VIP})/");
    let image = root.join("grubx64.efi");
    let modules = ["efinet", "tftp", "net", "linux", "normal", "configfile", "echo", "test", "boot"];
    let mut args = vec!["-O", "x86_64-efi", "-d", GRUB_EFI_MODULES, "-p", &prefix];
    let image_arg = image.display().to_string();
    args.extend(["-o", &image_arg]);
    args.extend(modules);
    run("grub-mkimage", &args)?;
    let config = format!(
        "set timeout=0\necho loading the kernel\nlinux (tftp,{VIP})/vmlinuz {KERNEL_ARGS}\n\
         echo loading the initramfs\ninitrd (tftp,{VIP})/initrd.img\nboot\n"
    );
    std::fs::write(root.join("grub.cfg"), config).map_err(io_error("write grub.cfg"))
}

/// PXELINUX: `pxelinux.0` (what the PXE ROM fetches and starts), its second stage
/// `ldlinux.c32`, and `pxelinux.cfg/default`, which boots the kernel and the initramfs at once
/// (no prompt, no menu module) and shows PXELINUX's own lines on the serial console too. The paths are relative: PXELINUX reads them from the
/// next-server with its own TFTP client through the ROM's PXE UDP API.
fn pxelinux(root: &Path) -> Result<()> {
    std::fs::copy(PXELINUX, root.join("pxelinux.0")).map_err(io_error(format!("copy {PXELINUX}")))?;
    std::fs::copy(LDLINUX, root.join("ldlinux.c32")).map_err(io_error(format!("copy {LDLINUX}")))?;
    std::fs::create_dir_all(root.join("pxelinux.cfg")).map_err(io_error("pxelinux.cfg"))?;
    std::fs::write(root.join("pxelinux.cfg/default"), pxelinux_config()).map_err(io_error("write pxelinux.cfg/default"))
}

/// `pxelinux.cfg/default`: one label, booted at once, its lines also on the serial console.
fn pxelinux_config() -> String {
    format!("SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {KERNEL_ARGS}\n")
}

/// Builds an uncompressed newc cpio initramfs at `out` from a tree made in `tree`; returns the
/// payload's SHA-256.
fn initramfs(tree: &Path, out: &Path, payload_bytes: usize, seed: u64) -> Result<String> {
    std::fs::create_dir_all(tree.join("bin")).map_err(io_error("initramfs tree"))?;
    std::fs::copy(BUSYBOX, tree.join("bin/busybox")).map_err(io_error("copy busybox"))?;
    crate::files::make_file(&tree.join("payload"), payload_bytes, seed)?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /proc\n/bin/busybox mount -t proc proc /proc\n\
         echo \"{PAYLOAD} $(/bin/busybox sha256sum /payload)\"\necho {BOOTED}\n/bin/busybox poweroff -f\n"
    );
    std::fs::write(tree.join("init"), init).map_err(io_error("write /init"))?;
    std::fs::set_permissions(tree.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(io_error("chmod /init"))?;
    let archive = format!("cd '{}' && find . | {BUSYBOX} cpio -o -H newc > '{}'", tree.display(), out.display());
    run("sh", &["-c", &archive])?;
    crate::files::sha256(&tree.join("payload"))
}

/// dnsmasq as a DHCP server only (`--port=0`: no DNS) on `iface` of `ns`: addresses from
/// `range`, `router` as the default route, the VIP as next-server and `boot_file` to fetch.
pub fn start_dhcp(ns: &Netns, name: &str, iface: &str, range: (&str, &str), router: &str, boot_file: &str) -> Result<Process> {
    let mut command = ns.command("dnsmasq");
    command.args(["--no-daemon", "--port=0", "--bind-interfaces", "--leasefile-ro", "--log-dhcp", "--conf-file=/dev/null"]);
    command.arg(format!("--interface={iface}"));
    command.arg(format!("--dhcp-range={},{},255.255.255.0,10m", range.0, range.1));
    command.arg(format!("--dhcp-option=option:router,{router}"));
    command.arg(format!("--dhcp-boot={boot_file},,{VIP}"));
    let mut dhcp = Process::spawn(name, command)?;
    if !dhcp.wait_for_output("DHCP, IP range", Duration::from_secs(10)) {
        return Err(io_error(format!("dnsmasq did not start:\n{}", dhcp.log()))(std::io::Error::other("no DHCP range announced")));
    }
    Ok(dhcp)
}

/// The firmware a machine boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, then iPXE from the network card's option ROM: `boot.ipxe`, then the kernel and
    /// the initramfs with iPXE's TFTP.
    Ipxe,
    /// OVMF (EDK2): its UEFI PXE fetches `grubx64.efi` with EDK2's TFTP (a tsize probe it
    /// aborts, then the read), and GRUB fetches the kernel and the initramfs with its own.
    UefiGrub,
    /// SeaBIOS and iPXE as for [`Firmware::Ipxe`], but iPXE fetches and starts `pxelinux.0`;
    /// PXELINUX fetches `ldlinux.c32`, its configuration, the kernel and the initramfs with
    /// syslinux's own TFTP client (tsize and blksize 1408 asked; any other option in the OACK
    /// aborts it) over iPXE's PXE UDP API.
    Pxelinux,
}

impl Firmware {
    /// The boot file DHCP names for it.
    #[must_use]
    pub fn boot_file(self) -> &'static str {
        match self {
            Self::Ipxe => "boot.ipxe",
            Self::UefiGrub => "grubx64.efi",
            Self::Pxelinux => "pxelinux.0",
        }
    }

    /// Every file it fetches from the backends' root, the boot file first.
    #[must_use]
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Self::Ipxe => &["boot.ipxe", "vmlinuz", "initrd.img"],
            Self::UefiGrub => &["grubx64.efi", "grub.cfg", "vmlinuz", "initrd.img"],
            Self::Pxelinux => &["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default", "vmlinuz", "initrd.img"],
        }
    }

    /// The block size the client that fetches the kernel asks for: the balancer's session
    /// shows it, and so which TFTP client did the work.
    #[must_use]
    pub fn kernel_blksize(self) -> u16 {
        match self {
            Self::Ipxe => 1432,
            Self::UefiGrub => 1024,
            Self::Pxelinux => 1408,
        }
    }
}

/// A QEMU machine whose network card is on a new tap device attached to `bridge` in `net`
/// (created here, removed with the namespace or on drop); its serial console is its log.
pub struct Machine {
    pub qemu: Process,
    net_path: PathBuf,
    tap: String,
    pub started: Instant,
}

impl Machine {
    pub fn start(net: &Netns, bridge: &str, prefix: &RunPrefix, name: &str, firmware: Firmware, mac: &str) -> Result<Self> {
        let tap = prefix.name(&format!("t{name}"));
        net.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        net.ip(&["link", "set", &tap, "master", bridge])?;
        net.ip(&["link", "set", &tap, "up"])?;
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", net.path().display())).arg("--").arg("qemu-system-x86_64");
        command.args(["-machine", "pc", "-accel", "tcg", "-m", "512", "-display", "none", "-serial", "stdio", "-monitor", "none"]);
        command.args(["-no-reboot", "-boot", "n"]);
        command.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")]);
        match firmware {
            Firmware::Ipxe | Firmware::Pxelinux => command.args(["-device", &format!("e1000,netdev=n0,mac={mac},romfile={IPXE_E1000}")]),
            // OVMF's own virtio-net driver and network stack (no option ROM: iPXE's EFI build
            // would take the boot over), so EDK2's PXE and TFTP fetch the boot file.
            Firmware::UefiGrub => command.args(["-bios", OVMF, "-device", &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=")]),
        };
        let qemu = Process::spawn(prefix.name(&format!("vm-{name}")), command)?;
        Ok(Self { qemu, net_path: net.path(), tap, started: Instant::now() })
    }

    /// Waits until the machine powered itself off (QEMU exits) or `timeout` passes; returns its
    /// console.
    pub fn wait(&mut self, timeout: Duration) -> Result<String> {
        if self.qemu.wait(timeout).is_none() {
            return Err(Error::Timeout { what: format!("the machine to boot and power off; console:\n{}", self.qemu.log()), seconds: timeout.as_secs() });
        }
        Ok(self.qemu.log())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.qemu.stop();
        let _ = run("nsenter", &[&format!("--net={}", self.net_path.display()), "--", "ip", "link", "del", &self.tap]);
    }
}

/// The `path_hash` `xdp-lb status` shows for a file at the backends' root.
#[must_use]
pub fn path_hash(name: &str) -> String {
    let prefix = u64::from_be_bytes(Sha256::digest(name.as_bytes())[..8].try_into().expect("8 bytes"));
    format!("{prefix:016x}")
}

/// The active balancer's session of `file`'s download (`bytes` long) once the balancer has seen
/// `share` of it sent: (active balancer, serving backend, block size). `None` until then. With
/// `share` 0 any session counts, also one whose first answer (which teaches the balancer the
/// file) has not come yet, if it is the only one in the table besides finished ones.
pub fn progress(cluster: &Cluster, file: &str, bytes: u64, share: f64) -> Option<(usize, usize, u16)> {
    let active = cluster.topo.active_lb().ok()?;
    let sessions = cluster.topo.lb_status(active).ok()?.sessions;
    let hash = path_hash(file);
    sessions.iter().find_map(|s| {
        let sent = u64::from(s.block) * u64::from(s.blksize);
        #[expect(clippy::cast_precision_loss, reason = "a share of the file")]
        let reached = sent as f64 >= bytes as f64 * share;
        (s.path_hash == hash && reached).then(|| Some((active, usize::try_from(s.backend).ok()?, s.blksize)))?
    })
}

/// The longest time in `window` after `since` during which the balancers delivered no reply
/// to a client (sampled as fast as `xdp-lb status` answers, ~10 ms): the data stall a failure
/// at `since` caused.
pub fn longest_pause(cluster: &Cluster, since: Instant, window: Duration) -> Duration {
    let (mut last, mut last_change, mut longest) = (cluster.delivered(), since, Duration::ZERO);
    while since.elapsed() < window {
        let now = cluster.delivered();
        if now != last {
            longest = longest.max(last_change.elapsed());
            (last, last_change) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    longest
}

/// How long after `since` the balancers delivered their next reply to a client (`None`: not
/// within `patience`): the stall a failure at `since` caused, known as soon as it is over.
#[must_use]
pub fn next_reply_after(cluster: &Cluster, since: Instant, patience: Duration) -> Option<Duration> {
    let before = cluster.delivered();
    while since.elapsed() < patience {
        if cluster.delivered() != before {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// The firmware's milestones on a console, at most twelve lines (escape sequences and carriage
/// returns aside).
#[must_use]
pub fn milestones(console: &str) -> Vec<String> {
    let plain: String = console.chars().filter(|c| *c == '\n' || !c.is_control()).collect();
    plain
        .lines()
        .filter(|l| ["PXE", "NBP", "loading", "Loading", "iPXE", "tftp://", "Linux version", "XDPLB", "crc error", "halted", "Power down"].iter().any(|m| l.contains(m)))
        .take(12)
        .map(|l| l.trim().to_owned())
        .collect()
}

/// What a console says about a boot: whether `/init` ran, and the payload digest it printed.
#[must_use]
pub fn booted(console: &str) -> (bool, Option<String>) {
    let digest = console
        .lines()
        .find_map(|l| l.split_once(PAYLOAD).map(|(_, rest)| rest.split_whitespace().next().unwrap_or_default().to_owned()));
    (console.lines().any(|l| l.trim() == BOOTED), digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_tells_whether_the_machine_booted_and_what_it_carried() {
        let console = "iPXE 1.0\n[ 1.2] Run /init\nXDPLB-PAYLOAD 1c34ab  /payload\r\nXDPLB-BOOTED\r\n[ 2.3] reboot: Power down\n";
        assert_eq!(booted(console), (true, Some("1c34ab".to_owned())));
        assert_eq!(booted("Kernel panic - not syncing"), (false, None));
    }

    #[test]
    fn each_firmware_fetches_its_boot_file_first_and_ends_with_kernel_and_initramfs() {
        for firmware in [Firmware::Ipxe, Firmware::UefiGrub, Firmware::Pxelinux] {
            let files = firmware.files();
            assert_eq!(files[0], firmware.boot_file(), "{firmware:?}");
            assert!(files.ends_with(&["vmlinuz", "initrd.img"]), "{firmware:?}: {files:?}");
        }
        assert_eq!(Firmware::Pxelinux.kernel_blksize(), 1408, "syslinux core/fs/pxe/tftp.c asks blksize 1408");
    }

    #[test]
    fn pxelinux_boots_the_kernel_with_the_initramfs_and_the_common_command_line_at_once() {
        let config = pxelinux_config();
        for line in ["DEFAULT linux", "PROMPT 0", "KERNEL vmlinuz", "INITRD initrd.img", &format!("APPEND {KERNEL_ARGS}")] {
            assert!(config.lines().any(|l| l.trim() == line), "{line:?} missing from:\n{config}");
        }
        assert!(KERNEL_ARGS.contains("console=ttyS0"), "the test reads the serial console");
    }
}
