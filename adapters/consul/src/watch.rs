//! The two blocking-query loops behind the [`trellis_discovery::Discovery`] streams: one per
//! watched service (`/v1/health/service/:name`) and one for the catalog (`/v1/catalog/services`).
//!
//! Each loop: take a rate-limit token, send the query with the tracked index, turn the reply into
//! a whole snapshot, send it if it differs from the last one (or to refresh `confirmed_at` once per
//! `wait`), and report `X-Consul-KnownLeader: false` as staleness. Failures are items; the loop
//! backs off (the shared policy) and keeps going, so streams never end on their own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::time::Instant;
use trellis_discovery::{
    Backoff, DiscoveryError, Endpoint, EndpointSet, ErrorKind, ServiceCatalog, ServiceKey,
    Snapshot, SourceId,
};

use crate::blocking::{IndexEvent, IndexTracker, TokenBucket};
use crate::client::{Block, ClientError, ConsulClient, Reply};
use crate::config::ConsulConfig;
use crate::mapping;

/// How long a loop waits after a permanent error (403, 4xx) before asking again: the registry
/// will not change its mind quickly, and a wrong token should not hammer it.
const PERMANENT_ERROR_PAUSE: Duration = Duration::from_secs(10);

/// What every loop of one adapter instance shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub client: ConsulClient,
    pub config: ConsulConfig,
    pub source: SourceId,
}

/// Index, rate limit and backoff of one loop.
#[derive(Debug)]
struct LoopControl {
    index: IndexTracker,
    bucket: TokenBucket,
    backoff: Backoff,
    pause: Option<Duration>,
    wait: Duration,
    /// The last query failed: the next one does not block, so a Consul that is back is
    /// confirmed at once (a blocking query on an unchanged index would hang for `wait`, and the
    /// source would look stale all that time).
    recovering: bool,
}

impl LoopControl {
    fn new(config: &ConsulConfig) -> Self {
        Self {
            index: IndexTracker::default(),
            bucket: TokenBucket::new(config.rate_limit),
            backoff: Backoff::new(),
            pause: None,
            wait: config.wait,
            recovering: false,
        }
    }

    /// Waits out a pending backoff and the rate limit; returns the blocking parameters.
    async fn before_query(&mut self) -> Option<Block> {
        if let Some(pause) = self.pause.take() {
            tokio::time::sleep(pause).await;
        }
        self.bucket.acquire().await;
        let index = self.index.next();
        (index > 0 && !self.recovering).then_some(Block {
            index,
            wait: self.wait,
        })
    }

    /// Records a good answer; `true` when it ends a run of failures (the answer must then be
    /// passed on even when nothing changed: it is what says the source is back).
    fn succeeded(&mut self, what: &dyn std::fmt::Display, index: u64) -> bool {
        self.backoff.reset();
        let recovered = std::mem::take(&mut self.recovering);
        match self.index.observe(index) {
            IndexEvent::Advanced => {}
            IndexEvent::WentBackwards => {
                tracing::info!(%what, index, "Consul index went backwards; restarting the blocking loop from 0")
            }
            IndexEvent::Zero => {
                tracing::warn!(%what, "Consul returned index 0; blocking on 1 instead")
            }
        }
        if recovered {
            tracing::info!(%what, "Consul answers again");
        }
        recovered
    }

    fn failed(&mut self, error: ClientError, source: &SourceId) -> DiscoveryError {
        let error = error.into_discovery(source);
        self.recovering = true;
        self.pause = Some(if error.temporary {
            self.backoff.next_delay()
        } else {
            PERMANENT_ERROR_PAUSE
        });
        tracing::warn!(%error, retry_in = ?self.pause, "Consul query failed");
        error
    }
}

fn stale_error(shared: &Shared, what: &str, last_contact: Duration) -> DiscoveryError {
    DiscoveryError::new(
        ErrorKind::Unavailable,
        true,
        shared.source.clone(),
        format!(
            "Consul has no known leader: {what} may be stale (server's last contact with a leader {} ms ago)",
            last_contact.as_millis()
        ),
    )
}

fn acl_filtered_error(shared: &Shared, what: &str) -> DiscoveryError {
    DiscoveryError::new(
        ErrorKind::Unauthorized,
        false,
        shared.source.clone(),
        format!(
            "Consul filtered {what} by ACLs: the token lacks service:read or node:read, so instances may be missing"
        ),
    )
}

/// The stream of one service's snapshots.
pub(crate) fn service_stream(
    shared: Arc<Shared>,
    key: ServiceKey,
) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
    let watch = ServiceWatch {
        control: LoopControl::new(&shared.config),
        ns: shared.config.ns_param(&key.namespace),
        shared,
        key,
        pending: VecDeque::new(),
        last: None,
        last_sent_at: None,
    };
    futures::stream::unfold(watch, |mut w| async move {
        let item = w.next().await;
        Some((item, w))
    })
    .boxed()
}

struct ServiceWatch {
    shared: Arc<Shared>,
    key: ServiceKey,
    /// `Err(())`: a non-default namespace on Consul OSS, where the service cannot exist.
    ns: Result<Option<String>, ()>,
    control: LoopControl,
    pending: VecDeque<Result<Snapshot, DiscoveryError>>,
    last: Option<Snapshot>,
    last_sent_at: Option<Instant>,
}

