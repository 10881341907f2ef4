//! One test per rule of the kinds: what passes, what fails and how the failure reads.

use serde_json::{Value, json};

use super::*;
use crate::resources::builtin;

fn kind(kind: &str) -> ResourceType {
    builtin()
        .into_iter()
        .find(|r| r.kind == kind && r.group != "events.k8s.io")
        .expect("a built-in kind")
}

/// `field: body` of every error of `object` (defaults applied first, as on a write).
fn check(kind_name: &str, mut object: Value) -> Vec<String> {
    let resource = kind(kind_name);
    apply_defaults(&resource, &mut object);
    errors(&resource, &object, None)
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn slice(address_type: &str, addresses: &[&str]) -> Value {
    json!({
        "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        "endpoints": [{"addresses": addresses, "conditions": {"ready": true}}],
    })
}

#[test]
fn a_slice_of_namespace_addresses_is_valid() {
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &["198.18.40.4"])),
        Vec::<String>::new()
    );
    assert_eq!(
        check("EndpointSlice", slice("IPv6", &["2001:db8::4"])),
        Vec::<String>::new()
    );
    assert_eq!(
        check("EndpointSlice", slice("FQDN", &["web.example.com"])),
        Vec::<String>::new()
    );
}

#[test]
fn slice_addresses_may_not_be_special() {
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &["127.0.50.2"])),
        [
            "endpoints[0].addresses[0]: Invalid value: \"127.0.50.2\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
        ]
    );
    assert_eq!(
        check(
            "EndpointSlice",
            slice(
                "IPv4",
                &["10.0.0.1", "0.0.0.0", "169.254.9.9", "224.0.0.251"]
            )
        ),
        [
            "endpoints[0].addresses[1]: Invalid value: \"0.0.0.0\": may not be unspecified (0.0.0.0)",
            "endpoints[0].addresses[2]: Invalid value: \"169.254.9.9\": may not be in the link-local range (169.254.0.0/16, fe80::/10)",
            "endpoints[0].addresses[3]: Invalid value: \"224.0.0.251\": may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)",
        ]
    );
    assert_eq!(
        check("EndpointSlice", slice("IPv6", &["::1"])),
        [
            "endpoints[0].addresses[0]: Invalid value: \"::1\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
        ]
    );
}

#[test]
fn slice_addresses_must_match_the_address_type() {
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &["2001:db8::1"])),
        ["endpoints[0].addresses[0]: Invalid value: \"2001:db8::1\": must be a valid IPv4 address"]
    );
    assert_eq!(
        check("EndpointSlice", slice("IPv6", &["10.0.0.1"])),
        ["endpoints[0].addresses[0]: Invalid value: \"10.0.0.1\": must be a valid IPv6 address"]
    );
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &["web"])),
        [
            "endpoints[0].addresses[0]: Invalid value: \"web\": must be a valid IPv4 address",
            "endpoints[0].addresses[0]: Invalid value: \"web\": must be a valid IP address",
        ]
    );
    assert_eq!(
        check("EndpointSlice", slice("FQDN", &["web"])),
        [
            "endpoints[0].addresses[0]: Invalid value: \"web\": should be a domain with at least two segments separated by dots"
        ]
    );
    assert_eq!(
        check("EndpointSlice", slice("IP", &["10.0.0.1"])),
        ["addressType: Unsupported value: \"IP\": supported values: \"FQDN\", \"IPv4\", \"IPv6\""]
    );
    let mut no_type = slice("IPv4", &["10.0.0.1"]);
    no_type.as_object_mut().unwrap().remove("addressType");
    assert_eq!(
        check("EndpointSlice", no_type),
        ["addressType: Required value"]
    );
}

#[test]
fn slice_address_and_endpoint_counts_are_bounded() {
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &[])),
        ["endpoints[0].addresses: Required value: must contain at least 1 address"]
    );
    let many: Vec<String> = (0..101)
        .map(|i| format!("10.0.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        check("EndpointSlice", slice("IPv4", &many)),
        ["endpoints[0].addresses: Too many: 101: must have at most 100 items"]
    );
    let mut big = slice("IPv4", &["10.0.0.1"]);
    big["endpoints"] = json!(vec![json!({"addresses": ["10.0.0.1"]}); 1001]);
    assert_eq!(
        check("EndpointSlice", big),
        ["endpoints: Too many: 1001: must have at most 1000 items"]
    );
}

