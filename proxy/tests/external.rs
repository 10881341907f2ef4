//! Declared outside destinations through a real proxy on loopback (no interception needed):
//! reached by name through the outbound HTTP listener and a per-upstream TCP port, the caller's
//! own identity checked against the declaration, ports checked, and TLS originated to an HTTPS
//! server whose certificate is checked against the declaration's CA bundle (HTTP/1.1, or HTTP/2
//! when the server chooses `h2`: gRPC to the outside).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

mod common;
use common::certs::{h2_tls_server, identity_yaml, new_ca, tls_server, valid_leaf};
use common::*;

const ME: &str = "spiffe://test.local/ns/shop/sa/checkout";

fn indented(pem: &str, spaces: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(spaces)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_destinations_by_name_with_their_identities_ports_and_originated_tls() {
    let ca = new_ca("outside CA");
    let other_ca = new_ca("someone else's CA");
    let server: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let hits = tls_server(server, &ca, "secure.example.test", "secure").await;
    let dir = tempfile::tempdir().unwrap();
    let identity = identity_yaml(dir.path(), "checkout", &valid_leaf(&ca, ME), &[&ca]);
    let (http, tcp) = (free_port(), free_port());
    let tls_port = server.port();
    let yaml = format!(
        "{identity}outbound:
  http: 127.0.0.1:{http}
  ports:
    - {{ listen: 127.0.0.1:{tcp}, destination: \"secure.example.test:7000\", protocol: tcp }}
destinations:
  - authority: secure.example.test
    protocol: detect
    backends: [{{ name: secure, endpoints: [{{ address: 127.0.0.1 }}] }}]
    external:
      name: shop/secure
      allowed_identities: [\"{ME}\"]
      ports: [{{ port: 80, originate_tls_port: {tls_port} }}, {{ port: 7000, originate_tls_port: {tls_port} }}]
      ca_bundle: |
{ca}  - authority: forbidden.example.test
    protocol: detect
    backends: [{{ name: forbidden, endpoints: [{{ address: 127.0.0.1 }}] }}]
    external:
      name: shop/forbidden
      allowed_identities: [\"spiffe://test.local/ns/shop/sa/other\"]
      ports: [{{ port: 80, originate_tls_port: {tls_port} }}]
      ca_bundle: |
{ca}  - authority: untrusted.example.test
    protocol: detect
    backends: [{{ name: untrusted, endpoints: [{{ address: 127.0.0.1 }}] }}]
    external:
      name: shop/untrusted
      allowed_identities: [\"*\"]
      ports: [{{ port: 80, originate_tls_port: {tls_port} }}]
      ca_bundle: |
{other}",
        ca = indented(&ca.pem, 8),
        other = indented(&other_ca.pem, 8),
    );
    let _proxy = proxy(&yaml).await;
    let outbound: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let mut client = H1::connect(outbound).await;

    // Allowed: plain HTTP from the application, TLS from the proxy (checked for the host).
    let (status, _, body) = client.get("secure.example.test", "/").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "secure"));
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Not this workload's, and a port the declaration does not list: 403 from the proxy
    // itself, nothing sent.
    for host in ["forbidden.example.test", "secure.example.test:8081"] {
        let req = http::Request::get("/")
            .header("host", host)
            .body(full(""))
            .unwrap();
        let resp = client.send(req).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{host}");
        assert_eq!(
            resp.headers()["x-trellis-error"],
            "egress-forbidden",
            "{host}"
        );
        let _ = read(resp).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "never sent");

    // The server's certificate does not chain to the declaration's CA: refused, 502.
    let (status, _, body) = client.get("untrusted.example.test", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "no request over an unverified TLS"
    );

    // Opaque TCP through a per-upstream port naming the host: TLS originated too.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
        .await
        .unwrap();
    stream.write_all(b"PING\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.ends_with("secure"), "{answer}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn originated_tls_speaks_http2_when_the_outside_server_chooses_it() {
    // An outside gRPC-style server that speaks only HTTP/2 over TLS: the proxy offers `h2` and
    // `http/1.1`, the server chooses `h2`, and the request goes out as HTTP/2 whatever the
    // application spoke to its proxy, trailers included.
    use http_body_util::BodyExt as _;
    let ca = new_ca("outside CA");
    let server: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    h2_tls_server(server, &ca, "grpc.example.test").await;
    let dir = tempfile::tempdir().unwrap();
    let identity = identity_yaml(dir.path(), "checkout", &valid_leaf(&ca, ME), &[&ca]);
    let http = free_port();
    let yaml = format!(
        "{identity}outbound:
  http: 127.0.0.1:{http}
destinations:
  - authority: grpc.example.test
    protocol: detect
    backends: [{{ name: grpc, endpoints: [{{ address: 127.0.0.1 }}] }}]
    external:
      name: shop/grpc
      allowed_identities: [\"{ME}\"]
      ports: [{{ port: 80, originate_tls_port: {tls_port} }}]
      ca_bundle: |
{ca}",
        tls_port = server.port(),
        ca = indented(&ca.pem, 8),
    );
    let _proxy = proxy(&yaml).await;
    let outbound: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();

    // An HTTP/1.1 application: HTTP/2 upstream, `:scheme` https, `:authority` the endpoint and
    // no `host` field beside it.
    let mut client = H1::connect(outbound).await;
    for _ in 0..2 {
        let (status, _, body) = client.get("grpc.example.test", "/pkg.Svc/Call").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            format!(
                "HTTP/2.0 https://127.0.0.1:{}/pkg.Svc/Call host=-",
                server.port()
            )
        );
    }

    // An h2c application (a gRPC client): the trailers come back.
    let mut h2 = h2(outbound).await;
    let req = http::Request::post("http://grpc.example.test/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full("x"))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers relayed");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(
        String::from_utf8_lossy(&collected.to_bytes()).starts_with("HTTP/2.0 https://"),
        "HTTP/2 upstream"
    );
}
