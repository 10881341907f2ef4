//! Paths, query text and the mapping of Prometheus vectors to TrafficMetrics, without a
//! Prometheus (the conformance test `traffic_metrics` runs them against a real one).

use super::*;
use serde_json::json;
use std::time::Duration;

fn parse(path: &str, query: Option<&str>) -> Request {
    Request::parse(path, query).unwrap_or_else(|a| panic!("{path}: {:?}", a.body))
}

#[test]
fn paths_parse_like_the_reference_implementation() {
    let deployment = parse(
        &format!("{PREFIX}/namespaces/test/deployments/podinfo"),
        None,
    );
    assert_eq!(
        deployment.target,
        Target::Object {
            kind: Kind::Deployments,
            namespace: Some("test".into()),
            name: "podinfo".into()
        }
    );
    assert_eq!(deployment.window, Window::DEFAULT);
    assert_eq!(
        deployment.access(),
        Some(("get", Kind::Deployments, Some("test")))
    );
    let list = parse(&format!("{PREFIX}/namespaces/test/pods"), Some("window=1m"));
    assert_eq!(
        list.target,
        Target::List {
            kind: Kind::Pods,
            namespace: Some("test".into())
        }
    );
    assert_eq!(list.window, Window(Duration::from_secs(60)));
    assert_eq!(list.access().map(|a| a.0), Some("list"));
    assert_eq!(
        parse(&format!("{PREFIX}/namespaces"), None).target,
        Target::List {
            kind: Kind::Namespaces,
            namespace: None
        }
    );
    assert_eq!(
        parse(&format!("{PREFIX}/namespaces/test/edges"), None).target,
        Target::Edges {
            kind: Kind::Namespaces,
            namespace: None,
            name: "test".into()
        }
    );
    assert!(matches!(
        parse(
            &format!("{PREFIX}/namespaces/t/statefulsets/db/edges"),
            None
        )
        .target,
        Target::Edges {
            kind: Kind::StatefulSets,
            ..
        }
    ));
    assert_eq!(
        parse(&format!("{PREFIX}/daemonsets"), None).target,
        Target::List {
            kind: Kind::DaemonSets,
            namespace: None
        }
    );
    assert_eq!(parse(PREFIX, None).target, Target::Discovery);
    assert_eq!(parse("/apis", None).target, Target::GroupList);
    assert!(handles(PREFIX) && handles("/apis") && !handles("/apis/other") && !handles("/metrics"));
}

#[test]
fn bad_paths_windows_and_names_are_statuses() {
    for (path, query, code, reason) in [
        (
            format!("{PREFIX}/namespaces/test/services/x"),
            None,
            404,
            "NotFound",
        ),
        (
            format!("{PREFIX}/namespaces/test/namespaces"),
            None,
            404,
            "NotFound",
        ),
        (
            format!("{PREFIX}/namespaces/a/pods/b/c/d"),
            None,
            404,
            "NotFound",
        ),
        (
            format!("{PREFIX}/namespaces/te\"st/pods"),
            None,
            400,
            "BadRequest",
        ),
        (
            format!("{PREFIX}/pods"),
            Some("window=1s"),
            400,
            "BadRequest",
        ),
        (
            format!("{PREFIX}/pods"),
            Some("window=2d"),
            400,
            "BadRequest",
        ),
        (
            format!("{PREFIX}/pods"),
            Some("window=30"),
            400,
            "BadRequest",
        ),
    ] {
        let answer = Request::parse(&path, query).unwrap_err();
        assert_eq!(answer.status.as_u16(), code, "{path} {query:?}");
        assert_eq!(answer.body["kind"], "Status");
        assert_eq!(answer.body["reason"], reason, "{path}");
        assert_eq!(answer.body["code"], code);
    }
    assert_eq!(Window::parse("1m30s").unwrap().text(), "90s");
}

