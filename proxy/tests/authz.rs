//! Inbound authorization through a real proxy on loopback: source networks for plaintext
//! callers, gRPC denials (trailers-only PERMISSION_DENIED), opaque TCP connections closed when
//! the policy is revoked, and the per-source connection limit.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::RunningProxy;
use trellis_proxy::config::Config;

fn inbound_yaml(app: SocketAddr, protocol: &str, rules: &str, extra: &str) -> String {
    format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{app}\"\n  protocol: {protocol}\n  policy:\n    authorizations:\n{rules}{extra}"
    )
}

fn swap_policy(proxy: &RunningProxy, yaml: &str) {
    proxy
        .shared
        .routes
        .apply(Config::parse(yaml, Path::new("t.yaml")).unwrap())
        .unwrap();
}

#[tokio::test]
async fn plaintext_callers_are_allowed_only_from_listed_networks() {
    let local = app("local").await;
    let from = |networks: &str| {
        inbound_yaml(
            local.addr,
            "detect",
            &format!("      - unauthenticated: true\n        networks: [{networks}]\n"),
            "",
        )
    };
    let proxy = proxy(&from("\"127.0.0.0/8\"")).await;
    let mut client = H1::connect(proxy.inbound.unwrap()).await;
    assert_eq!(client.get("local", "/").await.1, "local");
    swap_policy(&proxy, &from("\"10.0.0.0/8\", \"192.168.0.1\""));
    let (status, reason, _) = client.get("local", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(local.hits(), 1);
    // A rule naming identities does not admit plaintext callers, whatever their network.
    swap_policy(
        &proxy,
        &inbound_yaml(
            local.addr,
            "detect",
            "      - identities: [\"*\"]\n        networks: [\"127.0.0.0/8\"]\n",
            "",
        ),
    );
    assert_eq!(client.get("local", "/").await.1, "forbidden");
    // Bad CIDRs are refused with the field that holds them.
    let err = Config::parse(&from("\"10.0.0.0/40\""), Path::new("p.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inbound.policy.authorizations[0].networks[0]") && err.contains("p.yaml:"),
        "{err}"
    );
}

#[tokio::test]
async fn denied_grpc_calls_get_permission_denied_in_a_trailers_only_response() {
    let grpc = grpc_app("echo").await;
    let proxy = proxy(&inbound_yaml(
        grpc,
        "detect",
        "      - unauthenticated: true\n        routes: [{path_regex: \"/trellis.test.echo.Echo/Bidi\"}]\n",
        "",
    ))
    .await;
    let mut client =
        echo::echo_client::EchoClient::connect(format!("http://{}", proxy.inbound.unwrap()))
            .await
            .unwrap();
    let status = client
        .unary(echo::EchoMessage { text: "hi".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("does not allow"), "{status:?}");
    assert_eq!(
        status.metadata().get("x-trellis-error").unwrap(),
        "forbidden"
    );
    // Allowed methods on the same connection still work.
    swap_policy(
        &proxy,
        &inbound_yaml(grpc, "detect", "      - unauthenticated: true\n", ""),
    );
    let answer = client
        .unary(echo::EchoMessage { text: "hi".into() })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().text, "echo:hi");
}

/// A TCP echo server.
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn open_tcp_connections_are_closed_when_the_policy_no_longer_allows_them() {
    let echo = tcp_echo().await;
    let allow = inbound_yaml(echo, "tcp", "      - unauthenticated: true\n", "");
    let proxy = proxy(&allow).await;
    let mut kept = TcpStream::connect(proxy.inbound.unwrap()).await.unwrap();
    kept.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    kept.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // An unrelated change that still allows the caller leaves the connection alone.
    swap_policy(
        &proxy,
        &inbound_yaml(
            echo,
            "tcp",
            "      - unauthenticated: true\n        networks: [\"127.0.0.1/32\"]\n",
            "",
        ),
    );
    kept.write_all(b"pong").await.unwrap();
    kept.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // Revoked: closed well within 5 s.
    let revoked = Instant::now();
    swap_policy(
        &proxy,
        &inbound_yaml(echo, "tcp", "      - identities: [\"*\"]\n", ""),
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "connection still open 5 s after the revocation"
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "{:?}",
        revoked.elapsed()
    );
    // New connections are refused too.
    let mut fresh = TcpStream::connect(proxy.inbound.unwrap()).await.unwrap();
    let _ = fresh.write_all(b"ping").await;
    let n = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn connections_per_source_are_limited() {
    let local = app("local").await;
    let proxy = proxy(&inbound_yaml(
        local.addr,
        "detect",
        "      - unauthenticated: true\n",
        "limits: {max_connections_per_source: 2}\n",
    ))
    .await;
    let mut first = H1::connect(proxy.inbound.unwrap()).await;
    let mut second = H1::connect(proxy.inbound.unwrap()).await;
    assert_eq!(first.get("local", "/").await.1, "local");
    assert_eq!(second.get("local", "/").await.1, "local");
    let mut third = TcpStream::connect(proxy.inbound.unwrap()).await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nhost: local\r\n\r\n")
        .await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection from one address is closed");
    drop(first);
    // The count goes down when a connection closes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = TcpStream::connect(proxy.inbound.unwrap()).await.unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nhost: local\r\n\r\n")
            .await
            .unwrap();
        if again.read(&mut buf).await.unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = H1::connect(proxy.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2;
    assert!(
        m.contains("trellis_inbound_connections_refused_total{reason=\"per-source-limit\"}"),
        "{m}"
    );
}
