//! HTTP proxying, outbound (route, fault, breaker, mirror, retry, split, balance, forward: see
//! `outbound`) and inbound (authorize, rate-limit, forward to the local application), for
//! HTTP/1.1 (keep-alive, chunked, upgrades) and HTTP/2 (gRPC, trailers, streaming both ways).
//! Bodies are streamed frame by frame; only a request a retry or a mirror may send again is kept
//! whole, up to the policy's bound ([`body`]).
//!
//! Errors are mapped to responses once, here, each with an `x-trellis-error` header naming the
//! mesh's reason (see [`Reason`]).
//!
//! Request semantics a proxy owes its upstreams (each one a fixed defect, with a raw-socket test
//! in `proxy/tests/http_correctness.rs`):
//! - an absolute-form request target wins over `Host`, and the upstream's `Host` is replaced by
//!   the target's authority (RFC 9112 3.2.2), so the upstream serves the service that was routed to;
//! - two `Host` fields, or an HTTP/2 `host` that differs from `:authority`, are a bad request (400;
//!   RFC 9112 3.2, RFC 9113 8.3.1); an HTTP/2 upstream never gets a `host` field, only `:authority`;
//! - a request body the client framed wrongly (bad chunk sizes, bad chunk ends) is the client's
//!   fault: 400 `bad-request`, counted as such, and the upstream connection is abandoned, so the
//!   upstream never receives a complete request;
//! - only WebSocket upgrades are tunnelled (authorized by the request that opened them); an
//!   `Upgrade: h2c` is ignored, as RFC 9113 3.1 lets a server do and Envoy does, because an h2c
//!   tunnel would carry requests the inbound policy never sees.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::authz::{Caller, RequestInfo, Verdict};
use crate::config::Protocol;
use crate::metrics::{Label, RequestLabels};
use crate::state::Shared;
use crate::table::DestinationTable;

/// The bodies, re-exported where the request paths used to define them.
pub use crate::body;
mod outbound;

pub use body::{BodyError, ProxyBody, RequestBody};

pub use crate::reason::{ERROR_HEADER, Reason};
pub use crate::side::Side;

pub use crate::upstream::{Clients, MeshClient, UpstreamClient};

/// Handle one request.
pub async fn handle(
    shared: Arc<Shared>,
    side: Arc<Side>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let mut hop = shared.tracer.as_ref().map(|t| t.begin(&side, &mut req));
    // One atomic load when no access log or tap listens.
    let observed = shared.observe.begin_http(&side, &mut req, started);
    let resp = match &*side {
        Side::Outbound {
            fixed,
            gateway: None,
        } => outbound::outbound(&shared, fixed.as_deref(), req, started, hop.as_mut()).await,
        Side::Outbound {
            gateway: Some(gateway),
            ..
        } => {
            // The gateway's route for the request's host names the destination.
            let host = req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
            let routed = match host {
                Some(h) => gateway.route(h, req.uri().path()),
                None => crate::gateway::Routed::UnknownHost,
            };
            match routed {
                crate::gateway::Routed::To(dest) => {
                    match refused_at_gateway(&shared, gateway, &mut req, started) {
                        Some(refused) => refused,
                        None => {
                            outbound::outbound(&shared, Some(&dest), req, started, hop.as_mut())
                                .await
                        }
                    }
                }
                crate::gateway::Routed::UnknownHost => outbound_error(
                    &shared,
                    Reason::UnknownHost,
                    host.unwrap_or("no host"),
                    started,
                ),
                crate::gateway::Routed::NoRoute => {
                    let detail = format!("no route for path {}", req.uri().path());
                    outbound_error(&shared, Reason::NoRoute, &detail, started)
                }
            }
        }
        Side::Inbound { caller } => inbound(&shared, caller, req, started).await,
    };
    if let Some(hop) = hop {
        hop.finish(&resp);
    }
    Ok(match observed {
        Some(pending) => pending
            .finish(resp)
            .map(|b| ProxyBody::Observed(Box::new(b))),
        None => resp,
    })
}

