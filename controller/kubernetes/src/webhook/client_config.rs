//! Points the API server at the running webhooks: the `clientConfig` (where to call, and the
//! `caBundle` its certificate must chain to) of the SMI CRDs' conversion and of the sidecar
//! injector's MutatingWebhookConfiguration.
//!
//! The webhook's serving certificate is issued by the mesh CA, so the `caBundle` is the mesh's
//! trust anchors. The leader writes it ([`spawn`]) when it becomes leader and whenever the anchors
//! change, as Linkerd and OSM do, so no cert-manager is needed; every replica serves the webhooks
//! with a certificate from the same CA, so any of them can answer.
//!
//! What is written, per target:
//! - each CRD: `spec.conversion` = strategy `Webhook`, review versions `[v1]`, `clientConfig`
//!   with the Service (or URL) at [`trellis_smi::crd::WEBHOOK_PATH`] and the bundle (one JSON
//!   merge patch; the other of service/url is set to null so a switch between them is clean);
//! - each webhook of the MutatingWebhookConfiguration: its `clientConfig` replaced the same way
//!   at path `/inject` (read, changed, replaced with the read `resourceVersion`; a conflict is
//!   retried). The rest of the configuration (selectors, failure policy) is the installer's;
//! - the APIService of the aggregated TrafficMetrics API (`v1alpha1.metrics.smi-spec.io`, when
//!   served): `spec.service` and `spec.caBundle` (one JSON merge patch). An APIService can only
//!   name a Service, so with a URL endpoint that is reported as a problem.
//!
//! A target that does not exist (the CRDs not installed yet, an install without injection) is
//! reported and retried; nothing else stops. The result of the last attempt is published for the
//! admin port and the tests ([`Published`]).

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ServiceReference as AdmissionServiceReference,
    WebhookClientConfig as AdmissionClientConfig,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The path of the injection webhook.
pub const INJECT_PATH: &str = "/inject";

/// Where the API server reaches the webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The controller's Service (in-cluster): `namespace/name` on `port`.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// A URL (`https://HOST:PORT`, no path): a controller outside the cluster.
    Url(String),
}

impl Endpoint {
    /// The `service`/`url` pair for `path`, as JSON (the field not used is null).
    fn client_config(&self, path: &str, bundle: &[u8]) -> Value {
        let bundle = serde_json::to_value(ByteString(bundle.to_vec())).expect("bytes serialize");
        match self {
            Endpoint::Service {
                namespace,
                name,
                port,
            } => json!({
                "service": {"namespace": namespace, "name": name, "path": path, "port": port},
                "url": null,
                "caBundle": bundle,
            }),
            Endpoint::Url(url) => json!({
                "service": null,
                "url": format!("{}{path}", url.trim_end_matches('/')),
                "caBundle": bundle,
            }),
        }
    }

    /// The typed client config of an admission webhook for `path`.
    fn admission(&self, path: &str, bundle: &[u8]) -> AdmissionClientConfig {
        match self {
            Endpoint::Service {
                namespace,
                name,
                port,
            } => AdmissionClientConfig {
                service: Some(AdmissionServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_owned()),
                    port: Some(i32::from(*port)),
                }),
                url: None,
                ca_bundle: Some(ByteString(bundle.to_vec())),
            },
            Endpoint::Url(url) => AdmissionClientConfig {
                service: None,
                url: Some(format!("{}{path}", url.trim_end_matches('/'))),
                ca_bundle: Some(ByteString(bundle.to_vec())),
            },
        }
    }
}

/// What to point at the webhooks.
#[derive(Clone, Debug)]
pub struct Targets {
    pub endpoint: Endpoint,
    /// CRDs whose conversion calls the webhook (by name, e.g. `trafficsplits.split.smi-spec.io`).
    pub crds: Vec<String>,
    /// The injector's MutatingWebhookConfiguration, if injection is served.
    pub injector: Option<String>,
    /// The APIService of the aggregated TrafficMetrics API, if it is served.
    pub api_service: Option<String>,
}

impl Targets {
    /// The SMI CRDs (all five: TrafficPolicy converts nothing) and the injector `injector`.
    pub fn smi(endpoint: Endpoint, injector: Option<String>) -> Self {
        Self {
            endpoint,
            crds: trellis_smi::crd::generate()
                .into_iter()
                .filter(|generated| generated.converts())
                .filter_map(|generated| generated.crd.metadata.name)
                .collect(),
            injector,
            api_service: None,
        }
    }
}

/// The outcome of the last write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Completed writes so far (each a whole pass over the targets that succeeded).
    pub passes: u64,
    /// The bundle last written everywhere (empty before the first complete pass).
    pub bundle: Vec<u8>,
    /// Why the last pass was incomplete: one line per target that failed.
    pub problems: Vec<String>,
}

/// Writes `bundle` into every target once. Returns one line per target that could not be
/// written (empty = all written).
pub async fn publish(client: &Client, targets: &Targets, bundle: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let conversion = json!({
        "spec": {"conversion": {
            "strategy": "Webhook",
            "webhook": {
                "conversionReviewVersions": ["v1"],
                "clientConfig": targets.endpoint.client_config(trellis_smi::crd::WEBHOOK_PATH, bundle),
            },
        }}
    });
    for name in &targets.crds {
        if let Err(error) = crds
            .patch(name, &PatchParams::default(), &Patch::Merge(&conversion))
            .await
        {
            problems.push(format!(
                "CustomResourceDefinition {name}: setting the conversion webhook: {}",
                describe(&error)
            ));
        }
    }
    if let Some(name) = &targets.injector
        && let Err(problem) = publish_injector(client, name, &targets.endpoint, bundle).await
    {
        problems.push(format!("MutatingWebhookConfiguration {name}: {problem}"));
    }
    if let Some(name) = &targets.api_service
        && let Err(problem) = publish_api_service(client, name, &targets.endpoint, bundle).await
    {
        problems.push(format!("APIService {name}: {problem}"));
    }
    problems
}

