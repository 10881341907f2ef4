//! Why the proxy answered a request itself: the reasons, their status codes and the
//! `x-trellis-error` header that names them. Written by the request paths ([`crate::http`]),
//! read back by the access log, taps and spans ([`crate::observe`], [`crate::trace`]).

use http::StatusCode;

/// Header naming why the proxy answered a request itself.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// Why the proxy answered a request itself (the `x-trellis-error` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request is malformed: two `Host` fields, an HTTP/2 `host` that is not the
    /// `:authority`, or a body the client framed wrongly. 400.
    BadRequest,
    /// No authority in the request (no Host, no absolute URI). 400.
    NoAuthority,
    /// The authority is malformed. 400.
    InvalidAuthority,
    /// No such destination. 502.
    UnknownDestination,
    /// The gateway has no route for the request's host. 404.
    UnknownHost,
    /// The gateway routes the request's host, but no path prefix of that host matches its
    /// path. 404.
    NoRoute,
    /// The destination has no backend with weight > 0. 503.
    NoBackends,
    /// The chosen backend has no endpoints. 503.
    NoEndpoints,
    /// Connecting to the endpoint failed. 502.
    ConnectFailed,
    /// The destination's circuit breaker is full (requests, connections or every endpoint). 503.
    Overloaded,
    /// The traffic policy injected this answer (status as configured).
    FaultInjected,
    /// The destination's local rate limit is spent. 429 with `retry-after`.
    RateLimited,
    /// The endpoint failed mid-request. 502.
    UpstreamFailed,
    /// The destination's request timeout passed. 504.
    Timeout,
    /// Inbound policy denied the request. 403.
    Forbidden,
    /// The destination is outside the mesh and its declaration (ExternalService) does not list
    /// this workload, or not the port called. 403, answered by the caller's own proxy.
    EgressForbidden,
    /// The request falls under a claim requirement of the inbound policy (TrafficPolicy
    /// `claims`) and its verified token's claims do not meet it, or it has no token. 403.
    Claims,
    /// The inbound policy's JWT authentication refused the request's token (or its absence):
    /// `jwt-<rejection>`, e.g. `jwt-expired`, `jwt-missing`. 401 with `www-authenticate`.
    Jwt(trellis_jwt::Rejection),
    /// No inbound listener is configured. 503.
    NoInbound,
    /// The endpoint needs mTLS and this proxy has no valid certificate (fails closed). 503.
    NoIdentity,
    /// The endpoint's certificate does not name the identity the controller gave for it. 502.
    IdentityMismatch,
    /// The mTLS handshake with the endpoint failed otherwise (untrusted chain, timeout...). 502.
    TlsFailed,
}

impl Reason {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "bad-request",
            Reason::NoAuthority => "no-authority",
            Reason::InvalidAuthority => "invalid-authority",
            Reason::UnknownDestination => "unknown-destination",
            Reason::UnknownHost => "unknown-host",
            Reason::NoRoute => "no-route",
            Reason::NoBackends => "no-backends",
            Reason::NoEndpoints => "no-endpoints",
            Reason::ConnectFailed => "connect-failed",
            Reason::Overloaded => "overloaded",
            Reason::FaultInjected => "fault-injected",
            Reason::RateLimited => "rate-limited",
            Reason::UpstreamFailed => "upstream-failed",
            Reason::Timeout => "timeout",
            Reason::Forbidden => "forbidden",
            Reason::EgressForbidden => "egress-forbidden",
            Reason::Claims => "claims",
            Reason::Jwt(rejection) => jwt_str(rejection),
            Reason::NoInbound => "no-inbound",
            Reason::NoIdentity => "no-identity",
            Reason::IdentityMismatch => "identity-mismatch",
            Reason::TlsFailed => "tls-failed",
        }
    }

    /// Status code.
    pub fn status(self) -> StatusCode {
        match self {
            Reason::BadRequest | Reason::NoAuthority | Reason::InvalidAuthority => {
                StatusCode::BAD_REQUEST
            }
            Reason::UnknownDestination
            | Reason::ConnectFailed
            | Reason::UpstreamFailed
            | Reason::IdentityMismatch
            | Reason::TlsFailed => StatusCode::BAD_GATEWAY,
            Reason::NoBackends
            | Reason::NoEndpoints
            | Reason::NoInbound
            | Reason::NoIdentity
            | Reason::Overloaded
            | Reason::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::UnknownHost | Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::Forbidden | Reason::EgressForbidden | Reason::Claims => StatusCode::FORBIDDEN,
            Reason::Jwt(rejection) => rejection.status(),
        }
    }
}

/// `jwt-` and the rejection's stable name, without an allocation per request.
fn jwt_str(rejection: trellis_jwt::Rejection) -> &'static str {
    use trellis_jwt::Rejection as R;
    match rejection {
        R::Missing => "jwt-missing",
        R::Malformed => "jwt-malformed",
        R::Expired => "jwt-expired",
        R::NotYetValid => "jwt-not-yet-valid",
        R::WrongIssuer => "jwt-wrong-issuer",
        R::WrongAudience => "jwt-wrong-audience",
        R::BadSignature => "jwt-bad-signature",
        R::UnknownKey => "jwt-unknown-key",
        R::AlgorithmNotAllowed => "jwt-algorithm-not-allowed",
        R::NoKeys => "jwt-no-keys",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_reasons_are_the_rejections_names_behind_jwt() {
        for rejection in trellis_jwt::Rejection::ALL {
            let reason = Reason::Jwt(rejection);
            assert_eq!(
                reason.as_str(),
                format!("jwt-{}", rejection.as_str()),
                "{rejection:?}"
            );
            assert_eq!(reason.status(), StatusCode::UNAUTHORIZED);
        }
    }
}
