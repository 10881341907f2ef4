//! The ingress gateway through a real proxy: TLS terminated with the certificate the client's SNI
//! names (two hosts, a wildcard; an unknown name refused in the handshake), requests routed by
//! host to mesh destinations (a TrafficSplit behind the gateway, an unknown host answered 404),
//! h2 by ALPN, and the plain HTTP listener redirecting to HTTPS.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::certs::{Ca, new_ca};
use common::gateway::{connect, get, server_cert};
use common::{app, destination, full, proxy, read};
use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

struct Setup {
    ca: Ca,
    _dir: tempfile::TempDir,
    running: trellis_proxy::RunningProxy,
    v1: common::App,
    v2: common::App,
    api: common::App,
}

async fn setup() -> Setup {
    setup_with_routes(
        "    - host: shop.example.com
      destination: web.shop
    - host: eu.api.example.com
      destination: api.shop
",
    )
    .await
}

/// The gateway of [`setup`] with other `routes` (YAML list items); the destinations are
/// `web.shop` (the v1/v2 split), `web-v1.shop`, `web-v2.shop` and `api.shop`.
async fn setup_with_routes(routes: &str) -> Setup {
    let ca = new_ca("gateway test CA");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (shop_cert, shop_key) = server_cert(&ca, &["shop.example.com"]);
    let (api_cert, api_key) = server_cert(&ca, &["*.api.example.com"]);
    let shop = (write("shop.crt", &shop_cert), write("shop.key", &shop_key));
    let api_files = (write("api.crt", &api_cert), write("api.key", &api_key));
    let (v1, v2, api) = (app("web-v1").await, app("web-v2").await, app("api").await);
    let yaml = format!(
        "gateway:
  https: 127.0.0.1:0
  http_redirect: 127.0.0.1:0
  certificates:
    - hosts: [shop.example.com]
      cert: {}
      key: {}
    - hosts: [\"*.api.example.com\"]
      cert: {}
      key: {}
  routes:
{routes}destinations:
{}{}{}{}",
        shop.0,
        shop.1,
        api_files.0,
        api_files.1,
        destination(
            "web.shop",
            &[("web-v1", 50, &[v1.addr]), ("web-v2", 50, &[v2.addr])]
        ),
        destination("web-v1.shop", &[("web-v1", 1, &[v1.addr])]),
        destination("web-v2.shop", &[("web-v2", 1, &[v2.addr])]),
        destination("api.shop", &[("api", 1, &[api.addr])]),
    );
    let running = proxy(&yaml).await;
    Setup {
        ca,
        _dir: dir,
        running,
        v1,
        v2,
        api,
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_host_picks_the_destination() {
    let s = setup().await;
    let https = s.running.gateway_https.unwrap();

    // Each name gets its own certificate (the client checks it against the name it asked for).
    let tls = connect(&s.ca, https, "shop.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let tls = connect(&s.ca, https, "eu.api.example.com", &[b"http/1.1"])
        .await
        .unwrap();
    assert_ne!(
        leaf,
        tls.get_ref().1.peer_certificates().unwrap()[0],
        "the wildcard host got the other certificate"
    );
    // An unknown name, and a name one label too deep for the wildcard: no certificate, the
    // handshake fails.
    for unknown in ["other.example.com", "a.eu.api.example.com"] {
        let err = connect(&s.ca, https, unknown, &[b"http/1.1"])
            .await
            .expect_err(unknown);
        assert!(
            err.to_string().contains("UnrecognisedName")
                || err.to_string().contains("unrecognized")
                || err.to_string().contains("alert"),
            "{unknown}: {err}"
        );
    }

    // Routed by host through the outbound path: the split spreads web.shop over v1 and v2.
    for _ in 0..20 {
        let (status, app, _) = get(&s.ca, https, "shop.example.com", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(app == "web-v1" || app == "web-v2", "{app}");
    }
    assert!(
        s.v1.hits() >= 3 && s.v2.hits() >= 3,
        "the split: {} / {}",
        s.v1.hits(),
        s.v2.hits()
    );
    let (status, app, _) = get(&s.ca, https, "eu.api.example.com", "/").await;
    assert_eq!((status, app.as_str()), (StatusCode::OK, "api"));
    assert_eq!(s.api.hits(), 1);
}

#[tokio::test]
async fn a_host_without_a_route_gets_404_and_h2_is_served_by_alpn() {
    let s = setup().await;
    let https = s.running.gateway_https.unwrap();
    // The certificate covers the name (wildcard), but no route names the host.
    let (status, error, _) = get(&s.ca, https, "us.api.example.com", "/").await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::NOT_FOUND, "unknown-host")
    );
    assert_eq!(s.api.hits(), 0);

    let tls = connect(&s.ca, https, "eu.api.example.com", &[b"h2"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://eu.api.example.com/")
        .body(full(""))
        .unwrap();
    let (status, app, _) = read(sender.send_request(req).await.unwrap()).await;
    assert_eq!((status, app.as_str()), (StatusCode::OK, "api"));
}

#[tokio::test]
async fn plain_http_is_redirected_to_https() {
    let s = setup().await;
    let http = s.running.gateway_http.unwrap();
    let https_port = s.running.gateway_https.unwrap().port();
    let mut h1 = common::H1::connect(http).await;
    let resp = h1
        .send(
            Request::get("/cart?id=7")
                .header("host", "shop.example.com")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        resp.headers()["location"],
        format!("https://shop.example.com:{https_port}/cart?id=7").as_str()
    );
    assert_eq!(
        s.v1.hits() + s.v2.hits(),
        0,
        "nothing is proxied in plain HTTP"
    );
}

#[tokio::test]
async fn bad_gateway_settings_stop_the_start_with_the_field() {
    let config = trellis_proxy::config::Config::parse(
        "gateway:
  https: 127.0.0.1:0
  certificates:
    - hosts: [shop.example.com]
      cert: /nonexistent/shop.crt
      key: /nonexistent/shop.key
  routes: []
",
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    let err = match trellis_proxy::start(trellis_proxy::ProxyOptions::new(config)).await {
        Ok(_) => panic!("started with an unreadable certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("gateway.certificates[0]") && err.contains("/nonexistent/shop.crt"),
        "{err}"
    );
}

/// The gateway calls into the mesh over mTLS with its own identity, so the services' inbound
/// policies (TrafficTargets) decide what it may reach: `orders` allows the gateway, `billing`
/// allows another caller only.
#[tokio::test]
async fn the_gateway_reaches_only_the_services_that_allow_its_identity() {
    use common::certs::{identity_yaml, valid_leaf};
    const GATEWAY: &str = "spiffe://cluster.local/ns/edge/sa/gateway";
    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const BILLING: &str = "spiffe://cluster.local/ns/shop/sa/billing";
    let dir = tempfile::tempdir().unwrap();
    let mesh_ca = new_ca("mesh");
    let public_ca = new_ca("public");
    let service = |app: SocketAddr, allowed: &str, name: &str, id: &str| {
        format!(
            "inbound:\n  listen: 127.0.0.1:0\n  app: \"{app}\"\n  policy:\n    authorizations:\n      - identities: [\"{allowed}\"]\n{}",
            identity_yaml(dir.path(), name, &valid_leaf(&mesh_ca, id), &[&mesh_ca])
        )
    };
    let (orders_app, billing_app) = (app("orders").await, app("billing").await);
    let orders = proxy(&service(orders_app.addr, GATEWAY, "orders", ORDERS)).await;
    let billing = proxy(&service(
        billing_app.addr,
        "spiffe://cluster.local/ns/shop/sa/web",
        "billing",
        BILLING,
    ))
    .await;
    let (cert, key) = server_cert(&public_ca, &["shop.example.com", "pay.example.com"]);
    std::fs::write(dir.path().join("public.crt"), cert).unwrap();
    std::fs::write(dir.path().join("public.key"), key).unwrap();
    let gateway = proxy(&format!(
        "gateway:
  https: 127.0.0.1:0
  certificates:
    - hosts: [shop.example.com, pay.example.com]
      cert: {d}/public.crt
      key: {d}/public.key
  routes:
    - host: shop.example.com
      destination: orders.shop
    - host: pay.example.com
      destination: billing.shop
destinations:
  - authority: orders.shop
    backends:
      - name: orders
        endpoints: [{{address: \"{o}\", identity: \"{ORDERS}\"}}]
  - authority: billing.shop
    backends:
      - name: billing
        endpoints: [{{address: \"{b}\", identity: \"{BILLING}\"}}]
{id}",
        d = dir.path().display(),
        o = orders.inbound.unwrap(),
        b = billing.inbound.unwrap(),
        id = identity_yaml(
            dir.path(),
            "gateway",
            &valid_leaf(&mesh_ca, GATEWAY),
            &[&mesh_ca]
        ),
    ))
    .await;
    let https = gateway.gateway_https.unwrap();
    let (status, app, _) = get(&public_ca, https, "shop.example.com", "/").await;
    assert_eq!((status, app.as_str()), (StatusCode::OK, "orders"));
    let (status, error, _) = get(&public_ca, https, "pay.example.com", "/").await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::FORBIDDEN, "forbidden"),
        "billing does not allow the gateway's identity"
    );
    assert_eq!((orders_app.hits(), billing_app.hits()), (1, 0));
}

/// A certificate file rewritten under a running gateway: the next handshakes get the new
/// certificate; a broken rewrite is not applied and the last good certificate keeps serving.
#[tokio::test]
async fn certificates_are_reloaded_when_their_files_change_and_a_broken_set_is_not_applied() {
    let s = setup().await;
    let https = s.running.gateway_https.unwrap();
    let leaf = |tls: &TlsStream<TcpStream>| tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let before = leaf(
        &connect(&s.ca, https, "shop.example.com", &[b"http/1.1"])
            .await
            .unwrap(),
    );
    let (cert, key) = server_cert(&s.ca, &["shop.example.com"]);
    // The key first, then the certificate: in between, the pair does not match and must not
    // be applied.
    std::fs::write(s._dir.path().join("shop.key"), key).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = leaf(
        &connect(&s.ca, https, "shop.example.com", &[b"http/1.1"])
            .await
            .expect("the last good certificate still serves"),
    );
    assert_eq!(during, before, "a key that does not match was applied");
    std::fs::write(s._dir.path().join("shop.crt"), cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = leaf(
            &connect(&s.ca, https, "shop.example.com", &[b"http/1.1"])
                .await
                .unwrap(),
        );
        if now != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, _) = get(&s.ca, https, "shop.example.com", "/").await;
    assert_eq!(status, StatusCode::OK);
}

/// `gateway.jwt`: every request through the gateway shows a valid token or gets 401 with the
/// reason; verified claims reach the destination as headers, the client's copies removed.
#[tokio::test]
async fn the_gateway_checks_end_user_tokens_before_routing() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{EncodingKey, Header};
    let ca = new_ca("gateway test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_cert(&ca, &["shop.example.com"]);
    std::fs::write(dir.path().join("shop.crt"), cert).unwrap();
    std::fs::write(dir.path().join("shop.key"), key).unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&encoding, jsonwebtoken::Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    // An app that answers with the `x-jwt-sub` it received.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = listener.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let sub = req
                        .headers()
                        .get("x-jwt-sub")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(sub))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let running = proxy(&format!(
        "gateway:
  https: 127.0.0.1:0
  certificates:
    - hosts: [shop.example.com]
      cert: {d}/shop.crt
      key: {d}/shop.key
  routes:
    - host: shop.example.com
      destination: web.shop
  jwt:
    required: true
    providers:
      - issuer: https://issuer.test
        audiences: [shop]
        jwks: {{file: {d}/jwks.json}}
        algorithms: [ES256]
        forwardClaimsAs: [{{claim: sub, header: x-jwt-sub}}]
destinations:
{}",
        destination("web.shop", &[("web", 1, &[web_addr])]),
        d = dir.path().display(),
    ))
    .await;
    let https = running.gateway_https.unwrap();
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = |aud: &str| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({"iss": "https://issuer.test", "aud": aud, "sub": "alice", "exp": exp}),
            &encoding,
        )
        .unwrap()
    };
    let send = |token: Option<String>| {
        let ca = &ca;
        async move {
            let tls = connect(ca, https, "shop.example.com", &[b"http/1.1"])
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut req = Request::get("/")
                .header("host", "shop.example.com")
                .header("x-jwt-sub", "mallory");
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            sender
                .send_request(req.body(full("")).unwrap())
                .await
                .unwrap()
        }
    };
    let missing = send(None).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(missing.headers()["x-trellis-error"], "jwt-missing");
    assert!(missing.headers().contains_key("www-authenticate"));
    let wrong = send(Some(token("other"))).await;
    assert_eq!(wrong.headers()["x-trellis-error"], "jwt-wrong-audience");
    let count = || hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        count(),
        0,
        "nothing unauthenticated reached the destination"
    );
    let (status, _, seen_sub) = read(send(Some(token("shop"))).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count(), 1);
    assert_eq!(
        seen_sub, "alice",
        "the verified claim replaced the client's x-jwt-sub"
    );
}

/// Path routes: within a host the longest matching prefix wins, by whole segments; a host whose
/// prefixes do not match the path gets `404 no-route`, a host without routes `404 unknown-host`.
#[tokio::test]
async fn paths_are_routed_by_the_longest_whole_segment_prefix() {
    let s = setup_with_routes(
        "    - host: shop.example.com
      destination: web-v1.shop
    - host: shop.example.com
      path_prefix: /api
      destination: api.shop
    - host: shop.example.com
      path_prefix: /api/v2/
      destination: web-v2.shop
    - host: eu.api.example.com
      path_prefix: /only
      destination: api.shop
",
    )
    .await;
    let https = s.running.gateway_https.unwrap();
    for (host, path, expected) in [
        ("shop.example.com", "/", "web-v1"),
        ("shop.example.com", "/api", "api"),
        ("shop.example.com", "/api/orders?id=1", "api"),
        ("shop.example.com", "/apix", "web-v1"),
        ("shop.example.com", "/api/v2", "web-v2"),
        ("shop.example.com", "/api/v2/orders", "web-v2"),
        ("shop.example.com", "/api/v2x", "api"),
        ("eu.api.example.com", "/only/a", "api"),
        ("eu.api.example.com", "/", "no-route"),
        ("eu.api.example.com", "/onlyx", "no-route"),
        ("us.api.example.com", "/only", "unknown-host"),
    ] {
        let (status, answer, _) = get(&s.ca, https, host, path).await;
        assert_eq!(answer, expected, "{host}{path}");
        let expected_status = if ["no-route", "unknown-host"].contains(&expected) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(status, expected_status, "{host}{path}");
    }
    // Counted by the apps themselves, not only by their answers.
    assert_eq!((s.v1.hits(), s.api.hits(), s.v2.hits()), (2, 4, 2));
}

/// A Gateway document's certificate list reloads with its routes: a host added to the document
/// with its own certificate is served (handshake and route) once the file changes, and one
/// removed is refused in the handshake from then on.
#[tokio::test]
async fn a_gateway_document_adds_and_removes_certificates_and_routes_when_it_changes() {
    let ca = new_ca("gateway test CA");
    let dir = tempfile::tempdir().unwrap();
    for (name, host) in [("shop", "shop.example.com"), ("blog", "blog.example.com")] {
        let (cert, key) = server_cert(&ca, &[host]);
        std::fs::write(dir.path().join(format!("{name}.crt")), cert).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), key).unwrap();
    }
    let (web, blog) = (app("web").await, app("blog").await);
    let document = |sites: &[(&str, &str)]| {
        let mut certificates = String::new();
        let mut routes = String::new();
        for (name, host) in sites {
            certificates += &format!(
                "    - hosts: [{host}]\n      certFile: {name}.crt\n      keyFile: {name}.key\n"
            );
            routes += &format!("    - host: {host}\n      service: {{name: {name}, port: 80}}\n");
        }
        format!(
            "apiVersion: policy.trellis.io/v1alpha1\nkind: Gateway\nmetadata: {{name: public, namespace: shop}}\nspec:\n  https: {{port: 1, address: 127.0.0.1}}\n  certificates:\n{certificates}  routes:\n{routes}"
        )
    };
    let path = dir.path().join("gateway.yaml");
    let replace = |text: String| {
        let next = path.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(next, &path).unwrap();
    };
    replace(document(&[("shop", "shop.example.com")]));
    let mut gateway = trellis_proxy::gateway::read_document(&path).unwrap();
    // Any free port for the test (the document's port is what a deployment binds).
    gateway.https = "127.0.0.1:0".parse().unwrap();
    let mut config = trellis_proxy::config::Config::parse(
        &format!(
            "destinations:\n{}{}",
            destination("shop.shop", &[("web", 1, &[web.addr])]),
            destination("blog.shop", &[("blog", 1, &[blog.addr])])
        ),
        std::path::Path::new("t.yaml"),
    )
    .unwrap();
    config.gateway = Some(gateway);
    let mut options = trellis_proxy::ProxyOptions::new(config);
    options.gateway_document = Some(path.clone());
    let running = trellis_proxy::start(options).await.unwrap();
    let https = running.gateway_https.unwrap();
    assert_eq!(get(&ca, https, "shop.example.com", "/").await.1, "web");
    assert!(
        connect(&ca, https, "blog.example.com", &[b"http/1.1"])
            .await
            .is_err(),
        "no certificate for blog yet"
    );

    replace(document(&[
        ("shop", "shop.example.com"),
        ("blog", "blog.example.com"),
    ]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connect(&ca, https, "blog.example.com", &[b"http/1.1"])
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&ca, https, "blog.example.com", "/").await.1, "blog");

    replace(document(&[("blog", "blog.example.com")]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connect(&ca, https, "shop.example.com", &[b"http/1.1"])
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed certificate still serves"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&ca, https, "blog.example.com", "/").await.1, "blog");
    assert_eq!(web.hits(), 1);
}
