//! Field errors as `k8s.io/apimachinery/pkg/util/validation/field` makes them, and the 422
//! `Invalid` status a real API server answers with them (`apierrors.NewInvalid`).

use std::fmt;

use serde_json::{Value, json};

use crate::error::ApiError;

/// `field.ErrorType`: the cause's `reason` and the words that open its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    Forbidden,
    TooLong,
    TooMany,
}

impl Cause {
    pub fn reason(self) -> &'static str {
        match self {
            Cause::Required => "FieldValueRequired",
            Cause::Invalid => "FieldValueInvalid",
            Cause::NotSupported => "FieldValueNotSupported",
            Cause::Duplicate => "FieldValueDuplicate",
            Cause::Forbidden => "FieldValueForbidden",
            Cause::TooLong => "FieldValueTooLong",
            Cause::TooMany => "FieldValueTooMany",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Cause::Required => "Required value",
            Cause::Invalid => "Invalid value",
            Cause::NotSupported => "Unsupported value",
            Cause::Duplicate => "Duplicate value",
            Cause::Forbidden => "Forbidden",
            Cause::TooLong => "Too long",
            Cause::TooMany => "Too many",
        }
    }
}

/// One field error: `<field>: <body>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub cause: Cause,
    /// The JSON path, e.g. `endpoints[0].addresses[0]`.
    pub field: String,
    /// The bad value as Go prints it (`"text"` quoted, numbers bare); `None` where the real
    /// message leaves it out (Required, Forbidden, TooLong).
    pub value: Option<String>,
    pub detail: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, value: &Value, detail: impl Into<String>) -> Self {
        Self {
            cause: Cause::Invalid,
            field: field.into(),
            value: Some(go_value(value)),
            detail: detail.into(),
        }
    }

    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            cause: Cause::Required,
            field: field.into(),
            value: None,
            detail: detail.into(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            cause: Cause::Forbidden,
            field: field.into(),
            value: None,
            detail: detail.into(),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Self {
        Self {
            cause: Cause::Duplicate,
            field: field.into(),
            value: Some(go_value(value)),
            detail: String::new(),
        }
    }

    /// `field.NotSupported`: the supported values listed quoted, in the order given (the real
    /// server lists them sorted).
    pub fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Self {
        let quoted: Vec<String> = supported.iter().map(|v| format!("{v:?}")).collect();
        Self {
            cause: Cause::NotSupported,
            field: field.into(),
            value: Some(go_value(value)),
            detail: format!("supported values: {}", quoted.join(", ")),
        }
    }

    /// `field.TooMany`: `Too many: 101: must have at most 100 items`.
    pub fn too_many(field: impl Into<String>, actual: usize, max: usize) -> Self {
        Self {
            cause: Cause::TooMany,
            field: field.into(),
            value: Some(actual.to_string()),
            detail: format!("must have at most {max} items"),
        }
    }

    /// `field.TooLong`: `Too long: may not be more than 262144 bytes`.
    pub fn too_long(field: impl Into<String>, max: usize) -> Self {
        Self {
            cause: Cause::TooLong,
            field: field.into(),
            value: None,
            detail: format!("may not be more than {max} bytes"),
        }
    }

    /// The message without the field (`ErrorBody`): a cause's `message`.
    pub fn body(&self) -> String {
        let mut s = self.cause.words().to_owned();
        if let Some(v) = &self.value {
            s.push_str(": ");
            s.push_str(v);
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// A JSON value as Go's `%q` / `%v` print the Go value it decodes to.
fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "\"null\"".into(),
        other => other.to_string(),
    }
}

/// `apierrors.NewInvalid`: HTTP 422, reason `Invalid`, the message
/// `<Kind>[.<group>] "<name>" is invalid: <errors>` and one cause per error.
pub fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> ApiError {
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    // The aggregate drops repeated messages; one error prints bare, several in brackets.
    let mut messages: Vec<String> = Vec::new();
    for e in errors {
        let m = e.to_string();
        if !messages.contains(&m) {
            messages.push(m);
        }
    }
    let aggregate = match messages.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": e.cause.reason(), "message": e.body(), "field": e.field}))
        .collect();
    let mut details = json!({"name": name, "kind": kind, "causes": causes});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    let mut error = ApiError::new(
        422,
        "Invalid",
        format!("{qualified} {name:?} is invalid: {aggregate}"),
    );
    error.details = Some(details);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_like_the_real_ones() {
        let e = FieldError::invalid(
            "endpoints[0].addresses[0]",
            &json!("127.0.50.2"),
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        );
        assert_eq!(
            e.to_string(),
            "endpoints[0].addresses[0]: Invalid value: \"127.0.50.2\": may not be in the loopback range (127.0.0.0/8, ::1/128)"
        );
        assert_eq!(
            FieldError::required("metadata.name", "name or generateName is required").body(),
            "Required value: name or generateName is required"
        );
        assert_eq!(
            FieldError::required("addressType", "").body(),
            "Required value"
        );
        assert_eq!(
            FieldError::not_supported("addressType", &json!("IP"), &["FQDN", "IPv4", "IPv6"])
                .body(),
            "Unsupported value: \"IP\": supported values: \"FQDN\", \"IPv4\", \"IPv6\""
        );
        assert_eq!(
            FieldError::too_many("endpoints[0].addresses", 101, 100).body(),
            "Too many: 101: must have at most 100 items"
        );
        assert_eq!(
            FieldError::invalid(
                "spec.ports[0].port",
                &json!(0),
                "must be between 1 and 65535, inclusive"
            )
            .body(),
            "Invalid value: 0: must be between 1 and 65535, inclusive"
        );
    }

    #[test]
    fn the_status_has_the_real_shape() {
        let one = FieldError::invalid("metadata.name", &json!("A"), "bad");
        let e = invalid(
            "discovery.k8s.io",
            "EndpointSlice",
            "A",
            std::slice::from_ref(&one),
        );
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "EndpointSlice.discovery.k8s.io \"A\" is invalid: metadata.name: Invalid value: \"A\": bad"
        );
        let status = e.to_status();
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["details"]["group"], "discovery.k8s.io");
        assert_eq!(status["details"]["causes"][0]["field"], "metadata.name");
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueInvalid"
        );
        let two = FieldError::required("spec.containers", "");
        let e = invalid("", "Pod", "p", &[one.clone(), two, one]);
        assert_eq!(
            e.message,
            "Pod \"p\" is invalid: [metadata.name: Invalid value: \"A\": bad, spec.containers: Required value]"
        );
        assert!(e.to_status()["details"].get("group").is_none());
    }
}
