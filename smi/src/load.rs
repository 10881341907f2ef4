//! Loading SMI documents from YAML files and directories, with every error located.
//!
//! [`load_paths`] reads files (any name) and directories (recursively, `*.yaml` and `*.yml`, in
//! name order), splits multi-document files, parses every supported kind and version, converts
//! to the normalized model, and validates each resource and the references between them. It
//! returns the resources that passed *and* every error, so a caller can keep serving the last
//! good version of a resource that is now broken.
//!
//! Errors read `file:line: Kind namespace/name: field: message`, e.g.
//! `policies/split.yaml:14: TrafficSplit default/web: spec.backends[1].weight: must be a
//! non-negative integer, got -5`. Parts that are unknown (a YAML syntax error has no resource)
//! are left out.

use crate::convert::{ConvertError, SmiObject, wire_field};
use crate::model::{Policy, ResourceId};
use crate::path::FieldPath;
use crate::validate::{self, Issue, RegexChecks, RouteIndex};
use crate::yaml::{self, Node};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a resource was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    /// The line the document starts on (1-based).
    pub line: u32,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A resource that parsed and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedResource {
    pub source: Source,
    /// The document as written (its own version).
    pub object: SmiObject,
    /// The normalized policy.
    pub policy: Policy,
}

/// A problem in a document: file, line, resource, field and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// `None` when the file itself could not be read.
    pub line: Option<u32>,
    /// The resource, when the document got far enough to name one.
    pub resource: Option<ResourceId>,
    /// The field, in the document's own version's shape.
    pub field: Option<FieldPath>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(resource) = &self.resource {
            write!(f, ": {resource}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for LoadError {}

/// A Gateway document that read and passed its checks ([`trellis_gateway`]). Not a policy:
/// nothing in the controller consumes it; kept so `trellis validate` can list it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedGateway {
    pub source: Source,
    pub document: trellis_gateway::GatewayDocument,
}

/// What a load found: the good resources and every error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub resources: Vec<LoadedResource>,
    /// The Gateway documents that passed their checks.
    pub gateways: Vec<LoadedGateway>,
    /// Sorted by file, then line.
    pub errors: Vec<LoadError>,
}

/// Loads every file and directory in `paths`.
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> LoadReport {
    let mut loader = Loader::default();
    for path in paths {
        let path = path.as_ref();
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => loader.load_dir(path),
            Ok(_) => loader.load_file(path),
            Err(e) => loader.file_error(path, format!("cannot read: {e}")),
        }
    }
    loader.finish()
}

/// Loads one YAML text as if read from `file`.
pub fn load_str(file: impl Into<PathBuf>, text: &str) -> LoadReport {
    let mut loader = Loader::default();
    loader.load_text(&file.into(), text);
    loader.finish()
}

/// A resource that passed its own checks, waiting for the cross-resource checks.
struct Pending {
    resource: LoadedResource,
    positions: Positions,
}

/// Where the line of a field comes from: a positioned tree, or (for files that parsed on the
/// fast path) the file text, re-read with positions only when an error needs a line.
enum Positions {
    Node(Node),
    Lazy { text: Arc<str>, index: usize },
}

impl Positions {
    fn line_of(&mut self, field: &FieldPath) -> u32 {
        if let Positions::Lazy { text, index } = self {
            // The fast path checked that both parsers see the same documents.
            let node = yaml::parse_documents(text).ok().and_then(|mut documents| {
                (*index < documents.len()).then(|| documents.swap_remove(*index))
            });
            match node {
                Some(node) => *self = Positions::Node(node),
                None => return 1,
            }
        }
        match self {
            Positions::Node(node) => node.line_of(field),
            Positions::Lazy { .. } => 1,
        }
    }
}

/// The fast path: every document parsed by `serde_yaml_ng` (no positions), each with the line it
/// starts on from a scan of the text. `None` (use the span-aware path) when any document does
/// not parse or the scan and the parser disagree on the documents.
fn fast_documents(text: &str) -> Option<Vec<(u32, Value)>> {
    let starts = document_start_lines(text)?;
    let mut values = Vec::with_capacity(starts.len());
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        // Through the YAML value type: it refuses duplicate keys, which a JSON map would
        // silently overwrite.
        let yaml = serde_yaml_ng::Value::deserialize(document).ok()?;
        if yaml.is_null() {
            continue;
        }
        values.push(serde_json::to_value(yaml).ok()?);
    }
    (values.len() == starts.len()).then(|| starts.into_iter().zip(values).collect())
}

