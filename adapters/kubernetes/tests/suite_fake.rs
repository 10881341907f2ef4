//! The shared behavioural suite against the in-repo fake API server.

mod common;

trellis_discovery_suite::discovery_suite!(common::fake_harness());
