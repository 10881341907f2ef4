//! The Prometheus of deploy/flagger/prometheus.yaml: its configuration passes
//! `promtool check config`, and it selects the pods and port the injector marks (the label
//! `trellis.io/proxy: injected`, the container port `trellis-admin`), so a rename on either side
//! fails here rather than as an empty Flagger analysis.
//!
//! Debian's Prometheus is built without Kubernetes service discovery, so the checks replace
//! `kubernetes_sd_configs` with a file that lists what Kubernetes discovery would: targets with
//! their `__meta_kubernetes_*` labels. A real Prometheus then runs the shipped relabeling over a
//! real proxy (an injected pod's admin port), the app port of the same pod and a pod that is not
//! meshed: only the proxy is scraped, and Flagger's `linkerd` query finds its `namespace` label
//! (not renamed to `exported_namespace`).
//!
//! Skipped, with the reason, when Prometheus is not installed (`scripts/test` installs Debian's
//! package when it can).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use trellis_conformance::canary::{Controller, NAMESPACE, Pod, send_direct};
use trellis_conformance::harness::process::Process;
use trellis_echo::plain as http;

fn repo(relative: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The `prometheus.yml` of the ConfigMap in deploy/flagger/prometheus.yaml.
fn config() -> anyhow::Result<String> {
    let all = repo("deploy/flagger/prometheus.yaml")?;
    for doc in serde_yaml_ng::Deserializer::from_str(&all) {
        let doc: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if doc["kind"] == "ConfigMap" {
            return doc["data"]["prometheus.yml"]
                .as_str()
                .map(str::to_owned)
                .context("the ConfigMap has no prometheus.yml");
        }
    }
    anyhow::bail!("deploy/flagger/prometheus.yaml has no ConfigMap")
}

#[test]
fn the_scrape_config_keeps_what_the_injector_marks() -> anyhow::Result<()> {
    let config = config()?;
    let parsed: serde_json::Value = serde_yaml_ng::from_str(&config)?;
    let job = parsed["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"] == "trellis-proxies")
        .context("no job trellis-proxies")?;
    let keeps: Vec<(String, String)> = job["relabel_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "keep")
        .map(|r| (r["source_labels"][0].to_string(), r["regex"].to_string()))
        .collect();
    ensure!(
        keeps.contains(&(
            "\"__meta_kubernetes_pod_label_trellis_io_proxy\"".into(),
            "\"injected\"".into()
        )) && keeps.contains(&(
            "\"__meta_kubernetes_pod_container_port_name\"".into(),
            "\"trellis-admin\"".into()
        )),
        "trellis-proxies keeps {keeps:?}"
    );
    // What the injector writes (controller/kubernetes): the label and the port's name.
    let inject = repo("controller/kubernetes/src/inject.rs")?;
    let patch = repo("controller/kubernetes/src/inject/patch.rs")?;
    ensure!(
        inject.contains("trellis.io/proxy") && inject.contains("injected"),
        "the injector no longer labels pods trellis.io/proxy: injected"
    );
    ensure!(
        patch.contains("\"trellis-admin\""),
        "the injector no longer names the admin port trellis-admin"
    );
    // No target label may shadow a label of the compat series (linkerd's `namespace`).
    for r in job["relabel_configs"].as_array().into_iter().flatten() {
        let target = r["target_label"].as_str().unwrap_or_default();
        ensure!(
            !["namespace", "pod", "deployment", "direction"].contains(&target),
            "target label {target} would rename the proxies' own {target} to exported_{target}"
        );
    }
    Ok(())
}

#[test]
fn promtool_accepts_the_config() -> anyhow::Result<()> {
    let promtool = match trellis_conformance::prometheus::binary() {
        Some(exe) if exe.with_file_name("promtool").is_file() => exe.with_file_name("promtool"),
        _ => {
            println!("skipped: no promtool next to a prometheus binary");
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("prometheus.yml");
    std::fs::write(
        &file,
        with_file_discovery(&config()?, &dir.path().join("pods.json"))?,
    )?;
    let out = std::process::Command::new(&promtool)
        .args(["check", "config", "--syntax-only"])
        .arg(&file)
        .output()?;
    ensure!(
        out.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

/// `config` with each `kubernetes_sd_configs` replaced by a file discovery of `pods`.
fn with_file_discovery(config: &str, pods: &Path) -> anyhow::Result<String> {
    let mut parsed: serde_json::Value = serde_yaml_ng::from_str(config)?;
    for job in parsed["scrape_configs"]
        .as_array_mut()
        .context("scrape_configs")?
    {
        let job = job.as_object_mut().context("a scrape config")?;
        ensure!(
            job.remove("kubernetes_sd_configs").is_some(),
            "job {:?} does not discover pods",
            job.get("job_name")
        );
        job.insert(
            "file_sd_configs".into(),
            serde_json::json!([{ "files": [pods.display().to_string()], "refresh_interval": "1s" }]),
        );
    }
    parsed["global"]["scrape_interval"] = "1s".into();
    Ok(serde_yaml_ng::to_string(&parsed)?)
}

/// A pod's port as Kubernetes pod discovery lists it.
fn discovered(
    address: SocketAddr,
    pod: &str,
    injected: bool,
    port_name: &str,
) -> serde_json::Value {
    let mut labels = serde_json::json!({
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_port_name": port_name,
    });
    if injected {
        labels["__meta_kubernetes_pod_label_trellis_io_proxy"] = "injected".into();
    }
    serde_json::json!({ "targets": [address.to_string()], "labels": labels })
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let reply = http::request(addr, http::Method::GET, path, None).await?;
    serde_json::from_slice(&reply.body)
        .with_context(|| format!("{path}: {} {}", reply.status, reply.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_relabeling_scrapes_only_the_proxies() -> anyhow::Result<()> {
    let Some(exe) = trellis_conformance::prometheus::binary() else {
        println!("skipped: no prometheus binary");
        return Ok(());
    };
    let scratch = tempfile::tempdir()?;
    let log_dir = scratch.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let controller = Controller::start(scratch.path(), &log_dir).await?;
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let pod = Pod::start("podinfo", "6.0.1", loopback, controller.grpc, &log_dir).await?;
    send_direct(&pod, "/api", 10).await?;
    // A pod that is not meshed (its app's port, as if it served /metrics).
    let unmeshed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let pods = scratch.path().join("pods.json");
    std::fs::write(
        &pods,
        serde_json::json!([
            discovered(pod.admin, "podinfo-1", true, "trellis-admin"),
            discovered(pod.app, "podinfo-1", true, "http"),
            discovered(unmeshed, "other-1", false, "metrics"),
        ])
        .to_string(),
    )?;
    let config = scratch.path().join("prometheus.yml");
    std::fs::write(&config, with_file_discovery(&self::config()?, &pods)?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let process = Process::spawn(
        "prometheus",
        &exe,
        &[
            format!("--config.file={}", config.display()),
            format!(
                "--storage.tsdb.path={}",
                scratch.path().join("data").display()
            ),
            format!("--web.listen-address={addr}"),
        ],
        &[],
        &log_dir,
    )?;
    // Until the proxy's series are in: then the targets are settled.
    let query = format!(
        "/api/v1/query?query={}",
        form_urlencoded::byte_serialize(
            format!(r#"response_total{{namespace="{NAMESPACE}",deployment="podinfo",direction="inbound"}}"#).as_bytes()
        )
        .collect::<String>()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let series = loop {
        if let Ok(body) = get_json(addr, &query).await
            && body["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        {
            break body["data"]["result"].clone();
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "Flagger's linkerd selector found nothing within 30 s; prometheus: {}",
                process.tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let labels = &series[0]["metric"];
    ensure!(
        labels["job"] == "trellis-proxies"
            && labels["kubernetes_namespace"] == NAMESPACE
            && labels["kubernetes_pod"] == "podinfo-1"
            && labels.get("exported_namespace").is_none(),
        "{series}"
    );
    let targets = get_json(addr, "/api/v1/targets").await?;
    let active: Vec<String> = targets["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["scrapeUrl"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        active == vec![format!("http://{}/metrics", pod.admin)],
        "scraped: {active:?} (expected the proxy's admin port only)"
    );
    println!("scraped: {active:?}; linkerd series labels: {labels}");
    Ok(())
}
