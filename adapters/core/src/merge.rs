//! [`Merged`]: several adapters seen as one, so a service can have endpoints on Kubernetes and in
//! Consul at once.
//!
//! # Precedence (per [`ServiceKey`])
//! - The merged set is the **union** of the endpoints every source reports for the key, in source
//!   order (the order given to [`Merged::new`]).
//! - When two sources (or two entries of one source) report the same **address + port**, the one
//!   listed **first** wins; the later endpoint is dropped whole (a later endpoint sharing any
//!   address+port with an earlier one is the same workload seen twice, and counting it twice would
//!   double its share of traffic). Service ports are the union by port number, first source wins.
//! - The answer is `NotFound` only when **every** source has said `NotFound`. Until every source has
//!   answered (or [`Merged::with_settle`]'s delay, 2 s by default, has passed since the watch began),
//!   nothing is yielded: answering early would flash a partial set. After the delay, the sources that
//!   answered decide, except that `NotFound` still needs every source's word.
//! - An error from one source never erases anything: it is passed on as an `Err` item (naming that
//!   source: that is the staleness report) and that source's last good snapshot stays in the union.
//!
//! - An endpoint whose address no proxy can connect to (unspecified `0.0.0.0`/`::`, multicast,
//!   broadcast) is dropped: connecting to `0.0.0.0` reaches the caller's own host, which is
//!   never the registered workload.
//!
//! # What is reported ([`Merged::problems`], shown by `trellis check`)
//! - the same address+port registered by two sources (which one was used, by the rule above);
//! - a dropped unusable address;
//! - a loopback endpoint in a service whose other endpoints are on the network: only a proxy on
//!   the registering host can reach it, every other host's calls to it would fail (it is kept:
//!   the proxies of its own host can use it).
//!
//! Endpoints keep their own [`crate::Provenance`], so the merged set still says which source
//! reported each endpoint. Per-source freshness (last good answer, last error) across every watch
//! and catalog of this `Merged` is available from [`Merged::freshness`] (for `trellis check`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::{self, BoxStream};

use crate::{
    AddressOwner, Capabilities, ChangeDelivery, Discovery, DiscoveryError, EndpointSet,
    IdentitySource, ServiceCatalog, ServiceKey, Snapshot, SourceId,
};

/// How fresh one source is, across every watch and catalog stream of a [`Merged`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFreshness {
    pub source: SourceId,
    /// When the source last answered (any snapshot or catalog).
    pub last_good: Option<SystemTime>,
    /// When the source last failed, and what it said.
    pub last_error: Option<(SystemTime, String)>,
}

impl SourceFreshness {
    /// The source's latest word was an error (what it last said may be out of date).
    pub fn is_stale(&self) -> bool {
        match (&self.last_error, self.last_good) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some((failed, _)), Some(good)) => *failed >= good,
        }
    }
}

/// A registration the merged view reports (module docs, "What is reported").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationProblem {
    pub service: ServiceKey,
    pub message: String,
}

/// Several adapters as one [`Discovery`], with the precedence in the module docs.
#[derive(Clone)]
pub struct Merged {
    id: SourceId,
    sources: Vec<Arc<dyn Discovery>>,
    freshness: Arc<Mutex<Vec<SourceFreshness>>>,
    /// The problems of each watched service's latest merge.
    problems: Arc<Mutex<BTreeMap<ServiceKey, Vec<String>>>>,
    settle: Duration,
}

impl std::fmt::Debug for Merged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("id", &self.id)
            .field("settle", &self.settle)
            .finish_non_exhaustive()
    }
}

/// How long a merged watch waits for every source's first answer.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

impl Merged {
    /// Merges `sources`; earlier sources win address+port conflicts.
    pub fn new(sources: Vec<Arc<dyn Discovery>>) -> Self {
        let ids: Vec<SourceId> = sources.iter().map(|s| s.source_id()).collect();
        let id = format!(
            "merged[{}]",
            ids.iter().map(|s| &**s).collect::<Vec<_>>().join(",")
        );
        let freshness = ids
            .into_iter()
            .map(|source| SourceFreshness {
                source,
                last_good: None,
                last_error: None,
            })
            .collect();
        Self {
            id: Arc::from(id),
            sources,
            freshness: Arc::new(Mutex::new(freshness)),
            problems: Arc::default(),
            settle: DEFAULT_SETTLE,
        }
    }

