//! Steered mode: the test plays the load balancer on loopback. A transfer started on backend A
//! is finished by backend B, which never saw it, from the steering header alone.

use std::{net::UdpSocket, process::Command, time::Duration};

use netns_tests::{
    Process, RunPrefix,
    files::{make_file, share_dir},
};
use sha2::{Digest as _, Sha256};
use xdp_lb_common::{
    SteeringHeader,
    steering::{FLAG_FINISHED, FLAG_FROM_BACKEND, FLAG_HAS_CONTEXT, FLAG_HEARD, FLAG_HEARTBEAT, FLAG_NUDGE, FLAG_REPLICA},
};

const CLIENT: [u8; 4] = [10, 9, 8, 7];
const VIP: [u8; 4] = [10, 9, 8, 1];

struct Backend {
    port: u16,
    process: Process,
}

fn backend(root: &std::path::Path) -> Backend {
    backend_with(root, &[])
}

fn backend_with(root: &std::path::Path, extra: &[&str]) -> Backend {
    backend_on(root, free_port(), extra)
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn backend_on(root: &std::path::Path, port: u16, extra: &[&str]) -> Backend {
    share_dir(root, extra.contains(&"--allow-upload")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tftp-backend"));
    command.arg("--root").arg(root).args(["--steered", "--lb", "127.0.0.1", "--listen", &format!("127.0.0.1:{port}")]).args(extra);
    let backend = Backend { port, process: Process::spawn(RunPrefix::new().name("steered"), command).unwrap() };
    let lb = Lb::new();
    for _ in 0..100 {
        if lb.heartbeat(&backend).is_some() {
            return backend;
        }
    }
    panic!("steered backend did not answer heartbeats");
}

/// The test's stand-in for a load balancer.
struct Lb {
    socket: UdpSocket,
}

impl Lb {
    fn new() -> Self {
        Self::at("127.0.0.1")
    }

    /// A sender on another loopback address (the backend is told `--lb 127.0.0.1`).
    fn at(address: &str) -> Self {
        let socket = UdpSocket::bind((address, 0)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Self { socket }
    }

    fn send(&self, to: &Backend, header: &SteeringHeader, tftp: &[u8]) {
        let mut datagram = bytemuck::bytes_of(header).to_vec();
        datagram.extend_from_slice(tftp);
        self.socket.send_to(&datagram, ("127.0.0.1", to.port)).unwrap();
    }

    /// The next reply that the balancer's kernel would forward or act on: like the real one, it
    /// skips header-only `HEARD` replies (see `recv_any`).
    fn recv(&self) -> Option<(SteeringHeader, Vec<u8>)> {
        loop {
            let reply = self.recv_any()?;
            if !reply.0.has_flag(FLAG_HEARD) {
                return Some(reply);
            }
        }
    }

    /// Drops whatever replies already arrived.
    fn drain(&self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).unwrap();
    }

    fn recv_any(&self) -> Option<(SteeringHeader, Vec<u8>)> {
        let mut buf = [0u8; 2048];
        let n = self.socket.recv(&mut buf).ok()?;
        let header = *bytemuck::try_from_bytes::<SteeringHeader>(buf.get(..64)?).ok()?;
        Some((header, buf[64..n].to_vec()))
    }

    fn heartbeat(&self, to: &Backend) -> Option<SteeringHeader> {
        let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
        beat.flags = FLAG_HEARTBEAT;
        self.send(to, &beat, b"");
        self.recv().map(|(h, _)| h)
    }
}

fn client_header() -> SteeringHeader {
    SteeringHeader::for_client(CLIENT, 40_000, VIP, 31_337)
}

fn ack(block: u16) -> Vec<u8> {
    [&[0u8, 4][..], &block.to_be_bytes()].concat()
}

#[test]
fn a_transfer_started_on_one_backend_finishes_on_another() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("fw.bin");
    make_file(&source, 100_000, 21).unwrap();
    let (a, b) = (backend(root.path()), backend(root.path()));
    let lb = Lb::new();
    let mut received = Vec::new();

    // Start on A with blksize 1000, windowsize 4.
    lb.send(&a, &client_header(), b"\x00\x01fw.bin\x00octet\x00blksize\x001000\x00windowsize\x004\x00");
    let (oack_header, oack) = lb.recv().expect("OACK from A");
    assert_eq!(&oack[..2], b"\x00\x06");
    assert_eq!(oack_header.flags, FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT);
    assert_eq!((oack_header.blksize(), oack_header.windowsize(), oack_header.file_size()), (1000, 4, 100_000));
    let mut context = oack_header;
    lb.send(&a, &client_header(), &ack(0));
    for expected in 1..=4u16 {
        let (h, data) = lb.recv().expect("DATA from A");
        assert_eq!(&data[..4], &[0, 3, 0, u8::try_from(expected).unwrap()]);
        assert_eq!(h.block(), u32::from(expected));
        received.extend_from_slice(&data[4..]);
        context = h;
    }
    // A dies here. B gets the client's ACK of block 4 with the context A reported.
    let mut moved = context;
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    lb.send(&b, &moved, &ack(4));
    let mut last_block = 4u16;
    loop {
        let (h, data) = lb.recv().expect("B answers");
        if h.has_flag(FLAG_FINISHED) {
            break;
        }
        assert_eq!(&data[..2], b"\x00\x03", "DATA from B");
        let block = u16::from_be_bytes([data[2], data[3]]);
        if block == last_block + 1 {
            received.extend_from_slice(&data[4..]);
            last_block = block;
        }
        if block % 4 == 0 || data.len() < 1004 {
            let mut next = h;
            next.flags = FLAG_HAS_CONTEXT;
            lb.send(&b, &next, &ack(last_block));
        }
    }
    assert_eq!(Sha256::digest(&received), Sha256::digest(std::fs::read(&source).unwrap()), "A's and B's blocks make the file");
}

/// A transfer of `fw.bin` started on a first backend (kept running), and a second backend
/// that never saw it: the test then sends the second one the first one's context.
struct StartedElsewhere {
    _root: tempfile::TempDir,
    _first: Backend,
    second: Backend,
    lb: Lb,
    /// The first backend's reply header, flagged as a context to resume from.
    context: SteeringHeader,
}

fn started_elsewhere(seed: u64) -> StartedElsewhere {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 50_000, seed).unwrap();
    let first = backend(root.path());
    let lb = Lb::new();
    lb.send(&first, &client_header(), b"\x00\x01fw.bin\x00octet\x00");
    let (mut context, _) = lb.recv().expect("DATA 1");
    context.flags = FLAG_HAS_CONTEXT;
    let second = backend(root.path());
    StartedElsewhere { _root: root, _first: first, second, lb, context }
}

