//! The SMI TrafficMetrics API (`metrics.smi-spec.io/v1alpha1`) served by `trellis controller
//! --prometheus` on its admin port, read from a real Prometheus scraping real proxies.
//!
//! The mesh (the pieces of `flagger_metrics.rs`, on the file platform): a canary
//! (`Deployment/podinfo`) and its primary (`Deployment/podinfo-primary`), each an echo app behind
//! its inbound proxy, and a meshed caller (`Deployment/loadtester`) whose proxy sends everything
//! for `podinfo` to the canary. Prometheus scrapes the three proxies with the target labels the
//! shipped scrape configuration gives pods (`kubernetes_namespace`, `kubernetes_pod`).
//!
//! Known traffic, sent once, after Prometheus has a baseline of every series: ROUNDS rounds of
//! 20 requests through the caller to the canary (2 answered 500, 1 delayed by 60 ms) and 20
//! fast 200s straight to the primary. Then, with `?window=1m` covering all of it, the API must
//! answer: the deployment `podinfo` (18 successes and 2 failures per round, p99 in the latency
//! bucket holding 60 ms (50..100 ms), p50 under 5 ms), the deployment list of the namespace, the
//! namespace list, the canary's pod, and the caller's edges (to the canary's backend Service,
//! as callers' proxies name it on the file platform) and its pod's edges.
//!
//! Counts: Prometheus's `increase()` extrapolates a little past the first and last samples
//! (at most about 1.6 s of a ~17 s sampled span here; 10% was seen), so a count is between what was sent and
//! 15% more; the failure share is exact up to that rounding.
//!
//! Skipped, with the reason, when Prometheus is not installed (`scripts/test` installs Debian's
//! package when it can).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use trellis_conformance::canary::{
    Caller, Controller, NAMESPACE, SplitVersion, podinfo_pair, send_direct, wait_canary_only,
};
use trellis_conformance::prometheus::{self, Labels, Prometheus};
use trellis_echo::plain as http;

const PREFIX: &str = "/apis/metrics.smi-spec.io/v1alpha1";
const ROUNDS: u32 = 10;
const CANARY_POD: &str = "podinfo-6d9f7c8b4-canry";
const PRIMARY_POD: &str = "podinfo-primary-5b8d6f7c9-prim1";
const CALLER_POD: &str = "loadtester-7c6b9d5f4-load1";

fn pod_labels(pod: &str) -> Labels {
    [
        ("kubernetes_namespace".to_owned(), NAMESPACE.to_owned()),
        ("kubernetes_pod".to_owned(), pod.to_owned()),
    ]
    .into()
}

/// `GET path` on the controller's admin port: status and JSON.
async fn get(controller: &Controller, path: &str) -> anyhow::Result<(u16, Value)> {
    let reply = http::request(controller.admin, http::Method::GET, path, None).await?;
    let body = serde_json::from_slice(&reply.body)
        .with_context(|| format!("GET {path}: {} {}", reply.status, reply.text()))?;
    Ok((reply.status, body))
}