#[test]
fn slice_ports_are_checked_and_defaulted() {
    let mut s = slice("IPv4", &["10.0.0.1"]);
    s["ports"] = json!([
        {"name": "http", "port": 80},
        {"name": "http", "port": 81, "protocol": "HTTP"},
        {"name": "Web", "port": 82, "appProtocol": "a/b/c"},
    ]);
    let errs = check("EndpointSlice", s.clone());
    assert_eq!(errs[0], "ports[1].name: Duplicate value: \"http\"");
    assert_eq!(
        errs[1],
        "ports[1].protocol: Unsupported value: \"HTTP\": supported values: \"SCTP\", \"TCP\", \"UDP\""
    );
    assert!(
        errs[2].starts_with("ports[2].name: Invalid value: \"Web\": a lowercase RFC 1123 label"),
        "{errs:?}"
    );
    assert!(
        errs[3].starts_with("ports[2].appProtocol: Invalid value: \"a/b/c\": a qualified name"),
        "{errs:?}"
    );
    assert_eq!(errs.len(), 4);
    // Defaults: TCP, and an unnamed port named "".
    let resource = kind("EndpointSlice");
    let mut unnamed = slice("IPv4", &["10.0.0.1"]);
    unnamed["ports"] = json!([{"port": 80}]);
    apply_defaults(&resource, &mut unnamed);
    assert_eq!(
        unnamed["ports"][0],
        json!({"name": "", "port": 80, "protocol": "TCP"})
    );
}

#[test]
fn slice_address_type_is_immutable() {
    let resource = kind("EndpointSlice");
    let old = slice("IPv4", &["10.0.0.1"]);
    let new = slice("IPv6", &["2001:db8::1"]);
    let errs: Vec<String> = errors(&resource, &new, Some(&old))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errs,
        ["addressType: Invalid value: \"IPv6\": field is immutable"]
    );
}

