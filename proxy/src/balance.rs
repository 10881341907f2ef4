//! Choosing an endpoint within a backend: power of two choices over a peak latency EWMA (the
//! Finagle/Linkerd default), round robin, or least-request (P2C over in-flight counts).
//!
//! Endpoint weights (the registries' platform weights: Consul's `Weights.Passing`, a Cloud Map
//! attribute...) divide the cost in both P2C balancers (an endpoint of weight 2 is worth twice its
//! latency x load) and give weighted round robin its proportions.
//!
//! Outlier ejection ([`Ejection`], optional per destination): an endpoint whose failures in a
//! row reach the threshold is taken out of its backend for a time that grows with each ejection,
//! within a cap on the share of the backend out at once. It is decided when the balancer next
//! lands on that endpoint (no timer, no scan per request; a scan of the backend only when an
//! ejection is due), and the endpoint comes back when its time is over. The state lives in
//! [`EndpointStats`], so it survives config swaps like the latency estimate.
//!
//! Active health checks ([`crate::health`], optional per destination) mark endpoints unhealthy
//! in their [`EndpointStats`]; the balancer of a health-checked backend skips them like ejected
//! ones (and the P2C and round-robin choices avoid them in the first place, so their share is
//! spread over the others rather than falling on a neighbour). When every endpoint of a backend
//! is out (unhealthy or ejected), the choice stands: an answer, even a failing one, beats none.
//! A backend without a health check ignores the flag, so removing a destination's check brings
//! its endpoints back at once.
//!
//! The EWMA is failure-aware: a failed exchange (no connection, a reset, a timeout, a 5xx answer)
//! is a sample of [`FAILURE_PENALTY_NANOS`] rather than of how fast it failed, so an endpoint
//! that answers 500 in 0.1 ms does not look like the best one, and an endpoint that never
//! answered (which would otherwise keep the "untried" cost 0) loses its comparisons.
//!
//! Statistics live in [`EndpointStats`], shared between routing-table generations by address, so a
//! config swap keeps what the proxy learned and in-flight counts stay right across swaps. All
//! updates are lock-free atomics; lost updates under races only blur the estimate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use crate::resilience::retry::Outcome;
pub use trellis_policy::FailureKind;

use crate::config::BalancerKind;

/// Latency decay constant: an estimate not refreshed by a sample fades towards zero, halving
/// about every 7 s (the same time constant linkerd2-proxy and tower's PeakEwma use).
const TAU_NANOS: f64 = 10_000_000_000.0;
/// Share of its estimate an endpoint keeps each time it loses a P2C comparison. Time decay alone
/// (TAU) is too slow at loopback request rates: one slow answer (a scheduling hiccup, 10x the
/// usual) made an endpoint lose every comparison for seconds, so two equal endpoints behind one
/// root got 50 of 50 sequential requests. Fading per lost comparison retries an endpoint avoided
/// for one slow answer after some 30 comparisons (ln 10 / 0.05), while a steadily 5x slower
/// endpoint still gets only about 6% of the requests (its samples keep re-raising its estimate).
const KEPT_PER_LOSS: f64 = 0.95;
/// The latency a failure counts as. Large against any healthy answer, so a failing endpoint loses
/// its comparisons at once; with `KEPT_PER_LOSS` it is retried after about 90 lost comparisons
/// (ln(100 ms / 1 ms) / 0.05), i.e. it gets about 1% of the requests while it keeps failing
/// (2 endpoints) and its share back as soon as it answers well.
pub const FAILURE_PENALTY_NANOS: f64 = 100_000_000.0;
/// How long an endpoint must stay back after an ejection before its ejection count (the
/// multiplier of the next ejection time) starts over.
const MAX_EJECTIONS_MEMORY: Duration = Duration::from_secs(300);

/// The outlier ejection a backend's balancer applies (from the destination's
/// `outlier_detection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row that eject an endpoint.
    pub threshold: u32,
    /// The first ejection's length.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
    /// Most of the backend out at once, percent.
    pub max_percent: u8,
}

