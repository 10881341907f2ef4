//! `trellis edges`: who calls whom (the dependency graph), read from the Prometheus that scrapes
//! the proxies. An edge is a source workload calling a destination workload, as the caller's
//! proxy counted it (`trellis_request_total{direction="outbound"}`: the inbound side carries no
//! caller labels), with its requests per second, success rate and whether the caller's proxy
//! speaks mTLS.
//!
//! Identities: the `source_identity` / `destination_identity` labels of the edge's requests
//! that went over mTLS (`tls="true"`): the caller's own SPIFFE id and the one the callee's
//! certificate had to name. Plaintext edges show `-` (JSON `null`). mTLS: `yes` when every
//! request of the edge that an upstream answered went over mutual TLS, `no` when some went in
//! plaintext, `-` when no request was answered in the window (or the proxies predate the `tls`
//! label).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use crate::stat::{self, Output, address, query};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: stat::Source,
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
    /// Whether the edge's answered requests all went over mutual TLS; `None` when unknown.
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

/// The grouping of an edge: both ends' workloads.
const BY: &str =
    "source_namespace,source_workload,destination_namespace,destination_kind,destination_workload";

type Key = (String, String, String, String, String);

fn key(labels: &Value) -> Key {
    let text = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
    (
        text("source_namespace"),
        text("source_workload"),
        text("destination_namespace"),
        text("destination_kind"),
        text("destination_workload"),
    )
}

async fn edges(args: &Args) -> anyhow::Result<Vec<Edge>> {
    let prometheus = address(&args.source.prometheus)?;
    let window = &args.window;
    // `unknown` destinations are requests no route matched: not an edge to anything.
    let matchers =
        r#"direction="outbound",destination_workload!="unknown",destination_workload!="""#;
    let rate = format!("sum by ({BY}) (rate(trellis_request_total{{{matchers}}}[{window}]))");
    let success = format!(
        "sum by ({BY}) (rate(trellis_request_total{{{matchers},response_code!~\"5..\"}}[{window}])) / {rate} * 100"
    );
    let mut edges: BTreeMap<Key, Edge> = BTreeMap::new();
    for (labels, value) in query(prometheus, &rate).await? {
        let k = key(&labels);
        if let Some(ns) = &args.namespace
            && &k.0 != ns
            && &k.2 != ns
        {
            continue;
        }
        edges.insert(
            k.clone(),
            Edge {
                source_namespace: k.0,
                source_workload: k.1,
                source_identity: None,
                destination_namespace: k.2,
                destination_kind: k.3,
                destination_workload: k.4,
                destination_identity: None,
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
    // The identities the mTLS requests of each edge carried (every request over mTLS names
    // both ends; several when an edge's calls went to several identities).
    let identities = format!(
        "group by ({BY},source_identity,destination_identity) (trellis_request_total{{{matchers},tls=\"true\"}})"
    );
    let mut seen: BTreeMap<Key, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (labels, _) in query(prometheus, &identities).await? {
        let entry = seen.entry(key(&labels)).or_default();
        for (set, label) in [
            (&mut entry.0, "source_identity"),
            (&mut entry.1, "destination_identity"),
        ] {
            if let Some(id) = labels[label].as_str().filter(|id| !id.is_empty()) {
                set.insert(id.to_owned());
            }
        }
    }
    let joined = |set: &BTreeSet<String>| {
        (!set.is_empty()).then(|| set.iter().cloned().collect::<Vec<_>>().join(","))
    };
    // mTLS per edge, from the requests an upstream answered (`error=""`; the ones the proxy
    // answered itself, say for no endpoints, never left it): yes when none of them went in
    // plaintext, no when some did, unknown without answered requests.
    let by_tls = format!(
        "sum by ({BY},tls) (rate(trellis_request_total{{{matchers},error=\"\"}}[{window}]))"
    );
    let mut answered: BTreeMap<Key, (f64, f64)> = BTreeMap::new();
    for (labels, value) in query(prometheus, &by_tls).await? {
        let entry = answered.entry(key(&labels)).or_default();
        match labels["tls"].as_str() {
            Some("true") => entry.0 += value,
            Some("false") => entry.1 += value,
            _ => {}
        }
    }
    for (k, edge) in &mut edges {
        if let Some((sources, destinations)) = seen.get(k) {
            edge.source_identity = joined(sources);
            edge.destination_identity = joined(destinations);
        }
        edge.mtls = answered.get(k).and_then(|&(mtls, plain)| {
            if plain > 0.0 {
                Some(false)
            } else {
                (mtls > 0.0).then_some(true)
            }
        });
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
