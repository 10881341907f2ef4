//! The webhooks served by the running `trellis controller` binary, as the API server uses them:
//! `--webhook 127.0.0.1:PORT --webhook-url https://127.0.0.1:PORT` against the fake API server.
//!
//! - the leader writes the mesh's trust anchors as `caBundle`, and the URL, into the five SMI
//!   CRDs' conversion settings and the injector's MutatingWebhookConfiguration;
//! - an HTTPS client that trusts exactly that `caBundle` (as the API server does) posts
//!   ConversionReviews of Flagger's TrafficSplit shapes in every version to every version and
//!   gets them back converted; a malformed review gets a 400 that says what is wrong;
//! - Flagger's writes at v1alpha1/2/3 through the fake API server (which converts through the
//!   CRDs' webhook, as a real one does) read back identically at every version and come into
//!   force;
//! - `/inject` on the same port: a Deployment's pod gets the init container and the proxy (with
//!   the controller's URL and the mesh's anchors inline); a hostNetwork pod is admitted unchanged
//!   and an Event says why;
//! - the serving certificate is renewed (short `--webhook-tls-lifetime`) and still chains to the
//!   bundle; a new trust anchor added to the anchors file is written into every bundle.
#![cfg(feature = "kubernetes")]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use trellis_kube_fake::ResourceType;
use trellis_testing::{
    ControllerProcess, controller_command, free_port, kube_client, poll_until as until,
    smi_api_server, write_kubeconfig,
};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Writes a self-signed anchor and an issuer it signed into `dir`; returns the anchor's PEM.
fn write_ca(dir: &Path) -> String {
    let anchor_key = KeyPair::generate().unwrap();
    let anchor_params = ca_params("webhook test anchor");
    let anchor = anchor_params.self_signed(&anchor_key).unwrap();
    let signer = Issuer::new(anchor_params, anchor_key);
    let issuer_key = KeyPair::generate().unwrap();
    let issuer = ca_params("webhook test issuer")
        .signed_by(&issuer_key, &signer)
        .unwrap();
    std::fs::write(dir.join("anchors.pem"), anchor.pem()).unwrap();
    std::fs::write(dir.join("issuer.pem"), issuer.pem()).unwrap();
    std::fs::write(dir.join("issuer.key"), issuer_key.serialize_pem()).unwrap();
    anchor.pem()
}

fn crd_type() -> ResourceType {
    ResourceType::of::<CustomResourceDefinition>(false)
}

fn injector_type() -> ResourceType {
    ResourceType::of::<MutatingWebhookConfiguration>(false)
}

/// What `trellis install` renders for the injector, minus the client config the controller owns.
fn injector_object() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-proxy-injector"},
        "webhooks": [{
            "name": "inject.trellis.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "clientConfig": {"service": {"namespace": "trellis-system", "name": "trellis-controller", "path": "/inject", "port": 443}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
        }],
    })
}

/// One HTTPS POST trusting exactly `bundle` (PEM) for `127.0.0.1`; returns the status, the body
/// and the leaf the server presented.
async fn post(
    addr: SocketAddr,
    bundle: &[u8],
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Bytes, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("the served certificate chains to the caBundle and names 127.0.0.1");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body, presented)
}

/// Flagger's TrafficSplit at `version` (CONTRACT.md §2: canary first, then primary), with the
/// metadata the API server adds.
fn flagger_split(version: &str, index: usize) -> Value {
    let backends = if version == "split.smi-spec.io/v1alpha1" {
        json!([{"service": "podinfo-canary", "weight": "10"}, {"service": "podinfo-primary", "weight": "90"}])
    } else {
        json!([{"service": "podinfo-canary", "weight": 10}, {"service": "podinfo-primary", "weight": 90}])
    };
    json!({
        "apiVersion": version,
        "kind": "TrafficSplit",
        "metadata": {
            "name": format!("podinfo-{index}"), "namespace": "test",
            "uid": format!("00000000-0000-0000-0000-00000000000{index}"),
            "resourceVersion": "7", "generation": 1,
            "creationTimestamp": "2026-12-06T10:00:00Z",
            "ownerReferences": [{"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "name": "podinfo", "uid": "11111111-1111-1111-1111-111111111111", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"service": "podinfo", "backends": backends},
    })
}

const VERSIONS: [&str; 4] = [
    "split.smi-spec.io/v1alpha1",
    "split.smi-spec.io/v1alpha2",
    "split.smi-spec.io/v1alpha3",
    "split.smi-spec.io/v1alpha4",
];

fn review(desired: &str, objects: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {"uid": "5a3c2d1e-0000-4000-8000-000000000001", "desiredAPIVersion": desired, "objects": objects},
    }))
    .unwrap()
}

