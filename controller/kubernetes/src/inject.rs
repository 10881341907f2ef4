//! The sidecar injection webhook: `POST /inject` with an `AdmissionReview` (admission.k8s.io/v1)
//! of a Pod being created; the answer is a JSON Patch that meshes the pod.
//!
//! The MutatingWebhookConfiguration (written by `trellis install`) sends only Pods of namespaces
//! or pods labelled `trellis.io/inject: enabled`. To an opted-in Pod this adds:
//! - the init container `trellis-init` ([`trellis_intercept`]): installs the interception rules
//!   (iptables nat). It is the only container with privileges: root, with NET_ADMIN and NET_RAW
//!   added and every other capability dropped, read-only root filesystem (an emptyDir on `/run`
//!   holds the xtables lock), no privilege escalation;
//! - the proxy `trellis-proxy` as a native sidecar (an init container with `restartPolicy:
//!   Always`, Kubernetes >= 1.29), placed after `trellis-init` and before the pod's own init
//!   containers: it starts (its startup probe passes) before anything else of the pod opens a
//!   connection and stops after the app. It runs as [`InjectOptions::proxy_uid`], non-root, no
//!   capabilities, read-only root filesystem; its identity is proved with a projected
//!   ServiceAccount token (audience [`InjectOptions::token_audience`], one hour);
//! - the annotation `trellis.io/injected: <version>` and the label `trellis.io/proxy: injected`;
//!   a pod that has the annotation is admitted unchanged, so injecting twice changes nothing;
//! - the app containers' httpGet and tcpSocket probes rewritten to httpGet on the proxy's admin
//!   port, `/app-probe/<container>/<liveness|readiness|startup>`, the originals handed to the
//!   proxy ([`trellis_intercept::app_probe`] says why). gRPC probes are left as they are: the
//!   kubelet's gRPC call is redirected to the inbound proxy like any other connection and, having
//!   no mesh identity, is refused unless the app's port is in `trellis.io/skip-inbound-ports`
//!   (the docs say so). exec probes run inside the container and need nothing.
//!
//! Annotations a pod may carry: `trellis.io/inject: disabled` (admitted unchanged),
//! `trellis.io/skip-inbound-ports`, `trellis.io/skip-outbound-ports` (comma-separated ports) and
//! `trellis.io/skip-outbound-cidrs` (comma-separated CIDRs). A bad value denies the admission with
//! a message naming the annotation and the item: a pod is meshed as asked or not created, never
//! half-meshed.
//!
//! Pods that cannot be meshed are admitted unchanged with a [`Skip`] saying why (the caller turns
//! it into an Event): `hostNetwork` (the rules would rewrite the node's traffic), Windows pods (no
//! iptables), a container already using one of the proxy's ports or running as the proxy's UID
//! (its traffic would bypass or break interception), a container or volume already named like
//! ours.
//!
//! Other operations than CREATE, and objects that are not Pods (a misconfigured webhook), are
//! allowed unchanged. A body that is not an AdmissionReview v1 with a request gets HTTP 400.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, Status};
use trellis_intercept::InterceptRules;

mod patch;
use patch::patch;

