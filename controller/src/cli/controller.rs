//! `trellis controller`: run the control plane (policy sources, discovery, index, gRPC for
//! proxies, admin port) until Ctrl-C or SIGTERM. Problems are printed to stderr as they appear.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use trellis_controller::discovery::Platform;
use trellis_controller::identity::IdentityOptions;
use trellis_controller::index::IndexOptions;
use trellis_controller::leader::LeaderOptions;
use trellis_controller::run::{Options, start_full};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SMI YAML file or directory to watch (repeatable).
    #[arg(long = "policy", value_name = "DIR")]
    pub policy: Vec<PathBuf>,
    /// Discovery platform: file=PATH, consul=ADDR, cloudmap=NAMESPACE[,endpoint=URL], kubernetes (repeatable).
    #[arg(long = "platform", value_name = "PLATFORM", required = true)]
    pub platform: Vec<Platform>,
    /// gRPC listen address for proxies.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub grpc: SocketAddr,
    /// Admin listen address (/metrics, /ready, /live, /api/v1/state).
    #[arg(long, default_value = "127.0.0.1:9990")]
    pub admin: SocketAddr,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Allow inbound traffic no TrafficTarget allows (mesh-wide; default is deny).
    #[arg(long)]
    pub permissive: bool,
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

impl Args {
    /// The leader election to run, if any.
    fn leader(&self) -> Option<LeaderOptions> {
        let kubernetes = self.platform.contains(&Platform::Kubernetes);
        if !self.leader_elect.unwrap_or(kubernetes) {
            return None;
        }
        let mut options = LeaderOptions::new(&self.lease_namespace, &self.lease_name);
        options.lease_duration = std::time::Duration::from_secs(self.lease_duration.max(1));
        options.retry_period = std::time::Duration::from_millis(self.lease_renew.max(10));
        Some(options)
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
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
            grpc: args.grpc,
            admin: Some(args.admin),
            index: IndexOptions {
                trust_domain: args.trust_domain.clone(),
                permissive: args.permissive,
            },
        },
        IdentityOptions::default(),
        leader,
        Vec::new(),
    )
    .await?;
    println!("grpc listening on {}", running.grpc);
    if let Some(admin) = running.admin {
        println!("admin listening on {admin}");
    }
    if args.permissive {
        eprintln!(
            "trellis controller: PERMISSIVE mode: inbound traffic no TrafficTarget allows is allowed mesh-wide"
        );
    }
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
    // Hand the Lease over at once rather than let the next leader wait for it to expire.
    running.leader.release().await;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
