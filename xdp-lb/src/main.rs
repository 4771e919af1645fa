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
mod sched;
mod status;
mod switch;
#[cfg(test)]
mod switch_hostile_tests;
#[cfg(test)]
mod switch_tests;
mod testrun;

use std::path::PathBuf;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use xdp_lb_common::names::DEFAULT_PIN_ROOT;

/// Highly available TFTP: XDP load balancers that steer every transfer to a live backend.
#[derive(Parser)]
#[command(name = "xdp-lb", version, about, long_about = None, args_override_self = true)]
struct Cli {
    /// bpffs directory under which each role pins its maps (`<pin-root>/<role>/<MAP>`). Use a
    /// separate directory per instance when several run on one host.
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT, value_name = "DIR")]
    pin_root: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer agent: load the `balance` XDP program, attach it to the given
    /// interfaces, pin its maps, and run until SIGINT or SIGTERM.
    Balance(balance::Args),
    /// Run the switch agent: load the `switch` XDP program, attach it to the given interfaces,
    /// steer VIP traffic to the active one of two load balancers and swap them when the active
    /// one fails.
    Switch(switch::Args),
    /// Show the state kept in the pinned maps (works whether or not an agent runs).
    Status(status::Args),
    /// Measure the per-packet cost of each path through `balance` with BPF_PROG_TEST_RUN
    /// (used by `cargo xtask bench`; needs root, attaches nothing).
    #[command(hide = true)]
    BenchXdp {
        /// Runs per path; the mean is reported.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// Measure the cost of sealing and opening control messages with and without the MAC
    /// (used by `cargo xtask bench`; needs no root).
    #[command(hide = true)]
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
    // `balance --config FILE`: the file's options go before the command line's (config.rs).
    let command = config::with_config_flag(Cli::command());
    let args = config::expand(std::env::args_os().collect(), &command)?;
    let cli = Cli::from_arg_matches(&command.get_matches_from(args)).unwrap_or_else(|error| error.exit());
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
