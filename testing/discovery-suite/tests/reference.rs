//! The suite run against a small in-memory reference registry and adapter, to prove the scenarios
//! themselves: they pass against an adapter that keeps the contract, and the outage scenario sees
//! the staleness errors. (Adapters run the suite against their real registries; this is the suite's
//! own test.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tokio::sync::watch;
use trellis_discovery::{
    Capabilities, ChangeDelivery, Discovery, DiscoveryError, Endpoint, EndpointPort, EndpointSet,
    ErrorKind, IdentitySource, Provenance, Readiness, ServiceCatalog, ServiceKey, ServicePort,
    Snapshot, SourceId, VersionSubsets, WorkloadIdentity,
};
use trellis_discovery_suite::{HarnessFeatures, TestInstance, TestRegistry};

const NAMESPACE: &str = "reference";

#[derive(Clone, Default)]
struct State {
    services: BTreeMap<String, Vec<TestInstance>>,
    down: bool,
}

#[derive(Clone)]
struct Reference {
    state: Arc<watch::Sender<State>>,
    flaw: Flaw,
}

/// Contract breaches a flawed reference adapter commits, to prove the suite catches them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// Drops every label.
    DropsLabels,
    /// Yields NotFound instead of an error while the registry is down.
    ForgetsDuringOutage,
    /// Reports a default identity in the wrong namespace.
    WrongIdentityNamespace,
}

struct ReferenceAdapter {
    state: watch::Receiver<State>,
    flaw: Flaw,
}

fn source() -> SourceId {
    Arc::from("reference:memory")
}

fn unavailable() -> DiscoveryError {
    DiscoveryError::new(ErrorKind::Unavailable, true, source(), "registry is down")
}

fn snapshot(state: &State, key: &ServiceKey, flaw: Flaw) -> Snapshot {
    let Some(instances) = state.services.get(&key.name) else {
        return Snapshot::NotFound;
    };
    let endpoint = |i: &TestInstance| Endpoint {
        address: i.address.into(),
        ports: vec![EndpointPort {
            name: None,
            port: i.port,
        }],
        readiness: if i.ready {
            Readiness::Ready
        } else {
            Readiness::NotReady
        },
        identity: WorkloadIdentity::new(
            if flaw == Flaw::WrongIdentityNamespace {
                "elsewhere"
            } else {
                NAMESPACE
            },
            i.service_account
                .clone()
                .unwrap_or_else(|| key.name.clone()),
        ),
        owner: None,
        labels: if flaw == Flaw::DropsLabels {
            BTreeMap::new()
        } else {
            i.labels.clone()
        },
        weight: i.weight,
        zone: i.zone.clone(),
        protocol: None,
        provenance: Provenance {
            source: source(),
            confirmed_at: SystemTime::UNIX_EPOCH,
        },
    };
    Snapshot::Endpoints(EndpointSet {
        service: key.clone(),
        ports: instances
            .first()
            .map(|i| ServicePort {
                name: None,
                port: i.port,
                protocol: None,
            })
            .into_iter()
            .collect(),
        endpoints: instances.iter().map(endpoint).collect(),
    })
}

/// Yields `view(state)` whenever it changes, and an error every 200 ms while the registry is down.
fn follow<T: Clone + PartialEq + Send + 'static>(
    rx: watch::Receiver<State>,
    flaw: Flaw,
    view: impl Fn(&State) -> T + Send + Sync + 'static,
) -> BoxStream<'static, Result<T, DiscoveryError>> {
    let view = Arc::new(view);
    stream::unfold((rx, None::<T>), move |(mut rx, last)| {
        let view = view.clone();
        async move {
            loop {
                let state = rx.borrow_and_update().clone();
                if state.down && flaw == Flaw::ForgetsDuringOutage {
                    let empty = view(&State::default());
                    if last.as_ref() != Some(&empty) {
                        return Some((Ok(empty.clone()), (rx, Some(empty))));
                    }
                }
                if state.down {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Some((Err(unavailable()), (rx, last)));
                }
                let now = view(&state);
                if last.as_ref() != Some(&now) {
                    return Some((Ok(now.clone()), (rx, Some(now))));
                }
                if rx.changed().await.is_err() {
                    // The registry is gone for good; a watch still never ends on its own.
                    std::future::pending::<()>().await;
                }
            }
        }
    })
    .boxed()
}

