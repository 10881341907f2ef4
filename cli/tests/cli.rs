//! `trellis validate` as a user runs it: the real binary on the test data of trellis-smi.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ sits in the workspace")
        .to_owned()
}

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("the trellis binary runs")
}

/// One precise error per problem planted in smi/tests/data/broken (each file says what it holds).
const EXPECTED_ERRORS: &[&str] = &[
    "smi/tests/data/broken/policies.yaml:8: TrafficPolicy shop/negative: spec.timeouts.request: \"-2s\" is negative: durations are lengths of time, e.g. 250ms or 2s",
    "smi/tests/data/broken/policies.yaml:18: TrafficPolicy shop/too-much: spec.fault.abort.percent: 150 is not a percent (0 to 100)",
    "smi/tests/data/broken/policies.yaml:29: TrafficPolicy shop/post-retried: spec.routes[0].retries.methods[1]: POST is not idempotent: a retry may apply it twice; set retries.allowNonIdempotent: true if the service tolerates that",
    "smi/tests/data/broken/policies.yaml:38: TrafficPolicy shop/typo: spec.retries.retryOn: unknown field `retryOn`, expected one of `attempts`, `on`, `statusCodes`, `grpcCodes`, `methods`, `allowNonIdempotent`, `backoff`, `budget`, `maxBodyBytes`",
    "smi/tests/data/broken/policies.yaml:47: TrafficPolicy shop/missing-match: spec.routes[0].matches[0]: HTTPRouteGroup shop/api-routes has no match named \"admin\"",
    "smi/tests/data/broken/routes.yaml:21: HTTPRouteGroup shop/bad-regexes: spec.matches[0].pathRegex: invalid regex \"/api/(v1\": unclosed group",
    "smi/tests/data/broken/routes.yaml:23: HTTPRouteGroup shop/bad-regexes: spec.matches[1].pathRegex: regex is too large: it compiles to more than 262144 bytes",
    "smi/tests/data/broken/routes.yaml:25: HTTPRouteGroup shop/bad-regexes: spec.matches[2].methods[1]: unknown HTTP method \"FETCH\" (expected one of *, GET, HEAD, PUT, POST, DELETE, CONNECT, OPTIONS, TRACE, PATCH)",
    "smi/tests/data/broken/routes.yaml:32: HTTPRouteGroup shop/wrapped: spec: unknown field `spec`: this version has no `spec` wrapper, its fields sit at the top level",
    "smi/tests/data/broken/routes.yaml:43: TCPRoute shop/api-port: spec.matches.ports[1]: invalid value: integer `70000`, expected u16",
    "smi/tests/data/broken/splits.yaml:13: TrafficSplit shop/negative: spec.backends[1].weight: must be a non-negative integer, got -5",
    "smi/tests/data/broken/splits.yaml:24: TrafficSplit shop/fractional: spec.backends[0].weight: must be a non-negative integer, got 1.5",
    "smi/tests/data/broken/splits.yaml:33: TrafficSplit shop/no-backends: spec.backends: must list at least one backend",
    "smi/tests/data/broken/splits.yaml:44: TrafficSplit shop/bad-quantity: spec.backends[0].weight: must be a non-negative Kubernetes quantity such as \"1\" or \"500m\", got \"lots\"",
    "smi/tests/data/broken/splits.yaml:55: TrafficSplit shop/missing-group: spec.matches[0].name: HTTPRouteGroup shop/no-such-group does not exist",
    "smi/tests/data/broken/splits.yaml:69: TrafficSplit shop/typo: spec.backends[0].weigth: unknown field `weigth`, expected `service` or `weight`",
    "smi/tests/data/broken/syntax.yaml:7: invalid YAML: unclosed bracket '[' at line 7, column 13",
    "smi/tests/data/broken/targets.yaml:7: TrafficTarget shop/no-sources: spec: missing field `sources`",
    "smi/tests/data/broken/targets.yaml:24: TrafficTarget shop/no-rules: spec.rules: must list at least one rule",
    "smi/tests/data/broken/targets.yaml:39: TrafficTarget shop/grpc-rule: spec.rules[0].kind: unknown variant `GRPCRoute`, expected one of `HTTPRouteGroup`, `TCPRoute`, `UDPRoute`",
    "smi/tests/data/broken/targets.yaml:60: TrafficTarget shop/missing-match: spec.rules[0].matches[1]: HTTPRouteGroup shop/api-routes has no match named \"admin\"",
    "smi/tests/data/broken/targets.yaml:71: TrafficTarget shop/not-a-service-account: destination.kind: must be ServiceAccount (Trellis identities are service accounts), got \"Pod\"",
    "smi/tests/data/broken/unknown.yaml:2: TrafficSplit shop/future: apiVersion: TrafficSplit has no version \"v1alpha9\" (known: v1alpha1, v1alpha2, v1alpha3, v1alpha4)",
    "smi/tests/data/broken/unknown.yaml:12: ConfigMap shop/not-smi: kind: unknown kind \"ConfigMap\" (known: TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute, TrafficPolicy, ExternalService)",
    "smi/tests/data/broken/unknown.yaml:30: HTTPRouteGroup shop/api-routes: metadata.name: HTTPRouteGroup shop/api-routes is also defined at smi/tests/data/broken/routes.yaml:2; each resource may be defined once",
    "25 error(s) in 6 file(s)",
];

