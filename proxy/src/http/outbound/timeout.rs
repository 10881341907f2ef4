//! The two timeouts of the policy, per request: the request timeout (over every try and
//! backoff, until the response's headers) and the per-try timeout (one try).
//!
//! Not `tower::timeout::Timeout`: it takes one `Duration` when the stack is built, where ours
//! come from the request's destination and route; and it fails with a boxed `Elapsed` that
//! knows nothing of the try, where a per-try timeout must say which endpoint was too slow (so
//! outlier detection counts it and the retry avoids it): the try's future tells ([`Expire`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Sleep;
use tower::{Layer, Service};

use super::{Answer, Failure, Outbound};

/// A try's future that can say, when its time is up, what it was doing (and count it).
pub(super) trait Expire {
    /// The try took too long: its failure.
    fn expire(self: Pin<&mut Self>) -> Failure;
}

pin_project_lite::pin_project! {
    /// `inner` within an optional limit; when it passes, the failure `expired` makes of it.
    pub(super) struct Deadline<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        expired: fn(Pin<&mut F>) -> Failure,
    }
}

impl<F> Deadline<F> {
    pub(super) fn new(
        inner: F,
        limit: Option<Duration>,
        expired: fn(Pin<&mut F>) -> Failure,
    ) -> Self {
        Deadline {
            inner,
            sleep: limit.map(tokio::time::sleep),
            expired,
        }
    }
}

impl<F> Future for Deadline<F>
where
    F: Future<Output = Result<Answer, Failure>>,
{
    type Output = Result<Answer, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The inner future first: an answer that came with the deadline counts.
        if let Poll::Ready(done) = this.inner.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        match this.sleep.as_pin_mut() {
            Some(sleep) => {
                ready!(sleep.poll(cx));
                Poll::Ready(Err((this.expired)(this.inner)))
            }
            None => Poll::Pending,
        }
    }
}

/// Adds the request timeout.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RequestTimeoutLayer;

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner }
    }
}

/// The route's request timeout (504 `timeout` when it passes).
#[derive(Debug, Clone, Copy)]
pub(super) struct RequestTimeout<S> {
    inner: S,
}

impl<S> Service<Outbound> for RequestTimeout<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Failure;
    type Future = Deadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Outbound) -> Self::Future {
        let limit = req.policy().request_timeout;
        // Whichever try was under way, the request as a whole timed out.
        Deadline::new(self.inner.call(req), limit, |_| Failure::timeout())
    }
}

/// Adds the per-try timeout.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PerTryTimeoutLayer;

impl<S> Layer<S> for PerTryTimeoutLayer {
    type Service = PerTryTimeout<S>;

    fn layer(&self, inner: S) -> PerTryTimeout<S> {
        PerTryTimeout { inner }
    }
}

/// The route's per-try timeout: the try fails as a timeout of the endpoint it went to.
#[derive(Debug, Clone, Copy)]
pub(super) struct PerTryTimeout<S> {
    inner: S,
}

impl<S> Service<Outbound> for PerTryTimeout<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure>,
    S::Future: Expire,
{
    type Response = Answer;
    type Error = Failure;
    type Future = Deadline<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Outbound) -> Self::Future {
        let limit = req.policy().per_try_timeout;
        Deadline::new(self.inner.call(req), limit, Expire::expire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::http::Reason;

    /// A try that never ends, and says which endpoint it waited for when it expires.
    struct Stuck;

    impl Future for Stuck {
        type Output = Result<Answer, Failure>;

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            Poll::Pending
        }
    }

    impl Expire for Stuck {
        fn expire(self: Pin<&mut Self>) -> Failure {
            Failure::before_sending(Reason::Timeout, Some(7))
        }
    }

    #[tokio::test]
    async fn a_deadline_fails_through_the_try_once_it_passes_and_never_without_a_limit() {
        let started = Instant::now();
        let limit = Duration::from_millis(20);
        let f = Deadline::new(Stuck, Some(limit), Expire::expire)
            .await
            .unwrap_err();
        assert!(started.elapsed() >= limit);
        assert_eq!(
            f.backend,
            Some(7),
            "the try said which backend it waited for"
        );

        // An end the inner future has already reached beats a deadline that has passed too.
        let done = std::future::ready(Err(Failure::before_sending(Reason::NoEndpoints, None)));
        let f = Deadline::new(done, Some(Duration::ZERO), |_| Failure::timeout())
            .await
            .unwrap_err();
        assert_eq!(f.reason, Reason::NoEndpoints);

        let unbounded = Deadline::new(Stuck, None, |_| Failure::timeout());
        assert!(
            tokio::time::timeout(Duration::from_millis(30), unbounded)
                .await
                .is_err(),
            "no limit: the try takes what it takes"
        );
    }
}
