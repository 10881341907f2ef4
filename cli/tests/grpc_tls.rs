//! The proxy -> controller link over TLS, with real processes on loopback: `trellis controller
//! --grpc-tls-name ...` (its serving certificate from the mesh CA in PEM files) and
//! `trellis-proxy --controller https://... --controller-ca ANCHORS`.
//!
//! - the right anchors: the proxy gets its certificate and its configuration and routes a call;
//! - other anchors, or a host the certificate does not name: refused, and the proxy's log says
//!   why (and it keeps retrying);
//! - renewal: with a short `--grpc-tls-lifetime`, a new connection sees a new certificate while
//!   a watch stream opened before keeps receiving updates on its first connection.
//!
//! `trellis-proxy` is another package's binary: it is found next to this test's executable,
//! where `cargo nextest run --workspace` (scripts/test) builds it
//! ([`trellis_testing::workspace_binary`] says how to build it when it is missing).

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest as _;
use trellis_echo::client::Connection;
use trellis_echo::echo::{EchoServer, Identity};
use trellis_proxy_api::v1::{self, destinations_client::DestinationsClient};
use trellis_testing::{ControllerProcess, controller_command, workspace_binary};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// A trust anchor and an issuer it signed, as PEM files in `dir/NAME-*.pem`; the anchor's
/// signer, to make another issuer.
struct CaFiles {
    anchors: PathBuf,
    issuer_cert: PathBuf,
    issuer_key: PathBuf,
    anchor: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn ca_files(dir: &Path, name: &str) -> CaFiles {
    let anchor_key = KeyPair::generate().unwrap();
    let anchor_params = ca_params(&format!("{name} anchor"));
    let anchor = anchor_params.self_signed(&anchor_key).unwrap();
    let files = CaFiles {
        anchors: dir.join(format!("{name}-anchors.pem")),
        issuer_cert: dir.join(format!("{name}-issuer.pem")),
        issuer_key: dir.join(format!("{name}-issuer.key")),
        anchor: Issuer::new(anchor_params, anchor_key),
    };
    std::fs::write(&files.anchors, anchor.pem()).unwrap();
    files.new_issuer(&format!("{name} issuer"));
    files
}

impl CaFiles {
    /// Writes a new issuer signed by the anchor (certificate and key, each file replaced
    /// atomically); returns its DER.
    fn new_issuer(&self, cn: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(cn).signed_by(&key, &self.anchor).unwrap();
        replace(&self.issuer_key, &key.serialize_pem());
        replace(&self.issuer_cert, &cert.pem());
        cert.der().to_vec()
    }
}

/// Replaces `path` with `text` atomically (a watcher never sees half a file).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The service `web` (the split's root) with one endpoint at `addr`.
fn services_yaml(addr: SocketAddr) -> String {
    format!(
        "namespace: demo\nservices:\n  - name: web\n    ports:\n      - {{ name: http, port: 8080, protocol: http }}\n    endpoints:\n      - {{ address: {}, port: {}, labels: {{ version: v1 }} }}\n",
        addr.ip(),
        addr.port()
    )
}

fn split_yaml(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{ name: web, namespace: demo }}\nspec:\n  service: web\n  backends:\n  - {{ service: web-v1, weight: {v1} }}\n  - {{ service: web-v2, weight: {v2} }}\n"
    )
}

/// A mesh's files: CA, bootstrap tokens of `demo/client` and `demo/web`, services and policy
/// (the split, and a TrafficTarget that lets the client call web).
struct Mesh {
    dir: tempfile::TempDir,
    ca: CaFiles,
    token: PathBuf,
    web_token: PathBuf,
    services: PathBuf,
    policy: PathBuf,
}

const CLIENT_TO_WEB: &str = "apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: { name: web-all-ports, namespace: demo }
spec:
  matches:
    ports: []
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: { name: client-to-web, namespace: demo }
spec:
  destination: { kind: ServiceAccount, name: web, namespace: demo }
  rules:
  - { kind: TCPRoute, name: web-all-ports }
  sources:
  - { kind: ServiceAccount, name: client, namespace: demo }
";

fn mesh(web: SocketAddr) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_files(dir.path(), "mesh");
    let token = dir.path().join("client.token");
    std::fs::write(&token, "client-secret\n").unwrap();
    let web_token = dir.path().join("web.token");
    std::fs::write(&web_token, "web-secret\n").unwrap();
    let sha = |t: &[u8]| hex::encode(sha2::Sha256::digest(t));
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!(
            "tokens:\n- workload: demo/client\n  sha256: {}\n- workload: demo/web\n  sha256: {}\n",
            sha(b"client-secret"),
            sha(b"web-secret")
        ),
    )
    .unwrap();
    let services = dir.path().join("services.yaml");
    std::fs::write(&services, services_yaml(web)).unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    std::fs::write(policy.join("split.yaml"), split_yaml(1, 0)).unwrap();
    std::fs::write(policy.join("access.yaml"), CLIENT_TO_WEB).unwrap();
    Mesh {
        dir,
        ca,
        token,
        web_token,
        services,
        policy,
    }
}

