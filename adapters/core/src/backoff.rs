//! The retry policy every remote adapter shares, so "recovers within one backoff period" means the
//! same thing on every platform.
//!
//! Exponential with full jitter on top: the base delay starts at [`BACKOFF_INITIAL`], doubles after
//! each failure and stops growing at [`BACKOFF_CAP`] / 2; jitter then adds a random 0..100 % of the
//! base (backon's jitter), so **no single sleep is longer than [`BACKOFF_CAP`]** (2 s). It retries
//! forever: a watch never gives up on a registry.
//!
//! "The adapter recovers within one backoff period after the registry returns" therefore means: at
//! most [`BACKOFF_CAP`] after the registry is reachable again, the adapter has issued its next
//! request (plus that request's own round trip). The behavioural suite's outage scenario allows
//! `change_timeout + BACKOFF_CAP`.
//!
//! Jitter keeps many watchers (one per service) from hammering a registry in lock step when it
//! comes back.

use std::time::Duration;

use backon::BackoffBuilder;

/// The first base delay after a failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// The longest single sleep, jitter included: one "backoff period".
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// The shared policy as a backon builder (for `backon::Retryable::retry` or `.build()`): 100 ms
/// initial, x2, base capped at 1 s, jitter up to +100 % (so at most [`BACKOFF_CAP`]), forever.
pub fn backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_INITIAL)
        .with_factor(2.0)
        .with_max_delay(BACKOFF_CAP / 2)
        .with_jitter()
        .without_max_times()
}

/// The policy as a small stateful helper for hand-written watch loops: call [`Backoff::wait`] after
/// a failure and [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            delays: backoff().build(),
        }
    }

    /// The next sleep (grows after each call until reset; never above [`BACKOFF_CAP`]).
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` makes the iterator endless; the fallback only guards the type.
        self.delays.next().unwrap_or(BACKOFF_CAP).min(BACKOFF_CAP)
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts again from [`BACKOFF_INITIAL`] (after a successful request).
    pub fn reset(&mut self) {
        self.delays = backoff().build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_the_initial_delay_and_never_exceed_the_cap() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(
            first >= BACKOFF_INITIAL && first <= BACKOFF_INITIAL * 2,
            "first delay {first:?} should be 100..200 ms"
        );
        let later: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_CAP), "{later:?}");
        // After growth the base is BACKOFF_CAP / 2, so every later sleep is at least that.
        assert!(
            later[10..].iter().all(|d| *d >= BACKOFF_CAP / 2),
            "{later:?}"
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new();
        for _ in 0..20 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_INITIAL * 2);
    }

    #[test]
    fn the_policy_retries_forever() {
        let mut delays = backoff().build();
        assert_eq!(delays.by_ref().take(10_000).count(), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_for_the_delay() {
        let mut b = Backoff::new();
        let start = tokio::time::Instant::now();
        b.wait().await;
        let slept = start.elapsed();
        assert!(
            slept >= BACKOFF_INITIAL && slept <= BACKOFF_INITIAL * 2,
            "{slept:?}"
        );
    }
}
