//! Conversion between every SMI version and the normalized model ([`crate::model`]), and between
//! versions through it: the same functions back file loading and the CRD conversion webhook.
//!
//! # Losslessness
//! Converting a document of any version into the model and back gives the same typed object,
//! and converting the model to any version that can hold the kind and back gives the same model.
//! What a version cannot hold travels in an annotation (keys in [`annotations`]), which the way
//! back consumes. Rules:
//! - TrafficSplit weights are held in milli-units. Integer versions get integers when every
//!   weight is whole; otherwise the smallest integers with the same ratio plus
//!   `split.smi-spec.io/trellis-weights` (the exact quantities). Stale values (different count
//!   or ratio than the integers) are ignored: the integers written by the user win.
//! - TrafficSplit `matches` in v1alpha1/v1alpha2: `split.smi-spec.io/trellis-matches`.
//! - TrafficTarget destination port in v1alpha3: `access.smi-spec.io/trellis-destination-port`.
//!   A malformed value is an error, never ignored: dropping it would widen access.
//! - TrafficTarget UDPRoute rules in v1alpha1/v1alpha2: left out of the rule list (narrower
//!   access), the full list kept in `access.smi-spec.io/trellis-rules`.
//! - HTTPRouteGroup headers in v1alpha1: `specs.smi-spec.io/trellis-headers`, by match name.
//! - TCPRoute ports in v1alpha1..v1alpha3: `specs.smi-spec.io/trellis-ports`.
//! - UDPRoute exists only in v1alpha4; asking for another version is an error.
//! - TrafficPolicy and ExternalService (Trellis's own kinds) have one version, v1alpha1: their
//!   conversion is the identity.
//!
//! v1alpha1 weights are written in canonical quantity form (`"1000m"` reads back as `"1"`): the
//! value is the same, which is all Kubernetes itself keeps of a quantity.

mod access;
pub mod annotations;
mod hub;
mod object;
mod policy;
mod specs;
mod split;

pub use object::SmiObject;

use crate::model::Kind;
use crate::path::{FieldPath, Segment};
use serde_json::Value;

/// Why a document could not be parsed or converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// `apiVersion`/`kind` name nothing Trellis knows.
    #[error("{field}: {message}")]
    UnknownType { field: FieldPath, message: String },
    /// The kind does not exist in the requested version (UDPRoute before v1alpha4).
    #[error("{kind} has no version {api_version}")]
    NoSuchVersion { kind: String, api_version: String },
    /// A field does not fit the version's schema.
    #[error("{field}: {message}")]
    Invalid { field: FieldPath, message: String },
}

impl ConvertError {
    /// The field the error is about (the document root for whole-document errors).
    pub fn field(&self) -> FieldPath {
        match self {
            ConvertError::UnknownType { field, .. } | ConvertError::Invalid { field, .. } => {
                field.clone()
            }
            ConvertError::NoSuchVersion { .. } => FieldPath::parse("apiVersion"),
        }
    }

    /// The message without the field.
    pub fn message(&self) -> String {
        match self {
            ConvertError::UnknownType { message, .. } | ConvertError::Invalid { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        }
    }

    pub(crate) fn invalid(field: FieldPath, message: impl Into<String>) -> Self {
        ConvertError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Converts an SMI object (any kind, any supported version, as JSON) to `desired_api_version`
/// (`group/version`, e.g. `split.smi-spec.io/v1alpha2`). This is what the CRD conversion webhook
/// calls for each object of a ConversionReview.
pub fn convert(object: &Value, desired_api_version: &str) -> Result<Value, ConvertError> {
    let typed = SmiObject::from_value(object)?;
    let (group, version) = desired_api_version
        .split_once('/')
        .unwrap_or(("", desired_api_version));
    if group != typed.kind().group() {
        return Err(ConvertError::UnknownType {
            field: FieldPath::parse("apiVersion"),
            message: format!(
                "cannot convert {} to {desired_api_version}: it belongs to {}",
                typed.kind(),
                typed.kind().group()
            ),
        });
    }
    let policy = typed.to_policy()?;
    Ok(SmiObject::from_policy(&policy, version)?.to_value())
}

/// Maps a field path written in the newest shape (`spec.rules[0].name`, as validation reports
/// it) onto the wire shape of `kind` at `version`: no `spec.` in wrapper-less versions, `specs`
/// for TrafficTarget v1alpha1 rules, and the annotation for data a version keeps there.
pub fn wire_field(kind: Kind, version: &str, field: &FieldPath) -> FieldPath {
    use annotations as a;
    let old = matches!(version, "v1alpha1" | "v1alpha2");
    let moved_to = match kind {
        Kind::TrafficSplit if old && field.starts_with("spec.matches") => Some(a::SPLIT_MATCHES),
        Kind::TrafficTarget
            if version == "v1alpha3" && field.starts_with("spec.destination.port") =>
        {
            Some(a::ACCESS_DESTINATION_PORT)
        }
        Kind::HttpRouteGroup
            if version == "v1alpha1"
                && field.0.iter().any(|s| *s == Segment::Key("headers".into())) =>
        {
            Some(a::SPECS_HEADERS)
        }
        Kind::TcpRoute if version != "v1alpha4" && field.starts_with("spec.matches") => {
            Some(a::SPECS_PORTS)
        }
        _ => None,
    };
    if let Some(key) = moved_to {
        return FieldPath::annotation(key);
    }
    let flat = match kind {
        Kind::TrafficTarget => version == "v1alpha1",
        Kind::HttpRouteGroup | Kind::TcpRoute => old,
        _ => false,
    };
    if !flat || !field.starts_with("spec") {
        return field.clone();
    }
    let mut segments: Vec<Segment> = field.0[1..].to_vec();
    if kind == Kind::TrafficTarget && segments.first() == Some(&Segment::Key("rules".into())) {
        segments[0] = Segment::Key("specs".into());
    }
    FieldPath(segments)
}
