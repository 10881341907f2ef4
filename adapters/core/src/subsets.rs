//! Version subsets for platforms without per-version Kubernetes Services (file, Consul, Cloud Map).
//!
//! A TrafficSplit backend named `web-v2` resolves, in this order:
//! 1. the service `web-v2` itself, if it exists (the "service per version" convention);
//! 2. else, if the service `web` exists: the endpoints of `web` whose [`VERSION_LABEL`] label is
//!    `v2` (the "tag/attribute" convention), with the service ports of `web`;
//! 3. else `NotFound`.
//!
//! The split point is the **last** `-`: `my-web-v2` is version `v2` of `my-web`. A name without a
//! `-` (or ending or starting with one) is only ever looked up as itself.
//!
//! When `web` exists but has no `v2` instance, the answer is an **empty set, not `NotFound`**: the
//! backend names a subset of a service that exists, and an empty subset is a real state (a canary
//! scaled to zero, a rollout that has not started, all v2 instances replaced). `NotFound` would tell
//! the controller the backend is misconfigured and make it flap between "unknown" and "known" as
//! the last instance of a version comes and goes; an empty set keeps the backend known and sends it
//! no traffic. The flip side: a watch of `payments-api` when only `payments` exists is an empty set
//! too, not `NotFound` (this is the convention's one ambiguity, and why per-version services win).
//!
//! Endpoints keep the identity of the service they are registered under (`web`), and the set is
//! named by the key that was watched (`web-v2`). Only `watch` is affected: the catalog lists the
//! services the registry has, not every possible subset.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::{self, BoxStream};

use crate::{
    Capabilities, Discovery, DiscoveryError, EndpointSet, ServiceCatalog, ServiceKey, Snapshot,
    SourceId, VERSION_LABEL,
};

/// Splits `web-v2` into (`web`, `v2`) at the last `-`; `None` when the name has no such split.
pub fn split_version(name: &str) -> Option<(&str, &str)> {
    let (base, version) = name.rsplit_once('-')?;
    (!base.is_empty() && !version.is_empty()).then_some((base, version))
}

/// The subset of `base` whose [`VERSION_LABEL`] is `version`, named `key`.
pub fn version_subset(base: &EndpointSet, key: &ServiceKey, version: &str) -> EndpointSet {
    EndpointSet {
        service: key.clone(),
        ports: base.ports.clone(),
        endpoints: base
            .endpoints
            .iter()
            .filter(|e| e.labels.get(VERSION_LABEL).map(String::as_str) == Some(version))
            .cloned()
            .collect(),
    }
}

/// The convention's answer from what is known so far about the service itself (`own`) and its
/// base (`base`); `None` while the answer still depends on a side that has not answered.
pub fn resolve_subset(
    own: Option<&Snapshot>,
    base: Option<&Snapshot>,
    key: &ServiceKey,
    version: &str,
) -> Option<Snapshot> {
    match (own?, base) {
        (own @ Snapshot::Endpoints(_), _) => Some(own.clone()),
        (Snapshot::NotFound, Some(Snapshot::Endpoints(set))) => {
            Some(Snapshot::Endpoints(version_subset(set, key, version)))
        }
        (Snapshot::NotFound, Some(Snapshot::NotFound)) => Some(Snapshot::NotFound),
        (Snapshot::NotFound, None) => None,
    }
}

/// Wraps an adapter so its watches follow the version-subset convention (see the module docs).
/// Adapters for platforms without per-version services return `VersionSubsets::new(adapter)`.
#[derive(Debug)]
pub struct VersionSubsets<D> {
    inner: Arc<D>,
}

