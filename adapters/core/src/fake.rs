//! A scripted [`Discovery`] for this crate's unit tests: the test sends each item a watch or
//! catalog stream yields, with full control over order and timing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tokio::sync::broadcast;

use crate::{
    Capabilities, ChangeDelivery, Discovery, DiscoveryError, Endpoint, EndpointPort, EndpointSet,
    ErrorKind, IdentitySource, Provenance, Readiness, ServiceCatalog, ServiceKey, ServicePort,
    Snapshot, SourceId, WorkloadIdentity,
};

#[derive(Clone, Debug)]
enum Item {
    Watch(ServiceKey, Result<Snapshot, ErrorKind>),
    Catalog(Result<Vec<ServiceKey>, ErrorKind>),
}

/// Streams subscribe when `watch`/`services` is called and yield what the test sends afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Scripted {
    id: SourceId,
    caps: Capabilities,
    tx: broadcast::Sender<Item>,
}

pub(crate) fn caps() -> Capabilities {
    Capabilities {
        delivery: ChangeDelivery::Push,
        health: true,
        terminating: false,
        weights: true,
        zones: false,
        owners: false,
        identity: IdentitySource::AttributeOrServiceName,
        version_subsets: false,
    }
}

impl Scripted {
    pub(crate) fn new(id: &str) -> Self {
        Self {
            id: Arc::from(id),
            caps: caps(),
            tx: broadcast::channel(1024).0,
        }
    }

    pub(crate) fn with_caps(mut self, caps: Capabilities) -> Self {
        self.caps = caps;
        self
    }

    pub(crate) fn send(&self, key: &ServiceKey, snapshot: Snapshot) {
        self.tx
            .send(Item::Watch(key.clone(), Ok(snapshot)))
            .expect("a stream is subscribed");
    }

    pub(crate) fn fail(&self, key: &ServiceKey) {
        self.tx
            .send(Item::Watch(key.clone(), Err(ErrorKind::Unavailable)))
            .expect("a stream is subscribed");
    }

    pub(crate) fn send_catalog(&self, services: Vec<ServiceKey>) {
        self.tx
            .send(Item::Catalog(Ok(services)))
            .expect("a stream is subscribed");
    }

    pub(crate) fn fail_catalog(&self) {
        self.tx
            .send(Item::Catalog(Err(ErrorKind::Unavailable)))
            .expect("a stream is subscribed");
    }

    fn error(&self, kind: ErrorKind) -> DiscoveryError {
        DiscoveryError::new(kind, true, self.id.clone(), "scripted failure")
    }

    fn items(&self) -> BoxStream<'static, Item> {
        stream::unfold(self.tx.subscribe(), |mut rx| async move {
            match rx.recv().await {
                Ok(item) => Some((item, rx)),
                Err(e) => panic!("scripted source: {e}"),
            }
        })
        .boxed()
    }
}

impl Discovery for Scripted {
    fn source_id(&self) -> SourceId {
        self.id.clone()
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        let this = self.clone();
        self.items()
            .filter_map(move |item| {
                let out = match item {
                    Item::Catalog(Ok(services)) => Some(Ok(ServiceCatalog {
                        source: this.id.clone(),
                        services,
                        observed_at: SystemTime::now(),
                    })),
                    Item::Catalog(Err(kind)) => Some(Err(this.error(kind))),
                    Item::Watch(..) => None,
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    fn watch(&self, key: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        let this = self.clone();
        self.items()
            .filter_map(move |item| {
                let out = match item {
                    Item::Watch(k, Ok(snapshot)) if k == key => Some(Ok(snapshot)),
                    Item::Watch(k, Err(kind)) if k == key => Some(Err(this.error(kind))),
                    _ => None,
                };
                futures::future::ready(out)
            })
            .boxed()
    }
}

/// An endpoint at `address:port` reported by `source`, with `labels`.
pub(crate) fn endpoint(
    source: &str,
    address: &str,
    port: u16,
    labels: &[(&str, &str)],
) -> Endpoint {
    Endpoint {
        address: address.parse::<IpAddr>().expect("test address"),
        ports: vec![EndpointPort { name: None, port }],
        readiness: Readiness::Ready,
        identity: WorkloadIdentity::new("ns", "web"),
        owner: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        weight: None,
        zone: None,
        protocol: None,
        provenance: Provenance {
            source: Arc::from(source),
            confirmed_at: SystemTime::UNIX_EPOCH,
        },
    }
}

/// A snapshot of `key` with `endpoints` on service port `port`.
pub(crate) fn set(key: &ServiceKey, port: u16, endpoints: Vec<Endpoint>) -> Snapshot {
    Snapshot::Endpoints(EndpointSet {
        service: key.clone(),
        ports: vec![ServicePort {
            name: None,
            port,
            protocol: None,
        }],
        endpoints,
    })
}
