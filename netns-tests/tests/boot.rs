//! Boot firmware as clients: a QEMU machine PXE-boots a Linux kernel and an initramfs through
//! the full topology (switch, balancer pair, three steered backends), with no failure, with the
//! active balancer killed in the middle of the kernel, and with the backend serving it killed
//! there. The machine must boot (its `/init` runs and prints the payload's digest) every time.
//! Firmware so far: iPXE (SeaBIOS + the e1000 option ROM from `ipxe-qemu`), UEFI PXE (OVMF)
//! with GRUB, PXELINUX started by iPXE, and U-Boot (`u-boot-qemu`) on an arm64 `virt` machine.

use std::time::{Duration, Instant};

use netns_tests::{
    boot::{BOOT_TIMEOUT, BootRun, Failure, Firmware, Machine, UBOOT_CRC_MISMATCH, UBOOT_CRC_OK, boot_through, booted, capture_from_env, make_boot_files, milestones, start_dhcp, uboot_timeouts},
    cluster::Cluster,
    pair_topology::SWITCH_CLIENT_SIDE,
};

const MID_KERNEL: (&str, f64) = ("vmlinuz", 0.5);

/// Boots one machine with `firmware` through a fresh topology and injects `failure` when half
/// of the kernel has been sent; checks that it booted with the right payload. Returns the data
/// stall the failure caused.
fn boot(firmware: Firmware, failure: Failure) -> Option<Duration> {
    let mut cluster = Cluster::start(1, 3);
    let files = make_boot_files(&cluster.topo.root, 2 << 20, 77).expect("boot files");
    let root = cluster.topo.root.clone();
    let size = move |file: &str| std::fs::metadata(root.join(file)).expect("boot file").len();
    let BootRun { console, powered_off_after: took, injected_after: injected, stall, watched, blksize } =
        boot_through(&mut cluster, firmware, failure, capture_from_env("m0").as_deref()).unwrap_or_else(|e| panic!("{firmware:?}, {failure:?}: {e}"));
    // The block size tells which TFTP client fetched the kernel: the loader's own (GRUB's,
    // PXELINUX's), not the firmware's that started it.
    if watched == firmware.kernel() {
        assert_eq!(blksize, firmware.kernel_blksize(), "{firmware:?}: the kernel was not fetched by the client expected to");
    }
    for line in milestones(&console) {
        println!("    console: {line}");
    }
    let (ran, digest) = booted(&console);
    if firmware == Firmware::UBoot {
        println!("    U-Boot's TFTP timeouts per file: {:?}", uboot_timeouts(&console));
    }
    println!("{firmware:?}, {failure:?}: powered off after {took:?} (failure injected after {injected:?}, data stalled {stall:?}), booted {ran}, payload {digest:?}");
    assert!(ran, "{firmware:?}, {failure:?}: /init did not run; console:\n{console}\n{}", cluster.logs());
    assert_eq!(digest.as_deref(), Some(files.payload_sha256.as_str()), "{firmware:?}, {failure:?}: the initramfs arrived damaged");
    // What went twice: every reply the balancers delivered, against the blocks the files need
    // (counted at GRUB's 1024 bytes, the smallest block any of these clients asks).
    let needed: u64 = firmware.files().iter().map(|f| size(f) / 1024 + 2).sum();
    let delivered = cluster.delivered();
    println!("    replies delivered {delivered}, blocks needed at most {needed}");
    assert!(delivered <= needed + 500, "{firmware:?}, {failure:?}: {delivered} replies for {needed} blocks: DATA sent over and over");
    let verdicts = cluster.verdicts();
    match failure {
        Failure::None => assert_eq!((verdicts.backends, verdicts.balancers), (0, 0), "no failure, no verdict: {:?}", verdicts.lines),
        Failure::ActiveBalancer { .. } | Failure::BalancerDeadAtFirstRequest => assert_eq!(verdicts.swaps, 1, "one swap: {:?}", verdicts.lines),
        Failure::ServingBackend { .. } => assert!(verdicts.backends >= 1, "the dead backend was detected: {:?}", verdicts.lines),
    }
    stall
}

#[test]
fn ipxe_boots_linux_through_the_vip() {
    boot(Firmware::Ipxe, Failure::None);
}

#[test]
fn ipxe_boots_while_the_active_balancer_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::Ipxe, Failure::ActiveBalancer { file, share });
}

#[test]
fn ipxe_boots_while_the_serving_backend_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::Ipxe, Failure::ServingBackend { file, share });
}

#[test]
fn ipxe_boots_while_the_active_balancer_dies_at_the_kernels_request() {
    boot(Firmware::Ipxe, Failure::ActiveBalancer { file: "vmlinuz", share: 0.0 });
}

#[test]
fn uefi_pxe_and_grub_boot_linux_through_the_vip() {
    boot(Firmware::UefiGrub, Failure::None);
}

