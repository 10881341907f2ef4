//! The install's flags, checked once: [`Settings`] is what every renderer reads, and
//! [`Settings::from_args`] is the only place a command line can be refused, so a refused one
//! prints and applies nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use trellis_controller::identity::ca::{self, Authority, CaMaterial, PemInput};

use super::Args;
use super::webhook::FailurePolicy;

/// The namespace the install goes into unless `--namespace` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "trellis-system";
/// This CLI's version: the default image tag, and the version label of every object.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What stderr and the Secret's comment say about `--generate-ca`.
pub const GENERATED_CA_WARNING: &str = "FOR TRIALS ONLY: --generate-ca made a CA whose private key is in the Secret trellis-ca (and in the printed install); whoever reads it can mint mesh identities, and nothing rotates its anchor. For anything else give your own with --trust-anchor, --issuer-cert and --issuer-key (or --existing-ca-secret).";

/// Where the CA comes from: exactly one of the three ways (checked by clap and by
/// [`Settings::from_args`]).
#[derive(Debug, Default, clap::Args)]
pub struct CaFlags {
    /// Trust anchor(s), PEM, for the CA Secret's `ca.crt` (repeatable: during a CA rotation both
    /// the old and the new anchor).
    #[arg(long = "trust-anchor", value_name = "FILE", requires_all = ["issuer_cert", "issuer_key"])]
    pub trust_anchor: Vec<PathBuf>,
    /// Issuer certificate, PEM (`tls.crt`): signs workload certificates; an anchor or signed by one.
    #[arg(long, value_name = "FILE", requires_all = ["trust_anchor", "issuer_key"])]
    pub issuer_cert: Option<PathBuf>,
    /// Issuer private key, PEM PKCS#8 (`tls.key`).
    #[arg(long, value_name = "FILE", requires_all = ["trust_anchor", "issuer_cert"])]
    pub issuer_key: Option<PathBuf>,
    /// Generate a CA now and put it, private key included, in the CA Secret: for trials only.
    #[arg(long, conflicts_with_all = ["trust_anchor", "issuer_cert", "issuer_key", "existing_ca_secret"])]
    pub generate_ca: bool,
    /// Render no CA Secret: NAMESPACE/trellis-ca (keys ca.crt, tls.crt, tls.key) is created
    /// by you, or by a tool such as cert-manager, before the controller starts.
    #[arg(long, conflicts_with_all = ["trust_anchor", "issuer_cert", "issuer_key"])]
    pub existing_ca_secret: bool,
}

/// The CA the install carries.
#[derive(Clone, Debug)]
pub enum Ca {
    /// PEM text for the Secret (checked with the controller's own CA checks).
    Material {
        anchors: String,
        issuer_cert: String,
        issuer_key: String,
        generated: bool,
    },
    /// No Secret in the output: it exists already.
    Existing,
}

impl Ca {
    pub fn is_generated(&self) -> bool {
        matches!(
            self,
            Ca::Material {
                generated: true,
                ..
            }
        )
    }
}

/// The `--prometheus` [`Settings::for_uninstall`] assumes (only names are used to delete).
const UNINSTALL_PROMETHEUS: &str = "http://prometheus:9090";

/// Where the API server sends ConversionReviews and AdmissionReviews.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookTarget {
    /// The controller's Service (port 443 -> the pods' 9443).
    Service,
    /// `--webhook-url`: `https://HOST[:PORT]`, no path (the paths are appended).
    Url(String),
}

/// The names of what the install creates. Cluster-scoped objects other than the CRDs carry the
/// namespace when it is not the default one, so a second install (a test's) never takes over
/// the first one's RBAC or injector; the CRDs are one per cluster whatever the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    /// ServiceAccount, Deployment, Service, PodDisruptionBudget, Lease, Role and RoleBinding.
    pub controller: String,
    /// The controller's ClusterRole and ClusterRoleBinding.
    pub cluster_controller: String,
    /// The discovery adapter's ClusterRole and ClusterRoleBinding.
    pub cluster_discovery: String,
    /// The MutatingWebhookConfiguration (the controller's `--injector-name`).
    pub injector: String,
    /// The CA Secret (the controller's `--ca-secret NAMESPACE/NAME`).
    pub ca_secret: String,
}

