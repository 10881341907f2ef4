//! AWS Cloud Map discovery adapter over the real AWS SDK (`aws-sdk-servicediscovery`).
//!
//! Turns Cloud Map namespaces, services and instances into the [`trellis_discovery`] endpoint
//! model: `watch(ServiceKey)` yields whole snapshots of one service, `services()` the catalog.
//!
//! ```no_run
//! # async fn demo() -> Result<(), trellis_discovery::DiscoveryError> {
//! use futures::StreamExt;
//! use trellis_adapter_cloudmap::{CloudMap, CloudMapOptions};
//! use trellis_discovery::{Discovery, ServiceKey};
//!
//! let discovery = CloudMap::connect(CloudMapOptions {
//!     namespaces: vec!["prod.local".into()],
//!     ..CloudMapOptions::default()
//! })
//! .await?;
//! let mut web = discovery.watch(ServiceKey::new("prod.local", "web"));
//! while let Some(snapshot) = web.next().await {
//!     println!("{snapshot:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! # Names
//! `ServiceKey.namespace` is the Cloud Map **namespace name**, `ServiceKey.name` the service name.
//! Watches call the data plane by name (`DiscoverInstances` takes names), so they need no ids;
//! the catalog resolves names to ids with one `ListNamespaces` per catalog poll and caches the
//! namespaces' `HttpName`s for the watches; after `NamespaceNotFound` a watch re-resolves (at most
//! once per catalog interval) and retries once. An unknown namespace or service is
//! `Snapshot::NotFound`, not an error.
//!
//! # Change detection
//! Per watched service: `DiscoverInstancesRevision` every [`CloudMapOptions::poll_interval`]
//! (default 1 s); a full `DiscoverInstances` (health filter `ALL`, so unhealthy instances show as
//! `NotReady` instead of vanishing) when the revision **differs** from the last one (revisions can
//! go backwards), and every [`CloudMapOptions::refresh_interval`] (default 10 s) regardless, because
//! health changes do not change the revision. A snapshot is yielded only when what Cloud Map
//! returned changed.
//!
//! # Attributes, health and identity
//! The full table is in the README. `AWS_INSTANCE_IPV4`/`IPV6` and `AWS_INSTANCE_PORT` give
//! the address and port; `SERVICE_ACCOUNT` (or `service-account`) the identity's service account,
//! else the service name, in the namespace of the key; `version`, `weight`, `protocol`,
//! `AVAILABILITY_ZONE` map to their fields; every attribute is also a label. `HEALTHY` is `Ready`,
//! `UNHEALTHY` `NotReady`, `UNKNOWN` `Ready`.
//!
//! # Version subsets
//! [`CloudMap::connect`] returns the adapter wrapped in [`trellis_discovery::VersionSubsets`]: a
//! watch of `web-v2` is the service `web-v2` if it exists, else the `web` instances whose
//! `version` attribute is `v2` (an empty set when `web` has none), else `NotFound`.
//!
//! # Failures
//! SDK retries are off: the watch loop is the retry. Throttling (`RequestLimitExceeded`...),
//! timeouts, connection failures and 5xx are `Err` items with `temporary = true`, followed by the
//! shared backoff ([`trellis_discovery::BACKOFF_CAP`]); the last snapshot stays. Refused credentials
//! and bad input are permanent errors, retried every refresh interval.
//!
//! # Endpoint override
//! With [`CloudMapOptions::endpoint_url`] (or `AWS_ENDPOINT_URL`) set, the
//! [`LocalEndpointInterceptor`] removes the `data-` host prefix the SDK puts on DiscoverInstances;
//! it is installed only then. Region and credentials come from the standard AWS chain unless set in
//! the options. TLS is rustls with ring (no aws-lc).
//!
//! # Large services
//! DiscoverInstances returns at most 1,000 instances and has no pagination (Cloud Map's default
//! quota is 1,000 instances per service). When an answer is full, the adapter reads the service
//! again through the paginated control plane: `ListServices` (the service id), `ListInstances`
//! and `GetInstancesHealthStatus`. Those calls have lower rate limits, so they run only for such
//! services (on a revision change or refresh).

mod catalog;
mod config;
mod errors;
mod interceptor;
mod mapping;
mod sdk;
mod watch;

use std::sync::Arc;

