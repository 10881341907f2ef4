//! A Flagger canary run replayed without Flagger, on the file platform, for each TrafficSplit
//! version Flagger writes (v1alpha1 with quantity-string weights for `linkerd`/`smi:v1alpha1`,
//! v1alpha2 for `osm`/`smi:v1alpha2`, v1alpha3 for `smi:v1alpha3`), following
//! ../shared/flagger/CONTRACT.md section 5 with its timings compressed:
//!
//! 1. **Initialization**: `podinfo-primary` (6.0.0) serves; the canary is scaled to zero; the
//!    split is written at 0/100 (backends canary then primary). The apex goes to the primary
//!    only, and Flagger's success-rate query for the canary has no value (A-init-1, A-init-3).
//! 2. **New revision** (6.0.1) scaled up; steady load starts: two lanes of back-to-back
//!    keep-alive batches to `http://podinfo.test:9898/` through a meshed client's proxy.
//! 3. **Steps** 10 -> 50 by 10: each write converges within 2 s (three consecutive windows of a
//!    100-request batch within 10 points), the canary's share of what the apps answered during a
//!    1,000-request batch (and the steady load) is within 5 points of the weight, and Flagger's checks
//!    on the real Prometheus pass (success rate >= 99, p99 <= 500 ms; one "no values" allowed at
//!    the first step).
//! 4. **Promotion**: the primary rolls to 6.0.1 while carrying half the traffic, the split goes
//!    to 0/100, the canary is scaled to zero; then every request reaches the primary at 6.0.1.
//! 5. **Rollback**: a new revision (6.0.2) at 10% with a failing stream (`?status=500`) next to
//!    the health stream; Flagger's check fails three times; then, in one step, the split goes to
//!    0/100 and the canary to zero endpoints. Within 2 s no request reaches the canary.
//!
//! Throughout, the health stream sees only 200s (A-promo-2, A-rb-1): zero failed requests.
//! Skipped, with the reason, without Prometheus.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, ensure};
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_conformance::canary::{Caller, Controller, Pod, SplitVersion};
use trellis_conformance::prometheus::{self, Prometheus};
use trellis_echo::client::CallReport;

/// Flagger's built-in checks for the `osm` family (CONTRACT.md 3.2), target `podinfo`.
const SUCCESS_RATE: &str = r#" sum( rate( osm_request_total{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo", response_code!~"5.*" }[1m] ) ) / sum( rate( osm_request_total{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo" }[1m] ) ) * 100"#;
const P99: &str = r#" histogram_quantile( 0.99, sum( rate( osm_request_duration_ms_bucket{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo" }[30s] ) ) by (le) )"#;

fn count(r: &CallReport, version: &str) -> u32 {
    r.by_responder
        .get(&format!("podinfo/{version}"))
        .copied()
        .unwrap_or(0)
}

fn sent(r: &CallReport) -> u32 {
    r.statuses.values().sum::<u32>() + r.failed
}

