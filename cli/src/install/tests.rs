//! The install's objects checked against each other and against the parsers that consume
//! them: every object reads back as its k8s-openapi type, the Deployment's arguments are
//! accepted by `trellis controller`'s own parser, RBAC names what the install creates, the
//! injector never selects the excluded namespaces, and the uninstall is the reverse.

use super::document::{self, Format, Object};
use super::settings::{CaFlags, Settings};
use super::webhook::FailurePolicy;
use super::{Args, gateway, render, workload};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn args(namespace: &str, webhook_url: Option<&str>) -> Args {
    Args {
        namespace: namespace.to_owned(),
        controller_image: super::DEFAULT_CONTROLLER_IMAGE.to_owned(),
        proxy_image: super::DEFAULT_PROXY_IMAGE.to_owned(),
        tag: None,
        replicas: 2,
        webhook_url: webhook_url.map(str::to_owned),
        injection_failure_policy: FailurePolicy::Fail,
        metrics_compat: vec!["osm".to_owned()],
        prometheus: None,
        trust_domain: "cluster.local".to_owned(),
        ca: CaFlags {
            generate_ca: true,
            ..Default::default()
        },
        gateways: Vec::new(),
        gateway_controller_ca: None,
        output: Format::Yaml,
        apply: false,
        dry_run: false,
        rbac_only: None,
    }
}

fn settings(namespace: &str, webhook_url: Option<&str>) -> Settings {
    Settings::from_args(&args(namespace, webhook_url)).unwrap()
}

fn objects(settings: &Settings) -> Vec<Object> {
    render::install(settings)
        .into_iter()
        .map(|d| d.object)
        .collect()
}

#[test]
fn every_object_reads_back_as_its_type_in_both_formats() {
    for settings in [
        settings("trellis-system", None),
        settings("mesh-a", Some("https://192.0.2.7:9443")),
    ] {
        let documents = render::install(&settings);
        for format in [Format::Yaml, Format::Json] {
            let text = document::render(&documents, format, "# header\n");
            let parsed = document::parse(&text).unwrap_or_else(|e| panic!("{format:?}: {e:#}"));
            let expected: Vec<Object> = documents.iter().map(|d| d.object.clone()).collect();
            assert_eq!(parsed, expected, "{format:?}");
        }
    }
}

// The Deployment runs a Kubernetes build: `--ca-secret`, `--leader-elect` and `--lease-*` exist
// only with the `kubernetes` feature.
#[cfg(feature = "kubernetes")]
mod controller_args {
    use clap::Parser as _;

    use super::*;
    use crate::install::workload;

    #[derive(Debug, clap::Parser)]
    struct ControllerCommand {
        #[command(flatten)]
        args: crate::controller::Args,
    }

    /// The Deployment's arguments parsed by `trellis controller`'s own parser.
    fn parse_controller(args: &[String]) -> crate::controller::Args {
        let argv = std::iter::once("trellis-controller".to_owned()).chain(args.iter().cloned());
        match ControllerCommand::try_parse_from(argv) {
            Ok(parsed) => parsed.args,
            Err(e) => panic!("trellis controller refuses the Deployment's arguments:\n{e}"),
        }
    }

