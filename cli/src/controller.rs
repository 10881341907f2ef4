//! `trellis controller`: run the control plane (policy sources, discovery, index, gRPC for
//! proxies, admin port) until Ctrl-C or SIGTERM. Problems are printed to stderr as they appear.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use trellis_controller::discovery::Platform;
use trellis_controller::grpc_tls::GrpcTlsOptions;
use trellis_controller::identity::{CaSource, IdentityOptions};
use trellis_controller::run::{Options, Running, start_full};
use trellis_controller_core::index::IndexOptions;
use trellis_controller_core::index::inbound::AccessSwitches;
use trellis_controller_core::leader::LeaderOptions;

/// The Kubernetes flags; without the `kubernetes` feature, none (one module or the other).
#[cfg_attr(not(feature = "kubernetes"), path = "controller/without_kubernetes.rs")]
mod kubernetes;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Log filter for the controller's diagnostics on stderr (tracing EnvFilter syntax, e.g.
    /// `info`, `warn,trellis_adapter_consul=debug`).
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log: String,
    /// SMI YAML file or directory to watch (repeatable).
    #[arg(long = "policy", value_name = "DIR")]
    pub policy: Vec<PathBuf>,
    /// Discovery platform: file=PATH, consul=ADDR[,token-file=PATH][,datacenter=DC][,namespace=NS],
    /// cloudmap=NAMESPACE[,endpoint=URL], kubernetes (repeatable).
    #[arg(long = "platform", value_name = "PLATFORM", required = true)]
    pub platform: Vec<Platform>,
    /// gRPC listen address for proxies.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub grpc: SocketAddr,
    /// Serve gRPC over TLS with a certificate from the mesh CA valid for this DNS name or IP
    /// address (repeatable); proxies connect with https://NAME:PORT and --controller-ca. Without
    /// it gRPC is plaintext: for loopback or a single host only.
    #[arg(long = "grpc-tls-name", value_name = "NAME")]
    pub grpc_tls_name: Vec<String>,
    /// Lifetime of the gRPC serving certificate (renewed at 2/3 of it).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, hide = true)]
    pub grpc_tls_lifetime: std::time::Duration,
    /// Admin listen address (/metrics, /ready, /live, /api/v1/state).
    #[arg(long, default_value = "127.0.0.1:9990")]
    pub admin: SocketAddr,
    /// The Prometheus that scrapes the proxies (http://HOST:PORT): serves the SMI TrafficMetrics
    /// API (metrics.smi-spec.io/v1alpha1) from it on the admin port under
    /// /apis/metrics.smi-spec.io/v1alpha1 and, with --webhook, as the aggregated API.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Allow inbound traffic no TrafficTarget allows (mesh-wide; default is deny).
    #[arg(long)]
    pub permissive: bool,
    /// Allow inbound traffic no TrafficTarget allows, for workloads in this namespace (repeatable).
    #[arg(long = "permissive-namespace", value_name = "NS")]
    pub permissive_namespace: Vec<String>,
    /// Plaintext (no mTLS) callers from this network may call every workload (repeatable).
    #[arg(long = "plaintext-from", value_name = "CIDR", value_parser = parse_cidr)]
    pub plaintext_from: Vec<ipnet::IpNet>,
    /// Plaintext (no mTLS) callers from anywhere may call workloads in this namespace (repeatable).
    #[arg(long = "plaintext-namespace", value_name = "NS")]
    pub plaintext_namespace: Vec<String>,
    /// Proxies of workloads in this namespace write access logs, one JSON line per request, to
    /// their stderr (repeatable; sent with their inbound policy).
    #[arg(long = "access-log-namespace", value_name = "NS")]
    pub access_log_namespace: Vec<String>,
    /// Egress to destinations the mesh does not know: `allow` (forwarded unchanged, the default)
    /// or `deny` (proxies refuse intercepted connections to them; told with every not-found
    /// answer).
    #[arg(long, value_enum, default_value = "allow")]
    pub egress: Egress,
    /// CA trust anchor, PEM (repeatable; every certificate in every file is trusted: rotation).
    #[arg(long = "trust-anchor", value_name = "FILE")]
    pub trust_anchor: Vec<PathBuf>,
    /// Issuer certificate, PEM: signs workload certificates, chains to a trust anchor.
    #[arg(long, value_name = "FILE")]
    pub issuer_cert: Option<PathBuf>,
    /// Issuer private key, PEM PKCS#8.
    #[arg(long, value_name = "FILE")]
    pub issuer_key: Option<PathBuf>,
    /// Lifetime of workload certificates (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: std::time::Duration,
    /// Bootstrap tokens (YAML: tokens: [{workload: ns/name, sha256: HEX}]), reloaded on change.
    #[arg(long, value_name = "FILE")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// `--ca-secret`, `--token-audience`, `--leader-elect`, `--lease-*` (the `kubernetes` feature).
    #[command(flatten)]
    pub kubernetes: kubernetes::KubernetesArgs,
}

