//! BPF_PROG_TEST_RUN tests of `balance` on the real object: each crafted packet's action,
//! output packet and decision counter. They need root (loading BPF) and fail without it.

use aya::maps::IterableMap as _;
use xdp_lb_common::{
    BalanceCounter as C, ClientKey, FrameHeaders, SteeringHeader, TFTP_PORT,
    frame::checksums_valid,
    maps::{BACKEND_DEAD, BACKEND_LIVE},
    steering::{FLAG_FINISHED, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_NUDGE, STEERING_MAGIC},
};

use crate::testrun::{
    BACKEND_PORT, CLIENT_MAC, Fixture, LB_MAC, STEER_ADDR, STEER_PORT, VIP, backend_ip, backend_mac,
    from_backend, from_client, udp_frame, XDP_DROP, XDP_PASS, XDP_TX,
};


const CLIENT: [u8; 4] = [10, 77, 0, 50];
const RRQ: &[u8] = b"\x00\x01boot/kernel.img\x00octet\x00blksize\x001468\x00";

fn fixture(backends: u32) -> Fixture {
    assert!(nix::unistd::geteuid().is_root(), "BPF_PROG_TEST_RUN tests need root: run them as root (cargo xtask test)");
    Fixture::new(backends).expect("load balance")
}

fn headers(frame: &[u8]) -> FrameHeaders {
    *bytemuck::from_bytes::<FrameHeaders>(&frame[..FrameHeaders::LEN])
}

fn steering(frame: &[u8]) -> SteeringHeader {
    *bytemuck::from_bytes::<SteeringHeader>(&frame[42..42 + SteeringHeader::LEN])
}

/// Sends the client's RRQ and returns the packet that went to the backend.
fn open(f: &mut Fixture, port: u16) -> Vec<u8> {
    let (action, out) = f.run(&from_client(CLIENT, port, TFTP_PORT, RRQ)).unwrap();
    assert_eq!(action, XDP_TX);
    out
}

/// A backend reply header for the client on `port`, as tftp-backend sends it.
fn reply_header(port: u16, block: u32, flags: u8) -> SteeringHeader {
    let key = ClientKey::new(CLIENT, port.to_be_bytes());
    let mut h = SteeringHeader::for_client(CLIENT, port, VIP, key.tid());
    h.flags = FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT | flags;
    h.set_block(block);
    h.blksize = 1468u16.to_be_bytes();
    h.windowsize = 1u16.to_be_bytes();
    h.digest = [7; 16];
    h.path_hash = [9; 8];
    h.rtt = [0, 40, 0, 10];
    h
}

#[test]
fn rrq_opens_a_session_and_goes_to_a_backend_with_the_header() {
    let mut f = fixture(3);
    let out = open(&mut f, 40_000);
    let h = headers(&out);
    let id = (0..3).find(|&i| h.ip_dst == backend_ip(i)).expect("sent to a backend");
    assert_eq!((h.eth_dst, h.eth_src), (backend_mac(id), LB_MAC));
    assert_eq!((h.ip_src, h.udp_src_port(), h.udp_dst_port()), (STEER_ADDR, STEER_PORT, BACKEND_PORT));
    let s = steering(&out);
    let key = ClientKey::new(CLIENT, 40_000u16.to_be_bytes());
    assert_eq!(s.magic, STEERING_MAGIC);
    assert_eq!((s.client_ip, s.client_port(), s.vip_ip, s.vip_port()), (CLIENT, 40_000, VIP, key.tid()));
    assert_eq!(s.flags & FLAG_HAS_CONTEXT, 0, "no context before the backend answered");
    assert_eq!(&out[42 + 64..], RRQ, "the TFTP payload follows the header unchanged");
    assert!(checksums_valid(&out), "IP and UDP checksums of the steered packet");
    assert_eq!(f.counter(C::NewSession).unwrap(), 1);
    assert_eq!(f.session(key).expect("session").backend, id);
    assert_eq!(f.maps.load(id).unwrap(), 1);
}

#[test]
fn new_sessions_go_to_the_least_loaded_backend() {
    let mut f = fixture(3);
    let mut backends: Vec<[u8; 4]> = (0..6).map(|i| headers(&open(&mut f, 41_000 + i)).ip_dst).collect();
    backends.sort_unstable();
    backends.dedup();
    assert_eq!(backends.len(), 3, "six sessions over three backends use all three");
    for id in 0..3 {
        assert_eq!(f.maps.load(id).unwrap(), 2, "backend {id} has two sessions");
    }
}

#[test]
fn backend_reply_reaches_the_client_from_the_tid_and_teaches_the_context() {
    let mut f = fixture(1);
    open(&mut f, 40_001);
    let data = b"\x00\x03\x00\x01first block bytes";
    let (action, out) = f.run(&from_backend(0, &reply_header(40_001, 1, 0), data)).unwrap();
    assert_eq!(action, XDP_TX);
    let h = headers(&out);
    let key = ClientKey::new(CLIENT, 40_001u16.to_be_bytes());
    assert_eq!((h.eth_dst, h.eth_src), (CLIENT_MAC, LB_MAC));
    assert_eq!((h.ip_src, h.udp_src_port()), (VIP, key.tid()));
    assert_eq!((h.ip_dst, h.udp_dst_port()), (CLIENT, 40_001));
    assert_eq!(&out[42..], data, "the header is gone, the TFTP payload intact");
    assert!(checksums_valid(&out), "IP and UDP checksums of the client packet");
    let session = f.session(key).unwrap();
    assert_eq!(session.header.block(), 1);
    assert_eq!(session.header.digest, [7; 16]);
    assert_ne!(session.header.flags & FLAG_HAS_CONTEXT, 0);
    assert_eq!(f.counter(C::ToClient).unwrap(), 1);
}

