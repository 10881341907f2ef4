//! ExternalService documents through the loader: a good one loads into the model; every rule
//! of `validate::check_external_service` gives a located error
//! (`file:line: ExternalService ns/name: field: message`) at its place in the document.

use trellis_smi::load::load_str;
use trellis_smi::model::{ExternalProtocol, Policy};

const CA: &str = include_str!("data/examples/external-v1alpha1.yaml");

/// The PEM block of the example file (a real self-signed certificate).
fn ca_pem() -> String {
    let start = CA.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = CA.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    CA[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

fn document(spec: &str) -> String {
    format!(
        "apiVersion: policy.trellis.io/v1alpha1
kind: ExternalService
metadata: {{name: payments, namespace: shop}}
spec:
{spec}"
    )
}

fn errors(spec: &str) -> Vec<String> {
    load_str("e.yaml", &document(spec))
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

const SOURCES: &str = "  sources:\n  - {kind: ServiceAccount, name: checkout}\n";

#[test]
fn a_good_external_service_loads_into_the_model() {
    let spec = format!(
        "  hosts: [api.pay.example]
  ports:
  - {{port: 443, protocol: tls}}
  - {{port: 80, protocol: http, originateTls: {{port: 443}}}}
  caBundle: {:?}
  addresses: [203.0.113.7]
{SOURCES}",
        ca_pem()
    );
    let report = load_str("e.yaml", &document(&spec));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let Policy::ExternalService(external) = &report.resources[0].policy else {
        panic!("an ExternalService");
    };
    assert_eq!(external.hosts, ["api.pay.example"]);
    assert_eq!(external.ports[0].protocol, ExternalProtocol::Tls);
    assert_eq!(external.ports[1].target_port(), 443);
    assert_eq!(external.addresses, ["203.0.113.7"]);
    assert_eq!(external.sources[0].name, "checkout");
    assert!(
        report.resources[0]
            .policy
            .summary()
            .contains("api.pay.example")
    );
}

#[test]
fn each_rule_is_a_located_error() {
    let cases: [(String, &str); 14] = [
        (
            format!("  hosts: []\n  ports: [{{port: 443, protocol: tls}}]\n{SOURCES}"),
            "e.yaml:5: ExternalService shop/payments: spec.hosts: must list at least one host",
        ),
        (
            format!("  hosts: [api.pay.example, bad_name.example]\n  ports: [{{port: 443, protocol: tls}}]\n{SOURCES}"),
            "e.yaml:5: ExternalService shop/payments: spec.hosts[1]: \"bad_name.example\" is not a DNS name: label \"bad_name\" must be 1-63 letters, digits or inner hyphens",
        ),
        (
            format!("  hosts: [API.pay.example]\n  ports: [{{port: 443, protocol: tls}}]\n{SOURCES}"),
            "e.yaml:5: ExternalService shop/payments: spec.hosts[0]: \"API.pay.example\" must be lower case (DNS names are compared in lower case)",
        ),
        (
            format!("  hosts: [203.0.113.7]\n  ports: [{{port: 443, protocol: tls}}]\n{SOURCES}"),
            "e.yaml:5: ExternalService shop/payments: spec.hosts[0]: \"203.0.113.7\" is an IP address, not a host name (fixed IPs go in spec.addresses)",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports:\n  - {{port: 443, protocol: tls}}\n  - {{port: 443, protocol: http}}\n{SOURCES}"),
            "e.yaml:8: ExternalService shop/payments: spec.ports[1].port: port 443 is declared twice (also spec.ports[0])",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports:\n  - {{port: 443, protocol: quic}}\n{SOURCES}"),
            "e.yaml:7: ExternalService shop/payments: spec.ports[0].protocol: unknown variant `quic`, expected one of `tls`, `http`, `tcp`",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports:\n  - {{port: 443, protocol: tls, originateTls: {{port: 443}}}}\n{SOURCES}"),
            "e.yaml:7: ExternalService shop/payments: spec.ports[0].originateTls: only an http port can originate TLS, this one is tls (the application's own TLS passes through)",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports:\n  - {{port: 80, protocol: http, originateTls: {{port: 443}}}}\n  caBundle: not a certificate\n{SOURCES}"),
            "e.yaml:8: ExternalService shop/payments: spec.caBundle: holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports:\n  - {{port: 80, protocol: http, originateTls: {{port: 443}}}}\n  caBundle: \"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\\n\"\n{SOURCES}"),
            "e.yaml:8: ExternalService shop/payments: spec.caBundle: PEM block 1 is a \"PRIVATE KEY\", not a CERTIFICATE",
        ),
        (
            "  hosts: [a.b.example]\n  ports: [{port: 443, protocol: tls}]\n  sources: []\n".to_owned(),
            "e.yaml:7: ExternalService shop/payments: spec.sources: must list at least one source (the service accounts allowed to call it)",
        ),
        (
            "  hosts: [a.b.example]\n  ports: [{port: 443, protocol: tls}]\n  sources:\n  - {kind: User, name: x}\n".to_owned(),
            "e.yaml:8: ExternalService shop/payments: spec.sources[0].kind: must be ServiceAccount (Trellis identities are service accounts), got \"User\"",
        ),
        (
            "  hosts: [a.b.example]\n  ports: [{port: 443, protocol: tls}]\n  sources:\n  - {kind: ServiceAccount, name: \"*\"}\n".to_owned(),
            "e.yaml:8: ExternalService shop/payments: spec.sources[0].namespace: name \"*\" needs namespace \"*\" too: a wildcard source means every workload of the mesh; list one namespace's service accounts by name",
        ),
        (
            "  hosts: [a.b.example]\n  ports: [{port: 443, protocol: tls}]\n  sources:\n  - {kind: ServiceAccount, name: checkout, namespace: \"*\"}\n".to_owned(),
            "e.yaml:8: ExternalService shop/payments: spec.sources[0].name: namespace \"*\" needs name \"*\" too: a wildcard source means every workload of the mesh; list one namespace's service accounts by name",
        ),
        (
            format!("  hosts: [a.b.example]\n  ports: [{{port: 443, protocol: tls}}]\n  addresses: [pay.example]\n{SOURCES}"),
            "e.yaml:7: ExternalService shop/payments: spec.addresses[0]: \"pay.example\" is not an IP address (addresses are fixed IPs; names go in hosts)",
        ),
    ];
    for (spec, expected) in cases {
        let got = errors(&spec);
        assert_eq!(got, [expected], "{spec}");
    }
}

#[test]
fn every_workload_of_the_mesh_is_the_one_wildcard_source() {
    let spec = "  hosts: [a.b.example]\n  ports: [{port: 443, protocol: tls}]\n  sources:\n  - {kind: ServiceAccount, name: \"*\", namespace: \"*\"}\n";
    let report = load_str("e.yaml", &document(spec));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let Policy::ExternalService(external) = &report.resources[0].policy else {
        panic!("an ExternalService");
    };
    assert!(external.sources[0].is_anyone());
}

#[test]
fn a_ca_bundle_without_tls_origination_is_an_error() {
    let spec = format!(
        "  hosts: [a.b.example]\n  ports: [{{port: 443, protocol: tls}}]\n  caBundle: {:?}\n{SOURCES}",
        ca_pem()
    );
    assert_eq!(
        errors(&spec),
        [
            "e.yaml:7: ExternalService shop/payments: spec.caBundle: is only used by ports with originateTls, and none has it"
        ]
    );
}
