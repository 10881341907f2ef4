//! The SMI TrafficMetrics API (`metrics.smi-spec.io/v1alpha1`), answered from the Prometheus that
//! scrapes the proxies, and the one Prometheus client of Trellis ([`prometheus`]).
//!
//! The controller serves [`MetricsApi`] on its admin port (`trellis controller --prometheus
//! http://HOST:PORT`) and, on Kubernetes, as an aggregated API behind the APIService
//! `v1alpha1.metrics.smi-spec.io` on its HTTPS webhook port (authentication and authorization
//! are the caller's job there, see the controller runtime's `aggregated` module).
//!
//! # URLs (those of the reference implementation, deislabs/smi-metrics)
//!
//! Under `/apis/metrics.smi-spec.io/v1alpha1`:
//!
//! | path | answer |
//! |---|---|
//! | (empty) | `APIResourceList` (discovery) |
//! | `/namespaces/NS/KIND/NAME` | `TrafficMetrics` of one object |
//! | `/namespaces/NS/KIND` | `TrafficMetricsList` of every object of KIND in NS that has series |
//! | `/KIND` | the same over every namespace |
//! | `/namespaces/NS/KIND/NAME/edges` | `TrafficMetricsList` of its edges |
//! | `/namespaces`, `/namespaces/NS`, `/namespaces/NS/edges` | namespaces, as a whole |
//!
//! KIND is `pods`, `deployments`, `statefulsets` or `daemonsets`. `?window=30s` (default 30 s,
//! 5 s to 1 h, seconds/minutes/hours) is the window of every value. `/apis` (APIGroupList) and
//! `/apis/metrics.smi-spec.io` (APIGroup) answer too, so `kubectl get --raw` discovers the group.
//!
//! # Where the numbers come from
//!
//! The proxies' `trellis_request_total` and `trellis_request_duration_ms` (proxy/src/metrics.rs):
//! - an object's own metrics are what its proxies answered (`direction="inbound"`), selected by
//!   `destination_namespace`/`destination_kind`/`destination_workload` for workloads, by
//!   `destination_namespace` for namespaces;
//! - pods: the request series carry no pod label (cardinality), so pods are selected by the
//!   Prometheus *target* labels `kubernetes_namespace` and `kubernetes_pod`, which the shipped
//!   scrape configuration (deploy/flagger/prometheus.yaml) sets on every proxy's series. A
//!   Prometheus scraping the proxies some other way must set them too for pod metrics;
//! - edges come from the callers' proxies (`direction="outbound"`, which carries both ends):
//!   `to` edges are the object's own outbound series grouped by destination workload, `from`
//!   edges are everyone's outbound series whose destination is the object, grouped by source
//!   workload; `side` is `client` for both. A pod's edges are `to` edges only, toward
//!   workloads: no series names the pod a request went to. The callers' side names the
//!   destination's workload when the controller told the proxy one, else the backend Service
//!   (`kind: Service`).
//!
//! The five metrics over the window: `success_count` and `failure_count` (5xx) from `increase()`
//! rounded to whole requests, and `p50/p90/p99_response_latency` in `ms` from
//! `histogram_quantile` over the latency buckets (absent when no request ended in the window).
//!
//! # Errors
//!
//! Kubernetes `Status` objects: 404 for an unknown path or kind and for an object with no series
//! in the window, 400 for a bad window or name, 503 when Prometheus is unreachable, 500 when it
//! refuses a query.

pub mod prometheus;
mod route;

use std::collections::BTreeMap;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use trellis_smi::api::metrics::{
    API_VERSION, Direction, Edge, Metric, Side, TrafficMetrics, TrafficMetricsList, names,
};

pub use route::{Kind, Request, Target, Window};

use prometheus::QueryError;

/// The API group.
pub const GROUP: &str = "metrics.smi-spec.io";
/// The version.
pub const VERSION: &str = "v1alpha1";
/// The name of the APIService that registers the API with the Kubernetes API server.
pub const API_SERVICE: &str = "v1alpha1.metrics.smi-spec.io";
/// Every path of the API starts with this.
pub const PREFIX: &str = "/apis/metrics.smi-spec.io/v1alpha1";

