//! `trellis install --apply` and `trellis uninstall --apply` against a real API server, named by
//! `TRELLIS_TEST_KUBECONFIG` (no kubelet needed: the controller's pods may stay Pending). Without
//! it the test says why it skips and passes.
//!
//! The install goes into a namespace of its own (`trellis-install-test-PID-MILLIS`), so its
//! RBAC and injector carry that name and never touch another install's. The SMI CRDs are one per
//! cluster: when they existed before, their conversion settings are put back afterwards and the
//! uninstall keeps them (other suites on the same cluster need them); when they did not, the
//! uninstall removes them. The webhook URL is `https://HOST:PORT` with HOST from
//! `TRELLIS_TEST_WEBHOOK_HOST` or, by default, the address this machine reaches the API server
//! from, and PORT from `TRELLIS_TEST_WEBHOOK_PORT` (default 9443); nothing needs to listen there
//! for this test.

use std::net::{ToSocketAddrs as _, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition,
};
use kube::api::{Api, Patch, PatchParams};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

const CRDS: [&str; 5] = [
    "trafficsplits.split.smi-spec.io",
    "traffictargets.access.smi-spec.io",
    "httproutegroups.specs.smi-spec.io",
    "tcproutes.specs.smi-spec.io",
    "udproutes.specs.smi-spec.io",
];

