//! trellis-proxy binary: `trellis-proxy --config FILE` (static YAML, reloaded on change/SIGHUP)
//! or `trellis-proxy --controller http://ADDR --workload NS/NAME ...` (live from the controller;
//! `--controller https://HOST:PORT --controller-ca ANCHORS.pem` over TLS; `--outbound-transparent`
//! and `--inbound-transparent` for connections redirected by the pod's interception rules);
//! either with `--gateway FILE` for gateway mode from a Gateway resource document.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Parser;
use trellis_proxy::config::{Config, Inbound, PortForward, UdpForward, Workload};
use trellis_proxy::controller::tls::{Anchors, ControllerTls};
use trellis_proxy::controller::{Controller, ControllerOptions};
use trellis_proxy::identity::{self, CertifierOptions, IdentityStore};
use trellis_proxy::{ProxyOptions, reload};
use trellis_proxy_api::spiffe::SpiffeId;

/// jemalloc, with its background thread turned on in `main`: freed pages go back to the OS
/// within its decay time (10 s) even when no allocation follows. glibc malloc kept RSS at the
/// peak after a connection flood; mimalloc purges only when it is called again (or with
/// `MIMALLOC_PURGE_DELAY=0`, on every free).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// trellis-proxy: the Trellis data plane (HTTP/1.1, HTTP/2, gRPC, TCP).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Static YAML configuration (reloaded on change and on SIGHUP).
    #[arg(long, env = "TRELLIS_PROXY_CONFIG", conflicts_with = "controller")]
    config: Option<PathBuf>,
    /// Gateway mode from a Gateway resource document (policy.trellis.io/v1alpha1, kind
    /// Gateway): public listeners, certificates by SNI, host and path routes into the mesh.
    /// Works with --controller (identity and destinations from the controller) and with
    /// --config (whose file then has no `gateway:` section). Routes and certificates are
    /// reloaded when the file changes; a bad version is logged and not applied; listener
    /// ports and `jwt` take effect on restart.
    #[arg(long, env = "TRELLIS_PROXY_GATEWAY", value_name = "FILE")]
    gateway: Option<PathBuf>,
    /// Controller gRPC URL (live configuration): http://127.0.0.1:8090 on one host, or
    /// https://HOST:PORT with --controller-ca across a network.
    #[arg(long, env = "TRELLIS_PROXY_CONTROLLER", requires = "workload")]
    controller: Option<String>,
    /// Trust anchors (PEM: the mesh CA's) that an https:// controller's certificate must chain
    /// to; its host name (or IP) must match too. Re-read for every new connection.
    #[arg(
        long,
        env = "TRELLIS_PROXY_CONTROLLER_CA",
        value_name = "FILE",
        requires = "controller"
    )]
    controller_ca: Option<PathBuf>,
    /// The same trust anchors given inline as PEM text (what the injector puts in a pod's
    /// environment), instead of --controller-ca FILE.
    #[arg(
        long,
        env = "TRELLIS_PROXY_CONTROLLER_CA_PEM",
        value_name = "PEM",
        requires = "controller",
        conflicts_with = "controller_ca"
    )]
    controller_ca_pem: Option<String>,
    /// This proxy's workload as NAMESPACE/NAME (controller mode): NAME is its ServiceAccount,
    /// the identity it proves and is authorized as.
    #[arg(long, env = "TRELLIS_PROXY_WORKLOAD")]
    workload: Option<String>,
    /// Workload kind for metric labels (controller mode).
    #[arg(
        long,
        env = "TRELLIS_PROXY_WORKLOAD_KIND",
        default_value = "deployment"
    )]
    workload_kind: String,
    /// The workload's name in metric labels (controller mode): its Deployment (StatefulSet,
    /// DaemonSet...) as users know it, so a primary and its canary, which share a
    /// ServiceAccount, are told apart. Default: the ServiceAccount of --workload.
    #[arg(long, env = "TRELLIS_PROXY_WORKLOAD_NAME", value_name = "NAME")]
    workload_name: Option<String>,
    /// Also expose other meshes' metric names and labels, for tools whose built-in queries
    /// expect them (Flagger): osm, linkerd, istio (comma-separated or repeated).
    #[arg(
        long,
        env = "TRELLIS_PROXY_METRICS_COMPAT",
        value_enum,
        value_delimiter = ','
    )]
    metrics_compat: Vec<trellis_proxy::config::MetricsCompat>,
    /// Do not count requests in `trellis_request_*` (nor the compatibility series): what the
    /// benchmark uses to measure their cost. Other series stay.
    #[arg(long, env = "TRELLIS_PROXY_NO_REQUEST_METRICS")]
    no_request_metrics: bool,
    /// Admin listener (controller mode).
    #[arg(long, env = "TRELLIS_PROXY_ADMIN", default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// Outbound HTTP listener (controller mode).
    #[arg(long, env = "TRELLIS_PROXY_OUTBOUND_HTTP")]
    outbound_http: Option<SocketAddr>,
    /// Per-upstream port LISTEN=AUTHORITY, repeatable (controller mode; in the environment,
    /// comma-separated).
    #[arg(
        long = "port",
        value_name = "LISTEN=AUTHORITY",
        env = "TRELLIS_PROXY_PORTS",
        value_delimiter = ','
    )]
    ports: Vec<String>,
    /// Local UDP port LISTEN=AUTHORITY, repeatable (controller mode; in the environment,
    /// comma-separated): each client address sending to LISTEN is a session carried over mTLS
    /// to an endpoint of AUTHORITY (its TrafficSplit picks the backend) and delivered there as
    /// UDP, to the port written in AUTHORITY (UDPRoute; the file's `outbound.udp`).
    #[arg(
        long = "udp",
        value_name = "LISTEN=AUTHORITY",
        env = "TRELLIS_PROXY_UDP",
        value_delimiter = ','
    )]
    udp: Vec<String>,
    /// Transparent UDP listener (controller mode), e.g. 127.0.0.1:15009: datagrams the
    /// interception rules sent with TPROXY (`trellis-init --udp-ports`), each carried to the
    /// destination of its original address. Needs CAP_NET_ADMIN.
    #[arg(long, value_name = "LISTEN", env = "TRELLIS_PROXY_UDP_TRANSPARENT")]
    udp_transparent: Option<SocketAddr>,
    /// Transparent outbound listener (controller mode), e.g. 127.0.0.1:15001: connections the
    /// interception rules redirected, routed by their original destination (a Service's virtual
    /// address, a pod, or forwarded unchanged when the mesh does not know it).
    #[arg(
        long,
        value_name = "LISTEN",
        env = "TRELLIS_PROXY_OUTBOUND_TRANSPARENT"
    )]
    outbound_transparent: Option<SocketAddr>,
    /// Egress lockdown (controller mode; with --config, the file's `outbound.egress`): `deny`
    /// closes an intercepted connection to an address the mesh does not know instead of
    /// forwarding it unchanged (`allow`, the default).
    #[arg(
        long,
        value_enum,
        env = "TRELLIS_PROXY_EGRESS",
        default_value = "allow",
        conflicts_with = "config"
    )]
    egress: trellis_proxy::config::Egress,
    /// Transparent inbound listener (controller mode), e.g. 0.0.0.0:15006: redirected inbound
    /// connections, authorized with the policy of their original port and delivered to the
    /// application on 127.0.0.1:<original port>.
    #[arg(long, value_name = "LISTEN", env = "TRELLIS_PROXY_INBOUND_TRANSPARENT")]
    inbound_transparent: Option<SocketAddr>,
    /// Inbound listener LISTEN=APP (controller mode).
    #[arg(long, value_name = "LISTEN=APP", env = "TRELLIS_PROXY_INBOUND")]
    inbound: Option<String>,
    /// Trust domain of this proxy's SPIFFE id (controller mode).
    #[arg(
        long,
        env = "TRELLIS_PROXY_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    trust_domain: String,
    /// Proof of identity sent with Identity.Certify (a projected ServiceAccount token or a
    /// bootstrap token; re-read before every call). Absent = no identity: plaintext only.
    #[arg(
        long,
        env = "TRELLIS_PROXY_IDENTITY_TOKEN_FILE",
        requires = "controller"
    )]
    identity_token_file: Option<PathBuf>,
    /// Bound on an mTLS handshake, ms (overrides limits.tls_handshake_timeout_ms).
    #[arg(long)]
    handshake_timeout_ms: Option<u64>,
    /// Inbound TLS handshakes in progress at once (overrides limits.max_concurrent_handshakes).
    #[arg(long)]
    max_concurrent_handshakes: Option<usize>,
    /// Open inbound connections per source IP (overrides limits.max_connections_per_source).
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    /// Tokio worker threads (default: number of cores; 1 = a single-threaded runtime).
    #[arg(long, env = "TRELLIS_PROXY_THREADS")]
    threads: Option<usize>,
    /// The app's probes to serve on the admin port as /app-probe/CONTAINER/KIND (JSON written by
    /// the sidecar injector: path -> {port, path, scheme, headers} or {tcp: port}).
    #[arg(long, env = "TRELLIS_PROXY_APP_PROBES", value_name = "JSON")]
    app_probes: Option<String>,
    /// OTLP/gRPC collector for request spans, http://HOST:4317 (proxy/README.md, "Tracing").
    /// Without it nothing is traced and trace headers pass through untouched.
    #[arg(long, env = "TRELLIS_PROXY_TRACE_COLLECTOR", value_name = "URL")]
    trace_collector: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0 (a caller's decision always wins; a
    /// destination's `trace_sampling` overrides it).
    #[arg(
        long,
        env = "TRELLIS_PROXY_TRACE_SAMPLING",
        default_value_t = 0.01,
        requires = "trace_collector"
    )]
    trace_sampling: f64,
    /// Write an access log, one JSON line per request or TCP connection: `stderr`, `stdout` or a
    /// file path (appended). Overrides the config file's `access_log`.
    #[arg(
        long,
        env = "TRELLIS_PROXY_ACCESS_LOG",
        value_name = "PATH|stderr|stdout"
    )]
    access_log: Option<String>,
    /// Access log records queued before new ones are dropped (and counted in
    /// trellis_access_log_dropped_total). Overrides the config file's `access_log_buffer`.
    #[arg(long, env = "TRELLIS_PROXY_ACCESS_LOG_BUFFER", value_name = "RECORDS")]
    access_log_buffer: Option<usize>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "TRELLIS_PROXY_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Without it jemalloc purges only while it is being called: an idle proxy after a flood
    // would keep its peak RSS.
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background purging is off: RSS may stay high after load");
    }
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
            name: cli.workload_name.clone().unwrap_or_else(|| name.into()),
            namespace: namespace.into(),
        }),
        metrics_compat: cli.metrics_compat.clone(),
        ..Config::default()
    };
    config.outbound.http = cli.outbound_http;
    config.transparent.outbound = cli.outbound_transparent;
    config.outbound.egress = cli.egress;
    config.transparent.inbound = cli.inbound_transparent;
    config.transparent.udp = cli.udp_transparent;
    for p in &cli.ports {
        let (listen, destination) = split_pair("--port", p)?;
        config.outbound.ports.push(PortForward {
            listen,
            destination,
            protocol: None,
        });
    }
    for u in &cli.udp {
        let (listen, destination) = split_pair("--udp", u)?;
        config.outbound.udp.push(UdpForward {
            listen,
            destination,
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

fn apply_limit_flags(cli: &Cli, config: &mut Config) {
    let limits = &mut config.limits;
    if let Some(v) = cli.handshake_timeout_ms {
        limits.tls_handshake_timeout_ms = v;
    }
    if let Some(v) = cli.max_concurrent_handshakes {
        limits.max_concurrent_handshakes = v;
    }
    if let Some(v) = cli.max_connections_per_source {
        limits.max_connections_per_source = v;
    }
    if let Some(target) = &cli.access_log {
        config.access_log = Some(target.clone());
    }
    if cli.no_request_metrics {
        config.no_request_metrics = true;
    }
    if let Some(n) = cli.access_log_buffer {
        config.access_log_buffer = n;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (proxy, drain) = if let Some(url) = cli.controller.clone() {
        let mut base = controller_base(&cli)?;
        apply_limit_flags(&cli, &mut base);
        base.gateway = gateway_document(&cli)?;
        let workload = cli.workload.clone().unwrap_or_default();
        let mut controller_options = ControllerOptions::new(url, workload);
        controller_options.tls = match (&cli.controller_ca, &cli.controller_ca_pem) {
            (Some(file), _) => Some(ControllerTls {
                anchors: Anchors::File(file.clone()),
            }),
            (None, Some(pem)) => Some(ControllerTls {
                anchors: Anchors::Pem(Arc::from(pem.as_str())),
            }),
            (None, None) => None,
        };
        let controller = Controller::new(controller_options, base)?;
        let config = controller.initial_config();
        let drain = config.limits.drain_timeout();
        let mut options = ProxyOptions::new(config);
        options.app_probes = app_probes(&cli)?;
        options.trace = trace_options(&cli);
        options.gateway_document = cli.gateway.clone();
        options.resolver = Some(controller.clone() as Arc<dyn trellis_proxy::state::Resolve>);
        let certifier = match &cli.identity_token_file {
            Some(token_file) => {
                let id = identity_of(&cli)?;
                options.identity = Arc::new(IdentityStore::expecting());
                Some(CertifierOptions::new(id, token_file))
            }
            None => {
                tracing::warn!(
                    "no --identity-token-file: this proxy has no identity, talks plaintext and its callers see it as unauthenticated"
                );
                None
            }
        };
        let proxy = trellis_proxy::start(options).await?;
        if let Some(certifier) = certifier {
            tracing::info!(id = %certifier.id, "asking the controller for a certificate");
            tokio::spawn(identity::run_certifier(
                controller.channel(),
                certifier,
                proxy.shared.identity.clone(),
                proxy.shutdown_signal(),
            ));
        }
        controller.attach(&proxy.shared, proxy.inbound.map(|a| a.port()));
        (proxy, drain)
    } else {
        let path = cli
            .config
            .clone()
            .context("either --config FILE or --controller URL --workload NS/NAME is required")?;
        let mut config = Config::load(&path)?;
        apply_limit_flags(&cli, &mut config);
        if let Some(gateway) = gateway_document(&cli)? {
            if config.gateway.is_some() {
                bail!(
                    "{}: has a `gateway:` section and --gateway names a Gateway document: use one",
                    path.display()
                );
            }
            config.gateway = Some(gateway);
        }
        let drain = config.limits.drain_timeout();
        let mut options = ProxyOptions::new(config);
        options.app_probes = app_probes(&cli)?;
        options.trace = trace_options(&cli);
        options.gateway_document = cli.gateway.clone();
        let proxy = trellis_proxy::start(options).await?;
        tokio::spawn(reload::watch_file(
            proxy.shared.clone(),
            path,
            proxy.shutdown_signal(),
        ));
        (proxy, drain)
    };
    tracing::info!(admin = ?proxy.admin, http = ?proxy.http, gateway_https = ?proxy.gateway_https, gateway_http = ?proxy.gateway_http, ports = ?proxy.ports, udp = ?proxy.udp, udp_transparent = ?proxy.udp_transparent, inbound = ?proxy.inbound, outbound_transparent = ?proxy.outbound_transparent, inbound_transparent = ?proxy.inbound_transparent, "trellis-proxy started");
    wait_for_termination().await?;
    tracing::info!(open = proxy.open_connections(), "draining");
    let left = proxy.drain(drain).await;
    tracing::info!(left, "stopped");
    Ok(())
}

/// `--gateway FILE`, read and compiled (none given: no gateway from a document).
fn gateway_document(cli: &Cli) -> anyhow::Result<Option<trellis_proxy::config::Gateway>> {
    cli.gateway
        .as_deref()
        .map(trellis_proxy::gateway::read_document)
        .transpose()
}

/// `--app-probes`, parsed (none given: no app probes).
fn trace_options(cli: &Cli) -> Option<trellis_proxy::trace::TraceOptions> {
    cli.trace_collector.as_ref().map(|url| {
        let mut t = trellis_proxy::trace::TraceOptions::new(url.clone());
        t.sampling = cli.trace_sampling;
        t
    })
}

fn app_probes(cli: &Cli) -> anyhow::Result<Arc<trellis_proxy::app_probe::AppProbes>> {
    Ok(Arc::new(match &cli.app_probes {
        Some(json) => trellis_proxy::app_probe::parse(json)?,
        None => Default::default(),
    }))
}

fn identity_of(cli: &Cli) -> anyhow::Result<SpiffeId> {
    let workload = cli.workload.as_deref().unwrap_or_default();
    let (namespace, name) = workload
        .split_once('/')
        .with_context(|| format!("--workload {workload:?}: expected NAMESPACE/NAME"))?;
    let id = SpiffeId::new(&cli.trust_domain, namespace, name);
    // Round-trip through the parser: one accepted spelling, checked before asking for it.
    id.to_string().parse::<SpiffeId>().with_context(|| {
        format!(
            "--trust-domain {:?} / --workload {workload:?}",
            cli.trust_domain
        )
    })
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