#[test]
fn queries_select_the_objects_series() {
    let q = |path: &str| {
        let request = parse(&format!("{PREFIX}{path}"), None);
        plans(&request)
            .iter()
            .map(|p| p.queries(&request.window))
            .collect::<Vec<_>>()
    };
    let deployment = q("/namespaces/test/deployments/podinfo");
    assert_eq!(
        deployment[0][0],
        r#"sum by (destination_namespace,destination_workload) (increase(trellis_request_total{direction="inbound",destination_kind="deployment",destination_namespace="test",destination_workload="podinfo"}[30s]))"#
    );
    assert_eq!(
        deployment[0][1],
        r#"sum by (destination_namespace,destination_workload) (increase(trellis_request_total{direction="inbound",destination_kind="deployment",destination_namespace="test",destination_workload="podinfo",response_code=~"5.."}[30s]))"#
    );
    assert_eq!(
        deployment[0][4],
        r#"histogram_quantile(0.99, sum by (le,destination_namespace,destination_workload) (rate(trellis_request_duration_ms_bucket{direction="inbound",destination_kind="deployment",destination_namespace="test",destination_workload="podinfo"}[30s])))"#
    );
    let pod = q("/namespaces/test/pods/podinfo-1");
    assert!(
        pod[0][0].contains(
            r#"{direction="inbound",kubernetes_namespace="test",kubernetes_pod="podinfo-1"}"#
        ),
        "{}",
        pod[0][0]
    );
    let namespaces = q("/namespaces");
    assert!(
        namespaces[0][0].starts_with(r#"sum by (destination_namespace) (increase(trellis_request_total{direction="inbound",destination_namespace!=""}"#),
        "{}",
        namespaces[0][0]
    );
    let edges = q("/namespaces/test/deployments/loadtester/edges");
    assert_eq!(edges.len(), 2);
    assert!(
        edges[0][0].starts_with(r#"sum by (destination_namespace,destination_kind,destination_workload) (increase(trellis_request_total{direction="outbound",source_kind="deployment",source_namespace="test",source_workload="loadtester",destination_workload!="unknown",destination_workload!=""}"#),
        "{}",
        edges[0][0]
    );
    assert!(
        edges[1][0].starts_with(r#"sum by (source_namespace,source_kind,source_workload) (increase(trellis_request_total{direction="outbound",destination_kind="deployment",destination_namespace="test",destination_workload="loadtester"}"#),
        "{}",
        edges[1][0]
    );
    // A pod's edges: only where it called (no series names the pod called).
    let pod_edges = q("/namespaces/test/pods/p/edges");
    assert_eq!(pod_edges.len(), 1);
    assert!(pod_edges[0][0].contains(r#"kubernetes_pod="p""#));
}

fn sample(labels: Value, v: f64) -> (Value, f64) {
    (labels, v)
}

#[test]
fn vectors_become_traffic_metrics() {
    let request = parse(
        &format!("{PREFIX}/namespaces/test/deployments/podinfo"),
        None,
    );
    let plans = plans(&request);
    let labels = json!({"destination_namespace": "test", "destination_workload": "podinfo"});
    let rows = rows(
        &plans[0].group,
        vec![sample(labels.clone(), 200.4)],
        vec![sample(labels.clone(), 19.8)],
        [
            vec![sample(labels.clone(), 1.25)],
            vec![sample(labels.clone(), 4.0)],
            vec![sample(labels.clone(), f64::NAN)],
        ],
    );
    let now = Timestamp::from_second(1_700_000_000).unwrap();
    let answer = build(&request, &plans, &[rows], now);
    assert_eq!(answer.status, StatusCode::OK);
    let m: TrafficMetrics = serde_json::from_value(answer.body.clone()).unwrap();
    assert_eq!(m.kind, "TrafficMetrics");
    assert_eq!(m.api_version, "metrics.smi-spec.io/v1alpha1");
    assert_eq!(m.window, "30s");
    assert_eq!(m.resource.kind.as_deref(), Some("Deployment"));
    assert_eq!(m.resource.namespace.as_deref(), Some("test"));
    assert_eq!(m.resource.name.as_deref(), Some("podinfo"));
    let values: Vec<(String, String)> = m
        .metrics
        .iter()
        .map(|m| (m.name.clone(), m.value.0.clone()))
        .collect();
    assert_eq!(
        values,
        [
            ("p50_response_latency", "1250m"),
            ("p90_response_latency", "4"),
            ("success_count", "180"),
            ("failure_count", "20"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert_eq!(answer.body["timestamp"], "2023-11-14T22:13:20Z");

    // No series: 404 saying so.
    let none = build(&request, &plans, &[Rows::new()], now);
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(
        none.body["message"]
            .as_str()
            .unwrap()
            .contains("no series in Prometheus over the last 30s"),
        "{}",
        none.body
    );
}

#[test]
fn edges_name_the_other_end() {
    let request = parse(
        &format!("{PREFIX}/namespaces/test/deployments/loadtester/edges"),
        None,
    );
    let plans = plans(&request);
    let to = json!({"destination_namespace": "test", "destination_kind": "service", "destination_workload": "podinfo-canary"});
    let from = json!({"source_namespace": "web", "source_kind": "deployment", "source_workload": "frontend"});
    let to_rows = rows(
        &plans[0].group,
        vec![sample(to, 10.0)],
        vec![],
        [vec![], vec![], vec![]],
    );
    let from_rows = rows(
        &plans[1].group,
        vec![sample(from, 3.0)],
        vec![],
        [vec![], vec![], vec![]],
    );
    let answer = build(&request, &plans, &[to_rows, from_rows], Timestamp::now());
    let list: TrafficMetricsList = serde_json::from_value(answer.body).unwrap();
    assert_eq!(list.kind, "TrafficMetricsList");
    assert_eq!(list.items.len(), 2);
    let to = list.items[0].edge.as_ref().unwrap();
    assert_eq!(to.direction, Direction::To);
    assert_eq!(to.side, Side::Client);
    assert_eq!(to.resource.kind.as_deref(), Some("Service"));
    assert_eq!(to.resource.name.as_deref(), Some("podinfo-canary"));
    let from = list.items[1].edge.as_ref().unwrap();
    assert_eq!(from.direction, Direction::From);
    assert_eq!(from.resource.kind.as_deref(), Some("Deployment"));
    assert_eq!(from.resource.namespace.as_deref(), Some("web"));
    assert_eq!(list.items[1].resource.name.as_deref(), Some("loadtester"));
    assert_eq!(
        list.items[1].metrics.len(),
        2,
        "no latency without requests"
    );
}

#[test]
fn discovery_lists_every_kind() {
    let d = discovery();
    assert_eq!(d["groupVersion"], "metrics.smi-spec.io/v1alpha1");
    let names: Vec<&str> = d["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for kind in Kind::ALL {
        assert!(names.contains(&kind.plural()));
        assert!(names.contains(&format!("{}/edges", kind.plural()).as_str()));
    }
    assert_eq!(group_list()["groups"][0]["name"], GROUP);
}

#[test]
fn latencies_are_milliseconds() {
    assert_eq!(milliseconds(60.0).0, "60");
    assert_eq!(milliseconds(0.5).0, "500m");
    assert_eq!(milliseconds(97.5005).0, "97501m");
}

#[tokio::test]
async fn an_unreachable_prometheus_is_a_503_status() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let api = MetricsApi::new(&format!("http://{port}")).unwrap();
    let answer = api
        .respond(&format!("{PREFIX}/namespaces/test/deployments/x"), None)
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body["reason"], "ServiceUnavailable");
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap()
            .contains(&port.to_string())
    );
    // Discovery needs no Prometheus.
    assert_eq!(api.respond(PREFIX, None).await.status, StatusCode::OK);
    assert!(MetricsApi::new("http://prometheus").is_err());
    assert!(MetricsApi::new("https://prometheus:9090").is_err());
    assert_eq!(Answer::not_configured("/x").status, StatusCode::NOT_FOUND);
}
