//! An in-process fake Kubernetes API server speaking real list/watch over HTTP (test support).
//!
//! (Being built; see the crate README / issue tracker.)
