//! The real tftp-backend binary in standalone mode on loopback, driven by stock Debian clients
//! (tftp-hpa, atftp, curl, busybox) and by hand-made hostile packets.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use netns_tests::{
    Process, RunPrefix,
    clients::Client,
    files::{make_file, sha256, share_dir},
};

struct Server {
    port: u16,
    root: tempfile::TempDir,
    process: Process,
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the server on a free loopback port with `extra` flags; waits until it answers.
fn server(extra: &[&str]) -> Server {
    let root = tempfile::tempdir().unwrap();
    share_dir(root.path(), extra.contains(&"--allow-upload")).unwrap();
    server_at(root, extra)
}

/// Starts the server on `root` (made readable, or writable for uploads, by the test).
fn server_at(root: tempfile::TempDir, extra: &[&str]) -> Server {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tftp-backend"));
    command.arg("--root").arg(root.path()).args(["--listen", &format!("127.0.0.1:{port}")]).args(extra);
    let process = Process::spawn(RunPrefix::new().name("tftp-backend"), command).unwrap();
    let server = Server { port, root, process };
    // Ready when a request for a missing file gets its error.
    for _ in 0..100 {
        if request(&server, b"\x00\x01ready-probe\x00octet\x00").is_some() {
            return server;
        }
    }
    panic!("tftp-backend did not answer on port {port}");
}

/// Sends one datagram to the service port and returns the first answer, if any.
fn request(server: &Server, datagram: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    socket.send_to(datagram, ("127.0.0.1", server.port)).unwrap();
    let mut buf = [0u8; 1024];
    socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn run(mut command: Command) -> std::process::Output {
    let output = command.output().expect("client runs");
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn local(name: &str) -> PathBuf {
    std::env::temp_dir().join(RunPrefix::new().name(name))
}

fn assert_same(a: &Path, b: &Path) {
    assert_eq!(sha256(a).unwrap(), sha256(b).unwrap(), "{} differs from {}", a.display(), b.display());
}

#[test]
fn stock_clients_download_identical_files() {
    let s = server(&[]);
    let big = s.root.path().join("image.bin");
    make_file(&big, 2 * 1024 * 1024 + 77, 11).unwrap();
    let exact = s.root.path().join("exact.bin");
    make_file(&exact, 512 * 40, 12).unwrap();
    for how in [
        Client::TftpHpa,
        Client::Atftp { blksize: 1468, windowsize: 16 },
        Client::Atftp { blksize: 512, windowsize: 1 },
        Client::Curl { blksize: 1468 },
        Client::Busybox { blksize: 1024 },
    ] {
        for source in [&big, &exact] {
            let out = local("dl");
            let remote = source.file_name().unwrap().to_str().unwrap();
            run(how.download_here("127.0.0.1", s.port, remote, &out));
            assert_same(source, &out);
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn block_numbers_roll_over_past_65535() {
    let s = server(&[]);
    // 8-byte blocks: 70 000 blocks, past the 16-bit block counter.
    let source = s.root.path().join("rollover.bin");
    make_file(&source, 8 * 70_000 + 3, 13).unwrap();
    let out = local("rollover");
    run(Client::Atftp { blksize: 8, windowsize: 64 }.download_here("127.0.0.1", s.port, "rollover.bin", &out));
    assert_same(&source, &out);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn netascii_downloads_convert_line_ends() {
    let s = server(&[]);
    let source = s.root.path().join("config.txt");
    std::fs::write(&source, "hostname switch-1\ninterface eth0\n  mtu 9000\r\nend\n".repeat(200)).unwrap();
    let out = local("ascii");
    let mut command = Command::new("tftp");
    command.args(["-m", "netascii", "127.0.0.1", &s.port.to_string(), "-c", "get", "config.txt"]).arg(&out);
    run(command);
    assert_same(&source, &out);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn uploads_arrive_intact_only_when_allowed() {
    let upload = local("upload-src");
    make_file(&upload, 300_000, 14).unwrap();

    let refusing = server(&[]);
    let output = put(refusing.port, &upload, "new.bin");
    assert!(String::from_utf8_lossy(&output.stdout).contains("Error") || String::from_utf8_lossy(&output.stderr).contains("Error") || !output.status.success(), "upload refused");
    assert!(!refusing.root.path().join("new.bin").exists());

    let accepting = server(&["--allow-upload"]);
    put(accepting.port, &upload, "new.bin");
    assert_same(&upload, &accepting.root.path().join("new.bin"));
    // Nothing but the file: no temporary left behind.
    assert_eq!(std::fs::read_dir(accepting.root.path()).unwrap().count(), 1);
    // An existing file is not replaced without --allow-overwrite.
    std::fs::write(accepting.root.path().join("keep.bin"), b"original").unwrap();
    put(accepting.port, &upload, "keep.bin");
    assert_eq!(std::fs::read(accepting.root.path().join("keep.bin")).unwrap(), b"original");
    std::fs::remove_file(&upload).unwrap();
}

/// Hostile or malformed requests: each gets the right TFTP error, and the server lives on.
#[test]
fn bad_requests_get_errors_and_the_server_survives() {
    let s = server(&[]);
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::os::unix::fs::symlink(outside.path(), s.root.path().join("escape")).unwrap();
    std::fs::create_dir(s.root.path().join("dir")).unwrap();
    let huge_option = [b"\x00\x01f\x00octet\x00".as_slice(), &[b'x'; 600], b"\x00y\x00"].concat();
    for (name, datagram, code) in [
        ("truncated", b"\x00".to_vec(), 4),
        ("no NUL after the filename", b"\x00\x01file".to_vec(), 4),
        ("unknown opcode", b"\x00\x09abc\x00".to_vec(), 4),
        ("mail mode", b"\x00\x01f\x00mail\x00".to_vec(), 4),
        ("DATA as a request", b"\x00\x03\x00\x01xx".to_vec(), 4),
        ("parent traversal", b"\x00\x01../../etc/passwd\x00octet\x00".to_vec(), 2),
        ("absolute path outside", b"\x00\x01/../etc/passwd\x00octet\x00".to_vec(), 2),
        // A leading "/" means the root, as with tftp-hpa: /etc/passwd is root/etc/passwd.
        ("absolute path", b"\x00\x01/etc/passwd\x00octet\x00".to_vec(), 1),
        ("symlink leading outside", b"\x00\x01escape\x00octet\x00".to_vec(), 2),
        ("a directory", b"\x00\x01dir\x00octet\x00".to_vec(), 2),
        ("missing file", b"\x00\x01nothing-here\x00octet\x00".to_vec(), 1),
        ("upload while disabled", b"\x00\x02x.bin\x00octet\x00".to_vec(), 2),
        ("huge unknown option", huge_option, 1),
        ("bad option value", b"\x00\x01f\x00octet\x00blksize\x00lots\x00".to_vec(), 4),
    ] {
        let answer = request(&s, &datagram).unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(&answer[..2], b"\x00\x05", "{name}: an ERROR packet");
        assert_eq!(u16::from_be_bytes([answer[2], answer[3]]), code, "{name}: error code");
    }
    // Still serving.
    std::fs::write(s.root.path().join("ok.bin"), b"fine").unwrap();
    let answer = request(&s, b"\x00\x01ok.bin\x00octet\x00").unwrap();
    assert_eq!(answer, b"\x00\x03\x00\x01fine");
}

/// RRQ options answered in the OACK: tsize with the file's size, blksize clamped to the
/// configured maximum, unknown options left out.
#[test]
fn oack_answers_tsize_and_clamps_blksize() {
    let s = server(&["--max-blksize", "1024"]);
    std::fs::write(s.root.path().join("sized.bin"), vec![7u8; 123_456]).unwrap();
    let answer = request(&s, b"\x00\x01sized.bin\x00OcTeT\x00blksize\x009000\x00tsize\x000\x00colour\x00blue\x00").unwrap();
    let mut expected = b"\x00\x06".to_vec();
    expected.extend_from_slice(b"blksize\x001024\x00tsize\x00123456\x00");
    // The order of options in the OACK is the server's; compare as sets of pairs.
    let pairs = |bytes: &[u8]| {
        let mut v: Vec<Vec<u8>> = bytes[2..].split(|b| *b == 0).map(<[u8]>::to_vec).collect();
        v.sort();
        v
    };
    assert_eq!(&answer[..2], b"\x00\x06", "an OACK");
    assert_eq!(pairs(&answer), pairs(&expected));
}

/// EDK2's size probe: an RRQ with tsize, the OACK, the client's ERROR 8 to the transfer's
/// port. That is a normal end: the transfer is gone at once (its port sends nothing more),
/// nothing is logged as a warning, and the read that follows, from the same port or another,
/// is a transfer of its own with its own options.
#[test]
fn edk2s_size_probe_ends_quietly_and_its_read_is_served_fresh() {
    let s = server(&[]);
    std::fs::write(s.root.path().join("grubx64.efi"), vec![5u8; 5000]).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let mut buf = [0u8; 2048];
    let probe = b"\x00\x01grubx64.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
    let read = b"\x00\x01grubx64.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00";
    for (round, socket) in [(0, &client), (1, &client), (2, &UdpSocket::bind("127.0.0.1:0").unwrap())] {
        socket.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        socket.send_to(probe, ("127.0.0.1", s.port)).unwrap();
        let (n, probed) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"\x00\x06blksize\x001468\x00tsize\x005000\x00windowsize\x004\x00", "round {round}: the probe's OACK");
        socket.send_to(b"\x00\x05\x00\x08User aborted the transfer\x00", probed).unwrap();
        socket.send_to(read, ("127.0.0.1", s.port)).unwrap();
        let (n, reading) = socket.recv_from(&mut buf).unwrap();
        assert_ne!(reading, probed, "round {round}: a new transfer");
        assert_eq!(&buf[..n], b"\x00\x06blksize\x001468\x00windowsize\x004\x00", "round {round}: the read's own OACK");
        socket.send_to(b"\x00\x04\x00\x00", reading).unwrap();
        for block in 1..=4u8 {
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!((from, &buf[..4]), (reading, &[0, 3, 0, block][..]), "round {round}: DATA {block}");
            assert_eq!(n, 4 + if block < 4 { 1468 } else { 5000 - 3 * 1468 });
        }
        socket.send_to(b"\x00\x04\x00\x04", reading).unwrap();
    }
    // Nothing came from the aborted probes' ports meanwhile (no retransmitted OACK), and nothing
    // comes now.
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(client.recv_from(&mut buf).is_err(), "an aborted probe sends nothing more");
    let log = s.process.log();
    let serving = log.split_once(" serving ").map_or("", |(_, after)| after);
    assert!(!serving.contains("WARN"), "no warning for a probe's abort: {log}");
}

/// A server killed (SIGKILL) in the middle of an upload leaves nothing under the target name:
/// the data went to a temporary file that is renamed only when the upload is complete.
#[test]
fn an_upload_cut_by_a_killed_server_leaves_no_partial_file() {
    let mut s = server(&["--allow-upload"]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    socket.send_to(b"\x00\x02cut.bin\x00octet\x00", ("127.0.0.1", s.port)).unwrap();
    let mut buf = [0u8; 600];
    let (n, tid) = socket.recv_from(&mut buf).expect("ACK 0 from the transfer port");
    assert_eq!(&buf[..n], b"\x00\x04\x00\x00");
    for block in 1..=20u16 {
        let mut data = vec![0, 3];
        data.extend_from_slice(&block.to_be_bytes());
        data.extend_from_slice(&[0x5a; 512]);
        socket.send_to(&data, tid).unwrap();
        let (n, _) = socket.recv_from(&mut buf).expect("ACK");
        assert_eq!(&buf[..n], [&[0u8, 4][..], &block.to_be_bytes()].concat().as_slice());
    }
    s.process.kill_hard();
    assert!(!s.root.path().join("cut.bin").exists(), "no partial file under the target name");
    let names: Vec<String> = std::fs::read_dir(s.root.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| n != "cut.bin"), "{names:?}");
    // The blocks did land: in the temporary file a crash leaves behind (not under the name).
    let landed = std::fs::read_dir(s.root.path()).unwrap().any(|e| e.unwrap().metadata().unwrap().len() == 20 * 512);
    assert!(landed, "the 20 acknowledged blocks are in a temporary file: {names:?}");
}

/// The block size granted fits the path MTU toward the client (RFC 2348: no fragments), here
/// a link of MTU 1000 between two namespaces: 1000 − 20 (IPv4) − 8 (UDP) − 4 (TFTP) = 968.
#[test]
fn blksize_is_clamped_to_the_path_mtu() {
    netns_tests::require_root();
    let prefix = RunPrefix::new();
    let (server_ns, client_ns) = (netns_tests::Netns::new(prefix.name("srv")).unwrap(), netns_tests::Netns::new(prefix.name("cli")).unwrap());
    netns_tests::veth_pair(&server_ns, "eth0", &client_ns, "eth0").unwrap();
    for (ns, addr) in [(&server_ns, "10.79.0.1/24"), (&client_ns, "10.79.0.2/24")] {
        ns.ip(&["link", "set", "eth0", "mtu", "1000"]).unwrap();
        ns.add_address("eth0", addr).unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    share_dir(root.path(), false).unwrap();
    make_file(&root.path().join("mtu.bin"), 100_000, 41).unwrap();
    let mut command = server_ns.command(env!("CARGO_BIN_EXE_tftp-backend"));
    command.arg("--root").arg(root.path()).args(["--listen", "10.79.0.1:69"]);
    let _server = Process::spawn(prefix.name("mtu-server"), command).unwrap();
    let oack = client_ns
        .enter(|| {
            let socket = UdpSocket::bind("10.79.0.2:0").unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 512];
            (0..30).find_map(|_| {
                socket.send_to(b"\x00\x01mtu.bin\x00octet\x00blksize\x001468\x00", "10.79.0.1:69").ok()?;
                socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
            })
        })
        .unwrap()
        .expect("an OACK");
    assert_eq!(oack, b"\x00\x06blksize\x00968\x00", "granted block fits the 1000-byte MTU");
}

/// Load is not loss, standalone too: an ACK that arrived while the server could not run (here
/// it is stopped, as an overloaded machine leaves it unscheduled) past its transfer's timer is
/// read before the timer is handled, so the client gets the next block, not the one it has
/// again. DATA 1, promptly acknowledged, measures a round trip well under a millisecond: DATA
/// 2's timer runs out a few milliseconds later, long before the server runs again. (The wait
/// polls the socket before the alarm and reads it once more when the alarm rings; removing
/// both did not fail this test here, tokio delivering the socket's readiness with the alarm's:
/// it guards the outcome, not that one mechanism.)
#[test]
fn an_ack_that_waited_past_its_timer_is_read_first() {
    let s = server(&[]);
    make_file(&s.root.path().join("fw.bin"), 50_000, 44).unwrap();
    let pid = i32::try_from(s.process.pid()).unwrap();
    let mut buf = [0u8; 1024];
    for round in 0..3 {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.send_to(b"\x00\x01fw.bin\x00octet\x00", ("127.0.0.1", s.port)).unwrap();
        let (n, tid) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..4.min(n)], b"\x00\x03\x00\x01", "round {round}: DATA 1");
        client.send_to(b"\x00\x04\x00\x01", tid).unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..4.min(n)], b"\x00\x03\x00\x02", "round {round}: DATA 2");
        // SAFETY: kill(2) on the server this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        client.send_to(b"\x00\x04\x00\x02", tid).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..4.min(n)], b"\x00\x03\x00\x03", "round {round}: DATA 3, not DATA 2 again");
    }
}

/// The uid of the user a server started as root becomes by default (`tftp`, else `nobody`).
fn default_server_uid() -> u32 {
    ["tftp", "nobody"]
        .iter()
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .map(|user| user.uid.as_raw())
        .expect("a tftp or nobody user")
}

/// Real, effective, saved and filesystem uids of a running process.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect()
}

fn put(port: u16, source: &Path, remote: &str) -> std::process::Output {
    let mut command = Command::new("tftp");
    command.args(["-m", "binary", "127.0.0.1", &port.to_string(), "-c", "put"]).arg(source).arg(remote);
    command.output().unwrap()
}

/// Names in a directory (uploads leave nothing else, not even a temporary file).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// Started as root (the test runs as root), the server gives root up once its socket is bound:
/// every uid of the process is the unprivileged user's, uploads are that user's files with
/// the mode --umask leaves, and only --allow-root keeps root.
#[test]
fn a_server_started_as_root_serves_as_an_unprivileged_user() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    netns_tests::require_root();
    let user = default_server_uid();
    let upload = local("owned-src");
    make_file(&upload, 70_000, 15).unwrap();

    let s = server(&["--allow-upload"]);
    assert_eq!(uids(s.process.pid()), vec![user; 4], "real, effective, saved and fs uid");
    assert!(put(s.port, &upload, "owned.bin").status.success());
    let meta = std::fs::metadata(s.root.path().join("owned.bin")).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (user, 0o644), "the user's file, mode 0666 less umask 022");
    // Downloads still work as that user.
    let back = local("owned-back");
    run(Client::TftpHpa.download_here("127.0.0.1", s.port, "owned.bin", &back));
    assert_same(&upload, &back);

