//! The platforms a conformance mesh runs on, each driven the way its users drive it:
//!
//! - **file**: a services YAML written by the harness (`--platform file=PATH`);
//! - **consul**: the `trellis-consul-double` process, instances registered through
//!   `PUT /v1/catalog/register` as a Consul agent does (`--platform consul=ADDR`);
//! - **cloudmap**: a `moto_server` process (`TRELLIS_MOTO_SERVER`), a namespace and instances
//!   created through the real AWS SDK (`--platform cloudmap=NAMESPACE,endpoint=URL`);
//! - **kubernetes**: the fake API server in the test process with the SMI CRDs registered, or a
//!   real cluster (`TRELLIS_TEST_KUBECONFIG`); Services, Pods and EndpointSlices (one per pod)
//!   created through the API, and the SMI policy applied as Kubernetes objects. Both run on hosts
//!   (the pods' addresses are their namespaces' 198.18.x.y: an API server refuses loopback
//!   endpoint addresses); the fake validates every write as a real server does.
//!
//! Off Kubernetes the SMI policy is a watched directory of the same YAML documents (`--policy`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aws_sdk_servicediscovery::Client as CloudMapClient;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::hosts::Network;
use super::process::{self, Process};
use trellis_echo::plain as http;

/// The namespace of every workload and policy. Consul OSS (what `--platform consul=ADDR` reads)
/// has only `default`, so the same SMI YAML works everywhere with it.
pub const NAMESPACE: &str = "default";

/// Which platform a mesh discovers its workloads on, and whether it runs on loopback or on
/// hosts ([`super::hosts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlatformKind {
    File,
    Consul,
    CloudMap,
    Kubernetes,
    /// A real API server named by `TRELLIS_TEST_KUBECONFIG`.
    KubernetesReal,
    /// Consul, each workload, the controller and the registry on their own hosts.
    ConsulHosts,
    /// Cloud Map (moto), each workload, the controller and the registry on their own hosts.
    CloudMapHosts,
    /// One mesh fed by two platforms, on hosts: `app-a` and `app-b` registered in Consul,
    /// `app-c` and `app-d` on Kubernetes (the fake API server); the root `app-svc` has an
    /// endpoint in each. SMI policy lives in Kubernetes.
    Mixed,
}

impl PlatformKind {
    pub const ALL: [PlatformKind; 8] = [
        PlatformKind::File,
        PlatformKind::Consul,
        PlatformKind::CloudMap,
        PlatformKind::Kubernetes,
        PlatformKind::KubernetesReal,
        PlatformKind::ConsulHosts,
        PlatformKind::CloudMapHosts,
        PlatformKind::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PlatformKind::File => "file",
            PlatformKind::Consul => "consul",
            PlatformKind::CloudMap => "cloudmap",
            PlatformKind::Kubernetes => "kubernetes",
            PlatformKind::KubernetesReal => "kubernetes-real",
            PlatformKind::ConsulHosts => "consul-hosts",
            PlatformKind::CloudMapHosts => "cloudmap-hosts",
            PlatformKind::Mixed => "mixed",
        }
    }

    /// On loopback, the pods of this platform's mesh listen on `127.0.<subnet>.<n>`: every pod
    /// has its own address (the adapters key endpoints by address) and all share one port (a
    /// split backend gets traffic only on the root's port number), and meshes of different
    /// platforms never collide. On hosts, the /24 of 198.18.0.0/16 tried first.
    pub fn subnet(self) -> u8 {
        match self {
            PlatformKind::File => 10,
            PlatformKind::Consul | PlatformKind::ConsulHosts => 20,
            PlatformKind::CloudMap | PlatformKind::CloudMapHosts => 30,
            PlatformKind::Kubernetes => 40,
            PlatformKind::KubernetesReal => 50,
            PlatformKind::Mixed => 60,
        }
    }

    /// Whether the mesh runs on hosts (network namespaces) rather than one loopback.
    ///
    /// Both Kubernetes columns do: a real API server refuses EndpointSlice addresses in
    /// 127.0.0.0/8 (`may not be in the loopback range`), and so does the fake, so their pods
    /// need addresses a network namespace holds, as real pods have.
    pub fn on_hosts(self) -> bool {
        matches!(
            self,
            PlatformKind::Kubernetes
                | PlatformKind::KubernetesReal
                | PlatformKind::ConsulHosts
                | PlatformKind::CloudMapHosts
                | PlatformKind::Mixed
        )
    }

    /// Whether the controller runs in the test's own (root) namespace, on the test's address on
    /// the bridge, rather than on the `controller` host. `kubernetes-real` only: hosts have no
    /// route beyond their bridge, and its controller must reach the real API server.
    pub fn controller_in_test_namespace(self) -> bool {
        self == PlatformKind::KubernetesReal
    }

    /// Why the `hosts:` scenario that takes the registry or the controller off the network
    /// cannot run on this platform (`None`: it can).
    pub fn cannot_unplug(self, role: &str) -> Option<&'static str> {
        match (self, role) {
            (PlatformKind::KubernetesReal, "controller") => Some(
                "the controller runs in the test's namespace (it must reach the real API server), so it has no switch port to pull",
            ),
            (PlatformKind::KubernetesReal, "registry") => {
                Some("the registry is the real API server, not a host of this test")
            }
            _ => None,
        }
    }
}