impl ServiceWatch {
    async fn next(&mut self) -> Result<Snapshot, DiscoveryError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            self.step().await;
        }
    }

    async fn step(&mut self) {
        let ns = match &self.ns {
            Ok(ns) => ns.clone(),
            Err(()) => {
                if self.last.is_none() {
                    self.last = Some(Snapshot::NotFound);
                    self.pending.push_back(Ok(Snapshot::NotFound));
                    return;
                }
                // Nothing can ever change: Consul OSS has one namespace.
                return futures::future::pending().await;
            }
        };
        let block = self.control.before_query().await;
        let client = &self.shared.client;
        let reply = match client
            .health_service(&self.key.name, ns.as_deref(), block)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                let err = self.control.failed(e, &self.shared.source);
                self.pending.push_back(Err(err));
                return;
            }
        };
        let snapshot = if reply.value.is_empty() {
            // Consul answers 200 [] for a service that does not exist: the catalog decides
            // between "exists with no instances" and NotFound.
            match client.catalog_services(ns.as_deref(), None).await {
                Ok(catalog) if catalog.value.contains_key(&self.key.name) => {
                    Snapshot::Endpoints(EndpointSet {
                        service: self.key.clone(),
                        ports: Vec::new(),
                        endpoints: Vec::new(),
                    })
                }
                Ok(_) => Snapshot::NotFound,
                Err(e) => {
                    let err = self.control.failed(e, &self.shared.source);
                    self.pending.push_back(Err(err));
                    return;
                }
            }
        } else {
            let set = mapping::endpoint_set(
                &reply.value,
                &self.key,
                &self.shared.config,
                &self.shared.source,
            );
            Snapshot::Endpoints(set)
        };
        if self.control.succeeded(&self.key, reply.index) {
            self.last_sent_at = None;
        }
        let sent = self.offer(snapshot);
        self.report(&reply, sent);
    }

    fn offer(&mut self, snapshot: Snapshot) -> bool {
        let refresh_due = self
            .last_sent_at
            .is_none_or(|t| t.elapsed() >= self.control.wait);
        if !refresh_due
            && self
                .last
                .as_ref()
                .is_some_and(|l| same_snapshot(l, &snapshot))
        {
            return false;
        }
        self.last = Some(snapshot.clone());
        self.last_sent_at = Some(Instant::now());
        self.pending.push_back(Ok(snapshot));
        true
    }

    fn report<T>(&mut self, reply: &Reply<T>, sent: bool) {
        let what = format!("service {}", self.key);
        if !reply.known_leader {
            self.pending
                .push_back(Err(stale_error(&self.shared, &what, reply.last_contact)));
        }
        if reply.filtered_by_acls && sent {
            self.pending
                .push_back(Err(acl_filtered_error(&self.shared, &what)));
        }
    }
}

/// Equal but for `confirmed_at`: a reply that only re-confirms the same membership is not news.
fn same_snapshot(a: &Snapshot, b: &Snapshot) -> bool {
    match (a, b) {
        (Snapshot::NotFound, Snapshot::NotFound) => true,
        (Snapshot::Endpoints(x), Snapshot::Endpoints(y)) => {
            x.service == y.service
                && x.ports == y.ports
                && x.endpoints.len() == y.endpoints.len()
                && x.endpoints
                    .iter()
                    .zip(&y.endpoints)
                    .all(|(p, q)| same_endpoint(p, q))
        }
        _ => false,
    }
}

fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    a.address == b.address
        && a.ports == b.ports
        && a.readiness == b.readiness
        && a.identity == b.identity
        && a.owner == b.owner
        && a.labels == b.labels
        && a.weight == b.weight
        && a.zone == b.zone
        && a.protocol == b.protocol
        && a.provenance.source == b.provenance.source
}

/// The stream of catalogs of the configured namespace.
pub(crate) fn catalog_stream(
    shared: Arc<Shared>,
) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
    let watch = CatalogWatch {
        control: LoopControl::new(&shared.config),
        shared,
        pending: VecDeque::new(),
        last: None,
        last_sent_at: None,
    };
    futures::stream::unfold(watch, |mut w| async move {
        let item = w.next().await;
        Some((item, w))
    })
    .boxed()
}

struct CatalogWatch {
    shared: Arc<Shared>,
    control: LoopControl,
    pending: VecDeque<Result<ServiceCatalog, DiscoveryError>>,
    last: Option<Vec<ServiceKey>>,
    last_sent_at: Option<Instant>,
}

impl CatalogWatch {
    async fn next(&mut self) -> Result<ServiceCatalog, DiscoveryError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return item;
            }
            self.step().await;
        }
    }

    async fn step(&mut self) {
        let block = self.control.before_query().await;
        let config = &self.shared.config;
        let ns = config.enterprise_namespace.as_deref();
        let reply = match self.shared.client.catalog_services(ns, block).await {
            Ok(reply) => reply,
            Err(e) => {
                let err = self.control.failed(e, &self.shared.source);
                self.pending.push_back(Err(err));
                return;
            }
        };
        let namespace = config.catalog_namespace();
        if self
            .control
            .succeeded(&format_args!("catalog of {namespace}"), reply.index)
        {
            self.last_sent_at = None;
        }
        let services: Vec<ServiceKey> = reply
            .value
            .keys()
            .map(|name| ServiceKey::new(namespace, name.clone()))
            .collect();
        let refresh_due = self
            .last_sent_at
            .is_none_or(|t| t.elapsed() >= self.control.wait);
        let changed = self.last.as_ref() != Some(&services);
        if changed || refresh_due {
            self.last = Some(services.clone());
            self.last_sent_at = Some(Instant::now());
            self.pending.push_back(Ok(ServiceCatalog {
                source: self.shared.source.clone(),
                services,
                observed_at: SystemTime::now(),
            }));
        }
        let what = format!("the catalog of namespace {namespace}");
        if !reply.known_leader {
            self.pending
                .push_back(Err(stale_error(&self.shared, &what, reply.last_contact)));
        }
        if reply.filtered_by_acls && changed {
            self.pending
                .push_back(Err(acl_filtered_error(&self.shared, &what)));
        }
    }
}
