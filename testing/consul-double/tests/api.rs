//! The double's HTTP API as a client sees it: real requests over loopback with a plain HTTP/1.1
//! client, checking the behaviours the Consul adapter relies on.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::call;
use tokio::net::TcpStream;
use trellis_consul_double::{ConsulDouble, DoubleConfig};

fn instance(node: &str, id: &str, service: &str, port: u16) -> Value {
    json!({
        "Node": node, "Address": "10.0.0.1",
        "Service": {"ID": id, "Service": service, "Port": port, "Tags": ["version=v1", "edge"],
                    "Meta": {"service-account": "web-sa"}, "Weights": {"Passing": 10, "Warning": 1}},
        "Checks": [{"CheckID": format!("{id}-check"), "Name": "alive", "ServiceID": id, "Status": "passing"}]
    })
}

async fn register(double: &ConsulDouble, body: Value) {
    let r = call(double, "PUT", "/v1/catalog/register", Some(body), None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "true"));
}

#[tokio::test]
async fn health_service_returns_instances_with_node_fallback_checks_and_weights() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    let r = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-consul-knownleader"], "true");
    let v = r.json();
    let entry = &v[0];
    assert_eq!(entry["Node"]["Address"], "10.0.0.1");
    assert_eq!(
        entry["Service"]["Address"], "",
        "no service address: clients fall back to the node's"
    );
    assert_eq!(
        entry["Service"]["Weights"],
        json!({"Passing": 10, "Warning": 1})
    );
    assert_eq!(entry["Service"]["Meta"]["service-account"], "web-sa");
    assert_eq!(entry["Checks"][0]["Status"], "passing");
    let other_dc = call(&double, "GET", "/v1/health/service/web?dc=dc9", None, None).await;
    assert_eq!(
        (other_dc.status, other_dc.body.as_str()),
        (500, "No path to datacenter")
    );
    let same_dc = call(&double, "GET", "/v1/health/service/web?dc=dc1", None, None).await;
    assert_eq!(same_dc.status, 200);
    let unknown = call(&double, "GET", "/v1/health/service/nope", None, None).await;
    assert_eq!((unknown.status, unknown.body.as_str()), (200, "[]"));
    let catalog = call(&double, "GET", "/v1/catalog/services", None, None)
        .await
        .json();
    assert_eq!(catalog, json!({"web": ["edge", "version=v1"]}));
}

#[tokio::test]
async fn passing_filters_out_instances_with_any_non_passing_check() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    register(&double, instance("n2", "web-2", "web", 8080)).await;
    double
        .set_check_status("n2", "web-2-check", "warning")
        .unwrap();
    let all = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .json();
    let passing = call(
        &double,
        "GET",
        "/v1/health/service/web?passing=true",
        None,
        None,
    )
    .await
    .json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(passing.as_array().unwrap().len(), 1);
    assert_eq!(passing[0]["Service"]["ID"], "web-1");
}

#[tokio::test]
async fn blocking_query_wakes_on_a_change_to_its_service_only() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    let index = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .index();
    let path = format!("/v1/health/service/web?index={index}&wait=5s");
    let blocked = call(&double, "GET", &path, None, None);
    let writer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Another service's write must not wake the query...
        register(&double, instance("n9", "db-1", "db", 5432)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...a write to its own service does.
        register(&double, instance("n2", "web-2", "web", 8080)).await;
        Instant::now()
    };
    let (resp, written_at) = tokio::join!(blocked, writer);
    assert!(written_at.elapsed() < Duration::from_millis(500));
    assert!(resp.index() > index);
    assert_eq!(resp.json().as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn blocking_query_returns_the_same_index_after_wait_plus_jitter() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    let index = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .index();
    let start = Instant::now();
    let r = call(
        &double,
        "GET",
        &format!("/v1/health/service/web?index={index}&wait=320ms"),
        None,
        None,
    )
    .await;
    let took = start.elapsed();
    assert_eq!(r.index(), index);
    assert!(took >= Duration::from_millis(320), "{took:?}");
    assert!(
        took < Duration::from_millis(320 + 20 + 200),
        "wait/16 jitter at most: {took:?}"
    );
    let bad = call(
        &double,
        "GET",
        "/v1/health/service/web?index=1&wait=10",
        None,
        None,
    )
    .await;
    assert_eq!((bad.status, bad.body.as_str()), (400, "Invalid wait time"));
}

#[tokio::test]
async fn deregistering_the_last_instance_moves_the_index_forward() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    let before = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .index();
    let r = call(
        &double,
        "PUT",
        "/v1/catalog/deregister",
        Some(json!({"Node": "n1", "ServiceID": "web-1"})),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let after = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert!(after.index() > before);
    assert_eq!(after.body, "[]");
}