#[test]
fn client_ack_carries_the_learned_context_to_the_backend() {
    let mut f = fixture(1);
    open(&mut f, 40_002);
    f.run(&from_backend(0, &reply_header(40_002, 5, 0), b"\x00\x03\x00\x05data")).unwrap();
    let tid = ClientKey::new(CLIENT, 40_002u16.to_be_bytes()).tid();
    let ack = b"\x00\x04\x00\x05";
    let (action, out) = f.run(&from_client(CLIENT, 40_002, tid, ack)).unwrap();
    assert_eq!(action, XDP_TX);
    let s = steering(&out);
    assert_eq!(s.flags, FLAG_HAS_CONTEXT);
    assert_eq!((s.block(), s.blksize(), s.digest), (5, 1468, [7; 16]));
    assert_eq!(s.rtt, [0, 40, 0, 10], "the backend's round-trip estimate, for a backend that takes over");
    assert_eq!(&out[42 + 64..], ack);
    assert!(checksums_valid(&out));
    assert_eq!(f.session(ClientKey::new(CLIENT, 40_002u16.to_be_bytes())).unwrap().last_ack, [0, 5]);
    assert_eq!(f.counter(C::ToBackend).unwrap(), 1);
}

#[test]
fn a_session_on_a_dead_backend_moves_with_a_nudge() {
    let mut f = fixture(2);
    let first = headers(&open(&mut f, 40_003)).ip_dst;
    let dead = u32::from(first != backend_ip(0));
    f.set_backend_state(dead, BACKEND_DEAD).unwrap();
    let tid = ClientKey::new(CLIENT, 40_003u16.to_be_bytes()).tid();
    let (action, out) = f.run(&from_client(CLIENT, 40_003, tid, b"\x00\x04\x00\x01")).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(headers(&out).ip_dst, backend_ip(1 - dead), "moved to the live backend");
    assert_ne!(steering(&out).flags & FLAG_NUDGE, 0, "the new backend is told to resend now");
    assert_eq!(f.counter(C::Moved).unwrap(), 1);
    assert_eq!((f.maps.load(dead).unwrap(), f.maps.load(1 - dead).unwrap()), (0, 1));
}

#[test]
fn an_upload_on_a_dead_backend_moves_to_its_replica_and_stays_an_upload() {
    const WRQ: &[u8] = b"\x00\x02cfg/router.conf\x00octet\x00";
    let mut f = fixture(3);
    let (_, out) = f.run(&from_client(CLIENT, 40_010, TFTP_PORT, WRQ)).unwrap();
    let serving = (0..3).find(|&i| headers(&out).ip_dst == backend_ip(i)).unwrap();
    // The replica is busier than the third backend (which takes no session meanwhile): only
    // the replica holds the upload's blocks.
    let (replica, third) = ((serving + 1) % 3, (serving + 2) % 3);
    f.set_backend_state(third, BACKEND_DEAD).unwrap();
    for port in 0..2 {
        open(&mut f, 41_100 + port);
    }
    f.set_backend_state(third, BACKEND_LIVE).unwrap();
    assert!(f.maps.load(replica).unwrap() > f.maps.load(third).unwrap());
    let mut reply = reply_header(40_010, 3, 0);
    reply.set_upload_replica(Some((backend_ip(replica), BACKEND_PORT.to_be_bytes())));
    let (action, _) = f.run(&from_backend(serving, &reply, b"\x00\x04\x00\x03")).unwrap();
    assert_eq!(action, XDP_TX);
    f.set_backend_state(serving, BACKEND_DEAD).unwrap();
    let tid = ClientKey::new(CLIENT, 40_010u16.to_be_bytes()).tid();
    let (action, out) = f.run(&from_client(CLIENT, 40_010, tid, b"\x00\x03\x00\x04block four")).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(headers(&out).ip_dst, backend_ip(replica), "to the replica, not to the least loaded backend");
    let s = steering(&out);
    assert_eq!(s.flags, FLAG_HAS_CONTEXT | FLAG_NUDGE);
    assert!(s.is_upload(), "the replica learns the upload is its own now");
    assert_eq!(s.replica(), Some((backend_ip(replica), BACKEND_PORT.to_be_bytes())));
    assert_eq!(f.counter(C::Moved).unwrap(), 1);
}

