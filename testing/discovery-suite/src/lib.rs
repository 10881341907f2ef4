//! One behavioural test suite, written once, run against every discovery adapter.
//!
//! Each adapter's tests implement [`TestRegistry`] around a real registry or a faithful double
//! (the file adapter: a temp file; Consul: the Consul API double or a real agent; Cloud Map:
//! `moto_server`; Kubernetes: the fake API server or a real cluster) and expand
//! [`discovery_suite!`], which generates one `#[tokio::test]` per [`Scenario`]:
//!
//! ```ignore
//! trellis_discovery_suite::discovery_suite!(my_harness());   // my_harness(): async -> impl TestRegistry
//! ```
//!
//! Scenarios are gated by the adapter's [`trellis_discovery::Capabilities`] and the harness's
//! [`HarnessFeatures`]; a scenario that cannot apply prints `skipped: <reason>` and passes.
//!
//! # What the scenarios check
//! Every snapshot is compared exactly with what the harness registered: one endpoint per instance
//! (by address), its port, readiness (`NotReady` for a failing instance when the adapter has
//! health), identity (namespace = the watched key's namespace; service account = the explicit one,
//! else the service name, or `default` for adapters with [`trellis_discovery::IdentitySource::Platform`]),
//! the instance's labels (extra platform labels are fine), weight and zone (when the adapter has
//! them), `provenance.source == discovery.source_id()`, and `EndpointSet::service` = the watched key.
//! Changes are awaited for [`HarnessFeatures::change_timeout`]; the outage scenario holds the
//! registry away for 10 s and then allows `change_timeout + trellis_discovery::BACKOFF_CAP`.
//! Service names are prefixed by the scenario (`appear-web`, `vsub-web`, ...), so one registry can
//! serve every scenario.
//!
//! # Benchmarks
//! [`churn`] and [`memory`] are the generic runners behind every adapter's `benches/churn.rs`; each
//! report has a `print` that shows its figures next to a baseline the caller measured.

mod bench;
mod expect;
mod scenarios;

pub use bench::{
    ChurnReport, LatencyStats, MemoryReport, churn, memory, rss_bytes, snapshot_heap_bytes,
    time_baseline,
};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use trellis_discovery::Discovery;

/// An instance the suite registers through the harness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestInstance {
    /// Unique within its service: Consul ServiceID, Cloud Map InstanceId, pod name, file entry.
    pub id: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    /// Explicit service account (tag/attribute/pod spec); `None` = the platform default.
    pub service_account: Option<String>,
    /// Labels / tags / attributes, e.g. `version=v2`.
    pub labels: BTreeMap<String, String>,
    pub weight: Option<u32>,
    pub zone: Option<String>,
}

impl TestInstance {
    /// A ready instance with no labels: `id` at `address:port`.
    pub fn new(id: impl Into<String>, address: Ipv4Addr, port: u16) -> Self {
        Self {
            id: id.into(),
            address,
            port,
            ready: true,
            service_account: None,
            labels: BTreeMap::new(),
            weight: None,
            zone: None,
        }
    }
}

/// What the harness (not the adapter) can do.
#[derive(Clone, Copy, Debug)]
pub struct HarnessFeatures {
    /// The harness can take the registry away and bring it back at the same address.
    pub outage: bool,
    /// How long a change may take to show in a watch (push platforms: ~2 s; polling: a few
    /// poll intervals).
    pub change_timeout: Duration,
    /// Largest service the harness can register in reasonable time for the large-set scenario.
    pub large_set: usize,
}

/// A registry the suite can drive. Service names are plain names inside [`TestRegistry::namespace`];
/// every scenario uses its own service names, so scenarios may share one registry.
#[async_trait::async_trait]
pub trait TestRegistry: Send + Sync {
    fn features(&self) -> HarnessFeatures;

    /// The namespace (Kubernetes namespace, Consul namespace or default, Cloud Map namespace name)
    /// the suite's services live in.
    fn namespace(&self) -> String;

    /// A fresh adapter instance pointed at this registry.
    fn discovery(&self) -> Arc<dyn Discovery>;

    /// Creates the service if absent and makes its instances exactly `instances`.
    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()>;

    /// Removes the service and all its instances.
    async fn delete_service(&self, service: &str) -> anyhow::Result<()>;

    /// Marks one instance ready/healthy or not.
    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()>;

    /// Takes the registry away (connections refused or hanging) until [`Self::end_outage`].
    /// Only called when [`HarnessFeatures::outage`] is true.
    async fn begin_outage(&self) -> anyhow::Result<()>;

    /// Brings the registry back at the same address with the same content.
    async fn end_outage(&self) -> anyhow::Result<()>;
}

/// The behaviours every adapter must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A service registered after the watch starts appears; the catalog lists it.
    Appear,
    /// Adding, removing and re-addressing instances each yield a new whole snapshot.
    Change,
    /// A deleted service becomes `NotFound`; the catalog drops it.
    Disappear,
    /// Watching a service that never existed yields `NotFound` first, not an error.
    NotFound,
    /// Health/readiness changes show as `Readiness` changes, not as disappearance.
    Readiness,
    /// Identity (explicit service account or the default), labels, weight and zone are carried.
    IdentityAndLabels,
    /// A backend `web-v2` selects `web` instances labelled `version=v2` (where supported).
    VersionSubset,
    /// A large service (see [`HarnessFeatures::large_set`]) arrives whole.
    LargeSet,
    /// The registry goes away: the last snapshot stays, errors report staleness, the watch
    /// recovers on its own after the registry returns.
    Outage,
    /// Dropping a watch and starting a new one yields the current state again.
    RestartWatch,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::Appear,
        Scenario::Change,
        Scenario::Disappear,
        Scenario::NotFound,
        Scenario::Readiness,
        Scenario::IdentityAndLabels,
        Scenario::VersionSubset,
        Scenario::LargeSet,
        Scenario::Outage,
        Scenario::RestartWatch,
    ];
}

/// Runs one scenario against `registry`; panics with a precise message on failure. Prints the
/// reason and returns when the scenario does not apply to this adapter or harness.
pub async fn run(scenario: Scenario, registry: &dyn TestRegistry) {
    scenarios::run(scenario, registry).await
}

/// Expands to one `#[tokio::test]` per [`Scenario`], each calling `$make.await` for a fresh
/// harness (an expression evaluating to a future of `impl TestRegistry`).
#[macro_export]
macro_rules! discovery_suite {
    ($make:expr) => {
        $crate::discovery_suite!(@one $make, suite_appear, Appear);
        $crate::discovery_suite!(@one $make, suite_change, Change);
        $crate::discovery_suite!(@one $make, suite_disappear, Disappear);
        $crate::discovery_suite!(@one $make, suite_not_found, NotFound);
        $crate::discovery_suite!(@one $make, suite_readiness, Readiness);
        $crate::discovery_suite!(@one $make, suite_identity_and_labels, IdentityAndLabels);
        $crate::discovery_suite!(@one $make, suite_version_subset, VersionSubset);
        $crate::discovery_suite!(@one $make, suite_large_set, LargeSet);
        $crate::discovery_suite!(@one $make, suite_outage, Outage);
        $crate::discovery_suite!(@one $make, suite_restart_watch, RestartWatch);
    };
    (@one $make:expr, $name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let registry = $make.await;
            $crate::run($crate::Scenario::$scenario, &registry).await;
        }
    };
}