    #[test]
    fn the_deployment_arguments_are_accepted_by_trellis_controller() {
        for (settings, webhook_flag) in [
            (
                settings("trellis-system", None),
                "--webhook-service=trellis-system/trellis-controller",
            ),
            (
                settings("mesh-b", Some("https://192.0.2.7:9443")),
                "--webhook-url=https://192.0.2.7:9443",
            ),
        ] {
            let rendered = workload::controller_args(&settings);
            assert!(rendered.iter().any(|a| a == webhook_flag), "{rendered:?}");
            // The container's command is `trellis controller`: what follows is these arguments.
            let Some(Object::Deployment(deployment)) = objects(&settings)
                .into_iter()
                .find(|o| matches!(o, Object::Deployment(_)))
            else {
                panic!("a Deployment")
            };
            let container = &deployment.spec.template.spec.as_ref().unwrap().containers[0];
            assert_eq!(
                container.command.as_deref(),
                Some(&["trellis".to_owned(), "controller".to_owned()][..])
            );
            assert_eq!(container.args.as_ref(), Some(&rendered));
            let parsed = parse_controller(&rendered);
            let ns = &settings.names.namespace;
            assert_eq!(parsed.platform.len(), 1);
            assert_eq!(parsed.grpc.port(), workload::GRPC_PORT as u16);
            assert_eq!(parsed.admin.port(), workload::ADMIN_PORT as u16);
            assert_eq!(
                parsed.grpc_tls_name,
                [format!("trellis-controller.{ns}.svc")]
            );
            assert_eq!(parsed.trust_domain, "cluster.local");
            #[cfg(feature = "kubernetes")]
            {
                let k = &parsed.kubernetes;
                assert_eq!(
                    k.ca_secret.as_deref(),
                    Some(format!("{ns}/trellis-ca").as_str())
                );
                assert_eq!(k.leader_elect, Some(true));
                assert_eq!(k.lease_namespace, *ns);
                assert_eq!(k.lease_name, "trellis-controller");
                let webhooks = k
                    .webhooks(&parsed.trust_domain)
                    .expect("the webhook flags are consistent")
                    .expect("--webhook is given");
                assert_eq!(i32::from(webhooks.listen.port()), workload::WEBHOOK_PORT);
                let injector = webhooks.injector.expect("--proxy-image serves /inject");
                assert_eq!(injector.proxy_image, settings.proxy_image);
                assert_eq!(injector.metrics_compat, "osm");
                assert_eq!(
                    injector.controller_url,
                    format!("https://trellis-controller.{ns}.svc:8090")
                );
            }
        }
    }
}

#[test]
fn rbac_names_exactly_what_the_install_creates() {
    for settings in [settings("trellis-system", None), settings("mesh-c", None)] {
        let objects = objects(&settings);
        let names_of = |kind: &str| -> Vec<String> {
            objects
                .iter()
                .filter(|o| o.kind() == kind)
                .map(|o| o.name().to_owned())
                .collect()
        };
        let mut granted = std::collections::BTreeMap::<String, Vec<String>>::new();
        for object in &objects {
            let rules = match object {
                Object::ClusterRole(r) => r.rules.clone().unwrap_or_default(),
                Object::Role(r) => r.rules.clone().unwrap_or_default(),
                _ => continue,
            };
            for rule in rules {
                for resource in rule.resources.unwrap_or_default() {
                    granted
                        .entry(resource)
                        .or_default()
                        .extend(rule.resource_names.clone().unwrap_or_default());
                }
            }
        }
        // The CRDs whose conversion caBundle the leader writes: all but Trellis's own kinds'.
        let converted: Vec<String> = objects
            .iter()
            .filter_map(|o| match o {
                Object::CustomResourceDefinition(crd) if crd.spec.conversion.is_some() => {
                    crd.metadata.name.clone()
                }
                _ => None,
            })
            .collect();
        assert_eq!(converted.len(), 5);
        assert_eq!(names_of("CustomResourceDefinition").len(), 7);
        assert_eq!(granted["customresourcedefinitions"], converted);
        for kind in ["trafficpolicies", "externalservices"] {
            assert!(granted.contains_key(kind), "the policy source reads {kind}");
        }
        assert_eq!(
            granted["mutatingwebhookconfigurations"],
            names_of("MutatingWebhookConfiguration")
        );
        assert_eq!(granted["secrets"], names_of("Secret"));
        assert_eq!(granted["leases"], ["trellis-controller"]);
        // Bindings name the roles and the ServiceAccount the Deployment runs as.
        for object in &objects {
            let (role, subjects) = match object {
                Object::ClusterRoleBinding(b) => (&b.role_ref, &b.subjects),
                Object::RoleBinding(b) => (&b.role_ref, &b.subjects),
                _ => continue,
            };
            assert!(names_of(&role.kind).contains(&role.name), "{role:?}");
            let subject = &subjects.as_ref().unwrap()[0];
            assert_eq!(
                subject.namespace.as_deref(),
                Some(settings.names.namespace.as_str())
            );
            assert_eq!(
                names_of("ServiceAccount").as_slice(),
                std::slice::from_ref(&subject.name)
            );
        }
    }
}

