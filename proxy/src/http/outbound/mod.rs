//! The outbound request path: [`outbound`] routes a request, then sends it through a stack of
//! tower layers, one per stage of the policy, in this order (outermost first):
//!
//! route ([`outbound`]) -> fault -> breaker (destination) -> mirror (keeps the body) ->
//! request timeout -> retry (budget) -> per-try timeout -> endpoint (split, balance skipping
//! ejected, full and just-failed endpoints, connect over mTLS or plaintext).
//!
//! Why this order: a fault answers (or waits) before the request takes a place under the
//! destination's breaker; the breaker counts a request once, however many tries it takes; the
//! body is kept (and copied to the mirror) once, before the clock of the request timeout
//! starts, as before; the request timeout bounds every try and every backoff; each retry is a
//! new try with its own per-try timeout, split and balance, avoiding the endpoint that just
//! failed. Rate limits are not here: they protect the destination's instances, so its own
//! proxy enforces them ([`super::inbound`]).
//!
//! The request flowing through is an [`Outbound`] (the request and what its stages read: the
//! destination, the route, the proxy's state), the answer an [`Answer`] or a [`Failure`].
//! Errors are mapped to responses once, at the end ([`Failure`] -> `x-trellis-error`).
//!
//! Tower parts used: `Service`/`Layer`/`ServiceBuilder`, and `tower::retry::Retry` with our
//! [`retry::RetryPolicy`] (the budget is tower's `TpsBudget`, in [`crate::resilience::retry`]).
//! Not used, and why:
//! - `tower::timeout::Timeout` takes one `Duration` when the stack is built, but timeouts are
//!   per destination and route, and a per-try timeout must say which endpoint was too slow
//!   (outlier detection counts it, the retry avoids it): [`timeout`] has the two small
//!   per-request timeouts instead.
//! - `tower::limit::ConcurrencyLimit` waits for a place; the breaker must refuse at once
//!   (`503 overloaded`), so it stays ours ([`crate::resilience::Breaker`]).
//! - `tower::balance` (p2c over a `Discover` stream) would own the endpoints; ours are in the
//!   routing table, swapped whole on updates, with split, ejection and per-endpoint limits:
//!   [`endpoint`] keeps calling the table's split and `pick_for`.
//!
//! Cost: the stack is built once ([`STACK`]) of zero-sized services, so a clone per request
//! costs nothing. A stage whose policy is absent for the request hands it to the next one
//! without boxing (each has its own small future with a pass-through state, nested inline in
//! [`outbound`]'s), so a request without policy allocates nothing the function-per-stage path
//! did not (the two `Arc` clones it adds, of the proxy's state and of the destination, are
//! counter increments). The mirror stage boxes its future when it keeps a body (reading the
//! body is an `async fn` of [`super::body`]); faults, the breaker, timeouts and retries do not
//! box (the backoff is a `Sleep` inside tower's retry future).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use http::header::{CONNECTION, HOST, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use tower::{ServiceBuilder, ServiceExt};

use super::body::{KeptBody, ProxyBody, RequestBody};
use super::{
    Reason, dest_error, finish_response, is_upgrade, label_bool, label_empty, label_outbound,
    malformed, outbound_error, own_identity, strip_hop_by_hop,
};
use crate::balance::InFlight;
use crate::config::Protocol;
use crate::metrics::{RequestLabels, SeriesOf};
use crate::resilience::fault::Abort;
use crate::resilience::retry::Outcome;
use crate::state::Shared;
use crate::table::{DestinationTable, Lookup, RouteRef};

mod breaker;
mod endpoint;
mod fault;
mod mirror;
mod retry;
mod timeout;

/// The stages, outermost first (see the module doc).
type Stack = fault::FaultService<
    breaker::BreakerService<
        mirror::MirrorService<
            timeout::RequestTimeout<
                tower::retry::Retry<retry::RetryPolicy, timeout::PerTryTimeout<endpoint::Endpoint>>,
            >,
        >,
    >,
>;

/// The stack, built once; every request goes through a clone of it.
static STACK: LazyLock<Stack> = LazyLock::new(|| {
    ServiceBuilder::new()
        .layer(fault::FaultLayer)
        .layer(breaker::BreakerLayer)
        .layer(mirror::MirrorLayer)
        .layer(timeout::RequestTimeoutLayer)
        .layer(tower::retry::RetryLayer::new(retry::RetryPolicy))
        .layer(timeout::PerTryTimeoutLayer)
        .service(endpoint::Endpoint)
});

// Every stage is zero-sized: the clone per request copies nothing. A stage that grows state
// must keep it behind an `Arc` and change this check knowingly.
const _: () = assert!(std::mem::size_of::<Stack>() == 0);

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
#[derive(Debug)]
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
    /// The answer an injected fault gives instead (set by the fault stage only).
    fault: Option<Abort>,
}

impl Failure {
    fn before_sending(reason: Reason, backend: Option<usize>) -> Self {
        Failure {
            reason,
            backend,
            endpoint: None,
            outcome: None,
            fault: None,
        }
    }

    /// A timeout of the request (or of a mirror's copy), not of one try.
    fn timeout() -> Self {
        Failure {
            outcome: Some(Outcome::Timeout),
            ..Failure::before_sending(Reason::Timeout, None)
        }
    }
}

