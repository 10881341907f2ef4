//! mTLS between two real proxies on loopback (client proxy A -> server proxy B -> app), with
//! certificates from an rcgen test CA (static mode) and from a small in-test `Identity` gRPC
//! server (the certifier of controller mode): HTTP/1.1 and h2, the caller's identity in
//! authorization, a wrong server identity, a foreign-CA and an expired client certificate,
//! fail-closed without a certificate, rotation and a controller that goes away.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::certs::*;
use common::*;
use http::{Request, StatusCode};
use rcgen::{KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::config::Config;
use trellis_proxy::identity::{self, CertifierOptions, Credentials, IdentityStore};
use trellis_proxy::{ProxyOptions, RunningProxy};
use trellis_proxy_api::spiffe::SpiffeId;
use trellis_proxy_api::v1;

const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";

/// Proxy B: inbound in front of `app`, allowing `allowed` (and nothing else).
fn server_yaml(app: SocketAddr, allowed: &str, identity: &str) -> String {
    format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{app}\"\n  policy:\n    authorizations:\n      - identities: [\"{allowed}\"]\n{identity}"
    )
}

/// Proxy A: outbound HTTP towards `b.shop` = `b_inbound`, expecting `expected`.
fn client_yaml(b_inbound: SocketAddr, expected: &str, identity: &str) -> String {
    format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: b.shop\n    backends:\n      - name: b\n        endpoints: [{{address: \"{b_inbound}\", identity: \"{expected}\"}}]\n{identity}"
    )
}

async fn metrics(proxy: &RunningProxy) -> String {
    H1::connect(proxy.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2
}

/// A and B with certificates from one CA; B allows only A.
async fn mesh() -> (tempfile::TempDir, Ca, App, RunningProxy, RunningProxy) {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app("b").await;
    let b = proxy(&server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ))
    .await;
    let a = proxy(&client_yaml(
        b.inbound.unwrap(),
        B_ID,
        &identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca]),
    ))
    .await;
    (dir, ca, app, a, b)
}