impl Mesh {
    /// `trellis controller` on this mesh's files, serving gRPC over TLS for `names`.
    fn controller(&self, names: &[&str], extra: &[&str]) -> ControllerProcess {
        let mut command = controller_command(TRELLIS);
        command
            .args(["--platform", &format!("file={}", arg(&self.services))])
            .args(["--policy", arg(&self.policy)])
            .args(["--trust-anchor", arg(&self.ca.anchors)])
            .args(["--issuer-cert", arg(&self.ca.issuer_cert)])
            .args(["--issuer-key", arg(&self.ca.issuer_key)])
            .args([
                "--bootstrap-tokens",
                arg(&self.dir.path().join("tokens.yaml")),
            ])
            .args(extra);
        for name in names {
            command.args(["--grpc-tls-name", name]);
        }
        ControllerProcess::spawn(&mut command)
    }
}

/// A `trellis-proxy` process; its stderr lines are collected; killed on drop.
struct Proxy {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// `demo/client` with an outbound HTTP listener.
    fn start(controller: &str, anchors: Option<&Path>, token: &Path) -> Self {
        Self::start_as(
            "demo/client",
            controller,
            anchors,
            token,
            &["--outbound-http", "127.0.0.1:0"],
        )
    }

    fn start_as(
        workload: &str,
        controller: &str,
        anchors: Option<&Path>,
        token: &Path,
        extra: &[&str],
    ) -> Self {
        let mut command = Command::new(workspace_binary("trellis-proxy", "trellis-proxy"));
        command
            .args(["--controller", controller])
            .args(["--workload", workload])
            .args(["--admin", "127.0.0.1:0"])
            .args(extra)
            .args(["--identity-token-file", arg(token)])
            .args(["--threads", "1"])
            .env("NO_COLOR", "1")
            .env_remove("TRELLIS_PROXY_CONTROLLER_CA")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(anchors) = anchors {
            command.args(["--controller-ca", arg(anchors)]);
        }
        let mut child = command.spawn().expect("starting trellis-proxy");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proxy { child, lines }
    }

    /// The first log line containing `needle`, waiting up to `limit`.
    fn wait_line(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {limit:?}; the proxy logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Its listener `key` (`http`, `inbound`), from the `trellis-proxy started` line.
    fn listener(&self, key: &str) -> SocketAddr {
        let line = self.wait_line("trellis-proxy started", Duration::from_secs(10));
        let needle = format!(" {key}=Some(");
        let start = line
            .find(&needle)
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            + needle.len();
        let rest = &line[start..];
        rest[..rest.find(')').unwrap()].parse().unwrap()
    }
}

/// Calls `web.demo` through the proxy until the echo app answers (the proxy may still be
/// learning the destination), or gives up after 10 s.
async fn call_until_answered(proxy: SocketAddr) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = match Connection::open(proxy, "client").await {
            Ok(mut c) => c.send("GET", "http://web.demo:8080/").await.ok(),
            Err(_) => None,
        };
        if let Some(answer) = &answer
            && answer.responder.is_some()
        {
            return answer.status;
        }
        assert!(
            Instant::now() < deadline,
            "no answer from the app through the proxy: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_the_mesh_anchors_gets_its_certificate_and_config_over_tls() {
    let app = EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Identity {
            service: "web".into(),
            version: "v1".into(),
        },
    )
    .await
    .unwrap();
    // The app sits behind web's inbound proxy, whose address the services file gets once known.
    let mesh = mesh("127.0.0.1:9".parse().unwrap());
    let ctl = mesh.controller(&["localhost", "127.0.0.1"], &[]);
    let url = format!("https://localhost:{}", ctl.grpc.port());
    let web = Proxy::start_as(
        "demo/web",
        &url,
        Some(&mesh.ca.anchors),
        &mesh.web_token,
        &["--inbound", &format!("127.0.0.1:0={}", app.addr())],
    );
    replace(&mesh.services, &services_yaml(web.listener("inbound")));
    let proxy = Proxy::start(&url, Some(&mesh.ca.anchors), &mesh.token);
    // Identity.Certify went over the TLS link, for both...
    proxy.wait_line("certificate obtained", Duration::from_secs(15));
    web.wait_line("certificate obtained", Duration::from_secs(15));
    // ...and so did Destinations.Watch and Inbound.Watch: the call goes client proxy -> mTLS ->
    // web proxy (authorized by the TrafficTarget) -> app.
    assert_eq!(call_until_answered(proxy.listener("http")).await, 200);
    for p in [&proxy, &web] {
        assert_eq!(p.count("TLS handshake failed"), 0, "{}", p.log());
    }

