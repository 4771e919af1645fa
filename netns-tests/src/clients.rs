//! The stock Debian TFTP clients the integration tests and the demo drive.

use std::{path::Path, process::Command};

use crate::Netns;

/// A TFTP client program and the options it is run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// tftp-hpa: lock-step, 512-byte blocks (it negotiates no options).
    TftpHpa,
    /// atftp with blksize and windowsize (RFC 7440).
    Atftp { blksize: u16, windowsize: u16 },
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

/// Waits up to `timeout` for a download, then checks that the client succeeded and that the
/// file equals `source` (SHA-256), and removes it. Failure messages name the transfer (`what`)
/// and add `context()` (agent logs, counters).
pub fn expect_download(
    mut download: crate::Process,
    local: &Path,
    source: &Path,
    timeout: std::time::Duration,
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
