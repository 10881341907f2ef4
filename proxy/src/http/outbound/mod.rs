//! The outbound request path, in the order the policy applies:
//!
//! route -> fault -> breaker (destination) -> mirror -> request timeout -> retry (budget) ->
//! per-try timeout -> split -> balance (skipping ejected, full and just-failed endpoints) ->
//! connect (mTLS).
//!
//! Each stage is a small function over the request; the stages that need a policy are skipped
//! when the destination has none, so a request without policy takes the same steps as before
//! policies existed (the fast lane, measured in `scripts/bench/proxy`). Rate limits are not
//! here: they protect the destination's instances, so its own proxy enforces them
//! ([`super::inbound`]).
//!
//! Errors are mapped to responses once, at the end ([`Failure`] -> `x-trellis-error`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use super::body::{IdleTimeout, Keep, KeptBody, ProxyBody, RequestBody};
use super::{
    ERROR_HEADER, Reason, dest_error, finish_response, is_upgrade, label_bool, label_empty,
    label_outbound, local, malformed, outbound_error, own_identity, strip_hop_by_hop,
};
use crate::balance::InFlight;
use crate::config::Protocol;
use crate::metrics::{RequestLabels, SeriesOf};
use crate::resilience::breaker::Overloaded;
use crate::resilience::fault::Abort;
use crate::resilience::retry::{Outcome, grpc_status};
use crate::resilience::{RequestPolicy, Retry, roll};
use crate::state::Shared;
use crate::table::{DestinationTable, Lookup, PickError, RouteRef};
use crate::tls::{TlsError, find_cause, find_tls_error};

/// Copies of requests in flight to mirrors, process-wide: a slow or stalled mirror costs at
/// most this many tasks and bodies; beyond it, requests are not copied.
const MAX_MIRRORS_IN_FLIGHT: usize = 256;
static MIRRORS: Semaphore = Semaphore::const_new(MAX_MIRRORS_IN_FLIGHT);

/// Where a try goes: the route's split, or one backend (a mirror).
#[derive(Debug, Clone, Copy)]
enum Target {
    Split(RouteRef),
    Backend(usize),
}

/// An endpoint of a destination, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chosen {
    backend: usize,
    endpoint: usize,
}

/// A try that got a response.
struct Answer {
    resp: Response<Incoming>,
    in_flight: InFlight,
    chosen: Chosen,
}

/// A try (or the request) that failed before a response.
#[derive(Debug)]
struct Failure {
    reason: Reason,
    /// The backend (and endpoint) tried, when one was.
    backend: Option<usize>,
    endpoint: Option<Chosen>,
    /// What retries see (None: not retryable whatever the policy, e.g. the client's fault).
    outcome: Option<Outcome>,
}

impl Failure {
    fn before_sending(reason: Reason, backend: Option<usize>) -> Self {
        Failure {
            reason,
            backend,
            endpoint: None,
            outcome: None,
        }
    }
}

/// What every try of one request shares.
struct Ctx<'a> {
    shared: &'a Shared,
    dest: &'a DestinationTable,
    /// The client spoke HTTP/2 (h2 clients get h2 upstreams unless the destination is opaque).
    client_http2: bool,
    /// A WebSocket upgrade (never retried, never mirrored).
    upgrading: bool,
    idle: Option<Duration>,
}

