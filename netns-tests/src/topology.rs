//! The load balancer topology: clients, one LB and backends on one L2 segment (a bridge in its
//! own namespace), every host in a namespace of its own.
//!
//! ```text
//!  client-0 ─┐                    ┌─ backend-0  10.77.0.11
//!  client-1 ─┤── br0 (net ns) ────┼─ backend-1  10.77.0.12
//!     ...    │                    └─ ...
//!            └── lb  10.77.0.2 (+ VIP 10.77.0.100/32), `balance` on eth0
//! ```
//!
//! The LB sends steered packets back out of the interface they came in on (XDP_TX). It
//! attaches in generic (skb) mode. Native mode on veth works only with an XDP program on the
//! peer too: the kernel wakes the peer for XDP_TX frames only then (without one they waited
//! ~50 ms, until other traffic woke it), and it copies every frame into a page of its own
//! (tried once with a pass-through program on the peer: one windowed 64 MiB download at
//! ~75 MB/s, against ~100 in generic mode). Links carry MTU 1600: the steering header adds 64
//! bytes to each DATA. Every veth has its tx offloads off ([`crate::veth_pair`]), so a
//! backend's own interface cuts the windows it sends with `--segment-offload` into datagrams,
//! as a NIC would.

use std::path::PathBuf;

use xdp_lb_common::status::{BackendState, BalanceStatus, Status, SwitchStatus};

use crate::{
    ControlKey, Netns, PinDir, Process, Result, RunPrefix, binary,
    netns::{LINK_MTU, attach, bridge_without_ip_hooks},
};

pub const VIP: &str = "10.77.0.100";
pub const LB_ADDR: &str = "10.77.0.2";
pub const STEER_PORT: u16 = 6969;
pub const BACKEND_PORT: u16 = 7000;