impl Args {
    /// The leader election to run, if any.
    fn leader(&self) -> Option<LeaderOptions> {
        self.kubernetes
            .leader(self.platform.contains(&Platform::Kubernetes))
    }
}

/// A `--plaintext-from` value (CIDR or address).
fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    trellis_controller_core::index::inbound::parse_cidr(text)
}

impl Args {
    /// The access switches beyond `--permissive`.
    fn access(&self) -> AccessSwitches {
        AccessSwitches {
            permissive_namespaces: self.permissive_namespace.clone(),
            plaintext_from: self.plaintext_from.clone(),
            plaintext_namespaces: self.plaintext_namespace.clone(),
        }
    }

    /// The CA and proof checks.
    fn identity(&self) -> anyhow::Result<IdentityOptions> {
        let ca = match (
            self.kubernetes.ca_secret()?,
            self.trust_anchor.is_empty(),
            &self.issuer_cert,
            &self.issuer_key,
        ) {
            (Some(secret), ..) => secret,
            (None, true, None, None) => CaSource::Generated,
            (None, false, Some(cert), Some(key)) => CaSource::Files {
                anchors: self.trust_anchor.clone(),
                issuer_cert: cert.clone(),
                issuer_key: key.clone(),
            },
            _ => anyhow::bail!(
                "a CA from files needs --trust-anchor (at least one), --issuer-cert and --issuer-key together"
            ),
        };
        let grpc_tls = if self.grpc_tls_name.is_empty() {
            None
        } else if ca == CaSource::Generated {
            anyhow::bail!(
                "--grpc-tls-name needs the mesh CA from --trust-anchor, --issuer-cert and --issuer-key (or --ca-secret): proxies verify the controller with its anchors (--controller-ca), and a CA generated in memory has none they can read"
            );
        } else {
            Some(GrpcTlsOptions {
                names: self.grpc_tls_name.clone(),
                lifetime: self.grpc_tls_lifetime,
            })
        };
        let defaults = IdentityOptions::default();
        Ok(IdentityOptions {
            grpc_tls,
            ca,
            cert_lifetime: self.cert_lifetime,
            bootstrap_tokens: self.bootstrap_tokens.clone(),
            token_review: self.platform.contains(&Platform::Kubernetes),
            token_audience: self
                .kubernetes
                .token_audience()
                .unwrap_or(defaults.token_audience.clone()),
            ..defaults
        })
    }

