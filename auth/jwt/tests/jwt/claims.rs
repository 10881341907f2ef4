//! ClaimMatch on string, array, nested, number and boolean claims, and its YAML form.

use serde_json::json;
use trellis_jwt::{ClaimMatch, Claims};

fn claims() -> Claims {
    Claims::from_map(
        json!({
            "iss": "https://issuer.test",
            "sub": "alice",
            "groups": ["dev", "ops"],
            "realm_access": {"roles": ["admin", "viewer"], "tier": "gold"},
            "level": 42,
            "ratio": 0.5,
            "verified": true,
            "nothing": null,
            "https://example.com/claims/team": "payments",
        })
        .as_object()
        .unwrap()
        .clone(),
    )
}

fn m(claim: &str, values: &[&str]) -> ClaimMatch {
    ClaimMatch {
        claim: claim.to_string(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

#[test]
fn string_claims_equal_one_of_the_values() {
    let c = claims();
    assert!(m("sub", &["bob", "alice"]).matches(&c));
    assert!(!m("sub", &["Alice"]).matches(&c), "exact, case matters");
    assert!(!m("sub", &["ali"]).matches(&c), "no prefix match");
    assert!(m("https://example.com/claims/team", &["payments"]).matches(&c));
}

#[test]
fn array_claims_contain_one_of_the_values() {
    let c = claims();
    assert!(m("groups", &["ops"]).matches(&c));
    assert!(m("groups", &["qa", "dev"]).matches(&c));
    assert!(!m("groups", &["qa"]).matches(&c));
    assert!(!m("groups", &["dev,ops"]).matches(&c));
}

#[test]
fn nested_claims_by_dotted_path() {
    let c = claims();
    assert!(m("realm_access.roles", &["admin"]).matches(&c));
    assert!(m("realm_access.tier", &["gold"]).matches(&c));
    assert!(!m("realm_access.roles", &["root"]).matches(&c));
    assert!(
        !m("realm_access", &["admin"]).matches(&c),
        "an object never matches"
    );
    assert!(!m("realm_access.missing", &["admin"]).matches(&c));
}

#[test]
fn numbers_and_booleans_by_their_json_text() {
    let c = claims();
    assert!(m("level", &["42"]).matches(&c));
    assert!(!m("level", &["42.0", "041"]).matches(&c));
    assert!(m("ratio", &["0.5"]).matches(&c));
    assert!(m("verified", &["true"]).matches(&c));
    assert!(!m("verified", &["false", "True"]).matches(&c));
    assert!(!m("nothing", &["null", ""]).matches(&c));
    assert!(!m("absent", &[""]).matches(&c));
}

#[test]
fn yaml_form_and_validation() {
    let parsed: ClaimMatch =
        serde_yaml_ng::from_str("claim: realm_access.roles\nvalues: [admin]\n").unwrap();
    assert_eq!(parsed, m("realm_access.roles", &["admin"]));
    let err = serde_yaml_ng::from_str::<ClaimMatch>("claim: a\nvalues: [b]\nvalue: c\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `value`"), "{err}");
    let problems = m(" ", &[]).validate();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["claim", "values"]);
}
