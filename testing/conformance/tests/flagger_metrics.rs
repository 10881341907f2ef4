//! Flagger's built-in metric queries, exactly as Flagger sends them (../shared/flagger/CONTRACT.md
//! section 3.2: providers `osm`, `linkerd`, and the Istio-shaped queries the `smi:*` providers
//! get), run through a real Prometheus scraping real proxies, must give the right answers.
//!
//! A canary (`Deployment/podinfo`) and its primary (`Deployment/podinfo-primary`) share the
//! ServiceAccount `podinfo`, each app behind its own inbound `trellis-proxy`
//! (`--workload test/podinfo --workload-name <deployment> --metrics-compat osm,linkerd,istio`).
//! The canary gets 10% 500s and 5% requests delayed by 60 ms, steadily for about 10 s; the
//! primary only fast 200s. The
//! queries for target `podinfo` must read the canary alone: success rate 90 +/- 1, p99 at least
//! the injected delay.
//!
//! Skipped, with the reason, when Prometheus is not installed (`scripts/test` installs Debian's
//! package when it can).

use std::time::Duration;

use anyhow::{Context as _, bail};
use trellis_conformance::canary::{Controller, NAMESPACE, podinfo_pair, send_direct as send};
use trellis_conformance::prometheus::{self, Prometheus};

