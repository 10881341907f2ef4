//! Scenarios only a mesh on hosts can run ([`crate::harness::hosts`]): the split moved under
//! steady load across hosts, how long a TrafficSplit change takes to reach a proxy on another
//! host, and what happens when the controller's or the registry's host drops off the network
//! (its switch port down: no resets, only silence).
//!
//! They run after the split and access scenarios, under their own TrafficTargets allowing
//! `service-a` to call b and c.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::split::{allow_a_yaml, allow_yaml, split_yaml};
use super::{B, C, CALLER, Outcome, all_denied, all_ok, count, ms, seen, until};
use crate::harness::mesh::{Call, Mesh, ROOT};
use crate::harness::platform::{PlatformKind, mixed_on_kubernetes};
use trellis_echo::client::CallReport;

/// The scenarios, in the order they run.
pub const HOSTS_SCENARIOS: [&str; 5] = [
    "hosts: a TrafficTarget decides a call across hosts (and platforms) by identity",
    "hosts: split moved b to c under steady load, 0 failed",
    "hosts: split change reaches a proxy on another host (p50/p99)",
    "hosts: controller host unplugged, traffic flows; change applies after",
    "hosts: registry host unplugged, endpoints kept; change applies after",
];

const ALLOW_POLICY: &str = "hosts-allow";
const SPLIT_POLICY: &str = "hosts-split";
/// Split changes timed by the propagation scenario.
const CHANGES: usize = 20;
/// How long a host stays unplugged.
const OUTAGE: Duration = Duration::from_secs(3);
/// Bound on a change applying once a host is back (TCP retransmission backs off while a peer
/// is silent, so the first packets after the plug can wait a few seconds).
const AFTER_OUTAGE_WITHIN: Duration = Duration::from_secs(30);

/// Runs every hosts scenario on `mesh` (skipped, with the reason, on a loopback mesh).
pub async fn hosts_scenarios(mesh: &Mesh) -> Vec<(&'static str, Outcome)> {
    if mesh.network.hosts().is_none() {
        return HOSTS_SCENARIOS
            .iter()
            .map(|s| (*s, Outcome::Skip("loopback mesh: no hosts".into())))
            .collect();
    }
    if let Err(e) = mesh
        .platform
        .apply_policy(ALLOW_POLICY, &allow_a_yaml())
        .await
    {
        let why = format!("applying the TrafficTargets that allow service-a: {e:#}");
        return HOSTS_SCENARIOS
            .iter()
            .map(|s| (*s, Outcome::Fail(why.clone())))
            .collect();
    }
    let kind = mesh.platform.kind();
    let results = [
        Outcome::of(across(mesh).await),
        Outcome::of(steady_move(mesh).await),
        Outcome::of(propagation(mesh).await),
        match kind.cannot_unplug("controller") {
            Some(why) => Outcome::Skip(why.into()),
            None => Outcome::of(controller_unplugged(mesh).await),
        },
        match kind.cannot_unplug("registry") {
            Some(why) => Outcome::Skip(why.into()),
            None => Outcome::of(registry_unplugged(mesh).await),
        },
    ];
    let _ = mesh.platform.delete_policy(SPLIT_POLICY).await;
    let _ = mesh.platform.delete_policy(ALLOW_POLICY).await;
    HOSTS_SCENARIOS.iter().copied().zip(results).collect()
}

/// `app-a` calls `app-c` on another host (in `mixed`, a Consul workload calling a Kubernetes
/// one): refused while only b is allowed, let through once a TrafficTarget names c.
async fn across(mesh: &Mesh) -> anyhow::Result<String> {
    let where_ = |sa: &str| {
        if mesh.platform.kind() != PlatformKind::Mixed {
            mesh.platform.kind().name()
        } else if mixed_on_kubernetes(sa) {
            "Kubernetes"
        } else {
            "Consul"
        }
    };
    mesh.platform
        .apply_policy(ALLOW_POLICY, &allow_yaml("service-a", &["service-b"]))
        .await?;
    let to_c = Call::get("app-c", "/echo", 5);
    let denied = until(mesh, CALLER, &to_c, "a->c denied", |r| all_denied(r, 5)).await?;
    mesh.platform
        .apply_policy(ALLOW_POLICY, &allow_a_yaml())
        .await?;
    let allowed = until(mesh, CALLER, &to_c, "a->c allowed", |r| {
        all_ok(r, 5) && count(r, C) == 5
    })
    .await?;
    Ok(format!(
        "service-a ({}) -> app-c ({}): 403 without a TrafficTarget for service-c (in {}), 200 with one (in {})",
        where_("service-a"),
        where_("service-c"),
        ms(denied),
        ms(allowed)
    ))
}

