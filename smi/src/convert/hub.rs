//! The two directions through the hub: any typed object into a [`Policy`], and a [`Policy`] out
//! to a requested version.

use super::{ConvertError, SmiObject, access, policy, specs, split};
use crate::model::Policy;

impl SmiObject {
    /// The normalized policy this object says (consuming Trellis annotations it carries).
    pub fn to_policy(&self) -> Result<Policy, ConvertError> {
        use SmiObject as O;
        Ok(match self {
            O::TrafficSplitV1Alpha1(o) => Policy::TrafficSplit(split::from_v1alpha1(o)?),
            O::TrafficSplitV1Alpha2(o) => Policy::TrafficSplit(split::from_v1alpha2(o)?),
            O::TrafficSplitV1Alpha3(o) => Policy::TrafficSplit(split::from_v1alpha3(o)?),
            O::TrafficSplitV1Alpha4(o) => Policy::TrafficSplit(split::from_v1alpha4(o)?),
            O::TrafficTargetV1Alpha1(o) => Policy::AccessPolicy(access::from_v1alpha1(o)?),
            O::TrafficTargetV1Alpha2(o) => Policy::AccessPolicy(access::from_v1alpha2(o)?),
            O::TrafficTargetV1Alpha3(o) => Policy::AccessPolicy(access::from_v1alpha3(o)?),
            O::HttpRouteGroupV1Alpha1(o) => Policy::HttpRouteGroup(specs::htr_from_v1alpha1(o)?),
            O::HttpRouteGroupV1Alpha2(o) => {
                Policy::HttpRouteGroup(specs::htr_from_matches(&o.metadata, &o.spec.matches))
            }
            O::HttpRouteGroupV1Alpha3(o) => {
                Policy::HttpRouteGroup(specs::htr_from_matches(&o.metadata, &o.spec.matches))
            }
            O::HttpRouteGroupV1Alpha4(o) => {
                Policy::HttpRouteGroup(specs::htr_from_matches(&o.metadata, &o.spec.matches))
            }
            O::TcpRouteV1Alpha1(o) => Policy::TcpRoute(specs::tcp_from_portless(&o.metadata)?),
            O::TcpRouteV1Alpha2(o) => Policy::TcpRoute(specs::tcp_from_portless(&o.metadata)?),
            O::TcpRouteV1Alpha3(o) => Policy::TcpRoute(specs::tcp_from_portless(&o.metadata)?),
            O::TcpRouteV1Alpha4(o) => {
                Policy::TcpRoute(specs::port_route(&o.metadata, &o.spec.matches))
            }
            O::UdpRouteV1Alpha4(o) => {
                Policy::UdpRoute(specs::port_route(&o.metadata, &o.spec.matches))
            }
            O::TrafficPolicyV1Alpha1(o) => {
                Policy::TrafficPolicy(Box::new(policy::from_v1alpha1(o)))
            }
            O::ExternalServiceV1Alpha1(o) => {
                Policy::ExternalService(Box::new(policy::external_from_v1alpha1(o)))
            }
        })
    }

    /// The policy written as `version` (`v1alpha2`) of its kind.
    pub fn from_policy(policy: &Policy, version: &str) -> Result<SmiObject, ConvertError> {
        use SmiObject as O;
        Ok(match (policy, version) {
            (Policy::TrafficSplit(m), "v1alpha1") => O::TrafficSplitV1Alpha1(split::to_v1alpha1(m)),
            (Policy::TrafficSplit(m), "v1alpha2") => O::TrafficSplitV1Alpha2(split::to_v1alpha2(m)),
            (Policy::TrafficSplit(m), "v1alpha3") => O::TrafficSplitV1Alpha3(split::to_v1alpha3(m)),
            (Policy::TrafficSplit(m), "v1alpha4") => O::TrafficSplitV1Alpha4(split::to_v1alpha4(m)),
            (Policy::AccessPolicy(m), "v1alpha1") => {
                O::TrafficTargetV1Alpha1(access::to_v1alpha1(m))
            }
            (Policy::AccessPolicy(m), "v1alpha2") => {
                O::TrafficTargetV1Alpha2(access::to_v1alpha2(m))
            }
            (Policy::AccessPolicy(m), "v1alpha3") => {
                O::TrafficTargetV1Alpha3(access::to_v1alpha3(m))
            }
            (Policy::HttpRouteGroup(m), "v1alpha1") => {
                O::HttpRouteGroupV1Alpha1(specs::htr_to_v1alpha1(m))
            }
            (Policy::HttpRouteGroup(m), "v1alpha2") => {
                O::HttpRouteGroupV1Alpha2(specs::htr_to_v1alpha2(m))
            }
            (Policy::HttpRouteGroup(m), "v1alpha3") => {
                O::HttpRouteGroupV1Alpha3(specs::htr_to_v1alpha3(m))
            }
            (Policy::HttpRouteGroup(m), "v1alpha4") => {
                O::HttpRouteGroupV1Alpha4(specs::htr_to_v1alpha4(m))
            }
            (Policy::TcpRoute(m), "v1alpha1") => O::TcpRouteV1Alpha1(specs::tcp_to_v1alpha1(m)),
            (Policy::TcpRoute(m), "v1alpha2") => O::TcpRouteV1Alpha2(specs::tcp_to_v1alpha2(m)),
            (Policy::TcpRoute(m), "v1alpha3") => O::TcpRouteV1Alpha3(specs::tcp_to_v1alpha3(m)),
            (Policy::TcpRoute(m), "v1alpha4") => O::TcpRouteV1Alpha4(specs::tcp_to_v1alpha4(m)),
            (Policy::UdpRoute(m), "v1alpha4") => O::UdpRouteV1Alpha4(specs::udp_to_v1alpha4(m)),
            (Policy::TrafficPolicy(m), "v1alpha1") => {
                O::TrafficPolicyV1Alpha1(policy::to_v1alpha1(m))
            }
            (Policy::ExternalService(m), "v1alpha1") => {
                O::ExternalServiceV1Alpha1(policy::external_to_v1alpha1(m))
            }
            (policy, version) => {
                return Err(ConvertError::NoSuchVersion {
                    kind: policy.kind().to_string(),
                    api_version: format!("{}/{version}", policy.kind().group()),
                });
            }
        })
    }
}
