//! The retry stage: tower's `Retry` with [`RetryPolicy`], which reads the route's retry
//! settings ([`crate::resilience::Retry`]) from each request.
//!
//! The budget semantics are the resilience module's: a request pays into the budget once, when
//! its first try leaves (the policy's first `clone_request`), every retry withdraws, and a
//! retry the budget refuses is counted as `budget-exhausted`. Each retry waits its backoff
//! (the policy's future) and avoids the endpoint that just failed.

use std::sync::Arc;

use tokio::time::Sleep;

use super::{Answer, Failure, Outbound, Sendable};
use crate::resilience::retry::{Outcome, grpc_status};

/// Which tries are retried, for tower's `Retry`. Zero-sized: what a request has spent lives on
/// the request ([`Outbound::retried`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RetryPolicy;

impl tower::retry::Policy<Outbound, Answer, Failure> for RetryPolicy {
    type Future = Sleep;

    /// `req` is the copy made for the next try: it learns the count and the endpoint to avoid.
    fn retry(&mut self, req: &mut Outbound, result: &mut Result<Answer, Failure>) -> Option<Sleep> {
        let (outcome, tried) = match result {
            Ok(a) => (
                Outcome::Answer(a.resp.status(), grpc_status(a.resp.headers())),
                Some(a.chosen),
            ),
            // Not retryable whatever the policy (the client's fault...).
            Err(f) => (f.outcome?, f.endpoint),
        };
        let backoff = {
            let retry = req.policy().retry.as_ref()?;
            if req.retried >= retry.attempts || !retry.retryable(outcome) {
                return None;
            }
            if !retry.withdraw() {
                req.shared
                    .metrics
                    .retry(&req.dest.label, "budget-exhausted");
                return None;
            }
            req.shared.metrics.retry(&req.dest.label, "retried");
            retry.backoff(req.retried + 1)
        };
        req.retried += 1;
        req.avoid = tried;
        // The failed try's answer is dropped before the wait (tower drops `result` then).
        Some(tokio::time::sleep(backoff))
    }

    /// A copy of a request whose body was kept and whose route retries it; none for the others
    /// (tower then sends them once, with nothing kept).
    fn clone_request(&mut self, req: &Outbound) -> Option<Outbound> {
        if !req.retryable {
            return None;
        }
        let Sendable::Kept(kept) = &req.req else {
            return None;
        };
        if req.retried == 0 {
            // The first copy is made as the first try leaves: the request pays in.
            req.policy().retry.as_ref()?.deposit();
        }
        Some(Outbound {
            shared: Arc::clone(&req.shared),
            dest: Arc::clone(&req.dest),
            route: req.route,
            req: Sendable::Kept(Arc::clone(kept)),
            client_http2: req.client_http2,
            upgrading: req.upgrading,
            avoid: req.avoid,
            retryable: true,
            retried: req.retried,
        })
    }
}
