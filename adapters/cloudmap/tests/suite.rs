//! The shared behavioural suite against moto_server through the real AWS SDK.

mod common;

trellis_discovery_suite::discovery_suite!(common::MotoRegistry::start());