    let private = server(&["--allow-upload", "--umask", "077"]);
    assert!(put(private.port, &upload, "private.bin").status.success());
    assert_eq!(std::fs::metadata(private.root.path().join("private.bin")).unwrap().permissions().mode() & 0o777, 0o600);

    let as_root = server(&["--allow-root"]);
    assert_eq!(uids(as_root.process.pid()), vec![0; 4], "--allow-root keeps root");
    for path in [upload, back] {
        std::fs::remove_file(path).unwrap();
    }
}

/// A root the server's user cannot read, or with --allow-upload cannot write, stops the server
/// at start with a message that names the user, not a server that refuses every request.
#[test]
fn a_root_the_server_user_cannot_use_is_refused_at_start() {
    netns_tests::require_root();
    let private = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let read_only = tempfile::tempdir().unwrap();
    share_dir(read_only.path(), false).unwrap();
    for (root, extra, what) in [(&private, &[][..], "cannot read"), (&read_only, &["--allow-upload"][..], "cannot write")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tftp-backend"));
        command.arg("--root").arg(root.path()).args(["--listen", &format!("127.0.0.1:{}", free_port())]).args(extra);
        let mut process = Process::spawn(RunPrefix::new().name("refused"), command).unwrap();
        let status = process.wait(Duration::from_secs(10));
        let log = process.log();
        assert!(status.is_some_and(|s| !s.success()), "{extra:?}: the server must exit with an error: {log}");
        assert!(log.contains(what) && log.contains("user"), "{extra:?}: {log}");
    }
}

