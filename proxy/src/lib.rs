//! trellis-proxy: the one data-plane binary for HTTP/1.1, HTTP/2, gRPC and TCP.
//!
//! See `proxy/README.md` for the config file, CLI, admin endpoints, metrics, error headers,
//! protocol detection and limits. The modules form layers: no import cycles between them
//! (`tests/module_graph.rs` fails on one), listed here from the foundations up, so a module can
//! be read knowing only the ones it builds on.
//!
//! Foundations (no proxy state):
//! * [`config`]: the YAML model (also what controller answers become) with file:line errors;
//!   [`load`] reads and checks a file of it.
//! * [`resilience`]: the traffic policy compiled for the request path (retry, breaker, fault,
//!   rate limit), no I/O.
//! * [`health`]: the health-check state machine and settings; [`balance`]: P2C over peak-EWMA
//!   latency, round robin, least-request, outlier ejection, on per-endpoint statistics.
//! * [`metrics`], [`reason`] (why the proxy answered itself: `x-trellis-error`), [`side`]
//!   (outbound or inbound with its caller), [`detect`], [`shutdown`].
//! * [`table`]: the compiled config (routes, splits, endpoints): each destination in its own
//!   `arc-swap` slot, so one destination's update compiles and replaces that destination alone.
//! * [`authz`]: the inbound authorization hook ([`authz::Authorizer`]) and the policy evaluator.
//! * [`identity`]: the workload certificate (controller `Identity.Certify` with renewal at 70% of
//!   the lifetime, or static PEM files), published atomically in an [`identity::IdentityStore`],
//!   with the rustls configurations made from it ([`identity::tls_config`]).
//! * [`connect`]: TCP connections to upstreams within the breaker's connection limit;
//!   [`tls`]: mTLS connections with rustls (TLS 1.3, ALPN h2/http/1.1): client certificates
//!   verified to the trust anchors with the caller's SPIFFE id taken from them; upstream
//!   certificates verified to the anchors AND to the endpoint's expected SPIFFE id.
//! * [`observe`]: one record per finished request or TCP connection, for the access log and
//!   the admin port's live `/tap` (free when neither is on); [`trace`]: distributed tracing
//!   (W3C and B3 propagation, a span per request, OTLP export).
//! * [`body`]: request and response bodies (streamed; kept whole only for a retry or mirror).
//! * [`upstream`]: the upstream clients (pooled plain and per-identity mTLS, and the own pools of
//!   connection-limited destinations).
//! * [`connections`]: open connections counted and limited (global, per listener, per source).
//! * [`external`]: declared destinations outside the mesh (who may call them, their ports, the
//!   TLS originated to them) and the name a transparent connection was meant for (SNI / Host).
//! * [`gateway`]: gateway mode's compiled configuration (certificates by SNI, reloaded when their
//!   files change; host routes; end-user JWTs), served by [`server::gateway`].
//!
//! The proxy's state and what runs on it:
//! * [`routes`]: the routing table in force and its writers (whole, base, one destination).
//! * [`state`]: [`state::Shared`], the composition of the parts above every listener shares.
//! * [`tcp`]: opaque TCP forwarding; [`udp`]: UDP carried between proxies (UDPRoute) on the
//!   `trellis-udp` data plane; [`http`]: the request paths (outbound as a stack of tower
//!   layers: fault, breaker, mirror, timeouts, retry, endpoint; inbound: authorize, rate-limit,
//!   forward to the application).
//! * [`probe`]: the health-check prober (through the upstream clients).
//! * [`server`]: listeners, hyper connections with limits, draining; its [`server::transparent`]
//!   submodule: connections redirected by the interception rules, routed by their original
//!   destination (outbound) or authorized per original port (inbound), with the loop guard.
//! * [`admin`]: the admin port; [`app_probe`]: the app's own probes run from inside the pod for
//!   the kubelet (`/app-probe/...`, set up by the sidecar injector); [`reload`]: config file
//!   reload (SIGHUP + change polling); [`controller`]: live config from the controller over
//!   `trellis-proxy-api` (its [`controller::tls`]: that channel over TLS, verified against the
//!   mesh's anchors and the controller's host name).

