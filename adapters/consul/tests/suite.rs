//! The shared behavioural suite against the Consul adapter over the in-repo Consul API double.

#[path = "support/harness.rs"]
mod harness;

trellis_discovery_suite::discovery_suite!(harness::double_harness());
