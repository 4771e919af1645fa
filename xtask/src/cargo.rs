//! Building and testing the workspace (its default members: the eBPF crate is built by
//! xdp-lb's build.rs, never directly). One profile (release) everywhere, so the eBPF object,
//! which build.rs compiles into the profile's OUT_DIR, is built once and reused.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Runs a command, inheriting stdio, and fails unless it succeeds.
pub fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// The workspace root of the checkout running this xtask. `cargo run` sets CARGO_MANIFEST_DIR
/// at run time; the compile-time value is only a fallback, because checkouts sharing one target
/// directory can run a binary another checkout built.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // See xdp-lb/build.rs: re-run the eBPF build when another checkout shares the target dir.
    command.current_dir(workspace_root()).env("XDP_LB_CHECKOUT", workspace_root());
    command
}

pub fn build() -> anyhow::Result<()> {
    run_checked(cargo().args(["build", "--release"]))
}

pub fn test(extra: &[String]) -> anyhow::Result<()> {
    run_checked(cargo().args(["test", "--release", "--no-fail-fast"]).args(extra))
}

/// The directory holding release binaries (honours CARGO_TARGET_DIR).
pub fn release_dir() -> anyhow::Result<PathBuf> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    Ok(metadata.target_directory.into_std_path_buf().join("release"))
}

/// Replaces this process with a release binary of the workspace.
pub fn exec_binary(name: &str, args: &[String]) -> anyhow::Result<()> {
    let path = release_dir()?.join(name);
    let error = Command::new(&path).args(args).exec();
    Err(error).with_context(|| format!("failed to run {}", path.display()))
}