    /// Sets how long a watch waits for every source's first answer before answering with what it has.
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Per-source freshness, in source order.
    pub fn freshness(&self) -> Vec<SourceFreshness> {
        self.freshness
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The registration problems of every watched service, by service.
    pub fn problems(&self) -> Vec<RegistrationProblem> {
        self.problems
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .flat_map(|(service, messages)| {
                messages.iter().map(|message| RegistrationProblem {
                    service: service.clone(),
                    message: message.clone(),
                })
            })
            .collect()
    }

    /// Every source's stream of `open(source)`, tagged with the source's index, plus one
    /// `Settled` event after the settle delay; freshness is recorded as items pass.
    fn events<T: Send + 'static>(
        &self,
        open: impl Fn(&dyn Discovery) -> BoxStream<'static, Result<T, DiscoveryError>>,
    ) -> BoxStream<'static, Event<T>> {
        let tagged = self.sources.iter().enumerate().map(|(i, source)| {
            let freshness = self.freshness.clone();
            open(source.as_ref())
                .map(move |item| {
                    record(&freshness, i, &item);
                    Event::Source(i, item)
                })
                .boxed()
        });
        let settle = self.settle;
        let timer = stream::once(async move {
            tokio::time::sleep(settle).await;
            Event::Settled
        });
        stream::select(stream::select_all(tagged), timer).boxed()
    }
}

enum Event<T> {
    Source(usize, Result<T, DiscoveryError>),
    Settled,
}

fn record<T>(freshness: &Mutex<Vec<SourceFreshness>>, i: usize, item: &Result<T, DiscoveryError>) {
    let mut all = freshness
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = SystemTime::now();
    match item {
        Ok(_) => all[i].last_good = Some(now),
        Err(e) => all[i].last_error = Some((now, e.to_string())),
    }
}

/// What a merged stream knows so far: each source's last good value and whether it has answered.
struct Latest<T> {
    values: Vec<Option<T>>,
    answered: Vec<bool>,
    settled: bool,
}

impl<T> Latest<T> {
    fn new(n: usize) -> Self {
        Self {
            values: (0..n).map(|_| None).collect(),
            answered: vec![false; n],
            settled: n == 0,
        }
    }

    /// Applies one event; returns the error to pass on, if it was one.
    fn apply(&mut self, event: Event<T>) -> Option<DiscoveryError> {
        match event {
            Event::Settled => self.settled = true,
            Event::Source(i, item) => {
                self.answered[i] = true;
                match item {
                    Ok(value) => self.values[i] = Some(value),
                    Err(e) => return Some(e),
                }
            }
        }
        None
    }

    /// Every source has answered, or the settle delay has passed.
    fn ready(&self) -> bool {
        self.settled || self.answered.iter().all(|a| *a)
    }
}

/// Merges per-source snapshots (in precedence order; `None` = no good answer yet) by the rules in
/// the module docs. `None` when the answer is not known yet (no source has endpoints and not every
/// source has said `NotFound`).
pub fn merge_snapshots(key: &ServiceKey, snapshots: &[Option<Snapshot>]) -> Option<Snapshot> {
    let sets: Vec<&EndpointSet> = snapshots
        .iter()
        .filter_map(|s| match s {
            Some(Snapshot::Endpoints(set)) => Some(set),
            _ => None,
        })
        .collect();
    if !sets.is_empty() {
        return Some(Snapshot::Endpoints(merge_sets(key, &sets)));
    }
    snapshots
        .iter()
        .all(|s| matches!(s, Some(Snapshot::NotFound)))
        .then_some(Snapshot::NotFound)
}

fn merge_sets(key: &ServiceKey, sets: &[&EndpointSet]) -> EndpointSet {
    let mut merged = EndpointSet {
        service: key.clone(),
        ports: Vec::new(),
        endpoints: Vec::new(),
    };
    let mut service_ports = HashSet::new();
    // Port 0 stands for "no port" so endpoints without ports still conflict by address.
    let mut claimed: HashSet<(IpAddr, u16)> = HashSet::new();
    for set in sets {
        for port in &set.ports {
            if service_ports.insert(port.port) {
                merged.ports.push(port.clone());
            }
        }
        for endpoint in set.endpoints.iter().filter(|e| usable(e.address)) {
            let mut ports: Vec<u16> = endpoint.ports.iter().map(|p| p.port).collect();
            if ports.is_empty() {
                ports.push(0);
            }
            if ports
                .iter()
                .any(|p| claimed.contains(&(endpoint.address, *p)))
            {
                continue;
            }
            claimed.extend(ports.into_iter().map(|p| (endpoint.address, p)));
            merged.endpoints.push(endpoint.clone());
        }
    }
    merged
}