impl Names {
    pub fn new(namespace: &str) -> anyhow::Result<Self> {
        check_dns_label(namespace).with_context(|| format!("--namespace {namespace:?}"))?;
        let suffix = if namespace == DEFAULT_NAMESPACE {
            String::new()
        } else {
            format!("-{namespace}")
        };
        Ok(Self {
            namespace: namespace.to_owned(),
            controller: "trellis-controller".to_owned(),
            cluster_controller: format!("trellis-controller{suffix}"),
            cluster_discovery: format!("trellis-discovery{suffix}"),
            injector: format!("trellis-proxy-injector{suffix}"),
            ca_secret: "trellis-ca".to_owned(),
        })
    }

    /// The DNS name proxies and the API server reach the controller's Service by.
    pub fn service_host(&self) -> String {
        format!("{}.{}.svc", self.controller, self.namespace)
    }
}

/// Every choice of the install, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub names: Names,
    pub controller_image: String,
    pub proxy_image: String,
    pub replicas: u16,
    pub webhook: WebhookTarget,
    pub failure_policy: FailurePolicy,
    /// `--metrics-compat` of injected proxies (empty: none).
    pub metrics_compat: Vec<String>,
    /// `--prometheus`: the TrafficMetrics API and its APIService.
    pub prometheus: Option<String>,
    pub trust_domain: String,
    pub ca: Ca,
    /// `--gateway`: the ingress gateways to render.
    pub gateways: Vec<super::gateway::GatewayInstall>,
    /// The anchors (PEM) gateways trust the controller with (empty without gateways).
    pub gateway_anchors: String,
}

impl Settings {
    /// Checks every flag and reads (and checks) the CA; nothing is printed or sent before this
    /// returns `Ok`.
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let names = Names::new(&args.namespace)?;
        let controller_image =
            image(&args.controller_image, args.tag.as_deref()).context("--controller-image")?;
        let proxy_image = image(&args.proxy_image, args.tag.as_deref()).context("--proxy-image")?;
        let webhook = match &args.webhook_url {
            None => WebhookTarget::Service,
            Some(url) => WebhookTarget::Url(
                webhook_url(url).with_context(|| format!("--webhook-url {url:?}"))?,
            ),
        };
        check_trust_domain(&args.trust_domain)
            .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
        if let Some(url) = &args.prometheus {
            trellis_traffic_metrics::MetricsApi::new(url)?;
            if matches!(webhook, WebhookTarget::Url(_)) {
                anyhow::bail!(
                    "--prometheus with --webhook-url: the APIService of the TrafficMetrics API can only call the controller's Service"
                );
            }
        }
        let ca = ca_from_flags(&args.ca)?;
        let gateways = args
            .gateways
            .iter()
            .map(|file| super::gateway::GatewayInstall::read(file))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gateway_anchors = match (&args.gateway_controller_ca, &ca) {
            (Some(file), _) => std::fs::read_to_string(file)
                .with_context(|| format!("--gateway-controller-ca {}", file.display()))?,
            (None, Ca::Material { anchors, .. }) => anchors.clone(),
            (None, Ca::Existing) if !gateways.is_empty() => anyhow::bail!(
                "--gateway with --existing-ca-secret: give the mesh's trust anchors with --gateway-controller-ca FILE (the gateway checks the controller's certificate against them)"
            ),
            (None, Ca::Existing) => String::new(),
        };
        Ok(Self {
            names,
            controller_image,
            proxy_image,
            replicas: args.replicas,
            webhook,
            failure_policy: args.injection_failure_policy,
            metrics_compat: args.metrics_compat.clone(),
            prometheus: args.prometheus.clone(),
            trust_domain: args.trust_domain.clone(),
            ca,
            gateways,
            gateway_anchors,
        })
    }

    /// The default install into `namespace`: what `trellis uninstall` removes.
    pub fn for_uninstall(namespace: &str) -> anyhow::Result<Self> {
        Ok(Self {
            names: Names::new(namespace)?,
            controller_image: image(super::DEFAULT_CONTROLLER_IMAGE, None)?,
            proxy_image: image(super::DEFAULT_PROXY_IMAGE, None)?,
            replicas: 2,
            webhook: WebhookTarget::Service,
            failure_policy: FailurePolicy::Fail,
            metrics_compat: Vec::new(),
            // So the uninstall removes the APIService and its RBAC too, if they were installed.
            prometheus: Some(UNINSTALL_PROMETHEUS.to_owned()),
            trust_domain: "cluster.local".to_owned(),
            ca: Ca::Existing,
            gateways: Vec::new(),
            gateway_anchors: String::new(),
        })
    }
}