#[test]
fn uefi_pxe_and_grub_boot_while_the_active_balancer_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::UefiGrub, Failure::ActiveBalancer { file, share });
}

#[test]
fn uefi_pxe_and_grub_boot_while_the_serving_backend_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::UefiGrub, Failure::ServingBackend { file, share });
}

/// The failure the issue reported: a balancer killed at the moment EDK2 requests its boot file
/// made UEFI machines fail to boot.
#[test]
fn uefi_pxe_boots_while_the_active_balancer_dies_at_the_boot_files_request() {
    boot(Firmware::UefiGrub, Failure::ActiveBalancer { file: "grubx64.efi", share: 0.0 });
}

/// The balancer already dead when EDK2 sends its first request (the boot file's size probe),
/// the switch's verdict still to come: the request went to the dead balancer, and EDK2 asks
/// again only after 4 s. The switch steers it again at the swap.
#[test]
fn uefi_pxe_boots_when_the_active_balancer_died_just_before_its_first_request() {
    let stall = boot(Firmware::UefiGrub, Failure::BalancerDeadAtFirstRequest).expect("a stall measured");
    assert!(stall < Duration::from_secs(1), "EDK2 waited for its own retry: no reply for {stall:?} after its request");
}

/// GRUB's TFTP never retransmits in its data phase: after a failover the server side speaks
/// first.
#[test]
fn grub_boots_while_the_active_balancer_dies_at_the_kernels_request() {
    boot(Firmware::UefiGrub, Failure::ActiveBalancer { file: "vmlinuz", share: 0.0 });
}

/// PXELINUX (`pxelinux.0`, started by iPXE) fetches everything after itself with syslinux's own
/// TFTP client: tsize and blksize 1408, lock-step, ACKs resent from 110 ms on, and any option
/// in the OACK it did not ask for aborts the file.
#[test]
fn pxelinux_boots_linux_through_the_vip() {
    boot(Firmware::Pxelinux, Failure::None);
}

#[test]
fn pxelinux_boots_while_the_active_balancer_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::Pxelinux, Failure::ActiveBalancer { file, share });
}

#[test]
fn pxelinux_boots_while_the_serving_backend_dies_mid_kernel() {
    let (file, share) = MID_KERNEL;
    boot(Firmware::Pxelinux, Failure::ServingBackend { file, share });
}

/// PXELINUX's kernel request reaches the balancer, which dies before the first answer
/// passes it: the new one's nudge has the backend answer through it (an OACK PXELINUX never had).
#[test]
fn pxelinux_boots_while_the_active_balancer_dies_at_the_kernels_request() {
    boot(Firmware::Pxelinux, Failure::ActiveBalancer { file: "vmlinuz", share: 0.0 });
}

/// The backend that holds iPXE's kernel request dies before its first answer: the session
/// moves, and iPXE's own retransmission (from 0.25 s) reaches the new backend.
#[test]
fn ipxe_boots_while_the_serving_backend_dies_at_the_kernels_request() {
    boot(Firmware::Ipxe, Failure::ServingBackend { file: "vmlinuz", share: 0.0 });
}

