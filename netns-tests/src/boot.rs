//! Real boot firmware as clients: a QEMU machine (TCG: there is no KVM here) whose network
//! card sits on a tap device in the clients' segment of the full topology, dnsmasq (DHCP only)
//! handing it an address, the switch as its router and the VIP as next-server, and files the
//! firmware fetches through the VIP: a Linux kernel (Debian's, unpacked by `cargo xtask setup`)
//! and an initramfs whose `/init` prints the SHA-256 of a payload it carries and a marker,
//! then powers the machine off. A damaged kernel does not boot; a damaged initramfs prints
//! another digest. U-Boot boots an arm64 machine (QEMU `virt`) with Debian's arm64 kernel and
//! an arm64 initramfs carrying the same payload, and checks both downloads with its own
//! `crc32` before it boots them.

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
/// U-Boot for QEMU's arm64 `virt` machine (`u-boot-qemu`), started as its firmware.
const UBOOT_ARM64: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// Where `cargo xtask setup` puts Debian's arm64 kernel (its `Image` gzipped: `booti`
/// decompresses it, and a third of the size goes through TFTP) and arm64 static busybox.
pub const ARM64_KERNEL: &str = "/opt/xdp-lb-tools/arm64/vmlinuz";
const ARM64_BUSYBOX: &str = "/opt/xdp-lb-tools/arm64/bin/busybox";

/// The kernel command line every loader passes: the console on the serial port (the test
/// reads it), early output so that a damaged kernel shows its decompressor's verdict.
const KERNEL_ARGS: &str = "console=ttyS0 earlyprintk=ttyS0 quiet panic=-1 rdinit=/init";
/// The same for the arm64 `virt` machine, whose serial port is a PL011.
const ARM64_KERNEL_ARGS: &str = "console=ttyAMA0 quiet panic=-1 rdinit=/init";

/// The line `/init` prints once it ran, and the one before it with the payload's digest.
pub const BOOTED: &str = "XDPLB-BOOTED";
pub const PAYLOAD: &str = "XDPLB-PAYLOAD";
/// What U-Boot's script prints once a download's CRC-32 matched, or did not (then it powers
/// the machine off instead of booting), each followed by the file's name.
pub const UBOOT_CRC_OK: &str = "XDPLB-UBOOT-CRC-OK";
pub const UBOOT_CRC_MISMATCH: &str = "XDPLB-UBOOT-CRC-MISMATCH";

/// The files a machine boots, in the backends' root.
#[derive(Clone, Debug)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// U-Boot's: the arm64 kernel and initramfs (the same payload inside).
    pub arm64_kernel: PathBuf,
    pub arm64_initrd: PathBuf,
    /// SHA-256 (hex) of the payload inside the initramfs.
    pub payload_sha256: String,
}

/// Puts the kernel, an initramfs with a `payload_bytes` payload, and each firmware's loader
/// and configuration (the iPXE script `boot.ipxe`, GRUB, PXELINUX, U-Boot's script with the
/// arm64 kernel and initramfs) into `root`.
pub fn make_boot_files(root: &Path, payload_bytes: usize, seed: u64) -> Result<BootFiles> {
    for needed in [KERNEL, BUSYBOX, IPXE_E1000, OVMF, GRUB_EFI_MODULES, PXELINUX, LDLINUX, UBOOT_ARM64, ARM64_KERNEL, ARM64_BUSYBOX] {
        if !Path::new(needed).exists() {
            return Err(io_error(format!("{needed} is missing: run `cargo xtask setup` (the boot suite needs it)"))(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            )));
        }
    }
    let kernel = root.join("vmlinuz");
    std::fs::copy(KERNEL, &kernel).map_err(io_error(format!("copy {KERNEL}")))?;
    let payload_sha256 = initramfs(BUSYBOX, &root.join("initrd.img"), payload_bytes, seed)?;
    let arm64_kernel = root.join(Firmware::UBoot.kernel());
    std::fs::copy(ARM64_KERNEL, &arm64_kernel).map_err(io_error(format!("copy {ARM64_KERNEL}")))?;
    let arm64_initrd = root.join(Firmware::UBoot.initrd());
    initramfs(ARM64_BUSYBOX, &arm64_initrd, payload_bytes, seed)?;
    let script = format!(
        "#!ipxe\nkernel tftp://{VIP}/vmlinuz {KERNEL_ARGS}\ninitrd tftp://{VIP}/initrd.img\nboot\n"
    );
    std::fs::write(root.join("boot.ipxe"), script).map_err(io_error("write boot.ipxe"))?;
    grub_image(root)?;
    pxelinux(root)?;
    uboot_script(root, &arm64_kernel, &arm64_initrd)?;
    Ok(BootFiles { kernel, initrd: root.join("initrd.img"), arm64_kernel, arm64_initrd, payload_sha256 })
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

