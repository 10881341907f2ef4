//! The poll loop behind `watch`: a cheap `DiscoverInstancesRevision` every poll interval, a full
//! `DiscoverInstances` when the revision differs from the last one seen, and a full re-fetch every
//! refresh interval even when it does not.
//!
//! Why "differs" and not "is greater": a revision is only a change detector. moto computes it as a
//! sum of per-instance counters, so deregistering an instance makes it go *down*; a Cloud Map
//! service re-created under the same name starts over. Any difference means "look again".
//!
//! Why the periodic re-fetch: Cloud Map does not change the revision on health changes ("The
//! health status updates don't update InstancesRevision", API reference), and a sum-style revision
//! can come back to an earlier value after two changes between polls. The refresh interval bounds
//! how late such changes show.
//!
//! The loop keeps the last snapshot across failures: an error is yielded as an item (staleness),
//! the next try waits the shared backoff, and the first success after a failure always re-fetches
//! in full. A snapshot is yielded only when what Cloud Map returned changed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, BoxStream, StreamExt};
use tokio::time::Instant;
use trellis_discovery::{BACKOFF_CAP, Backoff, DiscoveryError, ServiceKey, Snapshot, SourceId};

use crate::errors::Failure;
use crate::mapping::{Fingerprint, RawInstance, Seen, dedupe};

/// What DiscoverInstances returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Discovered {
    pub instances: Vec<RawInstance>,
    pub revision: Option<i64>,
}

/// The two data-plane calls a watch makes; the SDK implements it, unit tests script it.
pub(crate) trait InstanceSource: Send + Sync + 'static {
    /// `Ok(None)` when Cloud Map answered without a revision (then every poll re-fetches).
    fn revision(
        &self,
        key: &ServiceKey,
    ) -> impl Future<Output = Result<Option<i64>, Failure>> + Send;
    fn instances(
        &self,
        key: &ServiceKey,
    ) -> impl Future<Output = Result<Discovered, Failure>> + Send;
}

/// How often a watch looks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub poll: Duration,
    pub refresh: Duration,
}

struct WatchLoop<S> {
    source: Arc<S>,
    key: ServiceKey,
    source_id: SourceId,
    timing: Timing,
    last_revision: Option<i64>,
    /// When the last full fetch (or NotFound answer) happened; `None` forces a full fetch.
    last_fetch: Option<Instant>,
    last_seen: Option<Fingerprint>,
    backoff: Backoff,
    next_at: Option<Instant>,
}

/// The watch stream of `key`: never ends on its own; dropping it stops the polling.
pub(crate) fn watch<S: InstanceSource>(
    source: Arc<S>,
    key: ServiceKey,
    source_id: SourceId,
    timing: Timing,
) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
    let state = WatchLoop {
        source,
        key,
        source_id,
        timing,
        last_revision: None,
        last_fetch: None,
        last_seen: None,
        backoff: Backoff::new(),
        next_at: None,
    };
    stream::unfold(state, |mut state| async move {
        let item = state.next().await;
        Some((item, state))
    })
    .boxed()
}

impl<S: InstanceSource> WatchLoop<S> {
    /// Polls until there is something to yield: a changed snapshot or an error.
    async fn next(&mut self) -> Result<Snapshot, DiscoveryError> {
        loop {
            if let Some(at) = self.next_at {
                tokio::time::sleep_until(at).await;
            }
            match self.poll_once().await {
                Ok(changed) => {
                    self.backoff.reset();
                    self.next_at = Some(Instant::now() + self.timing.poll);
                    if let Some(snapshot) = changed {
                        return Ok(snapshot);
                    }
                }
                Err(e) => {
                    // Permanent errors (credentials, configuration) need a person; retry slowly.
                    let delay = if e.temporary {
                        self.backoff.next_delay()
                    } else {
                        self.timing.refresh.max(BACKOFF_CAP)
                    };
                    self.next_at = Some(Instant::now() + delay);
                    // Look in full once the registry answers again.
                    self.last_fetch = None;
                    return Err(e);
                }
            }
        }
    }

    /// One round: the revision check (unless a full fetch is due), then the full fetch if needed.
    /// `Ok(Some)` when what Cloud Map returned changed.
    async fn poll_once(&mut self) -> Result<Option<Snapshot>, DiscoveryError> {
        let refresh_due = self
            .last_fetch
            .is_none_or(|at| at.elapsed() >= self.timing.refresh);
        if !refresh_due {
            match self.source.revision(&self.key).await {
                Ok(Some(revision)) if Some(revision) == self.last_revision => return Ok(None),
                Ok(_) => {} // any difference, backwards too
                Err(Failure::NotFound) => return Ok(self.observe(Seen::NotFound, None)),
                Err(Failure::Error(e)) => return Err(e),
            }
        }
        match self.source.instances(&self.key).await {
            Ok(found) => Ok(self.observe(Seen::Instances(dedupe(found.instances)), found.revision)),
            Err(Failure::NotFound) => Ok(self.observe(Seen::NotFound, None)),
            Err(Failure::Error(e)) => Err(e),
        }
    }

