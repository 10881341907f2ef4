//! Consul discovery adapter: catalog and health blocking queries over a small typed HTTP client.
//!
//! (Being built; see the crate README / issue tracker.)