/// In the mixed mesh, whether the workload running as `service_account` is on Kubernetes (else
/// it is registered in Consul).
pub fn mixed_on_kubernetes(service_account: &str) -> bool {
    matches!(service_account, "service-c" | "service-d")
}

/// One instance of a service: a pod (its proxy's inbound address) and who it runs as.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Pod name, unique in the mesh (e.g. `app-b-0`).
    pub pod: String,
    pub address: SocketAddr,
    pub service_account: String,
    /// The `version` label.
    pub version: String,
}

/// A service and its instances, as registered.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub instances: Vec<Instance>,
}

/// A platform ready for a mesh, or the reason it cannot run here.
#[derive(Debug)]
pub enum Started {
    Ready(Box<Platform>),
    Skipped(String),
}

/// A running platform.
pub struct Platform {
    kind: PlatformKind,
    inner: Inner,
    /// Off Kubernetes: the watched SMI directory.
    policy_dir: PathBuf,
    /// On Kubernetes: the objects applied per policy name.
    applied: Mutex<BTreeMap<String, Vec<(ApiResource, String)>>>,
}

enum Inner {
    File {
        services: PathBuf,
    },
    Consul {
        _process: Process,
        addr: SocketAddr,
    },
    CloudMap {
        _moto: Process,
        url: String,
        client: CloudMapClient,
        namespace_id: String,
    },
    Kubernetes {
        _fake: Option<trellis_kube_fake::FakeApiServer>,
        client: kube::Client,
        kubeconfig: PathBuf,
    },
    /// Consul and Kubernetes feeding one controller ([`PlatformKind::Mixed`]).
    Mixed {
        consul: Box<Inner>,
        kubernetes: Box<Inner>,
    },
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("kind", &self.kind)
            .field("policy_dir", &self.policy_dir)
            .finish_non_exhaustive()
    }
}

