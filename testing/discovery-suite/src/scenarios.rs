//! The scenario bodies: what every adapter must show, asserted precisely (addresses, ports,
//! readiness, identity, labels, weight, zone, provenance), gated by the adapter's capabilities and
//! the harness's features.
//!
//! Every scenario uses its own service names (prefixed by the scenario), so scenarios may share one
//! registry. Names contain a `-` on purpose: with version subsets on, `appear-web` is also a
//! possible subset of a service `appear`, which never exists, so the answer must still be the
//! service's own.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use trellis_discovery::{BACKOFF_CAP, Discovery, Readiness, ServiceKey, Snapshot, VERSION_LABEL};

use crate::expect::{CatalogStream, WatchStream, expect_instances, wait_for, wait_for_catalog};
use crate::{Scenario, TestInstance, TestRegistry};

/// How long the outage scenario keeps the registry away.
const OUTAGE: Duration = Duration::from_secs(10);

pub(crate) async fn run(scenario: Scenario, registry: &dyn TestRegistry) {
    let ctx = Ctx::new(registry);
    match scenario {
        Scenario::Appear => appear(&ctx).await,
        Scenario::Change => change(&ctx).await,
        Scenario::Disappear => disappear(&ctx).await,
        Scenario::NotFound => not_found(&ctx).await,
        Scenario::Readiness => readiness(&ctx).await,
        Scenario::IdentityAndLabels => identity_and_labels(&ctx).await,
        Scenario::VersionSubset => version_subset(&ctx).await,
        Scenario::LargeSet => large_set(&ctx).await,
        Scenario::Outage => outage(&ctx).await,
        Scenario::RestartWatch => restart_watch(&ctx).await,
    }
}

/// What every scenario needs: the registry, one adapter instance, and the timeout for changes.
pub(crate) struct Ctx<'a> {
    pub(crate) registry: &'a dyn TestRegistry,
    pub(crate) discovery: Arc<dyn Discovery>,
    pub(crate) timeout: Duration,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(registry: &'a dyn TestRegistry) -> Self {
        Self {
            registry,
            discovery: registry.discovery(),
            timeout: registry.features().change_timeout,
        }
    }

    pub(crate) fn key(&self, service: &str) -> ServiceKey {
        ServiceKey::new(self.registry.namespace(), service)
    }

    pub(crate) fn watch(&self, service: &str) -> WatchStream {
        self.discovery.watch(self.key(service))
    }

    pub(crate) fn catalog(&self) -> CatalogStream {
        self.discovery.services()
    }

    pub(crate) async fn put(&self, service: &str, instances: &[TestInstance]) {
        self.registry
            .put_service(service, instances)
            .await
            .unwrap_or_else(|e| panic!("harness: put_service({service}) failed: {e:#}"));
    }

    async fn delete(&self, service: &str) {
        self.registry
            .delete_service(service)
            .await
            .unwrap_or_else(|e| panic!("harness: delete_service({service}) failed: {e:#}"));
    }

    async fn set_ready(&self, service: &str, id: &str, ready: bool) {
        self.registry
            .set_ready(service, id, ready)
            .await
            .unwrap_or_else(|e| panic!("harness: set_ready({service}, {id}) failed: {e:#}"));
    }

    /// Waits until `service`'s watch shows exactly `instances` (registered under `registered_as`).
    pub(crate) async fn wait_instances(
        &self,
        stream: &mut WatchStream,
        service: &str,
        registered_as: &str,
        instances: &[TestInstance],
        timeout: Duration,
    ) -> Snapshot {
        let key = self.key(service);
        let caps = self.discovery.capabilities();
        let source = self.discovery.source_id();
        let what = format!("{key} to show {} instance(s)", instances.len());
        wait_for(stream, timeout, &what, |snapshot| {
            expect_instances(snapshot, &key, registered_as, instances, &caps, &source)
        })
        .await
    }

    async fn wait_not_found(&self, stream: &mut WatchStream, service: &str) {
        let what = format!("{} to be NotFound", self.key(service));
        wait_for(stream, self.timeout, &what, |snapshot| match snapshot {
            Snapshot::NotFound => Ok(()),
            Snapshot::Endpoints(set) => Err(format!(
                "still Endpoints with {} endpoint(s)",
                set.endpoints.len()
            )),
        })
        .await;
    }

    async fn wait_listed(&self, catalog: &mut CatalogStream, service: &str, listed: bool) {
        let key = self.key(service);
        let what = format!(
            "the catalog to {} {key}",
            if listed { "list" } else { "drop" }
        );
        wait_for_catalog(catalog, self.timeout, &what, |services| {
            if services.contains(&key) == listed {
                Ok(())
            } else {
                Err(format!("catalog has {} service(s)", services.len()))
            }
        })
        .await;
    }
}