    /// Records what was seen; the snapshot to yield if it differs from the last one.
    fn observe(&mut self, seen: Seen, revision: Option<i64>) -> Option<Snapshot> {
        self.last_revision = revision;
        self.last_fetch = Some(Instant::now());
        let fingerprint = seen.fingerprint();
        if self.last_seen == Some(fingerprint) {
            return None;
        }
        self.last_seen = Some(fingerprint);
        Some(seen.snapshot(&self.key, &self.source_id, SystemTime::now()))
    }
}

#[cfg(test)]
mod tests {
    //! The paths moto cannot show faithfully: revisions going backwards, health changes without a
    //! revision change, duplicate instance ids, throttling. A scripted source stands in for Cloud
    //! Map; time is paused, so intervals are exact and the tests are instant.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use futures::StreamExt;
    use trellis_discovery::{ErrorKind, Readiness};

    use super::*;
    use crate::mapping::Health;

    const POLL: Duration = Duration::from_millis(100);
    const REFRESH: Duration = Duration::from_secs(10);

    #[derive(Default)]
    struct Registry {
        exists: bool,
        revision: i64,
        instances: Vec<RawInstance>,
        throttled: bool,
        revision_calls: usize,
        instance_calls: usize,
    }

    #[derive(Default)]
    struct Scripted(Mutex<Registry>);

    impl Scripted {
        fn with(&self, f: impl FnOnce(&mut Registry)) {
            f(&mut self.0.lock().unwrap())
        }
        fn calls(&self) -> (usize, usize) {
            let r = self.0.lock().unwrap();
            (r.revision_calls, r.instance_calls)
        }
    }

    fn throttled() -> Failure {
        let (kind, temporary) = crate::errors::classify_code(Some("RequestLimitExceeded"), 400);
        Failure::Error(DiscoveryError::new(
            kind,
            temporary,
            "cloudmap:test".into(),
            "DiscoverInstances: RequestLimitExceeded",
        ))
    }

    impl InstanceSource for Scripted {
        async fn revision(&self, _key: &ServiceKey) -> Result<Option<i64>, Failure> {
            let mut r = self.0.lock().unwrap();
            r.revision_calls += 1;
            match (r.throttled, r.exists) {
                (true, _) => Err(throttled()),
                (false, false) => Err(Failure::NotFound),
                (false, true) => Ok(Some(r.revision)),
            }
        }

        async fn instances(&self, _key: &ServiceKey) -> Result<Discovered, Failure> {
            let mut r = self.0.lock().unwrap();
            r.instance_calls += 1;
            match (r.throttled, r.exists) {
                (true, _) => Err(throttled()),
                (false, false) => Err(Failure::NotFound),
                (false, true) => Ok(Discovered {
                    instances: r.instances.clone(),
                    revision: Some(r.revision),
                }),
            }
        }
    }

    fn at(id: &str, ip: &str, health: Health) -> RawInstance {
        RawInstance {
            id: id.into(),
            health,
            attributes: BTreeMap::from([
                ("AWS_INSTANCE_IPV4".to_string(), ip.to_string()),
                ("AWS_INSTANCE_PORT".to_string(), "8080".to_string()),
            ]),
        }
    }

    fn start(
        registry: Registry,
    ) -> (
        Arc<Scripted>,
        BoxStream<'static, Result<Snapshot, DiscoveryError>>,
    ) {
        let source = Arc::new(Scripted(Mutex::new(registry)));
        let stream = watch(
            source.clone(),
            ServiceKey::new("prod.local", "web"),
            "cloudmap:test".into(),
            Timing {
                poll: POLL,
                refresh: REFRESH,
            },
        );
        (source, stream)
    }

    async fn next(
        stream: &mut BoxStream<'static, Result<Snapshot, DiscoveryError>>,
    ) -> Result<Snapshot, DiscoveryError> {
        tokio::time::timeout(REFRESH * 3, stream.next())
            .await
            .expect("an item within three refresh intervals")
            .expect("watch streams never end")
    }

    fn addresses(snapshot: &Snapshot) -> Vec<(String, Readiness)> {
        match snapshot {
            Snapshot::NotFound => panic!("want Endpoints, got NotFound"),
            Snapshot::Endpoints(set) => set
                .endpoints
                .iter()
                .map(|e| (e.address.to_string(), e.readiness))
                .collect(),
        }
    }

