//! `Identity.Certify` end to end: a controller started in-process with a CA from PEM files (or a
//! Kubernetes Secret), a real tonic client sending rcgen CSRs, and the returned chains verified
//! with rustls' WebPKI client verifier against the returned anchors. Proofs: bootstrap tokens
//! and ServiceAccount tokens checked with TokenReview against the fake API server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use trellis_controller::discovery::Platform;
use trellis_controller::identity::{CaSource, Certifier, IdentityOptions};
use trellis_controller::run::{Options, Running, start_with_identity};
use trellis_controller_core::index::IndexOptions;
use trellis_proxy_api::v1::{self, identity_client::IdentityClient};
use trellis_testing::{ControllerProcess, controller_command};
use x509_parser::prelude::GeneralName;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// A CA certificate and its key, PEM.
struct Ca {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A self-signed anchor and an issuer signed by it.
fn anchor_and_issuer(name: &str) -> (Ca, Ca) {
    let anchor_key = KeyPair::generate().unwrap();
    let anchor_params = ca_params(&format!("{name} anchor"));
    let anchor = anchor_params.self_signed(&anchor_key).unwrap();
    let issuer_key = KeyPair::generate().unwrap();
    let signer = Issuer::new(anchor_params, &anchor_key);
    let issuer = ca_params(&format!("{name} issuer"))
        .signed_by(&issuer_key, &signer)
        .unwrap();
    (
        Ca {
            cert_pem: anchor.pem(),
            key_pem: anchor_key.serialize_pem(),
            der: anchor.der().to_vec(),
        },
        Ca {
            cert_pem: issuer.pem(),
            key_pem: issuer_key.serialize_pem(),
            der: issuer.der().to_vec(),
        },
    )
}

/// Writes through a rename so a poller never sees half a file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sha256_hex(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

struct CaFiles {
    anchors: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn write_ca(dir: &Path, anchors: &[&Ca], issuer: &Ca) -> CaFiles {
    let files = CaFiles {
        anchors: dir.join("anchors.pem"),
        cert: dir.join("issuer.pem"),
        key: dir.join("issuer.key"),
    };
    let bundle: String = anchors.iter().map(|a| a.cert_pem.as_str()).collect();
    write(&files.anchors, &bundle);
    write(&files.cert, &issuer.cert_pem);
    write(&files.key, &issuer.key_pem);
    files
}

fn files_source(files: &CaFiles) -> CaSource {
    CaSource::Files {
        anchors: vec![files.anchors.clone()],
        issuer_cert: files.cert.clone(),
        issuer_key: files.key.clone(),
    }
}

async fn controller(dir: &Path, identity: IdentityOptions) -> Running {
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, "namespace: shop\nservices: []\n").unwrap();
    start_with_identity(
        Options {
            policy_paths: Vec::new(),
            platforms: vec![Platform::File(mesh)],
            adapters: Default::default(),
            webhooks: None,
            traffic_metrics: None,
            grpc: "127.0.0.1:0".parse().unwrap(),
            admin: Some("127.0.0.1:0".parse().unwrap()),
            index: IndexOptions::default(),
        },
        identity,
        Vec::new(),
    )
    .await
    .unwrap()
}

async fn client(running: &Running) -> IdentityClient<tonic::transport::Channel> {
    IdentityClient::connect(format!("http://{}", running.grpc))
        .await
        .unwrap()
}

/// A CSR (DER) asking for `sans` as URIs, and the key it holds.
fn csr(sans: &[&str]) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (der, key)
}

