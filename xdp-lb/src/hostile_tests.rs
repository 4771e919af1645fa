//! Malformed and hostile packets for `balance`, run on the real object with BPF_PROG_TEST_RUN:
//! one table, one row per packet, each with the XDP action and the decision counter it must
//! produce. For every row the test also checks that `received` and that one counter went up by
//! exactly one and no other counter moved, that a passed packet leaves unchanged, and that a
//! dropped or passed packet creates no session.
//!
//! Not covered: frames shorter than an Ethernet header (BPF_PROG_TEST_RUN refuses inputs under
//! 14 bytes before the program runs), replies from a registered backend for a client without a
//! session (they relearn it), and anything that depends on how replies reach clients.
//! Needs root, like `kernel_tests`.

use xdp_lb_common::{
    BalanceCounter as C, ClientKey, FrameHeaders, SteeringHeader, TFTP_PORT,
    checksum,
    frame::{checksums_valid, udp_checksum},
    steering::{FLAG_FINISHED, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARTBEAT, STEERING_MAGIC},
};

use crate::testrun::{
    BACKEND_PORT, CLIENT_MAC, Fixture, LB_MAC, STEER_ADDR, STEER_PORT, VIP, backend_ip, backend_mac, from_backend,
    from_client, udp_frame, XDP_DROP, XDP_PASS, XDP_TX,
};


const CLIENT: [u8; 4] = [10, 77, 0, 60];
/// The client port whose session the table's session rows use.
const PORT: u16 = 41_000;
/// Another client on the same network.
const OTHER_CLIENT: [u8; 4] = [10, 77, 0, 61];
const ELSEWHERE: [u8; 4] = [10, 77, 0, 9];
const RRQ: &[u8] = b"\x00\x01pxelinux.0\x00octet\x00";
const ACK: &[u8] = b"\x00\x04\x00\x01";

/// A further check on the packet the program left, given the one it got.
type OutputCheck = fn(&[u8], &[u8]);

/// One hostile packet and what `balance` must do with it.
struct Case {
    name: &'static str,
    frame: Vec<u8>,
    action: u32,
    counter: C,
    check: Option<OutputCheck>,
}

fn case(name: &'static str, frame: Vec<u8>, action: u32, counter: C) -> Case {
    Case { name, frame, action, counter, check: None }
}

fn tid(ip: [u8; 4], port: u16) -> u16 {
    ClientKey::new(ip, port.to_be_bytes()).tid()
}

/// Recomputes the IPv4 header checksum over the header's real length (options included).
pub(crate) fn fix_ip_checksum(frame: &mut [u8]) {
    // A header length past the frame is a truncation case: sum what there is.
    let ihl = (usize::from(frame[14] & 0x0f) * 4).min(frame.len() - 14);
    frame[24..26].fill(0);
    let mut words = [0u8; 60];
    words[..ihl].copy_from_slice(&frame[14..14 + ihl]);
    let sum = checksum::sum_words(&words);
    frame[24..26].copy_from_slice(&checksum::complete(sum).to_be_bytes());
}

fn ip_checksum_valid(frame: &[u8]) -> bool {
    let mut copy = frame.to_vec();
    fix_ip_checksum(&mut copy);
    copy[24..26] == frame[24..26]
}

/// `frame` with `words` 32-bit words of IP options (NOPs) after the fixed IPv4 header.
pub(crate) fn with_ip_options(frame: &[u8], words: u8) -> Vec<u8> {
    let mut out = frame[..34].to_vec();
    out.extend(std::iter::repeat_n(1u8, usize::from(words) * 4));
    out.extend_from_slice(&frame[34..]);
    out[14] = 0x45 + words;
    let ip_len = u16::from_be_bytes([out[16], out[17]]) + u16::from(words) * 4;
    out[16..18].copy_from_slice(&ip_len.to_be_bytes());
    fix_ip_checksum(&mut out);
    out
}

/// `frame` with its IPv4 header edited by `edit`, checksum recomputed.
pub(crate) fn edit_ip(frame: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut out = frame.to_vec();
    edit(&mut out);
    fix_ip_checksum(&mut out);
    out
}

