//! Foundation: the real xdp-lb binary attaches `balance` to a veth in a fresh namespace, counts
//! UDP sent from a peer namespace in its pinned per-CPU map, and stops counting once detached.

use std::{net::UdpSocket, process::Command};

use netns_tests::{ControlKey, Netns, PinDir, Process, RunPrefix, binary, require_root, veth_pair, wait_for};
use xdp_lb_common::{BalanceCounter, status::Status};

const LB_ADDR: &str = "10.231.0.1";
const VIP: &str = "10.231.0.100";
const PEER_ADDR: &str = "10.231.0.2";

/// Reads `xdp-lb status --json` and returns the `balance` counter as (packets, bytes).
fn counter(pin_root: &std::path::Path, counter: BalanceCounter) -> (u64, u64) {
    let output = Command::new(binary("xdp-lb"))
        .arg("--pin-root")
        .arg(pin_root)
        .args(["status", "--json"])
        .output()
        .expect("run xdp-lb status");
    assert!(output.status.success(), "xdp-lb status failed: {}", String::from_utf8_lossy(&output.stderr));
    let status: Status = serde_json::from_slice(&output.stdout).expect("status JSON");
    let balance = status.balance.expect("balance counters in status");
    let found = balance.counters.iter().find(|c| c.name == counter.name()).unwrap_or_else(|| panic!("no counter {counter:?} in {:?}", balance.counters));
    (found.packets, found.bytes)
}

/// Sends `count` UDP datagrams of `payload_len` bytes from the peer namespace to `to`:`port`.
fn send_udp(peer: &Netns, to: &str, port: u16, count: usize, payload_len: usize) {
    peer.enter(|| {
        let socket = UdpSocket::bind((PEER_ADDR, 0)).expect("bind in peer namespace");
        let payload = vec![0x5a; payload_len];
        for _ in 0..count {
            socket.send_to(&payload, (to, port)).expect("send");
        }
    })
    .expect("enter peer namespace");
}

#[test]
fn balance_counts_udp_in_pinned_map_while_attached() {
    require_root();
    let prefix = RunPrefix::new();
    let pins = PinDir::new(&prefix.name("attach")).expect("pin dir");
    let lb = Netns::new(prefix.name("lb")).expect("lb namespace");
    let peer = Netns::new(prefix.name("peer")).expect("peer namespace");
    let (lb_end, _) = veth_pair(&lb, "lb0", &peer, "peer0").expect("veth pair");
    lb.add_address("lb0", &format!("{LB_ADDR}/24")).unwrap();
    lb.add_address("lb0", &format!("{VIP}/32")).unwrap();
    peer.add_address("peer0", &format!("{PEER_ADDR}/24")).unwrap();
    // Static neighbours: no ARP exchange races with the first datagrams.
    let lb_mac = lb.mac("lb0").unwrap();
    for addr in [LB_ADDR, VIP] {
        peer.ip(&["neigh", "replace", addr, "lladdr", &lb_mac, "dev", "peer0"]).unwrap();
    }

    let mut command = lb.command(binary("xdp-lb"));
    command.arg("--pin-root").arg(pins.path()).args(["balance", "--iface", &lb_end.iface, "--vip", VIP]);
    // A backend that never answers: this test is about attaching and counting.
    command.args(["--backend", "10.231.0.77:7000", "--address", LB_ADDR]);
    let key = ControlKey::random(&prefix, "control", 1).expect("control key file");
    command.arg("--control-key-file").arg(key.path());
    let mut agent = Process::spawn(prefix.name("agent"), command).expect("start xdp-lb balance");

    // Ready when the program shows on the interface and the counter map is pinned.
    wait_for("balance attached to lb0", 20, || {
        assert!(agent.is_running(), "xdp-lb balance exited early:\n{}", agent.log());
        let link = lb.ip(&["link", "show", "lb0"]).ok()?;
        (link.contains("xdp") && pins.path().join("balance/LB_COUNTERS").exists()).then_some(())
    })
    .unwrap();

    let (service_before, _) = counter(pins.path(), BalanceCounter::DropNotRequest);
    let (other_before, _) = counter(pins.path(), BalanceCounter::PassNotService);
    // Not TFTP requests (payload 0x5a5a...): dropped at the VIP and counted.
    send_udp(&peer, VIP, 69, 50, 100);
    send_udp(&peer, LB_ADDR, 5000, 30, 10);

    // Poll briefly in case the peer's stack queues the frames.
    let (service, service_bytes) = wait_for("50 datagrams to VIP:69 counted", 5, || {
        let c = counter(pins.path(), BalanceCounter::DropNotRequest);
        (c.0 >= service_before + 50).then_some(c)
    })
    .unwrap();
    assert_eq!(service - service_before, 50, "every datagram to VIP:69 is counted once");
    // Ethernet 14 + IPv4 20 + UDP 8 + payload 100.
    assert!(service_bytes >= 50 * 142, "bytes counted: {service_bytes}");
    let (other, _) = counter(pins.path(), BalanceCounter::PassNotService);
    assert!(other - other_before >= 30, "datagrams to the host itself pass, counted apart");

    // BTF names the fields of the pinned map for bpftool.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pins.path().join("balance/LB_COUNTERS"))
        .output()
        .expect("run bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("\"packets\"") && dump.contains("\"bytes\""), "bpftool shows no BTF field names:\n{dump}");

    // Detached: the maps stay pinned and readable, and nothing more is counted.
    agent.stop().expect("agent exits on SIGTERM");
    wait_for("balance detached from lb0", 10, || {
        let link = lb.ip(&["link", "show", "lb0"]).ok()?;
        (!link.contains("xdp")).then_some(())
    })
    .unwrap();
    send_udp(&peer, VIP, 69, 20, 100);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(counter(pins.path(), BalanceCounter::DropNotRequest).0, service, "counted while detached");
}
