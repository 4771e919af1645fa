//! The stock Debian TFTP clients the integration tests and the demo drive.

use std::{
    net::UdpSocket,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{Error, Netns, Result, io_error};

/// A TFTP client program and the options it is run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// tftp-hpa: lock-step, 512-byte blocks (it negotiates no options).
    TftpHpa,
    /// atftp with blksize and windowsize (RFC 7440).
    Atftp { blksize: u16, windowsize: u16 },
    /// atftp asking for blksize only, as most boot firmware does: lock-step, and no `timeout`
    /// option (curl sends `timeout 6`, which servers honour by retransmitting after 6 s).
    AtftpLockStep { blksize: u16 },
    /// curl's tftp:// with --tftp-blksize.
    Curl { blksize: u16 },
    /// busybox tftp with -b.
    Busybox { blksize: u16 },
}

impl Client {
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::TftpHpa => "tftp-hpa".into(),
            Self::Atftp { blksize, windowsize } => format!("atftp blksize {blksize} windowsize {windowsize}"),
            Self::AtftpLockStep { blksize } => format!("atftp blksize {blksize}"),
            Self::Curl { blksize } => format!("curl blksize {blksize}"),
            Self::Busybox { blksize } => format!("busybox blksize {blksize}"),
        }
    }

    /// A command that downloads `remote` from `server:port` into `local`, run in `ns`.
    #[must_use]
    pub fn download(self, ns: &Netns, server: &str, port: u16, remote: &str, local: &Path) -> Command {
        let (program, args) = self.download_args(server, port, remote, local);
        let mut command = ns.command(program);
        command.args(args);
        command
    }

    /// The same download, run in the caller's own network namespace (loopback tests).
    #[must_use]
    pub fn download_here(self, server: &str, port: u16, remote: &str, local: &Path) -> Command {
        let (program, args) = self.download_args(server, port, remote, local);
        let mut command = Command::new(program);
        command.args(args);
        command
    }

    /// A command that uploads `local` as `remote` to `server:port`, run in `ns`. tftp-hpa gets
    /// `-v` (its log then says what it sent); the others negotiate as for downloads.
    #[must_use]
    pub fn upload(self, ns: &Netns, server: &str, port: u16, local: &Path, remote: &str) -> Command {
        let (program, args) = self.upload_args(server, port, local, remote);
        let mut command = ns.command(program);
        command.args(args);
        command
    }

    fn upload_args(self, server: &str, port: u16, local: &Path, remote: &str) -> (&'static str, Vec<String>) {
        let (port, local) = (port.to_string(), local.display().to_string());
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Self::TftpHpa => ("tftp", strings(&["-v", "-m", "binary", server, &port, "-c", "put", &local, remote])),
            Self::Atftp { blksize, windowsize } => (
                "atftp",
                strings(&[
                    "--option", &format!("blksize {blksize}"), "--option", &format!("windowsize {windowsize}"),
                    "-p", "-l", &local, "-r", remote, server, &port,
                ]),
            ),
            Self::AtftpLockStep { blksize } => {
                ("atftp", strings(&["--option", &format!("blksize {blksize}"), "-p", "-l", &local, "-r", remote, server, &port]))
            }
            Self::Curl { blksize } => (
                "curl",
                strings(&["-sS", "--fail", "--tftp-blksize", &blksize.to_string(), "-T", &local, &format!("tftp://{server}:{port}/{remote}")]),
            ),
            Self::Busybox { blksize } => (
                "busybox",
                strings(&["tftp", "-p", "-l", &local, "-r", remote, "-b", &blksize.to_string(), server, &port]),
            ),
        }
    }

    fn download_args(self, server: &str, port: u16, remote: &str, local: &Path) -> (&'static str, Vec<String>) {
        let (port, local) = (port.to_string(), local.display().to_string());
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Self::TftpHpa => ("tftp", strings(&["-m", "binary", server, &port, "-c", "get", remote, &local])),
            Self::Atftp { blksize, windowsize } => (
                "atftp",
                strings(&[
                    "--option", &format!("blksize {blksize}"), "--option", &format!("windowsize {windowsize}"),
                    "-g", "-r", remote, "-l", &local, server, &port,
                ]),
            ),
            Self::AtftpLockStep { blksize } => {
                ("atftp", strings(&["--option", &format!("blksize {blksize}"), "-g", "-r", remote, "-l", &local, server, &port]))
            }
            Self::Curl { blksize } => (
                "curl",
                strings(&["-sS", "--fail", "--tftp-blksize", &blksize.to_string(), "-o", &local, &format!("tftp://{server}:{port}/{remote}")]),
            ),
            Self::Busybox { blksize } => (
                "busybox",
                strings(&["tftp", "-g", "-r", remote, "-l", &local, "-b", &blksize.to_string(), server, &port]),
            ),
        }
    }
}