#[test]
fn another_version_of_the_file_gets_an_error_not_bytes() {
    let StartedElsewhere { _root: _kept_root, _first: _kept_first, second: b, lb, context: mut forged } = started_elsewhere(22);
    forged.digest[0] ^= 0xff;
    lb.send(&b, &forged, &ack(1));
    let (_, reply) = lb.recv().expect("an answer");
    assert_eq!(&reply[..2], b"\x00\x05", "a TFTP ERROR, not DATA");
    let (finished, _) = lb.recv().expect("and the end of the session");
    assert!(finished.has_flag(FLAG_FINISHED));
}

#[test]
fn heartbeats_are_echoed_and_unknown_transfers_refused() {
    let root = tempfile::tempdir().unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    let echo = lb.heartbeat(&a).expect("heartbeat answer");
    assert_eq!(echo.flags, FLAG_FROM_BACKEND | FLAG_HEARTBEAT);
    // An ACK without context for a session A never saw.
    lb.send(&a, &client_header(), &ack(3));
    let (_, reply) = lb.recv().expect("an answer");
    assert_eq!(&reply[..4], b"\x00\x05\x00\x05", "ERROR 5: unknown transfer");
    assert!(lb.recv().expect("end of session").0.has_flag(FLAG_FINISHED));
    // Garbage after a valid header: illegal operation, and A lives on.
    lb.send(&a, &client_header(), b"\x00");
    let (_, reply) = lb.recv().expect("an answer");
    assert_eq!(&reply[..4], b"\x00\x05\x00\x04");
    assert!(lb.recv().expect("end of session").0.has_flag(FLAG_FINISHED));
    assert!(lb.heartbeat(&a).is_some());
}

/// A header whose options exceed this server's limits is refused, not resumed (it could make
/// the server send windows of thousands of blocks), and a nudge without context for a transfer
/// this server does not hold gets only `HEARD` (a balancer asks every backend).
#[test]
fn oversized_contexts_are_refused_and_stray_nudges_ignored() {
    let StartedElsewhere { _root: _kept_root, _first: _kept_first, second: b, lb, context: mut forged } = started_elsewhere(23);
    forged.windowsize = 60_000u16.to_be_bytes();
    lb.send(&b, &forged, &ack(1));
    let (_, reply) = lb.recv().expect("an answer");
    assert_eq!(&reply[..4], b"\x00\x05\x00\x08", "ERROR 8: options refused");
    assert!(lb.recv().expect("end of session").0.has_flag(FLAG_FINISHED));

    // A socket of its own: the first backend keeps resending DATA 1 to the first one.
    let other = Lb::new();
    let mut stray = SteeringHeader::for_client(CLIENT, 40_001, VIP, 31_338);
    stray.flags = FLAG_NUDGE;
    other.send(&b, &stray, &ack(0));
    let answer = other.recv_any();
    assert!(
        answer.as_ref().is_some_and(|(h, payload)| h.flags == FLAG_FROM_BACKEND | FLAG_HEARD && payload.is_empty()),
        "only HEARD for a nudge for a transfer not held here: {answer:?}"
    );
    other.socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(other.recv().is_none(), "and nothing else");
    assert!(other.heartbeat(&b).is_some());
}

/// Hashing a large file for its first request happens off the event loop: heartbeats (and
/// every other transfer) keep being answered meanwhile, so no balancer calls this backend dead.
#[test]
fn a_first_request_for_a_large_file_does_not_stall_heartbeats() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("big.img"), 256 << 20, 29).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    let started = std::time::Instant::now();
    lb.send(&a, &client_header(), b"\x00\x01big.img\x00octet\x00");
    let (heard, _) = lb.recv_any().expect("HEARD while the file is hashed");
    assert!(heard.has_flag(FLAG_HEARD), "the request is acknowledged to the balancer at once: {heard:?}");
    let beat = lb.heartbeat(&a).expect("a heartbeat answer");
    let answered_after = started.elapsed();
    assert!(beat.has_flag(FLAG_HEARTBEAT), "the heartbeat is answered before the request");
    let (h, data) = lb.recv().or_else(|| lb.recv()).or_else(|| lb.recv()).expect("DATA 1 once the file is hashed");
    println!("heartbeat answered after {answered_after:?}, DATA 1 after {:?}", started.elapsed());
    assert_eq!(&data[..4], b"\x00\x03\x00\x01");
    assert!(h.has_flag(FLAG_HAS_CONTEXT));
}

