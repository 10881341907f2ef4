//! SMI API types for every group and version, lossless conversion to one normalized policy model, CRD generation, YAML loading and validation.
//!
//! (Being built; see the crate README / issue tracker.)
