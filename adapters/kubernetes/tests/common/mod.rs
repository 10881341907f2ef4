//! The test harness: `TestRegistry` over a Kubernetes API server, the in-repo fake or a real one
//! (`TRELLIS_TEST_KUBECONFIG`). Writes go through a real kube client either way, so the same code
//! drives both.
//!
//! `put_service` creates, per service: Pods (one per instance: labels, `serviceAccountName` when
//! the instance names one, else none so Kubernetes' `default` applies), EndpointSlices (grouped
//! by port, at most 100 endpoints each like the EndpointSlice controller; `ready` -> the ready
//! and serving conditions; zone; targetRef to the pod), and a selectorless Service (port 80 named
//! `http`, targetPort `http`, appProtocol `http`), so a real cluster's EndpointSlice controller
//! leaves the hand-made slices alone. On the fake server the pods are also owned by a ReplicaSet
//! owned by a Deployment named after the service; on a real cluster a ReplicaSet would delete
//! pods it did not create, so there the pods have no owner.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::ObjectMeta;
use serde_json::json;
use trellis_adapter_kubernetes::{KubernetesDiscovery, Options};
use trellis_discovery::Discovery;
use trellis_discovery_suite::{HarnessFeatures, TestInstance, TestRegistry};
use trellis_kube_fake::FakeApiServer;

/// The label tying test pods to their service.
pub const SERVICE_LABEL: &str = "trellis.test/service";
const SLICE_MAX: usize = 100;

pub struct KubeHarness {
    pub client: kube::Client,
    pub namespace: String,
    pub fake: Option<Arc<FakeApiServer>>,
    /// Create ReplicaSet/Deployment owners (fake server only).
    pub owners: bool,
    pub source: String,
}

/// A harness over a fresh fake API server.
pub async fn fake_harness() -> KubeHarness {
    let fake = Arc::new(
        FakeApiServer::start()
            .await
            .expect("start the fake API server"),
    );
    let config = kube::Config::new(fake.url().parse().expect("fake url"));
    KubeHarness {
        client: kube::Client::try_from(config).expect("kube client"),
        namespace: "trellis-test".into(),
        source: format!("kubernetes:{}", fake.url()),
        fake: Some(fake),
        owners: true,
    }
}

/// A harness over the cluster `TRELLIS_TEST_KUBECONFIG` names, or `None` (with the reason
/// printed) when it is unset.
pub async fn real_harness() -> Option<KubeHarness> {
    let Ok(path) = std::env::var("TRELLIS_TEST_KUBECONFIG") else {
        println!(
            "skipped: TRELLIS_TEST_KUBECONFIG is not set (a kubeconfig for a real API server)"
        );
        return None;
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading TRELLIS_TEST_KUBECONFIG={path}: {e}"));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("loading TRELLIS_TEST_KUBECONFIG={path}: {e}"));
    let source = format!("kubernetes:{}", config.cluster_url);
    let client = kube::Client::try_from(config).expect("kube client");
    let namespace = format!("trellis-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {namespace}: {e}"),
    }
    Some(KubeHarness {
        client,
        namespace,
        fake: None,
        owners: false,
        source,
    })
}