/// U-Boot's `boot.scr.uimg` (what its distro boot's `dhcp` target fetches and sources), made
/// with `mkimage` from [`uboot_commands`] for the kernel and initramfs in the root.
fn uboot_script(root: &Path, kernel: &Path, initrd: &Path) -> Result<()> {
    let crc = |path: &Path| std::fs::read(path).map(|bytes| crc32fast::hash(&bytes)).map_err(io_error(format!("read {}", path.display())));
    let commands = root.join("boot.cmd");
    std::fs::write(&commands, uboot_commands(crc(kernel)?, crc(initrd)?)).map_err(io_error("write boot.cmd"))?;
    let (source, image) = (commands.display().to_string(), root.join(Firmware::UBoot.boot_file()).display().to_string());
    run("mkimage", &["-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", "xdp-lb boot", "-d", &source, &image])?;
    std::fs::remove_file(&commands).map_err(io_error("remove boot.cmd"))
}

/// Where U-Boot's `crc32` stores each download's CRC (in the `virt` machine's RAM, clear of the
/// kernel, the initramfs and `booti`'s decompression buffer).
const UBOOT_CRC_AT: [u32; 2] = [0x4f00_0000, 0x4f00_0004];

/// The commands of U-Boot's script: fetch the kernel and the initramfs with U-Boot's own TFTP
/// (from `serverip`, the next-server DHCP named: the VIP), check each with `crc32` against the
/// CRC-32 the harness computed, and `booti` them only if both match. This `crc32` has no
/// verify option and stores its result big-endian, so `itest.l` compares it read back as a
/// little-endian word with the CRC's bytes swapped.
fn uboot_commands(kernel_crc: u32, initrd_crc: u32) -> String {
    let [kernel_at, initrd_at] = UBOOT_CRC_AT;
    let (kernel, initrd) = (Firmware::UBoot.kernel(), Firmware::UBoot.initrd());
    let check = |at: u32, crc: u32| format!("itest.l *{at:#x} == {:#x}", crc.swap_bytes());
    let verdict = |at: u32, crc: u32, file: &str| {
        format!("if {}; then echo {UBOOT_CRC_OK} {file}; else echo {UBOOT_CRC_MISMATCH} {file}; fi\n", check(at, crc))
    };
    format!(
        "echo XDPLB-UBOOT loading {kernel}\ntftpboot ${{kernel_addr_r}} {kernel}\nsetenv kernel_comp_size ${{filesize}}\n\
         crc32 ${{kernel_addr_r}} ${{filesize}} {kernel_at:#x}\n{}\
         echo XDPLB-UBOOT loading {initrd}\ntftpboot ${{ramdisk_addr_r}} {initrd}\nsetenv initrd_size ${{filesize}}\n\
         crc32 ${{ramdisk_addr_r}} ${{filesize}} {initrd_at:#x}\n{}\
         setenv kernel_comp_addr_r 0x48000000\nsetenv bootargs \"{ARM64_KERNEL_ARGS}\"\n\
         if {} && {}; then booti ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{initrd_size}} ${{fdtcontroladdr}}; fi\npoweroff\n",
        verdict(kernel_at, kernel_crc, kernel),
        verdict(initrd_at, initrd_crc, initrd),
        check(kernel_at, kernel_crc),
        check(initrd_at, initrd_crc),
    )
}

/// Builds an uncompressed newc cpio initramfs at `out` around `busybox` (the machine's
/// architecture); returns the payload's SHA-256.
fn initramfs(busybox: &str, out: &Path, payload_bytes: usize, seed: u64) -> Result<String> {
    let tree = std::env::temp_dir().join(RunPrefix::new().name("initramfs"));
    let result = initramfs_tree(busybox, &tree, out, payload_bytes, seed);
    let _ = std::fs::remove_dir_all(&tree);
    result
}

