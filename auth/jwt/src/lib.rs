//! End-user authentication with JWTs (issue 14): which token issuers a workload trusts, and the
//! check of each request's bearer token against them, for the proxy's inbound path and the
//! gateway.
//!
//! - [`config`]: what an operator writes ([`JwtPolicy`], one [`JwtProvider`] per issuer; the types
//!   live in `trellis-policy`, so that the TrafficPolicy kind carries them without this crate) and
//!   its validation, every problem with its field path;
//! - [`Verifier`] (module `verify`): finds a request's token, checks it with the `jsonwebtoken`
//!   crate (no signature code here) and answers the verified [`Claims`] or a [`Rejection`]
//!   whose [`as_str`](Rejection::as_str) is the reason header's value;
//! - `jwks` and `refresh`: the providers' keys, from a file (reloaded on change) or a URL
//!   (refreshed on an interval, early on an unknown `kid`, with backoff after failures). The
//!   last good key set keeps serving; a provider whose keys never loaded refuses its tokens
//!   (`no-keys`);
//! - [`claims`]: [`Claims::get`] for nested claims and [`ClaimMatch`], the claim condition
//!   authorization rules embed.
//!
//! ```yaml
//! jwt:
//!   required: true                # no token: 401 missing (default false: pass without claims)
//!   providers:
//!     - issuer: https://auth.example.com/realms/shop
//!       audiences: [orders]
//!       jwks:
//!         url: https://auth.example.com/realms/shop/protocol/openid-connect/certs
//!         refreshInterval: 5m      # default 5m
//!       algorithms: [RS256, ES256] # default [RS256]; none and HS* are refused
//!       clockSkew: 60s             # default 60s, at most 5m
//!       fromHeader:                # the default:
//!         name: authorization
//!         prefix: "Bearer "
//!       forwardClaimsAs:
//!         - claim: sub
//!           header: x-jwt-sub
//!     - issuer: https://ci.example.com
//!       audiences: [orders]
//!       jwks:
//!         file: /etc/trellis/jwt/ci-jwks.json   # reloaded when it changes
//! # in an authorization rule:
//! claims:
//!   - claim: realm_access.roles
//!     values: [admin]
//! ```
//!
//! Wiring, in a request path:
//!
//! ```no_run
//! # async fn demo(policy: trellis_jwt::JwtPolicy, mut request: http::Request<()>) {
//! let verifier = trellis_jwt::Verifier::new(&policy).expect("validated policy");
//! match verifier.verify(request.headers()) {
//!     Ok(claims) => {
//!         // Authorization rules may look at `claims`; then strip spoofed claim headers and
//!         // write the verified ones.
//!         verifier.forward_claims(claims.as_ref(), request.headers_mut());
//!     }
//!     Err(rejection) => {
//!         // 401, `x-trellis-error: <rejection.as_str()>`, `www-authenticate`.
//!         let _ = (rejection.status(), rejection.as_str(), rejection.www_authenticate());
//!     }
//! }
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod claims;
pub mod config;
mod jwks;
mod refresh;
mod verify;

pub use claims::{ClaimLookup, ClaimMatch, Claims};
pub use config::{
    Algorithm, ClaimHeader, Duration, FromHeader, JwksSource, JwtPolicy, JwtProvider, Problem,
};
pub use jwks::{JwksError, KeySet, MIN_RSA_BITS};
pub use refresh::RefreshOptions;
pub use verify::{KeyStatus, Rejection, Verifier};
