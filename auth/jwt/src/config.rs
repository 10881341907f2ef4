//! What an operator writes: the JWT providers a workload trusts ([`JwtPolicy`]), each with its
//! issuer, audiences, key source and limits, and [`validate`](JwtPolicy::validate), which finds
//! every value the types cannot refuse and names its field (`providers[0].clockSkew`).
//!
//! The types live in `trellis-policy` (module `jwt`), so that the TrafficPolicy kind can carry
//! them without linking this crate's verifier and HTTP client; they are re-exported here
//! unchanged.

pub use trellis_policy::jwt::{
    Algorithm, ClaimHeader, DEFAULT_CLOCK_SKEW, DEFAULT_REFRESH_INTERVAL, FromHeader, JwksSource,
    JwtPolicy, JwtProvider, MAX_CLOCK_SKEW, MIN_REFRESH_INTERVAL, UnknownAlgorithm,
};
pub use trellis_policy::{Duration, Problem};

/// jsonwebtoken's algorithm, for the public-key ones (`None` for `none` and `HS*`, which
/// validation refuses and the verifier never accepts).
pub(crate) fn to_jsonwebtoken(alg: Algorithm) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm as J;
    Some(match alg {
        Algorithm::None | Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return None;
        }
        Algorithm::RS256 => J::RS256,
        Algorithm::RS384 => J::RS384,
        Algorithm::RS512 => J::RS512,
        Algorithm::PS256 => J::PS256,
        Algorithm::PS384 => J::PS384,
        Algorithm::PS512 => J::PS512,
        Algorithm::ES256 => J::ES256,
        Algorithm::ES384 => J::ES384,
        Algorithm::EdDSA => J::EdDSA,
    })
}
