//! One behavioural test suite, written once, run against every discovery adapter.
//!
//! (Being built; see the crate README / issue tracker.)