fn local(reason: Reason, detail: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(Some(Bytes::from(format!(
        "trellis-proxy: {detail}\n"
    )))));
    *resp.status_mut() = reason.status();
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Why a request must be refused before it is routed, if it must: RFC 9112 3.2 (exactly one
/// Host) and RFC 9113 8.3.1 (an HTTP/2 `host` names the same authority as `:authority`).
fn malformed(req: &Request<Incoming>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("two Host header fields");
    }
    if req.version() == Version::HTTP_2
        && let (Some(host), Some(authority)) = (host, req.uri().authority())
        && host.as_bytes() != authority.as_str().as_bytes()
    {
        return Some("the host header differs from :authority");
    }
    None
}

fn label_outbound() -> Label {
    static L: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from("outbound"));
    L.clone()
}
fn label_inbound() -> Label {
    static L: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from("inbound"));
    L.clone()
}
/// `true` / `false` without an allocation per request.
fn label_bool(value: bool) -> Label {
    static TRUE: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from("true"));
    static FALSE: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from("false"));
    if value { TRUE.clone() } else { FALSE.clone() }
}

/// This proxy's SPIFFE id as a label when the request went over mTLS, else empty.
fn own_identity(shared: &Shared, mtls: bool) -> Label {
    mtls.then(|| shared.identity.current())
        .flatten()
        .map(|generation| generation.identity_label.clone())
        .unwrap_or_else(label_empty)
}

fn label_empty() -> Label {
    static L: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label::from(""));
    L.clone()
}

fn outbound_error(
    shared: &Shared,
    reason: Reason,
    detail: &str,
    started: Instant,
) -> Response<ProxyBody> {
    let unknown = Label::from("unknown");
    shared.metrics.request(
        &RequestLabels {
            direction: label_outbound(),
            source_namespace: shared.metrics.source.namespace.clone(),
            source_kind: shared.metrics.source.kind.clone(),
            source_workload: shared.metrics.source.workload.clone(),
            destination: unknown.clone(),
            destination_namespace: unknown.clone(),
            destination_kind: unknown.clone(),
            destination_workload: unknown.clone(),
            backend: unknown,
            route: label_empty(),
            response_code: reason.status().as_u16(),
            error: Label::from(reason.as_str()),
            source_identity: label_empty(),
            destination_identity: label_empty(),
            tls: label_bool(false),
        },
        started.elapsed().as_secs_f64() * 1000.0,
    );
    let detail = match reason {
        Reason::UnknownDestination => format!("unknown destination {detail}"),
        _ => detail.to_string(),
    };
    local(reason, &detail)
}

#[allow(clippy::too_many_arguments)]
fn record_dest_error(
    shared: &Shared,
    dest: &DestinationTable,
    backend: Option<&crate::table::BackendTable>,
    route: Label,
    code: u16,
    reason: Reason,
    started: Instant,
    mesh_identity: Option<Label>,
) {
    let (ns, kind, name, bname) = match backend {
        Some(b) => (
            b.workload.namespace.clone(),
            b.workload.kind.clone(),
            b.workload.name.clone(),
            b.name.clone(),
        ),
        None => (label_empty(), label_empty(), label_empty(), label_empty()),
    };
    shared.metrics.request(
        &RequestLabels {
            direction: label_outbound(),
            source_namespace: shared.metrics.source.namespace.clone(),
            source_kind: shared.metrics.source.kind.clone(),
            source_workload: shared.metrics.source.workload.clone(),
            destination: dest.label.clone(),
            destination_namespace: ns,
            destination_kind: kind,
            destination_workload: name,
            backend: bname,
            route,
            response_code: code,
            error: Label::from(reason.as_str()),
            source_identity: own_identity(shared, mesh_identity.is_some()),
            destination_identity: mesh_identity.clone().unwrap_or_else(label_empty),
            tls: label_bool(mesh_identity.is_some()),
        },
        started.elapsed().as_secs_f64() * 1000.0,
    );
}

