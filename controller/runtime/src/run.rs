//! Starting a whole controller in this process: policy sources, discovery, the index, the gRPC
//! server (with the CA's `Identity.Certify`) and the admin port. Used by `trellis controller`,
//! `trellis demo` and the tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::admin::Admin;
use crate::discovery::{Platform, connect_all};
use crate::grpc_tls::ServingCert;
use crate::identity::{Certifier, IdentityOptions};
use crate::webhooks::WebhookOptions;
use trellis_controller_core::index::{Index, IndexOptions};
use trellis_controller_core::leader::{LeaderOptions, Leadership, default_identity};
use trellis_controller_core::policy::PolicySource;
use trellis_controller_core::policy::files::FilePolicySource;
use trellis_controller_grpc::{ProxyApi, StreamCounts};

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// SMI YAML files and directories (one file policy source over all of them). With the
    /// Kubernetes platform, the SMI CRDs are a policy source too.
    pub policy_paths: Vec<PathBuf>,
    pub platforms: Vec<Platform>,
    /// Discovery adapters built by the embedding program, merged after `platforms` (the demo's
    /// adapters for its local stand-ins of Consul and Cloud Map).
    pub adapters: Adapters,
    /// gRPC listen address for proxies (port 0 = any).
    pub grpc: SocketAddr,
    /// Admin listen address (port 0 = any); `None` = no admin port.
    pub admin: Option<SocketAddr>,
    pub index: IndexOptions,
    /// The conversion and injection webhooks (Kubernetes only); `None` = not served.
    pub webhooks: Option<WebhookOptions>,
    /// The SMI TrafficMetrics API from this Prometheus (`--prometheus`), on the admin port;
    /// `None`: its paths answer 404 saying the flag is missing.
    pub traffic_metrics: Option<trellis_traffic_metrics::MetricsApi>,
}

/// Discovery adapters handed over ready-made (see [`Options::adapters`]).
#[derive(Clone, Default)]
pub struct Adapters(pub Vec<Arc<dyn trellis_discovery::Discovery>>);

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|a| a.source_id()))
            .finish()
    }
}

/// A started controller.
#[derive(Clone, Debug)]
pub struct Running {
    pub grpc: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub index: Index,
    /// The CA behind `Identity.Certify`.
    pub identity: Certifier,
    /// Whether this replica may write to Kubernetes; `leader.release()` on shutdown.
    pub leader: Leadership,
    /// The gRPC port's serving certificate when it serves TLS (`IdentityOptions::grpc_tls`).
    pub grpc_tls: Option<ServingCert>,
    /// The webhooks, when `Options::webhooks` asked for them.
    pub webhooks: Option<crate::kubernetes::Webhooks>,
}

/// Starts everything in the background on the current Tokio runtime.
pub async fn start(options: Options) -> anyhow::Result<Running> {
    start_with(options, Vec::new()).await
}

/// Like [`start`], with extra policy sources after the files (e.g. Kubernetes).
pub async fn start_with(
    options: Options,
    extra_sources: Vec<Arc<dyn PolicySource>>,
) -> anyhow::Result<Running> {
    start_with_identity(options, IdentityOptions::default(), extra_sources).await
}

/// Like [`start_with`], with the CA and proof checks set up by `identity` (the default is a CA
/// generated in memory that accepts no proof).
pub async fn start_with_identity(
    options: Options,
    identity: IdentityOptions,
    extra_sources: Vec<Arc<dyn PolicySource>>,
) -> anyhow::Result<Running> {
    start_full(options, identity, None, extra_sources).await
}

