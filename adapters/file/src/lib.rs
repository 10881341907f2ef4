//! File discovery adapter: a watched YAML file of services and endpoints (the local-mode default).
//!
//! (Being built; see the crate README / issue tracker.)
