//! A Flagger canary run replayed without Flagger (../shared/flagger/CONTRACT.md section 5, its
//! timings compressed), the same steps on every platform a [`Stage`] stands for: the file
//! platform on loopback, the fake API server or a real one on hosts.
//!
//! 1. **Initialization**: `podinfo-primary` (6.0.0) serves; the canary is scaled to zero; the
//!    split is written at 0/100 (backends canary then primary). The apex goes to the primary
//!    only, and Flagger's success-rate query for the canary has no value (A-init-1, A-init-3).
//! 2. **New revision** (6.0.1) scaled up; steady load starts: two lanes of back-to-back
//!    keep-alive batches to `http://podinfo.test:9898/` through a meshed client's proxy.
//! 3. **Steps** ([`Plan::steps`], 10 -> 50 by 10 in full): each write converges within 2 s
//!    (three consecutive windows of a 100-request batch within 10 points), the canary's share
//!    of what the apps answered during a 1,000-request batch (and the steady load) is within 5
//!    points of the weight, and Flagger's checks on the real Prometheus pass (success rate >=
//!    99, p99 <= 500 ms; one "no values" allowed at the first step).
//! 4. **Promotion** ([`Plan::promotion`]): the primary rolls to 6.0.1 while carrying half the
//!    traffic, the split goes to 0/100, the canary is scaled to zero; then every request
//!    reaches the primary at 6.0.1.
//! 5. **Rollback**: a new revision (6.0.2) at 10% with a failing stream (`?status=500`) next to
//!    the health stream; Flagger's check fails three times; then, in one step, the split goes to
//!    0/100 and the canary to zero endpoints. Within 2 s no request reaches the canary.
//!
//! Throughout, the health stream sees only 200s (A-promo-2, A-rb-1): zero failed requests.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::ensure;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_echo::client::CallReport;

use super::kubernetes::KubeCanary;
use super::{Caller, Controller, Pod, SplitVersion};
use crate::harness::mesh::output_dir;
use crate::harness::platform::PlatformKind;
use crate::prometheus::Prometheus;

/// Flagger's built-in checks for the `osm` family (CONTRACT.md 3.2), target `podinfo`.
pub const SUCCESS_RATE: &str = r#" sum( rate( osm_request_total{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo", response_code!~"5.*" }[1m] ) ) / sum( rate( osm_request_total{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo" }[1m] ) ) * 100"#;
pub const P99: &str = r#" histogram_quantile( 0.99, sum( rate( osm_request_duration_ms_bucket{ destination_namespace="test", destination_kind="Deployment", destination_name="podinfo" }[30s] ) ) by (le) )"#;
/// Flagger's `linkerd` success rate (CONTRACT.md 3.2), checked next to the `osm` one on
/// Kubernetes, where the linkerd provider's writes (v1alpha1) are replayed.
pub const LINKERD_SUCCESS_RATE: &str = r#" sum( rate( response_total{ namespace="test", deployment=~"podinfo", classification!="failure", direction="inbound" }[1m] ) ) / sum( rate( response_total{ namespace="test", deployment=~"podinfo", direction="inbound" }[1m] ) ) * 100"#;

/// Which parts of a run to replay.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The canary weights written one after the other (Flagger: 10 to 50 by 10).
    pub steps: Vec<u32>,
    /// Whether the primary is promoted after the last step (else the canary is scaled down and
    /// the rollback runs against the first primary).
    pub promotion: bool,
}

impl Plan {
    /// The whole run: steps 10 -> 50 by 10, then the promotion.
    pub fn full() -> Self {
        Plan {
            steps: (10..=50).step_by(10).collect(),
            promotion: true,
        }
    }

    /// Fewer steps (10 then 50) and no promotion: every kind of write Flagger makes (create at
    /// 0/100, steps, the reset to 0/100 of the rollback) in less time.
    pub fn short() -> Self {
        Plan {
            steps: vec![10, 50],
            promotion: false,
        }
    }
}

/// Where the replay runs: the file platform, or Kubernetes.
#[derive(Debug)]
pub enum Stage {
    Files {
        controller: Box<Controller>,
        subnet: u8,
        log_dir: PathBuf,
        _scratch: tempfile::TempDir,
    },
    Kubernetes(Box<KubeCanary>),
}

