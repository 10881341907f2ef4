//! [`SmiObject`]: one typed SMI object of any kind and version, parsed from JSON with the exact
//! path of whatever does not fit.

use super::ConvertError;
use crate::api::{access, external, policy, specs, split};
use crate::model::Kind;
use crate::path::FieldPath;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Top-level keys every object may have besides its content (`status` is accepted and dropped:
/// SMI objects have none, but generic tooling may send an empty one).
const ENVELOPE: [&str; 4] = ["apiVersion", "kind", "metadata", "status"];

/// Where a version keeps its content.
#[derive(Clone, Copy)]
enum Shape {
    /// Under `spec:`.
    Spec,
    /// On the root object (v1alpha1/v1alpha2 route types, TrafficTarget v1alpha1).
    Flat,
}

macro_rules! smi_objects {
    ($( $variant:ident => $root:ty, $spec:ty, $kind:ident, $version:literal, $shape:ident; )*) => {
        /// A typed SMI object of any kind and version.
        // A TrafficPolicy is several times larger than the SMI kinds; objects are transient (read,
        // converted, dropped) and only the model is kept, where it is boxed.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum SmiObject {
            $( $variant($root), )*
        }

        impl SmiObject {
            /// Parses a JSON object of any supported kind and version. Errors carry the path of
            /// the offending field (`spec.backends[1].weight`).
            pub fn from_value(value: &Value) -> Result<SmiObject, ConvertError> {
                let (kind, version) = type_of(value)?;
                $( if kind == Kind::$kind && version == $version {
                    let metadata = parse_metadata(value)?;
                    let spec: $spec = parse_content(value, Shape::$shape)?;
                    let mut root = <$root>::new(metadata.name.as_deref().unwrap_or_default(), spec);
                    root.metadata = metadata;
                    return Ok(SmiObject::$variant(root));
                } )*
                Err(ConvertError::UnknownType {
                    field: FieldPath::parse("apiVersion"),
                    message: format!("{kind} has no version {version:?} (known: {})",
                        kind.versions().join(", ")),
                })
            }

            /// The object as JSON, in its own version's wire shape.
            pub fn to_value(&self) -> Value {
                match self {
                    $( SmiObject::$variant(o) => serde_json::to_value(o), )*
                }
                .expect("SMI objects serialize to JSON")
            }

            /// The kind.
            pub fn kind(&self) -> Kind {
                match self { $( SmiObject::$variant(_) => Kind::$kind, )* }
            }

            /// The version (`v1alpha3`).
            pub fn version(&self) -> &'static str {
                match self { $( SmiObject::$variant(_) => $version, )* }
            }

            /// `group/version`.
            pub fn api_version(&self) -> String {
                format!("{}/{}", self.kind().group(), self.version())
            }

            /// The object metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $( SmiObject::$variant(o) => &o.metadata, )* }
            }
        }
    };
}

smi_objects! {
    TrafficSplitV1Alpha1 => split::v1alpha1::TrafficSplit, split::v1alpha1::TrafficSplitSpec, TrafficSplit, "v1alpha1", Spec;
    TrafficSplitV1Alpha2 => split::v1alpha2::TrafficSplit, split::v1alpha2::TrafficSplitSpec, TrafficSplit, "v1alpha2", Spec;
    TrafficSplitV1Alpha3 => split::v1alpha3::TrafficSplit, split::v1alpha3::TrafficSplitSpec, TrafficSplit, "v1alpha3", Spec;
    TrafficSplitV1Alpha4 => split::v1alpha4::TrafficSplit, split::v1alpha4::TrafficSplitSpec, TrafficSplit, "v1alpha4", Spec;
    TrafficTargetV1Alpha1 => access::v1alpha1::TrafficTarget, access::v1alpha1::TrafficTargetSpec, TrafficTarget, "v1alpha1", Flat;
    TrafficTargetV1Alpha2 => access::v1alpha2::TrafficTarget, access::v1alpha2::TrafficTargetSpec, TrafficTarget, "v1alpha2", Spec;
    TrafficTargetV1Alpha3 => access::v1alpha3::TrafficTarget, access::v1alpha3::TrafficTargetSpec, TrafficTarget, "v1alpha3", Spec;
    HttpRouteGroupV1Alpha1 => specs::http_route_group::v1alpha1::HTTPRouteGroup, specs::http_route_group::v1alpha1::HTTPRouteGroupSpec, HttpRouteGroup, "v1alpha1", Flat;
    HttpRouteGroupV1Alpha2 => specs::http_route_group::v1alpha2::HTTPRouteGroup, specs::http_route_group::v1alpha2::HTTPRouteGroupSpec, HttpRouteGroup, "v1alpha2", Flat;
    HttpRouteGroupV1Alpha3 => specs::http_route_group::v1alpha3::HTTPRouteGroup, specs::http_route_group::v1alpha3::HTTPRouteGroupSpec, HttpRouteGroup, "v1alpha3", Spec;
    HttpRouteGroupV1Alpha4 => specs::http_route_group::v1alpha4::HTTPRouteGroup, specs::http_route_group::v1alpha4::HTTPRouteGroupSpec, HttpRouteGroup, "v1alpha4", Spec;
    TcpRouteV1Alpha1 => specs::tcp_route::v1alpha1::TCPRoute, specs::tcp_route::v1alpha1::TCPRouteSpec, TcpRoute, "v1alpha1", Flat;
    TcpRouteV1Alpha2 => specs::tcp_route::v1alpha2::TCPRoute, specs::tcp_route::v1alpha2::TCPRouteSpec, TcpRoute, "v1alpha2", Flat;
    TcpRouteV1Alpha3 => specs::tcp_route::v1alpha3::TCPRoute, specs::tcp_route::v1alpha3::TCPRouteSpec, TcpRoute, "v1alpha3", Spec;
    TcpRouteV1Alpha4 => specs::tcp_route::v1alpha4::TCPRoute, specs::tcp_route::v1alpha4::TCPRouteSpec, TcpRoute, "v1alpha4", Spec;
    UdpRouteV1Alpha4 => specs::udp_route::v1alpha4::UDPRoute, specs::udp_route::v1alpha4::UDPRouteSpec, UdpRoute, "v1alpha4", Spec;
    TrafficPolicyV1Alpha1 => policy::v1alpha1::TrafficPolicy, policy::v1alpha1::TrafficPolicySpec, TrafficPolicy, "v1alpha1", Spec;
    ExternalServiceV1Alpha1 => external::v1alpha1::ExternalService, external::v1alpha1::ExternalServiceSpec, ExternalService, "v1alpha1", Spec;
}

