//! The Trellis control plane and the `trellis` CLI.
//!
//! The controller joins SMI policy ([`policy`]) with discovered endpoints ([`discovery`]) in one
//! single-writer [`index`], which publishes per-destination profiles and per-workload-port inbound
//! policies through `tokio::sync::watch` channels; [`grpc`] streams them to proxies
//! (`trellis-proxy-api`) and serves the CA's `Identity.Certify` ([`identity`]), [`admin`] serves
//! `/metrics`, `/ready`, `/live` and `/api/v1/state`, and [`run::start`] starts the whole thing
//! in-process (used by `trellis controller`, `trellis demo` and the tests). The semantics and the
//! decisions where SMI is silent are in the crate README and in the docs of [`index::outbound`]
//! and [`index::inbound`].

pub mod admin;
pub mod discovery;
pub mod events;
pub mod grpc;
pub mod identity;
pub mod index;
pub mod leader;
pub mod policy;
pub mod run;
pub mod webhook;
