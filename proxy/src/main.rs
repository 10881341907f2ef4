//! trellis-proxy binary: `trellis-proxy --config FILE` or
//! `trellis-proxy --controller http://ADDR --workload NS/NAME ...`.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use trellis_proxy::config::Config;
use trellis_proxy::{ProxyOptions, reload};

/// trellis-proxy: the Trellis data plane (HTTP/1.1, HTTP/2, gRPC, TCP).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Static YAML configuration (reloaded on change and on SIGHUP).
    #[arg(long, env = "TRELLIS_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Tokio worker threads (default: number of cores).
    #[arg(long, env = "TRELLIS_PROXY_THREADS")]
    threads: Option<usize>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "TRELLIS_PROXY_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        runtime.worker_threads(n.max(1));
    }
    runtime.enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli.config.context("--config FILE is required")?;
    let config = Config::load(&path)?;
    let drain = config.limits.drain_timeout();
    let proxy = trellis_proxy::start(ProxyOptions::new(config)).await?;
    tracing::info!(admin = ?proxy.admin, http = ?proxy.http, ports = ?proxy.ports, inbound = ?proxy.inbound, "trellis-proxy started");
    tokio::spawn(reload::watch_file(proxy.shared.clone(), path, proxy.shutdown_signal()));
    wait_for_termination().await;
    tracing::info!(open = proxy.open_connections(), "draining");
    let left = proxy.drain(drain).await;
    tracing::info!(left, "stopped");
    Ok(())
}

async fn wait_for_termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
