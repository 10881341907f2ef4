//! The proxy's top-level modules import each other without cycles (the layering `src/lib.rs`
//! documents): a module may build on the ones below it, never on one that builds on it. A cycle
//! is reported with its path, e.g. `state -> http -> state`.
//!
//! Imports are read from the source: every `crate::<module>` outside comments and outside the
//! `#[cfg(test)]` part of a file (tests may use anything). Submodules count as their top-level
//! module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            out.push((path.display().to_string(), text));
        }
    }
}

/// Top-level module of a file under `src` (`src/http/outbound/retry.rs` -> `http`).
fn top_module(src: &Path, file: &str) -> String {
    let rel = Path::new(file).strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The modules `text` imports with `crate::name`, ignoring comments and its tests.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in &files {
        let module = top_module(&src, file);
        if module == "main" || module == "lib" {
            continue;
        }
        let deps = imports(text);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    graph
}

/// A cycle through `start`, as a path, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    // Depth-first search keeping the path, so the cycle can be printed.
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in &graph[at] {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn the_proxy_modules_import_each_other_without_cycles() {
    let graph = graph();
    assert!(
        graph.len() > 20 && graph["http"].contains("state"),
        "the graph was not read: {graph:?}"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|path| path.join(" -> "))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles between the proxy's modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn a_cycle_is_found_and_printed() {
    // The check itself can fail: a made-up graph with a cycle is reported.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.insert("a".into(), ["b".to_string()].into());
    graph.insert("b".into(), ["c".to_string()].into());
    graph.insert("c".into(), ["a".to_string()].into());
    graph.insert("d".into(), ["a".to_string()].into());
    assert_eq!(
        cycle_from(&graph, "a").map(|p| p.join(" -> ")),
        Some("a -> b -> c -> a".to_string())
    );
    assert_eq!(cycle_from(&graph, "d"), None);
    assert_eq!(
        imports(
            "use crate::x::Y;\n// crate::z\nlet a = crate::w::f(); // crate::v\n#[cfg(test)]\nuse crate::t;"
        ),
        ["w".to_string(), "x".to_string()].into()
    );
}
