//! `xdp-lb`: the agents and the CLI of xdp-lb, highly available TFTP steered in XDP.
mod balance;
mod batch;
mod clock;
mod config;
mod control;
mod control_auth;
#[cfg(test)]
mod hostile_tests;
mod ifaces;
#[cfg(test)]
mod kernel_tests;
mod loader;
mod maps;
mod pair;
mod pair_wire;
mod pins;
mod planner;
mod replay;
mod sched;
mod status;
mod switch;
#[cfg(test)]
mod switch_hostile_tests;
#[cfg(test)]
mod switch_tests;
mod testrun;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use xdp_lb_common::names::DEFAULT_PIN_ROOT;

/// Highly available TFTP: XDP load balancers that steer every transfer to a live backend.
/// Serde writes and reads it for `--config` (config.rs): the global options, and the options of
/// the subcommand under its name.
#[derive(Parser, serde::Serialize, serde::Deserialize)]
#[command(name = "xdp-lb", version, about, long_about = None, args_override_self = true)]
#[serde(rename_all = "kebab-case")]
struct Cli {
    /// bpffs directory under which each role pins its maps (`<pin-root>/<role>/<MAP>`). Use a
    /// separate directory per instance when several run on one host.
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT, value_name = "DIR")]
    pin_root: PathBuf,

    #[command(subcommand)]
    #[serde(flatten)]
    command: Command,
}

#[derive(Subcommand, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Command {
    /// Run the load balancer agent: load the `balance` XDP program, attach it to the given
    /// interfaces, pin its maps, and run until SIGINT or SIGTERM.
    Balance(balance::Args),
    /// Run the switch agent: load the `switch` XDP program, attach it to the given interfaces,
    /// steer VIP traffic to the active one of two load balancers and swap them when the active
    /// one fails.
    Switch(switch::Args),
    /// Show the state kept in the pinned maps (works whether or not an agent runs).
    #[serde(skip)]
    Status(status::Args),
    /// Measure the per-packet cost of each path through `balance` with BPF_PROG_TEST_RUN
    /// (used by `cargo xtask bench`; needs root, attaches nothing).
    #[command(hide = true)]
    #[serde(skip)]
    BenchXdp {
        /// Runs per path; the mean is reported.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Measure the cost of sealing and opening control messages with and without the MAC
    /// (used by `cargo xtask bench`; needs no root).
    #[command(hide = true)]
    #[serde(skip)]
    BenchControl {
        /// Runs per message and mode; the mean is reported.
        #[arg(long, default_value_t = 200_000)]
        repeat: u32,
    },
}

/// Runs an agent on a single-threaded tokio runtime: agents wait on timers and sockets, the
/// data path is in the kernel.
pub fn block_on(agent: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(agent)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `balance --config FILE`: the file's options where the command line gives none (config.rs).
    let cli: Cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(error) => match error.downcast::<clap::Error>() {
            Ok(error) => error.exit(),
            Err(error) => return Err(error),
        },
    };
    match cli.command {
        Command::Balance(args) => balance::run(&cli.pin_root, &args),
        Command::Switch(args) => switch::run(&cli.pin_root, &args),
        Command::Status(args) => status::run(&cli.pin_root, &args),
        Command::BenchXdp { repeat } => {
            for (path, mean) in testrun::bench(repeat)? {
                println!("{}", serde_json::json!({ "path": path, "ns_per_packet": mean.as_nanos() }));
            }
            Ok(())
        }
        Command::BenchControl { repeat } => {
            for row in control_auth::bench(repeat) {
                println!("{}", serde_json::to_string(&row)?);
            }
            Ok(())
        }
    }
}
