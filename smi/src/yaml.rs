//! Span-aware YAML reading: every node of a document with the line it starts on.
//!
//! `serde_yaml_ng` (the workspace YAML library) gives no positions for valid values, and every
//! validation error must name its line. `serde-saphyr` (already in the build through kube-client)
//! deserializes `Spanned<T>`, so one pass builds a small tree of positioned nodes; the tree then
//! turns into a `serde_json::Value` for typed deserialization and answers "which line is
//! `spec.backends[1].weight` on?" for error messages.

use crate::path::{FieldPath, Segment};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use serde_saphyr::Spanned;
use std::fmt;

/// A YAML node and the line (1-based) it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub line: u32,
    pub value: NodeValue,
}

/// The content of a node.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Seq(Vec<Node>),
    /// Entries in document order, each with the line of its key.
    Map(Vec<Entry>),
}

/// A map entry: the key, the line the key is on, and the value.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_line: u32,
    pub value: Node,
}

/// A YAML syntax (or structure) error with the line it was found on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: u32,
    pub message: String,
}

/// Parses every document of a (multi-document) YAML text. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    // YAML 1.2 core scalars, as Kubernetes reads them: `y`/`yes`/`on` stay strings, `0755` and
    // `1_000` too.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
    };
    let documents: Vec<Spanned<NodeValue>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let line = e
                .location()
                .map(|l| clamp_line(l.line()))
                .unwrap_or(1)
                .max(1);
            // The library's message repeats the position; keep the first line, which says what.
            let message = e.to_string();
            let message = message.lines().next().unwrap_or("invalid YAML").to_owned();
            SyntaxError { line, message }
        })?;
    Ok(documents.into_iter().map(node_of).collect())
}

fn clamp_line(line: u64) -> u32 {
    u32::try_from(line).unwrap_or(u32::MAX)
}

fn node_of(spanned: Spanned<NodeValue>) -> Node {
    Node {
        line: clamp_line(spanned.referenced.line()),
        value: spanned.value,
    }
}

impl Node {
    /// The node as a JSON value (what the typed API structs deserialize from).
    pub fn to_json(&self) -> Value {
        match &self.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Number(n) => Value::Number(n.clone()),
            NodeValue::String(s) => Value::String(s.clone()),
            NodeValue::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Map(entries) => {
                let mut map = Map::with_capacity(entries.len());
                for entry in entries {
                    map.insert(entry.key.clone(), entry.value.to_json());
                }
                Value::Object(map)
            }
        }
    }

    /// The line of the field at `path`: the key's line for a map entry, the item's line for a
    /// list element. Where the path leaves the document (a missing field), the line of the
    /// deepest node that exists.
    pub fn line_of(&self, path: &FieldPath) -> u32 {
        let mut node = self;
        let mut line = self.line;
        for segment in &path.0 {
            match (segment, &node.value) {
                (Segment::Key(key), NodeValue::Map(entries)) => {
                    match entries.iter().find(|e| &e.key == key) {
                        Some(entry) => {
                            line = entry.key_line;
                            node = &entry.value;
                        }
                        None => break,
                    }
                }
                (Segment::Index(index), NodeValue::Seq(items)) => match items.get(*index) {
                    Some(item) => {
                        line = item.line;
                        node = item;
                    }
                    None => break,
                },
                _ => break,
            }
        }
        line
    }
}

impl<'de> Deserialize<'de> for NodeValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = NodeValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<NodeValue, E> {
        Ok(NodeValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<NodeValue, D::Error> {
        NodeValue::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<NodeValue, E> {
        Ok(NodeValue::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<NodeValue, E> {
        Ok(NodeValue::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<NodeValue, E> {
        Ok(NodeValue::Number(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<NodeValue, E> {
        i64::try_from(v)
            .map(|v| NodeValue::Number(v.into()))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<NodeValue, E> {
        u64::try_from(v)
            .map(|v| NodeValue::Number(v.into()))
            .map_err(|_| E::custom(format!("integer {v} is out of range")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<NodeValue, E> {
        // JSON has no NaN or infinities; keep such YAML values as their text.
        Ok(Number::from_f64(v)
            .map(NodeValue::Number)
            .unwrap_or_else(|| NodeValue::String(v.to_string())))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<NodeValue, E> {
        Ok(NodeValue::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NodeValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element::<Spanned<NodeValue>>()? {
            items.push(node_of(item));
        }
        Ok(NodeValue::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NodeValue, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<Spanned<KeyText>>()? {
            let value = map.next_value::<Spanned<NodeValue>>()?;
            entries.push(Entry {
                key: key.value.0,
                key_line: clamp_line(key.referenced.line()),
                value: node_of(value),
            });
        }
        Ok(NodeValue::Map(entries))
    }
}

/// A map key as text: YAML allows `80: x`, JSON objects need string keys.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar map key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<KeyText, E> {
                Ok(KeyText(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".to_owned()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_know_their_lines() {
        let text = "a: 1\nb:\n  c: [1, 2]\n  d:\n  - x: \"5\"\n    y: -5\n---\n---\nz: true\n";
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2, "empty documents are skipped");
        let doc = &docs[0];
        assert_eq!(doc.line_of(&FieldPath::parse("b.d[0].y")), 6);
        assert_eq!(doc.line_of(&FieldPath::parse("b.c")), 3);
        assert_eq!(doc.line_of(&FieldPath::parse("b.missing")), 2);
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": 1, "b": {"c": [1, 2], "d": [{"x": "5", "y": -5}]}})
        );
        assert_eq!(docs[1].line_of(&FieldPath::parse("z")), 9);
    }

    #[test]
    fn syntax_errors_have_lines() {
        let err = parse_documents("a: 1\nb: [1,\n").unwrap_err();
        assert!(err.line >= 2, "{err:?}");
        let err = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.line, 2, "{err:?}");
    }
}
