//! Authenticated control messages, on the full topology: a host on the control network without
//! the key forges role changes ("you are active" to the backup, "you are backup" to the active
//! one) and session sync (`Upsert` of a session that does not exist, `Forget` of the one in
//! flight) while a client downloads; nothing changes and the rejections are counted. The same
//! forgeries against agents run with `--insecure-control` do take effect (what the key
//! prevents). Two balancers with different keys show it in `xdp-lb status`.
//!
//! The forger writes the documented wire format (docs/ARCHITECTURE.md) itself, with the right
//! recipient and a current sequence number: all it lacks is the key.

use std::{
    net::{SocketAddrV4, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use netns_tests::{
    ControlKey, Netns, Process,
    clients::{Client, expect_download},
    cluster::Cluster,
    pair_topology::{CONTROL_PORT, PairTopology, lb_addr},
    wait_for,
    watch::wait_for_size,
};
use xdp_lb_common::{
    ClientKey, Session, SteeringHeader,
    status::{BalanceStatus, ControlStatus},
};

const MIB: usize = 1024 * 1024;
const ATTACKER: &str = "10.77.0.66";
/// A client that never asked for anything: a session for it can only come from a forgery.
const FORGED_CLIENT: [u8; 4] = [10, 78, 0, 99];

const KIND_ACTIVE: u8 = 1;
const KIND_BACKUP: u8 = 2;
const KIND_UPSERT: u8 = 3;
const KIND_FORGET: u8 = 4;
const FROM_SWITCH: u8 = 1;
const FROM_BALANCER: u8 = 2;

/// How a forger without the key can sign: not at all, under the deployment's key id with a
/// guessed tag, or under an id of its own.
#[derive(Clone, Copy, Debug)]
enum Forgery {
    Unsigned,
    GuessedTag,
    OwnKeyId,
}

const FORGERIES: [Forgery; 3] = [Forgery::Unsigned, Forgery::GuessedTag, Forgery::OwnKeyId];

fn unix_ns() -> u64 {
    u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()).unwrap()
}

/// `XLC2` header (magic, kind, count, key id, sender, sequence, recipient), body, 32-byte MAC.
fn forge(kind: u8, count: u8, sender: u8, to: SocketAddrV4, body: &[u8], how: Forgery) -> Vec<u8> {
    let (key_id, tag) = match how {
        Forgery::Unsigned => (0, [0u8; 32]),
        Forgery::GuessedTag => (1, [0x5a; 32]),
        Forgery::OwnKeyId => (7, [0xa5; 32]),
    };
    let mut out = b"XLC2".to_vec();
    out.extend_from_slice(&[kind, count, key_id, sender]);
    out.extend_from_slice(&unix_ns().to_be_bytes());
    out.extend_from_slice(&to.ip().octets());
    out.extend_from_slice(&to.port().to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(body);
    out.extend_from_slice(&tag);
    out
}

fn lb_control(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(lb_addr(i).parse().unwrap(), CONTROL_PORT)
}

fn forged_session() -> Vec<u8> {
    let key = ClientKey::new(FORGED_CLIENT, 4444u16.to_be_bytes());
    let mut session: Session = bytemuck::Zeroable::zeroed();
    session.header = SteeringHeader::for_client(key.ip, 4444, [10, 77, 9, 100], key.tid());
    session.backend = 0;
    let mut body = bytemuck::bytes_of(&key).to_vec();
    body.extend_from_slice(bytemuck::bytes_of(&session));
    body
}

/// The client key of a session as `status` prints it (`10.78.0.50:41234`).
fn client_key(client: &str) -> Vec<u8> {
    let addr: SocketAddrV4 = client.parse().unwrap();
    bytemuck::bytes_of(&ClientKey::new(addr.ip().octets(), addr.port().to_be_bytes())).to_vec()
}

/// Sends every forgery from `attacker` for `duration`: role changes to both balancers, an
/// `Upsert` of a made-up session and a `Forget` of `victims` (the sessions in flight).
fn attack(attacker: &Netns, victims: &[String], hows: &[Forgery], duration: Duration) -> u64 {
    let upsert = forged_session();
    let forgets: Vec<Vec<u8>> = victims.iter().map(|v| client_key(v)).collect();
    attacker
        .enter(|| {
            let socket = UdpSocket::bind((ATTACKER, 0)).expect("attacker socket");
            let started = Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < duration {
                for &how in hows {
                    let mut datagrams = vec![
                        (lb_control(1), forge(KIND_ACTIVE, 0, FROM_SWITCH, lb_control(1), &[], how)),
                        (lb_control(0), forge(KIND_BACKUP, 0, FROM_SWITCH, lb_control(0), &[], how)),
                        (lb_control(1), forge(KIND_UPSERT, 1, FROM_BALANCER, lb_control(1), &upsert, how)),
                    ];
                    for forget in &forgets {
                        for lb in 0..2 {
                            datagrams.push((lb_control(lb), forge(KIND_FORGET, 1, FROM_BALANCER, lb_control(lb), forget, how)));
                        }
                    }
                    for (to, datagram) in datagrams {
                        sent += u64::from(socket.send_to(&datagram, to).is_ok());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
        .expect("enter the attacker's namespace")
}

fn status(running: &Cluster, lb: usize) -> BalanceStatus {
    running.topo.lb_status(lb).expect("status")
}

fn sessions(running: &Cluster, lb: usize) -> Vec<String> {
    status(running, lb).sessions.iter().map(|s| s.client.to_string()).collect()
}

/// Whether one of the agent's status warnings says `what`.
fn warned(control: &ControlStatus, what: &str) -> bool {
    control.warnings.iter().any(|w| w.contains(what))
}

/// How often balancer `lb`'s agent logged that the switch made it `role`.
fn role_changes(lb: &Process, role: &str) -> usize {
    lb.log().lines().filter(|l| l.contains("changed this balancer's role") && l.contains(&format!("role={role}"))).count()
}

/// Starts a lock-step download (slow enough to be in flight through the attack) and waits
/// until the backup mirrors its session; returns it with the session's client key.
fn download_in_flight(running: &Cluster, size: usize) -> (Process, std::path::PathBuf, std::path::PathBuf, String) {
    let source = running.file("forged.bin", size, 3);
    let local = running.local("forged-tftp-hpa");
    let download = running.download(0, Client::TftpHpa, "forged.bin", &local);
    assert!(wait_for_size(&local, MIB as u64, Duration::from_secs(30)), "download did not start\n{}", running.logs());
    let client = wait_for("the backup to mirror the session", 10, || sessions(running, 1).into_iter().find(|c| c.starts_with("10.78.0.50:")))
        .unwrap_or_else(|e| panic!("{e}\n{}", running.logs()));
    (download, local, source, client)
}

#[test]
fn forged_role_changes_and_sync_without_the_key_change_nothing_and_are_counted() {
    let topo = PairTopology::new(1, 2).expect("topology");
    let attacker = topo.add_control_host("evil", ATTACKER).expect("attacker host");
    let running = Cluster::start_on(topo);
    let (mut download, local, source, client) = download_in_flight(&running, 48 * MIB);
    let before = [0, 1].map(|lb| status(&running, lb));

    let sent = attack(&attacker, std::slice::from_ref(&client), &FORGERIES, Duration::from_secs(2));
    assert!(sent > 1000, "the attack sent {sent} datagrams");
    let lb = |i: usize| running.lbs[i].as_ref().expect("balancer running");
    assert_eq!(role_changes(lb(1), "Active"), 0, "a forged heartbeat made the backup active:\n{}", running.logs());
    assert_eq!(role_changes(lb(0), "Backup"), 0, "a forged heartbeat made the active balancer backup:\n{}", running.logs());
    assert_eq!(running.active_lb(), 0, "one active balancer, the switch's choice");
    for i in 0..2 {
        let forged = sessions(&running, i).into_iter().filter(|c| c.starts_with("10.78.0.99:")).count();
        assert_eq!(forged, 0, "balancer {i} holds the forged session");
    }
    // Still in flight (the file is large enough), so its session must still be mirrored.
    assert!(download.is_running(), "the download ended before the check: make the file larger");
    assert!(sessions(&running, 1).contains(&client), "a forged Forget removed the mirrored session of {client}\n{}", running.logs());

    // Every forgery is counted by reason (the counters reach the map within a second).
    let after = wait_for("the rejections counted", 5, || {
        let after = [0, 1].map(|lb| status(&running, lb));
        (after[1].control.rejected("bad_mac") > before[1].control.rejected("bad_mac")).then_some(after)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", running.logs()));
    for (i, status) in after.iter().enumerate() {
        for reason in ["unauthenticated", "bad_mac", "unknown_key"] {
            let moved = status.control.rejected(reason) - before[i].control.rejected(reason);
            assert!(moved > 100, "balancer {i}: {moved} rejected as {reason}\n{:?}", status.control);
        }
        assert_eq!(status.control.peer_auth_failed, 0, "the forger is not at the peer's address");
        assert!(warned(&status.control, "failed authentication"), "balancer {i}: no warning in status: {:?}", status.control.warnings);
        assert!(status.control.accepted > 0, "the real heartbeats still count");
    }
    expect_download(download, &local, &source, Duration::from_secs(120), "tftp-hpa through the forgeries", || running.logs());
    assert_eq!(role_changes(lb(1), "Active"), 0);
    assert_eq!(running.active_lb(), 0);
}

/// The control experiment: the same forger against agents without a key takes over roles and
/// sessions. (What `--insecure-control` accepts, and what the test above shows the key stops.)
#[test]
fn without_a_key_the_same_forgeries_take_effect() {
    let mut topo = PairTopology::new(1, 2).expect("topology");
    topo.control_key = None;
    let attacker = topo.add_control_host("evil", ATTACKER).expect("attacker host");
    let running = Cluster::start_on(topo);
    let (download, local, source, client) = download_in_flight(&running, 48 * MIB);
    attack(&attacker, &[client], &[Forgery::Unsigned], Duration::from_secs(1));
    let lb = |i: usize| running.lbs[i].as_ref().expect("balancer running");
    assert!(role_changes(lb(1), "Active") > 0, "the forged heartbeat did not make the backup active:\n{}", lb(1).log());
    assert!(role_changes(lb(0), "Backup") > 0, "the forged heartbeat did not demote the active balancer:\n{}", lb(0).log());
    // The forged session lands whenever the backup is (back) a backup between forgeries.
    let forged = wait_for("the forged session at the backup", 5, || {
        attack(&attacker, &[], &[Forgery::Unsigned], Duration::from_millis(100));
        sessions(&running, 1).into_iter().find(|c| c.starts_with("10.78.0.99:"))
    });
    assert!(forged.is_ok(), "the forged Upsert was not applied: {:?}", sessions(&running, 1));
    let _ = expect_download_quietly(download, &local, &source);
}

/// Waits for a download whose outcome does not matter to the test (it only keeps a session in
/// flight), so its process does not outlive the cluster.
fn expect_download_quietly(mut download: Process, _local: &Path, _source: &Path) -> Option<std::process::ExitStatus> {
    download.wait(Duration::from_secs(120))
}

#[test]
fn a_pair_with_different_keys_says_so_in_status() {
    let mut running = Cluster::start(1, 2);
    let other = ControlKey::random(&running.topo.prefix, "other", 1).expect("another key");
    // Balancer 1 restarts with another secret under the same key id: it cannot verify the
    // switch nor its peer, and they cannot verify its notices.
    running.kill_lb(1);
    running.restart_lb_with(1, &["--control-key-file", &other.path().display().to_string()]);
    let [lb0, lb1] = wait_for("the key mismatch in both balancers' status", 15, || {
        let both = [0, 1].map(|lb| status(&running, lb).control);
        let shown = both.iter().all(|c| warned(c, "the peer balancer's messages fail authentication"));
        // Balancer 0 also hears balancer 1's notices about its own messages.
        let noticed = both[0].rejected_by_other > 0;
        (shown && noticed).then_some(both)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{:?}", running.logs(), status(&running, 1).control));
    assert!(lb1.peer_auth_failed > 0, "{lb1:?}");
    assert!(lb1.rejected("bad_mac") > 0, "the switch's heartbeats fail at balancer 1: {lb1:?}");
    assert!(warned(&lb0, "another agent rejected this agent's control messages"), "{lb0:?}");
    let switch = wait_for("the mismatch in the switch's status", 15, || {
        let control = running.topo.switch_status().ok()?.control;
        warned(&control, "a load balancer's messages fail authentication").then_some(control)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", running.logs()));
    assert!(switch.rejected_by_other > 0, "{switch:?}");
    // The table form says it in words too.
    let pins = running.topo.lb_pins[1].path().display().to_string();
    let text = netns_tests::run(&netns_tests::binary("xdp-lb").display().to_string(), &["--pin-root", &pins, "status"]).expect("status");
    assert!(text.contains("WARNING: the peer balancer's messages fail authentication"), "{text}");
    // Logged at once, with the fingerprints that tell the keys apart.
    let log = running.lbs[1].as_ref().unwrap().log();
    assert!(log.contains("bad_mac") && log.contains("compare the key fingerprints"), "{log}");
    let fingerprint = |log: &str| log.lines().find(|l| l.contains("control messages authenticated")).map(str::to_owned);
    assert_ne!(fingerprint(&log), fingerprint(&running.lbs[0].as_ref().unwrap().log()));
    // No split brain: the switch keeps the balancer it can talk to active.
    assert_eq!(running.active_lb(), 0);
    let source = running.file("mismatch.bin", 2 * MIB, 5);
    let local = running.local("mismatch-atftp");
    let download = running.download(0, Client::Atftp { blksize: 1468, windowsize: 16 }, "mismatch.bin", &local);
    expect_download(download, &local, &source, Duration::from_secs(60), "atftp with a mis-keyed backup", || running.logs());
}

#[test]
fn an_agent_without_a_key_refuses_to_start() {
    let dir = std::env::temp_dir().join(netns_tests::RunPrefix::new().name("-nokey"));
    std::fs::create_dir_all(&dir).unwrap();
    let xdp_lb = netns_tests::binary("xdp-lb");
    let common = ["--pin-root", "/nonexistent", "balance", "--iface", "lo", "--vip", "10.255.0.1", "--backend", "10.255.0.2:7000"];
    let output = std::process::Command::new(&xdp_lb).args(common).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no --control-key-file") && stderr.contains("--insecure-control"), "{stderr}");
    // A key file others can read is refused too.
    let open = dir.join("open.key");
    std::fs::write(&open, format!("1 {}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let output = std::process::Command::new(&xdp_lb).args(common).arg("--control-key-file").arg(&open).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&output.stderr));
    let output = std::process::Command::new(&xdp_lb)
        .args(["--pin-root", "/nonexistent", "switch", "--iface", "lo", "--lb-iface", "lo", "--vip", "10.255.0.1", "--lb", "10.255.0.2:6970", "--lb", "10.255.0.3:6970"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("no --control-key-file"), "the switch too");
    std::fs::remove_dir_all(&dir).unwrap();
}