impl Discovery for ReferenceAdapter {
    fn source_id(&self) -> SourceId {
        source()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delivery: ChangeDelivery::Push,
            health: true,
            terminating: false,
            weights: true,
            zones: true,
            owners: false,
            identity: IdentitySource::AttributeOrServiceName,
            version_subsets: false,
        }
    }

    fn services(&self) -> BoxStream<'static, Result<ServiceCatalog, DiscoveryError>> {
        follow(self.state.clone(), self.flaw, |s| {
            s.services
                .keys()
                .map(|name| ServiceKey::new(NAMESPACE, name.clone()))
                .collect::<Vec<_>>()
        })
        .map(|r| {
            r.map(|services| ServiceCatalog {
                source: source(),
                services,
                observed_at: SystemTime::now(),
            })
        })
        .boxed()
    }

    fn watch(&self, key: ServiceKey) -> BoxStream<'static, Result<Snapshot, DiscoveryError>> {
        let flaw = self.flaw;
        follow(self.state.clone(), flaw, move |s| snapshot(s, &key, flaw))
    }
}

#[async_trait::async_trait]
impl TestRegistry for Reference {
    fn features(&self) -> HarnessFeatures {
        HarnessFeatures {
            outage: true,
            change_timeout: Duration::from_secs(2),
            large_set: 10_000,
        }
    }

    fn namespace(&self) -> String {
        NAMESPACE.to_string()
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(VersionSubsets::new(ReferenceAdapter {
            state: self.state.subscribe(),
            flaw: self.flaw,
        }))
    }

    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()> {
        self.state.send_modify(|s| {
            s.services.insert(service.to_string(), instances.to_vec());
        });
        Ok(())
    }

    async fn delete_service(&self, service: &str) -> anyhow::Result<()> {
        self.state.send_modify(|s| {
            s.services.remove(service);
        });
        Ok(())
    }

    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()> {
        let mut found = false;
        self.state.send_modify(|s| {
            for i in s.services.get_mut(service).into_iter().flatten() {
                if i.id == instance_id {
                    i.ready = ready;
                    found = true;
                }
            }
        });
        anyhow::ensure!(found, "no instance {instance_id} in {service}");
        Ok(())
    }

    async fn begin_outage(&self) -> anyhow::Result<()> {
        self.state.send_modify(|s| s.down = true);
        Ok(())
    }

    async fn end_outage(&self) -> anyhow::Result<()> {
        self.state.send_modify(|s| s.down = false);
        Ok(())
    }
}

fn flawed(flaw: Flaw) -> Reference {
    Reference {
        state: Arc::new(watch::Sender::new(State::default())),
        flaw,
    }
}

async fn reference() -> Reference {
    flawed(Flaw::None)
}

trellis_discovery_suite::discovery_suite!(reference());

/// The churn and memory runners work end to end (small numbers: this is a test, not the bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runners_measure_something() {
    let registry = reference().await;
    let churn = trellis_discovery_suite::churn(&registry, 50).await;
    assert_eq!(churn.change_to_snapshot.samples, 50);
    assert!(churn.change_to_snapshot.p99 >= churn.change_to_snapshot.p50);
    churn.print("reference", "nothing", &churn.write);

    let memory = trellis_discovery_suite::memory(&registry, 1_000).await;
    assert_eq!(memory.endpoints, 1_000);
    assert!(
        memory.snapshot_bytes > 1_000 * std::mem::size_of::<Endpoint>(),
        "{memory:?}"
    );
    memory.print("reference", "nothing", 0);
}

// The suite catches contract breaches (a check that cannot fail would be worthless).

#[tokio::test]
#[should_panic(expected = "label team=None")]
async fn the_suite_catches_dropped_labels() {
    let registry = flawed(Flaw::DropsLabels);
    trellis_discovery_suite::run(
        trellis_discovery_suite::Scenario::IdentityAndLabels,
        &registry,
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "want ns reference sa identity-web")]
async fn the_suite_catches_a_wrong_identity() {
    let registry = flawed(Flaw::WrongIdentityNamespace);
    trellis_discovery_suite::run(
        trellis_discovery_suite::Scenario::IdentityAndLabels,
        &registry,
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "regressed to NotFound during the outage")]
async fn the_suite_catches_a_view_emptied_by_an_outage() {
    let registry = flawed(Flaw::ForgetsDuringOutage);
    trellis_discovery_suite::run(trellis_discovery_suite::Scenario::Outage, &registry).await;
}
