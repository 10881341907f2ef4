//! The breaker stage: a place among the destination's requests in flight (`maxRequests`),
//! held until the response's headers, however many tries the request takes; refused at once
//! (`503 overloaded`) when there is none.
//!
//! Not `tower::limit::ConcurrencyLimit`: it waits for a place, and a breaker must not queue.
//! The per-endpoint and connection limits are applied further in (balance, connector).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{Answer, Failure, Outbound};
use crate::http::Reason;
use crate::resilience::breaker::RequestPermit;

/// Adds the breaker stage.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BreakerLayer;

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService { inner }
    }
}

/// Admits requests under their destination's breaker.
#[derive(Debug, Clone, Copy)]
pub(super) struct BreakerService<S> {
    inner: S,
}

pin_project_lite::pin_project! {
    /// The request sent (with its place, when the destination has a breaker), or refused.
    #[project = BreakerProj]
    pub(super) enum BreakerFuture<F> {
        Sent { #[pin] inner: F, permit: Option<RequestPermit> },
        Refused { failure: Option<Failure> },
    }
}

impl<S> Service<Outbound> for BreakerService<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure>,
{
    type Response = Answer;
    type Error = Failure;
    type Future = BreakerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Outbound) -> Self::Future {
        let permit = match req.dest.breaker.as_ref().map(|b| b.admit()) {
            None => None,
            Some(Ok(permit)) => Some(permit),
            Some(Err(why)) => {
                tracing::debug!(destination = %req.dest.key, %why, "circuit breaker refused a request");
                return BreakerFuture::Refused {
                    failure: Some(Failure::before_sending(Reason::Overloaded, None)),
                };
            }
        };
        BreakerFuture::Sent {
            inner: self.inner.call(req),
            permit,
        }
    }
}

impl<F> Future for BreakerFuture<F>
where
    F: Future<Output = Result<Answer, Failure>>,
{
    type Output = Result<Answer, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BreakerProj::Sent { inner, permit } => {
                let answer = std::task::ready!(inner.poll(cx));
                // The place is freed when the response's headers are in (or the request failed).
                permit.take();
                Poll::Ready(answer)
            }
            BreakerProj::Refused { failure } => Poll::Ready(Err(failure
                .take()
                .expect("a refused request's future is polled to its end once"))),
        }
    }
}