/// `n`th test address: 10.0.0.1, 10.0.0.2, ... (unique for n < 2^24).
pub(crate) fn addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A00_0000_u32 + 1 + n as u32)
}

fn skipped(scenario: &str, reason: &str) {
    println!("skipped: {scenario}: {reason}");
}

async fn appear(ctx: &Ctx<'_>) {
    let service = "appear-web";
    let mut catalog = ctx.catalog();
    let mut watch = ctx.watch(service);
    // Nothing registered yet: the first answer is NotFound.
    ctx.wait_not_found(&mut watch, service).await;

    let instances = [
        TestInstance::new("appear-1", addr(1), 8080),
        TestInstance::new("appear-2", addr(2), 8080),
    ];
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
    ctx.wait_listed(&mut catalog, service, true).await;
}

async fn change(ctx: &Ctx<'_>) {
    let service = "change-web";
    let mut instances = vec![
        TestInstance::new("change-1", addr(11), 8080),
        TestInstance::new("change-2", addr(12), 8080),
    ];
    ctx.put(service, &instances).await;
    let mut watch = ctx.watch(service);
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // Add one.
    instances.push(TestInstance::new("change-3", addr(13), 8080));
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // Remove one.
    instances.remove(0);
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // Re-address one (same id, new address and port).
    instances[0].address = addr(14);
    instances[0].port = 9090;
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
}

async fn disappear(ctx: &Ctx<'_>) {
    let service = "disappear-web";
    let instances = [TestInstance::new("disappear-1", addr(21), 8080)];
    ctx.put(service, &instances).await;
    let mut catalog = ctx.catalog();
    let mut watch = ctx.watch(service);
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
    ctx.wait_listed(&mut catalog, service, true).await;

    ctx.delete(service).await;
    ctx.wait_not_found(&mut watch, service).await;
    ctx.wait_listed(&mut catalog, service, false).await;
}

async fn not_found(ctx: &Ctx<'_>) {
    // Two names: a plain one, and one that looks like a version subset of a missing service.
    for service in ["notfound-ghost", "notfound-ghost-v2"] {
        let key = ctx.key(service);
        let mut watch = ctx.watch(service);
        match tokio::time::timeout(ctx.timeout, futures::StreamExt::next(&mut watch)).await {
            Ok(Some(Ok(Snapshot::NotFound))) => {}
            Ok(Some(Ok(Snapshot::Endpoints(set)))) => panic!(
                "watch({key}) of a service that never existed yielded Endpoints ({} endpoint(s)), want NotFound",
                set.endpoints.len()
            ),
            Ok(Some(Err(e))) => {
                panic!(
                    "watch({key}) of a missing service yielded an error first, want NotFound: {e}"
                )
            }
            Ok(None) => panic!("watch({key}) ended; watches never end on their own"),
            Err(_) => panic!("watch({key}) yielded nothing within {:?}", ctx.timeout),
        }
    }
}

async fn readiness(ctx: &Ctx<'_>) {
    if !ctx.discovery.capabilities().health {
        return skipped(
            "readiness",
            "the adapter reports no per-endpoint health (capabilities.health = false)",
        );
    }
    let service = "readiness-web";
    let mut instances = vec![
        TestInstance::new("readiness-1", addr(31), 8080),
        TestInstance::new("readiness-2", addr(32), 8080),
    ];
    ctx.put(service, &instances).await;
    let mut watch = ctx.watch(service);
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // Failing health shows as NotReady; the endpoint stays in the set.
    ctx.set_ready(service, "readiness-1", false).await;
    instances[0].ready = false;
    let snapshot = ctx
        .wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
    if let Snapshot::Endpoints(set) = &snapshot {
        let down = set
            .endpoints
            .iter()
            .find(|e| e.address == instances[0].address)
            .expect("checked by expect_instances");
        assert_eq!(
            down.readiness,
            Readiness::NotReady,
            "a failing instance must be NotReady"
        );
    }

    // And back.
    ctx.set_ready(service, "readiness-1", true).await;
    instances[0].ready = true;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // An instance registered not ready is listed as NotReady, not left out.
    instances.push(TestInstance {
        ready: false,
        ..TestInstance::new("readiness-3", addr(33), 8080)
    });
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
}

