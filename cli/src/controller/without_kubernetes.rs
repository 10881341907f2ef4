//! `trellis controller` without the `kubernetes` feature: no Kubernetes flags (`--ca-secret`,
//! `--token-audience`, `--leader-elect`, `--lease-*`, `--webhook*`), so a flag that needs a client cannot be
//! given to a binary that has none. `--platform kubernetes` still parses and stops the start
//! with the runtime's "built without the `kubernetes` feature" message.

use trellis_controller::identity::CaSource;
use trellis_controller_core::leader::LeaderOptions;

#[derive(Debug, clap::Args)]
pub struct KubernetesArgs {}

impl KubernetesArgs {
    /// No election without Kubernetes: nowhere to hold a Lease.
    pub fn leader(&self, _kubernetes: bool) -> Option<LeaderOptions> {
        None
    }

    /// No `--ca-secret` in this build.
    pub fn ca_secret(&self) -> anyhow::Result<Option<CaSource>> {
        Ok(None)
    }

    /// No webhooks in this build (they are the API server's).
    pub fn webhooks(
        &self,
        _trust_domain: &str,
    ) -> anyhow::Result<Option<trellis_controller::webhooks::WebhookOptions>> {
        Ok(None)
    }

    /// No TokenReview in this build.
    pub fn token_audience(&self) -> Option<String> {
        None
    }
}
