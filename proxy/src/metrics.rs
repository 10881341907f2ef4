//! Prometheus metrics of the proxy. The registry is passed in (no globals), so tests and
//! embedders can run several proxies in one process.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `trellis_request_total` | counter | [`RequestLabels`] |
//! | `trellis_request_duration_ms` | histogram (ms: 1,5,10,25,50,100,250,500,1000,5000,...) | [`RequestLabels`] |
//! | `trellis_tcp_connections_total` | counter | [`TcpLabels`] |
//! | `trellis_config_updates_total` | counter | `source` (`file`, `controller`), `result` (`applied`, `rejected`) |
//! | `trellis_tls_handshakes_total` | counter | `direction` (`inbound`, `outbound`): completed mTLS handshakes |
//! | `trellis_tls_handshake_duration_ms` | histogram | `direction` |
//! | `trellis_tls_handshake_errors_total` | counter | `direction`, `reason` (`timeout`, `expired`, `unknown-issuer`, `identity-mismatch`, `bad-certificate`, `no-client-certificate`, `no-identity`, `protocol`, `eof`, `io`, ...) |
//! | `trellis_inbound_connections_refused_total` | counter | `reason` (`per-source-limit`, `handshake-limit`) |
//! | `trellis_connections_refused_total` | counter | `listener` (`outbound-http`, `outbound-port`, `inbound`), `reason` (`global-limit`, `per-source-limit`, `handshake-limit`): every refusal |
//! | `trellis_open_connections` | gauge | `listener`: client connections open now |
//!
//! `trellis_request_duration_ms` measures from the request's arrival to the response headers
//! (what clients wait for before bytes flow). Success rate per destination workload for Flagger:
//! `sum(rate(trellis_request_total{destination_workload="X",response_code!~"5.."}[1m])) /
//! sum(rate(trellis_request_total{destination_workload="X"}[1m]))`.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::Workload;

/// Latency buckets in milliseconds.
pub const LATENCY_BUCKETS_MS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// A cheaply clonable label value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(Arc<str>);

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(Arc::from(s))
    }
}

impl Label {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// Labels of HTTP request metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: Label,
    /// The proxy's own workload.
    pub source_namespace: Label,
    /// Kind of the proxy's workload.
    pub source_kind: Label,
    /// Name of the proxy's workload.
    pub source_workload: Label,
    /// The destination authority (normalized), or `unknown`.
    pub destination: Label,
    /// Namespace of the destination workload.
    pub destination_namespace: Label,
    /// Kind of the destination workload.
    pub destination_kind: Label,
    /// Name of the destination workload (the backend's workload).
    pub destination_workload: Label,
    /// Backend (split leg) name.
    pub backend: Label,
    /// Matched route name (empty = default).
    pub route: Label,
    /// HTTP status code returned to the client.
    pub response_code: u16,
    /// The mesh's error reason when the proxy answered itself (`x-trellis-error`), else empty.
    pub error: Label,
}

/// Labels of TCP connection metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `outbound` or `inbound`.
    pub direction: Label,
    /// The destination authority.
    pub destination: Label,
    /// Backend name.
    pub backend: Label,
    /// Error reason, empty on success.
    pub error: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TlsErrorLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpdateLabels {
    source: &'static str,
    result: &'static str,
}

/// The proxy's metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp: Family<TcpLabels, Counter>,
    updates: Family<UpdateLabels, Counter>,
    handshakes: Family<DirectionLabels, Counter>,
    handshake_durations: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    handshake_errors: Family<TlsErrorLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    /// Source labels (this proxy's workload).
    pub source: SourceLabels,
    open_connections: Family<ListenerLabels, Gauge>,
    connections_refused: Family<ListenerReasonLabels, Counter>,
}

