//! The SMI conformance suite and platform-parity matrix of Trellis, run end to end against real
//! processes on loopback.
//!
//! So far this crate holds the suite's test workload, the echo app ([`echo`], binary
//! `trellis-echo`), and its calling side ([`client`]). The harness that starts the controller,
//! proxies and echo apps per platform, and the SMI scenarios, arrive with the controller work.

pub mod client;
pub mod echo;
