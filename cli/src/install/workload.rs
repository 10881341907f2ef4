//! The controller as a workload: its ServiceAccount, Deployment (leader election, probes on the
//! admin port, requests and limits, the restricted Pod Security profile), Service and
//! PodDisruptionBudget, and the flags the Deployment passes to `trellis controller`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::document::{Document, Object};
use super::settings::{Settings, VERSION, WebhookTarget};

/// gRPC for proxies (Service and container).
pub const GRPC_PORT: i32 = 8090;
/// The webhooks' HTTPS listener in the container (`--webhook`); the Service exposes it on 443.
pub const WEBHOOK_PORT: i32 = 9443;
/// The admin port: /live, /ready, /metrics, /api/v1/state.
pub const ADMIN_PORT: i32 = 9990;
/// The user the controller runs as (non-root; the image's `USER` is the same).
pub const CONTROLLER_UID: i64 = 65532;

/// The labels of the install's objects; `component` adds the name and version that select and
/// describe a workload.
pub fn labels(component: Option<&str>) -> BTreeMap<String, String> {
    let mut labels =
        BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "trellis".to_owned())]);
    if let Some(component) = component {
        labels.insert("app.kubernetes.io/name".to_owned(), component.to_owned());
        labels.insert("app.kubernetes.io/version".to_owned(), VERSION.to_owned());
    }
    labels
}

/// What selects the controller's pods (never the version: a selector is immutable).
fn selector(settings: &Settings) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/name".to_owned(),
        settings.names.controller.clone(),
    )])
}

fn meta(settings: &Settings) -> ObjectMeta {
    ObjectMeta {
        name: Some(settings.names.controller.clone()),
        namespace: Some(settings.names.namespace.clone()),
        labels: Some(labels(Some(&settings.names.controller))),
        ..Default::default()
    }
}

pub fn service_account(settings: &Settings) -> Document {
    Document::new(Object::ServiceAccount(ServiceAccount {
        metadata: meta(settings),
        ..Default::default()
    }))
    .with_comment("The controller's identity towards the API server (RBAC below).")
}

/// The arguments after `trellis controller` in the Deployment.
pub fn controller_args(settings: &Settings) -> Vec<String> {
    let names = &settings.names;
    let ns = &names.namespace;
    let mut args = vec![
        "--platform=kubernetes".to_owned(),
        format!("--grpc=0.0.0.0:{GRPC_PORT}"),
        format!("--grpc-tls-name={}", names.service_host()),
        format!("--admin=0.0.0.0:{ADMIN_PORT}"),
        format!("--webhook=0.0.0.0:{WEBHOOK_PORT}"),
    ];
    args.push(match &settings.webhook {
        WebhookTarget::Service => format!("--webhook-service={ns}/{}", names.controller),
        WebhookTarget::Url(url) => format!("--webhook-url={url}"),
    });
    if let Some(url) = &settings.prometheus {
        args.push(format!("--prometheus={url}"));
    }
    if !settings.metrics_compat.is_empty() {
        args.push(format!(
            "--inject-metrics-compat={}",
            settings.metrics_compat.join(",")
        ));
    }
    args.extend([
        format!("--injector-name={}", names.injector),
        format!("--proxy-image={}", settings.proxy_image),
        format!(
            "--inject-controller-url=https://{}:{GRPC_PORT}",
            names.service_host()
        ),
        format!("--trust-domain={}", settings.trust_domain),
        format!("--ca-secret={ns}/{}", names.ca_secret),
        "--leader-elect=true".to_owned(),
        format!("--lease-namespace={ns}"),
        format!("--lease-name={}", names.controller),
        "--log=info".to_owned(),
    ]);
    args
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            scheme: Some("HTTP".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

pub fn deployment(settings: &Settings) -> Document {
    let selector = selector(settings);
    let spread = |key: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        // A preference: a one-node cluster still runs every replica.
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container = Container {
        name: "controller".to_owned(),
        image: Some(settings.controller_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        command: Some(vec!["trellis".to_owned(), "controller".to_owned()]),
        args: Some(controller_args(settings)),
        ports: Some(vec![
            port("grpc", GRPC_PORT),
            port("webhook", WEBHOOK_PORT),
            port("admin", ADMIN_PORT),
        ]),
        liveness_probe: Some(probe("/live", 10)),
        readiness_probe: Some(probe("/ready", 5)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
            limits: Some(quantities(&[("cpu", "1"), ("memory", "512Mi")])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = PodSpec {
        service_account_name: Some(settings.names.controller.clone()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(CONTROLLER_UID),
            run_as_group: Some(CONTROLLER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        containers: vec![container],
        topology_spread_constraints: Some(vec![
            spread("kubernetes.io/hostname"),
            spread("topology.kubernetes.io/zone"),
        ]),
        ..Default::default()
    };
    let mut template_labels = labels(Some(&settings.names.controller));
    template_labels.extend(selector.clone());
    let deployment = Deployment {
        metadata: meta(settings),
        spec: DeploymentSpec {
            replicas: Some(i32::from(settings.replicas)),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // One replica at a time, never below the PodDisruptionBudget's one.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    Document::new(Object::Deployment(deployment)).with_comment(&format!(
        "The controller: {} replicas, one leader (Lease {}/{}) writes Events and caBundles; every replica serves gRPC, the webhooks and the admin port. Non-root, read-only root filesystem, no capabilities.",
        settings.replicas, settings.names.namespace, settings.names.controller
    ))
}

pub fn service(settings: &Settings) -> Document {
    let port = |name: &str, port: i32, target: &str| ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(target.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    Document::new(Object::Service(Service {
        metadata: meta(settings),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector(settings)),
            ports: Some(vec![
                port("grpc", GRPC_PORT, "grpc"),
                port("webhook", trellis_smi::crd::WEBHOOK_PORT, "webhook"),
                port("admin", ADMIN_PORT, "admin"),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .with_comment(&format!(
        "Proxies dial https://{}:{GRPC_PORT}; the API server calls the webhooks on 443 (/convert, /inject); admin (metrics, `trellis check`) on {ADMIN_PORT}, inside the cluster only.",
        settings.names.service_host()
    ))
}

/// A drain never takes the last controller (with one replica there is nothing to keep, and a
/// budget of one would block every drain, so none is rendered).
pub fn disruption_budget(settings: &Settings) -> Option<Document> {
    (settings.replicas > 1).then(|| {
        Document::new(Object::PodDisruptionBudget(PodDisruptionBudget {
            metadata: meta(settings),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector(settings)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
    })
}
