//! The Discovery trait and its endpoint model: every platform's registry becomes the same stream of
//! whole snapshots, so one SMI policy applies to workloads wherever they are registered.
//!
//! Adapters (file, Kubernetes, Consul, Cloud Map) implement [`Discovery`]; the controller consumes
//! it and knows nothing of platforms. Whole snapshots rather than deltas: registries return whole
//! memberships anyway (Consul blocking queries, Cloud Map DiscoverInstances, a Kubernetes reflector
//! store), and whole snapshots are idempotent, mergeable and easy to test.
//!
//! # Contract every adapter keeps
//! - `watch` yields the current state first (a [`Snapshot`]), then a new whole snapshot whenever
//!   membership, readiness, identity, labels, weight or ports change. It may repeat an unchanged
//!   snapshot (consumers de-duplicate) but should not flood.
//! - Streams never end on their own. Failures are yielded as `Err(DiscoveryError)` items (that is
//!   how staleness is reported); the adapter backs off and retries, and the consumer keeps the last
//!   good snapshot. A registry outage never empties the mesh's view of a service.
//! - `NotFound` is an answer: the registry said the service does not exist (TrafficSplit backends
//!   may name services that do not exist yet).
//! - Identities follow DESIGN.md: Kubernetes ServiceAccount; elsewhere the service name unless an
//!   instance carries an explicit service-account tag/attribute.
//!
//! # Shared helpers for adapters
//! - [`backoff()`] / [`Backoff`]: the one retry policy (100 ms initial, x2, jitter, forever; no
//!   single sleep above [`BACKOFF_CAP`] = 2 s, which is what "recovers within one backoff period"
//!   means).
//! - [`VersionSubsets`]: the version-subset convention for platforms without per-version services:
//!   a watch of `web-v2` is the service `web-v2` if it exists, else the `web` endpoints labelled
//!   `version=v2` (an empty set when `web` has none), else `NotFound`. Split at the last `-`.
//! - [`Merged`]: several adapters as one view per [`ServiceKey`]: union of endpoints, the source
//!   listed first wins an address+port conflict, `NotFound` only when every source says so, errors
//!   passed on without erasing anything, per-source freshness for `trellis check`.
//!
//! # Addresses (transparent mode)
//! [`Discovery::watch_address`] maps an IP back to the mesh ([`AddressOwner`]): a service's
//! virtual address (Kubernetes ClusterIPs, file `addresses`), an endpoint (a pod IP), or
//! `Unknown` (the default for sources without virtual addresses). [`Merged`] answers with the
//! first source, in source order, that knows the address.

mod backoff;
mod error;
#[cfg(test)]
mod fake;
mod merge;
mod model;
mod subsets;

pub use backoff::{BACKOFF_CAP, BACKOFF_INITIAL, Backoff, backoff};

pub use error::{DiscoveryError, ErrorKind};
pub use merge::{
    DEFAULT_SETTLE, Merged, RegistrationProblem, SourceFreshness, merge_owners, merge_snapshots,
    registration_problems,
};
pub use model::{
    AddressOwner, Endpoint, EndpointPort, EndpointSet, OwnerRef, ProtocolHint, Provenance,
    Readiness, ServiceCatalog, ServiceKey, ServicePort, Snapshot, SourceId, WorkloadIdentity,
};
pub use subsets::{VersionSubsets, resolve_subset, split_version, version_subset};

use std::net::IpAddr;
use std::time::Duration;

use futures::stream::BoxStream;

/// The label that selects a version subset: a TrafficSplit backend `web-v2` on a platform without
/// per-version services selects the instances of `web` whose `version` label is `v2`.
pub const VERSION_LABEL: &str = "version";

/// How an adapter learns about changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeDelivery {
    /// The registry pushes changes (Kubernetes watch, Consul blocking queries, file notifications).
    Push,
    /// The adapter polls at this interval (Cloud Map).
    Poll(Duration),
}

/// Where an adapter's workload identities come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// The platform has real workload identities (Kubernetes ServiceAccounts).
    Platform,
    /// An explicit per-instance tag/attribute, else the service name.
    AttributeOrServiceName,
}

/// What an adapter can tell: the behavioural suite and the controller gate on these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub delivery: ChangeDelivery,
    /// Health/readiness is reported per endpoint (else every endpoint is `Ready`).
    pub health: bool,
    /// A `Terminating` state exists (Kubernetes EndpointSlice conditions).
    pub terminating: bool,
    /// Per-endpoint weights.
    pub weights: bool,
    /// Per-endpoint zones.
    pub zones: bool,
    /// Owner workloads beyond the service itself (Kubernetes Deployments).
    pub owners: bool,
    pub identity: IdentitySource,
    /// Version subsets of one service by the [`VERSION_LABEL`] label (non-Kubernetes platforms).
    pub version_subsets: bool,
}

/// One platform registry, seen as whole snapshots.
pub trait Discovery: Send + Sync + 'static {
    /// This adapter instance's source id, e.g. `consul:127.0.0.1:8500`.
    fn source_id(&self) -> SourceId;

    fn capabilities(&self) -> Capabilities;

    /// The services this source knows, as whole catalogs: the current one first, then one per change.
    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>>;

    /// The membership of one service: the current snapshot first, then one per change. Never ends
    /// on its own; drop the stream to stop watching.
    fn watch(&self, service: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>>;

    /// Who holds `address`: a service's virtual address, an endpoint's address, or nobody. The
    /// current answer first, then one per change (a service created later is found; deleted, the
    /// answer goes back to [`AddressOwner::Unknown`]); never ends on its own, failures are `Err`
    /// items as for [`Discovery::watch`].
    ///
    /// Adapters answer from an index they keep anyway (a lookup is not a scan per caller: the
    /// controller asks once per address, and proxies cache per `IP:PORT`). The default is for
    /// sources without virtual addresses that cannot cheaply map an address to an endpoint
    /// (Consul, Cloud Map): always `Unknown`, so an intercepted connection to such an address is
    /// forwarded unchanged.
    fn watch_address(
        &self,
        address: IpAddr,
    ) -> BoxStream<'static, Result<AddressOwner, DiscoveryError>> {
        let _ = address;
        futures::StreamExt::boxed(futures::StreamExt::chain(
            futures::stream::once(async { Ok(AddressOwner::Unknown) }),
            futures::stream::pending(),
        ))
    }
}
