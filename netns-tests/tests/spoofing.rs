//! Hosts that speak for others: backends take steering datagrams only from the balancers
//! (`tftp-backend --lb`), so a host on the balancers' network that forges steering headers
//! (requests, resumes of a file it knows the digest of, heartbeats) gets nothing back; and the
//! switch takes a balancer's or the VIP's source address only on the balancers' side
//! (`xdp-lb switch --lb-iface`), so a client-side host cannot steal the VIP's traffic. The real
//! transfers go on.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use netns_tests::{
    clients::{Client, expect_download},
    cluster::Cluster,
    pair_topology::{BACKEND_PORT, PairTopology, VIP, backend_addr, lb_addr},
    storm::spoofed_requests,
    watch::wait_for_size,
};
use xdp_lb_common::{
    SteeringHeader, SwitchCounter,
    steering::{FLAG_HAS_CONTEXT, FLAG_HEARTBEAT, FLAG_NUDGE},
};

const MIB: usize = 1024 * 1024;
const ATTACKER: &str = "10.77.0.66";

/// The forgeries, each a steering header and its TFTP bytes, aimed at a client of the
/// attacker's choosing (the reflection victim).
fn forgeries() -> Vec<Vec<u8>> {
    let victim = SteeringHeader::for_client([10, 78, 0, 99], 40_000, [10, 77, 9, 100], 31_337);
    let mut resume = victim;
    resume.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    resume.set_block(0);
    let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
    beat.flags = FLAG_HEARTBEAT;
    let with = |header: &SteeringHeader, tftp: &[u8]| [bytemuck::bytes_of(header), tftp].concat();
    vec![
        with(&victim, b"\x00\x01guarded.bin\x00octet\x00blksize\x001468\x00"),
        with(&resume, b"\x00\x04\x00\x00"),
        with(&beat, b""),
    ]
}

#[test]
fn forged_steering_from_a_host_that_is_no_balancer_gets_no_answer() {
    let topo = PairTopology::new(1, 2).expect("topology");
    let attacker = topo.add_control_host("forger", ATTACKER).expect("attacker host");
    let running = Cluster::start_on(topo);
    let source = running.file("guarded.bin", 24 * MIB, 5);
    let local = running.local("guarded-tftp-hpa");
    let download = running.download(0, Client::TftpHpa, "guarded.bin", &local);
    assert!(wait_for_size(&local, MIB as u64, Duration::from_secs(30)), "download did not start\n{}", running.logs());

    let (sent, answers) = attacker
        .enter(|| {
            let socket = UdpSocket::bind((ATTACKER, 0)).expect("attacker socket");
            socket.set_nonblocking(true).expect("nonblocking");
            let (mut sent, mut answers, mut buf) = (0u64, 0u64, [0u8; 2048]);
            let end = Instant::now() + Duration::from_secs(1);
            while Instant::now() < end {
                for backend in 0..2 {
                    for datagram in forgeries() {
                        if socket.send_to(&datagram, (backend_addr(backend).as_str(), BACKEND_PORT)).is_ok() {
                            sent += 1;
                        }
                    }
                }
                while socket.recv(&mut buf).is_ok() {
                    answers += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(300));
            while socket.recv(&mut buf).is_ok() {
                answers += 1;
            }
            (sent, answers)
        })
        .expect("enter the attacker's namespace");
    assert!(sent > 1000, "the attack sent {sent} datagrams");
    assert_eq!(answers, 0, "the backends answered {answers} of {sent} forged datagrams\n{}", running.logs());
    for (i, backend) in running.backends.iter().enumerate() {
        let log = backend.as_ref().expect("backend running").log();
        assert!(log.contains("not named by --lb") && log.contains(ATTACKER), "backend {i} logs the drops\n{log}");
    }
    expect_download(download, &local, &source, Duration::from_secs(120), "tftp-hpa beside the forger", || running.logs());
}

/// A client-side host sends frames with balancer 0's source address and with the VIP's
/// (spoofed, raw IPv4, from its own MAC) through the switch during a download: each used to
/// teach the switch that the balancer lives at the attacker's MAC (all VIP traffic to it);
/// now each is dropped and counted (`drop_spoofed_lb`), balancer 0 stays where it is, and the
/// download arrives intact.
#[test]
fn a_client_side_host_cannot_speak_for_a_balancer_or_the_vip() {
    let running = Cluster::start(2, 2);
    let source = running.file("hijack.bin", 24 * MIB, 6);
    let local = running.local("hijack-atftp");
    let download = running.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "hijack.bin", &local);
    assert!(wait_for_size(&local, MIB as u64, Duration::from_secs(30)), "download did not start\n{}", running.logs());
    let vip: std::net::Ipv4Addr = VIP.parse().expect("VIP");
    let lb0: std::net::Ipv4Addr = lb_addr(0).parse().expect("LB address");
    let sent = running.topo.clients[1]
        .enter(|| {
            let as_lb = spoofed_requests(vip, "hijack.bin", lb0, 1, 500, Duration::from_millis(500))?;
            let as_vip = spoofed_requests(vip, "hijack.bin", vip, 1, 500, Duration::from_millis(500))?;
            Ok::<_, netns_tests::Error>(as_lb + as_vip)
        })
        .expect("enter the attacker's namespace")
        .expect("spoofed frames");
    expect_download(download, &local, &source, Duration::from_secs(120), "atftp beside the spoofer", || running.logs());
    let status = running.topo.switch_status().expect("switch status");
    let dropped = status.counter(SwitchCounter::DropSpoofedLb).packets;
    println!("{sent} spoofed frames, {dropped} dropped as drop_spoofed_lb");
    assert_eq!(dropped, u64::from(sent), "every spoofed frame dropped and counted\n{:?}", status.counters);
    assert_eq!(running.active_lb(), 0, "no swap");
}
