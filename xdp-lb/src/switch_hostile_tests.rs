//! Malformed and hostile packets for `switch`, run on the real object with BPF_PROG_TEST_RUN:
//! one table, one row per packet, each with the XDP action and the decision counter it must
//! produce. For every row the test also checks that `received` and that one counter went up by
//! exactly one and no other counter moved, that a passed frame leaves unchanged, that a steered
//! one changes only its MACs, that nothing but a steered client packet records a client in
//! `SW_CLIENTS`, and that a drop or a plain pass neither learns a MAC nor touches a watchdog.
//!
//! Every row starts from the same state: balancer 0 active, both balancers' MACs known (unless
//! the row says otherwise), no client in flight. Replies that reach `to_client` are passed to
//! the stack (`to_client_by_stack`): the test's loopback has no route to forward by.
//!
//! Not covered: frames shorter than an Ethernet header (BPF_PROG_TEST_RUN refuses inputs under
//! 14 bytes before the program runs), and which interface a frame came in on (every test frame
//! arrives on loopback).
//! Needs root, like `switch_tests`.

use xdp_lb_common::{ClientKey, SwitchCounter as C, TFTP_PORT};

use crate::{
    hostile_tests::{edit_ip, ethernet, fix_ip_checksum, with_ip_options},
    switch_tests::{
        CLIENT, CLIENT_MAC, LB_MACS, LBS, SWITCH_MAC, Switch, VIP, client_ack, headers,
    },
    testrun::{XDP_DROP, XDP_PASS, XDP_TX, udp_frame},
};

/// A host on the segment that forges other hosts' addresses.
const ATTACKER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x66];
const ELSEWHERE: [u8; 4] = [10, 78, 0, 9];
/// The table's client port (most rows).
const PORT: u16 = 42_000;
const RRQ: &[u8] = b"\x00\x01pxelinux.0\x00octet\x00";
const DATA: &[u8] = b"\x00\x03\x00\x01data";
/// A heartbeat answer's bytes, as a balancer sends them to the switch agent.
const HEARTBEAT: &[u8] = b"XLC1\x02\x00\x00\x00";

/// A further check after the row's packet, on the switch it left (it may run more packets).
type After = fn(&mut Switch);

/// One hostile packet and what `switch` must do with it.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// Which balancers' MACs the switch knows before the packet.
    known: [bool; 2],
    action: u32,
    counter: C,
    after: Option<After>,
    /// The frame arrives on the clients' side (not an `--lb-iface`).
    client_side: bool,
    /// A second counter the packet moves: a request steered is kept (or not) on its way.
    also: Option<C>,
}

fn case(name: &'static str, frame: Vec<u8>, action: u32, counter: C) -> Case {
    Case { name, frame, known: [true, true], action, counter, after: None, client_side: false, also: None }
}

/// A request steered to the active balancer, kept on its way (`SW_REQUESTS`).
fn steered_request(name: &'static str, frame: Vec<u8>) -> Case {
    Case { also: Some(C::RequestKept), ..case(name, frame, XDP_TX, C::ToLb) }
}

impl Case {
    fn on_client_side(self) -> Self {
        Self { client_side: true, ..self }
    }

    fn knowing(self, known: [bool; 2]) -> Self {
        Self { known, ..self }
    }

    fn then(self, after: After) -> Self {
        Self { after: Some(after), ..self }
    }
}

fn ack() -> Vec<u8> {
    client_ack(PORT)
}

fn long_rrq() -> Vec<u8> {
    let mut request = RRQ.to_vec();
    request.resize(xdp_lb_common::maps::REQUEST_KEPT_MAX + 1, b'a');
    udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, PORT), (VIP, TFTP_PORT), &request)
}

fn rrq() -> Vec<u8> {
    udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, PORT), (VIP, TFTP_PORT), RRQ)
}

/// A frame from balancer `slot`'s address (a heartbeat answer to the switch agent), sent from
/// `mac` to `dst_mac`.
fn from_lb(slot: usize, mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    udp_frame((mac, dst_mac), (LBS[slot], 6970), ([10, 77, 0, 1], 50_000), HEARTBEAT)
}

/// A reply from the VIP to the client, sent from `mac`.
fn from_vip(mac: [u8; 6]) -> Vec<u8> {
    udp_frame((mac, SWITCH_MAC), (VIP, 23_456), (CLIENT, PORT), DATA)
}