#[test]
fn webhooks_point_at_the_service_or_the_url_and_never_at_excluded_namespaces() {
    let by_service = objects(&settings("mesh-d", None));
    let by_url = objects(&settings("mesh-d", Some("https://192.0.2.7:9443/")));
    for (objects, url) in [(by_service, None), (by_url, Some("https://192.0.2.7:9443"))] {
        let mut crds = 0;
        for object in &objects {
            match object {
                Object::CustomResourceDefinition(crd) => {
                    let Some(conversion) = crd.spec.conversion.as_ref() else {
                        // TrafficPolicy: one version, nothing to convert.
                        assert_eq!(crd.spec.group, "policy.trellis.io");
                        continue;
                    };
                    crds += 1;
                    let config = conversion
                        .webhook
                        .as_ref()
                        .unwrap()
                        .client_config
                        .as_ref()
                        .unwrap();
                    assert_eq!(config.ca_bundle, None, "the leader writes it");
                    match url {
                        Some(url) => assert_eq!(
                            config.url.as_deref(),
                            Some(format!("{url}/convert").as_str())
                        ),
                        None => {
                            let service = config.service.as_ref().unwrap();
                            assert_eq!(
                                (service.namespace.as_str(), service.name.as_str()),
                                ("mesh-d", "trellis-controller")
                            );
                            assert_eq!(
                                (service.path.as_deref(), service.port),
                                (Some("/convert"), Some(443))
                            );
                        }
                    }
                }
                Object::MutatingWebhookConfiguration(mwc) => {
                    assert_eq!(
                        mwc.metadata.name.as_deref(),
                        Some("trellis-proxy-injector-mesh-d")
                    );
                    let webhooks = mwc.webhooks.as_ref().unwrap();
                    assert_eq!(webhooks.len(), 2);
                    for webhook in webhooks {
                        assert_eq!(webhook.client_config.ca_bundle, None);
                        match url {
                            Some(url) => assert_eq!(
                                webhook.client_config.url.as_deref(),
                                Some(format!("{url}/inject").as_str())
                            ),
                            None => assert_eq!(
                                webhook
                                    .client_config
                                    .service
                                    .as_ref()
                                    .unwrap()
                                    .path
                                    .as_deref(),
                                Some("/inject")
                            ),
                        }
                        assert_eq!(webhook.side_effects, "None");
                        assert_eq!(webhook.admission_review_versions, ["v1"]);
                        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
                        let excluded = webhook
                            .namespace_selector
                            .as_ref()
                            .unwrap()
                            .match_expressions
                            .as_ref()
                            .unwrap()
                            .iter()
                            .find(|r| r.key == "kubernetes.io/metadata.name")
                            .expect("excludes namespaces by name");
                        assert_eq!(excluded.operator, "NotIn");
                        assert_eq!(
                            excluded.values.as_deref().unwrap(),
                            ["kube-system", "kube-public", "kube-node-lease", "mesh-d"]
                        );
                    }
                }
                _ => {}
            }
        }
        assert_eq!(crds, 5);
    }
}

#[test]
fn the_crds_are_trellis_crds_with_only_the_webhook_target_changed() {
    let objects = objects(&settings("mesh-e", Some("https://192.0.2.7:9443")));
    let rendered: Vec<_> = objects
        .iter()
        .filter_map(|o| match o {
            Object::CustomResourceDefinition(crd) => Some(crd.clone()),
            _ => None,
        })
        .collect();
    let generated = trellis_smi::crd::generate();
    assert_eq!(rendered.len(), generated.len());
    let without_target = |crd: &mut CustomResourceDefinition| {
        if let Some(webhook) = crd
            .spec
            .conversion
            .as_mut()
            .and_then(|c| c.webhook.as_mut())
        {
            webhook.client_config = None;
        }
    };
    for (mut ours, theirs) in rendered.into_iter().zip(generated) {
        ours.metadata.labels = None;
        without_target(&mut ours);
        let mut theirs = theirs.crd;
        without_target(&mut theirs);
        assert_eq!(ours, theirs);
    }
}

#[test]
fn the_uninstall_is_the_install_reversed_with_the_crds_last() {
    let settings = Settings::for_uninstall("trellis-system").unwrap();
    let install: Vec<String> = objects(&settings).iter().map(Object::describe).collect();
    let uninstall: Vec<String> = render::uninstall(&settings, false)
        .iter()
        .map(|d| d.object.describe())
        .collect();
    // The APIService (which sends requests to the controller) first, then the injector.
    assert_eq!(uninstall[0], "APIService v1alpha1.metrics.smi-spec.io");
    assert_eq!(
        uninstall[1],
        "MutatingWebhookConfiguration trellis-proxy-injector"
    );
    // The five SMI CRDs, TrafficPolicy's and ExternalService's.
    assert!(
        uninstall[..uninstall.len() - 7]
            .last()
            .unwrap()
            .starts_with("Namespace ")
    );
    assert!(
        uninstall[uninstall.len() - 7..]
            .iter()
            .all(|d| d.starts_with("CustomResourceDefinition "))
    );
    // Everything the install makes (and the CA Secret, however it was made) goes.
    for object in &install {
        assert!(uninstall.contains(object), "{object}");
    }
    assert!(uninstall.contains(&"Secret trellis-system/trellis-ca".to_owned()));
    let kept = render::uninstall(&settings, true);
    assert!(
        kept.iter()
            .all(|d| !matches!(d.object, Object::CustomResourceDefinition(_)))
    );
    assert_eq!(kept.len(), uninstall.len() - 7);
}

