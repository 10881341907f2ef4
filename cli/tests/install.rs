//! `trellis install` and `trellis uninstall` as a user runs them: the committed manifests are
//! what the binary prints (deploy/install.yaml and both RBAC files), every printed object reads
//! back as its k8s-openapi type, conflicting flags stop before anything is printed, and the CA a
//! `--generate-ca` install carries starts a real `trellis controller` that serves TLS from it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use serde::Deserialize as _;
use serde_json::Value;
use trellis_testing::controller_command;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ sits in the workspace")
        .to_owned()
}

fn trellis(args: &[&str]) -> Output {
    Command::new(TRELLIS)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("the trellis binary runs")
}

fn stdout_of(args: &[&str]) -> String {
    let output = trellis(args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "trellis {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Every YAML document of `text` (comments and empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `value` read as `T` and written back unchanged: the type knows every field.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) {
    let typed: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{}: {e}", value["kind"]));
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        value,
        "{} {} has fields its type does not know",
        value["kind"],
        value["metadata"]["name"]
    );
}

fn check_types(objects: &[Value]) {
    for object in objects {
        match object["kind"].as_str().unwrap() {
            "Namespace" => round_trip::<Namespace>(object),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(object),
            "ServiceAccount" => round_trip::<ServiceAccount>(object),
            "ClusterRole" => round_trip::<ClusterRole>(object),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object),
            "Role" => round_trip::<Role>(object),
            "RoleBinding" => round_trip::<RoleBinding>(object),
            "Secret" => round_trip::<Secret>(object),
            "Service" => round_trip::<Service>(object),
            "Deployment" => round_trip::<Deployment>(object),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(object),
            "MutatingWebhookConfiguration" => round_trip::<MutatingWebhookConfiguration>(object),
            "APIService" => round_trip::<APIService>(object),
            other => panic!("unexpected kind {other}"),
        }
    }
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn committed_manifests_are_fresh() {
    for (args, path, regenerate) in [
        (
            &["install", "--existing-ca-secret"][..],
            "deploy/install.yaml",
            "cargo run -- install --existing-ca-secret > deploy/install.yaml",
        ),
        (
            &["install", "--rbac-only", "controller"][..],
            "deploy/controller-rbac.yaml",
            "cargo run -- install --rbac-only controller > deploy/controller-rbac.yaml",
        ),
        (
            &["install", "--rbac-only", "discovery"][..],
            "adapters/kubernetes/rbac.yaml",
            "cargo run -- install --rbac-only discovery > adapters/kubernetes/rbac.yaml",
        ),
    ] {
        let on_disk = std::fs::read_to_string(workspace_root().join(path)).unwrap_or_default();
        assert!(
            on_disk == stdout_of(args),
            "{path} is stale: regenerate it with `{regenerate}` (from the workspace root) and commit it"
        );
    }
}

#[test]
fn the_committed_install_is_complete_typed_and_in_dependency_order() {
    let text = std::fs::read_to_string(workspace_root().join("deploy/install.yaml")).unwrap();
    let objects = documents(&text);
    check_types(&objects);
    assert_eq!(
        kinds(&objects),
        [
            "Namespace",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
        ],
        "no Secret: the committed install expects the CA Secret to exist"
    );
    assert!(
        text.contains("create secret generic trellis-ca"),
        "says how to make the Secret"
    );
    let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/trellis-mesh/trellis-controller:{version}"),
        "version-pinned"
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    let security = &deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
}