/// Route and send one outbound request.
pub(super) async fn outbound(
    shared: &Arc<Shared>,
    fixed: Option<&str>,
    mut req: Request<Incoming>,
    started: Instant,
    mut hop: Option<&mut crate::trace::Hop>,
) -> Response<ProxyBody> {
    if let Some(problem) = malformed(&req) {
        return outbound_error(shared, Reason::BadRequest, problem, started);
    }
    let dest = match find_or_resolve(shared, fixed, &req).await {
        Ok(d) => d,
        Err(resp) => return outbound_error(shared, resp.0, &resp.1, started),
    };
    let route = dest.match_route(req.method(), req.uri().path(), req.headers());
    let policy = dest.route_policy(route);
    let route_label = dest.route_name(route).clone();

    // Fault: the dice decide before anything is sent.
    if let Some(fault) = &policy.fault {
        let own = shared.identity.current().map(|g| g.identity_label.clone());
        if fault.applies(own.as_deref(), req.headers()) {
            if let Some(delay) = fault.delay() {
                tokio::time::sleep(delay).await;
            }
            if let Some(abort) = fault.abort() {
                return fault_answer(shared, &dest, route_label, abort, started);
            }
        }
    }
    // Breaker: requests in flight to the destination (until their response headers).
    let _permit = match dest.breaker.as_ref().map(|b| b.admit()) {
        Some(Err(why)) => {
            tracing::debug!(destination = %dest.key, %why, "circuit breaker refused a request");
            return dest_error(
                shared,
                &dest,
                None,
                route_label,
                Reason::Overloaded,
                started,
                None,
            );
        }
        Some(Ok(permit)) => Some(permit),
        None => None,
    };

    if let Some(hop) = hop.as_deref_mut() {
        hop.propagate(&dest, req.headers_mut());
    }
    let upgrading = is_upgrade(&req);
    let upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let ctx = Ctx {
        shared,
        dest: &dest,
        client_http2: req.version() == Version::HTTP_2 && dest.protocol != Protocol::Tcp,
        upgrading,
        idle: policy.idle_timeout,
    };
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, upgrading);
    let tally = crate::observe::Tally::of_parts(&parts);
    let body = RequestBody::new(body, tally.clone()).with_idle_timeout(policy.idle_timeout);

    let sent = if policy.is_plain() {
        // The fast lane: one try, at most a request timeout.
        let req = Request::from_parts(parts, body);
        within(
            policy.request_timeout,
            attempt(&ctx, req, Target::Split(route), None, None),
        )
        .await
    } else {
        with_policy(shared, &ctx, policy, route, parts, body).await
    };

    let Answer {
        mut resp,
        in_flight,
        chosen,
    } = match sent {
        Ok(answer) => answer,
        Err(failure) => {
            let mesh = failure
                .endpoint
                .and_then(|c| mesh_identity(shared, &dest, c));
            if let Some(c) = failure.endpoint {
                let b = &dest.backends[c.backend];
                let endpoint = &b.endpoints[c.endpoint];
                if let Some(hop) = hop {
                    hop.upstream(&dest, b, endpoint, &route_label);
                }
                if let Some(tally) = &tally {
                    choose(tally, b, endpoint);
                }
            }
            let backend = failure.backend.map(|b| &dest.backends[b]);
            return dest_error(
                shared,
                &dest,
                backend,
                route_label,
                failure.reason,
                started,
                mesh,
            );
        }
    };
    let backend = &dest.backends[chosen.backend];
    let endpoint = &backend.endpoints[chosen.endpoint];
    let mesh = mesh_identity(shared, &dest, chosen);
    if let Some(hop) = hop {
        hop.upstream(&dest, backend, endpoint, &route_label);
    }
    if let Some(tally) = &tally {
        choose(tally, backend, endpoint);
    }
    let upgrade = upgrade.filter(|_| resp.version() != Version::HTTP_2);
    finish_response(&mut resp, upgrade, shared.limits.tcp_idle_timeout());
    let status = resp.status().as_u16();
    let source_identity = own_identity(shared, mesh.is_some());
    let destination_identity = mesh.clone().unwrap_or_else(label_empty);
    backend.series.record(
        &shared.metrics,
        SeriesOf {
            route: &route_label,
            status,
            destination_identity: &destination_identity,
            source_identity: &source_identity,
        },
        || RequestLabels {
            direction: label_outbound(),
            source_namespace: shared.metrics.source.namespace.clone(),
            source_kind: shared.metrics.source.kind.clone(),
            source_workload: shared.metrics.source.workload.clone(),
            destination: dest.label.clone(),
            destination_namespace: backend.workload.namespace.clone(),
            destination_kind: backend.workload.kind.clone(),
            destination_workload: backend.workload.name.clone(),
            backend: backend.name.clone(),
            route: route_label.clone(),
            response_code: status,
            error: label_empty(),
            source_identity: source_identity.clone(),
            destination_identity: destination_identity.clone(),
            tls: label_bool(mesh.is_some()),
        },
        started.elapsed().as_secs_f64() * 1000.0,
    );
    let idle = ctx.idle;
    resp.map(|body| ProxyBody::upstream(body, Some(in_flight), idle))
}

