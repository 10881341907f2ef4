//! The TrafficSplit scenarios of the SMI conformance suite: no split, 1:0, 0:1, 75:25, 25:75
//! and HTTPRouteGroup `matches`, all on the root `app-svc` over `app-b` and `app-c`.
//!
//! Under [`Security::Identity`] the mesh denies by default, so the calls of these scenarios are
//! allowed by TrafficTargets from `service-a` to `service-b` and `service-c` (TCPRoute, all
//! ports), applied first and removed at the end.

use std::time::Duration;

use anyhow::bail;

use super::{B, C, CALLER, Outcome, all_ok, count, ms, seen, until};
use crate::harness::mesh::{APPLY_WITHIN, Call, Mesh, ROOT, Security};
use trellis_echo::client::CallReport;

/// The TrafficSplit scenarios, in the order they run on one mesh.
pub const SPLIT_SCENARIOS: [&str; 6] = [
    "split: none, root balances over b and c",
    "split: 1:0, 50 of 50 to b",
    "split: 0:1, 50 of 50 to c",
    "split: 75:25 favours b",
    "split: 25:75 favours c",
    "split: matches by weight, rest to root",
];

/// The policy name the split documents are applied under.
const SPLIT_POLICY: &str = "split";

/// The TrafficSplit of the root over `app-b` and `app-c`, optionally limited to the
/// HTTPRouteGroup `app-routes` (whose one match is `GET /canary...`), which it then also holds.
pub fn split_yaml(b: u32, c: u32, matches: bool) -> String {
    let mut yaml = String::new();
    if matches {
        yaml.push_str(
            "apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: { name: app-routes, namespace: default }
spec:
  matches:
  - name: canary
    pathRegex: /canary.*
    methods: [GET]
---
",
        );
    }
    yaml.push_str(&format!(
        "apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{ name: app-svc, namespace: default }}
spec:
  service: {ROOT}
  backends:
  - {{ service: app-b, weight: {b} }}
  - {{ service: app-c, weight: {c} }}
"
    ));
    if matches {
        yaml.push_str("  matches:\n  - { kind: HTTPRouteGroup, name: app-routes }\n");
    }
    yaml
}

/// Runs every split scenario in order on `mesh`; the split is removed at the end.
pub async fn split_scenarios(mesh: &Mesh) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    if mesh.security == Security::Identity
        && let Err(e) = mesh
            .platform
            .apply_policy(ALLOW_POLICY, &allow_a_yaml())
            .await
    {
        let why = format!("applying the TrafficTargets that allow service-a: {e:#}");
        return SPLIT_SCENARIOS
            .iter()
            .map(|s| (*s, Outcome::Fail(why.clone())))
            .collect();
    }
    let results = [
        no_split(mesh).await,
        exact(mesh, 1, 0, B).await,
        exact(mesh, 0, 1, C).await,
        favours(mesh, 75, 25, B).await,
        favours(mesh, 25, 75, C).await,
        matches(mesh).await,
    ];
    for (name, result) in SPLIT_SCENARIOS.iter().zip(results) {
        out.push((*name, Outcome::of(result)));
    }
    let _ = mesh.platform.delete_policy(SPLIT_POLICY).await;
    let _ = mesh.platform.delete_policy(ALLOW_POLICY).await;
    out
}

/// The policy name of the TrafficTargets that let `service-a` call the split's backends.
const ALLOW_POLICY: &str = "allow-a";

/// TrafficTargets from `service-a` to `service-b` and to `service-c`, every port.
pub fn allow_a_yaml() -> String {
    allow_yaml("service-a", &["service-b", "service-c"])
}

/// TrafficTargets from the ServiceAccount `from` to each of `to`, every port.
pub fn allow_yaml(from: &str, to: &[&str]) -> String {
    let mut yaml = String::from(
        "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: all-ports, namespace: default }
spec:
  matches:
    ports: []
",
    );
    for to in to {
        yaml.push_str(&format!(
            "---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{ name: a-to-{to}, namespace: default }}
spec:
  destination: {{ kind: ServiceAccount, name: {to}, namespace: default }}
  rules:
  - {{ kind: TCPRoute, name: all-ports }}
  sources:
  - {{ kind: ServiceAccount, name: {from}, namespace: default }}
"
        ));
    }
    yaml
}

/// No split: the root's own endpoints, both versions, every request answered.
async fn no_split(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform.delete_policy(SPLIT_POLICY).await?;
    let root = Call::get(ROOT, "/echo", 20);
    let took = until(mesh, CALLER, &root, "both versions answer", |r| {
        all_ok(r, 20) && count(r, B) > 0 && count(r, C) > 0
    })
    .await?;
    let r = mesh.call(CALLER, &root.count(50)).await?;
    balanced(&r, 50)?;
    Ok(format!("{} (applied in {})", seen(&r), ms(took)))
}

/// Every request answered by b or c, and both versions answered some: the root balances over
/// its endpoints per request (the SMI suite's check), not per connection. Not an evenness
/// check: the default balancer is latency-aware (P2C over a peak EWMA), so two endpoints share
/// sequential requests unevenly when one answers faster, by design.
fn balanced(r: &CallReport, n: u32) -> anyhow::Result<()> {
    if !all_ok(r, n) || count(r, B) + count(r, C) != n {
        bail!("not every request answered by b or c: {}", seen(r));
    }
    if count(r, B) == 0 || count(r, C) == 0 {
        bail!(
            "not balanced (both versions should answer some of {n} requests on one connection): {}",
            seen(r)
        );
    }
    Ok(())
}

