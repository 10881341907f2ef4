//! Outbound HTTP through a real proxy to real hyper apps: HTTP/1.1, h2c, gRPC, WebSocket
//! upgrade, TCP, splits, route matches, config swaps on open connections, endpoint removal,
//! admin endpoints, and the inbound policy.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::config::Config;

fn yaml(destinations: &str) -> String {
    format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\nworkload: {{kind: deployment, name: client, namespace: shop}}\ndestinations:\n{destinations}"
    )
}

#[tokio::test]
async fn http1_keep_alive_routes_by_host_in_every_spelling() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    for host in [
        "echo.default",
        "echo.default:80",
        "echo.default.svc.cluster.local",
        "echo.default.svc.cluster.local.:9091",
        "ECHO.default",
    ] {
        let (status, app, body) = client.get(host, "/").await;
        assert_eq!(
            (status, app.as_str(), body.as_str()),
            (StatusCode::OK, "v1", "v1"),
            "{host}"
        );
    }
    // Absolute-form (the app uses the proxy as its HTTP proxy).
    let req = Request::get("http://echo.default/x")
        .header("host", "echo.default")
        .body(full(""))
        .unwrap();
    let resp = client.send(req).await;
    assert_eq!(
        resp.headers()["x-seen-host"],
        "echo.default",
        "Host passes through unchanged"
    );
    assert_eq!(read(resp).await.1, "v1");
    // Unknown destinations get a clear answer, on the same connection.
    let (status, reason, body) = client.get("nope.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::BAD_GATEWAY, "unknown-destination")
    );
    assert!(body.contains("nope.default"), "{body}");
    let (status, reason, _) = client.get("bad host!", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::BAD_REQUEST, "invalid-authority")
    );
    assert_eq!(v1.hits(), 6);
}

#[tokio::test]
async fn chunked_bodies_stream_both_ways() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let (tx, body) = {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>(4);
        (
            tx,
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
                .boxed(),
        )
    };
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let req = Request::post("/echo")
        .header("host", "echo.default")
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move {
        for chunk in ["one,", "two,", "three"] {
            tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(chunk))))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(tx);
    });
    let resp = client.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    send.await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"one,two,three");
}

#[tokio::test]
async fn h2c_clients_reach_h2c_upstreams_and_http1_clients_stay_http1() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let mut h2 = h2(proxy.http.unwrap()).await;
    for _ in 0..3 {
        let req = Request::get("http://echo.default/").body(full("")).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(
            resp.headers()["x-seen-version"],
            "HTTP/2.0",
            "not translated needlessly"
        );
        assert_eq!(
            resp.headers()["x-seen-host"],
            "",
            "an h2 upstream gets one authority, `:authority`, and no `host` beside it that \
             could differ (RFC 9113 8.3.1; strict servers refuse the pair)"
        );
        assert_eq!(read(resp).await.2, "v1");
    }
    let mut h1 = H1::connect(proxy.http.unwrap()).await;
    let resp = h1
        .send(
            Request::get("/")
                .header("host", "echo.default")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/1.1");
}

#[tokio::test]
async fn http2_destinations_get_h2c_whatever_the_client_speaks() {
    let v1 = app("v1").await;
    let dest = destination("echo.default", &[("v1", 1, &[v1.addr])])
        .replace("    backends:", "    protocol: http2\n    backends:");
    let proxy = proxy(&yaml(&dest)).await;
    let mut h1 = H1::connect(proxy.http.unwrap()).await;
    let resp = h1
        .send(
            Request::get("/")
                .header("host", "echo.default")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
}

#[tokio::test]
async fn grpc_unary_and_bidi_streaming_with_trailers() {
    use common::echo::EchoMessage;
    use common::echo::echo_client::EchoClient;
    let grpc = grpc_app("g1").await;
    let yaml = format!(
        "outbound:\n  ports:\n    - listen: 127.0.0.1:0\n      destination: grpc.default\ndestinations:\n  - authority: grpc.default\n    protocol: http2\n    backends:\n      - name: g1\n        endpoints: [{{address: \"{grpc}\"}}]\n"
    );
    let proxy = proxy(&yaml).await;
    let mut client = EchoClient::connect(format!("http://{}", proxy.ports[0]))
        .await
        .unwrap();
    let reply = client
        .unary(EchoMessage { text: "hi".into() })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().text, "g1:hi");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        // One at a time: each reply must arrive before the next message is sent (true streaming).
        tx.send(EchoMessage {
            text: format!("m{i}"),
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.text, format!("g1:m{i}"));
    }
    drop(tx);
    // The stream ends with the server's trailers (grpc-status 0), not an error.
    assert!(replies.message().await.unwrap().is_none());
    assert!(
        replies
            .trailers()
            .await
            .unwrap()
            .is_some_and(|t| t.get("grpc-status").is_some_and(|s| s == "0"))
    );
}