/// Opens an upload from `port` and has its backend answer ACK 0 as an upload's (naming a
/// replica); returns the serving backend.
fn open_upload(f: &mut Fixture, port: u16, backends: u32) -> u32 {
    const WRQ: &[u8] = b"\x00\x02cfg/router.conf\x00octet\x00blksize\x001468\x00";
    let (_, out) = f.run(&from_client(CLIENT, port, TFTP_PORT, WRQ)).unwrap();
    let serving = (0..backends).find(|&i| headers(&out).ip_dst == backend_ip(i)).unwrap();
    let mut reply = reply_header(port, 0, 0);
    reply.set_upload_replica(Some((backend_ip((serving + 1) % backends), BACKEND_PORT.to_be_bytes())));
    assert_eq!(f.run(&from_backend(serving, &reply, b"\x00\x04\x00\x00")).unwrap().0, XDP_TX);
    serving
}

#[test]
fn an_uploads_last_data_is_kept_and_a_downloads_ack_is_not() {
    let mut f = fixture(2);
    let (port, key) = (40_030, ClientKey::new(CLIENT, 40_030u16.to_be_bytes()));
    let serving = open_upload(&mut f, port, 2);
    let full = [b"\x00\x03\x00\x01".as_slice(), &[0xa5; 1468]].concat();
    let (action, out) = f.run(&from_client(CLIENT, port, key.tid(), &full)).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[42 + 64..], &full[..], "steered unchanged");
    assert_eq!(f.maps.kept_data(key).as_deref(), Some(&full[..]), "a whole block of 1468 as the client sent it");
    let short = b"\x00\x03\x00\x02the last bytes";
    f.run(&from_client(CLIENT, port, key.tid(), short)).unwrap();
    assert_eq!(f.maps.kept_data(key).as_deref(), Some(&short[..]), "the next DATA replaces it");
    assert_eq!(f.counter(C::ToBackend).unwrap(), 2);
    let jumbo = [b"\x00\x03\x00\x03".as_slice(), &[1; xdp_lb_common::maps::DATA_KEPT_MAX]].concat();
    assert_eq!(f.run(&from_client(CLIENT, port, key.tid(), &jumbo)).unwrap().0, XDP_TX, "a longer DATA is steered all the same");
    assert_eq!(f.counter(C::UploadDataUnkept).unwrap(), 1, "counted instead of to_backend");
    assert_eq!(f.counter(C::ToBackend).unwrap(), 2);
    assert_eq!(f.maps.kept_data(key).as_deref(), Some(&short[..]), "not kept: the one before stays");
    f.run(&from_backend(serving, &reply_header(port, 2, FLAG_FINISHED), b"")).unwrap();
    assert_eq!(f.maps.kept_data(key), None, "forgotten with its session");

    let (port, key) = (40_031, ClientKey::new(CLIENT, 40_031u16.to_be_bytes()));
    open_upload(&mut f, port, 2);
    f.run(&from_client(CLIENT, port, key.tid(), short)).unwrap();
    assert!(f.maps.kept_data(key).is_some());
    f.run(&from_client(CLIENT, port, TFTP_PORT, b"\x00\x02other.conf\x00octet\x00")).unwrap();
    assert_eq!(f.maps.kept_data(key), None, "a new request from the same port: none of its DATA");

    let (port, key) = (40_032, ClientKey::new(CLIENT, 40_032u16.to_be_bytes()));
    let download = headers(&open(&mut f, port)).ip_dst;
    let id = (0..2).find(|&i| backend_ip(i) == download).unwrap();
    f.run(&from_backend(id, &reply_header(port, 1, 0), b"\x00\x03\x00\x01data")).unwrap();
    assert_eq!(f.run(&from_client(CLIENT, port, key.tid(), b"\x00\x04\x00\x01")).unwrap().0, XDP_TX);
    assert_eq!(f.maps.kept_data(key), None, "a download's ACK is not kept");
    assert_eq!(f.counter(C::UploadDataUnkept).unwrap(), 1);
}

#[test]
fn a_request_is_kept_until_the_backend_answers() {
    let mut f = fixture(1);
    let key = ClientKey::new(CLIENT, 40_020u16.to_be_bytes());
    open(&mut f, 40_020);
    assert_eq!(f.maps.kept_request(key).as_deref(), Some(RRQ), "the request as the client sent it");
    let restart = b"\x00\x01boot/initrd.img\x00octet\x00";
    f.run(&from_client(CLIENT, 40_020, TFTP_PORT, restart)).unwrap();
    assert_eq!(f.maps.kept_request(key).as_deref(), Some(&restart[..]), "a new request from the same port replaces it");
    f.run(&from_backend(0, &reply_header(40_020, 1, 0), b"\x00\x03\x00\x01data")).unwrap();
    assert_eq!(f.maps.kept_request(key), None, "the first answer's context carries the transfer from now on");
    assert_eq!(f.counter(C::NewSession).unwrap(), 2);
}