/// A repeated RRQ (a client retry, or a duplicate from the network) while the first answer is
/// outstanding gets no second OACK: clients abort on one.
#[test]
fn a_duplicate_request_gets_one_oack() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 50_000, 31).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    let rrq = b"\x00\x01fw.bin\x00octet\x00blksize\x001024\x00";
    lb.send(&a, &client_header(), rrq);
    let (_, oack) = lb.recv().expect("an OACK");
    assert_eq!(&oack[..2], b"\x00\x06");
    lb.send(&a, &client_header(), rrq);
    let (heard, payload) = lb.recv_any().expect("an answer for the balancer's watchdog");
    assert!(heard.has_flag(FLAG_HEARD) && payload.is_empty(), "HEARD, no second OACK: {heard:?} {payload:?}");
    lb.socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(lb.recv().is_none(), "no second OACK");
    lb.socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    lb.send(&a, &client_header(), &ack(0));
    let (_, data) = lb.recv().expect("DATA 1 after ACK 0");
    assert_eq!(&data[..4], b"\x00\x03\x00\x01");
}

/// A download that ended here (last block acknowledged) is not started again by a balancer that
/// still holds its session and nudges it after a failover: the backend answers FINISHED, which
/// makes the balancer forget the session, and sends no DATA to a client that has left.
#[test]
fn a_finished_download_is_not_resumed_by_a_late_nudge() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("small.bin"), 1500, 24).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    lb.send(&a, &client_header(), b"\x00\x01small.bin\x00octet\x00");
    let mut context = client_header();
    for block in 1..=3u16 {
        let (h, data) = lb.recv().expect("DATA");
        assert_eq!(&data[..4], &[0, 3, 0, u8::try_from(block).unwrap()]);
        context = h;
        lb.send(&a, &client_header(), &ack(block));
    }
    assert!(lb.recv().expect("end of session").0.has_flag(FLAG_FINISHED), "the last ACK ends the download");

    // A balancer that took over nudges with the context it mirrored (block 2 acknowledged).
    let mut nudge = context;
    nudge.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    nudge.set_block(2);
    lb.send(&a, &nudge, &ack(2));
    let (reply, payload) = lb.recv().expect("an answer");
    assert!(reply.has_flag(FLAG_FINISHED) && payload.is_empty(), "FINISHED, not DATA: {reply:?} {payload:?}");
    assert!(lb.recv().is_none(), "nothing more: the download is not resumed");

    // The same client key starting a new download is served as usual.
    lb.send(&a, &client_header(), b"\x00\x01small.bin\x00octet\x00");
    let (_, data) = lb.recv().expect("DATA 1 of the new download");
    assert_eq!(&data[..4], &[0, 3, 0, 1]);
}

/// Every datagram a live backend reads gets a reply, so a client that repeats itself cannot make
/// the balancer's watchdog count it unanswered: in lock-step, duplicates of the current ACK,
/// stale ACKs and ACKs of blocks never sent each get a header-only `HEARD` (no DATA: no
/// Sorcerer's Apprentice), and the transfer goes on as before.
#[test]
fn every_datagram_is_answered_even_when_it_asks_for_nothing() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 5000, 41).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    lb.send(&a, &client_header(), b"\x00\x01fw.bin\x00octet\x00");
    let (mut context, data) = lb.recv().expect("DATA 1");
    assert_eq!(&data[..4], b"\x00\x03\x00\x01");
    context.flags = FLAG_HAS_CONTEXT;
    lb.send(&a, &context, &ack(1));
    let (h, data) = lb.recv().expect("DATA 2");
    assert_eq!(&data[..4], b"\x00\x03\x00\x02");
    context.set_block(h.block());
    let mut timer_resends = 0;
    for (what, block) in [("a duplicate of the last ACK", 1u16), ("a stale ACK 0", 0), ("an ACK of a block never sent", 9)] {
        for _ in 0..20 {
            lb.send(&a, &context, &ack(block));
            let mut data_again = false;
            loop {
                let Some((reply, payload)) = lb.recv_any() else {
                    // DATA 2 then nothing: the duplicate came once the backend had gone quiet
                    // (its quick resends unanswered: a busy machine), so it was taken for the
                    // client's own retransmission and answered with DATA 2 (`on_ack`), and a
                    // datagram answered gets no `HEARD`.
                    assert!(data_again, "an answer to {what}");
                    break;
                };
                if payload.starts_with(b"\x00\x03\x00\x02") {
                    // DATA 2 again: its timer (a few ms after the measured round trip) fired
                    // meanwhile; no answer to the ACK.
                    timer_resends += 1;
                    data_again = true;
                    continue;
                }
                assert_eq!(reply.flags, FLAG_FROM_BACKEND | FLAG_HEARD, "{what}: HEARD, not {payload:?}");
                assert!(payload.is_empty(), "{what}: header only");
                break;
            }
        }
    }
    println!("DATA 2 resent by its timer {timer_resends} times meanwhile");
    assert!(timer_resends <= 12, "the timer backs off: {timer_resends} resends");
    lb.send(&a, &context, &ack(2));
    let (_, data) = lb.recv().expect("DATA 3 after the storm");
    assert_eq!(&data[..4], b"\x00\x03\x00\x03");
}