fn add(total: &mut CallReport, r: &CallReport) {
    for (k, v) in &r.statuses {
        *total.statuses.entry(*k).or_default() += v;
    }
    for (k, v) in &r.by_responder {
        *total.by_responder.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &r.mesh_errors {
        *total.mesh_errors.entry(k.clone()).or_default() += v;
    }
    total.failed += r.failed;
}

/// Back-to-back batches of `path` on two lanes until `stop`; what they saw.
async fn load(
    caller: &Caller,
    path: &str,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<CallReport> {
    let lane = |mut stop: watch::Receiver<bool>| async move {
        let mut total = CallReport::default();
        while !*stop.borrow_and_update() {
            let r = caller.batch("podinfo", path, 20).await?;
            add(&mut total, &r);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(total)
    };
    let (a, b) = tokio::join!(lane(stop.clone()), lane(stop));
    let mut total = a?;
    add(&mut total, &b?);
    Ok(total)
}

/// Flagger's decision for the success-rate check: `None` = no values (counts as failed).
async fn success_rate(prometheus: &Prometheus) -> anyhow::Result<Option<f64>> {
    prometheus.flagger_value(SUCCESS_RATE).await
}

/// The canary's share, in percent, of every request the two apps answered while `batch`
/// requests were sent (the steady load's included: the split is per request over all callers'
/// requests, so a batch alone sees whatever slots the others left it).
async fn share(caller: &Caller, canary: &Pod, primary: &Pod, batch: u32) -> anyhow::Result<f64> {
    canary.reset().await?;
    primary.reset().await?;
    let r = caller.batch("podinfo", "/", batch).await?;
    ensure!(
        r.failed == 0 && r.statuses.get(&200) == Some(&batch),
        "a batch of {batch}: {r:?}"
    );
    let (c, p) = (canary.answered().await?, primary.answered().await?);
    Ok(100.0 * c as f64 / (c + p).max(1) as f64)
}

/// `trellis stat --by backend -o json` on the test's Prometheus: the canary and primary
/// backends of `podinfo` both carried traffic, all of it successful.
async fn stat_by_backend(prometheus: &Prometheus) -> anyhow::Result<String> {
    let binary = trellis_conformance::harness::process::binary(
        trellis_conformance::harness::process::TRELLIS,
    )?;
    let out = tokio::process::Command::new(binary)
        .args([
            "stat",
            "--by",
            "backend",
            "--namespace",
            "test",
            "-o",
            "json",
        ])
        .args(["--prometheus", &format!("http://{}", prometheus.addr)])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "trellis stat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut seen = Vec::new();
    for backend in ["podinfo-canary", "podinfo-primary"] {
        let row = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["backend"] == backend)
            .ok_or_else(|| anyhow::anyhow!("trellis stat --by backend has no {backend}: {rows}"))?;
        let rps = row["requests_per_second"].as_f64().unwrap_or_default();
        let success = row["success_rate"].as_f64().unwrap_or_default();
        ensure!(
            rps > 0.0 && success > 99.9,
            "trellis stat --by backend: {row}"
        );
        seen.push(format!("{backend} {rps:.1} rps {success:.1}%"));
    }
    Ok(format!("trellis stat --by backend: {}", seen.join(", ")))
}

async fn replay(
    version: SplitVersion,
    subnet: u8,
    exe: &std::path::Path,
) -> anyhow::Result<String> {
    let scratch = tempfile::tempdir()?;
    let log_dir = scratch.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let ip = |n: u8| IpAddr::V4(Ipv4Addr::new(127, 0, subnet, n));
    let mut notes = Vec::new();

    // 1. Initialization.
    let controller = Controller::start(scratch.path(), &log_dir).await?;
    let grpc = controller.grpc;
    let primary = Pod::start("podinfo-primary", "6.0.0", ip(1), grpc, &log_dir).await?;
    controller.services(&[&primary], &[])?;
    controller.split(version, 0)?;
    let caller = Caller::start(grpc, &log_dir).await?;
    let prometheus = Prometheus::start(exe, &[primary.admin], &log_dir).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let r = caller.batch("podinfo", "/", 200).await?;
        if count(&r, "6.0.0") == 200 && r.failed == 0 {
            break r;
        }
        ensure!(
            Instant::now() < deadline,
            "A-init-1: the apex never served only the primary: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(init.statuses.get(&200) == Some(&200), "A-init-1: {init:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        success_rate(&prometheus).await?.is_none(),
        "A-init-3: the canary has no series yet, so Flagger's query must find no values"
    );

    // 2. New revision, scaled up; the loadtester's steady load starts.
    let canary = Pod::start("podinfo", "6.0.1", ip(2), grpc, &log_dir).await?;
    controller.services(&[&primary], &[&canary])?;
    prometheus.set_targets(&[primary.admin, canary.admin, caller.admin])?;
    let (stop_health, stop) = watch::channel(false);
    let health = load(&caller, "/", stop);
    let run = async {
        // 3. Progressive steps.
        let mut no_values = 0;
        for weight in (10..=50).step_by(10) {
            let t0 = Instant::now();
            controller.split(version, weight)?;
            // t_conv: when the first of three consecutive batches within 10 points started.
            let mut good = 0;
            let mut first_good = Duration::ZERO;
            let converged = loop {
                let started = t0.elapsed();
                let s = share(&caller, &canary, &primary, 100).await?;
                good = if (s - f64::from(weight)).abs() <= 10.0 {
                    good + 1
                } else {
                    0
                };
                if good == 1 {
                    first_good = started;
                }
                if good == 3 {
                    break first_good;
                }
                ensure!(
                    t0.elapsed() < Duration::from_secs(5),
                    "step {weight}: not converged in 5 s (last share {s:.1}%)"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            ensure!(
                converged <= Duration::from_secs(2),
                "step {weight}: converged in {converged:?} (> 2 s)"
            );
            let s = share(&caller, &canary, &primary, 1000).await?;
            ensure!(
                (s - f64::from(weight)).abs() <= 5.0,
                "step {weight}: canary share {s:.1}%"
            );
            // Flagger's checks, a couple of scrapes after the step's traffic.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            match success_rate(&prometheus).await? {
                None => {
                    no_values += 1;
                    ensure!(
                        weight == 10 && no_values == 1,
                        "step {weight}: no values for the canary"
                    );
                }
                Some(rate) => ensure!(rate >= 99.0, "step {weight}: success rate {rate}"),
            }
            if let Some(p99) = prometheus.flagger_value(P99).await? {
                ensure!(p99.trunc() <= 500.0, "step {weight}: p99 {p99} ms");
            }
            notes.push(format!(
                "{weight}%: converged {} ms, canary answered {s:.1}%",
                converged.as_millis()
            ));
        }

        // `trellis stat --by backend`: the callers' side of the split, both backends healthy.
        let stat = stat_by_backend(&prometheus).await?;
        notes.push(stat);

        // 4. Promotion: the primary rolls to 6.0.1 while carrying 50%.
        let promoted = Pod::start("podinfo-primary", "6.0.1", ip(3), grpc, &log_dir).await?;
        prometheus.set_targets(&[primary.admin, promoted.admin, canary.admin])?;
        controller.services(&[&primary, &promoted], &[&canary])?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        controller.services(&[&promoted], &[&canary])?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        controller.split(version, 0)?;
        // One (compressed) interval, then the canary is scaled to zero.
        tokio::time::sleep(Duration::from_secs(2)).await;
        controller.services(&[&promoted], &[])?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = caller.batch("podinfo", "/", 1000).await?;
        ensure!(
            count(&r, "6.0.1") == 1000 && r.failed == 0,
            "A-promo-1: expected 1000 of 1000 from the primary at 6.0.1: {r:?}"
        );
        notes.push("promoted: 1000 of 1000 from podinfo-primary 6.0.1".into());
        anyhow::Ok((promoted, canary))
    };
    // The steps and the promotion run under the health load, which stops when they end.
    let run = async {
        let outcome = run.await;
        let _ = stop_health.send(true);
        outcome
    };
    let (health_before, promoted_and_canary) = tokio::join!(health, run);
    let (health_before, promoted_and_canary) = (health_before?, promoted_and_canary?);
    let (promoted, old_canary) = promoted_and_canary;
    drop(old_canary);
    drop(primary);
    ensure!(
        health_before.failed == 0
            && health_before.statuses.get(&200).copied() == Some(sent(&health_before)),
        "A-promo-2: the health load through steps and promotion was not only 200s: {health_before:?}"
    );
    notes.push(format!(
        "health load through steps and promotion: {} requests, all 200",
        sent(&health_before)
    ));

    // 5. Rollback.
    let bad = Pod::start("podinfo", "6.0.2", ip(4), grpc, &log_dir).await?;
    controller.services(&[&promoted], &[&bad])?;
    prometheus.set_targets(&[promoted.admin, bad.admin])?;
    controller.split(version, 10)?;
    let (stop_tx, stop) = watch::channel(false);
    let health = load(&caller, "/", stop.clone());
    let failing = load(&caller, "/?status=500", stop);
    let rollback = async {
        let mut failed_checks = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while failed_checks < 3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            match success_rate(&prometheus).await? {
                Some(rate) if rate >= 99.0 => {}
                _ => failed_checks += 1,
            }
            ensure!(
                Instant::now() < deadline,
                "the failing canary passed Flagger's check for 30 s"
            );
        }
        // What Flagger does in one step.
        controller.split(version, 0)?;
        controller.services(&[&promoted], &[])?;
        let t0 = Instant::now();
        // A-rb-2: within 2 s no request reaches the canary.
        let gone = loop {
            let r = caller.batch("podinfo", "/", 50).await?;
            if count(&r, "6.0.2") == 0 {
                break t0.elapsed();
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(2),
                "A-rb-2: the canary still answers after 2 s"
            );
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        anyhow::Ok(gone)
    };
    let (health, failing, gone) = tokio::join!(health, failing, rollback);
    let (health, failing, gone) = (health?, failing?, gone?);
    ensure!(
        health.failed == 0 && health.statuses.get(&200).copied() == Some(sent(&health)),
        "A-rb-1: the health load across the rollback was not only 200s: {health:?}"
    );
    ensure!(
        failing.failed == 0,
        "the failing stream lost requests: {failing:?}"
    );
    notes.push(format!(
        "rollback: 3 failed checks, then canary gone from the apex in {} ms; health load {} requests, all 200",
        gone.as_millis(),
        sent(&health)
    ));
    drop(bad);
    Ok(notes.join("; "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagger_run_replayed_for_each_trafficsplit_version() -> anyhow::Result<()> {
    let Some(exe) = prometheus::binary() else {
        println!(
            "skipped: no prometheus binary (TRELLIS_PROMETHEUS or `prometheus` on PATH; scripts/test installs Debian's package)"
        );
        return Ok(());
    };
    let runs = [
        (SplitVersion::V1alpha1, 71),
        (SplitVersion::V1alpha2, 72),
        (SplitVersion::V1alpha3, 73),
    ]
    .map(|(version, subnet)| {
        let exe = exe.clone();
        tokio::spawn(async move { (version, replay(version, subnet, &exe).await) })
    });
    let mut failures = Vec::new();
    for run in runs {
        let (version, result) = run.await?;
        match result {
            Ok(notes) => println!("TrafficSplit {}: {notes}", version.name()),
            Err(e) => failures.push(format!("TrafficSplit {}: {e:#}", version.name())),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
