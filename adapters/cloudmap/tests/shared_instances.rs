//! The conformance mesh's Cloud Map layout against moto_server: one pod registered under the
//! same instance id in two services (the root `app-svc` holds the b and c pods, `app-b` and
//! `app-c` one each), every pod on its own address and all on one port, watched side by side
//! through the version-subset wrapper the controller uses.
//!
//! A flaky conformance run was first read as Cloud Map endpoint sets flapping or being mixed up
//! between such services; this pins down that the adapter keeps each service's set to its own
//! instances, every poll and every periodic re-fetch, and sends nothing while nothing changes.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use trellis_adapter_cloudmap::CloudMap;
use trellis_discovery::{DiscoveryError, ServiceKey, Snapshot};
use trellis_discovery_suite::{TestInstance, TestRegistry};

use common::{MotoRegistry, NAMESPACE};

const PORT: u16 = 35171;

fn pod(id: &str, last: u8, version: &str) -> TestInstance {
    let mut i = TestInstance::new(id, Ipv4Addr::new(127, 0, 30, last), PORT);
    i.service_account = Some(format!("service-{version}"));
    i.labels = BTreeMap::from([("version".to_string(), version.to_string())]);
    i
}

/// (address, identity service account, version label) of every endpoint, sorted.
fn members(snapshot: &Snapshot) -> Vec<(String, String, String)> {
    let Snapshot::Endpoints(set) = snapshot else {
        panic!("want endpoints, got {snapshot:?}")
    };
    let mut out: Vec<_> = set
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.identity.service_account.clone(),
                e.labels.get("version").cloned().unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

fn member(last: u8, version: &str) -> (String, String, String) {
    (
        format!("127.0.30.{last}"),
        format!("service-{version}"),
        version.to_string(),
    )
}

type Watch = BoxStream<'static, Result<Snapshot, DiscoveryError>>;

async fn first(name: &str, watch: &mut Watch) -> Snapshot {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap_or_else(|_| panic!("{name}: a first snapshot within 10 s"))
        .expect("watch streams never end")
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[tokio::test]
async fn services_sharing_instance_ids_keep_their_own_endpoints_across_polls_and_refreshes() {
    let registry = MotoRegistry::start().await;
    let (b, c) = (pod("app-b-0", 2, "b"), pod("app-c-0", 3, "c"));
    registry
        .put_service("app-svc", &[b.clone(), c.clone()])
        .await
        .unwrap();
    registry.put_service("app-b", &[b]).await.unwrap();
    registry.put_service("app-c", &[c]).await.unwrap();

    // What the controller builds: the adapter behind the version-subset convention.
    let discovery =
        CloudMap::with_client(registry.client().clone(), registry.options().clone()).unwrap();
    let expected = [
        ("app-svc", vec![member(2, "b"), member(3, "c")]),
        ("app-b", vec![member(2, "b")]),
        ("app-c", vec![member(3, "c")]),
    ];
    let mut watches: Vec<(&str, Watch)> = expected
        .iter()
        .map(|(name, _)| {
            use trellis_discovery::Discovery;
            (*name, discovery.watch(ServiceKey::new(NAMESPACE, *name)))
        })
        .collect();
    for ((name, watch), (_, want)) in watches.iter_mut().zip(&expected) {
        assert_eq!(members(&first(name, watch).await), *want, "{name}");
    }

    // 100 ms polls and a 1 s full refresh (test options): 2.5 s is ~25 revision checks and two
    // refreshes per watch, all running side by side. Nothing changed, so nothing may be sent.
    let quiet = futures::stream::select_all(
        watches
            .into_iter()
            .map(|(name, watch)| watch.map(move |item| (name, item))),
    );
    let sent: Vec<_> = quiet
        .take_until(tokio::time::sleep(Duration::from_millis(2500)))
        .collect()
        .await;
    assert!(
        sent.is_empty(),
        "unchanged services sent again (a flapping or mixed-up set): {sent:?}"
    );
}
