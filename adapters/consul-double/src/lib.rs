//! A faithful double of Consul's catalog/health HTTP API, blocking queries included (test support).
//!
//! (Being built; see the crate README / issue tracker.)
