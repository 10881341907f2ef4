//! `trellis install --gateway FILE`: an ingress gateway from a Gateway document
//! (`policy.trellis.io/v1alpha1`, [`trellis_gateway`]), rendered in the Gateway's namespace:
//!
//! - a ServiceAccount named after the Gateway: its mesh identity
//!   (`spiffe://<trust domain>/ns/<namespace>/sa/<name>`), which TrafficTargets name to let the
//!   gateway reach a service;
//! - a ConfigMap `<name>-gateway` holding the document as written (`gateway.yaml`): editing it
//!   reloads the routes and certificates of the running gateway (a ConfigMap update is a file
//!   change under the mount); listener ports need a restart (`kubectl rollout restart`);
//! - a Deployment running `trellis-proxy --controller ... --gateway
//!   /etc/trellis/gateway/gateway.yaml`, its identity certified by the controller with a
//!   projected ServiceAccount token (as injected proxies are), each certificate's `secretName`
//!   (a `kubernetes.io/tls` Secret) mounted at `/etc/trellis/gateway/tls/<secretName>/`;
//! - a Service of type LoadBalancer exposing the HTTPS (and redirect) ports as the listeners
//!   bind them, so the redirect's `Location` names the port clients use.
//!
//! On Kubernetes every certificate must name a `secretName` (files are not in the pod).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::document::{Document, Object};
use super::settings::Settings;
use super::workload::{GRPC_PORT, labels};

/// Where the ConfigMap is mounted; the document is `gateway.yaml` in it.
pub const CONFIG_DIR: &str = "/etc/trellis/gateway/config";
/// The document's key in the ConfigMap.
pub const CONFIG_KEY: &str = "gateway.yaml";
/// The gateway's admin port (`/ready`, `/live`, `/metrics`).
pub const ADMIN_PORT: i32 = 9901;
/// Where the projected ServiceAccount token is mounted (as in injected pods).
const TOKEN_DIR: &str = "/var/run/secrets/trellis.io/token";
/// The audience the controller's TokenReview asks for (its `--token-audience` default).
const TOKEN_AUDIENCE: &str = "trellis";
/// The user the proxy runs as (non-root).
const PROXY_UID: i64 = 2102;

/// A Gateway document to install, read and checked.
#[derive(Clone, Debug)]
pub struct GatewayInstall {
    /// The file it was read from.
    pub file: PathBuf,
    /// The document as written: what the ConfigMap holds.
    pub text: String,
    /// The document, read.
    pub document: trellis_gateway::GatewayDocument,
}

impl GatewayInstall {
    /// Read and check `file`: a Gateway document ([`trellis_gateway::read`], errors with file,
    /// line and field) whose certificates all name a Secret.
    pub fn read(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--gateway {}: cannot read", file.display()))?;
        let document = trellis_gateway::read(&text)
            .map_err(|e| anyhow::anyhow!("--gateway {}:{e}", file.display()))?;
        for (i, c) in document.spec.certificates.iter().enumerate() {
            if c.secret_name.is_none() || c.cert_file.is_some() || c.key_file.is_some() {
                let field = format!("spec.certificates[{i}]");
                anyhow::bail!(
                    "--gateway {}:{}: {field}: on Kubernetes a certificate names its Secret (secretName), not files: the install mounts the Secret at {}/<secretName>",
                    file.display(),
                    trellis_gateway::line_of(&text, &field),
                    trellis_gateway::SECRET_MOUNT_DIR
                );
            }
        }
        if document.metadata.name.is_empty() {
            anyhow::bail!(
                "--gateway {}: metadata.name: the Gateway needs a name (its ServiceAccount, Deployment and Service are named after it)",
                file.display()
            );
        }
        Ok(Self {
            file: file.to_owned(),
            text,
            document,
        })
    }

    fn name(&self) -> &str {
        &self.document.metadata.name
    }

    fn namespace(&self) -> &str {
        self.document.namespace()
    }

    fn config_map_name(&self) -> String {
        format!("{}-gateway", self.name())
    }

    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("app.kubernetes.io/name".to_owned(), self.name().to_owned())])
    }

    fn meta(&self, name: String) -> ObjectMeta {
        let mut labels = labels(Some(self.name()));
        labels.insert(
            "app.kubernetes.io/component".to_owned(),
            "gateway".to_owned(),
        );
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace().to_owned()),
            labels: Some(labels),
            ..Default::default()
        }
    }

    /// The listeners: (name, port).
    fn ports(&self) -> Vec<(&'static str, i32)> {
        let spec = &self.document.spec;
        let mut ports = vec![("https", i32::from(spec.https.port))];
        if let Some(redirect) = &spec.http_redirect {
            ports.push(("http", i32::from(redirect.port)));
        }
        ports
    }
}

