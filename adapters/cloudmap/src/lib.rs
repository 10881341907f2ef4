//! AWS Cloud Map discovery adapter over the real AWS SDK (aws-sdk-servicediscovery).
//!
//! (Being built; see the crate README / issue tracker.)
