//! Active health checks (the policy's `healthCheck`): this proxy probes the endpoints of the
//! destinations it talks to, and the balancer sends no requests to an endpoint that failed
//! `unhealthyThreshold` probes in a row until it passed `healthyThreshold` in a row. New
//! endpoints start healthy (the registries' readiness already vouched for them). Where outlier
//! ejection reacts to failed requests, probes also find an endpoint that broke while it got no
//! traffic, and bring it back only once it answers again.
//!
//! A probe is an HTTP/1.1 (or h2c, for `http2` endpoints) `GET httpPath` to the endpoint's
//! address, through the proxy's shared upstream clients, which pass with a 200..399 answer within
//! `timeout`; without `httpPath`, a TCP connect within `timeout`. An endpoint with an identity
//! is probed over mTLS like requests (the same clients, so the peer's proxy authorizes the probe
//! like any request of this workload, and its application answers it: the path must be one the
//! destination's inbound policy lets this caller `GET`). Probes do not count against the
//! destination's circuit breaker, and while this proxy has no valid certificate an mTLS endpoint
//! is not probed at all (requests to it fail closed anyway; its state stays as it was).
//!
//! State ([`HealthState`]) lives in each endpoint's [`EndpointStats`](crate::balance::EndpointStats), shared by address across
//! recompiles like the latency estimate: a destination replaced by the controller's next endpoint
//! delta keeps what its probes learned, and the probe rhythm too (the time of the last probe is
//! kept, and a prober only probes an endpoint whose last probe is at least half an interval old,
//! so a replacement never makes two probers of one endpoint run at once for more than the moment
//! the old one takes to see that it is cancelled).
//!
//! Lifecycle: a compiled destination with a health check carries a [`Checks`]; the proxy's
//! routing state starts one prober task per such destination when it makes the entry current
//! ([`crate::probe`]) and cancels it when the entry is replaced or removed (and the entry's drop
//! cancels it too). Compiling alone never spawns anything (`trellis validate` and config parsing
//! compile without a runtime). The task holds a `Weak` to the proxy's state, so it also ends
//! when the proxy does.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use tokio_util::sync::CancellationToken;

use crate::config::Invalid;

/// The thresholds of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failed probes in a row that take an endpoint out (at least 1).
    pub unhealthy: u32,
    /// Passed probes in a row that bring it back (at least 1).
    pub healthy: u32,
}

