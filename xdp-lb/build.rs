//! Builds the kernel programs (xdp-lb-ebpf) for bpfel-unknown-none and leaves the object in
//! OUT_DIR, where src/loader.rs embeds it.
//!
//! The stable toolchain builds `core` for the BPF target with `-Z build-std=core`, which needs
//! `RUSTC_BOOTSTRAP=1`. It is set here, for the nested eBPF build only, so a plain `cargo build`
//! works and host crates never see it. See ../shared/toolchain.md and `cargo xtask setup`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // aya-build watches the eBPF sources by absolute path. When several checkouts share one
    // target directory (CI), the path recorded by the last run may be another checkout's, so
    // `cargo xtask` and .ci/run name the checkout here: a different one re-runs this script.
    println!("cargo:rerun-if-env-changed=XDP_LB_CHECKOUT");
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded at this point; nothing reads the environment
        // concurrently. aya-build reads the variable and the nested cargo inherits it.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "xdp-lb-ebpf")
        .ok_or_else(|| anyhow!("xdp-lb-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::Custom("stable"),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` to install bpf-linker and rust-src")
}