#[test]
fn json_output_is_a_list_of_the_same_objects() {
    let yaml = documents(&stdout_of(&["install", "--existing-ca-secret"]));
    let json: Value = serde_json::from_str(&stdout_of(&[
        "install",
        "--existing-ca-secret",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"].as_array().unwrap(), &yaml);
}

#[test]
fn the_uninstall_removes_the_injector_first_and_the_crds_last() {
    let text = stdout_of(&["uninstall"]);
    let objects = documents(&text);
    check_types(&objects);
    let kinds = kinds(&objects);
    // The TrafficMetrics APIService (of an install with --prometheus; a 404 is fine) goes
    // before anything it calls.
    assert_eq!(kinds[0], "APIService");
    assert_eq!(kinds[1], "MutatingWebhookConfiguration");
    // Five SMI CRDs, TrafficPolicy's and ExternalService's.
    assert_eq!(kinds[kinds.len() - 8], "Namespace");
    assert!(
        kinds[kinds.len() - 7..]
            .iter()
            .all(|k| k == "CustomResourceDefinition")
    );
    assert!(
        text.contains("deletes every TrafficSplit"),
        "warns about the CRDs"
    );
    let kept = kinds_of(&stdout_of(&["uninstall", "--keep-crds"]));
    assert_eq!(kept.len(), kinds.len() - 7);
    assert!(!kept.contains(&"CustomResourceDefinition".to_owned()));
}

fn kinds_of(text: &str) -> Vec<String> {
    kinds(&documents(text))
}

/// The CA Secret's three keys of a `--generate-ca` install, written as PEM files in `dir`.
struct CaFiles {
    anchors: PathBuf,
    issuer_cert: PathBuf,
    issuer_key: PathBuf,
}

fn secret_of(install: &str) -> Secret {
    let objects = documents(install);
    let secret = objects
        .iter()
        .find(|o| o["kind"] == "Secret")
        .expect("a CA Secret");
    serde_json::from_value(secret.clone()).unwrap()
}

fn write_ca(secret: &Secret, dir: &Path, name: &str) -> CaFiles {
    let data = secret.data.as_ref().unwrap();
    let write = |key: &str, file: &str| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, &data[key].0).unwrap();
        path
    };
    CaFiles {
        anchors: write("ca.crt", "anchors.pem"),
        issuer_cert: write("tls.crt", "issuer.pem"),
        issuer_key: write("tls.key", "issuer.key"),
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn conflicting_or_missing_flags_stop_before_anything_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let one = write_ca(
        &secret_of(&stdout_of(&["install", "--generate-ca"])),
        dir.path(),
        "one",
    );
    let two = write_ca(
        &secret_of(&stdout_of(&["install", "--generate-ca"])),
        dir.path(),
        "two",
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "choose the mesh CA"),
        (
            vec![
                "--generate-ca",
                "--trust-anchor",
                arg(&one.anchors),
                "--issuer-cert",
                arg(&one.issuer_cert),
                "--issuer-key",
                arg(&one.issuer_key),
            ],
            "cannot be used with",
        ),
        (
            vec!["--generate-ca", "--existing-ca-secret"],
            "cannot be used with",
        ),
        (
            vec!["--trust-anchor", arg(&one.anchors)],
            "required arguments were not provided",
        ),
        (
            vec!["--generate-ca", "--webhook-url", "http://192.0.2.7:9443"],
            "must be https://",
        ),
        (
            vec![
                "--generate-ca",
                "--webhook-url",
                "https://192.0.2.7:9443/convert",
            ],
            "the paths /convert and /inject are added",
        ),
        (
            vec!["--generate-ca", "--namespace", "Trellis_System"],
            "not a valid namespace name",
        ),
        (
            vec![
                "--generate-ca",
                "--controller-image",
                "c:1.0",
                "--tag",
                "2.0",
            ],
            "already carries a tag",
        ),
        (vec!["--generate-ca", "--replicas", "0"], "--replicas"),
        (vec!["--generate-ca", "--dry-run"], "--apply"),
        (
            vec!["--generate-ca", "--trust-domain", "spiffe://x"],
            "trust domain",
        ),
        (vec!["--generate-ca", "-o", "xml"], "invalid value 'xml'"),
        (
            vec!["--rbac-only", "controller", "--apply"],
            "cannot be used with",
        ),
        // An issuer key that is not the issuer certificate's: the controller would refuse it.
        (
            vec![
                "--trust-anchor",
                arg(&one.anchors),
                "--issuer-cert",
                arg(&one.issuer_cert),
                "--issuer-key",
                arg(&two.issuer_key),
            ],
            "the key does not match the issuer certificate",
        ),
        // An issuer another anchor signed.
        (
            vec![
                "--trust-anchor",
                arg(&one.anchors),
                "--issuer-cert",
                arg(&two.issuer_cert),
                "--issuer-key",
                arg(&two.issuer_key),
            ],
            "does not chain to any trust anchor",
        ),
        (
            vec![
                "--trust-anchor",
                "no/such/anchors.pem",
                "--issuer-cert",
                arg(&one.issuer_cert),
                "--issuer-key",
                arg(&one.issuer_key),
            ],
            "--trust-anchor no/such/anchors.pem: cannot read",
        ),
    ];
    for (flags, says) in cases {
        let mut args = vec!["install"];
        args.extend(&flags);
        let output = trellis(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_ne!(output.status.code(), Some(0), "{flags:?} was accepted");
        assert!(
            output.stdout.is_empty(),
            "{flags:?} printed something before failing"
        );
        assert!(
            stderr.contains(says),
            "{flags:?}: expected {says:?} in:\n{stderr}"
        );
    }
}

#[test]
fn a_ca_from_files_goes_into_the_secret_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(
        &secret_of(&stdout_of(&["install", "--generate-ca"])),
        dir.path(),
        "mine",
    );
    let install = stdout_of(&[
        "install",
        "--trust-anchor",
        arg(&ca.anchors),
        "--issuer-cert",
        arg(&ca.issuer_cert),
        "--issuer-key",
        arg(&ca.issuer_key),
    ]);
    let secret = secret_of(&install);
    let data = secret.data.unwrap();
    assert_eq!(data["ca.crt"].0, std::fs::read(&ca.anchors).unwrap());
    assert_eq!(data["tls.crt"].0, std::fs::read(&ca.issuer_cert).unwrap());
    assert_eq!(data["tls.key"].0, std::fs::read(&ca.issuer_key).unwrap());
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(!install.contains("FOR TRIALS ONLY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_ca_is_marked_for_trials_and_starts_a_controller_that_serves_tls_from_it() {
    let output = trellis(&["install", "--generate-ca"]);
    assert_eq!(output.status.code(), Some(0));
    let install = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("FOR TRIALS ONLY"), "stderr warns: {stderr}");
    let before_secret = install.split("kind: Secret").next().unwrap();
    assert!(
        before_secret
            .rsplit("---")
            .next()
            .unwrap()
            .contains("# FOR TRIALS ONLY"),
        "the Secret's comment warns"
    );
    check_types(&documents(&install));

    // The Secret's three keys are what `--ca-secret` reads; as files they are the same material.
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(&secret_of(&install), dir.path(), "generated");
    let services = dir.path().join("services.yaml");
    std::fs::write(&services, "services: []\n").unwrap();
    let name = "trellis-controller.trellis-system.svc";
    let controller = trellis_testing::ControllerProcess::spawn(
        controller_command(TRELLIS)
            .args(["--platform", &format!("file={}", arg(&services))])
            .args(["--trust-anchor", arg(&ca.anchors)])
            .args(["--issuer-cert", arg(&ca.issuer_cert)])
            .args(["--issuer-key", arg(&ca.issuer_key)])
            .args(["--grpc-tls-name", name]),
    );

    // A client that trusts only the Secret's ca.crt verifies the controller under its Service name.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_file_iter(&ca.anchors).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(controller.grpc)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            tcp,
        )
        .await
        .expect("the controller's certificate chains to the generated anchor");
    assert!(tls.get_ref().1.peer_certificates().is_some());
    drop(controller);
}
