//! Consul discovery adapter: the catalog and the health of each watched service, read with
//! Consul's blocking queries and turned into whole endpoint snapshots.
//!
//! ```no_run
//! use trellis_adapter_consul::{AclToken, ConsulConfig, ConsulDiscovery};
//! use trellis_discovery::Discovery;
//!
//! let mut config = ConsulConfig::new("http://127.0.0.1:8500");
//! config.token = Some(AclToken::new("…"));          // never shown by Debug or in logs
//! let consul = ConsulDiscovery::with_version_subsets(config)?;
//! let _watch = consul.watch(trellis_discovery::ServiceKey::new("default", "web"));
//! # Ok::<(), trellis_discovery::DiscoveryError>(())
//! ```
//!
//! # What it reads
//! - `GET /v1/catalog/services` (the [`Discovery::services`] stream; the source of truth for
//!   whether a service exists) and `GET /v1/health/service/:name` (one loop per watch), both as
//!   blocking queries: `index` + `wait`. The index is reset to 0 when it goes backwards and never
//!   sent as 0 after the first read (Consul's "Blocking Queries" implementation notes); each loop
//!   is rate-limited by a token bucket (burst 2, then one query per `rate_limit.interval`, default
//!   100 ms), so a server answering at once cannot make it spin. HTTP timeouts are
//!   `wait + wait/16 + request_timeout`, longer than Consul may hold a query.
//! - Health queries are sent **without** `?passing`: every instance is returned and its checks
//!   become [`Readiness`](trellis_discovery::Readiness), so a health flap is an update of one
//!   endpoint, not a disappearance and reappearance (which would churn connection pools and make a
//!   service with all instances failing look deleted). `passing` -> Ready; `warning` -> Ready with
//!   `Weights.Warning` ([`WarningPolicy::Ready`], like Consul DNS) or NotReady
//!   ([`WarningPolicy::NotReady`], like `?passing`); `critical` -> NotReady; maintenance (the
//!   critical `_service_maintenance:<id>` / `_node_maintenance` checks) -> Terminating. Node checks
//!   (e.g. `serfHealth`) count, as they do for `?passing`.
//! - `X-Consul-KnownLeader: false` (possible with [`ConsulConfig::stale`]): the snapshot is still
//!   delivered, followed by an `Err` item (Unavailable, temporary) saying it may be stale.
//!   Without `stale`, a leaderless cluster answers 500 "No cluster leader": an `Err` item, backoff.
//!
//! # Mapping
//! - Address: `Service.Address`, else the node's `Address` (Consul's rule); instances whose
//!   address is not an IP are skipped with a warning. One unnamed port, `Service.Port`. The set's
//!   service ports are the distinct instance ports.
//! - Labels: meta `k: v` -> `k=v`; tag `k=v` -> `k=v`; bare tag `t` -> `tag.t=""`; meta wins
//!   over a tag with the same key. The `version` label (from meta or a `version=v2` tag) selects
//!   version subsets.
//! - Identity: namespace = the ServiceKey namespace; service account = the
//!   [`ConsulConfig::service_account_key`] label (meta or tag, default `service-account`), else
//!   the service name. Owner: kind `Service`, the service name.
//! - Weight: `Weights.Passing` (`Weights.Warning` while a check warns). Zone: the `zone` label,
//!   else node meta `zone`. Protocol: the `protocol` label.
//! - Namespace: on Consul Enterprise ([`ConsulConfig::enterprise_namespace`]) the ServiceKey
//!   namespace is sent as `ns`; on OSS only [`ConsulConfig::default_namespace`] (`default`)
//!   exists and other namespaces are `NotFound`.
//! - Existence: Consul answers `200 []` for an unknown service. An empty health result is checked
//!   against `/v1/catalog/services`: listed -> an empty endpoint set, else `NotFound`.
//! - Version subsets: [`ConsulDiscovery::with_version_subsets`] wraps the adapter in
//!   [`trellis_discovery::VersionSubsets`]: a watch of `web-v2` is the service `web-v2` if it
//!   exists, else the `web` instances labelled `version=v2`.
//!
//! # Client
//! A small typed client over hyper-util's pooled client (see the README for why not `rs-consul`).

mod blocking;
mod client;
mod config;
mod mapping;
mod watch;
mod wire;

use std::sync::Arc;

use futures::stream::BoxStream;
use trellis_discovery::{
    Capabilities, ChangeDelivery, Discovery, DiscoveryError, ErrorKind, IdentitySource,
    ServiceCatalog, ServiceKey, Snapshot, SourceId, VersionSubsets,
};

pub use config::{AclToken, ConsulConfig, RateLimit, WarningPolicy};
pub use mapping::BARE_TAG_PREFIX;

use client::ConsulClient;
use watch::Shared;

/// The Consul adapter. Cheap to clone streams from: every watch is its own blocking loop over one
/// shared HTTP connection pool.
#[derive(Debug, Clone)]
pub struct ConsulDiscovery {
    shared: Arc<Shared>,
}

impl ConsulDiscovery {
    /// An adapter for the Consul HTTP API in `config`; fails on a bad configuration (the address,
    /// the wait, the rate limit), never on an unreachable Consul (that is a stream item).
    pub fn new(config: ConsulConfig) -> Result<Self, DiscoveryError> {
        let source: SourceId =
            format!("consul:{}", config.address.trim_start_matches("http://")).into();
        let base = config.validate().map_err(|message| {
            DiscoveryError::new(ErrorKind::Config, false, source.clone(), message)
        })?;
        let client = ConsulClient::new(
            base,
            config.token.clone(),
            config.datacenter.clone(),
            config.stale,
            config.request_timeout,
        );
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                config,
                source,
            }),
        })
    }

    /// The adapter with the version-subset convention (what the controller should use).
    pub fn with_version_subsets(
        config: ConsulConfig,
    ) -> Result<VersionSubsets<Self>, DiscoveryError> {
        Ok(VersionSubsets::new(Self::new(config)?))
    }

    pub fn config(&self) -> &ConsulConfig {
        &self.shared.config
    }
}

impl Discovery for ConsulDiscovery {
    fn source_id(&self) -> SourceId {
        self.shared.source.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivery: ChangeDelivery::Push,
            health: true,
            terminating: true,
            weights: true,
            zones: true,
            owners: false,
            identity: IdentitySource::AttributeOrServiceName,
            version_subsets: false,
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        watch::catalog_stream(self.shared.clone())
    }

    fn watch(&self, service: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        watch::service_stream(self.shared.clone(), service)
    }
}
