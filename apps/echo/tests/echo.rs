//! The echo app against itself on loopback: counts per caller and path, reset, and the call
//! endpoint driving another echo over one keep-alive connection.

use std::collections::BTreeMap;

use trellis_echo::client::{self, CallPlan, CallReport};
use trellis_echo::echo::{Counts, EchoServer, Identity};

async fn echo(service: &str, version: &str) -> EchoServer {
    EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Identity {
            service: service.into(),
            version: version.into(),
        },
    )
    .await
    .unwrap()
}

fn plan(url: String, count: u32, caller: &str) -> CallPlan {
    CallPlan {
        url,
        count,
        method: "GET".into(),
        caller: Some(caller.into()),
        headers: BTreeMap::new(),
        proxy: None,
        timeout_ms: None,
        concurrency: None,
    }
}

async fn counts(server: &EchoServer) -> Counts {
    let report_url = format!("http://{}/_echo/counts", server.addr());
    let body = reqwest_like_get(&report_url).await;
    serde_json::from_slice(&body).unwrap()
}

/// A plain GET without the echo client, so the test does not trust the code under test.
async fn reqwest_like_get(url: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str())
        .await
        .unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        uri.path()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    response[split + 4..].to_vec()
}

#[tokio::test]
async fn counts_per_caller_and_path_over_one_connection() {
    let web = echo("web", "v2").await;
    let report = client::run(&plan(
        format!("http://{}/hello", web.addr()),
        25,
        "client-a",
    ))
    .await
    .unwrap();
    assert!(report.fastest_ms.is_some() && report.slowest_ms >= report.fastest_ms);
    assert_eq!(
        report,
        CallReport {
            statuses: BTreeMap::from([(200, 25)]),
            by_responder: BTreeMap::from([("web/v2".into(), 25)]),
            mesh_errors: BTreeMap::new(),
            failed: 0,
            reconnects: 0,
            retry_after: BTreeMap::new(),
            fastest_ms: report.fastest_ms,
            slowest_ms: report.slowest_ms,
        }
    );
    client::run(&plan(format!("http://{}/other", web.addr()), 5, "client-b"))
        .await
        .unwrap();
    let seen = counts(&web).await;
    assert_eq!(seen.total, 30);
    assert_eq!(
        seen.by_caller,
        BTreeMap::from([("client-a".into(), 25), ("client-b".into(), 5)])
    );
    assert_eq!(
        seen.by_path,
        BTreeMap::from([("/hello".into(), 25), ("/other".into(), 5)])
    );
}

#[tokio::test]
async fn reset_zeroes_counts() {
    let web = echo("web", "v1").await;
    client::run(&plan(format!("http://{}/x", web.addr()), 3, "a"))
        .await
        .unwrap();
    assert_eq!(counts(&web).await.total, 3);
    let mut reset = plan(format!("http://{}/_echo/reset", web.addr()), 1, "a");
    reset.method = "POST".into();
    let report = client::run(&reset).await.unwrap();
    assert_eq!(report.statuses, BTreeMap::from([(200, 1)]));
    assert_eq!(counts(&web).await, Counts::default());
}

#[tokio::test]
async fn call_endpoint_drives_another_app() {
    let caller = echo("client", "v1").await;
    let callee = echo("web", "v1").await;
    // Ask `caller` (over HTTP, as the harness does) to call `callee` 7 times.
    let body = serde_json::to_string(&plan(format!("http://{}/echo", callee.addr()), 7, "client"))
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(caller.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "POST /_echo/call HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let report: CallReport = serde_json::from_slice(&response[split + 4..]).unwrap();
    assert_eq!(report.by_responder, BTreeMap::from([("web/v1".into(), 7)]));
    assert_eq!(
        counts(&callee).await.by_caller,
        BTreeMap::from([("client".into(), 7)])
    );
    // The call endpoint itself is not counted as traffic to `caller`.
    assert_eq!(counts(&caller).await.total, 0);
}

#[tokio::test]
async fn unreachable_target_counts_failures_not_errors() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let report = client::run(&plan(format!("http://127.0.0.1:{port}/"), 3, "a"))
        .await
        .unwrap();
    assert_eq!(report.failed, 3);
    assert!(report.statuses.is_empty());
}

#[tokio::test]
async fn fail_every_fails_each_nth_request_of_the_instance_until_reset() {
    let web = echo("web", "v1").await;
    let url = format!("http://{}/x?fail_every=2", web.addr());
    // Two callers on their own connections share the instance's count: 3 + 3 requests, the
    // 2nd, 4th and 6th fail.
    let first = client::run(&plan(url.clone(), 3, "a")).await.unwrap();
    let second = client::run(&plan(url.clone(), 3, "b")).await.unwrap();
    assert_eq!(first.statuses, BTreeMap::from([(200, 2), (503, 1)]));
    assert_eq!(second.statuses, BTreeMap::from([(200, 1), (503, 2)]));
    // The failures still say who answered.
    assert_eq!(second.by_responder, BTreeMap::from([("web/v1".into(), 3)]));
    let mut reset = plan(format!("http://{}/_echo/reset", web.addr()), 1, "a");
    reset.method = "POST".into();
    client::run(&reset).await.unwrap();
    let after = client::run(&plan(url, 1, "a")).await.unwrap();
    assert_eq!(
        after.statuses,
        BTreeMap::from([(200, 1)]),
        "the count starts over"
    );
    let failing = client::run(&plan(
        format!("http://{}/x?fail_version=v1", web.addr()),
        2,
        "a",
    ))
    .await
    .unwrap();
    assert_eq!(failing.statuses, BTreeMap::from([(503, 2)]));
}

#[tokio::test]
async fn concurrent_lanes_send_at_once_and_add_up() {
    let web = echo("web", "v1").await;
    let mut slow = plan(format!("http://{}/x?delay_ms=400", web.addr()), 5, "a");
    slow.concurrency = Some(5);
    let started = std::time::Instant::now();
    let report = client::run(&slow).await.unwrap();
    let took = started.elapsed();
    assert_eq!(report.statuses, BTreeMap::from([(200, 5)]));
    assert_eq!(
        report.reconnects, 0,
        "one connection per lane, none reopened"
    );
    assert!(report.fastest_ms >= Some(400), "{report:?}");
    // One after another would take 2 s.
    assert!(took < std::time::Duration::from_millis(1600), "{took:?}");
    assert_eq!(counts(&web).await.total, 5);
}