async fn identity_and_labels(ctx: &Ctx<'_>) {
    let service = "identity-web";
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut instances = vec![
        // The platform default identity (service name, or the Kubernetes "default" account).
        TestInstance {
            labels: labels(&[("team", "payments"), ("tier", "backend")]),
            weight: Some(10),
            zone: Some("zone-a".into()),
            ..TestInstance::new("identity-1", addr(41), 8080)
        },
        // An explicit service account.
        TestInstance {
            service_account: Some("identity-sa".into()),
            labels: labels(&[("team", "payments"), ("canary", "true")]),
            weight: Some(90),
            zone: Some("zone-b".into()),
            ..TestInstance::new("identity-2", addr(42), 8080)
        },
    ];
    ctx.put(service, &instances).await;
    let mut watch = ctx.watch(service);
    let snapshot = ctx
        .wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    // Spell the identity out once more, so a failure names the SPIFFE ID a policy would see.
    let Snapshot::Endpoints(set) = snapshot else {
        unreachable!("checked by expect_instances")
    };
    let explicit = set
        .endpoints
        .iter()
        .find(|e| e.address == addr(42))
        .expect("checked by expect_instances");
    assert_eq!(
        explicit.identity.spiffe_id("mesh.local"),
        format!(
            "spiffe://mesh.local/ns/{}/sa/identity-sa",
            ctx.registry.namespace()
        )
    );

    // Label changes are changes.
    instances[0]
        .labels
        .insert("tier".to_string(), "frontend".to_string());
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;
}

async fn version_subset(ctx: &Ctx<'_>) {
    if !ctx.discovery.capabilities().version_subsets {
        return skipped(
            "version_subset",
            "the platform has a service per version (capabilities.version_subsets = false)",
        );
    }
    let with_version = |id: &str, n: usize, version: &str| TestInstance {
        labels: [(VERSION_LABEL.to_string(), version.to_string())].into(),
        ..TestInstance::new(id, addr(n), 8080)
    };
    // Tag style: one service `vsub-web`, instances labelled version=v1 / v2.
    let base = "vsub-web";
    let all = [
        with_version("vsub-1", 51, "v1"),
        with_version("vsub-2", 52, "v2"),
        with_version("vsub-3", 53, "v2"),
    ];
    ctx.put(base, &all).await;

    let mut whole = ctx.watch(base);
    ctx.wait_instances(&mut whole, base, base, &all, ctx.timeout)
        .await;

    let mut v2 = ctx.watch("vsub-web-v2");
    ctx.wait_instances(&mut v2, "vsub-web-v2", base, &all[1..], ctx.timeout)
        .await;
    let mut v1 = ctx.watch("vsub-web-v1");
    ctx.wait_instances(&mut v1, "vsub-web-v1", base, &all[..1], ctx.timeout)
        .await;

    // The base exists but has no v3 instances: an empty set, not NotFound.
    let mut v3 = ctx.watch("vsub-web-v3");
    ctx.wait_instances(&mut v3, "vsub-web-v3", base, &[], ctx.timeout)
        .await;

    // Relabelling moves an instance between subsets.
    let mut relabelled = all.clone();
    relabelled[0] = with_version("vsub-1", 51, "v2");
    ctx.put(base, &relabelled).await;
    ctx.wait_instances(&mut v2, "vsub-web-v2", base, &relabelled, ctx.timeout)
        .await;
    ctx.wait_instances(&mut v1, "vsub-web-v1", base, &[], ctx.timeout)
        .await;

    // Per-version style: a service of its own wins over the subset.
    let own = [TestInstance::new("vsub-own-1", addr(54), 9090)];
    ctx.put("vsub-web-v2", &own).await;
    ctx.wait_instances(&mut v2, "vsub-web-v2", "vsub-web-v2", &own, ctx.timeout)
        .await;
    // ... and when it goes away, the subset is back.
    ctx.delete("vsub-web-v2").await;
    ctx.wait_instances(&mut v2, "vsub-web-v2", base, &relabelled, ctx.timeout)
        .await;
}

async fn large_set(ctx: &Ctx<'_>) {
    let n = ctx.registry.features().large_set;
    if n == 0 {
        return skipped("large_set", "the harness cannot register a large service");
    }
    let service = "large-web";
    let instances: Vec<TestInstance> = (0..n)
        .map(|i| TestInstance::new(format!("large-{i}"), addr(1000 + i), 8080))
        .collect();
    ctx.put(service, &instances).await;
    let mut watch = ctx.watch(service);
    // A large registration may take a while to settle; allow a few change timeouts.
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout * 3)
        .await;
}

