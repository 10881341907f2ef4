//! The policy's YAML form, its defaults, and validation reporting each bad field by its path.

use trellis_jwt::{Algorithm, JwtPolicy, Verifier};

fn parse(yaml: &str) -> JwtPolicy {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn problems(yaml: &str) -> Vec<(String, String)> {
    parse(yaml)
        .validate()
        .into_iter()
        .map(|p| (p.field, p.message))
        .collect()
}

#[test]
fn defaults_are_as_documented() {
    let policy = parse(
        "providers:\n  - issuer: https://i\n    audiences: [a]\n    jwks: {url: https://i/jwks}\n",
    );
    assert!(!policy.required);
    let p = &policy.providers[0];
    assert_eq!(p.algorithms, [Algorithm::RS256]);
    assert_eq!(p.clock_skew.to_string(), "1m");
    assert_eq!(p.from_header.name, "authorization");
    assert_eq!(p.from_header.prefix, "Bearer ");
    assert_eq!(p.jwks.refresh_interval().to_string(), "5m");
    assert!(p.forward_claims_as.is_empty());
    assert!(policy.validate().is_empty());
}

#[test]
fn the_crate_docs_example_is_valid() {
    // The `jwt:` block of the crate documentation, kept in sync by hand.
    let docs = include_str!("../../src/lib.rs");
    let yaml: String = docs
        .lines()
        .skip_while(|l| !l.starts_with("//! jwt:"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! # "))
        .map(|l| {
            format!(
                "{}\n",
                l.trim_start_matches("//! ").trim_start_matches("//!")
            )
        })
        .collect();
    let policy = parse(&yaml);
    assert_eq!(policy.providers.len(), 2);
    assert!(policy.validate().is_empty(), "{:?}", policy.validate());
}

#[test]
fn every_bad_field_is_reported_with_its_path() {
    let got = problems(
        r#"
providers:
  - issuer: ""
    audiences: []
    jwks: {file: /a, url: "https://b"}
    algorithms: [none, HS256, RS256]
    clockSkew: 10m
    fromHeader: {name: "bad header", prefix: ""}
    forwardClaimsAs:
      - {claim: sub, header: "x-jwt-sub"}
      - {claim: email, header: "x-jwt-sub"}
      - {claim: "", header: "host"}
  - issuer: https://i
    audiences: [a, ""]
    jwks: {url: "ftp://i/jwks", refreshInterval: 10ms}
    algorithms: []
  - issuer: https://i
    audiences: [a]
    jwks: {file: /k.json, refreshInterval: 1m}
  - issuer: https://j
    audiences: [a]
    jwks: {}
"#,
    );
    let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "providers[0].issuer",
            "providers[0].audiences",
            "providers[0].jwks",
            "providers[0].algorithms[0]",
            "providers[0].algorithms[1]",
            "providers[0].clockSkew",
            "providers[0].fromHeader.name",
            "providers[0].forwardClaimsAs[1].header",
            "providers[0].forwardClaimsAs[2].claim",
            "providers[0].forwardClaimsAs[2].header",
            "providers[1].audiences[1]",
            "providers[1].jwks.url",
            "providers[1].jwks.refreshInterval",
            "providers[1].algorithms",
            "providers[2].jwks.refreshInterval",
            "providers[2].issuer",
            "providers[3].jwks",
        ],
        "{got:#?}"
    );
    let message = |field: &str| {
        got.iter()
            .find(|(f, _)| f == field)
            .map(|(_, m)| m.as_str())
            .unwrap()
    };
    assert!(message("providers[0].algorithms[0]").contains("unsigned"));
    assert!(message("providers[0].algorithms[1]").contains("public key"));
    assert!(message("providers[0].clockSkew").contains("5m"));
    assert!(message("providers[2].issuer").contains("earlier provider"));
    assert!(message("providers[0].forwardClaimsAs[2].header").contains("protocol header"));
}

#[test]
fn no_provider_is_a_problem_and_a_verifier_refuses_a_bad_policy() {
    let policy = parse("required: true\n");
    let problems = policy.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "providers");
    let err = Verifier::new(&policy).unwrap_err();
    assert_eq!(err, problems);
}

#[test]
fn parse_errors_name_the_field() {
    for (yaml, want) in [
        (
            "providers:\n  - issuer: i\n    audiences: [a]\n    jwks: {url: https://i}\n    algorithms: [RS257]\n",
            "not a JWS algorithm",
        ),
        (
            "providers:\n  - issuer: i\n    audiences: [a]\n    jwks: {url: https://i}\n    clockSkew: -1s\n",
            "negative",
        ),
        (
            "providers:\n  - issuer: i\n    audience: [a]\n    jwks: {url: https://i}\n",
            "unknown field `audience`",
        ),
        (
            "providers:\n  - issuer: i\n    audiences: [a]\n    jwks: {uri: https://i}\n",
            "unknown field `uri`",
        ),
    ] {
        let err = serde_yaml_ng::from_str::<JwtPolicy>(yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err} should say {want}");
    }
}
