//! Fuzz the inbound listener with what a peer sends: protocol detection, the TLS ClientHello
//! path, the mTLS handshake and the HTTP/1, h2 and opaque fronts behind it, on a real
//! in-process proxy (`trellis_proxy::start`) with a static identity from an rcgen CA, in front
//! of a real in-process hyper app. Everything is on 127.0.0.1.
//!
//! The first byte of an input chooses how its remaining bytes reach the listener:
//! - `0..=127`: raw over TCP (plaintext HTTP/1, h2 prior knowledge, opaque, or a ClientHello of
//!   the fuzzer's making: the first 0x16 byte sends it down the TLS accept path);
//! - `128..=191`: inside a completed mTLS session as the trusted client, ALPN by `mode % 3`:
//!   `http/1.1`, `h2`, none (the server then detects HTTP or opaque inside TLS), so the fronts
//!   behind TLS and the authorization of an authenticated caller are reached;
//! - `192..=255`: a TLS handshake without a client certificate (must be refused), then the
//!   bytes (which the server must never see as a request).
//!
//! Policy: the trusted client may do anything; plaintext callers from 127.0.0.0/8 may only
//! `GET /public/...`; the default denies. Checked besides "never panics / never hangs": a
//! refused handshake never yields data, and every 64 inputs the proxy still serves a
//! well-formed plaintext request (200 for `/public/ok`, 403 for `/private`) and an mTLS one,
//! so an input that wedges the listener (a leaked connection slot, a stuck handshake permit)
//! is found by the next check.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use trellis_proxy::config::Config;
use trellis_proxy::identity::{Credentials, IdentityStore};
use trellis_proxy::tls::{Alpn, TlsGeneration};
use trellis_proxy::{ProxyOptions, RunningProxy};

const SERVER_ID: &str = "spiffe://cluster.local/ns/fuzz/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/fuzz/sa/client";
/// How long one input may keep its connection before the harness closes it.
const PER_INPUT: Duration = Duration::from_millis(500);
const CHECK_EVERY: u64 = 64;
/// Bound on the harness's own handshakes (generous: ASan and a busy machine slow them).
const HANDSHAKE: Duration = Duration::from_secs(5);

struct Harness {
    runtime: Runtime,
    inbound: SocketAddr,
    /// The trusted client's TLS configurations (by ALPN).
    client_h1: Arc<rustls::ClientConfig>,
    client_h2: Arc<rustls::ClientConfig>,
    client_none: Arc<rustls::ClientConfig>,
    /// A client with no certificate (verifies the server the same way).
    anonymous: Arc<rustls::ClientConfig>,
    _proxy: RunningProxy,
    inputs: AtomicU64,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn leaf(issuer: &Issuer<'_, KeyPair>, id: &str) -> Leaf {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer).expect("leaf");
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// The app behind the inbound listener: 200 with a small body, HTTP/1.1 and h2c.
async fn serve_app(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"app"))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Offers no client certificate.
#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _root_hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "fuzz CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let anchor = ca.self_signed(&ca_key).expect("CA").der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let (server, client) = (leaf(&issuer, SERVER_ID), leaf(&issuer, CLIENT_ID));
        let server = Credentials::new(server.chain, server.key, vec![anchor.clone()]).expect("server");
        let client = Credentials::new(client.chain.clone(), client.key, vec![anchor]).expect("client");
        let client = TlsGeneration::new(client).expect("client TLS");
        let config = |alpn| client.client_config(SERVER_ID, alpn).expect("client config");
        let (client_h1, client_h2, client_none) = (config(Alpn::Http1), config(Alpn::H2), config(Alpn::None));
        // The same server verification, no client certificate.
        let mut anonymous = (*client_none).clone();
        anonymous.client_auth_cert_resolver = Arc::new(NoClientCert);
        let proxy = runtime.block_on(async {
            // A Rust binary ignores SIGPIPE before main; under libFuzzer's C++ main it would
            // kill the process when a peer closes first. A tokio handler (safe code) stands in.
            let mut sigpipe =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::pipe())
                    .expect("SIGPIPE handler");
            tokio::spawn(async move { while sigpipe.recv().await.is_some() {} });
            let app = TcpListener::bind("127.0.0.1:0").await.expect("app listener");
            let app_addr = app.local_addr().expect("app address");
            tokio::spawn(serve_app(app));
            let yaml = format!(
                "inbound:\n  listen: 127.0.0.1:0\n  app: \"{app_addr}\"\n  policy:\n    authorizations:\n      - identities: [\"{CLIENT_ID}\"]\n      - unauthenticated: true\n        networks: [127.0.0.0/8]\n        routes: [{{path_regex: \"/public/.*\", methods: [GET]}}]\nlimits:\n  header_read_timeout_ms: 300\n  detect_timeout_ms: 300\n  tls_handshake_timeout_ms: 3000\n  tcp_idle_timeout_ms: 300\n  connect_timeout_ms: 300\n"
            );
            let config = Config::parse(&yaml, std::path::Path::new("fuzz.yaml")).expect("fuzz config");
            let identity = Arc::new(IdentityStore::new());
            identity.publish(server).expect("server identity");
            let mut options = ProxyOptions::new(config);
            options.identity = identity;
            trellis_proxy::start(options).await.expect("proxy starts")
        });
        Harness {
            inbound: proxy.inbound.expect("inbound listener"),
            runtime,
            client_h1,
            client_h2,
            client_none,
            anonymous: Arc::new(anonymous),
            _proxy: proxy,
            inputs: AtomicU64::new(0),
        }
    })
}

