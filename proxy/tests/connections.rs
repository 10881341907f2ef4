//! Connection hardening against the real proxy, with raw sockets on both sides: a silent client
//! on a detect port cannot pin an app connection, upgraded tunnels close when idle, the global
//! connection limit refuses (counted in `/metrics` and `/connections`), and listeners bind with
//! the configured backlog.
//!
//! Timing: only lower bounds that the proxy must respect ("still open after X") and generous
//! upper bounds ("closed within 10 s" for a 0.5 s limit), so a loaded machine does not flake.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for "the proxy closes it" (limits in these tests are well under a second).
const CLOSED_WITHIN: Duration = Duration::from_secs(10);

/// Reads until EOF (or a reset) within [`CLOSED_WITHIN`]; panics if the socket stays open.
async fn expect_closed(s: &mut TcpStream, who: &str) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(CLOSED_WITHIN, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{who}: still open after {CLOSED_WITHIN:?}");
}

/// Reads exactly `want.len()` bytes within [`CLOSED_WITHIN`] and checks them.
async fn expect_bytes(s: &mut TcpStream, want: &[u8], who: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(CLOSED_WITHIN, s.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{who}: nothing within {CLOSED_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("{who}: {e}"));
    assert_eq!(got, want, "{who}");
}

/// A raw upstream: every accepted socket is handed to the test.
async fn raw_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

async fn accepted(rx: &mut tokio::sync::mpsc::UnboundedReceiver<TcpStream>) -> TcpStream {
    tokio::time::timeout(CLOSED_WITHIN, rx.recv())
        .await
        .expect("the proxy connected upstream")
        .unwrap()
}

/// `GET path` on the admin port; returns the body.
async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(CLOSED_WITHIN, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

async fn connections_json(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin_get(admin, "/connections").await).unwrap()
}

/// Polls `/connections` until `open` equals `n` (connection tasks count at accept).
async fn wait_open(admin: SocketAddr, n: u64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + CLOSED_WITHIN;
    loop {
        let json = connections_json(admin).await;
        if json["open"] == n {
            return json;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "open != {n}: {json}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn detect_port_config(upstream: SocketAddr) -> String {
    format!(
        "admin: 127.0.0.1:0\noutbound:\n  ports:\n    - listen: 127.0.0.1:0\n      destination: raw.default\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{upstream}\"\n  protocol: detect\n  policy: {{default_action: allow}}\nlimits:\n  detect_timeout_ms: 200\n  opaque_first_byte_timeout_ms: 500\n  tcp_idle_timeout_ms: 60000\ndestinations:\n  - authority: raw.default\n    protocol: detect\n    backends: [{{name: v1, endpoints: [{{address: \"{upstream}\"}}]}}]\n"
    )
}

/// Defect 4: a client that sends nothing on a detect port became opaque TCP after the detection
/// timeout and then held an app connection until `tcp_idle_timeout_ms` (1 h). Now it must send
/// its first byte within `opaque_first_byte_timeout_ms` of becoming opaque, or both sides are
/// closed; server-first protocols still work (the app's greeting reaches the client, and a
/// client that answers keeps its connection).
#[tokio::test]
async fn a_silent_client_on_a_detect_port_does_not_pin_an_app_connection() {
    let (upstream, mut accepted_rx) = raw_upstream().await;
    let proxy = proxy(&detect_port_config(upstream)).await;
    for (port, which) in [
        (proxy.ports[0], "outbound detect port"),
        (proxy.inbound.unwrap(), "inbound detect port"),
    ] {
        // A silent client: the app greets it (server-first), it never answers.
        let mut client = TcpStream::connect(port).await.unwrap();
        let mut app = accepted(&mut accepted_rx).await;
        app.write_all(b"220 greeting\r\n").await.unwrap();
        expect_bytes(&mut client, b"220 greeting\r\n", which).await;
        expect_closed(&mut app, &format!("{which}: app side of a silent client")).await;
        expect_closed(&mut client, &format!("{which}: silent client")).await;

        // A server-first client that answers the greeting keeps its connection past the bound.
        let mut client = TcpStream::connect(port).await.unwrap();
        let mut app = accepted(&mut accepted_rx).await;
        app.write_all(b"220 greeting\r\n").await.unwrap();
        expect_bytes(&mut client, b"220 greeting\r\n", which).await;
        client.write_all(b"HELO me\r\n").await.unwrap();
        expect_bytes(&mut app, b"HELO me\r\n", which).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        app.write_all(b"250 ok\r\n").await.unwrap();
        expect_bytes(
            &mut client,
            b"250 ok\r\n",
            &format!("{which}: answered client kept"),
        )
        .await;
        client.write_all(b"QUIT\r\n").await.unwrap();
        expect_bytes(&mut app, b"QUIT\r\n", which).await;
    }
}

/// Every tunnel has the idle timeout: after a 101 the upgraded connection was copied with no
/// bound at all. Now no byte either way for `tcp_idle_timeout_ms` closes both sides.
#[tokio::test]
async fn upgraded_tunnels_are_closed_when_idle() {
    let (upstream, mut accepted_rx) = raw_upstream().await;
    let proxy = proxy(&format!(
        "outbound:\n  http: 127.0.0.1:0\nlimits:\n  tcp_idle_timeout_ms: 400\ndestinations:\n  - authority: echo.default\n    backends: [{{name: v1, endpoints: [{{address: \"{upstream}\"}}]}}]\n"
    ))
    .await;
    let mut client = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    client
        .write_all(b"GET /ws HTTP/1.1\r\nHost: echo.default\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut app = accepted(&mut accepted_rx).await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(CLOSED_WITHIN, app.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    app.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    while !resp.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(CLOSED_WITHIN, client.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        resp.push(b[0]);
    }
    assert!(
        resp.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    // Traffic flows both ways through the tunnel...
    client.write_all(b"ping").await.unwrap();
    expect_bytes(&mut app, b"ping", "upstream side of the tunnel").await;
    app.write_all(b"pong").await.unwrap();
    expect_bytes(&mut client, b"pong", "client side of the tunnel").await;
    // ...then silence closes both sides.
    expect_closed(&mut client, "client side of an idle tunnel").await;
    expect_closed(&mut app, "upstream side of an idle tunnel").await;
}

/// A global limit on open client connections (all listeners): over it, new connections are
/// closed at once, counted by listener and reason in `/metrics` and `/connections`; closing
/// one makes room again.
#[tokio::test]
async fn the_global_connection_limit_refuses_counts_and_recovers() {
    let v1 = app("v1").await;
    let proxy = proxy(&format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\n  ports:\n    - listen: 127.0.0.1:0\n      destination: echo.default\n      protocol: tcp\nlimits:\n  max_connections: 3\n  header_read_timeout_ms: 60000\ndestinations:\n{}",
        destination("echo.default", &[("v1", 1, &[v1.addr])])
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy.http.unwrap()).await.unwrap());
    }
    held.push(TcpStream::connect(proxy.ports[0]).await.unwrap());
    let json = wait_open(admin, 3).await;
    assert_eq!(json["max"], 3);
    assert_eq!(json["by_listener"]["outbound-http"], 2, "{json}");
    assert_eq!(json["by_listener"]["outbound-port"], 1, "{json}");

    // Over the limit: closed without an answer, on either listener.
    let mut refused = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let _ = refused
        .write_all(b"GET / HTTP/1.1\r\nHost: echo.default\r\n\r\n")
        .await;
    expect_closed(&mut refused, "connection over the global limit").await;
    let mut refused = TcpStream::connect(proxy.ports[0]).await.unwrap();
    expect_closed(&mut refused, "connection over the global limit").await;
    assert_eq!(v1.hits(), 0, "nothing reached the app");

    let json = connections_json(admin).await;
    assert_eq!(
        json["refused"]["outbound-http"]["global-limit"], 1,
        "{json}"
    );
    assert_eq!(
        json["refused"]["outbound-port"]["global-limit"], 1,
        "{json}"
    );
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains(
            "trellis_connections_refused_total{listener=\"outbound-http\",reason=\"global-limit\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_open_connections{listener=\"outbound-http\"} 2"),
        "{metrics}"
    );

    // Room again once one closes.
    drop(held.pop());
    wait_open(admin, 2).await;
    let mut h1 = H1::connect(proxy.http.unwrap()).await;
    assert_eq!(h1.get("echo.default", "/").await.1, "v1");
}

/// Defect 5: listeners were bound by `TcpListener::bind` (backlog 128). Now `limits.listen_backlog` (default 4096, as HAProxy). On Linux `ss -ltn` shows a
/// listening socket's backlog as its Send-Q.
#[tokio::test]
async fn listeners_bind_with_the_configured_backlog() {
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        println!("skipped: `ss` (iproute2) is not installed, the backlog cannot be observed");
        return;
    }
    let proxy = proxy(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\nlimits:\n  listen_backlog: 321\n",
    )
    .await;
    for addr in [proxy.http.unwrap(), proxy.admin.unwrap()] {
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{}", addr.port())])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // State Recv-Q Send-Q Local Peer
        let send_q: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        assert_eq!(send_q, ["321"], "ss for {addr}: {text}");
    }
    let default = trellis_proxy::config::Limits::default();
    assert_eq!(default.listen_backlog, 4096);
}
