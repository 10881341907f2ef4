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
use crate::mapping::{RawInstance, Seen, dedupe};

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
    last_seen: Option<Seen>,
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
        if self.last_seen.as_ref() == Some(&seen) {
            return None;
        }
        let snapshot = seen.snapshot(&self.key, &self.source_id, SystemTime::now());
        self.last_seen = Some(seen);
        Some(snapshot)
    }
}