/// This proxy's own workload labels.
#[derive(Debug, Clone)]
pub struct SourceLabels {
    /// Namespace.
    pub namespace: Label,
    /// Kind.
    pub kind: Label,
    /// Name.
    pub workload: Label,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

impl Metrics {
    /// Register the proxy's metrics in `registry`.
    pub fn register(registry: &mut Registry, workload: Option<&Workload>) -> Self {
        let requests = Family::default();
        let durations = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let tcp = Family::default();
        let updates = Family::default();
        let handshakes = Family::default();
        let handshake_durations =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let handshake_errors = Family::default();
        let refused = Family::default();
        registry.register(
            "trellis_tls_handshakes",
            "Completed mTLS handshakes",
            handshakes.clone(),
        );
        registry.register(
            "trellis_tls_handshake_duration_ms",
            "mTLS handshake duration, milliseconds",
            handshake_durations.clone(),
        );
        registry.register(
            "trellis_tls_handshake_errors",
            "Failed mTLS handshakes, by reason",
            handshake_errors.clone(),
        );
        registry.register(
            "trellis_inbound_connections_refused",
            "Inbound connections closed before serving, by reason",
            refused.clone(),
        );
        registry.register(
            "trellis_request",
            "HTTP requests handled, by destination and response code",
            requests.clone(),
        );
        registry.register(
            "trellis_request_duration_ms",
            "Time from request arrival to response headers, milliseconds",
            durations.clone(),
        );
        registry.register(
            "trellis_tcp_connections",
            "Opaque TCP connections forwarded",
            tcp.clone(),
        );
        registry.register(
            "trellis_config_updates",
            "Configuration updates applied or rejected",
            updates.clone(),
        );
        let open_connections = Family::default();
        let connections_refused = Family::default();
        registry.register(
            "trellis_open_connections",
            "Client connections open now, by listener kind",
            open_connections.clone(),
        );
        registry.register(
            "trellis_connections_refused",
            "Client connections closed before serving, by listener kind and reason",
            connections_refused.clone(),
        );
        let source = match workload {
            Some(w) => SourceLabels {
                namespace: Label::from(w.namespace.as_str()),
                kind: Label::from(w.kind.as_str()),
                workload: Label::from(w.name.as_str()),
            },
            None => SourceLabels {
                namespace: Label::from(""),
                kind: Label::from(""),
                workload: Label::from(""),
            },
        };
        Metrics {
            requests,
            durations,
            tcp,
            updates,
            handshakes,
            handshake_durations,
            handshake_errors,
            refused,
            source,
            open_connections,
            connections_refused,
        }
    }

    /// Count one finished request.
    pub fn request(&self, labels: &RequestLabels, elapsed_ms: f64) {
        self.requests.get_or_create(labels).inc();
        self.durations.get_or_create(labels).observe(elapsed_ms);
    }

    /// Count one TCP connection.
    pub fn tcp(&self, labels: &TcpLabels) {
        self.tcp.get_or_create(labels).inc();
    }

    /// Count one completed TLS handshake.
    pub fn tls_handshake(&self, direction: &'static str, took: std::time::Duration) {
        let labels = DirectionLabels { direction };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64() * 1000.0);
    }

    /// Count one failed TLS handshake.
    pub fn tls_error(&self, direction: &'static str, reason: &'static str) {
        self.handshake_errors
            .get_or_create(&TlsErrorLabels { direction, reason })
            .inc();
    }

    /// Count one inbound connection refused before it was served.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// One more open connection on a `listener` kind.
    pub fn connection_opened(&self, listener: &'static str) {
        self.open_connections
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// One open connection fewer on a `listener` kind.
    pub fn connection_closed(&self, listener: &'static str) {
        self.open_connections
            .get_or_create(&ListenerLabels { listener })
            .dec();
    }

    /// Count one connection of a `listener` kind closed before it was served.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ListenerReasonLabels { listener, reason })
            .inc();
    }

    /// Count one configuration update.
    pub fn update(&self, source: &'static str, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.updates
            .get_or_create(&UpdateLabels { source, result })
            .inc();
    }
}

/// Render a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# metrics encoding failed");
    }
    out
}
