//! The annotation keys that carry what an older (or newer) version cannot hold, and helpers to
//! put and take them. Keys under `*.smi-spec.io/trellis-*` are reserved for Trellis.

use crate::convert::ConvertError;
use crate::path::FieldPath;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// TrafficSplit `matches` (JSON list of `{kind, name}`) in v1alpha1/v1alpha2.
pub const SPLIT_MATCHES: &str = "split.smi-spec.io/trellis-matches";
/// Exact TrafficSplit weights (JSON list of quantities) when integer weights are a reduced ratio.
pub const SPLIT_WEIGHTS: &str = "split.smi-spec.io/trellis-weights";
/// TrafficTarget destination port (a number) in v1alpha3.
pub const ACCESS_DESTINATION_PORT: &str = "access.smi-spec.io/trellis-destination-port";
/// The full TrafficTarget rule list (JSON) when it holds UDPRoute rules, in v1alpha1/v1alpha2.
pub const ACCESS_RULES: &str = "access.smi-spec.io/trellis-rules";
/// HTTPRouteGroup header matches (JSON map of match name to header list) in v1alpha1.
pub const SPECS_HEADERS: &str = "specs.smi-spec.io/trellis-headers";
/// TCPRoute ports (JSON list) in v1alpha1..v1alpha3.
pub const SPECS_PORTS: &str = "specs.smi-spec.io/trellis-ports";

/// Every reserved key.
pub const ALL: [&str; 6] = [
    SPLIT_MATCHES,
    SPLIT_WEIGHTS,
    ACCESS_DESTINATION_PORT,
    ACCESS_RULES,
    SPECS_HEADERS,
    SPECS_PORTS,
];

/// Removes `key` from the metadata and parses its JSON value. The annotation map is dropped
/// when it becomes empty (Kubernetes does not keep empty maps either).
pub(crate) fn take<T: DeserializeOwned>(
    metadata: &mut ObjectMeta,
    key: &str,
) -> Result<Option<T>, ConvertError> {
    let Some(annotations) = metadata.annotations.as_mut() else {
        return Ok(None);
    };
    let Some(text) = annotations.remove(key) else {
        return Ok(None);
    };
    if annotations.is_empty() {
        metadata.annotations = None;
    }
    serde_json::from_str(&text).map(Some).map_err(|e| {
        ConvertError::invalid(
            FieldPath::annotation(key),
            format!("not valid Trellis data: {e}"),
        )
    })
}

/// Stores `value` as JSON under `key`.
pub(crate) fn put<T: Serialize>(metadata: &mut ObjectMeta, key: &str, value: &T) {
    let text = serde_json::to_string(value).expect("annotation values serialize to JSON");
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(key.to_owned(), text);
}
