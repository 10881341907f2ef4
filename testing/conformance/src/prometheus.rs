//! A real Prometheus (Debian's `prometheus` package) for tests: started on 127.0.0.1 with a
//! generated configuration that scrapes the given targets every second (a file-based service
//! discovery file, so targets can change while it runs, as pods come and go), queried through its
//! HTTP API as Flagger queries it, stopped when dropped. Targets may carry labels, as a
//! Kubernetes scrape configuration's relabeling adds them (`kubernetes_namespace`,
//! `kubernetes_pod`: deploy/flagger/prometheus.yaml).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::harness::process::Process;
use trellis_echo::plain as http;

/// Where the binary is: `TRELLIS_PROMETHEUS`, else `prometheus` on `PATH`; `None` when neither.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TRELLIS_PROMETHEUS") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("prometheus"))
        .find(|p| p.is_file())
}

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    _process: Process,
    pub addr: SocketAddr,
    targets: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `exe` scraping `targets` (job `trellis-proxies`, `/metrics`, every 1 s).
    pub async fn start(exe: &Path, targets: &[SocketAddr], log_dir: &Path) -> anyhow::Result<Self> {
        Self::start_labelled(exe, &unlabelled(targets), log_dir).await
    }

    /// Like [`Prometheus::start`], each target with its own target labels.
    pub async fn start_labelled(
        exe: &Path,
        targets: &[(SocketAddr, Labels)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let targets_file = dir.path().join("targets.json");
        write_targets(&targets_file, targets)?;
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: trellis-proxies\n    metrics_path: /metrics\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
                targets_file.display()
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let process = Process::spawn(
            "prometheus",
            exe,
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address={addr}"),
            ],
            &[],
            log_dir,
        )?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(reply) = http::request(addr, http::Method::GET, "/-/ready", None).await
                && reply.status == 200
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "prometheus did not become ready on {addr} within 30 s; its log: {}",
                    process.tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self {
            _process: process,
            addr,
            targets: targets_file,
            _dir: dir,
        })
    }

    /// Replaces what is scraped (picked up within about a second).
    pub fn set_targets(&self, targets: &[SocketAddr]) -> anyhow::Result<()> {
        write_targets(&self.targets, &unlabelled(targets))
    }

    /// Like [`Prometheus::set_targets`], each target with its own target labels.
    pub fn set_labelled_targets(&self, targets: &[(SocketAddr, Labels)]) -> anyhow::Result<()> {
        write_targets(&self.targets, targets)
    }

    /// Waits until `n` targets have been scraped successfully (`up == 1`), 30 s at most.
    pub async fn wait_up(&self, n: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.flagger_value("count(up == 1)").await? >= Some(n as f64) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "prometheus on {}: {n} targets not up within 30 s",
                    self.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The value Flagger would take from `query` (`GET /api/v1/query`, the last element of the
    /// vector), or `None` when the result is empty or NaN (Flagger's "no values found").
    /// Whitespace runs are collapsed to one space first, as Flagger does.
    pub async fn flagger_value(&self, query: &str) -> anyhow::Result<Option<f64>> {
        let collapsed = query.split_whitespace().collect::<Vec<_>>().join(" ");
        let encoded: String =
            form_urlencoded::byte_serialize(format!(" {collapsed}").as_bytes()).collect();
        let path = format!("/api/v1/query?query={encoded}");
        let reply = http::request(self.addr, http::Method::GET, &path, None).await?;
        let body: serde_json::Value = serde_json::from_slice(&reply.body)
            .with_context(|| format!("prometheus answered {}: {}", reply.status, reply.text()))?;
        if body["status"] != "success" {
            bail!("query {collapsed:?} failed: {body}");
        }
        if body["data"]["resultType"] != "vector" {
            bail!("query {collapsed:?}: not a vector: {body}");
        }
        let value = body["data"]["result"]
            .as_array()
            .and_then(|r| r.last())
            .and_then(|last| last["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| !v.is_nan());
        Ok(value)
    }
}

/// Target labels (name -> value).
pub type Labels = BTreeMap<String, String>;

fn unlabelled(targets: &[SocketAddr]) -> Vec<(SocketAddr, Labels)> {
    targets.iter().map(|t| (*t, Labels::new())).collect()
}

/// The file-based service discovery file for `targets` (a group per target, with its labels),
/// written whole (temp file + rename).
fn write_targets(path: &Path, targets: &[(SocketAddr, Labels)]) -> anyhow::Result<()> {
    let groups: Vec<serde_json::Value> = targets
        .iter()
        .map(|(t, labels)| serde_json::json!({ "targets": [t.to_string()], "labels": labels }))
        .collect();
    let body = serde_json::Value::Array(groups).to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