/// Live statistics of one endpoint address.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicUsize,
    /// Peak-EWMA latency estimate at `stamp_nanos` (f64 bits); NaN = no sample yet.
    ewma_nanos: AtomicU64,
    stamp_nanos: AtomicU64,
    /// Set until the first answer has been seen (and ignored, see `observe`).
    first_answer: AtomicBool,
    /// Failed exchanges since the last good one.
    consecutive_failures: AtomicU32,
    /// Ejected until this instant (nanoseconds since `epoch`); 0 = never ejected.
    ejected_until_nanos: AtomicU64,
    /// Ejections so far (the next one lasts one more base time); reset after a good answer
    /// once the endpoint has been back for the longest ejection time.
    ejections: AtomicU32,
    epoch: Instant,
    /// What active health checks found (see [`crate::health`]).
    pub health: crate::health::HealthState,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            in_flight: AtomicUsize::new(0),
            ewma_nanos: AtomicU64::new(f64::NAN.to_bits()),
            stamp_nanos: AtomicU64::new(0),
            first_answer: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_nanos: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            epoch: Instant::now(),
            health: crate::health::HealthState::default(),
        }
    }
}

impl EndpointStats {
    /// Requests (or connections) currently using the endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate now, nanoseconds: the last estimate decayed by the time since it was
    /// refreshed (so an endpoint that was avoided for one slow answer is tried again, as in
    /// tower's PeakEwma). 0 for an endpoint with no sample yet: new endpoints are tried at once.
    pub fn ewma_nanos(&self) -> f64 {
        let estimate = f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed));
        if estimate.is_nan() {
            return 0.0;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let then = self.stamp_nanos.load(Ordering::Relaxed);
        estimate * (-(now.saturating_sub(then) as f64) / TAU_NANOS).exp()
    }

    fn now_nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Out of its backend's balancer now.
    pub fn ejected(&self) -> bool {
        self.now_nanos() < self.ejected_until_nanos.load(Ordering::Relaxed)
    }

    /// Failed exchanges since the last good one.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Takes the endpoint out for its next ejection time.
    fn eject(&self, policy: &Ejection) {
        let n = self
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let time = policy.base.saturating_mul(n).min(policy.max);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejected_until_nanos
            .store(self.now_nanos() + time.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A good exchange: the failure run ends; after a full `max` back in service without an
    /// ejection the ejection count starts over.
    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejections.load(Ordering::Relaxed) > 0 {
            let until = self.ejected_until_nanos.load(Ordering::Relaxed);
            if self.now_nanos() > until + MAX_EJECTIONS_MEMORY.as_nanos() as u64 {
                self.ejections.store(0, Ordering::Relaxed);
            }
        }
    }

    fn cost(&self) -> f64 {
        self.ewma_nanos() * (self.in_flight() as f64 + 1.0)
    }

    /// Lost a comparison: the estimate fades (see `KEPT_PER_LOSS`). Racy read-modify-write on
    /// purpose: a lost update only blurs the estimate.
    fn fade(&self) {
        let raw = f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed));
        if !raw.is_nan() {
            self.ewma_nanos
                .store((raw * KEPT_PER_LOSS).to_bits(), Ordering::Relaxed);
        }
    }

    /// Mark a request started; the returned guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Arc::clone(self),
            started: Instant::now(),
        }
    }

    /// A failed exchange: a sample of at least [`FAILURE_PENALTY_NANOS`], set-up or not (an
    /// endpoint that never answers must not stay "new"); `counts` towards an ejection or not
    /// (the policy's `failures` kind).
    fn penalize(&self, rtt_nanos: f64, counts: bool) {
        self.first_answer.store(false, Ordering::Relaxed);
        if counts {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
        let next = rtt_nanos.max(FAILURE_PENALTY_NANOS).max(self.ewma_nanos());
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.stamp_nanos.store(now, Ordering::Relaxed);
        self.ewma_nanos.store(next.to_bits(), Ordering::Relaxed);
    }

    fn observe(&self, rtt_nanos: f64) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let raw = f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed));
        if raw.is_nan() && self.first_answer.swap(false, Ordering::Relaxed) {
            // The first answer of an endpoint carries the connection set-up (TCP, and the mTLS
            // handshake: often 10x a request on an open connection). As a peak it would make P2C
            // avoid the endpoint for seconds, so it is not a latency sample; the endpoint stays
            // "new" (cost 0) until its second answer.
            return;
        }
        let decayed = self.ewma_nanos();
        let next = if raw.is_nan() || rtt_nanos > decayed {
            // First sample, or peak EWMA: react at once to a slower endpoint, forget slowly.
            rtt_nanos
        } else {
            let then = self.stamp_nanos.load(Ordering::Relaxed);
            let w = (-(now.saturating_sub(then) as f64) / TAU_NANOS).exp();
            decayed * w + rtt_nanos * (1.0 - w)
        };
        self.stamp_nanos.store(now, Ordering::Relaxed);
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
        self.stats.succeeded();
        self.stats.observe(self.started.elapsed().as_nanos() as f64);
    }

    /// Record a failed exchange (see [`FAILURE_PENALTY_NANOS`]); whether it counts towards
    /// an ejection depends on the kind of failures the policy counts.
    pub fn record_failure(&self, outcome: Outcome, counted: FailureKind) {
        let counts = match (counted, outcome) {
            (FailureKind::ConnectFailure, o) => o == Outcome::ConnectFailure,
            (FailureKind::GatewayError, Outcome::Answer(status, _)) => {
                matches!(status.as_u16(), 502..=504)
            }
            (FailureKind::GatewayError | FailureKind::ServerError, _) => true,
        };
        self.stats
            .penalize(self.started.elapsed().as_nanos() as f64, counts);
    }

    /// Record an answer: its latency, or a failure when the status is a 5xx.
    pub fn record_answer(&self, status: http::StatusCode, counted: FailureKind) {
        if status.is_server_error() {
            self.record_failure(Outcome::Answer(status, None), counted);
        } else {
            self.record_latency();
        }
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
    ejection: Option<Ejection>,
    /// The destination has active health checks: unhealthy endpoints are skipped.
    health_checked: bool,
}