fn dest_error(
    shared: &Shared,
    dest: &DestinationTable,
    backend: Option<&crate::table::BackendTable>,
    route: Label,
    reason: Reason,
    started: Instant,
    mesh_identity: Option<Label>,
) -> Response<ProxyBody> {
    let bname = backend.map_or_else(label_empty, |b| b.name.clone());
    record_dest_error(
        shared,
        dest,
        backend,
        route,
        reason.status().as_u16(),
        reason,
        started,
        mesh_identity,
    );
    let detail = match reason {
        Reason::NoBackends => format!("destination {} has no backend with weight > 0", dest.key),
        Reason::NoEndpoints => format!(
            "backend {} of {} has no endpoints",
            bname.as_str(),
            dest.key
        ),
        Reason::ConnectFailed => format!(
            "could not connect to backend {} of {}",
            bname.as_str(),
            dest.key
        ),
        Reason::Timeout => format!("{} did not answer in time", dest.key),
        Reason::EgressForbidden => format!(
            "{} is outside the mesh and its ExternalService does not allow this workload on this port",
            dest.key
        ),
        Reason::Overloaded => format!(
            "destination {} is at its circuit breaker's limits",
            dest.key
        ),
        Reason::NoIdentity => format!(
            "backend {} of {} requires mTLS and this proxy has no valid certificate",
            bname.as_str(),
            dest.key
        ),
        Reason::IdentityMismatch => format!(
            "an endpoint of backend {} of {} presented a certificate for another identity",
            bname.as_str(),
            dest.key
        ),
        Reason::TlsFailed => format!(
            "the mTLS handshake with backend {} of {} failed",
            bname.as_str(),
            dest.key
        ),
        Reason::BadRequest => "the request body is malformed or was cut short".to_string(),
        _ => format!("backend {} of {} failed", bname.as_str(), dest.key),
    };
    local(reason, &detail)
}