#[tokio::test]
async fn websocket_upgrade_carries_bytes_both_ways() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let mut stream = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: echo.default\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for msg in [&b"\x81\x05hello"[..], b"\x81\x05again"] {
        stream.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn opaque_tcp_ports_forward_bytes_and_split_per_connection() {
    // Raw TCP echo servers that greet with their name.
    async fn tcp_echo(name: &'static str) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    s.write_all(name.as_bytes()).await.unwrap();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }
    let a = tcp_echo("aaaa").await;
    let b = tcp_echo("bbbb").await;
    let yaml = format!(
        "outbound:\n  ports:\n    - listen: 127.0.0.1:0\n      destination: db.default\ndestinations:\n  - authority: db.default\n    protocol: tcp\n    backends:\n      - name: a\n        weight: 1\n        endpoints: [{{address: \"{a}\"}}]\n      - name: b\n        weight: 1\n        endpoints: [{{address: \"{b}\"}}]\n"
    );
    let proxy = proxy(&yaml).await;
    let mut seen = HashMap::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(proxy.ports[0]).await.unwrap();
        let mut greeting = [0u8; 4];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        *seen.entry(greeting).or_insert(0) += 1;
    }
    assert_eq!(seen.get(b"aaaa"), Some(&5), "{seen:?}");
    assert_eq!(seen.get(b"bbbb"), Some(&5), "{seen:?}");
}

async fn split_counts(weights: (u32, u32)) -> (usize, usize) {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", weights.0, &[v1.addr]), ("v2", weights.1, &[v2.addr])],
    )))
    .await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let (mut n1, mut n2) = (0, 0);
    for _ in 0..1000 {
        match client.get("echo.default", "/").await.1.as_str() {
            "v1" => n1 += 1,
            "v2" => n2 += 1,
            other => panic!("unexpected answer {other}"),
        }
    }
    assert_eq!(
        (n1, n2),
        (v1.hits(), v2.hits()),
        "exactly one upstream request per request"
    );
    (n1, n2)
}

#[tokio::test]
async fn split_one_to_zero_sends_nothing_to_the_zero_weight() {
    assert_eq!(split_counts((1, 0)).await, (1000, 0));
}

#[tokio::test]
async fn split_zero_to_one_sends_nothing_to_the_zero_weight() {
    assert_eq!(split_counts((0, 1)).await, (0, 1000));
}

#[tokio::test]
async fn split_75_25_per_request_on_one_connection() {
    let (n1, n2) = split_counts((75, 25)).await;
    assert!((700..=800).contains(&n1), "75:25 split gave {n1}:{n2}");
    assert_eq!(n1 + n2, 1000);
}