/// `frame` with its Ethernet MACs replaced.
fn with_macs(mut frame: Vec<u8>, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// `frame` with an 802.1Q (or 802.1ad, by `tpid`) tag for VLAN 10 after the MACs.
fn tagged(frame: &[u8], tpid: [u8; 2]) -> Vec<u8> {
    [&frame[..12], &tpid, &[0x00, 0x0a], &frame[12..]].concat()
}

/// `frame` cut to `len` bytes.
fn cut(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len].to_vec()
}

/// `frame` with IP protocol `proto` (checksum recomputed; the bytes after the header unchanged).
fn proto(frame: &[u8], proto: u8) -> Vec<u8> {
    edit_ip(frame, |f| f[23] = proto)
}

/// The forged frame taught the switch the attacker's MAC for balancer `slot`, and the next
/// client packet goes to the attacker.
fn hijacked(sw: &mut Switch, slot: usize) {
    let seen = sw.seen(u32::try_from(slot).unwrap());
    assert_eq!((seen.mac, seen.lb_mac), (ATTACKER_MAC, SWITCH_MAC), "learned from the forged frame");
    assert_eq!(sw.seen(u32::try_from(1 - slot).unwrap()).mac, LB_MACS[1 - slot], "the other balancer is untouched");
    sw.set_active(u32::try_from(slot).unwrap());
    let (action, out) = sw.run(&ack());
    sw.set_active(0);
    assert_eq!((action, headers(&out).eth_dst), (XDP_TX, ATTACKER_MAC), "client traffic follows the forged MAC");
}

fn lb0_hijacked(sw: &mut Switch) {
    hijacked(sw, 0);
}

fn lb1_hijacked(sw: &mut Switch) {
    hijacked(sw, 1);
}

/// A VIP-sourced frame with balancer 0's MAC counts as its answer (whoever sent it).
fn lb0_answered(sw: &mut Switch) {
    let seen = sw.seen(0);
    assert_eq!((seen.packets_from, seen.unanswered, seen.mac), (1, 0, LB_MACS[0]));
    assert!(seen.last_answer_ns > 0, "the watchdog saw an answer");
    assert_eq!(sw.seen(1).packets_from, 0);
}

/// A balancer's own frame with its own MAC: a sign of life, nothing relearned wrongly.
fn lb0_relearned(sw: &mut Switch) {
    let seen = sw.seen(0);
    assert_eq!((seen.mac, seen.lb_mac, seen.packets_from), (LB_MACS[0], SWITCH_MAC, 1));
    assert!(seen.last_answer_ns > 0);
}

/// A balancer's frame from or to an address no single host has (multicast, broadcast, zero)
/// is a sign of life but teaches nothing: learning it would black-hole or flood the clients.
fn lb0_alive_not_relearned(sw: &mut Switch) {
    let seen = sw.seen(0);
    assert_eq!((seen.mac, seen.lb_mac, seen.packets_from), (LB_MACS[0], SWITCH_MAC, 1));
    let (action, out) = sw.run(&ack());
    assert_eq!((action, headers(&out).eth_dst, headers(&out).eth_src), (XDP_TX, LB_MACS[0], SWITCH_MAC));
}

/// A client packet from a balancer's address is a client packet: it teaches no MAC.
fn lb0_not_learned(sw: &mut Switch) {
    let seen = sw.seen(0);
    assert_eq!((seen.mac, seen.packets_from, seen.unanswered), (LB_MACS[0], 0, 1));
}