/// Tell the access log / tap which endpoint the request went to.
fn choose(
    tally: &crate::observe::Tally,
    backend: &crate::table::BackendTable,
    endpoint: &crate::table::EndpointTable,
) {
    tally.choose(
        endpoint.authority.as_str(),
        endpoint.identity.as_deref(),
        Some((
            backend.workload.namespace.as_str(),
            backend.workload.name.as_str(),
        )),
    );
}

/// The expected SPIFFE id of an endpoint when the request to it goes over mTLS.
fn mesh_identity(
    shared: &Shared,
    dest: &DestinationTable,
    c: Chosen,
) -> Option<crate::metrics::Label> {
    dest.backends[c.backend].endpoints[c.endpoint]
        .identity
        .clone()
        .filter(|_| shared.identity.is_configured())
}

/// The destination a request names, asking the controller about unknown ones.
async fn find_or_resolve(
    shared: &Shared,
    fixed: Option<&str>,
    req: &Request<Incoming>,
) -> Result<Arc<DestinationTable>, (Reason, String)> {
    match find(shared, fixed, req) {
        Ok(d) => Ok(d),
        Err(Miss::Unknown(key)) if shared.resolver.is_some() => {
            if let Some(resolver) = &shared.resolver {
                resolver.resolve(&key).await;
            }
            find(shared, fixed, req).map_err(|_| (Reason::UnknownDestination, key))
        }
        Err(Miss::Unknown(key)) => Err((Reason::UnknownDestination, key)),
        Err(Miss::Invalid(e)) => Err((Reason::InvalidAuthority, e)),
        Err(Miss::NoAuthority) => Err((Reason::NoAuthority, "no Host header".into())),
    }
}

enum Miss {
    NoAuthority,
    Invalid(String),
    Unknown(String),
}

fn find(
    shared: &Shared,
    fixed: Option<&str>,
    req: &Request<Incoming>,
) -> Result<Arc<DestinationTable>, Miss> {
    let target = match fixed {
        Some(f) => f,
        None => match req.uri().authority() {
            Some(a) => a.as_str(),
            None => match req.headers().get(HOST).and_then(|h| h.to_str().ok()) {
                Some(h) => h,
                None => return Err(Miss::NoAuthority),
            },
        },
    };
    let table = shared.table.load();
    match table.lookup(target) {
        Lookup::Found(d) => Ok(d),
        Lookup::Unknown(key) => Err(Miss::Unknown(key)),
        Lookup::Invalid(e) => Err(Miss::Invalid(e.to_string())),
    }
}

/// `fut` within `limit` (504 `timeout` when it passes), or as is.
async fn within(
    limit: Option<Duration>,
    fut: impl Future<Output = Result<Answer, Failure>>,
) -> Result<Answer, Failure> {
    match limit {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(Failure {
                reason: Reason::Timeout,
                backend: None,
                endpoint: None,
                outcome: Some(Outcome::Timeout),
            })
        }),
    }
}

/// The stages a policy adds: keep the body (for retries and the mirror), copy to the mirror,
/// then the tries under the request timeout.
async fn with_policy(
    shared: &Arc<Shared>,
    ctx: &Ctx<'_>,
    policy: &RequestPolicy,
    route: RouteRef,
    parts: http::request::Parts,
    body: RequestBody,
) -> Result<Answer, Failure> {
    let retry = policy
        .retry
        .as_ref()
        .filter(|r| !ctx.upgrading && r.retries_method(&parts.method));
    let mirror = policy
        .mirror
        .as_ref()
        .filter(|m| !ctx.upgrading && roll(m.per_million));
    if retry.is_none() && mirror.is_none() {
        let req = Request::from_parts(parts, body);
        return within(
            policy.request_timeout,
            attempt(ctx, req, Target::Split(route), None, policy.per_try_timeout),
        )
        .await;
    }
    let limit = retry.map_or(DEFAULT_MIRROR_BODY_BYTES, |r| r.max_body_bytes);
    let content_length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let kept = match body.keep(content_length, limit).await {
        Keep::Kept(kept) => kept,
        Keep::TooLarge(body) => {
            // Sent once, as it streams: too large to send twice.
            let req = Request::from_parts(parts, body);
            return within(
                policy.request_timeout,
                attempt(ctx, req, Target::Split(route), None, policy.per_try_timeout),
            )
            .await;
        }
        Keep::Failed => return Err(Failure::before_sending(Reason::BadRequest, None)),
    };
    if let Some(m) = mirror {
        copy_to_mirror(shared, ctx.dest, m.backend, &parts, &kept);
    }
    let tries = tries(ctx, retry, route, &parts, &kept, policy.per_try_timeout);
    within(policy.request_timeout, tries).await
}

