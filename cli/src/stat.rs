//! `trellis stat`: per workload, what its proxies answered (the inbound side): requests per
//! second, success rate, and p50/p95/p99 latency over a window, read from the Prometheus that
//! scrapes the proxies (`trellis_request_total`, `trellis_request_duration_ms`). With
//! `--by backend`, the same per TrafficSplit backend as callers' proxies saw it (the outbound
//! side), so a canary's share and health show next to its primary's.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;
// The one Prometheus client, shared with the controller's TrafficMetrics API.
pub(crate) use trellis_traffic_metrics::prometheus::{address, query};

/// The Prometheus the live views (`stat`, `top`, `edges`) read: the one that scrapes the proxies.
#[derive(Debug, Clone, clap::Args)]
pub struct Source {
    /// The Prometheus that scrapes the proxies (http://HOST:PORT).
    #[arg(
        long,
        env = "TRELLIS_PROMETHEUS",
        default_value = "http://127.0.0.1:9090"
    )]
    pub prometheus: String,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: Source,
    /// Only this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Rows: `workload` (what each workload's proxies answered) or `backend` (per destination
    /// and TrafficSplit backend, as callers saw it).
    #[arg(long, value_enum, default_value_t = By::Workload)]
    pub by: By,
    /// The rate window (a PromQL duration).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// Output: a table or JSON.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Workload,
    Backend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One row of `trellis stat`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Row {
    pub namespace: String,
    pub name: String,
    /// With `--by backend`: the TrafficSplit backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub requests_per_second: f64,
    /// Percent of responses that were not 5xx; `None` without traffic.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(rows(args))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => print!("{}", table(&rows, args.by)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The PromQL label matchers and grouping of a view.
fn selection(args: &Args) -> (String, &'static str) {
    let namespace = args
        .namespace
        .as_ref()
        .map(|ns| format!(",destination_namespace=\"{ns}\""))
        .unwrap_or_default();
    match args.by {
        By::Workload => (
            format!("direction=\"inbound\"{namespace}"),
            "destination_namespace,destination_workload",
        ),
        By::Backend => (
            format!("direction=\"outbound\"{namespace}"),
            "destination_namespace,destination,backend",
        ),
    }
}

pub(crate) async fn rows(args: &Args) -> anyhow::Result<Vec<Row>> {
    let prometheus = address(&args.source.prometheus)?;
    let (matchers, by) = selection(args);
    let window = &args.window;
    let rate = format!("sum by ({by}) (rate(trellis_request_total{{{matchers}}}[{window}]))");
    // One expression, so numerator and denominator come from the same evaluation.
    let success = format!(
        "sum by ({by}) (rate(trellis_request_total{{{matchers},response_code!~\"5..\"}}[{window}])) / {rate} * 100"
    );
    let quantile = |q: f64| {
        format!(
            "histogram_quantile({q}, sum by (le,{by}) (rate(trellis_request_duration_ms_bucket{{{matchers}}}[{window}])))"
        )
    };
    let mut table: BTreeMap<(String, String, Option<String>), Row> = BTreeMap::new();
    let key = |labels: &Value| -> (String, String, Option<String>) {
        let text = |k: &str| labels[k].as_str().unwrap_or_default().to_owned();
        match args.by {
            By::Workload => (
                text("destination_namespace"),
                text("destination_workload"),
                None,
            ),
            By::Backend => (
                text("destination_namespace"),
                text("destination"),
                Some(text("backend")),
            ),
        }
    };
    for (labels, value) in query(prometheus, &rate).await? {
        let k = key(&labels);
        table
            .entry(k.clone())
            .or_insert_with(|| Row {
                namespace: k.0,
                name: k.1,
                backend: k.2,
                ..Row::default()
            })
            .requests_per_second = value;
    }
    for row in table.values_mut() {
        // Traffic but no success series: every answer was a 5xx.
        if row.requests_per_second > 0.0 {
            row.success_rate = Some(0.0);
        }
    }
    for (labels, value) in query(prometheus, &success).await? {
        if let Some(row) = table.get_mut(&key(&labels)) {
            row.success_rate = value.is_finite().then_some(value);
        }
    }
    for (q, set) in [
        (
            0.5,
            (|r: &mut Row, v| r.p50_ms = v) as fn(&mut Row, Option<f64>),
        ),
        (0.95, |r, v| r.p95_ms = v),
        (0.99, |r, v| r.p99_ms = v),
    ] {
        for (labels, value) in query(prometheus, &quantile(q)).await? {
            if let Some(row) = table.get_mut(&key(&labels)) {
                set(row, value.is_finite().then_some(value));
            }
        }
    }
    Ok(table.into_values().collect())
}

/// The rows as an aligned table.
pub fn table(rows: &[Row], by: By) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}ms"));
    let mut lines = vec![vec![
        "NAMESPACE".to_owned(),
        match by {
            By::Workload => "WORKLOAD".to_owned(),
            By::Backend => "DESTINATION".to_owned(),
        },
        "BACKEND".to_owned(),
        "RPS".to_owned(),
        "SUCCESS".to_owned(),
        "P50".to_owned(),
        "P95".to_owned(),
        "P99".to_owned(),
    ]];
    for r in rows {
        lines.push(vec![
            r.namespace.clone(),
            r.name.clone(),
            r.backend.clone().unwrap_or_else(|| "-".into()),
            format!("{:.1}", r.requests_per_second),
            r.success_rate.map_or("-".into(), |s| format!("{s:.2}%")),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
        ]);
    }
    if by == By::Workload {
        for line in &mut lines {
            line.remove(2);
        }
    }
    crate::top::align(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_and_shows_missing_values_as_dashes() {
        let rows = vec![
            Row {
                namespace: "test".into(),
                name: "podinfo".into(),
                backend: None,
                requests_per_second: 12.5,
                success_rate: Some(90.0),
                p50_ms: Some(1.2),
                p95_ms: Some(50.0),
                p99_ms: Some(90.0),
            },
            Row {
                namespace: "test".into(),
                name: "podinfo-primary".into(),
                ..Row::default()
            },
        ];
        let text = table(&rows, By::Workload);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE  WORKLOAD         RPS   SUCCESS  P50    P95     P99"
        );
        assert_eq!(
            lines[1],
            "test       podinfo          12.5  90.00%   1.2ms  50.0ms  90.0ms"
        );
        assert_eq!(
            lines[2],
            "test       podinfo-primary  0.0   -        -      -       -"
        );
    }

    #[test]
    fn a_prometheus_address_must_be_http() {
        assert!(address("https://p:9090").is_err());
        assert_eq!(
            address("http://127.0.0.1:9090/").unwrap(),
            "127.0.0.1:9090".parse().unwrap()
        );
    }
}