#[test]
fn prometheus_adds_the_traffic_metrics_api_and_only_then() {
    let plain = objects(&settings("trellis-system", None));
    assert!(!plain.iter().any(|o| matches!(o, Object::APIService(_))));
    let mut with = args("trellis-system", None);
    with.prometheus = Some("http://prometheus.trellis-system:9090".into());
    let settings = Settings::from_args(&with).unwrap();
    let objects = objects(&settings);
    let Some(Object::APIService(service)) = objects.last() else {
        panic!(
            "the APIService comes last: {:?}",
            objects.last().map(Object::describe)
        );
    };
    let spec = service.spec.as_ref().unwrap();
    assert_eq!(
        service.metadata.name.as_deref(),
        Some("v1alpha1.metrics.smi-spec.io")
    );
    assert_eq!(spec.group.as_deref(), Some("metrics.smi-spec.io"));
    let reference = spec.service.as_ref().unwrap();
    assert_eq!(reference.name.as_deref(), Some("trellis-controller"));
    assert_eq!(reference.port, Some(443));
    assert!(spec.ca_bundle.is_none(), "the leader writes it");
    assert!(
        workload::controller_args(&settings)
            .contains(&"--prometheus=http://prometheus.trellis-system:9090".to_owned())
    );
    let rules: Vec<String> = objects
        .iter()
        .filter_map(|o| match o {
            Object::ClusterRole(role) => Some(serde_json::to_string(&role.rules).unwrap()),
            _ => None,
        })
        .collect();
    assert!(rules.iter().any(|r| r.contains("subjectaccessreviews")));
    assert!(
        rules
            .iter()
            .any(|r| r.contains("apiservices") && r.contains("v1alpha1.metrics.smi-spec.io"))
    );
    assert!(objects.iter().any(|o| matches!(o, Object::RoleBinding(b)
        if b.metadata.namespace.as_deref() == Some("kube-system")
            && b.role_ref.name == "extension-apiserver-authentication-reader")));
    with.webhook_url = Some("https://192.0.2.7:9443".into());
    let e = Settings::from_args(&with).unwrap_err().to_string();
    assert!(e.contains("--webhook-url"), "{e}");
    with.webhook_url = None;
    with.prometheus = Some("prometheus:9090".into());
    assert!(Settings::from_args(&with).is_err());
}

