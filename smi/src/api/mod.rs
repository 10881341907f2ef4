//! The API types: one Rust type per kind and version, exactly as they appear on the wire: the SMI
//! kinds, and Trellis's own TrafficPolicy ([`policy`]) and ExternalService ([`external`]).
//!
//! Every CRD-backed version is a `kube::CustomResource`. SMI schemas come from [`crate::crd`], not
//! from the Rust types (`schema = "disabled"`), so the generated CRDs match the official ones;
//! TrafficPolicy's and ExternalService's schemas are derived from their types (Trellis owns those
//! contracts).

pub mod access;
pub mod external;
pub mod gateway;
pub mod headers;
pub mod metrics;
pub mod policy;
pub mod quantity;
pub mod specs;
pub mod split;

/// API group of TrafficSplit.
pub const SPLIT_GROUP: &str = "split.smi-spec.io";
/// API group of TrafficTarget.
pub const ACCESS_GROUP: &str = "access.smi-spec.io";
/// API group of HTTPRouteGroup, TCPRoute and UDPRoute.
pub const SPECS_GROUP: &str = "specs.smi-spec.io";
/// API group of TrafficMetrics (an aggregated API, not a CRD).
pub const METRICS_GROUP: &str = "metrics.smi-spec.io";
/// API group of Trellis's TrafficPolicy and ExternalService (not part of SMI).
pub const POLICY_GROUP: &str = "policy.trellis.io";