impl Platform {
    /// Starts `kind` with its scratch files under `dir` and its process logs in `log_dir`; its
    /// registry runs at `network`'s place for `registry`.
    pub async fn start(
        kind: PlatformKind,
        dir: &Path,
        log_dir: &Path,
        network: &Network,
    ) -> anyhow::Result<Started> {
        let policy_dir = dir.join("policy");
        std::fs::create_dir_all(&policy_dir)?;
        let inner = match kind {
            PlatformKind::File => Inner::File {
                services: dir.join("services.yaml"),
            },
            PlatformKind::Consul | PlatformKind::ConsulHosts => {
                start_consul(log_dir, network).await?
            }
            PlatformKind::CloudMap | PlatformKind::CloudMapHosts => {
                let Some(moto) = std::env::var_os("TRELLIS_MOTO_SERVER") else {
                    return Ok(Started::Skipped(
                        "TRELLIS_MOTO_SERVER is unset (scripts/test installs moto[server] and sets it)"
                            .into(),
                    ));
                };
                let (moto, url) = start_moto(Path::new(&moto), log_dir, network).await?;
                let options = trellis_adapter_cloudmap::CloudMapOptions {
                    namespaces: vec![NAMESPACE.into()],
                    endpoint_url: Some(url.clone()),
                    region: Some(AWS_REGION.into()),
                    credentials: Some(trellis_adapter_cloudmap::StaticCredentials::new(
                        "test", "test",
                    )),
                    ..Default::default()
                };
                let client = trellis_adapter_cloudmap::explicit_client(&options);
                let namespace_id = create_cloudmap_namespace(&client).await?;
                Inner::CloudMap {
                    _moto: moto,
                    url,
                    client,
                    namespace_id,
                }
            }
            PlatformKind::Kubernetes => start_fake(dir, network).await?,
            PlatformKind::KubernetesReal => {
                let Some(path) = std::env::var_os("TRELLIS_TEST_KUBECONFIG") else {
                    return Ok(Started::Skipped(
                        "TRELLIS_TEST_KUBECONFIG is unset (a kubeconfig for a real API server with the SMI CRDs installed)"
                            .into(),
                    ));
                };
                let kubeconfig = PathBuf::from(path);
                let config = kube::Config::from_custom_kubeconfig(
                    kube::config::Kubeconfig::read_from(&kubeconfig)?,
                    &Default::default(),
                )
                .await
                .with_context(|| format!("loading {}", kubeconfig.display()))?;
                Inner::Kubernetes {
                    _fake: None,
                    client: kube::Client::try_from(config)?,
                    kubeconfig,
                }
            }
            PlatformKind::Mixed => Inner::Mixed {
                consul: Box::new(start_consul(log_dir, network).await?),
                kubernetes: Box::new(start_fake(dir, network).await?),
            },
        };
        Ok(Started::Ready(Box::new(Platform {
            kind,
            inner,
            policy_dir,
            applied: Mutex::new(BTreeMap::new()),
        })))
    }

    pub fn kind(&self) -> PlatformKind {
        self.kind
    }

    /// A projected ServiceAccount token for `service_account` (audience `trellis`, what the
    /// controller's TokenReview asks for), where the platform issues them: the fake API server.
    /// Elsewhere `None`: the workload proves itself with a bootstrap token.
    pub fn service_account_token(&self, service_account: &str) -> Option<String> {
        let inner = match &self.inner {
            Inner::Mixed { kubernetes, .. } if mixed_on_kubernetes(service_account) => kubernetes,
            inner => inner,
        };
        match inner {
            Inner::Kubernetes {
                _fake: Some(fake), ..
            } => Some(fake.issue_service_account_token(
                NAMESPACE,
                service_account,
                &[TOKEN_AUDIENCE],
            )),
            _ => None,
        }
    }

    /// The `trellis controller` arguments and environment that select this platform.
    pub fn controller_args(&self) -> (Vec<String>, Vec<(String, String)>) {
        let policy = || vec!["--policy".into(), self.policy_dir.display().to_string()];
        match &self.inner {
            // SMI policy lives in Kubernetes: no policy directory.
            Inner::Mixed { consul, kubernetes } => {
                let (mut args, mut env) = platform_args(consul);
                let (more, more_env) = platform_args(kubernetes);
                args.extend(more);
                env.extend(more_env);
                (args, env)
            }
            inner @ Inner::Kubernetes { .. } => platform_args(inner),
            inner => {
                let (mut args, env) = platform_args(inner);
                args.extend(policy());
                (args, env)
            }
        }
    }

    /// Registers every service with its instances.
    pub async fn register(&self, services: &[ServiceSpec]) -> anyhow::Result<()> {
        register(&self.inner, services).await
    }

