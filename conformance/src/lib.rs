//! The SMI conformance suite and platform-parity matrix of Trellis, run end to end against real
//! processes on loopback.
//!
//! - [`echo`] (binary `trellis-echo`): the suite's test workload; [`client`]: its calling side
//!   (N requests on one keep-alive connection, through a proxy).
//! - [`harness`]: starts the controller, one `trellis-proxy` per workload and the echo apps as
//!   real processes, for one platform (file, Consul double, Cloud Map on moto, Kubernetes fake or
//!   real API server).
//! - [`scenarios`]: the SMI scenarios, the same SMI YAML on every platform.
//! - [`table`]: the scenario x platform table the conformance test prints.
//!
//! The test `tests/smi.rs` runs every scenario on every platform and fails on any failure.

pub mod client;
pub mod echo;
pub mod harness;
pub mod scenarios;
pub mod table;