/// --max-upload-bytes: a client that announces a larger tsize (curl does) is refused at once,
/// one that just sends (tftp-hpa) gets ERROR 3 when it crosses the limit; nothing is left.
#[test]
fn uploads_beyond_the_size_limit_get_disk_full_and_leave_nothing() {
    let upload = local("quota-src");
    make_file(&upload, 300_000, 16).unwrap();
    let s = server(&["--allow-upload", "--max-upload-bytes", "100000"]);

    let output = put(s.port, &upload, "sent.bin");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("code 3") && said.contains("larger than this server accepts"), "tftp-hpa: {said}");
    assert!(names(s.root.path()).is_empty(), "nothing on disk: {:?}", names(s.root.path()));

    let curl = Command::new("curl")
        .args(["-sS", "-T"])
        .arg(&upload)
        .arg(format!("tftp://127.0.0.1:{}/announced.bin", s.port))
        .output()
        .unwrap();
    assert_eq!(curl.status.code(), Some(70), "curl: remote disk full: {}", String::from_utf8_lossy(&curl.stderr));
    assert!(names(s.root.path()).is_empty(), "nothing on disk: {:?}", names(s.root.path()));

    let small = local("quota-small");
    make_file(&small, 100_000, 17).unwrap();
    assert!(put(s.port, &small, "small.bin").status.success());
    assert_same(&small, &s.root.path().join("small.bin"));
    for path in [upload, small] {
        std::fs::remove_file(path).unwrap();
    }
}