/// The dynamic API of TrafficSplits at `api_version`.
fn splits(client: &kube::Client, namespace: &str, api_version: &str) -> Api<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap();
    let resource = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: "TrafficSplit".into(),
        plural: "trafficsplits".into(),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The spec Flagger writes at `version` with the canary at `weight` (CONTRACT.md §2).
fn flagger_spec(version: &str, canary: u32) -> Value {
    let weight = |w: u32| {
        if version == VERSIONS[0] {
            json!(w.to_string())
        } else {
            json!(w)
        }
    };
    json!({"service": "podinfo", "backends": [
        {"service": "podinfo-canary", "weight": weight(canary)},
        {"service": "podinfo-primary", "weight": weight(100 - canary)},
    ]})
}

/// Creates `podinfo-INDEX` at `version` (0/100), then GET and a full PUT of 10/90, as Flagger
/// does; then reads it at every version: the written version gives back exactly what was
/// written, the others the same backends in the same order with the same weights.
async fn flagger_writes_and_reads_back(
    client: &kube::Client,
    namespace: &str,
    version: &str,
    index: usize,
) {
    let api = splits(client, namespace, version);
    let name = format!("podinfo-{index}");
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": version, "kind": "TrafficSplit",
        "metadata": {"name": name, "namespace": namespace},
        "spec": flagger_spec(version, 0),
    }))
    .unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {name} at {version}: {e}"));
    let mut current = api.get(&name).await.unwrap();
    current.data["spec"] = flagger_spec(version, 10);
    api.replace(&name, &PostParams::default(), &current)
        .await
        .unwrap_or_else(|e| panic!("replacing {name} at {version}: {e}"));
    for read_at in VERSIONS {
        let read = splits(client, namespace, read_at)
            .get(&name)
            .await
            .unwrap_or_else(|e| panic!("reading {name} (written at {version}) at {read_at}: {e}"));
        assert_eq!(read.types.as_ref().unwrap().api_version, read_at);
        if read_at == version {
            assert_eq!(
                read.data["spec"],
                flagger_spec(version, 10),
                "{name} at {read_at}"
            );
        } else {
            let backends = read.data["spec"]["backends"].as_array().unwrap();
            let names: Vec<&str> = backends
                .iter()
                .map(|b| b["service"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["podinfo-canary", "podinfo-primary"],
                "{name} at {read_at}"
            );
            let weight = |b: &Value| {
                b["weight"]
                    .as_u64()
                    .or_else(|| b["weight"].as_str()?.parse().ok())
            };
            assert_eq!(weight(&backends[0]), Some(10), "{name} at {read_at}");
            assert_eq!(weight(&backends[1]), Some(90), "{name} at {read_at}");
        }
    }
}

