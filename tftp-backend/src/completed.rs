//! Downloads this backend finished (the client acknowledged the last block), remembered for a
//! while. A balancer may still hold such a session (its peer mirrored it, or the FINISHED
//! notice was lost with a failed balancer) and nudge it after a failover; resuming it from the
//! header would send a window to a client that has left, again at every timeout. A late ACK or
//! nudge for a remembered download gets a FINISHED notice instead, which also makes the
//! balancer forget the session.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, Instant},
};

/// How long a finished download is remembered: longer than any client's retransmission
/// timeout (RFC 2349 allows 255 s, clients use 1 to 5 s) and any balancer failover.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);
/// Most downloads remembered; the oldest is forgotten first. About 40 bytes each.
pub const CAPACITY: usize = 1 << 16;

/// Keys of finished downloads, with when they finished; bounded in time and in count.
pub struct Completed<K> {
    /// In order of completion; an entry whose time differs from `at[key]` was superseded.
    order: VecDeque<(Instant, K)>,
    at: HashMap<K, Instant>,
    remember_for: Duration,
    capacity: usize,
}

impl<K: Copy + Eq + Hash> Completed<K> {
    #[must_use]
    pub fn new(remember_for: Duration, capacity: usize) -> Self {
        Self { order: VecDeque::new(), at: HashMap::new(), remember_for, capacity: capacity.max(1) }
    }

    /// Takes note that the download `key` finished at `now`.
    pub fn remember(&mut self, key: K, now: Instant) {
        self.expire(now);
        while self.at.len() >= self.capacity {
            self.pop_oldest();
        }
        self.at.insert(key, now);
        self.order.push_back((now, key));
    }

    /// Whether `key` finished less than `remember_for` before `now`.
    pub fn contains(&self, key: &K, now: Instant) -> bool {
        self.at.get(key).is_some_and(|&at| now.duration_since(at) < self.remember_for)
    }

    /// A new transfer under the same key: the old one's end no longer applies.
    pub fn forget(&mut self, key: &K) {
        self.at.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.at.len()
    }

    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|&(at, _)| now.duration_since(at) >= self.remember_for) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((at, key)) = self.order.pop_front()
            && self.at.get(&key) == Some(&at)
        {
            self.at.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_the_time_is_up() {
        let start = Instant::now();
        let mut completed = Completed::new(Duration::from_secs(60), 16);
        completed.remember(1, start);
        assert!(completed.contains(&1, start + Duration::from_secs(59)));
        assert!(!completed.contains(&1, start + Duration::from_secs(60)));
        assert!(!completed.contains(&2, start));
        // A later insertion drops what expired.
        completed.remember(2, start + Duration::from_secs(61));
        assert_eq!(completed.len(), 1);
    }

    #[test]
    fn the_oldest_goes_first_when_full() {
        let start = Instant::now();
        let mut completed = Completed::new(Duration::from_secs(60), 3);
        for key in 0..5u32 {
            completed.remember(key, start + Duration::from_millis(u64::from(key)));
        }
        assert_eq!(completed.len(), 3);
        let now = start + Duration::from_millis(10);
        assert!(!completed.contains(&0, now) && !completed.contains(&1, now));
        assert!((2..5).all(|key| completed.contains(&key, now)));
    }

    #[test]
    fn a_new_transfer_under_the_same_key_is_not_finished() {
        let start = Instant::now();
        let mut completed = Completed::new(Duration::from_secs(60), 4);
        completed.remember(7, start);
        completed.forget(&7);
        assert!(!completed.contains(&7, start));
        // Finished again later: when the first end expires, the second one stays.
        completed.remember(7, start + Duration::from_secs(30));
        completed.remember(8, start + Duration::from_secs(61));
        assert!(completed.contains(&7, start + Duration::from_secs(61)));
        assert_eq!(completed.len(), 2);
    }
}
