//! What an unauthenticated request may make us hold and send (the reliability work:
//! an INVITE flood must not fill memory or turn us into a reflector).
//!
//! A new INVITE is admitted only while the calls that have not yet proved their return
//! path (no ACK received: a forged source address never ACKs) stay under a cap, the
//! total of calls stays under another, and its source address is within a token-bucket
//! rate. Otherwise it gets one stateless 503 with Retry-After — no transaction, no
//! retransmission, no call — so what a forger can make us send is bounded by its own
//! rate.

use std::{collections::HashMap, net::IpAddr, time::Duration, time::Instant};

/// Caps on calls and on what a source may start; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Incoming calls not yet confirmed by an ACK, at once.
    pub max_pending_incoming: usize,
    /// Calls in every state, at once.
    pub max_calls: usize,
    /// New INVITEs per second admitted from one source address (sustained).
    pub invites_per_source: u32,
    /// Burst of new INVITEs one source may send before the rate applies.
    pub invite_burst_per_source: u32,
    /// Largest message accepted on a stream connection, headers and body.
    pub max_message_bytes: usize,
    /// A message begun on a stream connection must be complete within this time (a
    /// sender dripping a request byte by byte is cut off).
    pub stream_message_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending_incoming: 64,
            max_calls: 1024,
            invites_per_source: 10,
            invite_burst_per_source: 20,
            max_message_bytes: 64 * 1024,
            stream_message_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of what admission refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AdmissionStats {
    /// New INVITEs refused: too many calls waiting for their ACK, or too many calls.
    pub refused_busy: u64,
    /// New INVITEs refused: their source exceeded its rate.
    pub refused_rate: u64,
    /// Stream connections the driver was told to drop: a message not complete in time.
    pub stream_timeouts: u64,
}

/// Sources tracked at once; past it, full buckets (which carry no information) go first.
const MAX_SOURCES: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Buckets {
    by_source: HashMap<IpAddr, (f64, Instant)>,
}

impl Buckets {
    /// Takes a token for `src`.
    pub fn allow(&mut self, now: Instant, src: IpAddr, rate: u32, burst: u32) -> bool {
        let (rate, burst) = (f64::from(rate), f64::from(burst.max(1)));
        if !self.by_source.contains_key(&src) && self.by_source.len() >= MAX_SOURCES {
            self.by_source.retain(|_, (t, last)| {
                *t + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
            if self.by_source.len() >= MAX_SOURCES
                && let Some(old) = self
                    .by_source
                    .iter()
                    .min_by_key(|(_, (_, l))| *l)
                    .map(|(a, _)| *a)
            {
                self.by_source.remove(&old);
            }
        }
        let (tokens, last) = self.by_source.entry(src).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rate_and_memory() {
        let mut b = Buckets::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..30).filter(|_| b.allow(t0, a, 10, 20)).count(), 20);
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!((0..30).filter(|_| b.allow(t1, a, 10, 20)).count(), 3);
        for i in 0..(MAX_SOURCES as u32 + 50) {
            b.allow(t0, IpAddr::from(std::net::Ipv4Addr::from(i)), 10, 20);
        }
        assert!(b.len() <= MAX_SOURCES);
    }
}
