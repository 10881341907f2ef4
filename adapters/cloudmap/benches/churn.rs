//! Churn benchmark of the Cloud Map adapter against moto_server (a program, not a test):
//!
//! 1. change -> snapshot: 1,000 changes to one service (each moves its instance to a new port:
//!    DeregisterInstance + RegisterInstance), each timed from the start of the write to the watch
//!    yielding the snapshot with the new port. The poll interval is **100 ms** here (default 1 s),
//!    so expect p50 ~ write + half a poll, p99 ~ write + one poll. The refresh interval is 30 s, so
//!    every change is found by the DiscoverInstancesRevision check, not by the periodic re-fetch.
//!    Baseline in the same run: a raw DiscoverInstances round trip through the same SDK client.
//! 2. memory with 10,000 endpoints: 10 services of 1,000 instances (DiscoverInstances returns at
//!    most 1,000 per service, Cloud Map's default per-service quota), all watched by one fresh
//!    adapter; the process RSS growth while the watches fill, and the snapshots' own size.
//!    Baseline: the heap the SDK's raw DiscoverInstances answers for the same instances hold.
//!
//! Run: `cargo bench -p trellis-adapter-cloudmap --bench churn` (needs moto: run `scripts/test`
//! once, or set TRELLIS_MOTO_SERVER). Optional arguments: `CHANGES SERVICES PER_SERVICE`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::mem::size_of;
use std::time::{Duration, Instant};

use aws_sdk_servicediscovery::types::{HealthStatusFilter, HttpInstanceSummary};
use futures::StreamExt;
use trellis_adapter_cloudmap::CloudMap;
use trellis_discovery::{Discovery, ServiceKey, Snapshot};
use trellis_discovery_suite::{
    MemoryReport, TestInstance, TestRegistry, churn, rss_bytes, snapshot_heap_bytes, time_baseline,
};

use common::{MotoRegistry, NAMESPACE};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes = arg(0, 1000);
    let services = arg(1, 10);
    let per_service = arg(2, 1000);

    let registry = MotoRegistry::start_with(|o| {
        o.poll_interval = Duration::from_millis(100);
        o.refresh_interval = Duration::from_secs(30);
    })
    .await;
    println!(
        "cloudmap churn benchmark against moto_server {} (poll 100 ms, refresh 30 s)",
        registry.url()
    );

    // --- change -> snapshot, next to a raw DiscoverInstances round trip ---
    registry
        .put_service(
            "baseline-web",
            &[TestInstance::new("b-1", [10, 8, 0, 1].into(), 80)],
        )
        .await
        .expect("registering the baseline service");
    let client = registry.client().clone();
    let baseline = time_baseline(changes, |_| {
        let client = client.clone();
        async move {
            client
                .discover_instances()
                .namespace_name(NAMESPACE)
                .service_name("baseline-web")
                .health_status(HealthStatusFilter::All)
                .send()
                .await
                .expect("DiscoverInstances");
        }
    })
    .await;
    let report = churn(&registry, changes).await;
    report.print(
        "cloudmap, poll 100 ms",
        "raw DiscoverInstances round trip",
        &baseline,
    );

    // --- memory with services x per_service endpoints ---
    let total = services * per_service;
    let registering = Instant::now();
    for s in 0..services {
        let instances: Vec<TestInstance> = (0..per_service)
            .map(|i| {
                let n = (s * per_service + i) as u32;
                TestInstance::new(format!("m{s}-{i}"), (0x0A40_0000 + n).into(), 8080)
            })
            .collect();
        registry
            .put_service(&format!("memory-{s}"), &instances)
            .await
            .expect("registering the memory services");
    }
    println!(
        "registered {total} instances in moto in {:.1?} ({:.0}/s)",
        registering.elapsed(),
        total as f64 / registering.elapsed().as_secs_f64()
    );

    // Baseline: the SDK's own answers for the same instances.
    let mut raw: Vec<HttpInstanceSummary> = Vec::with_capacity(total);
    for s in 0..services {
        let out = client
            .discover_instances()
            .namespace_name(NAMESPACE)
            .service_name(format!("memory-{s}"))
            .health_status(HealthStatusFilter::All)
            .max_results(1000)
            .send()
            .await
            .expect("DiscoverInstances");
        raw.extend(out.instances.unwrap_or_default());
    }
    let raw_bytes: usize = raw.iter().map(summary_heap_bytes).sum();

    let before = rss_bytes();
    let fetching = Instant::now();
    let discovery =
        CloudMap::with_client(client.clone(), registry.options().clone()).expect("valid options");
    let mut watches: Vec<_> = (0..services)
        .map(|s| discovery.watch(ServiceKey::new(NAMESPACE, format!("memory-{s}"))))
        .collect();
    let mut snapshots = Vec::with_capacity(services);
    for (s, watch) in watches.iter_mut().enumerate() {
        loop {
            match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
                Ok(Some(Ok(snapshot @ Snapshot::Endpoints(_)))) => {
                    let Snapshot::Endpoints(set) = &snapshot else {
                        unreachable!()
                    };
                    assert_eq!(set.endpoints.len(), per_service, "memory-{s}");
                    snapshots.push(snapshot);
                    break;
                }
                Ok(Some(other)) => eprintln!("memory-{s}: {other:?}"),
                Ok(None) => panic!("memory-{s}: the watch ended"),
                Err(_) => panic!("memory-{s}: no snapshot within 30 s"),
            }
        }
    }
    let after = rss_bytes();
    println!(
        "{services} watches filled with {total} endpoints in {:.1?}",
        fetching.elapsed()
    );
    MemoryReport {
        endpoints: total,
        rss_delta_bytes: before.zip(after).map(|(b, a)| a as i64 - b as i64),
        snapshot_bytes: snapshots.iter().map(snapshot_heap_bytes).sum(),
    }
    .print(
        "cloudmap",
        "raw DiscoverInstances answers (SDK structs)",
        raw_bytes,
    );
    drop(watches);
}

/// The heap one SDK instance summary holds: its struct, strings and attribute map entries.
fn summary_heap_bytes(s: &HttpInstanceSummary) -> usize {
    let strings = [&s.instance_id, &s.namespace_name, &s.service_name]
        .iter()
        .map(|o| o.as_ref().map_or(0, String::capacity))
        .sum::<usize>();
    let attributes = s.attributes.as_ref().map_or(0, |a| {
        a.iter()
            .map(|(k, v)| k.capacity() + v.capacity() + size_of::<(String, String)>())
            .sum::<usize>()
    });
    size_of::<HttpInstanceSummary>() + strings + attributes
}
