//! TrafficPolicy documents through the loader: a good one loads into the model, bad ones get
//! the same located errors as the SMI kinds (`file:line: TrafficPolicy ns/name: field: message`),
//! the settings' own checks (`trellis_policy`) included, at their place in the document.

use trellis_smi::load::{load_paths, load_str};
use trellis_smi::model::{Kind, Policy};

const GROUP: &str = "---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: web-routes, namespace: shop}
spec:
  matches:
  - {name: api, pathRegex: '/api/.*'}
  - {name: static, pathRegex: '/static/.*'}
";

fn errors(yaml: &str) -> Vec<String> {
    let report = load_str("p.yaml", &format!("{yaml}{GROUP}"));
    report.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn a_good_traffic_policy_loads_into_the_model() {
    let yaml = "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {name: web}
  timeouts: {request: 2s}
  retries: {attempts: 3}
  loadBalancer: roundRobin
  routes:
  - httpRouteGroup: web-routes
    matches: [api]
    timeouts: {request: 250ms}
";
    let report = load_str("p.yaml", &format!("{yaml}{GROUP}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let policy = report
        .resources
        .iter()
        .find_map(|r| match &r.policy {
            Policy::TrafficPolicy(p) => Some(p),
            _ => None,
        })
        .expect("the TrafficPolicy loaded");
    assert_eq!(report.resources[0].object.kind(), Kind::TrafficPolicy);
    assert_eq!(
        report.resources[0].object.api_version(),
        "policy.trellis.io/v1alpha1"
    );
    assert_eq!(policy.target_ref.name, "web");
    let timeouts = policy.policy.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request.unwrap().as_millis(), 2000);
    assert_eq!(policy.policy.retries.as_ref().unwrap().attempts, 3);
    assert_eq!(
        policy.policy.load_balancer,
        Some(trellis_policy::LoadBalancer::RoundRobin)
    );
    assert_eq!(policy.routes.len(), 1);
    assert_eq!(policy.routes[0].http_route_group, "web-routes");
    assert!(policy.routes[0].covers("api") && !policy.routes[0].covers("static"));
    let route_timeout = policy.routes[0].policy.timeouts.as_ref().unwrap().request;
    assert_eq!(route_timeout.unwrap().as_millis(), 250);
    assert_eq!(
        report.resources[0].policy.summary(),
        "service web: timeouts, retries, loadBalancer, 1 route section(s)"
    );
}

#[test]
fn bad_traffic_policies_get_exact_located_errors() {
    let head = |name: &str| {
        format!(
            "apiVersion: policy.trellis.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {{name: web}}\n"
        )
    };
    // Negative duration: refused while parsing, at the field's line.
    let negative = head("negative") + "  timeouts:\n    request: -2s\n";
    assert_eq!(
        errors(&negative),
        [
            "p.yaml:7: TrafficPolicy shop/negative: spec.timeouts.request: \"-2s\" is negative: durations are lengths of time, e.g. 250ms or 2s"
        ]
    );
    // A percent over 100: trellis_policy's check, its path under `spec.`.
    let percent =
        head("percent") + "  fault:\n    abort:\n      httpStatus: 503\n      percent: 150\n";
    assert_eq!(
        errors(&percent),
        [
            "p.yaml:9: TrafficPolicy shop/percent: spec.fault.abort.percent: 150 is not a percent (0 to 100)"
        ]
    );
    // POST retried without the opt-in, in a route section: under `spec.routes[0].`.
    let post = head("post")
        + "  routes:\n  - httpRouteGroup: web-routes\n    retries:\n      attempts: 2\n      methods: [GET, POST]\n";
    assert_eq!(
        errors(&post),
        [
            "p.yaml:10: TrafficPolicy shop/post: spec.routes[0].retries.methods[1]: POST is not idempotent: a retry may apply it twice; set retries.allowNonIdempotent: true if the service tolerates that"
        ]
    );
    // Unknown field: named with what was expected.
    let unknown = head("unknown") + "  retries:\n    attempts: 2\n    retryOn: [reset]\n";
    let found = errors(&unknown);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("p.yaml:8: TrafficPolicy shop/unknown: spec.retries.retryOn: unknown field `retryOn`, expected one of `attempts`, `on`,"),
        "{found:?}"
    );
    // Target and route references.
    let target = "apiVersion: policy.trellis.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pod, namespace: shop}\nspec:\n  targetRef: {kind: Pod, name: web-0}\n";
    assert_eq!(
        errors(target),
        [
            "p.yaml:5: TrafficPolicy shop/pod: spec.targetRef.kind: must be Service (a TrafficPolicy applies to a Service), got \"Pod\""
        ]
    );
    let missing = head("missing")
        + "  routes:\n  - httpRouteGroup: web-routes\n    matches: [api, admin]\n  - httpRouteGroup: nope\n";
    assert_eq!(
        errors(&missing),
        [
            "p.yaml:8: TrafficPolicy shop/missing: spec.routes[0].matches[1]: HTTPRouteGroup shop/web-routes has no match named \"admin\"",
            "p.yaml:9: TrafficPolicy shop/missing: spec.routes[1].httpRouteGroup: HTTPRouteGroup shop/nope does not exist",
        ]
    );
}

#[test]
fn the_broken_policy_examples_are_reported_with_file_and_line() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/broken");
    let report = load_paths(&[dir.join("policies.yaml"), dir.join("routes.yaml")]);
    let lines: Vec<String> = report
        .errors
        .iter()
        .filter(|e| e.file.ends_with("policies.yaml"))
        .map(|e| format!("{}: {}", e.line.unwrap(), e.field.as_ref().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            "8: spec.timeouts.request",
            "18: spec.fault.abort.percent",
            "29: spec.routes[0].retries.methods[1]",
            "38: spec.retries.retryOn",
            "47: spec.routes[0].matches[0]",
        ]
    );
}

