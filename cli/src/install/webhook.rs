//! Where the API server calls the controller: the SMI CRDs' conversion webhook (`/convert`) and
//! the sidecar injector's MutatingWebhookConfiguration (`/inject`), through the controller's
//! Service or at `--webhook-url`. Both are rendered without a caBundle: the controller's leader
//! writes it (the mesh CA's anchors) at start and after every rotation, and server-side apply
//! leaves a field it never set alone, so re-applying the install does not erase it.
//!
//! Injection is opt-in by the label `trellis.io/inject: enabled` on a namespace or on a pod, in
//! two webhooks so that neither selector needs the other: `namespaces.inject.trellis.io` calls
//! for every pod of a labelled namespace (unless the pod says `disabled`),
//! `pods.inject.trellis.io` for a labelled pod in any other namespace. Neither ever calls for
//! kube-system, kube-public, kube-node-lease or the mesh's own namespace.

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{
    APIService, APIServiceSpec, ServiceReference as ApiServiceReference,
};
use trellis_smi::crd;

use super::document::{Document, Object};
use super::settings::{Settings, WebhookTarget};
use super::workload::labels;

/// The label that opts a namespace or a pod into injection.
pub const INJECT_LABEL: &str = "trellis.io/inject";
/// The injector's HTTP path on the controller's webhook port.
pub const INJECT_PATH: &str = "/inject";
/// Namespaces never injected, besides the mesh's own.
pub const NEVER_INJECTED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// How long the API server waits for the injector.
pub const TIMEOUT_SECONDS: i32 = 5;

/// `--injection-failure-policy`: what happens to a pod in an opted-in namespace while the
/// injector cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// The pod is refused until the controller answers: an opted-in pod never runs unmeshed
    /// (default: with default deny, an unmeshed pod is refused by its peers anyway).
    Fail,
    /// The pod is created without the proxy: it runs, unmeshed, while the controller is down.
    Ignore,
}

impl FailurePolicy {
    fn as_api(self) -> &'static str {
        match self {
            FailurePolicy::Fail => "Fail",
            FailurePolicy::Ignore => "Ignore",
        }
    }
}

/// The CRDs of `trellis crds`, the SMI ones with their conversion webhook pointed at this
/// install (TrafficPolicy has one version and no conversion).
pub fn crds(settings: &Settings) -> Vec<Document> {
    crd::generate()
        .into_iter()
        .map(|generated| {
            let mut crd = generated.crd;
            if let Some(webhook) = crd
                .spec
                .conversion
                .as_mut()
                .and_then(|c| c.webhook.as_mut())
            {
                webhook.client_config = Some(match &settings.webhook {
                    WebhookTarget::Service => apiextensions::WebhookClientConfig {
                        service: Some(apiextensions::ServiceReference {
                            namespace: settings.names.namespace.clone(),
                            name: settings.names.controller.clone(),
                            path: Some(crd::WEBHOOK_PATH.to_owned()),
                            port: Some(crd::WEBHOOK_PORT),
                        }),
                        ..Default::default()
                    },
                    WebhookTarget::Url(url) => apiextensions::WebhookClientConfig {
                        url: Some(format!("{url}{}", crd::WEBHOOK_PATH)),
                        ..Default::default()
                    },
                });
            }
            crd.metadata
                .labels
                .get_or_insert_default()
                .extend(labels(None));
            Document::new(Object::CustomResourceDefinition(crd))
        })
        .collect()
}

fn client_config(settings: &Settings) -> WebhookClientConfig {
    match &settings.webhook {
        WebhookTarget::Service => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: settings.names.namespace.clone(),
                name: settings.names.controller.clone(),
                path: Some(INJECT_PATH.to_owned()),
                port: Some(crd::WEBHOOK_PORT),
            }),
            ..Default::default()
        },
        WebhookTarget::Url(url) => WebhookClientConfig {
            url: Some(format!("{url}{INJECT_PATH}")),
            ..Default::default()
        },
    }
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator: operator.to_owned(),
        values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
    }
}

fn selector(requirements: Vec<LabelSelectorRequirement>) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_expressions: Some(requirements),
        ..Default::default()
    })
}