#[tokio::test]
async fn routes_match_by_path_method_and_header_else_root() {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let mut dest = destination(
        "echo.default",
        &[("v1", 1, &[v1.addr]), ("v2", 0, &[v2.addr])],
    );
    dest = dest.replace(
        "    backends:\n",
        "    routes:\n      - name: api\n        path_regex: \"/api/.*\"\n        methods: [GET]\n        headers: {x-user: \"beta.*\"}\n        backends: [{name: v2, weight: 1}]\n    backends:\n",
    );
    let proxy = proxy(&yaml(&dest)).await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let mut ask = async |method: &str, path: &str, user: Option<&str>| {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "echo.default");
        if let Some(u) = user {
            req = req.header("X-User", u);
        }
        read(client.send(req.body(full("")).unwrap()).await).await.1
    };
    assert_eq!(ask("GET", "/api/items", Some("beta-1")).await, "v2");
    assert_eq!(
        ask("GET", "/api/items?q=1", Some("beta-1")).await,
        "v2",
        "query string is not part of the path"
    );
    assert_eq!(
        ask("POST", "/api/items", Some("beta-1")).await,
        "v1",
        "method must match"
    );
    assert_eq!(
        ask("GET", "/web/api/items", Some("beta-1")).await,
        "v1",
        "path regex is anchored"
    );
    assert_eq!(
        ask("GET", "/api/items", Some("alpha")).await,
        "v1",
        "header must match"
    );
    assert_eq!(
        ask("GET", "/api/items", None).await,
        "v1",
        "missing header does not match"
    );
}

#[tokio::test]
async fn config_swap_applies_to_an_open_connection_within_100ms() {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let before = yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr]), ("v2", 0, &[v2.addr])],
    ));
    let after = yaml(&destination(
        "echo.default",
        &[("v1", 0, &[v1.addr]), ("v2", 1, &[v2.addr])],
    ));
    let proxy = proxy(&before).await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    assert_eq!(client.get("echo.default", "/").await.1, "v1");
    let swapped = Instant::now();
    proxy
        .shared
        .routes
        .apply(Config::parse(&after, std::path::Path::new("t.yaml")).unwrap())
        .unwrap();
    let answer = client.get("echo.default", "/").await.1;
    let elapsed = swapped.elapsed();
    assert_eq!(
        answer, "v2",
        "the next request on the same connection follows the new split"
    );
    assert!(elapsed < Duration::from_millis(100), "took {elapsed:?}");
}

