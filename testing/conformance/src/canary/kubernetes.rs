//! The Flagger canary on Kubernetes: the fake API server in the test process, or a real one
//! (`TRELLIS_TEST_KUBECONFIG`), with the mesh's pods on hosts ([`crate::harness::hosts`]: an API
//! server refuses loopback addresses in EndpointSlices).
//!
//! What Flagger and the cluster's own controllers would write, written here through the API
//! (../shared/flagger/CONTRACT.md sections 1 and 2):
//!
//! - Flagger's objects: the Deployments `podinfo` (the canary) and `podinfo-primary`, the
//!   Services `podinfo` (apex), `podinfo-primary` and `podinfo-canary` (port `http` 9898, no
//!   appProtocol, Flagger's labels and annotations), and the TrafficSplit `podinfo` at the
//!   version under test, created at 0/100 and then every write a GET and a full PUT carrying the
//!   fetched resourceVersion, backends canary then primary.
//! - What the Deployment, ReplicaSet and EndpointSlice controllers would write, since nothing
//!   runs them here: on the fake, a ReplicaSet per (Deployment, revision) owned by its
//!   Deployment, Pods (generated names, `pod-template-hash`, the ServiceAccount `podinfo`) owned
//!   by the ReplicaSet, the Services with Flagger's selectors and one EndpointSlice per Service
//!   (`managed-by: endpointslice-controller.k8s.io`, owned by its Service) listing the ready
//!   pods. On a real API server its controllers would fight those writes, so: the Deployments
//!   are `paused` (the Deployment controller creates no ReplicaSet for a paused Deployment), Pods
//!   are owned by their Deployment directly (no ReplicaSet controller deletes them), Services
//!   have no selector and their slices are `managed-by: trellis-conformance` (legal: the
//!   endpoint controllers leave such slices alone).
//! - The TrafficSplit conversion: every SMI CRD is stored with its conversion webhook, and the
//!   controller serves it (`--webhook`, `--webhook-url https://<test address>:PORT`) and writes
//!   the caBundle, so a write at v1alpha1, v1alpha2 or v1alpha3 is converted to the stored
//!   version through the running controller, as a real API server does. On a real server the
//!   CRDs must be installed (`trellis crds`) and the API server must reach the test's address
//!   on the bridge (a cluster on this machine, e.g. kind).
//! - Identity: every proxy proves its ServiceAccount (`podinfo`, `loadtester`) with a token:
//!   issued by the fake for TokenReview, a bootstrap token on a real server (the test cannot
//!   mint that server's tokens). The controller is `--permissive` (the split is under test, not
//!   access), so no TrafficTarget is needed; traffic between proxies is mTLS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{Caller, NAMESPACE, PORT, Pod, SplitVersion};
use crate::harness::hosts::{Hosts, Network};
use crate::harness::mesh::TRUST_DOMAIN;
use crate::harness::platform::{Platform, PlatformKind, Started, TOKEN_AUDIENCE};
use crate::harness::process::{self, Process};

/// The hosts of a canary on Kubernetes: one per pod the replay starts, and the loadtester.
pub const HOSTS: [&str; 5] = ["pod1", "pod2", "pod3", "pod4", "loadtester"];

/// The three Services Flagger creates, with the Deployment whose pods each selects.
const SERVICES: [(&str, &str); 3] = [
    ("podinfo", "podinfo-primary"),
    ("podinfo-primary", "podinfo-primary"),
    ("podinfo-canary", "podinfo"),
];

/// The image of every pod object (nothing runs it on the fake; on a real server it is what the
/// kubelet runs, and the harness's real-cluster column uses the same).
const IMAGE: &str = "registry.k8s.io/pause:3.10";

/// A controller on Kubernetes, its pods' hosts, and the objects written for the canary.
pub struct KubeCanary {
    kind: PlatformKind,
    _controller: Process,
    pub grpc: SocketAddr,
    client: kube::Client,
    /// Token files by ServiceAccount.
    tokens: BTreeMap<String, PathBuf>,
    log_dir: PathBuf,
    state: Mutex<State>,
    /// Whether this run created the namespace (a real server: deleted at cleanup).
    created_namespace: bool,
    /// The API server (the fake lives here) goes after the controller that watches it.
    _platform: Platform,
    _dir: tempfile::TempDir,
    /// Last: the hosts go after every process on them.
    pub network: Network,
}

