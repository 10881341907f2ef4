//! Everything of the runtime that needs a Kubernetes client, in one place so that it is gated
//! once (the `kubernetes` feature, on by default): the `--platform kubernetes` adapter, the SMI
//! CRDs as a policy source with the Lease election and Events behind them, the CA read from a
//! Secret, and TokenReview.
//!
//! A build without the feature compiles `without_kubernetes.rs` as this module instead: the same
//! names, each failing with [`NOT_BUILT`] where a Kubernetes client would be needed, so the rest
//! of the runtime calls them with no `cfg` of its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use tokio::sync::watch;
use trellis_controller_core::index::Status;
use trellis_controller_core::leader::{LeaderOptions, Leadership, default_identity};
use trellis_controller_core::policy::PolicySource;
use trellis_controller_kubernetes::policy::{KubernetesPolicySource, ObjectRefs};
use trellis_discovery::Discovery;

use crate::identity::CaHandle;
use crate::identity::ca::{Authority, CaError, CaMaterial, PemInput};
use crate::identity::proof::{Proven, Unavailable};
use crate::identity::source::publish;

/// What a build without the `kubernetes` feature answers when asked for Kubernetes (here for
/// the docs and the tests; this build has it).
pub const NOT_BUILT: &str =
    "this trellis was built without the `kubernetes` feature; rebuild with default features";

/// The client every Kubernetes part of the controller uses.
pub type Client = kube::Client;

/// Checks that `what` (a flag, a platform) can be used by this build: always, with the feature.
pub fn available(_what: &str) -> anyhow::Result<()> {
    Ok(())
}

/// The client from the kubeconfig or the in-cluster service account; `what` says who needs it.
pub async fn client(what: &str) -> anyhow::Result<Client> {
    Client::try_default()
        .await
        .with_context(|| format!("{what}: reading the kubeconfig"))
}

/// The `--platform kubernetes` adapter (Services, EndpointSlices, Pods). `platform` is how the
/// flag was written, for errors.
pub async fn discovery(platform: &str) -> anyhow::Result<Arc<dyn Discovery>> {
    let config = kube::Config::infer()
        .await
        .with_context(|| format!("platform {platform}: reading the kubeconfig"))?;
    Ok(Arc::new(
        trellis_adapter_kubernetes::KubernetesDiscovery::new(
            config,
            trellis_adapter_kubernetes::Options::default(),
        )
        .with_context(|| format!("platform {platform}"))?,
    ))
}

/// What writes to Kubernetes once the index runs: the Events about SMI objects with problems,
/// written by the leader only.
pub struct Writers {
    client: Client,
    objects: ObjectRefs,
}

impl std::fmt::Debug for Writers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writers").finish_non_exhaustive()
    }
}

/// The SMI CRDs as a policy source, and the writers that report on the objects it reads.
pub async fn policy_source() -> anyhow::Result<(Arc<dyn PolicySource>, Writers)> {
    let client = client("kubernetes policy source").await?;
    let source = KubernetesPolicySource::new(client.clone());
    let objects = source.objects();
    Ok((Arc::new(source), Writers { client, objects }))
}

impl Writers {
    /// Starts the Lease election (`leader`; `None` = this replica always writes) and the Events
    /// writer on the index's `status`; returns the election's handle.
    pub fn start(
        self,
        status: watch::Receiver<Arc<Status>>,
        leader: Option<LeaderOptions>,
    ) -> Leadership {
        let leadership = match leader {
            Some(options) => {
                trellis_controller_kubernetes::leader::elect(self.client.clone(), options)
            }
            None => Leadership::always(default_identity()),
        };
        let identity = leadership.status().borrow().identity.clone();
        trellis_controller_kubernetes::events::spawn(
            self.client,
            status,
            self.objects,
            leadership.is_leader(),
            trellis_controller_kubernetes::events::EventOptions::new(identity),
        );
        leadership
    }
}