/// Points the APIService at the controller's Service with the bundle.
async fn publish_api_service(
    client: &Client,
    name: &str,
    endpoint: &Endpoint,
    bundle: &[u8],
) -> Result<(), String> {
    let Endpoint::Service {
        namespace,
        name: service,
        port,
    } = endpoint
    else {
        return Err(
            "an APIService can only call a Service: give --webhook-service, not --webhook-url"
                .into(),
        );
    };
    let bundle = serde_json::to_value(ByteString(bundle.to_vec())).expect("bytes serialize");
    let patch = json!({"spec": {
        "service": {"namespace": namespace, "name": service, "port": port},
        "caBundle": bundle,
        "insecureSkipTLSVerify": false,
    }});
    let api: Api<APIService> = Api::all(client.clone());
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// Replaces the client config of every webhook of `name`; retries a few write conflicts.
async fn publish_injector(
    client: &Client,
    name: &str,
    endpoint: &Endpoint,
    bundle: &[u8],
) -> Result<(), String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    for _ in 0..5 {
        let mut config = api.get(name).await.map_err(|e| describe(&e))?;
        let wanted = endpoint.admission(INJECT_PATH, bundle);
        let webhooks = config.webhooks.get_or_insert_with(Vec::new);
        if webhooks.is_empty() {
            return Err("it has no webhooks to point at the injector".into());
        }
        if webhooks.iter().all(|w| w.client_config == wanted) {
            return Ok(());
        }
        for webhook in webhooks.iter_mut() {
            webhook.client_config = wanted.clone();
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(describe(&error)),
        }
    }
    Err("it kept changing under us (5 write conflicts in a row)".into())
}

/// The API server's message, without kube's wrapping.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// While this replica is the leader (`is_leader`), writes the current `bundle` into every
/// target: at once on becoming leader, again whenever the bundle changes, and every `retry` while
/// a pass is incomplete. Problems are logged once per change and published on the returned
/// channel.
pub fn spawn(
    client: Client,
    targets: Targets,
    mut bundle: watch::Receiver<Vec<u8>>,
    mut is_leader: watch::Receiver<bool>,
    retry: Duration,
) -> (JoinHandle<()>, watch::Receiver<Published>) {
    let (published_tx, published) = watch::channel(Published::default());
    let task = tokio::spawn(async move {
        let mut written: Option<Vec<u8>> = None;
        loop {
            let leader = *is_leader.borrow_and_update();
            let current = bundle.borrow_and_update().clone();
            if !leader {
                // A new leader writes again, whatever an earlier term of ours wrote.
                written = None;
            } else if written.as_ref() != Some(&current) && !current.is_empty() {
                let problems = publish(&client, &targets, &current).await;
                let complete = problems.is_empty();
                published_tx.send_if_modified(|last| {
                    if complete {
                        last.passes += 1;
                        last.bundle = current.clone();
                        last.problems.clear();
                        tracing::info!(
                            crds = targets.crds.len(),
                            injector = targets.injector.as_deref().unwrap_or("none"),
                            api_service = targets.api_service.as_deref().unwrap_or("none"),
                            "webhook client configs written (caBundle = the mesh trust anchors)"
                        );
                        return true;
                    }
                    if last.problems != problems {
                        for problem in &problems {
                            tracing::warn!(
                                "webhook client config: {problem}; retrying every {retry:?}"
                            );
                        }
                        last.problems = problems.clone();
                        return true;
                    }
                    false
                });
                if complete {
                    written = Some(current);
                } else {
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        changed = is_leader.changed() => if changed.is_err() { return },
                        changed = bundle.changed() => if changed.is_err() { return },
                    }
                    continue;
                }
            }
            tokio::select! {
                changed = is_leader.changed() => if changed.is_err() { return },
                changed = bundle.changed() => if changed.is_err() { return },
            }
        }
    });
    (task, published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_url_client_configs_clear_the_other_form() {
        let service = Endpoint::Service {
            namespace: "trellis-system".into(),
            name: "trellis-controller".into(),
            port: 443,
        };
        let config = service.client_config("/convert", b"PEM");
        assert_eq!(config["service"]["path"], "/convert");
        assert_eq!(config["service"]["port"], 443);
        assert_eq!(config["url"], Value::Null);
        assert_eq!(config["caBundle"], "UEVN");
        let url = Endpoint::Url("https://10.1.2.3:9443/".into());
        let config = url.client_config("/inject", b"PEM");
        assert_eq!(config["url"], "https://10.1.2.3:9443/inject");
        assert_eq!(config["service"], Value::Null);
        let typed = url.admission("/inject", b"PEM");
        assert_eq!(typed.url.as_deref(), Some("https://10.1.2.3:9443/inject"));
        assert!(typed.service.is_none());
    }

    #[test]
    fn the_smi_targets_are_the_five_crds() {
        let targets = Targets::smi(Endpoint::Url("https://h:1".into()), None);
        assert_eq!(targets.crds.len(), 5);
        assert!(
            targets
                .crds
                .contains(&"trafficsplits.split.smi-spec.io".to_owned())
        );
        assert!(
            !targets
                .crds
                .contains(&"trafficpolicies.policy.trellis.io".to_owned()),
            "one version: no conversion, no caBundle"
        );
    }
}
