//! The controller's core, free of Kubernetes: where SMI policy and TrafficPolicies come from
//! ([`policy`]: the
//! [`policy::PolicySource`] seam and the watched SMI files source) and the single-writer
//! [`index`] that joins it with the endpoints of the discovery adapters and publishes
//! per-destination profiles and per-workload-port inbound policies through `tokio::sync::watch`
//! channels.
//!
//! [`leader`] is the "may this replica write" handle and its status, with no election behind it
//! here ([`leader::Leadership::always`]): a controller built without Kubernetes still has it.
//!
//! Everything that talks to a platform's API lives elsewhere: the Kubernetes policy source, the
//! Lease election and Events in `trellis-controller-kubernetes`, the gRPC server in
//! `trellis-controller-grpc`, the assembly in `trellis-controller`. The semantics and the
//! decisions where SMI is silent are in the docs of [`index::outbound`] and [`index::inbound`].

pub mod index;
pub mod leader;
pub mod policy;