/// A tmpfs the test mounts (and unmounts, even on failure).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=1777"), "tmpfs"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "mount tmpfs");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// --min-free-mib: an upload that would leave less free space than that fails with ERROR 3
/// and leaves nothing; one that leaves enough lands. (16 MiB filesystem, 8 MiB floor: a
/// 12 MiB file would fit, but not above the floor.)
#[test]
fn uploads_keep_the_free_space_floor() {
    netns_tests::require_root();
    let fs = Tmpfs::new("16m");
    let root = tempfile::tempdir_in(fs.0.path()).unwrap();
    share_dir(root.path(), true).unwrap();
    let s = server_at(root, &["--allow-upload", "--min-free-mib", "8"]);
    let big = local("floor-big");
    make_file(&big, 12 << 20, 18).unwrap();
    let output = put(s.port, &big, "big.bin");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("code 3") && said.contains("not enough free space"), "tftp-hpa: {said}");
    assert!(names(s.root.path()).is_empty(), "nothing on disk: {:?}", names(s.root.path()));

    let fits = local("floor-fits");
    make_file(&fits, 4 << 20, 19).unwrap();
    assert!(put(s.port, &fits, "fits.bin").status.success());
    assert_same(&fits, &s.root.path().join("fits.bin"));
    drop(s);
    for path in [big, fits] {
        std::fs::remove_file(path).unwrap();
    }
}