fn queries(target: &str) -> [(&'static str, String, String); 3] {
    let ns = NAMESPACE;
    [
        (
            "osm",
            format!(
                r#"sum( rate( osm_request_total{{ destination_namespace="{ns}", destination_kind="Deployment", destination_name="{target}", response_code!~"5.*" }}[1m] ) ) / sum( rate( osm_request_total{{ destination_namespace="{ns}", destination_kind="Deployment", destination_name="{target}" }}[1m] ) ) * 100"#
            ),
            format!(
                r#"histogram_quantile( 0.99, sum( rate( osm_request_duration_ms_bucket{{ destination_namespace="{ns}", destination_kind="Deployment", destination_name="{target}" }}[30s] ) ) by (le) )"#
            ),
        ),
        (
            "linkerd",
            format!(
                r#"sum( rate( response_total{{ namespace="{ns}", deployment=~"{target}", classification!="failure", direction="inbound" }}[1m] ) ) / sum( rate( response_total{{ namespace="{ns}", deployment=~"{target}", direction="inbound" }}[1m] ) ) * 100"#
            ),
            format!(
                r#"histogram_quantile( 0.99, sum( rate( response_latency_ms_bucket{{ namespace="{ns}", deployment=~"{target}", direction="inbound" }}[30s] ) ) by (le) )"#
            ),
        ),
        (
            "istio (smi:*)",
            format!(
                r#"sum( rate( istio_requests_total{{ reporter="destination", destination_workload_namespace="{ns}", destination_workload=~"{target}", response_code!~"5.*" }}[1m] ) ) / sum( rate( istio_requests_total{{ reporter="destination", destination_workload_namespace="{ns}", destination_workload=~"{target}" }}[1m] ) ) * 100"#
            ),
            format!(
                r#"histogram_quantile( 0.99, sum( rate( istio_request_duration_milliseconds_bucket{{ reporter="destination", destination_workload_namespace="{ns}", destination_workload=~"{target}" }}[30s] ) ) by (le) )"#
            ),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaggers_builtin_queries_read_the_canary_through_a_real_prometheus() -> anyhow::Result<()>
{
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
    // Steady traffic, as a canary analysis sees it. A round: the canary answers 20 requests, 2
    // of them 500 and 1 after 60 ms (10% failures, 5% slow); the primary 20 fast 200s. One round
    // before Prometheus starts creates every series, so each counter's first scrape is a baseline
    // with the same mix (`rate` ignores what a series held at its first sample).
    let round = || async {
        send(&canary, "/api", 8).await?;
        send(&canary, "/api?status=500", 1).await?;
        send(&canary, "/api", 9).await?;
        send(&canary, "/api?status=500", 1).await?;
        send(&canary, "/api?delay_ms=60", 1).await?;
        send(&primary, "/api", 20).await?;
        anyhow::Ok(())
    };
    round().await?;
    let prometheus = Prometheus::start(&exe, &[canary.admin, primary.admin], &log_dir).await?;
    for _ in 0..20 {
        round().await?;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut seen = Vec::new();
    for (provider, success, latency) in queries("podinfo") {
        // Scrapes land every second; wait until Prometheus has two samples of the last round.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let (rate, p99) = loop {
            let rate = prometheus.flagger_value(&success).await?;
            let p99 = prometheus.flagger_value(&latency).await?;
            if let (Some(rate), Some(p99)) = (rate, p99) {
                break (rate, p99);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{provider}: no values within 20 s (rate {rate:?}, p99 {p99:?}):\n{success}\n{latency}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        seen.push(format!(
            "{provider}: success rate {rate:.2}%, p99 {p99:.1} ms"
        ));
        assert!(
            (89.0..=91.0).contains(&rate),
            "{provider}: success rate {rate} (expected 90 +/- 1: the canary alone)\n{success}"
        );
        // Flagger truncates to integer ms and compares with `max`.
        assert!(
            p99.trunc() >= 60.0 && p99 < 100.0,
            "{provider}: p99 {p99} ms (expected at least the injected 60 ms, within its bucket)\n{latency}"
        );
    }
    // The MetricTemplates shipped for Trellis's own series (deploy/flagger), rendered as Flagger
    // renders them for this Canary, give the same answers.
    let templates = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/flagger/metric-templates.yaml"),
    )?;
    let mut rendered = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&templates) {
        let doc: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        let name = doc["metadata"]["name"]
            .as_str()
            .context("template name")?
            .to_owned();
        let interval = if name.contains("latency") {
            "30s"
        } else {
            "1m"
        };
        let query = doc["spec"]["query"]
            .as_str()
            .context("template query")?
            .replace("{{ namespace }}", NAMESPACE)
            .replace("{{ target }}", "podinfo")
            .replace("{{ interval }}", interval);
        assert!(
            !query.contains("{{"),
            "{name}: unrendered template: {query}"
        );
        rendered.push(query.clone());
        let value = prometheus
            .flagger_value(&query)
            .await?
            .with_context(|| format!("MetricTemplate {name}: no value"))?;
        seen.push(format!("MetricTemplate {name}: {value:.2}"));
        if name.contains("latency") {
            assert!(
                value.trunc() >= 60.0 && value < 100.0,
                "{name}: {value}\n{query}"
            );
        } else {
            assert!((89.0..=91.0).contains(&value), "{name}: {value}\n{query}");
        }
    }
    // promtool parses every query Flagger would send, written as recording rules (the form a
    // rule file or a dashboard check takes).
    let promtool = exe.with_file_name("promtool");
    if promtool.is_file() {
        let mut rules = String::from("groups:\n- name: trellis-flagger\n  rules:\n");
        let builtin = queries("podinfo")
            .into_iter()
            .flat_map(|(_, success, latency)| [success, latency]);
        for (i, expr) in builtin.chain(rendered).enumerate() {
            rules.push_str(&format!(
                "  - record: trellis:flagger_query_{i}\n    expr: {}\n",
                serde_json::to_string(&expr)?
            ));
        }
        let file = scratch.path().join("rules.yml");
        std::fs::write(&file, rules)?;
        let out = std::process::Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()?;
        assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push(format!(
            "promtool check rules: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    // `trellis stat` reads the same series: the canary at 90% with its slow tail, the primary
    // clean.
    let out = std::process::Command::new(trellis_conformance::harness::process::binary(
        trellis_conformance::harness::process::TRELLIS,
    )?)
    .args([
        "stat",
        "--prometheus",
        &format!("http://{}", prometheus.addr),
    ])
    .args(["--namespace", NAMESPACE, "--output", "json"])
    .output()?;
    assert!(
        out.status.success(),
        "trellis stat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let row = |name: &str| {
        rows.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
            .cloned()
            .with_context(|| format!("trellis stat has no row {name}: {rows}"))
    };
    let (canary_row, primary_row) = (row("podinfo")?, row("podinfo-primary")?);
    let rate = canary_row["success_rate"].as_f64().unwrap_or_default();
    let p99 = canary_row["p99_ms"].as_f64().unwrap_or_default();
    assert!((89.0..=91.0).contains(&rate), "trellis stat: {canary_row}");
    assert!((60.0..100.0).contains(&p99), "trellis stat: {canary_row}");
    assert!(
        primary_row["success_rate"].as_f64().unwrap_or_default() > 99.9,
        "trellis stat: {primary_row}"
    );
    seen.push(format!(
        "trellis stat: podinfo {rate:.2}% p99 {p99:.1} ms; podinfo-primary {:.2}%",
        primary_row["success_rate"].as_f64().unwrap_or_default()
    ));
    // The primary is its own series: its queries see no failures.
    for (provider, success, _) in queries("podinfo-primary") {
        let rate = prometheus
            .flagger_value(&success)
            .await?
            .with_context(|| format!("{provider}: no value for podinfo-primary"))?;
        assert!(
            rate > 99.9,
            "{provider}: podinfo-primary success rate {rate}, expected 100 (no 500s sent to it)"
        );
    }
    println!("{}", seen.join("\n"));
    Ok(())
}