impl KubeHarness {
    pub fn adapter(&self) -> KubernetesDiscovery {
        KubernetesDiscovery::with_client(
            self.client.clone(),
            self.source.clone().into(),
            Options {
                namespace: Some(self.namespace.clone()),
            },
        )
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn pod_name(service: &str, id: &str) -> String {
        let id: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("{service}-{id}")
    }

    /// The pod `put_service` writes for `instance`.
    pub fn pod_for(&self, service: &str, instance: &TestInstance) -> Pod {
        let mut labels: BTreeMap<String, String> = instance.labels.clone();
        labels.insert(SERVICE_LABEL.into(), service.into());
        let owner = self.owners.then(|| {
            vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "ReplicaSet".into(),
                    name: format!("{service}-rs"),
                    uid: format!("uid-{service}-rs"),
                    controller: Some(true),
                    ..Default::default()
                },
            ]
        });
        serde_json::from_value(json!({
            "metadata": {
                "name": Self::pod_name(service, &instance.id),
                "namespace": self.namespace,
                "labels": labels,
                "ownerReferences": owner,
            },
            "spec": {
                "serviceAccountName": instance.service_account,
                "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
            },
        }))
        .expect("a valid pod")
    }

    /// The EndpointSlices `put_service` writes for `instances`.
    pub fn slices_for(&self, service: &str, instances: &[TestInstance]) -> Vec<EndpointSlice> {
        let mut by_port: Vec<(u16, Vec<&TestInstance>)> = Vec::new();
        for i in instances {
            match by_port.iter_mut().find(|(p, _)| *p == i.port) {
                Some((_, list)) => list.push(i),
                None => by_port.push((i.port, vec![i])),
            }
        }
        let mut slices = Vec::new();
        for (port, group) in by_port {
            for chunk in group.chunks(SLICE_MAX) {
                let endpoints: Vec<serde_json::Value> = chunk
                    .iter()
                    .map(|i| {
                        json!({
                            "addresses": [i.address.to_string()],
                            "conditions": {"ready": i.ready, "serving": i.ready, "terminating": false},
                            "targetRef": {"kind": "Pod", "name": Self::pod_name(service, &i.id), "namespace": self.namespace},
                            "zone": i.zone,
                        })
                    })
                    .collect();
                slices.push(json!({
                    "metadata": {
                        "name": format!("{service}-{}", slices.len()),
                        "namespace": self.namespace,
                        "labels": {
                            "kubernetes.io/service-name": service,
                            "endpointslice.kubernetes.io/managed-by": "trellis-test",
                        },
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": port, "protocol": "TCP", "appProtocol": "http"}],
                    "endpoints": endpoints,
                }));
            }
        }
        slices
            .into_iter()
            .map(|s| serde_json::from_value(s).expect("a valid slice"))
            .collect()
    }

    fn service(&self, service: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": service, "namespace": self.namespace},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}]},
        }))
        .expect("a valid service")
    }

    async fn ensure_owners(&self, service: &str) -> anyhow::Result<()> {
        if !self.owners {
            return Ok(());
        }
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": service, "namespace": self.namespace},
            "spec": {"replicas": 0, "selector": {"matchLabels": {SERVICE_LABEL: service}},
                     "template": {"metadata": {"labels": {SERVICE_LABEL: service}}, "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]}}},
        }))?;
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": format!("{service}-rs"), "namespace": self.namespace,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": service, "uid": format!("uid-{service}"), "controller": true}]},
            "spec": {"replicas": 0, "selector": {"matchLabels": {SERVICE_LABEL: service}}},
        }))?;
        create_if_missing(&self.api(), &deployment).await?;
        create_if_missing(&self.api(), &rs).await
    }
}

/// Creates `obj` or replaces the existing one (at its current resourceVersion).
pub async fn upsert<K>(api: &Api<K>, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), obj)
                .await
                .with_context(|| format!("creating {name}"))?;
        }
        Some(current) => {
            let mut obj = obj.clone();
            obj.meta_mut().resource_version = current.meta().resource_version.clone();
            api.replace(&name, &PostParams::default(), &obj)
                .await
                .with_context(|| format!("replacing {name}"))?;
        }
    }
    Ok(())
}

async fn create_if_missing<K>(api: &Api<K>, obj: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How many writes the harness issues at once.
const PARALLEL: usize = 32;

type Job = futures::future::BoxFuture<'static, anyhow::Result<()>>;

/// Runs the jobs, [`PARALLEL`] at a time; the first failure wins.
async fn run_parallel(jobs: Vec<Job>) -> anyhow::Result<()> {
    futures::stream::iter(jobs)
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn upsert_job<K>(api: &Api<K>, obj: &K) -> Job
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (api, obj) = (api.clone(), obj.clone());
    Box::pin(async move { upsert(&api, &obj).await })
}

fn delete_job<K>(api: &Api<K>, name: &str) -> Job
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (api, name) = (api.clone(), name.to_owned());
    Box::pin(async move { delete_ignoring_missing(&api, &name).await })
}

#[async_trait::async_trait]
impl TestRegistry for KubeHarness {
    fn features(&self) -> HarnessFeatures {
        HarnessFeatures {
            outage: self.fake.is_some(),
            change_timeout: Duration::from_secs(5),
            large_set: if self.fake.is_some() { 1000 } else { 200 },
        }
    }

