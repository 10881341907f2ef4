//! The Discovery trait and its endpoint model: every platform registry becomes the same stream of whole snapshots.
//!
//! (Being built; see the crate README / issue tracker.)
