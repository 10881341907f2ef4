//! The runtime's Kubernetes module in a build without the `kubernetes` feature (compiled as
//! `crate::kubernetes`): the same names as `kubernetes.rs`, and every one that would need a
//! Kubernetes client fails with [`NOT_BUILT`], naming what asked for it. So `--platform
//! kubernetes`, `--ca-secret` and TokenReview still parse everywhere and stop the start with a
//! message that says how to get them, instead of vanishing from the command line.
//!
//! The types that only exist with a client ([`Client`], [`Writers`], [`TokenReviewer`]) are
//! empty enums here: no value of them can be made, so the code that would use one is
//! unreachable and the compiler proves it (`match *self {}`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trellis_controller_core::index::Status;
use trellis_controller_core::leader::{LeaderOptions, Leadership};
use trellis_controller_core::policy::PolicySource;
use trellis_discovery::Discovery;

use crate::identity::CaHandle;
use crate::identity::proof::{Proven, Unavailable};

/// What a build without the `kubernetes` feature answers when asked for Kubernetes.
pub const NOT_BUILT: &str =
    "this trellis was built without the `kubernetes` feature; rebuild with default features";

/// No Kubernetes client in this build: `IdentityOptions::kube` can only be `None`.
#[derive(Clone, Debug)]
pub enum Client {}

/// Fails: `what` (a flag, a platform) needs Kubernetes, which this build lacks.
pub fn available(what: &str) -> anyhow::Result<()> {
    anyhow::bail!("{what}: {NOT_BUILT}")
}

/// Fails like [`available`].
pub async fn client(what: &str) -> anyhow::Result<Client> {
    anyhow::bail!("{what}: {NOT_BUILT}")
}

/// Fails: `--platform kubernetes` needs Kubernetes.
pub async fn discovery(platform: &str) -> anyhow::Result<Arc<dyn Discovery>> {
    anyhow::bail!("platform {platform}: {NOT_BUILT}")
}

/// Never made in this build.
#[derive(Debug)]
pub enum Writers {}

/// Fails: the SMI CRDs need Kubernetes.
pub async fn policy_source() -> anyhow::Result<(Arc<dyn PolicySource>, Writers)> {
    anyhow::bail!("kubernetes policy source: {NOT_BUILT}")
}

impl Writers {
    pub fn start(self, _: watch::Receiver<Arc<Status>>, _: Option<LeaderOptions>) -> Leadership {
        match self {}
    }
}

/// Fails: `--ca-secret` needs Kubernetes (there is never a [`Client`] to read it with).
pub async fn ca_from_secret(
    _client: Option<&Client>,
    namespace: &str,
    name: &str,
    _poll: Duration,
) -> anyhow::Result<CaHandle> {
    anyhow::bail!("--ca-secret {namespace}/{name}: {NOT_BUILT}")
}

/// Never made in this build.
#[derive(Clone, Debug)]
pub enum TokenReviewer {}

impl TokenReviewer {
    pub fn new(client: Client, _audience: String) -> Self {
        match client {}
    }

    pub async fn review(&self, _token: &str) -> Result<Proven, Unavailable> {
        match *self {}
    }
}

/// Never made in this build.
#[derive(Clone, Debug)]
pub enum Webhooks {}

impl Webhooks {
    pub fn state_fn(&self, _: &crate::webhooks::WebhookOptions) -> crate::admin::WebhookStateFn {
        match *self {}
    }
}

/// Fails: the webhooks are the API server's.
pub async fn start_webhooks(
    _options: &crate::webhooks::WebhookOptions,
    _ca: CaHandle,
    _is_leader: watch::Receiver<bool>,
    _registry: &mut prometheus_client::registry::Registry,
    _traffic_metrics: Option<trellis_traffic_metrics::MetricsApi>,
) -> anyhow::Result<Webhooks> {
    anyhow::bail!("--webhook: {NOT_BUILT}")
}
