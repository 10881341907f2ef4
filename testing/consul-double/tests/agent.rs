//! The local agent's service API as a host uses it: an agent service definition registered over
//! HTTP becomes an instance on the double's node, its HTTP, TCP and TTL checks run and move its
//! health, and deregistering removes it and stops its checks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::call;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use trellis_consul_double::{AgentConfig, ConsulDouble, DoubleConfig, SERF_HEALTH};

async fn double_on(node: &str, address: &str) -> ConsulDouble {
    ConsulDouble::start_with(DoubleConfig {
        agent: AgentConfig {
            node_name: node.into(),
            node_address: address.into(),
        },
        ..DoubleConfig::default()
    })
    .await
    .unwrap()
}

/// An HTTP server on loopback answering every request with the status in `status`; `hits`
/// counts the requests (the check runs) it got.
struct StatusServer {
    url: String,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU32>,
}

async fn status_server() -> StatusServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(200));
    let hits = Arc::new(AtomicU32::new(0));
    let (current, count) = (status.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let code = current.load(Ordering::SeqCst);
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = stream.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n\r\nok\n");
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    StatusServer {
        url: format!("http://{addr}/ready"),
        status,
        hits,
    }
}

async fn put(double: &ConsulDouble, path: &str, body: Option<Value>) -> support::Resp {
    call(double, "PUT", path, body, None).await
}

/// The statuses of the checks of the one instance of `service`, by check ID.
async fn checks(double: &ConsulDouble, service: &str) -> Vec<(String, String)> {
    let v = call(
        double,
        "GET",
        &format!("/v1/health/service/{service}"),
        None,
        None,
    )
    .await
    .json();
    v[0]["Checks"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|c| {
            (
                c["CheckID"].as_str().unwrap().to_owned(),
                c["Status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls until `service`'s check `id` has `status` (checks run on their own schedule).
async fn wait_for(double: &ConsulDouble, service: &str, id: &str, status: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = checks(double, service).await;
        if now.iter().any(|(c, s)| c == id && s == status) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} check {id} never became {status}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_agent_definition_becomes_an_instance_on_the_agent_node_with_running_checks() {
    let double = double_on("host-a", "10.1.2.3").await;
    let ready = status_server().await;
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let definition = json!({
        "ID": "web-1", "Name": "web", "Port": 15001,
        "Tags": ["version=v1"],
        "Meta": {"service-account": "web", "version": "v1"},
        "Checks": [
            {"Name": "proxy ready", "HTTP": ready.url, "Interval": "100ms", "Timeout": "1s"},
            {"Name": "app port", "TCP": app.local_addr().unwrap().to_string(), "Interval": "100ms"}
        ]
    });
    let r = put(&double, "/v1/agent/service/register", Some(definition)).await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));

    let health = call(&double, "GET", "/v1/health/service/web", None, None)
        .await
        .json();
    let entry = &health[0];
    assert_eq!(entry["Node"]["Node"], "host-a");
    assert_eq!(entry["Node"]["Address"], "10.1.2.3");
    assert_eq!(
        entry["Service"]["Address"], "",
        "no Address: clients use the node's, as with Consul"
    );
    assert_eq!(entry["Service"]["ID"], "web-1");
    assert_eq!(entry["Service"]["Port"], 15001);
    assert_eq!(entry["Service"]["Meta"]["service-account"], "web");
    assert_eq!(
        entry["Service"]["Weights"],
        json!({"Passing": 1, "Warning": 1})
    );
    assert_eq!(entry["Checks"][0]["CheckID"], SERF_HEALTH);
    assert_eq!(entry["Checks"][0]["Status"], "passing");

    // Numbered IDs (two checks), both passing once they ran.
    wait_for(&double, "web", "service:web-1:1", "passing").await;
    wait_for(&double, "web", "service:web-1:2", "passing").await;
    let output = double.check_status("host-a", "service:web-1:1").unwrap().1;
    assert!(output.contains(": 200 X Output: ok"), "{output}");

    // The HTTP check follows the answer: 429 warns, 503 fails, 200 passes again.
    ready.status.store(429, Ordering::SeqCst);
    wait_for(&double, "web", "service:web-1:1", "warning").await;
    ready.status.store(503, Ordering::SeqCst);
    wait_for(&double, "web", "service:web-1:1", "critical").await;
    ready.status.store(200, Ordering::SeqCst);
    wait_for(&double, "web", "service:web-1:1", "passing").await;
    // The TCP check fails when nothing listens any more.
    drop(app);
    wait_for(&double, "web", "service:web-1:2", "critical").await;

    // Deregistering removes the instance, its checks and their runs.
    let r = put(&double, "/v1/agent/service/deregister/web-1", None).await;
    assert_eq!(r.status, 200);
    let gone = call(&double, "GET", "/v1/health/service/web", None, None).await;
    assert_eq!(gone.body, "[]");
    // A run in flight may still land; after that the check no longer runs at all.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let hits = ready.hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        ready.hits.load(Ordering::SeqCst),
        hits,
        "the HTTP check of web-1 stopped with it"
    );
    let again = put(&double, "/v1/agent/service/deregister/web-1", None).await;
    assert_eq!(again.status, 404);
    assert!(again.body.contains("Unknown service ID"), "{}", again.body);
}

#[tokio::test]
async fn checks_start_critical_unless_a_status_is_given_and_ttl_checks_expire() {
    let double = double_on("host-b", "127.0.0.1").await;
    let r = put(
        &double,
        "/v1/agent/service/register",
        Some(json!({"Name": "db", "Port": 5432,
            "Check": {"CheckID": "db-ttl", "TTL": "300ms"}})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        checks(&double, "db").await[1],
        ("db-ttl".into(), "critical".into())
    );
    let r = put(&double, "/v1/agent/check/pass/db-ttl?note=alive", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        double.check_status("host-b", "db-ttl").unwrap(),
        ("passing".into(), "alive".into())
    );
    // Updates within the TTL keep it passing...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            put(&double, "/v1/agent/check/pass/db-ttl", None)
                .await
                .status,
            200
        );
        assert_eq!(
            double.check_status("host-b", "db-ttl").unwrap().0,
            "passing"
        );
    }
    // ...silence past it makes it critical.
    wait_for(&double, "db", "db-ttl", "critical").await;
    let (_, output) = double.check_status("host-b", "db-ttl").unwrap();
    assert!(output.starts_with("TTL expired"), "{output}");
    assert_eq!(
        put(&double, "/v1/agent/check/warn/db-ttl", None)
            .await
            .status,
        200
    );
    assert_eq!(
        double.check_status("host-b", "db-ttl").unwrap().0,
        "warning"
    );

    // A given initial status is kept until the first run; TTL updates of other checks refused.
    let r = put(
        &double,
        "/v1/agent/service/register",
        Some(json!({"Name": "cache", "Port": 6379,
            "Check": {"TCP": "127.0.0.1:1", "Interval": "1h", "Status": "passing"}})),
    )
    .await;
    assert_eq!(r.status, 200);
    wait_for(&double, "cache", "service:cache", "critical").await;
    let not_ttl = put(&double, "/v1/agent/check/pass/service:cache", None).await;
    assert_eq!(not_ttl.status, 500);
    assert!(
        not_ttl.body.contains("does not have associated TTL"),
        "{}",
        not_ttl.body
    );
    let unknown = put(&double, "/v1/agent/check/fail/nope", None).await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn re_registration_keeps_old_checks_unless_asked_to_replace_them() {
    let double = double_on("host-c", "127.0.0.1").await;
    let with = |checks: Value| json!({"ID": "api-1", "Name": "api", "Port": 80, "Checks": checks});
    let ttl = |id: &str| json!({"CheckID": id, "TTL": "1h"});
    let r = put(
        &double,
        "/v1/agent/service/register",
        Some(with(json!([ttl("a"), ttl("b")]))),
    )
    .await;
    assert_eq!(r.status, 200);
    put(
        &double,
        "/v1/agent/service/register",
        Some(with(json!([ttl("a")]))),
    )
    .await;
    let ids: Vec<String> = checks(&double, "api")
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ids, [SERF_HEALTH, "a", "b"]);
    put(
        &double,
        "/v1/agent/service/register?replace-existing-checks=true",
        Some(with(json!([ttl("a")]))),
    )
    .await;
    let ids: Vec<String> = checks(&double, "api")
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ids, [SERF_HEALTH, "a"]);
    assert_eq!(
        put(&double, "/v1/agent/check/pass/b", None).await.status,
        404
    );
}