impl Stage {
    /// Starts `kind` (file, kubernetes or kubernetes-real) near subnet `subnet`; `Ok(Err(reason))`
    /// when it cannot run here.
    pub async fn start(
        kind: PlatformKind,
        subnet: u8,
        log_dir: &Path,
    ) -> anyhow::Result<Result<Self, String>> {
        Ok(Ok(match kind {
            PlatformKind::File => {
                let scratch = tempfile::tempdir()?;
                Stage::Files {
                    controller: Box::new(Controller::start(scratch.path(), log_dir).await?),
                    subnet,
                    log_dir: log_dir.to_path_buf(),
                    _scratch: scratch,
                }
            }
            kind => match KubeCanary::start(kind, subnet, log_dir).await? {
                Ok(k) => Stage::Kubernetes(Box::new(k)),
                Err(reason) => return Ok(Err(reason)),
            },
        }))
    }

    /// Starts pod number `n` of `deployment` at `version` (not yet an endpoint).
    pub async fn pod(&self, deployment: &str, version: &str, n: u8) -> anyhow::Result<Pod> {
        match self {
            Stage::Files {
                controller,
                subnet,
                log_dir,
                ..
            } => {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, *subnet, n));
                Pod::start(deployment, version, ip, controller.grpc, log_dir).await
            }
            Stage::Kubernetes(k) => k.pod(deployment, version, n).await,
        }
    }

    /// The meshed loadtester.
    pub async fn caller(&self) -> anyhow::Result<Caller> {
        match self {
            Stage::Files {
                controller,
                log_dir,
                ..
            } => Caller::start(controller.grpc, log_dir).await,
            Stage::Kubernetes(k) => k.caller().await,
        }
    }

    /// The Services' endpoints: the apex and `podinfo-primary` on `primary`, `podinfo-canary`
    /// on `canary`.
    pub async fn services(&self, primary: &[&Pod], canary: &[&Pod]) -> anyhow::Result<()> {
        match self {
            Stage::Files { controller, .. } => controller.services(primary, canary),
            Stage::Kubernetes(k) => k.services(primary, canary).await,
        }
    }

    /// Flagger's write of the TrafficSplit at `version` with the canary at `canary`.
    pub async fn split(&self, version: SplitVersion, canary: u32) -> anyhow::Result<()> {
        match self {
            Stage::Files { controller, .. } => controller.split(version, canary),
            Stage::Kubernetes(k) => k.split(version, canary).await,
        }
    }

    /// What a real cluster keeps after the run, deleted.
    pub async fn cleanup(&self) {
        if let Stage::Kubernetes(k) = self {
            k.cleanup().await;
        }
    }
}

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
    let binary = crate::harness::process::binary(crate::harness::process::TRELLIS)?;
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

/// `trellis edges -n test -o json` on the test's Prometheus, on Kubernetes where every proxy has
/// an identity: the loadtester's calls to podinfo went over mTLS, and the edge names both
/// ServiceAccounts' SPIFFE ids (from the request series' identity labels).
async fn edges_with_identities(prometheus: &Prometheus) -> anyhow::Result<String> {
    let binary = crate::harness::process::binary(crate::harness::process::TRELLIS)?;
    let out = tokio::process::Command::new(binary)
        .args(["edges", "-n", "test", "-o", "json"])
        .args(["--prometheus", &format!("http://{}", prometheus.addr)])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "trellis edges: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edges: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let to_podinfo: Vec<&serde_json::Value> = edges
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["destination_workload"]
                .as_str()
                .is_some_and(|w| w.starts_with("podinfo"))
        })
        .collect();
    ensure!(
        !to_podinfo.is_empty(),
        "trellis edges: no edge to podinfo: {edges}"
    );
    for edge in &to_podinfo {
        let id = |k: &str| edge[k].as_str().unwrap_or_default().to_owned();
        ensure!(
            edge["mtls"] == true
                && id("source_identity").ends_with("/ns/test/sa/loadtester")
                && id("destination_identity").ends_with("/ns/test/sa/podinfo"),
            "trellis edges: {edge}"
        );
    }
    Ok(format!(
        "trellis edges: {} edge(s) to podinfo over mTLS, loadtester -> podinfo identities",
        to_podinfo.len()
    ))
}

/// How a replay ended.
#[derive(Debug)]
pub enum Replayed {
    /// It ran; what it saw, one note per phase.
    Done(String),
    /// The platform cannot run here, and why.
    Skipped(String),
}