    /// Removes one instance (`pod`) of `service` from the registry.
    pub async fn deregister(&self, service: &str, instance: &Instance) -> anyhow::Result<()> {
        let inner = match &self.inner {
            Inner::Mixed { kubernetes, .. } if mixed_on_kubernetes(&instance.service_account) => {
                kubernetes
            }
            Inner::Mixed { consul, .. } => consul,
            inner => inner,
        };
        match inner {
            Inner::File { .. } | Inner::Mixed { .. } => {
                bail!(
                    "deregistering is not done on the {} platform",
                    self.kind.name()
                )
            }
            Inner::Consul { addr, .. } => {
                let body = json!({"Node": instance.pod, "ServiceID": format!("{service}-{}", instance.pod)});
                let reply = http::request(
                    *addr,
                    http::Method::PUT,
                    "/v1/catalog/deregister",
                    Some(serde_json::to_vec(&body)?),
                )
                .await?;
                if reply.status != 200 {
                    bail!("consul deregister: HTTP {}: {}", reply.status, reply.text());
                }
                Ok(())
            }
            Inner::CloudMap {
                client,
                namespace_id,
                ..
            } => {
                let services = client
                    .list_services()
                    .filters(
                        aws_sdk_servicediscovery::types::ServiceFilter::builder()
                            .name(aws_sdk_servicediscovery::types::ServiceFilterName::NamespaceId)
                            .values(namespace_id)
                            .build()?,
                    )
                    .send()
                    .await
                    .context("ListServices")?;
                let id = services
                    .services()
                    .iter()
                    .find(|s| s.name() == Some(service))
                    .and_then(|s| s.id())
                    .with_context(|| format!("no Cloud Map service {service}"))?;
                client
                    .deregister_instance()
                    .service_id(id)
                    .instance_id(&instance.pod)
                    .send()
                    .await
                    .with_context(|| format!("DeregisterInstance {} of {service}", instance.pod))?;
                Ok(())
            }
            Inner::Kubernetes { client, .. } => {
                delete(
                    client,
                    &resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
                    &format!("{service}-{}", instance.pod),
                )
                .await
            }
        }
    }
}

/// Registers `services` on one platform.
async fn register(inner: &Inner, services: &[ServiceSpec]) -> anyhow::Result<()> {
    {
        match inner {
            Inner::File { services: path } => write_atomic(path, &services_yaml(services)),
            Inner::Consul { addr, .. } => {
                for service in services {
                    for i in &service.instances {
                        consul_register(*addr, &service.name, i).await?;
                    }
                }
                Ok(())
            }
            Inner::CloudMap {
                client,
                namespace_id,
                ..
            } => {
                for service in services {
                    cloudmap_register(client, namespace_id, service).await?;
                }
                Ok(())
            }
            Inner::Kubernetes { client, .. } => kube_register(client, services).await,
            Inner::Mixed { consul, kubernetes } => {
                let on = |kubernetes: bool| -> Vec<ServiceSpec> {
                    services
                        .iter()
                        .map(|s| ServiceSpec {
                            name: s.name.clone(),
                            instances: s
                                .instances
                                .iter()
                                .filter(|i| mixed_on_kubernetes(&i.service_account) == kubernetes)
                                .cloned()
                                .collect(),
                        })
                        .filter(|s| !s.instances.is_empty())
                        .collect()
                };
                Box::pin(register(consul, &on(false))).await?;
                Box::pin(register(kubernetes, &on(true))).await
            }
        }
    }
}

/// The `--platform` arguments and environment of one platform.
fn platform_args(inner: &Inner) -> (Vec<String>, Vec<(String, String)>) {
    match inner {
        Inner::File { services } => (
            vec!["--platform".into(), format!("file={}", services.display())],
            vec![],
        ),
        Inner::Consul { addr, .. } => (vec!["--platform".into(), format!("consul={addr}")], vec![]),
        Inner::CloudMap { url, .. } => (
            vec![
                "--platform".into(),
                format!("cloudmap={NAMESPACE},endpoint={url}"),
            ],
            // moto accepts any keys; nothing here reaches AWS.
            vec![
                ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
                ("AWS_REGION".into(), AWS_REGION.into()),
                ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ],
        ),
        Inner::Kubernetes { kubeconfig, .. } => (
            vec!["--platform".into(), "kubernetes".into()],
            vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        ),
        Inner::Mixed { .. } => unreachable!("a mixed platform's parts are single platforms"),
    }
}

