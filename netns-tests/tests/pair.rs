//! The whole system: clients, the switch, an active/backup pair of load balancers and steered
//! backends, in namespaces, with stock clients. Balancers and backends are killed mid-transfer;
//! every file must arrive byte-identical, and each test reports the stall after each failure
//! and the bytes the server side sent twice.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netns_tests::{
    Process,
    clients::{Client, expect_download},
    files::make_file,
    pair_topology::{PairTopology, VIP},
    require_root, wait_for,
    watch::{Growth, stall_after, wait_for_size},
};

const TFTP_PORT: u16 = 69;
const MIB: usize = 1024 * 1024;
/// The block size `Client::Atftp` asks for.
const BLKSIZE: u64 = 1468;

/// The topology with the switch, both balancers and every backend running.
struct Running {
    topo: PairTopology,
    backends: Vec<Option<Process>>,
    lbs: [Option<Process>; 2],
    switch: Process,
    /// Killed processes, kept so their logs are printed if the test fails.
    killed: Vec<Process>,
    // Last: released after everything above is gone.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One topology at a time: each runs several agents and up to twenty clients, and the
/// measured stalls mean little on an overloaded machine.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Running {
    fn start(clients: usize, backends: usize) -> Self {
        Self::start_mirroring(clients, backends, true)
    }

    /// With `mirror` false the balancers do not sync sessions: a promoted one knows nothing.
    fn start_mirroring(clients: usize, backends: usize, mirror: bool) -> Self {
        Self::start_with(clients, backends, mirror, &[])
    }

    /// Both balancers get `lb_args` too.
    fn start_with(clients: usize, backends: usize, mirror: bool, lb_args: &[&str]) -> Self {
        require_root();
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let topo = PairTopology::new(clients, backends).expect("topology");
        let backend_processes = (0..backends).map(|i| Some(topo.start_backend(i).expect("backend"))).collect();
        let lbs = [0, 1].map(|i| Some(topo.start_lb_with(i, mirror, lb_args).expect("lb")));
        let switch = topo.start_switch(&[]).expect("xdp-lb switch");
        let running = Self { topo, backends: backend_processes, lbs, switch, killed: Vec::new(), _turn: turn };
        for lb in 0..2 {
            running.wait_backends_live(lb, backends);
        }
        running.wait_lbs_reachable(&[0, 1]);
        running
    }

    /// Agent logs and the non-zero counters of every role, for failure messages.
    fn logs(&self) -> String {
        use std::fmt::Write as _;
        let mut all = format!("--- switch\n{}", self.switch.log());
        for (i, lb) in self.lbs.iter().enumerate() {
            if let Some(lb) = lb {
                let _ = write!(all, "\n--- lb {i}\n{}", lb.log());
            }
        }
        all + &self.topo.counters_summary()
    }