#[tokio::test]
async fn reset_index_releases_blocked_queries_with_a_lower_index() {
    let double = ConsulDouble::start().await.unwrap();
    for i in 0..5 {
        register(
            &double,
            instance(&format!("n{i}"), &format!("web-{i}"), "web", 8080),
        )
        .await;
    }
    let index = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .index();
    let path = format!("/v1/health/service/web?index={index}&wait=10s");
    let blocked = call(&double, "GET", &path, None, None);
    let reset = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        double.reset_index(2);
    };
    let (resp, ()) = tokio::join!(blocked, reset);
    assert_eq!(resp.index(), 2);
    double.report_zero_index(true);
    assert_eq!(
        call(&double, "GET", "/v1/health/service/web", None, None)
            .await
            .index(),
        0
    );
}

#[tokio::test]
async fn leader_loss_fails_consistent_reads_and_marks_stale_reads() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    double.set_leader(false);
    let r = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    let stale = call(&double, "GET", "/v1/health/service/web?stale", None, None).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.headers["x-consul-knownleader"], "false");
    double.set_leader(true);
    let r = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!(r.headers["x-consul-knownleader"], "true");
}

#[tokio::test]
async fn acl_default_deny_with_a_required_token() {
    let config = DoubleConfig {
        acl_token: Some("s3cr3t".into()),
        ..DoubleConfig::default()
    };
    let double = ConsulDouble::start_with(config).await.unwrap();
    let body = instance("n1", "web-1", "web", 8080);
    let anon_write = call(
        &double,
        "PUT",
        "/v1/catalog/register",
        Some(body.clone()),
        None,
    )
    .await;
    assert_eq!(
        (anon_write.status, anon_write.body.as_str()),
        (403, "Permission denied")
    );
    let ok = call(
        &double,
        "PUT",
        "/v1/catalog/register",
        Some(body),
        Some("s3cr3t"),
    )
    .await;
    assert_eq!(ok.status, 200);
    let wrong = call(&double, "GET", "/v1/health/service/web", None, Some("nope")).await;
    assert_eq!((wrong.status, wrong.body.as_str()), (403, "ACL not found"));
    let anon = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!((anon.status, anon.body.as_str()), (200, "[]"));
    assert_eq!(anon.headers["x-consul-results-filtered-by-acls"], "true");
    let by_param = call(
        &double,
        "GET",
        "/v1/health/service/web?token=s3cr3t",
        None,
        None,
    )
    .await;
    assert_eq!(by_param.json().as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn failure_injection_and_restart_at_the_same_port() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "web-1", "web", 8080)).await;
    double.fail_next(2, 503);
    assert_eq!(
        call(&double, "GET", "/v1/catalog/services", None, None)
            .await
            .status,
        503
    );
    assert_eq!(
        call(&double, "GET", "/v1/catalog/services", None, None)
            .await
            .status,
        503
    );
    assert_eq!(
        call(&double, "GET", "/v1/catalog/services", None, None)
            .await
            .status,
        200
    );

    double.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = TcpStream::connect(double.addr()).await;
    assert!(refused.is_err(), "a stopped double refuses connections");
    double.restart().await.unwrap();
    let r = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!(
        r.json().as_array().unwrap().len(),
        1,
        "the catalog survives a restart"
    );
}

#[tokio::test]
async fn invalid_registrations_say_what_is_wrong() {
    let double = ConsulDouble::start().await.unwrap();
    let r = call(
        &double,
        "PUT",
        "/v1/catalog/register",
        Some(json!({"Address": "10.0.0.1"})),
        None,
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (400, "Must provide node"));
    let bad_check = json!({"Node": "n1", "Address": "10.0.0.1",
        "Checks": [{"CheckID": "c", "ServiceID": "missing", "Status": "passing"}]});
    let r = call(
        &double,
        "PUT",
        "/v1/catalog/register",
        Some(bad_check),
        None,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.contains("Unknown service ID 'missing'"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_missing_service_blocks_until_it_appears_not_on_unrelated_writes() {
    let double = ConsulDouble::start().await.unwrap();
    register(&double, instance("n1", "old-1", "old", 8080)).await;
    let r = call(
        &double,
        "PUT",
        "/v1/catalog/deregister",
        Some(json!({"Node": "n1"})),
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let missing = call(&double, "GET", "/v1/health/service/web", None, None).await;
    let index = missing.index();
    let path = format!("/v1/health/service/web?index={index}&wait=5s");
    let blocked = call(&double, "GET", &path, None, None);
    let writer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        register(&double, instance("n9", "db-1", "db", 5432)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        register(&double, instance("n2", "web-1", "web", 8080)).await;
    };
    let (resp, ()) = tokio::join!(blocked, writer);
    assert!(resp.index() > index);
    assert_eq!(
        resp.json().as_array().unwrap().len(),
        1,
        "woken by its own registration, not by db's"
    );
}