/// The Consul double as a process at the registry's place.
async fn start_consul(log_dir: &Path, network: &Network) -> anyhow::Result<Inner> {
    let place = network.place("registry", None)?;
    let mut p = Process::spawn_in(
        place.netns.as_deref(),
        "consul-double",
        &process::binary(process::CONSUL_DOUBLE)?,
        &["--listen".into(), SocketAddr::new(place.ip, 0).to_string()],
        &[],
        log_dir,
    )?;
    let addr = p.listening_on().await?;
    Ok(Inner::Consul { _process: p, addr })
}

/// The fake API server in this process, with the SMI kinds (Leases and Events, which a
/// controller writes, are built in), reachable from the mesh's hosts, and its kubeconfig.
async fn start_fake(dir: &Path, network: &Network) -> anyhow::Result<Inner> {
    let fake = trellis_kube_fake::FakeApiServer::start_with(trellis_kube_fake::Options {
        listen: Some(SocketAddr::new(network.test_ip(), 0)),
        ..Default::default()
    })
    .await?;
    trellis_testing::register_smi(&fake);
    let kubeconfig = dir.join("kubeconfig");
    trellis_testing::write_kubeconfig(&fake, &kubeconfig)?;
    let client = trellis_testing::kube_client(&fake);
    Ok(Inner::Kubernetes {
        _fake: Some(fake),
        client,
        kubeconfig,
    })
}

impl Platform {
    /// Starts an outage of the registry when it is the fake API server in this process (the
    /// `kubernetes` column): it stops listening and drops every connection. `false` when the
    /// registry is elsewhere (a process on the registry host: unplug that instead).
    pub fn begin_api_outage(&self) -> bool {
        match &self.inner {
            Inner::Kubernetes {
                _fake: Some(fake), ..
            } => {
                fake.begin_outage();
                true
            }
            _ => false,
        }
    }

    /// Ends what [`Platform::begin_api_outage`] began.
    pub async fn end_api_outage(&self) -> anyhow::Result<()> {
        if let Inner::Kubernetes {
            _fake: Some(fake), ..
        } = &self.inner
        {
            fake.end_outage()
                .await
                .context("the fake API server listening again")?;
        }
        Ok(())
    }

    /// The Kubernetes client, its kubeconfig, and the fake API server when it is the fake: for
    /// tests that write their own objects (the Flagger replay's Deployments, Services, slices).
    pub fn kubernetes(
        &self,
    ) -> Option<(
        &kube::Client,
        &Path,
        Option<&trellis_kube_fake::FakeApiServer>,
    )> {
        match &self.inner {
            Inner::Kubernetes {
                _fake,
                client,
                kubeconfig,
            } => Some((client, kubeconfig, _fake.as_ref())),
            _ => None,
        }
    }

    /// The Kubernetes client, when SMI policy lives in Kubernetes.
    fn policy_client(&self) -> Option<&kube::Client> {
        match &self.inner {
            Inner::Kubernetes { client, .. } => Some(client),
            Inner::Mixed { kubernetes, .. } => match kubernetes.as_ref() {
                Inner::Kubernetes { client, .. } => Some(client),
                _ => None,
            },
            _ => None,
        }
    }

    /// Puts the SMI documents of `yaml` in force under `name`, replacing what `name` held before
    /// (objects `name` no longer holds are deleted).
    pub async fn apply_policy(&self, name: &str, yaml: &str) -> anyhow::Result<()> {
        match self.policy_client() {
            Some(client) => {
                let mut objects = Vec::new();
                for value in yaml_documents(yaml).with_context(|| format!("policy {name}"))? {
                    let (resource, object) = smi_object(&value)?;
                    upsert(client, &resource, object.clone()).await?;
                    objects.push((resource, object_name(&object)?));
                }
                let old = self
                    .applied
                    .lock()
                    .expect("applied lock")
                    .insert(name.to_owned(), objects.clone())
                    .unwrap_or_default();
                for (resource, object) in old {
                    if !objects
                        .iter()
                        .any(|(r, o)| r.kind == resource.kind && *o == object)
                    {
                        delete(client, &resource, &object).await?;
                    }
                }
                Ok(())
            }
            None => write_atomic(&self.policy_dir.join(format!("{name}.yaml")), yaml),
        }
    }