#[test]
fn broken_documents_get_one_precise_error_each() {
    let output = trellis(&["validate", "smi/tests/data/broken"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines, EXPECTED_ERRORS, "full output:\n{stderr}");
    assert!(
        output.stdout.is_empty(),
        "no resource summaries when there are errors"
    );
}

#[test]
fn valid_documents_get_one_summary_line_each() {
    let output = trellis(&[
        "validate",
        "smi/tests/data/examples/split-v1alpha4.yaml",
        "smi/tests/data/examples/access-v1alpha1.yaml",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "smi/tests/data/examples/split-v1alpha4.yaml:2: TrafficSplit split-v1alpha4/canary (split.smi-spec.io/v1alpha4): root website -> website-v1 90, website-v2 10",
            "smi/tests/data/examples/split-v1alpha4.yaml:15: TrafficSplit split-v1alpha4/ab-test (split.smi-spec.io/v1alpha4): root website -> website-v1 0, website-v2 100 for route groups ab-test",
            "smi/tests/data/examples/split-v1alpha4.yaml:31: HTTPRouteGroup split-v1alpha4/ab-test (specs.smi-spec.io/v1alpha4): 1 match(es): firefox-users",
            "smi/tests/data/examples/split-v1alpha4.yaml:42: TrafficSplit split-v1alpha4/foobar-rollout (split.smi-spec.io/v1alpha4): root foobar -> foobar-v1 1000, foobar-v2 500",
            "smi/tests/data/examples/access-v1alpha1.yaml:2: TrafficTarget access-v1alpha1/path-specific (access.smi-spec.io/v1alpha1): allow prometheus -> service-a port 8080, 1 rule(s)",
            "smi/tests/data/examples/access-v1alpha1.yaml:22: HTTPRouteGroup access-v1alpha1/the-routes (specs.smi-spec.io/v1alpha1): 2 match(es): metrics, everything",
            "6 resource(s) valid",
        ]
    );
}

#[test]
fn a_missing_path_is_an_error() {
    let output = trellis(&["validate", "no/such/dir"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.starts_with("no/such/dir: cannot read: "), "{stderr}");
}

#[test]
fn crds_subcommand_writes_every_crd() {
    let dir = std::env::temp_dir().join(format!("trellis-crds-{}", std::process::id()));
    let output = trellis(&["crds", "--out", dir.to_str().unwrap()]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        files,
        [
            "externalservices.policy.trellis.io.yaml",
            "gateways.policy.trellis.io.yaml",
            "httproutegroups.specs.smi-spec.io.yaml",
            "tcproutes.specs.smi-spec.io.yaml",
            "trafficpolicies.policy.trellis.io.yaml",
            "trafficsplits.split.smi-spec.io.yaml",
            "traffictargets.access.smi-spec.io.yaml",
            "udproutes.specs.smi-spec.io.yaml",
        ]
    );
}

/// Gateway documents (policy.trellis.io/v1alpha1) are checked by `trellis validate` like the
/// policy kinds: listed when good, each problem with its file, line, Gateway and field.
#[test]
fn gateway_documents_are_validated_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("gateway.yaml");
    let text = "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  certificates:
    - hosts: [shop.example.com]
      secretName: shop-tls
  routes:
    - host: shop.example.com
      pathPrefix: /api
      service: {name: api, port: 8080}
";
    std::fs::write(&good, text).unwrap();
    let output = trellis(&["validate", good.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!(
                "{}:1: Gateway shop/public (policy.trellis.io/v1alpha1): https :8443, 1 certificate(s), 1 route(s)",
                good.display()
            ),
            "1 resource(s) valid".to_owned(),
        ]
    );
    std::fs::write(
        &good,
        text.replace(
            "host: shop.example.com\n      pathPrefix",
            "host: www.example.com\n      pathPrefix",
        ),
    )
    .unwrap();
    let output = trellis(&["validate", good.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!(
            "{}:10: Gateway shop/public: spec.routes[0].host: \"www.example.com\" is served by no certificate",
            good.display()
        )),
        "{stderr}"
    );
}
