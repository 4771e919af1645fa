//! A timer with microsecond precision for the event loops: a timerfd (CLOCK_MONOTONIC)
//! registered with tokio. tokio's own timers fire on millisecond ticks, so a retransmission
//! due 1.1 ms after a block waited up to 2 ms, and on a LAN a lost block costs about what its
//! timer waits (`rto.rs`).

use std::{io, os::fd::OwnedFd, time::Duration};

use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, timerfd_create, timerfd_settime};
use tokio::io::{Interest, unix::AsyncFd};

pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
}

impl Alarm {
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // SAFETY: the alarm owns the timerfd, which stays open and the same until the
        // `AsyncFd` that owns it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self { fd })
    }

    /// Rings `after` from now (replacing the previous setting); `None` disarms.
    pub fn set(&self, after: Option<Duration>) -> io::Result<()> {
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        let value = match after {
            // A zero value would disarm: ring as soon as possible instead.
            Some(after) => rustix::time::Timespec::try_from(after.max(Duration::from_nanos(1))).map_err(|_| io::Error::other("timer too far away"))?,
            None => zero,
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &Itimerspec { it_interval: zero, it_value: value })?;
        Ok(())
    }

    /// Waits until the alarm rings (forever if it is not set).
    pub async fn rung(&self) -> io::Result<()> {
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
    fn rings_after_the_wait_with_sub_millisecond_precision_and_can_be_moved() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let alarm = Alarm::new().unwrap();
            let started = Instant::now();
            alarm.set(Some(Duration::from_micros(300))).unwrap();
            alarm.rung().await.unwrap();
            let took = started.elapsed();
            assert!(took >= Duration::from_micros(300), "{took:?}");
            alarm.set(Some(Duration::from_secs(60))).unwrap();
            alarm.set(Some(Duration::from_micros(100))).unwrap();
            tokio::time::timeout(Duration::from_secs(5), alarm.rung()).await.expect("the later setting replaced the first").unwrap();
            alarm.set(None).unwrap();
            assert!(tokio::time::timeout(Duration::from_millis(50), alarm.rung()).await.is_err(), "disarmed");
        });
    }
}