    /// Removes what `name` holds.
    pub async fn delete_policy(&self, name: &str) -> anyhow::Result<()> {
        match self.policy_client() {
            Some(client) => {
                let old = self
                    .applied
                    .lock()
                    .expect("applied lock")
                    .remove(name)
                    .unwrap_or_default();
                for (resource, object) in old {
                    delete(client, &resource, &object).await?;
                }
                Ok(())
            }
            None => {
                let path = self.policy_dir.join(format!("{name}.yaml"));
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    /// Deletes what the harness created on a real cluster (the fake and the other platforms go
    /// away with their processes).
    pub async fn cleanup(&self, services: &[ServiceSpec]) {
        let Inner::Kubernetes {
            _fake: None,
            client,
            ..
        } = &self.inner
        else {
            return;
        };
        let names: Vec<String> = self.applied.lock().expect("lock").keys().cloned().collect();
        for name in names {
            let _ = self.delete_policy(&name).await;
        }
        for (resource, name) in kube_objects(services)
            .iter()
            .filter_map(|(r, o)| Some((r, object_name(o).ok()?)))
        {
            let _ = delete(client, resource, &name).await;
        }
    }
}

const AWS_REGION: &str = "us-east-1";

/// The audience the controller's TokenReview asks for (its `--token-audience` default).
pub const TOKEN_AUDIENCE: &str = "trellis";

/// Writes `text` to `path` through a temporary file and a rename, so a watcher never reads half
/// a file (the temporary name does not end in `.yaml`, so the policy source skips it).
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The file platform's services YAML for `services`.
pub fn services_yaml(services: &[ServiceSpec]) -> String {
    let mut out = format!("namespace: {NAMESPACE}\nservices:\n");
    for s in services {
        let port = s.instances.first().map_or(80, |i| i.address.port());
        out.push_str(&format!(
            "  - name: {}\n    ports: [{{ name: http, port: {port}, protocol: http }}]\n    endpoints:\n",
            s.name
        ));
        for i in &s.instances {
            out.push_str(&format!(
                "      - {{ address: {}, port: {}, service_account: {}, labels: {{ version: {} }}, owner: {{ kind: Pod, name: {} }} }}\n",
                i.address.ip(),
                i.address.port(),
                i.service_account,
                i.version,
                i.pod
            ));
        }
    }
    out
}

async fn consul_register(addr: SocketAddr, service: &str, i: &Instance) -> anyhow::Result<()> {
    let id = format!("{service}-{}", i.pod);
    let body = json!({
        "Node": i.pod,
        "Address": i.address.ip().to_string(),
        "Service": {
            "ID": id,
            "Service": service,
            "Address": i.address.ip().to_string(),
            "Port": i.address.port(),
            "Tags": [format!("version={}", i.version)],
            "Meta": {"version": i.version, "service-account": i.service_account},
        },
        "Check": {
            "CheckID": format!("service:{id}"),
            "Name": "ready",
            "Status": "passing",
            "ServiceID": id,
        },
    });
    let reply = http::request(
        addr,
        http::Method::PUT,
        "/v1/catalog/register",
        Some(serde_json::to_vec(&body)?),
    )
    .await?;
    if reply.status != 200 {
        bail!(
            "consul register {id}: HTTP {}: {}",
            reply.status,
            reply.text()
        );
    }
    Ok(())
}

/// Starts moto on a free port (retried on a collision) and waits until it answers.
async fn start_moto(
    exe: &Path,
    log_dir: &Path,
    network: &Network,
) -> anyhow::Result<(Process, String)> {
    let place = network.place("registry", None)?;
    let mut last = String::new();
    for attempt in 0..5 {
        // A port free here; on a host of its own, every port is.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut moto = Process::spawn_in(
            place.netns.as_deref(),
            &format!("moto-{attempt}"),
            exe,
            &[
                "-H".into(),
                place.ip.to_string(),
                "-p".into(),
                port.to_string(),
            ],
            &[],
            log_dir,
        )?;
        let addr = SocketAddr::new(place.ip, port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if !moto.is_running() {
                last = format!("moto exited: {}", moto.tail(5));
                break;
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok((moto, format!("http://{addr}")));
            }
            if tokio::time::Instant::now() > deadline {
                last = "moto did not accept connections within 30 s".into();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bail!("moto_server ({}) did not start: {last}", exe.display())
}

async fn create_cloudmap_namespace(client: &CloudMapClient) -> anyhow::Result<String> {
    client
        .create_http_namespace()
        .name(NAMESPACE)
        .send()
        .await
        .context("CreateHttpNamespace")?;
    let page = client
        .list_namespaces()
        .send()
        .await
        .context("ListNamespaces")?;
    page.namespaces()
        .iter()
        .find(|ns| ns.name() == Some(NAMESPACE))
        .and_then(|ns| ns.id().map(str::to_owned))
        .ok_or_else(|| anyhow!("namespace {NAMESPACE} missing after CreateHttpNamespace"))
}

async fn cloudmap_register(
    client: &CloudMapClient,
    namespace_id: &str,
    service: &ServiceSpec,
) -> anyhow::Result<()> {
    let created = client
        .create_service()
        .name(&service.name)
        .namespace_id(namespace_id)
        .send()
        .await
        .with_context(|| format!("CreateService {}", service.name))?;
    let service_id = created
        .service()
        .and_then(|s| s.id())
        .with_context(|| format!("CreateService {} returned no id", service.name))?;
    for i in &service.instances {
        let attributes = [
            ("AWS_INSTANCE_IPV4", i.address.ip().to_string()),
            ("AWS_INSTANCE_PORT", i.address.port().to_string()),
            ("SERVICE_ACCOUNT", i.service_account.clone()),
            ("version", i.version.clone()),
            ("protocol", "http".into()),
        ];
        client
            .register_instance()
            .service_id(service_id)
            .instance_id(&i.pod)
            .set_attributes(Some(
                attributes
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            ))
            .send()
            .await
            .with_context(|| format!("RegisterInstance {} in {}", i.pod, service.name))?;
    }
    Ok(())
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The Kubernetes objects of the registered services: ServiceAccounts, Pods, selectorless
/// Services and one EndpointSlice per (service, pod), each pod on its own port.
fn kube_objects(services: &[ServiceSpec]) -> Vec<(ApiResource, Value)> {
    let mut out = Vec::new();
    let mut pods = BTreeMap::new();
    for s in services {
        for i in &s.instances {
            pods.insert(i.pod.clone(), i.clone());
        }
    }
    let accounts: std::collections::BTreeSet<&str> =
        pods.values().map(|i| i.service_account.as_str()).collect();
    for sa in accounts {
        out.push((
            resource("v1", "ServiceAccount", "serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NAMESPACE}}),
        ));
    }
    for (name, i) in &pods {
        out.push((
            resource("v1", "Pod", "pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"version": i.version, "trellis.test/conformance": "true"}},
                "spec": {
                    "serviceAccountName": i.service_account,
                    "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
                },
            }),
        ));
    }
    for s in services {
        let port = s.instances.first().map_or(80, |i| i.address.port());
        out.push((
            resource("v1", "Service", "services"),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": NAMESPACE},
                "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP", "appProtocol": "http"}]},
            }),
        ));
        for i in &s.instances {
            let ip: IpAddr = i.address.ip();
            out.push((
                resource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{}-{}", s.name, i.pod),
                        "namespace": NAMESPACE,
                        "labels": {
                            "kubernetes.io/service-name": s.name,
                            "endpointslice.kubernetes.io/managed-by": "trellis-conformance",
                        },
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": i.address.port(), "protocol": "TCP", "appProtocol": "http"}],
                    "endpoints": [{
                        "addresses": [ip.to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "targetRef": {"kind": "Pod", "name": i.pod, "namespace": NAMESPACE},
                    }],
                }),
            ));
        }
    }
    out
}