/// Removes a service's registration problems when its merged watch is dropped.
struct ForgetOnDrop {
    problems: Arc<Mutex<BTreeMap<ServiceKey, Vec<String>>>>,
    key: ServiceKey,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.problems
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Whether a proxy can connect to `address` at all (module docs).
fn usable(address: IpAddr) -> bool {
    !(address.is_unspecified()
        || address.is_multicast()
        || address == IpAddr::V4(std::net::Ipv4Addr::BROADCAST))
}

/// The problems of one service's snapshots, in precedence order with their sources' ids (module
/// docs, "What is reported").
pub fn registration_problems(sources: &[SourceId], snapshots: &[Option<Snapshot>]) -> Vec<String> {
    let mut out = Vec::new();
    let sets: Vec<(&SourceId, &EndpointSet)> = sources
        .iter()
        .zip(snapshots)
        .filter_map(|(id, s)| match s {
            Some(Snapshot::Endpoints(set)) => Some((id, set)),
            _ => None,
        })
        .collect();
    let addr = |e: &crate::Endpoint, port: u16| match port {
        0 => e.address.to_string(),
        port => std::net::SocketAddr::new(e.address, port).to_string(),
    };
    // (address, port) -> the first source that claimed it.
    let mut first: HashMap<(IpAddr, u16), &SourceId> = HashMap::new();
    let mut reported: HashSet<(IpAddr, u16)> = HashSet::new();
    for (id, set) in &sets {
        for e in &set.endpoints {
            if !usable(e.address) {
                out.push(format!(
                    "endpoint {} from {id} is not an address a proxy can connect to; it gets no traffic",
                    e.address
                ));
                continue;
            }
            let ports: Vec<u16> = match e.ports.iter().map(|p| p.port).collect::<Vec<_>>() {
                ports if ports.is_empty() => vec![0],
                ports => ports,
            };
            for port in ports {
                match first.get(&(e.address, port)) {
                    Some(winner) if *winner != *id && reported.insert((e.address, port)) => {
                        out.push(format!(
                            "{} is registered by both {winner} and {id}: {winner}'s registration is used (the first platform listed wins)",
                            addr(e, port)
                        ))
                    }
                    Some(_) => {}
                    None => {
                        first.insert((e.address, port), id);
                    }
                }
            }
        }
    }
    let all = || {
        sets.iter()
            .flat_map(|(id, set)| set.endpoints.iter().map(move |e| (*id, e)))
    };
    if all().any(|(_, e)| usable(e.address) && !e.address.is_loopback()) {
        for (id, e) in all().filter(|(_, e)| e.address.is_loopback()) {
            out.push(format!(
                "endpoint {} from {id} is on loopback while the service's other endpoints are on the network: only proxies on the host that registered it can reach it",
                e.address
            ));
        }
    }
    out
}

impl Discovery for Merged {
    fn source_id(&self) -> SourceId {
        self.id.clone()
    }

    /// What every source can tell: a flag is set only when all sources have it; delivery is `Poll`
    /// at the slowest interval when any source polls; identity is `Platform` only when all are.
    fn capabilities(&self) -> Capabilities {
        let caps: Vec<Capabilities> = self.sources.iter().map(|s| s.capabilities()).collect();
        let all = |f: fn(&Capabilities) -> bool| caps.iter().all(f);
        let slowest_poll = caps
            .iter()
            .filter_map(|c| match c.delivery {
                ChangeDelivery::Poll(every) => Some(every),
                ChangeDelivery::Push => None,
            })
            .max();
        Capabilities {
            delivery: slowest_poll.map_or(ChangeDelivery::Push, ChangeDelivery::Poll),
            health: all(|c| c.health),
            terminating: all(|c| c.terminating),
            weights: all(|c| c.weights),
            zones: all(|c| c.zones),
            owners: all(|c| c.owners),
            identity: if all(|c| c.identity == IdentitySource::Platform) {
                IdentitySource::Platform
            } else {
                IdentitySource::AttributeOrServiceName
            },
            version_subsets: all(|c| c.version_subsets),
        }
    }

