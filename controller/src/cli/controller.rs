//! `trellis controller`: run the control plane (policy sources, discovery, index, gRPC for
//! proxies, admin port) until Ctrl-C or SIGTERM. Problems are printed to stderr as they appear.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use trellis_controller::discovery::Platform;
use trellis_controller::index::IndexOptions;
use trellis_controller::run::{Options, start};

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
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(args))
}

async fn serve(args: &Args) -> anyhow::Result<ExitCode> {
    let running = start(Options {
        policy_paths: args.policy.clone(),
        platforms: args.platform.clone(),
        grpc: args.grpc,
        admin: Some(args.admin),
        index: IndexOptions {
            trust_domain: args.trust_domain.clone(),
            permissive: args.permissive,
        },
    })
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
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