impl Balancer {
    /// A balancer of the given kind.
    pub fn new(kind: BalancerKind) -> Self {
        Balancer {
            kind,
            next: AtomicUsize::new(fastrand::usize(..1024)),
            ejection: None,
            health_checked: false,
        }
    }

    /// Skipping the endpoints health checks found unhealthy (when the destination has them).
    pub fn with_health_checks(mut self, checked: bool) -> Self {
        self.health_checked = checked;
        self
    }

    /// Out of this backend's rotation now (health checks, when the destination has them).
    fn unhealthy(&self, stats: &EndpointStats) -> bool {
        self.health_checked && !stats.health.healthy()
    }

    /// Whether an endpoint may get a request now: neither ejected nor (with health checks)
    /// unhealthy.
    pub fn available(&self, stats: &EndpointStats) -> bool {
        !stats.ejected() && !self.unhealthy(stats)
    }

    /// With outlier ejection.
    pub fn with_ejection(mut self, ejection: Option<Ejection>) -> Self {
        self.ejection = ejection;
        self
    }

    /// Index of the endpoint to use: `choose`'s, unless it is unhealthy (health
    /// checks) or ejected (or its failures just reached the threshold and the backend may lose
    /// one more endpoint: then it is ejected now); then the next usable one round the list. When
    /// none is usable (every other endpoint unhealthy or ejected), the choice stands: an answer,
    /// even a failing one, beats none.
    pub fn pick<'a>(
        &self,
        endpoints: impl ExactSizeIterator<Item = (&'a EndpointStats, u32)> + Clone,
    ) -> Option<usize> {
        let choice = self.choose(endpoints.clone())?;
        if self.ejection.is_none() && !self.health_checked {
            return Some(choice);
        }
        let n = endpoints.len();
        let usable = |i: usize| {
            let Some((stats, _)) = endpoints.clone().nth(i) else {
                return false;
            };
            if self.unhealthy(stats) {
                return false;
            }
            let Some(policy) = &self.ejection else {
                return true;
            };
            if stats.ejected() {
                return false;
            }
            if stats.consecutive_failures() < policy.threshold {
                return true;
            }
            // Due for ejection: only within the backend's budget (rare: scan the backend).
            let out = endpoints.clone().filter(|(s, _)| s.ejected()).count();
            let budget = (n * usize::from(policy.max_percent) / 100)
                .max(usize::from(policy.max_percent > 0))
                .min(n - 1);
            if out < budget {
                stats.eject(policy);
                false
            } else {
                true
            }
        };
        if usable(choice) {
            return Some(choice);
        }
        (1..n)
            .map(|k| (choice + k) % n)
            .find(|&i| usable(i))
            .or(Some(choice))
    }

