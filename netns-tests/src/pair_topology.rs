//! The full topology: clients, the switch, an active/backup pair of load balancers and the
//! backends, every host in a namespace of its own, two L2 segments (bridges in a shared
//! namespace).
//!
//! ```text
//!  client-i 10.78.0.50+i ─┐                              ┌─ lb-a 10.77.0.2  (balance)
//!   (VIP via 10.78.0.1)   ├─ br0 ── eth0 switch eth1 ── br1 ─┼─ lb-b 10.77.0.3  (balance)
//!                         ┘      10.78.0.1     10.77.0.1     └─ backend-i 10.77.0.11+i
//! ```
//!
//! The switch routes the VIP to whichever balancer is active (by MAC, in XDP) and the
//! balancers' replies back to the clients. The balancers do not hold the VIP as an address
//! (their XDP program takes VIP traffic before the stack; a blackhole route drops it silently
//! when no program runs) and route the client network via the switch. Forwarding is on in the switch and the balancers: the kernel's FIB lookup in XDP
//! answers only on forwarding interfaces. Every program attaches in generic (skb) mode, for
//! the reason given in [`crate::topology`].

use std::{path::PathBuf, sync::Mutex};

use xdp_lb_common::status::{BalanceStatus, Status, SwitchStatus};

use crate::{
    ControlKey, IpBatch, Netns, PinDir, Process, Result, RunPrefix, binary,
    netns::{LINK_MTU, attach, bridge_without_ip_hooks},
};

pub const VIP: &str = "10.77.9.100";
pub const SWITCH_CLIENT_SIDE: &str = "10.78.0.1";
pub const SWITCH_LB_SIDE: &str = "10.77.0.1";
pub const CONTROL_PORT: u16 = 6970;
pub use crate::topology::BACKEND_PORT;

#[must_use]
pub fn lb_addr(i: usize) -> String {
    format!("10.77.0.{}", 2 + i)
}

#[must_use]
pub fn backend_addr(i: usize) -> String {
    format!("10.77.0.{}", 11 + i)
}

#[must_use]
pub fn client_addr(i: usize) -> String {
    format!("10.78.0.{}", 50 + i)
}

/// Namespaces and links; processes are started separately so tests can kill and restart them.
pub struct PairTopology {
    /// Takes each balancer's link down at once when it is failed (see [`IpBatch`]).
    unplug: [Mutex<IpBatch>; 2],
    pub prefix: RunPrefix,
    pub clients: Vec<Netns>,
    pub switch: Netns,
    pub lbs: [Netns; 2],
    pub backends: Vec<Netns>,
    /// Pin roots of the switch and of each balancer (one per agent: they share the host's bpffs).
    pub switch_pins: PinDir,
    pub lb_pins: [PinDir; 2],
    /// Files the backends serve (one directory, shared by all backends, unless
    /// [`Uploads::own_roots`] gives each a directory of its own inside it).
    pub root: PathBuf,
    /// How the backends take uploads; `None` ([`PairTopology::new`]): they take none.
    pub uploads: Option<Uploads>,
    /// Filesystems mounted under `root` ([`Uploads::small_disk`]), unmounted on drop.
    mounts: Vec<PathBuf>,
    /// The control key file every agent gets (`--control-key-file`; a test's `extra` arguments
    /// may name another, the later flag wins). `None`: the agents run with `--insecure-control`.
    pub control_key: Option<ControlKey>,
    // Dropped last: deleting it removes both bridges and every bridge port.
    _bridges: Netns,
}