/// The largest body copied to a mirror when no retry policy says otherwise.
const DEFAULT_MIRROR_BODY_BYTES: usize = 64 * 1024;

/// The first try, and retries while the policy and its budget allow: each retry waits its
/// backoff and avoids the endpoint that just failed.
async fn tries(
    ctx: &Ctx<'_>,
    retry: Option<&Retry>,
    route: RouteRef,
    parts: &http::request::Parts,
    kept: &KeptBody,
    per_try: Option<Duration>,
) -> Result<Answer, Failure> {
    let send = |avoid| {
        let req = Request::from_parts(parts.clone(), RequestBody::kept(kept));
        attempt(ctx, req, Target::Split(route), avoid, per_try)
    };
    let Some(retry) = retry else {
        return send(None).await;
    };
    retry.deposit();
    let first = send(None).await;
    retries(ctx, retry, &send, first).await
}

/// Retry `last` while the outcome is retryable, attempts remain and the budget pays.
async fn retries<F, Fut>(
    ctx: &Ctx<'_>,
    retry: &Retry,
    send: &F,
    mut last: Result<Answer, Failure>,
) -> Result<Answer, Failure>
where
    F: Fn(Option<Chosen>) -> Fut,
    Fut: Future<Output = Result<Answer, Failure>>,
{
    let mut retried = 0;
    loop {
        let (outcome, tried) = match &last {
            Ok(a) => (
                Outcome::Answer(a.resp.status(), grpc_status(a.resp.headers())),
                Some(a.chosen),
            ),
            Err(f) => match f.outcome {
                Some(o) => (o, f.endpoint),
                None => return last,
            },
        };
        if retried >= retry.attempts || !retry.retryable(outcome) {
            return last;
        }
        if !retry.withdraw() {
            ctx.shared
                .metrics
                .retry(&ctx.dest.label, "budget-exhausted");
            return last;
        }
        drop(last);
        retried += 1;
        ctx.shared.metrics.retry(&ctx.dest.label, "retried");
        tokio::time::sleep(retry.backoff(retried)).await;
        last = send(tried).await;
    }
}

/// Send a copy to the mirror backend in the background: its answer is dropped, its failure
/// only logged, and nothing waits for it.
fn copy_to_mirror(
    shared: &Arc<Shared>,
    dest: &DestinationTable,
    backend: usize,
    parts: &http::request::Parts,
    kept: &KeptBody,
) {
    let Ok(slot) = MIRRORS.try_acquire() else {
        tracing::debug!(destination = %dest.key, "mirror skipped: {MAX_MIRRORS_IN_FLIGHT} copies in flight");
        return;
    };
    slot.forget();
    let shared = Arc::clone(shared);
    let key = dest.key.clone();
    let name = dest.backends[backend].name.clone();
    let mut parts = parts.clone();
    // The copy is not the original: no access-log record of its own.
    parts.extensions = http::Extensions::new();
    let kept = kept.clone();
    tokio::spawn(async move {
        let _slot = MirrorSlot;
        // The table in force now, which a controller update may have changed since the request
        // was routed: the mirror backend is found again by name (its index is the old table's),
        // and a copy whose mirror was removed meanwhile is dropped.
        let Some(dest) = lookup_key(&shared, &key) else {
            return;
        };
        let Some(backend) = dest.backend_named(&name) else {
            tracing::debug!(destination = %key, backend = %name.as_str(), "mirror copy dropped: the mirror backend is gone");
            return;
        };
        let ctx = Ctx {
            shared: &shared,
            dest: &dest,
            client_http2: parts.version == Version::HTTP_2 && dest.protocol != Protocol::Tcp,
            upgrading: false,
            idle: None,
        };
        let req = Request::from_parts(parts, RequestBody::kept(&kept));
        let sent = within(
            Some(MIRROR_TIMEOUT),
            attempt(&ctx, req, Target::Backend(backend), None, None),
        )
        .await;
        match sent {
            Ok(answer) => {
                // Read the answer to its end so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(answer.resp.into_body()).await;
            }
            Err(f) => {
                tracing::debug!(destination = %key, reason = f.reason.as_str(), "mirror copy failed")
            }
        }
    });
}

