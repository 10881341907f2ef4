//! trellis-proxy binary: `trellis-proxy --config FILE` (static YAML, reloaded on change/SIGHUP)
//! or `trellis-proxy --controller http://ADDR --workload NS/NAME ...` (live from the controller).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Parser;
use trellis_proxy::config::{Config, Inbound, PortForward, Workload};
use trellis_proxy::controller::{Controller, ControllerOptions};
use trellis_proxy::{ProxyOptions, reload};

/// trellis-proxy: the Trellis data plane (HTTP/1.1, HTTP/2, gRPC, TCP).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Static YAML configuration (reloaded on change and on SIGHUP).
    #[arg(long, env = "TRELLIS_PROXY_CONFIG", conflicts_with = "controller")]
    config: Option<PathBuf>,
    /// Controller gRPC URL (live configuration), e.g. http://127.0.0.1:8090.
    #[arg(long, env = "TRELLIS_PROXY_CONTROLLER", requires = "workload")]
    controller: Option<String>,
    /// This proxy's workload as NAMESPACE/NAME (controller mode).
    #[arg(long, env = "TRELLIS_PROXY_WORKLOAD")]
    workload: Option<String>,
    /// Workload kind for metric labels (controller mode).
    #[arg(long, default_value = "deployment")]
    workload_kind: String,
    /// Admin listener (controller mode).
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// Outbound HTTP listener (controller mode).
    #[arg(long)]
    outbound_http: Option<SocketAddr>,
    /// Per-upstream port LISTEN=AUTHORITY, repeatable (controller mode).
    #[arg(long = "port", value_name = "LISTEN=AUTHORITY")]
    ports: Vec<String>,
    /// Inbound listener LISTEN=APP (controller mode).
    #[arg(long, value_name = "LISTEN=APP")]
    inbound: Option<String>,
    /// Tokio worker threads (default: number of cores; 1 = a single-threaded runtime).
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
    // One thread: a current-thread runtime (no work-stealing, no cross-thread wakeups).
    let mut runtime = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(run(cli))
}

fn split_pair(flag: &str, value: &str) -> anyhow::Result<(SocketAddr, String)> {
    let (listen, rest) = value
        .split_once('=')
        .with_context(|| format!("{flag} {value:?}: expected LISTEN=VALUE"))?;
    let listen = listen
        .parse()
        .with_context(|| format!("{flag} {value:?}: {listen:?} is not ip:port"))?;
    Ok((listen, rest.to_string()))
}

fn controller_base(cli: &Cli) -> anyhow::Result<Config> {
    let workload = cli
        .workload
        .as_deref()
        .context("--workload NAMESPACE/NAME is required with --controller")?;
    let Some((namespace, name)) = workload.split_once('/') else {
        bail!("--workload {workload:?}: expected NAMESPACE/NAME");
    };
    let mut config = Config {
        admin: Some(cli.admin),
        workload: Some(Workload {
            kind: cli.workload_kind.clone(),
            name: name.into(),
            namespace: namespace.into(),
        }),
        ..Config::default()
    };
    config.outbound.http = cli.outbound_http;
    for p in &cli.ports {
        let (listen, destination) = split_pair("--port", p)?;
        config.outbound.ports.push(PortForward {
            listen,
            destination,
            protocol: None,
        });
    }
    if let Some(i) = &cli.inbound {
        let (listen, app) = split_pair("--inbound", i)?;
        let app = app
            .parse()
            .with_context(|| format!("--inbound {i:?}: {app:?} is not ip:port"))?;
        config.inbound = Some(Inbound {
            listen,
            app,
            protocol: Default::default(),
            policy: Default::default(),
        });
    }
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (proxy, drain) = if let Some(url) = cli.controller.clone() {
        let base = controller_base(&cli)?;
        let workload = cli.workload.clone().unwrap_or_default();
        let controller = Controller::new(ControllerOptions::new(url, workload), base)?;
        let config = controller.initial_config();
        let drain = config.limits.drain_timeout();
        let mut options = ProxyOptions::new(config);
        options.resolver = Some(controller.clone() as Arc<dyn trellis_proxy::state::Resolve>);
        let proxy = trellis_proxy::start(options).await?;
        controller.attach(&proxy.shared, proxy.inbound.map(|a| a.port()));
        (proxy, drain)
    } else {
        let path = cli
            .config
            .clone()
            .context("either --config FILE or --controller URL --workload NS/NAME is required")?;
        let config = Config::load(&path)?;
        let drain = config.limits.drain_timeout();
        let proxy = trellis_proxy::start(ProxyOptions::new(config)).await?;
        tokio::spawn(reload::watch_file(
            proxy.shared.clone(),
            path,
            proxy.shutdown_signal(),
        ));
        (proxy, drain)
    };
    tracing::info!(admin = ?proxy.admin, http = ?proxy.http, ports = ?proxy.ports, inbound = ?proxy.inbound, "trellis-proxy started");
    wait_for_termination().await?;
    tracing::info!(open = proxy.open_connections(), "draining");
    let left = proxy.drain(drain).await;
    tracing::info!(left, "stopped");
    Ok(())
}

async fn wait_for_termination() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
