//! The JSON Patch that meshes a pod: the two init containers, the volumes, the rewritten probes,
//! the annotation and label (what and why: the [parent module](super)'s docs).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use trellis_intercept::InterceptRules;
use trellis_intercept::app_probe::{self, AppProbe, AppProbes};

use super::{
    INIT_CONTAINER, INJECTED, InjectOptions, PROXY_CONTAINER, PROXY_LABEL, TOKEN_DIR,
    TOKEN_EXPIRATION_SECONDS, TOKEN_VOLUME, VERSION, XTABLES_VOLUME,
};

/// `(kind, name)` of the workload that owns the pod, for metric labels: a ReplicaSet's
/// Deployment (the ReplicaSet's name less `-<pod-template-hash>`), StatefulSet, DaemonSet, Job
/// as they are, and the pod itself when nothing owns it.
pub(super) fn workload(pod: &Pod) -> (String, String) {
    let owners = pod.metadata.owner_references.iter().flatten();
    let owner = owners
        .clone()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.clone().next());
    let Some(owner) = owner else {
        let name = match &pod.metadata.name {
            Some(name) if !name.is_empty() => name.clone(),
            _ => pod
                .metadata
                .generate_name
                .as_deref()
                .unwrap_or_default()
                .trim_end_matches('-')
                .to_owned(),
        };
        return ("pod".into(), name);
    };
    if owner.kind == "ReplicaSet" {
        let hash = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"));
        if let Some(deployment) = hash.and_then(|hash| owner.name.strip_suffix(&format!("-{hash}")))
        {
            return ("deployment".into(), deployment.to_owned());
        }
    }
    (owner.kind.to_lowercase(), owner.name.clone())
}

/// JSON Pointer token escaping (RFC 6901): `~` -> `~0`, `/` -> `~1`.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn add(path: impl Into<String>, value: Value) -> Value {
    json!({"op": "add", "path": path.into(), "value": value})
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("Kubernetes types serialize")
}

