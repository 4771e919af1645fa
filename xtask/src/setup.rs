//! `cargo xtask setup`: install and check what xdp-lb needs. Each step first checks and only
//! acts when something is missing, so a second run changes nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cargo::run_checked;

/// Tools built or unpacked by setup live here, outside any clone, so every clone reuses them.
pub const TOOLS_DIR: &str = "/opt/xdp-lb-tools";

/// Debian packages: BPF and network tooling, the stock TFTP clients of the integration tests,
/// atftpd (tftpd-hpa conflicts with it and is unpacked beside it instead), stress-ng (the
/// failure detector's overload tests), the boot suite's firmware and machine (QEMU with
/// SeaBIOS and iPXE, OVMF, GRUB's EFI modules, PXELINUX and its `ldlinux.c32`, the arm64 QEMU
/// with U-Boot's `virt` build and `mkimage` for its script, dnsmasq for DHCP), busybox (the static build: the tests' `busybox tftp`
/// client, and the boot suite's initramfs; it replaces the dynamic one), and a font for the
/// bench's PNG charts.
const PACKAGES: &[&str] = &[
    "bpftool", "iproute2", "ethtool", "util-linux", "nftables", "tftp-hpa", "atftp", "atftpd",
    "curl", "busybox-static", "stress-ng", "qemu-system-x86", "seabios", "ipxe-qemu", "ovmf",
    "grub-efi-amd64-bin", "pxelinux", "syslinux-common", "qemu-system-arm", "u-boot-qemu", "u-boot-tools", "dnsmasq-base",
    "fonts-dejavu-core",
];

#[derive(clap::Args)]
pub struct Args {
    /// Only check and report; install nothing. Exits non-zero if anything is missing.
    #[arg(long)]
    check: bool,
}

/// What a step found.
enum Outcome {
    /// Nothing to do.
    Present(String),
    /// Something was missing and has been installed (or would be, with --check).
    Installed(String),
}

type StepFn = fn(&Args, &ProgressBar) -> anyhow::Result<Outcome>;

const STEPS: &[(&str, StepFn)] = &[
    ("root", check_root),
    ("kernel BTF", check_btf),
    ("bpffs", mount_bpffs),
    ("rust-src", install_rust_src),
    ("Debian packages", install_packages),
    ("tftpd-hpa", unpack_tftpd_hpa),
    ("boot kernel", unpack_boot_kernel),
    ("arm64 boot files", unpack_arm64_boot),
    ("bpf-linker", install_bpf_linker),
];

