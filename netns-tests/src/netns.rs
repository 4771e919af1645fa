//! Network namespaces and veth pairs, removed on drop.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::{Error, Result, io_error, run};

/// A network namespace created with `ip netns add`, deleted (with its interfaces) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `nsenter --net=` and `setns`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// An `ip -batch -` process in this namespace, started now, that runs commands later
    /// without a fork and exec of its own (see [`IpBatch`]).
    pub fn ip_batch(&self) -> Result<IpBatch> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error("cannot run ip -batch"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            unreachable!("both were asked for as pipes")
        };
        Ok(IpBatch { child, stdin, stdout: BufReader::new(stdout), namespace: self.name.clone() })
    }

    /// A command that runs `program` inside this namespace's network stack, keeping the host's
    /// mount namespace (and so bpffs).
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Runs `program args` in the namespace to completion and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = self
            .command(program)
            .args(args)
            .output()
            .map_err(io_error(format!("cannot run {program} in {}", self.name)))?;
        if !output.status.success() {
            return Err(Error::Command {
                command: format!("[{}] {program} {}", self.name, args.join(" ")),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `f` on a fresh thread that has joined this namespace (a namespace change only
    /// applies to the calling thread, so the test's own thread is never moved).
    pub fn enter<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path()).map_err(io_error(format!("open {}", self.path().display())))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io_error(format!("setns into {}", self.name))(
                            std::io::Error::last_os_error(),
                        ));
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The MAC address of an interface of this namespace.
    pub fn mac(&self, iface: &str) -> Result<String> {
        let brief = self.ip(&["-br", "link", "show", iface])?;
        brief.split_whitespace().nth(2).map(str::to_owned).ok_or_else(|| Error::Command {
            command: format!("ip -n {} -br link show {iface}", self.name),
            status: std::process::ExitStatus::default(),
            stderr: format!("no MAC address in {brief:?}"),
        })
    }

    /// Adds an address (CIDR notation) to an interface of this namespace.
    pub fn add_address(&self, iface: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", iface]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("netns-tests: cleanup of namespace {} failed: {error}", self.name);
        }
    }
}

/// One end of a veth pair.
#[derive(Clone, Debug)]
pub struct VethEnd {
    pub netns: String,
    pub iface: String,
}

/// Creates a veth pair `a_iface` (in `a`) <-> `b_iface` (in `b`), both up, with TX checksum
/// offload off: veth hands locally sent packets on with a partial checksum, and a frame that an
/// XDP program redirects loses that metadata, so the receiver would see bad UDP checksums.
/// The pair disappears with either namespace.
pub fn veth_pair(a: &Netns, a_iface: &str, b: &Netns, b_iface: &str) -> Result<(VethEnd, VethEnd)> {
    run(
        "ip",
        &[
            "link", "add", a_iface, "netns", a.name(), "type", "veth", "peer", "name", b_iface,
            "netns", b.name(),
        ],
    )?;
    for (netns, iface) in [(a, a_iface), (b, b_iface)] {
        netns.exec("ethtool", &["-K", iface, "tx", "off"])?;
        netns.ip(&["link", "set", iface, "up"])?;
    }
    Ok((
        VethEnd {
            netns: a.name().to_owned(),
            iface: a_iface.to_owned(),
        },
        VethEnd {
            netns: b.name().to_owned(),
            iface: b_iface.to_owned(),
        },
    ))
}

/// The MTU of every link and bridge of the topologies: the steering header adds 64 bytes to
/// each DATA a backend sends a client.
pub const LINK_MTU: &str = "1600";

/// Connects `host` to `bridge`: `iface` in the host, `port` on the bridge, with an address.
pub fn attach(net: &Netns, bridge: &str, host: &Netns, iface: &str, port: &str, address: &str) -> Result<()> {
    veth_pair(host, iface, net, port)?;
    for (ns, name) in [(host, iface), (net, port)] {
        ns.ip(&["link", "set", name, "mtu", LINK_MTU])?;
    }
    net.ip(&["link", "set", port, "master", bridge])?;
    host.add_address(iface, address)
}

/// Bridged frames skip the IP firewall hooks (`br_netfilter`) in the bridges' namespace: no
/// test filters there with iptables, and the hooks cost about a quarter of a steered packet's
/// CPU on this path. (nftables `bridge` tables, which the impairment helpers use, still apply.)
pub fn bridge_without_ip_hooks(net: &Netns) {
    for key in ["net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0"] {
        // Absent when br_netfilter is not loaded: nothing to switch off then.
        let _ = net.exec("sysctl", &["-q", "-w", key]);
    }
}

/// An `ip` process waiting for commands on its standard input, inside one namespace. Started
/// ahead of time for a failure a test injects at a planned moment: under load, starting `ip`
/// took tens of milliseconds, in which a fast transfer ran on by several percent of its file.
pub struct IpBatch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    namespace: String,
}

impl IpBatch {
    /// Runs one `ip` command (`link set eth0 down`) and returns once it is done.
    pub fn run(&mut self, command: &str) -> Result<()> {
        // `ip -batch` prints nothing for a `set`; the loopback's line after it says it is done.
        // Without `-force` it exits at the first failing command, which ends its output.
        let what = || format!("ip -n {} -batch: {command}", self.namespace);
        write!(self.stdin, "{command}\nlink show dev lo\n").and_then(|()| self.stdin.flush()).map_err(io_error(what()))?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).map_err(io_error(what()))? == 0 {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                let status = self.child.wait().map_err(io_error(what()))?;
                return Err(Error::Command { command: what(), status, stderr: stderr.trim().to_owned() });
            }
            if line.contains(": lo:") {
                return Ok(());
            }
        }
    }
}

impl Drop for IpBatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_batch_runs_each_command_when_asked_and_reports_a_failing_one() {
        crate::require_root();
        let ns = Netns::new(crate::RunPrefix::new().name("batch")).expect("a namespace");
        ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("a veth pair");
        ns.ip(&["link", "set", "d0", "up"]).expect("up");
        let mut batch = ns.ip_batch().expect("ip -batch");
        batch.run("link set d0 down").expect("down");
        let shown = ns.ip(&["-o", "link", "show", "d0"]).expect("show");
        assert!(!shown.contains(",UP"), "the link is down once run returns: {shown}");
        batch.run("link set d0 up").expect("the same process runs a second command");
        assert!(ns.ip(&["-o", "link", "show", "d0"]).expect("show").contains(",UP"));
        let error = batch.run("link set nosuch down").expect_err("no such device");
        assert!(error.to_string().contains("nosuch"), "{error}");
    }
}