/// The table.
#[expect(clippy::too_many_lines, reason = "one row per packet")]
fn cases() -> Vec<Case> {
    let ack_ip = ack()[14..].to_vec();
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 8 + 4, 17, 64];
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50]);
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64]);
    ipv6.extend_from_slice(&[0xa4, 0x10, 0, 69, 0, 12, 0, 0]);
    ipv6.extend_from_slice(b"\x00\x04\x00\x07");
    // An ARP reply that claims `ip` is at `mac`.
    let arp = |op: u8, mac: [u8; 6], ip: [u8; 4], target: [u8; 4]| {
        [[0, 1, 8, 0, 6, 4, 0, op].as_slice(), &mac, &ip, &[0; 6], &target].concat()
    };
    let udp_len = |frame: &[u8], ip: u16, udp: u16| {
        edit_ip(frame, |f| {
            f[16..18].copy_from_slice(&ip.to_be_bytes());
            f[38..40].copy_from_slice(&udp.to_be_bytes());
        })
    };
    let dhcp = udp_frame((CLIENT_MAC, [0xff; 6]), ([0; 4], 68), ([255; 4], 67), b"\x01\x01\x06\x00");

    vec![
        // Not IPv4: the stack's business, nothing learned from it.
        case("Ethernet header alone (ARP type)", ethernet([0x08, 0x06], b""), XDP_PASS, C::PassNotIpv4),
        case("ARP request for the VIP", ethernet([0x08, 0x06], &arp(1, CLIENT_MAC, CLIENT, VIP)), XDP_PASS, C::PassNotIpv4),
        case(
            "ARP reply: LB 0's address is at the attacker's MAC",
            with_macs(ethernet([0x08, 0x06], &arp(2, ATTACKER_MAC, LBS[0], VIP)), ATTACKER_MAC, SWITCH_MAC),
            XDP_PASS,
            C::PassNotIpv4,
        ),
        case("IPv6 UDP to port 69", ethernet([0x86, 0xdd], &ipv6), XDP_PASS, C::PassNotIpv4),
        case("802.1Q-tagged client ACK to the VIP", tagged(&ack(), [0x81, 0x00]), XDP_PASS, C::PassNotIpv4),
        case("802.1ad (QinQ) tagged client ACK to the VIP", tagged(&ack(), [0x88, 0xa8]), XDP_PASS, C::PassNotIpv4),
        case(
            "802.1Q-tagged frame from LB 0's address, forged MAC",
            tagged(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), [0x81, 0x00]),
            XDP_PASS,
            C::PassNotIpv4,
        ),
        case("IPv4 EtherType byte-swapped", ethernet([0x00, 0x08], &ack_ip), XDP_PASS, C::PassNotIpv4),
        case("802.3 length instead of an EtherType", ethernet([0x00, 0x40], &ack_ip), XDP_PASS, C::PassNotIpv4),
        case("IPv4 EtherType, version 6", edit_ip(&ack(), |f| f[14] = 0x65), XDP_PASS, C::PassNotIpv4),
        case("IPv4 EtherType, version 0", edit_ip(&ack(), |f| f[14] = 0x05), XDP_PASS, C::PassNotIpv4),
        case(
            "version 5 from LB 0's address, forged MAC",
            edit_ip(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), |f| f[14] = 0x55),
            XDP_PASS,
            C::PassNotIpv4,
        ),
        // Truncated Ethernet / IPv4 / UDP.
        case("IPv4 EtherType, nothing after it", cut(&ack(), 14), XDP_DROP, C::DropTruncated),
        case("IPv4 header one byte short", cut(&ack(), 33), XDP_DROP, C::DropTruncated),
        case("UDP header cut after the ports", cut(&ack(), 38), XDP_DROP, C::DropTruncated),
        case("UDP header one byte short", cut(&ack(), 41), XDP_DROP, C::DropTruncated),
        case("IHL 4: header shorter than 20 bytes", edit_ip(&ack(), |f| f[14] = 0x44), XDP_DROP, C::DropTruncated),
        case("IHL 0", edit_ip(&ack(), |f| f[14] = 0x40), XDP_DROP, C::DropTruncated),
        case("IHL 15: options run past the frame", edit_ip(&ack(), |f| f[14] = 0x4f), XDP_DROP, C::DropTruncated),
        case(
            "truncated UDP from LB 0's address, forged MAC",
            cut(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), 40),
            XDP_DROP,
            C::DropTruncated,
        ),
        // Lengths that disagree: the switch changes only MACs and leaves length checks to the
        // balancer, which drops these (`drop_truncated` in hostile_tests).
        case("IPv4 total length beyond the frame", udp_len(&ack(), 500, 12), XDP_TX, C::ToLb),
        case("IPv4 total length shorter than the UDP length", udp_len(&ack(), 24, 12), XDP_TX, C::ToLb),
        case("IPv4 total length 0", udp_len(&ack(), 0, 12), XDP_TX, C::ToLb),
        case("UDP length 0", udp_len(&ack(), 20, 0), XDP_TX, C::ToLb),
        case("UDP length beyond the frame", udp_len(&ack(), 32, 2000), XDP_TX, C::ToLb),
        // IP options and fragments: a balancer could not steer them.
        case("IP options on an RRQ to the VIP", with_ip_options(&rrq(), 1), XDP_DROP, C::DropFragmentOrOptions),
        case("40 bytes of IP options on a client ACK", with_ip_options(&ack(), 10), XDP_DROP, C::DropFragmentOrOptions),
        case("first fragment of an RRQ (more fragments)", edit_ip(&rrq(), |f| f[20] = 0x20), XDP_DROP, C::DropFragmentOrOptions),
        case(
            "later fragment to the VIP (offset 1480)",
            edit_ip(&ack(), |f| f[20..22].copy_from_slice(&185u16.to_be_bytes())),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        case(
            "last fragment to the VIP (offset 8, no more fragments)",
            edit_ip(&ack(), |f| f[20..22].copy_from_slice(&[0, 1])),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        // The reserved flag is not a fragment: the frame is whole.
        case("reserved IPv4 flag set (the 'evil bit')", edit_ip(&ack(), |f| f[20] = 0xc0), XDP_TX, C::ToLb),
        case(
            "IP options to another host",
            with_ip_options(&udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, 5353), (ELSEWHERE, 53), b"dns?"), 2),
            XDP_PASS,
            C::PassOther,
        ),
        case(
            "fragment to another host",
            edit_ip(&udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, 5353), (ELSEWHERE, 53), b"dns?"), |f| f[20] = 0x20),
            XDP_PASS,
            C::PassOther,
        ),
        // Not UDP.
        case("TCP to the VIP", proto(&rrq(), 6), XDP_PASS, C::PassNotUdp),
        case("ICMP to the VIP", proto(&ack(), 1), XDP_PASS, C::PassNotUdp),
        case("GRE to the VIP", proto(&ack(), 47), XDP_PASS, C::PassNotUdp),
        case("TCP from LB 0's address, forged MAC", proto(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), 6), XDP_PASS, C::PassNotUdp),
        case("IHL 0 on TCP (not ours to judge)", edit_ip(&proto(&ack(), 6), |f| f[14] = 0x40), XDP_PASS, C::PassNotUdp),
        // UDP to other addresses.
        case("DNS to another host", udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, 5353), (ELSEWHERE, 53), b"dns?"), XDP_PASS, C::PassOther),
        case("UDP to the limited broadcast address", udp_frame((CLIENT_MAC, [0xff; 6]), (CLIENT, PORT), ([255; 4], 69), RRQ), XDP_PASS, C::PassOther),
        case("UDP to the address next to the VIP", udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, PORT), ([10, 77, 9, 101], 69), RRQ), XDP_PASS, C::PassOther),
        case("UDP to LB 0's address from a client", udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, PORT), (LBS[0], 6970), HEARTBEAT), XDP_PASS, C::PassOther),
        case("DHCP discover from 0.0.0.0 to broadcast", dhcp, XDP_PASS, C::PassOther),
        // From the VIP: a reply only with a known balancer's MAC.
        case("from the VIP, a client's MAC (spoofed LB reply)", from_vip(CLIENT_MAC), XDP_PASS, C::PassOther),
        case("from the VIP, the attacker's MAC", from_vip(ATTACKER_MAC), XDP_PASS, C::PassOther),
        case("from the VIP, broadcast source MAC", from_vip([0xff; 6]), XDP_PASS, C::PassOther),
        case("from the VIP, all-zero source MAC, LB 1 unknown", from_vip([0; 6]), XDP_PASS, C::PassOther).knowing([true, false]),
        case("from the VIP, LB 0's MAC while it is unknown", from_vip(LB_MACS[0]), XDP_PASS, C::PassOther).knowing([false, true]),
        // Not defended (docs/SECURITY.md): a host that sends with a balancer's MAC speaks for it.
        case("from the VIP, LB 0's MAC (forgeable)", from_vip(LB_MACS[0]), XDP_PASS, C::ToClientByStack).then(lb0_answered),
        case(
            "from the VIP with IP options, LB 0's MAC",
            with_ip_options(&from_vip(LB_MACS[0]), 1),
            XDP_PASS,
            C::ToClientByStack,
        )
        .then(lb0_answered),
        // From a balancer's address: a sign of life that teaches its MAC.
        case("LB 0's heartbeat answer, its own MAC", from_lb(0, LB_MACS[0], SWITCH_MAC), XDP_PASS, C::FromLb).then(lb0_relearned),
        case("LB 0's multicast to the broadcast MAC", from_lb(0, LB_MACS[0], [0xff; 6]), XDP_PASS, C::FromLb)
            .then(lb0_alive_not_relearned),
        case("LB 0's address, all-zero source MAC", from_lb(0, [0; 6], SWITCH_MAC), XDP_PASS, C::FromLb)
            .then(lb0_alive_not_relearned),
        case("LB 0's address, broadcast source MAC", from_lb(0, [0xff; 6], SWITCH_MAC), XDP_PASS, C::FromLb)
            .then(lb0_alive_not_relearned),
        // A balancer's or the VIP's source address on the clients' side (not an --lb-iface):
        // dropped, nothing learned, no watchdog touched (the hijack of a balancer used to work
        // from there with one frame).
        case("client side: LB 0's address, forged MAC", from_lb(0, ATTACKER_MAC, SWITCH_MAC), XDP_DROP, C::DropSpoofedLb).on_client_side(),
        case("client side: LB 1's address, forged MAC", from_lb(1, ATTACKER_MAC, SWITCH_MAC), XDP_DROP, C::DropSpoofedLb).on_client_side(),
        case(
            "client side: LB 0's address, forged MAC, IP options",
            with_ip_options(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), 1),
            XDP_DROP,
            C::DropSpoofedLb,
        )
        .on_client_side(),
        case(
            "client side: LB 0's address, forged MAC, a fragment",
            edit_ip(&from_lb(0, ATTACKER_MAC, SWITCH_MAC), |f| f[20] = 0x20),
            XDP_DROP,
            C::DropSpoofedLb,
        )
        .on_client_side(),
        case("client side: LB 0's address, its own MAC", from_lb(0, LB_MACS[0], SWITCH_MAC), XDP_DROP, C::DropSpoofedLb).on_client_side(),
        case("client side: from the VIP, LB 0's MAC", from_vip(LB_MACS[0]), XDP_DROP, C::DropSpoofedLb).on_client_side(),
        case(
            "client side: LB 0's address to the VIP",
            udp_frame((ATTACKER_MAC, SWITCH_MAC), (LBS[0], PORT), (VIP, TFTP_PORT), RRQ),
            XDP_DROP,
            C::DropSpoofedLb,
        )
        .on_client_side(),
        steered_request("client side: a client's RRQ", rrq()).on_client_side(),
        // Not defended (docs/SECURITY.md): on the balancers' own network a host that sends with
        // a balancer's address (on-link spoofing) still moves that balancer to its MAC.
        case("LB side: LB 0's address, forged MAC", from_lb(0, ATTACKER_MAC, SWITCH_MAC), XDP_PASS, C::FromLb).then(lb0_hijacked),
        case("LB side: LB 1's address, forged MAC", from_lb(1, ATTACKER_MAC, SWITCH_MAC), XDP_PASS, C::FromLb).then(lb1_hijacked),
        steered_request("LB 0's address to the VIP, forged MAC", udp_frame((ATTACKER_MAC, SWITCH_MAC), (LBS[0], PORT), (VIP, TFTP_PORT), RRQ))
            .then(lb0_not_learned),
        // Client packets while the active balancer's MAC is unknown.
        case("client ACK, active LB unknown", ack(), XDP_DROP, C::DropNoLb).knowing([false, true]),
        case("client RRQ, no LB known", rrq(), XDP_DROP, C::DropNoLb).knowing([false, false]),
        case("client ACK without payload, active LB unknown", udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, PORT), (VIP, 23_456), b""), XDP_DROP, C::DropNoLb)
            .knowing([false, true]),
        // Odd MACs and addresses on client packets: steered (the switch owns the VIP's link and
        // checks no destination MAC); the balancer judges the rest.
        case("client ACK to the broadcast MAC", with_macs(ack(), CLIENT_MAC, [0xff; 6]), XDP_TX, C::ToLb),
        case("client ACK to an IPv4 multicast MAC", with_macs(ack(), CLIENT_MAC, [0x01, 0, 0x5e, 0, 0, 1]), XDP_TX, C::ToLb),
        case("client ACK to another host's MAC", with_macs(ack(), CLIENT_MAC, ATTACKER_MAC), XDP_TX, C::ToLb),
        case("client ACK from a multicast source MAC", with_macs(ack(), [0x01, 0, 0x5e, 0, 0, 1], SWITCH_MAC), XDP_TX, C::ToLb),
        steered_request("client spoofing the VIP as its source", udp_frame((CLIENT_MAC, SWITCH_MAC), (VIP, PORT), (VIP, TFTP_PORT), RRQ)),
        steered_request("client from 0.0.0.0 to the VIP", udp_frame((CLIENT_MAC, SWITCH_MAC), ([0; 4], PORT), (VIP, TFTP_PORT), RRQ)),
        // Requests the switch cannot keep are steered all the same, and counted.
        Case { also: Some(C::RequestUnkept), ..case("an RRQ longer than a kept request", long_rrq(), XDP_TX, C::ToLb) },
        Case { also: Some(C::RequestUnkept), ..case("an RRQ whose UDP length runs past the frame", udp_len(&rrq(), 47, 600), XDP_TX, C::ToLb) },
        case("client ACK, checksums wrong", { let mut f = ack(); f[24] ^= 0xff; f[40] ^= 0xff; f }, XDP_TX, C::ToLb),
        case("client ACK with Ethernet padding to 60 bytes", { let mut f = ack(); f.resize(60, 0); f }, XDP_TX, C::ToLb),
    ]
}

