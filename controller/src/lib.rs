//! The Trellis control plane and the `trellis` CLI.
//!
//! (Being built; see the crate README / issue tracker.)