/// An Ethernet frame with `ethertype` and `body`.
pub(crate) fn ethernet(ethertype: [u8; 2], body: &[u8]) -> Vec<u8> {
    let mut out = LB_MAC.to_vec();
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&ethertype);
    out.extend_from_slice(body);
    out
}

/// A backend-style reply header for the table's client.
fn reply(flags: u8) -> SteeringHeader {
    let mut h = SteeringHeader::for_client(CLIENT, PORT, VIP, tid(CLIENT, PORT));
    h.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT | flags;
    h.set_block(1);
    h
}

/// A frame from registered backend `id`'s address to the steering port, any payload.
fn to_steer_port_from(id: u32, payload: &[u8]) -> Vec<u8> {
    udp_frame((backend_mac(id), LB_MAC), (backend_ip(id), BACKEND_PORT), (STEER_ADDR, STEER_PORT), payload)
}

fn the_udp_checksum_still_fails(_: &[u8], out: &[u8]) {
    assert!(ip_checksum_valid(out), "the IPv4 header checksum is recomputed");
    let carried = u16::from_be_bytes([out[40], out[41]]);
    assert_ne!(udp_checksum(out), Some(carried), "the UDP checksum error must reach the backend");
}

fn checksums_stay_valid(_: &[u8], out: &[u8]) {
    assert!(checksums_valid(out));
}

fn no_udp_checksum_stays_none(_: &[u8], out: &[u8]) {
    assert_eq!(out[40..42], [0, 0], "an absent UDP checksum stays absent");
    assert!(ip_checksum_valid(out));
}

/// The client's bytes (a forged steering header) travel as TFTP payload behind the LB's own
/// header, which names the real client and claims nothing.
fn forged_header_is_payload(input: &[u8], out: &[u8]) {
    let header: SteeringHeader = *bytemuck::from_bytes(&out[42..42 + SteeringHeader::LEN]);
    assert_eq!((header.client_ip, header.client_port()), (CLIENT, PORT));
    assert_eq!(header.flags & (FLAG_FROM_BACKEND | FLAG_FINISHED | FLAG_HEARTBEAT), 0);
    assert_eq!(&out[42 + SteeringHeader::LEN..], &input[42..]);
    assert!(checksums_valid(out));
}

