//! A deadline queue for the core's timers: set/clear by key, fire what is due.
//!
//! Clearing is lazy: a cleared or re-armed entry stays in the ordered set and is skipped when
//! it comes up, so set and clear are O(log n) and the earliest deadline is O(1).

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    time::Instant,
};

#[derive(Debug)]
pub(crate) struct TimerQueue<K: Hash + Eq + Clone> {
    armed: HashMap<K, (Instant, u64)>,
    order: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K: Hash + Eq + Clone> TimerQueue<K> {
    pub(crate) fn new() -> Self {
        Self {
            armed: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }

    pub(crate) fn set(&mut self, key: K, at: Instant) {
        self.seq += 1;
        if let Some(old) = self.armed.insert(key.clone(), (at, self.seq)) {
            self.order.remove(&old);
        }
        self.order.insert((at, self.seq), key);
    }

    pub(crate) fn clear(&mut self, key: &K) {
        if let Some(old) = self.armed.remove(key) {
            self.order.remove(&old);
        }
    }

    /// When `key` fires, if armed.
    pub(crate) fn deadline(&self, key: &K) -> Option<Instant> {
        self.armed.get(key).map(|(t, _)| *t)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.order.keys().next().map(|(t, _)| *t)
    }

    /// Removes and returns one due timer, earliest first.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (&(at, seq), _) = self.order.iter().next()?;
        if at > now {
            return None;
        }
        let key = self.order.remove(&(at, seq))?;
        self.armed.remove(&key);
        Some(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.armed.len()
    }
}