/// The first content line of every non-empty document, or `None` for texts the simple scan does
/// not understand (directives, explicit document ends).
fn document_start_lines(text: &str) -> Option<Vec<u32>> {
    let mut starts = Vec::new();
    let mut in_document = false;
    for (number, line) in text.lines().enumerate() {
        let number = u32::try_from(number + 1).ok()?;
        if line.starts_with('%') || line.starts_with("...") {
            return None;
        }
        if let Some(rest) = line.strip_prefix("---")
            && (rest.is_empty() || rest.starts_with([' ', '\t']))
        {
            let rest = rest.trim();
            in_document = !rest.is_empty() && !rest.starts_with('#');
            if in_document {
                starts.push(number);
            }
            continue;
        }
        let content = line.trim();
        if !in_document && !content.is_empty() && !content.starts_with('#') {
            starts.push(number);
            in_document = true;
        }
    }
    Some(starts)
}

#[derive(Default)]
struct Loader {
    pending: Vec<Pending>,
    gateways: Vec<LoadedGateway>,
    /// Policies that converted but failed their own checks: still indexed as route targets, so
    /// one broken route group does not also break everything that names it.
    broken_routes: Vec<Policy>,
    seen: HashMap<ResourceId, Source>,
    regexes: RegexChecks,
    errors: Vec<LoadError>,
}

impl Loader {
    fn load_dir(&mut self, dir: &Path) {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => return self.file_error(dir, format!("cannot read directory: {e}")),
        };
        entries.sort();
        for path in entries {
            if path.is_dir() {
                self.load_dir(&path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                self.load_file(&path);
            }
        }
    }

    fn load_file(&mut self, file: &Path) {
        match std::fs::read_to_string(file) {
            Ok(text) => self.load_text(file, &text),
            Err(e) => self.file_error(file, format!("cannot read: {e}")),
        }
    }

    fn file_error(&mut self, file: &Path, message: String) {
        self.errors.push(LoadError {
            file: file.to_owned(),
            line: None,
            resource: None,
            field: None,
            message,
        });
    }

    fn load_text(&mut self, file: &Path, text: &str) {
        if let Some(documents) = fast_documents(text) {
            let text: Arc<str> = Arc::from(text);
            for (index, (line, value)) in documents.into_iter().enumerate() {
                let positions = Positions::Lazy {
                    text: text.clone(),
                    index,
                };
                self.load_document(file, value, line, positions);
            }
            return;
        }
        let documents = match yaml::parse_documents(text) {
            Ok(documents) => documents,
            Err(e) => {
                return self.errors.push(LoadError {
                    file: file.to_owned(),
                    line: Some(e.line),
                    resource: None,
                    field: None,
                    message: format!("invalid YAML: {}", e.message),
                });
            }
        };
        for node in documents {
            let (value, line) = (node.to_json(), node.line);
            self.load_document(file, value, line, Positions::Node(node));
        }
    }

    fn load_document(&mut self, file: &Path, value: Value, line: u32, mut positions: Positions) {
        let source = Source {
            file: file.to_owned(),
            line,
        };
        if is_gateway(&value) {
            return self.load_gateway(source, value, positions);
        }
        let mut error =
            |field: FieldPath, message: String, resource: Option<ResourceId>| LoadError {
                file: file.to_owned(),
                line: Some(positions.line_of(&field)),
                resource,
                field: (!field.is_root()).then_some(field),
                message,
            };
        let converted = SmiObject::from_value(&value).and_then(|object| {
            let policy = object.to_policy()?;
            Ok((object, policy))
        });
        let (object, policy) = match converted {
            Ok(converted) => converted,
            Err(e) => {
                let resource = raw_resource_id(&value, &e);
                self.errors.push(error(e.field(), e.message(), resource));
                return;
            }
        };
        let id = policy.id();
        let issues = validate::validate_policy_with(&policy, object.version(), &mut self.regexes);
        if !issues.is_empty() {
            for Issue { field, message } in issues {
                let field = wire_field(object.kind(), object.version(), &field);
                self.errors.push(error(field, message, Some(id.clone())));
            }
            self.broken_routes.push(policy);
            return;
        }
        if let Some(first) = self.seen.get(&id) {
            let message =
                format!("{id} is also defined at {first}; each resource may be defined once");
            self.errors
                .push(error(FieldPath::parse("metadata.name"), message, Some(id)));
            return;
        }
        self.seen.insert(id, source.clone());
        self.pending.push(Pending {
            resource: LoadedResource {
                source,
                object,
                policy,
            },
            positions,
        });
    }