pub mod admin;
pub mod app_probe;
pub mod authz;
pub mod balance;
pub mod body;
pub mod config;
pub mod connect;
pub mod connections;
pub mod controller;
pub mod detect;
pub mod external;
pub mod gateway;
pub mod health;
pub mod http;
pub mod identity;
pub mod load;
pub mod metrics;
pub mod observe;
pub mod pool;
pub mod probe;
pub mod reason;
pub mod reload;
pub mod resilience;
pub mod routes;
pub mod server;
pub mod shutdown;
pub mod side;
pub mod state;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod udp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::authz::{Authorizer, PolicyAuthorizer};
use crate::config::Config;
use crate::identity::IdentityStore;
use crate::server::{Connections, ListenerKind};
use crate::state::{Resolve, Shared};

/// How often the gateway's certificate files are checked when no change event came (events
/// normally see a change at once; polling covers filesystems without them).
const GATEWAY_CERTIFICATE_POLL: Duration = Duration::from_secs(2);

/// How to start a proxy.
#[derive(Debug)]
pub struct ProxyOptions {
    /// Initial configuration (listeners are bound from it once).
    pub config: Config,
    /// Registry the proxy's metrics are registered in (served on `/metrics`).
    pub registry: Registry,
    /// Inbound authorization (defaults to the policy evaluator).
    pub authorizer: Arc<dyn Authorizer>,
    /// On-demand destination resolver (controller mode).
    pub resolver: Option<Arc<dyn Resolve>>,
    /// Where the workload identity is kept. The default has no source (plaintext) unless the
    /// config names static `identity` files; controller mode passes
    /// [`IdentityStore::expecting`] and runs [`identity::run_certifier`] on it.
    pub identity: Arc<IdentityStore>,
    /// The app's probes served on the admin port as `/app-probe/...` (`--app-probes`).
    pub app_probes: Arc<app_probe::AppProbes>,
    /// Distributed tracing (`--trace-collector`); None = off.
    pub trace: Option<trace::TraceOptions>,
    /// The Gateway document `config.gateway` was compiled from (`--gateway FILE`): watched,
    /// with the certificate files it names, and re-applied when it changes. None: the
    /// certificate files alone are watched.
    pub gateway_document: Option<std::path::PathBuf>,
}

impl ProxyOptions {
    /// Options for a static configuration.
    pub fn new(config: Config) -> Self {
        ProxyOptions {
            config,
            registry: Registry::default(),
            authorizer: Arc::new(PolicyAuthorizer),
            resolver: None,
            identity: Arc::new(IdentityStore::new()),
            app_probes: Arc::default(),
            trace: None,
            gateway_document: None,
        }
    }
}

/// A started proxy: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct RunningProxy {
    /// Shared state (swap configs with [`routes::Routes::apply`] on its `routes`).
    pub shared: Arc<Shared>,
    /// Admin listener address.
    pub admin: Option<SocketAddr>,
    /// Outbound HTTP listener address.
    pub http: Option<SocketAddr>,
    /// Per-upstream port addresses, in config order.
    pub ports: Vec<SocketAddr>,
    /// Inbound listener address.
    pub inbound: Option<SocketAddr>,
    /// Transparent outbound listener address.
    pub outbound_transparent: Option<SocketAddr>,
    /// Transparent inbound listener address.
    pub inbound_transparent: Option<SocketAddr>,
    /// Outbound UDP listener addresses, in config order.
    pub udp: Vec<SocketAddr>,
    /// The transparent UDP listener's address.
    pub udp_transparent: Option<SocketAddr>,
    /// The gateway's HTTPS listener address.
    pub gateway_https: Option<SocketAddr>,
    /// The gateway's HTTP redirect listener address.
    pub gateway_http: Option<SocketAddr>,
    connections: Arc<Connections>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Bind every listener of `options.config` and start serving.