fn initramfs_tree(busybox: &str, tree: &Path, out: &Path, payload_bytes: usize, seed: u64) -> Result<String> {
    std::fs::create_dir_all(tree.join("bin")).map_err(io_error("initramfs tree"))?;
    std::fs::copy(busybox, tree.join("bin/busybox")).map_err(io_error("copy busybox"))?;
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
    /// U-Boot on QEMU's arm64 `virt` machine with a virtio-net card: its distro boot's `dhcp`
    /// target fetches `boot.scr.uimg` and sources it; the script fetches the arm64 kernel and
    /// initramfs with U-Boot's TFTP (`timeout 5`, blksize 1468, no windowsize; ACKs resent
    /// after 5 s; any ERROR but 1 and 2 restarts the download), checks their CRC-32 and
    /// `booti`s them.
    UBoot,
}

impl Firmware {
    /// The boot file DHCP names for it.
    #[must_use]
    pub fn boot_file(self) -> &'static str {
        match self {
            Self::Ipxe => "boot.ipxe",
            Self::UefiGrub => "grubx64.efi",
            Self::Pxelinux => "pxelinux.0",
            Self::UBoot => "boot.scr.uimg",
        }
    }

    /// The kernel it boots, in the backends' root.
    #[must_use]
    pub fn kernel(self) -> &'static str {
        match self {
            Self::Ipxe | Self::UefiGrub | Self::Pxelinux => "vmlinuz",
            Self::UBoot => "vmlinuz-arm64",
        }
    }

    /// The initramfs it boots, in the backends' root.
    #[must_use]
    pub fn initrd(self) -> &'static str {
        match self {
            Self::Ipxe | Self::UefiGrub | Self::Pxelinux => "initrd.img",
            Self::UBoot => "initrd-arm64.img",
        }
    }

    /// Every file it fetches from the backends' root, the boot file first.
    #[must_use]
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Self::Ipxe => &["boot.ipxe", "vmlinuz", "initrd.img"],
            Self::UefiGrub => &["grubx64.efi", "grub.cfg", "vmlinuz", "initrd.img"],
            Self::Pxelinux => &["pxelinux.0", "ldlinux.c32", "pxelinux.cfg/default", "vmlinuz", "initrd.img"],
            Self::UBoot => &["boot.scr.uimg", "vmlinuz-arm64", "initrd-arm64.img"],
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
            // U-Boot's CONFIG_TFTP_BLOCKSIZE default, granted whole: the topology's links carry
            // 1600 bytes, so the backends' path-MTU clamp (1600 - 96) stays above it, and the
            // DATA the balancer forwards without the steering header fits the client's 1500.
            Self::UBoot => 1468,
        }
    }
}

/// Where `XDPLB_BOOT_PCAP=PREFIX` in the environment asks machine `name`'s traffic to go:
/// `PREFIX-NAME.pcap`.
#[must_use]
pub fn capture_from_env(name: &str) -> Option<PathBuf> {
    std::env::var_os("XDPLB_BOOT_PCAP").map(|pcap| PathBuf::from(format!("{}-{name}.pcap", pcap.to_string_lossy())))
}

/// A QEMU machine whose network card is on a new tap device attached to `bridge` in `net`
/// (created here, removed with the namespace or on drop); its serial console is its log. With
/// `XDPLB_BOOT_PCAP=PREFIX` in the environment its card's traffic goes to `PREFIX-NAME.pcap`.
pub struct Machine {
    pub qemu: Process,
    net_path: PathBuf,
    tap: String,
    pub started: Instant,
}

impl Machine {
    pub fn start(net: &Netns, bridge: &str, prefix: &RunPrefix, name: &str, firmware: Firmware, mac: &str) -> Result<Self> {
        Self::start_capturing(net, bridge, prefix, name, firmware, mac, capture_from_env(name).as_deref())
    }