    /// A Gateway document: read with [`trellis_gateway`]'s types and checks, each problem
    /// located like a policy's.
    fn load_gateway(&mut self, source: Source, value: Value, mut positions: Positions) {
        let resource = raw_resource_id(
            &value,
            &ConvertError::Invalid {
                field: FieldPath::root(),
                message: String::new(),
            },
        );
        let problems: Vec<(String, String)> =
            match serde_path_to_error::deserialize::<_, trellis_gateway::GatewayDocument>(value) {
                Err(e) => {
                    let field = e.path().to_string();
                    let message = e.into_inner().to_string();
                    vec![(if field == "." { String::new() } else { field }, message)]
                }
                Ok(document) => {
                    let problems: Vec<(String, String)> = document
                        .validate()
                        .into_iter()
                        .map(|p| (p.field, p.message))
                        .collect();
                    if problems.is_empty() {
                        self.gateways.push(LoadedGateway { source, document });
                        return;
                    }
                    problems
                }
            };
        for (field, message) in problems {
            let field = FieldPath::parse(&field);
            self.errors.push(LoadError {
                file: source.file.clone(),
                line: Some(positions.line_of(&field)),
                resource: resource.clone(),
                field: (!field.is_root()).then_some(field),
                message,
            });
        }
    }

    fn finish(mut self) -> LoadReport {
        let routes = RouteIndex::new(
            self.pending
                .iter()
                .map(|p| &p.resource.policy)
                .chain(self.broken_routes.iter()),
        );
        let mut resources = Vec::with_capacity(self.pending.len());
        for Pending {
            resource,
            mut positions,
        } in self.pending
        {
            let issues = validate::validate_references(&resource.policy, &routes);
            if issues.is_empty() {
                resources.push(resource);
                continue;
            }
            let (kind, version) = (resource.object.kind(), resource.object.version());
            for Issue { field, message } in issues {
                let field = wire_field(kind, version, &field);
                self.errors.push(LoadError {
                    file: resource.source.file.clone(),
                    line: Some(positions.line_of(&field)),
                    resource: Some(resource.policy.id()),
                    field: Some(field),
                    message,
                });
            }
        }
        self.errors
            .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        LoadReport {
            resources,
            gateways: self.gateways,
            errors: self.errors,
        }
    }
}

/// Whether `value` is a Gateway document (`policy.trellis.io/v1alpha1`, kind `Gateway`).
fn is_gateway(value: &Value) -> bool {
    value.get("apiVersion").and_then(Value::as_str) == Some(trellis_gateway::API_VERSION)
        && value.get("kind").and_then(Value::as_str) == Some(trellis_gateway::KIND)
}

/// Names the resource of a document that did not parse, from whatever it says about itself.
fn raw_resource_id(value: &Value, error: &ConvertError) -> Option<ResourceId> {
    if matches!(error, ConvertError::UnknownType { .. })
        && value.get("kind").and_then(Value::as_str).is_none()
    {
        return None;
    }
    let kind = value.get("kind").and_then(Value::as_str)?;
    let metadata = value.get("metadata");
    let text = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    Some(ResourceId {
        kind: kind.to_owned(),
        namespace: text("namespace").unwrap_or("default").to_owned(),
        name: text("name").unwrap_or("").to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_starts_skip_comments_blanks_and_empty_documents() {
        let text = "# head\n\napiVersion: a\n---\n# only a comment\n---\nkind: b\n--- {c: 1}\n";
        assert_eq!(document_start_lines(text), Some(vec![3, 7, 8]));
        assert_eq!(document_start_lines("%YAML 1.2\n---\na: 1\n"), None);
    }

    #[test]
    fn fast_and_positioned_paths_agree() {
        let text = "# x\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: a}\nspec:\n  service: a\n  backends:\n  - {service: b, weight: -1}\n---\n\napiVersion: v1\nkind: Foo\n";
        let fast = fast_documents(text).expect("the fast path takes this text");
        let positioned = yaml::parse_documents(text).unwrap();
        assert_eq!(fast.len(), positioned.len());
        for ((line, value), node) in fast.iter().zip(&positioned) {
            assert_eq!(*line, node.line);
            assert_eq!(*value, node.to_json());
        }
        let report = load_str("x.yaml", text);
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "x.yaml:8: TrafficSplit default/a: spec.backends[0].weight: must be a non-negative integer, got -1",
                "x.yaml:12: Foo default/: kind: unknown kind \"Foo\" (known: TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, UDPRoute, TrafficPolicy, ExternalService)",
            ]
        );
    }

    #[test]
    fn duplicate_keys_are_errors_on_either_path() {
        let report = load_str("d.yaml", "apiVersion: a\nkind: b\nkind: c\n");
        assert_eq!(report.errors.len(), 1);
        assert_eq!(report.errors[0].line, Some(3), "{}", report.errors[0]);
        assert!(
            report.errors[0].message.contains("invalid YAML"),
            "{}",
            report.errors[0]
        );
    }
}
