//! A Flagger canary run replayed without Flagger on the Kubernetes API: always on the fake API
//! server (in the test process), and on a real API server when `TRELLIS_TEST_KUBECONFIG` names
//! one (../shared/flagger/CONTRACT.md sections 1, 2, 4 and 5, timings compressed).
//!
//! What is written, and how: `trellis_conformance::canary::kubernetes` (Flagger's Deployments
//! and Services, and what the Deployment, ReplicaSet and EndpointSlice controllers would write:
//! ReplicaSets, Pods owned by them, one EndpointSlice per Service; on a real server, paused
//! Deployments and selectorless Services with slices managed by the test). The controller serves
//! the CRDs' conversion webhook, so each TrafficSplit write at v1alpha1, v1alpha2 or v1alpha3 (a
//! GET then a full PUT, backends canary then primary) is converted to the stored v1alpha4
//! through the running controller. The pods are real proxies on hosts (network namespaces: an
//! API server refuses loopback endpoint addresses), proving their ServiceAccount with a token
//! (TokenReview on the fake), scraped by a real Prometheus.
//!
//! The steps (`trellis_conformance::canary::replay`): initialization (the apex serves only the
//! primary; the split reads back exactly as written; Flagger's query has no value yet), the new
//! revision, weights 10 -> 50 by 10 each converging within 2 s with the canary's share within 5
//! points and Flagger's `osm` and `linkerd` checks passing on Prometheus between steps, the
//! promotion (the primary rolls while carrying half the traffic), then a rollback where the
//! canary goes to weight 0 and to zero endpoints in the same tick. Zero failed requests on the
//! health stream throughout.
//!
//! Run time: on the fake, the three versions run at the same time, each on its own API server,
//! controller and hosts, with the same plans as on a real server (about 1.5 minutes on two
//! busy cores; all three on the whole replay took up to 170 s under load, too near the 3-minute
//! limit of a test in CI). On a real server the versions share namespace `test`, so they run one
//! after the other. On both, only v1alpha1 (the `linkerd`/`smi:v1alpha1`
//! writes, quantity-string weights: the conversion with the most to get wrong) runs the whole
//! replay; v1alpha2 (`osm`) and v1alpha3 (`smi:v1alpha3`) run the short plan (create at 0/100,
//! steps 10 and 50 with the same checks, the scale-down, the rollback), which still exercises
//! every kind of write Flagger makes at every version.
//!
//! Skipped, with the reason printed, when network namespaces cannot be made (not root, no `ip`)
//! or there is no `prometheus`. The real-server run also needs the SMI CRDs installed
//! (`trellis crds`) and an API server that reaches this machine's bridge address for the
//! webhook (a local cluster such as kind); it runs the versions one after the other in
//! namespace `test` and deletes what it wrote.

use anyhow::bail;
use trellis_conformance::canary::SplitVersion;
use trellis_conformance::canary::replay::{Plan, Replayed, replay};
use trellis_conformance::harness::platform::PlatformKind;
use trellis_conformance::prometheus;

/// Each version with the /24 of its hosts on the fake.
const FAKE_RUNS: [(SplitVersion, u8); 3] = [
    (SplitVersion::V1alpha1, 74),
    (SplitVersion::V1alpha2, 75),
    (SplitVersion::V1alpha3, 76),
];

fn report(
    kind: PlatformKind,
    version: SplitVersion,
    outcome: anyhow::Result<Replayed>,
    failures: &mut Vec<String>,
) {
    match outcome {
        Ok(Replayed::Done(notes)) => {
            println!("{} TrafficSplit {}: {notes}", kind.name(), version.name())
        }
        Ok(Replayed::Skipped(reason)) => println!(
            "{} TrafficSplit {}: skipped: {reason}",
            kind.name(),
            version.name()
        ),
        Err(e) => failures.push(format!(
            "{} TrafficSplit {}: {e:#}",
            kind.name(),
            version.name()
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagger_run_replayed_on_the_fake_api_server() -> anyhow::Result<()> {
    let Some(exe) = prometheus::binary() else {
        println!(
            "skipped: no prometheus binary (TRELLIS_PROMETHEUS or `prometheus` on PATH; scripts/test installs Debian's package)"
        );
        return Ok(());
    };
    let runs = FAKE_RUNS.map(|(version, subnet)| {
        let exe = exe.clone();
        tokio::spawn(async move {
            // The whole run at v1alpha1 (quantity-string weights: the conversion with the most
            // to get wrong); the other two versions' writes through the short plan, so that
            // three meshes on two cores stay well inside the test's time limit in CI.
            let plan = if version == SplitVersion::V1alpha1 {
                Plan::full()
            } else {
                Plan::short()
            };
            let outcome = replay(PlatformKind::Kubernetes, subnet, version, &plan, &exe).await;
            (version, outcome)
        })
    });
    let mut failures = Vec::new();
    for run in runs {
        let (version, outcome) = run.await?;
        report(PlatformKind::Kubernetes, version, outcome, &mut failures);
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagger_run_replayed_on_a_real_api_server() -> anyhow::Result<()> {
    if std::env::var_os("TRELLIS_TEST_KUBECONFIG").is_none() {
        println!(
            "skipped: TRELLIS_TEST_KUBECONFIG is unset (a kubeconfig for a real API server with the SMI CRDs installed)"
        );
        return Ok(());
    }
    let Some(exe) = prometheus::binary() else {
        println!(
            "skipped: no prometheus binary (TRELLIS_PROMETHEUS or `prometheus` on PATH; scripts/test installs Debian's package)"
        );
        return Ok(());
    };
    // One after the other: every run writes the same objects in namespace `test`.
    let mut failures = Vec::new();
    for version in SplitVersion::ALL {
        let plan = if version == SplitVersion::V1alpha1 {
            Plan::full()
        } else {
            Plan::short()
        };
        let outcome = replay(PlatformKind::KubernetesReal, 77, version, &plan, &exe).await;
        report(
            PlatformKind::KubernetesReal,
            version,
            outcome,
            &mut failures,
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
