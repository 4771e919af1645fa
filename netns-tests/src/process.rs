//! Processes started by a test, stopped by PID on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{Result, io_error};

/// A child process whose stdout and stderr go to a log file. Dropping it stops the process
/// (SIGTERM, then SIGKILL after 5 s); if the test is failing, the log is printed.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

/// How long an agent may take to load and attach its program.
pub(crate) const AGENT_START: std::time::Duration = std::time::Duration::from_secs(20);

impl Process {
    /// Spawns `command`, logging to `<tmp>/<name>.log`.
    pub fn spawn(name: impl Into<String>, mut command: Command) -> Result<Self> {
        let name = name.into();
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(io_error(format!("create {}", log.display())))?;
        let stderr = file.try_clone().map_err(io_error("dup log file"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(io_error(format!("cannot start {name}: {command:?}")))?;
        Ok(Self {
            name,
            child,
            log,
            exit: None,
        })
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's output so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `line`, or the process exits, or `timeout` passes;
    /// whether the line appeared.
    pub fn wait_for_output(&mut self, line: &str, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.log().contains(line) {
                return true;
            }
            if !self.is_running() || std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// SIGKILL, as a crash would: no cleanup runs in the process.
    pub fn kill_hard(&mut self) -> Option<ExitStatus> {
        self.sigkill();
        self.wait(Duration::from_secs(5))
    }

    /// SIGSTOP: the process stays, but runs no more until [`Process::resume`] (an agent that
    /// cannot run, as on an overloaded machine).
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, without waiting for the exit (a failure with more to it than the kill).
    pub fn sigkill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait(Duration::from_secs(5)) {
            return Some(status);
        }
        self.kill_hard()
    }

    fn signal(&mut self, signal: libc::c_int) {
        if !self.is_running() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill on the PID of our own child that has not been reaped yet.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        // Short looks first: a killed process is gone within a millisecond or two, and callers
        // time what follows a kill from the moment this returns.
        let mut pause = Duration::from_millis(1);
        while self.is_running() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        self.exit
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- log of {} ({}) ----\n{}", self.name, self.log.display(), self.log());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The backends' `RUST_LOG`: `info`, or `$NETNS_TESTS_BACKEND_LOG` (`debug` shows every
/// backend decision when chasing a failure).
#[must_use]
pub fn backend_log_filter() -> String {
    std::env::var("NETNS_TESTS_BACKEND_LOG").unwrap_or_else(|_| "info".into())
}

/// Sets the calling thread's nice value (negative: ahead of the clients and servers it
/// watches); reports and goes on when it cannot.
pub fn raise_thread_priority(nice: libc::c_int) {
    // SAFETY: gettid and setpriority on this thread's own id have no memory effects.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid().cast_unsigned(), nice) } == 0;
    if !done {
        eprintln!("(cannot set a watcher's priority to {nice}: {})", std::io::Error::last_os_error());
    }
}