async fn outage(ctx: &Ctx<'_>) {
    if !ctx.registry.features().outage {
        return skipped("outage", "the harness cannot take the registry away");
    }
    let service = "outage-web";
    let mut instances = vec![
        TestInstance::new("outage-1", addr(61), 8080),
        TestInstance::new("outage-2", addr(62), 8080),
    ];
    ctx.put(service, &instances).await;
    let mut watch = ctx.watch(service);
    ctx.wait_instances(&mut watch, service, service, &instances, ctx.timeout)
        .await;

    ctx.registry
        .begin_outage()
        .await
        .unwrap_or_else(|e| panic!("harness: begin_outage failed: {e:#}"));
    let source = ctx.discovery.source_id();
    let deadline = tokio::time::Instant::now() + OUTAGE;
    let mut errors = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut watch)).await {
            Err(_) => break,
            Ok(None) => panic!("the watch ended during the outage; watches never end on their own"),
            Ok(Some(Err(e))) => {
                assert_eq!(
                    e.source_id, source,
                    "a staleness error must name the adapter's source id: {e}"
                );
                errors += 1;
            }
            Ok(Some(Ok(Snapshot::NotFound))) => {
                panic!("the snapshot regressed to NotFound during the outage")
            }
            Ok(Some(Ok(snapshot @ Snapshot::Endpoints(_)))) => {
                let caps = ctx.discovery.capabilities();
                if let Err(why) = expect_instances(
                    &snapshot,
                    &ctx.key(service),
                    service,
                    &instances,
                    &caps,
                    &source,
                ) {
                    panic!("the snapshot changed during the outage: {why}");
                }
            }
        }
    }
    assert!(
        errors > 0,
        "no Err item within {OUTAGE:?} of the outage: staleness must be reported"
    );
    println!("outage: {errors} staleness error(s) in {OUTAGE:?}");

    ctx.registry
        .end_outage()
        .await
        .unwrap_or_else(|e| panic!("harness: end_outage failed: {e:#}"));
    let back = tokio::time::Instant::now();
    instances.push(TestInstance::new("outage-3", addr(63), 8080));
    ctx.put(service, &instances).await;
    ctx.wait_instances(
        &mut watch,
        service,
        service,
        &instances,
        ctx.timeout + BACKOFF_CAP,
    )
    .await;
    println!(
        "outage: recovered {:?} after the registry returned",
        back.elapsed()
    );
}

async fn restart_watch(ctx: &Ctx<'_>) {
    let service = "restart-web";
    let mut instances = vec![TestInstance::new("restart-1", addr(71), 8080)];
    ctx.put(service, &instances).await;
    let mut first = ctx.watch(service);
    ctx.wait_instances(&mut first, service, service, &instances, ctx.timeout)
        .await;
    drop(first);

    // Changed while nobody watched: the new watch's first item is the current state.
    instances.push(TestInstance::new("restart-2", addr(72), 8080));
    ctx.put(service, &instances).await;
    // Give the registry time to apply the write before the watch starts (polling platforms).
    let mut probe = ctx.watch(service);
    ctx.wait_instances(&mut probe, service, service, &instances, ctx.timeout)
        .await;
    drop(probe);

    let mut second = ctx.watch(service);
    let caps = ctx.discovery.capabilities();
    let source = ctx.discovery.source_id();
    let key = ctx.key(service);
    match tokio::time::timeout(ctx.timeout, futures::StreamExt::next(&mut second)).await {
        Ok(Some(Ok(snapshot))) => {
            if let Err(why) = expect_instances(&snapshot, &key, service, &instances, &caps, &source)
            {
                panic!("a restarted watch's first item must be the current state: {why}");
            }
        }
        Ok(Some(Err(e))) => panic!("a restarted watch yielded an error first: {e}"),
        Ok(None) => panic!("a restarted watch ended"),
        Err(_) => panic!("a restarted watch yielded nothing within {:?}", ctx.timeout),
    }

    // Several watches of one service at once each see changes.
    let mut third = ctx.watch(service);
    instances.remove(0);
    ctx.put(service, &instances).await;
    ctx.wait_instances(&mut second, service, service, &instances, ctx.timeout)
        .await;
    ctx.wait_instances(&mut third, service, service, &instances, ctx.timeout)
        .await;
}