/// Load is not loss: an ACK that waits in the socket queue while its transfer's timer runs out
/// (here the backend is stopped meanwhile, as an overloaded machine leaves it unscheduled) is
/// read before the timer is handled: the client gets the next block, not the one it has again.
/// With the timer a few milliseconds after the measured round trip, a busy backend would
/// otherwise resend a block for nearly every ACK; and for an OACK (the first round, with a
/// `timeout` of 1 s negotiated: its resend waits 2 s) a second one makes atftp abort. Three
/// rounds each: without the rule the timer wins about every other time.
#[test]
fn an_ack_queued_behind_a_due_timer_is_read_before_the_timer() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 50_000, 43).unwrap();
    let a = backend(root.path());
    let pid = i32::try_from(a.process.pid()).unwrap();
    let stopped_for = |pause: Duration, lb: &Lb, then: &dyn Fn()| {
        // SAFETY: kill(2) on the backend this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        // Stopped for sure (state T), and what its timers sent before it stopped dropped: on
        // a busy machine a timer can run out before the test's ACK is even sent, and that
        // resend is not the case under test.
        let stat = format!("/proc/{pid}/stat");
        while !std::fs::read_to_string(&stat).is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))) {
            std::thread::sleep(Duration::from_millis(1));
        }
        lb.drain();
        then();
        std::thread::sleep(pause);
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    };
    for round in 0..3u16 {
        let lb = Lb::new();
        let header = SteeringHeader::for_client(CLIENT, 41_000 + round, VIP, 31_400 + round);
        lb.send(&a, &header, b"\x00\x01fw.bin\x00octet\x00blksize\x001024\x00timeout\x001\x00");
        let (mut context, oack) = lb.recv().expect("an OACK");
        assert_eq!(&oack[..2], b"\x00\x06");
        context.flags = FLAG_HAS_CONTEXT;
        stopped_for(Duration::from_millis(2300), &lb, &|| lb.send(&a, &context, &ack(0)));
        let (_, first) = lb.recv().expect("an answer once the backend runs again");
        assert_eq!(&first[..4], b"\x00\x03\x00\x01", "round {round}: DATA 1, not a second OACK ({:?})", &first[..2]);
        // A lock-step download without options: DATA 1, promptly acknowledged, measures a
        // round trip of well under a millisecond, so DATA 2's timer runs out a few ms later.
        let lb = Lb::new();
        let header = SteeringHeader::for_client(CLIENT, 42_000 + round, VIP, 32_400 + round);
        lb.send(&a, &header, b"\x00\x01fw.bin\x00octet\x00");
        let (mut context, data) = lb.recv().expect("DATA 1");
        assert_eq!(&data[..4], b"\x00\x03\x00\x01");
        context.flags = FLAG_HAS_CONTEXT;
        lb.send(&a, &context, &ack(1));
        let (_, data) = lb.recv().expect("DATA 2");
        assert_eq!(&data[..4], b"\x00\x03\x00\x02");
        stopped_for(Duration::from_millis(100), &lb, &|| lb.send(&a, &context, &ack(2)));
        let (_, next) = lb.recv().expect("an answer once the backend runs again");
        assert_eq!(&next[..4], b"\x00\x03\x00\x03", "round {round}: DATA 3, not DATA 2 again");
    }
}

/// A client whose OACK was lost asks again: a request repeated well after the OACK (here
/// 600 ms, half the server's timeout and more) gets the OACK again at once, sooner than the
/// OACK timer (which waits out the client's own). A copy of the request that arrives right
/// after the first (a duplicating network) does not: a second OACK aborts atftp.
#[test]
fn a_request_repeated_after_the_oack_was_lost_gets_it_again() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 50_000, 47).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    let rrq = b"\x00\x01fw.bin\x00octet\x00blksize\x001024\x00";
    lb.send(&a, &client_header(), rrq);
    let (_, first) = lb.recv().expect("an OACK");
    assert_eq!(&first[..2], b"\x00\x06");
    std::thread::sleep(Duration::from_millis(600));
    lb.send(&a, &client_header(), rrq);
    let (_, again) = lb.recv().expect("the OACK again");
    assert_eq!(again, first, "the same OACK");
    lb.send(&a, &client_header(), rrq);
    let (heard, payload) = lb.recv_any().expect("an answer for the watchdog");
    assert!(heard.has_flag(FLAG_HEARD) && payload.is_empty(), "a copy right after: HEARD only, {payload:?}");
}