#[test]
fn the_controller_serves_conversion_over_https_and_keeps_every_ca_bundle_current() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(smi_api_server());
    server.register(crd_type());
    server.register(injector_type());
    for generated in trellis_smi::crd::generate() {
        server
            .store()
            .apply(&crd_type(), serde_json::to_value(&generated.crd).unwrap())
            .unwrap();
    }
    server
        .store()
        .apply(&injector_type(), injector_object())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let anchor = write_ca(dir.path());
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&server, &kubeconfig).unwrap();
    let _runtime_context = runtime.enter();
    let client = kube_client(&server);

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let controller = ControllerProcess::spawn(
        controller_command(TRELLIS)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--platform", "kubernetes", "--leader-elect=false"])
            .args(["--trust-anchor", &path("anchors.pem")])
            .args(["--issuer-cert", &path("issuer.pem")])
            .args(["--issuer-key", &path("issuer.key")])
            .args(["--webhook", &format!("127.0.0.1:{port}")])
            .args(["--webhook-url", &url])
            .args(["--webhook-tls-lifetime", "3s"])
            .args(["--proxy-image", "example.invalid/trellis-proxy:test"])
            .stderr(std::process::Stdio::piped()),
    );

    // 1. The bundle and URL land in every CRD and in the injector.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let injectors: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle_of = |crd: &CustomResourceDefinition| {
        let config = crd
            .spec
            .conversion
            .as_ref()?
            .webhook
            .as_ref()?
            .client_config
            .clone()?;
        Some((config.url?, config.ca_bundle?.0, config.service.is_none()))
    };
    // The CRDs converted through the webhook (the SMI ones; TrafficPolicy has one version).
    let names: Vec<String> = trellis_smi::crd::generate()
        .into_iter()
        .filter(|g| g.converts())
        .filter_map(|g| g.crd.metadata.name)
        .collect();
    for name in &names {
        let (crd_url, bundle, no_service) = until(&format!("{name}'s caBundle"), 15, || {
            let crd = runtime.block_on(crds.get(name)).ok()?;
            bundle_of(&crd)
        });
        assert_eq!(crd_url, format!("{url}/convert"), "{name}");
        assert_eq!(String::from_utf8(bundle).unwrap(), anchor, "{name}");
        assert!(
            no_service,
            "{name}: the Service reference was replaced by the URL"
        );
    }
    let injector = until("the injector's caBundle", 15, || {
        let config = runtime
            .block_on(injectors.get("trellis-proxy-injector"))
            .ok()?;
        let webhook = config.webhooks?.into_iter().next()?;
        webhook.client_config.ca_bundle.is_some().then_some(webhook)
    });
    assert_eq!(
        injector.client_config.url.as_deref(),
        Some(format!("{url}/inject").as_str())
    );
    assert!(injector.client_config.service.is_none());
    assert_eq!(
        injector.failure_policy.as_deref(),
        Some("Ignore"),
        "the rest is kept"
    );

    // 2. Conversions through the running binary, trusting only the written bundle.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let bundle = anchor.clone().into_bytes();
    for from in VERSIONS {
        for to in VERSIONS {
            let objects = vec![flagger_split(from, 1), flagger_split(from, 2)];
            let (status, body, _) =
                runtime.block_on(post(addr, &bundle, "/convert", review(to, objects.clone())));
            assert_eq!(status, StatusCode::OK, "{from} -> {to}");
            let answer: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                answer["response"]["result"]["status"], "Success",
                "{from} -> {to}: {answer}"
            );
            let converted = answer["response"]["convertedObjects"].as_array().unwrap();
            assert_eq!(converted.len(), 2);
            for (sent, got) in objects.iter().zip(converted) {
                assert_eq!(got["apiVersion"], to);
                assert_eq!(got["metadata"]["uid"], sent["metadata"]["uid"]);
                assert_eq!(got["spec"]["service"], "podinfo");
                let backends = got["spec"]["backends"].as_array().unwrap();
                assert_eq!(backends[0]["service"], "podinfo-canary", "order kept");
                let weight = &backends[0]["weight"];
                assert!(weight == &json!(10) || weight == &json!("10"), "{weight}");
                // And back: the object sent, exactly.
                let (_, back, _) = runtime.block_on(post(
                    addr,
                    &bundle,
                    "/convert",
                    review(from, vec![got.clone()]),
                ));
                let back: Value = serde_json::from_slice(&back).unwrap();
                assert_eq!(
                    &back["response"]["convertedObjects"][0], sent,
                    "{from} -> {to} -> {from}"
                );
            }
        }
    }
    let (status, body, first_leaf) =
        runtime.block_on(post(addr, &bundle, "/convert", b"{\"kind\":".to_vec()));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = String::from_utf8_lossy(&body);
    assert!(message.contains("not a ConversionReview"), "{message}");

    // 2b. Through the API server: Flagger's writes at v1alpha1, v1alpha2 and v1alpha3 (create,
    // then GET and a full PUT) read back identically at every version, and the controller (which
    // reads the stored v1alpha4) puts the written weights in force.
    for (index, version) in VERSIONS[..3].iter().enumerate() {
        runtime.block_on(flagger_writes_and_reads_back(
            &client, "test", version, index,
        ));
    }
    until("the three splits in force", 10, || {
        let check = std::process::Command::new(TRELLIS)
            .args(["check", "--admin", &controller.admin.to_string()])
            .output()
            .ok()?;
        let check = String::from_utf8_lossy(&check.stdout).into_owned();
        (0..3)
            .all(|i| check.contains(&format!("TrafficSplit test/podinfo-{i}: root podinfo -> podinfo-canary 10, podinfo-primary 90")))
            .then_some(())
            .or_else(|| {
                eprintln!("{check}");
                None
            })
    });

    // 2c. Injection through the same port: a Deployment's pod gets the init container and the
    // proxy with the controller, the anchors and its workload; a hostNetwork pod is admitted
    // unchanged and an Event says why.
    let fixture = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../controller/kubernetes/tests/inject")
                .join(name),
        )
        .unwrap()
    };
    let (status, body, _) = runtime.block_on(post(
        addr,
        &bundle,
        "/inject",
        fixture("deployment-pod.request.json"),
    ));
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    // kube-rs sends the patch bytes as a JSON array of numbers, which the API server's Go
    // decoder reads into []byte as it reads base64; accept either.
    let patch = &answer["response"]["patch"];
    let patch: Vec<u8> = match patch.as_str() {
        Some(_) => {
            serde_json::from_value::<k8s_openapi::ByteString>(patch.clone())
                .unwrap()
                .0
        }
        None => serde_json::from_value(patch.clone()).unwrap(),
    };
    let patch = String::from_utf8(patch).unwrap();
    for wanted in [
        "trellis-init",
        "example.invalid/trellis-proxy:test",
        "TRELLIS_PROXY_CONTROLLER_CA_PEM",
        "https://trellis-controller.trellis-system.svc:8090",
        "TRELLIS_PROXY_OUTBOUND_TRANSPARENT",
    ] {
        assert!(patch.contains(wanted), "the patch lacks {wanted}: {patch}");
    }
    let anchors_in_patch = serde_json::to_string(&anchor).unwrap();
    assert!(
        patch.contains(anchors_in_patch.trim_matches('"')),
        "the proxy gets the mesh's anchors inline: {patch}"
    );
    let (status, body, _) = runtime.block_on(post(
        addr,
        &bundle,
        "/inject",
        fixture("host-network.request.json"),
    ));
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "shop");
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let list = runtime.block_on(events.list(&Default::default())).unwrap();
        if let Some(event) = list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NotInjected"))
        {
            break event;
        }
        if Instant::now() > deadline {
            panic!(
                "no NotInjected Event within 10 s; the controller's log:\n{}",
                controller.stop()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        event.note.as_deref().unwrap_or("").contains("hostNetwork"),
        "{event:?}"
    );
    let (status, body, _) = runtime.block_on(post(addr, &bundle, "/inject", b"[]".to_vec()));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("AdmissionReview"));

    // 3. Renewal (3 s lifetime: renewed after 2 s): another leaf, same chain.
    let renewed = until("a renewed serving certificate", 10, || {
        let (_, _, leaf) =
            runtime.block_on(post(addr, &bundle, "/convert", review(VERSIONS[3], vec![])));
        (leaf != first_leaf).then_some(leaf)
    });
    assert_ne!(renewed, first_leaf);

    // 4. A second trust anchor (CA rotation, step one): every bundle gets both.
    let second = tempfile::tempdir().unwrap();
    let new_anchor = write_ca(second.path());
    let both = format!("{anchor}{new_anchor}");
    let tmp = dir.path().join("anchors.tmp");
    std::fs::write(&tmp, &both).unwrap();
    std::fs::rename(&tmp, dir.path().join("anchors.pem")).unwrap();
    for name in &names {
        until(&format!("{name}'s bundle with both anchors"), 20, || {
            let crd = runtime.block_on(crds.get(name)).ok()?;
            let (_, bundle, _) = bundle_of(&crd)?;
            (String::from_utf8(bundle).ok()? == both).then_some(())
        });
    }
    until("the injector's bundle with both anchors", 20, || {
        let config = runtime
            .block_on(injectors.get("trellis-proxy-injector"))
            .ok()?;
        let bundle = config.webhooks?[0].client_config.ca_bundle.clone()?;
        (String::from_utf8(bundle.0).ok()? == both).then_some(())
    });
    let log = controller.stop();
    assert!(log.contains("webhook serving certificate"), "{log}");
}

