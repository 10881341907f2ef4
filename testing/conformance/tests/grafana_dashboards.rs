//! Every query of the Grafana dashboards in deploy/grafana runs against a real Prometheus
//! scraping a real mesh, and `trellis edges` and `trellis top` read the same Prometheus.
//!
//! The mesh (the pieces of `flagger_metrics.rs`, on the file platform): a canary
//! (`Deployment/podinfo`) and its primary (`Deployment/podinfo-primary`), each an echo app
//! behind its inbound proxy, and a meshed caller (`loadtester`) whose proxy sends everything for
//! `podinfo` to the canary (the TrafficSplit at canary weight 100): 10% 500s and 5% requests
//! delayed by 60 ms, steadily for about 10 s. The primary gets clean 200s sent to it directly.
//!
//! For each dashboard, each panel target's `expr` has its variables substituted with the test
//! mesh's values (`$namespace=test`, `$workload` each of `podinfo`, `loadtester` and
//! `podinfo-canary` (the callers' side names the backend Service here),
//! `$destination` the split's apex as the caller's proxy labels it, `$canary=podinfo`,
//! `$__rate_interval=1m`) and must parse and return data for at least one of them; a few values
//! are checked (success rate 90 +/- 1 for the canary, 100 for the primary, p99 at least the
//! injected 60 ms, the canary's share 100%, no denied requests). `promtool check rules` parses
//! every expression written as a recording rule.
//!
//! Skipped, with the reason, when Prometheus is not installed (`scripts/test` installs Debian's
//! package when it can).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use trellis_conformance::canary::{
    Caller, Controller, NAMESPACE, SplitVersion, podinfo_pair, send_direct, wait_canary_only,
};
use trellis_conformance::harness::process;
use trellis_conformance::prometheus::{self, Prometheus};
use trellis_echo::plain as http;

const DASHBOARDS: [&str; 3] = ["mesh-overview", "workload", "canary"];

/// Grafana's own variables the dashboards may use, with the test's values.
const BUILTINS: [(&str, &str); 2] = [("__rate_interval", "1m"), ("__interval", "15s")];

