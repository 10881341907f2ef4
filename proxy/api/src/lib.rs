//! The gRPC contract between the Trellis controller and trellis-proxy (tonic + prost).
//!
//! (Being built; see the crate README / issue tracker.)
