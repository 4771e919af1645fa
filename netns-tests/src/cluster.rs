//! The full topology running: the switch, both balancers and every backend, owned by one
//! type that answers what every test asks (logs, the active balancer, the serving backend,
//! counters, the failure detector's verdicts) and injects the failures (balancer, backend).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xdp_lb_common::{BalanceCounter, SwitchCounter};

use crate::{
    Process,
    clients::Client,
    files::make_file,
    Error, Result,
    pair_topology::{PairTopology, Uploads, VIP},
    require_root, wait_for,
};

const TFTP_PORT: u16 = 69;

/// How a cluster's agents run, beyond the topology's defaults.
#[derive(Clone, Copy, Debug)]
pub struct Agents<'a> {
    /// The balancers sync sessions (false: a promoted one knows nothing).
    pub mirror: bool,
    /// More arguments for both balancers (a later flag wins over the topology's).
    pub lb_args: &'a [&'a str],
    /// More arguments for the switch.
    pub switch_args: &'a [&'a str],
}

impl Default for Agents<'_> {
    fn default() -> Self {
        Self { mirror: true, lb_args: &[], switch_args: &[] }
    }
}

/// The topology with the switch, both balancers and every backend running.
pub struct Cluster {
    pub topo: PairTopology,
    pub backends: Vec<Option<Process>>,
    pub lbs: [Option<Process>; 2],
    pub switch: Process,
    /// Killed processes, kept so their logs are printed if the test fails.
    pub killed: Vec<Process>,
    // Last: released after everything above is gone.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One topology at a time: each runs several agents and up to twenty clients, and the
/// measured stalls mean little on an overloaded machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    #[must_use]
    pub fn start(clients: usize, backends: usize) -> Self {
        Self::start_mirroring(clients, backends, true)
    }

    /// With `mirror` false the balancers do not sync sessions: a promoted one knows nothing.
    #[must_use]
    pub fn start_mirroring(clients: usize, backends: usize, mirror: bool) -> Self {
        Self::start_with(clients, backends, mirror, &[])
    }

