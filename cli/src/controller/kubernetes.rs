//! `trellis controller`'s Kubernetes flags (the `kubernetes` feature): the CA from a Secret,
//! TokenReview's audience, the Lease election, and the webhooks (conversion, injection). Without the feature,
//! `without_kubernetes.rs` stands in with no flags (and `--platform kubernetes` fails at start
//! saying the build lacks it).

use trellis_controller::identity::CaSource;
use trellis_controller::webhooks::{InjectorOptions, WebhookEndpoint, WebhookOptions};
use trellis_controller_core::leader::LeaderOptions;

#[derive(Debug, clap::Args)]
pub struct KubernetesArgs {
    /// Kubernetes Secret holding the CA: `ca.crt` (anchors), `tls.crt` (issuer), `tls.key`.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        conflicts_with_all = ["trust_anchor", "issuer_cert", "issuer_key"]
    )]
    pub ca_secret: Option<String>,
    /// Audience ServiceAccount tokens must be bound to (TokenReview, `--platform kubernetes`).
    #[arg(long, default_value = "trellis")]
    pub token_audience: String,
    /// Elect a leader with a Lease before writing to Kubernetes (Events). On by default with
    /// `--platform kubernetes`; `--leader-elect=false` makes this replica always write.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,
    /// Namespace of the leader election Lease.
    #[arg(long, default_value = "trellis-system")]
    pub lease_namespace: String,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "trellis-controller")]
    pub lease_name: String,
    /// Lease duration (whole seconds); the leader renews every `--lease-renew`.
    #[arg(long, default_value = "15", value_name = "SECONDS", hide = true)]
    pub lease_duration: u64,
    /// How often the leader renews (and followers retry), in milliseconds.
    #[arg(long, default_value = "2000", value_name = "MILLIS", hide = true)]
    pub lease_renew: u64,
    /// Serve the CRD conversion webhook (/convert) and the sidecar injector (/inject) over HTTPS
    /// on this address, with a certificate from the mesh CA; the leader writes the caBundle.
    #[arg(long, value_name = "LISTEN")]
    pub webhook: Option<std::net::SocketAddr>,
    /// The Service the API server calls the webhooks through (port 443); the serving
    /// certificate is valid for NAME.NAMESPACE.svc[.cluster.local].
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "trellis-system/trellis-controller",
        requires = "webhook"
    )]
    pub webhook_service: String,
    /// A controller outside the cluster: the API server calls https://HOST:PORT/convert and
    /// /inject (clientConfig.url) and the certificate is valid for HOST.
    #[arg(long, value_name = "URL", requires = "webhook")]
    pub webhook_url: Option<String>,
    /// Lifetime of the webhook serving certificate (renewed at 2/3 of it).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, hide = true)]
    pub webhook_tls_lifetime: std::time::Duration,
    /// The sidecar injector's MutatingWebhookConfiguration; serving /inject needs --proxy-image.
    #[arg(long, value_name = "NAME", default_value = "trellis-proxy-injector")]
    pub injector_name: String,
    /// The image of injected proxies (and of their `trellis-init` container). Without it, no
    /// injection is served.
    #[arg(long, value_name = "IMAGE", requires = "webhook")]
    pub proxy_image: Option<String>,
    /// The controller URL injected proxies dial (default: https://NAME.NAMESPACE.svc:8090 of
    /// --webhook-service).
    #[arg(long, value_name = "URL", requires = "proxy_image")]
    pub inject_controller_url: Option<String>,
    /// Injected proxies also expose these meshes' metric names, for Flagger's built-in queries
    /// (`osm`, `linkerd`, `istio`, comma-separated); a pod's `trellis.io/metrics-compat`
    /// annotation overrides it.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "",
        requires = "proxy_image"
    )]
    pub inject_metrics_compat: String,
}

impl KubernetesArgs {
    /// The leader election to run, if any (on by default when `kubernetes` is a platform).
    pub fn leader(&self, kubernetes: bool) -> Option<LeaderOptions> {
        if !self.leader_elect.unwrap_or(kubernetes) {
            return None;
        }
        let mut options = LeaderOptions::new(&self.lease_namespace, &self.lease_name);
        options.lease_duration = std::time::Duration::from_secs(self.lease_duration.max(1));
        options.retry_period = std::time::Duration::from_millis(self.lease_renew.max(10));
        Some(options)
    }

    /// `--ca-secret`, checked.
    pub fn ca_secret(&self) -> anyhow::Result<Option<CaSource>> {
        let Some(secret) = &self.ca_secret else {
            return Ok(None);
        };
        let (namespace, name) = secret
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--ca-secret {secret:?}: expected NAMESPACE/NAME"))?;
        Ok(Some(CaSource::Secret {
            namespace: namespace.into(),
            name: name.into(),
        }))
    }

    /// `--webhook` and friends, checked.
    pub fn webhooks(&self, trust_domain: &str) -> anyhow::Result<Option<WebhookOptions>> {
        let Some(listen) = self.webhook else {
            return Ok(None);
        };
        let service = WebhookEndpoint::service(&self.webhook_service)?;
        let endpoint = match &self.webhook_url {
            Some(url) => WebhookEndpoint::url(url)?,
            None => service.clone(),
        };
        let injector = self.proxy_image.as_ref().map(|image| {
            let controller_url =
                self.inject_controller_url
                    .clone()
                    .unwrap_or_else(|| match &service {
                        WebhookEndpoint::Service {
                            namespace, name, ..
                        } => format!("https://{name}.{namespace}.svc:8090"),
                        WebhookEndpoint::Url { url, .. } => url.clone(),
                    });
            InjectorOptions {
                configuration: self.injector_name.clone(),
                proxy_image: image.clone(),
                controller_url,
                trust_domain: trust_domain.to_owned(),
                token_audience: self.token_audience.clone(),
                metrics_compat: self.inject_metrics_compat.clone(),
            }
        });
        Ok(Some(WebhookOptions {
            listen,
            endpoint,
            injector,
            lifetime: self.webhook_tls_lifetime,
            retry: std::time::Duration::from_secs(2),
        }))
    }

    /// `--token-audience`.
    pub fn token_audience(&self) -> Option<String> {
        Some(self.token_audience.clone())
    }
}
