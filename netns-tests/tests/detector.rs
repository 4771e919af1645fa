//! The failure detector sees real deaths only. Through the full topology (switch, balancer
//! pair, three steered backends), clients that repeat themselves or lie, a flood of requests
//! from spoofed addresses, and both CPUs saturated must produce no death verdict and no swap,
//! while every real download arrives byte-identical. (Real deaths are still detected: the
//! failure tests in pair.rs, and the stalls `cargo xtask bench --only failover` measures.)

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use netns_tests::{
    Process,
    clients::{Client, expect_download},
    cluster::{Cluster, Verdicts},
    pair_topology::{VIP, client_addr},
    storm::{Storm, StormPlan, lock_step_download, spoofed_requests},
};
use xdp_lb_common::{
    BalanceCounter, ClientKey,
    status::{BackendState, BackendStatus},
};

const MIB: usize = 1024 * 1024;

fn vip() -> Ipv4Addr {
    VIP.parse().expect("VIP")
}

/// Fails with every agent's verdict lines unless the detectors concluded nothing.
fn assert_no_verdicts(cluster: &Cluster, what: &str) {
    let verdicts = cluster.verdicts();
    let recorded = cluster.recorded_verdicts();
    println!("{what}: {} backend and {} balancer verdicts, {} swaps (recorded {recorded:?})", verdicts.backends, verdicts.balancers, verdicts.swaps);
    for line in &verdicts.lines {
        println!("  {line}");
    }
    let Verdicts { backends, balancers, swaps, .. } = verdicts;
    assert_eq!((backends, balancers, swaps), (0, 0, 0), "{what}: (backend verdicts, balancer verdicts, swaps): the detectors declared live peers dead\n{}", cluster.logs());
    assert_eq!(recorded, (0, 0), "{what}: verdicts in the health maps");
}

/// A lock-step client that, mid-download, sends a thousand packets 1 ms apart that ask for
/// nothing (duplicates of its current ACK, stale ACK 0s, ACKs beyond the end or of blocks never
/// sent, ERRORs to another transfer's port): no backend or balancer is declared dead, nothing
/// swaps, and its download and a stock client's beside it arrive byte-identical.
#[test]
fn storms_from_one_client_fail_over_nothing() {
    let cluster = Cluster::start(2, 3);
    let source = cluster.file("storm.bin", 2 * MIB + 333, 51);
    let beside = cluster.file("beside.bin", 8 * MIB, 52);
    let expected = std::fs::read(&source).expect("source");
    let other_tid = ClientKey::new(client_addr(1).parse::<Ipv4Addr>().expect("address").octets(), 40_000u16.to_be_bytes()).tid();
    let storms = [Storm::DuplicateAck, Storm::StaleAck, Storm::BeyondEnd, Storm::NeverSent, Storm::ErrorsTo(other_tid)];
    for storm in storms {
        let local = cluster.local(&format!("beside-{storm:?}"));
        let stock = cluster.download(1, Client::TftpHpa, "beside.bin", &local);
        let plan = StormPlan { storm, at_block: 400, copies: 1000, spacing: Duration::from_millis(1) };
        let report = cluster.topo.clients[0]
            .enter(|| lock_step_download(vip(), "storm.bin", 1468, &plan, Duration::from_secs(60)))
            .expect("enter the client namespace")
            .unwrap_or_else(|e| panic!("{storm:?}: the storming client's download failed: {e}\n{}", cluster.logs()));
        println!("{storm:?}: 1000 packets in {:?}", report.storm_took);
        assert!(report.data == expected, "{storm:?}: the storming client's file differs");
        expect_download(stock, &local, &beside, Duration::from_secs(60), &format!("tftp-hpa beside {storm:?}"), || cluster.logs());
        assert_no_verdicts(&cluster, &format!("{storm:?}"));
    }
    assert_eq!(cluster.active_lb(), 0, "no swap");
    assert!(cluster.counter(0, BalanceCounter::BackendHeard) >= 4000, "the backends answered the storms with HEARD");
}