/// Whether `path` is one this API answers (its group, its version, or the group list).
pub fn handles(path: &str) -> bool {
    path == "/apis"
        || path == "/apis/"
        || path == "/apis/metrics.smi-spec.io"
        || path
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An HTTP answer: status and JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
        }
    }

    /// A Kubernetes `Status` failure (`reason` as the API server spells it: `NotFound`,
    /// `BadRequest`, `ServiceUnavailable`, `InternalError`, `Unauthorized`, `Forbidden`).
    pub fn status(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message.into(),
                "reason": reason,
                "code": status.as_u16(),
            }),
        }
    }

    /// The answer of every path of the API when the controller has no `--prometheus`.
    pub fn not_configured(path: &str) -> Self {
        Self::status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "{path}: the TrafficMetrics API is off: start the controller with --prometheus http://HOST:PORT (the Prometheus that scrapes the proxies)"
            ),
        )
    }

    /// As an HTTP response (`application/json`).
    pub fn into_response(self) -> http::Response<Full<Bytes>> {
        let body = serde_json::to_vec_pretty(&self.body).unwrap_or_default();
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The API over one Prometheus.
#[derive(Clone, Debug)]
pub struct MetricsApi {
    /// `http://HOST:PORT`, resolved at every request (a Prometheus installed or moved after the
    /// controller started is found).
    prometheus: String,
}

impl MetricsApi {
    /// The API over the Prometheus at `url`; checks its form now (`http://HOST:PORT`), not that
    /// it answers.
    pub fn new(url: &str) -> Result<Self, QueryError> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(QueryError::Address {
                url: url.to_owned(),
                why: "expected http://HOST:PORT".into(),
            });
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(QueryError::Address {
                url: url.to_owned(),
                why: "expected http://HOST:PORT (with the port, no path)".into(),
            });
        }
        Ok(Self {
            prometheus: url.to_owned(),
        })
    }

    /// The Prometheus URL.
    pub fn prometheus(&self) -> &str {
        &self.prometheus
    }

    /// Answers `GET path?query`.
    pub async fn respond(&self, path: &str, query: Option<&str>) -> Answer {
        match Request::parse(path, query) {
            Ok(request) => self.answer(&request).await,
            Err(answer) => answer,
        }
    }

    /// Answers a parsed request.
    pub async fn answer(&self, request: &Request) -> Answer {
        match &request.target {
            Target::GroupList => Answer::ok(group_list()),
            Target::Group => Answer::ok(group()),
            Target::Discovery => Answer::ok(discovery()),
            _ => match self.metrics(request).await {
                Ok(answer) => answer,
                Err(error) if error.is_unreachable() => Answer::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    error.to_string(),
                ),
                Err(error) => Answer::status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    error.to_string(),
                ),
            },
        }
    }

    async fn metrics(&self, request: &Request) -> Result<Answer, QueryError> {
        let prometheus = prometheus::address(&self.prometheus)?;
        let now = Timestamp::now();
        let plans = plans(request);
        let mut found = Vec::new();
        for plan in &plans {
            let rows = fetch(prometheus, plan, &request.window).await?;
            found.push(rows);
        }
        Ok(build(request, &plans, &found, now))
    }
}

/// One grouping of series: the matchers, the labels that key a row, and what a row is.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// PromQL matchers (without braces).
    pub matchers: String,
    /// `sum by` labels: one row per distinct value set.
    pub group: Vec<&'static str>,
    /// For edges: their direction (`None`: the rows are the objects themselves).
    pub edge: Option<Direction>,
}

impl Plan {
    /// The five queries: total and failed requests, p50, p90, p99.
    pub fn queries(&self, window: &Window) -> [String; 5] {
        let (m, by, w) = (&self.matchers, self.group.join(","), window.promql());
        let quantile = |q: &str| {
            format!(
                "histogram_quantile({q}, sum by (le,{by}) (rate(trellis_request_duration_ms_bucket{{{m}}}[{w}])))"
            )
        };
        [
            format!("sum by ({by}) (increase(trellis_request_total{{{m}}}[{w}]))"),
            format!(
                "sum by ({by}) (increase(trellis_request_total{{{m},response_code=~\"5..\"}}[{w}]))"
            ),
            quantile("0.5"),
            quantile("0.9"),
            quantile("0.99"),
        ]
    }
}