pub async fn start(options: ProxyOptions) -> anyhow::Result<RunningProxy> {
    use anyhow::Context as _;
    let ProxyOptions {
        config,
        mut registry,
        authorizer,
        resolver,
        identity,
        app_probes,
        trace,
        gateway_document,
    } = options;
    if let Some(files) = &config.identity {
        let credentials = identity::load_static(files).context("loading the static identity")?;
        tracing::info!(id = %credentials.id, not_after = %humantime::format_rfc3339_seconds(credentials.not_after), "static identity loaded");
        identity
            .publish(credentials)
            .context("using the static identity")?;
    }
    let mut shared = Shared::with_identity(&config, &mut registry, authorizer, resolver, identity)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(t) = &trace {
        shared.tracer = Some(
            trace::Tracer::start(
                t,
                &mut registry,
                config.workload.as_ref(),
                Arc::clone(&shared.identity),
            )
            .context("starting the trace exporter")?,
        );
    }
    let shared = Arc::new(shared);
    // Health checks need the proxy's runtime and a handle on its state: from here on, every
    // destination with a health check made current is probed.
    shared.routes.start_health_checks(probe::starter(
        Arc::downgrade(&shared),
        tokio::runtime::Handle::current(),
    ));
    // JWT verifiers start their key-refresh tasks: made from here on, on this runtime.
    shared.routes.start_authentication();
    if let Some(target) = &config.access_log {
        shared
            .observe
            .enable_access_log(target, config.access_log_buffer)
            .context("starting the access log")?;
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let connections = Arc::clone(&shared.connections);
    tracing::info!(
        max_connections = connections.max(),
        listen_backlog = config.limits.listen_backlog,
        "connection limits"
    );
    let backlog = config.limits.listen_backlog;
    let mut tasks = Vec::new();
    let bind = |addr: SocketAddr, what: &'static str| async move {
        server::bind(addr, backlog)
            .with_context(|| format!("binding the {what} listener on {addr}"))
    };
    let mut spawn_listener = |listener: TcpListener, kind: ListenerKind| {
        tasks.push(tokio::spawn(server::accept_loop(
            listener,
            kind,
            Arc::clone(&shared),
            Arc::clone(&connections),
            shutdown_rx.clone(),
        )));
    };
    let mut running_http = None;
    if let Some(addr) = config.outbound.http {
        let l = bind(addr, "outbound HTTP").await?;
        running_http = Some(l.local_addr()?);
        spawn_listener(l, ListenerKind::OutboundHttp);
    }
    let mut ports = Vec::new();
    for port in &config.outbound.ports {
        let l = bind(port.listen, "per-upstream").await?;
        ports.push(l.local_addr()?);
        spawn_listener(
            l,
            ListenerKind::OutboundPort {
                destination: Arc::from(port.destination.as_str()),
                protocol: port.protocol,
            },
        );
    }
    let mut inbound = None;
    if let Some(i) = &config.inbound {
        let l = bind(i.listen, "inbound").await?;
        inbound = Some(l.local_addr()?);
        spawn_listener(l, ListenerKind::Inbound);
    }
    // Transparent listeners, each with its IPv6 twin when the host has IPv6 (the rules redirect
    // both families; see `transparent`).
    let mut transparent_listeners = Vec::new();
    for (addr, what, outbound) in [
        (config.transparent.outbound, "transparent outbound", true),
        (config.transparent.inbound, "transparent inbound", false),
    ] {
        let Some(addr) = addr else { continue };
        let l = bind(addr, what).await?;
        let a = l.local_addr()?;
        let mut bound = vec![(l, a)];
        if let Some(twin) = server::transparent::ipv6_twin(addr) {
            match server::transparent::bind_v6_only(twin, backlog) {
                Ok(l6) => {
                    let a = l6.local_addr()?;
                    bound.push((l6, a));
                }
                Err(e) => {
                    tracing::info!(%twin, error = %e, "no IPv6 {what} listener (no IPv6 here?)")
                }
            }
        }
        transparent_listeners.push((outbound, bound));
    }
    let mut outbound_transparent = None;
    let mut inbound_transparent = None;
    for (outbound, bound) in transparent_listeners {
        for (i, (l, listen)) in bound.into_iter().enumerate() {
            let kind = if outbound {
                if i == 0 {
                    outbound_transparent = Some(listen);
                }
                ListenerKind::OutboundTransparent { listen }
            } else {
                if i == 0 {
                    inbound_transparent = Some(listen);
                }
                ListenerKind::InboundTransparent { listen }
            };
            spawn_listener(l, kind);
        }
    }
    let (mut gateway_https, mut gateway_http) = (None, None);
    if let Some(g) = &config.gateway {
        let gateway = Arc::new(gateway::Gateway::load(g).context("setting up the gateway")?);
        let watched = Arc::clone(&gateway);
        let mut stop = shutdown_rx.clone();
        let document = gateway_document.clone();
        let metrics = shared.metrics.clone();
        tokio::spawn(async move {
            let stopped = async move { shutdown::stopped(&mut stop).await };
            match document {
                Some(path) => {
                    watched
                        .watch_document(path, GATEWAY_CERTIFICATE_POLL, &metrics, stopped)
                        .await
                }
                None => {
                    watched
                        .watch_certificates(GATEWAY_CERTIFICATE_POLL, &metrics, stopped)
                        .await
                }
            }
        });
        let l = bind(g.https, "gateway HTTPS").await?;
        let https = l.local_addr()?;
        gateway_https = Some(https);
        spawn_listener(l, ListenerKind::Gateway { gateway });
        if let Some(addr) = g.http_redirect {
            let l = bind(addr, "gateway HTTP redirect").await?;
            gateway_http = Some(l.local_addr()?);
            spawn_listener(
                l,
                ListenerKind::GatewayRedirect {
                    https_port: https.port(),
                },
            );
        }
    }
    let mut udp = Vec::new();
    for forward in &config.outbound.udp {
        let socket = tokio::net::UdpSocket::bind(forward.listen)
            .await
            .with_context(|| format!("binding the outbound UDP listener on {}", forward.listen))?;
        let forwarder = udp::outbound(socket, forward, Arc::clone(&shared));
        udp.push(forwarder.local_addr()?);
        let mut stop = shutdown_rx.clone();
        let listen = forward.listen;
        tasks.push(tokio::spawn(async move {
            let stopped = async move { shutdown::stopped(&mut stop).await };
            if let Err(e) = forwarder.run(stopped).await {
                tracing::error!(%listen, error = %e, "outbound UDP listener failed");
            }
        }));
    }
    let mut udp_transparent = None;
    if let Some(addr) = config.transparent.udp {
        let socket = udp::transparent::bind(addr)
            .with_context(|| format!("binding the transparent UDP listener on {addr}"))?;
        udp_transparent = Some(socket.local_addr()?);
        tasks.push(tokio::spawn(udp::transparent::serve(
            socket,
            Arc::clone(&shared),
            shutdown_rx.clone(),
        )));
    }
    let mut admin = None;
    if let Some(addr) = config.admin {
        let l = bind(addr, "admin").await?;
        admin = Some(l.local_addr()?);
        tasks.push(tokio::spawn(admin::serve(
            l,
            Arc::clone(&shared),
            Arc::new(registry),
            app_probes,
            shutdown_rx.clone(),
        )));
    }
    Ok(RunningProxy {
        shared,
        admin,
        http: running_http,
        ports,
        inbound,
        outbound_transparent,
        inbound_transparent,
        udp,
        udp_transparent,
        gateway_https,
        gateway_http,
        connections,
        shutdown,
        tasks,
    })
}

impl RunningProxy {
    /// A receiver that turns true when the proxy starts draining (for helper tasks).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Open client connections now.
    pub fn open_connections(&self) -> usize {
        self.connections.count()
    }

    /// Stop accepting, let in-flight requests finish (at most `bound`), then stop.
    /// Returns the number of connections still open when the bound passed.
    pub async fn drain(self, bound: Duration) -> usize {
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let left = self.connections.wait_idle(bound).await;
        for t in &self.tasks {
            t.abort();
        }
        left
    }
}