/// `--lb`: a steering datagram from an address that is not a named balancer gets no answer at
/// all (not even `HEARD`), file lookups included, and the drops are logged with their count;
/// the balancer is served as before. `--steered` without `--lb` does not start.
#[test]
fn only_the_named_balancers_may_steer() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 100_000, 23).unwrap();
    let b = backend(root.path());
    let attacker = Lb::at("127.0.0.2");
    let request = b"\x00\x01fw.bin\x00octet\x00blksize\x001000\x00";
    for _ in 0..20 {
        attacker.send(&b, &client_header(), request);
        let mut beat = SteeringHeader::for_client([0; 4], 0, [0; 4], 0);
        beat.flags = FLAG_HEARTBEAT;
        attacker.send(&b, &beat, b"");
    }
    assert!(attacker.recv_any().is_none(), "no answer of any kind to a sender not named by --lb");
    let log = b.process.log();
    assert!(log.contains("not named by --lb") && log.contains("from=127.0.0.2"), "{log}");
    assert!(!log.contains("fw.bin"), "no request of the attacker reached the file lookup: {log}");
    let lb = Lb::new();
    lb.send(&b, &client_header(), request);
    let (_, oack) = lb.recv().expect("the balancer is served");
    assert_eq!(&oack[..2], b"\x00\x06");

    let mut command = Command::new(env!("CARGO_BIN_EXE_tftp-backend"));
    command.arg("--root").arg(root.path()).args(["--steered", "--listen", "127.0.0.1:0"]);
    let mut refused = Process::spawn(RunPrefix::new().name("no-lb"), command).unwrap();
    let status = refused.wait(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "a usage error: {}", refused.log());
    assert!(refused.log().contains("--lb"), "{}", refused.log());
}

/// `--max-transfers 2`: a third new request gets ERROR 0 "server busy" at once, without a
/// file lookup; a transfer that moves here from another backend is still taken; once a
/// transfer ends, a new request is served again.
#[test]
fn new_requests_beyond_max_transfers_are_refused_but_moved_transfers_are_taken() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("fw.bin"), 100_000, 24).unwrap();
    let b = backend_with(root.path(), &["--max-transfers", "2"]);
    let lb = Lb::new();
    let request = b"\x00\x01fw.bin\x00octet\x00blksize\x001000\x00";
    let client = |port: u16| SteeringHeader::for_client(CLIENT, port, VIP, 31_337);
    let mut contexts = Vec::new();
    for port in [40_001, 40_002] {
        lb.send(&b, &client(port), request);
        let (h, oack) = lb.recv().expect("OACK");
        assert_eq!(&oack[..2], b"\x00\x06", "transfer {port} admitted");
        contexts.push(h);
    }
    lb.send(&b, &client(40_003), request);
    let (_, busy) = lb.recv().expect("an answer to the third request");
    assert_eq!(&busy[..4], b"\x00\x05\x00\x00", "ERROR 0");
    assert!(String::from_utf8_lossy(&busy).contains("server busy"), "{busy:?}");

    // A transfer started elsewhere (here: transfer 40_001's context under another port, as
    // a dead backend's would arrive) is resumed although the server is full.
    let mut moved = contexts[0];
    moved.client_port = 40_004u16.to_be_bytes();
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    lb.send(&b, &moved, &ack(0));
    // (After the busy ERROR came its header-only FINISHED.)
    let data = std::iter::from_fn(|| lb.recv()).map(|(_, tftp)| tftp).find(|tftp| !tftp.is_empty()).expect("DATA of the moved transfer");
    assert_eq!(&data[..4], b"\x00\x03\x00\x01", "a moved transfer is not refused");

    // Two transfers end (the client aborts them): room for a new one.
    for port in [40_001, 40_004] {
        lb.send(&b, &client(port), b"\x00\x05\x00\x00done\x00");
    }
    let served = (0..20).any(|_| {
        lb.send(&b, &client(40_005), request);
        std::iter::from_fn(|| lb.recv()).any(|(_, reply)| reply.starts_with(b"\x00\x06"))
    });
    assert!(served, "a new request is served once transfers ended");
}

/// EDK2's size probe through a balancer: its ERROR 8 after the OACK ends the session at once
/// (`FINISHED`, so the balancer forgets it too), and the read that follows from the same port
/// gets an OACK of its own options. Should the abort be lost, the read, having other options
/// than the probe, is still a new request, not a copy of the probe.
#[test]
fn edk2s_size_probe_is_finished_at_once_and_its_read_served_fresh() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("grubx64.efi"), 5000, 33).unwrap();
    let a = backend(root.path());
    let lb = Lb::new();
    let probe = b"\x00\x01grubx64.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
    let read = b"\x00\x01grubx64.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00";
    lb.send(&a, &client_header(), probe);
    let (_, oack) = lb.recv().expect("the probe's OACK");
    assert_eq!(oack, b"\x00\x06blksize\x001468\x00tsize\x005000\x00windowsize\x004\x00");
    lb.send(&a, &client_header(), b"\x00\x05\x00\x08User aborted the transfer\x00");
    assert!(lb.recv().expect("the end of the session").0.has_flag(FLAG_FINISHED));
    lb.send(&a, &client_header(), read);
    let (_, oack) = lb.recv().expect("the read's OACK");
    assert_eq!(oack, b"\x00\x06blksize\x001468\x00windowsize\x004\x00");
    // The probe again, its abort lost this time.
    let other_port = SteeringHeader::for_client(CLIENT, 40_002, VIP, 31_337);
    lb.send(&a, &other_port, probe);
    assert_eq!(&lb.recv().expect("the probe's OACK").1[..2], b"\x00\x06");
    lb.send(&a, &other_port, read);
    let (_, oack) = lb.recv().expect("the read's OACK, not HEARD");
    assert_eq!(oack, b"\x00\x06blksize\x001468\x00windowsize\x004\x00");
    lb.send(&a, &other_port, &ack(0));
    let (_, data) = lb.recv().expect("DATA 1");
    assert_eq!(&data[..4], b"\x00\x03\x00\x01");
    let log = a.process.log();
    let serving = log.split_once(" serving ").map_or("", |(_, after)| after);
    assert!(!serving.contains("WARN"), "no warning for a probe's abort: {log}");
}

