//! Leader election with a `coordination.k8s.io/v1` Lease, for what the controller writes to
//! Kubernetes (Events). Every replica serves proxies whatever the outcome: only writers ask
//! [`Leadership::is_leader`].
//!
//! kube 5 ships no leader election. Crates checked: `kube-leader-election` needs kube 4;
//! `kube-lease-manager` (kube 5) updates the Lease with server-side apply, which the fake API
//! server the tests run against does not implement. So this is a small loop in the shape of
//! client-go's `leaderelection` (get, then a conditional replace):
//!
//! - Every `retry_period` (2 s) a replica GETs the Lease (creating it when absent, holding it).
//! - The holder renews: a PUT carrying the `resourceVersion` it read, with `renewTime = now`.
//!   The API server refuses a PUT whose resourceVersion is stale (409 Conflict), so of two
//!   replicas writing the same version only one wins: two replicas can never both hold it.
//! - Another replica takes the Lease when `holderIdentity` is empty (released) or the Lease has
//!   expired. Expired means both: `renewTime + leaseDurationSeconds` is in the past by our clock,
//!   and we have seen the same record (resourceVersion) unchanged for `leaseDurationSeconds` by
//!   our monotonic clock. The second rule is client-go's: it makes the election tolerant to clock
//!   skew between nodes (a replica whose wall clock runs ahead cannot steal a live Lease); the
//!   first is the Lease's documented contract. The price: a replica that starts after a leader
//!   crashed waits one lease duration before it takes over.
//! - Stepping down is prompt: the replica stops being leader (the channel says `false`) as soon as
//!   one renewal fails (conflict, error, or no answer within `retry_period`). It tries again at
//!   the next tick, and gets the Lease back if it is still the holder. So a leader that cannot
//!   reach the API server stops writing within `2 × retry_period`, long before another replica may
//!   take over (`lease_duration` after its last renewal).
//! - On shutdown ([`Leadership::release`]) the holder steps down first, then clears
//!   `holderIdentity` so another replica takes over at its next tick instead of waiting for the
//!   lease to expire. A crash (or [`Leadership::abandon`]) leaves the Lease to expire.
//!
//! The handle ([`Leadership`]), its status and the options are `trellis-controller-core`'s
//! (re-exported here), so a controller built without Kubernetes has them too; this module is
//! the election behind [`elect`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_controller_core::leader::Election;

pub use trellis_controller_core::leader::{
    LeaderOptions, LeaderStatus, Leadership, default_identity,
};

/// The running election behind a [`Leadership`] handle. Dropped with the last handle: the task
/// stops then (without releasing the Lease, like a crash).
struct Control {
    is_leader: Arc<watch::Sender<bool>>,
    status: Arc<watch::Sender<LeaderStatus>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    fn abort(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.is_leader.send_replace(false);
        self.status
            .send_if_modified(|s| std::mem::replace(&mut s.leader, false));
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Election for Control {
    /// Steps down, then clears `holderIdentity` so another replica takes over at once (waits at
    /// most one `retry_period` for the API server).
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop.send_replace(true);
            let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }

    /// Stops renewing without releasing the Lease: another replica takes over once it expires.
    fn abandon(&self) {
        self.abort();
    }
}

/// Starts electing with the Lease `options` names, on the current Tokio runtime.
pub fn elect(client: Client, options: LeaderOptions) -> Leadership {
    let (leader_tx, is_leader) = watch::channel(false);
    let leader_tx = Arc::new(leader_tx);
    let (status_tx, status) = watch::channel(LeaderStatus {
        elect: true,
        identity: options.identity.clone(),
        lease: format!("{}/{}", options.namespace, options.name),
        ..LeaderStatus::default()
    });
    let status_tx = Arc::new(status_tx);
    let (stop, stop_rx) = watch::channel(false);
    let elector = Elector {
        api: Api::namespaced(client, &options.namespace),
        options,
        observed: None,
        is_leader: Arc::clone(&leader_tx),
        status: Arc::clone(&status_tx),
    };
    let task = tokio::spawn(elector.run(stop_rx));
    Leadership::elected(
        is_leader,
        status,
        Arc::new(Control {
            is_leader: leader_tx,
            status: status_tx,
            stop,
            task: Mutex::new(Some(task)),
        }),
    )
}

/// What the last attempt found.
enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Leader,
    /// Someone else holds it (or won the race for it).
    Follower(Option<String>),
}

/// The record last read and when (monotonic) we first saw it: the base of the expiry rule.
struct Observed {
    resource_version: Option<String>,
    since: Instant,
}

struct Elector {
    api: Api<Lease>,
    options: LeaderOptions,
    observed: Option<Observed>,
    is_leader: Arc<watch::Sender<bool>>,
    status: Arc<watch::Sender<LeaderStatus>>,
}

