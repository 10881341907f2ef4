//! The endpoint stage, innermost: one try. Split (the route's backends by weight), balance
//! (skipping ejected, full and just-failed endpoints), then send over the plaintext or mTLS
//! client, and classify how the try ended ([`Failure`]: the reason answered, the outcome the
//! retry and outlier detection see).
//!
//! Everything up to the send is synchronous, in `call`; the future only waits for the
//! response's headers, and can say which endpoint it waited for when a per-try timeout
//! expires ([`Expire`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use http::Request;
use tower::Service;

use super::timeout::Expire;
use super::{Answer, Chosen, Failure, Outbound, Target, aim, called_port};
use crate::balance::InFlight;
use crate::http::Reason;
use crate::http::body::{IdleTimeout, RequestBody};
use crate::pool::{ResponseFuture, UpstreamError};
use crate::resilience::breaker::Overloaded;
use crate::resilience::retry::Outcome;
use crate::state::Shared;
use crate::table::{DestinationTable, PickError};
use crate::tls::{TlsError, find_cause, find_tls_error};

/// Sends one try to an endpoint of the request's route.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Endpoint;

impl Service<Outbound> for Endpoint {
    type Response = Answer;
    type Error = Failure;
    type Future = EndpointFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // The clients pool and queue on their own.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Outbound) -> EndpointFuture {
        send(
            &req.shared,
            req.dest,
            req.req.into_request(),
            Target::Split(req.route),
            req.avoid,
            req.client_http2,
        )
    }
}

/// A try: failed before sending, or waiting for the response's headers.
#[derive(Debug)]
pub(super) struct EndpointFuture(State);

#[derive(Debug)]
enum State {
    Failed(Failure),
    Sending(Sending),
    Done,
}

/// A try sent to an endpoint.
#[derive(Debug)]
struct Sending {
    sent: ResponseFuture,
    in_flight: InFlight,
    chosen: Chosen,
    dest: Arc<DestinationTable>,
    /// Raised when reading the client's body failed (the client's fault, not the endpoint's).
    body_failed: Arc<AtomicBool>,
}

/// One try: split, balance, connect and send (see the module doc).
pub(super) fn send(
    shared: &Shared,
    dest: Arc<DestinationTable>,
    mut req: Request<RequestBody>,
    target: Target,
    avoid: Option<Chosen>,
    client_http2: bool,
) -> EndpointFuture {
    let failed = |f| EndpointFuture(State::Failed(f));
    let b = match target {
        Target::Split(route) => dest.split(route),
        Target::Backend(b) => Some(b),
    };
    let Some(b) = b else {
        return failed(Failure::before_sending(Reason::NoBackends, None));
    };
    let backend = &dest.backends[b];
    let avoid = avoid.filter(|c| c.backend == b).map(|c| c.endpoint);
    let e = match backend.pick_for(avoid, dest.breaker.as_ref()) {
        Ok(e) => e,
        Err(PickError::NoEndpoints) => {
            return failed(Failure::before_sending(Reason::NoEndpoints, Some(b)));
        }
        Err(PickError::Overloaded) => {
            return failed(Failure::before_sending(Reason::Overloaded, Some(b)));
        }
    };
    let endpoint = &backend.endpoints[e];
    let chosen = Chosen {
        backend: b,
        endpoint: e,
    };
    // mTLS when the endpoint has an identity and this proxy has an identity source; without a
    // source the proxy is outside the mesh and talks plaintext.
    let expected = endpoint
        .identity
        .as_ref()
        .filter(|_| shared.identity.is_configured());
    if expected.is_some() && shared.identity.current().is_none() {
        return failed(Failure {
            endpoint: Some(chosen),
            ..Failure::before_sending(Reason::NoIdentity, Some(b))
        });
    }
    // Outside the mesh: the endpoint's host at the port called (or the one TLS is originated
    // to). When the proxy originates the TLS it offers `h2` and `http/1.1` and the server
    // chooses: the request is aimed as HTTP/1.1 here and reshaped for HTTP/2 by the pool when
    // the connection negotiated it.
    let outside = match &dest.external {
        Some(external) => {
            let port = external.port(called_port(req.uri(), req.headers()));
            let authority =
                port.and_then(|p| crate::external::endpoint_authority(&endpoint.authority, p));
            let Some((port, authority)) = port.zip(authority) else {
                return failed(Failure::before_sending(Reason::EgressForbidden, Some(b)));
            };
            let origin = port
                .originate_tls_port
                .and_then(|_| external.origin(crate::tls::Alpn::Any));
            Some((authority, origin))
        }
        None => None,
    };
    let http2 = match &outside {
        Some((_, Some(_))) => false,
        _ => endpoint.http2 || client_http2,
    };
    let authority = match &outside {
        Some((authority, _)) => authority.clone(),
        None => endpoint.authority.clone(),
    };
    if let Err(e) = aim(&mut req, authority, http2) {
        tracing::warn!(error = %e, "could not build the upstream request");
        return failed(Failure::before_sending(Reason::UpstreamFailed, Some(b)));
    }
    let body_failed = req.body().failed_flag();
    let in_flight = endpoint.stats.start();
    let own = shared
        .upstreams
        .for_destination(&dest.key, dest.breaker.as_ref());
    let clients = own.as_deref().unwrap_or(shared.upstreams.shared());
    let sent = match (outside, expected) {
        (Some((_, Some((config, server_name)))), _) => clients
            .origin(config, server_name, &shared.metrics)
            .request(req),
        (_, Some(expected)) => clients
            .mesh(expected, http2, &shared.identity, &shared.metrics)
            .request(req),
        (_, None) => clients.plain(http2).request(req),
    };
    EndpointFuture(State::Sending(Sending {
        sent,
        in_flight,
        chosen,
        dest,
        body_failed,
    }))
}

