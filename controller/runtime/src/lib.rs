//! The Trellis controller's runtime: assembles the parts into one running controller.
//!
//! - SMI policy from a watched files source (`trellis-controller-core`) and, with `--platform
//!   kubernetes`, the SMI CRDs, leader election and Events (`trellis-controller-kubernetes`);
//! - endpoints from the discovery platforms chosen on the command line ([`discovery`]);
//! - the single-writer index (`trellis-controller-core`), streamed to proxies by the gRPC API
//!   (`trellis-controller-grpc`), which also serves the CA's `Identity.Certify` ([`identity`]);
//! - [`admin`]: `/metrics`, `/ready`, `/live` and `/api/v1/state`.
//!
//! [`run::start`] starts the whole thing in-process (used by `trellis controller`, `trellis demo`
//! and the tests). The semantics and the decisions where SMI is silent are in `controller/README.md`.

pub mod admin;
pub mod discovery;
pub mod identity;
pub mod run;
