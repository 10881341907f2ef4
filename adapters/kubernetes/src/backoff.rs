//! The shared discovery retry policy ([`trellis_discovery::Backoff`]: 100 ms doubling to a 2 s
//! cap, jittered, forever) in kube-runtime's `Backoff` shape, for `watcher(...).backoff(...)`.
//!
//! kube's `default_backoff` (800 ms to 30 s) would make recovery after an outage take up to 30 s;
//! with this one every kube-runtime watch of Trellis (this adapter's reflectors, and the
//! controller's SMI policy source) recovers within one 2 s backoff period, the same promise as
//! every other adapter.

use std::time::Duration;

/// [`trellis_discovery::Backoff`] as a [`kube::runtime::utils::Backoff`].
#[derive(Debug, Default)]
pub struct WatchBackoff(trellis_discovery::Backoff);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff as _;

    #[test]
    fn delays_follow_the_discovery_policy_and_reset_starts_over() {
        let mut backoff = WatchBackoff::default();
        let first = backoff.next().unwrap();
        assert!(
            (trellis_discovery::BACKOFF_INITIAL..=trellis_discovery::BACKOFF_INITIAL * 2)
                .contains(&first),
            "{first:?}"
        );
        let later: Vec<Duration> = backoff.by_ref().take(50).collect();
        assert_eq!(later.len(), 50, "never gives up");
        assert!(
            later.iter().all(|d| *d <= trellis_discovery::BACKOFF_CAP),
            "{later:?}"
        );
        backoff.reset();
        assert!(backoff.next().unwrap() <= trellis_discovery::BACKOFF_INITIAL * 2);
    }
}
