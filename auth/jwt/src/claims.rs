//! The claims of a verified token, and how [`ClaimMatch`] (the condition on a claim that
//! authorization rules embed: "allow this route only when `realm_access.roles` contains
//! `admin`"; defined in `trellis-policy`, re-exported here) reads them.

use serde_json::{Map, Value};
pub use trellis_policy::jwt::{ClaimLookup, ClaimMatch};

/// The claim set of a token whose signature, issuer, audience and times were checked. Only
/// [`crate::Verifier`] makes one from a token.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    issuer: String,
    map: Map<String, Value>,
}

impl Claims {
    /// Claims from a JSON object (for tests of authorization rules and callers that verified a
    /// token elsewhere); `iss` is read from the map.
    pub fn from_map(map: Map<String, Value>) -> Self {
        let issuer = map
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Self { issuer, map }
    }

    /// The verified issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The subject (`sub`), when the token has one.
    pub fn subject(&self) -> Option<&str> {
        self.map.get("sub").and_then(Value::as_str)
    }

    /// `iss/sub`, the request principal as Istio writes it, when the token has a subject.
    pub fn principal(&self) -> Option<String> {
        self.subject().map(|sub| format!("{}/{sub}", self.issuer))
    }

    /// Every claim.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    /// A claim by name, or a nested one by a dotted path (`realm_access.roles`). A name that
    /// itself contains dots (`https://example.com/roles`, as some issuers namespace their
    /// claims) is found too: at each level the longest key that matches a prefix of the path
    /// is tried first.
    pub fn get(&self, path: &str) -> Option<&Value> {
        lookup(&self.map, path)
    }
}

fn lookup<'a>(map: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = map.get(path) {
        return Some(v);
    }
    // Longest prefix first: `a.b.c` tries key `a.b` then `a`.
    let mut cut = path.len();
    while let Some(dot) = path[..cut].rfind('.') {
        if let Some(Value::Object(inner)) = map.get(&path[..dot])
            && let Some(v) = lookup(inner, &path[dot + 1..])
        {
            return Some(v);
        }
        cut = dot;
    }
    None
}

/// [`ClaimMatch::matches`] reads verified claims through this: a claim by [`Claims::get`]'s
/// path; a string as it is, a number or boolean by its JSON text, an array by its elements; an
/// object or `null` never matches.
impl ClaimLookup for Claims {
    fn claim_has(&self, path: &str, accept: &dyn Fn(&str) -> bool) -> bool {
        let scalar = |value: &Value| match value {
            Value::String(s) => accept(s),
            Value::Number(n) => accept(&n.to_string()),
            Value::Bool(b) => accept(if *b { "true" } else { "false" }),
            Value::Null | Value::Array(_) | Value::Object(_) => false,
        };
        match self.get(path) {
            Some(Value::Array(items)) => items.iter().any(scalar),
            Some(value) => scalar(value),
            None => false,
        }
    }
}

/// The header value a forwarded claim gets: strings as they are, anything else as JSON text.
pub(crate) fn header_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Claims {
    pub(crate) fn verified(issuer: String, map: Map<String, Value>) -> Self {
        Self { issuer, map }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keys_and_nested_paths_are_both_found() {
        let claims = Claims::from_map(
            serde_json::json!({
                "iss": "i",
                "a": {"b": {"c": 1}},
                "https://example.com/roles": ["x"],
                "x.y": {"z": true},
            })
            .as_object()
            .unwrap()
            .clone(),
        );
        assert_eq!(claims.get("a.b.c"), Some(&Value::from(1)));
        assert_eq!(
            claims.get("https://example.com/roles"),
            Some(&serde_json::json!(["x"]))
        );
        assert_eq!(claims.get("x.y.z"), Some(&Value::Bool(true)));
        assert_eq!(claims.get("a.b.d"), None);
        assert_eq!(claims.get("a.b.c.d"), None);
        assert_eq!(claims.issuer(), "i");
    }
}
