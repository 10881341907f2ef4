//! Choosing an endpoint within a backend: power of two choices over a peak latency EWMA (the
//! Finagle/Linkerd default), round robin, or least-request (P2C over in-flight counts).
//!
//! Statistics live in [`EndpointStats`], shared between routing-table generations by address, so a
//! config swap keeps what the proxy learned and in-flight counts stay right across swaps. All
//! updates are lock-free atomics; lost updates under races only blur the estimate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::config::BalancerKind;

/// Latency decay constant: a sample's weight halves about every 7 s.
const TAU_NANOS: f64 = 10_000_000_000.0;
/// Cost assumed for an endpoint with no samples yet (1 ms), so new endpoints are tried but not flooded.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;

/// Live statistics of one endpoint address.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicUsize,
    ewma_nanos: AtomicU64,
    stamp_nanos: AtomicU64,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            in_flight: AtomicUsize::new(0),
            ewma_nanos: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            stamp_nanos: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl EndpointStats {
    /// Requests (or connections) currently using the endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The current latency estimate, nanoseconds.
    pub fn ewma_nanos(&self) -> f64 {
        f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed))
    }

    fn cost(&self) -> f64 {
        self.ewma_nanos() * (self.in_flight() as f64 + 1.0)
    }

    /// Mark a request started; the returned guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Arc::clone(self),
            started: Instant::now(),
        }
    }

    fn observe(&self, rtt_nanos: f64) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let then = self.stamp_nanos.swap(now, Ordering::Relaxed);
        let old = self.ewma_nanos();
        let next = if rtt_nanos > old {
            // Peak EWMA: react at once to a slower endpoint, forget slowly.
            rtt_nanos
        } else {
            let w = (-(now.saturating_sub(then) as f64) / TAU_NANOS).exp();
            old * w + rtt_nanos * (1.0 - w)
        };
        self.ewma_nanos.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// One request (or connection) in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    /// Record the latency observed so far (call when response headers arrive).
    pub fn record_latency(&self) {
        self.stats.observe(self.started.elapsed().as_nanos() as f64);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The per-backend balancer state.
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer of the given kind.
    pub fn new(kind: BalancerKind) -> Self {
        Balancer {
            kind,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// Index of the endpoint to use among `stats` (None when empty).
    pub fn pick<'a>(
        &self,
        stats: impl ExactSizeIterator<Item = &'a EndpointStats> + Clone,
    ) -> Option<usize> {
        let n = stats.len();
        match n {
            0 => None,
            1 => Some(0),
            _ => match self.kind {
                BalancerKind::RoundRobin => Some(self.next.fetch_add(1, Ordering::Relaxed) % n),
                BalancerKind::Ewma => Some(p2c(n, stats, EndpointStats::cost)),
                BalancerKind::LeastRequest => Some(p2c(n, stats, |s| s.in_flight() as f64)),
            },
        }
    }
}

fn p2c<'a>(
    n: usize,
    mut stats: impl ExactSizeIterator<Item = &'a EndpointStats> + Clone,
    cost: impl Fn(&EndpointStats) -> f64,
) -> usize {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    let ca = stats.clone().nth(a).map_or(f64::MAX, &cost);
    let cb = stats.nth(b).map_or(f64::MAX, &cost);
    if cb < ca { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(n: usize) -> Vec<Arc<EndpointStats>> {
        (0..n).map(|_| Arc::new(EndpointStats::default())).collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_evenly() {
        let s = stats(3);
        let b = Balancer::new(BalancerKind::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[b.pick(s.iter().map(|s| &**s)).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let s = stats(2);
        s[0].observe(50_000_000.0); // 50 ms
        s[1].observe(100_000.0); // 0.1 ms
        let b = Balancer::new(BalancerKind::Ewma);
        let fast = (0..1000)
            .filter(|_| b.pick(s.iter().map(|s| &**s)) == Some(1))
            .count();
        assert_eq!(fast, 1000, "with two endpoints P2C always compares both");
    }

    #[test]
    fn least_request_prefers_idle_endpoints_and_guards_release() {
        let s = stats(2);
        let busy: Vec<_> = (0..5).map(|_| s[0].start()).collect();
        let b = Balancer::new(BalancerKind::LeastRequest);
        assert!((0..100).all(|_| b.pick(s.iter().map(|s| &**s)) == Some(1)));
        drop(busy);
        assert_eq!(s[0].in_flight(), 0);
    }

    #[test]
    fn empty_and_single_sets() {
        let b = Balancer::new(BalancerKind::Ewma);
        assert_eq!(b.pick(std::iter::empty()), None);
        let s = stats(1);
        assert_eq!(b.pick(s.iter().map(|s| &**s)), Some(0));
    }
}
