//! The load balancer agent (`xdp-lb balance`).

use std::path::Path;

use anyhow::Context as _;
use tracing::info;
use xdp_lb_common::names::{MAP_LB_COUNTERS, PROGRAM_BALANCE, ROLE_BALANCE};

use crate::{loader, pins};

#[derive(clap::Args)]
pub struct Args {
    /// Interface to attach the `balance` XDP program to; repeat for several (client side and
    /// backend side).
    #[arg(long = "iface", value_name = "IFACE", required = true)]
    interfaces: Vec<String>,

    /// XDP attach mode: `auto` lets the kernel choose, `native` requires driver support, `skb`
    /// (generic XDP) works everywhere.
    #[arg(long, value_enum, default_value_t)]
    xdp_mode: loader::AttachMode,
}

/// Maps of the `balance` program that are pinned, and re-adopted on restart.
const PINNED_MAPS: &[&str] = &[MAP_LB_COUNTERS];

pub fn run(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(serve(pin_root, args))
}

async fn serve(pin_root: &Path, args: &Args) -> anyhow::Result<()> {
    let pin_dir = pins::prepare_role_dir(pin_root, ROLE_BALANCE)?;
    let mut ebpf = loader::load_pinned(&pin_dir, PINNED_MAPS)?;
    loader::attach_xdp(&mut ebpf, PROGRAM_BALANCE, &args.interfaces, args.xdp_mode)?;
    info!(
        interfaces = ?args.interfaces,
        pin_dir = %pin_dir.display(),
        "balance attached; maps pinned"
    );
    wait_for_shutdown().await?;
    // Dropping `ebpf` detaches the program; the pinned maps stay for `xdp-lb status`.
    info!("shutting down, detaching");
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot watch SIGINT"),
        _ = terminate.recv() => Ok(()),
    }
}