/// The path the MutatingWebhookConfiguration sends reviews to.
pub const PATH: &str = "/inject";
/// The only review version asked for (`admissionReviewVersions: [v1]`).
const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";
/// Largest request body accepted: one Pod (the API server's object limit is ~3 MiB).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Label/annotation that opts in (`enabled`, selected by the webhook) or out (`disabled`).
pub const INJECT: &str = "trellis.io/inject";
/// Annotation set on injected pods, with the injector's version.
pub const INJECTED: &str = "trellis.io/injected";
/// Label set on injected pods.
pub const PROXY_LABEL: &str = "trellis.io/proxy";
/// Annotation: inbound ports not redirected to the proxy (comma-separated).
pub const SKIP_INBOUND_PORTS: &str = "trellis.io/skip-inbound-ports";
/// Annotation: outbound ports not redirected to the proxy (comma-separated).
pub const SKIP_OUTBOUND_PORTS: &str = "trellis.io/skip-outbound-ports";
/// Annotation: outbound networks not redirected to the proxy (comma-separated CIDRs).
pub const SKIP_OUTBOUND_CIDRS: &str = "trellis.io/skip-outbound-cidrs";
/// Pod annotation: the proxy's `--metrics-compat` for this pod (e.g. `osm` for Flagger's `osm`
/// provider), overriding the injector's default.
pub const METRICS_COMPAT: &str = "trellis.io/metrics-compat";
/// The injector's version, written in [`INJECTED`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of the init container that installs the interception rules.
pub const INIT_CONTAINER: &str = "trellis-init";
/// Name of the proxy (native sidecar) container.
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// Volume of the projected ServiceAccount token.
pub const TOKEN_VOLUME: &str = "trellis-token";
/// Where the token volume is mounted in the proxy.
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis.io/token";
/// Volume holding the xtables lock for `trellis-init` (its root filesystem is read-only).
pub const XTABLES_VOLUME: &str = "trellis-xtables-lock";
/// Lifetime asked for the projected token (the kubelet renews it at 80%).
const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// The proxy's ports in the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    /// Outbound (transparent) listener, on 127.0.0.1.
    pub outbound: u16,
    /// Inbound (transparent) listener, on 0.0.0.0.
    pub inbound: u16,
    /// Admin listener (probes, metrics), on 0.0.0.0; never intercepted.
    pub admin: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: trellis_intercept::DEFAULT_OUTBOUND_PORT,
            inbound: trellis_intercept::DEFAULT_INBOUND_PORT,
            admin: trellis_intercept::DEFAULT_ADMIN_PORT,
        }
    }
}

/// The proxy container's resources (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: String,
    pub memory_request: String,
    /// No CPU limit by default: throttling a proxy adds latency to every call of the pod.
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_request: "50m".into(),
            memory_request: "32Mi".into(),
            cpu_limit: None,
            memory_limit: Some("128Mi".into()),
        }
    }
}

/// What the injector adds; one value for the controller's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    pub proxy_image: String,
    /// Image of `trellis-init` (default: the proxy's image, which ships it).
    pub init_image: String,
    pub proxy_uid: u32,
    /// The controller's gRPC URL as proxies reach it (`https://trellis-controller.trellis:8090`).
    pub controller_url: String,
    /// The mesh's trust anchors (PEM), passed inline to the proxy as
    /// `TRELLIS_PROXY_CONTROLLER_CA_PEM`.
    pub controller_ca_pem: String,
    pub trust_domain: String,
    /// Audience of the projected ServiceAccount token (the controller's TokenReview asks for it).
    pub token_audience: String,
    /// The proxy's log filter (`TRELLIS_PROXY_LOG`).
    pub proxy_log: String,
    /// Other meshes' metric names the proxies also expose (`osm`, `linkerd`, `istio`: what
    /// Flagger's built-in queries for those providers read), comma-separated; empty = none. A
    /// pod's annotation [`METRICS_COMPAT`] overrides it.
    pub metrics_compat: String,
    pub resources: Resources,
    pub ports: Ports,
}

impl InjectOptions {
    /// Options with the defaults for everything but the image, the controller and its anchors.
    pub fn new(
        proxy_image: impl Into<String>,
        controller_url: impl Into<String>,
        controller_ca_pem: impl Into<String>,
    ) -> Self {
        let proxy_image = proxy_image.into();
        InjectOptions {
            init_image: proxy_image.clone(),
            proxy_image,
            proxy_uid: trellis_intercept::DEFAULT_PROXY_UID,
            controller_url: controller_url.into(),
            controller_ca_pem: controller_ca_pem.into(),
            trust_domain: "cluster.local".into(),
            token_audience: "trellis".into(),
            proxy_log: "info".into(),
            metrics_compat: String::new(),
            resources: Resources::default(),
            ports: Ports::default(),
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Injected {
    /// The response review to send back (HTTP 200).
    pub review: AdmissionReview<DynamicObject>,
    /// Set when a Pod was admitted unchanged although it was sent for injection: why.
    pub skipped: Option<Skip>,
}

/// Why a Pod was admitted without a proxy, for an Event on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub namespace: String,
    /// The pod's name, or its generateName when the name is not chosen yet (pods of
    /// ReplicaSets, Jobs... are named after admission).
    pub pod_name_or_generate_name: String,
    pub reason: String,
}

/// Why a request body is not a review this webhook can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "expected apiVersion {REVIEW_API_VERSION} and kind AdmissionReview, got apiVersion {api_version:?} kind {kind:?}"
    )]
    WrongType { api_version: String, kind: String },
    #[error("the AdmissionReview has no `request`")]
    NoRequest,
}

