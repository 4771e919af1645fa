//! Backends take steering datagrams only from the balancers (`tftp-backend --lb`): a host on
//! the balancers' network that forges steering headers (requests, resumes of a file it knows
//! the digest of, heartbeats) gets nothing back, and the real transfers go on.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use netns_tests::{
    clients::{Client, expect_download},
    cluster::Cluster,
    pair_topology::{BACKEND_PORT, PairTopology, backend_addr},
    watch::wait_for_size,
};
use xdp_lb_common::{
    SteeringHeader,
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
