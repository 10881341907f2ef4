//! trellis-proxy: the one data-plane binary for HTTP/1.1, HTTP/2, gRPC and TCP.
//!
//! (Being built; see the crate README / issue tracker.)
