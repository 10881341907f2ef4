//! The poll loop behind `services`: every catalog interval, `ListNamespaces` (names to ids) and
//! `ListServices` per configured namespace; a catalog is yielded first and then whenever the set of
//! services changed. Failures are error items with the shared backoff; the last catalog stays.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, BoxStream, StreamExt};
use tokio::time::Instant;
use trellis_discovery::{Backoff, DiscoveryError, ServiceCatalog, ServiceKey};

use crate::sdk::Sdk;

struct CatalogLoop {
    sdk: Arc<Sdk>,
    /// Namespace names to list; empty = all.
    namespaces: Vec<String>,
    interval: Duration,
    last: Option<Vec<ServiceKey>>,
    backoff: Backoff,
    next_at: Option<Instant>,
}

pub(crate) fn services(
    sdk: Arc<Sdk>,
    namespaces: Vec<String>,
    interval: Duration,
) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
    let state = CatalogLoop {
        sdk,
        namespaces,
        interval,
        last: None,
        backoff: Backoff::new(),
        next_at: None,
    };
    stream::unfold(state, |mut state| async move {
        let item = state.next().await;
        Some((item, state))
    })
    .boxed()
}

impl CatalogLoop {
    async fn next(&mut self) -> Result<ServiceCatalog, DiscoveryError> {
        loop {
            if let Some(at) = self.next_at {
                tokio::time::sleep_until(at).await;
            }
            match self.list().await {
                Ok(services) => {
                    self.backoff.reset();
                    self.next_at = Some(Instant::now() + self.interval);
                    if self.last.as_ref() != Some(&services) {
                        self.last = Some(services.clone());
                        return Ok(ServiceCatalog {
                            source: self.sdk.source_id.clone(),
                            services,
                            observed_at: SystemTime::now(),
                        });
                    }
                }
                Err(e) => {
                    self.next_at = Some(Instant::now() + self.backoff.next_delay());
                    return Err(e);
                }
            }
        }
    }

    /// Every service of the wanted namespaces, sorted.
    async fn list(&self) -> Result<Vec<ServiceKey>, DiscoveryError> {
        let namespaces = self.sdk.list_namespaces().await?;
        let mut services = Vec::new();
        for ns in namespaces
            .iter()
            .filter(|ns| self.namespaces.is_empty() || self.namespaces.contains(&ns.name))
        {
            for (name, _id) in self.sdk.list_services(ns).await? {
                services.push(ServiceKey::new(ns.name.clone(), name));
            }
        }
        services.sort();
        services.dedup();
        Ok(services)
    }
}
