//! `trellis get splits|targets|routes|services`: the controller's resolved view as tables.

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::Value;

use super::state::{fetch_state, list, text};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    Splits,
    Targets,
    Routes,
    Services,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    pub what: What,
    /// The controller's admin address.
    #[arg(long, default_value = "127.0.0.1:9990")]
    pub admin: SocketAddr,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let state = match fetch_state(args.admin) {
        Ok(state) => state,
        Err(e) => {
            eprintln!(
                "trellis get: the controller at {} is down: {e:#}",
                args.admin
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", render(args.what, &state));
    Ok(ExitCode::SUCCESS)
}

/// Columns padded to their widest cell.
fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The table of `what` in `state`.
pub fn render(what: What, state: &Value) -> String {
    let policies = |kinds: &[&str]| -> Vec<Vec<String>> {
        list(state, "policies")
            .iter()
            .filter(|p| kinds.contains(&text(&p["kind"]).as_str()))
            .map(|p| {
                vec![
                    text(&p["namespace"]),
                    text(&p["name"]),
                    text(&p["kind"]),
                    text(&p["summary"]),
                ]
            })
            .collect()
    };
    let header = |cols: &[&str]| vec![cols.iter().map(|c| c.to_string()).collect::<Vec<String>>()];
    let rows = match what {
        What::Splits => [
            header(&["NAMESPACE", "NAME", "KIND", "SPLIT"]),
            policies(&["TrafficSplit"]),
        ]
        .concat(),
        What::Targets => [
            header(&["NAMESPACE", "NAME", "KIND", "ALLOWS"]),
            policies(&["TrafficTarget"]),
        ]
        .concat(),
        What::Routes => [
            header(&["NAMESPACE", "NAME", "KIND", "MATCHES"]),
            policies(&["HTTPRouteGroup", "TCPRoute", "UDPRoute"]),
        ]
        .concat(),
        What::Services => {
            let mut rows = header(&[
                "DESTINATION",
                "STATE",
                "BACKENDS (weight/endpoints)",
                "ROUTES",
                "PROXIES",
            ]);
            for d in list(state, "destinations") {
                let backends: Vec<String> = d["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| format!("{} {}/{}", text(&b["name"]), b["weight"], b["endpoints"]))
                    .collect();
                let routes: Vec<String> = d["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                rows.push(vec![
                    text(&d["authority"]),
                    text(&d["state"]),
                    backends.join(", "),
                    if routes.is_empty() {
                        "-".into()
                    } else {
                        routes.join("; ")
                    },
                    d["subscribers"].to_string(),
                ]);
            }
            rows
        }
    };
    table(rows)
}