#[test]
fn a_finished_session_forgets_its_request_and_a_long_request_is_not_kept() {
    let mut f = fixture(1);
    open(&mut f, 40_021);
    f.run(&from_backend(0, &reply_header(40_021, 0, FLAG_FINISHED), b"")).unwrap();
    assert_eq!(f.maps.kept_request(ClientKey::new(CLIENT, 40_021u16.to_be_bytes())), None, "finished before any context (a probe aborted)");
    let mut long = b"\x00\x01".to_vec();
    long.extend(std::iter::repeat_n(b'a', 520));
    long.extend_from_slice(b"\x00octet\x00");
    let (action, out) = f.run(&from_client(CLIENT, 40_022, TFTP_PORT, &long)).unwrap();
    assert_eq!(action, XDP_TX, "a long request opens its session all the same");
    assert_eq!(&out[42 + 64..], &long[..]);
    assert_eq!(f.maps.kept_request(ClientKey::new(CLIENT, 40_022u16.to_be_bytes())), None);
    assert_eq!(f.counter(C::NewSessionUnkept).unwrap(), 1);
    let longest = [b"\x00\x01".as_slice(), &[b'b'; 507], b"\x00a\x00"].concat();
    assert_eq!(longest.len(), xdp_lb_common::maps::REQUEST_KEPT_MAX);
    f.run(&from_client(CLIENT, 40_023, TFTP_PORT, &longest)).unwrap();
    assert_eq!(f.maps.kept_request(ClientKey::new(CLIENT, 40_023u16.to_be_bytes())).as_deref(), Some(&longest[..]), "the longest kept");
}

#[test]
fn finished_ends_the_session() {
    let mut f = fixture(1);
    open(&mut f, 40_004);
    let (action, _) = f.run(&from_backend(0, &reply_header(40_004, 9, FLAG_FINISHED), b"")).unwrap();
    assert_eq!(action, XDP_DROP);
    assert!(f.session(ClientKey::new(CLIENT, 40_004u16.to_be_bytes())).is_none());
    assert_eq!(f.maps.load(0).unwrap(), 0);
    assert_eq!(f.counter(C::SessionFinished).unwrap(), 1);
}

#[test]
fn heartbeat_answer_teaches_the_backend_mac_and_passes() {
    let mut f = fixture(1);
    let mut seen = f.maps.seen(0).unwrap();
    seen.mac = [0; 6];
    f.maps.seen.set(0, seen, 0).unwrap();
    let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
    beat.flags = FLAG_FROM_BACKEND | FLAG_HEARTBEAT;
    let frame = from_backend(0, &beat, b"");
    let (action, out) = f.run(&frame).unwrap();
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame, "passed unchanged");
    let seen = f.maps.seen(0).unwrap();
    assert_eq!((seen.mac, seen.lb_mac), (backend_mac(0), LB_MAC));
    assert!(seen.last_answer_ns > 0);
    assert_eq!(f.counter(C::Heartbeat).unwrap(), 1);
}

/// A backend's answer from a group (multicast, broadcast) or all-zero source MAC, or to an
/// all-zero destination, still counts for the watchdog, but teaches no MAC: steering a
/// session's frames to such an address would flood or black-hole them. The same rule as the
/// switch's for a balancer's frames (`switch_hostile_tests`).
#[test]
fn a_backend_answer_from_a_group_mac_is_counted_but_teaches_nothing() {
    let mut f = fixture(1);
    let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
    beat.flags = FLAG_FROM_BACKEND | FLAG_HEARTBEAT;
    let broadcast = [0xff; 6];
    let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    let sources = [(broadcast, LB_MAC), (multicast, LB_MAC), ([0; 6], LB_MAC), (backend_mac(0), [0; 6])];
    for (n, (src, dst)) in sources.into_iter().enumerate() {
        let mut seen = f.maps.seen(0).unwrap();
        seen.unanswered = 5;
        f.maps.seen.set(0, seen, 0).unwrap();
        let mut frame = from_backend(0, &beat, b"");
        frame[..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&src);
        assert_eq!(f.run(&frame).unwrap().0, XDP_PASS, "{src:02x?} -> {dst:02x?}");
        let seen = f.maps.seen(0).unwrap();
        assert_eq!(seen.unanswered, 0, "{src:02x?} -> {dst:02x?}: counted as the backend's answer");
        assert_eq!((seen.mac, seen.lb_mac), (backend_mac(0), LB_MAC), "{src:02x?} -> {dst:02x?}: nothing learned");
        assert_eq!(f.counter(C::Heartbeat).unwrap(), n as u64 + 1);
    }
    let (action, out) = f.run(&from_client(CLIENT, 40_300, TFTP_PORT, RRQ)).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(headers(&out).eth_dst, backend_mac(0), "sessions still go to the backend's own MAC");
}

/// A client that repeats itself (duplicate or stale ACKs) makes the backend answer `HEARD`
/// instead of DATA: the kernel takes that as the backend's answer (the watchdog's unanswered
/// count goes back to zero) and forwards nothing to the client.
#[test]
fn a_heard_reply_answers_the_watchdog_and_reaches_no_client() {
    let mut f = fixture(1);
    open(&mut f, 40_010);
    let tid = ClientKey::new(CLIENT, 40_010u16.to_be_bytes()).tid();
    for _ in 0..20 {
        let (action, _) = f.run(&from_client(CLIENT, 40_010, tid, b"\x00\x04\x00\x00")).unwrap();
        assert_eq!(action, XDP_TX);
    }
    assert_eq!(f.maps.seen(0).unwrap().unanswered, 21, "the request and 20 ACKs steered, none answered yet");
    let (action, _) = f.run(&from_backend(0, &reply_header(40_010, 0, FLAG_HEARD), b"")).unwrap();
    assert_eq!(action, XDP_DROP, "nothing for the client");
    let seen = f.maps.seen(0).unwrap();
    assert_eq!(seen.unanswered, 0, "counted as the backend's answer");
    assert!(seen.last_answer_ns > 0);
    assert_eq!(f.counter(C::BackendHeard).unwrap(), 1);
    assert_eq!(f.counter(C::ToClient).unwrap(), 0);
    assert!(f.session(ClientKey::new(CLIENT, 40_010u16.to_be_bytes())).is_some(), "the session stays");
}