/// The CA from the Secret `namespace/name`, checked (an error stops the start), then read again
/// every `poll` and swapped in when it changed and passes every check (see `identity::source`).
pub async fn ca_from_secret(
    client: Option<&Client>,
    namespace: &str,
    name: &str,
    poll: Duration,
) -> anyhow::Result<CaHandle> {
    let client = client
        .ok_or_else(|| anyhow::anyhow!("--ca-secret needs a Kubernetes client"))?
        .clone();
    let (errors_tx, errors) = watch::channel(None);
    let (material, mut version) = read_ca_secret(&client, namespace, name).await?;
    let current = Arc::new(ArcSwap::from_pointee(Authority::new(&material)?));
    let shared = Arc::downgrade(&current);
    let (namespace, name) = (namespace.to_owned(), name.to_owned());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(poll).await;
            let Some(current) = shared.upgrade() else {
                return;
            };
            let result = match read_ca_secret(&client, &namespace, &name).await {
                // Unchanged (same resourceVersion) and nothing to retry.
                Ok((_, v)) if v.is_some() && v == version && errors_tx.borrow().is_none() => {
                    continue;
                }
                Ok((material, v)) => {
                    version = v;
                    Authority::new(&material)
                }
                Err(e) => Err(e),
            };
            publish(&current, &errors_tx, result);
        }
    });
    Ok(CaHandle { current, errors })
}

