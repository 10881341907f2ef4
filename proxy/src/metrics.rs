//! Prometheus metrics of the proxy. The registry is passed in (no globals), so tests and
//! embedders can run several proxies in one process.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `trellis_request_total` | counter | [`RequestLabels`] |
//! | `trellis_request_duration_ms` | histogram (ms: [`LATENCY_BUCKETS_MS`]) | [`RequestLabels`] |
//! | `trellis_tcp_connections_total` | counter | [`TcpLabels`] |
//! | `trellis_config_updates_total` | counter | `source` (`file`, `controller`, `gateway`: the Gateway document and its certificates reloaded), `result` (`applied`, `rejected`) |
//! | `trellis_tls_handshakes_total` | counter | `direction` (`inbound`, `outbound`, `gateway`): completed (m)TLS handshakes |
//! | `trellis_tls_handshake_duration_ms` | histogram | `direction` |
//! | `trellis_tls_handshake_errors_total` | counter | `direction`, `reason` (`timeout`, `expired`, `unknown-issuer`, `identity-mismatch`, `bad-certificate`, `no-client-certificate`, `no-identity`, `protocol`, `eof`, `io`, ...) |
//! | `trellis_inbound_connections_refused_total` | counter | `reason` (`per-source-limit`, `handshake-limit`) |
//! | `trellis_connections_refused_total` | counter | `listener` (`outbound-http`, `outbound-port`, `inbound`, `outbound-transparent`, `inbound-transparent`), `reason` (`global-limit`, `per-source-limit`, `handshake-limit`; transparent: `no-original-destination`, `loop`, `no-policy`): every refusal |
//! | `trellis_open_connections` | gauge | `listener`: client connections open now |
//! | `trellis_accepted_connections_total` | counter | `listener`: client connections accepted (within the global limit) |
//! | `trellis_endpoint_health_checks_total` | counter | `destination`, `result` (`pass`, `fail`): health-check probes of the destination's endpoints ([`crate::health`]) |
//! | `trellis_unhealthy_endpoints` | gauge | `destination`: its endpoints that failed their health checks and get no requests now (no series for a destination without health checks) |
//! | `trellis_retries_total` | counter | `destination`, `result` (`retried`: a retry was sent; `budget-exhausted`: a retryable failure was answered because the retry budget was spent) |
//! | `trellis_udp_datagrams_total` | counter | `direction`, `destination` (outbound: the listener's; inbound: empty), `flow` (`received`, `sent`: on the local UDP socket, from and to the clients outbound, the application inbound; `tunneled`: framed into a tunnel) |
//! | `trellis_udp_bytes_total` | counter | `direction`, `destination`, `flow` (`received`, `sent`) |
//! | `trellis_udp_sessions` | gauge | `direction`, `destination`: UDP sessions open now (outbound: per client address; inbound: per tunnel) |
//! | `trellis_udp_session_events_total` | counter | `direction`, `destination`, `event` (`opened`, `refused`, `idle`: closed after the idle timeout, `tunnel-failed`) |
//! | `trellis_udp_dropped_total` | counter | `direction`, `destination`, `reason` (`session-limit`, `oversized`, `refused`: the session was refused or is held before a retry, `queue-full`, `send-error`) |
//! | `trellis_udp_refused_total` | counter | `direction`, `destination`, `reason`: sessions the proxy refused, why (outbound: `unknown-destination`, `no-backends`, `no-endpoints`, `overloaded`, `connect-failed`, the TLS reasons; inbound: `forbidden`, `no-policy`) |
//!
//! With `--metrics-compat` (config `metrics_compat`), the inbound side also counts its requests
//! under other meshes' names, for tools whose built-in queries expect them (Flagger):
//!
//! | `--metrics-compat` | counter | histogram (ms) | labels |
//! |---|---|---|---|
//! | `osm` | `osm_request_total` | `osm_request_duration_ms` | `destination_namespace`, `destination_kind` (`Deployment`...), `destination_name`, `response_code` |
//! | `linkerd` | `response_total` | `response_latency_ms` | `namespace`, `deployment`, `direction="inbound"`, `classification` (`failure` for 5xx) |
//! | `istio` | `istio_requests_total` | `istio_request_duration_milliseconds` | `reporter="destination"`, `destination_workload_namespace`, `destination_workload`, `response_code` |
//!
//! The workload in every label is this proxy's (`--workload-name`, its Deployment), so a canary
//! and its primary are separate series.
//!
//! `trellis_request_duration_ms` measures from the request's arrival to the response headers
//! (what clients wait for before bytes flow). Success rate per destination workload for Flagger:
//! `sum(rate(trellis_request_total{direction="inbound",destination_workload="X",response_code!~"5.."}[1m])) /
//! sum(rate(trellis_request_total{direction="inbound",destination_workload="X"}[1m]))`
//! (the MetricTemplates in deploy/flagger).

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::{MetricsCompat, Workload};