    fn web(instances: Vec<RawInstance>, revision: i64) -> Registry {
        Registry {
            exists: true,
            revision,
            instances,
            ..Registry::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_revision_that_goes_backwards_is_a_change() {
        let (source, mut stream) = start(web(
            vec![
                at("a", "10.0.0.1", Health::Healthy),
                at("b", "10.0.0.2", Health::Healthy),
            ],
            5,
        ));
        assert_eq!(addresses(&next(&mut stream).await.unwrap()).len(), 2);

        // moto-style: deregistering drops the instance's counter from the sum, so 5 -> 3.
        source.with(|r| {
            r.instances.truncate(1);
            r.revision = 3;
        });
        let changed_at = Instant::now();
        let snapshot = next(&mut stream).await.unwrap();
        assert_eq!(
            addresses(&snapshot),
            vec![("10.0.0.1".into(), Readiness::Ready)]
        );
        assert!(
            changed_at.elapsed() <= POLL,
            "seen by the revision check within one poll, not by the refresh: {:?}",
            changed_at.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_revision_costs_no_discover_instances_until_the_refresh() {
        let (source, mut stream) = start(web(vec![at("a", "10.0.0.1", Health::Healthy)], 1));
        next(&mut stream).await.unwrap();
        assert_eq!(source.calls(), (0, 1), "the first answer is a full fetch");

        let quiet = tokio::time::timeout(REFRESH - POLL, stream.next()).await;
        assert!(
            quiet.is_err(),
            "nothing changed, nothing yielded: {quiet:?}"
        );
        let (revisions, fetches) = source.calls();
        assert_eq!(
            fetches, 1,
            "no DiscoverInstances while the revision is unchanged"
        );
        assert!(
            (95..=100).contains(&revisions),
            "one revision check per poll interval, got {revisions}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_health_change_without_a_revision_change_shows_after_the_refresh() {
        let (source, mut stream) = start(web(vec![at("a", "10.0.0.1", Health::Healthy)], 7));
        next(&mut stream).await.unwrap();
        let started = Instant::now();
        // Cloud Map applies health at once and leaves the revision alone.
        source.with(|r| r.instances[0].health = Health::Unhealthy);
        let snapshot = next(&mut stream).await.unwrap();
        assert_eq!(
            addresses(&snapshot),
            vec![("10.0.0.1".into(), Readiness::NotReady)]
        );
        let took = started.elapsed();
        assert!(
            took >= REFRESH - POLL && took <= REFRESH + POLL,
            "shown by the periodic refresh: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_registered_instance_is_one_endpoint_with_the_latest_attributes() {
        // moto appends a second copy when an instance id is registered again.
        let (_source, mut stream) = start(web(
            vec![
                at("a", "10.0.0.1", Health::Healthy),
                at("a", "10.0.0.2", Health::Healthy),
            ],
            2,
        ));
        let snapshot = next(&mut stream).await.unwrap();
        assert_eq!(
            addresses(&snapshot),
            vec![("10.0.0.2".into(), Readiness::Ready)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_a_temporary_error_item_and_the_watch_recovers() {
        let (source, mut stream) = start(web(vec![at("a", "10.0.0.1", Health::Healthy)], 1));
        let first = next(&mut stream).await.unwrap();

        source.with(|r| r.throttled = true);
        let err = next(&mut stream).await.unwrap_err();
        assert!(err.temporary, "throttling is temporary: {err}");
        assert_eq!(err.kind, ErrorKind::Unavailable);
        // Still throttled: more error items, spaced by the backoff (never faster than it).
        let before = Instant::now();
        assert!(next(&mut stream).await.is_err());
        assert!(before.elapsed() >= trellis_discovery::BACKOFF_INITIAL);

        // Back, with a change made meanwhile: the first success re-fetches in full.
        source.with(|r| {
            r.throttled = false;
            r.instances.push(at("b", "10.0.0.2", Health::Healthy));
        });
        let back = Instant::now();
        let snapshot = next(&mut stream).await.unwrap();
        assert_eq!(addresses(&snapshot).len(), 2);
        assert!(
            back.elapsed() <= trellis_discovery::BACKOFF_CAP,
            "{:?}",
            back.elapsed()
        );
        assert_ne!(snapshot, first);
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_without_a_change_repeats_nothing() {
        let (source, mut stream) = start(web(vec![at("a", "10.0.0.1", Health::Healthy)], 1));
        next(&mut stream).await.unwrap();
        source.with(|r| r.throttled = true);
        assert!(next(&mut stream).await.is_err());
        source.with(|r| r.throttled = false);
        let quiet = tokio::time::timeout(REFRESH / 2, stream.next()).await;
        assert!(
            quiet.is_err(),
            "the same content is not yielded again: {quiet:?}"
        );
        let (_, fetches) = source.calls();
        assert!(fetches >= 2, "recovery fetched in full");
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_service_is_not_found_first_then_appears() {
        let (source, mut stream) = start(Registry::default());
        assert_eq!(next(&mut stream).await.unwrap(), Snapshot::NotFound);
        let quiet = tokio::time::timeout(POLL * 5, stream.next()).await;
        assert!(quiet.is_err(), "NotFound is not repeated");

        source.with(|r| {
            r.exists = true;
            r.revision = 1;
            r.instances = vec![at("a", "10.0.0.1", Health::Healthy)];
        });
        let snapshot = next(&mut stream).await.unwrap();
        assert_eq!(addresses(&snapshot).len(), 1);
        source.with(|r| r.exists = false);
        assert_eq!(next(&mut stream).await.unwrap(), Snapshot::NotFound);
    }
}