/// What a row's five queries gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Values {
    pub total: f64,
    pub failures: f64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

/// Rows keyed by their group labels' values (in [`Plan::group`] order).
pub type Rows = BTreeMap<Vec<String>, Values>;

/// The label sets selecting a kind's series on one side.
struct Side3 {
    namespace: Option<&'static str>,
    kind: Option<&'static str>,
    name: &'static str,
}

const DESTINATION: Side3 = Side3 {
    namespace: Some("destination_namespace"),
    kind: Some("destination_kind"),
    name: "destination_workload",
};
const SOURCE: Side3 = Side3 {
    namespace: Some("source_namespace"),
    kind: Some("source_kind"),
    name: "source_workload",
};
const POD: Side3 = Side3 {
    namespace: Some("kubernetes_namespace"),
    kind: None,
    name: "kubernetes_pod",
};

/// How `kind` is found among series seen from `side` (the object as the destination of inbound
/// series, or as either end of outbound series).
fn side_of(kind: Kind, side: &Side3) -> Side3 {
    match kind {
        Kind::Pods => POD,
        Kind::Namespaces => Side3 {
            namespace: None,
            kind: None,
            name: side.namespace.unwrap_or("destination_namespace"),
        },
        _ => Side3 {
            namespace: side.namespace,
            kind: side.kind,
            name: side.name,
        },
    }
}

/// Matchers for `kind` on `side`, narrowed to a namespace and a name when given.
fn matchers(kind: Kind, side: &Side3, namespace: Option<&str>, name: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(label), Some(value)) = (side.kind, kind.workload_kind()) {
        out.push(format!("{label}=\"{value}\""));
    }
    if let (Some(label), Some(ns)) = (side.namespace, namespace) {
        out.push(format!("{label}=\"{ns}\""));
    }
    match name {
        Some(name) => out.push(format!("{}=\"{name}\"", side.name)),
        // Only series that name the object.
        None => out.push(format!("{}!=\"\"", side.name)),
    }
    out
}

fn group_of(side: &Side3) -> Vec<&'static str> {
    side.namespace.into_iter().chain([side.name]).collect()
}

/// The groupings a request needs (edges: `to` and, but for pods, `from`).
pub fn plans(request: &Request) -> Vec<Plan> {
    let join = |parts: Vec<String>| parts.join(",");
    match &request.target {
        Target::Object {
            kind,
            namespace,
            name,
        } => {
            let side = side_of(*kind, &DESTINATION);
            let mut m = vec!["direction=\"inbound\"".to_owned()];
            m.extend(matchers(*kind, &side, namespace.as_deref(), Some(name)));
            vec![Plan {
                matchers: join(m),
                group: group_of(&side),
                edge: None,
            }]
        }
        Target::List { kind, namespace } => {
            let side = side_of(*kind, &DESTINATION);
            let mut m = vec!["direction=\"inbound\"".to_owned()];
            m.extend(matchers(*kind, &side, namespace.as_deref(), None));
            vec![Plan {
                matchers: join(m),
                group: group_of(&side),
                edge: None,
            }]
        }
        Target::Edges {
            kind,
            namespace,
            name,
        } => {
            // Whole namespaces meet namespaces; anything else meets workloads.
            let peer = |side: &Side3| match kind {
                Kind::Namespaces => vec![side.namespace.unwrap_or_default()],
                _ => vec![
                    side.namespace.unwrap_or_default(),
                    side.kind.unwrap_or_default(),
                    side.name,
                ],
            };
            let outbound = "direction=\"outbound\"".to_owned();
            let mut to = vec![outbound.clone()];
            to.extend(matchers(
                *kind,
                &side_of(*kind, &SOURCE),
                namespace.as_deref(),
                Some(name),
            ));
            // Requests no route matched are not an edge to anything.
            to.push("destination_workload!=\"unknown\"".into());
            to.push("destination_workload!=\"\"".into());
            let mut plans = vec![Plan {
                matchers: join(to),
                group: peer(&DESTINATION),
                edge: Some(Direction::To),
            }];
            if *kind != Kind::Pods {
                let mut from = vec![outbound];
                from.extend(matchers(
                    *kind,
                    &side_of(*kind, &DESTINATION),
                    namespace.as_deref(),
                    Some(name),
                ));
                plans.push(Plan {
                    matchers: join(from),
                    group: peer(&SOURCE),
                    edge: Some(Direction::From),
                });
            }
            plans
        }
        Target::GroupList | Target::Group | Target::Discovery => Vec::new(),
    }
}

