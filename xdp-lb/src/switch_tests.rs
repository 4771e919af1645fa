//! BPF_PROG_TEST_RUN tests of `switch` on the real object: client traffic to the active load
//! balancer, frames from the balancers as signs of life, everything else untouched. They need
//! root (loading BPF) and fail without it.

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use xdp_lb_common::{ClientKey, FrameHeaders, LbSeen, SwitchConfig, SwitchCounter as C, names::PROGRAM_SWITCH};

use crate::{maps::SwitchMaps, testrun::{TEST_IFINDEX, XDP_DROP, XDP_PASS, XDP_TX, udp_frame}};

pub(crate) const VIP: [u8; 4] = [10, 77, 9, 100];
pub(crate) const LBS: [[u8; 4]; 2] = [[10, 77, 0, 2], [10, 77, 0, 3]];
pub(crate) const LB_MACS: [[u8; 6]; 2] = [[0x02, 0, 0, 0, 0, 0xa0], [0x02, 0, 0, 0, 0, 0xa1]];
pub(crate) const SWITCH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub(crate) const CLIENT: [u8; 4] = [10, 78, 0, 50];
pub(crate) const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];

pub(crate) struct Switch {
    ebpf: Ebpf,
    pub(crate) maps: SwitchMaps,
    lb_ifaces: aya::maps::HashMap<aya::maps::MapData, u32, u32>,
}

impl Switch {
    /// A loaded `switch` with balancer 0 active; `known` says which balancers' MACs it learned.
    pub(crate) fn new(known: [bool; 2]) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "BPF_PROG_TEST_RUN tests need root: run them as root (cargo xtask test)");
        let mut ebpf = EbpfLoader::new().load(crate::loader::OBJECT).expect("loading the object");
        let program: &mut Xdp = ebpf.program_mut(PROGRAM_SWITCH).expect("switch program").try_into().expect("an XDP program");
        program.load().expect("the verifier accepts switch");
        let mut maps = SwitchMaps::take(&mut ebpf).expect("switch maps");
        maps.config.set(0, SwitchConfig { vip: VIP, lbs: LBS, active: 0 }, 0).expect("config");
        let lb_ifaces = crate::maps::lb_ifaces(&mut ebpf).expect("SW_LB_IFACES");
        let mut switch = Self { ebpf, maps, lb_ifaces };
        switch.know(known);
        switch.arrive_on_lb_side(true);
        switch
    }

    /// Whether the test's frames arrive on an interface that faces the balancers (`--lb-iface`;
    /// the default) or on the clients' side.
    pub(crate) fn arrive_on_lb_side(&mut self, lb_side: bool) {
        if lb_side {
            self.lb_ifaces.insert(TEST_IFINDEX, xdp_lb_common::maps::LB_FACING, 0).expect("mark the test port LB-facing");
        } else {
            let _ = self.lb_ifaces.remove(&TEST_IFINDEX);
        }
    }

    /// Sets what the program saw of each balancer: its MAC learned (`known`) or nothing yet.
    pub(crate) fn know(&mut self, known: [bool; 2]) {
        for slot in 0..2 {
            let seen = if known[slot] {
                LbSeen { mac: LB_MACS[slot], lb_mac: SWITCH_MAC, ifindex: TEST_IFINDEX, ..LbSeen::default() }
            } else {
                LbSeen::default()
            };
            self.maps.seen.set(u32::try_from(slot).unwrap(), seen, 0).expect("seen");
        }
    }

    pub(crate) fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp = self.ebpf.program_mut(PROGRAM_SWITCH).expect("switch").try_into().expect("xdp");
        let mut out = vec![0u8; frame.len() + 64];
        let result = program
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
            .context("BPF_PROG_TEST_RUN")
            .unwrap();
        out.truncate(usize::try_from(result.data_size_out).unwrap());
        (result.return_value, out)
    }

    pub(crate) fn counter(&self, which: C) -> u64 {
        self.maps.counters().unwrap()[which as usize].packets
    }

    pub(crate) fn seen(&self, slot: u32) -> LbSeen {
        self.maps.seen(slot).unwrap()
    }

    pub(crate) fn set_active(&mut self, slot: u32) {
        let mut config = self.maps.config().unwrap();
        config.active = slot;
        self.maps.config.set(0, config, 0).unwrap();
    }
}

