//! `policy.trellis.io` TrafficPolicy, v1alpha1: Trellis's own kind, not part of SMI.
//!
//! A TrafficPolicy attaches the resilience settings of [`trellis_policy`] to one Service (its
//! `targetRef`, in the policy's namespace), with optional per-route sections that name matches of
//! an HTTPRouteGroup in the same namespace; and end-user JWT authentication
//! ([`trellis_policy::jwt`]): the spec's `jwt` (providers, `required`), `claims` every request
//! must satisfy, and route sections' `claims` for the requests they match. What each setting means, and which proxy enforces it,
//! is documented once, in `trellis-policy`.
//!
//! The spec lists the settings field by field rather than flattening [`DestinationPolicy`]:
//! serde cannot refuse unknown fields through `#[serde(flatten)]`, and a misspelt setting must be
//! an error with its path, not silently ignored.
//!
//! Unlike the SMI kinds, the CRD's schema is generated from these types (schemars, made
//! structural by kube), since Trellis owns the contract; see [`crate::crd`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use trellis_policy::jwt::{ClaimMatch, JwtPolicy};
use trellis_policy::{
    CircuitBreaker, DestinationPolicy, Fault, HealthCheck, LoadBalancer, Mirror, OutlierDetection,
    RateLimit, Retries, RoutePolicy, Timeouts,
};

/// The object a TrafficPolicy applies to: a Service in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetRef {
    /// API group of the target: empty (the core group) or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the target: `Service` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the Service, in the TrafficPolicy's namespace.
    pub name: String,
}

/// One per-route section: requests matching the named matches of an HTTPRouteGroup get these
/// sections instead of the destination's (section by section, see [`RoutePolicy`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSection {
    /// An HTTPRouteGroup in the policy's namespace.
    pub http_route_group: String,
    /// Names of matches in that group; absent or empty = all its matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
    /// Request timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Injected faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Local rate limit (enforced by each destination instance's proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Request mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Conditions on the claims of the request's verified JWT (the spec's `jwt`), all of which
    /// must hold for a request matching this section's matches, whatever TrafficTarget allows
    /// it; otherwise the destination's proxy answers 403 `claims`. Checked apart from the
    /// sections' first-match order: every section a request matches adds its claims.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<ClaimMatch>,
}

impl RouteSection {
    /// The section's settings.
    pub fn policy(&self) -> RoutePolicy {
        RoutePolicy {
            timeouts: self.timeouts.clone(),
            retries: self.retries.clone(),
            fault: self.fault.clone(),
            rate_limit: self.rate_limit.clone(),
            mirror: self.mirror.clone(),
        }
    }

    /// A section of `policy` for `http_route_group`'s `matches`.
    pub fn new(
        http_route_group: String,
        matches: Option<Vec<String>>,
        policy: RoutePolicy,
    ) -> Self {
        RouteSection {
            http_route_group,
            matches,
            timeouts: policy.timeouts,
            retries: policy.retries,
            fault: policy.fault,
            rate_limit: policy.rate_limit,
            mirror: policy.mirror,
            claims: Vec::new(),
        }
    }
}

pub mod v1alpha1 {
    //! TrafficPolicy v1alpha1 (the only, stored, version).
    use super::*;
    use kube_derive::CustomResource;

    #[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "policy.trellis.io",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        namespaced
    )]
    #[kube(
        crates(kube_core = "::kube_core", schemars = "::schemars"),
        derive = "PartialEq",
        shortname = "tp",
        doc = "Resilience settings (timeouts, retries, circuit breaking, outlier ejection, health checks, faults, rate limits, mirroring) and end-user JWT authentication for one Service; every setting is documented in the trellis-policy crate."
    )]
    #[kube(printcolumn(
        name = "Target",
        type_ = "string",
        description = "The Service this policy applies to.",
        json_path = ".spec.targetRef.name"
    ))]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TrafficPolicySpec {
        /// The Service the policy applies to.
        pub target_ref: TargetRef,
        /// Request timeouts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeouts: Option<Timeouts>,
        /// Retries (absent: one try).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retries: Option<Retries>,
        /// Injected faults.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub fault: Option<Fault>,
        /// Local rate limit (enforced by each destination instance's proxy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub rate_limit: Option<RateLimit>,
        /// Request mirroring.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub mirror: Option<Mirror>,
        /// Limits on connections and requests towards the destination.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub circuit_breaker: Option<CircuitBreaker>,
        /// Taking failing endpoints out for a while.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub outlier_detection: Option<OutlierDetection>,
        /// Probing endpoints actively.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub health_check: Option<HealthCheck>,
        /// How endpoints are chosen (absent: `ewma`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub load_balancer: Option<LoadBalancer>,
        /// Per-route sections, tried in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub routes: Vec<RouteSection>,
        /// End-user authentication of the requests to the Service: the JWT providers whose
        /// tokens its instances' proxies verify (inbound), and whether a token is required
        /// (401 `jwt-<reason>` otherwise). Needed by any `claims`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub jwt: Option<JwtPolicy>,
        /// Conditions on the claims of the verified JWT that every request to the Service must
        /// satisfy (403 `claims` otherwise); route sections may add their own.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub claims: Vec<ClaimMatch>,
    }

    impl TrafficPolicySpec {
        /// The destination-wide settings.
        pub fn policy(&self) -> DestinationPolicy {
            DestinationPolicy {
                timeouts: self.timeouts.clone(),
                retries: self.retries.clone(),
                fault: self.fault.clone(),
                rate_limit: self.rate_limit.clone(),
                mirror: self.mirror.clone(),
                circuit_breaker: self.circuit_breaker.clone(),
                outlier_detection: self.outlier_detection.clone(),
                health_check: self.health_check.clone(),
                load_balancer: self.load_balancer,
            }
        }

        /// A spec from its parts.
        pub fn new(
            target_ref: TargetRef,
            policy: DestinationPolicy,
            routes: Vec<RouteSection>,
        ) -> Self {
            TrafficPolicySpec {
                target_ref,
                timeouts: policy.timeouts,
                retries: policy.retries,
                fault: policy.fault,
                rate_limit: policy.rate_limit,
                mirror: policy.mirror,
                circuit_breaker: policy.circuit_breaker,
                outlier_detection: policy.outlier_detection,
                health_check: policy.health_check,
                load_balancer: policy.load_balancer,
                routes,
                jwt: None,
                claims: Vec::new(),
            }
        }
    }
}
