//! Last-activity tracking for the idle timeouts of sessions: one relaxed atomic store per
//! batch of datagrams, read only when the idle timer fires (so the timer is not reset, and
//! re-armed, for every datagram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Clock {
    epoch: Instant,
    last_millis: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            last_millis: AtomicU64::new(0),
        }
    }

    /// Something moved now.
    pub(crate) fn touch(&self) {
        self.last_millis
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing was touched for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
            let deadline = self.epoch + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}