/// `--max-transfers 2`: with two transfers in flight a third request gets ERROR 0 "server
/// busy" from the service port at once (no transfer port, no file opened); once one ends, a
/// new request is served.
#[test]
fn requests_beyond_max_transfers_get_server_busy() {
    let s = server(&["--max-transfers", "2"]);
    make_file(&s.root.path().join("busy.bin"), 50_000, 25).unwrap();
    let rrq = b"\x00\x01busy.bin\x00octet\x00";
    let mut held = Vec::new();
    for _ in 0..2 {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        socket.send_to(rrq, ("127.0.0.1", s.port)).unwrap();
        let mut buf = [0u8; 600];
        let (n, tid) = socket.recv_from(&mut buf).expect("DATA 1");
        assert_eq!(&buf[..4], b"\x00\x03\x00\x01", "{:?}", &buf[..n]);
        assert_ne!(tid.port(), s.port);
        held.push((socket, tid));
    }
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    socket.send_to(rrq, ("127.0.0.1", s.port)).unwrap();
    let mut buf = [0u8; 600];
    let (n, from) = socket.recv_from(&mut buf).expect("an answer to the third request");
    assert_eq!(from.port(), s.port, "refused from the service port: no transfer port opened");
    assert_eq!(&buf[..4], b"\x00\x05\x00\x00", "ERROR 0");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("server busy"));

    // The first transfer ends (the client aborts it): room again.
    let (first, tid) = &held[0];
    first.send_to(b"\x00\x05\x00\x00done\x00", tid).unwrap();
    let served = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        request(&s, rrq).is_some_and(|answer| answer.starts_with(b"\x00\x03\x00\x01"))
    });
    assert!(served, "a new request is served once a transfer ended");
}