async fn kube_register(client: &kube::Client, services: &[ServiceSpec]) -> anyhow::Result<()> {
    for (resource, object) in kube_objects(services) {
        upsert(client, &resource, object).await?;
    }
    Ok(())
}

/// The documents of a YAML text as JSON values.
fn yaml_documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).context("not YAML"))
        .collect()
}

/// The API resource of an SMI (or TrafficPolicy) document (by its `apiVersion` and `kind`) and
/// the object itself.
fn smi_object(value: &Value) -> anyhow::Result<(ApiResource, Value)> {
    let api_version = value["apiVersion"].as_str().context("apiVersion missing")?;
    let kind = value["kind"].as_str().context("kind missing")?;
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    // The plural the CRDs declare (`trafficpolicies`, not `trafficpolicys`); a kind they do not
    // have is sent as `<kind>s` for the API server to refuse.
    let plural = trellis_testing::smi_types()
        .into_iter()
        .find(|t| t.group == group && t.kind == kind)
        .map_or_else(|| format!("{}s", kind.to_lowercase()), |t| t.plural);
    let mut object = value.clone();
    object["metadata"]["namespace"] = json!(NAMESPACE);
    Ok((resource(api_version, kind, &plural), object))
}

fn object_name(object: &Value) -> anyhow::Result<String> {
    object["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .context("metadata.name missing")
}

fn api(client: &kube::Client, resource: &ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NAMESPACE, resource)
}

