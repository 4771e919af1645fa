//! Watching a download grow: samples of a file's size over time, to measure stalls.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Polls a file's size every 2 ms on a thread until dropped or stopped.
pub struct Growth {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, u64)>>>,
}

impl Growth {
    #[must_use]
    pub fn watch(path: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples: Vec<(Instant, u64)> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                // Growth only: a file removed (size 0) after the download is no new data.
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                if samples.last().is_none_or(|&(_, last)| size > last) {
                    samples.push((Instant::now(), size));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops watching and returns the (time, size) samples at which the file grew.
    #[must_use]
    pub fn stop(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Growth {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The longest time the file did not grow after `since` (and before its last growth): the stall
/// a failure at `since` caused.
#[must_use]
pub fn stall_after(samples: &[(Instant, u64)], since: Instant) -> Duration {
    let mut previous = since;
    let mut longest = Duration::ZERO;
    for &(at, _) in samples.iter().filter(|(at, _)| *at > since) {
        longest = longest.max(at - previous);
        previous = at;
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