    /// Index of the endpoint the balancing rule chooses among `endpoints`, each with its
    /// statistics and weight (0 counts as 1); None when empty. Unhealthy endpoints (health
    /// checks) lose every comparison and round robin passes their turns, so their share goes to
    /// all the others; `pick` deals with what is still unusable.
    fn choose<'a>(
        &self,
        endpoints: impl ExactSizeIterator<Item = (&'a EndpointStats, u32)> + Clone,
    ) -> Option<usize> {
        let n = endpoints.len();
        match n {
            0 => None,
            1 => Some(0),
            _ => match self.kind {
                BalancerKind::RoundRobin => {
                    let weights = endpoints.clone().map(|(_, w)| w.max(1));
                    let turn = || {
                        weighted_turn(weights.clone(), self.next.fetch_add(1, Ordering::Relaxed))
                    };
                    let unhealthy = |i: usize| {
                        endpoints
                            .clone()
                            .nth(i)
                            .is_some_and(|(s, _)| self.unhealthy(s))
                    };
                    // An unhealthy endpoint's turn passes to the next turn of the schedule (not
                    // to its neighbour in the list), so the others keep their proportions.
                    let first = turn();
                    if !unhealthy(first) {
                        return Some(first);
                    }
                    for extra in 1..n {
                        let next = turn();
                        if !unhealthy(next) {
                            return Some(next);
                        }
                        if extra == n - 1 {
                            // None usable: give the turns back, so the choice that stands still
                            // rotates over the backend.
                            self.next.fetch_sub(extra, Ordering::Relaxed);
                        }
                    }
                    Some(first)
                }
                BalancerKind::Ewma => {
                    let (winner, loser) = p2c(n, endpoints.clone(), |s| {
                        if self.unhealthy(s) {
                            f64::INFINITY
                        } else {
                            s.cost()
                        }
                    });
                    if let Some((loser, _)) = endpoints.clone().nth(loser) {
                        loser.fade();
                    }
                    Some(winner)
                }
                BalancerKind::LeastRequest => Some(
                    p2c(n, endpoints, |s| {
                        if self.unhealthy(s) {
                            f64::INFINITY
                        } else {
                            s.in_flight() as f64 + 1.0
                        }
                    })
                    .0,
                ),
            },
        }
    }
}

/// Round robin over weights: turn `turn` of a cycle as long as the weights' sum, endpoint `i`
/// taking `weights[i]` consecutive turns (plain round robin when all weights are equal).
fn weighted_turn(weights: impl Iterator<Item = u32> + Clone, turn: usize) -> usize {
    let total: u64 = weights.clone().map(u64::from).sum();
    let mut at = turn as u64 % total.max(1);
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if at < u64::from(w) {
            return i;
        }
        at -= u64::from(w);
        last = i;
    }
    last
}