    // The IP address is a name of the certificate too.
    let by_ip = Proxy::start(
        &format!("https://127.0.0.1:{}", ctl.grpc.port()),
        Some(&mesh.ca.anchors),
        &mesh.token,
    );
    by_ip.wait_line("certificate obtained", Duration::from_secs(15));

    // The plaintext port is gone: a proxy speaking http:// gets nothing.
    let plain = Proxy::start(
        &format!("http://127.0.0.1:{}", ctl.grpc.port()),
        None,
        &mesh.token,
    );
    plain.wait_line("no valid certificate", Duration::from_secs(15));
    assert_eq!(plain.count("certificate obtained"), 0, "{}", plain.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_certificate_does_not_verify_is_refused_and_the_proxy_says_why() {
    let mesh = mesh("127.0.0.1:9".parse().unwrap());
    let ctl = mesh.controller(&["localhost"], &[]);
    let port = ctl.grpc.port();

    // Anchors of another CA: the chain does not verify.
    let other = ca_files(mesh.dir.path(), "other");
    let stranger = Proxy::start(
        &format!("https://localhost:{port}"),
        Some(&other.anchors),
        &mesh.token,
    );
    let line = stranger.wait_line("TLS handshake failed", Duration::from_secs(15));
    assert!(
        line.contains("ERROR")
            && line.contains(&format!("controller localhost:{port}"))
            && line.contains("UnknownIssuer")
            && line.contains(other.anchors.to_str().unwrap()),
        "{line}"
    );
    // It keeps trying (with backoff) and never gets a certificate.
    let deadline = Instant::now() + Duration::from_secs(15);
    while stranger.count("TLS handshake failed") < 2 {
        assert!(Instant::now() < deadline, "{}", stranger.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stranger.count("certificate obtained"), 0);
    // Its anchors file now holds the mesh's: the next connection verifies, with no restart.
    replace(
        &other.anchors,
        &std::fs::read_to_string(&mesh.ca.anchors).unwrap(),
    );
    stranger.wait_line("certificate obtained", Duration::from_secs(20));

    // The right anchors but a host the certificate does not name.
    let wrong_name = Proxy::start(
        &format!("https://127.0.0.1:{port}"),
        Some(&mesh.ca.anchors),
        &mesh.token,
    );
    let line = wrong_name.wait_line("TLS handshake failed", Duration::from_secs(15));
    assert!(
        line.contains("not valid for name") && line.contains("127.0.0.1"),
        "{line}"
    );
    assert_eq!(wrong_name.count("certificate obtained"), 0);
    // The controller counts the refused handshakes (each after the proxy has seen it fail).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = trellis_testing::http_get(ctl.admin, "/metrics").unwrap();
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix("trellis_controller_grpc_tls_handshake_failures_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{metrics}"));
        if failures >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{failures} handshake failures counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // https:// without anchors, and anchors with http://: clear errors at start.
    for (url, anchors, expected) in [
        (
            format!("https://localhost:{port}"),
            None,
            "https needs --controller-ca FILE",
        ),
        (
            format!("http://localhost:{port}"),
            Some(mesh.ca.anchors.as_path()),
            "the URL is http://, which would be plaintext",
        ),
    ] {
        let mut proxy = Proxy::start(&url, anchors, &mesh.token);
        let status = proxy.child.wait().unwrap();
        assert!(!status.success(), "{url}: {status}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proxy.log().contains(expected) {
            assert!(Instant::now() < deadline, "{url}: {}", proxy.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn bad_tls_flags_stop_the_controller_with_the_reason() {
    let mesh = mesh("127.0.0.1:9".parse().unwrap());
    let services = format!("file={}", arg(&mesh.services));
    for (args, expected) in [
        (
            vec!["--grpc-tls-name", "localhost"],
            "a CA generated in memory has none they can read",
        ),
        (
            vec![
                "--grpc-tls-name",
                "localhost:8090",
                "--trust-anchor",
                arg(&mesh.ca.anchors),
                "--issuer-cert",
                arg(&mesh.ca.issuer_cert),
                "--issuer-key",
                arg(&mesh.ca.issuer_key),
            ],
            "--grpc-tls-name \"localhost:8090\": not a DNS name or an IP address",
        ),
    ] {
        let out = controller_command(TRELLIS)
            .args(["--platform", &services])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A TLS client connection to `addr` for `host`, verified against `anchors`: the leaf
/// certificate the controller served, and the stream.
async fn tls_connect(
    addr: SocketAddr,
    host: &str,
    anchors: &Path,
) -> (
    Vec<u8>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(anchors).unwrap() {
        let cert: CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .expect("the controller's certificate verifies");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (leaf, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_renews_and_open_streams_keep_working() {
    let mesh = mesh("127.0.0.1:9".parse().unwrap());
    // 6 s: renewed after 4 s.
    let ctl = mesh.controller(&["localhost"], &["--grpc-tls-lifetime", "6s"]);
    let addr = ctl.grpc;

    // A watch stream on a channel whose connections we count and whose certificate we keep.
    let connections = Arc::new(AtomicUsize::new(0));
    let first_leaf = Arc::new(Mutex::new(None::<Vec<u8>>));
    let anchors = mesh.ca.anchors.clone();
    let (count, keep) = (Arc::clone(&connections), Arc::clone(&first_leaf));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (count, keep, anchors) = (Arc::clone(&count), Arc::clone(&keep), anchors.clone());
        async move {
            let (leaf, tls) = tls_connect(addr, "localhost", &anchors).await;
            count.fetch_add(1, Ordering::SeqCst);
            keep.lock().unwrap().get_or_insert(leaf);
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .unwrap();
    let mut stream = DestinationsClient::new(channel)
        .watch(v1::DestinationRequest {
            target: "web.demo".into(),
            source_workload: "demo/client".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let weights = |update: v1::DestinationUpdate| match update.kind {
        Some(v1::destination_update::Kind::Profile(p)) => p
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.weight))
            .collect::<Vec<_>>(),
        other => panic!("expected a profile, got {other:?}"),
    };
    let first = weights(stream.message().await.unwrap().unwrap());
    assert!(first.contains(&("web-v2".into(), 0)), "{first:?}");
    let old_leaf = first_leaf.lock().unwrap().clone().unwrap();

    // A new connection sees a new certificate once 2/3 of the lifetime has passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let new_leaf = loop {
        let (leaf, _) = tls_connect(addr, "localhost", &mesh.ca.anchors).await;
        if leaf != old_leaf {
            break leaf;
        }
        assert!(
            Instant::now() < deadline,
            "the serving certificate was not renewed within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let parse = |der: &[u8]| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        (cert.serial.clone(), cert.validity().not_after.timestamp())
    };
    let (old_serial, old_expiry) = parse(&old_leaf);
    let (new_serial, new_expiry) = parse(&new_leaf);
    assert_ne!(old_serial, new_serial);
    assert!(new_expiry > old_expiry, "{new_expiry} > {old_expiry}");

    // The stream opened before the renewal still carries updates, on its first connection: a
    // v2 endpoint appears and the split gives it half (a backend with no endpoints gets none).
    let mut both = services_yaml("127.0.0.1:9".parse().unwrap());
    both.push_str("      - { address: 127.0.0.2, port: 9, labels: { version: v2 } }\n");
    std::fs::write(&mesh.services, both).unwrap();
    std::fs::write(mesh.policy.join("split.yaml"), split_yaml(1, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an update on the old stream")
            .expect("the old stream is still open")
            .expect("the stream did not end");
        if weights(update).contains(&("web-v2".into(), 1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new weights on the old stream"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "no reconnect");

    // The renewal is visible in the metrics too.
    let (_, metrics) = trellis_testing::http_get(ctl.admin, "/metrics").unwrap();
    assert!(
        metrics.contains("trellis_controller_grpc_tls_renewals_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ca_issuer_signs_the_serving_certificate_at_once() {
    let mesh = mesh("127.0.0.1:9".parse().unwrap());
    // The default lifetime (24 h): only the CA change can renew it within the test.
    let ctl = mesh.controller(&["localhost"], &[]);
    let issuer_of = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[1].to_vec()
    };
    let (old_leaf, tls) = tls_connect(ctl.grpc, "localhost", &mesh.ca.anchors).await;
    let old_issuer = issuer_of(&tls);
    let new_issuer = mesh.ca.new_issuer("mesh issuer 2");
    assert_ne!(old_issuer, new_issuer);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (leaf, tls) = tls_connect(ctl.grpc, "localhost", &mesh.ca.anchors).await;
        if issuer_of(&tls) == new_issuer {
            assert_ne!(leaf, old_leaf);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the serving certificate is not from the new issuer within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