#[test]
fn metadata_names_follow_the_kinds_rule() {
    let pod = |name: &str| json!({"metadata": {"name": name, "namespace": "default"}, "spec": {"containers": [{"name": "app", "image": "pause"}]}});
    assert!(check("Pod", pod("app-b-0")).is_empty());
    assert!(
        check("Pod", pod("a.b.c")).is_empty(),
        "Pod names are DNS subdomains"
    );
    assert_eq!(
        check("Pod", pod("App_B")),
        [
            "metadata.name: Invalid value: \"App_B\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ]
    );
    let svc = |name: &str| json!({"metadata": {"name": name, "namespace": "default"}, "spec": {"ports": [{"port": 80}]}});
    assert!(check("Service", svc("app-svc")).is_empty());
    assert!(
        check("Service", svc("1app"))[0]
            .starts_with("metadata.name: Invalid value: \"1app\": a DNS-1035 label")
    );
    assert!(check("Service", svc("a.b"))[0].contains("a DNS-1035 label"));
    let ns = |name: &str| json!({"metadata": {"name": name}});
    assert!(check("Namespace", ns("team-a")).is_empty());
    assert_eq!(
        check("Namespace", ns("a.b")),
        ["metadata.name: Invalid value: \"a.b\": must not contain dots"]
    );
    assert_eq!(
        check("ConfigMap", json!({"metadata": {"namespace": "default"}})),
        ["metadata.name: Required value: name or generateName is required"]
    );
    assert_eq!(
        check(
            "ConfigMap",
            json!({"metadata": {"name": "c", "namespace": "Default"}})
        )[0],
        "metadata.namespace: Invalid value: \"Default\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
    );
    assert_eq!(
        check("ConfigMap", json!({"metadata": {"name": "c"}})),
        ["metadata.namespace: Required value"]
    );
    assert_eq!(
        check(
            "Namespace",
            json!({"metadata": {"name": "n", "namespace": "x"}})
        ),
        ["metadata.namespace: Forbidden: not allowed on this type"]
    );
}

#[test]
fn generate_name_is_a_prefix() {
    let cm =
        |g: &str| json!({"metadata": {"generateName": g, "name": "ok", "namespace": "default"}});
    assert!(
        check("ConfigMap", cm("web-")).is_empty(),
        "a trailing dash is allowed in a prefix"
    );
    assert!(
        check("ConfigMap", cm("Web-"))[0]
            .starts_with("metadata.generateName: Invalid value: \"Web-\"")
    );
}

#[test]
fn labels_and_annotations() {
    let cm = |meta: Value| {
        let mut m = json!({"name": "c", "namespace": "default"});
        m.as_object_mut()
            .unwrap()
            .extend(meta.as_object().unwrap().clone());
        json!({"metadata": m})
    };
    assert!(
        check(
            "ConfigMap",
            cm(json!({"labels": {"app.kubernetes.io/name": "web", "version": ""}}))
        )
        .is_empty()
    );
    let errs = check(
        "ConfigMap",
        cm(json!({"labels": {"bad key": "v", "k": "-v"}})),
    );
    assert!(
        errs[0]
            .starts_with("metadata.labels: Invalid value: \"bad key\": name part must consist of"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with(
            "metadata.labels: Invalid value: \"-v\": a valid label must be an empty string"
        ),
        "{errs:?}"
    );
    let long = "v".repeat(64);
    assert_eq!(
        check("ConfigMap", cm(json!({"labels": {"k": long}}))),
        [format!(
            "metadata.labels: Invalid value: \"{long}\": must be no more than 63 characters"
        )]
    );
    // Annotation keys are qualified names in any case; values are free but bounded in total.
    assert!(
        check(
            "ConfigMap",
            cm(json!({"annotations": {"Example.COM/Key": "any text at all"}}))
        )
        .is_empty()
    );
    assert!(
        check("ConfigMap", cm(json!({"annotations": {"a/b/c": ""}})))[0]
            .starts_with("metadata.annotations: Invalid value: \"a/b/c\": a qualified name")
    );
    assert_eq!(
        check(
            "ConfigMap",
            cm(json!({"annotations": {"k": "x".repeat(256 * 1024)}}))
        ),
        ["metadata.annotations: Too long: may not be more than 262144 bytes"]
    );
}

fn pod_with(spec: Value, status: Value) -> Value {
    json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec, "status": status})
}

#[test]
fn pods_need_named_containers_with_images() {
    assert_eq!(
        check("Pod", pod_with(json!({}), json!({}))),
        ["spec.containers: Required value"]
    );
    let spec =
        json!({"containers": [{"name": "app"}, {"name": "app", "image": "x"}, {"image": "x"}]});
    assert_eq!(
        check("Pod", pod_with(spec, json!({}))),
        [
            "spec.containers[0].image: Required value",
            "spec.containers[1].name: Duplicate value: \"app\"",
            "spec.containers[2].name: Required value",
        ]
    );
    let spec =
        json!({"containers": [{"name": "App", "image": "x"}], "serviceAccountName": "Service_A"});
    let errs = check("Pod", pod_with(spec, json!({})));
    assert!(errs[0].starts_with(
        "spec.containers[0].name: Invalid value: \"App\": a lowercase RFC 1123 label"
    ));
    assert!(errs[1].starts_with("spec.serviceAccountName: Invalid value: \"Service_A\""));
}

#[test]
fn pod_container_ports() {
    let spec = json!({"containers": [{"name": "app", "image": "x", "ports": [
        {"containerPort": 8080, "name": "http"},
        {"containerPort": 0, "name": "8080"},
        {"containerPort": 9090, "name": "http", "protocol": "ICMP"},
    ]}]});
    assert_eq!(
        check("Pod", pod_with(spec, json!({}))),
        [
            "spec.containers[0].ports[1].name: Invalid value: \"8080\": must contain at least one letter (a-z)",
            "spec.containers[0].ports[1].containerPort: Invalid value: 0: must be between 1 and 65535, inclusive",
            "spec.containers[0].ports[2].name: Duplicate value: \"http\"",
            "spec.containers[0].ports[2].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
        ]
    );
}

