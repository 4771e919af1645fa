//! The whole system: clients, the switch, an active/backup pair of load balancers and steered
//! backends, in namespaces, with stock clients. Balancers and backends are killed mid-transfer;
//! every file must arrive byte-identical, and each test reports the stall after each failure
//! and the bytes the server side sent twice.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use netns_tests::{
    Process,
    clients::{Client, expect_download},
    cluster::Cluster,
    wait_for,
    watch::{Growth, stall_after, wait_for_size},
};
use xdp_lb_common::BalanceCounter;
const MIB: usize = 1024 * 1024;
/// The block size `Client::Atftp` asks for.
const BLKSIZE: u64 = 1468;

/// Waits for a download to finish successfully and checks its content.
fn finish(download: Process, local: &Path, source: &Path, timeout: Duration, what: &str, logs: impl Fn() -> String) {
    expect_download(download, local, source, timeout, what, logs);
}

/// Without failures: each stock client downloads through the switch and the active balancer.
#[test]
fn downloads_through_switch_and_active_balancer() {
    let running = Cluster::start(1, 2);
    let source = running.file("plain.bin", 3 * MIB + 77, 1);
    for how in [Client::TftpHpa, Client::Atftp { blksize: 1468, windowsize: 16 }, Client::Curl { blksize: 1468 }] {
        let local = running.local(&format!("plain-{}", how.name()));
        let download = running.download(0, how, "plain.bin", &local);
        finish(download, &local, &source, Duration::from_secs(30), &how.name(), || running.logs());
    }
    assert_eq!(running.active_lb(), 0, "no failure, no swap");
    assert!(running.counter(0, BalanceCounter::ToClient) > 3 * (3 * MIB as u64 / BLKSIZE), "the active balancer carried the data");
    assert_eq!(running.counter(1, BalanceCounter::ToClient), 0, "the backup carried nothing");
}

/// A failure injected once the download reached a fraction of the file.
type Step<'a> = (f64, &'a dyn Fn(&mut Cluster));

/// One atftp transfer through the pair with failures injected on the way. Reports the stall
/// after each failure and the DATA the balancers delivered twice.
fn transfer_with_failures(running: &mut Cluster, size: usize, steps: &[Step<'_>]) {
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
    let mut running = Cluster::start(1, 2);
    assert_eq!(running.active_lb(), 0, "the first --lb starts active");
    transfer_with_failures(&mut running, 64 * MIB, &[(0.5, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1, "the switch swapped to the backup");
    assert!(running.counter(1, BalanceCounter::ToClient) + running.counter(1, BalanceCounter::Relearned) > 0, "the new active balancer carried data");
}

#[test]
fn serving_backend_then_active_balancer_killed_in_one_transfer() {
    let mut running = Cluster::start(1, 3);
    let kill_serving_backend = |r: &mut Cluster| {
        let serving = r.serving_backend(0).expect("a session with a backend at balancer 0");
        r.kill_backend(serving);
    };
    transfer_with_failures(&mut running, 64 * MIB, &[(0.3, &kill_serving_backend), (0.6, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1);
    assert!(running.counter(0, BalanceCounter::Moved) + running.counter(1, BalanceCounter::Moved) <= 1, "moves are the agents' job");
}

#[test]
fn balancer_restarted_then_the_new_active_one_killed() {
    let mut running = Cluster::start(1, 2);
    let kill_restart = |r: &mut Cluster| {
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
    let mut running = Cluster::start_with(1, 3, true, &["--sync-ms", "400"]);
    let kill_both = |r: &mut Cluster| {
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
    let mut running = Cluster::start(1, 2);
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
    let mut running = Cluster::start_mirroring(1, 2, false);
    transfer_with_failures(&mut running, 32 * MIB, &[(0.5, &|r| r.kill_lb(0))]);
    assert_eq!(running.active_lb(), 1);
    assert!(running.counter(1, BalanceCounter::Relearned) > 0, "the session was relearned from a reply");
    assert!(running.counter(1, BalanceCounter::DropNoSession) > 0, "the client's packets found no session first");
}

/// A transfer whose request reached the active balancer just before it died: the backup
/// learned it from the kernel's event ring at once, not from a periodic sync.
#[test]
fn session_started_moments_before_the_balancer_fails() {
    let mut running = Cluster::start(1, 2);
    let source = running.file("fresh.bin", 8 * MIB, 3);
    let local = running.local("fresh-atftp");
    let download = running.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "fresh.bin", &local);
    std::thread::sleep(Duration::from_millis(10));
    running.kill_lb(0);
    assert_eq!(running.counter(0, BalanceCounter::NewSession), 1, "the request reached the first balancer before it died");
    let growth = Growth::watch(local.clone());
    let killed = Instant::now();
    finish(download, &local, &source, Duration::from_secs(60), "fresh transfer", || running.logs());
    println!("data stalled {} ms", stall_after(&growth.stop(), killed).as_millis());
    assert_eq!(running.active_lb(), 1);
}

/// Twenty clients with every stock client, across a balancer failure and a backend failure.
#[test]
fn twenty_clients_across_balancer_and_backend_failures() {
    let mut running = Cluster::start(20, 3);
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
    let mut running = Cluster::start(1, 2);
    let restart_switch = |r: &mut Cluster| {
        r.switch.kill_hard();
        std::thread::sleep(Duration::from_millis(300));
        let restarted = r.topo.start_switch(&[]).expect("restart the switch agent");
        r.killed.push(std::mem::replace(&mut r.switch, restarted));
    };
    transfer_with_failures(&mut running, 64 * MIB, &[(0.4, &restart_switch)]);
    assert_eq!(running.active_lb(), 0, "no swap: both balancers stayed alive");
    assert_eq!(running.counter(1, BalanceCounter::ToClient), 0, "the backup carried nothing");
    let log = running.switch.log();
    assert!(!log.contains("swapped"), "the restarted agent swapped:\n{log}");
}
