//! Field paths (`spec.backends[1].weight`) used in every error message, and the bridge from
//! `serde_path_to_error` paths to ours.

use std::fmt;

/// One step of a field path: a map key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path to a field inside a document, printed as `spec.backends[1].weight`; keys that contain
/// dots or slashes (annotation keys) print as `metadata.annotations["split.smi-spec.io/x"]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    /// The empty path (the document itself).
    pub fn root() -> Self {
        Self::default()
    }

    /// Parses a dotted path with `[n]` indexes, e.g. `spec.backends[1].weight`.
    pub fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                if open > 0 {
                    segments.push(Segment::Key(rest[..open].to_owned()));
                }
                rest = &rest[open..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    let close = stripped.find(']').unwrap_or(stripped.len());
                    if let Ok(index) = stripped[..close].parse() {
                        segments.push(Segment::Index(index));
                    }
                    rest = stripped.get(close + 1..).unwrap_or("");
                }
            } else {
                segments.push(Segment::Key(rest.to_owned()));
            }
        }
        FieldPath(segments)
    }

    /// This path with `key` appended.
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.into()));
        path
    }

    /// This path with `index` appended.
    pub fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }

    /// This path with `other` appended.
    pub fn join(&self, other: &FieldPath) -> Self {
        let mut path = self.clone();
        path.0.extend(other.0.iter().cloned());
        path
    }

    /// `metadata.annotations["<key>"]`.
    pub fn annotation(key: &str) -> Self {
        FieldPath::parse("metadata.annotations").key(key)
    }

    /// Whether the path starts with the keys of `prefix` (a dotted path without indexes).
    pub fn starts_with(&self, prefix: &str) -> bool {
        let prefix = FieldPath::parse(prefix);
        self.0.len() >= prefix.0.len() && self.0[..prefix.0.len()] == prefix.0[..]
    }

    /// Whether this is the empty path.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// Converts a `serde_path_to_error` path, prefixed with `prefix`.
    pub fn from_serde(prefix: &FieldPath, path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        let mut result = prefix.clone();
        for segment in path.iter() {
            match segment {
                S::Seq { index } => result.0.push(Segment::Index(*index)),
                S::Map { key } => result.0.push(Segment::Key(key.clone())),
                S::Enum { .. } | S::Unknown => {}
            }
        }
        result
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) if key.contains(['.', '/', '[', ']', '"']) || key.is_empty() => {
                    write!(f, "[{key:?}]")?
                }
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_and_parse() {
        let path = FieldPath::parse("spec.backends[1].weight");
        assert_eq!(path.to_string(), "spec.backends[1].weight");
        assert_eq!(
            FieldPath::annotation("split.smi-spec.io/trellis-matches").to_string(),
            r#"metadata.annotations["split.smi-spec.io/trellis-matches"]"#
        );
        assert_eq!(FieldPath::parse("matches[0].headers[2]").0.len(), 4);
        assert!(path.starts_with("spec.backends"));
        assert!(!path.starts_with("spec.matches"));
    }
}