/// The arguments of `trellis-proxy` in the gateway's Deployment.
pub fn proxy_args(settings: &Settings, gateway: &GatewayInstall) -> Vec<String> {
    vec![
        format!(
            "--controller=https://{}:{GRPC_PORT}",
            settings.names.service_host()
        ),
        format!("--workload={}/{}", gateway.namespace(), gateway.name()),
        "--workload-kind=deployment".to_owned(),
        format!("--identity-token-file={TOKEN_DIR}/token"),
        format!("--trust-domain={}", settings.trust_domain),
        format!("--admin=0.0.0.0:{ADMIN_PORT}"),
        format!("--gateway={CONFIG_DIR}/{CONFIG_KEY}"),
    ]
}

/// The objects of one gateway, in the order they are created. `anchors`: the mesh's trust
/// anchors (PEM), which the controller's certificate chains to.
pub fn documents(settings: &Settings, gateway: &GatewayInstall, anchors: &str) -> Vec<Document> {
    let name = gateway.name().to_owned();
    let service_account = Document::new(Object::ServiceAccount(ServiceAccount {
        metadata: gateway.meta(name.clone()),
        ..Default::default()
    }))
    .with_comment(&format!(
        "Gateway {}/{name}: its mesh identity (spiffe://{}/ns/{}/sa/{name}); TrafficTargets name it to let the gateway reach a service.",
        gateway.namespace(),
        settings.trust_domain,
        gateway.namespace()
    ));
    let config_map = Document::new(Object::ConfigMap(ConfigMap {
        metadata: gateway.meta(gateway.config_map_name()),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_owned(),
            gateway.text.clone(),
        )])),
        ..Default::default()
    }))
    .with_comment(&format!(
        "The Gateway document from {}: edit it here and the gateway reloads its routes and certificates (listener ports take effect on a restart).",
        gateway.file.display()
    ));
    vec![
        service_account,
        config_map,
        deployment(settings, gateway, anchors),
        service(gateway),
    ]
}

fn deployment(settings: &Settings, gateway: &GatewayInstall, anchors: &str) -> Document {
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let mut ports: Vec<ContainerPort> = gateway
        .ports()
        .into_iter()
        .map(|(n, p)| port(n, p))
        .collect();
    ports.push(port("admin", ADMIN_PORT));
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            scheme: Some("HTTP".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "trellis-token".to_owned(),
            mount_path: TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: gateway.config_map_name(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "trellis-token".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(3600),
                        path: "token".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let secrets: std::collections::BTreeSet<&str> = gateway
        .document
        .spec
        .certificates
        .iter()
        .filter_map(|c| c.secret_name.as_deref())
        .collect();
    for (i, secret) in secrets.into_iter().enumerate() {
        let volume = format!("tls-{i}");
        mounts.push(VolumeMount {
            name: volume.clone(),
            mount_path: format!("{}/{secret}", trellis_gateway::SECRET_MOUNT_DIR),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: volume,
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    // Ports below 1024 need the one capability that binds them; none is kept otherwise.
    let low_port = gateway.ports().iter().any(|(_, p)| *p < 1024);
    let container = Container {
        name: "gateway".to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["trellis-proxy".to_owned()]),
        args: Some(proxy_args(settings, gateway)),
        env: Some(vec![EnvVar {
            name: "TRELLIS_PROXY_CONTROLLER_CA_PEM".to_owned(),
            value: Some(anchors.to_owned()),
            ..Default::default()
        }]),
        ports: Some(ports),
        liveness_probe: Some(probe("/live")),
        readiness_probe: Some(probe("/ready")),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("64Mi".to_owned())),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: low_port.then(|| vec!["NET_BIND_SERVICE".to_owned()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let selector = gateway.selector();
    let mut template_labels = gateway.meta(String::new()).labels.unwrap_or_default();
    template_labels.extend(selector.clone());
    let deployment = Deployment {
        metadata: gateway.meta(gateway.name().to_owned()),
        spec: DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gateway.name().to_owned()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(PROXY_UID),
                        run_as_group: Some(PROXY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    Document::new(Object::Deployment(deployment)).with_comment(&format!(
        "Gateway {}/{}: trellis-proxy in gateway mode, its identity and destinations from the controller; certificates from the Secrets its document names.",
        gateway.namespace(),
        gateway.name()
    ))
}

fn service(gateway: &GatewayInstall) -> Document {
    let ports = gateway
        .ports()
        .into_iter()
        .map(|(name, port)| ServicePort {
            name: Some(name.to_owned()),
            port,
            target_port: Some(IntOrString::String(name.to_owned())),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        })
        .collect();
    Document::new(Object::Service(Service {
        metadata: gateway.meta(gateway.name().to_owned()),
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".to_owned()),
            selector: Some(gateway.selector()),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .with_comment(
        "The gateway's public address: the listeners' ports as they bind them (the redirect names the HTTPS port clients use).",
    )
}