impl PairTopology {
    pub fn new(clients: usize, backends: usize) -> Result<Self> {
        let prefix = RunPrefix::new();
        let net = Netns::new(prefix.name("net"))?;
        for bridge in ["br0", "br1"] {
            net.ip(&["link", "add", bridge, "mtu", LINK_MTU, "type", "bridge"])?;
            net.ip(&["link", "set", bridge, "up"])?;
        }
        bridge_without_ip_hooks(&net);
        let root = std::env::temp_dir().join(prefix.name("root"));
        std::fs::create_dir_all(&root).map_err(crate::io_error(format!("create {}", root.display())))?;

        let switch = Netns::new(prefix.name("sw"))?;
        attach(&net, "br0", &switch, "eth0", "psw0", &format!("{SWITCH_CLIENT_SIDE}/24"))?;
        attach(&net, "br1", &switch, "eth1", "psw1", &format!("{SWITCH_LB_SIDE}/24"))?;
        forwarding(&switch)?;

        let lb = |i: usize| -> Result<Netns> {
            let ns = Netns::new(prefix.name(&format!("lb{i}")))?;
            attach(&net, "br1", &ns, "eth0", &format!("plb{i}"), &format!("{}/24", lb_addr(i)))?;
            // Not a local address: should the program be gone, the stack drops VIP packets
            // silently instead of answering "port unreachable", which aborts clients.
            ns.ip(&["route", "add", "blackhole", &format!("{VIP}/32")])?;
            forwarding(&ns)?;
            ns.ip(&["route", "add", "10.78.0.0/24", "via", SWITCH_LB_SIDE])?;
            Ok(ns)
        };
        let lbs = [lb(0)?, lb(1)?];
        let backends = (0..backends)
            .map(|i| {
                let ns = Netns::new(prefix.name(&format!("b{i}")))?;
                attach(&net, "br1", &ns, "eth0", &format!("pb{i}"), &format!("{}/24", backend_addr(i)))?;
                Ok(ns)
            })
            .collect::<Result<Vec<_>>>()?;
        let clients = (0..clients)
            .map(|i| {
                let ns = Netns::new(prefix.name(&format!("c{i}")))?;
                attach(&net, "br0", &ns, "eth0", &format!("pc{i}"), &format!("{}/24", client_addr(i)))?;
                ns.ip(&["route", "add", &format!("{VIP}/32"), "via", SWITCH_CLIENT_SIDE])?;
                Ok(ns)
            })
            .collect::<Result<Vec<_>>>()?;
        let switch_pins = PinDir::new(&prefix.name("sw"))?;
        let lb_pins = [PinDir::new(&prefix.name("lba"))?, PinDir::new(&prefix.name("lbb"))?];
        let control_key = Some(ControlKey::random(&prefix, "control", 1)?);
        let unplug = [Mutex::new(lbs[0].ip_batch()?), Mutex::new(lbs[1].ip_batch()?)];
        Ok(Self { unplug, prefix, clients, switch, lbs, backends, switch_pins, lb_pins, root, uploads: None, mounts: Vec::new(), control_key, _bridges: net })
    }