impl<D: Discovery> VersionSubsets<D> {
    pub fn new(inner: D) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The wrapped adapter.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

enum Side {
    Own(Result<Snapshot, DiscoveryError>),
    Base(Result<Snapshot, DiscoveryError>),
}

/// What one subset watch remembers. The service's own endpoints are passed through without being
/// kept (only whether it exists), so a watch of an existing service holds no second copy.
#[derive(Default)]
struct SubsetState {
    /// Whether the service itself exists; `None` until it answered.
    own_exists: Option<bool>,
    /// The base service's last answer.
    base: Option<Snapshot>,
    /// The last subset (or NotFound) answer sent, to send only changes.
    sent_derived: Option<Snapshot>,
}

impl<D: Discovery> Discovery for VersionSubsets<D> {
    fn source_id(&self) -> SourceId {
        self.inner.source_id()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            version_subsets: true,
            ..self.inner.capabilities()
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        self.inner.services()
    }

    /// Addresses are the platform's: no version convention applies to them.
    fn watch_address(
        &self,
        address: std::net::IpAddr,
    ) -> BoxStream<'static, Result<crate::AddressOwner, DiscoveryError>> {
        self.inner.watch_address(address)
    }

    fn watch(&self, key: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        let Some((base, version)) = split_version(&key.name) else {
            return self.inner.watch(key);
        };
        let base_key = ServiceKey::new(key.namespace.clone(), base);
        let version = version.to_string();
        // Two watches, one answer: the service itself wins whenever it exists.
        let own = self.inner.watch(key.clone()).map(Side::Own);
        let base = self.inner.watch(base_key).map(Side::Base);
        stream::select(own, base)
            .scan(SubsetState::default(), move |state, side| {
                let out = match side {
                    Side::Own(Err(e)) | Side::Base(Err(e)) => Some(Err(e)),
                    Side::Own(Ok(own @ Snapshot::Endpoints(_))) => {
                        state.own_exists = Some(true);
                        state.sent_derived = None;
                        Some(Ok(own))
                    }
                    Side::Own(Ok(Snapshot::NotFound)) => {
                        state.own_exists = Some(false);
                        state.derived(&key, &version).map(Ok)
                    }
                    Side::Base(Ok(s)) => {
                        state.base = Some(s);
                        state.derived(&key, &version).map(Ok)
                    }
                };
                futures::future::ready(Some(out))
            })
            .filter_map(futures::future::ready)
            .boxed()
    }
}