#[test]
fn replies_from_elsewhere_are_dropped_and_counted() {
    let mut f = fixture(2);
    let first = headers(&open(&mut f, 40_005)).ip_dst;
    let other = u32::from(first == backend_ip(0));
    // A registered backend that does not serve this session.
    let (action, _) = f.run(&from_backend(other, &reply_header(40_005, 1, 0), b"\x00\x03\x00\x01x")).unwrap();
    assert_eq!((action, f.counter(C::DropStaleBackend).unwrap()), (XDP_DROP, 1));
    // An address that is not a backend at all.
    let spoofed = udp_frame(
        (CLIENT_MAC, LB_MAC),
        (CLIENT, BACKEND_PORT),
        (STEER_ADDR, STEER_PORT),
        bytemuck::bytes_of(&reply_header(40_005, 1, 0)),
    );
    let (action, _) = f.run(&spoofed).unwrap();
    assert_eq!((action, f.counter(C::DropUnknownSource).unwrap()), (XDP_DROP, 1));
    // A backend without a valid header.
    let (action, _) = f.run(&udp_frame(
        (backend_mac(0), LB_MAC),
        (backend_ip(0), BACKEND_PORT),
        (STEER_ADDR, STEER_PORT),
        &[0u8; 80],
    ))
    .unwrap();
    assert_eq!((action, f.counter(C::DropBadHeader).unwrap()), (XDP_DROP, 1));
}

/// The first reply teaches the session its context (file, digest, options), which a backup
/// balancer needs to carry the transfer on: announced at once for the agent to mirror, not
/// left to the next periodic sync as block progress is.
#[test]
fn the_context_learned_from_the_first_reply_is_announced_at_once() {
    let mut f = fixture(1);
    open(&mut f, 40_007);
    let key = ClientKey::new(CLIENT, 40_007u16.to_be_bytes());
    assert!(f.drain_events().iter().any(|e| e.key == key), "the new session is announced");
    f.run(&from_backend(0, &reply_header(40_007, 1, 0), b"\x00\x03\x00\x01a")).unwrap();
    assert_eq!(f.drain_events().iter().filter(|e| e.key == key).count(), 1, "its first context is announced");
    f.run(&from_backend(0, &reply_header(40_007, 2, 0), b"\x00\x03\x00\x02b")).unwrap();
    assert!(f.drain_events().is_empty(), "later replies only move the block: no event");
}

/// A window sent with UDP segmentation offload that no link cut into datagrams reaches the
/// program as one packet: its blocks one after another, each with its own steering and DATA
/// header. The program sees the first header only; forwarded, the client would take the rest
/// as data. (Two blocks here: BPF_PROG_TEST_RUN takes a frame of at most one page.)
#[test]
fn an_unsegmented_super_packet_from_a_backend_is_dropped_and_counted() {
    let mut f = fixture(1);
    open(&mut f, 40_006);
    let window: Vec<u8> = (1..=2u16)
        .flat_map(|block| {
            let header = reply_header(40_006, u32::from(block), 0);
            let data = [&[0, 3][..], &block.to_be_bytes(), &[0xab; 1468]].concat();
            [bytemuck::bytes_of(&header), data.as_slice()].concat()
        })
        .collect();
    let (action, _) = f.run(&from_backend(0, &reply_header(40_006, 1, 0), &window[SteeringHeader::LEN..])).unwrap();
    assert_eq!((action, f.counter(C::DropOversize).unwrap()), (XDP_DROP, 1));
    assert_eq!(f.counter(C::ToClient).unwrap(), 0);
    // One block of the same window, as a segmenting link delivers it, goes through.
    let block = &window[SteeringHeader::LEN..SteeringHeader::LEN + 4 + 1468];
    let (action, out) = f.run(&from_backend(0, &reply_header(40_006, 1, 0), block)).unwrap();
    assert_eq!((action, &out[42..]), (XDP_TX, block));
    assert!(checksums_valid(&out));
}