/// One request on its way through the stages (one per try: a retry is a new one).
#[derive(Debug)]
struct Outbound {
    /// The proxy's state (clients, identity, metrics).
    shared: Arc<Shared>,
    /// The destination, as routed (a try of a request whose table was replaced meanwhile still
    /// goes to the endpoints it was routed among).
    dest: Arc<DestinationTable>,
    /// The route: its policy is what the stages read, its split where tries go.
    route: RouteRef,
    /// The request itself.
    req: Sendable,
    /// The client spoke HTTP/2 (h2 clients get h2 upstreams unless the destination is opaque).
    client_http2: bool,
    /// A WebSocket upgrade (never retried, never mirrored).
    upgrading: bool,
    /// The endpoint the last try failed on (a retry avoids it).
    avoid: Option<Chosen>,
    /// Its body was kept and the route's retries apply to it (set by the mirror stage).
    retryable: bool,
    /// Retries so far.
    retried: u32,
}

impl Outbound {
    /// The route's policy.
    fn policy(&self) -> &crate::resilience::RequestPolicy {
        self.dest.route_policy(self.route)
    }
}

/// The request of a try: the one streaming from the client, or one made from a kept body
/// (for each try of a retried request: the parts are copied when the try is sent).
// The large variant is the usual one: boxing it would cost every request an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Sendable {
    Once(Request<RequestBody>),
    Kept(Arc<Kept>),
}

/// A request kept whole, to be sent more than once.
#[derive(Debug)]
struct Kept {
    parts: http::request::Parts,
    body: KeptBody,
}

impl Sendable {
    fn method(&self) -> &Method {
        match self {
            Sendable::Once(r) => r.method(),
            Sendable::Kept(k) => &k.parts.method,
        }
    }

    fn headers(&self) -> &HeaderMap {
        match self {
            Sendable::Once(r) => r.headers(),
            Sendable::Kept(k) => &k.parts.headers,
        }
    }

    fn into_request(self) -> Request<RequestBody> {
        match self {
            Sendable::Once(r) => r,
            Sendable::Kept(k) => Request::from_parts(k.parts.clone(), RequestBody::kept(&k.body)),
        }
    }
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
    if let Some(external) = &dest.external
        && let Err(why) = admit_external(shared, external, req.uri(), req.headers())
    {
        tracing::info!(destination = %dest.key, external = %external.name, "request refused: {why}");
        return dest_error(
            shared,
            &dest,
            None,
            label_empty(),
            Reason::EgressForbidden,
            started,
            None,
        );
    }
    let route = dest.match_route(req.method(), req.uri().path(), req.headers());
    let route_label = dest.route_name(route).clone();
    let idle = dest.route_policy(route).idle_timeout;

    // Before the stages (the hop cannot go with the request into them): a request a fault or
    // the breaker refuses is sampled at the destination's rate too.
    if let Some(hop) = hop.as_deref_mut() {
        hop.propagate(&dest, req.headers_mut());
    }
    let upgrading = is_upgrade(&req);
    let upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let client_http2 = req.version() == Version::HTTP_2 && dest.protocol != Protocol::Tcp;
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, upgrading);
    let tally = crate::observe::Tally::of_parts(&parts);
    // The idle timeout is armed by the fault stage, after an injected delay.
    let body = RequestBody::new(body, tally.clone());
    let sent = STACK
        .clone()
        .oneshot(Outbound {
            shared: Arc::clone(shared),
            dest: Arc::clone(&dest),
            route,
            req: Sendable::Once(Request::from_parts(parts, body)),
            client_http2,
            upgrading,
            avoid: None,
            retryable: false,
            retried: 0,
        })
        .await;

    let Answer {
        mut resp,
        in_flight,
        chosen,
    } = match sent {
        Ok(answer) => answer,
        Err(Failure {
            fault: Some(abort), ..
        }) => return fault::fault_answer(shared, &dest, route_label, abort, started),
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

/// Whether this proxy may send a request to a destination outside the mesh (see
/// [`crate::external`]): its own identity listed, and the port called declared.
fn admit_external(
    shared: &Shared,
    external: &crate::external::ExternalTable,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), String> {
    let own = shared.identity.current();
    external
        .check(
            own.as_ref().map(|g| &*g.identity_label),
            called_port(uri, headers),
        )
        .map(|_| ())
}

/// The port a request calls: its authority's, else its `Host`'s, else 80 (plain HTTP to the
/// proxy).
pub(super) fn called_port(uri: &Uri, headers: &HeaderMap) -> u16 {
    uri.authority()
        .and_then(|a| a.port_u16())
        .or_else(|| {
            let host = headers.get(HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?.port_u16()
        })
        .unwrap_or(80)
}

/// The destination a request names, asking the controller about unknown ones.
async fn find_or_resolve(
    shared: &Shared,
    fixed: Option<&str>,
    req: &Request<Incoming>,
) -> Result<Arc<DestinationTable>, (Reason, String)> {
    match find(shared, fixed, req) {
        Ok(d) => Ok(d),
        Err(Miss::Unknown(key)) if shared.routes.resolver.is_some() => {
            if let Some(resolver) = &shared.routes.resolver {
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
    let table = shared.routes.table.load();
    match table.lookup(target) {
        Lookup::Found(d) => Ok(d),
        Lookup::Unknown(key) => Err(Miss::Unknown(key)),
        Lookup::Invalid(e) => Err(Miss::Invalid(e.to_string())),
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