/// `--gateway FILE`: the gateway's objects in its namespace, consistent with each other and with
/// what the proxy reads: the document in the ConfigMap at the path `--gateway` names, every
/// certificate's Secret mounted where the document's certificates are read, the listeners'
/// ports on the container and the LoadBalancer Service; every object valid for the API server
/// (the fake's validation, the real server's rules).
#[test]
fn a_gateway_renders_its_identity_document_deployment_and_load_balancer() {
    use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    let text = "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  httpRedirect: {port: 8080}
  certificates:
    - hosts: [shop.example.com]
      secretName: shop-tls
    - hosts: [\"*.api.example.com\"]
      secretName: api-tls
  routes:
    - host: shop.example.com
      pathPrefix: /api
      service: {name: api, port: 8080}
";
    std::fs::write(&file, text).unwrap();
    let mut with_gateway = args("trellis-system", None);
    with_gateway.gateways = vec![file.clone()];
    let settings = Settings::from_args(&with_gateway).unwrap();
    let objects = objects(&settings);
    let in_shop: Vec<&Object> = objects
        .iter()
        .filter(|o| o.namespace() == Some("shop"))
        .collect();
    let kinds: Vec<&str> = in_shop.iter().map(|o| o.kind()).collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "ConfigMap", "Deployment", "Service"]
    );
    let find = |kind: &str| *in_shop.iter().find(|o| o.kind() == kind).unwrap();
    let Object::ServiceAccount(ServiceAccount { metadata, .. }) = find("ServiceAccount") else {
        unreachable!()
    };
    assert_eq!(metadata.name.as_deref(), Some("public"));
    let Object::ConfigMap(ConfigMap { data, .. }) = find("ConfigMap") else {
        unreachable!()
    };
    assert_eq!(data.as_ref().unwrap()[gateway::CONFIG_KEY], text);
    let Object::Deployment(deployment) = find("Deployment") else {
        unreachable!()
    };
    let pod = deployment.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("public"));
    let container = &pod.containers[0];
    let args = container.args.as_ref().unwrap();
    for expected in [
        "--controller=https://trellis-controller.trellis-system.svc:8090".to_owned(),
        "--workload=shop/public".to_owned(),
        format!("--gateway={}/{}", gateway::CONFIG_DIR, gateway::CONFIG_KEY),
    ] {
        assert!(args.contains(&expected), "{expected} in {args:?}");
    }
    let anchors = match &settings.ca {
        super::settings::Ca::Material { anchors, .. } => anchors.clone(),
        super::settings::Ca::Existing => unreachable!(),
    };
    assert_eq!(
        container.env.as_ref().unwrap()[0].value.as_deref(),
        Some(anchors.as_str())
    );
    // Where each certificate is read is under a mount of its Secret.
    let mounts = container.volume_mounts.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let document = trellis_gateway::read(text).unwrap();
    for certificate in &document.spec.certificates {
        let (cert, key) = certificate.files().unwrap();
        let mount = mounts
            .iter()
            .find(|m| cert.starts_with(&format!("{}/", m.mount_path)))
            .unwrap_or_else(|| panic!("{cert} is mounted"));
        assert!(key.starts_with(&mount.mount_path));
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        assert_eq!(
            volume.secret.as_ref().unwrap().secret_name.as_deref(),
            certificate.secret_name.as_deref()
        );
    }
    let config_mount = mounts
        .iter()
        .find(|m| m.mount_path == gateway::CONFIG_DIR)
        .unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v.name == config_mount.name)
        .unwrap();
    assert_eq!(
        config_volume.config_map.as_ref().unwrap().name,
        "public-gateway"
    );
    let container_ports: Vec<i32> = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(container_ports, [8443, 8080, gateway::ADMIN_PORT]);
    let Object::Service(Service { spec, .. }) = find("Service") else {
        unreachable!()
    };
    let spec = spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let ports: Vec<(i32, String)> = spec
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            let target = match p.target_port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
                other => panic!("{other:?}"),
            };
            (p.port, target)
        })
        .collect();
    assert_eq!(
        ports,
        [(8443, "https".to_owned()), (8080, "http".to_owned())]
    );
    // What the API server accepts.
    let types = trellis_kube_fake::builtin();
    for object in &in_shop {
        let resource = types.iter().find(|t| t.kind == object.kind()).unwrap();
        let mut value = object.to_json();
        trellis_kube_fake::validation::apply_defaults(resource, &mut value);
        let errors = trellis_kube_fake::validation::errors(resource, &value, None);
        assert!(errors.is_empty(), "{}: {errors:?}", object.kind());
    }
}

/// A certificate given as files cannot be mounted: refused with the file, line and field; so
/// is a gateway with no anchors to trust the controller with.
#[test]
fn gateway_documents_the_install_cannot_serve_are_refused_before_anything_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.yaml");
    std::fs::write(
        &file,
        "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  certificates:
    - hosts: [shop.example.com]
      certFile: /tls/shop.crt
      keyFile: /tls/shop.key
  routes: []
",
    )
    .unwrap();
    let mut with_gateway = args("trellis-system", None);
    with_gateway.gateways = vec![file.clone()];
    let err = format!("{:#}", Settings::from_args(&with_gateway).unwrap_err());
    assert!(
        err.contains(
            "gw.yaml:7: spec.certificates[0]: on Kubernetes a certificate names its Secret"
        ),
        "{err}"
    );
    std::fs::write(
        &file,
        "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  certificates: []
  routes: []
",
    )
    .unwrap();
    with_gateway.ca = CaFlags {
        existing_ca_secret: true,
        ..Default::default()
    };
    let err = format!("{:#}", Settings::from_args(&with_gateway).unwrap_err());
    assert!(err.contains("--gateway-controller-ca"), "{err}");
}
