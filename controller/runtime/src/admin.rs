//! The controller's admin port: `/live`, `/ready` (200 once every policy source has answered),
//! `/metrics` (Prometheus text, registry passed in) and `/api/v1/state` (JSON for people and for
//! `trellis check` / `trellis get`: platforms with their freshness, connected proxy streams,
//! leader election, policies in force, resolved destinations and every problem). Under
//! `/apis/metrics.smi-spec.io/v1alpha1` (and `/apis`), the SMI TrafficMetrics API
//! (`trellis_traffic_metrics`) when the controller has `--prometheus`; without it those paths
//! answer 404 with a Status saying the flag is missing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use trellis_discovery::Merged;

use trellis_controller_core::index::{Index, ProblemLine, Status};
use trellis_controller_core::leader::LeaderStatus;
use trellis_controller_grpc::StreamCounts;

/// One discovery source as `trellis check` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    pub source: String,
    pub last_good_unix: Option<u64>,
    pub last_error: Option<String>,
    pub stale: bool,
}

/// Connected proxy streams.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamState {
    pub destinations: usize,
    pub inbound: usize,
}

/// The webhooks (`--webhook`) as `trellis check` shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WebhookState {
    /// Where they listen.
    pub listen: String,
    /// Where the API server calls them: `service NAMESPACE/NAME` or the URL.
    pub endpoint: String,
    /// `/inject` is served too.
    pub injection: bool,
    /// When the serving certificate in force expires (Unix seconds).
    pub certificate_not_after_unix: u64,
    /// The leader wrote the current caBundle into every target.
    pub ca_bundle_written: bool,
    /// Why the last write was incomplete (this replica's last attempt as leader).
    pub problems: Vec<String>,
}

/// Reads the webhooks' state when asked.
pub type WebhookStateFn = Arc<dyn Fn() -> WebhookState + Send + Sync>;

/// The JSON of `/api/v1/state`.
#[derive(Clone, Debug, Serialize)]
pub struct State {
    pub platforms: Vec<PlatformState>,
    pub streams: StreamState,
    /// Leader election (`None` when the admin port was not told about it).
    pub leader: Option<LeaderStatus>,
    /// The webhooks, when served.
    pub webhooks: Option<WebhookState>,
    #[serde(flatten)]
    pub index: Status,
}

/// What the admin port reads.
#[derive(Clone)]
pub struct Admin {
    index: Index,
    discovery: Merged,
    counts: Arc<StreamCounts>,
    registry: Arc<Registry>,
    gauges: Gauges,
    leader: Option<tokio::sync::watch::Receiver<LeaderStatus>>,
    webhooks: Option<WebhookStateFn>,
    traffic_metrics: Option<trellis_traffic_metrics::MetricsApi>,
}

#[derive(Clone, Default)]
struct Gauges {
    leader: Gauge,
    destination_streams: Gauge,
    inbound_streams: Gauge,
    policies: Gauge,
    problems: Gauge,
    destinations: Gauge,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Registers the controller's metrics in `registry` and serves it on `/metrics`.
    pub fn new(
        index: Index,
        discovery: Merged,
        counts: Arc<StreamCounts>,
        mut registry: Registry,
    ) -> Self {
        let gauges = Gauges::default();
        registry.register(
            "trellis_controller_proxy_streams_destinations",
            "Connected Destinations.Watch streams",
            gauges.destination_streams.clone(),
        );
        registry.register(
            "trellis_controller_proxy_streams_inbound",
            "Connected Inbound.Watch streams",
            gauges.inbound_streams.clone(),
        );
        registry.register(
            "trellis_controller_policies",
            "SMI resources in force",
            gauges.policies.clone(),
        );
        registry.register(
            "trellis_controller_problems",
            "Problems reported",
            gauges.problems.clone(),
        );
        registry.register(
            "trellis_controller_destinations",
            "Destinations watched by proxies",
            gauges.destinations.clone(),
        );
        registry.register(
            "trellis_controller_leader",
            "1 while this replica is the leader (may write Events), else 0",
            gauges.leader.clone(),
        );
        Admin {
            index,
            discovery,
            counts,
            registry: Arc::new(registry),
            gauges,
            leader: None,
            webhooks: None,
            traffic_metrics: None,
        }
    }