impl std::fmt::Debug for KubeCanary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCanary")
            .field("kind", &self.kind)
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

/// The pod objects written so far.
#[derive(Default)]
struct State {
    /// uid by (kind, name) of the owners written (Deployments, ReplicaSets, Services).
    uids: BTreeMap<(String, String), String>,
    /// The pod object of each started pod, by its inbound address.
    pods: BTreeMap<SocketAddr, PodObject>,
}

#[derive(Clone, Debug)]
struct PodObject {
    name: String,
    uid: String,
    deployment: String,
}

impl KubeCanary {
    /// Starts the hosts (near `198.18.<subnet>.0`), the API server of `kind`
    /// ([`PlatformKind::Kubernetes`] or [`PlatformKind::KubernetesReal`]), the controller with its
    /// conversion webhook, and Flagger's objects before the first tick: the Deployments, the
    /// Services (no endpoints yet). `Ok(Err(reason))` when it cannot run here.
    pub async fn start(
        kind: PlatformKind,
        subnet: u8,
        log_dir: &Path,
    ) -> anyhow::Result<Result<Self, String>> {
        if !matches!(
            kind,
            PlatformKind::Kubernetes | PlatformKind::KubernetesReal
        ) {
            bail!("a canary on Kubernetes runs on kubernetes or kubernetes-real, not {kind:?}");
        }
        let network = match Hosts::create(subnet, &HOSTS)? {
            Ok(hosts) => Network::Hosts(hosts),
            Err(reason) => return Ok(Err(reason)),
        };
        let dir = tempfile::tempdir()?;
        let platform = match Platform::start(kind, dir.path(), log_dir, &network).await? {
            Started::Ready(p) => *p,
            Started::Skipped(reason) => return Ok(Err(reason)),
        };
        let (client, kubeconfig, fake) = platform
            .kubernetes()
            .context("a Kubernetes platform without a client")?;
        let client = client.clone();
        let kubeconfig = kubeconfig.to_path_buf();
        let crds = Api::<DynamicObject>::all_with(client.clone(), &crd_resource());
        match fake {
            Some(fake) => {
                // The CRDs as `trellis crds` writes them: every version served, v1alpha4 stored,
                // conversion through the webhook (whose URL and caBundle the controller writes).
                let crd_type = trellis_kube_fake::ResourceType::new(
                    "apiextensions.k8s.io",
                    "v1",
                    "customresourcedefinitions",
                    "CustomResourceDefinition",
                    false,
                );
                fake.register(crd_type.clone());
                for generated in trellis_smi::crd::generate() {
                    fake.store()
                        .apply(&crd_type, serde_json::to_value(&generated.crd)?)
                        .map_err(|e| anyhow::anyhow!("storing the {} CRD: {e}", generated.kind))?;
                }
            }
            None => {
                if crds.get_opt(SPLIT_CRD).await?.is_none() {
                    return Ok(Err(format!(
                        "the API server of TRELLIS_TEST_KUBECONFIG has no {SPLIT_CRD} CRD (install them with `trellis crds`)"
                    )));
                }
            }
        }

        // Tokens: the fake's TokenReview knows the ones it issued; a real server's would need a
        // pod, so there the controller also accepts bootstrap tokens.
        let token_dir = dir.path().join("tokens");
        std::fs::create_dir_all(&token_dir)?;
        let mut tokens = BTreeMap::new();
        let mut bootstrap = String::from("tokens:\n");
        for sa in ["podinfo", "loadtester"] {
            let token = match fake {
                Some(fake) => fake.issue_service_account_token(NAMESPACE, sa, &[TOKEN_AUDIENCE]),
                None => {
                    use sha2::Digest as _;
                    let token = hex::encode(rand::random::<[u8; 32]>());
                    let digest = hex::encode(sha2::Sha256::digest(token.as_bytes()));
                    bootstrap.push_str(&format!(
                        "- workload: {NAMESPACE}/{sa}\n  sha256: {digest}\n"
                    ));
                    token
                }
            };
            let path = token_dir.join(sa);
            std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
            tokens.insert(sa.to_owned(), path);
        }

        // The controller runs in the test's namespace on its leg on the bridge: the hosts reach
        // it there, and so does the API server (the fake in this process, or a real one on this
        // machine) for the conversion webhook.
        let test_ip = network.test_ip();
        let webhook = SocketAddr::new(
            test_ip,
            std::net::TcpListener::bind((test_ip, 0))?
                .local_addr()?
                .port(),
        );
        let any_port = SocketAddr::new(test_ip, 0).to_string();
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--grpc".into(),
            any_port.clone(),
            "--admin".into(),
            any_port,
            "--platform".into(),
            "kubernetes".into(),
            "--permissive".into(),
            "--leader-elect=false".into(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
            "--webhook".into(),
            webhook.to_string(),
            "--webhook-url".into(),
            format!("https://{webhook}"),
        ];
        if fake.is_none() {
            let path = dir.path().join("bootstrap-tokens.yaml");
            std::fs::write(&path, bootstrap)?;
            args.extend(["--bootstrap-tokens".into(), path.display().to_string()]);
        }
        let mut controller = Process::spawn(
            "controller",
            &process::binary(process::TRELLIS)?,
            &args,
            &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
            log_dir,
        )?;
        let grpc = controller
            .wait_line("`grpc listening on ADDR`", process::START_TIMEOUT, |l| {
                l.strip_prefix("grpc listening on ")?.parse().ok()
            })
            .await?;
        // Writes at another version than the stored one fail until the CRD names the webhook.
        let expected = format!("https://{webhook}/convert");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let crd = crds.get(SPLIT_CRD).await?;
            let config = crd.data.pointer("/spec/conversion/webhook/clientConfig");
            if config.and_then(|c| c["url"].as_str()) == Some(expected.as_str())
                && config.is_some_and(|c| c["caBundle"].is_string())
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the controller did not write its webhook ({expected}) and caBundle into {SPLIT_CRD} within 20 s; its log:\n{}",
                    controller.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let mut canary = Self {
            kind,
            _controller: controller,
            grpc,
            client,
            tokens,
            log_dir: log_dir.to_path_buf(),
            state: Mutex::new(State::default()),
            created_namespace: false,
            _platform: platform,
            _dir: dir,
            network,
        };
        canary.created_namespace = canary.flagger_objects().await?;
        Ok(Ok(canary))
    }

