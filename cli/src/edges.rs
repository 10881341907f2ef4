//! `trellis edges`: who calls whom (the dependency graph), read from the Prometheus that scrapes
//! the proxies. An edge is a source workload calling a destination workload, as the caller's
//! proxy counted it (`trellis_request_total{direction="outbound"}`: the inbound side carries no
//! caller labels), with its requests per second, success rate and whether the caller's proxy
//! speaks mTLS.
//!
//! Identities: the request series name workloads, not identities. When they also carry
//! `source_identity` / `destination_identity` labels they are shown; otherwise the column shows
//! `-` (JSON `null`). mTLS: the series carry no per-request TLS label, so it is read per source
//! proxy (`trellis_tls_handshakes_total{direction="outbound"}` on the same scrape target as the
//! edge's series): `yes` when that proxy has completed outbound mTLS handshakes, `no` when it
//! has none.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use crate::stat::{Output, address, query};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Prometheus that scrapes the proxies (http://HOST:PORT).
    #[arg(
        long,
        env = "TRELLIS_PROMETHEUS",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus: String,
    /// Only edges with a source or a destination in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The rate window (a PromQL duration).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// Output: a table or JSON.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// One edge of the graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Edge {
    pub source_namespace: String,
    pub source_workload: String,
    pub source_identity: Option<String>,
    pub destination_namespace: String,
    /// What the callers' proxies know the destination as: the backend's workload kind
    /// (`Deployment`...) when the controller gave one, else `service` (the backend Service).
    pub destination_kind: String,
    pub destination_workload: String,
    pub destination_identity: Option<String>,
    pub requests_per_second: f64,
    /// Percent of calls that were not 5xx; `None` without traffic.
    pub success_rate: Option<f64>,
    /// Whether the source's proxy completed outbound mTLS handshakes; `None` when unknown.
    pub mtls: Option<bool>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let edges = runtime.block_on(edges(args))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&edges)?),
        Output::Table => print!("{}", table(&edges)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The grouping of an edge; the identity labels group nothing away when absent.
const BY: &str = "source_namespace,source_workload,source_identity,destination_namespace,destination_kind,destination_workload,destination_identity";

type Key = (String, String, String, String, String, String, String);

fn key(labels: &Value) -> Key {
    let text = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
    (
        text("source_namespace"),
        text("source_workload"),
        text("source_identity"),
        text("destination_namespace"),
        text("destination_kind"),
        text("destination_workload"),
        text("destination_identity"),
    )
}

async fn edges(args: &Args) -> anyhow::Result<Vec<Edge>> {
    let prometheus = address(&args.prometheus)?;
    let window = &args.window;
    // `unknown` destinations are requests no route matched: not an edge to anything.
    let matchers =
        r#"direction="outbound",destination_workload!="unknown",destination_workload!="""#;
    let rate = format!("sum by ({BY}) (rate(trellis_request_total{{{matchers}}}[{window}]))");
    let success = format!(
        "sum by ({BY}) (rate(trellis_request_total{{{matchers},response_code!~\"5..\"}}[{window}])) / {rate} * 100"
    );
    let mut edges: BTreeMap<Key, Edge> = BTreeMap::new();
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    for (labels, value) in query(prometheus, &rate).await? {
        let k = key(&labels);
        if let Some(ns) = &args.namespace
            && &k.0 != ns
            && &k.3 != ns
        {
            continue;
        }
        edges.insert(
            k.clone(),
            Edge {
                source_namespace: k.0.clone(),
                source_workload: k.1.clone(),
                source_identity: optional(&k.2),
                destination_namespace: k.3.clone(),
                destination_kind: k.4.clone(),
                destination_workload: k.5.clone(),
                destination_identity: optional(&k.6),
                requests_per_second: value,
                // Traffic but no success series: every answer was a 5xx.
                success_rate: (value > 0.0).then_some(0.0),
                mtls: None,
            },
        );
    }
    for (labels, value) in query(prometheus, &success).await? {
        if let Some(edge) = edges.get_mut(&key(&labels)) {
            edge.success_rate = value.is_finite().then_some(value);
        }
    }
    // mTLS per source proxy: which scrape targets carry which source workload, and which of
    // them completed outbound handshakes (a family without samples exposes no series: none).
    let sources = format!(
        "group by (instance,source_namespace,source_workload) (trellis_request_total{{{matchers}}})"
    );
    let mut instances: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (labels, _) in query(prometheus, &sources).await? {
        let text = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
        instances
            .entry((text("source_namespace"), text("source_workload")))
            .or_default()
            .insert(text("instance"));
    }
    let handshakes = r#"sum by (instance) (trellis_tls_handshakes_total{direction="outbound"})"#;
    let with_mtls: BTreeSet<String> = query(prometheus, handshakes)
        .await?
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .filter_map(|(labels, _)| labels["instance"].as_str().map(str::to_owned))
        .collect();
    for edge in edges.values_mut() {
        let source = (edge.source_namespace.clone(), edge.source_workload.clone());
        edge.mtls = instances
            .get(&source)
            .map(|set| set.iter().any(|i| with_mtls.contains(i)));
    }
    Ok(edges.into_values().collect())
}

/// The edges as an aligned table.
pub fn table(edges: &[Edge]) -> String {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut lines = vec![
        [
            "SOURCE",
            "SOURCE IDENTITY",
            "DESTINATION",
            "DESTINATION IDENTITY",
            "RPS",
            "SUCCESS",
            "MTLS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for e in edges {
        lines.push(vec![
            format!("{}/{}", e.source_namespace, e.source_workload),
            or_dash(&e.source_identity),
            format!("{}/{}", e.destination_namespace, e.destination_workload),
            or_dash(&e.destination_identity),
            format!("{:.1}", e.requests_per_second),
            e.success_rate.map_or("-".into(), |s| format!("{s:.2}%")),
            match e.mtls {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
        ]);
    }
    crate::top::align(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_both_ends_and_marks_unknowns() {
        let edges = vec![Edge {
            source_namespace: "test".into(),
            source_workload: "loadtester".into(),
            source_identity: None,
            destination_namespace: "test".into(),
            destination_kind: "Deployment".into(),
            destination_workload: "podinfo".into(),
            destination_identity: Some("spiffe://cluster.local/ns/test/sa/podinfo".into()),
            requests_per_second: 3.25,
            success_rate: Some(90.0),
            mtls: Some(false),
        }];
        let text = table(&edges);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SOURCE           SOURCE IDENTITY  DESTINATION   DESTINATION IDENTITY                       RPS  SUCCESS  MTLS"
        );
        assert_eq!(
            lines[1],
            "test/loadtester  -                test/podinfo  spiffe://cluster.local/ns/test/sa/podinfo  3.2  90.00%   no"
        );
    }
}
