//! The resilience policy, compiled for the request path: what `trellis_policy`'s settings mean
//! to one request (timeouts, retries, faults, mirror) and to one destination (breaker, rate
//! limits). Compiled once per configuration change by [`crate::table`]; the HTTP layers in
//! [`crate::http`] only read these.
//!
//! This module depends on neither the table nor the HTTP code (both depend on it), so the
//! policy's logic is tested here without a network.

use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::TpsBudget;
use trellis_policy::{DestinationPolicy, RoutePolicy};

pub mod breaker;
pub mod fault;
pub mod rate_limit;
pub mod retry;

pub use breaker::{Breaker, BreakerState};
pub use fault::Fault;
pub use rate_limit::RateLimiter;
pub use retry::Retry;

/// What the policy asks of one request of a route (or of the destination's default split).
#[derive(Debug, Default)]
pub struct RequestPolicy {
    /// Until the response's headers, over every try (504 when it passes).
    pub request_timeout: Option<Duration>,
    /// One try, until the response's headers.
    pub per_try_timeout: Option<Duration>,
    /// A body (either way) with nothing moving for this long is cut.
    pub idle_timeout: Option<Duration>,
    /// Retries, when set.
    pub retry: Option<Retry>,
    /// Injected faults, when set.
    pub fault: Option<Fault>,
    /// Copies of requests to another backend, when set.
    pub mirror: Option<MirrorPolicy>,
}

/// Mirroring, compiled: the backend (an index into the destination's backends) and the share.
#[derive(Debug)]
pub struct MirrorPolicy {
    /// Index of the backend that gets the copies.
    pub backend: usize,
    /// Share of requests copied, per million.
    pub per_million: u32,
}

/// A percent (0 to 100, validated) as a share per million, for an integer dice roll.
pub fn per_million(percent: f64) -> u32 {
    (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32
}

/// True for `per_million` out of a million calls, at random.
pub fn roll(per_million: u32) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && fastrand::u32(..1_000_000) < per_million)
}

impl RequestPolicy {
    /// Compile the sections that apply to a route's requests; `legacy_timeout` is the static
    /// file's `request_timeout_ms` (the policy's `timeouts.request` wins); `mirror_backend` is
    /// the index of the backend the mirror names (checked by the caller); `budget` gives the
    /// retry budget to spend (the table's, kept across recompiles).
    pub fn compile(
        policy: &RoutePolicy,
        legacy_timeout: Option<Duration>,
        mirror_backend: Option<usize>,
        budget: impl FnOnce(&trellis_policy::RetryBudget) -> Arc<TpsBudget>,
    ) -> Self {
        let timeouts = policy.timeouts.clone().unwrap_or_default();
        RequestPolicy {
            request_timeout: timeouts.request.map(|d| d.get()).or(legacy_timeout),
            per_try_timeout: timeouts.per_try.map(|d| d.get()),
            idle_timeout: timeouts.idle.map(|d| d.get()),
            retry: policy
                .retries
                .as_ref()
                .map(|r| Retry::with_budget(r, budget(&r.budget))),
            fault: policy.fault.as_ref().map(Fault::compile),
            mirror: policy
                .mirror
                .as_ref()
                .zip(mirror_backend)
                .map(|(m, backend)| MirrorPolicy {
                    backend,
                    per_million: per_million(m.percent),
                }),
        }
    }

    /// The policy of requests that match no route: the destination's own sections.
    pub fn for_destination(
        policy: Option<&DestinationPolicy>,
        legacy_timeout: Option<Duration>,
        mirror_backend: Option<usize>,
        budget: impl FnOnce(&trellis_policy::RetryBudget) -> Arc<TpsBudget>,
    ) -> Self {
        match policy {
            Some(p) => Self::compile(
                &RoutePolicy::from(p),
                legacy_timeout,
                mirror_backend,
                budget,
            ),
            None => RequestPolicy {
                request_timeout: legacy_timeout,
                ..RequestPolicy::default()
            },
        }
    }

    /// Nothing but (at most) a request timeout: the request path's fast lane.
    pub fn is_plain(&self) -> bool {
        self.per_try_timeout.is_none()
            && self.idle_timeout.is_none()
            && self.retry.is_none()
            && self.fault.is_none()
            && self.mirror.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percents_become_exact_shares() {
        assert_eq!(per_million(100.0), 1_000_000);
        assert_eq!(per_million(0.5), 5_000);
        assert!(roll(1_000_000));
        assert!(!roll(0));
        let hits = (0..100_000).filter(|_| roll(per_million(10.0))).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
    }

    #[test]
    fn the_legacy_timeout_yields_to_the_policy() {
        let p: RoutePolicy = serde_json::from_str(r#"{"timeouts": {"request": "2s"}}"#).unwrap();
        let c = RequestPolicy::compile(&p, Some(Duration::from_secs(9)), None, retry::new_budget);
        assert_eq!(c.request_timeout, Some(Duration::from_secs(2)));
        let c = RequestPolicy::for_destination(
            None,
            Some(Duration::from_secs(9)),
            None,
            retry::new_budget,
        );
        assert_eq!(c.request_timeout, Some(Duration::from_secs(9)));
        assert!(c.is_plain());
    }
}