async fn certify(
    client: &mut IdentityClient<tonic::transport::Channel>,
    identity: &str,
    csr_for: &[&str],
    proof: &[u8],
) -> Result<v1::CertifyResponse, tonic::Status> {
    let (csr_der, _key) = csr(csr_for);
    client
        .certify(v1::CertifyRequest {
            identity: identity.into(),
            csr_der,
            proof: proof.to_vec(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Verifies the chain as a peer proxy would (rustls WebPKI, client auth, ring), and checks the
/// leaf: exactly `uri` as URI SAN, not a CA, valid now for about `lifetime`.
fn verify(response: &v1::CertifyResponse, uri: &str, lifetime: Duration) {
    let mut roots = rustls::RootCertStore::empty();
    for anchor in &response.trust_anchors_der {
        roots.add(CertificateDer::from(anchor.clone())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = response
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .expect("the chain verifies to a returned anchor");

    let (_, leaf) = x509_parser::parse_x509_certificate(&response.chain_der[0]).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, vec![format!("URI:{uri}")]);
    assert!(!leaf.is_ca());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert!(
        not_before < now && now - not_before < 600,
        "backdated a little"
    );
    let expected = now + lifetime.as_secs() as i64;
    assert!((not_after - expected).abs() < 60, "lifetime {lifetime:?}");
    assert_eq!(response.expires_at_unix, not_after);
    if response.chain_der.len() > 1 {
        let (_, issuer) = x509_parser::parse_x509_certificate(&response.chain_der[1]).unwrap();
        assert_eq!(leaf.issuer(), issuer.subject());
    }
}

async fn metrics(running: &Running) -> String {
    let mut stream = tokio::net::TcpStream::connect(running.admin.unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

fn tokens_yaml(entries: &[(&str, &str)]) -> String {
    let mut yaml = String::from("tokens:\n");
    for (workload, token) in entries {
        yaml.push_str(&format!(
            "- workload: {workload}\n  sha256: {}\n",
            sha256_hex(token)
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_gets_a_chain_to_the_anchor_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (anchor, issuer) = anchor_and_issuer("files");
    let files = write_ca(dir.path(), &[&anchor], &issuer);
    let tokens = dir.path().join("tokens.yaml");
    write(
        &tokens,
        &tokens_yaml(&[("shop/web", "web-token\n"), ("shop/db", "db-token")]),
    );
    let lifetime = Duration::from_secs(3600);
    let running = controller(
        dir.path(),
        IdentityOptions {
            ca: files_source(&files),
            cert_lifetime: lifetime,
            bootstrap_tokens: Some(tokens),
            ..IdentityOptions::default()
        },
    )
    .await;
    let mut client = client(&running).await;

    // The token file as the operator wrote it (with its newline) and trimmed both prove web.
    for proof in [&b"web-token\n"[..], b"web-token"] {
        let response = certify(&mut client, WEB, &[WEB], proof).await.unwrap();
        assert_eq!(response.chain_der.len(), 2, "leaf and issuer");
        assert_eq!(response.chain_der[1], issuer.der);
        assert_eq!(response.trust_anchors_der, vec![anchor.der.clone()]);
        verify(&response, WEB, lifetime);
    }

    let refused = [
        (WEB, vec![WEB], &b""[..], Code::Unauthenticated, "no proof"),
        (
            WEB,
            vec![WEB],
            b"guess",
            Code::Unauthenticated,
            "bootstrap token",
        ),
        (
            WEB,
            vec![WEB],
            b"db-token",
            Code::PermissionDenied,
            "shop/db",
        ),
        (
            WEB,
            vec![DB],
            b"web-token",
            Code::InvalidArgument,
            "subject alternative names",
        ),
        (
            WEB,
            vec![WEB, DB],
            b"web-token",
            Code::InvalidArgument,
            "subject alternative names",
        ),
        (
            "spiffe://other.domain/ns/shop/sa/web",
            vec!["spiffe://other.domain/ns/shop/sa/web"],
            b"web-token",
            Code::PermissionDenied,
            "trust domain",
        ),
        (
            "shop/web",
            vec![WEB],
            b"web-token",
            Code::InvalidArgument,
            "SPIFFE id",
        ),
    ];
    for (identity, sans, proof, code, says) in refused {
        let status = certify(&mut client, identity, &sans, proof)
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{identity} {sans:?}: {status:?}");
        assert!(status.message().contains(says), "{status:?}");
        assert!(!status.message().contains("token\n") && !status.message().contains("web-token"));
    }
    let garbage = client
        .certify(v1::CertifyRequest {
            identity: WEB.into(),
            csr_der: b"not a csr".to_vec(),
            proof: b"web-token".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);

    let text = metrics(&running).await;
    assert!(
        text.contains("trellis_controller_certificates_issued_total 2"),
        "{text}"
    );
    for (reason, n) in [
        ("unproven", 2),
        ("other_identity", 1),
        ("bad_csr", 3),
        ("trust_domain", 1),
    ] {
        let line =
            format!("trellis_controller_certificates_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(text.contains(&line), "{line} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_rotation_serves_old_and_new_anchors_and_a_bad_reload_keeps_the_last_good_ca()
{
    let dir = tempfile::tempdir().unwrap();
    let (old_anchor, old_issuer) = anchor_and_issuer("old");
    let files = write_ca(dir.path(), &[&old_anchor], &old_issuer);
    let tokens = dir.path().join("tokens.yaml");
    write(&tokens, &tokens_yaml(&[("shop/web", "t")]));
    let running = controller(
        dir.path(),
        IdentityOptions {
            ca: files_source(&files),
            bootstrap_tokens: Some(tokens),
            file_poll: Duration::from_millis(50),
            ..IdentityOptions::default()
        },
    )
    .await;
    let mut client = client(&running).await;
    let first = certify(&mut client, WEB, &[WEB], b"t").await.unwrap();
    assert_eq!(first.trust_anchors_der, vec![old_anchor.der.clone()]);

    // A broken key file: refused, reported, the old CA keeps signing.
    let mut errors = running.identity.ca().errors();
    write(
        &files.key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let error = tokio::time::timeout(Duration::from_secs(5), errors.wait_for(Option::is_some))
        .await
        .expect("the bad key is reported")
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(error.origin, files.key.display().to_string());
    let still = certify(&mut client, WEB, &[WEB], b"t").await.unwrap();
    assert_eq!(still.version, first.version);
    write(&files.key, &old_issuer.key_pem);

    // Step 1 and 2 of a rotation: both anchors trusted, the new issuer signs.
    let (new_anchor, new_issuer) = anchor_and_issuer("new");
    write_ca(dir.path(), &[&old_anchor, &new_anchor], &new_issuer);
    let deadline = Instant::now() + Duration::from_secs(10);
    let rotated = loop {
        let response = certify(&mut client, WEB, &[WEB], b"t").await.unwrap();
        if response.chain_der.get(1) == Some(&new_issuer.der) {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "the new issuer is not used within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        rotated.trust_anchors_der,
        vec![old_anchor.der.clone(), new_anchor.der.clone()]
    );
    assert_ne!(rotated.version, first.version);
    verify(&rotated, WEB, Duration::from_secs(24 * 3600));
    assert!(running.identity.ca().errors().borrow().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ca_material_stops_the_start_with_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (anchor, issuer) = anchor_and_issuer("a");
    let (_, stranger) = anchor_and_issuer("b");
    let start = |source| async move {
        Certifier::start(
            &IdentityOptions {
                ca: source,
                ..IdentityOptions::default()
            },
            "cluster.local",
        )
        .await
        .map(|_| ())
        .unwrap_err()
    };
    // An issuer from another CA.
    let files = write_ca(dir.path(), &[&anchor], &stranger);
    let err = format!("{:#}", start(files_source(&files)).await);
    assert!(
        err.contains("issuer.pem") && err.contains("does not chain"),
        "{err}"
    );
    // The issuer's certificate with another key.
    write(&files.cert, &issuer.cert_pem);
    write(&files.key, &stranger.key_pem);
    let err = format!("{:#}", start(files_source(&files)).await);
    assert!(
        err.contains("issuer.key") && err.contains("does not match"),
        "{err}"
    );
    // A missing file.
    let err = format!(
        "{:#}",
        start(CaSource::Files {
            anchors: vec![dir.path().join("nope.pem")],
            issuer_cert: files.cert.clone(),
            issuer_key: files.key.clone(),
        })
        .await
    );
    assert!(
        err.contains("nope.pem") && err.contains("cannot read"),
        "{err}"
    );
}

/// TokenReview and the CA Secret: the parts that need the `kubernetes` feature (and the fake
/// API server).
#[cfg(feature = "kubernetes")]
mod kubernetes {
    use super::*;
    use trellis_kube_fake::{FakeApiServer, ResourceType};
    use trellis_testing::kube_client;

    async fn kube_fake() -> (FakeApiServer, kube::Client) {
        let server = FakeApiServer::start().await.unwrap();
        let client = kube_client(&server);
        (server, client)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn service_account_tokens_are_checked_with_token_review() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, kube) = kube_fake().await;
        let running = controller(
            dir.path(),
            IdentityOptions {
                token_review: true,
                kube: Some(kube),
                ..IdentityOptions::default()
            },
        )
        .await;
        let mut client = client(&running).await;
        let web = fake.issue_service_account_token("shop", "web", &["trellis"]);
        let response = certify(&mut client, WEB, &[WEB], web.as_bytes())
            .await
            .unwrap();
        verify(&response, WEB, Duration::from_secs(24 * 3600));

        let db = fake.issue_service_account_token("shop", "db", &["trellis"]);
        let status = certify(&mut client, WEB, &[WEB], db.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("shop/db"), "{status:?}");

        let other_audience = fake.issue_service_account_token("shop", "web", &["vault"]);
        let status = certify(&mut client, WEB, &[WEB], other_audience.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("audiences"), "{status:?}");

        fake.revoke_service_account_token(&web);
        let status = certify(&mut client, WEB, &[WEB], web.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            !status.message().contains(&web),
            "the token is never echoed"
        );

        // The API server away: UNAVAILABLE, so the proxy retries (and keeps its certificate).
        fake.begin_outage();
        let status = certify(&mut client, WEB, &[WEB], db.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    /// The CA Secret as cert-manager lays it out.
    fn secret_with(anchors_pem: &str, issuer: &Ca) -> k8s_openapi::api::core::v1::Secret {
        let data = [
            ("ca.crt", anchors_pem),
            ("tls.crt", issuer.cert_pem.as_str()),
            ("tls.key", issuer.key_pem.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
        .collect();
        k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("trellis-ca".into()),
                namespace: Some("trellis-system".into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ca_can_come_from_a_kubernetes_secret_and_rotate_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, kube) = kube_fake().await;
        fake.register(ResourceType::of::<k8s_openapi::api::core::v1::Secret>(true));
        let (anchor, issuer) = anchor_and_issuer("secret");
        let secret = secret_with(&anchor.cert_pem, &issuer);
        fake.put(&secret).unwrap();
        let tokens = dir.path().join("tokens.yaml");
        write(&tokens, &tokens_yaml(&[("shop/web", "t")]));
        let running = controller(
            dir.path(),
            IdentityOptions {
                ca: CaSource::Secret {
                    namespace: "trellis-system".into(),
                    name: "trellis-ca".into(),
                },
                kube: Some(kube),
                bootstrap_tokens: Some(tokens),
                secret_poll: Duration::from_millis(50),
                ..IdentityOptions::default()
            },
        )
        .await;
        let mut client = client(&running).await;
        let response = certify(&mut client, WEB, &[WEB], b"t").await.unwrap();
        assert_eq!(response.trust_anchors_der, vec![anchor.der.clone()]);
        assert_eq!(response.chain_der[1], issuer.der);
        verify(&response, WEB, Duration::from_secs(24 * 3600));

        // Rotation through the Secret: a second anchor in ca.crt and a new issuer.
        let (new_anchor, new_issuer) = anchor_and_issuer("secret-new");
        let rotated = secret_with(
            &format!("{}{}", anchor.cert_pem, new_anchor.cert_pem),
            &new_issuer,
        );
        fake.put(&rotated).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let response = certify(&mut client, WEB, &[WEB], b"t").await.unwrap();
            if response.chain_der.get(1) == Some(&new_issuer.der) {
                assert_eq!(
                    response.trust_anchors_der,
                    vec![anchor.der.clone(), new_anchor.der.clone()]
                );
                verify(&response, WEB, Duration::from_secs(24 * 3600));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Secret's new issuer is not used within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A Secret without the key is refused at start, naming the Secret and the key.
        let err = Certifier::start(
            &IdentityOptions {
                ca: CaSource::Secret {
                    namespace: "trellis-system".into(),
                    name: "missing".into(),
                },
                kube: Some(kube_fake().await.1),
                ..IdentityOptions::default()
            },
            "cluster.local",
        )
        .await
        .map(|_| ())
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("Secret trellis-system/missing"),
            "{err:#}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `trellis controller` as a process: the CA, token and access flags, `trellis check`.
// ---------------------------------------------------------------------------------------------

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// `trellis controller ARGS` as a process, its stderr kept for [`ControllerProcess::stop`].
fn start_process(args: &[&str]) -> ControllerProcess {
    ControllerProcess::spawn(
        controller_command(TRELLIS)
            .args(args)
            .stderr(std::process::Stdio::piped()),
    )
}

/// `trellis controller ARGS` that must fail at start: its stderr.
fn start_fails(args: &[&str]) -> String {
    let out = controller_command(TRELLIS).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_process_serves_certify_and_reports_the_access_switches() {
    let dir = tempfile::tempdir().unwrap();
    let (anchor, issuer) = anchor_and_issuer("process");
    let files = write_ca(dir.path(), &[&anchor], &issuer);
    let tokens = dir.path().join("tokens.yaml");
    write(&tokens, &tokens_yaml(&[("shop/web", "process-token")]));
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "namespace: shop\nservices: []\n").unwrap();
    let platform = format!("file={}", arg(&mesh));
    let process = start_process(&[
        "--platform",
        &platform,
        "--trust-anchor",
        arg(&files.anchors),
        "--issuer-cert",
        arg(&files.cert),
        "--issuer-key",
        arg(&files.key),
        "--cert-lifetime",
        "90m",
        "--bootstrap-tokens",
        arg(&tokens),
        "--permissive-namespace",
        "demo",
        "--plaintext-from",
        "10.0.0.0/8",
        "--plaintext-from",
        "127.0.0.1",
        "--plaintext-namespace",
        "ingress",
    ]);

    let mut client = IdentityClient::connect(format!("http://{}", process.grpc))
        .await
        .unwrap();
    let response = certify(&mut client, WEB, &[WEB], b"process-token")
        .await
        .unwrap();
    assert_eq!(response.trust_anchors_der, vec![anchor.der.clone()]);
    verify(&response, WEB, Duration::from_secs(90 * 60));

    // The inbound policy of a workload in the plaintext namespace carries both plaintext rules.
    let mut inbound =
        v1::inbound_client::InboundClient::connect(format!("http://{}", process.grpc))
            .await
            .unwrap();
    let mut stream = inbound
        .watch(v1::InboundRequest {
            workload: "ingress/gateway".into(),
            port: 80,
        })
        .await
        .unwrap()
        .into_inner();
    let policy = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let networks: Vec<Vec<String>> = policy
        .authorizations
        .iter()
        .filter(|a| a.unauthenticated && a.identities.is_empty())
        .map(|a| a.networks.clone())
        .collect();
    assert_eq!(
        networks,
        vec![
            vec!["10.0.0.0/8".to_owned(), "127.0.0.1/32".to_owned()],
            vec![]
        ]
    );
    assert_eq!(policy.default_action, v1::DefaultAction::Deny as i32);

    let check = std::process::Command::new(TRELLIS)
        .args(["check", "--admin", &process.admin.to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    for line in [
        "access: PERMISSIVE in namespace demo (default allow)",
        "access: plaintext allowed from 10.0.0.0/8, 127.0.0.1/32 (to every workload)",
        "access: plaintext allowed into namespace ingress from anywhere",
    ] {
        assert!(report.contains(line), "{line:?} in {report}");
    }

    // A broken tokens file is reported with its line; the last good tokens still work.
    write(&tokens, "tokens:\n- workload: shop/web\n  sha256: nothex\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    certify(&mut client, WEB, &[WEB], b"process-token")
        .await
        .expect("the last good tokens stay in force");
    let stderr = process.stop();
    for line in [
        "PERMISSIVE in namespace demo",
        "plaintext allowed from 10.0.0.0/8",
        "plaintext allowed into namespace ingress",
    ] {
        assert!(stderr.contains(line), "{line:?} in {stderr}");
    }
    let problem = stderr
        .lines()
        .find(|l| l.contains("problem: identity: bootstrap tokens"))
        .unwrap_or_else(|| panic!("no tokens problem in {stderr}"));
    assert!(
        problem.contains(arg(&tokens)) && problem.contains("line 2"),
        "{problem}"
    );
    assert!(!stderr.contains("process-token"), "a token reached the log");
}

#[test]
fn bad_ca_token_and_access_flags_stop_the_controller_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "namespace: shop\nservices: []\n").unwrap();
    let platform = format!("file={}", arg(&mesh));
    let base = ["--platform", platform.as_str()];

    let err = start_fails(&[&base[..], &["--plaintext-from", "10.0.0.1/8"]].concat());
    assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");

    let (anchor, issuer) = anchor_and_issuer("flags");
    let files = write_ca(dir.path(), &[&anchor], &issuer);
    let err = start_fails(&[&base[..], &["--issuer-cert", arg(&files.cert)]].concat());
    assert!(err.contains("--trust-anchor"), "{err}");

    let (_, other) = anchor_and_issuer("other");
    write(&files.key, &other.key_pem);
    let err = start_fails(
        &[
            &base[..],
            &[
                "--trust-anchor",
                arg(&files.anchors),
                "--issuer-cert",
                arg(&files.cert),
                "--issuer-key",
                arg(&files.key),
            ],
        ]
        .concat(),
    );
    assert!(
        err.contains(arg(&files.key)) && err.contains("does not match the issuer certificate"),
        "{err}"
    );

    let tokens = dir.path().join("tokens.yaml");
    write(&tokens, "tokens:\n- workload: shop\n  sha256: 00\n");
    let err = start_fails(&[&base[..], &["--bootstrap-tokens", arg(&tokens)]].concat());
    assert!(
        err.contains(arg(&tokens)) && err.contains("tokens[0]") && err.contains("line 2"),
        "{err}"
    );

    let err = start_fails(&[&base[..], &["--cert-lifetime", "soon"]].concat());
    assert!(err.contains("--cert-lifetime"), "{err}");
}

/// The proxy's own Certify client (key pair in memory, CSR, proof from a token file, chain
/// verification against the returned anchors) accepts what this controller answers: the two
/// sides of the contract agree. The token file is written as an operator would
/// (`base64 > token`, with its newline) and hashed with its newline (`sha256sum token`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_certifier_accepts_the_controller_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (anchor, issuer) = anchor_and_issuer("contract");
    let files = write_ca(dir.path(), &[&anchor], &issuer);
    let token_file = dir.path().join("web.token");
    std::fs::write(&token_file, "c2VjcmV0LXRva2VuLWZvci13ZWI=\n").unwrap();
    let tokens = dir.path().join("tokens.yaml");
    write(
        &tokens,
        &tokens_yaml(&[("shop/web", "c2VjcmV0LXRva2VuLWZvci13ZWI=\n")]),
    );
    let running = controller(
        dir.path(),
        IdentityOptions {
            ca: files_source(&files),
            bootstrap_tokens: Some(tokens),
            ..IdentityOptions::default()
        },
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let id: trellis_proxy_api::spiffe::SpiffeId = WEB.parse().unwrap();
    let options = trellis_proxy::identity::CertifierOptions::new(id.clone(), &token_file);
    let credentials = trellis_proxy::identity::certify_once(&channel, &options)
        .await
        .expect("the proxy accepts the certificate");
    assert!(credentials.valid_at(SystemTime::now()));

    // A proxy asking for an identity its token does not prove gets nothing.
    let db: trellis_proxy_api::spiffe::SpiffeId = DB.parse().unwrap();
    let options = trellis_proxy::identity::CertifierOptions::new(db, &token_file);
    assert!(
        trellis_proxy::identity::certify_once(&channel, &options)
            .await
            .is_err()
    );
}
