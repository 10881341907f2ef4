//! The Gateway kind (`policy.trellis.io/v1alpha1`): documents checked by the loader with
//! located errors (what `trellis validate` prints), the CRD's schema and its Rust type accepting
//! exactly the documents trellis-gateway (what the proxy reads) accepts.

use serde_json::Value;
use trellis_smi::api::gateway::v1alpha1::Gateway;
use trellis_smi::load::load_str;

const GOOD: &str = "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  https: {port: 8443}
  httpRedirect: {port: 8080}
  certificates:
    - hosts: [shop.example.com, \"*.shop.example.com\"]
      secretName: shop-tls
  routes:
    - host: shop.example.com
      pathPrefix: /api
      service: {name: api, port: 8080}
    - host: shop.example.com
      service: {name: web, namespace: front, port: 80}
  jwt:
    required: true
    providers:
      - issuer: https://issuer.example.com
        audiences: [shop]
        jwks: {file: /etc/jwks.json}
";

#[test]
fn a_good_gateway_loads_beside_policies() {
    let text = format!(
        "{GOOD}---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: web, namespace: front}}\nspec:\n  service: web\n  backends: [{{service: web-v1, weight: 1}}]\n"
    );
    let report = load_str("gateway.yaml", &text);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.resources.len(), 1);
    assert_eq!(report.gateways.len(), 1);
    let gateway = &report.gateways[0];
    assert_eq!(gateway.source.line, 1);
    assert_eq!(gateway.document.metadata.name, "public");
    assert_eq!(
        gateway.document.spec.routes[1].service.authority("shop"),
        "web.front:80"
    );
}

#[test]
fn gateway_errors_name_file_line_resource_and_field() {
    let cases = [
        (
            GOOD.replace("pathPrefix: /api", "pathPrefix: api"),
            "gateway.yaml:12: Gateway shop/public: spec.routes[0].pathPrefix: \"api\": must start with /",
        ),
        (
            GOOD.replace("pathPrefix: /api", "pathPrefx: /api"),
            "gateway.yaml:12: Gateway shop/public: spec.routes[0].pathPrefx: unknown field `pathPrefx`",
        ),
        (
            GOOD.replace("      secretName: shop-tls\n", ""),
            "gateway.yaml:8: Gateway shop/public: spec.certificates[0]: name certFile and keyFile, or a secretName",
        ),
        (
            GOOD.replace("    required: true\n", "    required: true\n    extra: 1\n"),
            "gateway.yaml:18: Gateway shop/public: spec.jwt.extra: unknown field `extra`",
        ),
    ];
    for (text, expected) in cases {
        let report = load_str("gateway.yaml", &text);
        assert!(report.gateways.is_empty());
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        assert!(
            errors.first().is_some_and(|e| e.starts_with(expected)),
            "{errors:?}\nexpected: {expected}"
        );
    }
}

/// The CRD's schema (what the API server checks), the CRD's Rust type and trellis-gateway's
/// document type agree on what is a Gateway: they accept the good document and refuse each
/// wrong shape.
#[test]
fn the_crd_schema_the_crd_type_and_the_proxy_s_type_accept_the_same_documents() {
    let crd = serde_json::to_value(trellis_smi::crd::generate_gateway()).unwrap();
    assert_eq!(crd["metadata"]["name"], "gateways.policy.trellis.io");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(
        (&version["name"], &version["served"], &version["storage"]),
        (
            &Value::from("v1alpha1"),
            &Value::Bool(true),
            &Value::Bool(true)
        )
    );
    let schema = jsonschema::validator_for(&version["schema"]["openAPIV3Schema"]).unwrap();
    let good: Value = serde_yaml_ng::from_str(GOOD).unwrap();
    let wrong = [
        ("/spec/https/port", Value::from("https")),
        ("/spec/routes/0/service/port", Value::from("eighty")),
        ("/spec/routes/0/host", Value::from(7)),
        (
            "/spec/certificates/0/hosts",
            Value::from("shop.example.com"),
        ),
        ("/spec/routes", Value::from("none")),
    ];
    let mut documents = vec![(good.clone(), true)];
    for (pointer, value) in wrong {
        let mut doc = good.clone();
        *doc.pointer_mut(pointer).unwrap() = value;
        documents.push((doc, false));
    }
    for (missing, key) in [
        ("/spec", "https"),
        ("/spec", "routes"),
        ("/spec/routes/0", "service"),
    ] {
        let mut doc = good.clone();
        doc.pointer_mut(missing)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key);
        documents.push((doc, false));
    }
    for (doc, valid) in documents {
        let by_schema = schema.is_valid(&doc);
        let by_crd_type = serde_json::from_value::<Gateway>(doc.clone()).is_ok();
        let by_proxy_type =
            serde_json::from_value::<trellis_gateway::GatewayDocument>(doc.clone()).is_ok();
        assert_eq!(
            (by_schema, by_crd_type, by_proxy_type),
            (valid, valid, valid),
            "{doc}"
        );
    }
    // One spec, both types: the CRD's converts into the proxy's and back unchanged.
    let gateway: Gateway = serde_json::from_value(good.clone()).unwrap();
    let spec: trellis_gateway::GatewaySpec = gateway.spec.clone().into();
    assert_eq!(
        serde_json::to_value(&spec).unwrap(),
        serde_json::to_value(&gateway.spec).unwrap()
    );
    assert_eq!(
        trellis_smi::api::gateway::v1alpha1::GatewaySpec::from(spec),
        gateway.spec
    );
}
