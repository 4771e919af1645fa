//! Floods of requests from many (spoofed) addresses, beyond what per-address pacing stops:
//! the balancer's per-/24 pace and its budget of new sessions a second drop the excess in the
//! kernel, and the transfers in flight go on (`xdp-lb balance --requests-per-prefix-sec`,
//! `--new-sessions-per-sec`).

use std::{net::Ipv4Addr, time::Duration};

use netns_tests::{
    clients::{Client, expect_download},
    cluster::Cluster,
    pair_topology::VIP,
    storm::spoofed_requests,
};
use xdp_lb_common::BalanceCounter;

const MIB: usize = 1024 * 1024;
const REAL: usize = 5;
const SPOOFED_SOURCES: u32 = 5_000;
const SPOOFED_REQUESTS: u32 = 50_000;
/// Limits low enough that the test's flood crosses both (the defaults, 2000 a second per /24
/// and 20 000 in all, are sized for boot storms of whole racks).
const LB_ARGS: [&str; 8] =
    ["--requests-per-prefix-sec", "100", "--prefix-burst", "200", "--new-sessions-per-sec", "1000", "--new-session-burst", "1000"];

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS value")
}

/// 50 000 RRQs from 5 000 spoofed addresses (20 /24s) within 2 s while 5 real downloads run:
/// the real ones arrive byte-identical, the drops are counted by reason, the sessions admitted
/// stay within the budget, the backends' memory stays bounded, and a new download after the
/// flood is served.
#[test]
fn a_flood_from_five_thousand_spoofed_addresses_is_cut_to_the_budget() {
    let cluster = Cluster::start_with(REAL + 1, 3, true, &LB_ARGS);
    let sources: Vec<_> = (0..REAL).map(|i| cluster.file(&format!("real{i}.bin"), 24 * MIB, 60 + i as u64)).collect();
    let rss_before: Vec<u64> = cluster.backends.iter().map(|b| rss_kib(b.as_ref().expect("backend").pid())).collect();
    let downloads: Vec<_> = (0..REAL)
        .map(|i| {
            let how = if i % 2 == 0 { Client::Atftp { blksize: 1468, windowsize: 16 } } else { Client::TftpHpa };
            let local = cluster.local(&format!("real{i}"));
            (cluster.download(i, how, &format!("real{i}.bin"), &local), local, how)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let vip: Ipv4Addr = VIP.parse().expect("VIP");
    let sent = cluster.topo.clients[REAL]
        .enter(|| spoofed_requests(vip, "real0.bin", Ipv4Addr::new(10, 79, 0, 1), SPOOFED_SOURCES, SPOOFED_REQUESTS, Duration::from_secs(2)))
        .expect("enter the flooder's namespace")
        .expect("spoofed flood");
    for ((download, local, how), source) in downloads.into_iter().zip(&sources) {
        expect_download(download, &local, source, Duration::from_secs(120), &format!("{} during the flood", how.name()), || cluster.logs());
    }

    let (prefix, budget, admitted) = (cluster.counter(0, BalanceCounter::DropPrefixRateLimited), cluster.counter(0, BalanceCounter::DropSessionBudget), cluster.counter(0, BalanceCounter::NewSession));
    println!("{sent} spoofed requests: {prefix} dropped by the /24 pace, {budget} by the session budget, {admitted} sessions opened");
    assert!(prefix > 10_000, "the /24 pace dropped {prefix}");
    assert!(budget > 1_000, "the session budget dropped {budget}");
    // 20 networks x (200 at once + 100 a second), and no more than the budget's 1000 at once +
    // 1000 a second per CPU, over the ~2.5 s of the flood: far below the 50 000 sent.
    assert!(admitted < 10_000, "{admitted} sessions admitted out of {sent}");
    for (i, backend) in cluster.backends.iter().enumerate() {
        let rss = rss_kib(backend.as_ref().expect("backend").pid());
        println!("backend {i}: RSS {} -> {rss} KiB", rss_before[i]);
        assert!(rss < rss_before[i] + 16 * 1024, "backend {i} grew from {} to {rss} KiB", rss_before[i]);
    }
    // The budget refills: a new client is served after the flood.
    let after = cluster.local("after-flood");
    let download = cluster.download(0, Client::TftpHpa, "real1.bin", &after);
    expect_download(download, &after, &sources[1], Duration::from_secs(60), "tftp-hpa after the flood", || cluster.logs());
}