async fn inbound(
    shared: &Shared,
    caller: &Caller,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<ProxyBody> {
    let Some(policy) = caller.policy_in(&shared.routes.table.load()).cloned() else {
        return local(Reason::NoInbound, "no inbound listener is configured");
    };
    let labels = |code: u16, error: Label| RequestLabels {
        direction: label_inbound(),
        source_namespace: label_empty(),
        source_kind: label_empty(),
        source_workload: label_empty(),
        destination: label_empty(),
        destination_namespace: shared.metrics.source.namespace.clone(),
        destination_kind: shared.metrics.source.kind.clone(),
        destination_workload: shared.metrics.source.workload.clone(),
        backend: label_empty(),
        route: label_empty(),
        response_code: code,
        error,
        source_identity: caller.identity.clone().unwrap_or_else(label_empty),
        destination_identity: own_identity(shared, caller.identity.is_some()),
        tls: label_bool(caller.identity.is_some()),
    };
    if let Some(problem) = malformed(&req) {
        shared.metrics.request(
            &labels(400, Label::from(Reason::BadRequest.as_str())),
            elapsed_ms(started),
        );
        return local(Reason::BadRequest, problem);
    }
    // End-user authentication, before authorization (rules may look at the claims). Nothing
    // is done, nor allocated, when the policy has no `jwt`.
    let claims = match &policy.jwt {
        None => None,
        Some(jwt) => {
            let verified = match jwt.verifier(&shared.routes.verifiers) {
                Some(verifier) => verifier.verify(req.headers()).inspect(|claims| {
                    // Before authorization, so that route rules matching these headers see the
                    // verified values, never the caller's (removed first, token or not).
                    verifier.forward_claims(claims.as_ref(), req.headers_mut());
                }),
                // No verifier could be made: refuse, as a provider without keys does.
                None => Err(trellis_jwt::Rejection::NoKeys),
            };
            match verified {
                Ok(claims) => claims,
                Err(rejection) => {
                    let reason = Reason::Jwt(rejection);
                    shared.metrics.request(
                        &labels(reason.status().as_u16(), Label::from(reason.as_str())),
                        elapsed_ms(started),
                    );
                    return unauthenticated(rejection, is_grpc(req.headers()));
                }
            }
        }
    };
    let info = RequestInfo {
        method: req.method(),
        path: req.uri().path(),
        headers: req.headers(),
        claims: claims.as_ref(),
    };
    if shared.authorizer.authorize_request(&policy, caller, info) == Verdict::Deny {
        shared.metrics.request(
            &labels(403, Label::from(Reason::Forbidden.as_str())),
            elapsed_ms(started),
        );
        if is_grpc(req.headers()) {
            return grpc_denied();
        }
        return local(
            Reason::Forbidden,
            "the inbound policy does not allow this request",
        );
    }
    // Claim requirements, ANDed with authorization (no allow rule can waive them): after it, so
    // that a caller the policy refuses learns nothing about the claims a route wants.
    if let Some(unmet) = policy.unmet_claims(
        req.method(),
        req.uri().path(),
        req.headers(),
        claims.as_ref(),
    ) {
        tracing::debug!(peer = %caller.peer, requirement = %unmet.name, path = req.uri().path(), "inbound request refused: claims");
        shared.metrics.request(
            &labels(403, Label::from(Reason::Claims.as_str())),
            elapsed_ms(started),
        );
        if is_grpc(req.headers()) {
            return grpc_refused(
                Reason::Claims,
                "7",
                "trellis-proxy: the request's token lacks the claims this call requires",
            );
        }
        return local(
            Reason::Claims,
            "the request's verified token does not carry the claims this route requires",
        );
    }
    if let Some(limiter) = policy.rate_limit_for(req.method(), req.uri().path(), req.headers())
        && let Err(wait) = limiter.check(caller.identity.as_deref())
    {
        shared.metrics.request(
            &labels(429, Label::from(Reason::RateLimited.as_str())),
            elapsed_ms(started),
        );
        let mut resp = local(
            Reason::RateLimited,
            "the destination's rate limit is spent: retry later",
        );
        let secs = crate::resilience::rate_limit::retry_after_secs(wait);
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    if let Some(tally) = crate::observe::Tally::of(&req) {
        tally.choose(policy.app_authority.as_str(), None, None);
    }
    let http2 = policy.protocol == Protocol::Http2 || req.version() == Version::HTTP_2;
    let upgrading = !http2 && is_upgrade(&req);
    let upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    outbound::prepare(&mut parts, upgrading);
    let tally = crate::observe::Tally::of_parts(&parts);
    let body = RequestBody::new(body, tally);
    let body_failed = body.failed_flag();
    let mut req = Request::from_parts(parts, body);
    if let Err(e) = outbound::aim(&mut req, policy.app_authority.clone(), http2) {
        tracing::warn!(error = %e, "could not build the request to the application");
        return local(Reason::UpstreamFailed, "bad request");
    }
    let client = if http2 {
        shared.upstreams.shared().plain(true)
    } else {
        shared.upstreams.shared().plain(false)
    };
    match client.request(req).await {
        Ok(mut resp) => {
            finish_response(&mut resp, upgrade, shared.limits.tcp_idle_timeout());
            shared.metrics.request(
                &labels(resp.status().as_u16(), label_empty()),
                elapsed_ms(started),
            );
            resp.map(|body| ProxyBody::upstream(body, None, None))
        }
        Err(e) => {
            let (reason, detail) = if body_failed.load(Ordering::Relaxed) {
                (
                    Reason::BadRequest,
                    "the request body is malformed or was cut short",
                )
            } else if e.is_connect() {
                (Reason::ConnectFailed, "the local application failed")
            } else {
                (Reason::UpstreamFailed, "the local application failed")
            };
            shared.metrics.request(
                &labels(reason.status().as_u16(), Label::from(reason.as_str())),
                elapsed_ms(started),
            );
            local(reason, detail)
        }
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A gRPC "trailers-only" denial: HTTP 200, `grpc-status: 7` (PERMISSION_DENIED) in the headers
/// and an empty body (sent as one HEADERS frame with END_STREAM).
fn grpc_denied() -> Response<ProxyBody> {
    grpc_refused(
        Reason::Forbidden,
        "7",
        "trellis-proxy: the inbound policy does not allow this call",
    )
}

/// A trailers-only gRPC answer with `status` and `message`, naming `reason`.
fn grpc_refused(
    reason: Reason,
    status: &'static str,
    message: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Local(None));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static(status));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h.insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    resp
}

/// The gateway's end-user authentication (`gateway.jwt`): verified claims written as headers
/// (the client's copies removed) and None, or the 401 answer.
fn refused_at_gateway(
    shared: &Shared,
    gateway: &crate::gateway::Gateway,
    req: &mut Request<Incoming>,
    started: Instant,
) -> Option<Response<ProxyBody>> {
    let verifier = gateway.jwt.as_ref()?;
    match verifier.verify(req.headers()) {
        Ok(claims) => {
            verifier.forward_claims(claims.as_ref(), req.headers_mut());
            None
        }
        Err(rejection) => {
            // Counted like the outbound side's other local answers; the answer itself is the
            // 401 with the challenge (gRPC: UNAUTHENTICATED).
            let _ = outbound_error(shared, Reason::Jwt(rejection), "", started);
            Some(unauthenticated(rejection, is_grpc(req.headers())))
        }
    }
}

/// The answer to a request whose JWT was refused: 401 with `x-trellis-error: jwt-<reason>` and
/// `www-authenticate` (RFC 6750); for gRPC, trailers-only `grpc-status: 16` (UNAUTHENTICATED),
/// with the same two headers.
fn unauthenticated(rejection: trellis_jwt::Rejection, grpc: bool) -> Response<ProxyBody> {
    let reason = Reason::Jwt(rejection);
    let mut resp = if grpc {
        grpc_refused(
            reason,
            "16",
            "trellis-proxy: the request's token was refused",
        )
    } else {
        local(
            reason,
            &format!("the request's token was refused: {rejection}"),
        )
    };
    resp.headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, rejection.www_authenticate());
    resp
}

fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// An HTTP/1.1 WebSocket upgrade, the one upgrade the proxy tunnels. Any other `Upgrade` (h2c
/// above all) is treated as an ordinary request and its upgrade headers are stripped.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().get_all(UPGRADE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
            })
        })
        && req.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// `idle`: an upgraded connection is a tunnel, closed like opaque TCP after this long silent.