#[test]
fn pod_ips_when_set() {
    let spec = json!({"containers": [{"name": "app", "image": "x"}]});
    assert!(
        check(
            "Pod",
            pod_with(spec.clone(), json!({"podIP": "198.18.40.4"}))
        )
        .is_empty()
    );
    // A pod's address may be loopback as far as the API goes (hostNetwork pods on a laptop).
    assert!(check("Pod", pod_with(spec.clone(), json!({"podIP": "127.0.0.1"}))).is_empty());
    assert_eq!(
        check("Pod", pod_with(spec.clone(), json!({"podIP": "pod-a"}))),
        [
            "status.podIPs[0]: Invalid value: \"pod-a\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
        ]
    );
    assert!(
        check(
            "Pod",
            pod_with(
                spec.clone(),
                json!({"podIPs": [{"ip": "10.0.0.1"}, {"ip": "2001:db8::1"}]})
            )
        )
        .is_empty()
    );
    assert_eq!(
        check(
            "Pod",
            pod_with(
                spec,
                json!({"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]})
            )
        ),
        [
            "status.podIPs: Invalid value: [\"10.0.0.1\",\"10.0.0.2\"]: may specify no more than one IP for each IP family"
        ]
    );
}

fn svc(spec: Value) -> Value {
    json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec})
}

#[test]
fn service_ports() {
    assert!(
        check(
            "Service",
            svc(json!({"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}))
        )
        .is_empty()
    );
    assert_eq!(
        check("Service", svc(json!({}))),
        ["spec.ports: Required value"]
    );
    assert!(
        check("Service", svc(json!({"clusterIP": "None"}))).is_empty(),
        "headless needs no ports"
    );
    assert!(
        check(
            "Service",
            svc(json!({"type": "ExternalName", "externalName": "a.b"}))
        )
        .is_empty()
    );
    let errs = check(
        "Service",
        svc(
            json!({"ports": [{"port": 80}, {"name": "a", "port": 70000, "targetPort": 0}, {"name": "a", "port": 81, "protocol": "http"}]}),
        ),
    );
    assert_eq!(
        errs,
        [
            "spec.ports[0].name: Required value",
            "spec.ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            "spec.ports[1].targetPort: Invalid value: 0: must be between 1 and 65535, inclusive",
            "spec.ports[2].name: Duplicate value: \"a\"",
            "spec.ports[2].protocol: Unsupported value: \"http\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
        ]
    );
}

#[test]
fn service_cluster_ip_type_and_selector() {
    let ports = json!([{"port": 80}]);
    assert!(
        check(
            "Service",
            svc(json!({"ports": ports, "clusterIP": "10.96.0.10"}))
        )
        .is_empty()
    );
    assert_eq!(
        check("Service", svc(json!({"ports": ports, "clusterIP": "web"}))),
        [
            "spec.clusterIPs[0]: Invalid value: \"web\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
        ]
    );
    assert_eq!(
        check("Service", svc(json!({"ports": ports, "type": "Mesh"}))),
        [
            "spec.type: Unsupported value: \"Mesh\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        ]
    );
    assert!(
        check(
            "Service",
            svc(json!({"ports": ports, "selector": {"app": "-x"}}))
        )[0]
        .starts_with("spec.selector: Invalid value: \"-x\"")
    );
}

#[test]
fn custom_resources_get_metadata_validation() {
    let split = ResourceType::new(
        "split.smi-spec.io",
        "v1alpha4",
        "trafficsplits",
        "TrafficSplit",
        true,
    );
    let bad = json!({"metadata": {"name": "Web_Split", "namespace": "default"}, "spec": {}});
    let e = validate(&split, &bad, None).unwrap_err();
    assert_eq!(e.code, 422);
    assert!(e.message.starts_with("TrafficSplit.split.smi-spec.io \"Web_Split\" is invalid: metadata.name: Invalid value: \"Web_Split\": a lowercase RFC 1123 subdomain"), "{}", e.message);
    let good = json!({"metadata": {"name": "web-split", "namespace": "default"}, "spec": {}});
    assert!(validate(&split, &good, None).is_ok());
}