/// A dashboard's panel targets: (panel title, expr).
fn targets(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = stack.pop() {
        // Rows hold their panels when collapsed.
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    out
}

/// `expr` with every `$name` / `${name}` replaced from `values`; an unknown variable is an
/// error (a dashboard query referring to a variable it does not define).
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').context("unclosed ${")?;
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = values
            .get(name)
            .with_context(|| format!("unknown variable ${name} in {expr}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An instant query's vector: each element's labels and value (NaN kept).
async fn instant(prometheus: SocketAddr, promql: &str) -> anyhow::Result<Vec<(Value, f64)>> {
    let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
    let reply = http::request(
        prometheus,
        http::Method::GET,
        &format!("/api/v1/query?query={encoded}"),
        None,
    )
    .await?;
    let body: Value = serde_json::from_slice(&reply.body)
        .with_context(|| format!("prometheus answered {}: {}", reply.status, reply.text()))?;
    ensure!(body["status"] == "success", "{promql}: {body}");
    ensure!(
        body["data"]["resultType"] == "vector",
        "{promql}: not a vector: {body}"
    );
    Ok(body["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let v = r["value"][1].as_str()?.parse::<f64>().ok()?;
            Some((r["metric"].clone(), v))
        })
        .collect())
}

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn every_dashboard_declares_its_datasource_and_variables() -> anyhow::Result<()> {
    for name in DASHBOARDS {
        let path = manifest_path(&format!("../../deploy/grafana/{name}.json"));
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}", path.display()))?;
        let variables: BTreeSet<&str> = dashboard["templating"]["list"]
            .as_array()
            .context("templating.list")?
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        ensure!(
            variables.contains("datasource"),
            "{name}: no datasource variable"
        );
        ensure!(
            dashboard["schemaVersion"].as_u64() >= Some(36),
            "{name}: schemaVersion {} is older than Grafana 10's",
            dashboard["schemaVersion"]
        );
        let mut values: BTreeMap<String, String> = variables
            .iter()
            .map(|v| (v.to_string(), "x".to_owned()))
            .collect();
        values.extend(BUILTINS.map(|(k, v)| (k.to_owned(), v.to_owned())));
        let all = targets(&dashboard);
        ensure!(all.len() >= 5, "{name}: only {} queries", all.len());
        for (title, expr) in all {
            substitute(&expr, &values).with_context(|| format!("{name}: panel {title:?}"))?;
        }
        let mut uids = BTreeSet::new();
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            ensure!(
                panel["datasource"]["uid"] == "${datasource}",
                "{name}: panel {} does not use ${{datasource}}",
                panel["title"]
            );
            ensure!(
                uids.insert(panel["id"].as_u64()),
                "{name}: duplicate panel id"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_edges_and_top_read_a_real_prometheus() -> anyhow::Result<()> {
    let Some(exe) = prometheus::binary() else {
        println!(
            "skipped: no prometheus binary (TRELLIS_PROMETHEUS or `prometheus` on PATH; scripts/test installs Debian's package)"
        );
        return Ok(());
    };
    let scratch = tempfile::tempdir()?;
    let log_dir = scratch.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let controller = Controller::start(scratch.path(), &log_dir).await?;
    let (canary, primary) = podinfo_pair(&controller, &log_dir).await?;
    controller.services(&[&primary], &[&canary])?;
    controller.split(SplitVersion::V1alpha3, 100)?;
    let caller = Caller::start(controller.grpc, &log_dir).await?;
    wait_canary_only(&caller).await?;
    // A round: through the split, 20 requests to the canary, 2 of them 500 and 1 after 60 ms
    // (10% failures, 5% slow); straight to the primary, 20 fast 200s. One round before
    // Prometheus starts creates every series, so each counter's first scrape is a baseline with
    // the same mix.
    let round = || async {
        let mut statuses = BTreeMap::new();
        for (path, n) in [
            ("/api", 8),
            ("/api?status=500", 1),
            ("/api", 9),
            ("/api?status=500", 1),
            ("/api?delay_ms=60", 1),
        ] {
            let r = caller.batch("podinfo", path, n).await?;
            ensure!(r.failed == 0, "{path}: {r:?}");
            for (code, count) in r.statuses {
                *statuses.entry(code).or_insert(0) += count;
            }
        }
        ensure!(
            statuses.get(&500) == Some(&2) && statuses.get(&200) == Some(&18),
            "a round through the split: {statuses:?}"
        );
        send_direct(&primary, "/api", 20).await?;
        anyhow::Ok(())
    };
    round().await?;
    let prometheus =
        Prometheus::start(&exe, &[canary.admin, primary.admin, caller.admin], &log_dir).await?;
    // Steady traffic throughout, as a dashboard sees it, while the checks run.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            round().await?;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        anyhow::Ok(())
    };
    let mut checked = 0;
    let checks = async {
        // About 10 s of traffic before the first query.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let result = check_all(&prometheus, &exe, scratch.path(), &mut checked).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    };
    let (load, seen) = tokio::join!(load, checks);
    let seen = seen?;
    load?;
    println!("{checked} dashboard queries checked\n{}", seen.join("\n"));
    Ok(())
}

/// Every dashboard query, then `trellis edges` and `trellis top`, against `prometheus` while the
/// traffic runs; what was seen, for the test's output.
async fn check_all(
    prometheus: &Prometheus,
    exe: &Path,
    scratch: &Path,
    checked: &mut usize,
) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();

    // The split's apex as the caller's proxy labels it (Grafana's `$destination` variable
    // query, `label_values(trellis_request_total{direction="outbound",...}, destination)`).
    let apexes = instant(
        prometheus.addr,
        &format!(
            r#"group by (destination,destination_kind,destination_workload,backend) (trellis_request_total{{direction="outbound",destination_namespace="{NAMESPACE}"}})"#
        ),
    )
    .await?;
    seen.push(format!("outbound series: {apexes:?}"));
    let destination = apexes
        .iter()
        .filter_map(|(labels, _)| labels["destination"].as_str())
        .find(|d| d.starts_with("podinfo"))
        .with_context(|| format!("no outbound destination podinfo: {apexes:?}"))?
        .to_owned();

    let mut rules = String::from("groups:\n- name: trellis-dashboards\n  rules:\n");
    for name in DASHBOARDS {
        let path = manifest_path(&format!("../../deploy/grafana/{name}.json"));
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        // Each target must answer for at least one of these variable sets.
        let sets: Vec<BTreeMap<String, String>> = ["podinfo", "loadtester", "podinfo-canary"]
            .into_iter()
            .map(|workload| {
                let mut v: BTreeMap<String, String> = [
                    ("namespace", NAMESPACE),
                    ("workload", workload),
                    ("destination", destination.as_str()),
                    ("canary", "podinfo"),
                ]
                .into_iter()
                .chain(BUILTINS)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
                v.insert("datasource".into(), "prometheus".into());
                v
            })
            .collect();
        for (title, expr) in targets(&dashboard) {
            let mut answered = None;
            // Every set once; when none answers, again until scrapes catch up (10 s).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            'retry: loop {
                for values in &sets {
                    let promql = substitute(&expr, values)?;
                    let result = instant(prometheus.addr, &promql)
                        .await
                        .with_context(|| format!("{name}: panel {title:?}"))?;
                    if result.iter().any(|(_, v)| v.is_finite()) {
                        answered = Some((values["workload"].clone(), promql, result));
                        break 'retry;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for values in &sets {
                rules.push_str(&format!(
                    "  - record: trellis:dashboard_query_{checked}\n    expr: {}\n",
                    serde_json::to_string(&substitute(&expr, values)?)?
                ));
                *checked += 1;
            }
            let Some((workload, promql, result)) = answered else {
                bail!(
                    "{name}: panel {title:?} returned no data for any workload:\n{expr}\n{}",
                    seen.join("\n")
                );
            };
            check_value(name, &title, &workload, &result)
                .with_context(|| format!("{name}: panel {title:?}:\n{promql}\n{result:?}"))?;
            seen.push(format!(
                "{name} / {title} ($workload={workload}): {result:?}"
            ));
        }
    }

    // promtool parses every substituted expression as a recording rule.
    let promtool = exe.with_file_name("promtool");
    if promtool.is_file() {
        let file = scratch.join("dashboard-rules.yml");
        std::fs::write(&file, &rules)?;
        let out = tokio::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push(format!(
            "promtool check rules: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    } else {
        seen.push(format!("promtool: not next to {}", exe.display()));
    }

    // `trellis edges`: the caller -> canary edge at 90%, no mTLS (no identities in this mesh).
    // The callers' side names the backend's workload when the controller knows one, else the
    // backend Service (as here, on the file platform): `podinfo-canary`, kind `service`.
    let trellis = process::binary(process::TRELLIS)?;
    let url = format!("http://{}", prometheus.addr);
    let out = tokio::process::Command::new(&trellis)
        .args(["edges", "--prometheus", &url, "-n", NAMESPACE, "-o", "json"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "trellis edges: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let edges: Value = serde_json::from_slice(&out.stdout)?;
    let edge = edges
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["source_workload"] == "loadtester" && e["destination_workload"] == "podinfo-canary"
        })
        .with_context(|| format!("trellis edges: no loadtester -> podinfo-canary: {edges}"))?;
    let rate = edge["success_rate"].as_f64().unwrap_or_default();
    ensure!(
        (89.0..=91.0).contains(&rate)
            && edge["requests_per_second"].as_f64() > Some(1.0)
            && edge["mtls"] == false
            && edge["destination_kind"] == "service"
            && edge["source_namespace"] == NAMESPACE
            && edge["destination_namespace"] == NAMESPACE,
        "trellis edges: {edge}"
    );
    ensure!(
        edges
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["destination_workload"] != "podinfo-primary"),
        "trellis edges: the primary got no traffic through the mesh: {edges}"
    );
    let out = tokio::process::Command::new(&trellis)
        .args(["edges", "--prometheus", &url])
        .output()
        .await?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && table.starts_with("SOURCE ")
            && table.contains("test/loadtester")
            && table.contains("test/podinfo-canary"),
        "trellis edges (table): {table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen.push(format!("trellis edges:\n{table}"));

    // `trellis top --once`: one frame, both workloads, the canary at 90% with its slow tail.
    let out = tokio::process::Command::new(&trellis)
        .args(["top", "--prometheus", &url, "--once", "-n", NAMESPACE])
        .output()
        .await?;
    let frame = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "trellis top: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !frame.contains('\x1b'),
        "trellis top --once piped: no screen control: {frame:?}"
    );
    let row = |workload: &str| -> anyhow::Result<Vec<String>> {
        frame
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cells| cells.get(1).map(String::as_str) == Some(workload))
            .with_context(|| format!("trellis top: no row {workload}:\n{frame}"))
    };
    let (canary_row, primary_row) = (row("podinfo")?, row("podinfo-primary")?);
    let percent =
        |cells: &[String]| -> f64 { cells[3].trim_end_matches('%').parse().unwrap_or(f64::NAN) };
    let p99: f64 = canary_row[4].trim_end_matches("ms").parse().unwrap_or(0.0);
    ensure!(
        frame.starts_with("NAMESPACE  WORKLOAD")
            && (89.0..=91.0).contains(&percent(&canary_row))
            && (60.0..100.0).contains(&p99)
            && percent(&primary_row) > 99.9,
        "trellis top:\n{frame}"
    );
    seen.push(format!("trellis top --once:\n{frame}"));
    // Without --once, frames keep coming until the process is stopped.
    let mut live = tokio::process::Command::new(&trellis)
        .args(["top", "--prometheus", &url, "--interval", "300ms"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = live.stdout.take().context("top's stdout")?;
    let mut output = Vec::new();
    // Read for 1.5 s, then stop it.
    let _ = tokio::time::timeout(
        Duration::from_millis(1500),
        tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut output),
    )
    .await;
    live.kill().await?;
    let frames = String::from_utf8_lossy(&output)
        .matches("trellis top: ")
        .count();
    ensure!(
        frames >= 2,
        "trellis top --interval 300ms: {frames} frames in 1.5 s"
    );
    seen.push(format!(
        "trellis top --interval 300ms: {frames} frames in 1.5 s"
    ));

    Ok(seen)
}

/// The values the known traffic implies, by panel.
fn check_value(
    dashboard: &str,
    title: &str,
    workload: &str,
    result: &[(Value, f64)],
) -> anyhow::Result<()> {
    let by = |label: &str, value: &str| {
        result
            .iter()
            .find(|(l, _)| l[label] == value)
            .map(|(_, v)| *v)
            .with_context(|| format!("no series with {label}={value}"))
    };
    let only = || -> anyhow::Result<f64> {
        ensure!(result.len() == 1, "expected one series");
        Ok(result[0].1)
    };
    let near = |v: f64, expected: f64, tolerance: f64| {
        ensure!(
            (v - expected).abs() <= tolerance,
            "{v} (expected {expected} +/- {tolerance})"
        );
        Ok(())
    };
    let slow = |v: f64| {
        // Flagger truncates to integer ms; the 60 ms requests sit in the (50, 100] bucket.
        ensure!(
            v.trunc() >= 60.0 && v < 100.0,
            "p99 {v} (expected 60..100 ms)"
        );
        Ok(())
    };
    match (dashboard, title) {
        ("mesh-overview", "Success rate by workload") => {
            near(by("destination_workload", "podinfo")?, 90.0, 1.0)?;
            near(by("destination_workload", "podinfo-primary")?, 100.0, 0.01)
        }
        ("mesh-overview", "p99 latency by workload") => {
            slow(by("destination_workload", "podinfo")?)
        }
        ("mesh-overview", "Success rate (mesh)") => near(only()?, 95.0, 1.0),
        ("mesh-overview", "Denied requests per second") => near(only()?, 0.0, 0.0),
        ("mesh-overview", "mTLS share of inbound connections") => near(only()?, 0.0, 0.0),
        ("workload", "Inbound success rate") if workload == "podinfo" => near(only()?, 90.0, 1.0),
        ("workload", "Inbound p99") if workload == "podinfo" => slow(only()?),
        ("canary", "Share of traffic per backend") => {
            near(by("backend", "podinfo-canary")?, 100.0, 0.01)
        }
        ("canary", "Success rate per backend") => near(by("backend", "podinfo-canary")?, 90.0, 1.0),
        ("canary", "p99 latency per backend") => slow(by("backend", "podinfo-canary")?),
        ("canary", "Flagger's request-success-rate (canary Deployment)") => {
            near(only()?, 90.0, 1.0)
        }
        ("canary", "Flagger's request-duration p99 (canary Deployment)") => slow(only()?),
        _ => Ok(()),
    }
}