    /// Serves the TrafficMetrics API from `api`'s Prometheus (`None`: its paths say
    /// `--prometheus` is missing).
    pub fn with_traffic_metrics(
        mut self,
        api: Option<trellis_traffic_metrics::MetricsApi>,
    ) -> Self {
        self.traffic_metrics = api;
        self
    }

    /// Answers one request: the TrafficMetrics API's paths asynchronously (they query
    /// Prometheus), the rest at once.
    pub async fn handle(&self, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        if !trellis_traffic_metrics::handles(path) {
            return self.respond(path);
        }
        match &self.traffic_metrics {
            Some(api) => api.respond(path, query).await.into_response(),
            None => trellis_traffic_metrics::Answer::not_configured(path).into_response(),
        }
    }

    /// Shows the webhooks in the state; their problems are problems (location `webhooks`).
    pub fn with_webhooks(mut self, state: WebhookStateFn) -> Self {
        self.webhooks = Some(state);
        self
    }

    /// Shows the leader election in the state and the `trellis_controller_leader` gauge.
    pub fn with_leader(mut self, status: tokio::sync::watch::Receiver<LeaderStatus>) -> Self {
        self.leader = Some(status);
        self
    }

    /// The current state.
    pub fn state(&self) -> State {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        State {
            platforms: self
                .discovery
                .freshness()
                .into_iter()
                .map(|f| PlatformState {
                    source: f.source.to_string(),
                    last_good_unix: f.last_good.and_then(unix),
                    stale: f.is_stale(),
                    last_error: f.last_error.map(|(_, e)| e),
                })
                .collect(),
            streams: StreamState {
                destinations: self.counts.destinations.load(Ordering::Relaxed),
                inbound: self.counts.inbound.load(Ordering::Relaxed),
            },
            leader: self.leader.as_ref().map(|l| l.borrow().clone()),
            webhooks: self.webhooks.as_ref().map(|state| state()),
            index: self.index_with_registration_problems(),
        }
    }

    /// The index's status with the discovery's registration problems (an address in two
    /// platforms, an unusable or loopback address) added to its problems.
    fn index_with_registration_problems(&self) -> Status {
        let mut status = (**self.index.status().borrow()).clone();
        status
            .problems
            .extend(self.discovery.problems().into_iter().map(|p| ProblemLine {
                resource: format!("Service {}/{}", p.service.namespace, p.service.name),
                location: "discovery".into(),
                message: p.message,
            }));
        if let Some(webhooks) = &self.webhooks {
            status
                .problems
                .extend(webhooks().problems.into_iter().map(|message| ProblemLine {
                    resource: "caBundle".into(),
                    location: "webhooks".into(),
                    message,
                }));
        }
        status
    }

    fn metrics(&self) -> String {
        let state = self.state();
        let set = |g: &Gauge, v: usize| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.gauges.destination_streams, state.streams.destinations);
        set(&self.gauges.inbound_streams, state.streams.inbound);
        set(&self.gauges.policies, state.index.policies.len());
        set(&self.gauges.problems, state.index.problems.len());
        set(&self.gauges.destinations, state.index.destinations.len());
        // Without election information this replica is the only writer.
        let leader = state.leader.as_ref().is_none_or(|l| l.leader);
        set(&self.gauges.leader, usize::from(leader));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/live" => (StatusCode::OK, "text/plain", "live\n".to_owned()),
            "/ready" if self.index.status().borrow().policy_ready => {
                (StatusCode::OK, "text/plain", "ready\n".to_owned())
            }
            "/ready" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: waiting for the policy sources\n".to_owned(),
            ),
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics(),
            ),
            "/api/v1/state" => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.state()).unwrap_or_default(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("no such page {path}\n"),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let admin = self.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let admin = admin.clone();
                            async move {
                                let uri = req.uri();
                                let response = admin.handle(uri.path(), uri.query()).await;
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(bound)
    }
}