impl Future for EndpointFuture {
    type Output = Result<Answer, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match &mut self.0 {
            State::Sending(s) => ready!(Pin::new(&mut s.sent).poll(cx)),
            State::Failed(_) => {
                let State::Failed(f) = std::mem::replace(&mut self.0, State::Done) else {
                    unreachable!("matched above")
                };
                return Poll::Ready(Err(f));
            }
            State::Done => panic!("a try's future polled after its end"),
        };
        let State::Sending(s) = std::mem::replace(&mut self.0, State::Done) else {
            unreachable!("matched above")
        };
        Poll::Ready(s.finish(result))
    }
}

impl Sending {
    /// How the try ended: the answer, or the failure classified.
    fn finish(
        self,
        result: Result<http::Response<hyper::body::Incoming>, UpstreamError>,
    ) -> Result<Answer, Failure> {
        let Sending {
            in_flight,
            chosen,
            dest,
            body_failed,
            ..
        } = self;
        let counts = dest.ejection_counts;
        let e = match result {
            Ok(resp) => {
                in_flight.record_answer(resp.status(), counts);
                return Ok(Answer {
                    resp,
                    in_flight,
                    chosen,
                });
            }
            Err(e) => e,
        };
        let client_fault = body_failed.load(Ordering::Relaxed);
        let reason = match find_tls_error(&e) {
            _ if client_fault => Reason::BadRequest,
            _ if find_cause::<Overloaded>(&e).is_some() => Reason::Overloaded,
            Some(TlsError::NoIdentity) => Reason::NoIdentity,
            Some(TlsError::IdentityMismatch) => Reason::IdentityMismatch,
            Some(TlsError::Connect(_)) => Reason::ConnectFailed,
            Some(TlsError::Timeout | TlsError::Handshake(_)) => Reason::TlsFailed,
            None if e.is_connect() => Reason::ConnectFailed,
            None if find_cause::<IdleTimeout>(&e).is_some() => Reason::Timeout,
            None => Reason::UpstreamFailed,
        };
        let endpoint = &dest.backends[chosen.backend].endpoints[chosen.endpoint];
        tracing::debug!(destination = %dest.key, endpoint = %endpoint.authority, error = %e, "upstream request failed");
        let outcome = match reason {
            Reason::BadRequest | Reason::NoIdentity | Reason::Overloaded => None,
            Reason::ConnectFailed | Reason::TlsFailed | Reason::IdentityMismatch => {
                Some(Outcome::ConnectFailure)
            }
            Reason::Timeout => Some(Outcome::Timeout),
            _ => Some(Outcome::Reset),
        };
        if let Some(o) = outcome {
            in_flight.record_failure(o, counts);
        }
        Err(Failure {
            outcome,
            endpoint: Some(chosen),
            ..Failure::before_sending(reason, Some(chosen.backend))
        })
    }
}

impl Expire for EndpointFuture {
    /// The per-try timeout passed while waiting: a timeout of the endpoint, counted on it.
    fn expire(self: Pin<&mut Self>) -> Failure {
        match std::mem::replace(&mut self.get_mut().0, State::Done) {
            State::Sending(s) => {
                s.in_flight
                    .record_failure(Outcome::Timeout, s.dest.ejection_counts);
                // Dropping the try here gives its connection up at once.
                Failure {
                    outcome: Some(Outcome::Timeout),
                    endpoint: Some(s.chosen),
                    ..Failure::before_sending(Reason::Timeout, Some(s.chosen.backend))
                }
            }
            // A try that failed before sending is never pending (so never expires).
            State::Failed(f) => f,
            State::Done => Failure::timeout(),
        }
    }
}
