//! `cargo xtask <task>`: everything a developer or CI runs, in one place.
mod bench;
mod cargo;
mod demo;
mod plot;
mod setup;

use clap::{Parser, Subcommand};

/// Developer tasks for xdp-lb. Run as root: the tests and the demo create network namespaces and
/// attach XDP programs.
#[derive(Parser)]
#[command(name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and check everything the project needs (idempotent): rust-src, bpf-linker built
    /// against the toolchain's own LLVM, Debian packages (bpftool, iproute2, TFTP clients and
    /// servers), kernel BTF and bpffs.
    Setup(setup::Args),
    /// Build the whole workspace in release mode, kernel programs included.
    Build,
    /// Build, then run every test: unit, BPF_PROG_TEST_RUN and network-namespace tests (root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run the whole system in network namespaces (clients, switch, two load
    /// balancers, three backends): concurrent downloads with the active load balancer and then
    /// the serving backend killed mid-transfer, beside a run without failures; live progress
    /// and events, a results table, JSON and a PNG timeline under results/.
    Demo(demo::Args),
    /// Build, then measure side by side in one run: XDP cost per packet; goodput direct vs
    /// nftables DNAT vs xdp-lb; failover stalls; scaling and memory; tftp-backend vs tftpd-hpa
    /// and atftpd. Markdown tables on stdout, JSON and PNG under results/.
    Bench(bench::Args),
    /// Build, then run `xdp-lb` with the given arguments, e.g.
    /// `cargo xtask run -- balance --iface eth0`.
    Run {
        /// Arguments passed to `xdp-lb`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(args) => setup::run(&args),
        Task::Build => cargo::build(),
        Task::Test { args } => {
            cargo::build()?;
            cargo::test(&args)
        }
        Task::Demo(args) => {
            cargo::build()?;
            demo::run(&args)
        }
        Task::Bench(args) => {
            cargo::build()?;
            bench::run(&args)
        }
        Task::Run { args } => {
            cargo::build()?;
            cargo::exec_binary("xdp-lb", &args)
        }
    }
}