/// Like [`start_with_identity`], with Lease-based leader election for what the controller writes
/// to Kubernetes (Events; `trellis_controller_kubernetes::{leader, events}`). `leader: None` =
/// this replica always writes. Every replica serves proxies either way.
pub async fn start_full(
    options: Options,
    identity: IdentityOptions,
    leader: Option<LeaderOptions>,
    extra_sources: Vec<Arc<dyn PolicySource>>,
) -> anyhow::Result<Running> {
    use anyhow::Context as _;
    if options.platforms.is_empty() && options.adapters.0.is_empty() {
        anyhow::bail!("no platform: give at least one --platform");
    }
    // A build without Kubernetes says so before anything starts (not as a kubeconfig error).
    if options.platforms.contains(&Platform::Kubernetes) {
        crate::kubernetes::available("--platform kubernetes")?;
    }
    if options.webhooks.is_some() {
        crate::kubernetes::available("--webhook")?;
    }
    // The CA first: bad CA material stops the start before anything is watched or written.
    let certifier = Certifier::start(&identity, &options.index.trust_domain).await?;
    let mut sources: Vec<Arc<dyn PolicySource>> = Vec::new();
    if !options.policy_paths.is_empty() {
        sources.push(Arc::new(FilePolicySource::new(
            options.policy_paths.clone(),
        )));
    }
    let mut kubernetes = None;
    if options.platforms.contains(&Platform::Kubernetes) {
        // On Kubernetes the SMI CRDs are a policy source too (after the files).
        let (source, writers) = crate::kubernetes::policy_source().await?;
        kubernetes = Some(writers);
        sources.push(source);
    }
    sources.extend(extra_sources);
    let discovery = connect_all(&options.platforms, &options.adapters.0).await?;
    let index = Index::start(sources, Arc::new(discovery.clone()), options.index.clone());
    // Only Kubernetes has something to elect with (a Lease) and to write (Events).
    let leader = match kubernetes {
        Some(writers) => writers.start(index.status(), leader),
        None => Leadership::always(default_identity()),
    };
    let mut registry = Registry::default();
    certifier.register_metrics(&mut registry);
    // The serving certificate comes from the CA just loaded; without it, plaintext.
    let grpc_tls = match &identity.grpc_tls {
        Some(tls) => {
            let serving = ServingCert::start(certifier.ca().clone(), tls)?;
            serving.register_metrics(&mut registry);
            Some(serving)
        }
        None => None,
    };
    let webhooks = match &options.webhooks {
        Some(webhooks) => Some(
            crate::kubernetes::start_webhooks(
                webhooks,
                certifier.ca().clone(),
                leader.is_leader(),
                &mut registry,
                options.traffic_metrics.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let counts = Arc::new(StreamCounts::default());
    let api = ProxyApi::new(index.clone(), counts.clone())
        .with_identity(Arc::new(certifier.clone()))
        .with_egress_denied(options.index.egress_denied);
    let grpc = serve_grpc(api, options.grpc, grpc_tls.as_ref())
        .await
        .with_context(|| format!("binding the gRPC listener on {}", options.grpc))?;
    let admin = match options.admin {
        Some(addr) => Some({
            let mut admin = Admin::new(index.clone(), discovery, counts, registry)
                .with_leader(leader.status())
                .with_traffic_metrics(options.traffic_metrics.clone());
            if let (Some(running), Some(options)) = (&webhooks, &options.webhooks) {
                admin = admin.with_webhooks(running.state_fn(options));
            }
            admin
                .spawn(addr)
                .await
                .with_context(|| format!("binding the admin listener on {addr}"))?
        }),
        None => None,
    };
    Ok(Running {
        grpc,
        admin,
        index,
        identity: certifier,
        leader,
        grpc_tls,
        webhooks,
    })
}

/// Binds `addr` and serves the proxy API in the background, over TLS when `tls` is given;
/// returns the bound address.
async fn serve_grpc(
    api: ProxyApi,
    addr: SocketAddr,
    tls: Option<&ServingCert>,
) -> std::io::Result<SocketAddr> {
    let Some(tls) = tls else {
        return trellis_controller_grpc::spawn(api, addr).await;
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tls.incoming(listener);
    tokio::spawn(async move {
        if let Err(e) = api.serve_incoming(incoming, std::future::pending()).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    Ok(bound)
}