#[must_use]
pub fn backend_addr(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

#[must_use]
pub fn client_addr(i: usize) -> String {
    format!("10.77.0.{}", 50 + i)
}

/// Namespaces and links; processes are started separately so tests can kill and restart them.
pub struct LbTopology {
    pub prefix: RunPrefix,
    pub clients: Vec<Netns>,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub pins: PinDir,
    /// Files the backends serve (one directory, shared by all backends).
    pub root: PathBuf,
    /// The balancer's `--control-key-file` (it has no switch nor peer, but an agent without a
    /// key does not start).
    pub control_key: ControlKey,
    // Dropped last: deleting it removes the bridge and every bridge port.
    _bridge: Netns,
}

impl LbTopology {
    pub fn new(clients: usize, backends: usize) -> Result<Self> {
        let prefix = RunPrefix::new();
        let net = Netns::new(prefix.name("net"))?;
        net.ip(&["link", "add", "br0", "mtu", LINK_MTU, "type", "bridge"])?;
        net.ip(&["link", "set", "br0", "up"])?;
        bridge_without_ip_hooks(&net);
        let pins = PinDir::new(&prefix.name("lb"))?;
        let root = std::env::temp_dir().join(prefix.name("root"));
        std::fs::create_dir_all(&root).map_err(crate::io_error(format!("create {}", root.display())))?;
        let lb = Netns::new(prefix.name("lb"))?;
        attach_host(&net, &lb, "plb", &[&format!("{LB_ADDR}/24"), &format!("{VIP}/32")])?;
        let backends = (0..backends)
            .map(|i| {
                let ns = Netns::new(prefix.name(&format!("b{i}")))?;
                attach_host(&net, &ns, &format!("pb{i}"), &[&format!("{}/24", backend_addr(i))])?;
                Ok(ns)
            })
            .collect::<Result<Vec<_>>>()?;
        let clients = (0..clients)
            .map(|i| {
                let ns = Netns::new(prefix.name(&format!("c{i}")))?;
                attach_host(&net, &ns, &format!("pc{i}"), &[&format!("{}/24", client_addr(i))])?;
                Ok(ns)
            })
            .collect::<Result<Vec<_>>>()?;
        let control_key = ControlKey::random(&prefix, "control", 1)?;
        Ok(Self { prefix, clients, lb, backends, pins, root, control_key, _bridge: net })
    }

    /// Starts the load balancer agent with every backend registered.
    pub fn start_lb(&self, extra: &[&str]) -> Result<Process> {
        let mut command = self.lb.command(binary("xdp-lb"));
        command.arg("--pin-root").arg(self.pins.path());
        command.args(["balance", "--iface", "eth0", "--xdp-mode", "skb", "--vip", VIP, "--address", LB_ADDR]);
        command.arg("--control-key-file").arg(self.control_key.path());
        for i in 0..self.backends.len() {
            command.args(["--backend", &format!("{}:{BACKEND_PORT}", backend_addr(i))]);
        }
        command.args(extra).env("RUST_LOG", "info");
        let mut agent = Process::spawn(self.prefix.name("agent"), command)?;
        // Returned once its program is attached (or it exited): until then traffic for the VIP
        // meets no program, and a status read shows the maps a predecessor left.
        agent.wait_for_output("balance attached", crate::process::AGENT_START);
        Ok(agent)
    }

    /// Starts backend `i` in steered mode on the shared root.
    pub fn start_backend(&self, i: usize) -> Result<Process> {
        start_steered_backend(&self.backends[i], &self.prefix.name(&format!("backend{i}")), &self.root, &backend_addr(i), &[LB_ADDR], &[])
    }

    /// The namespace holding the bridge, where benches and tests can impair traffic (see
    /// [`crate::impair`]).
    #[must_use]
    #[expect(clippy::used_underscore_binding, reason = "the field is named for its drop order")]
    pub fn bridge(&self) -> &Netns {
        &self._bridge
    }

    /// `xdp-lb status --json` for this topology's balancer.
    pub fn status(&self) -> Result<BalanceStatus> {
        balance_at(&self.pins)
    }
}

/// Starts `tftp-backend --steered` in `host`, serving `root` on `address`:[`BACKEND_PORT`] to
/// the balancers at `lbs` (both topologies' backends), with `extra` arguments after the rest.
pub(crate) fn start_steered_backend(host: &Netns, name: &str, root: &std::path::Path, address: &str, lbs: &[&str], extra: &[String]) -> Result<Process> {
    let mut command = host.command(binary("tftp-backend"));
    command.arg("--root").arg(root);
    command.args(["--steered", "--segment-offload", "--listen", &format!("{address}:{BACKEND_PORT}")]);
    for lb in lbs {
        command.args(["--lb", lb]);
    }
    command.args(extra);
    command.env("RUST_LOG", crate::process::backend_log_filter());
    Process::spawn(name, command)
}

/// The balancer's part of [`status_at`] (an error when no balancer's maps are pinned there).
pub fn balance_at(pins: &PinDir) -> Result<BalanceStatus> {
    status_at(pins)?.balance.ok_or_else(|| missing_role(pins, "balancer"))
}

/// The switch's part of [`status_at`].
pub fn switch_at(pins: &PinDir) -> Result<SwitchStatus> {
    status_at(pins)?.switch.ok_or_else(|| missing_role(pins, "switch"))
}

fn missing_role(pins: &PinDir, role: &str) -> crate::Error {
    crate::Error::Io { what: format!("`xdp-lb status` under {}", pins.path().display()), source: std::io::Error::other(format!("no {role} maps pinned")) }
}

/// `xdp-lb --pin-root <pins> status --json`, parsed into the agent's own types.
pub fn status_at(pins: &PinDir) -> Result<Status> {
    status_in(pins.path())
}

/// [`status_at`] for a pin root given by its path (a watcher thread holds a path, not the
/// [`PinDir`] that removes it).
pub fn status_in(pin_root: &std::path::Path) -> Result<Status> {
    let out = crate::run(&binary("xdp-lb").display().to_string(), &["--pin-root", &pin_root.display().to_string(), "status", "--json"])?;
    serde_json::from_str(&out).map_err(|e| crate::Error::Io {
        what: "parse xdp-lb status --json".into(),
        source: std::io::Error::other(e),
    })
}

/// Waits until a balancer's status (`status()`, e.g. [`balance_at`]) shows `n` live backends
/// that answered within the last 100 ms: the agent's heartbeats reach them and come back, so a
/// measurement starts with the balancer in its steady state. Called after the agent attached
/// (the topologies' `start_lb` waits for that); the first 100 ms are skipped, so an answer the
/// maps still hold from a predecessor agent is too old to count.
pub fn wait_answering(what: &str, n: usize, status: impl Fn() -> Option<BalanceStatus>) -> Result<()> {
    std::thread::sleep(std::time::Duration::from_millis(100));
    crate::wait_for(what, 20, || {
        let status = status()?;
        let fresh = status.backends.iter().filter(|b| b.state == BackendState::Live && b.watch.last_answer_ms_ago.is_some_and(|ms| ms < 100)).count();
        (fresh >= n).then_some(())
    })?;
    Ok(())
}

impl Drop for LbTopology {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Connects `host` to the bridge: `eth0` in the host, `port` on the bridge, with addresses.
fn attach_host(net: &Netns, host: &Netns, port: &str, addresses: &[&str]) -> Result<()> {
    attach(net, "br0", host, "eth0", port, addresses[0])?;
    for address in &addresses[1..] {
        host.add_address("eth0", address)?;
    }
    Ok(())
}
