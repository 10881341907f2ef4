use super::*;

const GOOD: &str = "apiVersion: policy.trellis.io/v1alpha1
kind: Gateway
metadata:
  name: public
  namespace: shop
  labels: {team: edge}
spec:
  https: {port: 8443}
  httpRedirect:
    port: 8080
    address: 127.0.0.1
  certificates:
    - hosts: [shop.example.com, \"*.shop.example.com\"]
      secretName: shop-tls
    - hosts: [api.example.com]
      certFile: /etc/tls/api.crt
      keyFile: /etc/tls/api.key
  routes:
    - host: shop.example.com
      service: {name: web, port: 80}
    - host: shop.example.com
      pathPrefix: /api/
      service: {name: api, namespace: backend, port: 8080}
    - host: api.example.com
      service: {name: api, port: 8080}
";

#[test]
fn a_good_document_reads_with_its_defaults() {
    let doc = read(GOOD).unwrap();
    assert_eq!(doc.namespace(), "shop");
    assert_eq!(doc.spec.https.socket_addr().to_string(), "0.0.0.0:8443");
    assert_eq!(
        doc.spec
            .http_redirect
            .as_ref()
            .unwrap()
            .socket_addr()
            .to_string(),
        "127.0.0.1:8080"
    );
    assert_eq!(
        doc.spec.certificates[0].files().unwrap(),
        (
            "/etc/trellis/gateway/tls/shop-tls/tls.crt".to_string(),
            "/etc/trellis/gateway/tls/shop-tls/tls.key".to_string()
        )
    );
    assert_eq!(
        doc.spec.certificates[1].files().unwrap().0,
        "/etc/tls/api.crt"
    );
    let r = &doc.spec.routes;
    assert_eq!((r[0].prefix(), r[1].prefix()), ("/".into(), "/api".into()));
    assert_eq!(r[0].service.authority(doc.namespace()), "web.shop:80");
    assert_eq!(r[1].service.authority(doc.namespace()), "api.backend:8080");
}

/// `text` with `from` replaced by `to` (which must occur).
fn edit(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from:?}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn errors_name_the_line_the_resource_and_the_field() {
    let cases = [
        // Serde's own: an unknown field, a wrong type.
        (
            edit("pathPrefix: /api/", "pathPrefx: /api/"),
            22,
            "spec.routes[1].pathPrefx",
            "unknown field `pathPrefx`",
        ),
        (
            edit("port: 8080\n    address", "port: http\n    address"),
            10,
            "spec.httpRedirect.port",
            "invalid type",
        ),
        // The checks after parsing.
        (
            edit("pathPrefix: /api/", "pathPrefix: api"),
            22,
            "spec.routes[1].pathPrefix",
            "must start with /",
        ),
        (
            edit(
                "{name: api, namespace: backend",
                "{name: Api, namespace: backend",
            ),
            23,
            "spec.routes[1].service.name",
            "RFC 1123",
        ),
        (
            edit("- host: api.example.com", "- host: www.example.com"),
            24,
            "spec.routes[2].host",
            "served by no certificate",
        ),
        (
            edit("      secretName: shop-tls\n", ""),
            13,
            "spec.certificates[0]",
            "name certFile and keyFile, or a secretName",
        ),
        (
            edit("      keyFile: /etc/tls/api.key\n", ""),
            15,
            "spec.certificates[1].keyFile",
            "certFile needs keyFile",
        ),
        (
            edit("pathPrefix: /api/", "pathPrefix: /"),
            21,
            "spec.routes[1]",
            "routed by routes[0] already",
        ),
        (
            edit("kind: Gateway", "kind: Gate"),
            2,
            "kind",
            "expected Gateway",
        ),
    ];
    for (text, line, field, message) in cases {
        let e = read(&text).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
        assert!(e.message.contains(message), "{e}");
    }
    let e = read(&edit("pathPrefix: /api/", "pathPrefix: api")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "22: Gateway shop/public: spec.routes[1].pathPrefix: \"api\": must start with /"
    );
}

#[test]
fn jwt_problems_are_reported_under_spec_jwt() {
    let text = format!("{GOOD}  jwt:\n    required: true\n");
    let e = read(&text).unwrap_err();
    assert_eq!(e.field, "spec.jwt.providers", "{e}");
    assert_eq!(e.line, 26, "{e}");
}

#[test]
fn prefixes_are_normalized_by_segment() {
    assert_eq!(normalize_prefix("/"), "/");
    assert_eq!(normalize_prefix("/api//"), "/api");
    assert_eq!(normalize_prefix(""), "/");
}

#[test]
fn the_spec_round_trips_through_json() {
    let doc = read(GOOD).unwrap();
    let json = serde_json::to_value(&doc.spec).unwrap();
    let back: GatewaySpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, doc.spec);
}