pub use udp::UdpForwarders;

/// Latency buckets in milliseconds. `histogram_quantile` is exact at bucket edges, so edges sit
/// where canary thresholds usually do (100, 250, 300, 500, 1000 ms); 0.25, 0.5, 1 and 2 ms
/// resolve sub-millisecond meshes (a p99 of 0.3 ms reads as at most 0.5, not 1), 60 s bounds
/// the slowest finite bucket.
pub const LATENCY_BUCKETS_MS: [f64; 18] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 300.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0, 30000.0, 60000.0,
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

    /// The same allocation (not only the same text): a cheap identity for caches.
    pub fn same(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The request series of one label set, found once: counting a request through it costs two
/// atomic updates instead of two lookups of a 15-label set (hashing every string).
#[derive(Debug, Clone)]
pub struct RequestSeries {
    count: Counter,
    duration: Histogram,
}

impl RequestSeries {
    /// Count one finished request.
    pub fn record(&self, elapsed_ms: f64) {
        self.count.inc();
        self.duration.observe(elapsed_ms);
    }
}

/// The most label sets one [`SeriesCache`] keeps (a backend's answers: a few statuses per
/// route and identity); beyond it the cache starts over.
const SERIES_CACHE_ENTRIES: usize = 64;

/// The outbound request series of one backend, by what varies per request: the route, the
/// status, the endpoint's identity and this proxy's own (the rest of the label set is the
/// backend's). Labels compare by allocation ([`Label::same`]): a miss only costs a lookup.
#[derive(Debug, Default)]
pub struct SeriesCache {
    entries: std::sync::RwLock<Vec<(SeriesKey, RequestSeries)>>,
}

#[derive(Debug)]
struct SeriesKey {
    route: Label,
    status: u16,
    destination_identity: Label,
    source_identity: Label,
}

/// What varies between a backend's request series.
#[derive(Debug, Clone, Copy)]
pub struct SeriesOf<'a> {
    /// The route label.
    pub route: &'a Label,
    /// The response status.
    pub status: u16,
    /// The endpoint's SPIFFE id label (empty without mTLS).
    pub destination_identity: &'a Label,
    /// This proxy's SPIFFE id label (empty without mTLS).
    pub source_identity: &'a Label,
}

impl SeriesKey {
    fn is(&self, of: SeriesOf<'_>) -> bool {
        self.status == of.status
            && self.route.same(of.route)
            && self.destination_identity.same(of.destination_identity)
            && self.source_identity.same(of.source_identity)
    }
}

impl SeriesCache {
    /// Count one outbound request answered by the upstream (no `error`) whose other labels
    /// are the backend's: from the cache, or found once and kept. `labels` is built only on a
    /// miss; its route, status and identities must be `of`'s.
    pub fn record(
        &self,
        metrics: &Metrics,
        of: SeriesOf<'_>,
        labels: impl FnOnce() -> RequestLabels,
        elapsed_ms: f64,
    ) {
        if metrics.requests_off {
            return;
        }
        let found = |entries: &[(SeriesKey, RequestSeries)]| {
            entries
                .iter()
                .find(|(k, _)| k.is(of))
                .map(|(_, series)| series.clone())
        };
        let hit = found(&self.entries.read().unwrap_or_else(|p| p.into_inner()));
        let series = match hit {
            Some(series) => series,
            None => {
                let labels = labels();
                let series = RequestSeries {
                    count: metrics.requests.get_or_create(&labels).clone(),
                    duration: metrics.durations.get_or_create(&labels).clone(),
                };
                let key = SeriesKey {
                    route: labels.route.clone(),
                    status: labels.response_code,
                    destination_identity: labels.destination_identity.clone(),
                    source_identity: labels.source_identity.clone(),
                };
                debug_assert!(key.is(of), "the labels built must be the series asked for");
                let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
                if entries.len() >= SERIES_CACHE_ENTRIES {
                    entries.clear();
                }
                entries.push((key, series.clone()));
                series
            }
        };
        series.record(elapsed_ms);
    }
}

