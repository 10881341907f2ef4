//! Kubernetes discovery adapter: Services, EndpointSlices and Pods through kube-runtime.
//!
//! (Being built; see the crate README / issue tracker.)