/// The address this machine uses to reach the API server of `config` (where a webhook served
/// here can be reached from it, as a guess): `TRELLIS_TEST_WEBHOOK_HOST` wins.
fn webhook_host(config: &kube::Config) -> String {
    if let Ok(host) = std::env::var("TRELLIS_TEST_WEBHOOK_HOST") {
        return host;
    }
    let uri = &config.cluster_url;
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let server = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .expect("resolving the API server's address");
    let probe = std::net::UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .unwrap();
    probe.connect(server).unwrap();
    let local = probe.local_addr().unwrap().ip();
    if local.is_loopback() {
        eprintln!(
            "the API server is reached over loopback: if it runs in a container or VM it cannot call {local}; set TRELLIS_TEST_WEBHOOK_HOST to an address of this machine it can reach"
        );
    }
    match local {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// On a real API server (`TRELLIS_TEST_KUBECONFIG`): the SMI CRDs applied (server-side apply),
/// `trellis controller --webhook ... --webhook-url https://HOST:PORT` running here, and Flagger's
/// writes at v1alpha1, v1alpha2 and v1alpha3 read back identically at every version through the
/// API server's calls to the controller's conversion webhook; with the install's injector
/// applied, a Pod created in the opted-in test namespace comes back injected. The CRDs stay
/// installed (they are cluster-wide); the injector and the test's namespace are deleted.
#[test]
fn on_a_real_api_server_flagger_writes_convert_through_the_running_controller() {
    let Some(kubeconfig) = std::env::var_os("TRELLIS_TEST_KUBECONFIG") else {
        eprintln!(
            "skipped: TRELLIS_TEST_KUBECONFIG is unset (a kubeconfig for a real API server that can reach this machine; TRELLIS_TEST_WEBHOOK_HOST names this machine's address for it)"
        );
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _context = runtime.enter();
    let config = runtime
        .block_on(kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)
                .expect("reading TRELLIS_TEST_KUBECONFIG"),
            &kube::config::KubeConfigOptions::default(),
        ))
        .expect("a usable kubeconfig");
    let host = webhook_host(&config);
    let client = kube::Client::try_from(config).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for generated in trellis_smi::crd::generate() {
        let name = generated.crd.metadata.name.clone().unwrap();
        runtime
            .block_on(crds.patch(
                &name,
                &kube::api::PatchParams::apply("trellis-test").force(),
                &kube::api::Patch::Apply(&generated.crd),
            ))
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
    }
    let namespace = format!("trellis-webhook-test-{}", std::process::id());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    runtime
        .block_on(namespaces.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": namespace, "labels": {"trellis.io/inject": "enabled"}}}),
            )
            .unwrap(),
        ))
        .expect("creating the test namespace");
    struct DeleteNamespace<'a>(
        &'a Api<k8s_openapi::api::core::v1::Namespace>,
        &'a str,
        &'a tokio::runtime::Runtime,
    );
    impl Drop for DeleteNamespace<'_> {
        fn drop(&mut self) {
            let _ = self.2.block_on(self.0.delete(self.1, &Default::default()));
        }
    }
    let _cleanup = DeleteNamespace(&namespaces, &namespace, &runtime);

    let port = free_port();
    let url = format!("https://{host}:{port}");
    // The injector exactly as `trellis install` renders it for an install in `namespace`.
    let rendered = std::process::Command::new(TRELLIS)
        .args(["install", "--existing-ca-secret", "-o", "json"])
        .args(["--namespace", &namespace, "--webhook-url", &url])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{rendered:?}");
    let rendered: Value = serde_json::from_slice(&rendered.stdout).unwrap();
    let injector: MutatingWebhookConfiguration = serde_json::from_value(
        rendered["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .cloned()
            .expect("the install has an injector"),
    )
    .unwrap();
    let injector_name = injector.metadata.name.clone().unwrap();
    let injectors: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    runtime
        .block_on(injectors.patch(
            &injector_name,
            &kube::api::PatchParams::apply("trellis-test").force(),
            &kube::api::Patch::Apply(&injector),
        ))
        .expect("applying the injector");
    struct DeleteInjector<'a>(
        &'a Api<MutatingWebhookConfiguration>,
        String,
        &'a tokio::runtime::Runtime,
    );
    impl Drop for DeleteInjector<'_> {
        fn drop(&mut self) {
            let _ = self.2.block_on(self.0.delete(&self.1, &Default::default()));
        }
    }
    let _delete_injector = DeleteInjector(&injectors, injector_name.clone(), &runtime);
    let controller = ControllerProcess::spawn(
        controller_command(TRELLIS)
            .env("KUBECONFIG", &kubeconfig)
            .args(["--platform", "kubernetes", "--leader-elect=false"])
            .args(["--webhook", &format!("0.0.0.0:{port}")])
            .args(["--webhook-url", &url])
            .args(["--injector-name", &injector_name])
            .args(["--proxy-image", "example.invalid/trellis-proxy:test"]),
    );
    until("the injector pointed here", 30, || {
        let config = runtime.block_on(injectors.get(&injector_name)).ok()?;
        let wanted = format!("{url}/inject");
        config
            .webhooks?
            .iter()
            .all(|w| {
                w.client_config.ca_bundle.is_some()
                    && w.client_config.url.as_deref() == Some(wanted.as_str())
            })
            .then_some(())
    });
    // The CRDs converted through the webhook (the SMI ones; TrafficPolicy has one version).
    let names: Vec<String> = trellis_smi::crd::generate()
        .into_iter()
        .filter(|g| g.converts())
        .filter_map(|g| g.crd.metadata.name)
        .collect();
    for name in &names {
        until(&format!("{name} pointed at {url}"), 30, || {
            let crd = runtime.block_on(crds.get(name)).ok()?;
            let config = crd.spec.conversion?.webhook?.client_config?;
            (config.url? == format!("{url}/convert") && config.ca_bundle.is_some()).then_some(())
        });
    }
    for (index, version) in VERSIONS[..3].iter().enumerate() {
        runtime.block_on(flagger_writes_and_reads_back(
            &client, &namespace, version, index,
        ));
    }

    // Injection: the install's MutatingWebhookConfiguration (for this namespace's install),
    // pointed here by the controller; a Pod created in the opted-in test namespace comes back
    // with trellis-init and the proxy.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &namespace);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1", "ports": [{"containerPort": 8080}]}]},
    }))
    .unwrap();
    let created = runtime
        .block_on(pods.create(&PostParams::default(), &pod))
        .expect("creating a pod in the opted-in namespace");
    let init: Vec<String> = created
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(init, ["trellis-init", "trellis-proxy"], "{created:?}");
    assert!(
        created
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("trellis.io/injected")
    );
    drop(controller);
}
