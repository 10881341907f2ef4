//! The Cloud Map calls, over the real SDK: the data plane for watches (`DiscoverInstances`,
//! `DiscoverInstancesRevision`, which take namespace and service *names*), and the control plane
//! for the catalog (`ListNamespaces`, `ListServices`, which need namespace *ids*).
//!
//! Names to ids: the catalog resolves namespace names with one `ListNamespaces` on every catalog
//! poll, so a namespace deleted and re-created (new id, same name) is picked up without a restart;
//! the result is cached in a [`Directory`] that watches use for the namespace's `HttpName` (the
//! name DiscoverInstances wants; equal to the namespace name unless AWS added a hash because the
//! name was reused). When a watch gets `NamespaceNotFound`, it re-resolves (at most once per
//! catalog interval) and retries once with the new `HttpName` before answering `NotFound`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_servicediscovery::Client;
use aws_sdk_servicediscovery::error::ProvideErrorMetadata;
use aws_sdk_servicediscovery::types::{
    FilterCondition, HealthStatus, HealthStatusFilter, ServiceFilter, ServiceFilterName,
};
use tokio::time::Instant;
use trellis_discovery::{DiscoveryError, ErrorKind, ServiceKey, SourceId};

use crate::errors::{Failure, failure};
use crate::mapping::{Health, RawInstance};
use crate::watch::{Discovered, InstanceSource};

/// DiscoverInstances returns at most this many instances (the API's maximum `MaxResults`; it has
/// no pagination). Cloud Map's default quota is 1,000 instances per service; a service that fills
/// a whole answer is read again through the paginated control plane (`ListInstances` +
/// `GetInstancesHealthStatus`).
pub(crate) const DISCOVER_MAX_RESULTS: i32 = 1000;

/// One namespace as `ListNamespaces` described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NamespaceInfo {
    pub name: String,
    pub id: String,
    pub http_name: String,
}

/// Namespace names to ids and `HttpName`s, from the last `ListNamespaces`.
#[derive(Debug, Default)]
pub(crate) struct Directory {
    state: Mutex<DirectoryState>,
}

#[derive(Debug, Default)]
struct DirectoryState {
    by_name: HashMap<String, NamespaceInfo>,
    refreshed_at: Option<Instant>,
}

impl Directory {
    /// The `HttpName` to use for the namespace `name` (the name itself until resolved otherwise).
    fn http_name(&self, name: &str) -> String {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .by_name
            .get(name)
            .map_or_else(|| name.to_string(), |ns| ns.http_name.clone())
    }

    fn get(&self, name: &str) -> Option<NamespaceInfo> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.by_name.get(name).cloned()
    }

    fn is_older_than(&self, age: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.refreshed_at.is_none_or(|at| at.elapsed() >= age)
    }

    fn replace(&self, namespaces: &[NamespaceInfo]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.by_name = namespaces
            .iter()
            .map(|ns| (ns.name.clone(), ns.clone()))
            .collect();
        state.refreshed_at = Some(Instant::now());
    }
}

/// The SDK client with what every call needs.
#[derive(Debug)]
pub(crate) struct Sdk {
    pub client: Client,
    pub source_id: SourceId,
    pub directory: Directory,
    /// How often a watch may re-resolve namespaces after `NamespaceNotFound`.
    pub resolve_interval: Duration,
}