#[tokio::test]
async fn mtls_carries_http1_and_h2_and_the_callers_identity_is_authorized() {
    let (_dir, _ca, app, a, b) = mesh().await;
    let mut h1 = H1::connect(a.http.unwrap()).await;
    for _ in 0..3 {
        let (status, tag, _) = h1.get("b.shop", "/").await;
        assert_eq!((status, tag.as_str()), (StatusCode::OK, "b"));
    }
    let mut h2 = h2(a.http.unwrap()).await;
    let resp = h2
        .send_request(Request::get("http://b.shop/").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-seen-version"],
        "HTTP/2.0",
        "h2 end to end"
    );
    assert_eq!(read(resp).await.1, "b");
    assert_eq!(app.hits(), 4);
    // A plaintext caller has no identity: B's policy (only A) refuses it.
    let (status, reason, _) = H1::connect(b.inbound.unwrap()).await.get("b", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(app.hits(), 4);
    let identity: serde_json::Value = serde_json::from_str(
        &H1::connect(a.admin.unwrap())
            .await
            .get("admin", "/identity")
            .await
            .2,
    )
    .unwrap();
    assert_eq!(identity["id"], A_ID);
    assert_eq!(identity["valid"], true);
    let m = metrics(&a).await;
    assert!(
        m.contains("trellis_tls_handshakes_total{direction=\"outbound\"} 2"),
        "one pooled connection per (identity, protocol): {m}"
    );
    let m = metrics(&b).await;
    assert!(
        m.contains("trellis_tls_handshakes_total{direction=\"inbound\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("trellis_tls_handshake_duration_ms_bucket"),
        "{m}"
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_with_502() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app("b").await;
    let b = proxy(&server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ))
    .await;
    let a = proxy(&client_yaml(
        b.inbound.unwrap(),
        "spiffe://cluster.local/ns/shop/sa/not-b",
        &identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca]),
    ))
    .await;
    let (status, reason, body) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::BAD_GATEWAY, "identity-mismatch"),
        "{body}"
    );
    assert_eq!(app.hits(), 0);
    let m = metrics(&a).await;
    assert!(
        m.contains("trellis_tls_handshake_errors_total{direction=\"outbound\",reason=\"identity-mismatch\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_client_certificate_from_a_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let foreign = new_ca("foreign");
    let app = app("b").await;
    let b = proxy(&server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ))
    .await;
    // A trusts the mesh CA (so it accepts B) but its own certificate comes from another CA.
    let a = proxy(&client_yaml(
        b.inbound.unwrap(),
        B_ID,
        &identity_yaml(dir.path(), "a", &valid_leaf(&foreign, A_ID), &[&ca]),
    ))
    .await;
    let (status, reason, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{reason}");
    assert!(
        ["tls-failed", "upstream-failed"].contains(&reason.as_str()),
        "{reason}"
    );
    assert_eq!(app.hits(), 0);
    let m = metrics(&b).await;
    assert!(
        m.contains(
            "trellis_tls_handshake_errors_total{direction=\"inbound\",reason=\"unknown-issuer\"} 1"
        ),
        "{m}"
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_and_an_expired_own_certificate_fails_closed() {
    let (dir, ca, app, _a, b) = mesh().await;
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let expired = leaf(&ca, A_ID, long_ago, long_ago + Duration::from_secs(3600));
    // Present the expired certificate to B directly, with the proxy's own client configuration.
    let credentials = Credentials::new(
        vec![pem_cert(&expired.0)],
        rustls::pki_types::PrivateKeyDer::from_pem_slice(expired.1.as_bytes()).unwrap(),
        vec![ca.der.clone().into()],
    )
    .unwrap();
    let generation = trellis_proxy::tls::TlsGeneration::new(credentials).unwrap();
    let config = generation
        .client_config(B_ID, trellis_proxy::tls::Alpn::Http1)
        .unwrap();
    let tcp = TcpStream::connect(b.inbound.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("b.shop").unwrap();
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    }
    .await;
    assert!(
        matches!(outcome, Err(_) | Ok(0)),
        "B answered a caller with an expired certificate: {outcome:?}"
    );
    assert_eq!(app.hits(), 0);
    let m = metrics(&b).await;
    assert!(
        m.contains(
            "trellis_tls_handshake_errors_total{direction=\"inbound\",reason=\"expired\"} 1"
        ),
        "{m}"
    );

    // A proxy whose own certificate expired does not fall back to plaintext: 503 no-identity.
    let a = proxy(&client_yaml(
        b.inbound.unwrap(),
        B_ID,
        &identity_yaml(dir.path(), "old", &expired, &[&ca]),
    ))
    .await;
    let (status, reason, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no-identity")
    );
}

fn pem_cert(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn plaintext_endpoints_stay_plaintext_and_proxies_without_identity_talk_plaintext() {
    let (_dir, _ca, b_app, a, _b) = mesh().await;
    // An endpoint without identity (outside the mesh) is spoken to in plaintext.
    let plain = app("plain").await;
    let mut config = a.shared.routes.table.load().config();
    config.destinations[0].backends[0].endpoints[0].identity = None;
    config.destinations[0].backends[0].endpoints[0].address = plain.addr.to_string();
    a.shared.routes.apply(config).unwrap();
    let (status, tag, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!((status, tag.as_str()), (StatusCode::OK, "plain"));
    assert_eq!(b_app.hits(), 0);
    // A proxy without any identity source sends plaintext even to endpoints with an identity.
    let c = proxy(&client_yaml(plain.addr, B_ID, "")).await;
    let (status, tag, _) = H1::connect(c.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!((status, tag.as_str()), (StatusCode::OK, "plain"));
}

#[tokio::test]
async fn configured_without_a_certificate_yet_fails_closed_with_503() {
    let app = app("b").await;
    let config = Config::parse(&client_yaml(app.addr, B_ID, ""), Path::new("test.yaml")).unwrap();
    let mut options = ProxyOptions::new(config);
    options.identity = Arc::new(IdentityStore::expecting());
    let a = trellis_proxy::start(options).await.unwrap();
    let (status, reason, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no-identity")
    );
    assert_eq!(app.hits(), 0, "never plaintext to an mTLS endpoint");
}

#[tokio::test]
async fn revoking_the_policy_stops_the_next_request_on_a_kept_alive_mtls_connection() {
    let (_dir, _ca, app, a, b) = mesh().await;
    let mut h1 = H1::connect(a.http.unwrap()).await;
    assert_eq!(h1.get("b.shop", "/").await.1, "b");
    let mut config = b.shared.routes.table.load().config();
    config.inbound.as_mut().unwrap().policy.authorizations[0].identities =
        vec!["spiffe://cluster.local/ns/shop/sa/someone-else".into()];
    b.shared.routes.apply(config).unwrap();
    let (status, reason, _) = h1.get("b.shop", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert_eq!(app.hits(), 1);
    let m = metrics(&b).await;
    assert!(
        m.contains("trellis_tls_handshakes_total{direction=\"inbound\"} 1"),
        "the same kept-alive mTLS connection carried both requests: {m}"
    );
}

#[tokio::test]
async fn static_identity_files_are_reloaded_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app("b").await;
    let b_yaml = server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    );
    let path = dir.path().join("b.yaml");
    std::fs::write(&path, &b_yaml).unwrap();
    let config = Config::load(&path).unwrap();
    let b = trellis_proxy::start(ProxyOptions::new(config))
        .await
        .unwrap();
    let first = b.shared.identity.latest().unwrap().credentials.chain[0].clone();
    // Rewrite the certificate file; a reload picks the new one up.
    identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]);
    assert!(trellis_proxy::reload::reload_now(&b.shared, &path));
    let second = b.shared.identity.latest().unwrap().credentials.chain[0].clone();
    assert_ne!(first, second);
    // A broken key file is refused and the running identity stays.
    std::fs::write(dir.path().join("b.key"), "not a key").unwrap();
    assert!(!trellis_proxy::reload::reload_now(&b.shared, &path));
    assert_eq!(
        b.shared.identity.latest().unwrap().credentials.chain[0],
        second
    );
}

/// A small `Identity` server: signs CSRs with `ca` for `lifetime` when the proof matches.
#[derive(Clone)]
struct TestIdentity {
    ca: Arc<Ca>,
    lifetime: Duration,
    token: Arc<Mutex<Vec<u8>>>,
    /// Certificates issued.
    issued: Arc<AtomicUsize>,
    /// Answer "unavailable" (the controller is away).
    away: Arc<std::sync::atomic::AtomicBool>,
    /// Identities asked for.
    asked: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl v1::identity_server::Identity for TestIdentity {
    async fn certify(
        &self,
        request: tonic::Request<v1::CertifyRequest>,
    ) -> Result<tonic::Response<v1::CertifyResponse>, tonic::Status> {
        if self.away.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("the controller is away"));
        }
        let req = request.into_inner();
        self.asked.lock().unwrap().push(req.identity.clone());
        if req.proof != *self.token.lock().unwrap() {
            return Err(tonic::Status::permission_denied("bad proof"));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_der(&req.csr_der.into())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let uri = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(u)] => u.as_str().to_string(),
            _ => return Err(tonic::Status::invalid_argument("one URI SAN")),
        };
        if uri != req.identity {
            return Err(tonic::Status::invalid_argument("identity != CSR"));
        }
        self.issued.fetch_add(1, Ordering::SeqCst);
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        let cert = leaf_params(&uri, now - Duration::from_secs(1), not_after)
            .signed_by(&csr.public_key, &self.ca.issuer)
            .unwrap();
        Ok(tonic::Response::new(v1::CertifyResponse {
            version: "1".into(),
            chain_der: vec![cert.der().to_vec()],
            expires_at_unix: not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64,
            trust_anchors_der: vec![self.ca.der.clone()],
        }))
    }
}

/// One request on a fresh mTLS connection to `b`, made with the store's current certificate.
async fn fresh_mtls_get(proxy: &RunningProxy, b: SocketAddr) -> StatusCode {
    let tcp = TcpStream::connect(b).await.unwrap();
    let tls = trellis_proxy::tls::connect(
        &proxy.shared.identity,
        &proxy.shared.metrics,
        B_ID,
        &b.to_string(),
        tcp,
        trellis_proxy::tls::Alpn::Http1,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "b")
        .body(full(""))
        .unwrap();
    sender.send_request(req).await.unwrap().status()
}

async fn identity_server(svc: TestIdentity) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(v1::identity_server::IdentityServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (addr, task)
}

#[tokio::test]
async fn controller_certificates_rotate_under_traffic_and_the_old_one_serves_while_the_controller_is_away()
 {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(new_ca("controller"));
    let app = app("b").await;
    let b = proxy(&server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ))
    .await;
    let svc = TestIdentity {
        ca: Arc::clone(&ca),
        lifetime: Duration::from_secs(3),
        token: Arc::new(Mutex::new(b"first-token".to_vec())),
        issued: Arc::new(AtomicUsize::new(0)),
        away: Arc::default(),
        asked: Arc::default(),
    };
    let (addr, _server) = identity_server(svc.clone()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first-token\n").unwrap();

    let config = Config::parse(
        &client_yaml(b.inbound.unwrap(), B_ID, ""),
        Path::new("test.yaml"),
    )
    .unwrap();
    let mut options = ProxyOptions::new(config);
    options.identity = Arc::new(IdentityStore::expecting());
    let a = trellis_proxy::start(options).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut certifier =
        CertifierOptions::new(SpiffeId::new("cluster.local", "shop", "a"), &token_file);
    certifier.min_backoff = Duration::from_millis(100);
    certifier.max_backoff = Duration::from_millis(300);
    tokio::spawn(identity::run_certifier(
        channel,
        certifier,
        Arc::clone(&a.shared.identity),
        a.shutdown_signal(),
    ));

    // Renewals at 70% of 3 s while requests keep flowing on fresh connections.
    let mut updates = a.shared.identity.subscribe();
    let started = Instant::now();
    let mut served = 0;
    let mut rotated_token = false;
    while *updates.borrow_and_update() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "only {} certificates in {:?}",
            *updates.borrow(),
            started.elapsed()
        );
        if *updates.borrow() >= 2 && !rotated_token {
            // The proof is re-read before every call (projected tokens rotate).
            *svc.token.lock().unwrap() = b"second-token".to_vec();
            std::fs::write(&token_file, "second-token").unwrap();
            rotated_token = true;
        }
        if a.shared.identity.current().is_some() {
            let (status, tag, body) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
            assert_eq!((status, tag.as_str()), (StatusCode::OK, "b"), "{body}");
            // New connections use the newest certificate, and B accepts it.
            assert_eq!(fresh_mtls_get(&a, b.inbound.unwrap()).await, StatusCode::OK);
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served > 10, "{served}");
    let id = a.shared.identity.current().unwrap();
    assert_eq!(id.credentials.id.to_string(), A_ID);

    // The controller goes away: the current certificate keeps serving until it expires...
    svc.away.store(true, Ordering::SeqCst);
    let issued_before = svc.issued.load(Ordering::SeqCst);
    let expires = id.credentials.not_after;
    let until = expires - Duration::from_millis(700);
    let mut served_while_away = 0;
    while SystemTime::now() < until {
        let (status, tag, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
        assert_eq!((status, tag.as_str()), (StatusCode::OK, "b"));
        assert_eq!(fresh_mtls_get(&a, b.inbound.unwrap()).await, StatusCode::OK);
        served_while_away += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_while_away >= 1);
    assert_eq!(svc.issued.load(Ordering::SeqCst), issued_before);
    // ...then mTLS fails closed.
    tokio::time::sleep(
        expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(100),
    )
    .await;
    let (status, reason, _) = H1::connect(a.http.unwrap()).await.get("b.shop", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "no-identity")
    );
}