/// `jwt` and `claims` (service and route section) load into the model as written, defaults
/// left to the proxy (a provider's algorithms and clock skew are filled by parsing).
#[test]
fn jwt_and_claims_load_into_the_model() {
    let yaml = "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRef: {name: web}
  jwt:
    required: true
    providers:
    - issuer: https://auth.example.com
      audiences: [web]
      jwks: {file: /etc/trellis/jwks.json}
      algorithms: [ES256]
  claims:
  - {claim: aud, values: [web]}
  routes:
  - httpRouteGroup: web-routes
    matches: [api]
    claims:
    - {claim: realm_access.roles, values: [admin, operator]}
";
    let report = load_str("p.yaml", &format!("{yaml}{GROUP}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let Policy::TrafficPolicy(policy) = &report.resources[0].policy else {
        panic!("not a TrafficPolicy: {:?}", report.resources[0].policy);
    };
    let jwt = policy.jwt.as_ref().expect("jwt loaded");
    assert!(jwt.required);
    assert_eq!(jwt.providers[0].issuer, "https://auth.example.com");
    assert_eq!(
        jwt.providers[0].algorithms,
        [trellis_policy::jwt::Algorithm::ES256]
    );
    assert_eq!(policy.claims.len(), 1);
    assert_eq!(policy.claims[0].claim, "aud");
    assert_eq!(policy.routes[0].claims[0].claim, "realm_access.roles");
    assert_eq!(policy.routes[0].claims[0].values, ["admin", "operator"]);
    // A route section with claims only still counts as a section; the other settings stay unset.
    assert!(policy.routes[0].policy.timeouts.is_none());
}

#[test]
fn bad_jwt_and_claims_get_located_errors_with_their_paths() {
    let head = |name: &str| {
        format!(
            "apiVersion: policy.trellis.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRef: {{name: web}}\n"
        )
    };
    // The provider's own checks (trellis_policy::jwt), under `spec.jwt.`; a route section's
    // claims under `spec.routes[0].claims[0].`; each at its line.
    let bad = head("bad")
        + "  jwt:
    providers:
    - issuer: https://auth.example.com
      audiences: []
      jwks: {file: /etc/jwks.json}
      algorithms: [HS256]
  routes:
  - httpRouteGroup: web-routes
    matches: [api]
    claims:
    - {claim: role, values: []}
";
    assert_eq!(
        errors(&bad),
        [
            "p.yaml:9: TrafficPolicy shop/bad: spec.jwt.providers[0].audiences: empty: name at least one aud, or a token the issuer made for any other service would be accepted",
            "p.yaml:11: TrafficPolicy shop/bad: spec.jwt.providers[0].algorithms[0]: HS256 is an HMAC with a shared secret, and the keys come from a JWKS of public keys: allowing it lets anyone sign with a published public key",
            "p.yaml:16: TrafficPolicy shop/bad: spec.routes[0].claims[0].values: no value: the condition could never hold",
        ]
    );
    // Claims without jwt: nothing would ever verify them, so every covered request would be
    // refused; said at the list.
    let no_jwt = head("nojwt") + "  claims:\n  - {claim: role, values: [admin]}\n";
    assert_eq!(
        errors(&no_jwt),
        [
            "p.yaml:6: TrafficPolicy shop/nojwt: spec.claims: a claim condition needs spec.jwt: without it no request has verified claims, and every request it covers would be refused"
        ]
    );
    // The proxies read a JWKS file on their hosts: a relative path would differ on each.
    let relative = head("relative")
        + "  jwt:\n    providers:\n    - issuer: https://i\n      audiences: [web]\n      jwks: {file: keys/jwks.json}\n";
    assert_eq!(
        errors(&relative),
        [
            "p.yaml:10: TrafficPolicy shop/relative: spec.jwt.providers[0].jwks.file: \"keys/jwks.json\" is relative: write the absolute path of the JWKS file on the proxies' hosts"
        ]
    );
    // A misspelt provider field is refused while parsing, with its path.
    let typo = head("typo")
        + "  jwt:\n    providers:\n    - issuer: https://i\n      audience: [web]\n      jwks: {file: /k.json}\n";
    let found = errors(&typo);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("p.yaml:9: TrafficPolicy shop/typo: spec.jwt.providers[0].audience: unknown field `audience`"),
        "{found:?}"
    );
}