use futures::stream::BoxStream;
use trellis_discovery::{
    Capabilities, ChangeDelivery, Discovery, DiscoveryError, ErrorKind, IdentitySource,
    ServiceCatalog, ServiceKey, Snapshot, SourceId, VersionSubsets,
};

pub use config::{
    CloudMapOptions, DEFAULT_CATALOG_INTERVAL, DEFAULT_POLL_INTERVAL, DEFAULT_REFRESH_INTERVAL,
    DEFAULT_REQUEST_TIMEOUT, StaticCredentials, apply_options, explicit_client, https_client,
    standard_client,
};
pub use interceptor::LocalEndpointInterceptor;
pub use mapping::{
    ATTR_ECS_SERVICE, ATTR_IPV4, ATTR_IPV6, ATTR_PORT, ATTR_PROTOCOL, ATTR_SERVICE_ACCOUNT,
    ATTR_VERSION, ATTR_WEIGHT, ATTR_ZONE,
};

/// The adapter with the version-subset convention on top: what [`CloudMap::connect`] returns.
pub type CloudMapDiscovery = VersionSubsets<CloudMap>;

/// The Cloud Map adapter itself (without version subsets; see [`CloudMapDiscovery`]).
#[derive(Debug)]
pub struct CloudMap {
    sdk: Arc<sdk::Sdk>,
    options: CloudMapOptions,
}

impl CloudMap {
    /// Builds the SDK client from the standard AWS chain with `options` on top.
    /// Fails on bad options or when no region can be found.
    pub async fn connect(options: CloudMapOptions) -> Result<CloudMapDiscovery, DiscoveryError> {
        validate(&options)?;
        let client = config::standard_client(&options).await;
        Self::with_client(client, options)
    }

    /// Uses `client` as it is (build it with [`apply_options`] to get the HTTP client, timeouts
    /// and endpoint interceptor this adapter expects).
    pub fn with_client(
        client: aws_sdk_servicediscovery::Client,
        options: CloudMapOptions,
    ) -> Result<CloudMapDiscovery, DiscoveryError> {
        validate(&options)?;
        let region = client.config().region().map(|r| r.to_string());
        let source_id: SourceId = match (&options.endpoint_url, &region) {
            (Some(url), _) => format!("cloudmap:{url}").into(),
            (None, Some(region)) => format!("cloudmap:{region}").into(),
            (None, None) => {
                return Err(DiscoveryError::new(
                    ErrorKind::Config,
                    false,
                    "cloudmap".into(),
                    "no AWS region: set CloudMapOptions::region, AWS_REGION or a profile region",
                ));
            }
        };
        let sdk = sdk::Sdk {
            client,
            source_id,
            directory: sdk::Directory::default(),
            resolve_interval: options.catalog_interval,
        };
        Ok(VersionSubsets::new(Self {
            sdk: Arc::new(sdk),
            options,
        }))
    }

    /// The SDK client this adapter uses.
    pub fn client(&self) -> &aws_sdk_servicediscovery::Client {
        &self.sdk.client
    }
}

fn validate(options: &CloudMapOptions) -> Result<(), DiscoveryError> {
    let intervals = [
        ("poll_interval", options.poll_interval),
        ("refresh_interval", options.refresh_interval),
        ("catalog_interval", options.catalog_interval),
        ("request_timeout", options.request_timeout),
    ];
    for (field, value) in intervals {
        if value.is_zero() {
            return Err(DiscoveryError::new(
                ErrorKind::Config,
                false,
                "cloudmap".into(),
                format!("CloudMapOptions::{field} must be greater than zero"),
            ));
        }
    }
    Ok(())
}

impl Discovery for CloudMap {
    fn source_id(&self) -> SourceId {
        self.sdk.source_id.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivery: ChangeDelivery::Poll(self.options.poll_interval),
            health: true,
            terminating: false,
            weights: true,
            zones: true,
            owners: false,
            identity: IdentitySource::AttributeOrServiceName,
            version_subsets: false,
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        catalog::services(
            self.sdk.clone(),
            self.options.namespaces.clone(),
            self.options.catalog_interval,
        )
    }

    fn watch(&self, service: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        watch::watch(
            self.sdk.clone(),
            service,
            self.sdk.source_id.clone(),
            watch::Timing {
                poll: self.options.poll_interval,
                refresh: self.options.refresh_interval,
            },
        )
    }
}