pub fn run(args: &Args) -> anyhow::Result<()> {
    let bar = ProgressBar::new(STEPS.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut changed = 0;
    for (name, step) in STEPS {
        bar.set_message(format!("{name}: checking"));
        let outcome = step(args, &bar).with_context(|| format!("setup step `{name}` failed"))?;
        match outcome {
            Outcome::Present(detail) => bar.suspend(|| println!("  ok    {name}: {detail}")),
            Outcome::Installed(detail) => {
                changed += 1;
                bar.suspend(|| println!("  done  {name}: {detail}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.check && changed > 0 {
        bail!("{changed} setup step(s) missing; run `cargo xtask setup`");
    }
    println!(
        "setup complete: {}",
        if changed == 0 { "nothing to do".to_owned() } else { format!("{changed} step(s) installed something") }
    );
    Ok(())
}

fn check_root(_: &Args, _: &ProgressBar) -> anyhow::Result<Outcome> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("xdp-lb needs root for BPF, XDP and network namespaces; run as root (e.g. `sudo -E cargo xtask setup`)");
    }
    Ok(Outcome::Present("running as root".into()))
}

fn check_btf(_: &Args, _: &ProgressBar) -> anyhow::Result<Outcome> {
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        bail!("{} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y", btf.display());
    }
    Ok(Outcome::Present(format!("{} present", btf.display())))
}

fn mount_bpffs(args: &Args, _: &ProgressBar) -> anyhow::Result<Outcome> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.nth(1) == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok(Outcome::Present("mounted on /sys/fs/bpf".into()));
    }
    if !args.check {
        run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(Outcome::Installed("mounted bpffs on /sys/fs/bpf".into()))
}

fn sysroot() -> anyhow::Result<PathBuf> {
    let output = Command::new("rustc").args(["--print", "sysroot"]).output().context("run rustc")?;
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn install_rust_src(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    let core = sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        return Ok(Outcome::Present("core sources present for -Z build-std".into()));
    }
    if !args.check {
        bar.set_message("rust-src: rustup component add rust-src");
        run_checked(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    Ok(Outcome::Installed("added the rust-src component".into()))
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn install_packages(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !package_installed(p)).collect();
    if missing.is_empty() {
        return Ok(Outcome::Present(format!("{} packages installed", PACKAGES.len())));
    }
    if !args.check {
        bar.set_message(format!("Debian packages: apt-get install {}", missing.join(" ")));
        apt_get(&["update", "-q"])?;
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&missing);
        apt_get(&install)?;
    }
    Ok(Outcome::Installed(format!("installed {}", missing.join(" "))))
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("run apt-get")?;
    if !output.status.success() {
        bail!("apt-get {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Path of the unpacked tftpd-hpa server (benchmark peer).
pub fn tftpd_hpa() -> PathBuf {
    Path::new(TOOLS_DIR).join("tftpd-hpa/usr/sbin/in.tftpd")
}

fn unpack_tftpd_hpa(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    if tftpd_hpa().exists() {
        return Ok(Outcome::Present(format!("{}", tftpd_hpa().display())));
    }
    if !args.check {
        bar.set_message("tftpd-hpa: apt-get download, dpkg -x");
        unpack_deb("tftpd-hpa", &Path::new(TOOLS_DIR).join("tftpd-hpa"))?;
    }
    Ok(Outcome::Installed(format!("unpacked to {}", tftpd_hpa().display())))
}

/// The Linux kernel the boot suite's machines fetch and boot: Debian's, unpacked from its
/// package (never installed: this machine keeps its own kernel), linked as `vmlinuz`.
pub fn boot_kernel() -> PathBuf {
    Path::new(TOOLS_DIR).join("kernel/vmlinuz")
}

fn unpack_boot_kernel(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    if boot_kernel().exists() {
        return Ok(Outcome::Present(format!("{}", boot_kernel().display())));
    }
    if !args.check {
        bar.set_message("boot kernel: apt-get download linux-image, dpkg -x");
        let image = unpack_kernel("linux-image-amd64", &Path::new(TOOLS_DIR).join("kernel"))?;
        std::os::unix::fs::symlink(&image, boot_kernel()).with_context(|| format!("link {}", boot_kernel().display()))?;
    }
    Ok(Outcome::Installed(format!("unpacked to {}", boot_kernel().display())))
}

/// Unpacks the kernel package the metapackage `meta` depends on into `dir`; returns its
/// `boot/vmlinuz-*`. Only the image is kept: the modules are ~400 MB the boot suite never loads.
fn unpack_kernel(meta: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let output = Command::new("apt-cache").args(["depends", meta]).output().context("run apt-cache")?;
    let package = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")).map(str::to_owned))
        .with_context(|| format!("apt-cache names no kernel package for {meta} (run apt-get update)"))?;
    unpack_deb(&package, dir)?;
    let image = std::fs::read_dir(dir.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    for unused in ["lib", "usr"] {
        let _ = std::fs::remove_dir_all(dir.join(unused));
    }
    Ok(image)
}

/// What U-Boot's arm64 machine boots: Debian's arm64 kernel, its `Image` gzipped (U-Boot's
/// `booti` decompresses it; a third of the bytes to fetch), and the arm64 static busybox for its
/// initramfs, both unpacked from packages of the foreign architecture arm64 (added to dpkg).
pub fn arm64_kernel() -> PathBuf {
    Path::new(TOOLS_DIR).join("arm64/vmlinuz")
}

fn arm64_busybox() -> PathBuf {
    Path::new(TOOLS_DIR).join("arm64/bin/busybox")
}

fn unpack_arm64_boot(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    if arm64_kernel().exists() && arm64_busybox().exists() {
        return Ok(Outcome::Present(format!("{} and {}", arm64_kernel().display(), arm64_busybox().display())));
    }
    if !args.check {
        bar.set_message("arm64 boot files: dpkg --add-architecture arm64, apt-get download linux-image and busybox-static, dpkg -x");
        let foreign = Command::new("dpkg").arg("--print-foreign-architectures").output().context("run dpkg")?;
        if !String::from_utf8_lossy(&foreign.stdout).lines().any(|a| a.trim() == "arm64") {
            run_checked(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
            apt_get(&["update", "-q"])?;
        }
        let dir = Path::new(TOOLS_DIR).join("arm64");
        unpack_deb("busybox-static:arm64", &dir)?;
        let image = unpack_kernel("linux-image-arm64:arm64", &dir)?;
        let gzipped = std::fs::File::create(arm64_kernel()).with_context(|| format!("create {}", arm64_kernel().display()))?;
        run_checked(Command::new("gzip").args(["-9", "-n", "-c"]).arg(&image).stdout(gzipped))?;
        std::fs::remove_file(&image).with_context(|| format!("remove {}", image.display()))?;
    }
    Ok(Outcome::Installed(format!("unpacked to {}", arm64_kernel().parent().unwrap_or(Path::new(TOOLS_DIR)).display())))
}

/// Downloads a Debian package (`name` or `name:arch`) and unpacks it into `dest` without
/// installing it.
fn unpack_deb(package: &str, dest: &Path) -> anyhow::Result<()> {
    let name = package.split_once(':').map_or(package, |(name, _)| name);
    let download = PathBuf::from(TOOLS_DIR).join("downloads");
    std::fs::create_dir_all(&download).with_context(|| format!("create {}", download.display()))?;
    let fetch = || run_checked(Command::new("apt-get").args(["download", "-q", "-o", "APT::Sandbox::User=root", package]).current_dir(&download));
    fetch().or_else(|_| {
        apt_get(&["update", "-q"])?;
        fetch()
    })?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}_"))))
        .with_context(|| format!("apt-get download left no {package} .deb"))?;
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(dest))?;
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// bpf-linker must use rustc's LLVM major version. Debian has no matching LLVM, so link it
/// against the shared LLVM library the Rust toolchain ships (see ../shared/toolchain.md).
fn install_bpf_linker(args: &Args, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    if bpf_linker_works() {
        return Ok(Outcome::Present("bpf-linker runs".into()));
    }
    let major = rustc_llvm_major()?;
    if !args.check {
        let prefix = PathBuf::from(TOOLS_DIR).join("llvm");
        link_toolchain_llvm(&prefix)?;
        bar.set_message(format!("bpf-linker: cargo install with llvm-{major} (several minutes)"));
        run_checked(
            Command::new("cargo")
                .args(["install", "--force", "bpf-linker", "--version", "0.13.0", "--no-default-features"])
                .args(["--features", &format!("llvm-{major}")])
                .env("LLVM_PREFIX", &prefix),
        )?;
        if !bpf_linker_works() {
            bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
        }
    }
    Ok(Outcome::Installed(format!("installed bpf-linker 0.13.0 for LLVM {major}")))
}

fn rustc_llvm_major() -> anyhow::Result<String> {
    let output = Command::new("rustc").arg("-vV").output().context("run rustc -vV")?;
    let text = String::from_utf8(output.stdout)?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV names no LLVM version")?;
    Ok(version.split('.').next().unwrap_or(version).to_owned())
}

fn link_toolchain_llvm(prefix: &Path) -> anyhow::Result<()> {
    let lib_dir = sysroot()?.join("lib");
    let lib = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so"))
        .with_context(|| format!("no libLLVM.so in {}", lib_dir.display()))?;
    let dest = prefix.join("lib");
    std::fs::create_dir_all(&dest)?;
    for name in [PathBuf::from("libLLVM.so"), PathBuf::from(&lib)] {
        let link = dest.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&lib), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    Ok(())
}
