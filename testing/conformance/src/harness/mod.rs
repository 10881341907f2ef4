//! The conformance harness: real processes for one platform at a time, on loopback or on hosts.
//!
//! - [`hosts`]: hosts as Linux network namespaces on one bridge, and where each role runs
//!   ([`hosts::Network`]: loopback or hosts).
//! - [`process`]: finding the workspace binaries, starting them with logs captured, reading the
//!   addresses they print, killing them on drop.
//! - [`platform`]: file, Consul (the double), Cloud Map (moto) and Kubernetes (the fake API
//!   server or a real cluster): registering workloads and applying SMI policy the platform's way.
//! - [`mesh`]: the controller, one `trellis-proxy` per workload and the echo apps, wired as the
//!   SMI conformance suite's topology, and the calls the scenarios make through it.

pub mod hosts;
pub mod mesh;
pub mod platform;
pub mod process;