    /// [`Machine::start`] with its card's traffic dumped to `capture` (a pcap) when given.
    pub fn start_capturing(net: &Netns, bridge: &str, prefix: &RunPrefix, name: &str, firmware: Firmware, mac: &str, capture: Option<&Path>) -> Result<Self> {
        let tap = prefix.name(&format!("t{name}"));
        net.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        net.ip(&["link", "set", &tap, "master", bridge])?;
        net.ip(&["link", "set", &tap, "up"])?;
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", net.path().display())).arg("--");
        match firmware {
            Firmware::UBoot => command.args(["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57"]),
            Firmware::Ipxe | Firmware::UefiGrub | Firmware::Pxelinux => command.args(["qemu-system-x86_64", "-machine", "pc", "-boot", "n"]),
        };
        command.args(["-accel", "tcg", "-m", "512", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]);
        command.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")]);
        match firmware {
            Firmware::Ipxe | Firmware::Pxelinux => command.args(["-device", &format!("e1000,netdev=n0,mac={mac},romfile={IPXE_E1000}")]),
            // OVMF's own virtio-net driver and network stack (no option ROM: iPXE's EFI build
            // would take the boot over), so EDK2's PXE and TFTP fetch the boot file.
            Firmware::UefiGrub => command.args(["-bios", OVMF, "-device", &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=")]),
            // U-Boot's own virtio-net driver; no option ROM (U-Boot would not run it anyway).
            Firmware::UBoot => command.args(["-bios", UBOOT_ARM64, "-device", &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=")]),
        };
        // What the machine's card sent and received, for a boot to study afterwards.
        if let Some(pcap) = capture {
            command.args(["-object", &format!("filter-dump,id=d0,netdev=n0,file={}", pcap.display())]);
        }
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

/// TCG emulates the whole machine: firmware, TFTP of ~11 MB and the kernel's boot take tens
/// of seconds on this machine kind.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// What to break during a boot, and when: once the active balancer has seen `share` of `file`
/// sent (0: as soon as its request has opened a session, before or with its first answer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Failure {
    None,
    ActiveBalancer { file: &'static str, share: f64 },
    ServingBackend { file: &'static str, share: f64 },
    /// The active balancer is dead before the machine's first TFTP request, and the switch
    /// has no verdict yet when it comes: the request goes to the dead balancer. (The switch
    /// agent is held stopped from the kill to the request, so that it is so every time.)
    BalancerDeadAtFirstRequest,
}

/// What one boot through a cluster showed; the caller judges it.
#[derive(Clone, Debug)]
pub struct BootRun {
    /// The machine's serial console, to its power-off.
    pub console: String,
    /// From power-on to power-off.
    pub powered_off_after: Duration,
    /// When the failure was injected, since power-on.
    pub injected_after: Option<Duration>,
    /// The data stall the failure caused ([`longest_pause`] over 3 s).
    pub stall: Option<Duration>,
    /// The file whose download timed the failure, and the block size its session had: which
    /// TFTP client fetched it.
    pub watched: &'static str,
    pub blksize: u16,
}

/// Where the test and the bench look for a failure's stall: long enough for the balancers'
/// failover (~150 ms), short of U-Boot's 5 s timeout, which then shows as the whole window.
const STALL_WINDOW: Duration = Duration::from_secs(3);

/// Boots one machine with `firmware` through `cluster` (dnsmasq on the switch's client side
/// offering its boot file, the machine on the clients' bridge, its traffic dumped to `capture`
/// when given) and injects `failure` once its file's download reached its share; without a
/// failure the kernel's download is watched all the same, for its block size. The machine is
/// named `m0` (its capture from the environment: [`capture_from_env`]). Returns once the
/// machine powered itself off.
pub fn boot_through(cluster: &mut Cluster, firmware: Firmware, failure: Failure, capture: Option<&Path>) -> Result<BootRun> {
    let dhcp = start_dhcp(&cluster.topo.switch, &cluster.topo.prefix.name("dhcp"), "eth0", ("10.78.0.100", "10.78.0.149"), crate::pair_topology::SWITCH_CLIENT_SIDE, firmware.boot_file())?;
    let mut machine = Machine::start_capturing(cluster.topo.bridges(), "br0", &cluster.topo.prefix, "m0", firmware, "52:54:00:4c:42:01", capture)?;
    if failure == Failure::BalancerDeadAtFirstRequest {
        return dead_at_first_request(cluster, machine, &dhcp);
    }
    let (file, share) = match failure {
        Failure::ActiveBalancer { file, share } | Failure::ServingBackend { file, share } => (file, share),
        Failure::None | Failure::BalancerDeadAtFirstRequest => (firmware.kernel(), 0.5),
    };
    let bytes = std::fs::metadata(cluster.topo.root.join(file)).map_err(io_error(format!("boot file {file}")))?.len();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (active, serving, blksize) = loop {
        if let Some(found) = progress(cluster, file, bytes, share) {
            break found;
        }
        if !machine.qemu.is_running() {
            let why = format!("{file} never reached {share}: the machine stopped\n{}\n{}", machine.qemu.log(), cluster.logs());
            return Err(io_error(why)(std::io::Error::other("no boot")));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout { what: format!("{file} to reach {share}\n{}\n{}", machine.qemu.log(), cluster.logs()), seconds: BOOT_TIMEOUT.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (mut injected_after, mut stall) = (None, None);
    if failure != Failure::None {
        let killed = Instant::now();
        match failure {
            Failure::ActiveBalancer { .. } => cluster.kill_lb(active),
            Failure::ServingBackend { .. } => cluster.kill_backend(serving),
            Failure::None | Failure::BalancerDeadAtFirstRequest => {}
        }
        injected_after = Some(machine.started.elapsed());
        stall = Some(longest_pause(cluster, killed, STALL_WINDOW));
    }
    let console = machine.wait(BOOT_TIMEOUT).map_err(|e| match e {
        Error::Timeout { what, seconds } => Error::Timeout { what: format!("{what}\n--- dhcp\n{}\n{}", dhcp.log(), cluster.logs()), seconds },
        other => other,
    })?;
    Ok(BootRun { console, powered_off_after: machine.started.elapsed(), injected_after, stall, watched: file, blksize })
}

/// [`Failure::BalancerDeadAtFirstRequest`], once the machine is on: the switch agent stopped,
/// the active balancer killed, and the agent let go again as soon as the switch steered the
/// machine's first request (to the dead balancer). The stall counts from then: the verdict,
/// the swap and the request steered again, against the firmware's own retry (4 s for EDK2).
fn dead_at_first_request(cluster: &mut Cluster, mut machine: Machine, dhcp: &Process) -> Result<BootRun> {
    let active = cluster.topo.active_lb()?;
    let kept = cluster.kill_lb_unseen(active);
    let injected_after = machine.started.elapsed();
    let Some(requested) = cluster.release_switch_after_request(kept, BOOT_TIMEOUT, || machine.qemu.is_running()) else {
        let why = format!("no TFTP request reached the switch\n{}\n{}", machine.qemu.log(), cluster.logs());
        return Err(io_error(why)(std::io::Error::other("no request")));
    };
    let stall = longest_pause(cluster, requested, STALL_WINDOW);
    let console = machine.wait(BOOT_TIMEOUT).map_err(|e| match e {
        Error::Timeout { what, seconds } => Error::Timeout { what: format!("{what}\n--- dhcp\n{}\n{}", dhcp.log(), cluster.logs()), seconds },
        other => other,
    })?;
    Ok(BootRun { console, powered_off_after: machine.started.elapsed(), injected_after: Some(injected_after), stall: Some(stall), watched: "", blksize: 0 })
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
/// at `since` caused. `window` itself when no reply came at all: the stall lasted at least that
/// long (a client's own retransmission timeout, say), not none.
pub fn longest_pause(cluster: &Cluster, since: Instant, window: Duration) -> Duration {
    let first = cluster.delivered();
    let (mut last, mut last_change, mut longest) = (first, since, Duration::ZERO);
    while since.elapsed() < window {
        let now = cluster.delivered();
        if now != last {
            longest = longest.max(last_change.elapsed());
            (last, last_change) = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if last == first { window } else { longest }
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
        .filter(|l| ["PXE", "NBP", "loading", "Loading", "iPXE", "tftp://", "U-Boot 20", "Bytes transferred", "Retry", "Starting kernel", "Linux version", "XDPLB", "crc error", "halted", "Power down"].iter().any(|m| l.contains(m)))
        // U-Boot's download progress and its environment's origin are no milestones.
        .filter(|l| !["Loading: ", "Loading Environment", "Loading Ramdisk", "Loading Device Tree"].iter().any(|m| l.contains(m)))
        .take(12)
        .map(|l| l.trim().to_owned())
        .collect()
}

/// How often U-Boot's TFTP timed out waiting for the server, per file it fetched (its progress
/// lines, `Loading: *` and the `#` lines after it, show a `T` for each; `Filename '...'.` names
/// the file): after a failure, a count above zero means the client's own timeout (5 s), not the
/// balancers, ended a stall.
#[must_use]
pub fn uboot_timeouts(console: &str) -> Vec<(String, usize)> {
    let progress = |line: &str| {
        let marks = line.strip_prefix("Loading:").unwrap_or(line).trim();
        !marks.is_empty() && marks.chars().all(|c| matches!(c, '#' | 'T' | '*' | ' '))
    };
    let mut files: Vec<(String, usize)> = Vec::new();
    // U-Boot draws `Loading: *` and a backspace, so that the first mark overwrites the star.
    let plain: String = console.chars().filter(|c| *c == '\n' || !c.is_control()).collect();
    for line in plain.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("Filename '").and_then(|rest| rest.strip_suffix("'.")) {
            files.push((name.to_owned(), 0));
        } else if let Some((_, count)) = files.last_mut().filter(|_| progress(line)) {
            *count += line.matches('T').count();
        }
    }
    files
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
        for firmware in [Firmware::Ipxe, Firmware::UefiGrub, Firmware::Pxelinux, Firmware::UBoot] {
            let files = firmware.files();
            assert_eq!(files[0], firmware.boot_file(), "{firmware:?}");
            assert!(files.ends_with(&[firmware.kernel(), firmware.initrd()]), "{firmware:?}: {files:?}");
        }
        for firmware in [Firmware::Ipxe, Firmware::UefiGrub, Firmware::Pxelinux] {
            assert_eq!((firmware.kernel(), firmware.initrd()), ("vmlinuz", "initrd.img"), "{firmware:?}: the x86 kernel");
        }
        assert_eq!(Firmware::Pxelinux.kernel_blksize(), 1408, "syslinux core/fs/pxe/tftp.c asks blksize 1408");
        assert_eq!(Firmware::UBoot.kernel_blksize(), 1468, "U-Boot's CONFIG_TFTP_BLOCKSIZE default");
    }

    #[test]
    fn uboot_timeouts_are_the_ts_in_its_progress_lines() {
        let console = "Filename 'vmlinuz-arm64'.\nLoading: *\u{8}T #######T ###\r\n\t #####T##\n\t 3.2 MiB/s\nXDPLB-UBOOT-CRC-OK vmlinuz-arm64\nTFTP from server\n";
        assert_eq!(uboot_timeouts(console), [("vmlinuz-arm64".to_owned(), 3)], "only the progress lines count");
        let clean = "Filename 'boot.scr.uimg'.\nLoading: *#\nFilename 'initrd-arm64.img'.\nLoading: *########\n\t ####\ndone\n";
        assert_eq!(uboot_timeouts(clean), [("boot.scr.uimg".to_owned(), 0), ("initrd-arm64.img".to_owned(), 0)]);
    }

    #[test]
    fn uboot_checks_both_downloads_before_it_boots_them() {
        let script = uboot_commands(0x3fd5_acd2, 0x0041_519b);
        let lines: Vec<&str> = script.lines().collect();
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} missing from:\n{script}"));
        // crc32 stores its result big-endian; itest.l reads it back little-endian.
        assert!(script.contains("itest.l *0x4f000000 == 0xd2acd53f"), "{script}");
        assert!(script.contains("itest.l *0x4f000004 == 0x9b514100"), "{script}");
        assert!(at("tftpboot ${kernel_addr_r} vmlinuz-arm64") < at("crc32 ${kernel_addr_r} ${filesize} 0x4f000000"));
        assert!(at("tftpboot ${ramdisk_addr_r} initrd-arm64.img") < at("crc32 ${ramdisk_addr_r} ${filesize} 0x4f000004"));
        assert!(at("crc32 ${ramdisk_addr_r}") < at("booti"), "{script}");
        assert!(lines.iter().filter(|l| l.contains(UBOOT_CRC_MISMATCH)).count() == 2, "{script}");
        let boot = lines[at("booti")];
        assert!(boot.starts_with("if itest.l *0x4f000000 == 0xd2acd53f && itest.l *0x4f000004 == 0x9b514100; then booti"), "booted only if both match: {boot}");
        assert!(boot.contains("${ramdisk_addr_r}:${initrd_size} ${fdtcontroladdr}"), "the initramfs by address and size: {boot}");
        assert!(script.contains(&format!("setenv bootargs \"{ARM64_KERNEL_ARGS}\"")) && ARM64_KERNEL_ARGS.contains("console=ttyAMA0"), "{script}");
        assert_eq!(lines.last(), Some(&"poweroff"), "a refused boot powers the machine off");
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
