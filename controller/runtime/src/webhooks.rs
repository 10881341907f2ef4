//! The controller's admission-side webhooks on one HTTPS port (`trellis controller --webhook`):
//! the SMI CRDs' conversion at `/convert` and, when configured, the sidecar injector at
//! `/inject`.
//!
//! The serving certificate is issued by the mesh CA ([`crate::grpc_tls::ServingCert`], renewed
//! at 2/3 of its lifetime and at once when the CA changes) for the names the API server dials:
//! the Service's DNS names (`NAME.NAMESPACE.svc` and `.svc.cluster.local`), or the host of
//! `--webhook-url` for a controller outside the cluster. The leader writes the mesh's trust
//! anchors as the `caBundle` of every target (the five CRDs and the injector's
//! MutatingWebhookConfiguration) at start and after every renewal
//! (`trellis_controller_kubernetes::webhook::client_config`).
//!
//! This module holds what is the same with or without a Kubernetes client: the options and
//! their checks. Starting the server is `crate::kubernetes::start_webhooks`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::grpc_tls::GrpcTlsOptions;

/// Default lifetime of the webhook serving certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where the API server reaches the webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEndpoint {
    /// In-cluster: the controller's Service `namespace/name`, port `port` (443).
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// Outside the cluster: `https://HOST:PORT` (no path).
    Url { url: String, host: String },
}

impl WebhookEndpoint {
    /// `--webhook-service NAMESPACE/NAME`.
    pub fn service(text: &str) -> anyhow::Result<Self> {
        let (namespace, name) = text
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| {
                anyhow::anyhow!("--webhook-service {text:?}: expected NAMESPACE/NAME")
            })?;
        Ok(Self::Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            port: 443,
        })
    }

    /// `--webhook-url https://HOST:PORT`: https only (the API server calls webhooks over TLS
    /// only), no path (the paths are the webhooks'), no query.
    pub fn url(text: &str) -> anyhow::Result<Self> {
        let bad = |why: &str| anyhow::anyhow!("--webhook-url {text:?}: {why}");
        let uri: http::Uri = text.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the API server calls webhooks over https only"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad(
                "give no path or query: the controller adds /convert and /inject",
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self::Url {
            url: text.trim_end_matches('/').to_owned(),
            host,
        })
    }

    /// The names the serving certificate is valid for.
    pub fn certificate_names(&self) -> Vec<String> {
        match self {
            Self::Service {
                namespace, name, ..
            } => vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
            ],
            Self::Url { host, .. } => vec![host.clone()],
        }
    }
}

/// The sidecar injector's settings (`/inject`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectorOptions {
    /// The MutatingWebhookConfiguration whose client config the leader keeps pointed here.
    pub configuration: String,
    /// The proxy image (its `trellis-init` runs the interception rules).
    pub proxy_image: String,
    /// What injected proxies dial (`https://trellis-controller.trellis-system.svc:8090`).
    pub controller_url: String,
    /// The trust domain of injected proxies' SPIFFE ids (the controller's `--trust-domain`).
    pub trust_domain: String,
    /// The audience of their projected ServiceAccount token (the controller's
    /// `--token-audience`).
    pub token_audience: String,
    /// `--inject-metrics-compat`: other meshes' metric names injected proxies also expose.
    pub metrics_compat: String,
}

/// `--webhook` and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookOptions {
    /// HTTPS listen address.
    pub listen: SocketAddr,
    pub endpoint: WebhookEndpoint,
    /// `None`: conversion only.
    pub injector: Option<InjectorOptions>,
    /// Lifetime of the serving certificate (renewed at 2/3).
    pub lifetime: Duration,
    /// How often a failed caBundle write is retried.
    pub retry: Duration,
}

impl WebhookOptions {
    /// The serving certificate's options.
    pub fn tls(&self) -> GrpcTlsOptions {
        GrpcTlsOptions {
            names: self.endpoint.certificate_names(),
            lifetime: self.lifetime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_bad_ones_say_why() {
        let service = WebhookEndpoint::service("trellis-system/trellis-controller").unwrap();
        assert_eq!(
            service.certificate_names()[0],
            "trellis-controller.trellis-system.svc"
        );
        let url = WebhookEndpoint::url("https://192.0.2.10:9443/").unwrap();
        assert_eq!(
            url,
            WebhookEndpoint::Url {
                url: "https://192.0.2.10:9443".into(),
                host: "192.0.2.10".into()
            }
        );
        assert_eq!(
            WebhookEndpoint::url("https://[fd00::1]:9443")
                .unwrap()
                .certificate_names(),
            vec!["fd00::1".to_owned()]
        );
        for (bad, why) in [
            ("http://h:1", "https only"),
            ("https://h:1/convert", "no path"),
            ("not a url", "not a URL"),
        ] {
            let e = WebhookEndpoint::url(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(WebhookEndpoint::service("just-a-name").is_err());
    }
}
