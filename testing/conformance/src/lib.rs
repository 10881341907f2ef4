//! The SMI conformance suite and platform-parity matrix of Trellis, run end to end against real
//! processes on loopback.
//!
//! - The workload is the echo app of `trellis-echo` (`apps/echo`), shared with `trellis demo`.
//! - [`harness`]: starts the controller, one `trellis-proxy` per workload and the echo apps as
//!   real processes, for one platform (file, Consul double, Cloud Map on moto, Kubernetes fake or
//!   real API server).
//! - [`scenarios`]: the SMI scenarios, the same SMI YAML on every platform.
//! - [`table`]: the scenario x platform table the conformance test prints.
//! - [`prometheus`]: a real Prometheus for the tests that run Flagger's queries.
//! - [`canary`]: a Flagger-style canary's processes and objects (controller, pods, caller, splits)
//!   on files or on Kubernetes, and the replay of a whole Flagger run on either.
//!
//! The test `tests/smi.rs` runs every scenario on every platform and fails on any failure.

pub mod canary;
pub mod harness;
pub mod prometheus;
pub mod scenarios;
pub mod table;