/// The balancer cannot steer IP fragments: with `--path-mtu 1500` toward it, U-Boot's
/// blksize 1468 is lowered to 1404, and each DATA with its steering header is one 1500-byte
/// IPv4 datagram.
#[test]
fn uboots_blocks_fit_the_path_mtu_toward_the_balancer() {
    let root = tempfile::tempdir().unwrap();
    make_file(&root.path().join("u-boot.itb"), 100_000, 34).unwrap();
    let a = backend_with(root.path(), &["--path-mtu", "1500"]);
    let lb = Lb::new();
    lb.send(&a, &client_header(), b"\x00\x01u-boot.itb\x00octet\x00timeout\x005\x00blksize\x001468\x00");
    let (_, oack) = lb.recv().expect("an OACK");
    assert_eq!(oack, b"\x00\x06blksize\x001404\x00timeout\x005\x00", "lowered blksize, the timeout as asked");
    lb.send(&a, &client_header(), &ack(0));
    let (_, data) = lb.recv().expect("DATA 1");
    assert_eq!(&data[..4], b"\x00\x03\x00\x01");
    assert_eq!(20 + 8 + 64 + data.len(), 1500, "one full datagram, not fragmented");
}

/// Three backends that keep replicas of uploads on each other (`--peer`), each on its own root.
struct Replicated {
    roots: Vec<tempfile::TempDir>,
    backends: Vec<Backend>,
}

fn replicated() -> Replicated {
    let roots: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let backends = (0..3)
        .map(|i| {
            let peers: Vec<String> = (0..3).filter(|&j| j != i).map(|j| format!("127.0.0.1:{}", ports[j])).collect();
            let mut args = vec!["--allow-upload", "--min-free-mib", "0"];
            for peer in &peers {
                args.extend(["--peer", peer.as_str()]);
            }
            backend_on(roots[i].path(), ports[i], &args)
        })
        .collect();
    Replicated { roots, backends }
}

impl Replicated {
    /// Waits until `name` on backend `i` holds `bytes`, and no temporary file is left there.
    fn wait_for(&self, i: usize, name: &str, bytes: &[u8]) {
        let (path, deadline) = (self.roots[i].path().join(name), std::time::Instant::now() + Duration::from_secs(10));
        loop {
            let temporaries = std::fs::read_dir(self.roots[i].path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tftp-upload-")).count();
            if std::fs::read(&path).is_ok_and(|got| got == bytes) && temporaries == 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "backend {i}: {name} never arrived whole ({temporaries} temporaries)\n{}", self.backends[i].process.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends backend 0 the request of an upload of `name`: its first answer, which names the
    /// replica, and that replica's index.
    fn begin_upload(&self, lb: &Lb, name: &str) -> (SteeringHeader, usize) {
        lb.send(&self.backends[0], &client_header(), &[&b"\x00\x02"[..], name.as_bytes(), b"\x00octet\x00"].concat());
        let (first, _) = lb.recv().expect("ACK 0");
        let replica = first.replica().and_then(|(_, port)| self.index_of(port)).expect("replica named");
        (first, replica)
    }

    fn index_of(&self, port: [u8; 2]) -> Option<usize> {
        self.backends.iter().position(|b| b.port.to_be_bytes() == port)
    }
}

/// Sends DATA blocks `blocks` of `content` (512-byte blocks) to `to` and checks each ACK.
fn upload_blocks(lb: &Lb, to: &Backend, header: &SteeringHeader, content: &[u8], blocks: std::ops::RangeInclusive<u16>) -> SteeringHeader {
    let mut last = *header;
    for block in blocks {
        let start = (usize::from(block) - 1) * 512;
        let chunk = &content[start..content.len().min(start + 512)];
        lb.send(to, header, &[&[0u8, 3][..], &block.to_be_bytes(), chunk].concat());
        // A timer's repeat of an earlier ACK may come first on a slow machine: skipped, the
        // block's own ACK must follow.
        let (h, reply) = loop {
            let (h, reply) = lb.recv().unwrap_or_else(|| panic!("no ACK of block {block}\n{}", to.process.log()));
            let stale = reply.len() == 4 && reply[..2] == [0, 4] && u16::from_be_bytes([reply[2], reply[3]]) < block;
            if !stale {
                break (h, reply);
            }
        };
        assert_eq!(reply, ack(block), "block {block}");
        last = h;
    }
    last
}

/// Issue 17: an upload keeps a copy on a peer (named in the header for the balancers), lands on
/// every backend, and leaves no temporary file anywhere.
#[test]
fn an_upload_is_copied_to_its_replica_and_lands_on_every_backend() {
    let cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    lb.send(&cluster.backends[0], &client_header(), b"\x00\x02up.bin\x00octet\x00");
    let (first, answer) = lb.recv().expect("ACK 0");
    assert_eq!(answer, ack(0));
    assert_eq!(first.flags, FLAG_FROM_BACKEND | FLAG_HAS_CONTEXT);
    assert!(first.is_upload());
    let replica = first.replica().and_then(|(_, port)| cluster.index_of(port)).expect("the first answer names the replica");
    assert_ne!(replica, 0);
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let last = upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=40);
    assert!(last.is_upload());
    for i in 0..3 {
        cluster.wait_for(i, "up.bin", &content);
    }
}

/// Issue 17: a peer that says nothing while a finished upload is pushed to it (paused here for
/// a second, longer than a link waits: 310 ms) still gets the file once it answers again. The
/// push used to be given up for good, and that backend answered a download of the name "file
/// not found" from then on.
#[test]
fn a_push_to_a_peer_that_was_paused_arrives_once_it_answers_again() {
    let mut cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..20_000u32).map(|i| (i * 11 % 239) as u8).collect();
    let (first, replica) = cluster.begin_upload(&lb, "late.bin");
    let third = 3 - replica;
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=39);
    cluster.backends[third].process.pause();
    upload_blocks(&lb, &cluster.backends[0], &header, &content, 40..=40);
    std::thread::sleep(Duration::from_secs(1));
    cluster.backends[third].process.resume();
    for i in [0, replica, third] {
        cluster.wait_for(i, "late.bin", &content);
    }
}