pub(crate) fn headers(frame: &[u8]) -> FrameHeaders {
    *bytemuck::from_bytes::<FrameHeaders>(&frame[..FrameHeaders::LEN])
}

pub(crate) fn client_ack(port: u16) -> Vec<u8> {
    udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, port), (VIP, 23_456), b"\x00\x04\x00\x07")
}

#[test]
fn client_packets_go_to_the_active_balancer_unchanged_but_for_the_macs() {
    let mut sw = Switch::new([true, true]);
    let frame = client_ack(40_000);
    let (action, out) = sw.run(&frame);
    assert_eq!(action, XDP_TX, "out of the interface it came in (the test's only one)");
    assert_eq!((headers(&out).eth_dst, headers(&out).eth_src), (LB_MACS[0], SWITCH_MAC));
    assert_eq!(&out[12..], &frame[12..], "IP, UDP and payload untouched");
    assert_eq!(sw.counter(C::ToLb), 1);
    let seen = sw.seen(0);
    assert_eq!((seen.unanswered, seen.packets_to), (1, 1), "the watchdog counts it");
    let key = ClientKey::new(CLIENT, 40_000u16.to_be_bytes());
    assert!(sw.maps.clients.get(&key, 0).is_ok(), "the client is in flight");

    sw.set_active(1);
    let (action, out) = sw.run(&frame);
    assert_eq!(action, XDP_TX);
    assert_eq!(headers(&out).eth_dst, LB_MACS[1], "a swap re-steers the next packet");
    assert_eq!(sw.seen(1).unanswered, 1);
}

#[test]
fn without_a_known_active_balancer_client_packets_are_dropped_and_counted() {
    let mut sw = Switch::new([false, true]);
    let (action, _) = sw.run(&client_ack(40_001));
    assert_eq!(action, XDP_DROP);
    assert_eq!(sw.counter(C::DropNoLb), 1);
}

#[test]
fn a_balancers_own_frames_teach_its_mac_and_reset_its_watchdog() {
    let mut sw = Switch::new([false, false]);
    let answer = udp_frame((LB_MACS[1], SWITCH_MAC), (LBS[1], 6970), ([10, 77, 0, 1], 50_000), b"XLC1\x02\x00\x00\x00");
    let (action, out) = sw.run(&answer);
    assert_eq!((action, out), (XDP_PASS, answer), "heartbeat answers go to the agent unchanged");
    let seen = sw.seen(1);
    assert_eq!((seen.mac, seen.lb_mac, seen.ifindex), (LB_MACS[1], SWITCH_MAC, TEST_IFINDEX));
    assert!(seen.last_answer_ns > 0);
    assert_eq!(sw.counter(C::FromLb), 1);
}

#[test]
fn replies_from_the_vip_mark_their_balancer_alive() {
    let mut sw = Switch::new([true, true]);
    sw.run(&client_ack(40_002));
    assert_eq!(sw.seen(0).unanswered, 1);
    let data = udp_frame((LB_MACS[0], SWITCH_MAC), (VIP, 23_456), (CLIENT, 40_002), b"\x00\x03\x00\x08data");
    let (action, _) = sw.run(&data);
    // The test runs on loopback, where the kernel has no route to forward by: the stack gets it.
    assert_eq!(action, XDP_PASS);
    assert_eq!(sw.counter(C::ToClientByStack), 1);
    let seen = sw.seen(0);
    assert_eq!((seen.unanswered, seen.packets_from), (0, 1), "answered");
    assert_eq!(sw.seen(1).packets_from, 0, "recognised by its MAC, not the other one");

    let spoofed = udp_frame((CLIENT_MAC, SWITCH_MAC), (VIP, 23_456), (CLIENT, 40_002), b"\x00\x03\x00\x08data");
    let (action, out) = sw.run(&spoofed);
    assert_eq!((action, out), (XDP_PASS, spoofed), "a VIP-sourced frame from no balancer is not steered");
    assert_eq!(sw.counter(C::PassOther), 1);
}