#[tokio::test]
async fn opaque_tcp_rides_mtls_and_is_authorized_by_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let echo = {
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
    };
    let b = proxy(&format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{echo}\"\n  protocol: tcp\n  policy:\n    authorizations:\n      - identities: [\"{A_ID}\"]\n{}",
        identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca])
    ))
    .await;
    let a = proxy(&format!(
        "admin: 127.0.0.1:0\noutbound:\n  ports:\n    - listen: 127.0.0.1:0\n      destination: db.shop\ndestinations:\n  - authority: db.shop\n    protocol: tcp\n    backends:\n      - name: db\n        endpoints: [{{address: \"{}\", identity: \"{B_ID}\"}}]\n{}",
        b.inbound.unwrap(),
        identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca])
    ))
    .await;
    let mut conn = TcpStream::connect(a.ports[0]).await.unwrap();
    conn.write_all(b"hello over mtls").await.unwrap();
    let mut buf = [0u8; 15];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello over mtls");
    // Plaintext straight to B: no identity, so the connection is closed.
    let mut plain = TcpStream::connect(b.inbound.unwrap()).await.unwrap();
    let _ = plain.write_all(b"hello").await;
    let n = tokio::time::timeout(Duration::from_secs(8), plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn stalled_handshakes_time_out_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app("b").await;
    let yaml = server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ) + "limits: {tls_handshake_timeout_ms: 300}\n";
    let b = proxy(&yaml).await;
    let mut stalled = TcpStream::connect(b.inbound.unwrap()).await.unwrap();
    // The start of a TLS record, then nothing.
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("closed by the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let m = metrics(&b).await;
    assert!(
        m.contains(
            "trellis_tls_handshake_errors_total{direction=\"inbound\",reason=\"timeout\"} 1"
        ),
        "{m}"
    );
}