/// A TrafficMetrics object's metrics by name (values as text).
fn metrics(object: &Value) -> BTreeMap<String, String> {
    object["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A count metric, within what `increase()` may add to what was sent.
fn count(object: &Value, name: &str, sent: u32) -> anyhow::Result<u32> {
    let all = metrics(object);
    let value: u32 = all
        .get(name)
        .with_context(|| format!("no {name}: {object}"))?
        .parse()
        .with_context(|| format!("{name} is not a whole number: {object}"))?;
    let low = sent.saturating_sub(1);
    let high = (f64::from(sent) * 1.15).ceil() as u32 + 1;
    ensure!(
        (low..=high).contains(&value),
        "{name} {value}, sent {sent} (allowed {low}..={high}): {object}"
    );
    Ok(value)
}

/// A latency metric in ms (`12`, `12500m`).
fn latency(object: &Value, name: &str) -> anyhow::Result<f64> {
    let text = metrics(object)
        .remove(name)
        .with_context(|| format!("no {name}: {object}"))?;
    Ok(match text.strip_suffix('m') {
        Some(thousandths) => thousandths.parse::<f64>()? / 1000.0,
        None => text.parse()?,
    })
}

/// The canary's own numbers (the deployment or its one pod): ROUNDS x (18 ok, 2 failed, one
/// of 20 slow).
fn check_canary(object: &Value) -> anyhow::Result<()> {
    ensure!(
        object["kind"] == "TrafficMetrics"
            && object["apiVersion"] == "metrics.smi-spec.io/v1alpha1",
        "{object}"
    );
    ensure!(object["window"] == "60s", "window: {object}");
    let success = count(object, "success_count", 18 * ROUNDS)?;
    let failure = count(object, "failure_count", 2 * ROUNDS)?;
    let share = f64::from(failure) / f64::from(success + failure);
    ensure!(
        (0.09..=0.11).contains(&share),
        "failure share {share}: {object}"
    );
    let p99 = latency(object, "p99_response_latency")?;
    ensure!((50.0..=100.0).contains(&p99), "p99 {p99} ms: {object}");
    let p50 = latency(object, "p50_response_latency")?;
    ensure!(p50 < 5.0, "p50 {p50} ms: {object}");
    ensure!(
        metrics(object).contains_key("p90_response_latency"),
        "{object}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_metrics_api_answers_from_a_real_prometheus() -> anyhow::Result<()> {
    let Some(exe) = prometheus::binary() else {
        println!(
            "skipped: no prometheus binary (TRELLIS_PROMETHEUS or `prometheus` on PATH; scripts/test installs Debian's package)"
        );
        return Ok(());
    };
    let scratch = tempfile::tempdir()?;
    let log_dir = scratch.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    // Prometheus first: the controller is told where it is.
    let prometheus = Prometheus::start_labelled(&exe, &[], &log_dir).await?;
    let controller = Controller::start_with(
        scratch.path(),
        &log_dir,
        &["--prometheus".into(), format!("http://{}", prometheus.addr)],
    )
    .await?;
    let (canary, primary) = podinfo_pair(&controller, &log_dir).await?;
    controller.services(&[&primary], &[&canary])?;
    controller.split(SplitVersion::V1alpha3, 100)?;
    let caller = Caller::start(controller.grpc, &log_dir).await?;
    wait_canary_only(&caller).await?;
    // One round creates every series (a 500 and a slow one included) before the first scrape.
    let round = || async {
        for (path, n) in [
            ("/api", 8),
            ("/api?status=500", 1),
            ("/api", 9),
            ("/api?status=500", 1),
            ("/api?delay_ms=60", 1),
        ] {
            let r = caller.batch("podinfo", path, n).await?;
            ensure!(r.failed == 0, "{path}: {r:?}");
        }
        send_direct(&primary, "/api", 20).await?;
        anyhow::Ok(())
    };
    round().await?;

    // Nothing scraped yet: an object has no series (404), discovery answers anyway.
    let (status, body) = get(
        &controller,
        &format!("{PREFIX}/namespaces/{NAMESPACE}/deployments/podinfo"),
    )
    .await?;
    ensure!(
        status == 404 && body["reason"] == "NotFound",
        "{status} {body}"
    );
    let (status, body) = get(&controller, PREFIX).await?;
    ensure!(
        status == 200 && body["kind"] == "APIResourceList",
        "{status} {body}"
    );

    prometheus.set_labelled_targets(&[
        (canary.admin, pod_labels(CANARY_POD)),
        (primary.admin, pod_labels(PRIMARY_POD)),
        (caller.admin, pod_labels(CALLER_POD)),
    ])?;
    prometheus.wait_up(3).await?;
    // A baseline of a few samples before the traffic under test.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..ROUNDS {
        round().await?;
    }
    // Every counter scraped after the last request, and a sampled span long enough that
    // increase()'s extrapolation stays small.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let window = "?window=1m";
    let mut seen = Vec::new();

    let path = format!("{PREFIX}/namespaces/{NAMESPACE}/deployments/podinfo{window}");
    let (status, deployment) = get(&controller, &path).await?;
    ensure!(status == 200, "{path}: {status} {deployment}");
    check_canary(&deployment).with_context(|| path.clone())?;
    ensure!(
        deployment["resource"]["kind"] == "Deployment"
            && deployment["resource"]["name"] == "podinfo"
            && deployment["resource"]["namespace"] == NAMESPACE,
        "{deployment}"
    );
    seen.push(format!("{path}: {:?}", metrics(&deployment)));

    let path = format!("{PREFIX}/namespaces/{NAMESPACE}/pods/{CANARY_POD}{window}");
    let (status, pod) = get(&controller, &path).await?;
    ensure!(status == 200, "{path}: {status} {pod}");
    check_canary(&pod).with_context(|| path.clone())?;
    ensure!(
        pod["resource"]["kind"] == "Pod" && pod["resource"]["name"] == CANARY_POD,
        "{pod}"
    );
    seen.push(format!("{path}: {:?}", metrics(&pod)));

    // The namespace's deployments: the canary and the primary (the caller answers nothing).
    let path = format!("{PREFIX}/namespaces/{NAMESPACE}/deployments{window}");
    let (status, list) = get(&controller, &path).await?;
    ensure!(
        status == 200 && list["kind"] == "TrafficMetricsList",
        "{path}: {status} {list}"
    );
    let items = list["items"].as_array().context("items")?;
    let names: Vec<&str> = items
        .iter()
        .filter_map(|i| i["resource"]["name"].as_str())
        .collect();
    ensure!(names == ["podinfo", "podinfo-primary"], "{path}: {names:?}");
    count(&items[1], "success_count", 20 * ROUNDS)?;
    count(&items[1], "failure_count", 0)?;
    seen.push(format!("{path}: {names:?}"));

    // Namespaces: `test` served the canary's and the primary's requests.
    let path = format!("{PREFIX}/namespaces{window}");
    let (status, list) = get(&controller, &path).await?;
    ensure!(status == 200, "{path}: {status} {list}");
    let test = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["resource"]["name"] == NAMESPACE && i["resource"]["kind"] == "Namespace")
        .with_context(|| format!("{path}: no namespace {NAMESPACE}: {list}"))?;
    count(test, "success_count", 38 * ROUNDS)?;
    count(test, "failure_count", 2 * ROUNDS)?;
    seen.push(format!("{path}: {:?}", metrics(test)));

    // The caller's edges: to the canary's backend Service, as its proxy names it.
    for path in [
        format!("{PREFIX}/namespaces/{NAMESPACE}/deployments/loadtester/edges{window}"),
        format!("{PREFIX}/namespaces/{NAMESPACE}/pods/{CALLER_POD}/edges{window}"),
    ] {
        let (status, list) = get(&controller, &path).await?;
        ensure!(
            status == 200 && list["kind"] == "TrafficMetricsList",
            "{path}: {status} {list}"
        );
        let edge = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["edge"]["direction"] == "to")
            .with_context(|| format!("{path}: no `to` edge: {list}"))?;
        ensure!(
            edge["edge"]["side"] == "client"
                && edge["edge"]["resource"]["name"] == "podinfo-canary"
                && edge["edge"]["resource"]["kind"] == "Service"
                && edge["edge"]["resource"]["namespace"] == NAMESPACE,
            "{path}: {edge}"
        );
        count(edge, "success_count", 18 * ROUNDS)?;
        count(edge, "failure_count", 2 * ROUNDS)?;
        seen.push(format!(
            "{path}: {} -> {:?}",
            edge["edge"]["resource"],
            metrics(edge)
        ));
    }

    // What is not there says so.
    for (path, code) in [
        (
            format!("{PREFIX}/namespaces/{NAMESPACE}/deployments/nobody"),
            404,
        ),
        (
            format!("{PREFIX}/namespaces/{NAMESPACE}/services/podinfo"),
            404,
        ),
        (
            format!("{PREFIX}/namespaces/{NAMESPACE}/pods{}", "?window=3d"),
            400,
        ),
    ] {
        let (status, body) = get(&controller, &path).await?;
        ensure!(
            status == code && body["kind"] == "Status" && body["code"] == code,
            "{path}: {status} {body}"
        );
    }

    // Without --prometheus the paths say what is missing.
    let plain_dir = scratch.path().join("plain");
    std::fs::create_dir_all(plain_dir.join("logs"))?;
    let plain = Controller::start(&plain_dir, &plain_dir.join("logs")).await?;
    let (status, body) = get(&plain, &format!("{PREFIX}/namespaces")).await?;
    ensure!(
        status == 404
            && body["message"]
                .as_str()
                .is_some_and(|m| m.contains("--prometheus")),
        "{status} {body}"
    );
    println!("{}", seen.join("\n"));
    Ok(())
}