/// The CA material in the Secret `namespace/name` (`ca.crt`, `tls.crt`, `tls.key`), and its
/// resourceVersion (to skip unchanged polls).
async fn read_ca_secret(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(CaMaterial, Option<String>), CaError> {
    let origin = format!("Secret {namespace}/{name}");
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let secret = api
        .get(name)
        .await
        .map_err(|e| CaError::new(&origin, format!("cannot read it: {e}")))?;
    let data = secret.data.unwrap_or_default();
    let key = |k: &str| {
        data.get(k)
            .map(|v| PemInput {
                origin: format!("{origin} key {k}"),
                pem: v.0.clone(),
            })
            .ok_or_else(|| {
                CaError::new(
                    &origin,
                    format!("has no key {k:?} (expected ca.crt, tls.crt and tls.key)"),
                )
            })
    };
    Ok((
        CaMaterial {
            anchors: vec![key("ca.crt")?],
            issuer_cert: key("tls.crt")?,
            issuer_key: key("tls.key")?,
        },
        secret.metadata.resource_version,
    ))
}

/// Checks ServiceAccount tokens with the API server's TokenReview: only an authenticated
/// `system:serviceaccount:NS:NAME` whose audiences include ours proves `NS/NAME`.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    audience: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

const SA_PREFIX: &str = "system:serviceaccount:";

impl TokenReviewer {
    pub fn new(client: Client, audience: String) -> Self {
        Self { client, audience }
    }

    /// What the API server says `token` proves.
    pub async fn review(&self, token: &str) -> Result<Proven, Unavailable> {
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = api
            .create(&kube::api::PostParams::default(), &request)
            .await
            .map_err(|e| Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Proven::Nothing(format!(
                "the API server did not authenticate the token{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Ok(Proven::Nothing(format!(
                "the token is not meant for audience {:?}",
                self.audience
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        match username
            .strip_prefix(SA_PREFIX)
            .and_then(|rest| rest.split_once(':'))
        {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(Proven::Workload(format!("{ns}/{name}")))
            }
            _ => Ok(Proven::Nothing(format!(
                "the token belongs to {username:?}, not a ServiceAccount"
            ))),
        }
    }
}

/// The webhooks running: their address, serving certificate and caBundle writes.
#[derive(Clone, Debug)]
pub struct Webhooks {
    pub addr: std::net::SocketAddr,
    pub serving: crate::grpc_tls::ServingCert,
    /// The leader's last caBundle write.
    pub published:
        watch::Receiver<trellis_controller_kubernetes::webhook::client_config::Published>,
}

impl Webhooks {
    /// What the admin port shows (`/api/v1/state` `webhooks`, `trellis check`).
    pub fn state_fn(
        &self,
        options: &crate::webhooks::WebhookOptions,
    ) -> crate::admin::WebhookStateFn {
        let (serving, published) = (self.serving.clone(), self.published.clone());
        let listen = self.addr.to_string();
        let endpoint = match &options.endpoint {
            crate::webhooks::WebhookEndpoint::Service {
                namespace,
                name,
                port,
            } => format!("service {namespace}/{name}:{port}"),
            crate::webhooks::WebhookEndpoint::Url { url, .. } => url.clone(),
        };
        let injection = options.injector.is_some();
        Arc::new(move || {
            let published = published.borrow().clone();
            let not_after = serving.info().borrow().not_after;
            crate::admin::WebhookState {
                listen: listen.clone(),
                endpoint: endpoint.clone(),
                injection,
                certificate_not_after_unix: not_after
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                ca_bundle_written: published.passes > 0 && published.problems.is_empty(),
                problems: published.problems,
            }
        })
    }
}

/// Starts the webhooks of `options` (see [`crate::webhooks`]): issues the serving certificate
/// from `ca`, binds the listener, serves `/convert` (and `/inject` when configured), and has the
/// leader (`is_leader`) keep the targets' client configs pointed here with the mesh's anchors.
pub async fn start_webhooks(
    options: &crate::webhooks::WebhookOptions,
    ca: CaHandle,
    is_leader: watch::Receiver<bool>,
    registry: &mut prometheus_client::registry::Registry,
    traffic_metrics: Option<trellis_traffic_metrics::MetricsApi>,
) -> anyhow::Result<Webhooks> {
    use trellis_controller_kubernetes::webhook::{self, client_config};

    if let Some(injector) = &options.injector {
        trellis_controller_kubernetes::inject::metrics_compat(&injector.metrics_compat)
            .map_err(|e| anyhow::anyhow!("--inject-metrics-compat: {e}"))?;
    }
    let client = client("--webhook").await?;
    let serving = crate::grpc_tls::ServingCert::start_for("webhook", ca.clone(), &options.tls())?;
    serving.register_metrics(registry);
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("--webhook: binding {}", options.listen))?;
    let addr = listener.local_addr()?;
    let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut others: Vec<Arc<dyn webhook::Handler>> = Vec::new();
    // The aggregated TrafficMetrics API authenticates the API server's front proxy by its
    // client certificate: only then does the port ask clients for one.
    let tls = match &traffic_metrics {
        Some(api) => {
            others.push(Arc::new(
                trellis_controller_kubernetes::aggregated::AggregatedApi::new(
                    api.clone(),
                    client.clone(),
                ),
            ));
            serving.server_config_with(
                alpn,
                Some(trellis_controller_kubernetes::aggregated::AcceptAnyClientCert::new()),
            )
        }
        None => serving.server_config_with_alpn(alpn),
    };
    if let Some(injector) = &options.injector {
        let (settings, ca) = (injector.clone(), ca.clone());
        let options: trellis_controller_kubernetes::injector::OptionsFn = Arc::new(move || {
            let anchors = String::from_utf8(anchors_pem(&ca)).unwrap_or_default();
            let mut options = trellis_controller_kubernetes::inject::InjectOptions::new(
                settings.proxy_image.clone(),
                settings.controller_url.clone(),
                anchors,
            );
            options.trust_domain = settings.trust_domain.clone();
            options.token_audience = settings.token_audience.clone();
            options.metrics_compat = settings.metrics_compat.clone();
            options
        });
        others.push(Arc::new(
            trellis_controller_kubernetes::injector::Injector::new(
                options,
                Some(client.clone()),
                default_identity(),
            ),
        ));
    }
    let paths: Vec<&str> = std::iter::once(webhook::PATH)
        .chain(others.iter().map(|h| h.path()))
        .collect();
    tracing::info!(%addr, "webhooks served over HTTPS: {}", paths.join(", "));
    tokio::spawn(webhook::serve_with(listener, Some(tls), others));

    // The bundle: the anchors in force, recomputed after every renewal of the serving
    // certificate (which follows every change of the CA).
    let (bundle_tx, bundle) = watch::channel(anchors_pem(&ca));
    let mut renewals = serving.info();
    tokio::spawn(async move {
        while renewals.changed().await.is_ok() {
            bundle_tx.send_if_modified(|current| {
                let pem = anchors_pem(&ca);
                let changed = *current != pem;
                *current = pem;
                changed
            });
        }
    });
    let endpoint = match &options.endpoint {
        crate::webhooks::WebhookEndpoint::Service {
            namespace,
            name,
            port,
        } => client_config::Endpoint::Service {
            namespace: namespace.clone(),
            name: name.clone(),
            port: *port,
        },
        crate::webhooks::WebhookEndpoint::Url { url, .. } => {
            client_config::Endpoint::Url(url.clone())
        }
    };
    let mut targets = client_config::Targets::smi(
        endpoint,
        options.injector.as_ref().map(|i| i.configuration.clone()),
    );
    if traffic_metrics.is_some() {
        targets.api_service = Some(trellis_traffic_metrics::API_SERVICE.to_owned());
    }
    let (_task, published) =
        client_config::spawn(client, targets, bundle, is_leader, options.retry);
    Ok(Webhooks {
        addr,
        serving,
        published,
    })
}

/// The CA's trust anchors as PEM (what the API server checks the webhook certificate against).
fn anchors_pem(ca: &CaHandle) -> Vec<u8> {
    ca.current()
        .anchors_der()
        .iter()
        .map(|der| {
            pem::encode_config(
                &pem::Pem::new("CERTIFICATE", der.clone()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        })
        .collect::<String>()
        .into_bytes()
}