/// A split whose whole weight is on `to`: exactly 50 of 50 requests reach it.
async fn exact(mesh: &Mesh, b: u32, c: u32, to: &str) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(SPLIT_POLICY, &split_yaml(b, c, false))
        .await?;
    // Concurrent requests that stay in flight a little: before the split is applied the root's
    // balancer spreads them over b and c (it weighs requests in flight), so "all to `to`" cannot
    // be the previous state's luck. Sequential requests all go to whichever endpoint has
    // answered fastest so far, and once passed for a 1:0 not yet applied (Cloud Map, 49 of 50).
    let probe = Call::get(ROOT, "/echo?delay_ms=20", 20).concurrency(10);
    let took = until(mesh, CALLER, &probe, &format!("all to {to}"), |r| {
        all_ok(r, 20) && count(r, to) == 20
    })
    .await?;
    let r = mesh.call(CALLER, &probe.count(50)).await?;
    if !(all_ok(&r, 50) && count(&r, to) == 50) {
        bail!("expected exactly 50 of 50 to {to}: {}", seen(&r));
    }
    Ok(format!("{} (applied in {})", seen(&r), ms(took)))
}

/// A split weighted towards `heavier`: of 200 requests it gets more than the other version.
async fn favours(mesh: &Mesh, b: u32, c: u32, heavier: &str) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(SPLIT_POLICY, &split_yaml(b, c, false))
        .await?;
    let lighter = if heavier == B { C } else { B };
    let probe = Call::get(ROOT, "/echo", 20);
    let took = until(mesh, CALLER, &probe, &format!("{heavier} heavier"), |r| {
        all_ok(r, 20) && count(r, heavier) > count(r, lighter) && count(r, lighter) > 0
    })
    .await?;
    let r = mesh.call(CALLER, &probe.count(200)).await?;
    if !(all_ok(&r, 200)
        && count(&r, heavier) + count(&r, lighter) == 200
        && count(&r, heavier) > count(&r, lighter))
    {
        bail!(
            "expected {heavier} > {lighter} over 200 requests: {}",
            seen(&r)
        );
    }
    Ok(format!("{} (applied in {})", seen(&r), ms(took)))
}

/// A split limited to the `app-routes` matches with all weight on c: every matching request
/// reaches c; requests that match nothing go to the root (both versions).
async fn matches(mesh: &Mesh) -> anyhow::Result<String> {
    mesh.platform
        .apply_policy(SPLIT_POLICY, &split_yaml(0, 1, true))
        .await?;
    let matching = Call::get(ROOT, "/canary/echo", 10);
    let other = Call::get(ROOT, "/echo", 20);
    // The state before (25:75 for everything) also sends most to c: wait until the other
    // requests reach b again AND the matching ones reach only c.
    let mut took = Duration::ZERO;
    let start = tokio::time::Instant::now();
    loop {
        let m = mesh.call(CALLER, &matching).await?;
        let o = mesh.call(CALLER, &other).await?;
        if all_ok(&m, 10) && count(&m, C) == 10 && all_ok(&o, 20) && count(&o, B) >= 2 {
            took = took.max(start.elapsed());
            break;
        }
        if start.elapsed() > APPLY_WITHIN {
            bail!(
                "not applied within {APPLY_WITHIN:?}: matching {}; other {}",
                seen(&m),
                seen(&o)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = mesh.call(CALLER, &matching.clone().count(50)).await?;
    if !(all_ok(&m, 50) && count(&m, C) == 50) {
        bail!(
            "expected all 50 matching requests (GET /canary/echo) at c: {}",
            seen(&m)
        );
    }
    let o = mesh.call(CALLER, &other.clone().count(50)).await?;
    balanced(&o, 50).map_err(|e| anyhow::anyhow!("requests matching no route: {e:#}"))?;
    let post = mesh
        .call(CALLER, &matching.method("POST").count(50))
        .await?;
    balanced(&post, 50)
        .map_err(|e| anyhow::anyhow!("POST /canary/echo (method not matched): {e:#}"))?;
    Ok(format!(
        "matching {}; other {}; POST {} (applied in {})",
        seen(&m),
        seen(&o),
        seen(&post),
        ms(took)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_documents_load_without_errors() {
        let allow = allow_a_yaml();
        let report = trellis_smi::load::load_str("allow.yaml", &allow);
        assert!(report.errors.is_empty(), "{:?}\n{allow}", report.errors);
        assert_eq!(report.resources.len(), 3);
        for yaml in [
            split_yaml(1, 0, false),
            split_yaml(75, 25, false),
            split_yaml(0, 1, true),
        ] {
            let report = trellis_smi::load::load_str("split.yaml", &yaml);
            assert!(report.errors.is_empty(), "{:?}\n{yaml}", report.errors);
            let expected = if yaml.contains("HTTPRouteGroup") {
                2
            } else {
                1
            };
            assert_eq!(report.resources.len(), expected, "{yaml}");
        }
    }
}
