//! The claims of a verified token, and [`ClaimMatch`]: the condition on a claim that
//! authorization rules embed ("allow this route only when `realm_access.roles` contains
//! `admin`").

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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

/// A condition on one claim: it holds when the claim is one of `values`, or (for an array
/// claim) contains one of them.
///
/// Comparison is exact text: a string claim as it is; a number or boolean by its JSON text
/// (`42`, `true`), so `values: ["42"]` matches `"level": 42`; an array element likewise. An
/// object, `null` or a missing claim never matches.
///
/// ```yaml
/// claim: realm_access.roles
/// values: [admin, operator]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimMatch {
    /// The claim's name or dotted path (see [`Claims::get`]).
    pub claim: String,
    /// Accepted values: any one is enough.
    pub values: Vec<String>,
}

impl ClaimMatch {
    /// Whether `claims` satisfy the condition.
    pub fn matches(&self, claims: &Claims) -> bool {
        match claims.get(&self.claim) {
            Some(Value::Array(items)) => items.iter().any(|item| self.scalar_matches(item)),
            Some(value) => self.scalar_matches(value),
            None => false,
        }
    }

    fn scalar_matches(&self, value: &Value) -> bool {
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null | Value::Array(_) | Value::Object(_) => return false,
        };
        self.values.contains(&text)
    }

    /// Problems of the condition (paths below it: `claim`, `values`).
    pub fn validate(&self) -> Vec<crate::Problem> {
        let mut problems = Vec::new();
        if self.claim.trim().is_empty() {
            problems.push(crate::Problem {
                field: "claim".into(),
                message: "empty claim name".into(),
            });
        }
        if self.values.is_empty() {
            problems.push(crate::Problem {
                field: "values".into(),
                message: "no value: the condition could never hold".into(),
            });
        }
        problems
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