/// Puts the split `b:c` in force and waits until every probe goes to `to`.
async fn split_to(mesh: &Mesh, b: u32, c: u32, to: &str) -> anyhow::Result<Duration> {
    mesh.platform
        .apply_policy(SPLIT_POLICY, &split_yaml(b, c, false))
        .await?;
    let probe = Call::get(ROOT, "/echo", 10);
    until(mesh, CALLER, &probe, &format!("all to {to}"), |r| {
        all_ok(r, 10) && count(r, to) == 10
    })
    .await
}

/// Adds `r` to `total`.
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
    total.reconnects += r.reconnects;
}

/// Sends batches of `batch` requests from the caller to the root, back to back on two
/// connections at once, until `stop` fires; everything they saw.
async fn steady_load(
    mesh: &Mesh,
    batch: u32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<CallReport> {
    let lane = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let mut total = CallReport::default();
        while !*stop.borrow_and_update() {
            let r = mesh.call(CALLER, &Call::get(ROOT, "/echo", batch)).await?;
            add(&mut total, &r);
        }
        anyhow::Ok(total)
    };
    let (one, two) = tokio::join!(lane(stop.clone()), lane(stop));
    let mut total = one?;
    add(&mut total, &two?);
    Ok(total)
}

/// Steady load from the caller while the split walks 100:0 -> 75:25 -> 50:50 -> 25:75 -> 0:100:
/// no request fails, and both versions answer.
async fn steady_move(mesh: &Mesh) -> anyhow::Result<String> {
    split_to(mesh, 100, 0, B).await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load = steady_load(mesh, 20, stop);
    let walk = async {
        for (b, c) in [(75, 25), (50, 50), (25, 75), (0, 100)] {
            tokio::time::sleep(Duration::from_millis(700)).await;
            mesh.platform
                .apply_policy(SPLIT_POLICY, &split_yaml(b, c, false))
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let _ = stop_tx.send(true);
        anyhow::Ok(())
    };
    let (total, walked) = tokio::join!(load, walk);
    walked?;
    let total = total?;
    let sent: u32 = total.statuses.values().sum::<u32>() + total.failed;
    if total.failed > 0 || total.statuses.get(&200) != Some(&sent) || !total.mesh_errors.is_empty()
    {
        bail!("{sent} requests under load, not all 200: {}", seen(&total));
    }
    if count(&total, B) == 0 || count(&total, C) == 0 {
        bail!(
            "the walk should have sent traffic to both: {}",
            seen(&total)
        );
    }
    // The last state must hold: everything to c.
    let after = mesh.call(CALLER, &Call::get(ROOT, "/echo", 20)).await?;
    if !(all_ok(&after, 20) && count(&after, C) == 20) {
        bail!("after the walk to 0:100, not all to c: {}", seen(&after));
    }
    Ok(format!("{sent} requests, 0 failed: {}", seen(&total)))
}

/// [`CHANGES`] split flips between all-b and all-c; for each, the time from the write to the
/// first request the caller's proxy (on its own host) sends to the new side.
async fn propagation(mesh: &Mesh) -> anyhow::Result<String> {
    split_to(mesh, 1, 0, B).await?;
    let mut times = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let (b, c, to) = if i % 2 == 0 { (0, 1, C) } else { (1, 0, B) };
        let start = tokio::time::Instant::now();
        mesh.platform
            .apply_policy(SPLIT_POLICY, &split_yaml(b, c, false))
            .await?;
        loop {
            let r = mesh.call(CALLER, &Call::get(ROOT, "/echo", 1)).await?;
            if count(&r, to) == 1 {
                times.push(start.elapsed());
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "change {i} (all to {to}) not seen within 10 s: {}",
                    seen(&r)
                );
            }
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(format!(
        "{CHANGES} changes: p50 {}, p99 {} (max {}), write to first request routed",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(*times.last().expect("CHANGES > 0"))
    ))
}

/// Sends batches for [`OUTAGE`] and returns what they saw.
async fn calls_for(mesh: &Mesh, span: Duration) -> anyhow::Result<CallReport> {
    let mut total = CallReport::default();
    let start = tokio::time::Instant::now();
    while start.elapsed() < span {
        let r = mesh.call(CALLER, &Call::get(ROOT, "/echo", 10)).await?;
        add(&mut total, &r);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(total)
}

/// The controller's host drops off the network: proxies keep routing with what they hold, a
/// change made meanwhile reaches them once the host is back.
async fn controller_unplugged(mesh: &Mesh) -> anyhow::Result<String> {
    let hosts = mesh.network.hosts().context("a mesh on hosts")?;
    split_to(mesh, 1, 0, B).await?;
    hosts.unplug("controller")?;
    let result = async {
        let during = calls_for(mesh, OUTAGE).await?;
        let sent: u32 = during.statuses.values().sum::<u32>() + during.failed;
        if !(all_ok(&during, sent) && count(&during, B) == sent) {
            bail!(
                "while the controller was unreachable, not every call went to b: {}",
                seen(&during)
            );
        }
        // Made while the controller cannot hear the platform or reach the proxies.
        mesh.platform
            .apply_policy(SPLIT_POLICY, &split_yaml(0, 1, false))
            .await?;
        anyhow::Ok(sent)
    }
    .await;
    hosts.plug("controller")?;
    let sent = result?;
    let took = until_within(mesh, C, AFTER_OUTAGE_WITHIN).await?;
    Ok(format!(
        "{sent} calls during a {} s outage, all 200 from b; the change made meanwhile applied {} after the plug",
        OUTAGE.as_secs(),
        ms(took)
    ))
}

/// The registry's host drops off the network: the controller keeps the endpoints it had (both
/// versions keep answering through the root), and a registration change after the host is back
/// applies. On `kubernetes` the registry is the fake API server in the test process: it has an
/// outage instead (stops listening and drops its connections, as an API server restarting).
async fn registry_unplugged(mesh: &Mesh) -> anyhow::Result<String> {
    let hosts = mesh.network.hosts().context("a mesh on hosts")?;
    mesh.platform.delete_policy(SPLIT_POLICY).await?;
    let probe = Call::get(ROOT, "/echo", 20);
    until(mesh, CALLER, &probe, "both versions answer", |r| {
        all_ok(r, 20) && count(r, B) > 0 && count(r, C) > 0
    })
    .await?;
    let in_process = mesh.platform.begin_api_outage();
    if !in_process {
        hosts.unplug("registry")?;
    }
    let during = calls_for(mesh, OUTAGE).await;
    if in_process {
        mesh.platform.end_api_outage().await?;
    } else {
        hosts.plug("registry")?;
    }
    let during = during?;
    let sent: u32 = during.statuses.values().sum::<u32>() + during.failed;
    if !all_ok(&during, sent) || count(&during, B) == 0 || count(&during, C) == 0 {
        bail!(
            "while the registry was unreachable, the root should have kept both endpoints: {}",
            seen(&during)
        );
    }
    // b is registered in the unplugged registry on every hosts platform (Consul in `mixed`).
    let b = mesh
        .services
        .iter()
        .find(|s| s.name == ROOT)
        .and_then(|s| {
            s.instances
                .iter()
                .find(|i| i.service_account == "service-b")
        })
        .context("the root has no b instance")?
        .clone();
    mesh.platform.deregister(ROOT, &b).await?;
    let took = until_within(mesh, C, AFTER_OUTAGE_WITHIN).await;
    // Put b back for whatever runs next.
    mesh.platform.register(&mesh.services).await?;
    let took = took?;
    Ok(format!(
        "{sent} calls during a {} s outage, all 200 ({}); b deregistered after the plug, gone from the root in {}",
        OUTAGE.as_secs(),
        seen(&during),
        ms(took)
    ))
}

/// Probes the root until every answer comes from `to`, for at most `within`.
async fn until_within(mesh: &Mesh, to: &str, within: Duration) -> anyhow::Result<Duration> {
    let probe = Call::get(ROOT, "/echo", 10);
    let start = tokio::time::Instant::now();
    loop {
        let r = mesh.call(CALLER, &probe).await?;
        if all_ok(&r, 10) && count(&r, to) == 10 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("not all to {to} within {within:?}: {}", seen(&r));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
