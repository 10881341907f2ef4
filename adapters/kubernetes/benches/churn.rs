//! Churn and memory benchmark of the Kubernetes adapter on the fake API server.
//!
//! Prints (1) the time from a registry change (the harness's writes through a kube client) to the
//! watch yielding the snapshot that reflects it, p50/p99 over 1,000 changes, next to a baseline
//! measured in the same run: the raw round trip of one PUT and its watch event on the same fake
//! server through a plain hyper client (no kube, no reflector); (2) the adapter's own share: one
//! EndpointSlice PUT through that plain client to the snapshot showing it (the suite's "change"
//! is several harness API calls); and (3) the adapter's memory with 10,000 endpoints next to the
//! size of the JSON the API server sends for them.
//!
//! Run: `cargo bench -p trellis-adapter-kubernetes --bench churn` (`CHURN_CHANGES` and
//! `CHURN_ENDPOINTS` override 1,000 and 10,000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use trellis_discovery::{Discovery, ServiceKey, Snapshot};
use trellis_discovery_suite::{LatencyStats, TestInstance, TestRegistry};

type Http = Client<HttpConnector, Full<Bytes>>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(method: &str, url: &str, body: serde_json::Value) -> hyper::Request<Full<Bytes>> {
    hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request")
}

/// Reads watch lines until one contains `needle`.
async fn read_until(body: &mut Incoming, buf: &mut Vec<u8>, needle: &str) {
    loop {
        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if std::str::from_utf8(&line).is_ok_and(|l| l.contains(needle)) {
                return;
            }
            continue;
        }
        let frame = body
            .frame()
            .await
            .expect("the watch stream ended")
            .expect("watch stream error");
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

/// One PUT of a ConfigMap and the MODIFIED event on an open raw watch, `n` times.
async fn raw_round_trip(base: &str, n: usize) -> LatencyStats {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let objects = format!("{base}/api/v1/namespaces/baseline/configmaps");
    let object = |i: usize| json!({"metadata": {"name": "probe", "namespace": "baseline"}, "data": {"i": i.to_string()}});
    let created = http
        .request(request("POST", &objects, object(0)))
        .await
        .expect("create the probe");
    assert!(created.status().is_success(), "{}", created.status());
    let watch = http
        .request(request(
            "GET",
            &format!("{objects}?watch=true&resourceVersion=0"),
            json!(null),
        ))
        .await
        .expect("open a raw watch");
    let mut body = watch.into_body();
    let mut buf = Vec::new();
    read_until(&mut body, &mut buf, "\"ADDED\"").await;
    // Timed by hand: each sample reads the one watch stream, which a `time_baseline` closure
    // could not borrow mutably across iterations.
    let mut samples = Vec::with_capacity(n);
    for i in 1..=n {
        let start = Instant::now();
        let put = request("PUT", &format!("{objects}/probe"), object(i));
        let resp = http.request(put).await.expect("PUT the probe");
        assert!(resp.status().is_success(), "{}", resp.status());
        read_until(&mut body, &mut buf, "\"MODIFIED\"").await;
        samples.push(start.elapsed());
    }
    LatencyStats::from_samples(samples)
}

/// The adapter's own share: one EndpointSlice PUT through the plain client, timed to the watch
/// yielding the snapshot with the new port (comparable with the raw baseline: one PUT, one event).
async fn slice_put_to_snapshot(harness: &common::KubeHarness, n: usize) -> LatencyStats {
    let base = harness.fake.as_ref().expect("fake").url();
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let service = "direct-web";
    let instance = |i: usize| {
        TestInstance::new(
            "direct-1",
            Ipv4Addr::new(10, 9, 0, 1),
            10_000 + (i % 50_000) as u16,
        )
    };
    harness
        .put_service(service, &[instance(0)])
        .await
        .expect("register the service");
    let adapter = harness.adapter();
    let mut watch = adapter.watch(ServiceKey::new(&harness.namespace, service));
    let mut samples = Vec::with_capacity(n);
    for i in 0..=n {
        let want = instance(i).port;
        let start = Instant::now();
        if i > 0 {
            let slice = harness.slices_for(service, &[instance(i)]).remove(0);
            let name = slice.metadata.name.clone().expect("named slice");
            let url = format!(
                "{base}/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices/{name}",
                harness.namespace
            );
            let body = serde_json::to_value(&slice).expect("slice json");
            let resp = http
                .request(request("PUT", &url, body))
                .await
                .expect("PUT the slice");
            assert!(resp.status().is_success(), "{}", resp.status());
        }
        loop {
            let item = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
                .await
                .expect("a snapshot within 5 s")
                .expect("the watch never ends");
            if let Ok(Snapshot::Endpoints(set)) = item
                && set
                    .endpoints
                    .iter()
                    .any(|e| e.ports.iter().any(|p| p.port == want))
            {
                break;
            }
        }
        if i > 0 {
            samples.push(start.elapsed());
        }
    }
    LatencyStats::from_samples(samples)
}

/// Bytes of the JSON the API server sends for the service's pods and slices (a LIST of each).
async fn raw_json_bytes(base: &str, namespace: &str, service: &str) -> usize {
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let mut total = 0;
    for path in [
        format!(
            "/api/v1/namespaces/{namespace}/pods?labelSelector={}%3D{service}",
            common::SERVICE_LABEL
        ),
        format!(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
        ),
    ] {
        let resp = http
            .request(request("GET", &format!("{base}{path}"), json!(null)))
            .await
            .expect("list");
        total += resp
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len();
    }
    total
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes = env_or("CHURN_CHANGES", 1000);
    let endpoints = env_or("CHURN_ENDPOINTS", 10_000);

    let harness = common::fake_harness().await;
    let base = harness.fake.as_ref().expect("fake").url();
    let baseline = raw_round_trip(&base, changes).await;
    let report = trellis_discovery_suite::churn(&harness, changes).await;
    report.print(
        "kubernetes (fake API server)",
        "raw PUT + watch event, plain HTTP",
        &baseline,
    );

    let direct = slice_put_to_snapshot(&harness, changes).await;
    println!("  one slice PUT -> snapshot (plain HTTP write, the adapter's own share): {direct}");
    println!(
        "  ratio to baseline  : p50 x{:.2}  p99 x{:.2}",
        direct.p50.as_secs_f64() / baseline.p50.as_secs_f64(),
        direct.p99.as_secs_f64() / baseline.p99.as_secs_f64()
    );

    let harness = common::fake_harness().await;
    let base = harness.fake.as_ref().expect("fake").url();
    let memory = trellis_discovery_suite::memory(&harness, endpoints).await;
    let raw = raw_json_bytes(&base, &harness.namespace, "memory-web").await;
    memory.print(
        "kubernetes (fake API server)",
        "API server JSON for those pods + slices",
        raw,
    );
    // The fake API server runs in this process: the RSS delta also holds its work answering the
    // adapter's lists (response buffers), so it is an upper bound on the adapter's own memory.
    println!("  (RSS delta includes the in-process fake server answering the adapter's lists)");
}
