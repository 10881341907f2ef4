//! Fuzz the SMI YAML loader and the conversion paths behind it.
//!
//! Arbitrary bytes (as UTF-8, lossy) go through `load_str` as one multi-document file. Checked:
//! - nothing panics (libfuzzer-sys turns a panic into an abort = a finding);
//! - every error carries a location: the file name, a line inside the text, and its Display
//!   starts with `file:line`;
//! - every loaded resource converts to every version of its kind and back to the same model
//!   (the losslessness `convert` promises), and the webhook entry point `convert` accepts it for
//!   every version of its kind;
//! - every document that parses as YAML goes through `convert` to every apiVersion of every
//!   group (most are errors; none may panic), and errors there name a field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use trellis_smi::convert::{SmiObject, convert};
use trellis_smi::load::load_str;
use trellis_smi::model::Kind;

const FILE: &str = "fuzz.yaml";

/// Every `group/version` Trellis knows, plus a few it does not (wrong group, no group, junk).
fn api_versions() -> Vec<String> {
    let mut all: Vec<String> = Kind::ALL
        .iter()
        .flat_map(|k| {
            k.versions()
                .iter()
                .map(move |v| format!("{}/{v}", k.group()))
        })
        .collect();
    all.sort();
    all.dedup();
    all.extend([
        "v1alpha4".into(),
        "example.com/v1alpha1".into(),
        String::new(),
    ]);
    all
}

/// Line breaks as YAML counts them: LF, CRLF and a lone CR each end a line (`str::lines` does
/// not see a lone CR, so it would undercount files with old Mac or stray line ends).
fn yaml_line_breaks(text: &str) -> usize {
    let bytes = text.as_bytes();
    bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let report = load_str(FILE, &text);

    // Lines are 1-based; an error may point one past the last line (end of input).
    let last_line = u32::try_from(yaml_line_breaks(&text) + 1).unwrap_or(u32::MAX);
    for error in &report.errors {
        let line = error
            .line
            .unwrap_or_else(|| panic!("error without a line: {error}"));
        assert!(
            (1..=last_line).contains(&line),
            "line {line} outside 1..={last_line}: {error}"
        );
        assert_eq!(error.file.to_str(), Some(FILE), "{error}");
        assert!(
            error.to_string().starts_with(&format!("{FILE}:{line}")),
            "{error}"
        );
        assert!(
            !error.message.is_empty(),
            "error without a message: {error:?}"
        );
    }

    for resource in &report.resources {
        let line = resource.source.line;
        assert!((1..=last_line).contains(&line), "resource at line {line}");
        let kind = resource.object.kind();
        for version in kind.versions() {
            let object = SmiObject::from_policy(&resource.policy, version)
                .unwrap_or_else(|e| panic!("{kind} cannot be written as {version}: {e}"));
            let back = object
                .to_policy()
                .unwrap_or_else(|e| panic!("{kind} written as {version} does not read back: {e}"));
            assert_eq!(back, resource.policy, "{kind} through {version} changed");
            let api_version = format!("{}/{version}", kind.group());
            if let Err(e) = convert(&resource.object.to_value(), &api_version) {
                panic!("{kind} {} -> {api_version}: {e}", resource.object.version());
            }
        }
    }

    // The webhook path on anything that parses, valid SMI or not (documents read with
    // serde_yaml_ng: the loader's fast path, and cheaper than the span-aware parser).
    let versions = api_versions();
    for document in serde_yaml_ng::Deserializer::from_str(&text).take(8) {
        let Ok(yaml) = serde_yaml_ng::Value::deserialize(document) else {
            break;
        };
        let Ok(value) = serde_json::to_value(yaml) else {
            continue;
        };
        for api_version in &versions {
            match convert(&value, api_version) {
                Ok(converted) => {
                    // What came out is a valid object of the version asked for.
                    let typed = SmiObject::from_value(&converted)
                        .unwrap_or_else(|e| panic!("converted object does not parse: {e}"));
                    assert_eq!(&typed.api_version(), api_version);
                }
                Err(e) => assert!(!e.message().is_empty(), "{e:?}"),
            }
        }
    }
});