fn trellis(kubeconfig: &Path, args: &[&str]) -> Output {
    let output = Command::new(TRELLIS)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("the trellis binary runs");
    println!(
        "$ trellis {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn succeeded(output: &Output, what: &str) -> Vec<String> {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The local address this machine uses towards `server` (`https://HOST:PORT`): where the API
/// server can call a webhook served here.
fn local_address_towards(server: &http::Uri) -> String {
    let host = server.host().expect("the kubeconfig's server has a host");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = server.port_u16().unwrap_or(443);
    let remote = (host, port)
        .to_socket_addrs()
        .expect("the API server's address resolves")
        .next()
        .expect("an address");
    let bind = if remote.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).unwrap();
    // A UDP connect sends nothing: it only picks the route, and with it the local address.
    socket.connect(remote).unwrap();
    match socket.local_addr().unwrap().ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// Puts the CRDs' conversion settings back and uninstalls, also when the test fails midway.
struct Cleanup {
    kubeconfig: PathBuf,
    namespace: String,
    /// The CRDs' conversion settings before the test, when all five existed.
    conversions: Option<Vec<(String, CustomResourceConversion)>>,
    client: kube::Client,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut args = vec!["uninstall", "--apply", "--namespace", &self.namespace];
        if self.conversions.is_some() {
            args.push("--keep-crds");
        }
        let output = trellis(&self.kubeconfig, &args);
        if !output.status.success() && !std::thread::panicking() {
            panic!("the uninstall failed");
        }
        if let Some(conversions) = self.conversions.take() {
            let client = self.client.clone();
            // Drop runs inside the test's runtime: restore on a thread with its own.
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        let api: Api<CustomResourceDefinition> = Api::all(client);
                        for (name, conversion) in conversions {
                            let patch = serde_json::json!({"spec": {"conversion": conversion}});
                            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                                .await
                                .unwrap_or_else(|e| panic!("restoring {name}'s conversion: {e}"));
                        }
                    })
            })
            .join()
            .expect("the CRDs' conversion settings are restored");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_applies_reads_back_and_uninstalls_on_a_real_api_server() {
    let Some(kubeconfig) = std::env::var_os("TRELLIS_TEST_KUBECONFIG").map(PathBuf::from) else {
        println!(
            "skipped: TRELLIS_TEST_KUBECONFIG is unset (a kubeconfig for a real API server, with rights to create namespaces, CRDs, RBAC and webhook configurations)"
        );
        return;
    };
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let host = std::env::var("TRELLIS_TEST_WEBHOOK_HOST")
        .unwrap_or_else(|_| local_address_towards(&config.cluster_url));
    let port = std::env::var("TRELLIS_TEST_WEBHOOK_PORT").unwrap_or_else(|_| "9443".into());
    let url = format!("https://{host}:{port}");
    let client = kube::Client::try_from(config).unwrap();
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 1_000_000;
    let namespace = format!("trellis-install-test-{}-{millis}", std::process::id());

    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut before = Vec::new();
    for name in CRDS {
        if let Some(crd) = crd_api.get_opt(name).await.unwrap() {
            before.extend(crd.spec.conversion.map(|c| (name.to_owned(), c)));
        }
    }
    let cleanup = Cleanup {
        kubeconfig: kubeconfig.clone(),
        namespace: namespace.clone(),
        conversions: (before.len() == CRDS.len()).then_some(before),
        client: client.clone(),
    };

    let install = [
        "install",
        "--generate-ca",
        "--webhook-url",
        &url,
        "--namespace",
        &namespace,
    ];
    let printed = trellis(&kubeconfig, &install);
    let objects = succeeded(&printed, "printing the install")
        .iter()
        .filter(|l| l.starts_with("kind: "))
        .count();

    // Applied, one line per object, in the printed order.
    let mut apply = install.to_vec();
    apply.push("--apply");
    let applied = succeeded(&trellis(&kubeconfig, &apply), "trellis install --apply");
    assert_eq!(applied.len(), objects, "{applied:#?}");
    assert_eq!(applied[0], format!("applied Namespace {namespace}"));
    assert!(
        applied
            .last()
            .unwrap()
            .starts_with("applied MutatingWebhookConfiguration ")
    );

    // Read back.
    let ns: Api<Namespace> = Api::all(client.clone());
    assert!(ns.get(&namespace).await.is_ok());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let deployment = deployments.get("trellis-controller").await.unwrap();
    let spec = deployment.spec.template.spec.unwrap();
    let args = spec.containers[0].args.clone().unwrap();
    assert!(args.contains(&format!("--webhook-url={url}")), "{args:?}");
    assert!(
        args.contains(&format!("--ca-secret={namespace}/trellis-ca")),
        "{args:?}"
    );
    assert_eq!(deployment.spec.replicas, Some(2));
    let managers: Vec<String> = deployment
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"trellis-install".to_owned()),
        "{managers:?}"
    );
    let secret: Secret = Api::namespaced(client.clone(), &namespace)
        .get("trellis-ca")
        .await
        .unwrap();
    let keys: Vec<String> = secret.data.unwrap().into_keys().collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    let service: Service = Api::namespaced(client.clone(), &namespace)
        .get("trellis-controller")
        .await
        .unwrap();
    let ports: Vec<i32> = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8090, 443, 9990]);
    let role: Role = Api::namespaced(client.clone(), &namespace)
        .get("trellis-controller")
        .await
        .unwrap();
    assert_eq!(role.rules.unwrap().len(), 3);
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let cluster_role = format!("trellis-controller-{namespace}");
    assert!(cluster_roles.get(&cluster_role).await.is_ok());
    for name in CRDS {
        let crd = crd_api.get(name).await.unwrap();
        let config = crd
            .spec
            .conversion
            .unwrap()
            .webhook
            .unwrap()
            .client_config
            .unwrap();
        assert_eq!(config.url, Some(format!("{url}/convert")), "{name}");
    }
    let injectors: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let injector_name = format!("trellis-proxy-injector-{namespace}");
    let injector = injectors.get(&injector_name).await.unwrap();
    for webhook in injector.webhooks.unwrap() {
        assert_eq!(webhook.client_config.url, Some(format!("{url}/inject")));
    }

    // The whole install again, as `kubectl apply --dry-run=server` would: every object checked
    // by the server (admission, schema, RBAC escalation), nothing kept.
    let mut dry_run = install.to_vec();
    dry_run.extend([
        "--injection-failure-policy",
        "ignore",
        "--apply",
        "--dry-run",
    ]);
    let checked = succeeded(&trellis(&kubeconfig, &dry_run), "--apply --dry-run");
    assert_eq!(checked.len(), objects);
    assert!(
        checked.iter().all(|l| l.ends_with("(server dry run)")),
        "{checked:#?}"
    );
    let injector = injectors.get(&injector_name).await.unwrap();
    assert!(
        injector
            .webhooks
            .unwrap()
            .iter()
            .all(|w| w.failure_policy.as_deref() == Some("Fail")),
        "the dry run changed nothing"
    );

    // Uninstall (the guard), then everything of this install is gone or going.
    drop(cleanup);
    assert!(injectors.get_opt(&injector_name).await.unwrap().is_none());
    assert!(
        cluster_roles
            .get_opt(&cluster_role)
            .await
            .unwrap()
            .is_none()
    );
    match ns.get_opt(&namespace).await.unwrap() {
        None => {}
        Some(ns) => assert!(
            ns.metadata.deletion_timestamp.is_some(),
            "the namespace is terminating"
        ),
    }
}