/// Creates the object, or replaces it when it exists (keeping its creationTimestamp, which the
/// controller's split precedence reads).
async fn upsert(
    client: &kube::Client,
    resource: &ApiResource,
    object: Value,
) -> anyhow::Result<()> {
    let name = object_name(&object)?;
    let api = api(client, resource);
    let mut dynamic: DynamicObject = serde_json::from_value(object)
        .with_context(|| format!("{} {name}: not an object", resource.kind))?;
    match api.get_opt(&name).await? {
        Some(existing) => {
            dynamic.metadata.resource_version = existing.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &dynamic)
                .await
                .with_context(|| format!("replacing {} {name}", resource.kind))?;
        }
        None => {
            api.create(&PostParams::default(), &dynamic)
                .await
                .with_context(|| format!("creating {} {name}", resource.kind))?;
        }
    }
    Ok(())
}

async fn delete(client: &kube::Client, resource: &ApiResource, name: &str) -> anyhow::Result<()> {
    match api(client, resource)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {} {name}", resource.kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Vec<ServiceSpec> {
        vec![ServiceSpec {
            name: "app-svc".into(),
            instances: vec![Instance {
                pod: "app-b-0".into(),
                address: "127.0.10.2:4000".parse().unwrap(),
                service_account: "service-b".into(),
                version: "b".into(),
            }],
        }]
    }

    #[test]
    fn the_services_file_carries_address_port_identity_and_version() {
        let yaml = services_yaml(&spec());
        assert!(yaml.contains("name: app-svc"), "{yaml}");
        assert!(
            yaml.contains("address: 127.0.10.2, port: 4000, service_account: service-b, labels: { version: b }"),
            "{yaml}"
        );
    }

    #[test]
    fn kubernetes_objects_give_each_pod_its_own_slice_and_service_account() {
        let objects = kube_objects(&spec());
        let kinds: Vec<&str> = objects.iter().map(|(r, _)| r.kind.as_str()).collect();
        assert_eq!(kinds, ["ServiceAccount", "Pod", "Service", "EndpointSlice"]);
        let slice = &objects[3].1;
        assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "app-b-0");
        assert_eq!(slice["ports"][0]["port"], 4000);
        assert_eq!(objects[1].1["spec"]["serviceAccountName"], "service-b");
    }

    #[test]
    fn smi_documents_map_to_their_resources() {
        let doc: Value = serde_json::json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit", "metadata": {"name": "s"}});
        let (r, o) = smi_object(&doc).unwrap();
        assert_eq!(
            (r.group.as_str(), r.version.as_str(), r.plural.as_str()),
            ("split.smi-spec.io", "v1alpha4", "trafficsplits")
        );
        assert_eq!(o["metadata"]["namespace"], NAMESPACE);
        let doc: Value = serde_json::json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup"});
        assert_eq!(smi_object(&doc).unwrap().0.plural, "httproutegroups");
        let doc: Value = serde_json::json!({"apiVersion": "policy.trellis.io/v1alpha1", "kind": "TrafficPolicy"});
        assert_eq!(smi_object(&doc).unwrap().0.plural, "trafficpolicies");
    }
}
