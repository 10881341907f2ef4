//! `/app-probe/...` on the admin port against real apps: a small hyper app with a path per
//! outcome (200, 500, a redirect, a header check, a slow answer), the same over HTTPS with a
//! self-signed certificate, TCP probes of open and closed ports; then the real binary with
//! `TRELLIS_PROXY_APP_PROBES`, and bad probe JSON refused at start.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::H1;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use trellis_proxy::ProxyOptions;
use trellis_proxy::app_probe::{self, AppProbes};
use trellis_proxy::config::Config;

async fn probe_app_answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, location) = match req.uri().path() {
        "/ok" => (StatusCode::OK, None),
        "/fail" => (StatusCode::INTERNAL_SERVER_ERROR, None),
        "/moved" => (StatusCode::FOUND, Some("/elsewhere")),
        "/header"
            if req
                .headers()
                .get("x-probe")
                .is_some_and(|v| v == "liveness") =>
        {
            (StatusCode::NO_CONTENT, None)
        }
        "/header" => (StatusCode::UNAUTHORIZED, None),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, None)
        }
        _ => (StatusCode::NOT_FOUND, None),
    };
    let mut response = Response::new(Full::new(Bytes::from(format!("{status}\n"))));
    *response.status_mut() = status;
    if let Some(location) = location {
        response
            .headers_mut()
            .insert("location", location.parse().unwrap());
    }
    Ok(response)
}

/// The probe app on 127.0.0.1, plain HTTP or HTTPS with a self-signed certificate.
async fn probe_app(tls: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(trellis_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(probe_app_answer);
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match acceptor {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                };
            });
        }
    });
    addr
}

/// A port with nothing listening (bound then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probes(http: u16, https: u16, closed: u16) -> String {
    format!(
        r#"{{
  "/app-probe/web/liveness": {{"port": {http}, "path": "/ok"}},
  "/app-probe/web/readiness": {{"port": {http}, "path": "/fail", "scheme": "HTTP"}},
  "/app-probe/web/startup": {{"port": {http}, "path": "/moved"}},
  "/app-probe/hdr/liveness": {{"port": {http}, "path": "/header", "headers": [{{"name": "X-Probe", "value": "liveness"}}]}},
  "/app-probe/slow/liveness": {{"port": {http}, "path": "/slow", "timeoutSeconds": 1}},
  "/app-probe/gone/liveness": {{"port": {closed}, "path": "/ok"}},
  "/app-probe/tls/readiness": {{"port": {https}, "path": "/ok", "scheme": "HTTPS"}},
  "/app-probe/db/readiness": {{"tcp": {http}}},
  "/app-probe/db/liveness": {{"tcp": {closed}}}
}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_probes_answer_for_the_app() {
    let http = probe_app(false).await;
    let https = probe_app(true).await;
    let closed = closed_port();
    let app_probes: AppProbes =
        app_probe::parse(&probes(http.port(), https.port(), closed)).unwrap();
    let config = Config::parse("admin: 127.0.0.1:0\n", Path::new("test.yaml")).unwrap();
    let mut options = ProxyOptions::new(config);
    options.app_probes = Arc::new(app_probes);
    let proxy = trellis_proxy::start(options).await.unwrap();
    let mut admin = H1::connect(proxy.admin.unwrap()).await;

    for (path, status, says) in [
        ("/app-probe/web/liveness", StatusCode::OK, "answered 200"),
        (
            "/app-probe/web/readiness",
            StatusCode::INTERNAL_SERVER_ERROR,
            "answered 500",
        ),
        (
            "/app-probe/web/startup",
            StatusCode::OK,
            "answered 302 Found (a redirect counts as success)",
        ),
        ("/app-probe/hdr/liveness", StatusCode::NO_CONTENT, ""),
        (
            "/app-probe/tls/readiness",
            StatusCode::OK,
            "https://127.0.0.1",
        ),
        ("/app-probe/db/readiness", StatusCode::OK, "connected to"),
        (
            "/app-probe/db/liveness",
            StatusCode::SERVICE_UNAVAILABLE,
            "refused",
        ),
        (
            "/app-probe/gone/liveness",
            StatusCode::SERVICE_UNAVAILABLE,
            "refused",
        ),
        ("/app-probe/nope/liveness", StatusCode::NOT_FOUND, "known: "),
    ] {
        let (got, _, body) = admin.get("admin", path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    // A redirect's Location is not passed on (the kubelet would follow it to the admin port).
    let redirect = admin
        .send(
            Request::get("/app-probe/web/startup")
                .header("host", "admin")
                .body(common::full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(redirect.status(), StatusCode::OK);
    assert!(redirect.headers().get("location").is_none());
    let _ = common::read(redirect).await;
    // An app slower than the probe's timeoutSeconds: 503 when the timeout passes.
    let slow_started = Instant::now();
    let (got, _, body) = admin.get("admin", "/app-probe/slow/liveness").await;
    assert_eq!(got, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no answer within 1s"), "{body}");
    assert!(slow_started.elapsed() < Duration::from_millis(2500));
    // The other admin endpoints are untouched.
    assert_eq!(admin.get("admin", "/live").await.0, StatusCode::OK);
    drop(admin);
    proxy.drain(Duration::from_secs(1)).await;
}

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_probes_from_the_environment_and_refuses_bad_json() {
    let http = probe_app(false).await;
    let admin_port = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, format!("admin: 127.0.0.1:{admin_port}\n")).unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env(
            "TRELLIS_PROXY_APP_PROBES",
            format!(
                r#"{{"/app-probe/web/readiness": {{"port": {}, "path": "/ok"}}}}"#,
                http.port()
            ),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the proxy's admin port never opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = H1::connect(admin)
        .await
        .get("admin", "/app-probe/web/readiness")
        .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, StatusCode::OK, "{body}");

    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env(
            "TRELLIS_PROXY_APP_PROBES",
            r#"{"/app-probe/web/readiness": {"port": "http"}}"#,
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--app-probes"), "{stderr}");
}
