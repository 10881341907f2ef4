//! The fault stage: the route's injected delays and aborts, decided before anything is sent
//! or counted by the breaker. An abort ends the request here (a [`Failure`] carrying the
//! [`Abort`], answered by [`fault_answer`]); a delay holds it, then hands it on.
//!
//! The request body's idle timeout is armed here, after the delay: an injected delay longer
//! than the idle timeout must not cut a body the client has not had the chance to send.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};
use tower::{Layer, Service};

use super::{Answer, Failure, Outbound, Sendable};
use crate::http::body::ProxyBody;
use crate::http::{ERROR_HEADER, Reason, local};
use crate::metrics::Label;
use crate::resilience::fault::Abort;
use crate::state::Shared;
use crate::table::DestinationTable;

/// Adds the fault stage.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FaultLayer;

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService { inner }
    }
}

/// Injects the route's faults into the requests they select.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultService<S> {
    inner: S,
}

pin_project_lite::pin_project! {
    /// The request without fault (handed on at once), delayed, or aborted.
    #[project = FaultProj]
    pub(super) enum FaultFuture<S>
    where
        S: Service<Outbound>,
    {
        Pass { #[pin] inner: S::Future },
        Delay { #[pin] sleep: tokio::time::Sleep, inner: S, req: Option<Outbound> },
        Abort { abort: Abort },
    }
}

impl<S> Service<Outbound> for FaultService<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure> + Clone,
{
    type Response = Answer;
    type Error = Failure;
    type Future = FaultFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Outbound) -> FaultFuture<S> {
        // The dice decide before anything is sent: the delay's now, the abort's after it.
        let delay = match &req.policy().fault {
            Some(fault) => {
                let own = req
                    .shared
                    .identity
                    .current()
                    .map(|g| g.identity_label.clone());
                fault
                    .applies(own.as_deref(), req.req.headers())
                    .then(|| fault.delay())
            }
            None => None,
        };
        match delay {
            // Not selected: the fast lane.
            None => FaultFuture::Pass {
                inner: self.inner.call(arm_idle(req)),
            },
            Some(Some(delay)) => {
                // The service made ready goes with the request; this one keeps a fresh clone.
                let clone = self.inner.clone();
                FaultFuture::Delay {
                    sleep: tokio::time::sleep(delay),
                    inner: std::mem::replace(&mut self.inner, clone),
                    req: Some(req),
                }
            }
            Some(None) => match abort(&req) {
                Some(abort) => FaultFuture::Abort { abort },
                None => FaultFuture::Pass {
                    inner: self.inner.call(arm_idle(req)),
                },
            },
        }
    }
}

impl<S> Future for FaultFuture<S>
where
    S: Service<Outbound, Response = Answer, Error = Failure>,
{
    type Output = Result<Answer, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                FaultProj::Pass { inner } => return inner.poll(cx),
                FaultProj::Abort { abort } => return Poll::Ready(Err(aborted(*abort))),
                FaultProj::Delay { sleep, inner, req } => {
                    ready!(sleep.poll(cx));
                    let req = req.take().expect("a delayed request is sent once");
                    if let Some(abort) = abort(&req) {
                        return Poll::Ready(Err(aborted(abort)));
                    }
                    let sent = inner.call(arm_idle(req));
                    self.set(FaultFuture::Pass { inner: sent });
                }
            }
        }
    }
}

/// The abort for this request, if the route has one and the dice say so.
fn abort(req: &Outbound) -> Option<Abort> {
    req.policy().fault.as_ref().and_then(|f| f.abort())
}

fn aborted(abort: Abort) -> Failure {
    Failure {
        fault: Some(abort),
        ..Failure::before_sending(Reason::FaultInjected, None)
    }
}

/// Start the request body's idle clock (the route's `timeouts.idle`).
fn arm_idle(mut req: Outbound) -> Outbound {
    if let Some(idle) = req.policy().idle_timeout {
        req.req = match req.req {
            Sendable::Once(r) => Sendable::Once(r.map(|b| b.with_idle_timeout(Some(idle)))),
            kept => kept,
        };
    }
    req
}

/// The answer an injected abort gives: the HTTP status, or a trailers-only gRPC status.
pub(super) fn fault_answer(
    shared: &Shared,
    dest: &DestinationTable,
    route: Label,
    abort: Abort,
    started: Instant,
) -> Response<ProxyBody> {
    let mut resp = match abort {
        Abort::Http(status) => {
            let mut resp = local(
                Reason::FaultInjected,
                "fault injected by the traffic policy",
            );
            *resp.status_mut() = status;
            resp
        }
        Abort::Grpc(code) => {
            let mut resp = Response::new(ProxyBody::Local(None));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("trellis-proxy: fault injected by the traffic policy"),
            );
            resp
        }
    };
    resp.headers_mut().insert(
        ERROR_HEADER,
        HeaderValue::from_static(Reason::FaultInjected.as_str()),
    );
    crate::http::record_dest_error(
        shared,
        dest,
        None,
        route,
        resp.status().as_u16(),
        Reason::FaultInjected,
        started,
        None,
    );
    resp
}