/// Packets that are not xdp-lb's business pass unchanged, each counted by its reason.
#[test]
fn other_traffic_passes_unchanged() {
    let mut f = fixture(1);
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut tcp = from_client(CLIENT, 1234, 80, b"GET /");
    tcp[23] = 6;
    let other_host = udp_frame((CLIENT_MAC, LB_MAC), (CLIENT, 5353), ([10, 77, 0, 9], 69), b"\x00\x01x\x00octet\x00");
    let vip_other_port = from_client(CLIENT, 1234, 53, b"dns?");
    for (frame, counter) in [
        (arp, C::PassNotIpv4),
        (tcp, C::PassNotUdp),
        (other_host, C::PassNotService),
        (vip_other_port, C::PassNotService),
    ] {
        let before = f.counter(counter).unwrap();
        let (action, out) = f.run(&frame).unwrap();
        assert_eq!(action, XDP_PASS, "{counter:?}");
        assert_eq!(out, frame, "{counter:?}: passed unchanged");
        assert_eq!(f.counter(counter).unwrap(), before + 1, "{counter:?}");
    }
}

/// Malformed packets for the service are dropped, each counted by its reason.
#[test]
fn malformed_packets_are_dropped_and_counted() {
    let mut f = fixture(1);
    let rrq = from_client(CLIENT, 40_006, TFTP_PORT, RRQ);
    let mut fragment = rrq.clone();
    fragment[20] = 0x20; // more fragments
    let mut options = rrq.clone();
    options[14] = 0x46;
    let mut long_udp = rrq.clone();
    long_udp[38..40].copy_from_slice(&2000u16.to_be_bytes());
    let tid = ClientKey::new(CLIENT, 40_007u16.to_be_bytes()).tid();
    for (name, frame, counter) in [
        ("IPv4 ethertype without an IP header", rrq[..14].to_vec(), C::DropTruncated),
        ("IPv4 header cut short", rrq[..30].to_vec(), C::DropTruncated),
        ("UDP length beyond the frame", long_udp, C::DropTruncated),
        ("fragment", fragment, C::DropFragmentOrOptions),
        ("IP options", options, C::DropFragmentOrOptions),
        ("DATA to port 69", from_client(CLIENT, 40_006, TFTP_PORT, b"\x00\x03\x00\x01"), C::DropNotRequest),
        ("empty datagram to port 69", from_client(CLIENT, 40_006, TFTP_PORT, b""), C::DropNotRequest),
        ("ACK without a session", from_client(CLIENT, 40_007, tid, b"\x00\x04\x00\x01"), C::DropNoSession),
    ] {
        let before = f.counter(counter).unwrap();
        let (action, _) = f.run(&frame).unwrap();
        assert_eq!(action, XDP_DROP, "{name}");
        assert_eq!(f.counter(counter).unwrap(), before + 1, "{name}: {counter:?}");
    }
}

#[test]
fn without_live_backends_requests_are_dropped() {
    let mut f = fixture(1);
    f.set_backend_state(0, BACKEND_DEAD).unwrap();
    let (action, _) = f.run(&from_client(CLIENT, 40_008, TFTP_PORT, RRQ)).unwrap();
    assert_eq!((action, f.counter(C::DropNoBackend).unwrap()), (XDP_DROP, 1));
}

/// A balancer that took over learns a transfer it never saw from the backend's reply; the way
/// to the client comes from the routing table (none in the test's namespace: the reply is
/// dropped and counted) until the client's next packet shows it.
#[test]
fn a_reply_for_an_unknown_client_relearns_the_session() {
    let mut f = fixture(2);
    let port: u16 = 40_100;
    let key = ClientKey::new(CLIENT, port.to_be_bytes());
    let (action, _) = f.run(&from_backend(1, &reply_header(port, 500, 0), b"\x00\x03\x01\xf4data")).unwrap();
    assert_eq!(action, XDP_DROP, "no route to the client yet");
    assert_eq!(f.counter(C::DropNoRoute).unwrap(), 1);
    let session = f.session(key).expect("relearned session");
    assert_eq!((session.backend, session.header.block(), session.header.vip_port()), (1, 500, key.tid()));
    assert_ne!(session.header.flags & FLAG_HAS_CONTEXT, 0, "with the backend's context");
    assert_eq!(f.maps.load(1).unwrap(), 1);

    let (action, out) = f.run(&from_client(CLIENT, port, key.tid(), b"\x00\x04\x01\xf4")).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(headers(&out).ip_dst, backend_ip(1), "the client's ACK follows the relearned session");
    let (action, out) = f.run(&from_backend(1, &reply_header(port, 501, 0), b"\x00\x03\x01\xf5data")).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!((headers(&out).eth_dst, headers(&out).ip_dst), (CLIENT_MAC, CLIENT), "route learned from the ACK");
    assert!(checksums_valid(&out));

    let finished = from_backend(0, &reply_header(40_101, 9, FLAG_FINISHED), b"");
    assert_eq!(f.run(&finished).unwrap().0, XDP_DROP);
    assert!(f.session(ClientKey::new(CLIENT, 40_101u16.to_be_bytes())).is_none(), "FINISHED creates nothing");
}

