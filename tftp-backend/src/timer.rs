//! Retransmission timers: a queue ordered by deadline, with O(1) cancel (the entry is
//! forgotten in a map and skipped lazily when it reaches the top of the heap).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    hash::Hash,
    time::Instant,
};

pub struct TimerQueue<K> {
    heap: BinaryHeap<Reverse<(Instant, u64, K)>>,
    /// The generation of each key's live timer; heap entries with another are stale.
    live: HashMap<K, u64>,
    next: u64,
}

impl<K: Hash + Eq + Ord + Clone> TimerQueue<K> {
    #[must_use]
    pub fn new() -> Self {
        Self { heap: BinaryHeap::new(), live: HashMap::new(), next: 0 }
    }

    /// (Re)arms `key` to fire at `at`, replacing its previous timer.
    pub fn schedule(&mut self, key: K, at: Instant) {
        self.next += 1;
        self.live.insert(key.clone(), self.next);
        self.heap.push(Reverse((at, self.next, key)));
        // Bound the heap: cancelled entries are dropped when they outnumber live ones.
        if self.heap.len() > 64 && self.heap.len() > 4 * self.live.len() {
            let live = &self.live;
            self.heap.retain(|Reverse((_, generation, key))| live.get(key) == Some(generation));
        }
    }

    /// Disarms `key` in O(1).
    pub fn cancel(&mut self, key: &K) {
        self.live.remove(key);
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns a key whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Option<K> {
        self.drop_stale();
        let Reverse((at, _, _)) = self.heap.peek()?;
        if *at > now {
            return None;
        }
        let Reverse((_, _, key)) = self.heap.pop()?;
        self.live.remove(&key);
        Some(key)
    }

    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.live.len()
    }

    #[cfg(test)]
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn drop_stale(&mut self) {
        while let Some(Reverse((_, generation, key))) = self.heap.peek() {
            if self.live.get(key) == Some(generation) {
                break;
            }
            self.heap.pop();
        }
    }
}

impl<K: Hash + Eq + Ord + Clone> Default for TimerQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::TimerQueue;

    #[test]
    fn fires_in_deadline_order_and_skips_cancelled_and_rearmed() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = TimerQueue::new();
        q.schedule("c", at(30));
        q.schedule("a", at(10));
        q.schedule("b", at(20));
        q.cancel(&"b");
        q.schedule("a", at(40)); // re-armed: the 10 ms entry is stale
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_deadline(), Some(at(30)));
        assert_eq!(q.pop_expired(at(25)), None);
        assert_eq!(q.pop_expired(at(35)), Some("c"));
        assert_eq!(q.pop_expired(at(100)), Some("a"));
        assert_eq!(q.pop_expired(at(100)), None);
        assert!(q.is_empty());
    }

    #[test]
    fn cancelled_entries_do_not_accumulate() {
        let mut q = TimerQueue::new();
        let t = std::time::Instant::now();
        for i in 0..10_000u32 {
            q.schedule(i % 10, t);
        }
        assert!(q.heap.len() <= 64 || q.heap.len() <= 4 * q.live.len() + 1);
        assert_eq!(q.len(), 10);
    }
}
