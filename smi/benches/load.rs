//! Load benchmark: writes 10,000 SMI documents (every kind and version, 10 per file) into a temp
//! directory, then times `trellis_smi::load::load_paths` against a baseline measured in the same
//! run: plain `serde_yaml_ng` parsing of the same files into untyped values (no types, no
//! positions, no validation). Prints documents per second for both and the ratio, plus the
//! span-aware parse that the loader falls back to for files with errors.
//!
//! Run: `cargo bench -p trellis-smi --bench load`

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use std::path::Path;
use std::time::{Duration, Instant};
use trellis_smi::convert::SmiObject;
use trellis_smi::load::load_paths;
use trellis_smi::model::{
    AccessPolicy, AccessRule, HeaderMatch, HttpMatch, HttpRouteGroup, Identity, Kind, Policy,
    PortRoute, RouteGroupRef, RouteKind, SplitBackend, TrafficSplit, Weight,
};

const DOCUMENTS: usize = 10_000;
const PER_FILE: usize = 10;
const ROUNDS: usize = 5;

fn metadata(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    }
}

/// The policies of one namespace: a route group, TCP/UDP routes, a split and a target that
/// reference them (so reference checks run and pass).
fn namespace_policies(ns: &str) -> Vec<Policy> {
    let identity = |name: &str| Identity {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(ns.into()),
    };
    vec![
        Policy::HttpRouteGroup(HttpRouteGroup {
            metadata: metadata("routes", ns),
            matches: vec![
                HttpMatch {
                    name: "api".into(),
                    path_regex: Some("/api/v[0-9]+/.*".into()),
                    methods: Some(vec!["GET".into(), "POST".into()]),
                    headers: vec![],
                },
                HttpMatch {
                    name: "canary".into(),
                    path_regex: None,
                    methods: None,
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        value: "true|yes".into(),
                    }],
                },
            ],
        }),
        Policy::TcpRoute(PortRoute {
            metadata: metadata("tcp", ns),
            ports: vec![8080, 8443],
        }),
        Policy::UdpRoute(PortRoute {
            metadata: metadata("udp", ns),
            ports: vec![53],
        }),
        Policy::TrafficSplit(TrafficSplit {
            metadata: metadata("web", ns),
            service: "web".into(),
            backends: vec![
                SplitBackend {
                    service: "web-primary".into(),
                    weight: Weight::units(90),
                },
                SplitBackend {
                    service: "web-canary".into(),
                    weight: Weight(10_500),
                },
            ],
            matches: vec![RouteGroupRef {
                name: "routes".into(),
            }],
        }),
        Policy::AccessPolicy(AccessPolicy {
            metadata: metadata("web-to-api", ns),
            destination: identity("api"),
            destination_port: None,
            sources: vec![identity("web"), identity("prometheus")],
            rules: vec![
                AccessRule {
                    kind: RouteKind::HttpRouteGroup,
                    name: "routes".into(),
                    matches: Some(vec!["api".into()]),
                },
                AccessRule {
                    kind: RouteKind::TcpRoute,
                    name: "tcp".into(),
                    matches: None,
                },
            ],
        }),
    ]
}

/// Writes `DOCUMENTS` documents, cycling through every kind and version.
fn write_corpus(dir: &Path) -> usize {
    let mut documents = Vec::with_capacity(DOCUMENTS);
    let mut n = 0;
    'outer: loop {
        for version_index in 0..4 {
            let ns = format!("ns-{n}");
            n += 1;
            for policy in namespace_policies(&ns) {
                let versions = policy.kind().versions();
                let version = versions[version_index % versions.len()];
                let object =
                    SmiObject::from_policy(&policy, version).expect("every version exists");
                documents.push(serde_yaml_ng::to_string(&object.to_value()).expect("YAML"));
                if documents.len() == DOCUMENTS {
                    break 'outer;
                }
            }
        }
    }
    for (i, chunk) in documents.chunks(PER_FILE).enumerate() {
        std::fs::write(
            dir.join(format!("policies-{i:05}.yaml")),
            chunk.join("---\n"),
        )
        .expect("write");
    }
    documents.len()
}

/// The baseline: read the same files and parse every document into an untyped YAML value.
fn baseline(dir: &Path) -> usize {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut count = 0;
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(document).expect("valid YAML");
            std::hint::black_box(&value);
            count += 1;
        }
    }
    count
}

/// One stage of the load on its own: reading files and the span-aware parse into positioned nodes.
fn span_parse_only(dir: &Path) -> usize {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut count = 0;
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        count += std::hint::black_box(trellis_smi::yaml::parse_documents(&text).unwrap()).len();
    }
    count
}

/// Times one run of `run`, returning the time and what it counted.
fn timed(run: impl FnOnce() -> usize) -> (Duration, usize) {
    let start = Instant::now();
    let count = run();
    (start.elapsed(), count)
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let written = write_corpus(dir.path());
    let kinds: Vec<String> = Kind::ALL
        .iter()
        .map(|k| format!("{k} {}", k.versions().join("/")))
        .collect();
    println!(
        "corpus: {written} documents in {} files ({})",
        written / PER_FILE,
        kinds.join(", ")
    );

    let load = || {
        let report = load_paths(&[dir.path()]);
        assert!(
            report.errors.is_empty(),
            "corpus loads cleanly: {:?}",
            &report.errors[..report.errors.len().min(3)]
        );
        report.resources.len()
    };
    // Rounds alternate between the contenders so a busy machine slows them alike; best of each.
    let (mut load_time, mut base_time, mut parse_time) =
        (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS {
        let (time, loaded) = timed(load);
        assert_eq!(loaded, written);
        load_time = load_time.min(time);
        let (time, parsed) = timed(|| baseline(dir.path()));
        assert_eq!(parsed, written);
        base_time = base_time.min(time);
        parse_time = parse_time.min(timed(|| span_parse_only(dir.path())).0);
    }
    let (loaded, parsed) = (written, written);

    let rate = |count: usize, time: Duration| count as f64 / time.as_secs_f64();
    let (load_rate, base_rate) = (rate(loaded, load_time), rate(parsed, base_time));
    println!(
        "trellis-smi load_paths (typed, positions, validation): {:>10.0} docs/s  ({:.1} ms)",
        load_rate,
        load_time.as_secs_f64() * 1e3
    );
    println!(
        "baseline serde_yaml_ng -> untyped Value:             {:>10.0} docs/s  ({:.1} ms)",
        base_rate,
        base_time.as_secs_f64() * 1e3
    );
    println!(
        "span-aware parse alone (serde-saphyr, error path):    {:>10.0} docs/s  ({:.1} ms)",
        rate(loaded, parse_time),
        parse_time.as_secs_f64() * 1e3
    );
    println!(
        "ratio (trellis / baseline): {:.2}x (best of {ROUNDS} alternating rounds)",
        load_rate / base_rate
    );
}
