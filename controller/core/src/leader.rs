//! "May this replica write?": the leadership handle every writer of the controller asks, and its
//! status for people. Free of Kubernetes, so a controller built without it (Consul, ECS, files)
//! still has the handle ([`Leadership::always`]) and `/api/v1/state` still shows it.
//!
//! The Lease election that can make the answer change lives in `trellis-controller-kubernetes`
//! (`leader::elect`); it builds its handle with [`Leadership::elected`] and plugs its shutdown
//! in through [`Election`]. Every replica serves proxies whatever the answer: only writers ask.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Which Lease, who we are, and the timings. Plain data: the election that uses it is
/// `trellis-controller-kubernetes`'s; here so that callers (the CLI) can say what they want
/// without linking a Kubernetes client.
#[derive(Clone, Debug)]
pub struct LeaderOptions {
    pub namespace: String,
    pub name: String,
    /// This replica's `holderIdentity` (default: [`default_identity`]).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal (`leaseDurationSeconds`, whole
    /// seconds on the wire, at least 1).
    pub lease_duration: Duration,
    /// How often a replica tries to acquire or renew; also the time limit of one attempt.
    pub retry_period: Duration,
}

impl LeaderOptions {
    /// The Lease `namespace/name` with the default timings (15 s lease, renewed every 2 s) and
    /// identity.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    /// `leaseDurationSeconds` as the Lease stores it: whole seconds, at least 1.
    pub fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1)
    }
}

/// `hostname-pid`: unique per replica (a pod's hostname is its name) and per process on one host.
/// The hostname is `$HOSTNAME` (set in every container), else the kernel's.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}-{}", std::process::id())
}

/// The election as `/api/v1/state` and `trellis check` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// Leader election runs (`--leader-elect`); without it this replica always writes.
    pub elect: bool,
    /// This replica may write now.
    pub leader: bool,
    pub identity: String,
    /// `namespace/name` of the Lease (empty without election).
    pub lease: String,
    /// The Lease's holder as last read (`None` = free or not read yet).
    pub holder: Option<String>,
    /// Seconds since the Unix epoch of this replica's last successful acquire or renewal.
    pub last_renew_unix: Option<u64>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
}

/// The running side of an election, as the handle needs it. Dropping the last handle drops the
/// election, which then stops (without releasing what it holds, like a crash).
pub trait Election: Send + Sync + 'static {
    /// Clean shutdown: step down, then hand over at once.
    fn release(&self) -> BoxFuture<'_, ()>;
    /// Stop like a crash: step down now, hand nothing over.
    fn abandon(&self);
}

/// "Am I leader", shared by every part of the controller that writes. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    is_leader: watch::Receiver<bool>,
    status: watch::Receiver<LeaderStatus>,
    election: Option<Arc<dyn Election>>,
    /// Without election: the senders, kept so the receivers never report "closed".
    _fixed: Option<Arc<(watch::Sender<bool>, watch::Sender<LeaderStatus>)>>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// No election: this replica is always the leader (one controller, or no Kubernetes).
    pub fn always(identity: impl Into<String>) -> Self {
        let (leader_tx, is_leader) = watch::channel(true);
        let (status_tx, status) = watch::channel(LeaderStatus {
            elect: false,
            leader: true,
            identity: identity.into(),
            ..LeaderStatus::default()
        });
        Self {
            is_leader,
            status,
            election: None,
            _fixed: Some(Arc::new((leader_tx, status_tx))),
        }
    }

    /// The handle of a running election: its answer, its status and its shutdown.
    pub fn elected(
        is_leader: watch::Receiver<bool>,
        status: watch::Receiver<LeaderStatus>,
        election: Arc<dyn Election>,
    ) -> Self {
        Self {
            is_leader,
            status,
            election: Some(election),
            _fixed: None,
        }
    }

    /// `true` while this replica may write. Watch it with `changed()`.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    /// The election's state for people.
    pub fn status(&self) -> watch::Receiver<LeaderStatus> {
        self.status.clone()
    }

    /// Clean shutdown: step down, then hand over so another replica takes over at once. Nothing
    /// to do without election.
    pub async fn release(&self) {
        if let Some(election) = &self.election {
            election.release().await;
        }
    }

    /// Stops without handing over, like a crash: another replica takes over once what this one
    /// held expires. This replica stops being leader at once.
    pub fn abandon(&self) {
        if let Some(election) = &self.election {
            election.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_election_this_replica_always_leads_and_release_is_harmless() {
        let leadership = Leadership::always("solo");
        assert!(*leadership.is_leader().borrow());
        let status = leadership.status().borrow().clone();
        assert!(status.leader && !status.elect);
        assert_eq!(status.identity, "solo");
        leadership.release().await;
        leadership.abandon();
        assert!(*leadership.is_leader().borrow());
        // The senders live as long as the handle: a writer never sees a closed channel.
        let rx = leadership.is_leader();
        assert!(rx.has_changed().is_ok());
    }

    #[test]
    fn the_default_identity_names_this_process() {
        assert!(
            default_identity().ends_with(&format!("-{}", std::process::id())),
            "{}",
            default_identity()
        );
        let mut options = LeaderOptions::new("ns", "lease");
        options.lease_duration = Duration::from_millis(300);
        assert_eq!(options.lease_seconds(), 1, "at least one second");
    }
}