/// Issue 17, goodput: the replica gets each block of a client's window as it arrives (not all
/// of them at the window's end, which made the replica's work wait for the whole window), and
/// the held acknowledgement of the window's last block is that DATA's only answer (no `HEARD`
/// before it, which cost every lock-step block a datagram more). The replica here is the
/// test's socket, the primary's only `--peer`.
#[test]
fn a_windows_blocks_reach_the_replica_as_they_come_and_the_held_ack_is_their_answer() {
    let root = tempfile::tempdir().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let peer_arg = peer.local_addr().unwrap().to_string();
    let primary = backend_with(root.path(), &["--allow-upload", "--min-free-mib", "0", "--peer", &peer_arg]);
    let lb = Lb::new();
    // The replica's side: the next copy datagram (repeats of a block already seen, which the
    // primary's link timer may send, are skipped), and its ACKs.
    let mut buf = [0u8; 2048];
    let mut next_copy = |at_least: u16| -> (SteeringHeader, Vec<u8>) {
        loop {
            let (n, _) = peer.recv_from(&mut buf).unwrap_or_else(|e| panic!("no copy datagram ({e}); primary:\n{}", primary.process.log()));
            let header = *bytemuck::try_from_bytes::<SteeringHeader>(&buf[..64]).unwrap();
            assert!(header.has_flag(FLAG_REPLICA));
            let tftp = buf[64..n].to_vec();
            if tftp[..2] != [0, 3] || u16::from_be_bytes([tftp[2], tftp[3]]) >= at_least {
                return (header, tftp);
            }
        }
    };
    let answer = |header: &SteeringHeader, block: u16| {
        let mut h = *header;
        h.flags = FLAG_REPLICA | FLAG_FROM_BACKEND;
        h.set_block(u32::from(block));
        let mut datagram = bytemuck::bytes_of(&h).to_vec();
        datagram.extend_from_slice(&ack(block));
        peer.send_to(&datagram, ("127.0.0.1", primary.port)).unwrap();
    };
    lb.send(&primary, &client_header(), b"\x00\x02win.bin\x00octet\x00windowsize\x004\x00");
    let (open, wrq) = next_copy(0);
    assert_eq!(&wrq[..2], [0, 2], "the copy opens with a WRQ");
    answer(&open, 0);
    let (first, oack) = lb.recv().expect("OACK once the replica opened its copy");
    assert_eq!(&oack[..2], [0, 6]);
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let content: Vec<u8> = (0..4 * 512 + 100).map(|i: u32| (i * 11 % 253) as u8).collect();
    let block = |n: u16| {
        let start = usize::from(n - 1) * 512;
        [&[0u8, 3][..], &n.to_be_bytes(), &content[start..content.len().min(start + 512)]].concat()
    };
    for n in 1..=4u16 {
        lb.send(&primary, &header, &block(n));
        let (copied, data) = next_copy(n);
        assert_eq!(data, block(n), "block {n} reaches the replica before the client sends the next one");
        if n == 4 {
            answer(&copied, 4);
        }
    }
    let mut heard = 0;
    let acked = loop {
        let (reply, payload) = lb.recv_any().expect("ACK 4 once the replica has block 4");
        if reply.has_flag(FLAG_HEARD) {
            heard += 1;
            continue;
        }
        break payload;
    };
    assert_eq!(acked, ack(4));
    assert_eq!(heard, 3, "HEARD for blocks 1 to 3 (nothing to answer yet), none for block 4: its ACK answers it");
}