/// Kills the child process when dropped (also when an assertion fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_asks_the_controller_for_the_identity_its_flags_name() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestIdentity {
        ca: Arc::new(new_ca("controller")),
        lifetime: Duration::from_secs(3600),
        token: Arc::new(Mutex::new(b"bootstrap".to_vec())),
        issued: Arc::new(AtomicUsize::new(0)),
        away: Arc::default(),
        asked: Arc::default(),
    };
    let (addr, _server) = identity_server(svc.clone()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "bootstrap\n").unwrap();
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
            .args([
                "--controller",
                &format!("http://{addr}"),
                "--workload",
                "shop/a",
            ])
            .args(["--trust-domain", "example.org", "--admin", "127.0.0.1:0"])
            .arg("--identity-token-file")
            .arg(&token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while svc.issued.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no certificate issued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        svc.asked.lock().unwrap()[0],
        "spiffe://example.org/ns/shop/sa/a"
    );
}

#[tokio::test]
async fn client_certificates_without_exactly_one_spiffe_id_are_refused() {
    let (_dir, ca, app, _a, b) = mesh().await;
    let now = SystemTime::now();
    for uris in [
        vec![],
        vec![
            "spiffe://cluster.local/ns/shop/sa/a",
            "spiffe://cluster.local/ns/shop/sa/x",
        ],
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params(
            A_ID,
            now - Duration::from_secs(60),
            now + Duration::from_secs(600),
        );
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let verifier =
            trellis_proxy::tls::SpiffeServerVerifier::new(&[ca.der.clone().into()], B_ID).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(trellis_proxy::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let tcp = TcpStream::connect(b.inbound.unwrap()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("b.shop").unwrap();
        let outcome = async {
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            tls.write_all(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n").await?;
            let mut buf = [0u8; 64];
            tls.read(&mut buf).await
        }
        .await;
        assert!(
            matches!(outcome, Err(_) | Ok(0)),
            "{uris:?}: B answered: {outcome:?}"
        );
    }
    assert_eq!(app.hits(), 0);
    let m = metrics(&b).await;
    assert!(
        m.contains("trellis_tls_handshake_errors_total{direction=\"inbound\",reason=\"identity-mismatch\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn health_checks_probe_an_mtls_endpoint_through_its_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = flaky("b", Mode::FailPercent(100, 503)).await;
    // B lets only A in: a plaintext probe would be refused (403) before reaching the app.
    let b = proxy(&server_yaml(
        app.addr,
        A_ID,
        &identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
    ))
    .await;
    let a = proxy(&format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: b.shop\n    policy: {{healthCheck: {{httpPath: /healthz, interval: 100ms, timeout: 100ms, unhealthyThreshold: 2, healthyThreshold: 1}}}}\n    backends:\n      - name: b\n        endpoints: [{{address: \"{}\", identity: \"{B_ID}\"}}]\n{}",
        b.inbound.unwrap(),
        identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca]),
    ))
    .await;
    let gauge = |n: u32| format!("trellis_unhealthy_endpoints{{destination=\"b.shop\"}} {n}");
    let wait_for = |needle: String| {
        let a = &a;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !metrics(a).await.contains(&needle) {
                assert!(Instant::now() < deadline, "never: {needle}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    wait_for(gauge(1)).await;
    assert!(app.hits() >= 2, "the probes reached the app through B");
    assert!(
        metrics(&b)
            .await
            .contains(&format!("source_identity=\"{A_ID}\"")),
        "B saw them from A's proven identity"
    );
    app.set(Mode::Ok);
    wait_for(gauge(0)).await;
}