impl std::ops::Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
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
    /// The caller's SPIFFE id when the request travelled over mTLS (outbound: this proxy's own;
    /// inbound: the one the caller's certificate proved), else empty.
    pub source_identity: Label,
    /// The called workload's SPIFFE id over mTLS (outbound: the one the endpoint's certificate
    /// had to name; inbound: this proxy's own), else empty.
    pub destination_identity: Label,
    /// `true` when the request travelled between proxies over mutual TLS, else `false`.
    pub tls: Label,
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
struct RetryLabels {
    destination: Label,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HealthCheckLabels {
    destination: Label,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DestinationLabels {
    destination: Label,
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
    accepted_connections: Family<ListenerLabels, Counter>,
    connections_refused: Family<ListenerReasonLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    health_checks: Family<HealthCheckLabels, Counter>,
    unhealthy: Family<DestinationLabels, Gauge>,
    /// The series other meshes' names and labels that Flagger's built-in queries read.
    compat: Option<Arc<compat::Compat>>,
    /// [`crate::config::Config::no_request_metrics`].
    requests_off: bool,
    /// The UDP forwarders' counters, read when scraped.
    udp: Arc<UdpForwarders>,
    udp_refused: Family<udp::RefusedLabels, Counter>,
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
    pub fn register(
        registry: &mut Registry,
        workload: Option<&Workload>,
        compat: &[MetricsCompat],
    ) -> Self {
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
        let accepted_connections = Family::default();
        let retries = Family::default();
        registry.register(
            "trellis_retries",
            "Retries of outbound requests, and retryable failures answered because the retry budget was spent",
            retries.clone(),
        );
        let health_checks = Family::default();
        registry.register(
            "trellis_endpoint_health_checks",
            "Health-check probes of destinations' endpoints, by result",
            health_checks.clone(),
        );
        let unhealthy = Family::default();
        registry.register(
            "trellis_unhealthy_endpoints",
            "Endpoints of a destination that failed their health checks (no requests)",
            unhealthy.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "trellis_accepted_connections",
            "Client connections accepted, by listener kind",
            accepted_connections.clone(),
        );
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
        let udp = Arc::new(UdpForwarders::default());
        registry.register_collector(Box::new(Arc::clone(&udp)));
        let udp_refused = Family::default();
        registry.register(
            "trellis_udp_refused",
            "UDP sessions the proxy refused, by reason",
            udp_refused.clone(),
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
            accepted_connections,
            connections_refused,
            retries,
            health_checks,
            unhealthy,
            compat: (!compat.is_empty())
                .then(|| Arc::new(compat::Compat::register(registry, workload, compat))),
            requests_off: false,
            udp,
            udp_refused,
        }
    }

    /// Stop counting requests ([`crate::config::Config::no_request_metrics`]); the families
    /// stay registered, empty.
    pub fn without_request_series(mut self) -> Self {
        self.requests_off = true;
        self
    }

    /// Count one finished request.
    pub fn request(&self, labels: &RequestLabels, elapsed_ms: f64) {
        if self.requests_off {
            return;
        }
        self.requests.get_or_create(labels).inc();
        self.durations.get_or_create(labels).observe(elapsed_ms);
        if let Some(compat) = &self.compat
            && labels.direction.as_str() == "inbound"
        {
            compat.inbound(labels.response_code, elapsed_ms);
        }
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

    /// Count a retry decision for `destination` (`retried` or `budget-exhausted`).
    pub fn retry(&self, destination: &Label, result: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                destination: destination.clone(),
                result,
            })
            .inc();
    }

    /// Count one health-check probe of an endpoint of `destination`.
    pub fn health_check(&self, destination: &Label, passed: bool) {
        self.health_checks
            .get_or_create(&HealthCheckLabels {
                destination: destination.clone(),
                result: if passed { "pass" } else { "fail" },
            })
            .inc();
    }

    /// How many of `destination`'s endpoints are unhealthy now.
    pub fn unhealthy_endpoints(&self, destination: &Label, n: usize) {
        self.unhealthy
            .get_or_create(&DestinationLabels {
                destination: destination.clone(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `destination` is no longer health-checked: its gauge goes.
    pub fn forget_unhealthy_endpoints(&self, destination: &Label) {
        self.unhealthy.remove(&DestinationLabels {
            destination: destination.clone(),
        });
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
        self.accepted_connections
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

impl Metrics {
    /// Export the counters of a UDP forwarder (`direction`: `outbound` or `inbound`) from now on.
    pub fn udp_forwarder(
        &self,
        direction: &'static str,
        destination: Label,
        counters: Arc<trellis_udp::Counters>,
    ) {
        self.udp.add(direction, destination, counters);
    }

    /// Count one UDP session the proxy refused.
    pub fn udp_refused(&self, direction: &'static str, destination: &Label, reason: &'static str) {
        self.udp_refused
            .get_or_create(&udp::RefusedLabels {
                direction,
                destination: destination.clone(),
                reason,
            })
            .inc();
    }
}

mod udp {
    //! The UDP series: the forwarders' own counters ([`trellis_udp::Counters`], plain atomics
    //! on the datagram path) turned into Prometheus series when scraped, by a collector, so
    //! forwarding a datagram costs no label lookup.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use trellis_udp::{Counters, Snapshot};

    use super::Label;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    pub(super) struct RefusedLabels {
        pub(super) direction: &'static str,
        pub(super) destination: Label,
        pub(super) reason: &'static str,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        direction: &'static str,
        destination: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct FlowLabels {
        direction: &'static str,
        destination: Label,
        flow: &'static str,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct EventLabels {
        direction: &'static str,
        destination: Label,
        event: &'static str,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct ReasonLabels {
        direction: &'static str,
        destination: Label,
        reason: &'static str,
    }

    /// Every UDP forwarder of the proxy with its labels (registered as a collector).
    #[derive(Debug, Default)]
    pub struct UdpForwarders {
        list: Mutex<Vec<(&'static str, Label, Arc<Counters>)>>,
    }

    impl UdpForwarders {
        pub(super) fn add(
            &self,
            direction: &'static str,
            destination: Label,
            counters: Arc<Counters>,
        ) {
            self.list.lock().unwrap_or_else(|p| p.into_inner()).push((
                direction,
                destination,
                counters,
            ));
        }

        /// The counters summed per (direction, destination): two listeners towards one
        /// destination are one series.
        fn totals(&self) -> Totals {
            let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
            let mut totals: BTreeMap<(&'static str, Label), Snapshot> = BTreeMap::new();
            for (direction, destination, counters) in list.iter() {
                let s = counters.snapshot();
                let t = totals.entry((direction, destination.clone())).or_default();
                t.received_datagrams += s.received_datagrams;
                t.received_bytes += s.received_bytes;
                t.sent_datagrams += s.sent_datagrams;
                t.sent_bytes += s.sent_bytes;
                t.tunneled_datagrams += s.tunneled_datagrams;
                t.sessions_opened += s.sessions_opened;
                t.sessions_open += s.sessions_open;
                t.sessions_idle += s.sessions_idle;
                t.sessions_refused += s.sessions_refused;
                t.tunnel_failures += s.tunnel_failures;
                t.dropped_session_limit += s.dropped_session_limit;
                t.dropped_oversized += s.dropped_oversized;
                t.dropped_refused += s.dropped_refused;
                t.dropped_queue_full += s.dropped_queue_full;
                t.send_errors += s.send_errors;
            }
            totals
        }
    }

    type Totals = BTreeMap<(&'static str, Label), Snapshot>;

    /// One counter family: per (direction, destination), the values `values` picks, each under
    /// its own value of the third label (`label`).
    fn counter<L: EncodeLabelSet>(
        encoder: &mut DescriptorEncoder,
        (name, help): (&str, &str),
        totals: &Totals,
        values: impl Fn(&Snapshot) -> Vec<(&'static str, u64)>,
        label: impl Fn(&'static str, Label, &'static str) -> L,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for ((direction, destination), s) in totals {
            for (what, value) in values(s) {
                let labels = label(direction, destination.clone(), what);
                ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn flow(direction: &'static str, destination: Label, flow: &'static str) -> FlowLabels {
        FlowLabels {
            direction,
            destination,
            flow,
        }
    }

    impl Collector for UdpForwarders {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let totals = self.totals();
            if totals.is_empty() {
                return Ok(());
            }
            counter(
                &mut encoder,
                (
                    "trellis_udp_datagrams",
                    "UDP datagrams received and sent on the local sockets, and framed into tunnels",
                ),
                &totals,
                |s| {
                    vec![
                        ("received", s.received_datagrams),
                        ("sent", s.sent_datagrams),
                        ("tunneled", s.tunneled_datagrams),
                    ]
                },
                flow,
            )?;
            counter(
                &mut encoder,
                (
                    "trellis_udp_bytes",
                    "Payload bytes of the UDP datagrams received and sent on the local sockets",
                ),
                &totals,
                |s| vec![("received", s.received_bytes), ("sent", s.sent_bytes)],
                flow,
            )?;
            counter(
                &mut encoder,
                (
                    "trellis_udp_session_events",
                    "UDP sessions opened, refused, closed idle, ended by their tunnel",
                ),
                &totals,
                |s| {
                    vec![
                        ("opened", s.sessions_opened),
                        ("refused", s.sessions_refused),
                        ("idle", s.sessions_idle),
                        ("tunnel-failed", s.tunnel_failures),
                    ]
                },
                |direction, destination, event| EventLabels {
                    direction,
                    destination,
                    event,
                },
            )?;
            counter(
                &mut encoder,
                ("trellis_udp_dropped", "UDP datagrams dropped, by reason"),
                &totals,
                |s| {
                    vec![
                        ("session-limit", s.dropped_session_limit),
                        ("oversized", s.dropped_oversized),
                        ("refused", s.dropped_refused),
                        ("queue-full", s.dropped_queue_full),
                        ("send-error", s.send_errors),
                    ]
                },
                |direction, destination, reason| ReasonLabels {
                    direction,
                    destination,
                    reason,
                },
            )?;
            let mut open = encoder.encode_descriptor(
                "trellis_udp_sessions",
                "UDP sessions open now",
                None,
                MetricType::Gauge,
            )?;
            for ((direction, destination), s) in &totals {
                let labels = Labels {
                    direction,
                    destination: destination.clone(),
                };
                let n = i64::try_from(s.sessions_open).unwrap_or(i64::MAX);
                ConstGauge::new(n).encode(open.encode_family(&labels)?)?;
            }
            Ok(())
        }
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

/// The compatibility series (`--metrics-compat`): the names and labels of the OSM, Linkerd and
/// Istio data planes, exactly what Flagger's built-in queries for those providers select
/// (../shared/flagger/CONTRACT.md section 3.2), counted by the inbound (server-side) proxy for
/// its own workload. Every label but the status is this proxy's workload, so the label sets are
/// built once and a request only picks the one for its status code.
mod compat {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct OsmLabels {
        destination_namespace: Label,
        destination_kind: Label,
        destination_name: Label,
        response_code: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct OsmDurationLabels {
        destination_namespace: Label,
        destination_kind: Label,
        destination_name: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct LinkerdLabels {
        namespace: Label,
        deployment: Label,
        direction: Label,
        classification: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct LinkerdDurationLabels {
        namespace: Label,
        deployment: Label,
        direction: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct IstioLabels {
        reporter: Label,
        destination_workload_namespace: Label,
        destination_workload: Label,
        response_code: Label,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct IstioDurationLabels {
        reporter: Label,
        destination_workload_namespace: Label,
        destination_workload: Label,
    }

    type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

    /// Registers a histogram family and returns its one series, `labels`.
    fn histogram<L>(registry: &mut Registry, metric: &str, help: &str, labels: &L) -> Histogram
    where
        L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    {
        let family: Histograms<L> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(metric, help, family.clone());
        family.get_or_create(labels).clone()
    }

    pub(super) struct Compat {
        namespace: Label,
        kind: Label,
        name: Label,
        osm: Option<Family<OsmLabels, Counter>>,
        linkerd: Option<Family<LinkerdLabels, Counter>>,
        istio: Option<Family<IstioLabels, Counter>>,
        /// Every enabled family's histogram of this workload (one label set each).
        durations: Vec<Histogram>,
        /// The counters of each status code seen, resolved once.
        by_status: Mutex<HashMap<u16, Arc<[Counter]>>>,
    }

    impl std::fmt::Debug for Compat {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Compat")
                .field("osm", &self.osm.is_some())
                .field("linkerd", &self.linkerd.is_some())
                .field("istio", &self.istio.is_some())
                .finish_non_exhaustive()
        }
    }

    /// `deployment` -> `Deployment`, as Kubernetes spells kinds (OSM's queries say
    /// `destination_kind="Deployment"`).
    pub(super) fn kind_name(kind: &str) -> String {
        match kind.to_ascii_lowercase().as_str() {
            "deployment" => "Deployment".into(),
            "statefulset" => "StatefulSet".into(),
            "daemonset" => "DaemonSet".into(),
            "replicaset" => "ReplicaSet".into(),
            "pod" => "Pod".into(),
            _ => {
                let mut chars = kind.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            }
        }
    }

    impl Compat {
        pub(super) fn register(
            registry: &mut Registry,
            workload: Option<&Workload>,
            which: &[MetricsCompat],
        ) -> Self {
            let (namespace, kind, name) = workload
                .map_or((String::new(), String::new(), String::new()), |w| {
                    (w.namespace.clone(), kind_name(&w.kind), w.name.clone())
                });
            let namespace = Label::from(namespace.as_str());
            let kind = Label::from(kind.as_str());
            let name = Label::from(name.as_str());
            let mut compat = Compat {
                namespace: namespace.clone(),
                kind: kind.clone(),
                name: name.clone(),
                osm: None,
                linkerd: None,
                istio: None,
                durations: Vec::new(),
                by_status: Mutex::new(HashMap::new()),
            };
            for which in which {
                match which {
                    MetricsCompat::Osm if compat.osm.is_none() => {
                        let requests = Family::default();
                        registry.register(
                            "osm_request",
                            "Inbound HTTP requests (OSM's name, for Flagger's osm provider)",
                            requests.clone(),
                        );
                        let durations = histogram(
                            registry,
                            "osm_request_duration_ms",
                            "Inbound request duration, ms (OSM's name)",
                            &OsmDurationLabels {
                                destination_namespace: namespace.clone(),
                                destination_kind: kind.clone(),
                                destination_name: name.clone(),
                            },
                        );
                        compat.osm = Some(requests);
                        compat.durations.push(durations);
                    }
                    MetricsCompat::Linkerd if compat.linkerd.is_none() => {
                        let requests = Family::default();
                        registry.register(
                            "response",
                            "Inbound HTTP responses (Linkerd's name, for Flagger's linkerd provider)",
                            requests.clone(),
                        );
                        let durations = histogram(
                            registry,
                            "response_latency_ms",
                            "Inbound response latency, ms (Linkerd's name)",
                            &LinkerdDurationLabels {
                                namespace: namespace.clone(),
                                deployment: name.clone(),
                                direction: Label::from("inbound"),
                            },
                        );
                        compat.linkerd = Some(requests);
                        compat.durations.push(durations);
                    }
                    MetricsCompat::Istio if compat.istio.is_none() => {
                        let requests = Family::default();
                        registry.register(
                            "istio_requests",
                            "Inbound HTTP requests (Istio's name, what Flagger's smi providers query)",
                            requests.clone(),
                        );
                        let durations = histogram(
                            registry,
                            "istio_request_duration_milliseconds",
                            "Inbound request duration, ms (Istio's name)",
                            &IstioDurationLabels {
                                reporter: Label::from("destination"),
                                destination_workload_namespace: namespace.clone(),
                                destination_workload: name.clone(),
                            },
                        );
                        compat.istio = Some(requests);
                        compat.durations.push(durations);
                    }
                    _ => {}
                }
            }
            compat
        }

        /// The counters of `status`, created on first use.
        fn counters(&self, status: u16) -> Arc<[Counter]> {
            let mut cache = self.by_status.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .entry(status)
                .or_insert_with(|| {
                    let code = Label::from(status.to_string().as_str());
                    // Linkerd's classification: a 5xx is a failure.
                    let classification =
                        Label::from(if status >= 500 { "failure" } else { "success" });
                    let mut counters = Vec::new();
                    if let Some(family) = &self.osm {
                        counters.push(
                            family
                                .get_or_create(&OsmLabels {
                                    destination_namespace: self.namespace.clone(),
                                    destination_kind: self.kind.clone(),
                                    destination_name: self.name.clone(),
                                    response_code: code.clone(),
                                })
                                .clone(),
                        );
                    }
                    if let Some(family) = &self.linkerd {
                        counters.push(
                            family
                                .get_or_create(&LinkerdLabels {
                                    namespace: self.namespace.clone(),
                                    deployment: self.name.clone(),
                                    direction: Label::from("inbound"),
                                    classification,
                                })
                                .clone(),
                        );
                    }
                    if let Some(family) = &self.istio {
                        counters.push(
                            family
                                .get_or_create(&IstioLabels {
                                    reporter: Label::from("destination"),
                                    destination_workload_namespace: self.namespace.clone(),
                                    destination_workload: self.name.clone(),
                                    response_code: code,
                                })
                                .clone(),
                        );
                    }
                    Arc::from(counters)
                })
                .clone()
        }

        /// Counts one inbound request answered with `status` after `elapsed_ms`.
        pub(super) fn inbound(&self, status: u16, elapsed_ms: f64) {
            for counter in self.counters(status).iter() {
                counter.inc();
            }
            for histogram in &self.durations {
                histogram.observe(elapsed_ms);
            }
        }
    }
}

#[cfg(test)]
mod series_tests {
    use super::*;

    fn labels(route: &Label, status: u16, empty: &Label) -> RequestLabels {
        RequestLabels {
            direction: Label::from("outbound"),
            source_namespace: empty.clone(),
            source_kind: empty.clone(),
            source_workload: empty.clone(),
            destination: Label::from("web.shop"),
            destination_namespace: Label::from("shop"),
            destination_kind: Label::from("deployment"),
            destination_workload: Label::from("web"),
            backend: Label::from("web"),
            route: route.clone(),
            response_code: status,
            error: empty.clone(),
            source_identity: empty.clone(),
            destination_identity: empty.clone(),
            tls: Label::from("false"),
        }
    }

    #[test]
    fn cached_series_count_like_looked_up_ones() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, None, &[]);
        let cache = SeriesCache::default();
        let (route, empty) = (Label::from("api"), Label::from(""));
        let mut built = 0;
        for status in [200, 200, 200, 503] {
            let of = SeriesOf {
                route: &route,
                status,
                destination_identity: &empty,
                source_identity: &empty,
            };
            cache.record(
                &metrics,
                of,
                || {
                    built += 1;
                    labels(&route, status, &empty)
                },
                1.0,
            );
        }
        assert_eq!(built, 2, "the label set is built once per series");
        let text = render(&registry);
        let count = |code: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("trellis_request_total{")
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(count("200").as_deref(), Some("3"), "{text}");
        assert_eq!(count("503").as_deref(), Some("1"), "{text}");
        // Another allocation of the same text is another key, counted in the same series.
        let again = Label::from("api");
        let of = SeriesOf {
            route: &again,
            status: 200,
            destination_identity: &empty,
            source_identity: &empty,
        };
        cache.record(&metrics, of, || labels(&again, 200, &empty), 1.0);
        assert_eq!(count_after(&registry, "200"), "4");
    }

    fn count_after(registry: &Registry, code: &str) -> String {
        render(registry)
            .lines()
            .find(|l| {
                l.starts_with("trellis_request_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_default()
            .to_string()
    }
}
