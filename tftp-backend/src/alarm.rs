//! A timer with microsecond precision for the event loops: a timerfd (CLOCK_MONOTONIC)
//! registered with tokio. tokio's own timers fire on millisecond ticks, so a retransmission
//! due 1.1 ms after a block waited up to 2 ms, and on a LAN a lost block costs about what its
//! timer waits (`rto.rs`).

use std::{
    io,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, timerfd_create, timerfd_settime};
use tokio::io::{Interest, unix::AsyncFd};

pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
    /// When the timerfd is set to ring, if it is: `until` sets it again only for an earlier
    /// deadline. Lock-step, every block moves the deadline a little later; the alarm then
    /// rings early once per timeout and is set again, instead of a system call per block
    /// (which cost lock-step transfers a fifth of their goodput).
    armed: Option<Instant>,
}

impl Alarm {
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // SAFETY: the alarm owns the timerfd, which stays open and the same until the
        // `AsyncFd` that owns it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self { fd, armed: None })
    }

    /// Returns at `deadline` (at once if it has passed).
    pub async fn until(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            if self.armed.is_none_or(|at| at > deadline) {
                self.set(deadline - now)?;
                self.armed = Some(deadline);
            }
            self.rung().await?;
            self.armed = None;
        }
    }

    /// Rings `after` from now, replacing the previous setting.
    fn set(&self, after: Duration) -> io::Result<()> {
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        // A zero value would disarm: ring as soon as possible instead.
        let value = rustix::time::Timespec::try_from(after.max(Duration::from_nanos(1))).map_err(|_| io::Error::other("timer too far away"))?;
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &Itimerspec { it_interval: zero, it_value: value })?;
        Ok(())
    }

    /// Waits until the timerfd rings (forever if it is not set).
    async fn rung(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| rustix::io::read(fd.get_ref(), &mut expirations).map_err(io::Error::from)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) => return Err(error),
                // Not readable after all (set again meanwhile): wait on.
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Alarm;

    #[test]
    fn returns_at_the_deadline_with_sub_millisecond_precision_however_it_was_set_before() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut alarm = Alarm::new().unwrap();
            let started = Instant::now();
            alarm.until(started + Duration::from_micros(300)).await.unwrap();
            let took = started.elapsed();
            assert!(took >= Duration::from_micros(300) && took < Duration::from_millis(50), "{took:?}");
            // Set for a minute, abandoned (a datagram came first), then an earlier deadline.
            let _ = tokio::time::timeout(Duration::from_millis(1), alarm.until(Instant::now() + Duration::from_secs(60))).await;
            let soon = Instant::now() + Duration::from_micros(200);
            tokio::time::timeout(Duration::from_secs(5), alarm.until(soon)).await.expect("the earlier deadline counts").unwrap();
            assert!(Instant::now() >= soon);
            // Set early, abandoned, then a later deadline: it rings early and waits on.
            let _ = tokio::time::timeout(Duration::from_micros(50), alarm.until(Instant::now() + Duration::from_micros(100))).await;
            let later = Instant::now() + Duration::from_millis(5);
            alarm.until(later).await.unwrap();
            assert!(Instant::now() >= later, "not before the later deadline");
        });
    }
}
