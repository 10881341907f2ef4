//! The mechanics of a correct blocking-query loop, from Consul's "Blocking Queries" implementation
//! notes: index bookkeeping (reset to 0 when the index goes backwards, never block on 0) and a
//! token-bucket rate limit.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// What a returned `X-Consul-Index` meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IndexEvent {
    Advanced,
    /// Lower than the last one (snapshot restore, server change): the loop restarts from 0.
    WentBackwards,
    /// 0 (a Consul bug on some versions): the next query waits on 1 so it still blocks.
    Zero,
}

/// The index to send on the next query.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IndexTracker {
    last: u64,
}

impl IndexTracker {
    /// The `index` parameter for the next query (0 = do not block).
    pub(crate) fn next(&self) -> u64 {
        self.last
    }

    pub(crate) fn observe(&mut self, returned: u64) -> IndexEvent {
        if returned < self.last {
            self.last = 0;
            IndexEvent::WentBackwards
        } else if returned == 0 {
            // "It is always safe to use an index of 1 to wait for updates."
            self.last = 1;
            IndexEvent::Zero
        } else {
            self.last = returned;
            IndexEvent::Advanced
        }
    }
}

/// A token bucket: `burst` queries back to back, then one per `interval`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    capacity: f64,
    tokens: f64,
    interval: Duration,
    refilled_at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            capacity: f64::from(limit.burst),
            tokens: f64::from(limit.burst),
            interval: limit.interval,
            refilled_at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        if self.interval.is_zero() {
            self.tokens = self.capacity;
        } else {
            let earned =
                now.duration_since(self.refilled_at).as_secs_f64() / self.interval.as_secs_f64();
            self.tokens = (self.tokens + earned).min(self.capacity);
        }
        self.refilled_at = now;
    }

    /// Takes a token, sleeping until one is available.
    pub(crate) async fn acquire(&mut self) {
        self.refill();
        if self.tokens < 1.0 {
            let missing = 1.0 - self.tokens;
            tokio::time::sleep(self.interval.mul_f64(missing)).await;
            self.refill();
        }
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_resets_follow_the_consul_docs() {
        let mut t = IndexTracker::default();
        assert_eq!(t.next(), 0, "the first query does not block");
        assert_eq!(t.observe(40), IndexEvent::Advanced);
        assert_eq!(t.next(), 40);
        assert_eq!(t.observe(7), IndexEvent::WentBackwards);
        assert_eq!(
            t.next(),
            0,
            "backwards: start over with a non-blocking read"
        );
        assert_eq!(t.observe(0), IndexEvent::Zero);
        assert_eq!(t.next(), 1, "never block on 0");
        assert_eq!(t.observe(9), IndexEvent::Advanced);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_one_per_interval() {
        let mut b = TokenBucket::new(RateLimit {
            burst: 2,
            interval: Duration::from_millis(100),
        });
        let start = Instant::now();
        b.acquire().await;
        b.acquire().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst does not wait");
        for _ in 0..10 {
            b.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(995) && took <= Duration::from_millis(1010),
            "{took:?}"
        );
    }
}
