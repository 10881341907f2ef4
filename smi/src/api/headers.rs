//! HTTPRouteGroup header matches in both wire forms.
//!
//! The SMI spec text writes headers as a map (`headers: {x-debug: "1"}`) while the SDK and the
//! official CRD use a list of single-key maps (`headers: [{x-debug: "1"}]`). Both are accepted;
//! the list form is always written, because it is what the CRD schema allows and it keeps order.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// One header condition: the header `name` (case-insensitive) whose value must fully match
/// the regex `value`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

/// The header conditions of one HTTP match; all of them must hold.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct HeaderMatches(pub Vec<HeaderMatch>);

impl HeaderMatches {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for HeaderMatches {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Single<'a>(&'a HeaderMatch);
        impl Serialize for Single<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(&self.0.name, &self.0.value)?;
                map.end()
            }
        }
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for header in &self.0 {
            seq.serialize_element(&Single(header))?;
        }
        seq.end()
    }
}

/// A map of header name to value regex, read entry by entry so order is kept.
struct HeaderMap(Vec<HeaderMatch>);

impl<'de> Deserialize<'de> for HeaderMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;
        impl<'de> Visitor<'de> for MapVisitor {
            type Value = HeaderMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of header name to value regex")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderMap, A::Error> {
                let mut headers = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    headers.push(HeaderMatch { name, value });
                }
                Ok(HeaderMap(headers))
            }
        }
        deserializer.deserialize_map(MapVisitor)
    }
}

impl<'de> Deserialize<'de> for HeaderMatches {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EitherForm;
        impl<'de> Visitor<'de> for EitherForm {
            type Value = HeaderMatches;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of single-key maps or a map of header name to value regex")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<HeaderMatches, A::Error> {
                let HeaderMap(headers) =
                    HeaderMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(HeaderMatches(headers))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderMatches, A::Error> {
                let mut headers = Vec::new();
                while let Some(HeaderMap(entries)) = seq.next_element::<HeaderMap>()? {
                    headers.extend(entries);
                }
                Ok(HeaderMatches(headers))
            }
        }
        deserializer.deserialize_any(EitherForm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_wire_forms_read_and_list_form_is_written() {
        let list: HeaderMatches =
            serde_json::from_value(json!([{"x-a": "1"}, {"x-b": "2"}])).unwrap();
        let map: HeaderMatches = serde_json::from_value(json!({"x-a": "1", "x-b": "2"})).unwrap();
        assert_eq!(list, map);
        assert_eq!(
            serde_json::to_value(&map).unwrap(),
            json!([{"x-a": "1"}, {"x-b": "2"}])
        );
    }

    #[test]
    fn non_string_values_are_refused() {
        assert!(serde_json::from_value::<HeaderMatches>(json!([{"x-a": 1}])).is_err());
        assert!(serde_json::from_value::<HeaderMatches>(json!("x")).is_err());
    }
}