/// Runs a plan's five queries.
async fn fetch(
    prometheus: std::net::SocketAddr,
    plan: &Plan,
    window: &Window,
) -> Result<Rows, QueryError> {
    let [total, failures, p50, p90, p99] = plan.queries(window);
    let (total, failures, p50, p90, p99) = tokio::try_join!(
        prometheus::query(prometheus, &total),
        prometheus::query(prometheus, &failures),
        prometheus::query(prometheus, &p50),
        prometheus::query(prometheus, &p90),
        prometheus::query(prometheus, &p99),
    )?;
    Ok(rows(&plan.group, total, failures, [p50, p90, p99]))
}

/// Joins the five vectors into rows: a row per element of `total`.
pub fn rows(
    group: &[&str],
    total: Vec<(Value, f64)>,
    failures: Vec<(Value, f64)>,
    quantiles: [Vec<(Value, f64)>; 3],
) -> Rows {
    let key = |labels: &Value| -> Vec<String> {
        group
            .iter()
            .map(|l| labels[*l].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let mut rows: Rows = total
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(labels, v)| {
            (
                key(labels),
                Values {
                    total: *v,
                    ..Values::default()
                },
            )
        })
        .collect();
    for (labels, v) in failures {
        if let Some(row) = rows.get_mut(&key(&labels))
            && v.is_finite()
        {
            row.failures = v;
        }
    }
    for (i, vector) in quantiles.into_iter().enumerate() {
        for (labels, v) in vector {
            if let Some(row) = rows.get_mut(&key(&labels)) {
                let v = v.is_finite().then_some(v);
                match i {
                    0 => row.p50 = v,
                    1 => row.p90 = v,
                    _ => row.p99 = v,
                }
            }
        }
    }
    rows
}

/// A latency as a Quantity in ms: whole milliseconds, or thousandths (`12500m` = 12.5 ms).
pub fn milliseconds(ms: f64) -> Quantity {
    let thousandths = (ms * 1000.0).round();
    if thousandths % 1000.0 == 0.0 {
        Quantity(format!("{}", (thousandths / 1000.0) as i64))
    } else {
        Quantity(format!("{}m", thousandths as i64))
    }
}

/// The five metrics of a row.
pub fn metrics(values: &Values) -> Vec<Metric> {
    let mut out = Vec::new();
    for (name, v) in [
        (names::P50_RESPONSE_LATENCY, values.p50),
        (names::P90_RESPONSE_LATENCY, values.p90),
        (names::P99_RESPONSE_LATENCY, values.p99),
    ] {
        if let Some(v) = v {
            out.push(Metric {
                name: name.into(),
                unit: Some("ms".into()),
                value: milliseconds(v),
            });
        }
    }
    // increase() extrapolates to the window's edges: whole requests are what was meant.
    let failures = values.failures.round().max(0.0);
    let success = (values.total.round() - failures).max(0.0);
    for (name, v) in [
        (names::SUCCESS_COUNT, success),
        (names::FAILURE_COUNT, failures),
    ] {
        out.push(Metric {
            name: name.into(),
            unit: None,
            value: Quantity(format!("{}", v as i64)),
        });
    }
    out
}

fn reference(kind: &str, namespace: Option<&str>, name: &str) -> ObjectReference {
    ObjectReference {
        kind: Some(kind.to_owned()),
        namespace: namespace.filter(|ns| !ns.is_empty()).map(str::to_owned),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// The Kubernetes kind of a workload kind label (`deployment` -> `Deployment`).
pub fn kind_of_label(label: &str) -> String {
    match label {
        "deployment" => "Deployment".into(),
        "statefulset" => "StatefulSet".into(),
        "daemonset" => "DaemonSet".into(),
        "replicaset" => "ReplicaSet".into(),
        "service" => "Service".into(),
        "pod" => "Pod".into(),
        "job" => "Job".into(),
        "cronjob" => "CronJob".into(),
        other => {
            let mut chars = other.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default()
        }
    }
}

/// The answer of an object, list or edges request from its plans' rows.
pub fn build(request: &Request, plans: &[Plan], found: &[Rows], now: Timestamp) -> Answer {
    let window = request.window.text();
    let item = |resource: ObjectReference, values: &Values| {
        let mut m = TrafficMetrics::new(resource.clone(), Time(now), window.clone());
        m.metadata = ObjectMeta {
            name: resource.name.clone(),
            namespace: resource.namespace.clone(),
            creation_timestamp: Some(Time(now)),
            ..ObjectMeta::default()
        };
        m.metrics = metrics(values);
        m
    };
    let object = |kind: Kind, key: &[String]| -> ObjectReference {
        match key {
            [ns, name] => reference(kind.kind(), Some(ns), name),
            [name] => reference(kind.kind(), None, name),
            _ => reference(kind.kind(), None, ""),
        }
    };
    let list = |resource: Option<ObjectReference>, items: Vec<TrafficMetrics>| {
        let list = TrafficMetricsList {
            api_version: API_VERSION.into(),
            kind: "TrafficMetricsList".into(),
            metadata: ListMeta::default(),
            resource,
            items,
        };
        Answer::ok(serde_json::to_value(list).unwrap_or_default())
    };
    match &request.target {
        Target::Object {
            kind,
            namespace,
            name,
        } => match found.first().and_then(|rows| rows.iter().next()) {
            Some((key, values)) => Answer::ok(
                serde_json::to_value(item(object(*kind, key), values)).unwrap_or_default(),
            ),
            None => Answer::status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "trafficmetrics {} {:?}{}: no series in Prometheus over the last {window}",
                    kind.plural(),
                    name,
                    namespace
                        .as_ref()
                        .map(|ns| format!(" in namespace {ns:?}"))
                        .unwrap_or_default()
                ),
            ),
        },
        Target::List { kind, namespace } => {
            let items = found
                .iter()
                .flatten()
                .map(|(key, values)| item(object(*kind, key), values))
                .collect();
            let resource = ObjectReference {
                kind: Some(kind.kind().into()),
                namespace: namespace.clone(),
                ..ObjectReference::default()
            };
            list(Some(resource), items)
        }
        Target::Edges {
            kind,
            namespace,
            name,
        } => {
            let this = reference(kind.kind(), namespace.as_deref(), name);
            let mut items = Vec::new();
            for (plan, rows) in plans.iter().zip(found) {
                let direction = plan.edge.unwrap_or(Direction::To);
                for (key, values) in rows {
                    let peer = match key.as_slice() {
                        [ns, peer_kind, peer_name] => {
                            reference(&kind_of_label(peer_kind), Some(ns), peer_name)
                        }
                        [ns] => reference("Namespace", None, ns),
                        _ => continue,
                    };
                    let mut m = item(this.clone(), values);
                    m.edge = Some(Edge {
                        direction,
                        side: Side::Client,
                        resource: peer,
                    });
                    items.push(m);
                }
            }
            list(Some(this), items)
        }
        Target::GroupList | Target::Group | Target::Discovery => Answer::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "discovery has no metrics",
        ),
    }
}

/// `GET /apis`: the group list (this group only).
pub fn group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]})
}

/// `GET /apis/metrics.smi-spec.io`.
pub fn group() -> Value {
    let version = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [version.clone()],
        "preferredVersion": version,
    })
}

/// `GET /apis/metrics.smi-spec.io/v1alpha1`: the resources (each kind and its `edges`).
pub fn discovery() -> Value {
    let mut resources = Vec::new();
    for kind in Kind::ALL {
        resources.push(json!({
            "name": kind.plural(),
            "singularName": "",
            "namespaced": kind != Kind::Namespaces,
            "kind": "TrafficMetrics",
            "verbs": ["get", "list"],
        }));
        resources.push(json!({
            "name": format!("{}/edges", kind.plural()),
            "singularName": "",
            "namespaced": kind != Kind::Namespaces,
            "kind": "TrafficMetricsList",
            "verbs": ["get"],
        }));
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": resources,
    })
}

#[cfg(test)]
mod tests;