/// Reads `apiVersion` and `kind`, naming what is wrong when they are missing or unknown.
fn type_of(value: &Value) -> Result<(Kind, &str), ConvertError> {
    let unknown = |field: &str, message: String| ConvertError::UnknownType {
        field: FieldPath::parse(field),
        message,
    };
    let object = value.as_object().ok_or_else(|| {
        unknown(
            "",
            format!(
                "expected a Kubernetes object (a map), got {}",
                json_type(value)
            ),
        )
    })?;
    let api_version = match object.get("apiVersion") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(unknown(
                "apiVersion",
                format!("must be a string, got {}", json_type(other)),
            ));
        }
        None => return Err(unknown("apiVersion", "is required".into())),
    };
    let kind_name = match object.get("kind") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(unknown(
                "kind",
                format!("must be a string, got {}", json_type(other)),
            ));
        }
        None => return Err(unknown("kind", "is required".into())),
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = Kind::from_name(kind_name).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        unknown(
            "kind",
            format!("unknown kind {kind_name:?} (known: {})", known.join(", ")),
        )
    })?;
    if group != kind.group() {
        return Err(unknown(
            "apiVersion",
            format!("{kind} belongs to {}, got {api_version:?}", kind.group()),
        ));
    }
    Ok((kind, version))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn parse_metadata(value: &Value) -> Result<ObjectMeta, ConvertError> {
    match value.get("metadata") {
        None | Some(Value::Null) => Ok(ObjectMeta::default()),
        Some(metadata) => deserialize(metadata, &FieldPath::parse("metadata")),
    }
}

fn parse_content<T: DeserializeOwned>(value: &Value, shape: Shape) -> Result<T, ConvertError> {
    let object = value
        .as_object()
        .expect("type_of checked this is an object");
    match shape {
        Shape::Spec => {
            if let Some(extra) = object
                .keys()
                .find(|k| *k != "spec" && !ENVELOPE.contains(&k.as_str()))
            {
                return Err(ConvertError::invalid(
                    FieldPath::parse(extra),
                    format!("unknown field `{extra}`: this version keeps its content under `spec`"),
                ));
            }
            match object.get("spec") {
                Some(spec) => deserialize(spec, &FieldPath::parse("spec")),
                // A version whose spec has no required field (TCPRoute v1alpha3) may omit it.
                None => deserialize(&Value::Object(Map::new()), &FieldPath::parse("spec"))
                    .map_err(|_| ConvertError::invalid(FieldPath::root(), "missing field `spec`")),
            }
        }
        Shape::Flat => {
            if object.contains_key("spec") {
                return Err(ConvertError::invalid(
                    FieldPath::parse("spec"),
                    "unknown field `spec`: this version has no `spec` wrapper, its fields sit at the top level",
                ));
            }
            let content: Map<String, Value> = object
                .iter()
                .filter(|(k, _)| !ENVELOPE.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            deserialize(&Value::Object(content), &FieldPath::root())
        }
    }
}

/// Deserializes `value`, reporting the full path (under `prefix`) of the first field that fails.
fn deserialize<T: DeserializeOwned>(value: &Value, prefix: &FieldPath) -> Result<T, ConvertError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let field = FieldPath::from_serde(prefix, error.path());
        ConvertError::invalid(field, error.into_inner().to_string())
    })
}