/// The longest a mirror copy may take (its slot is freed then).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

struct MirrorSlot;

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        MIRRORS.add_permits(1);
    }
}

fn lookup_key(shared: &Shared, key: &str) -> Option<Arc<DestinationTable>> {
    match shared.table.load().lookup(key) {
        Lookup::Found(d) => Some(d),
        _ => None,
    }
}

/// Headers that do not depend on the endpoint: hop-by-hop fields go, and the upstream's Host
/// is the routed authority (RFC 9112 3.2.2).
pub(super) fn prepare(parts: &mut http::request::Parts, upgrading: bool) {
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(HOST, v);
    }
    strip_hop_by_hop(&mut parts.headers, upgrading);
}

/// Point the request at one endpoint, in the HTTP version it speaks.
pub(super) fn aim(
    req: &mut Request<RequestBody>,
    authority: http::uri::Authority,
    http2: bool,
) -> Result<(), http::Error> {
    if http2 {
        // HTTP/2 names the authority in `:authority`, built from the URI below; a `host` field
        // beside it would differ (it names the service, `:authority` the endpoint), which strict
        // servers refuse (RFC 9113 8.3.1). No upgrades over h2.
        let headers = req.headers_mut();
        headers.remove(HOST);
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()?;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Ok(())
}

/// One try: split, balance, connect and send; the response's headers (or why none came).
async fn attempt(
    ctx: &Ctx<'_>,
    mut req: Request<RequestBody>,
    target: Target,
    avoid: Option<Chosen>,
    per_try: Option<Duration>,
) -> Result<Answer, Failure> {
    let shared = ctx.shared;
    let dest = ctx.dest;
    let b = match target {
        Target::Split(route) => dest.split(route),
        Target::Backend(b) => Some(b),
    };
    let Some(b) = b else {
        return Err(Failure::before_sending(Reason::NoBackends, None));
    };
    let backend = &dest.backends[b];
    let avoid = avoid.filter(|c| c.backend == b).map(|c| c.endpoint);
    let e = match backend.pick_for(avoid, dest.breaker.as_ref()) {
        Ok(e) => e,
        Err(PickError::NoEndpoints) => {
            return Err(Failure::before_sending(Reason::NoEndpoints, Some(b)));
        }
        Err(PickError::Overloaded) => {
            return Err(Failure::before_sending(Reason::Overloaded, Some(b)));
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
        return Err(Failure {
            endpoint: Some(chosen),
            ..Failure::before_sending(Reason::NoIdentity, Some(b))
        });
    }
    let http2 = endpoint.http2 || ctx.client_http2;
    if let Err(e) = aim(&mut req, endpoint.authority.clone(), http2) {
        tracing::warn!(error = %e, "could not build the upstream request");
        return Err(Failure::before_sending(Reason::UpstreamFailed, Some(b)));
    }
    let body_failed = req.body().failed_flag();
    let in_flight = endpoint.stats.start();
    let counts = dest.ejection_counts;
    let own = shared.clients_for(&dest.key, dest.breaker.as_ref());
    let clients = own.as_deref().unwrap_or(&shared.clients);
    let sent = match expected {
        Some(expected) => clients
            .mesh(expected, http2, &shared.identity, &shared.metrics)
            .request(req),
        None if http2 => clients.http2.request(req),
        None => clients.http1.request(req),
    };
    let result = match per_try {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => {
                in_flight.record_failure(Outcome::Timeout, counts);
                return Err(Failure {
                    reason: Reason::Timeout,
                    backend: Some(b),
                    endpoint: Some(chosen),
                    outcome: Some(Outcome::Timeout),
                });
            }
        },
        None => sent.await,
    };
    match result {
        Ok(resp) => {
            in_flight.record_answer(resp.status(), counts);
            Ok(Answer {
                resp,
                in_flight,
                chosen,
            })
        }
        Err(e) => {
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
                reason,
                backend: Some(b),
                endpoint: Some(chosen),
                outcome,
            })
        }
    }
}

/// The answer an injected abort gives: the HTTP status, or a trailers-only gRPC status.
fn fault_answer(
    shared: &Shared,
    dest: &DestinationTable,
    route: crate::metrics::Label,
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
    super::record_dest_error(
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