pub fn injector(settings: &Settings) -> Document {
    let mut never: Vec<&str> = NEVER_INJECTED.to_vec();
    never.push(&settings.names.namespace);
    // Set by the API server on every namespace (Kubernetes 1.21+): selects by name.
    let not_excluded = || requirement("kubernetes.io/metadata.name", "NotIn", &never);
    let webhook = |name: &str, namespace: LabelSelector, object: LabelSelector| MutatingWebhook {
        name: name.to_owned(),
        admission_review_versions: vec!["v1".to_owned()],
        client_config: client_config(settings),
        failure_policy: Some(settings.failure_policy.as_api().to_owned()),
        side_effects: "None".to_owned(),
        timeout_seconds: Some(TIMEOUT_SECONDS),
        // A later webhook that adds a container gets the proxy's view of it (injection is
        // idempotent, so a second call changes nothing).
        reinvocation_policy: Some("IfNeeded".to_owned()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".to_owned()]),
            operations: Some(vec!["CREATE".to_owned()]),
            resources: Some(vec!["pods".to_owned()]),
            scope: Some("Namespaced".to_owned()),
        }]),
        namespace_selector: Some(namespace),
        object_selector: Some(object),
        ..Default::default()
    };
    let by_namespace = webhook(
        "namespaces.inject.trellis.io",
        selector(vec![
            requirement(INJECT_LABEL, "In", &["enabled"]),
            not_excluded(),
        ])
        .expect("a selector"),
        selector(vec![requirement(INJECT_LABEL, "NotIn", &["disabled"])]).expect("a selector"),
    );
    let by_pod = webhook(
        "pods.inject.trellis.io",
        // Pods of opted-in namespaces are the other webhook's.
        selector(vec![
            requirement(INJECT_LABEL, "NotIn", &["enabled"]),
            not_excluded(),
        ])
        .expect("a selector"),
        selector(vec![requirement(INJECT_LABEL, "In", &["enabled"])]).expect("a selector"),
    );
    let configuration = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(settings.names.injector.clone()),
            labels: Some(labels(None)),
            ..Default::default()
        },
        webhooks: Some(vec![by_namespace, by_pod]),
    };
    Document::new(Object::MutatingWebhookConfiguration(configuration)).with_comment(&format!(
        "Sidecar injection, opt-in: label a namespace or a pod `{INJECT_LABEL}: enabled` (a pod labelled `disabled` in an opted-in namespace is skipped). Never {} or {}.\nfailurePolicy {}: {}\ncaBundle is written by the controller's leader (the mesh CA's anchors).",
        NEVER_INJECTED.join(", "),
        settings.names.namespace,
        settings.failure_policy.as_api(),
        match settings.failure_policy {
            FailurePolicy::Fail => "while no controller answers, pods of opted-in namespaces are refused (never started unmeshed).",
            FailurePolicy::Ignore => "while no controller answers, pods start without the proxy (unmeshed).",
        }
    ))
}

/// The APIService of the aggregated TrafficMetrics API (`--prometheus`): the controller's
/// Service on 443, the webhook port. Its `caBundle` is the mesh's trust anchors, written by the
/// leader as for the webhooks (the serving certificate is the webhooks').
pub fn api_service(settings: &Settings) -> Option<Document> {
    settings.prometheus.as_ref()?;
    let names = &settings.names;
    let service = APIService {
        metadata: ObjectMeta {
            name: Some(trellis_traffic_metrics::API_SERVICE.to_owned()),
            labels: Some(labels(None)),
            ..Default::default()
        },
        spec: Some(APIServiceSpec {
            group: Some(trellis_traffic_metrics::GROUP.to_owned()),
            version: Some(trellis_traffic_metrics::VERSION.to_owned()),
            // Low: an extension group, after the built-in ones in discovery.
            group_priority_minimum: 100,
            version_priority: 100,
            service: Some(ApiServiceReference {
                namespace: Some(names.namespace.clone()),
                name: Some(names.controller.clone()),
                port: Some(443),
            }),
            ca_bundle: None,
            insecure_skip_tls_verify: None,
        }),
        status: None,
    };
    Some(Document::new(Object::APIService(service)).with_comment(
        "The SMI TrafficMetrics API (metrics.smi-spec.io/v1alpha1), served by the controller from --prometheus on its webhook port. `kubectl get --raw /apis/metrics.smi-spec.io/v1alpha1/namespaces/NS/deployments/NAME`. The leader writes caBundle.",
    ))
}