#[tokio::test]
async fn bad_definitions_and_anonymous_writes_are_refused() {
    let double = double_on("host-d", "127.0.0.1").await;
    let cases = [
        (json!({"Port": 1}), "Missing service name"),
        (
            json!({"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}),
            "Interval must be > 0",
        ),
        (
            json!({"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "1s"}}),
            "does not run Args checks",
        ),
    ];
    for (body, expected) in cases {
        let r = put(&double, "/v1/agent/service/register", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(r.body.contains(expected), "{body}: {}", r.body);
    }
    assert_eq!(double.instance_count(), 0, "nothing half-registered");

    let acl = ConsulDouble::start_with(DoubleConfig {
        acl_token: Some("t0k".into()),
        ..DoubleConfig::default()
    })
    .await
    .unwrap();
    let body = json!({"Name": "web", "Port": 1});
    let anonymous = call(
        &acl,
        "PUT",
        "/v1/agent/service/register",
        Some(body.clone()),
        None,
    )
    .await;
    assert_eq!(
        (anonymous.status, anonymous.body.as_str()),
        (403, "Permission denied")
    );
    let allowed = call(
        &acl,
        "PUT",
        "/v1/agent/service/register",
        Some(body),
        Some("t0k"),
    )
    .await;
    assert_eq!(allowed.status, 200);
    // The agent takes writes without a leader, as Consul's local agent does.
    acl.set_leader(false);
    let r = call(
        &acl,
        "PUT",
        "/v1/agent/service/deregister/web",
        None,
        Some("t0k"),
    )
    .await;
    assert_eq!(r.status, 200);
}