fn ca_from_flags(flags: &CaFlags) -> anyhow::Result<Ca> {
    let from_files = !flags.trust_anchor.is_empty();
    match (from_files, flags.generate_ca, flags.existing_ca_secret) {
        (false, false, false) => bail!(
            "choose the mesh CA: --trust-anchor FILE --issuer-cert FILE --issuer-key FILE (your own CA), --existing-ca-secret (the Secret trellis-ca exists already) or --generate-ca (for trials only)"
        ),
        (true, false, false) => {
            let (Some(cert), Some(key)) = (&flags.issuer_cert, &flags.issuer_key) else {
                bail!("--trust-anchor needs --issuer-cert and --issuer-key");
            };
            let mut anchors = String::new();
            for path in &flags.trust_anchor {
                let text = read_pem(path, "--trust-anchor")?;
                anchors.push_str(text.trim_end());
                anchors.push('\n');
            }
            let issuer_cert = read_pem(cert, "--issuer-cert")?;
            let issuer_key = read_pem(key, "--issuer-key")?;
            let material = CaMaterial {
                anchors: vec![pem_input("--trust-anchor", &anchors)],
                issuer_cert: pem_input(&format!("--issuer-cert {}", cert.display()), &issuer_cert),
                issuer_key: pem_input(&format!("--issuer-key {}", key.display()), &issuer_key),
            };
            // The controller's own checks: what the Secret holds must start a controller.
            Authority::new(&material).context("the CA given is not usable")?;
            Ok(Ca::Material {
                anchors,
                issuer_cert,
                issuer_key,
                generated: false,
            })
        }
        (false, true, false) => {
            let material = ca::generate().context("generating a CA")?;
            let text = |input: &PemInput| String::from_utf8_lossy(&input.pem).into_owned();
            Ok(Ca::Material {
                anchors: text(&material.anchors[0]),
                issuer_cert: text(&material.issuer_cert),
                issuer_key: text(&material.issuer_key),
                generated: true,
            })
        }
        (false, false, true) => Ok(Ca::Existing),
        _ => bail!(
            "--trust-anchor/--issuer-cert/--issuer-key, --generate-ca and --existing-ca-secret are three ways to give the CA: choose one"
        ),
    }
}

fn pem_input(origin: &str, text: &str) -> PemInput {
    PemInput {
        origin: origin.to_owned(),
        pem: text.as_bytes().to_vec(),
    }
}

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read", path.display()))
}

/// `repository[:tag|@digest]` with `tag` appended when the image has neither.
fn image(image: &str, tag: Option<&str>) -> anyhow::Result<String> {
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        bail!("{image:?} is not an image reference");
    }
    // A ':' after the last '/' is a tag (before it, a registry port).
    let last = image.rsplit('/').next().unwrap_or(image);
    let pinned = image.contains('@') || last.contains(':');
    match (pinned, tag) {
        (true, Some(tag)) => bail!(
            "{image:?} already carries a tag or digest and --tag {tag:?} was given too: give one"
        ),
        (true, None) => Ok(image.to_owned()),
        (false, tag) => {
            let tag = tag.unwrap_or(VERSION);
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                && !tag.starts_with(['.', '-']);
            if !valid {
                bail!("--tag {tag:?} is not a valid image tag");
            }
            Ok(format!("{image}:{tag}"))
        }
    }
}

