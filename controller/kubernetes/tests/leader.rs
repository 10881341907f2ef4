//! Lease-based leader election against the fake API server (real HTTP, real optimistic
//! concurrency): exactly one of two electors leads, a leader that stops renewing is replaced
//! after the lease expires (not before), a released Lease is taken at once, a stale write loses,
//! and a leader that cannot reach the API server steps down promptly.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use trellis_controller_kubernetes::leader::{LeaderOptions, Leadership};
use trellis_kube_fake::FakeApiServer;
use trellis_testing::kube_client;

const NAMESPACE: &str = "trellis-system";
const LEASE: &str = "trellis-controller";
/// Short timings so the tests take seconds: a 2 s lease renewed every 200 ms.
const LEASE_DURATION: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(200);

fn elector(server: &FakeApiServer, identity: &str) -> Leadership {
    let mut options = LeaderOptions::new(NAMESPACE, LEASE);
    options.identity = identity.into();
    options.lease_duration = LEASE_DURATION;
    options.retry_period = RETRY;
    trellis_controller_kubernetes::leader::elect(kube_client(server), options)
}

/// Waits (at most `limit`) until `leadership` says `wanted`; returns how long it took.
async fn wait_leader(leadership: &Leadership, wanted: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut rx = leadership.is_leader();
    tokio::time::timeout(limit, rx.wait_for(|l| *l == wanted))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{:?} did not become leader={wanted} within {limit:?}",
                leadership.status().borrow()
            )
        })
        .expect("the election channel closed");
    start.elapsed()
}

async fn holder(server: &FakeApiServer) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(kube_client(server), NAMESPACE);
    leases
        .get(LEASE)
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
}

/// Samples both electors every 10 ms for `span`; panics if both ever lead at once.
async fn never_both(a: &Leadership, b: &Leadership, span: Duration) {
    let (a_rx, b_rx) = (a.is_leader(), b.is_leader());
    let end = Instant::now() + span;
    while Instant::now() < end {
        assert!(
            !(*a_rx.borrow() && *b_rx.borrow()),
            "both electors lead at once"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn of_two_electors_exactly_one_leads() {
    let server = FakeApiServer::start().await.unwrap();
    let a = elector(&server, "replica-a");
    let b = elector(&server, "replica-b");
    let limit = Duration::from_secs(5);
    tokio::time::timeout(limit, async {
        let (mut a_rx, mut b_rx) = (a.is_leader(), b.is_leader());
        while !*a_rx.borrow() && !*b_rx.borrow() {
            tokio::select! {
                _ = a_rx.changed() => {}
                _ = b_rx.changed() => {}
            }
        }
    })
    .await
    .expect("one elector leads within 5 s");
    // Several renewals later: still exactly one, and it is the Lease's holder.
    never_both(&a, &b, Duration::from_secs(1)).await;
    let (leader, follower) = if *a.is_leader().borrow() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(*leader.is_leader().borrow() && !*follower.is_leader().borrow());
    let leader_id = leader.status().borrow().identity.clone();
    assert_eq!(holder(&server).await.as_deref(), Some(leader_id.as_str()));
    let follower_status = follower.status().borrow().clone();
    assert!(follower_status.elect && !follower_status.leader);
    assert_eq!(follower_status.holder.as_deref(), Some(leader_id.as_str()));
    assert_eq!(follower_status.lease, format!("{NAMESPACE}/{LEASE}"));
}

#[tokio::test]
async fn a_leader_that_stops_renewing_is_replaced_after_the_lease_expires() {
    let server = FakeApiServer::start().await.unwrap();
    let a = elector(&server, "replica-a");
    wait_leader(&a, true, Duration::from_secs(5)).await;
    let b = elector(&server, "replica-b");
    // b has seen a renew for a while: it follows.
    never_both(&a, &b, Duration::from_millis(600)).await;
    assert!(!*b.is_leader().borrow());

    // a crashes: no more renewals, no release.
    a.abandon();
    assert!(
        !*a.is_leader().borrow(),
        "an abandoned elector stops leading at once"
    );
    let took = wait_leader(&b, true, LEASE_DURATION * 3).await;
    // a's last renewal was at most one retry period before the crash, so b must have waited
    // about a lease duration (never less than the lease minus that period).
    assert!(
        took >= LEASE_DURATION - RETRY * 2,
        "b took over after {took:?}, before the {LEASE_DURATION:?} lease could expire"
    );
    assert_eq!(holder(&server).await.as_deref(), Some("replica-b"));
    let leases: Api<Lease> = Api::namespaced(kube_client(&server), NAMESPACE);
    let spec = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(spec.lease_duration_seconds, Some(2));
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let server = FakeApiServer::start().await.unwrap();
    let a = elector(&server, "replica-a");
    wait_leader(&a, true, Duration::from_secs(5)).await;
    let b = elector(&server, "replica-b");
    tokio::time::sleep(RETRY * 2).await;
    a.release().await;
    assert!(!*a.is_leader().borrow());
    let took = wait_leader(&b, true, LEASE_DURATION).await;
    assert!(
        took < LEASE_DURATION,
        "a released Lease must not wait for expiry ({took:?})"
    );
    assert_eq!(holder(&server).await.as_deref(), Some("replica-b"));
}

#[tokio::test]
async fn a_write_with_a_stale_resource_version_loses() {
    let server = FakeApiServer::start().await.unwrap();
    let a = elector(&server, "replica-a");
    wait_leader(&a, true, Duration::from_secs(5)).await;
    let leases: Api<Lease> = Api::namespaced(kube_client(&server), NAMESPACE);
    let read = leases.get(LEASE).await.unwrap();
    let read_version = read.metadata.resource_version.clone();
    // Wait for a's next renewal: what we read is now stale.
    tokio::time::timeout(Duration::from_secs(5), async {
        while leases.get(LEASE).await.unwrap().metadata.resource_version == read_version {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the leader renews");
    let mut intruder = read;
    intruder.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    let error = leases
        .replace(LEASE, &PostParams::default(), &intruder)
        .await
        .unwrap_err();
    assert!(
        matches!(error, kube::Error::Api(ref s) if s.code == 409),
        "{error:?}"
    );
    tokio::time::sleep(RETRY * 2).await;
    assert!(*a.is_leader().borrow(), "the leader keeps leading");
    assert_eq!(holder(&server).await.as_deref(), Some("replica-a"));
}

#[tokio::test]
async fn a_leader_without_the_api_server_steps_down_promptly_and_comes_back() {
    let server = FakeApiServer::start().await.unwrap();
    let a = elector(&server, "replica-a");
    wait_leader(&a, true, Duration::from_secs(5)).await;
    server.begin_outage();
    // One failed renewal is enough: well within the lease duration.
    let took = wait_leader(&a, false, LEASE_DURATION).await;
    assert!(took < LEASE_DURATION, "stepped down after {took:?}");
    let status = a.status().borrow().clone();
    assert!(status.last_error.is_some(), "{status:?}");
    server.end_outage().await.unwrap();
    // Still the holder: it renews its own Lease at once.
    wait_leader(&a, true, Duration::from_secs(5)).await;
    assert_eq!(a.status().borrow().last_error, None);
}

#[tokio::test]
async fn without_election_a_replica_always_leads() {
    let leadership = Leadership::always("solo");
    assert!(*leadership.is_leader().borrow());
    let status = leadership.status().borrow().clone();
    assert!(!status.elect && status.leader);
    assert_eq!(status.identity, "solo");
    // release and abandon are no-ops without an election.
    leadership.release().await;
    assert!(*leadership.is_leader().borrow());
}