/// Writes `data`, half-closes (so the server sees the end at once instead of waiting for its
/// read timeouts), and reads what comes back until EOF or the per-input bound.
async fn exchange<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, data: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PER_INPUT, async {
        let _ = io.write_all(data).await;
        let _ = io.flush().await;
        let _ = io.shutdown().await;
        let _ = io.read_to_end(&mut answer).await;
    })
    .await;
    answer
}

async fn tls(
    config: &Arc<rustls::ClientConfig>,
    inbound: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(inbound).await?;
    let name = ServerName::try_from("trellis.mesh").expect("name");
    tokio::time::timeout(
        HANDSHAKE,
        tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(answer.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// Sends one request (without half-closing: hyper's HTTP/1 server drops a connection whose
/// reader sees EOF before the response is out) and reads the answer until the server closes.
async fn request<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, path: &str) -> Vec<u8> {
    let head = format!("GET {path} HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(head.as_bytes()).await;
        let _ = io.read_to_end(&mut answer).await;
    })
    .await;
    answer
}

/// The proxy still answers well-formed requests as its policy says.
async fn check_alive(h: &Harness) {
    for (path, want) in [("/public/ok", 200), ("/private", 403)] {
        let tcp = TcpStream::connect(h.inbound).await.expect("connect");
        let answer = request(tcp, path).await;
        assert_eq!(
            status_of(&answer),
            Some(want),
            "plaintext {path}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    let stream = tls(&h.client_h1, h.inbound)
        .await
        .expect("mTLS handshake of the trusted client");
    let answer = request(stream, "/private").await;
    assert_eq!(
        status_of(&answer),
        Some(200),
        "mTLS /private: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    h.runtime.block_on(async {
        match mode {
            0..=127 => {
                let tcp = TcpStream::connect(h.inbound).await.expect("connect");
                exchange(tcp, rest).await;
            }
            128..=191 => {
                let config = match mode % 3 {
                    0 => &h.client_h1,
                    1 => &h.client_h2,
                    _ => &h.client_none,
                };
                let stream = tls(config, h.inbound)
                    .await
                    .expect("mTLS handshake of the trusted client");
                exchange(stream, rest).await;
            }
            _ => {
                if let Ok(stream) = tls(&h.anonymous, h.inbound).await {
                    // TLS 1.3: the client learns of the refusal only when it reads.
                    let answer = exchange(stream, rest).await;
                    assert!(
                        answer.is_empty(),
                        "a client without a certificate got {} bytes",
                        answer.len()
                    );
                }
            }
        }
        if h.inputs.fetch_add(1, Ordering::Relaxed) % CHECK_EVERY == 0 {
            check_alive(h).await;
        }
    });
});