/// The JSON Patch that meshes the pod (see the module docs for what it adds).
pub(super) fn patch(
    pod: &Pod,
    rules: &InterceptRules,
    options: &InjectOptions,
) -> json_patch::Patch {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Vec::new();

    // Probes first: they decide the proxy's TRELLIS_PROXY_APP_PROBES.
    let mut probes = AppProbes::new();
    for (index, container) in spec.containers.iter().enumerate() {
        for (field, kind, probe) in [
            ("livenessProbe", "liveness", &container.liveness_probe),
            ("readinessProbe", "readiness", &container.readiness_probe),
            ("startupProbe", "startup", &container.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            let Some(original) = app_probe_of(container, probe) else {
                continue;
            };
            let path = app_probe::path(&container.name, kind);
            let base = format!("/spec/containers/{index}/{field}");
            if probe.tcp_socket.is_some() {
                ops.push(json!({"op": "remove", "path": format!("{base}/tcpSocket")}));
            }
            ops.push(add(
                format!("{base}/httpGet"),
                to_json(&HTTPGetAction {
                    path: Some(path.clone()),
                    port: IntOrString::Int(i32::from(options.ports.admin)),
                    scheme: Some("HTTP".into()),
                    ..HTTPGetAction::default()
                }),
            ));
            probes.insert(path, original);
        }
    }

    let init = init_container(rules, options);
    let proxy = proxy_container(pod, &probes, options);
    match &spec.init_containers {
        Some(existing) if !existing.is_empty() => {
            ops.push(add("/spec/initContainers/0", to_json(&init)));
            ops.push(add("/spec/initContainers/1", to_json(&proxy)));
        }
        _ => ops.push(add("/spec/initContainers", json!([init, proxy]))),
    }

    let volumes = [
        Volume {
            name: XTABLES_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(options.token_audience.clone()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".into(),
                        ..ServiceAccountTokenProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    match &spec.volumes {
        Some(existing) if !existing.is_empty() => {
            for volume in &volumes {
                ops.push(add("/spec/volumes/-", to_json(volume)));
            }
        }
        _ => ops.push(add("/spec/volumes", to_json(&volumes))),
    }

    for (field, key, value) in [
        ("annotations", INJECTED, VERSION),
        ("labels", PROXY_LABEL, "injected"),
    ] {
        let existing = match field {
            "annotations" => &pod.metadata.annotations,
            _ => &pod.metadata.labels,
        };
        match existing {
            Some(_) => ops.push(add(
                format!("/metadata/{field}/{}", escape(key)),
                json!(value),
            )),
            None => ops.push(add(format!("/metadata/{field}"), json!({ key: value }))),
        }
    }
    serde_json::from_value(Value::Array(ops)).expect("the operations are JSON Patch")
}

/// The original of an httpGet or tcpSocket probe, as the proxy will run it; `None` for probes
/// left alone (gRPC, exec, a port name the container does not declare, httpGet with a `host`:
/// the proxy probes 127.0.0.1 only).
fn app_probe_of(container: &Container, probe: &Probe) -> Option<AppProbe> {
    let port = |port: &IntOrString| -> Option<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    };
    let timeout_seconds = probe.timeout_seconds.and_then(|t| u32::try_from(t).ok());
    if let Some(get) = &probe.http_get {
        if get.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return Some(AppProbe::Http {
            port: port(&get.port)?,
            path: get.path.clone().unwrap_or_else(|| "/".into()),
            scheme: get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            headers: get
                .http_headers
                .iter()
                .flatten()
                .map(|h| app_probe::Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
            timeout_seconds,
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return Some(AppProbe::Tcp {
            tcp: port(&tcp.port)?,
            timeout_seconds,
        });
    }
    None
}

fn quantities(pairs: &[(&str, &Option<String>)]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .iter()
        .filter_map(|(name, value)| Some(((*name).to_owned(), Quantity((*value).clone()?))))
        .collect();
    (!map.is_empty()).then_some(map)
}

fn init_container(rules: &InterceptRules, options: &InjectOptions) -> Container {
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(options.init_image.clone()),
        command: Some(vec![INIT_CONTAINER.into()]),
        args: Some(rules.args()),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", &Some("10m".into())),
                ("memory", &Some("16Mi".into())),
            ]),
            limits: quantities(&[("memory", &Some("64Mi".into()))]),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            // Root with exactly the two capabilities iptables needs: a pod's network
            // namespace is changed only with CAP_NET_ADMIN (and NET_RAW for iptables' sockets).
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.into(),
            mount_path: "/run".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn admin_probe(path: &str, options: &InjectOptions, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(options.ports.admin)),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn proxy_container(pod: &Pod, probes: &AppProbes, options: &InjectOptions) -> Container {
    let ports = &options.ports;
    let (kind, name) = workload(pod);
    let mut env = vec![
        // Referenced by TRELLIS_PROXY_WORKLOAD below: defined first, as $(VAR) needs.
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env("TRELLIS_PROXY_CONTROLLER", &options.controller_url),
        env(
            "TRELLIS_PROXY_CONTROLLER_CA_PEM",
            &options.controller_ca_pem,
        ),
        env(
            "TRELLIS_PROXY_WORKLOAD",
            "$(POD_NAMESPACE)/$(POD_SERVICE_ACCOUNT)",
        ),
        env("TRELLIS_PROXY_WORKLOAD_KIND", kind),
        env("TRELLIS_PROXY_WORKLOAD_NAME", name),
        env(
            "TRELLIS_PROXY_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/token"),
        ),
        env(
            "TRELLIS_PROXY_OUTBOUND_TRANSPARENT",
            format!("127.0.0.1:{}", ports.outbound),
        ),
        env(
            "TRELLIS_PROXY_INBOUND_TRANSPARENT",
            format!("0.0.0.0:{}", ports.inbound),
        ),
        env("TRELLIS_PROXY_ADMIN", format!("0.0.0.0:{}", ports.admin)),
        env("TRELLIS_PROXY_TRUST_DOMAIN", &options.trust_domain),
        env("TRELLIS_PROXY_LOG", &options.proxy_log),
    ];
    let metrics_compat = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::METRICS_COMPAT))
        .unwrap_or(&options.metrics_compat);
    if !metrics_compat.is_empty() {
        // The proxy checks the names (an unknown one stops it with the list of known ones).
        env.push(self::env(
            "TRELLIS_PROXY_METRICS_COMPAT",
            metrics_compat.as_str(),
        ));
    }
    if !probes.is_empty() {
        env.push(self::env(
            "TRELLIS_PROXY_APP_PROBES",
            serde_json::to_string(probes).expect("probes serialize"),
        ));
    }
    let resources = &options.resources;
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(options.proxy_image.clone()),
        // A native sidecar: started in order with the init containers, kept running, stopped
        // after the app containers.
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("trellis-admin".into()),
            container_port: i32::from(ports.admin),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // The app starts once this passes (up to 2 minutes: first certificate and config).
        startup_probe: Some(admin_probe("/ready", options, 1, 120)),
        readiness_probe: Some(admin_probe("/ready", options, 5, 3)),
        liveness_probe: Some(admin_probe("/live", options, 10, 3)),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", &Some(resources.cpu_request.clone())),
                ("memory", &Some(resources.memory_request.clone())),
            ]),
            limits: quantities(&[
                ("cpu", &resources.cpu_limit),
                ("memory", &resources.memory_limit),
            ]),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(options.proxy_uid)),
            run_as_group: Some(i64::from(options.proxy_uid)),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}
