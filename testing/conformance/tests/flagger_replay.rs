//! A Flagger canary run replayed without Flagger, on the file platform, for each TrafficSplit
//! version Flagger writes (v1alpha1 with quantity-string weights for `linkerd`/`smi:v1alpha1`,
//! v1alpha2 for `osm`/`smi:v1alpha2`, v1alpha3 for `smi:v1alpha3`), following
//! ../shared/flagger/CONTRACT.md section 5 with its timings compressed: the steps are
//! `trellis_conformance::canary::replay` (initialization, steps 10 -> 50 with Flagger's checks on
//! a real Prometheus between them, promotion, rollback with the canary at weight 0 and zero
//! endpoints in the same tick; zero failed requests on the health stream throughout), run in
//! full for every version. The same steps on Kubernetes: `flagger_replay_kubernetes.rs`.
//!
//! Skipped, with the reason, without Prometheus.

use anyhow::bail;
use trellis_conformance::canary::SplitVersion;
use trellis_conformance::canary::replay::{Plan, Replayed, replay};
use trellis_conformance::harness::platform::PlatformKind;
use trellis_conformance::prometheus;

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
        tokio::spawn(async move {
            let outcome = replay(PlatformKind::File, subnet, version, &Plan::full(), &exe).await;
            (version, outcome)
        })
    });
    let mut failures = Vec::new();
    for run in runs {
        let (version, result) = run.await?;
        match result {
            Ok(Replayed::Done(notes)) => println!("TrafficSplit {}: {notes}", version.name()),
            Ok(Replayed::Skipped(reason)) => {
                println!("TrafficSplit {}: skipped: {reason}", version.name())
            }
            Err(e) => failures.push(format!("TrafficSplit {}: {e:#}", version.name())),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
