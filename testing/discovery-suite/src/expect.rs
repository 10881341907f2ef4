//! Waiting for and checking snapshots: the precise comparison of a [`Snapshot`] with the
//! [`TestInstance`]s the harness registered, and polling a stream until it matches.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use trellis_discovery::{
    Capabilities, DiscoveryError, IdentitySource, Readiness, ServiceCatalog, ServiceKey, Snapshot,
    SourceId,
};

use crate::TestInstance;

pub(crate) type WatchStream = BoxStream<'static, Result<Snapshot, DiscoveryError>>;
pub(crate) type CatalogStream = BoxStream<'static, Result<ServiceCatalog, DiscoveryError>>;

/// The service account an instance without an explicit one gets: Kubernetes runs pods without
/// `serviceAccountName` as `default`; elsewhere the identity is the service name.
pub(crate) fn default_service_account(identity: IdentitySource, registered_as: &str) -> String {
    match identity {
        IdentitySource::Platform => "default".to_string(),
        IdentitySource::AttributeOrServiceName => registered_as.to_string(),
    }
}

/// Checks that `snapshot` is exactly `instances` of `key` (registered under the service
/// `registered_as`, which differs from `key` for version subsets): one endpoint per instance, by
/// address, with its port, readiness, identity, labels (a superset is fine: platforms add their
/// own), weight and zone (where the adapter has them), reported by `source`.
/// Returns what differs, for a person to read.
pub(crate) fn expect_instances(
    snapshot: &Snapshot,
    key: &ServiceKey,
    registered_as: &str,
    instances: &[TestInstance],
    caps: &Capabilities,
    source: &SourceId,
) -> Result<(), String> {
    let set = match snapshot {
        Snapshot::NotFound => return Err("NotFound".to_string()),
        Snapshot::Endpoints(set) => set,
    };
    if &set.service != key {
        return Err(format!("the set names service {}, want {key}", set.service));
    }
    if set.endpoints.len() != instances.len() {
        return Err(format!(
            "{} endpoint(s) {}, want {} {}",
            set.endpoints.len(),
            sample(set.endpoints.iter().map(|e| e.address)),
            instances.len(),
            sample(instances.iter().map(|i| IpAddr::V4(i.address))),
        ));
    }
    let by_address: HashMap<IpAddr, &trellis_discovery::Endpoint> =
        set.endpoints.iter().map(|e| (e.address, e)).collect();
    for instance in instances {
        let id = &instance.id;
        let Some(endpoint) = by_address.get(&IpAddr::V4(instance.address)) else {
            return Err(format!("instance {id} ({}) is missing", instance.address));
        };
        if !endpoint.ports.iter().any(|p| p.port == instance.port) {
            return Err(format!(
                "instance {id}: ports {:?}, want {}",
                endpoint.ports, instance.port
            ));
        }
        let readiness = if instance.ready || !caps.health {
            Readiness::Ready
        } else {
            Readiness::NotReady
        };
        if endpoint.readiness != readiness {
            return Err(format!(
                "instance {id}: {:?}, want {readiness:?}",
                endpoint.readiness
            ));
        }
        let account = instance
            .service_account
            .clone()
            .unwrap_or_else(|| default_service_account(caps.identity, registered_as));
        if endpoint.identity.namespace != key.namespace
            || endpoint.identity.service_account != account
        {
            return Err(format!(
                "instance {id}: identity {:?}, want ns {} sa {account}",
                endpoint.identity, key.namespace
            ));
        }
        for (k, v) in &instance.labels {
            if endpoint.labels.get(k) != Some(v) {
                return Err(format!(
                    "instance {id}: label {k}={:?}, want {v:?} (labels {:?})",
                    endpoint.labels.get(k),
                    endpoint.labels
                ));
            }
        }
        if caps.weights && instance.weight.is_some() && endpoint.weight != instance.weight {
            return Err(format!(
                "instance {id}: weight {:?}, want {:?}",
                endpoint.weight, instance.weight
            ));
        }
        if caps.zones && instance.zone.is_some() && endpoint.zone != instance.zone {
            return Err(format!(
                "instance {id}: zone {:?}, want {:?}",
                endpoint.zone, instance.zone
            ));
        }
        if &endpoint.provenance.source != source {
            return Err(format!(
                "instance {id}: reported by {}, want {source}",
                endpoint.provenance.source
            ));
        }
    }
    Ok(())
}

/// A short list for messages: the first few addresses, then a count.
fn sample(addresses: impl Iterator<Item = IpAddr>) -> String {
    let mut all: Vec<IpAddr> = addresses.collect();
    all.sort();
    let more = all.len().saturating_sub(5);
    all.truncate(5);
    if more > 0 {
        format!("{all:?} and {more} more")
    } else {
        format!("{all:?}")
    }
}

/// Polls `stream` until `check` accepts an `Ok` item, and returns it. Error items are tolerated
/// (a registry may be briefly unhappy) but counted and named on failure. Panics, saying what it
/// waited for and what it last saw, when `timeout` passes or the stream ends.
pub(crate) async fn wait_for<T>(
    stream: &mut BoxStream<'static, Result<T, DiscoveryError>>,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&T) -> Result<(), String>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = "nothing".to_string();
    let mut errors = 0usize;
    let mut last_error = None;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(item))) => match check(&item) {
                Ok(()) => return item,
                Err(why) => last = why,
            },
            Ok(Some(Err(e))) => {
                errors += 1;
                last_error = Some(e.to_string());
            }
            Ok(None) => panic!(
                "waiting for {what}: the stream ended (streams never end on their own); last seen: {last}"
            ),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; last seen: {last}; {errors} error item(s){}",
                last_error
                    .map(|e| format!(", last: {e}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// [`wait_for`] over the catalog stream, checking the listed services.
pub(crate) async fn wait_for_catalog(
    stream: &mut CatalogStream,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&[ServiceKey]) -> Result<(), String>,
) -> ServiceCatalog {
    wait_for(stream, timeout, what, |catalog| check(&catalog.services)).await
}