fn counters(sw: &Switch) -> Vec<u64> {
    sw.maps.counters().expect("counters").iter().map(|c| c.packets).collect()
}

fn clients(sw: &Switch) -> Vec<ClientKey> {
    sw.maps.clients.keys().map(|k| k.expect("client key")).collect()
}

/// Decisions that must leave `SW_SEEN` as it was: no MAC learned, no watchdog touched.
const NO_SIDE_EFFECT: [C; 7] = [C::PassNotIpv4, C::PassNotUdp, C::PassOther, C::DropTruncated, C::DropFragmentOrOptions, C::DropNoLb, C::DropSpoofedLb];

#[test]
fn hostile_packets_are_handled_and_counted() {
    let mut sw = Switch::new([true, true]);
    let table = cases();
    assert!(table.len() >= 30, "{} rows", table.len());
    for Case { name, frame, known, action, counter, after, client_side, also } in table {
        sw.know(known);
        sw.arrive_on_lb_side(!client_side);
        for key in clients(&sw) {
            sw.maps.clients.remove(&key).expect("forget a client");
        }
        let before = counters(&sw);
        let seen = [sw.seen(0), sw.seen(1)];

        let (got, out) = sw.run(&frame);
        assert_eq!(got, action, "{name}: XDP action");
        let after_run = counters(&sw);
        for c in C::ALL {
            let expected = before[*c as usize] + u64::from(*c == C::Received || *c == counter || Some(*c) == also);
            assert_eq!(after_run[*c as usize], expected, "{name}: counter {} (expected {})", c.name(), counter.name());
        }
        match action {
            XDP_PASS => assert_eq!(out, frame, "{name}: passed unchanged"),
            XDP_TX => {
                assert_eq!((headers(&out).eth_dst, headers(&out).eth_src), (LB_MACS[0], SWITCH_MAC), "{name}: to LB 0");
                assert_eq!(out[12..], frame[12..], "{name}: only the MACs change");
            }
            _ => {}
        }
        let recorded = clients(&sw);
        if counter == C::ToLb {
            let key = ClientKey::new(frame[26..30].try_into().unwrap(), [frame[34], frame[35]]);
            assert_eq!(recorded, [key], "{name}: the client is in flight");
        } else {
            assert!(recorded.is_empty(), "{name}: no client recorded");
        }
        if NO_SIDE_EFFECT.contains(&counter) {
            assert_eq!([sw.seen(0), sw.seen(1)], seen, "{name}: nothing learned, no watchdog touched");
        }
        if let Some(after) = after {
            after(&mut sw);
        }
    }
}

#[test]
fn the_table_frames_are_what_they_claim() {
    let ack = ack();
    let mut fixed = ack.clone();
    fix_ip_checksum(&mut fixed);
    assert_eq!(fixed, ack, "the base frame's IPv4 checksum is valid");
    let options = with_ip_options(&ack, 1);
    assert_eq!(usize::from(u16::from_be_bytes([options[16], options[17]])) + 14, options.len());
    assert_eq!(options[14], 0x46);
    let vlan = tagged(&ack, [0x81, 0x00]);
    assert_eq!((&vlan[12..16], &vlan[16..]), (&[0x81, 0x00, 0x00, 0x0a][..], &ack[12..]));
    let hb = from_lb(1, ATTACKER_MAC, SWITCH_MAC);
    assert_eq!((&hb[26..30], &hb[6..12]), (&LBS[1][..], &ATTACKER_MAC[..]));
    assert_eq!(&from_vip(LB_MACS[0])[26..30], &VIP[..]);
}