    /// One line per access switch that lets more in than TrafficTargets (stderr at start).
    fn access_warnings(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.permissive {
            lines.push(
                "PERMISSIVE mode: inbound traffic no TrafficTarget allows is allowed mesh-wide"
                    .to_owned(),
            );
        }
        for ns in &self.permissive_namespace {
            lines.push(format!("PERMISSIVE in namespace {ns}: inbound traffic no TrafficTarget allows is allowed there"));
        }
        for net in &self.plaintext_from {
            lines.push(format!("plaintext allowed from {net}: callers without mTLS from there may call every workload"));
        }
        for ns in &self.plaintext_namespace {
            lines.push(format!(
                "plaintext allowed into namespace {ns} from anywhere"
            ));
        }
        lines
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    // The libraries report through `tracing` (an adapter's failed query, a TLS handshake a proxy
    // could not complete, a reload): without a subscriber those would be lost. Stderr, so the
    // address lines on stdout stay machine-readable.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(args))
}

async fn serve(args: &Args) -> anyhow::Result<ExitCode> {
    let leader = args.leader();
    if leader.is_some() && !args.platform.contains(&Platform::Kubernetes) {
        anyhow::bail!("--leader-elect needs --platform kubernetes (the Lease lives there)");
    }
    let running = start_full(
        Options {
            policy_paths: args.policy.clone(),
            platforms: args.platform.clone(),
            adapters: Default::default(),
            grpc: args.grpc,
            admin: Some(args.admin),
            index: IndexOptions {
                trust_domain: args.trust_domain.clone(),
                permissive: args.permissive,
                access: args.access(),
                access_log_namespaces: args.access_log_namespace.clone(),
                egress_denied: args.egress == Egress::Deny,
            },
            webhooks: args.kubernetes.webhooks(&args.trust_domain)?,
            traffic_metrics: args
                .prometheus
                .as_deref()
                .map(trellis_traffic_metrics::MetricsApi::new)
                .transpose()?,
        },
        args.identity()?,
        leader,
        Vec::new(),
    )
    .await?;
    println!("grpc listening on {}", running.grpc);
    if let Some(admin) = running.admin {
        println!("admin listening on {admin}");
    }
    #[cfg(feature = "kubernetes")]
    if let Some(webhooks) = &running.webhooks {
        println!("webhooks listening on {}", webhooks.addr);
    }
    for line in args.access_warnings() {
        eprintln!("trellis controller: {line}");
    }
    if !args.grpc_tls_name.is_empty() {
        eprintln!(
            "trellis controller: gRPC over TLS for {}: certificate from the mesh CA, renewed at 2/3 of its {} lifetime",
            args.grpc_tls_name.join(", "),
            humantime::format_duration(args.grpc_tls_lifetime)
        );
    } else if !running.grpc.ip().is_loopback() {
        eprintln!(
            "trellis controller: gRPC on {} is plaintext: bootstrap tokens and configuration cross the network in clear (give --grpc-tls-name to serve TLS)",
            running.grpc
        );
    }
    if matches!(args.identity()?.ca, CaSource::Generated) {
        eprintln!(
            "trellis controller: CA generated in memory for local use (give --trust-anchor/--issuer-cert/--issuer-key or --ca-secret to use your own)"
        );
    }
    let identity_report = report_identity_errors(&running);
    let mut status = running.index.status();
    let report = tokio::spawn(async move {
        let mut shown = Vec::new();
        while status.changed().await.is_ok() {
            let problems = status.borrow_and_update().problems.clone();
            for p in problems.iter().filter(|p| !shown.contains(*p)) {
                eprintln!("problem: {}: {}: {}", p.location, p.resource, p.message);
            }
            shown = problems;
        }
    });
    shutdown_signal().await;
    report.abort();
    identity_report
        .iter()
        .for_each(tokio::task::JoinHandle::abort);
    // Hand the Lease over at once rather than let the next leader wait for it to expire.
    running.leader.release().await;
    Ok(ExitCode::SUCCESS)
}

/// Prints CA, bootstrap token and gRPC serving certificate errors on stderr as they appear (the last good
/// material stays in force).
fn report_identity_errors(running: &Running) -> Vec<tokio::task::JoinHandle<()>> {
    fn report<E: std::fmt::Display + Clone + Send + Sync + 'static>(
        mut errors: tokio::sync::watch::Receiver<Option<E>>,
        what: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while errors.changed().await.is_ok() {
                if let Some(e) = errors.borrow_and_update().clone() {
                    eprintln!("problem: {what}: {e} (the last good one stays in force)");
                }
            }
        })
    }
    let identity = &running.identity;
    let mut tasks = vec![report(identity.ca().errors(), "CA")];
    tasks.extend(identity.token_errors().map(|t| report(t, "identity")));
    tasks.extend(
        running
            .grpc_tls
            .as_ref()
            .map(|tls| report(tls.errors(), "gRPC serving certificate")),
    );
    tasks
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// `--egress`: what proxies do with intercepted connections to destinations the mesh does not
/// know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Egress {
    /// Forwarded unchanged.
    Allow,
    /// Refused.
    Deny,
}