/// Issue 17: the serving backend dies mid-upload; the balancer sends the client's next DATA
/// to the replica (with a nudge, as its kernel does), which takes the upload over at once, picks
/// the third backend as its replica, and the file lands whole on both survivors.
#[test]
fn the_replica_takes_an_upload_over_when_its_primary_dies() {
    let mut cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let (first, replica) = cluster.begin_upload(&lb, "moved.bin");
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let learned = upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=30);
    assert_eq!(learned.replica(), first.replica());
    cluster.backends[0].process.sigkill();
    let mut moved = learned;
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    let taken = upload_blocks(&lb, &cluster.backends[replica], &moved, &content, 31..=31);
    header.flags = FLAG_HAS_CONTEXT;
    upload_blocks(&lb, &cluster.backends[replica], &header, &content, 32..=58);
    // The client is acknowledged while the new replica catches up (it may outrun the copy on a
    // busy machine): a balancer's nudge is answered with the header, which names the third
    // backend once it holds every acknowledged block.
    let third = 3 - replica;
    let mut nudge = header;
    nudge.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let named = loop {
        lb.send(&cluster.backends[replica], &nudge, &ack(58));
        let named = lb.recv().and_then(|(h, _)| h.replica()).and_then(|(_, port)| cluster.index_of(port));
        if named == Some(third) || std::time::Instant::now() > deadline {
            break named;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(named, Some(third), "the new primary keeps its copy on the third backend (first reply: {:?})", taken.replica());
    upload_blocks(&lb, &cluster.backends[replica], &header, &content, 59..=59);
    cluster.wait_for(replica, "moved.bin", &content);
    cluster.wait_for(third, "moved.bin", &content);
    let dead_root = std::fs::read_dir(cluster.roots[0].path()).unwrap().count();
    assert!(dead_root <= 1, "the dead primary left at most its own temporary");
}

/// A false verdict: the balancer moves an upload to its replica while the primary still lives.
/// What the old primary copies to the replica from then on (a block that still reached it, or
/// its probe when the client is quiet toward it) is answered "this backend serves the upload
/// now": the old primary drops its session and temporary instead of holding a second upload.
#[test]
fn a_primary_whose_upload_moved_to_its_replica_lets_it_go() {
    old_primary_lets_go(true);
}

/// The same when nothing reaches the old primary any more: its probe of the replica finds out.
#[test]
fn a_primary_whose_quiet_upload_moved_to_its_replica_lets_it_go() {
    old_primary_lets_go(false);
}

fn old_primary_lets_go(late_block: bool) {
    let cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..10_000u32).map(|i| (i * 3 % 239) as u8).collect();
    let (first, replica) = cluster.begin_upload(&lb, "kept.bin");
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let learned = upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=10);
    let mut moved = learned;
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    upload_blocks(&lb, &cluster.backends[replica], &moved, &content, 11..=11);
    // The client's block 11 also on the old path (a retransmission): the old primary writes
    // it and copies it to the replica.
    if late_block {
        let block11 = [&[0u8, 3, 0, 11][..], &content[10 * 512..11 * 512]].concat();
        lb.send(&cluster.backends[0], &header, &block11);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::fs::read_dir(cluster.roots[0].path()).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the old primary kept its temporary\n{}", cluster.backends[0].process.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let lb2 = Lb::new();
    upload_blocks(&lb2, &cluster.backends[replica], &header, &content, 12..=20);
    cluster.wait_for(replica, "kept.bin", &content);
}

/// Issue 17: a balancer that moves an upload to its replica hands it the client's last DATA
/// with the nudge (the dead primary may have taken it along, and tftp-hpa waits for that
/// block's ACK, ignoring a repeat of the one before). One the replica holds already (the
/// primary copied it, then died before its ACK reached the client) is acknowledged again at
/// once, not written twice; the upload then goes on and lands whole.
#[test]
fn a_handed_over_data_the_replica_holds_is_acknowledged_again_not_written_twice() {
    let mut cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..30_000u32).map(|i| (i * 11 % 239) as u8).collect();
    let (first, replica) = cluster.begin_upload(&lb, "handed.bin");
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let learned = upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=30);
    cluster.backends[0].process.sigkill();
    let mut moved = learned;
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    upload_blocks(&lb, &cluster.backends[replica], &moved, &content, 30..=30);
    upload_blocks(&lb, &cluster.backends[replica], &header, &content, 31..=59);
    cluster.wait_for(replica, "handed.bin", &content);
    cluster.wait_for(3 - replica, "handed.bin", &content);
}

/// Issue 17: an upload that lands before the replica its new primary chose caught up (a
/// promoted replica copies its new one what it holds, and the client goes on meanwhile from
/// the one copy) pushes that replica the finished file like any other peer: no backend is left
/// with part of it. The third backend is stopped (SIGSTOP) until the upload landed.
#[test]
fn an_upload_that_lands_before_its_new_replica_caught_up_is_pushed_to_it() {
    let mut cluster = replicated();
    let lb = Lb::new();
    let content: Vec<u8> = (0..30_000u32).map(|i| (i * 17 % 233) as u8).collect();
    let (first, replica) = cluster.begin_upload(&lb, "late.bin");
    let third = 3 - replica;
    let mut header = first;
    header.flags = FLAG_HAS_CONTEXT;
    let learned = upload_blocks(&lb, &cluster.backends[0], &header, &content, 1..=30);
    cluster.backends[0].process.sigkill();
    cluster.backends[third].process.pause();
    let mut moved = learned;
    moved.flags = FLAG_HAS_CONTEXT | FLAG_NUDGE;
    upload_blocks(&lb, &cluster.backends[replica], &moved, &content, 31..=31);
    upload_blocks(&lb, &cluster.backends[replica], &header, &content, 32..=59);
    cluster.wait_for(replica, "late.bin", &content);
    cluster.backends[third].process.resume();
    cluster.wait_for(third, "late.bin", &content);
}