fn finish_response(
    resp: &mut Response<Incoming>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    idle: Duration,
) {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_side) = upgrade {
            let upstream_side = hyper::upgrade::on(&mut *resp);
            tokio::spawn(tunnel(client_side, upstream_side, idle));
        }
        return;
    }
    strip_hop_by_hop(resp.headers_mut(), false);
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let copied = crate::tcp::copy_with_idle_timeout(&mut client, &mut upstream, idle, None);
            if let Err(e) = copied.await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// Remove hop-by-hop headers (RFC 9110 7.6.1); `upgrading` keeps `Connection: upgrade` and
/// `Upgrade`. `TE: trailers` stays (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    if let Some(listed) = headers
        .get(CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in listed.split(',').map(str::trim) {
            if upgrading && name.eq_ignore_ascii_case("upgrade") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                && name != TE
            {
                headers.remove(name);
            }
        }
    }
    if !upgrading {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    headers.remove(TRANSFER_ENCODING);
    headers.remove(HeaderName::from_static("keep-alive"));
    headers.remove(HeaderName::from_static("proxy-connection"));
    // Hop-by-hop by definition (RFC 9113 3.2.1 of the h2c upgrade), listed in Connection or not.
    headers.remove(HeaderName::from_static("http2-settings"));
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert("x-user", "beta".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-user"]);

        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "Upgrade".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn reasons_have_statuses() {
        assert_eq!(Reason::UnknownDestination.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            Reason::NoEndpoints.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(Reason::Forbidden.as_str(), "forbidden");
    }
}
