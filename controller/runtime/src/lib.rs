//! The Trellis controller's runtime: assembles the parts into one running controller.
//!
//! - SMI policy from a watched files source (`trellis-controller-core`) and, with `--platform
//!   kubernetes`, the SMI CRDs, leader election and Events (`trellis-controller-kubernetes`,
//!   reached through [`kubernetes`]);
//! - endpoints from the discovery platforms chosen on the command line ([`discovery`]);
//! - the single-writer index (`trellis-controller-core`), streamed to proxies by the gRPC API
//!   (`trellis-controller-grpc`), which also serves the CA's `Identity.Certify` ([`identity`]),
//!   over TLS with a serving certificate from the same CA when asked ([`grpc_tls`]);
//! - [`webhooks`]: the CRD conversion and sidecar injection webhooks over HTTPS (Kubernetes);
//! - [`admin`]: `/metrics`, `/ready`, `/live` and `/api/v1/state`.
//!
//! Built without the `kubernetes` feature it links no Kubernetes client; `--platform
//! kubernetes`, `--ca-secret` and TokenReview then fail at start with [`kubernetes::NOT_BUILT`].
//!
//! [`run::start`] starts the whole thing in-process (used by `trellis controller`, `trellis demo`
//! and the tests). The semantics and the decisions where SMI is silent are in `controller/README.md`.

pub mod admin;
pub mod discovery;
pub mod grpc_tls;
pub mod identity;
/// Everything that needs a Kubernetes client. Without the `kubernetes` feature the same names
/// come from `without_kubernetes.rs` and fail saying so: the one `cfg` of the runtime.
#[cfg_attr(not(feature = "kubernetes"), path = "without_kubernetes.rs")]
pub mod kubernetes;
pub mod run;
pub mod webhooks;