/// The table. `own` is the backend serving the session of `CLIENT:PORT`, `other` the second one.
#[expect(clippy::too_many_lines, reason = "one row per packet")]
fn cases(own: u32, other: u32) -> Vec<Case> {
    let rrq = |port: u16| from_client(CLIENT, port, TFTP_PORT, RRQ);
    let ack = from_client(CLIENT, PORT, tid(CLIENT, PORT), ACK);
    let rrq_frame = rrq(41_001);
    let rrq_ip = &rrq_frame[14..];
    let mut ipv6 = vec![0x60, 0, 0, 0, 0, 8 + 20, 17, 64];
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    ipv6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64]);
    ipv6.extend_from_slice(&[0x9c, 0x40, 0, 69, 0, 28, 0, 0]);
    ipv6.extend_from_slice(&rrq_ip[28..]);
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP);
    let vlan = |tpid: [u8; 2]| ethernet(tpid, &[[0x00, 0x0a, 0x08, 0x00].as_slice(), rrq_ip].concat());
    let mut forged = bytemuck::bytes_of(&reply(FLAG_FINISHED)).to_vec();
    forged.extend_from_slice(ACK);
    let mut padded_ack = ack.clone();
    padded_ack.resize(60, 0);
    let spoofed_backend_finished = from_backend(own, &reply(FLAG_FINISHED), b"");

    vec![
        // Not IPv4: the stack's business.
        case("Ethernet header alone (ARP type)", ethernet([0x08, 0x06], b""), XDP_PASS, C::PassNotIpv4),
        case("ARP request for the VIP", ethernet([0x08, 0x06], &arp), XDP_PASS, C::PassNotIpv4),
        case("IPv6 UDP to port 69", ethernet([0x86, 0xdd], &ipv6), XDP_PASS, C::PassNotIpv4),
        case("802.1Q-tagged RRQ to the VIP", vlan([0x81, 0x00]), XDP_PASS, C::PassNotIpv4),
        case("802.1ad (QinQ) tagged RRQ to the VIP", vlan([0x88, 0xa8]), XDP_PASS, C::PassNotIpv4),
        case("IPv4 EtherType byte-swapped", ethernet([0x00, 0x08], rrq_ip), XDP_PASS, C::PassNotIpv4),
        case("802.3 length instead of an EtherType", ethernet([0x00, 0x40], rrq_ip), XDP_PASS, C::PassNotIpv4),
        // Truncated Ethernet / IPv4 / UDP.
        case("IPv4 EtherType, nothing after it", rrq(41_001)[..14].to_vec(), XDP_DROP, C::DropTruncated),
        case("IPv4 header one byte short", rrq(41_001)[..33].to_vec(), XDP_DROP, C::DropTruncated),
        case("UDP header cut after the ports", rrq(41_001)[..38].to_vec(), XDP_DROP, C::DropTruncated),
        case("IHL 4: header shorter than 20 bytes", edit_ip(&rrq(41_001), |f| f[14] = 0x44), XDP_DROP, C::DropTruncated),
        case("IHL 0", edit_ip(&rrq(41_001), |f| f[14] = 0x40), XDP_DROP, C::DropTruncated),
        case("IHL 15: options run past the frame", edit_ip(&ack, |f| f[14] = 0x4f), XDP_DROP, C::DropTruncated),
        // Lengths that disagree.
        case(
            "IPv4 total length beyond the frame",
            edit_ip(&rrq(41_001), |f| f[16..18].copy_from_slice(&500u16.to_be_bytes())),
            XDP_DROP,
            C::DropTruncated,
        ),
        case(
            "IPv4 total length shorter than the UDP length",
            edit_ip(&rrq(41_001), |f| f[17] -= 4),
            XDP_DROP,
            C::DropTruncated,
        ),
        case(
            "UDP length 4 (below its own header)",
            edit_ip(&rrq(41_001), |f| {
                f[16..18].copy_from_slice(&24u16.to_be_bytes());
                f[38..40].copy_from_slice(&4u16.to_be_bytes());
            }),
            XDP_DROP,
            C::DropTruncated,
        ),
        case(
            "UDP length 0",
            edit_ip(&rrq(41_001), |f| {
                f[16..18].copy_from_slice(&20u16.to_be_bytes());
                f[38..40].copy_from_slice(&[0, 0]);
            }),
            XDP_DROP,
            C::DropTruncated,
        ),
        case(
            "IPv4 and UDP lengths agree, both beyond the frame",
            edit_ip(&rrq(41_001), |f| {
                let len = u16::try_from(f.len()).unwrap();
                f[16..18].copy_from_slice(&(len - 14 + 10).to_be_bytes());
                f[38..40].copy_from_slice(&(len - 34 + 10).to_be_bytes());
            }),
            XDP_DROP,
            C::DropTruncated,
        ),
        // IP options and fragments: cannot be steered by port.
        case("IP options on an RRQ to the VIP", with_ip_options(&rrq(41_001), 1), XDP_DROP, C::DropFragmentOrOptions),
        case("40 bytes of IP options on a client ACK", with_ip_options(&ack, 10), XDP_DROP, C::DropFragmentOrOptions),
        case(
            "IP options on a backend reply",
            with_ip_options(&from_backend(own, &reply(0), b"\x00\x03\x00\x01x"), 1),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        case(
            "IP options to another host",
            with_ip_options(&udp_frame((CLIENT_MAC, LB_MAC), (CLIENT, 5353), (ELSEWHERE, 69), RRQ), 2),
            XDP_PASS,
            C::PassNotService,
        ),
        case(
            "first fragment of an RRQ (more fragments)",
            edit_ip(&rrq(41_001), |f| f[20] = 0x20),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        case(
            "later fragment to the VIP (offset 1480)",
            edit_ip(&rrq(41_001), |f| f[20..22].copy_from_slice(&185u16.to_be_bytes())),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        case(
            "fragment of a backend reply",
            edit_ip(&from_backend(own, &reply(0), b"\x00\x03\x00\x01x"), |f| f[20] = 0x20),
            XDP_DROP,
            C::DropFragmentOrOptions,
        ),
        // Not UDP, not for the service.
        case("TCP to the VIP's port 69", edit_ip(&rrq(41_001), |f| f[23] = 6), XDP_PASS, C::PassNotUdp),
        case("ICMP to the VIP", edit_ip(&rrq(41_001), |f| f[23] = 1), XDP_PASS, C::PassNotUdp),
        case("UDP to the VIP, an unrelated port", from_client(CLIENT, PORT, 5353, b"mdns"), XDP_PASS, C::PassNotService),
        case(
            "UDP to the VIP at another client's TID",
            from_client(OTHER_CLIENT, PORT, tid(CLIENT, PORT), ACK),
            XDP_PASS,
            C::PassNotService,
        ),
        case(
            "UDP to the VIP at the steering port",
            from_client(CLIENT, PORT, STEER_PORT, &forged),
            XDP_PASS,
            C::PassNotService,
        ),
        case(
            "UDP to the steering address, another port",
            udp_frame((backend_mac(own), LB_MAC), (backend_ip(own), BACKEND_PORT), (STEER_ADDR, 6970), &forged),
            XDP_PASS,
            C::PassNotService,
        ),
        // Requests: only RRQ and WRQ open sessions.
        case("forged steering header to port 69", from_client(CLIENT, 41_002, TFTP_PORT, &forged), XDP_DROP, C::DropNotRequest),
        case("OACK to port 69", from_client(CLIENT, 41_002, TFTP_PORT, b"\x00\x06blksize\x00512\x00"), XDP_DROP, C::DropNotRequest),
        case("ERROR to port 69", from_client(CLIENT, 41_002, TFTP_PORT, b"\x00\x05\x00\x00x\x00"), XDP_DROP, C::DropNotRequest),
        case("opcode 0 to port 69", from_client(CLIENT, 41_002, TFTP_PORT, b"\x00\x00boot\x00octet\x00"), XDP_DROP, C::DropNotRequest),
        case("RRQ opcode byte-swapped", from_client(CLIENT, 41_002, TFTP_PORT, b"\x01\x00boot\x00octet\x00"), XDP_DROP, C::DropNotRequest),
        case("one byte to port 69", from_client(CLIENT, 41_002, TFTP_PORT, b"\x00"), XDP_DROP, C::DropNotRequest),
        // The LB checks the opcode only; the backend refuses a malformed request with an ERROR.
        case("RRQ opcode and nothing else", from_client(CLIENT, 41_003, TFTP_PORT, b"\x00\x01"), XDP_TX, C::NewSession),
        // Checksums are not verified in XDP: the rewrite recomputes the IPv4 header checksum and
        // carries the UDP checksum over incrementally, so an error in it still reaches the
        // backend's stack (the UDP checksum covers the addresses too).
        Case {
            check: Some(checksums_stay_valid),
            ..case("IPv4 header checksum field wrong", { let mut f = rrq(41_004); f[24] ^= 0xff; f }, XDP_TX, C::NewSession)
        },
        Case {
            check: Some(the_udp_checksum_still_fails),
            ..case("UDP checksum wrong", { let mut f = rrq(41_005); f[40] ^= 0x5a; f }, XDP_TX, C::NewSession)
        },
        Case {
            check: Some(the_udp_checksum_still_fails),
            ..case("source address corrupted after checksumming", { let mut f = rrq(41_006); f[29] ^= 0x80; f }, XDP_TX, C::NewSession)
        },
        Case {
            check: Some(no_udp_checksum_stays_none),
            ..case("client ACK without a UDP checksum", { let mut f = ack.clone(); f[40..42].fill(0); f }, XDP_TX, C::ToBackend)
        },
        Case {
            check: Some(checksums_stay_valid),
            ..case("client ACK with Ethernet padding to 60 bytes", padded_ack, XDP_TX, C::ToBackend)
        },
        // Client packets that pretend to be something else.
        case(
            "ACK to a TID without a session",
            from_client(CLIENT, 41_007, tid(CLIENT, 41_007), ACK),
            XDP_DROP,
            C::DropNoSession,
        ),
        case(
            "forged steering header to a TID without a session",
            from_client(CLIENT, 41_008, tid(CLIENT, 41_008), &forged),
            XDP_DROP,
            C::DropNoSession,
        ),
        Case {
            check: Some(forged_header_is_payload),
            ..case("forged FINISHED header inside a client's packet", from_client(CLIENT, PORT, tid(CLIENT, PORT), &forged), XDP_TX, C::ToBackend)
        },
        // The steering port: registered backends only, with a valid header.
        case(
            "forged reply from the client's address",
            udp_frame((CLIENT_MAC, LB_MAC), (CLIENT, BACKEND_PORT), (STEER_ADDR, STEER_PORT), &forged),
            XDP_DROP,
            C::DropUnknownSource,
        ),
        case(
            "backend address, wrong source port",
            udp_frame((backend_mac(own), LB_MAC), (backend_ip(own), BACKEND_PORT + 1), (STEER_ADDR, STEER_PORT), &forged),
            XDP_DROP,
            C::DropUnknownSource,
        ),
        case(
            "0.0.0.0 with the backend port (matches empty slots' address)",
            udp_frame((CLIENT_MAC, LB_MAC), ([0; 4], BACKEND_PORT), (STEER_ADDR, STEER_PORT), &forged),
            XDP_DROP,
            C::DropUnknownSource,
        ),
        case(
            "reply from the VIP's own address",
            udp_frame((CLIENT_MAC, LB_MAC), (VIP, BACKEND_PORT), (STEER_ADDR, STEER_PORT), &forged),
            XDP_DROP,
            C::DropUnknownSource,
        ),
        case("backend: empty payload", to_steer_port_from(own, b""), XDP_DROP, C::DropBadHeader),
        case("backend: header cut at 40 bytes", to_steer_port_from(own, &forged[..40]), XDP_DROP, C::DropBadHeader),
        case(
            "backend: header bytes beyond the UDP length",
            edit_ip(&to_steer_port_from(own, &forged), |f| {
                f[16..18].copy_from_slice(&(20u16 + 8 + 10).to_be_bytes());
                f[38..40].copy_from_slice(&(8u16 + 10).to_be_bytes());
            }),
            XDP_DROP,
            C::DropBadHeader,
        ),
        case(
            "backend: magic of another version",
            to_steer_port_from(own, &[b"XLB\x02".as_slice(), &forged[4..]].concat()),
            XDP_DROP,
            C::DropBadHeader,
        ),
        case(
            "backend: valid magic, FROM_BACKEND clear (an LB header looped back)",
            to_steer_port_from(own, &{
                let mut h = reply(0);
                h.flags = FLAG_HAS_CONTEXT;
                [bytemuck::bytes_of(&h), ACK].concat()
            }),
            XDP_DROP,
            C::DropBadHeader,
        ),
        case(
            "backend: heartbeat without magic",
            to_steer_port_from(own, &{
                let mut h = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
                h.magic = *b"XLB\x00";
                h.flags = FLAG_FROM_BACKEND | FLAG_HEARTBEAT;
                bytemuck::bytes_of(&h).to_vec()
            }),
            XDP_DROP,
            C::DropBadHeader,
        ),
        case(
            "backend: DATA longer than 512 bytes without a negotiated blksize",
            from_backend(own, &reply(0), &[b"\x00\x03\x00\x01".as_slice(), &[0u8; 513]].concat()),
            XDP_DROP,
            C::DropOversize,
        ),
        case(
            "backend: DATA for a session another backend serves",
            from_backend(other, &reply(0), b"\x00\x03\x00\x01evil"),
            XDP_DROP,
            C::DropStaleBackend,
        ),
        case(
            "backend: FINISHED for a session another backend serves",
            from_backend(other, &reply(FLAG_FINISHED), b""),
            XDP_DROP,
            C::DropStaleBackend,
        ),
        // Not defended (docs/SECURITY.md): whoever can send from the serving backend's address
        // and port ends the session.
        case("spoofed backend address: FINISHED", spoofed_backend_finished, XDP_DROP, C::SessionFinished),
    ]
}

fn fixture() -> Fixture {
    assert!(nix::unistd::geteuid().is_root(), "BPF_PROG_TEST_RUN tests need root: run them as root (cargo xtask test)");
    Fixture::new(2).expect("load balance")
}

fn counters(f: &Fixture) -> Vec<u64> {
    f.maps.counters().expect("counters").iter().map(|c| c.packets).collect()
}

#[test]
fn hostile_packets_are_handled_and_counted() {
    let mut f = fixture();
    let (action, out) = f.run(&from_client(CLIENT, PORT, TFTP_PORT, RRQ)).unwrap();
    assert_eq!(action, XDP_TX, "the table's session opens");
    let own = (0..2).find(|&i| out[30..34] == backend_ip(i)).expect("steered to a backend");
    let key = ClientKey::new(CLIENT, PORT.to_be_bytes());
    let table = cases(own, 1 - own);
    assert!(table.len() >= 30, "{} rows", table.len());
    for Case { name, frame, action, counter, check } in table {
        let before = counters(&f);
        let sessions = f.maps.sessions().len();
        let (got, out) = f.run(&frame).unwrap_or_else(|e| panic!("{name}: test run failed: {e:#}"));
        assert_eq!(got, action, "{name}: XDP action");
        let after = counters(&f);
        for c in C::ALL {
            let expected = before[*c as usize] + u64::from(*c == C::Received || *c == counter);
            assert_eq!(after[*c as usize], expected, "{name}: counter {} (expected {})", c.name(), counter.name());
        }
        if action == XDP_PASS {
            assert_eq!(out, frame, "{name}: passed unchanged");
        }
        if action != XDP_TX {
            assert!(f.maps.sessions().len() <= sessions, "{name}: no session created");
        }
        if let Some(check) = check {
            check(&frame, &out);
        }
        if counter != C::SessionFinished {
            assert_eq!(f.session(key).map(|s| s.backend), Some(own), "{name}: the table's session is untouched");
        }
    }
    assert!(f.session(key).is_none(), "the spoofed FINISHED ended the session");
}

/// A frame with the IPv4 EtherType but another version (6, 5, 15, ...) is not steered as IPv4:
/// it would open a session and count load for a packet the backend's stack drops.
#[test]
fn a_version_other_than_4_is_not_steered() {
    let mut f = fixture();
    let frame = edit_ip(&from_client(CLIENT, 41_100, TFTP_PORT, RRQ), |f| f[14] = 0x65);
    let (action, _) = f.run(&frame).unwrap();
    assert_ne!(action, XDP_TX);
    assert!(f.session(ClientKey::new(CLIENT, 41_100u16.to_be_bytes())).is_none());
}

/// The opcode (and an ACK's block) is read only inside the UDP length: Ethernet padding after
/// an empty datagram is not an RRQ.
#[test]
fn the_opcode_is_not_read_from_ethernet_padding() {
    let mut f = fixture();
    let mut frame = from_client(CLIENT, 41_101, TFTP_PORT, b"");
    frame.extend_from_slice(b"\x00\x01pad\x00octet\x00\x00");
    let (action, _) = f.run(&frame).unwrap();
    assert_eq!(action, XDP_DROP);
    assert_eq!(f.counter(C::DropNotRequest).unwrap(), 1);
    assert!(f.session(ClientKey::new(CLIENT, 41_101u16.to_be_bytes())).is_none());
}

#[test]
fn the_table_uses_distinct_tids() {
    // Rows rely on the other client's port not mapping to the table client's TID, and on the
    // table's frames being what they claim.
    assert_ne!(tid(OTHER_CLIENT, PORT), tid(CLIENT, PORT));
    let ack = from_client(CLIENT, PORT, tid(CLIENT, PORT), ACK);
    assert!(checksums_valid(&ack) && ip_checksum_valid(&ack));
    let options = with_ip_options(&ack, 1);
    assert!(ip_checksum_valid(&options));
    assert_eq!(usize::from(u16::from_be_bytes([options[16], options[17]])) + 14, options.len());
    assert_eq!(FrameHeaders::LEN, 42);
    assert_eq!(reply(0).magic, STEERING_MAGIC);
}