/// The suite's checks can fail: an initramfs whose payload lost a byte on its way prints another
/// digest, and a damaged kernel does not boot (its decompressor stops at the bad CRC).
#[test]
fn a_damaged_payload_prints_another_digest_and_a_damaged_kernel_does_not_boot() {
    let cluster = Cluster::start(1, 3);
    let root = cluster.topo.root.clone();
    let files = make_boot_files(&root, 2 << 20, 77).expect("boot files");
    let _dhcp = start_dhcp(&cluster.topo.switch, &cluster.topo.prefix.name("dhcp"), "eth0", ("10.78.0.100", "10.78.0.149"), SWITCH_CLIENT_SIDE, "boot.ipxe").expect("dnsmasq");
    // One byte of the payload, inside the initramfs, flipped.
    let original = root.join("original-payload");
    netns_tests::files::make_file(&original, 2 << 20, 77).expect("payload");
    let payload = std::fs::read(&original).expect("payload");
    let mut initrd = std::fs::read(&files.initrd).expect("initrd");
    let at = initrd.windows(64).position(|w| w == &payload[..64]).expect("the payload inside the initramfs") + 1000;
    initrd[at] ^= 0x5a;
    std::fs::write(&files.initrd, &initrd).expect("damage the initrd");
    let mut machine = Machine::start(cluster.topo.bridges(), "br0", &cluster.topo.prefix, "m0", Firmware::Ipxe, "52:54:00:4c:42:01").expect("qemu");
    let console = machine.wait(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let (ran, digest) = booted(&console);
    println!("damaged payload: booted {ran}, digest {digest:?} (expected {})", files.payload_sha256);
    assert!(ran, "the machine still boots");
    assert!(digest.is_some_and(|d| d != files.payload_sha256), "the damage shows in the digest");
    drop(machine);
    // Sixteen bytes in the middle of the kernel's compressed image flipped.
    let mut kernel = std::fs::read(&files.kernel).expect("kernel");
    let middle = kernel.len() * 3 / 5;
    kernel[middle..middle + 16].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&files.kernel, &kernel).expect("damage the kernel");
    let mut machine = Machine::start(cluster.topo.bridges(), "br0", &cluster.topo.prefix, "m1", Firmware::Ipxe, "52:54:00:4c:42:02").expect("qemu");
    // The decompressor reports the bad CRC on the early serial console and halts the machine.
    let deadline = Instant::now() + Duration::from_secs(120);
    while machine.qemu.is_running() && Instant::now() < deadline && !machine.qemu.log().contains("halted") {
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = machine.qemu.log();
    for line in milestones(&console) {
        println!("    console: {line}");
    }
    assert!(!booted(&console).0, "a damaged kernel must not boot:\n{console}");
    assert!(console.contains("crc error") || console.contains("halted"), "the kernel's own check stopped it:\n{console}");
}

/// U-Boot (arm64 `virt`) sources `boot.scr.uimg` from its distro boot's `dhcp` target; the
/// script fetches the kernel and the initramfs with U-Boot's TFTP (`timeout 5`, blksize 1468)
/// and boots them only once its `crc32` of each matched the harness's.
#[test]
fn uboot_boots_linux_through_the_vip() {
    boot(Firmware::UBoot, Failure::None);
}

#[test]
fn uboot_boots_while_the_active_balancer_dies_mid_kernel() {
    boot(Firmware::UBoot, Failure::ActiveBalancer { file: Firmware::UBoot.kernel(), share: MID_KERNEL.1 });
}

/// U-Boot restarts the whole download on any ERROR but 1 and 2 and resends its ACK only after
/// 5 s: the backend that takes the session over must resume it.
#[test]
fn uboot_boots_while_the_serving_backend_dies_mid_kernel() {
    boot(Firmware::UBoot, Failure::ServingBackend { file: Firmware::UBoot.kernel(), share: MID_KERNEL.1 });
}

/// U-Boot resends its request only after its 5 s timeout: a balancer killed between the
/// kernel's request and its first answer must not cost that.
#[test]
fn uboot_boots_while_the_active_balancer_dies_at_the_kernels_request() {
    boot(Firmware::UBoot, Failure::ActiveBalancer { file: Firmware::UBoot.kernel(), share: 0.0 });
}

/// The balancer already dead when U-Boot requests its boot script, the verdict still to come:
/// U-Boot would ask again only after 5 s.
#[test]
fn uboot_boots_when_the_active_balancer_died_just_before_its_first_request() {
    let stall = boot(Firmware::UBoot, Failure::BalancerDeadAtFirstRequest).expect("a stall measured");
    assert!(stall < Duration::from_secs(1), "U-Boot waited for its own retry: no reply for {stall:?} after its request");
}

/// U-Boot's own check: a kernel damaged on the server (sixteen bytes flipped after the harness
/// computed the CRC the script expects) makes U-Boot print its mismatch and power off unbooted.
#[test]
fn uboot_refuses_a_damaged_kernel_by_its_crc() {
    let cluster = Cluster::start(1, 3);
    let files = make_boot_files(&cluster.topo.root, 2 << 20, 77).expect("boot files");
    let mut kernel = std::fs::read(&files.arm64_kernel).expect("kernel");
    let middle = kernel.len() * 3 / 5;
    kernel[middle..middle + 16].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&files.arm64_kernel, &kernel).expect("damage the kernel");
    let _dhcp = start_dhcp(&cluster.topo.switch, &cluster.topo.prefix.name("dhcp"), "eth0", ("10.78.0.100", "10.78.0.149"), SWITCH_CLIENT_SIDE, Firmware::UBoot.boot_file())
        .expect("dnsmasq");
    let mut machine = Machine::start(cluster.topo.bridges(), "br0", &cluster.topo.prefix, "m0", Firmware::UBoot, "52:54:00:4c:42:03").expect("qemu");
    let console = machine.wait(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    for line in milestones(&console) {
        println!("    console: {line}");
    }
    let kernel_name = Firmware::UBoot.kernel();
    assert!(console.contains(&format!("{UBOOT_CRC_MISMATCH} {kernel_name}")), "U-Boot's crc32 did not refuse the kernel:\n{console}");
    assert!(!console.contains(&format!("{UBOOT_CRC_OK} {kernel_name}")), "{console}");
    assert!(!console.contains("Starting kernel") && !booted(&console).0, "a damaged kernel must not boot:\n{console}");
}
