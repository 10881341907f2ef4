//! Hostile input against the real proxy: oversized heads, too many headers, slowloris (a head
//! that never ends), idle keep-alive connections, garbage, and protocol detection on one port.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        "outbound:\n  http: 127.0.0.1:0\n  ports:\n    - listen: 127.0.0.1:0\n      destination: mixed.default\n    - listen: 127.0.0.1:0\n      destination: echo.default\n      protocol: tcp\nlimits:\n  max_header_bytes: 4096\n  max_headers: 20\n  header_read_timeout_ms: 300\n  detect_timeout_ms: 200\n  tcp_idle_timeout_ms: 300\ndestinations:\n  - authority: echo.default\n    backends: [{{name: v1, endpoints: [{{address: \"{upstream}\"}}]}}]\n  - authority: mixed.default\n    protocol: detect\n    backends: [{{name: v1, endpoints: [{{address: \"{upstream}\"}}]}}]\n"
    )
}

async fn response_head(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_are_refused() {
    let v1 = app("v1").await;
    let proxy = proxy(&config(v1.addr)).await;
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let big = "x".repeat(8000);
    s.write_all(format!("GET / HTTP/1.1\r\nHost: echo.default\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let many: String = (0..50).map(|i| format!("X-H{i}: v\r\n")).collect();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: echo.default\r\n{many}\r\n").as_bytes())
        .await
        .unwrap();
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    let long_uri = "/".to_string() + &"a".repeat(8000);
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(format!("GET {long_uri} HTTP/1.1\r\nHost: echo.default\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = response_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 4"),
        "request line over the limit refused: {head}"
    );
    assert_eq!(v1.hits(), 0);

    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let head = response_head(&mut s).await;
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 400"),
        "{head:?}"
    );
}

#[tokio::test]
async fn slowloris_and_idle_connections_are_closed() {
    let v1 = app("v1").await;
    let proxy = proxy(&config(v1.addr)).await;
    // A head that trickles in and never ends.
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo.default\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
            break;
        }
    }
    assert!(closed, "slow head not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A keep-alive connection that goes quiet after a request is closed too.
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: echo.default\r\n\r\n")
        .await
        .unwrap();
    assert!(response_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed when idle");
    assert!(
        matches!(n, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408")
    );

    // A connection that never says anything is closed after the header-read timeout.
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed when silent");
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn detect_ports_carry_http_and_opaque_bytes() {
    // The upstream of `mixed.default` is an HTTP app; an opaque client gets its bytes forwarded
    // unchanged (the app answers them with a 400, proving they arrived as sent).
    let v1 = app("v1").await;
    let proxy = proxy(&config(v1.addr)).await;
    let mut http = H1::connect(proxy.ports[0]).await;
    assert_eq!(
        http.get("anything", "/").await.1,
        "v1",
        "HTTP detected, routed to the port's destination"
    );
    let mut h2 = h2(proxy.ports[0]).await;
    let resp = h2
        .send_request(http::Request::get("http://x/").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");

    let mut s = TcpStream::connect(proxy.ports[0]).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let head = response_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 400"),
        "opaque bytes reached the app unchanged: {head:?}"
    );
    assert_eq!(v1.hits(), 2);
}

#[tokio::test]
async fn idle_opaque_tcp_connections_are_closed() {
    let v1 = app("v1").await;
    let proxy = proxy(&config(v1.addr)).await;
    let mut s = TcpStream::connect(proxy.ports[1]).await.unwrap();
    // Active traffic keeps it open past the idle limit...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(response_head(&mut s).await.starts_with("HTTP/1.1 200"));
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed when idle");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}