impl Elector {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.options.retry_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            // One attempt may take at most one retry period: a leader that cannot renew in time
            // steps down rather than keep writing on a Lease that may be about to expire.
            let outcome =
                tokio::time::timeout(self.options.retry_period, self.acquire_or_renew()).await;
            let outcome = match outcome {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "no answer from the API server within {:?}",
                    self.options.retry_period
                )),
            };
            self.report(outcome);
        }
        // Shutdown: stop writing first, then hand the Lease over.
        let was_leader = self.is_leader.send_replace(false);
        if was_leader {
            let released =
                tokio::time::timeout(self.options.retry_period, self.release_lease()).await;
            match released {
                Ok(Ok(())) => tracing::info!(
                    "released the leader Lease {}/{}",
                    self.options.namespace,
                    self.options.name
                ),
                Ok(Err(e)) => tracing::warn!("releasing the leader Lease failed: {e}"),
                Err(_) => tracing::warn!("releasing the leader Lease timed out"),
            }
        }
        self.status.send_modify(|s| {
            s.leader = false;
        });
    }

    /// Publishes the outcome of one attempt; logs leadership changes.
    fn report(&mut self, outcome: Result<Attempt, String>) {
        let (leader, holder, error) = match outcome {
            Ok(Attempt::Leader) => (true, Some(self.options.identity.clone()), None),
            Ok(Attempt::Follower(holder)) => (false, holder, None),
            Err(e) => (false, self.status.borrow().holder.clone(), Some(e)),
        };
        let was = self.is_leader.send_replace(leader);
        let lease = format!("{}/{}", self.options.namespace, self.options.name);
        match (was, leader, &error) {
            (false, true, _) => tracing::info!("became the leader (Lease {lease})"),
            (true, false, Some(e)) => {
                tracing::warn!("stepped down: renewing the Lease {lease} failed: {e}")
            }
            (true, false, None) => tracing::warn!(
                "stepped down: the Lease {lease} is held by {}",
                holder.as_deref().unwrap_or("nobody")
            ),
            _ => {}
        }
        let renewed = leader.then(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
        self.status.send_if_modified(|s| {
            let before = s.clone();
            s.leader = leader;
            s.holder = holder;
            s.last_error = error;
            if renewed.is_some() {
                s.last_renew_unix = renewed;
            }
            *s != before
        });
    }

    /// One round: read the Lease, then create, renew or take it if we may.
    async fn acquire_or_renew(&mut self) -> kube::Result<Attempt> {
        let me = self.options.identity.clone();
        let now = Timestamp::now();
        let Some(current) = self.api.get_opt(&self.options.name).await? else {
            return self.create(&me, now).await;
        };
        let resource_version = current.metadata.resource_version.clone();
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != resource_version);
        if changed {
            self.observed = Some(Observed {
                resource_version,
                since: Instant::now(),
            });
        }
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(me.as_str());
        if holder.is_some() && !mine && !self.expired(&spec, now) {
            return Ok(Attempt::Follower(holder));
        }
        // Renew ours, or take a free or expired Lease. The object keeps the resourceVersion we
        // read, so the replace is conditional: if anyone wrote in between, we get 409.
        let mut next = current;
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me.clone());
        new_spec.lease_duration_seconds = Some(self.options.lease_seconds());
        new_spec.renew_time = Some(MicroTime(now));
        if !mine {
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.spec = Some(new_spec);
        match self
            .api
            .replace(&self.options.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observed = Some(Observed {
                    resource_version: written.metadata.resource_version,
                    since: Instant::now(),
                });
                Ok(Attempt::Leader)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Someone wrote first (renewed, or took it): they lead.
                Ok(Attempt::Follower(holder.filter(|h| *h != me)))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a Lease held by someone else may be taken (see the module docs).
    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let seconds = spec
            .lease_duration_seconds
            .unwrap_or_else(|| self.options.lease_seconds())
            .max(1);
        let duration = Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
        let by_renew_time = spec.renew_time.as_ref().is_none_or(|t| {
            t.0.checked_add(SignedDuration::from_secs(i64::from(seconds)))
                .is_ok_and(|end| end <= now)
        });
        let unchanged_long_enough = self
            .observed
            .as_ref()
            .is_some_and(|o| o.since.elapsed() >= duration);
        by_renew_time && unchanged_long_enough
    }

    async fn create(&mut self, me: &str, now: Timestamp) -> kube::Result<Attempt> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.options.name.clone()),
                namespace: Some(self.options.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(self.options.lease_seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(written) => {
                self.observed = Some(Observed {
                    resource_version: written.metadata.resource_version,
                    since: Instant::now(),
                });
                Ok(Attempt::Leader)
            }
            // Another replica created it first: it leads; we read it next round.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Follower(None)),
            Err(e) => Err(e),
        }
    }

    /// Clears `holderIdentity` if we still hold the Lease (conditional on what we read).
    async fn release_lease(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.options.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.options.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        // Like client-go: a released Lease is free anyway; a short duration tells older
        // electors that only look at renewTime to stop waiting too.
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.options.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}
