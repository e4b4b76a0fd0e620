//! Token buckets for R1 answers (RFC 7401 §6.7: "An R1 packet sender MUST have a
//! mechanism to rate-limit R1 packets sent to an address"), keyed by address, by
//! initiator HIT (the lane for peers we expect), or by nothing (a global budget).
//!
//! Bounded memory: at most [`MAX_ADDRESSES`] buckets; when full, buckets that have
//! refilled completely (and so carry no information) are dropped first, then the oldest.

use std::{collections::HashMap, hash::Hash, time::Instant};

/// Addresses tracked at once.
pub(super) const MAX_ADDRESSES: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub(super) struct Limiter<K> {
    buckets: HashMap<K, Bucket>,
}

impl<K> Default for Limiter<K> {
    fn default() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    /// Takes one token for `addr`; `false` when its bucket is empty.
    pub fn allow(&mut self, now: Instant, addr: K, rate: u32, burst: u32) -> bool {
        let (rate, burst) = (rate as f64, burst.max(1) as f64);
        if !self.buckets.contains_key(&addr) && self.buckets.len() >= MAX_ADDRESSES {
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_ADDRESSES
                && let Some(oldest) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, b)| b.last)
                    .map(|(a, _)| *a)
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self.buckets.entry(addr).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::IpAddr, time::Duration};

    #[test]
    fn burst_then_rate_per_address() {
        let mut l = Limiter::<IpAddr>::default();
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        let n = (0..30).filter(|_| l.allow(t0, a, 10, 20)).count();
        assert_eq!(n, 20, "the burst");
        assert!(l.allow(t0, b, 10, 20), "other addresses are not affected");
        // 10 per second afterwards.
        let t1 = t0 + Duration::from_millis(500);
        let n = (0..30).filter(|_| l.allow(t1, a, 10, 20)).count();
        assert_eq!(n, 5);
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = Limiter::<IpAddr>::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            let a = IpAddr::from(std::net::Ipv4Addr::from(i));
            l.allow(t0, a, 10, 20);
        }
        assert!(l.buckets.len() <= MAX_ADDRESSES);
    }
}