    /// The union of every source's catalog (sorted, without duplicates), once every source has
    /// answered or the settle delay has passed; errors are passed on.
    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        let id = self.id.clone();
        let mut sent: Option<Vec<ServiceKey>> = None;
        self.events(|s| s.services())
            .scan(Latest::new(self.sources.len()), move |latest, event| {
                let mut out = Vec::new();
                if let Some(e) = latest.apply(event) {
                    out.push(Err(e));
                }
                if latest.ready() {
                    let union: BTreeSet<ServiceKey> = latest
                        .values
                        .iter()
                        .flatten()
                        .flat_map(|c: &ServiceCatalog| c.services.iter().cloned())
                        .collect();
                    let union: Vec<ServiceKey> = union.into_iter().collect();
                    if sent.as_ref() != Some(&union) {
                        sent = Some(union.clone());
                        out.push(Ok(ServiceCatalog {
                            source: id.clone(),
                            services: union,
                            observed_at: SystemTime::now(),
                        }));
                    }
                }
                futures::future::ready(Some(stream::iter(out)))
            })
            .flatten()
            .boxed()
    }

    fn watch(&self, key: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        let mut sent: Option<Snapshot> = None;
        let open_key = key.clone();
        let ids: Vec<SourceId> = self.sources.iter().map(|s| s.source_id()).collect();
        let problems = self.problems.clone();
        // A service nobody watches any more has nothing to report: its entry goes with the
        // stream (the guard lives in the closure, which the stream owns).
        let forget = ForgetOnDrop {
            problems: problems.clone(),
            key: key.clone(),
        };
        self.events(move |s| s.watch(open_key.clone()))
            .scan(Latest::new(self.sources.len()), move |latest, event| {
                let _owned = &forget;
                let mut out = Vec::new();
                if let Some(e) = latest.apply(event) {
                    out.push(Err(e));
                }
                if latest.ready() {
                    // Every answer can change what is reported, even one that leaves the merged
                    // set as it was (a duplicate withdrawn by the source that lost).
                    let found = registration_problems(&ids, &latest.values);
                    let mut all = problems.lock().unwrap_or_else(|p| p.into_inner());
                    if found.is_empty() {
                        all.remove(&key);
                    } else {
                        all.insert(key.clone(), found);
                    }
                }
                if latest.ready()
                    && let Some(merged) = merge_snapshots(&key, &latest.values)
                    && sent.as_ref() != Some(&merged)
                {
                    sent = Some(merged.clone());
                    out.push(Ok(merged));
                }
                futures::future::ready(Some(stream::iter(out)))
            })
            .flatten()
            .boxed()
    }

    /// The first source, in source order, that knows `address` decides; `Unknown` when none
    /// does. Answered once every source has (or the settle delay passed: a source that has not
    /// answered by then counts as not knowing the address, which only means "forward unchanged").
    fn watch_address(
        &self,
        address: IpAddr,
    ) -> BoxStream<'static, Result<AddressOwner, DiscoveryError>> {
        let mut sent: Option<AddressOwner> = None;
        self.events(move |s| s.watch_address(address))
            .scan(Latest::new(self.sources.len()), move |latest, event| {
                let mut out = Vec::new();
                if let Some(e) = latest.apply(event) {
                    out.push(Err(e));
                }
                if latest.ready() {
                    let owner = merge_owners(&latest.values);
                    if sent.as_ref() != Some(&owner) {
                        sent = Some(owner.clone());
                        out.push(Ok(owner));
                    }
                }
                futures::future::ready(Some(stream::iter(out)))
            })
            .flatten()
            .boxed()
    }
}