/// A client address that sends requests faster than the configured pace is cut off after its
/// burst (counted); other addresses, and its running sessions, are unaffected.
#[test]
fn requests_beyond_the_per_source_pace_are_dropped_and_counted() {
    let mut f = fixture(2);
    let mut config = f.maps.config.get(&0, 0).unwrap();
    // One request a minute, bursts of three: a burst of ten in a test's time gets three in.
    config.request_interval_ns = 60_000_000_000;
    config.request_burst_ns = 2 * config.request_interval_ns;
    f.maps.config.set(0, config, 0).unwrap();
    let actions: Vec<u32> = (0..10).map(|i| f.run(&from_client(CLIENT, 42_000 + i, TFTP_PORT, RRQ)).unwrap().0).collect();
    assert_eq!(actions.iter().filter(|&&a| a == XDP_TX).count(), 3, "the burst: {actions:?}");
    assert_eq!(f.counter(C::DropRateLimited).unwrap(), 7);
    assert_eq!(f.counter(C::NewSession).unwrap(), 3);
    let other = [10, 77, 0, 51];
    assert_eq!(f.run(&from_client(other, 42_000, TFTP_PORT, RRQ)).unwrap().0, XDP_TX, "another address has its own pace");
    let key = ClientKey::new(CLIENT, 42_000u16.to_be_bytes());
    let ack = from_client(CLIENT, 42_000, key.tid(), b"\x00\x04\x00\x01");
    assert_eq!(f.run(&ack).unwrap().0, XDP_TX, "a running session is not paced");
}

/// Many addresses of one /24 (a spoofed flood, say) share that network's pace: beyond its
/// burst their requests are dropped and counted, while another network is unaffected.
#[test]
fn requests_beyond_the_per_network_pace_are_dropped_and_counted() {
    let mut f = fixture(2);
    let mut config = f.maps.config.get(&0, 0).unwrap();
    // One request a minute per /24, bursts of three; no per-address pace.
    config.prefix_interval_ns = 60_000_000_000;
    config.prefix_burst_ns = 2 * config.prefix_interval_ns;
    f.maps.config.set(0, config, 0).unwrap();
    let actions: Vec<u32> = (0..10u8).map(|i| f.run(&from_client([10, 77, 0, 100 + i], 42_000, TFTP_PORT, RRQ)).unwrap().0).collect();
    assert_eq!(actions.iter().filter(|&&a| a == XDP_TX).count(), 3, "ten addresses, one network: {actions:?}");
    assert_eq!(f.counter(C::DropPrefixRateLimited).unwrap(), 7);
    assert_eq!(f.counter(C::DropRateLimited).unwrap(), 0, "not the per-address limit");
    assert_eq!(f.run(&from_client([10, 77, 1, 100], 42_000, TFTP_PORT, RRQ)).unwrap().0, XDP_TX, "another /24 has its own pace");
    let key = ClientKey::new([10, 77, 0, 100], 42_000u16.to_be_bytes());
    let ack = from_client([10, 77, 0, 100], 42_000, key.tid(), b"\x00\x04\x00\x01");
    assert_eq!(f.run(&ack).unwrap().0, XDP_TX, "a running session is not paced");
}

/// A frame with a registered backend's address and port on an interface that does not face
/// the backends (`--backend-iface`) is dropped and counted before anything is learned: the
/// backend's MAC, its watchdog and the session stay as they were.
#[test]
fn a_backend_reply_from_the_clients_side_is_dropped_and_teaches_nothing() {
    let mut f = fixture(2);
    open(&mut f, 40_200);
    let seen_before = f.maps.seen.get(&0, 0).unwrap();
    f.face_only_clients().unwrap();
    let mut forged = from_backend(0, &reply_header(40_200, 1, 0), b"\x00\x03\x00\x01data");
    forged[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x66]);
    assert_eq!(f.run(&forged).unwrap().0, XDP_DROP);
    assert_eq!(f.counter(C::DropBackendWrongSide).unwrap(), 1);
    assert_eq!(f.counter(C::ToClient).unwrap(), 0, "nothing reached the client");
    assert_eq!(f.maps.seen.get(&0, 0).unwrap(), seen_before, "no MAC learned, no watchdog touched");
}

/// Keeps the calling thread on CPU 0: `LB_SESSION_BUDGET` is per CPU, and BPF_PROG_TEST_RUN
/// runs the program on the CPU of its caller.
fn on_cpu_zero() {
    use nix::{sched::CpuSet, unistd::Pid};
    let mut set = CpuSet::new();
    set.set(0).expect("CPU 0 fits in a CPU set");
    // Pid 0: the calling thread.
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("pin to CPU 0");
}

/// The new-session budget caps requests from every address together (each of its own /24,
/// as a flood from everywhere looks): beyond the burst they are dropped and counted, while
/// running sessions go on.
#[test]
fn the_new_session_budget_caps_requests_from_everywhere() {
    on_cpu_zero();
    let mut f = fixture(2);
    let mut config = f.maps.config.get(&0, 0).unwrap();
    config.budget_interval_ns = 60_000_000_000;
    config.budget_burst_ns = 3 * config.budget_interval_ns;
    f.maps.config.set(0, config, 0).unwrap();
    let actions: Vec<u32> = (0..10u8).map(|i| f.run(&from_client([10, 80 + i, 0, 1], 42_000, TFTP_PORT, RRQ)).unwrap().0).collect();
    assert_eq!(actions.iter().filter(|&&a| a == XDP_TX).count(), 4, "a burst of four: {actions:?}");
    assert_eq!(f.counter(C::DropSessionBudget).unwrap(), 6);
    assert_eq!(f.counter(C::NewSession).unwrap(), 4);
    let key = ClientKey::new([10, 80, 0, 1], 42_000u16.to_be_bytes());
    let ack = from_client([10, 80, 0, 1], 42_000, key.tid(), b"\x00\x04\x00\x01");
    assert_eq!(f.run(&ack).unwrap().0, XDP_TX, "a running session is not limited");
}