/// Answers one AdmissionReview request body: the response review (allowed with a patch,
/// allowed unchanged, or denied with a message), or why the body is not a review at all.
pub fn review(body: &[u8], options: &InjectOptions) -> Result<Injected, BadReview> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)?;
    if review.types.api_version != REVIEW_API_VERSION || review.types.kind != "AdmissionReview" {
        return Err(BadReview::WrongType {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| BadReview::NoRequest)?;
    let response = AdmissionResponse::from(&request);
    let (response, skipped) = match decide(&request, options) {
        Decision::Unchanged => (response, None),
        Decision::Skip(skip) => {
            tracing::info!(
                namespace = %skip.namespace,
                pod = %skip.pod_name_or_generate_name,
                "admitted without a proxy: {}",
                skip.reason
            );
            (response, Some(skip))
        }
        Decision::Deny(message) => {
            tracing::warn!("injection refused: {message}");
            let mut denied = response.deny(&message);
            denied.result = Status::failure(&message, "BadRequest").with_code(400);
            (denied, None)
        }
        Decision::Patch(patch) => match response.with_patch(patch) {
            Ok(patched) => (patched, None),
            Err(error) => {
                // Cannot happen (the patch is plain JSON); refuse rather than admit unmeshed.
                let message = format!("the injection patch did not serialize: {error}");
                let mut denied = AdmissionResponse::from(&request).deny(&message);
                denied.result = Status::failure(&message, "InternalError").with_code(500);
                (denied, None)
            }
        },
    };
    Ok(Injected {
        review: response.into_review(),
        skipped,
    })
}

enum Decision {
    Unchanged,
    Skip(Skip),
    Deny(String),
    Patch(json_patch::Patch),
}

fn decide(request: &AdmissionRequest<DynamicObject>, options: &InjectOptions) -> Decision {
    let kind = &request.kind;
    if (
        kind.group.as_str(),
        kind.version.as_str(),
        kind.kind.as_str(),
    ) != ("", "v1", "Pod")
        || request.sub_resource.is_some()
    {
        tracing::warn!(
            "the injection webhook was sent a {}/{} {}{}; allowed unchanged (only Pods are injected)",
            kind.group,
            kind.version,
            kind.kind,
            request
                .sub_resource
                .as_deref()
                .map(|s| format!(" subresource {s}"))
                .unwrap_or_default()
        );
        return Decision::Unchanged;
    }
    if request.operation != Operation::Create {
        return Decision::Unchanged;
    }
    let Some(object) = &request.object else {
        return Decision::Deny("request.object is missing from a CREATE of a Pod".into());
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(error) => return Decision::Deny(format!("request.object is not a Pod: {error}")),
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let skip = |reason: String| {
        Decision::Skip(Skip {
            namespace: namespace.clone(),
            pod_name_or_generate_name: pod_name(&pod),
            reason,
        })
    };
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.contains_key(INJECTED) {
        return Decision::Unchanged;
    }
    if annotations.get(INJECT).map(String::as_str) == Some("disabled") {
        return skip(format!("annotation {INJECT}: disabled"));
    }
    if let Some(reason) = cannot_mesh(&pod, options) {
        return skip(reason);
    }
    let rules = match rules(&annotations, options) {
        Ok(rules) => rules,
        Err(message) => return Decision::Deny(message),
    };
    if let Some(list) = annotations.get(METRICS_COMPAT)
        && let Err(message) = metrics_compat(list)
    {
        return Decision::Deny(format!("annotation {METRICS_COMPAT}: {message}"));
    }
    Decision::Patch(patch(&pod, &rules, options))
}

/// The metric name sets the proxy knows (`trellis-proxy --metrics-compat`).
pub const METRICS_COMPAT_NAMES: [&str; 3] = ["osm", "linkerd", "istio"];

/// Checks a comma-separated `--metrics-compat` list; the error names the unknown item.
pub fn metrics_compat(list: &str) -> Result<(), String> {
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if !METRICS_COMPAT_NAMES.contains(&item) {
            return Err(format!(
                "{item:?} is not a metric name set; expected comma-separated {}",
                METRICS_COMPAT_NAMES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The pod's name, or its generateName while it has none.
fn pod_name(pod: &Pod) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(generate)) => generate.clone(),
        _ => String::new(),
    }
}

/// Why this pod cannot be meshed, if it cannot.
fn cannot_mesh(pod: &Pod, options: &InjectOptions) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return Some(
            "hostNetwork: true (the interception rules would apply to the node's network)".into(),
        );
    }
    if let Some(os) = &spec.os
        && os.name != "linux"
    {
        return Some(format!(
            "spec.os.name {:?}: interception needs Linux iptables",
            os.name
        ));
    }
    let proxy_ports = [
        options.ports.outbound,
        options.ports.inbound,
        options.ports.admin,
    ];
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for container in containers {
        if container.name == INIT_CONTAINER || container.name == PROXY_CONTAINER {
            return Some(format!(
                "it already has a container named {:?}",
                container.name
            ));
        }
        for port in container.ports.iter().flatten() {
            if proxy_ports.contains(&u16::try_from(port.container_port).unwrap_or(0)) {
                return Some(format!(
                    "container {:?} listens on port {}, one of the proxy's ports ({}, {}, {})",
                    container.name,
                    port.container_port,
                    options.ports.outbound,
                    options.ports.inbound,
                    options.ports.admin
                ));
            }
        }
        let uid = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if uid == Some(i64::from(options.proxy_uid)) {
            return Some(format!(
                "container {:?} runs as UID {}, the proxy's: its connections would not be intercepted",
                container.name, options.proxy_uid
            ));
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if volume.name == TOKEN_VOLUME || volume.name == XTABLES_VOLUME {
            return Some(format!("it already has a volume named {:?}", volume.name));
        }
    }
    None
}

/// The interception rules of this pod: the defaults plus the skip annotations. The error names
/// the annotation and the bad item.
fn rules(
    annotations: &BTreeMap<String, String>,
    options: &InjectOptions,
) -> Result<InterceptRules, String> {
    fn items<'a>(annotations: &'a BTreeMap<String, String>, key: &str) -> Vec<&'a str> {
        annotations
            .get(key)
            .map(|value| {
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
    fn ports(annotations: &BTreeMap<String, String>, key: &str) -> Result<Vec<u16>, String> {
        items(annotations, key)
            .into_iter()
            .map(|item| match item.parse::<u16>() {
                Ok(port) if port > 0 => Ok(port),
                _ => Err(format!(
                    "annotation {key}: {item:?} is not a port (1-65535); expected comma-separated port numbers"
                )),
            })
            .collect()
    }
    let mut skip_inbound_ports = vec![options.ports.admin];
    skip_inbound_ports.extend(ports(annotations, SKIP_INBOUND_PORTS)?);
    let skip_outbound_ports = ports(annotations, SKIP_OUTBOUND_PORTS)?;
    let skip_outbound_cidrs = items(annotations, SKIP_OUTBOUND_CIDRS)
        .into_iter()
        .map(|item| {
            item.parse::<ipnet::IpNet>().map_err(|_| {
                format!(
                    "annotation {SKIP_OUTBOUND_CIDRS}: {item:?} is not a CIDR; expected comma-separated networks like 10.0.0.0/8 or fd00::/8"
                )
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(InterceptRules {
        proxy_uid: options.proxy_uid,
        outbound_port: options.ports.outbound,
        inbound_port: options.ports.inbound,
        skip_inbound_ports,
        skip_outbound_ports,
        skip_outbound_cidrs,
        // UDP is not intercepted by injection yet (the proxy would need CAP_NET_ADMIN).
        ..InterceptRules::default()
    })
}

/// Answers one HTTP request: `POST /inject` with an AdmissionReview; 404 for other paths, 405
/// for other methods, 413 for bodies over [`MAX_BODY_BYTES`], 400 for malformed reviews. The
/// [`Skip`] is there when a Pod was admitted unchanged, for an Event.
pub async fn handle<B>(
    request: Request<B>,
    options: &InjectOptions,
) -> (Response<Full<Bytes>>, Option<Skip>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if request.uri().path() != PATH {
        return (
            text(
                StatusCode::NOT_FOUND,
                format!("not found; the injection webhook serves POST {PATH}"),
            ),
            None,
        );
    }
    if request.method() != Method::POST {
        return (
            text(StatusCode::METHOD_NOT_ALLOWED, format!("{PATH} takes POST")),
            None,
        );
    }
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return (
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the review is larger than {MAX_BODY_BYTES} bytes"),
                ),
                None,
            );
        }
        Err(error) => {
            return (
                text(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body failed: {error}"),
                ),
                None,
            );
        }
    };
    match review(&body, options) {
        Ok(Injected { review, skipped }) => {
            let json = serde_json::to_vec(&review).expect("an AdmissionReview serializes");
            let response = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .expect("a valid response");
            (response, skipped)
        }
        Err(bad) => (text(StatusCode::BAD_REQUEST, bad.to_string()), None),
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(message + "\n")))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::patch::workload;
    use super::*;

    fn pod(
        owner: Option<(&str, &str)>,
        hash: Option<&str>,
        name: Option<&str>,
        generate: Option<&str>,
    ) -> Pod {
        let metadata = json!({
            "name": name,
            "generateName": generate,
            "labels": hash.map(|h| json!({"pod-template-hash": h})),
            "ownerReferences": owner.map(|(kind, name)| json!([
                {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "u", "controller": true}
            ])),
        });
        serde_json::from_value(json!({"metadata": metadata})).unwrap()
    }

    #[test]
    fn the_workload_is_the_pods_owner_as_users_know_it() {
        let cases = [
            (
                pod(
                    Some(("ReplicaSet", "web-7d9f8c6b5")),
                    Some("7d9f8c6b5"),
                    None,
                    Some("web-7d9f8c6b5-"),
                ),
                ("deployment", "web"),
            ),
            // A ReplicaSet of its own (no Deployment's hash in its name) stays one.
            (
                pod(
                    Some(("ReplicaSet", "web-manual")),
                    Some("7d9f8c6b5"),
                    None,
                    Some("web-manual-"),
                ),
                ("replicaset", "web-manual"),
            ),
            (
                pod(
                    Some(("ReplicaSet", "web-7d9f8c6b5")),
                    None,
                    None,
                    Some("web-7d9f8c6b5-"),
                ),
                ("replicaset", "web-7d9f8c6b5"),
            ),
            (
                pod(Some(("StatefulSet", "db")), None, Some("db-0"), None),
                ("statefulset", "db"),
            ),
            (
                pod(Some(("DaemonSet", "agent")), None, None, Some("agent-")),
                ("daemonset", "agent"),
            ),
            (
                pod(
                    Some(("Job", "migrate-29140")),
                    None,
                    None,
                    Some("migrate-29140-"),
                ),
                ("job", "migrate-29140"),
            ),
            (pod(None, None, Some("debug"), None), ("pod", "debug")),
            (pod(None, None, None, Some("scratch-")), ("pod", "scratch")),
        ];
        for (pod, (kind, name)) in cases {
            assert_eq!(
                workload(&pod),
                (kind.to_owned(), name.to_owned()),
                "{:?}",
                pod.metadata
            );
        }
    }

    #[test]
    fn skip_annotations_accept_spaces_and_refuse_zero_ranges_and_names() {
        let options = InjectOptions::new("p", "https://c", "");
        let with = |key: &str, value: &str| BTreeMap::from([(key.to_owned(), value.to_owned())]);
        let parsed = rules(&with(SKIP_OUTBOUND_PORTS, " 5432 , 6379,"), &options).unwrap();
        assert_eq!(parsed.skip_outbound_ports, [5432, 6379]);
        for bad in ["0", "80-90", "http", "65536"] {
            let error = rules(&with(SKIP_INBOUND_PORTS, bad), &options).unwrap_err();
            assert!(
                error.contains(SKIP_INBOUND_PORTS) && error.contains(bad),
                "{error}"
            );
        }
    }
}
