//! The shared behavioural suite against the file adapter (a temp file rewritten by the harness).

mod support;

trellis_discovery_suite::discovery_suite!(async { support::FileRegistry::new(5_000) });