/// Power of two choices: two distinct random endpoints, the lower cost per unit of weight wins
/// (ties: the first). Returns (winner, loser).
fn p2c<'a>(
    n: usize,
    mut endpoints: impl ExactSizeIterator<Item = (&'a EndpointStats, u32)> + Clone,
    cost: impl Fn(&EndpointStats) -> f64,
) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    let weighted = |(s, w): (&EndpointStats, u32)| cost(s) / f64::from(w.max(1));
    let ca = endpoints.clone().nth(a).map_or(f64::MAX, weighted);
    let cb = endpoints.nth(b).map_or(f64::MAX, weighted);
    if cb < ca { (b, a) } else { (a, b) }
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
            counts[b.pick(s.iter().map(|s| (&**s, 1))).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn ewma_avoids_the_slow_endpoint() {
        let s = stats(2);
        for _ in 0..2 {
            // The first answer of each is connection set-up and not a sample.
            s[0].observe(5_000_000.0); // 5 ms
            s[1].observe(300_000.0); // 0.3 ms
        }
        let b = Balancer::new(BalancerKind::Ewma);
        let mut slow = 0;
        for _ in 0..1000 {
            let pick = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            slow += usize::from(pick == 0);
            // Each keeps answering as it does: the slow one's samples re-raise its estimate.
            s[pick].observe(if pick == 0 { 5_000_000.0 } else { 300_000.0 });
        }
        assert!(slow > 0, "a faded estimate gets retried");
        assert!(
            slow < 100,
            "a 17x slower endpoint gets few requests: {slow} of 1000"
        );
    }

    #[test]
    fn least_request_prefers_idle_endpoints_and_guards_release() {
        let s = stats(2);
        let busy: Vec<_> = (0..5).map(|_| s[0].start()).collect();
        let b = Balancer::new(BalancerKind::LeastRequest);
        assert!((0..100).all(|_| b.pick(s.iter().map(|s| (&**s, 1))) == Some(1)));
        drop(busy);
        assert_eq!(s[0].in_flight(), 0);
    }

    #[test]
    fn ewma_tries_new_endpoints_and_spreads_over_equal_ones() {
        let s = stats(2);
        let b = Balancer::new(BalancerKind::Ewma);
        // Endpoint 0 has answered fast; endpoint 1 was never tried: it is tried first.
        s[0].observe(5_000_000.0); // first answer: connection set-up, ignored
        s[0].observe(300_000.0);
        assert_eq!(b.pick(s.iter().map(|s| (&**s, 1))), Some(1));
        // Two endpoints with equal latencies share sequential requests, even when one had a
        // 10x hiccup (which time decay alone would hold against it for seconds).
        let mut counts = [0usize; 2];
        for i in 0..200 {
            let pick = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            counts[pick] += 1;
            let latency = match i {
                5 => 3_000_000.0,
                _ if i % 3 == 0 => 450_000.0,
                _ => 300_000.0,
            };
            s[pick].observe(latency);
        }
        assert!(counts.iter().all(|&c| c >= 40), "{counts:?}");
    }

    #[test]
    fn an_estimate_fades_while_the_endpoint_is_not_used() {
        let s = EndpointStats::default();
        assert_eq!(s.ewma_nanos(), 0.0, "no sample yet");
        s.observe(20_000_000.0);
        assert_eq!(
            s.ewma_nanos(),
            0.0,
            "the first answer (connection set-up) is not a sample"
        );
        s.observe(1_000_000.0);
        let first = s.ewma_nanos();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later = s.ewma_nanos();
        assert!(later < first && later > 0.0, "{first} -> {later}");
    }

    /// 0 is healthy at 1 ms; 1 fails as `fail` says; P2C over the two for `n` requests.
    fn healthy_and_failing(
        s: &[Arc<EndpointStats>],
        b: &Balancer,
        n: usize,
        fail: impl Fn(&InFlight),
    ) -> [usize; 2] {
        let mut counts = [0usize; 2];
        for _ in 0..n {
            let pick = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            counts[pick] += 1;
            let guard = s[pick].start();
            if pick == 0 {
                s[0].observe(1_000_000.0);
            } else {
                fail(&guard);
            }
        }
        counts
    }

    #[test]
    fn ewma_avoids_an_endpoint_that_fails_fast_and_one_that_never_answers() {
        let b = Balancer::new(BalancerKind::Ewma);
        // A fast 500 (0.1 ms) is a failure, not a good latency.
        let s = stats(2);
        let fast_500 = healthy_and_failing(&s, &b, 2000, |g| {
            std::thread::sleep(std::time::Duration::from_micros(100));
            g.record_answer(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                FailureKind::ServerError,
            );
        });
        // An endpoint that never connects (never had a sample) does not stay "untried".
        let s2 = stats(2);
        let never = healthy_and_failing(&s2, &b, 2000, |g| {
            g.record_failure(Outcome::ConnectFailure, FailureKind::ServerError)
        });
        for counts in [fast_500, never] {
            assert!(
                counts[1] > 0 && counts[1] < 100,
                "the failing endpoint is retried now and then, rarely: {counts:?}"
            );
        }
        // A failing endpoint that recovers gets its share back.
        for _ in 0..2 {
            s[1].observe(1_000_000.0);
        }
        let recovered = healthy_and_failing(&s, &b, 1000, |_| s[1].observe(1_000_000.0));
        assert!(
            recovered[1] > 300,
            "recovered endpoint's share: {recovered:?}"
        );
    }

    #[test]
    fn weights_set_round_robin_proportions_and_scale_p2c_costs() {
        let s = stats(2);
        fn weighted(s: &[Arc<EndpointStats>]) -> Vec<(&EndpointStats, u32)> {
            s.iter().zip([3u32, 1]).map(|(s, w)| (&**s, w)).collect()
        }
        let b = Balancer::new(BalancerKind::RoundRobin);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[b.pick(weighted(&s).into_iter()).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
        // Least-request: equal load per unit of weight; weight 3 holds three requests before
        // weight 1 looks as busy with one.
        let b = Balancer::new(BalancerKind::LeastRequest);
        let mut held = Vec::new();
        let mut counts = [0; 2];
        for _ in 0..400 {
            let pick = b.pick(weighted(&s).into_iter()).unwrap();
            counts[pick] += 1;
            held.push(s[pick].start());
        }
        assert!(
            (270..=330).contains(&counts[0]),
            "weight 3 of 4 takes about 3/4 of the open requests: {counts:?}"
        );
    }

    #[test]
    fn a_failing_endpoint_is_ejected_comes_back_and_stays_out_longer_next_time() {
        let s = stats(3);
        let policy = Ejection {
            threshold: 3,
            base: Duration::from_millis(300),
            max: Duration::from_secs(5),
            max_percent: 50,
        };
        let b = Balancer::new(BalancerKind::RoundRobin).with_ejection(Some(policy));
        let pick = || b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
        // Endpoint 2 fails every exchange; its third failure makes it due.
        let mut to_bad = 0;
        for _ in 0..60 {
            let i = pick();
            let guard = s[i].start();
            if i == 2 {
                to_bad += 1;
                guard.record_failure(Outcome::Reset, FailureKind::ServerError);
            } else {
                guard.record_latency();
            }
        }
        assert_eq!(to_bad, 3, "ejected after its third failure in a row");
        assert!(s[2].ejected());
        // Back on its own after the base time; one more run of failures: out for twice as long.
        std::thread::sleep(Duration::from_millis(350));
        assert!(!s[2].ejected());
        for _ in 0..3 {
            s[2].start()
                .record_failure(Outcome::Reset, FailureKind::ServerError);
        }
        while pick() != 0 {}
        let _ = (pick(), pick(), pick());
        assert!(s[2].ejected());
        std::thread::sleep(Duration::from_millis(350));
        assert!(s[2].ejected(), "the second ejection lasts 2 x 300 ms");
        std::thread::sleep(Duration::from_millis(300));
        assert!(!s[2].ejected());
    }

    #[test]
    fn never_more_than_the_max_percent_and_never_the_last_endpoint_are_ejected() {
        let policy = Ejection {
            threshold: 1,
            base: Duration::from_secs(60),
            max: Duration::from_secs(60),
            max_percent: 50,
        };
        // Four endpoints all failing: two out at most.
        let s = stats(4);
        let b = Balancer::new(BalancerKind::RoundRobin).with_ejection(Some(policy));
        for _ in 0..40 {
            let i = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            s[i].start()
                .record_failure(Outcome::Reset, FailureKind::ServerError);
        }
        assert_eq!(s.iter().filter(|s| s.ejected()).count(), 2);
        // Two endpoints at 100%: one may go, never both.
        let s = stats(2);
        let all = Ejection {
            max_percent: 100,
            ..policy
        };
        let b = Balancer::new(BalancerKind::Ewma).with_ejection(Some(all));
        for _ in 0..40 {
            let i = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            s[i].start()
                .record_failure(Outcome::Reset, FailureKind::ServerError);
        }
        assert_eq!(s.iter().filter(|s| s.ejected()).count(), 1);
        // Without a policy nothing is ever ejected.
        let s = stats(2);
        let b = Balancer::new(BalancerKind::RoundRobin);
        for _ in 0..40 {
            let i = b.pick(s.iter().map(|s| (&**s, 1))).unwrap();
            s[i].start()
                .record_failure(Outcome::Reset, FailureKind::ServerError);
        }
        assert!(s.iter().all(|s| !s.ejected()));
    }

    /// Marks `s` unhealthy as its probes would.
    fn fail_probes(s: &EndpointStats) {
        let t = crate::health::Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        s.health.record(false, t);
        assert!(!s.health.healthy());
    }

    #[test]
    fn unhealthy_endpoints_get_nothing_and_their_share_is_spread_over_the_others() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Ewma,
            BalancerKind::LeastRequest,
        ] {
            let s = stats(4);
            fail_probes(&s[1]);
            let b = Balancer::new(kind).with_health_checks(true);
            let mut counts = [0usize; 4];
            for _ in 0..3000 {
                counts[b.pick(s.iter().map(|s| (&**s, 1))).unwrap()] += 1;
            }
            assert_eq!(counts[1], 0, "{kind:?}: {counts:?}");
            assert!(
                counts
                    .iter()
                    .enumerate()
                    .all(|(i, &c)| i == 1 || (700..=1300).contains(&c)),
                "{kind:?}: the others share evenly, not the neighbour of the unhealthy one: {counts:?}"
            );
            // Without health checks on the backend (the destination's check was removed), the
            // flag is ignored.
            let b = Balancer::new(kind);
            assert!((0..400).any(|_| b.pick(s.iter().map(|s| (&**s, 1))) == Some(1)));
        }
    }

    #[test]
    fn when_every_endpoint_is_unhealthy_the_choice_stands() {
        let s = stats(3);
        s.iter().for_each(|s| fail_probes(s));
        let b = Balancer::new(BalancerKind::RoundRobin).with_health_checks(true);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            counts[b.pick(s.iter().map(|s| (&**s, 1))).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        assert!(!b.available(&s[0]));
    }

    #[test]
    fn empty_and_single_sets() {
        let b = Balancer::new(BalancerKind::Ewma);
        assert_eq!(b.pick(std::iter::empty()), None);
        let s = stats(1);
        assert_eq!(b.pick(s.iter().map(|s| (&**s, 1))), Some(0));
    }
}