/// Replays a Flagger run on `kind` for TrafficSplit `version` with `plan`; its processes' logs
/// are in `<target>/conformance/flagger-<kind>-<version>`.
pub async fn replay(
    kind: PlatformKind,
    subnet: u8,
    version: SplitVersion,
    plan: &Plan,
    prometheus_exe: &Path,
) -> anyhow::Result<Replayed> {
    let log_dir = output_dir().join(format!("flagger-{}-{}", kind.name(), version.name()));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir)?;
    let stage = match Stage::start(kind, subnet, &log_dir).await? {
        Ok(stage) => stage,
        Err(reason) => return Ok(Replayed::Skipped(reason)),
    };
    let outcome = steps(&stage, version, plan, prometheus_exe, &log_dir).await;
    stage.cleanup().await;
    outcome
        .map(Replayed::Done)
        .map_err(|e| e.context(format!("logs in {}", log_dir.display())))
}

async fn steps(
    stage: &Stage,
    version: SplitVersion,
    plan: &Plan,
    exe: &Path,
    log_dir: &Path,
) -> anyhow::Result<String> {
    let mut notes = Vec::new();

    // 1. Initialization.
    let primary = stage.pod("podinfo-primary", "6.0.0", 1).await?;
    stage.services(&[&primary], &[]).await?;
    stage.split(version, 0).await?;
    let written_at = match stage {
        Stage::Kubernetes(k) => Some(k.read_split(version).await?),
        Stage::Files { .. } => None,
    };
    let caller = stage.caller().await?;
    let prometheus = Prometheus::start(exe, &[primary.admin], log_dir).await?;
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
    if let (Stage::Kubernetes(k), Some(first)) = (stage, written_at) {
        // A-init-2: seconds later, what was written reads back at the written version unchanged
        // (the webhook's round trip keeps Flagger's spec exactly: quantity strings, order), and
        // the mesh wrote nothing: same resourceVersion, no annotations, finalizers or status.
        let read = k.read_split(version).await?;
        let written: serde_json::Value = serde_yaml_ng::from_str(&version.yaml(0))?;
        ensure!(
            read["spec"] == written["spec"],
            "A-init-2: the TrafficSplit reads back as {} instead of {}",
            read["spec"],
            written["spec"]
        );
        let metadata = &read["metadata"];
        ensure!(
            metadata["resourceVersion"] == first["metadata"]["resourceVersion"]
                && metadata["annotations"].is_null()
                && metadata["finalizers"].is_null()
                && read["status"].is_null(),
            "A-init-2: the TrafficSplit was written after Flagger's write: {read}"
        );
        // And at the other versions Flagger writes: converted by the controller's webhook on the
        // way out of storage, the same backends in the same order with the same weights.
        for other in SplitVersion::ALL.into_iter().filter(|v| *v != version) {
            let read = k.read_split(other).await?;
            let backends: Vec<(String, Option<u64>)> = read["spec"]["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    // Converted, not relabelled: quantity strings at v1alpha1, integers after.
                    let weight = &b["weight"];
                    let weight = if other == SplitVersion::V1alpha1 {
                        weight.as_str().and_then(|w| w.parse().ok())
                    } else {
                        weight.as_u64()
                    };
                    (b["service"].as_str().unwrap_or_default().to_owned(), weight)
                })
                .collect();
            ensure!(
                read["spec"]["service"] == "podinfo"
                    && backends
                        == [
                            ("podinfo-canary".to_owned(), Some(0)),
                            ("podinfo-primary".to_owned(), Some(100)),
                        ],
                "the TrafficSplit written at {} reads at {} as {}",
                version.name(),
                other.name(),
                read["spec"]
            );
        }
    }

    // 2. New revision, scaled up; the loadtester's steady load starts.
    let canary = stage.pod("podinfo", "6.0.1", 2).await?;
    stage.services(&[&primary], &[&canary]).await?;
    prometheus.set_targets(&[primary.admin, canary.admin, caller.admin])?;
    let (stop_health, stop) = watch::channel(false);
    let health = load(&caller, "/", stop);
    let run = async {
        // 3. Progressive steps.
        let mut no_values = 0;
        let first = plan.steps.first().copied();
        for &weight in &plan.steps {
            let t0 = Instant::now();
            stage.split(version, weight).await?;
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
                // A streak that began within 5 s may finish after them: on a busy machine three
                // windows of 100 requests take seconds to measure, which is not the mesh's
                // convergence (t_conv, asserted below, is when the streak began).
                ensure!(
                    good > 0 || t0.elapsed() < Duration::from_secs(5),
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
                        Some(weight) == first && no_values == 1,
                        "step {weight}: no values for the canary"
                    );
                }
                Some(rate) => ensure!(rate >= 99.0, "step {weight}: success rate {rate}"),
            }
            if let Some(p99) = prometheus.flagger_value(P99).await? {
                ensure!(p99.trunc() <= 500.0, "step {weight}: p99 {p99} ms");
            }
            if matches!(stage, Stage::Kubernetes(_))
                && let Some(rate) = prometheus.flagger_value(LINKERD_SUCCESS_RATE).await?
            {
                ensure!(rate >= 99.0, "step {weight}: linkerd success rate {rate}");
            }
            notes.push(format!(
                "{weight}%: converged {} ms, canary answered {s:.1}%",
                converged.as_millis()
            ));
        }

        // `trellis stat --by backend`: the callers' side of the split, both backends healthy.
        let stat = stat_by_backend(&prometheus).await?;
        notes.push(stat);
        if matches!(stage, Stage::Kubernetes(_)) {
            notes.push(edges_with_identities(&prometheus).await?);
        }

        if !plan.promotion {
            // No promotion: the split back to 0/100 and the canary scaled to zero, one
            // (compressed) interval apart, as after a promotion; the first primary serves on.
            stage.split(version, 0).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            stage.services(&[&primary], &[]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let r = caller.batch("podinfo", "/", 1000).await?;
            ensure!(
                count(&r, "6.0.0") == 1000 && r.failed == 0,
                "back to the primary: expected 1000 of 1000 from 6.0.0: {r:?}"
            );
            notes.push("canary scaled down: 1000 of 1000 from podinfo-primary 6.0.0".into());
            return anyhow::Ok(None);
        }

        // 4. Promotion: the primary rolls to 6.0.1 while carrying 50%.
        let promoted = stage.pod("podinfo-primary", "6.0.1", 3).await?;
        prometheus.set_targets(&[primary.admin, promoted.admin, canary.admin])?;
        stage.services(&[&primary, &promoted], &[&canary]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stage.services(&[&promoted], &[&canary]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stage.split(version, 0).await?;
        // One (compressed) interval, then the canary is scaled to zero.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stage.services(&[&promoted], &[]).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = caller.batch("podinfo", "/", 1000).await?;
        ensure!(
            count(&r, "6.0.1") == 1000 && r.failed == 0,
            "A-promo-1: expected 1000 of 1000 from the primary at 6.0.1: {r:?}"
        );
        notes.push("promoted: 1000 of 1000 from podinfo-primary 6.0.1".into());
        anyhow::Ok(Some(promoted))
    };
    // The steps and the promotion run under the health load, which stops when they end.
    let run = async {
        let outcome = run.await;
        let _ = stop_health.send(true);
        outcome
    };
    let (health_before, promoted) = tokio::join!(health, run);
    let (health_before, promoted) = (health_before?, promoted?);
    drop(canary);
    let (serving, serving_version) = match promoted {
        Some(promoted) => {
            drop(primary);
            (promoted, "6.0.1")
        }
        None => (primary, "6.0.0"),
    };
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
    let bad = stage.pod("podinfo", "6.0.2", 4).await?;
    stage.services(&[&serving], &[&bad]).await?;
    prometheus.set_targets(&[serving.admin, bad.admin])?;
    stage.split(version, 10).await?;
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
        // What Flagger does in one step (timed from its first write).
        let t0 = Instant::now();
        stage.split(version, 0).await?;
        stage.services(&[&serving], &[]).await?;
        // A-rb-2: within 2 s no request reaches the canary: a batch that began after 2 s
        // must not see it (when the first clean batch began is what is reported; on a busy
        // machine a batch itself can take a while).
        let gone = loop {
            let started = t0.elapsed();
            let r = caller.batch("podinfo", "/", 50).await?;
            if count(&r, "6.0.2") == 0 {
                break started;
            }
            ensure!(
                started < Duration::from_secs(2),
                "A-rb-2: the canary still answers a batch begun {started:?} after the rollback"
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
    let r = caller.batch("podinfo", "/", 200).await?;
    ensure!(
        count(&r, serving_version) == 200,
        "after the rollback the primary ({serving_version}) serves everything: {r:?}"
    );
    notes.push(format!(
        "rollback: 3 failed checks, then canary gone from the apex in {} ms; health load {} requests, all 200",
        gone.as_millis(),
        sent(&health)
    ));
    drop(bad);
    Ok(notes.join("; "))
}