/// 20 000 requests from 2 000 spoofed addresses within a second, while real downloads run:
/// the balancers and backends are busy, not dead.
#[test]
fn a_flood_of_spoofed_requests_fails_over_nothing() {
    let cluster = Cluster::start(3, 3);
    let big = cluster.file("big.bin", 64 * MIB, 53);
    let small = cluster.file("small.bin", 8 * MIB, 54);
    let (local_big, local_small) = (cluster.local("flood-big"), cluster.local("flood-small"));
    let atftp = cluster.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "big.bin", &local_big);
    let hpa = cluster.download(1, Client::TftpHpa, "small.bin", &local_small);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let sent = cluster.topo.clients[2]
        .enter(|| spoofed_requests(vip(), "small.bin", Ipv4Addr::new(10, 79, 0, 1), 2000, 20_000, Duration::from_secs(1)))
        .expect("enter the client namespace")
        .expect("spoofed flood");
    println!("{sent} spoofed requests in {:?}", started.elapsed());
    expect_download(atftp, &local_big, &big, Duration::from_secs(120), "atftp during the flood", || cluster.logs());
    expect_download(hpa, &local_small, &small, Duration::from_secs(120), "tftp-hpa during the flood", || cluster.logs());
    // The backends go on retransmitting to the spoofed clients (1, 2, 4 s ...): watch that too.
    std::thread::sleep(Duration::from_secs(4));
    let sessions = cluster.counter(0, BalanceCounter::NewSession);
    println!("balancer 0 opened {sessions} sessions");
    assert!(sessions >= 10_000, "the flood reached the backends ({sessions} sessions)");
    assert_no_verdicts(&cluster, "spoofed flood");
    assert_eq!(cluster.active_lb(), 0, "no swap");
}

/// Both CPUs saturated by stress-ng (four busy workers per CPU) for 30 s, and a flood of
/// requests from spoofed addresses in progress (1 200 a second for 20 s, whose sessions and whose
/// backends' retransmissions pile up), while 20 clients download over and over, most of them
/// windowed: slower, and no verdict. (Before the agents ran under SCHED_RR, their ticks came up
/// to ~450 ms late under such load, and the switch declared the balancers silent.)
#[test]
fn saturated_cpus_and_a_flood_fail_over_nothing() {
    const CLIENTS: usize = 20;
    const SATURATED: Duration = Duration::from_secs(30);
    let cluster = Cluster::start(CLIENTS + 1, 3);
    let source = cluster.file("load.bin", 8 * MIB, 55);
    let mut stress = std::process::Command::new("stress-ng");
    // Its own timeout only in case this test dies; stopped by PID once the last round is in.
    stress.args(["--cpu", "8", "--timeout", &format!("{}s", SATURATED.as_secs() + 300), "--quiet"]);
    let mut stress = Process::spawn(cluster.topo.prefix.name("stress"), stress).expect("stress-ng (cargo xtask setup installs it)");
    let started = Instant::now();
    let how = |i: usize| if i.is_multiple_of(4) { Client::TftpHpa } else { Client::Atftp { blksize: 1468, windowsize: 16 } };
    let start = |i: usize, round: usize| {
        let local = cluster.local(&format!("load-{i}-{round}"));
        (cluster.download(i, how(i), "load.bin", &local), local)
    };
    let done = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let flooder = &cluster.topo.clients[CLIENTS];
            // 1200 a second for 20 s: a flood, and within the backends' descriptors (each spoofed
            // request holds an open transfer for a minute of retries; 60 000 ran out of them).
            flooder.enter(|| spoofed_requests(vip(), "load.bin", Ipv4Addr::new(10, 79, 0, 1), 2000, 24_000, Duration::from_secs(20))).expect("enter").expect("flood")
        });
        let mut running: Vec<_> = (0..CLIENTS).map(|i| Some(start(i, 0))).collect();
        let mut done = 0;
        for round in 1.. {
            let mut any = false;
            for (i, slot) in running.iter_mut().enumerate() {
                let Some((download, local)) = slot.take() else { continue };
                expect_download(download, &local, &source, Duration::from_secs(120), &format!("client {i} under load"), || cluster.logs());
                done += 1;
                if started.elapsed() < SATURATED {
                    *slot = Some(start(i, round));
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        println!("{} spoofed requests sent", flood.join().expect("flood thread"));
        done
    });
    assert!(stress.is_running(), "stress-ng ran throughout");
    stress.stop();
    println!("{done} downloads of 8 MiB by {CLIENTS} clients with both CPUs saturated for {:?}", started.elapsed());
    assert_no_verdicts(&cluster, "saturated CPUs and a flood");
    assert_eq!(cluster.active_lb(), 0, "no swap");
}

