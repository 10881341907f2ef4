//! Local rate limits, enforced by the destination's proxy on its inbound side: a token bucket
//! (GCRA, `governor`) for the whole instance or one per caller identity.
//!
//! Per-caller buckets are swept: once [`MAX_TRACKED_CALLERS`] are tracked, the buckets that are
//! full again (their callers went quiet, so dropping one changes nothing) are dropped. Callers
//! are identities (ServiceAccounts), so the live set stays small.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// Tracked per-caller buckets beyond which quiet ones are dropped.
pub const MAX_TRACKED_CALLERS: usize = 10_000;

/// One local rate limit, compiled.
#[derive(Debug)]
pub struct RateLimiter {
    shared: Option<DefaultDirectRateLimiter>,
    per_caller: Option<DefaultKeyedRateLimiter<String>>,
}

impl RateLimiter {
    /// Compile checked settings (`requestsPerSecond` > 0, `burst` >= 1).
    pub fn compile(l: &trellis_policy::RateLimit) -> Self {
        let period = Duration::from_secs_f64(1.0 / l.requests_per_second.max(1e-6));
        let burst = NonZeroU32::new(l.effective_burst()).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        RateLimiter {
            shared: (!l.per_source).then(|| governor::RateLimiter::direct(quota)),
            per_caller: l.per_source.then(|| governor::RateLimiter::keyed(quota)),
        }
    }

    /// Take a token for a request from `caller` (its identity; unauthenticated callers share
    /// the empty key). `Err(wait)`: refused, a token is back after `wait`.
    pub fn check(&self, caller: Option<&str>) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        let refused = |not_until: governor::NotUntil<_>| not_until.wait_time_from(clock.now());
        if let Some(shared) = &self.shared {
            return shared.check().map_err(refused);
        }
        let Some(keyed) = &self.per_caller else {
            return Ok(());
        };
        let key = caller.unwrap_or_default();
        if keyed.len() >= MAX_TRACKED_CALLERS {
            // Drop the buckets of callers that went quiet (full again): the same as a new one.
            keyed.retain_recent();
        }
        keyed.check_key(&key.to_string()).map_err(refused)
    }
}

/// `retry-after` in whole seconds (at least 1: a client told 0 would retry at once).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(json: &str) -> RateLimiter {
        RateLimiter::compile(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn the_burst_passes_then_requests_wait_for_tokens() {
        let l = limiter(r#"{"requestsPerSecond": 1, "burst": 3}"#);
        for _ in 0..3 {
            assert!(l.check(None).is_ok());
        }
        let wait = l.check(None).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
    }

    #[test]
    fn per_source_buckets_are_separate() {
        let l = limiter(r#"{"requestsPerSecond": 1, "burst": 1, "perSource": true}"#);
        assert!(l.check(Some("spiffe://t/ns/a/sa/x")).is_ok());
        assert!(l.check(Some("spiffe://t/ns/a/sa/x")).is_err());
        assert!(l.check(Some("spiffe://t/ns/a/sa/y")).is_ok());
        assert!(l.check(None).is_ok());
        assert!(
            l.check(None).is_err(),
            "unauthenticated callers share one bucket"
        );
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
