//! Starting a whole controller in this process: policy sources, discovery, the index, the gRPC
//! server (with the CA's `Identity.Certify`) and the admin port. Used by `trellis controller`,
//! `trellis demo` and the tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::admin::Admin;
use crate::discovery::{Platform, connect_all};
use crate::identity::{Certifier, IdentityOptions};
use trellis_controller_core::index::{Index, IndexOptions};
use trellis_controller_core::policy::PolicySource;
use trellis_controller_core::policy::files::FilePolicySource;
use trellis_controller_grpc::{ProxyApi, StreamCounts};
use trellis_controller_kubernetes::leader::Leadership;

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
/// to Kubernetes (Events; `crate::leader`, `crate::events`). `leader: None` = this replica always
/// writes. Every replica serves proxies either way.
pub async fn start_full(
    options: Options,
    identity: IdentityOptions,
    leader: Option<trellis_controller_kubernetes::leader::LeaderOptions>,
    extra_sources: Vec<Arc<dyn PolicySource>>,
) -> anyhow::Result<Running> {
    use anyhow::Context as _;
    if options.platforms.is_empty() && options.adapters.0.is_empty() {
        anyhow::bail!("no platform: give at least one --platform");
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
        let client = kube::Client::try_default()
            .await
            .context("kubernetes policy source: reading the kubeconfig")?;
        let source =
            trellis_controller_kubernetes::policy::KubernetesPolicySource::new(client.clone());
        kubernetes = Some((client, source.objects()));
        sources.push(Arc::new(source));
    }
    sources.extend(extra_sources);
    let discovery = connect_all(&options.platforms, &options.adapters.0).await?;
    let index = Index::start(sources, Arc::new(discovery.clone()), options.index.clone());
    let leader = match (&kubernetes, leader) {
        (Some((client, _)), Some(leader)) => Leadership::spawn(client.clone(), leader),
        _ => Leadership::always(trellis_controller_kubernetes::leader::default_identity()),
    };
    if let Some((client, objects)) = kubernetes {
        let identity = leader.status().borrow().identity.clone();
        trellis_controller_kubernetes::events::spawn(
            client,
            index.status(),
            objects,
            leader.is_leader(),
            trellis_controller_kubernetes::events::EventOptions::new(identity),
        );
    }
    let mut registry = Registry::default();
    certifier.register_metrics(&mut registry);
    let counts = Arc::new(StreamCounts::default());
    let api =
        ProxyApi::new(index.clone(), counts.clone()).with_identity(Arc::new(certifier.clone()));
    let grpc = trellis_controller_grpc::spawn(api, options.grpc)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", options.grpc))?;
    let admin = match options.admin {
        Some(addr) => Some(
            Admin::new(index.clone(), discovery, counts, registry)
                .with_leader(leader.status())
                .spawn(addr)
                .await
                .with_context(|| format!("binding the admin listener on {addr}"))?,
        ),
        None => None,
    };
    Ok(Running {
        grpc,
        admin,
        index,
        identity: certifier,
        leader,
    })
}