/// `https://HOST[:PORT]` with nothing after it (a trailing `/` is allowed); returned without
/// the trailing slash.
fn webhook_url(text: &str) -> anyhow::Result<String> {
    let uri: http::Uri = text.parse().context("not a URL")?;
    if uri.scheme_str() != Some("https") {
        bail!("must be https:// (the API server calls webhooks over TLS only)");
    }
    let Some(authority) = uri.authority() else {
        bail!("has no host");
    };
    if authority.host().is_empty() || authority.as_str().contains('@') {
        bail!("needs a host and no user info");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("must be only https://HOST[:PORT]: the paths /convert and /inject are added to it");
    }
    Ok(format!("https://{authority}"))
}

fn check_dns_label(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "not a valid namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

fn check_trust_domain(domain: &str) -> anyhow::Result<()> {
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if !ok {
        bail!(
            "a SPIFFE trust domain is lowercase letters, digits, '.', '-' and '_' (no scheme, no path)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_get_the_tag_unless_pinned() {
        assert_eq!(
            image("ghcr.io/x/controller", None).unwrap(),
            format!("ghcr.io/x/controller:{VERSION}")
        );
        assert_eq!(
            image("localhost:5000/controller", Some("dev")).unwrap(),
            "localhost:5000/controller:dev"
        );
        assert_eq!(image("c:1.2", None).unwrap(), "c:1.2");
        assert_eq!(image("c@sha256:ab", None).unwrap(), "c@sha256:ab");
        let conflict = image("c:1.2", Some("1.3")).unwrap_err().to_string();
        assert!(conflict.contains("already carries a tag"), "{conflict}");
        assert!(image("c", Some("-bad")).is_err());
        assert!(image("a b", None).is_err());
    }

    #[test]
    fn webhook_urls_are_https_host_and_port_only() {
        assert_eq!(
            webhook_url("https://10.0.0.5:9443/").unwrap(),
            "https://10.0.0.5:9443"
        );
        assert_eq!(
            webhook_url("https://[fd00::1]:9443").unwrap(),
            "https://[fd00::1]:9443"
        );
        for (bad, says) in [
            ("http://10.0.0.5:9443", "must be https"),
            (
                "https://10.0.0.5:9443/convert",
                "paths /convert and /inject",
            ),
            ("https://10.0.0.5:9443/?a=b", "paths /convert and /inject"),
            ("10.0.0.5:9443", "must be https"),
            ("https://u@h:1", "no user info"),
        ] {
            let error = format!("{:#}", webhook_url(bad).unwrap_err());
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn names_carry_the_namespace_off_the_default() {
        let default = Names::new(DEFAULT_NAMESPACE).unwrap();
        assert_eq!(default.injector, "trellis-proxy-injector");
        assert_eq!(default.cluster_controller, "trellis-controller");
        let other = Names::new("mesh-test-1").unwrap();
        assert_eq!(other.injector, "trellis-proxy-injector-mesh-test-1");
        assert_eq!(other.cluster_discovery, "trellis-discovery-mesh-test-1");
        assert_eq!(other.controller, "trellis-controller");
        assert_eq!(other.service_host(), "trellis-controller.mesh-test-1.svc");
        for bad in ["", "Trellis", "-a", "a_b", &"x".repeat(64)] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn no_ca_choice_is_an_error_that_lists_the_choices() {
        let error = ca_from_flags(&CaFlags::default()).unwrap_err().to_string();
        for choice in ["--trust-anchor", "--existing-ca-secret", "--generate-ca"] {
            assert!(error.contains(choice), "{error}");
        }
    }

    #[test]
    fn trust_domains_are_checked() {
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("spiffe://x").is_err());
        assert!(check_trust_domain("").is_err());
    }
}