/// Agents that could not run for a while (here stopped with SIGSTOP, as an overloaded
/// scheduler would leave them) judge nothing by their own absence: when they run again, the
/// backends' and balancers' answers from before the pause are old, but no heartbeat of theirs
/// went unanswered, so there is no verdict; the download goes on.
#[test]
fn agents_that_could_not_run_judge_nothing_by_their_own_absence() {
    let mut cluster = Cluster::start(1, 3);
    let source = cluster.file("paused.bin", 32 * MIB, 56);
    let local = cluster.local("paused");
    let download = cluster.download(0, Client::TftpHpa, "paused.bin", &local);
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        for agent in cluster.lbs.iter_mut().flatten().chain(std::iter::once(&mut cluster.switch)) {
            agent.pause();
        }
        std::thread::sleep(Duration::from_millis(400));
        for agent in cluster.lbs.iter_mut().flatten().chain(std::iter::once(&mut cluster.switch)) {
            agent.resume();
        }
        std::thread::sleep(Duration::from_millis(600));
        println!("pause {round} done");
    }
    expect_download(download, &local, &source, Duration::from_secs(120), "tftp-hpa across the pauses", || cluster.logs());
    assert_no_verdicts(&cluster, "paused agents");
    assert_eq!(cluster.active_lb(), 0, "no swap");
}

/// Backend 0 as balancer 0's status shows it.
fn backend_status(cluster: &Cluster) -> BackendStatus {
    cluster.topo.lb_status(0).expect("status").backends.swap_remove(0)
}

/// A backend that stops answering and comes back again and again (here: SIGSTOP, SIGCONT) is
/// really dead each time, so each death is a verdict; but the second within the damping window
/// holds it out for a second after it answers again, the third for two: `xdp-lb status` shows
/// the flaps and the hold, and the agent logs it.
#[test]
fn a_flapping_backend_is_held_out_longer_each_time() {
    let mut cluster = Cluster::start(1, 3);
    let state = |cluster: &Cluster| backend_status(cluster).state;
    for flap in 1..=3u64 {
        cluster.backends[0].as_mut().expect("backend 0").pause();
        netns_tests::wait_for("backend 0 declared dead", 10, || (state(&cluster) == BackendState::Dead).then_some(())).expect("a verdict");
        cluster.backends[0].as_mut().expect("backend 0").resume();
        netns_tests::wait_for("backend 0 answering again", 10, || {
            backend_status(&cluster).watch.last_answer_ms_ago.filter(|&ms| ms < 100)
        })
        .expect("answers");
        let now = backend_status(&cluster);
        println!("flap {flap}: {now:?}");
        assert_eq!(now.watch.health.verdicts, flap);
        assert_eq!(u64::from(now.watch.health.flaps), flap);
        if flap == 1 {
            netns_tests::wait_for("a first death's revival", 10, || (state(&cluster) == BackendState::Live).then_some(())).expect("revived");
            continue;
        }
        let held = now.watch.health.held_for_ms.unwrap_or_else(|| panic!("flap {flap}: held: {now:?}"));
        assert_eq!(now.state, BackendState::Dead, "answering, but held out");
        assert!(held <= 1000 << (flap - 2), "flap {flap}: the hold doubles from 1 s: {held} ms");
        assert!(held > (1000 << (flap - 2)) / 2, "flap {flap}: most of the hold is still ahead once it answers: {held} ms");
        netns_tests::wait_for("the end of the hold", 10, || (state(&cluster) == BackendState::Live).then_some(())).expect("back after the hold");
        assert!(backend_status(&cluster).watch.health.held_for_ms.is_none());
    }
    let log = cluster.lbs[0].as_ref().expect("lb 0").log();
    assert!(log.contains("backend flapping: held out"), "the hold is logged:\n{log}");
}
