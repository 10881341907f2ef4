//! `metrics.smi-spec.io/v1alpha1` TrafficMetrics and TrafficMetricsList.
//!
//! These are responses of an aggregated API (registered with an APIService), not CRDs: the
//! controller serves them at `/apis/metrics.smi-spec.io/v1alpha1/...` for pods, deployments,
//! services, trafficsplits and so on, so they carry `apiVersion`/`kind` as plain fields instead of
//! implementing `kube::Resource` (their URL depends on the resource kind asked about).

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Time};
use serde::{Deserialize, Serialize};

/// `apiVersion` of every TrafficMetrics object.
pub const API_VERSION: &str = "metrics.smi-spec.io/v1alpha1";

/// Metric names the spec defines.
pub mod names {
    pub const P50_RESPONSE_LATENCY: &str = "p50_response_latency";
    pub const P90_RESPONSE_LATENCY: &str = "p90_response_latency";
    pub const P99_RESPONSE_LATENCY: &str = "p99_response_latency";
    pub const SUCCESS_COUNT: &str = "success_count";
    pub const FAILURE_COUNT: &str = "failure_count";
}

/// Traffic metrics of one resource (or one edge of it) over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMetrics {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub timestamp: Time,
    /// The window the counts cover, as a Go duration (`30s`).
    pub window: String,
    pub resource: ObjectReference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<Edge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

impl TrafficMetrics {
    /// An empty TrafficMetrics object for `resource` at `timestamp` over `window`.
    pub fn new(resource: ObjectReference, timestamp: Time, window: impl Into<String>) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: "TrafficMetrics".to_owned(),
            metadata: ObjectMeta::default(),
            timestamp,
            window: window.into(),
            resource,
            edge: None,
            backend: None,
            metrics: Vec::new(),
        }
    }
}

/// Which way traffic flows relative to the resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    To,
    From,
}

/// Which proxy observed the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Server,
}

/// The other end of an edge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub direction: Direction,
    pub side: Side,
    pub resource: ObjectReference,
}

/// For TrafficSplit metrics: which backend of which apex service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub apex: String,
    pub name: String,
    pub weight: i64,
}

/// One metric value (`unit` is `ms` for latencies, absent for counts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub value: Quantity,
}

/// A list of TrafficMetrics, as returned by list and `/edges` requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficMetricsList {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ListMeta,
    /// The resource the list was asked about (for `/edges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ObjectReference>,
    pub items: Vec<TrafficMetrics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example object of the SMI traffic-metrics spec.
    #[test]
    fn spec_example_round_trips() {
        let yaml = r#"
apiVersion: metrics.smi-spec.io/v1alpha1
kind: TrafficMetrics
resource:
  name: foo-775b9cbd88-ntxsl
  namespace: foobar
  kind: Pod
edge:
  direction: to
  side: client
  resource:
    name: baz-577db7d977-lsk2q
    namespace: foobar
    kind: Pod
timestamp: 2019-04-08T22:25:55Z
window: 30s
metrics:
- name: p99_response_latency
  unit: ms
  value: 10m
- name: success_count
  value: "100"
"#;
        let metrics: TrafficMetrics = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(metrics.edge.as_ref().unwrap().direction, Direction::To);
        assert_eq!(metrics.metrics[0].value, Quantity("10m".into()));
        let again: TrafficMetrics =
            serde_json::from_value(serde_json::to_value(&metrics).unwrap()).unwrap();
        assert_eq!(again, metrics);
        let list = TrafficMetricsList {
            api_version: API_VERSION.into(),
            kind: "TrafficMetricsList".into(),
            metadata: ListMeta::default(),
            resource: Some(metrics.resource.clone()),
            items: vec![metrics],
        };
        let text = serde_json::to_string(&list).unwrap();
        assert_eq!(
            serde_json::from_str::<TrafficMetricsList>(&text).unwrap(),
            list
        );
    }
}