/// How a client's transfer ended, read from its exit status and its log: the four clients
/// report a server's ERROR each in its own way (tftp-hpa even exits 0 after one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Done,
    /// The server sent an ERROR: its code where the client tells it, and what the client said.
    ServerError { code: Option<u16>, message: String },
    /// The client failed otherwise (a timeout, a signal).
    Failed(String),
}

impl Client {
    /// How a transfer of this client ended, from its `status` and its `log`.
    #[must_use]
    pub fn ending(self, status: std::process::ExitStatus, log: &str) -> Ending {
        let line = |marker: &str| log.lines().find(|l| l.contains(marker)).map(|l| l.trim().to_owned());
        let error = match self {
            // "Error code 3: not enough free space on this server", exit status 0.
            Self::TftpHpa => line("Error code ").map(|l| (l.split_once("Error code ").and_then(|(_, rest)| rest.split(':').next()?.trim().parse().ok()), l)),
            // "tftp: server error: (3) ...", exit status 1.
            Self::Busybox { .. } => line("server error: (").map(|l| (l.split_once("server error: (").and_then(|(_, rest)| rest.split(')').next()?.parse().ok()), l)),
            // "tftp: error received from server <...>": no code.
            Self::Atftp { .. } | Self::AtftpLockStep { .. } => line("error received from server").map(|l| (None, l)),
            // Only its exit status tells the code (curl's tftp.c maps each to a CURLE_*).
            // 71 is both "not defined" (0) and "illegal operation" (4) there.
            Self::Curl { .. } => match status.code() {
                Some(71) => Some((None, line("curl: (").unwrap_or_default())),
                code => code.and_then(curl_tftp_error).map(|code| (Some(code), line("curl: (").unwrap_or_default())),
            },
        };
        match error {
            Some((code, message)) => Ending::ServerError { code, message },
            None if status.success() => Ending::Done,
            None => Ending::Failed(format!("{status}: {}", log.lines().last().unwrap_or_default().trim())),
        }
    }
}

/// The TFTP error code behind curl's exit status, if it is one curl maps one-to-one.
fn curl_tftp_error(exit: i32) -> Option<u16> {
    match exit {
        68 => Some(1),
        69 => Some(2),
        70 => Some(3),
        72 => Some(5),
        73 => Some(6),
        74 => Some(7),
        _ => None,
    }
}

/// Waits up to `timeout` for a download, then checks that the client succeeded and that the
/// file equals `source` (SHA-256), and removes it. Failure messages name the transfer (`what`)
/// and add `context()` (agent logs, counters).
pub fn expect_download(
    mut download: crate::Process,
    local: &Path,
    source: &Path,
    timeout: Duration,
    what: &str,
    context: impl Fn() -> String,
) {
    let Some(status) = download.wait(timeout) else {
        panic!("{what}: not done after {timeout:?}\n{}", context());
    };
    assert!(status.success(), "{what}: client failed ({status}):\n{}\n{}", download.log(), context());
    let (got, want) = (crate::files::sha256(local), crate::files::sha256(source));
    assert!(got.is_ok() && got.as_ref().ok() == want.as_ref().ok(), "{what}: downloaded file differs ({got:?} vs {want:?})");
    let _ = std::fs::remove_file(local);
}