    /// Both balancers get `lb_args` too.
    #[must_use]
    pub fn start_with(clients: usize, backends: usize, mirror: bool, lb_args: &[&str]) -> Self {
        require_root();
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let topo = PairTopology::new(clients, backends).expect("topology");
        Self::run_with(topo, turn, &Agents { mirror, lb_args, switch_args: &[] }).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Backends that take uploads as `uploads` says (their own roots, replication).
    #[must_use]
    pub fn start_uploads(clients: usize, backends: usize, uploads: Uploads) -> Self {
        require_root();
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let topo = PairTopology::with_uploads(clients, backends, uploads).expect("topology");
        Self::run_with(topo, turn, &Agents::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts everything on a topology the test prepared (e.g. without control keys).
    #[must_use]
    pub fn start_on(topo: PairTopology) -> Self {
        require_root();
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::run_with(topo, turn, &Agents::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Cluster::start_on`] for a caller that is not a test (the demo, the benches): an error
    /// instead of a panic, with the agents' logs when they did not come up.
    pub fn try_start_on(topo: PairTopology, agents: &Agents<'_>) -> Result<Self> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::run_with(topo, turn, agents)
    }

    fn run_with(topo: PairTopology, turn: std::sync::MutexGuard<'static, ()>, agents: &Agents<'_>) -> Result<Self> {
        let backends = topo.backends.len();
        let mut backend_processes: Vec<Option<Process>> = (0..backends).map(|i| topo.start_backend(i).map(Some)).collect::<Result<_>>()?;
        let lbs = [topo.start_lb_with(0, agents.mirror, agents.lb_args)?, topo.start_lb_with(1, agents.mirror, agents.lb_args)?].map(Some);
        // A backend that refused its arguments is gone by now: say so at once, with its words.
        for (i, backend) in backend_processes.iter_mut().enumerate() {
            if let Some(backend) = backend.as_mut()
                && !backend.is_running()
            {
                return Err(Error::Io { what: format!("backend {i} exited at start:\n{}", backend.log()), source: std::io::Error::other("no backend") });
            }
        }
        let switch = topo.start_switch(agents.switch_args)?;
        let running = Self { topo, backends: backend_processes, lbs, switch, killed: Vec::new(), _turn: turn };
        for lb in 0..2 {
            running.await_backends_live(lb, backends)?;
        }
        running.await_lbs_reachable(&[0, 1])?;
        Ok(running)
    }

    /// Agent logs and the non-zero counters of every role, for failure messages.
    #[must_use]
    pub fn logs(&self) -> String {
        use std::fmt::Write as _;
        let mut all = format!("--- switch\n{}", self.switch.log());
        for (i, lb) in self.lbs.iter().enumerate() {
            if let Some(lb) = lb {
                let _ = write!(all, "\n--- lb {i}\n{}", lb.log());
            }
        }
        all + &self.topo.counters_summary()
    }

    pub fn wait_backends_live(&self, lb: usize, n: usize) {
        self.await_backends_live(lb, n).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits until the switch has heard from each of these balancers.
    pub fn wait_lbs_reachable(&self, lbs: &[usize]) {
        self.await_lbs_reachable(lbs).unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Cluster::wait_backends_live`] as a `Result` (for the demo and the benches).
    pub fn await_backends_live(&self, lb: usize, n: usize) -> Result<()> {
        self.logged(wait_for(&format!("{n} live backends at balancer {lb}"), 20, || {
            (self.topo.lb_status(lb).ok()?.live_backends() >= n).then_some(())
        }))
    }

    /// [`Cluster::wait_lbs_reachable`] as a `Result`.
    pub fn await_lbs_reachable(&self, lbs: &[usize]) -> Result<()> {
        self.logged(wait_for("the switch to reach the balancers", 20, || {
            let all = self.topo.switch_status().ok()?.lbs;
            lbs.iter().all(|&i| all.get(i).is_some_and(|lb| lb.reachable)).then_some(())
        }))
    }

    /// A wait that timed out, with every agent's log and the backends' (one that never came up
    /// tells why only there, and its process is gone before the test panics).
    fn logged(&self, waited: Result<()>) -> Result<()> {
        waited.map_err(|e| match e {
            Error::Timeout { what, seconds } => {
                let backends: String = self.backends.iter().enumerate().filter_map(|(i, b)| Some(format!("\n--- backend {i}\n{}", b.as_ref()?.log()))).collect();
                Error::Timeout { what: format!("{what}; logs:\n{}{backends}", self.logs()), seconds }
            }
            other => other,
        })
    }

    #[must_use]
    pub fn active_lb(&self) -> usize {
        self.topo.active_lb().expect("the switch's status")
    }

    /// Kills balancer `i`: SIGKILL of its agent and its link down.
    pub fn kill_lb(&mut self, i: usize) {
        let killed = self.topo.fail_lb(i, self.lbs[i].take()).expect("link down");
        self.killed.extend(killed);
    }

    /// Kills balancer `i` with the switch agent stopped: the switch has no verdict and steers
    /// the next request to the dead balancer (a request in the moments before a verdict, made
    /// so every time). Returns the requests the switch kept so far, for
    /// [`Cluster::release_switch_after_request`].
    pub fn kill_lb_unseen(&mut self, i: usize) -> u64 {
        let kept = self.requests_kept();
        self.switch.pause();
        self.kill_lb(i);
        kept
    }

    /// After [`Cluster::kill_lb_unseen`]: waits until the switch kept a request after the
    /// `kept` before (one steered to the dead balancer), for at most `within` and while
    /// `going` holds, then lets the switch agent run again either way. When the request was
    /// steered; `None` if none came.
    pub fn release_switch_after_request(&mut self, kept: u64, within: Duration, mut going: impl FnMut() -> bool) -> Option<Instant> {
        let deadline = Instant::now() + within;
        let steered = loop {
            if self.requests_kept() != kept {
                break Some(Instant::now());
            }
            if Instant::now() > deadline || !going() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        self.switch.resume();
        steered
    }

    /// Requests the switch kept on their way to a balancer (`request_kept`).
    fn requests_kept(&self) -> u64 {
        self.topo.switch_status().map_or(0, |s| s.counter(SwitchCounter::RequestKept).packets)
    }

    /// Brings balancer `i` back: link up, a fresh agent (it re-adopts its pinned maps).
    pub fn restart_lb(&mut self, i: usize) {
        self.restart_lb_with(i, &[]);
    }

    /// Brings balancer `i` back with `extra` arguments (a later flag wins over the topology's).
    pub fn restart_lb_with(&mut self, i: usize, extra: &[&str]) {
        self.topo.plug_lb(i).expect("link up");
        self.lbs[i] = Some(self.topo.start_lb(i, extra).expect("restart lb"));
        self.wait_backends_live(i, self.backends.iter().filter(|b| b.is_some()).count());
    }

    /// The balancer-side session of the client, if the balancer's maps have one.
    #[must_use]
    pub fn serving_backend(&self, lb: usize) -> Option<usize> {
        let session = self.topo.lb_status(lb).ok()?.sessions.into_iter().find(|s| s.block > 0)?;
        usize::try_from(session.backend).ok()
    }

    /// The backend of the balancer's first session, whether or not a backend has answered it.
    #[must_use]
    pub fn session_backend(&self, lb: usize) -> Option<usize> {
        let session = self.topo.lb_status(lb).ok()?.sessions.into_iter().next()?;
        usize::try_from(session.backend).ok()
    }

    pub fn kill_backend(&mut self, i: usize) {
        if let Some(mut backend) = self.backends[i].take() {
            backend.kill_hard();
            self.killed.push(backend);
        }
    }

    /// The failover events the agents logged: detection, swap, takeover, first data.
    pub fn print_timeline(&self) {
        let agents = self.lbs.iter().flatten().chain(self.killed.iter()).chain(std::iter::once(&self.switch));
        let mut events: Vec<String> = agents
            .flat_map(|p| p.log().lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| ["dead", "swapped", "now the active", "first DATA"].iter().any(|w| l.contains(w)))
            .collect();
        events.sort();
        for event in events {
            println!("  {event}");
        }
    }

    /// Packets that took decision `counter` at balancer `lb` (from its pinned counters, which
    /// outlive its agent).
    #[must_use]
    pub fn counter(&self, lb: usize, counter: BalanceCounter) -> u64 {
        self.topo.lb_status(lb).expect("status").counter(counter).packets
    }

    /// Replies both balancers delivered to clients.
    #[must_use]
    pub fn delivered(&self) -> u64 {
        self.delivered_bytes().0
    }

    /// Replies both balancers delivered to clients, (packets, bytes) (from their pinned
    /// counters, which outlive a killed agent; a balancer whose status cannot be read adds
    /// nothing).
    #[must_use]
    pub fn delivered_bytes(&self) -> (u64, u64) {
        let mut total = (0, 0);
        for status in (0..2).filter_map(|lb| self.topo.lb_status(lb).ok()) {
            for counter in [BalanceCounter::ToClient, BalanceCounter::Relearned].map(|c| status.counter(c)) {
                total.0 += counter.packets;
                total.1 += counter.bytes;
            }
        }
        total
    }

    /// A test file every backend serves: in the shared root, or copied into each backend's own
    /// ([`crate::pair_topology::Uploads::own_roots`]). Returns the first copy.
    #[must_use]
    pub fn file(&self, name: &str, size: usize, seed: u64) -> PathBuf {
        let roots = self.topo.backend_roots();
        let path = roots[0].join(name);
        make_file(&path, size, seed).expect("test file");
        for root in &roots[1..] {
            std::fs::copy(&path, root.join(name)).expect("test file copy");
        }
        path
    }

    #[must_use]
    pub fn local(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(self.topo.prefix.name(name))
    }

    #[must_use]
    pub fn download(&self, client: usize, how: Client, remote: &str, local: &Path) -> Process {
        let command = how.download(&self.topo.clients[client], VIP, TFTP_PORT, remote, local);
        Process::spawn(self.topo.prefix.name(&format!("dl-{}", local.file_name().unwrap().to_string_lossy())), command)
            .expect("start client")
    }

    /// Client `client` uploads `local` as `remote` to the VIP.
    #[must_use]
    pub fn upload(&self, client: usize, how: Client, local: &Path, remote: &str) -> Process {
        let command = how.upload(&self.topo.clients[client], VIP, TFTP_PORT, local, remote);
        Process::spawn(self.topo.prefix.name(&format!("ul{client}-{remote}")), command).expect("start client")
    }
}

/// What the failure detectors concluded during a test: death verdicts and swaps, from the
/// agents' logs (killed agents included) and their pinned health records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// "backend dead" lines of both balancers' agents.
    pub backends: usize,
    /// "load balancer dead" lines of the switch agent.
    pub balancers: usize,
    /// "swapped" lines of the switch agent.
    pub swaps: usize,
    /// Every such line, and the agents' warnings about late ticks and flapping, for messages.
    pub lines: Vec<String>,
}

impl Cluster {
    fn agents(&self) -> impl Iterator<Item = &Process> {
        self.lbs.iter().flatten().chain(self.killed.iter()).chain(std::iter::once(&self.switch))
    }

    /// The verdicts every agent of this cluster logged so far.
    #[must_use]
    pub fn verdicts(&self) -> Verdicts {
        let mut verdicts = Verdicts::default();
        for agent in self.agents() {
            for line in agent.log().lines() {
                let counted = if line.contains("backend dead") {
                    verdicts.backends += 1;
                    true
                } else if line.contains("load balancer dead") {
                    verdicts.balancers += 1;
                    true
                } else if line.contains("swapped") {
                    verdicts.swaps += 1;
                    true
                } else {
                    false
                };
                if counted || line.contains("flapping") || line.contains("tick late") {
                    verdicts.lines.push(line.to_owned());
                }
            }
        }
        verdicts
    }

    /// Death verdicts recorded in the pinned health maps (`xdp-lb status`): backends at both
    /// balancers, and the balancers at the switch. They outlive killed agents.
    #[must_use]
    pub fn recorded_verdicts(&self) -> (u64, u64) {
        let backends = (0..2).filter_map(|i| self.topo.lb_status(i).ok()).flat_map(|s| s.backends).map(|b| b.watch.health.verdicts).sum();
        let balancers = self.topo.switch_status().map_or(0, |s| s.lbs.iter().map(|lb| lb.watch.health.verdicts).sum());
        (backends, balancers)
    }
}