/// A bridge floods frames for a balancer that went away to every port: the other balancer must
/// not steer them (it would answer with the dead one's MAC and keep it looking alive).
#[test]
fn frames_for_another_mac_are_not_steered() {
    let mut f = fixture(2);
    f.set_own_mac(LB_MAC).unwrap();
    let mut flooded = from_client(CLIENT, 43_000, TFTP_PORT, RRQ);
    flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let (action, out) = f.run(&flooded).unwrap();
    assert_eq!((action, out), (XDP_PASS, flooded), "passed untouched; the stack drops it as another host's");
    assert_eq!(f.counter(C::PassNotOurs).unwrap(), 1);
    assert!(f.session(ClientKey::new(CLIENT, 43_000u16.to_be_bytes())).is_none());
    assert_eq!(f.run(&from_client(CLIENT, 43_001, TFTP_PORT, RRQ)).unwrap().0, XDP_TX, "frames to our MAC are steered");
}

/// A flood of more clients than `LB_SESSIONS` holds (65 536) never locks new clients out: the
/// LRU table evicts the sessions used longest ago, a transfer in progress (its client keeps
/// sending) keeps its session, and the table never grows past its size.
#[test]
fn a_full_session_table_evicts_the_oldest_and_still_admits_new_clients() {
    const FLOOD: u32 = 70_000;
    let mut f = fixture(2);
    let mut config = f.maps.config.get(&0, 0).unwrap();
    // No per-source pacing: this test is about the table, not the rate limit.
    (config.request_interval_ns, config.request_burst_ns) = (0, 0);
    f.maps.config.set(0, config, 0).unwrap();
    let flooder = |i: u32| -> [u8; 4] {
        let [_, high, mid, low] = i.to_be_bytes();
        [10, 80 + high, mid, low]
    };
    let flood_key = |i: u32| ClientKey::new(flooder(i), 50_000u16.to_be_bytes());

    open(&mut f, 40_500);
    let busy = ClientKey::new(CLIENT, 40_500u16.to_be_bytes());
    let busy_ack = from_client(CLIENT, 40_500, busy.tid(), b"\x00\x04\x00\x01");
    for i in 0..FLOOD {
        let (action, _) = f.run(&from_client(flooder(i), 50_000, TFTP_PORT, RRQ)).unwrap();
        assert_eq!(action, XDP_TX, "flood request {i} was not steered");
        if i % 1000 == 0 {
            assert_eq!(f.run(&busy_ack).unwrap().0, XDP_TX, "the busy client lost its session at request {i}");
        }
    }
    let newcomer = [10, 79, 0, 1];
    assert_eq!(f.run(&from_client(newcomer, 50_000, TFTP_PORT, RRQ)).unwrap().0, XDP_TX, "a new client after the flood");
    assert_eq!(f.run(&busy_ack).unwrap().0, XDP_TX, "the transfer in progress kept its session");

    let present = |range: std::ops::Range<u32>| range.filter(|&i| f.maps.sessions.get(&flood_key(i), 0).is_ok()).count();
    let (oldest, newest) = (present(0..1000), present(FLOOD - 1000..FLOOD));
    assert!(oldest < 100, "{oldest} of the 1000 oldest flood sessions are still there");
    assert_eq!(newest, 1000, "the newest sessions were evicted");
    let size = f.maps.sessions.keys().count();
    assert!(size <= xdp_lb_common::maps::MAX_SESSIONS, "{size} sessions");
    assert_eq!(f.counter(C::NewSession).unwrap(), u64::from(FLOOD) + 2);
}

/// The agent reads its whole session table with batch lookups (a request flood leaves tens of
/// thousands of sessions, and a walk key by key starved the agent): the batch read returns
/// exactly what the walk does.
#[test]
fn the_batch_read_of_the_session_table_matches_a_walk() {
    let mut f = fixture(1);
    for i in 0..10_000u32 {
        let [_, _, high, low] = i.to_be_bytes();
        let key = ClientKey::new([10, 79, high, low], 1024u16.to_be_bytes());
        let mut session: xdp_lb_common::Session = bytemuck::Zeroable::zeroed();
        session.backend = i % 7;
        session.last_client_ns = u64::from(i);
        f.maps.sessions.insert(key, session, 0).unwrap();
    }
    let mut batch = f.maps.sessions();
    let mut walk: Vec<_> = f.maps.sessions.iter().map(Result::unwrap).collect();
    assert_eq!(batch.len(), 10_000);
    batch.sort_by_key(|(k, _)| (k.ip, k.port));
    walk.sort_by_key(|(k, _)| (k.ip, k.port));
    assert!(batch == walk, "batch and walk differ");
    assert!(crate::batch::lookup_all::<ClientKey, xdp_lb_common::Session>(f.maps.sessions.map()).is_ok(), "the kernel does batch lookups");
}
