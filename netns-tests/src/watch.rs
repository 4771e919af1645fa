//! Watching a download grow: samples of a file's size over time, to measure stalls.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The (time, size) samples at which a file grew.
type Samples = Arc<Mutex<Vec<(Instant, u64)>>>;

/// Polls a file's size every 2 ms on a thread until dropped or stopped; the samples so far can
/// be read while it runs.
pub struct Growth {
    samples: Samples,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Growth {
    #[must_use]
    pub fn watch(path: PathBuf) -> Self {
        Self::watch_with(move || std::fs::metadata(&path).map_or(0, |m| m.len()))
    }

    /// Polls `size` instead of one file's size (e.g. the bytes an upload has in a temporary
    /// file whose name the server chose).
    #[must_use]
    pub fn watch_with(size: impl Fn() -> u64 + Send + 'static) -> Self {
        let samples: Samples = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (out, flag) = (Arc::clone(&samples), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            // The clients, servers and agents keep every CPU busy: at normal priority the
            // watcher was late by more than a failure's whole stall.
            crate::process::raise_thread_priority(-10);
            let mut last = None;
            while !flag.load(Ordering::Relaxed) {
                // Growth only: a file removed (size 0) after the download is no new data.
                let size = size();
                if last.is_none_or(|last| size > last) {
                    last = Some(size);
                    out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((Instant::now(), size));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self { samples, stop, thread: Some(thread) }
    }

    /// The samples so far.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(Instant, u64)> {
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The size last seen (0 before the first look).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last().map_or(0, |s| s.1)
    }

    /// Stops watching and returns the (time, size) samples at which the file grew.
    #[must_use]
    pub fn stop(mut self) -> Vec<(Instant, u64)> {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Growth {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The longest time the file did not grow after `since` (and before its last growth): the stall
/// a failure at `since` caused.
#[must_use]
pub fn stall_after(samples: &[(Instant, u64)], since: Instant) -> Duration {
    let last = samples.last().map_or(since, |s| s.0);
    stall_until(samples, since, last).0
}

/// The longest time without growth from `since` until `end` (the next failure, or now), and
/// when data came back after it (`None`: not before `end`).
#[must_use]
pub fn stall_until(samples: &[(Instant, u64)], since: Instant, end: Instant) -> (Duration, Option<Instant>) {
    let mut previous = since;
    let mut longest = (Duration::ZERO, None);
    for &(at, _) in samples.iter().filter(|(at, _)| *at > since) {
        if at >= end {
            break;
        }
        if at - previous > longest.0 {
            longest = (at - previous, Some(at));
        }
        previous = at;
    }
    if end.saturating_duration_since(previous) > longest.0 {
        longest = (end.saturating_duration_since(previous), None);
    }
    longest
}

/// Waits until the file has at least `bytes`, or `timeout` passes; false on timeout.
#[must_use]
pub fn wait_for_size(path: &std::path::Path, bytes: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::metadata(path).is_ok_and(|m| m.len() >= bytes) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