#[tokio::test]
async fn file_edits_reload_atomically_and_bad_edits_keep_the_old_config() {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let good = yaml(&destination("echo.default", &[("v1", 1, &[v1.addr])]));
    std::fs::write(&path, &good).unwrap();
    let proxy = proxy(&good).await;
    tokio::spawn(trellis_proxy::reload::watch_file(
        proxy.shared.clone(),
        path.clone(),
        proxy.shutdown_signal(),
    ));
    let mut client = H1::connect(proxy.http.unwrap()).await;
    assert_eq!(client.get("echo.default", "/").await.1, "v1");

    std::fs::write(&path, good.replace("weight: 1", "weight: [").as_bytes()).unwrap();
    tokio::time::sleep(trellis_proxy::reload::POLL_INTERVAL * 3).await;
    assert_eq!(
        client.get("echo.default", "/").await.1,
        "v1",
        "bad edit ignored"
    );
    let err = trellis_proxy::config::Config::load(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.yaml:"), "{err}");

    std::fs::write(
        &path,
        yaml(&destination("echo.default", &[("v2", 1, &[v2.addr])])),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get("echo.default", "/").await.1 != "v2" {
        assert!(Instant::now() < deadline, "good edit not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn endpoint_removal_fails_no_request_and_in_flight_requests_finish() {
    let a = app("a").await;
    let b = app("b").await;
    let both = yaml(
        &destination("echo.default", &[("web", 1, &[a.addr, b.addr])])
            .replace("    backends:", "    balancer: round_robin\n    backends:"),
    );
    let only_b = yaml(&destination("echo.default", &[("web", 1, &[b.addr])]));
    let proxy = proxy(&both).await;
    let addr = proxy.http.unwrap();
    // Slow requests in flight on `a` and `b` while `a` is removed.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(tokio::spawn(async move {
            H1::connect(addr).await.get("echo.default", "/slow").await
        }));
    }
    let load = tokio::spawn(async move {
        let mut client = H1::connect(addr).await;
        let mut answers = Vec::new();
        for _ in 0..200 {
            answers.push(client.get("echo.default", "/").await);
        }
        answers
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy
        .shared
        .routes
        .apply(Config::parse(&only_b, std::path::Path::new("t.yaml")).unwrap())
        .unwrap();
    let hits_a_at_swap = a.hits();
    for s in slow {
        let (status, _, _) = s.await.unwrap();
        assert_eq!(status, StatusCode::OK, "in-flight request finished");
    }
    let answers = load.await.unwrap();
    assert!(
        answers.iter().all(|(s, _, _)| *s == StatusCode::OK),
        "no failed request"
    );
    let mut client = H1::connect(addr).await;
    for _ in 0..20 {
        assert_eq!(client.get("echo.default", "/").await.1, "b");
    }
    assert!(
        a.hits() <= hits_a_at_swap + 1,
        "a got requests after removal"
    );
}

#[tokio::test]
async fn a_weighted_backend_without_endpoints_gives_its_share_to_the_other() {
    // A Flagger rollback: the canary (90 here) lost its endpoints in the same tick as (or before)
    // its weight went to 0; the primary takes every request, none fails.
    let primary = app("primary").await;
    let dests = destination(
        "podinfo.test",
        &[("canary", 90, &[]), ("primary", 10, &[primary.addr])],
    );
    let proxy = proxy(&yaml(&dests)).await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    for _ in 0..50 {
        let (status, app, _) = client.get("podinfo.test", "/").await;
        assert_eq!((status, app.as_str()), (StatusCode::OK, "primary"));
    }
    assert_eq!(primary.hits(), 50);
}

#[tokio::test]
async fn outlier_detection_ejects_a_dead_endpoint_and_tries_it_again_after_the_ejection_time() {
    let (a, b) = (app("a").await, app("b").await);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dests = destination("echo.default", &[("v1", 1, &[a.addr, b.addr, dead])]).replace(
        "  - authority: echo.default\n",
        "  - authority: echo.default\n    balancer: round_robin\n    policy: {outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 500ms, maxEjectedPercent: 34}}\n",
    );
    let ejecting = proxy(&yaml(&dests)).await;
    let mut client = H1::connect(ejecting.http.unwrap()).await;
    let mut failed = 0;
    for _ in 0..60 {
        let (status, reason, _) = client.get("echo.default", "/").await;
        if status != StatusCode::OK {
            assert_eq!(
                (status, reason.as_str()),
                (StatusCode::BAD_GATEWAY, "connect-failed")
            );
            failed += 1;
        }
    }
    assert_eq!(
        failed, 2,
        "two failures in a row eject it, then no request reaches it"
    );
    assert_eq!(a.hits() + b.hits(), 58);
    // Back after the ejection time: tried again (and out again, now for twice as long).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut failed_after = 0;
    for _ in 0..30 {
        if client.get("echo.default", "/").await.0 != StatusCode::OK {
            failed_after += 1;
        }
    }
    assert_eq!(
        failed_after, 2,
        "it came back, failed twice, and went out again"
    );
    // Without outlier_detection the dead endpoint keeps its third of the requests.
    let plain = proxy(&yaml(
        &destination("echo.default", &[("v1", 1, &[a.addr, b.addr, dead])]).replace(
            "  - authority: echo.default\n",
            "  - authority: echo.default\n    balancer: round_robin\n",
        ),
    ))
    .await;
    let mut client = H1::connect(plain.http.unwrap()).await;
    let mut failed = 0;
    for _ in 0..30 {
        if client.get("echo.default", "/").await.0 != StatusCode::OK {
            failed += 1;
        }
    }
    assert_eq!(failed, 10);
}

#[tokio::test]
async fn no_endpoints_and_no_backends_answer_503_with_a_reason() {
    let v1 = app("v1").await;
    let dests = destination("empty.default", &[("v1", 1, &[])])
        + &destination("zero.default", &[("v1", 0, &[v1.addr])]);
    let proxy = proxy(&yaml(&dests)).await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let (status, reason, _) = client.get("empty.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints")
    );
    let (status, reason, _) = client.get("zero.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no-backends")
    );
    // A dead endpoint: connect fails fast with 502.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    proxy
        .shared
        .routes
        .apply(
            Config::parse(
                &yaml(&destination("dead.default", &[("x", 1, &[dead])])),
                std::path::Path::new("t"),
            )
            .unwrap(),
        )
        .unwrap();
    let (status, reason, _) = client.get("dead.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::BAD_GATEWAY, "connect-failed")
    );
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn no_request_metrics_leaves_the_request_series_empty_and_the_others_counted() {
    let v1 = app("v1").await;
    let config = format!(
        "no_request_metrics: true\n{}",
        yaml(&destination("echo.default", &[("v1", 1, &[v1.addr])]))
    );
    let proxy = proxy(&config).await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    for _ in 0..3 {
        assert_eq!(client.get("echo.default", "/").await.0, StatusCode::OK);
    }
    let (_, _, metrics) = H1::connect(proxy.admin.unwrap())
        .await
        .get("a", "/metrics")
        .await;
    assert!(
        !metrics.contains("trellis_request_total{")
            && !metrics.contains("trellis_request_duration_ms_bucket{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_accepted_connections_total{listener=\"outbound-http\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_serves_metrics_ready_live_and_config() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let mut client = H1::connect(proxy.http.unwrap()).await;
    for _ in 0..3 {
        client.get("echo.default", "/").await;
    }
    client.get("nope.default", "/").await;
    let mut admin = H1::connect(proxy.admin.unwrap()).await;
    assert_eq!(admin.get("a", "/live").await.0, StatusCode::OK);
    assert_eq!(admin.get("a", "/ready").await.0, StatusCode::OK);
    let (status, _, config) = admin.get("a", "/config").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(json["destinations"][0]["authority"], "echo.default");
    let (_, _, metrics) = admin.get("a", "/metrics").await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("trellis_request_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    for label in [
        "direction=\"outbound\"",
        "source_namespace=\"shop\"",
        "source_kind=\"deployment\"",
        "source_workload=\"client\"",
        "destination=\"echo.default\"",
        "destination_namespace=\"default\"",
        "destination_kind=\"service\"",
        "destination_workload=\"v1\"",
    ] {
        assert!(line.contains(label), "{label} missing in {line}");
    }
    assert!(line.ends_with(" 3"), "{line}");
    assert!(
        metrics.contains("error=\"unknown-destination\""),
        "{metrics}"
    );
    for bucket in [
        "1.0", "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0", "5000.0",
    ] {
        assert!(
            metrics.contains(&format!(
                "trellis_request_duration_ms_bucket{{le=\"{bucket}\""
            )) || metrics.contains(&format!(",le=\"{bucket}\"}}")),
            "bucket {bucket}"
        );
    }
}

#[tokio::test]
async fn inbound_policy_denies_by_default_and_allows_what_it_lists() {
    let local = app("local").await;
    let yaml = format!(
        "inbound:\n  listen: 127.0.0.1:0\n  app: \"{}\"\n  policy:\n    authorizations:\n      - unauthenticated: true\n        routes: [{{path_regex: \"/health\", methods: [GET]}}]\n",
        local.addr
    );
    let proxy = proxy(&yaml).await;
    let mut client = H1::connect(proxy.inbound.unwrap()).await;
    assert_eq!(client.get("local", "/health").await.1, "local");
    let (status, reason, _) = client.get("local", "/admin").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let req = Request::post("/health")
        .header("host", "local")
        .body(full(""))
        .unwrap();
    assert_eq!(read(client.send(req).await).await.0, StatusCode::FORBIDDEN);
    assert_eq!(local.hits(), 1, "denied requests never reach the app");
    // Policies swap like everything else.
    let permissive = yaml.replace("  policy:\n", "  policy:\n    default_action: allow\n");
    proxy
        .shared
        .routes
        .apply(Config::parse(&permissive, std::path::Path::new("t")).unwrap())
        .unwrap();
    assert_eq!(client.get("local", "/admin").await.1, "local");
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_then_stops() {
    let v1 = app("v1").await;
    let proxy = proxy(&yaml(&destination(
        "echo.default",
        &[("v1", 1, &[v1.addr])],
    )))
    .await;
    let addr = proxy.http.unwrap();
    let slow =
        tokio::spawn(async move { H1::connect(addr).await.get("echo.default", "/slow").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let left = proxy.drain(Duration::from_secs(5)).await;
    assert_eq!(left, 0);
    assert_eq!(
        slow.await.unwrap().0,
        StatusCode::OK,
        "in-flight request finished"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