/// Requests `file` (octet, with `options` as name/value pairs) from `server:port` over
/// `sockets` client ports at once, resending each request every second until it is answered,
/// and ends each transfer at its first answer with an ERROR (RFC 2347 lets a client decline an
/// OACK that way). Returns the first answers, one per socket. What it is for: making a
/// backend hash a file (its digest is cached from then on) without moving the file, and
/// seeing what a server answers first. Runs in the caller's network namespace.
pub fn first_answers(server: &str, port: u16, file: &str, options: &[(&str, &str)], sockets: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
    let mut rrq = vec![0, 1];
    for field in [file, "octet"].into_iter().chain(options.iter().flat_map(|(name, value)| [*name, *value])) {
        rrq.extend_from_slice(field.as_bytes());
        rrq.push(0);
    }
    let abort = [&[0u8, 5, 0, 0][..], b"first answer taken\0"].concat();
    let sockets = (0..sockets)
        .map(|_| {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io_error("client sockets"))?;
    let mut sent: Vec<Option<Instant>> = vec![None; sockets.len()];
    let mut answers: Vec<Option<Vec<u8>>> = vec![None; sockets.len()];
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    while answers.contains(&None) {
        if started.elapsed() > timeout {
            return Err(Error::Timeout { what: format!("an answer to a request for {file} from {server}:{port}"), seconds: timeout.as_secs() });
        }
        for ((socket, sent), answer) in sockets.iter().zip(&mut sent).zip(&mut answers) {
            if answer.is_some() {
                continue;
            }
            if sent.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                socket.send_to(&rrq, (server, port)).map_err(io_error(format!("request to {server}:{port}")))?;
                *sent = Some(Instant::now());
            }
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                if n >= 2 && buf[1] != 5 {
                    let _ = socket.send_to(&abort, from);
                }
                *answer = Some(buf[..n].to_vec());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(answers.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn exit(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn each_client_tells_a_server_error_its_own_way() {
        let hpa = "putting /tmp/a to 10.77.9.100:w.bin [octet]\nError code 3: not enough free space on this server\nSent 512 bytes\n";
        assert_eq!(Client::TftpHpa.ending(exit(0), hpa), Ending::ServerError { code: Some(3), message: "Error code 3: not enough free space on this server".into() });
        let busybox = "tftp: server error: (6) file already exists\n";
        assert_eq!(Client::Busybox { blksize: 512 }.ending(exit(1), busybox), Ending::ServerError { code: Some(6), message: busybox.trim().into() });
        let atftp = "Option blksize = 1428\ntftp: error received from server <file already exists>\ntftp: aborting\n";
        assert_eq!(
            Client::Atftp { blksize: 1428, windowsize: 16 }.ending(exit(255), atftp),
            Ending::ServerError { code: None, message: "tftp: error received from server <file already exists>".into() }
        );
        assert_eq!(Client::Curl { blksize: 1428 }.ending(exit(70), "curl: (70) whatever\n"), Ending::ServerError { code: Some(3), message: "curl: (70) whatever".into() });
        assert_eq!(Client::Curl { blksize: 1428 }.ending(exit(71), ""), Ending::ServerError { code: None, message: String::new() });
    }

    #[test]
    fn a_clean_exit_is_done_and_another_failure_is_no_server_error() {
        assert_eq!(Client::TftpHpa.ending(exit(0), "Sent 2097152 bytes in 0.3 seconds\n"), Ending::Done);
        assert_eq!(Client::Curl { blksize: 1428 }.ending(exit(0), ""), Ending::Done);
        assert!(matches!(Client::Curl { blksize: 1428 }.ending(exit(28), "curl: (28) timeout\n"), Ending::Failed(_)));
        assert!(matches!(Client::Atftp { blksize: 1428, windowsize: 16 }.ending(exit(255), "tftp: timeout\n"), Ending::Failed(_)));
    }
}
