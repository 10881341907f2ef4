//! The controller's Kubernetes runtime: everything that talks to a Kubernetes API server.
//!
//! - [`policy`]: the SMI CRDs as a [`trellis_controller_core::policy::PolicySource`] (one
//!   reflector per kind at its stored version; watch failures reported, last policy kept).
//! - [`leader`]: Lease-based leader election for what the controller writes.
//! - [`events`]: events.k8s.io/v1 Warnings about SMI objects, written by the leader only.
//! - [`aggregated`]: the SMI TrafficMetrics API as an aggregated API on the webhook port
//!   (front-proxy client certificates, SubjectAccessReviews).
//! - [`webhook`]: the CRD conversion webhook (`POST /convert`) and its reloading certificate.
//! - [`inject`]: the sidecar injection webhook (`POST /inject`): an AdmissionReview of a Pod in,
//!   the JSON Patch that adds the interception init container and the proxy out;
//!   [`injector`]: that handler as the controller serves it (options of the moment, Events for
//!   pods admitted without a proxy).
//!
//! The core and the gRPC API build without this crate; `trellis-controller` links it for
//! `--platform kubernetes`.

pub mod aggregated;
pub mod events;
pub mod inject;
pub mod injector;
pub mod leader;
pub mod policy;
pub mod webhook;