/// The owner of an address across sources, in precedence order (`None`: no answer yet).
pub fn merge_owners(owners: &[Option<AddressOwner>]) -> AddressOwner {
    owners
        .iter()
        .flatten()
        .find(|o| !matches!(o, AddressOwner::Unknown))
        .cloned()
        .unwrap_or(AddressOwner::Unknown)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::time::{Instant, timeout};

    use super::*;
    use crate::fake::{Scripted, caps, endpoint, set};

    const QUIET: Duration = Duration::from_millis(100);

    fn two() -> (Scripted, Scripted, Merged) {
        let a = Scripted::new("a");
        let b = Scripted::new("b");
        let merged = Merged::new(vec![Arc::new(a.clone()), Arc::new(b.clone())]);
        (a, b, merged)
    }

    async fn next<T>(stream: &mut BoxStream<'static, T>) -> T {
        timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("an item")
            .expect("streams never end")
    }

    fn addresses(snapshot: &Snapshot) -> Vec<(String, u16, String)> {
        let Snapshot::Endpoints(set) = snapshot else {
            panic!("want Endpoints, got {snapshot:?}")
        };
        set.endpoints
            .iter()
            .map(|e| {
                (
                    e.address.to_string(),
                    e.ports[0].port,
                    e.provenance.source.to_string(),
                )
            })
            .collect()
    }

    fn row(address: &str, port: u16, source: &str) -> (String, u16, String) {
        (address.to_string(), port, source.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn the_union_keeps_the_first_source_on_address_and_port_conflicts() {
        let (a, b, merged) = two();
        let key = ServiceKey::new("ns", "web");
        let mut watch = merged.watch(key.clone());
        a.send(
            &key,
            set(
                &key,
                80,
                vec![
                    endpoint("a", "10.0.0.1", 80, &[]),
                    endpoint("a", "10.0.0.2", 80, &[]),
                ],
            ),
        );
        // b has not answered yet: no partial answer.
        assert!(timeout(QUIET, watch.next()).await.is_err());
        b.send(
            &key,
            set(
                &key,
                8080,
                vec![
                    endpoint("b", "10.0.0.2", 80, &[]),
                    endpoint("b", "10.0.0.3", 80, &[]),
                    endpoint("b", "10.0.0.1", 81, &[]),
                ],
            ),
        );
        let snapshot = next(&mut watch).await.expect("a snapshot");
        assert_eq!(
            addresses(&snapshot),
            vec![
                row("10.0.0.1", 80, "a"),
                row("10.0.0.2", 80, "a"),
                row("10.0.0.3", 80, "b"),
                row("10.0.0.1", 81, "b"),
            ]
        );
        let Snapshot::Endpoints(set) = snapshot else {
            unreachable!()
        };
        assert_eq!(set.service, key);
        let ports: Vec<u16> = set.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![80, 8080]);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_only_when_every_source_says_so() {
        let (a, b, merged) = two();
        let key = ServiceKey::new("ns", "web");
        let mut watch = merged.watch(key.clone());
        a.send(&key, Snapshot::NotFound);
        // Even after the settle delay, one NotFound is not the answer while b is silent.
        assert!(timeout(DEFAULT_SETTLE * 2, watch.next()).await.is_err());
        b.send(&key, Snapshot::NotFound);
        assert_eq!(next(&mut watch).await.expect("ok"), Snapshot::NotFound);
        b.send(
            &key,
            set(&key, 80, vec![endpoint("b", "10.0.0.9", 80, &[])]),
        );
        let snapshot = next(&mut watch).await.expect("ok");
        assert_eq!(addresses(&snapshot), vec![row("10.0.0.9", 80, "b")]);
        b.send(&key, Snapshot::NotFound);
        assert_eq!(next(&mut watch).await.expect("ok"), Snapshot::NotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_passed_on_and_keeps_that_sources_last_endpoints() {
        let (a, b, merged) = two();
        let key = ServiceKey::new("ns", "web");
        let mut watch = merged.watch(key.clone());
        a.send(
            &key,
            set(&key, 80, vec![endpoint("a", "10.0.0.1", 80, &[])]),
        );
        b.send(
            &key,
            set(&key, 80, vec![endpoint("b", "10.0.0.2", 80, &[])]),
        );
        assert_eq!(next(&mut watch).await.expect("ok").clone(), {
            let mut both = set(&key, 80, vec![endpoint("a", "10.0.0.1", 80, &[])]);
            if let Snapshot::Endpoints(s) = &mut both {
                s.endpoints.push(endpoint("b", "10.0.0.2", 80, &[]));
            }
            both
        });

        b.fail(&key);
        let error = next(&mut watch).await.expect_err("the error is passed on");
        assert_eq!(&*error.source_id, "b");
        // Nothing else: the merged view did not change.
        assert!(timeout(QUIET, watch.next()).await.is_err());

        a.send(
            &key,
            set(
                &key,
                80,
                vec![
                    endpoint("a", "10.0.0.1", 80, &[]),
                    endpoint("a", "10.0.0.3", 80, &[]),
                ],
            ),
        );
        let snapshot = next(&mut watch).await.expect("ok");
        assert_eq!(
            addresses(&snapshot),
            vec![
                row("10.0.0.1", 80, "a"),
                row("10.0.0.3", 80, "a"),
                row("10.0.0.2", 80, "b"),
            ],
            "b's last good endpoints stay"
        );

        let freshness = merged.freshness();
        assert_eq!(&*freshness[0].source, "a");
        assert!(!freshness[0].is_stale() && freshness[0].last_error.is_none());
        assert!(freshness[1].is_stale(), "{freshness:?}");
        assert!(freshness[1].last_good.is_some());
        assert!(
            freshness[1]
                .last_error
                .as_ref()
                .is_some_and(|(_, message)| message.contains("scripted failure"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_delays_the_first_answer_by_the_settle_delay_only() {
        let (a, _silent, merged) = two();
        let key = ServiceKey::new("ns", "web");
        let mut watch = merged.watch(key.clone());
        let start = Instant::now();
        a.send(
            &key,
            set(&key, 80, vec![endpoint("a", "10.0.0.1", 80, &[])]),
        );
        let snapshot = next(&mut watch).await.expect("ok");
        assert!(start.elapsed() >= DEFAULT_SETTLE, "{:?}", start.elapsed());
        assert_eq!(addresses(&snapshot), vec![row("10.0.0.1", 80, "a")]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_catalog_is_the_union_and_survives_a_source_error() {
        let (a, b, merged) = two();
        let mut catalog = merged.services();
        let key = |name: &str| ServiceKey::new("ns", name);
        a.send_catalog(vec![key("x"), key("y")]);
        b.send_catalog(vec![key("z"), key("y")]);
        let first = next(&mut catalog).await.expect("ok");
        assert_eq!(first.services, vec![key("x"), key("y"), key("z")]);
        assert_eq!(&*first.source, "merged[a,b]");

        b.fail_catalog();
        assert_eq!(
            &*next(&mut catalog).await.expect_err("error").source_id,
            "b"
        );
        assert!(timeout(QUIET, catalog.next()).await.is_err());

        // b's last good catalog stays in the union.
        a.send_catalog(vec![key("x"), key("w")]);
        let next_catalog = next(&mut catalog).await.expect("ok");
        assert_eq!(
            next_catalog.services,
            vec![key("w"), key("x"), key("y"), key("z")]
        );
    }

    #[test]
    fn capabilities_are_what_every_source_can_tell() {
        let poll = Scripted::new("poll").with_caps(Capabilities {
            delivery: ChangeDelivery::Poll(Duration::from_secs(5)),
            weights: false,
            ..caps()
        });
        let push = Scripted::new("push").with_caps(Capabilities {
            zones: true,
            identity: IdentitySource::Platform,
            ..caps()
        });
        let merged = Merged::new(vec![Arc::new(poll), Arc::new(push)]);
        let c = merged.capabilities();
        assert_eq!(c.delivery, ChangeDelivery::Poll(Duration::from_secs(5)));
        assert!(c.health);
        assert!(!c.weights && !c.zones);
        assert_eq!(c.identity, IdentitySource::AttributeOrServiceName);
    }

    #[test]
    fn endpoints_without_ports_conflict_by_address() {
        let key = ServiceKey::new("ns", "web");
        let mut portless = endpoint("b", "10.0.0.1", 80, &[]);
        portless.ports.clear();
        let merged = merge_snapshots(
            &key,
            &[
                Some(set(&key, 80, vec![portless.clone()])),
                Some(set(&key, 80, vec![portless])),
            ],
        )
        .expect("known");
        let Snapshot::Endpoints(set) = merged else {
            unreachable!()
        };
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(
            merge_snapshots(&key, &[None, Some(Snapshot::NotFound)]),
            None
        );
        assert_eq!(merge_snapshots(&key, &[]), Some(Snapshot::NotFound));
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_in_two_platforms_is_reported_with_the_one_used() {
        let (a, b, merged) = two();
        let key = ServiceKey::new("ns", "web");
        let mut watch = merged.watch(key.clone());
        a.send(
            &key,
            set(&key, 80, vec![endpoint("a", "10.0.0.1", 80, &[])]),
        );
        b.send(
            &key,
            set(
                &key,
                80,
                vec![
                    endpoint("b", "10.0.0.1", 80, &[]),
                    endpoint("b", "10.0.0.2", 80, &[]),
                ],
            ),
        );
        let Snapshot::Endpoints(seen) = next(&mut watch).await.expect("ok") else {
            panic!("endpoints expected");
        };
        let sources: Vec<&str> = seen
            .endpoints
            .iter()
            .map(|e| &*e.provenance.source)
            .collect();
        assert_eq!(sources, ["a", "b"], "a's 10.0.0.1 wins, b's 10.0.0.2 stays");
        let problems = merged.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].service, key);

        assert_eq!(
            problems[0].message,
            "10.0.0.1:80 is registered by both a and b: a's registration is used (the first platform listed wins)"
        );

        // Fixed at the source: the report goes away, although the merged set is unchanged (so
        // nothing new is yielded).
        b.send(
            &key,
            set(&key, 80, vec![endpoint("b", "10.0.0.2", 80, &[])]),
        );
        assert!(timeout(QUIET, watch.next()).await.is_err());
        assert!(merged.problems().is_empty(), "{:?}", merged.problems());

        // Reported again, then nobody watches: nothing is left to report.
        b.send(
            &key,
            set(&key, 80, vec![endpoint("b", "10.0.0.1", 80, &[])]),
        );
        next(&mut watch).await.expect("ok: b's 10.0.0.2 is gone");
        assert_eq!(merged.problems().len(), 1);
        drop(watch);
        assert!(merged.problems().is_empty(), "{:?}", merged.problems());
    }

    #[test]
    fn unusable_addresses_are_dropped_and_loopback_among_network_endpoints_is_reported() {
        let key = ServiceKey::new("ns", "web");
        let ids: Vec<SourceId> = vec![Arc::from("consul")];
        let snapshot = set(
            &key,
            80,
            vec![
                endpoint("consul", "0.0.0.0", 80, &[]),
                endpoint("consul", "127.0.0.1", 80, &[]),
                endpoint("consul", "10.0.0.7", 80, &[]),
            ],
        );
        let problems = registration_problems(&ids, &[Some(snapshot.clone())]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("endpoint 0.0.0.0 from consul is not an address"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("endpoint 127.0.0.1 from consul is on loopback"),
            "{problems:?}"
        );
        let Some(Snapshot::Endpoints(merged)) = merge_snapshots(&key, &[Some(snapshot)]) else {
            panic!("endpoints expected");
        };
        let kept: Vec<String> = merged
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(kept, ["127.0.0.1", "10.0.0.7"]);

        // A mesh all on one host's loopback (the demo, the tests) has nothing to report.
        let local = set(
            &key,
            80,
            vec![
                endpoint("consul", "127.0.0.1", 80, &[]),
                endpoint("consul", "127.0.0.2", 80, &[]),
            ],
        );
        assert!(registration_problems(&ids, &[Some(local)]).is_empty());
    }

    #[test]
    fn the_first_source_that_knows_an_address_decides() {
        let web = ServiceKey::new("shop", "web");
        let api = ServiceKey::new("shop", "api");
        let svc = |service: &ServiceKey| AddressOwner::Service {
            service: service.clone(),
            ports: Vec::new(),
        };
        assert_eq!(merge_owners(&[None, None]), AddressOwner::Unknown);
        assert_eq!(
            merge_owners(&[Some(AddressOwner::Unknown), Some(svc(&web))]),
            svc(&web)
        );
        assert_eq!(merge_owners(&[Some(svc(&api)), Some(svc(&web))]), svc(&api));
    }

    #[tokio::test]
    async fn sources_without_addresses_answer_unknown_once_merged() {
        let (_a, _b, merged) = two();
        let mut owners = merged.watch_address("10.0.0.1".parse().unwrap());
        assert_eq!(next(&mut owners).await.unwrap(), AddressOwner::Unknown);
    }
}
