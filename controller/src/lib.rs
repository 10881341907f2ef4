//! The Trellis control plane and the `trellis` CLI.
//!
//! The controller joins SMI policy ([`policy`]) with discovered endpoints and streams the result
//! to every proxy (see the crate README).

pub mod admin;
pub mod discovery;
pub mod grpc;
pub mod index;
pub mod policy;
pub mod run;
pub mod webhook;
