//! Churn and memory benchmark of the file adapter, with the shared runners of the suite crate.
//!
//! - churn: time from rewriting the file to the watch yielding the snapshot that reflects it, over
//!   `TRELLIS_BENCH_CHANGES` changes (default 1,000), at the default 250 ms poll interval (what users
//!   get) and at 10 ms (what is left: stat, read, parse, publish). Baseline: re-reading and parsing
//!   the same file directly, measured in the same run.
//! - memory: a fresh adapter watching a 10,000-endpoint service. Baseline: the file's size.
//!
//! Run: `cargo bench -p trellis-adapter-file --bench churn`

#[allow(dead_code)] // the suite-only parts of the harness
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::FileRegistry;
use trellis_discovery::SourceId;
use trellis_discovery_suite::{churn, memory, time_baseline};

fn changes() -> usize {
    std::env::var("TRELLIS_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Reading and parsing the file directly: what any file-based discovery must at least do.
fn read_and_parse(path: &Path, source: &SourceId) {
    let text = std::fs::read_to_string(path).expect("read");
    let catalog =
        trellis_adapter_file::parse(&text, path, source, SystemTime::now()).expect("parse");
    std::hint::black_box(catalog);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes = changes();
    let source: SourceId = Arc::from("file:baseline");

    for interval in [Duration::from_millis(250), Duration::from_millis(10)] {
        let registry = FileRegistry::with_poll_interval(0, interval);
        let report = churn(&registry, changes).await;
        let baseline = time_baseline(changes, |_| {
            read_and_parse(&registry.path, &source);
            async {}
        })
        .await;
        report.print(
            &format!("file, poll every {interval:?}, {changes} changes"),
            "re-read + parse the file",
            &baseline,
        );
    }

    let endpoints = 10_000;
    let registry = FileRegistry::new(0);
    let report = memory(&registry, endpoints).await;
    let file_bytes = std::fs::metadata(&registry.path).expect("file").len() as usize;
    report.print("file", "the YAML file on disk", file_bytes);
    let parse = time_baseline(10, |_| {
        read_and_parse(&registry.path, &source);
        async {}
    })
    .await;
    println!("  (re-read + parse of the {endpoints}-endpoint file: {parse})");
}
