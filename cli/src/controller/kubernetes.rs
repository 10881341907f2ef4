//! `trellis controller`'s Kubernetes flags (the `kubernetes` feature): the CA from a Secret,
//! TokenReview's audience, and the Lease election. Without the feature,
//! `without_kubernetes.rs` stands in with no flags (and `--platform kubernetes` fails at start
//! saying the build lacks it).

use trellis_controller::identity::CaSource;
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

    /// `--token-audience`.
    pub fn token_audience(&self) -> Option<String> {
        Some(self.token_audience.clone())
    }
}