    fn real(&self) -> bool {
        self.kind == PlatformKind::KubernetesReal
    }

    /// The Namespace, ServiceAccounts, Deployments and Services (with empty slices) as they are
    /// when Flagger's initialization starts; whether the namespace was created here.
    async fn flagger_objects(&self) -> anyhow::Result<bool> {
        let namespaces = Api::<DynamicObject>::all_with(
            self.client.clone(),
            &resource("v1", "Namespace", "namespaces"),
        );
        let created_namespace = if namespaces.get_opt(NAMESPACE).await?.is_none() {
            namespaces
                .create(
                    &PostParams::default(),
                    &object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))?,
                )
                .await
                .context("creating the namespace")?;
            true
        } else {
            false
        };
        for sa in ["podinfo", "loadtester"] {
            self.apply(
                &resource("v1", "ServiceAccount", "serviceaccounts"),
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NAMESPACE}}),
            )
            .await?;
        }
        for deployment in ["podinfo", "podinfo-primary"] {
            let labels = json!({"app": deployment});
            let written = self
                .apply(
                    &resource("apps/v1", "Deployment", "deployments"),
                    json!({
                        "apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": deployment, "namespace": NAMESPACE, "labels": labels},
                        "spec": {
                            "replicas": 0,
                            "paused": self.real(),
                            "selector": {"matchLabels": labels},
                            "template": {"metadata": {"labels": labels}, "spec": pod_spec()},
                        },
                    }),
                )
                .await?;
            self.remember("Deployment", deployment, &written)?;
        }
        for (service, selects) in SERVICES {
            let mut spec = json!({
                "type": "ClusterIP",
                "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": PORT}],
            });
            if !self.real() {
                spec["selector"] = json!({"app": selects});
            }
            let written = self
                .apply(
                    &resource("v1", "Service", "services"),
                    json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {
                            "name": service, "namespace": NAMESPACE,
                            "labels": {"app": service},
                            "annotations": {
                                "kustomize.toolkit.fluxcd.io/reconcile": "disabled",
                                "helm.toolkit.fluxcd.io/driftDetection": "disabled",
                            },
                        },
                        "spec": spec,
                    }),
                )
                .await?;
            self.remember("Service", service, &written)?;
            self.slice(service, &[]).await?;
        }
        Ok(created_namespace)
    }

    /// Starts a pod of `deployment` at `version` on host `pod<n>`, proving ServiceAccount
    /// `podinfo`, and writes its Pod object (and on the fake its ReplicaSet) as the Deployment
    /// and ReplicaSet controllers would. It gets no endpoint until [`KubeCanary::services`] lists it.
    pub async fn pod(&self, deployment: &str, version: &str, n: u8) -> anyhow::Result<Pod> {
        let place = self.network.place(&format!("pod{n}"), None)?;
        let pod = Pod::start_at(
            deployment,
            version,
            &place,
            PORT,
            self.grpc,
            Some(&self.tokens["podinfo"]),
            &self.log_dir,
        )
        .await?;
        // `pod-template-hash` as the Deployment controller derives one per template: here the
        // template differs by revision.
        let hash = {
            use sha2::Digest as _;
            hex::encode(&sha2::Sha256::digest(format!("{deployment}/{version}").as_bytes())[..5])
        };
        let labels = json!({"app": deployment, "pod-template-hash": hash});
        let owner = if self.real() {
            self.owner_ref("apps/v1", "Deployment", deployment)?
        } else {
            let replica_set = format!("{deployment}-{hash}");
            let written = self
                .apply(
                    &resource("apps/v1", "ReplicaSet", "replicasets"),
                    json!({
                        "apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "metadata": {
                            "name": replica_set, "namespace": NAMESPACE, "labels": labels,
                            "ownerReferences": [self.owner_ref("apps/v1", "Deployment", deployment)?],
                        },
                        "spec": {
                            "replicas": 1,
                            "selector": {"matchLabels": labels},
                            "template": {"metadata": {"labels": labels}, "spec": pod_spec()},
                        },
                    }),
                )
                .await?;
            self.remember("ReplicaSet", &replica_set, &written)?;
            self.owner_ref("apps/v1", "ReplicaSet", &replica_set)?
        };
        let pods = self.api(&resource("v1", "Pod", "pods"));
        let created = pods
            .create(
                &PostParams::default(),
                &object(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {
                        "generateName": format!("{deployment}-{hash}-"),
                        "namespace": NAMESPACE,
                        "labels": labels,
                        "ownerReferences": [owner],
                    },
                    "spec": pod_spec(),
                }))?,
            )
            .await
            .with_context(|| format!("creating a pod of {deployment} {version}"))?;
        let name = created
            .metadata
            .name
            .clone()
            .context("pod without a name")?;
        let uid = created.metadata.uid.clone().context("pod without a uid")?;
        self.state.lock().expect("state lock").pods.insert(
            pod.inbound,
            PodObject {
                name,
                uid,
                deployment: deployment.into(),
            },
        );
        Ok(pod)
    }

    /// The loadtester: a meshed client on its own host, proving ServiceAccount `loadtester`.
    pub async fn caller(&self) -> anyhow::Result<Caller> {
        let place = self.network.place("loadtester", None)?;
        Caller::start_at(
            &place,
            self.grpc,
            Some(&self.tokens["loadtester"]),
            &self.log_dir,
        )
        .await
    }

    /// The endpoints as the EndpointSlice controller would write them once `primary` and
    /// `canary` are the ready pods: `podinfo` and `podinfo-primary` list the primary pods,
    /// `podinfo-canary` the canary pods (none when it is scaled to zero). Pods no longer listed
    /// are then deleted and each Deployment's replicas set to what it has, as a scale-down does.
    pub async fn services(&self, primary: &[&Pod], canary: &[&Pod]) -> anyhow::Result<()> {
        self.slice("podinfo", primary).await?;
        self.slice("podinfo-primary", primary).await?;
        self.slice("podinfo-canary", canary).await?;
        let listed: BTreeSet<SocketAddr> =
            primary.iter().chain(canary).map(|p| p.inbound).collect();
        let gone: Vec<(SocketAddr, PodObject)> = {
            let state = self.state.lock().expect("state lock");
            state
                .pods
                .iter()
                .filter(|(addr, _)| !listed.contains(addr))
                .map(|(a, o)| (*a, o.clone()))
                .collect()
        };
        let pods = self.api(&resource("v1", "Pod", "pods"));
        for (addr, pod) in gone {
            delete(&pods, &pod.name).await?;
            self.state.lock().expect("state lock").pods.remove(&addr);
        }
        let mut replicas: BTreeMap<String, i64> = BTreeMap::new();
        for deployment in ["podinfo", "podinfo-primary"] {
            replicas.insert(deployment.into(), 0);
        }
        for pod in self.state.lock().expect("state lock").pods.values() {
            *replicas.entry(pod.deployment.clone()).or_default() += 1;
        }
        let deployments = self.api(&resource("apps/v1", "Deployment", "deployments"));
        for (deployment, count) in replicas {
            let mut current = deployments.get(&deployment).await?;
            if current.data["spec"]["replicas"] != json!(count) {
                current.data["spec"]["replicas"] = json!(count);
                deployments
                    .replace(&deployment, &PostParams::default(), &current)
                    .await
                    .with_context(|| format!("scaling {deployment} to {count}"))?;
            }
        }
        Ok(())
    }

    /// Writes the TrafficSplit `podinfo` at `version` as Flagger's router does: created at the
    /// first write, then GET and a full PUT of the spec with the fetched resourceVersion.
    pub async fn split(&self, version: SplitVersion, canary: u32) -> anyhow::Result<()> {
        let api = self.api(&split_resource(version));
        let document: Value = serde_yaml_ng::from_str(&version.yaml(canary))?;
        match api.get_opt("podinfo").await.with_context(|| {
            format!(
                "GET trafficsplits.{}.split.smi-spec.io podinfo",
                version.name()
            )
        })? {
            None => {
                api.create(&PostParams::default(), &object(document)?)
                    .await
                    .with_context(|| format!("creating the TrafficSplit at {}", version.name()))?;
            }
            Some(mut current) => {
                current.data["spec"] = document["spec"].clone();
                api.replace("podinfo", &PostParams::default(), &current)
                    .await
                    .with_context(|| {
                        format!(
                            "PUT of the TrafficSplit at {} (canary {canary})",
                            version.name()
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// The TrafficSplit read back at `version` (through the webhook's conversion when that is not
    /// the stored version).
    pub async fn read_split(&self, version: SplitVersion) -> anyhow::Result<Value> {
        let read = self
            .api(&split_resource(version))
            .get("podinfo")
            .await
            .with_context(|| format!("reading the TrafficSplit at {}", version.name()))?;
        Ok(serde_json::to_value(&read)?)
    }

    /// Deletes what this run wrote on a real server (the fake goes away with the test).
    pub async fn cleanup(&self) {
        if !self.real() {
            return;
        }
        let split = self.api(&split_resource(SplitVersion::V1alpha3));
        let _ = delete(&split, "podinfo").await;
        let pods: Vec<String> = {
            let state = self.state.lock().expect("state lock");
            state.pods.values().map(|p| p.name.clone()).collect()
        };
        let pod_api = self.api(&resource("v1", "Pod", "pods"));
        for pod in pods {
            let _ = delete(&pod_api, &pod).await;
        }
        let slices = self.api(&resource(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            "endpointslices",
        ));
        let services = self.api(&resource("v1", "Service", "services"));
        for (service, _) in SERVICES {
            let _ = delete(&slices, &slice_name(service)).await;
            let _ = delete(&services, service).await;
        }
        let deployments = self.api(&resource("apps/v1", "Deployment", "deployments"));
        for deployment in ["podinfo", "podinfo-primary"] {
            let _ = delete(&deployments, deployment).await;
        }
        let accounts = self.api(&resource("v1", "ServiceAccount", "serviceaccounts"));
        for sa in ["podinfo", "loadtester"] {
            let _ = delete(&accounts, sa).await;
        }
        if self.created_namespace {
            let namespaces = Api::<DynamicObject>::all_with(
                self.client.clone(),
                &resource("v1", "Namespace", "namespaces"),
            );
            let _ = delete(&namespaces, NAMESPACE).await;
        }
    }

    /// Writes `service`'s EndpointSlice listing `pods` as ready.
    async fn slice(&self, service: &str, pods: &[&Pod]) -> anyhow::Result<()> {
        let mut endpoints = Vec::new();
        for pod in pods {
            let object = self
                .state
                .lock()
                .expect("state lock")
                .pods
                .get(&pod.inbound)
                .cloned()
                .with_context(|| {
                    format!(
                        "{} {} at {} has no pod object",
                        pod.deployment, pod.version, pod.inbound
                    )
                })?;
            endpoints.push(json!({
                "addresses": [pod.inbound.ip().to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": object.name, "uid": object.uid},
            }));
        }
        let managed_by = if self.real() {
            "trellis-conformance"
        } else {
            "endpointslice-controller.k8s.io"
        };
        self.apply(
            &resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": slice_name(service), "namespace": NAMESPACE,
                    "labels": {
                        "kubernetes.io/service-name": service,
                        "endpointslice.kubernetes.io/managed-by": managed_by,
                    },
                    "ownerReferences": [self.owner_ref("v1", "Service", service)?],
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
                "endpoints": endpoints,
            }),
        )
        .await?;
        Ok(())
    }

    fn api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NAMESPACE, resource)
    }

    /// Creates `value`, or replaces it (GET, then PUT with its resourceVersion) when it exists.
    async fn apply(&self, resource: &ApiResource, value: Value) -> anyhow::Result<DynamicObject> {
        let api = self.api(resource);
        let mut wanted = object(value)?;
        let name = wanted
            .metadata
            .name
            .clone()
            .context("metadata.name missing")?;
        match api.get_opt(&name).await? {
            Some(existing) => {
                wanted.metadata.resource_version = existing.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &wanted)
                    .await
                    .with_context(|| format!("replacing {} {name}", resource.kind))
            }
            None => api
                .create(&PostParams::default(), &wanted)
                .await
                .with_context(|| format!("creating {} {name}", resource.kind)),
        }
    }

    fn remember(&self, kind: &str, name: &str, written: &DynamicObject) -> anyhow::Result<()> {
        let uid = written
            .metadata
            .uid
            .clone()
            .with_context(|| format!("{kind} {name} has no uid"))?;
        self.state
            .lock()
            .expect("state lock")
            .uids
            .insert((kind.into(), name.into()), uid);
        Ok(())
    }

    /// A controller ownerReference to `kind/name`, written earlier.
    fn owner_ref(&self, api_version: &str, kind: &str, name: &str) -> anyhow::Result<Value> {
        let state = self.state.lock().expect("state lock");
        let uid = state
            .uids
            .get(&(kind.to_owned(), name.to_owned()))
            .with_context(|| format!("{kind} {name} was not written"))?;
        Ok(json!({
            "apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
            "controller": true, "blockOwnerDeletion": true,
        }))
    }

    /// The test's address on the bridge (where the controller and the fake listen).
    pub fn test_ip(&self) -> IpAddr {
        self.network.test_ip()
    }
}

const SPLIT_CRD: &str = "trafficsplits.split.smi-spec.io";

fn crd_resource() -> ApiResource {
    resource(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    )
}

fn split_resource(version: SplitVersion) -> ApiResource {
    resource(
        &format!("split.smi-spec.io/{}", version.name()),
        "TrafficSplit",
        "trafficsplits",
    )
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The one EndpointSlice of each Service (the controller's generated name, fixed here so the
/// replay can rewrite it).
fn slice_name(service: &str) -> String {
    format!("{service}-flagger")
}

/// The pod spec of every podinfo pod object.
fn pod_spec() -> Value {
    json!({
        "serviceAccountName": "podinfo",
        "containers": [{
            "name": "podinfod",
            "image": IMAGE,
            "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        }],
    })
}

fn object(value: Value) -> anyhow::Result<DynamicObject> {
    serde_json::from_value(value).context("not a Kubernetes object")
}

async fn delete(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<()> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {name}")),
    }
}