#[test]
fn other_traffic_passes_and_broken_frames_are_dropped() {
    let mut sw = Switch::new([true, true]);
    let dns = udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, 5353), ([10, 78, 0, 1], 53), b"dns?");
    assert_eq!(sw.run(&dns), (XDP_PASS, dns));
    let mut arp = client_ack(40_003);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(sw.run(&arp).0, XDP_PASS);
    let mut fragment = client_ack(40_004);
    fragment[20..22].copy_from_slice(&[0x20, 0x00]);
    assert_eq!(sw.run(&fragment).0, XDP_DROP, "a fragment of VIP traffic cannot be steered by port");
    let truncated = &client_ack(40_005)[..30];
    assert_eq!(sw.run(truncated).0, XDP_DROP);
    for (counter, expected) in [(C::PassOther, 1), (C::PassNotIpv4, 1), (C::DropFragmentOrOptions, 1), (C::DropTruncated, 1), (C::ToLb, 0)] {
        assert_eq!(sw.counter(counter), expected, "{counter:?}");
    }
    assert_eq!(sw.counter(C::Received), 4);
}

fn client_request(port: u16, payload: &[u8]) -> Vec<u8> {
    udp_frame((CLIENT_MAC, SWITCH_MAC), (CLIENT, port), (VIP, xdp_lb_common::TFTP_PORT), payload)
}

/// A request kept on its way to the active balancer: the agent steers it again should that
/// balancer die with it (`replay`). Only RRQ and WRQ to port 69 are kept, each client's latest,
/// with the stamp the client got in `SW_CLIENTS` and the balancer it went to.
#[test]
fn requests_are_kept_with_their_balancer_and_their_clients_stamp() {
    let mut sw = Switch::new([true, true]);
    let rrq = b"\x00\x01kernel\x00octet\x00blksize\x001432\x00";
    let (action, _) = sw.run(&client_request(40_010, rrq));
    assert_eq!(action, XDP_TX);
    let key = ClientKey::new(CLIENT, 40_010u16.to_be_bytes());
    let kept = sw.maps.requests.get(&key, 0).expect("the RRQ is kept");
    assert_eq!(kept.request.request(), Some(&rrq[..]));
    assert_eq!(kept.lb_slot, 0);
    assert_eq!(Some(kept.steered_ns), sw.maps.clients.get(&key, 0).ok(), "the client's stamp, so a later packet shows");
    assert_eq!((sw.counter(C::RequestKept), sw.counter(C::ToLb)), (1, 1));

    sw.set_active(1);
    let wrq = b"\x00\x02config\x00octet\x00";
    sw.run(&client_request(40_010, wrq));
    let kept = sw.maps.requests.get(&key, 0).expect("the WRQ replaces it");
    assert_eq!((kept.request.request(), kept.lb_slot), (Some(&wrq[..]), 1));

    // Not requests: an ACK to the client's TID, DATA or a bare opcode byte to port 69.
    for (port, frame) in [(40_011, client_ack(40_011)), (40_012, client_request(40_012, b"\x00\x03\x00\x01x")), (40_013, client_request(40_013, b"\x00"))] {
        sw.run(&frame);
        assert!(sw.maps.requests.get(&ClientKey::new(CLIENT, u16::to_be_bytes(port)), 0).is_err(), "port {port}: not a request");
    }
    assert_eq!(sw.counter(C::RequestKept), 2);

    let mut long = b"\x00\x01".to_vec();
    long.resize(xdp_lb_common::maps::REQUEST_KEPT_MAX + 1, b'a');
    let (action, _) = sw.run(&client_request(40_014, &long));
    assert_eq!(action, XDP_TX, "steered all the same");
    assert_eq!(sw.counter(C::RequestUnkept), 1);
    assert!(sw.maps.requests.get(&ClientKey::new(CLIENT, 40_014u16.to_be_bytes()), 0).is_err());
}
