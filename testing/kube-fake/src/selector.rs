//! `labelSelector` and `fieldSelector` query parameters: parsing and matching.
//!
//! Label selectors support the equality-based forms (`a=b`, `a==b`, `a!=b`), existence (`a`,
//! `!a`) and the set-based `a in (x,y)` / `a notin (x,y)`. Field selectors support
//! `metadata.name` and `metadata.namespace` with `=`, `==` and `!=` (what every resource supports
//! on a real server).

use serde_json::Value;

use crate::error::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label or field selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub(crate) fn parse_labels(s: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_label_term(term).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {term:?} in labelSelector {s:?}"
                ))
            })?);
        }
        Ok(Self { requirements })
    }

    pub(crate) fn parse_fields(s: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, req) = if let Some((k, v)) = term.split_once("!=") {
                let k = k.trim();
                (k, Requirement::NotEquals(k.to_owned(), v.trim().to_owned()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                let k = k.trim();
                (k, Requirement::Equals(k.to_owned(), v.trim().to_owned()))
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {term:?} in fieldSelector {s:?}"
                )));
            };
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field} (fieldSelector {s:?})"
                )));
            }
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// Matches the object's labels.
    pub(crate) fn matches_labels(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.matches_with(|key| labels.and_then(|l| l.get(key)).and_then(Value::as_str))
    }

    /// Matches the object's `metadata.name` / `metadata.namespace`.
    pub(crate) fn matches_fields(&self, object: &Value) -> bool {
        self.matches_with(|field| match field {
            "metadata.name" => object.pointer("/metadata/name").and_then(Value::as_str),
            // Cluster-scoped objects have the empty namespace.
            "metadata.namespace" => Some(
                object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
            _ => None,
        })
    }

    fn matches_with<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        })
    }
}

/// Splits on commas that are not inside `( ... )`.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn parse_label_term(term: &str) -> Option<Requirement> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    if let Some((k, v)) = term.split_once("!=") {
        let k = k.trim();
        return valid_key(k).then(|| Requirement::NotEquals(k.to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        let k = k.trim();
        return valid_key(k).then(|| Requirement::Equals(k.to_owned(), v.trim().to_owned()));
    }
    if let Some(k) = term.strip_prefix('!') {
        let k = k.trim();
        return valid_key(k).then(|| Requirement::NotExists(k.to_owned()));
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [k, rest] = words.as_slice() {
        let rest = rest.trim();
        let (op, list) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let list = list.trim().strip_prefix('(')?.strip_suffix(')')?;
        let values: Vec<String> = list.split(',').map(|v| v.trim().to_owned()).collect();
        return match op {
            "in" if valid_key(k) => Some(Requirement::In((*k).to_owned(), values)),
            "notin" if valid_key(k) => Some(Requirement::NotIn((*k).to_owned(), values)),
            _ => None,
        };
    }
    valid_key(term).then(|| Requirement::Exists(term.to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| Selector::parse_labels(s).unwrap().matches_labels(&obj);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("!missing"));
        assert!(!m("missing"));
        assert!(m("app in (api, web)"));
        assert!(!m("app notin (web)"));
        assert!(m("missing notin (x)"));
        assert!(Selector::parse_labels("app in web").is_err());
    }

    #[test]
    fn field_selectors_support_name_and_namespace_only() {
        let obj = json!({"metadata": {"name": "a", "namespace": "ns"}});
        let m = |s: &str| Selector::parse_fields(s).unwrap().matches_fields(&obj);
        assert!(m("metadata.name=a"));
        assert!(m("metadata.namespace==ns,metadata.name!=b"));
        assert!(!m("metadata.name=b"));
        let err = Selector::parse_fields("spec.nodeName=x").unwrap_err();
        assert!(err.message.contains("spec.nodeName"), "{}", err.message);
    }
}