    fn wait_backends_live(&self, lb: usize, n: usize) {
        wait_for(&format!("{n} live backends at balancer {lb}"), 20, || {
            let status = self.topo.status(&self.topo.lb_pins[lb]).ok()?;
            let live = status["balance"]["backends"].as_array()?.iter().filter(|b| b["state"] == "live").count();
            (live >= n).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", self.logs()));
    }

    /// Waits until the switch has heard from each of these balancers.
    fn wait_lbs_reachable(&self, lbs: &[usize]) {
        wait_for("the switch to reach the balancers", 20, || {
            let status = self.topo.status(&self.topo.switch_pins).ok()?;
            let all = status["switch"]["lbs"].as_array()?;
            lbs.iter().all(|&i| all.get(i).is_some_and(|lb| lb["reachable"] == true)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; logs:\n{}", self.logs()));
    }

    fn active_lb(&self) -> usize {
        self.topo.active_lb().expect("the switch's status")
    }

    /// Kills balancer `i`: SIGKILL of its agent and its link down.
    fn kill_lb(&mut self, i: usize) {
        let killed = self.topo.fail_lb(i, self.lbs[i].take()).expect("link down");
        self.killed.extend(killed);
    }

    /// Brings balancer `i` back: link up, a fresh agent (it re-adopts its pinned maps).
    fn restart_lb(&mut self, i: usize) {
        self.topo.plug_lb(i).expect("link up");
        self.lbs[i] = Some(self.topo.start_lb(i, &[]).expect("restart lb"));
        self.wait_backends_live(i, self.backends.iter().filter(|b| b.is_some()).count());
    }

    /// The balancer-side session of the client, if the balancer's maps have one.
    fn serving_backend(&self, lb: usize) -> Option<usize> {
        let status = self.topo.status(&self.topo.lb_pins[lb]).ok()?;
        let sessions = status["balance"]["sessions"].as_array()?;
        let session = sessions.iter().find(|s| s["block"].as_u64().unwrap_or(0) > 0)?;
        usize::try_from(session["backend"].as_u64()?).ok()
    }

    fn kill_backend(&mut self, i: usize) {
        if let Some(mut backend) = self.backends[i].take() {
            backend.kill_hard();
            self.killed.push(backend);
        }
    }

    /// The failover events the agents logged: detection, swap, takeover, first data.
    fn print_timeline(&self) {
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

    /// Packets that took decision `name` at balancer `lb` (from its pinned counters, which
    /// outlive its agent).
    fn counter(&self, lb: usize, name: &str) -> u64 {
        let status = self.topo.status(&self.topo.lb_pins[lb]).expect("status");
        let counters = status["balance"]["counters"].as_array().expect("counters").clone();
        counters.iter().find(|c| c["name"] == name).and_then(|c| c["packets"].as_u64()).unwrap_or(0)
    }

    /// Replies both balancers delivered to clients.
    fn delivered(&self) -> u64 {
        (0..2).map(|i| self.counter(i, "to_client") + self.counter(i, "relearned")).sum()
    }

    fn file(&self, name: &str, size: usize, seed: u64) -> PathBuf {
        let path = self.topo.root.join(name);
        make_file(&path, size, seed).expect("test file");
        path
    }

    fn local(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(self.topo.prefix.name(name))
    }

    fn download(&self, client: usize, how: Client, remote: &str, local: &Path) -> Process {
        let command = how.download(&self.topo.clients[client], VIP, TFTP_PORT, remote, local);
        Process::spawn(self.topo.prefix.name(&format!("dl-{}", local.file_name().unwrap().to_string_lossy())), command)
            .expect("start client")
    }
}

/// Waits for a download to finish successfully and checks its content.
fn finish(download: Process, local: &Path, source: &Path, timeout: Duration, what: &str, logs: impl Fn() -> String) {
    expect_download(download, local, source, timeout, what, logs);
}

/// Without failures: each stock client downloads through the switch and the active balancer.
#[test]
fn downloads_through_switch_and_active_balancer() {
    let running = Running::start(1, 2);
    let source = running.file("plain.bin", 3 * MIB + 77, 1);
    for how in [Client::TftpHpa, Client::Atftp { blksize: 1468, windowsize: 16 }, Client::Curl { blksize: 1468 }] {
        let local = running.local(&format!("plain-{}", how.name()));
        let download = running.download(0, how, "plain.bin", &local);
        finish(download, &local, &source, Duration::from_secs(30), &how.name(), || running.logs());
    }
    assert_eq!(running.active_lb(), 0, "no failure, no swap");
    assert!(running.counter(0, "to_client") > 3 * (3 * MIB as u64 / BLKSIZE), "the active balancer carried the data");
    assert_eq!(running.counter(1, "to_client"), 0, "the backup carried nothing");
}

/// A failure injected once the download reached a fraction of the file.
type Step<'a> = (f64, &'a dyn Fn(&mut Running));

/// One atftp transfer through the pair with failures injected on the way. Reports the stall
/// after each failure and the DATA the balancers delivered twice.
fn transfer_with_failures(running: &mut Running, size: usize, steps: &[Step<'_>]) {
    let source = running.file("big.bin", size, 7);
    let local = running.local("big-atftp");
    let download = running.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "big.bin", &local);
    let growth = Growth::watch(local.clone());
    let mut failures = Vec::new();
    for (fraction, step) in steps {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "a byte count")]
        let at = (size as f64 * fraction) as u64;
        assert!(wait_for_size(&local, at, Duration::from_secs(60)), "transfer did not reach {at} bytes\n{}", running.logs());
        step(running);
        failures.push(Instant::now());
    }
    finish(download, &local, &source, Duration::from_secs(120), "atftp through the pair", || running.logs());
    let samples = growth.stop();
    for (i, at) in failures.iter().enumerate() {
        println!("failure {}: data stalled {} ms", i + 1, stall_after(&samples, *at).as_millis());
    }
    running.print_timeline();
    // One OACK and size/blksize + 1 DATA are needed; every further reply was a resend.
    let needed = size as u64 / BLKSIZE + 2;
    let twice = running.delivered().saturating_sub(needed);
    println!("DATA sent twice: {twice} packets, about {} KiB", twice * BLKSIZE / 1024);
}

#[test]
fn active_balancer_killed_mid_transfer() {
    let mut running = Running::start(1, 2);
    assert_eq!(running.active_lb(), 0, "the first --lb starts active");
    transfer_with_failures(&mut running, 64 * MIB, &[(0.5, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1, "the switch swapped to the backup");
    assert!(running.counter(1, "to_client") + running.counter(1, "relearned") > 0, "the new active balancer carried data");
}

#[test]
fn serving_backend_then_active_balancer_killed_in_one_transfer() {
    let mut running = Running::start(1, 3);
    let kill_serving_backend = |r: &mut Running| {
        let serving = r.serving_backend(0).expect("a session with a backend at balancer 0");
        r.kill_backend(serving);
    };
    transfer_with_failures(&mut running, 64 * MIB, &[(0.3, &kill_serving_backend), (0.6, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1);
    assert!(running.counter(0, "moved") + running.counter(1, "moved") <= 1, "moves are the agents' job");
}

#[test]
fn balancer_restarted_then_the_new_active_one_killed() {
    let mut running = Running::start(1, 2);
    let kill_restart = |r: &mut Running| {
        r.kill_lb(0);
        wait_for("the swap to balancer 1", 10, || (r.active_lb() == 1).then_some(())).expect("swap");
        r.restart_lb(0);
        r.wait_lbs_reachable(&[0]);
        // Give the restarted backup a full sync before the next failure.
        std::thread::sleep(Duration::from_millis(1200));
    };
    transfer_with_failures(&mut running, 96 * MIB, &[(0.25, &kill_restart), (0.7, &|r| r.kill_lb(1))]);
    assert_eq!(running.active_lb(), 0, "the restarted balancer took over again");
}

/// The active balancer and the serving backend fail at once while the backup's copy of the
/// session lags far behind the client (sync every 400 ms here): the backup moves the session to
/// another backend, which resumes from the old block the copy names, and the client, already
/// much further on, ignores that old window and acknowledges where it is. The new backend must
/// believe that ACK (it once took it for a stale one and the transfer stalled for good).
#[test]
fn balancer_and_serving_backend_fail_together_while_the_mirror_lags() {
    let mut running = Running::start_with(1, 3, true, &["--sync-ms", "400"]);
    let kill_both = |r: &mut Running| {
        let serving = r.serving_backend(0).expect("a session with a backend at balancer 0");
        r.kill_lb(0);
        r.kill_backend(serving);
    };
    transfer_with_failures(&mut running, 64 * MIB, &[(0.5, &kill_both)]);
    assert_eq!(running.active_lb(), 1);
}

/// A download that ended after a failover stays ended: the killed balancer comes back with its
/// pinned (stale) sessions, and neither it nor the backends send the finished transfer again.
/// (A restarted agent once judged every backend dead from its predecessor's old timestamps and
/// nudged its stale sessions; the backends resumed them and resent windows to a client that had
/// left, at every retransmission timeout.)
#[test]
fn a_finished_download_is_not_sent_again_after_the_killed_balancer_returns() {
    let mut running = Running::start(1, 2);
    transfer_with_failures(&mut running, 16 * MIB, &[(0.5, &|r| r.kill_lb(0))]);
    let delivered = running.delivered();
    running.restart_lb(0);
    running.wait_lbs_reachable(&[0]);
    // Longer than the backends' retransmission timeout (1 s) and a full sync.
    std::thread::sleep(Duration::from_millis(2500));
    let log = running.lbs[0].as_ref().map(Process::log).unwrap_or_default();
    assert!(!log.contains("backend dead"), "the restarted balancer judged from stale timestamps:\n{log}");
    assert_eq!(running.delivered(), delivered, "replies reached the client after its download ended\n{}", running.logs());
}

/// Without any mirrored state the promoted balancer still carries the transfer: the client's
/// next ACK finds no session, the agent asks the backends, and the one holding the transfer
/// answers through the new balancer, whose kernel relearns the session from the reply.
#[test]
fn a_promoted_balancer_that_knows_nothing_relearns_from_the_backend() {
    let mut running = Running::start_mirroring(1, 2, false);
    transfer_with_failures(&mut running, 32 * MIB, &[(0.5, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1);
    assert!(running.counter(1, "relearned") > 0, "the session was relearned from a reply");
    assert!(running.counter(1, "drop_no_session") > 0, "the client's packets found no session first");
}

/// A transfer whose request reached the active balancer just before it died: the backup
/// learned it from the kernel's event ring at once, not from a periodic sync.
#[test]
fn session_started_moments_before_the_balancer_fails() {
    let mut running = Running::start(1, 2);
    let source = running.file("fresh.bin", 8 * MIB, 3);
    let local = running.local("fresh-atftp");
    let download = running.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "fresh.bin", &local);
    std::thread::sleep(Duration::from_millis(10));
    running.kill_lb(0);
    assert_eq!(running.counter(0, "new_session"), 1, "the request reached the first balancer before it died");
    let growth = Growth::watch(local.clone());
    let killed = Instant::now();
    finish(download, &local, &source, Duration::from_secs(60), "fresh transfer", || running.logs());
    println!("data stalled {} ms", stall_after(&growth.stop(), killed).as_millis());
    assert_eq!(running.active_lb(), 1);
}

/// Twenty clients with every stock client, across a balancer failure and a backend failure.
#[test]
fn twenty_clients_across_balancer_and_backend_failures() {
    let mut running = Running::start(20, 3);
    let source = running.file("many.bin", 12 * MIB, 5);
    let kinds = [
        Client::TftpHpa,
        Client::Atftp { blksize: 1468, windowsize: 16 },
        Client::Curl { blksize: 1468 },
        Client::Atftp { blksize: 512, windowsize: 1 },
    ];
    let downloads: Vec<_> = (0..20)
        .map(|i| {
            let local = running.local(&format!("many-{i}"));
            (running.download(i, kinds[i % kinds.len()], "many.bin", &local), local, kinds[i % kinds.len()])
        })
        .collect();
    let watched = downloads[1].1.clone();
    assert!(wait_for_size(&watched, 3 * MIB as u64, Duration::from_secs(60)), "transfers did not start\n{}", running.logs());
    running.kill_lb(0);
    let backend = running.serving_backend(1).unwrap_or(0);
    assert!(wait_for_size(&watched, 6 * MIB as u64, Duration::from_secs(60)), "transfers stalled after the balancer failure\n{}", running.logs());
    running.kill_backend(backend);
    for (download, local, how) in downloads {
        finish(download, &local, &source, Duration::from_secs(180), &how.name(), || running.logs());
    }
    assert_eq!(running.active_lb(), 1);
}

/// The switch agent killed mid-transfer: its pinned XDP links keep steering from the pinned
/// maps, the transfer completes, and a restarted agent re-adopts them without a swap.
#[test]
fn switch_agent_killed_and_restarted_mid_transfer() {
    let mut running = Running::start(1, 2);
    let restart_switch = |r: &mut Running| {
        r.switch.kill_hard();
        std::thread::sleep(Duration::from_millis(300));
        let restarted = r.topo.start_switch(&[]).expect("restart the switch agent");
        r.killed.push(std::mem::replace(&mut r.switch, restarted));
    };
    transfer_with_failures(&mut running, 64 * MIB, &[(0.4, &restart_switch)]);
    assert_eq!(running.active_lb(), 0, "no swap: both balancers stayed alive");
    assert_eq!(running.counter(1, "to_client"), 0, "the backup carried nothing");
    let log = running.switch.log();
    assert!(!log.contains("swapped"), "the restarted agent swapped:\n{log}");
}