impl SubsetState {
    /// The subset or NotFound answer to send now: only when the service itself is known to be
    /// missing, the base has answered, and the answer differs from the last one sent.
    fn derived(&mut self, key: &ServiceKey, version: &str) -> Option<Snapshot> {
        if self.own_exists != Some(false) {
            return None;
        }
        let answer = resolve_subset(Some(&Snapshot::NotFound), self.base.as_ref(), key, version)?;
        if self.sent_derived.as_ref() == Some(&answer) {
            return None;
        }
        self.sent_derived = Some(answer.clone());
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::time::timeout;

    use super::*;
    use crate::fake::{Scripted, endpoint, set};

    async fn next(stream: &mut BoxStream<'static, Result<Snapshot, DiscoveryError>>) -> Snapshot {
        timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("an item")
            .expect("streams never end")
            .expect("a snapshot")
    }

    fn web(key: &ServiceKey) -> Snapshot {
        set(
            key,
            8080,
            vec![
                endpoint("s", "10.0.0.1", 8080, &[("version", "v1")]),
                endpoint("s", "10.0.0.2", 8080, &[("version", "v2")]),
                endpoint("s", "10.0.0.3", 8080, &[("version", "v2"), ("zone", "a")]),
                endpoint("s", "10.0.0.4", 8080, &[]),
            ],
        )
    }

    fn addresses(snapshot: &Snapshot) -> Vec<String> {
        match snapshot {
            Snapshot::NotFound => panic!("want Endpoints"),
            Snapshot::Endpoints(set) => set
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect(),
        }
    }

    #[test]
    fn the_split_point_is_the_last_dash() {
        assert_eq!(split_version("web-v2"), Some(("web", "v2")));
        assert_eq!(split_version("my-web-v2"), Some(("my-web", "v2")));
        assert_eq!(split_version("web"), None);
        assert_eq!(split_version("web-"), None);
        assert_eq!(split_version("-v2"), None);
    }

    #[test]
    fn resolution_follows_the_convention() {
        let key = ServiceKey::new("ns", "web-v2");
        let base = ServiceKey::new("ns", "web");
        let own = set(&key, 9090, vec![endpoint("s", "10.0.0.9", 9090, &[])]);
        // The service itself wins, whatever the base says (or before it answers).
        assert_eq!(
            resolve_subset(Some(&own), None, &key, "v2"),
            Some(own.clone())
        );
        assert_eq!(
            resolve_subset(Some(&own), Some(&web(&base)), &key, "v2"),
            Some(own)
        );
        // Else the labelled subset of the base, named by the watched key, with the base's ports.
        let subset = resolve_subset(Some(&Snapshot::NotFound), Some(&web(&base)), &key, "v2")
            .expect("known");
        assert_eq!(addresses(&subset), vec!["10.0.0.2", "10.0.0.3"]);
        let Snapshot::Endpoints(subset) = subset else {
            unreachable!()
        };
        assert_eq!(subset.service, key);
        assert_eq!(subset.ports[0].port, 8080);
        // The base exists without such instances: an empty set, not NotFound.
        let v3 = resolve_subset(Some(&Snapshot::NotFound), Some(&web(&base)), &key, "v3");
        assert_eq!(v3, Some(set(&key, 8080, vec![])));
        // Neither exists: NotFound.
        assert_eq!(
            resolve_subset(
                Some(&Snapshot::NotFound),
                Some(&Snapshot::NotFound),
                &key,
                "v2"
            ),
            Some(Snapshot::NotFound)
        );
        // Unknown until both have answered when the service itself is missing.
        assert_eq!(
            resolve_subset(Some(&Snapshot::NotFound), None, &key, "v2"),
            None
        );
        assert_eq!(resolve_subset(None, Some(&web(&base)), &key, "v2"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_follows_the_service_and_its_base() {
        let source = Scripted::new("s");
        let subsets = VersionSubsets::new(source.clone());
        assert!(subsets.capabilities().version_subsets);
        let key = ServiceKey::new("ns", "web-v2");
        let base = ServiceKey::new("ns", "web");
        let mut watch = subsets.watch(key.clone());

        source.send(&key, Snapshot::NotFound);
        source.send(&base, web(&base));
        assert_eq!(
            addresses(&next(&mut watch).await),
            vec!["10.0.0.2", "10.0.0.3"]
        );

        // A service of its own appears: it wins.
        let own = set(&key, 9090, vec![endpoint("s", "10.0.0.9", 9090, &[])]);
        source.send(&key, own.clone());
        assert_eq!(next(&mut watch).await, own);
        // Base changes do not matter meanwhile; errors are passed on.
        source.send(&base, Snapshot::NotFound);
        source.fail(&base);
        let error = timeout(Duration::from_secs(1), watch.next())
            .await
            .expect("an item")
            .expect("never ends")
            .expect_err("the error is passed on");
        assert_eq!(&*error.source_id, "s");

        // It goes away; the base is gone too: NotFound.
        source.send(&key, Snapshot::NotFound);
        assert_eq!(next(&mut watch).await, Snapshot::NotFound);
        // The base comes back: the subset again.
        source.send(&base, web(&base));
        assert_eq!(
            addresses(&next(&mut watch).await),
            vec!["10.0.0.2", "10.0.0.3"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_without_a_version_is_watched_as_itself() {
        let source = Scripted::new("s");
        let subsets = VersionSubsets::new(source.clone());
        let key = ServiceKey::new("ns", "web");
        let mut watch = subsets.watch(key.clone());
        source.send(&key, web(&key));
        assert_eq!(next(&mut watch).await, web(&key));
    }
}
