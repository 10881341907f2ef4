//! Churn benchmark: time from a Consul change to the adapter's snapshot that reflects it (p50/p99
//! over 1,000 changes) and the adapter's memory with 10,000 endpoints, each next to a baseline
//! measured in the same run against the same in-process Consul double:
//! - latency baseline: the raw blocking query round trip (a plain HTTP client holds
//!   `/v1/health/service/:name?index=N`, a registration is written, the query returns);
//! - memory baseline: the size of the raw JSON Consul sends for those 10,000 instances.
//!
//! Run: `cargo bench -p trellis-adapter-consul --bench churn` (CHURN_CHANGES / MEMORY_ENDPOINTS
//! override the counts).

#[path = "../tests/support/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_adapter_consul::RateLimit;
use trellis_consul_double::wire::{RegisterRequest, ServiceDefinition};
use trellis_discovery_suite::{LatencyStats, churn, memory};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn registration(port: u16) -> RegisterRequest {
    RegisterRequest {
        node: "baseline-node".into(),
        address: "10.9.0.1".into(),
        service: Some(ServiceDefinition {
            id: "baseline-1".into(),
            service: "baseline".into(),
            port,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes = env_count("CHURN_CHANGES", 1000);
    let endpoints = env_count("MEMORY_ENDPOINTS", 10_000);

    // --- latency ---
    let mut registry = harness::double_harness().await;
    // Sequential changes as fast as the adapter delivers them would be rate-limited to one query
    // per interval (100 ms by default, by design); measure delivery with the limiter relaxed.
    registry.rate_limit = Some(RateLimit {
        burst: 2,
        interval: Duration::from_millis(1),
    });
    let double = registry
        .double()
        .expect("the bench runs against the double");

    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let base = double.http_addr();
    double.register(&registration(1)).unwrap();
    let index_url = format!("{base}/v1/health/service/baseline");
    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let first = http.get(index_url.parse().unwrap()).await.unwrap();
        let index: u64 = first.headers()["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        first.into_body().collect().await.unwrap();
        let blocked = http.get(
            format!("{index_url}?index={index}&wait=30s")
                .parse()
                .unwrap(),
        );
        let pending = tokio::spawn(async move {
            let r = blocked.await.unwrap();
            r.into_body().collect().await.unwrap()
        });
        // Give the query time to reach the double and block, then time write -> answer.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let start = Instant::now();
        double
            .register(&registration(2 + (i % 60_000) as u16))
            .unwrap();
        pending.await.unwrap();
        samples.push(start.elapsed());
    }
    let baseline = LatencyStats::from_samples(samples);

    println!("consul churn: {changes} changes, adapter rate limit relaxed to burst 2 / 1 ms");
    let report = churn(&registry, changes).await;
    report.print("consul", "raw blocking query: write -> answer", &baseline);

    // The default rate limit under back-to-back churn: the limiter, not Consul, sets the pace.
    let mut limited = harness::double_harness().await;
    limited.rate_limit = None;
    let default_changes = changes.min(50);
    let limited_report = churn(&limited, default_changes).await;
    println!(
        "  with the default rate limit (burst 2, then 1 query / 100 ms), {default_changes} back-to-back changes: {}",
        limited_report.change_to_snapshot
    );

    // --- memory ---
    let mem_registry = harness::double_harness().await;
    let report = memory(&mem_registry, endpoints).await;
    let raw = http
        .get(
            format!("{}/v1/health/service/memory-web", mem_registry.address)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len();
    report.print("consul", "raw JSON of /v1/health/service", raw);
}