impl Sdk {
    /// Lists every namespace and refreshes the directory.
    pub(crate) async fn list_namespaces(&self) -> Result<Vec<NamespaceInfo>, DiscoveryError> {
        let summaries = self
            .client
            .list_namespaces()
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| {
                failure(&self.source_id, "ListNamespaces", "the catalog", e)
                    .into_error(&self.source_id, "ListNamespaces")
            })?;
        let namespaces: Vec<NamespaceInfo> = summaries
            .into_iter()
            .flat_map(|page| page.namespaces.unwrap_or_default())
            .filter_map(|ns| {
                let name = ns.name?;
                let http_name = ns
                    .properties
                    .and_then(|p| p.http_properties)
                    .and_then(|h| h.http_name)
                    .unwrap_or_else(|| name.clone());
                Some(NamespaceInfo {
                    id: ns.id?,
                    name,
                    http_name,
                })
            })
            .collect();
        self.directory.replace(&namespaces);
        Ok(namespaces)
    }

    /// The services (name, id) of `namespace`.
    pub(crate) async fn list_services(
        &self,
        namespace: &NamespaceInfo,
    ) -> Result<Vec<(String, String)>, DiscoveryError> {
        let what = format!("namespace {} ({})", namespace.name, namespace.id);
        let filter = ServiceFilter::builder()
            .name(ServiceFilterName::NamespaceId)
            .values(namespace.id.clone())
            .condition(FilterCondition::Eq)
            .build()
            .map_err(|e| {
                DiscoveryError::new(
                    ErrorKind::Config,
                    false,
                    self.source_id.clone(),
                    format!("ListServices filter for {what}: {e}"),
                )
            })?;
        let services = self
            .client
            .list_services()
            .filters(filter)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| {
                failure(&self.source_id, "ListServices", &what, e)
                    .into_error(&self.source_id, &what)
            })?;
        Ok(services
            .into_iter()
            .flat_map(|page| page.services.unwrap_or_default())
            .filter_map(|s| Some((s.name?, s.id?)))
            .collect())
    }

    /// After `NamespaceNotFound` with `tried`: re-resolves (rate-limited) and returns a different
    /// `HttpName` for the namespace, if there is one.
    async fn re_resolve(&self, key: &ServiceKey, tried: &str) -> Option<String> {
        if !self.directory.is_older_than(self.resolve_interval) {
            return None;
        }
        if let Err(e) = self.list_namespaces().await {
            tracing::debug!(service = %key, "re-resolving namespaces failed: {e}");
            return None;
        }
        let now = self.directory.http_name(&key.namespace);
        (now != tried).then_some(now)
    }

    async fn revision_at(&self, http_name: &str, key: &ServiceKey) -> Result<Option<i64>, Failure> {
        self.client
            .discover_instances_revision()
            .namespace_name(http_name)
            .service_name(&key.name)
            .send()
            .await
            .map(|out| out.instances_revision)
            .map_err(|e| {
                failure(
                    &self.source_id,
                    "DiscoverInstancesRevision",
                    &key.to_string(),
                    e,
                )
            })
    }

    async fn instances_at(&self, http_name: &str, key: &ServiceKey) -> Result<Discovered, Failure> {
        let out = self
            .client
            .discover_instances()
            .namespace_name(http_name)
            .service_name(&key.name)
            .health_status(HealthStatusFilter::All)
            .max_results(DISCOVER_MAX_RESULTS)
            .send()
            .await
            .map_err(|e| failure(&self.source_id, "DiscoverInstances", &key.to_string(), e))?;
        let mut instances: Vec<RawInstance> = out
            .instances
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| {
                Some(RawInstance {
                    id: i.instance_id?,
                    health: health(i.health_status.as_ref()),
                    attributes: i.attributes.unwrap_or_default().into_iter().collect(),
                })
            })
            .collect();
        if instances.len() >= DISCOVER_MAX_RESULTS as usize {
            // DiscoverInstances has no pagination: read the whole service from the control plane.
            instances = self.list_all_instances(key).await?;
        }
        Ok(Discovered {
            instances,
            revision: out.instances_revision,
        })
    }

    /// The id of the service `key` (control plane), `NotFound` when it does not exist.
    async fn service_id(&self, key: &ServiceKey) -> Result<String, Failure> {
        let mut namespace = self.directory.get(&key.namespace);
        if namespace.is_none() {
            self.list_namespaces().await.map_err(Failure::Error)?;
            namespace = self.directory.get(&key.namespace);
        }
        let Some(namespace) = namespace else {
            return Err(Failure::NotFound);
        };
        let services = self
            .list_services(&namespace)
            .await
            .map_err(Failure::Error)?;
        services
            .into_iter()
            .find(|(name, _)| *name == key.name)
            .map(|(_, id)| id)
            .ok_or(Failure::NotFound)
    }

    /// Every instance of a service with more than DiscoverInstances can return: `ListInstances`
    /// for the attributes and `GetInstancesHealthStatus` for health (both paginated).
    async fn list_all_instances(&self, key: &ServiceKey) -> Result<Vec<RawInstance>, Failure> {
        let what = key.to_string();
        let service_id = self.service_id(key).await?;
        let listed = self
            .client
            .list_instances()
            .service_id(&service_id)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|e| failure(&self.source_id, "ListInstances", &what, e))?;
        let statuses: HashMap<String, HealthStatus> = match self
            .client
            .get_instances_health_status()
            .service_id(&service_id)
            .into_paginator()
            .send()
            .try_collect()
            .await
        {
            Ok(pages) => pages
                .into_iter()
                .flat_map(|p| p.status.unwrap_or_default())
                .collect(),
            // A service without health checks has no health status to report.
            Err(e) if matches!(e.code(), Some("InvalidInput" | "InstanceNotFound")) => {
                HashMap::new()
            }
            Err(e) => {
                return Err(failure(
                    &self.source_id,
                    "GetInstancesHealthStatus",
                    &what,
                    e,
                ));
            }
        };
        let instances: Vec<RawInstance> = listed
            .into_iter()
            .flat_map(|page| page.instances.unwrap_or_default())
            .filter_map(|i| {
                let id = i.id?;
                Some(RawInstance {
                    health: health(statuses.get(&id)),
                    id,
                    attributes: i.attributes.unwrap_or_default().into_iter().collect(),
                })
            })
            .collect();
        tracing::debug!(service = %key, count = instances.len(), "listed a service beyond DiscoverInstances' {DISCOVER_MAX_RESULTS} instances");
        Ok(instances)
    }
}

fn health(status: Option<&HealthStatus>) -> Health {
    match status {
        Some(HealthStatus::Healthy) => Health::Healthy,
        Some(HealthStatus::Unhealthy) => Health::Unhealthy,
        _ => Health::Unknown,
    }
}

impl InstanceSource for Sdk {
    async fn revision(&self, key: &ServiceKey) -> Result<Option<i64>, Failure> {
        let http_name = self.directory.http_name(&key.namespace);
        match self.revision_at(&http_name, key).await {
            Err(Failure::NotFound) => match self.re_resolve(key, &http_name).await {
                Some(other) => self.revision_at(&other, key).await,
                None => Err(Failure::NotFound),
            },
            result => result,
        }
    }

    async fn instances(&self, key: &ServiceKey) -> Result<Discovered, Failure> {
        let http_name = self.directory.http_name(&key.namespace);
        match self.instances_at(&http_name, key).await {
            Err(Failure::NotFound) => match self.re_resolve(key, &http_name).await {
                Some(other) => self.instances_at(&other, key).await,
                None => Err(Failure::NotFound),
            },
            result => result,
        }
    }
}