    /// The topology with backends that take uploads as `uploads` says: their roots made (and
    /// the small disk mounted) here, open to the unprivileged user the backends become.
    pub fn with_uploads(clients: usize, backends: usize, uploads: Uploads) -> Result<Self> {
        let mut topo = Self::new(clients, backends)?;
        let roots = topo.backend_roots_of(&uploads);
        for root in &roots {
            std::fs::create_dir_all(root).map_err(crate::io_error(format!("create {}", root.display())))?;
        }
        if let Some((i, mib)) = uploads.small_disk {
            let root = roots.get(i).filter(|_| uploads.own_roots).ok_or_else(|| crate::Error::Io {
                what: format!("a small disk for backend {i}"),
                source: std::io::Error::other("needs own_roots and an existing backend"),
            })?;
            crate::run("mount", &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", &root.display().to_string()])?;
            topo.mounts.push(root.clone());
        }
        for root in &roots {
            crate::files::share_dir(root, true)?;
        }
        topo.uploads = Some(uploads);
        Ok(topo)
    }

    /// The root backend `i` serves.
    #[must_use]
    pub fn backend_root(&self, i: usize) -> PathBuf {
        backend_root(&self.root, self.uploads.as_ref().is_some_and(|u| u.own_roots), i)
    }

    /// Every root the backends serve, once each (the shared root alone, or one per backend).
    #[must_use]
    pub fn backend_roots(&self) -> Vec<PathBuf> {
        match &self.uploads {
            Some(uploads) => self.backend_roots_of(uploads),
            None => vec![self.root.clone()],
        }
    }

    fn backend_roots_of(&self, uploads: &Uploads) -> Vec<PathBuf> {
        if uploads.own_roots { (0..self.backends.len()).map(|i| backend_root(&self.root, true, i)).collect() } else { vec![self.root.clone()] }
    }

    /// Starts the switch agent; balancer 0 starts active.
    pub fn start_switch(&self, extra: &[&str]) -> Result<Process> {
        let mut command = self.switch.command(binary("xdp-lb"));
        command.arg("--pin-root").arg(self.switch_pins.path());
        command.args(["switch", "--iface", "eth0", "--iface", "eth1", "--lb-iface", "eth1", "--xdp-mode", "skb", "--vip", VIP]);
        command.args(["--address", SWITCH_LB_SIDE]);
        self.control_key_args(&mut command);
        for i in 0..2 {
            command.args(["--lb", &format!("{}:{CONTROL_PORT}", lb_addr(i))]);
        }
        command.args(extra).env("RUST_LOG", "info");
        let mut agent = Process::spawn(self.prefix.name("switch"), command)?;
        // Returned once its program is attached (or it exited): until then traffic for the VIP
        // meets no program, and a status read shows the maps a predecessor left.
        agent.wait_for_output("switch attached", crate::process::AGENT_START);
        Ok(agent)
    }

    /// Starts balancer `i` with every backend registered and the other balancer as its peer.
    pub fn start_lb(&self, i: usize, extra: &[&str]) -> Result<Process> {
        self.start_lb_with(i, true, extra)
    }

    /// Starts balancer `i`; without `mirror` it keeps its sessions to itself (no --peer).
    pub fn start_lb_with(&self, i: usize, mirror: bool, extra: &[&str]) -> Result<Process> {
        let mut command = self.lbs[i].command(binary("xdp-lb"));
        command.arg("--pin-root").arg(self.lb_pins[i].path());
        command.args(["balance", "--iface", "eth0", "--xdp-mode", "skb", "--vip", VIP, "--address", &lb_addr(i)]);
        self.control_key_args(&mut command);
        if mirror {
            command.args(["--peer", &format!("{}:{CONTROL_PORT}", lb_addr(1 - i))]);
        }
        for b in 0..self.backends.len() {
            command.args(["--backend", &format!("{}:{BACKEND_PORT}", backend_addr(b))]);
        }
        command.args(extra).env("RUST_LOG", "info");
        let mut agent = Process::spawn(self.prefix.name(&format!("lb{i}")), command)?;
        // Returned once its program is attached (or it exited): until then traffic for the VIP
        // meets no program, and a status read shows the maps a predecessor left.
        agent.wait_for_output("balance attached", crate::process::AGENT_START);
        Ok(agent)
    }

    fn control_key_args(&self, command: &mut std::process::Command) {
        match &self.control_key {
            Some(key) => command.arg("--control-key-file").arg(key.path()),
            None => command.arg("--insecure-control"),
        };
    }

    /// Another host on the balancers' network (`br1`: the control network), with `address`
    /// (e.g. an attacker's: the tests send from it what the agents must refuse).
    pub fn add_control_host(&self, suffix: &str, address: &str) -> Result<Netns> {
        let ns = Netns::new(self.prefix.name(suffix))?;
        attach(self.bridges(), "br1", &ns, "eth0", &format!("p{suffix}"), &format!("{address}/24"))?;
        Ok(ns)
    }

    /// Starts backend `i` in steered mode on its root (the shared one unless
    /// [`Uploads::own_roots`]), taking uploads if the topology was made [`PairTopology::with_uploads`].
    pub fn start_backend(&self, i: usize) -> Result<Process> {
        let name = self.prefix.name(&format!("backend{i}"));
        let extra = self.uploads.as_ref().map(|u| u.backend_args(i, self.backends.len())).unwrap_or_default();
        crate::topology::start_steered_backend(&self.backends[i], &name, &self.backend_root(i), &backend_addr(i), &[&lb_addr(0), &lb_addr(1)], &extra)
    }

    /// Takes balancer `i` off the network (its link down): with its agent killed, nothing of
    /// it is left on the data path, whatever stays attached or pinned.
    pub fn unplug_lb(&self, i: usize) -> Result<()> {
        self.unplug[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner).run("link set eth0 down")
    }

    /// Fails balancer `i` the way the tests, the demo and the bench do: SIGKILL of its agent
    /// (if one runs), then its link down, then the agent's exit awaited. Returns the killed
    /// agent, whose log stays readable.
    pub fn fail_lb(&self, i: usize, agent: Option<Process>) -> Result<Option<Process>> {
        let mut killed = agent.map(|mut agent| {
            agent.sigkill();
            agent
        });
        self.unplug_lb(i)?;
        if let Some(agent) = &mut killed {
            agent.wait(std::time::Duration::from_secs(5));
        }
        Ok(killed)
    }

    /// Puts balancer `i` back on the network.
    pub fn plug_lb(&self, i: usize) -> Result<()> {
        self.lbs[i].ip(&["link", "set", "eth0", "up"])?;
        // The route via the switch went with the link.
        let _ = self.lbs[i].ip(&["route", "replace", "10.78.0.0/24", "via", SWITCH_LB_SIDE]);
        Ok(())
    }

    /// The namespace holding both bridges (`br0`: clients and switch; `br1`: switch, balancers
    /// and backends), where tests can impair traffic (see [`crate::impair`]).
    #[must_use]
    #[expect(clippy::used_underscore_binding, reason = "the field is named for its drop order")]
    pub fn bridges(&self) -> &Netns {
        &self._bridges
    }

    /// The non-zero decision counters of the switch and both balancers, a line each, and the
    /// balancers' sessions (for failure messages).
    #[must_use]
    pub fn counters_summary(&self) -> String {
        use std::fmt::Write as _;
        let roles = [("switch", &self.switch_pins), ("lb 0", &self.lb_pins[0]), ("lb 1", &self.lb_pins[1])];
        let mut summary = String::new();
        for (name, pins) in roles {
            let Ok(status) = self.status(pins) else { continue };
            let counters = status.switch.as_ref().map(|s| &s.counters).or(status.balance.as_ref().map(|b| &b.counters));
            let counters: Vec<String> = counters.into_iter().flatten().filter(|c| c.packets != 0).map(|c| format!("{}={}", c.name, c.packets)).collect();
            let _ = write!(summary, "\n--- {name} counters: {}", counters.join(" "));
            if let Some(sessions) = status.balance.map(|b| b.sessions).filter(|s| !s.is_empty()) {
                let _ = write!(summary, "\n--- {name} sessions: {sessions:?}");
            }
        }
        summary
    }

    /// The index of the balancer the switch calls active.
    pub fn active_lb(&self) -> Result<usize> {
        let status = self.switch_status()?;
        status.active().ok_or_else(|| crate::Error::Io {
            what: "find the active balancer in `xdp-lb status`".into(),
            source: std::io::Error::other(format!("{:?}", status.lbs)),
        })
    }

    /// `xdp-lb status --json` with one of the pin roots.
    pub fn status(&self, pins: &PinDir) -> Result<Status> {
        crate::topology::status_at(pins)
    }

    /// What balancer `i` reports (its pinned maps outlive its agent).
    pub fn lb_status(&self, i: usize) -> Result<BalanceStatus> {
        crate::topology::balance_at(&self.lb_pins[i])
    }

    /// What the switch reports.
    pub fn switch_status(&self) -> Result<SwitchStatus> {
        crate::topology::switch_at(&self.switch_pins)
    }
}

impl Drop for PairTopology {
    fn drop(&mut self) {
        // Lazily: a backend may still hold its root open (the cluster stops its processes after
        // the topology), and the directory below cannot go while something is mounted on it.
        for mount in self.mounts.drain(..) {
            let _ = crate::run("umount", &["--lazy", &mount.display().to_string()]);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// How the backends of a [`PairTopology::with_uploads`] take uploads (`--allow-upload`).
#[derive(Clone, Debug, Default)]
pub struct Uploads {
    /// Each backend serves a root of its own, `<root>/b<i>`, so that what lands on each can be
    /// told apart; false: the shared root, as downloads have it.
    pub own_roots: bool,
    /// Replicated uploads: each backend gets `--peer` with every other backend's steering
    /// address.
    pub replicate: bool,
    /// Backend `i`'s own root is a tmpfs of this many MiB: a disk that fills up during an
    /// upload. Needs `own_roots`.
    pub small_disk: Option<(usize, u32)>,
    /// More arguments for every backend (e.g. `--min-free-mib 1`, `--allow-overwrite`).
    pub backend_args: Vec<String>,
}

impl Uploads {
    /// Replicated uploads to backends with roots of their own: the setup the upload tests use.
    #[must_use]
    pub fn replicated() -> Self {
        Self { own_roots: true, replicate: true, ..Self::default() }
    }

    /// What backend `i` of `backends` gets beyond the topology's arguments.
    #[must_use]
    pub fn backend_args(&self, i: usize, backends: usize) -> Vec<String> {
        let mut args = vec!["--allow-upload".to_owned()];
        if self.replicate {
            for peer in (0..backends).filter(|&j| j != i) {
                args.extend(["--peer".to_owned(), format!("{}:{BACKEND_PORT}", backend_addr(peer))]);
            }
        }
        args.extend(self.backend_args.iter().cloned());
        args
    }
}

/// Backend `i`'s root under the topology's `root`: its own directory, or the shared one.
fn backend_root(root: &std::path::Path, own: bool, i: usize) -> PathBuf {
    if own { root.join(format!("b{i}")) } else { root.to_path_buf() }
}

fn forwarding(ns: &Netns) -> Result<()> {
    ns.exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicating_backend_names_every_other_backend_as_its_peer() {
        let uploads = Uploads { backend_args: vec!["--min-free-mib".into(), "1".into()], ..Uploads::replicated() };
        assert_eq!(
            uploads.backend_args(1, 3),
            ["--allow-upload", "--peer", "10.77.0.11:7000", "--peer", "10.77.0.13:7000", "--min-free-mib", "1"]
        );
        assert_eq!(Uploads::default().backend_args(0, 3), ["--allow-upload"], "no --peer without replication");
    }

    #[test]
    fn own_roots_are_one_directory_per_backend_inside_the_shared_one() {
        let root = std::path::Path::new("/tmp/r");
        assert_eq!(backend_root(root, true, 2), std::path::Path::new("/tmp/r/b2"));
        assert_eq!(backend_root(root, false, 2), root);
    }
}