    fn namespace(&self) -> String {
        self.namespace.clone()
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(self.adapter())
    }

    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()> {
        self.ensure_owners(service).await?;
        // Pods first, so a slice never names a pod the adapter has not seen.
        let pods: Api<Pod> = self.api();
        let selector = ListParams::default().labels(&format!("{SERVICE_LABEL}={service}"));
        let existing: BTreeMap<String, Pod> = pods
            .list(&selector)
            .await?
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let wanted: Vec<Pod> = instances.iter().map(|i| self.pod_for(service, i)).collect();
        let changed: Vec<&Pod> = wanted
            .iter()
            .filter(|p| {
                existing
                    .get(p.metadata.name.as_deref().unwrap_or(""))
                    .is_none_or(|e| {
                        e.metadata.labels != p.metadata.labels
                            || e.spec.as_ref().and_then(|s| s.service_account_name.clone())
                                != p.spec.as_ref().and_then(|s| s.service_account_name.clone())
                    })
            })
            .collect();
        run_parallel(changed.into_iter().map(|p| upsert_job(&pods, p)).collect()).await?;

        let slices_api: Api<EndpointSlice> = self.api();
        let slice_selector =
            ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        let old_slices = slices_api.list(&slice_selector).await?.items;
        let new_slices = self.slices_for(service, instances);
        run_parallel(
            new_slices
                .iter()
                .map(|s| upsert_job(&slices_api, s))
                .collect(),
        )
        .await?;
        let keep: Vec<&str> = new_slices
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        for old in &old_slices {
            let name = old.metadata.name.as_deref().unwrap_or("");
            if !keep.contains(&name) {
                delete_ignoring_missing(&slices_api, name).await?;
            }
        }
        let wanted_names: Vec<&str> = wanted
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        let stale: Vec<&String> = existing
            .keys()
            .filter(|n| !wanted_names.contains(&n.as_str()))
            .collect();
        run_parallel(stale.into_iter().map(|n| delete_job(&pods, n)).collect()).await?;

        let services: Api<Service> = self.api();
        if services.get_opt(service).await?.is_none() {
            create_if_missing(&services, &self.service(service)).await?;
        }
        Ok(())
    }

    async fn delete_service(&self, service: &str) -> anyhow::Result<()> {
        delete_ignoring_missing(&self.api::<Service>(), service).await?;
        let slices: Api<EndpointSlice> = self.api();
        let list = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await?;
        for s in list.items {
            delete_ignoring_missing(&slices, s.metadata.name.as_deref().unwrap_or("")).await?;
        }
        let pods: Api<Pod> = self.api();
        let list = pods
            .list(&ListParams::default().labels(&format!("{SERVICE_LABEL}={service}")))
            .await?;
        run_parallel(
            list.items
                .iter()
                .map(|p| delete_job(&pods, p.metadata.name.as_deref().unwrap_or("")))
                .collect(),
        )
        .await?;
        if self.owners {
            delete_ignoring_missing(&self.api::<ReplicaSet>(), &format!("{service}-rs")).await?;
            delete_ignoring_missing(&self.api::<Deployment>(), service).await?;
        }
        Ok(())
    }

    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()> {
        let pod = Self::pod_name(service, instance_id);
        let slices: Api<EndpointSlice> = self.api();
        let list = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await?;
        for mut slice in list.items {
            let mut hit = false;
            for ep in slice.endpoints.iter_mut().flatten() {
                if ep.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod.as_str()) {
                    let c = ep.conditions.get_or_insert_with(Default::default);
                    c.ready = Some(ready);
                    c.serving = Some(ready);
                    hit = true;
                }
            }
            if hit {
                let name = slice.metadata.name.clone().unwrap_or_default();
                slices
                    .replace(&name, &PostParams::default(), &slice)
                    .await?;
                return Ok(());
            }
        }
        anyhow::bail!("no EndpointSlice of {service} names pod {pod}")
    }

    async fn begin_outage(&self) -> anyhow::Result<()> {
        self.fake
            .as_ref()
            .context("outage needs the fake server")?
            .begin_outage();
        Ok(())
    }

    async fn end_outage(&self) -> anyhow::Result<()> {
        self.fake
            .as_ref()
            .context("outage needs the fake server")?
            .end_outage()
            .await?;
        Ok(())
    }
}
