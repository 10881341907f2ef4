//! The objects of an install, typed (k8s-openapi), each with the comment printed above it, and
//! how a list of them is printed: YAML documents (`---`, comments kept) or one JSON `v1 List`.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;

/// `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// YAML documents separated by `---`, with comments.
    Yaml,
    /// One `v1 List` (no comments).
    Json,
}

macro_rules! objects {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// One object of the install.
        // A few dozen objects, built once and printed: boxing the big ones would buy nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum Object {
            $($variant($ty)),*
        }

        // Without the `kubernetes` feature only `--apply` (absent) and the tests name objects.
        #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
        impl Object {
            pub fn metadata(&self) -> &ObjectMeta {
                match self {
                    $(Object::$variant(o) => &o.metadata),*
                }
            }

            /// `Kind`, as in the object's `kind` field.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Object::$variant(_) => <$ty as k8s_openapi::Resource>::KIND),*
                }
            }

            /// The JSON the API server receives (apiVersion and kind included).
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $(Object::$variant(o) => serde_json::to_value(o)),*
                }
                .expect("k8s-openapi objects serialize")
            }

            /// The YAML of the object, fields in k8s-openapi's order.
            pub fn to_yaml(&self) -> String {
                match self {
                    $(Object::$variant(o) => serde_yaml_ng::to_string(o)),*
                }
                .expect("k8s-openapi objects serialize")
            }

            /// Where kube-rs finds this kind (group, version, plural) for `--apply`.
            #[cfg(feature = "kubernetes")]
            pub fn api_resource(&self) -> kube_core::discovery::ApiResource {
                match self {
                    $(Object::$variant(_) => kube_core::discovery::ApiResource::erase::<$ty>(&())),*
                }
            }

            /// Reads one object back from its JSON value as its own k8s-openapi type (`kind`
            /// picks the type); a field the type does not know fails the round trip.
            #[cfg(test)]
            pub fn from_value(value: serde_json::Value) -> anyhow::Result<Self> {
                let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
                $(
                    if kind == <$ty as k8s_openapi::Resource>::KIND {
                        let typed: $ty = serde_json::from_value(value.clone())
                            .map_err(|e| anyhow::anyhow!("{kind}: {e}"))?;
                        let back = serde_json::to_value(&typed)?;
                        if back != value {
                            anyhow::bail!("{kind} does not round-trip through its type:\n{value}\nvs\n{back}");
                        }
                        return Ok(Object::$variant(typed));
                    }
                )*
                anyhow::bail!("kind {kind:?} is not one of the install's kinds")
            }
        }
    };
}

objects! {
    Namespace(Namespace),
    CustomResourceDefinition(CustomResourceDefinition),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    Secret(Secret),
    ConfigMap(ConfigMap),
    Service(Service),
    Deployment(Deployment),
    PodDisruptionBudget(PodDisruptionBudget),
    MutatingWebhookConfiguration(MutatingWebhookConfiguration),
    APIService(APIService),
}

#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
impl Object {
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }

    /// `Kind namespace/name` or `Kind name`, for reports.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

/// An object and the comment lines printed above it in YAML (without the `# `).
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub comment: Vec<String>,
    pub object: Object,
}

impl Document {
    pub fn new(object: Object) -> Self {
        Self {
            comment: Vec::new(),
            object,
        }
    }

    pub fn with_comment(mut self, text: &str) -> Self {
        self.comment.extend(text.lines().map(str::to_owned));
        self
    }
}

/// The documents in `format`; `header` (comment lines, each starting with `#`) heads YAML.
pub fn render(documents: &[Document], format: Format, header: &str) -> String {
    match format {
        Format::Yaml => {
            let mut out = header.to_owned();
            for document in documents {
                out.push_str("---\n");
                for line in &document.comment {
                    out.push_str(&comment(line));
                }
                out.push_str(&document.object.to_yaml());
            }
            out
        }
        Format::Json => {
            let list = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": documents.iter().map(|d| d.object.to_json()).collect::<Vec<_>>(),
            });
            let mut text = serde_json::to_string_pretty(&list).expect("JSON values serialize");
            text.push('\n');
            text
        }
    }
}

/// Width comment lines are wrapped at (longer words stay whole).
const WIDTH: usize = 100;

/// `line` as YAML comment lines, wrapped at [`WIDTH`]; continuation lines keep the line's
/// indentation, plus two spaces under a `- ` item.
pub fn comment(line: &str) -> String {
    if line.trim().is_empty() {
        return "#\n".to_owned();
    }
    let indent = line.len() - line.trim_start().len();
    let hanging = if line.trim_start().starts_with("- ") {
        indent + 2
    } else {
        indent
    };
    let mut out = String::new();
    let mut current = format!("# {}", &line[..indent]);
    let mut empty = true;
    for word in line.split_whitespace() {
        if !empty && current.len() + 1 + word.len() > WIDTH {
            out.push_str(current.trim_end());
            out.push('\n');
            current = format!("# {}", " ".repeat(hanging));
            empty = true;
        }
        if !empty {
            current.push(' ');
        }
        current.push_str(word);
        empty = false;
    }
    out.push_str(current.trim_end());
    out.push('\n');
    out
}

/// Reads back what [`render`] printed (either format), each object as its own type.
#[cfg(test)]
pub fn parse(text: &str) -> anyhow::Result<Vec<Object>> {
    use serde::Deserialize as _;
    if text.trim_start().starts_with('{') {
        let list: serde_json::Value = serde_json::from_str(text)?;
        return list["items"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("no items"))?
            .iter()
            .map(|v| Object::from_value(v.clone()))
            .collect();
    }
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        objects.push(Object::from_value(value)?);
    }
    Ok(objects)
}
