//! `trellis install` and `trellis uninstall`: the whole Kubernetes install (Namespace, SMI CRDs,
//! ServiceAccount, RBAC, CA Secret, controller Deployment, Service, PodDisruptionBudget and the
//! sidecar injector's MutatingWebhookConfiguration; with `--gateway FILE`, ingress gateways
//! ([`gateway`])) as typed k8s-openapi objects, printed as
//! YAML or JSON for `kubectl apply -f -` / `kubectl delete -f -`, or applied (server-side apply)
//! and deleted through kube-rs with `--apply`.
//!
//! Every flag is checked before anything is printed or sent ([`settings`]), so a conflicting
//! command line leaves nothing half-written. The objects come from [`render`]; the RBAC rules
//! from [`rbac`], which also renders `deploy/controller-rbac.yaml` and
//! `adapters/kubernetes/rbac.yaml` (`--rbac-only`), so the install and those files share one
//! source. The committed default install is `deploy/install.yaml`, written by
//! `cargo run -- install --existing-ca-secret > deploy/install.yaml` (a test fails when stale).

use std::io::Write as _;
use std::process::ExitCode;

pub mod document;
pub mod gateway;
pub mod rbac;
pub mod render;
pub mod settings;
pub mod webhook;
pub mod workload;

/// `--apply`: server-side apply and delete through kube-rs (the `kubernetes` feature); without
/// the feature the same names fail saying the build lacks it.
#[cfg_attr(not(feature = "kubernetes"), path = "install/without_kubernetes.rs")]
mod apply;

use document::Format;
use settings::{CaFlags, Settings};

/// Default repository of the controller image (tag: `--tag`, default this CLI's version).
pub const DEFAULT_CONTROLLER_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-controller";
/// Default repository of the proxy image (holds `trellis-proxy` and `trellis-init`).
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Namespace of the controller, its Service, CA Secret and Lease (created by the install).
    #[arg(long, default_value = settings::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Controller image; without a tag or digest, `--tag` is appended.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_CONTROLLER_IMAGE)]
    pub controller_image: String,
    /// Proxy image injected into meshed pods (the `trellis-proxy` sidecar and the `trellis-init`
    /// init container); without a tag or digest, `--tag` is appended.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Tag of both images [default: this trellis's version].
    #[arg(long)]
    pub tag: Option<String>,
    /// Controller replicas (one leader, the others serve gRPC and the webhooks too).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub replicas: u16,
    /// The API server calls the webhooks at this URL (a controller outside the cluster:
    /// development, tests) instead of through the controller's Service.
    #[arg(long, value_name = "https://HOST:PORT")]
    pub webhook_url: Option<String>,
    /// What the API server does with a pod in an opted-in namespace when the injector cannot be
    /// reached: `fail` refuses the pod (it never runs unmeshed), `ignore` admits it unmeshed.
    #[arg(long, value_enum, default_value_t = webhook::FailurePolicy::Fail)]
    pub injection_failure_policy: webhook::FailurePolicy,
    /// Injected proxies also expose these meshes' metric names, so Flagger's built-in queries
    /// for that provider work (`osm`, `linkerd`, `istio`; comma-separated). A pod's
    /// `trellis.io/metrics-compat` annotation overrides it.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = ["osm", "linkerd", "istio"])]
    pub metrics_compat: Vec<String>,
    /// The Prometheus that scrapes the proxies, as the controller reaches it
    /// (`http://prometheus.trellis-system:9090`): the controller serves the SMI TrafficMetrics API
    /// from it, registered with the APIService `v1alpha1.metrics.smi-spec.io` (added, with the
    /// RBAC it needs). Needs the controller's Service (not --webhook-url).
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[command(flatten)]
    pub ca: CaFlags,
    /// An ingress gateway from a Gateway document (policy.trellis.io/v1alpha1, repeatable):
    /// rendered in the Gateway's namespace as a ServiceAccount (its mesh identity), a ConfigMap
    /// holding the document, a Deployment running `trellis-proxy --gateway` against this
    /// controller, its certificates' Secrets mounted, and a LoadBalancer Service.
    #[arg(long = "gateway", value_name = "FILE", conflicts_with = "rbac_only")]
    pub gateways: Vec<std::path::PathBuf>,
    /// The trust anchors (PEM) the gateways check the controller's certificate against, when
    /// the install carries no CA (--existing-ca-secret); otherwise the install's own anchors.
    #[arg(long, value_name = "FILE", requires = "gateways")]
    pub gateway_controller_ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// Apply the install with server-side apply (field manager `trellis-install`) instead of
    /// printing it, in dependency order, reporting each object.
    #[arg(long)]
    pub apply: bool,
    /// With --apply: the API server checks everything and persists nothing.
    #[arg(long, requires = "apply")]
    pub dry_run: bool,
    /// Print only the RBAC of the controller or of the discovery adapter (for a controller run
    /// outside the cluster; also how deploy/controller-rbac.yaml and
    /// adapters/kubernetes/rbac.yaml are written).
    #[arg(long, value_enum, conflicts_with_all = ["apply", "generate_ca", "existing_ca_secret", "trust_anchor"])]
    pub rbac_only: Option<rbac::Which>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Namespace the install went into.
    #[arg(long, default_value = settings::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Leave the SMI CRDs, and with them every SMI object of the cluster, in place.
    #[arg(long)]
    pub keep_crds: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// Delete the objects through the API server instead of printing them.
    #[arg(long)]
    pub apply: bool,
    /// With --apply: the API server checks the deletes and persists nothing.
    #[arg(long, requires = "apply")]
    pub dry_run: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(which) = args.rbac_only {
        let names = settings::Names::new(&args.namespace)?;
        print!("{}", rbac::file(which, &names));
        return Ok(ExitCode::SUCCESS);
    }
    // Every check (flags, files, the CA) happens here, before anything is printed or sent.
    let settings = Settings::from_args(args)?;
    let documents = render::install(&settings);
    if settings.ca.is_generated() {
        eprintln!("trellis install: {}", settings::GENERATED_CA_WARNING);
    }
    if args.apply {
        return apply::apply(&documents, args.dry_run);
    }
    let header = render::header(&settings, &command_line());
    write_stdout(&document::render(&documents, args.output, &header))
}

pub fn run_uninstall(args: &UninstallArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::for_uninstall(&args.namespace)?;
    let documents = render::uninstall(&settings, args.keep_crds);
    if args.apply {
        return apply::delete(&documents, args.dry_run);
    }
    let header = format!(
        "# Trellis {}: uninstall, for `kubectl delete -f -` (objects in reverse install order).\n# Generated by `{}`.\n",
        settings::VERSION,
        command_line()
    );
    write_stdout(&document::render(&documents, args.output, &header))
}

/// `trellis <args>` as given, for the header of what is printed (the regeneration command).
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("trellis {}", args.join(" "))
}

fn write_stdout(text: &str) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