/// The health of one endpoint address, in its [`EndpointStats`](crate::balance::EndpointStats). Lock-free; a prober is the only
/// writer of an endpoint at a time (see the module doc), readers are the balancers.
#[derive(Debug)]
pub struct HealthState {
    healthy: AtomicBool,
    /// Passed probes in a row while unhealthy.
    passes: AtomicU32,
    /// Failed probes in a row while healthy.
    failures: AtomicU32,
    /// When the last probe started, nanoseconds since `epoch` plus 1; 0 = never probed.
    last_probe: AtomicU64,
    epoch: Instant,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            healthy: AtomicBool::new(true),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            last_probe: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl HealthState {
    /// Whether the endpoint may get requests as far as probes know (true until probes said
    /// otherwise; only consulted by backends whose destination has a health check).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Count one probe; returns the new state when this probe changed it. A healthy endpoint
    /// counts its failures in a row, an unhealthy one its passes in a row; either run is reset
    /// by one probe the other way.
    pub fn record(&self, passed: bool, t: Thresholds) -> Option<bool> {
        let healthy = self.healthy();
        if passed {
            self.failures.store(0, Ordering::Relaxed);
            if healthy {
                return None;
            }
            let n = self.passes.load(Ordering::Relaxed).saturating_add(1);
            if n >= t.healthy.max(1) {
                self.passes.store(0, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Release);
                return Some(true);
            }
            self.passes.store(n, Ordering::Relaxed);
        } else {
            self.passes.store(0, Ordering::Relaxed);
            if !healthy {
                return None;
            }
            let n = self.failures.load(Ordering::Relaxed).saturating_add(1);
            if n >= t.unhealthy.max(1) {
                self.failures.store(0, Ordering::Relaxed);
                self.healthy.store(false, Ordering::Release);
                return Some(false);
            }
            self.failures.store(n, Ordering::Relaxed);
        }
        None
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Time since the last probe started (None: never probed).
    pub(crate) fn since_last_probe(&self) -> Option<Duration> {
        match self.last_probe.load(Ordering::Acquire) {
            0 => None,
            last => Some(Duration::from_nanos(self.now().saturating_sub(last))),
        }
    }

    /// Take the next probe of this endpoint: false when another prober probed it less than
    /// `min_gap` ago (or is taking it now).
    pub(crate) fn claim(&self, min_gap: Duration) -> bool {
        let last = self.last_probe.load(Ordering::Acquire);
        let now = self.now();
        if last != 0 && Duration::from_nanos(now.saturating_sub(last)) < min_gap {
            return false;
        }
        self.last_probe
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A destination's health check, compiled: its settings, and the stop switch of its prober.
#[derive(Debug)]
pub struct Checks {
    /// `GET` this path; None: a TCP connect.
    pub path: Option<PathAndQuery>,
    /// Between probes of one endpoint.
    pub interval: Duration,
    /// One probe's limit.
    pub timeout: Duration,
    /// The state machine's thresholds.
    pub thresholds: Thresholds,
    started: AtomicBool,
    stop: CancellationToken,
}

impl Checks {
    /// Compile the destination's `healthCheck` (already validated by `trellis_policy`); `field`
    /// names the destination in errors.
    pub fn compile(h: &trellis_policy::HealthCheck, field: &str) -> Result<Self, Invalid> {
        let path = match &h.http_path {
            Some(p) => Some(PathAndQuery::try_from(p.as_str()).map_err(|e| Invalid {
                field: format!("{field}.policy.healthCheck.httpPath"),
                value: p.clone(),
                message: format!("{p:?} is not a request path: {e}"),
            })?),
            None => None,
        };
        Ok(Checks {
            path,
            interval: h.interval.get(),
            timeout: h.timeout.get(),
            thresholds: Thresholds {
                unhealthy: h.unhealthy_threshold,
                healthy: h.healthy_threshold,
            },
            started: AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// Claim the start of this entry's prober: true once per compiled entry, never after
    /// [`Self::stop`] ([`crate::probe::start`]).
    pub fn claim_start(&self) -> bool {
        !self.stop.is_cancelled() && !self.started.swap(true, Ordering::AcqRel)
    }

    /// Cancelled when the entry is replaced or removed.
    pub fn stopped(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stop the prober (the entry was replaced or removed; requests may still hold it).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        unhealthy: 3,
        healthy: 2,
    };

    #[test]
    fn endpoints_start_healthy_and_go_out_after_the_unhealthy_threshold() {
        let h = HealthState::default();
        assert!(h.healthy(), "new endpoints start healthy");
        assert_eq!(h.record(false, T), None);
        assert_eq!(h.record(false, T), None);
        assert!(h.healthy(), "two failures of three");
        assert_eq!(h.record(false, T), Some(false));
        assert!(!h.healthy());
        assert_eq!(h.record(false, T), None, "already out: no new transition");
    }

    #[test]
    fn a_pass_breaks_a_run_of_failures_and_a_failure_a_run_of_passes() {
        let h = HealthState::default();
        for _ in 0..5 {
            h.record(false, T);
            h.record(false, T);
            assert_eq!(h.record(true, T), None);
        }
        assert!(h.healthy(), "never three failures in a row");
        for _ in 0..3 {
            h.record(false, T);
        }
        assert!(!h.healthy());
        for _ in 0..5 {
            assert_eq!(h.record(true, T), None);
            h.record(false, T);
        }
        assert!(!h.healthy(), "never two passes in a row");
        assert_eq!(h.record(true, T), None);
        assert_eq!(h.record(true, T), Some(true));
        assert!(h.healthy());
        // Back in: the next run of failures starts from zero.
        assert_eq!(h.record(false, T), None);
        assert_eq!(h.record(false, T), None);
        assert_eq!(h.record(false, T), Some(false));
    }

    #[test]
    fn thresholds_of_one_switch_on_every_change() {
        let one = Thresholds {
            unhealthy: 1,
            healthy: 1,
        };
        let h = HealthState::default();
        assert_eq!(h.record(true, one), None);
        assert_eq!(h.record(false, one), Some(false));
        assert_eq!(h.record(true, one), Some(true));
    }

    #[test]
    fn a_probe_is_claimed_once_per_gap() {
        let h = HealthState::default();
        assert_eq!(h.since_last_probe(), None);
        assert!(h.claim(Duration::from_millis(50)));
        assert!(
            !h.claim(Duration::from_millis(50)),
            "a second prober keeps off"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.since_last_probe().unwrap() >= Duration::from_millis(50));
        assert!(h.claim(Duration::from_millis(50)));
    }
}
