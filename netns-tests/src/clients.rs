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
        let port = port.to_string();
        let local_str = local.display().to_string();
        match self {
            Self::TftpHpa => {
                let mut c = ns.command("tftp");
                c.args(["-m", "binary", server, &port, "-c", "get", remote, &local_str]);
                c
            }
            Self::Atftp { blksize, windowsize } => {
                let mut c = ns.command("atftp");
                c.args(["--option", &format!("blksize {blksize}"), "--option", &format!("windowsize {windowsize}")]);
                c.args(["-g", "-r", remote, "-l", &local_str, server, &port]);
                c
            }
            Self::Curl { blksize } => {
                let mut c = ns.command("curl");
                c.args(["-sS", "--fail", "--tftp-blksize", &blksize.to_string(), "-o", &local_str]);
                c.arg(format!("tftp://{server}:{port}/{remote}"));
                c
            }
            Self::Busybox { blksize } => {
                let mut c = ns.command("busybox");
                c.args(["tftp", "-g", "-r", remote, "-l", &local_str, "-b", &blksize.to_string(), server, &port]);
                c
            }
        }
    }
}
