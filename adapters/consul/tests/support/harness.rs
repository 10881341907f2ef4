//! The behavioural suite's harness for Consul: drives a registry only through Consul's HTTP API
//! (`/v1/catalog/register`, `/v1/catalog/deregister`, `/v1/health/service`), so the same code runs
//! against the in-repo double and against a real agent (`TRELLIS_TEST_CONSUL_ADDR`).
//!
//! Each suite instance is its own catalog node `trellis-<service>-<id>` (address = the instance
//! address), with one service check `trellis-ready` (passing/critical) for readiness. Labels are
//! registered as `k=v` tags; the service account and zone as meta (`service-account`, `zone`).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use trellis_adapter_consul::{AclToken, ConsulConfig, ConsulDiscovery};
use trellis_consul_double::ConsulDouble;
use trellis_discovery::Discovery;
use trellis_discovery_suite::{HarnessFeatures, TestInstance, TestRegistry};

/// The Consul the harness drives.
pub enum Target {
    Double(ConsulDouble),
    /// A real agent: no outage control.
    Agent,
}

pub struct ConsulHarness {
    pub target: Target,
    pub address: String,
    /// Overrides the adapter's rate limit (benchmarks measure delivery, not the limiter).
    pub rate_limit: Option<trellis_adapter_consul::RateLimit>,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    large_set: usize,
}

/// A harness over a fresh in-process double.
pub async fn double_harness() -> ConsulHarness {
    let double = ConsulDouble::start()
        .await
        .expect("start the Consul double");
    let address = double.http_addr();
    ConsulHarness::new(Target::Double(double), address, None, 1000)
}

/// A harness over the agent named by `TRELLIS_TEST_CONSUL_ADDR` (token in
/// `TRELLIS_TEST_CONSUL_TOKEN`), or `None` when it is unset. A real agent keeps its catalog between
/// runs, so the nodes an earlier run left behind (`trellis-*`) are removed first.
pub async fn agent_harness() -> Option<ConsulHarness> {
    let address = std::env::var("TRELLIS_TEST_CONSUL_ADDR").ok()?;
    let token = std::env::var("TRELLIS_TEST_CONSUL_TOKEN").ok();
    let harness = ConsulHarness::new(Target::Agent, address, token, 200);
    harness
        .remove_leftovers()
        .await
        .expect("remove the suite's nodes left by an earlier run");
    Some(harness)
}

impl ConsulHarness {
    fn new(target: Target, address: String, token: Option<String>, large_set: usize) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        let address = if address.contains("://") {
            address
        } else {
            format!("http://{address}")
        };
        Self {
            target,
            address,
            rate_limit: None,
            token,
            http,
            large_set,
        }
    }

    pub fn double(&self) -> Option<&ConsulDouble> {
        match &self.target {
            Target::Double(d) => Some(d),
            Target::Agent => None,
        }
    }

    /// The adapter configuration pointing at this registry.
    pub fn config(&self) -> ConsulConfig {
        let mut config = ConsulConfig::new(self.address.clone());
        config.token = self.token.clone().map(AclToken::new);
        if let Some(limit) = self.rate_limit {
            config.rate_limit = limit;
        }
        config
    }

    fn node(service: &str, id: &str) -> String {
        format!("trellis-{service}-{id}")
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.address);
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", t);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let resp = self
            .http
            .request(req.body(Full::new(body))?)
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{method} {url}: HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{method} {url}: JSON"))
    }

    fn registration(service: &str, i: &TestInstance) -> Value {
        let mut meta = serde_json::Map::new();
        if let Some(sa) = &i.service_account {
            meta.insert("service-account".into(), json!(sa));
        }
        if let Some(zone) = &i.zone {
            meta.insert("zone".into(), json!(zone));
        }
        let tags: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        json!({
            "Node": Self::node(service, &i.id),
            "Address": i.address.to_string(),
            "Service": {
                "ID": i.id, "Service": service, "Address": i.address.to_string(), "Port": i.port,
                "Tags": tags, "Meta": meta,
                "Weights": {"Passing": i.weight.unwrap_or(1), "Warning": 1}
            },
            "Checks": [Self::check(&i.id, i.ready)]
        })
    }

    fn check(id: &str, ready: bool) -> Value {
        json!({"CheckID": "trellis-ready", "Name": "ready", "ServiceID": id,
               "Status": if ready { "passing" } else { "critical" }})
    }

    /// (node, service ID) of every instance of `service` now registered.
    async fn registered(&self, service: &str) -> anyhow::Result<Vec<(String, String)>> {
        let entries = self
            .call("GET", &format!("/v1/health/service/{service}"), None)
            .await?;
        Ok(entries
            .as_array()
            .context("health response is not an array")?
            .iter()
            .map(|e| {
                let node = e["Node"]["Node"].as_str().unwrap_or_default().to_owned();
                let id = e["Service"]["ID"].as_str().unwrap_or_default().to_owned();
                (node, id)
            })
            .collect())
    }

    /// Deregisters every `trellis-*` node (what this harness registers) of every service.
    async fn remove_leftovers(&self) -> anyhow::Result<()> {
        let services = self.call("GET", "/v1/catalog/services", None).await?;
        let names: Vec<String> = services
            .as_object()
            .context("catalog response is not an object")?
            .keys()
            .cloned()
            .collect();
        for service in names {
            for (node, _) in self.registered(&service).await? {
                if node.starts_with("trellis-") {
                    self.deregister_node(&node).await?;
                }
            }
        }
        Ok(())
    }

    async fn deregister_node(&self, node: &str) -> anyhow::Result<()> {
        self.call(
            "PUT",
            "/v1/catalog/deregister",
            Some(json!({ "Node": node })),
        )
        .await
        .map(drop)
    }
}

#[async_trait::async_trait]
impl TestRegistry for ConsulHarness {
    fn features(&self) -> HarnessFeatures {
        HarnessFeatures {
            outage: matches!(self.target, Target::Double(_)),
            change_timeout: Duration::from_secs(5),
            large_set: self.large_set,
        }
    }

    fn namespace(&self) -> String {
        "default".to_owned()
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(ConsulDiscovery::with_version_subsets(self.config()).expect("valid config"))
    }

    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()> {
        let before = self.registered(service).await?;
        let bodies: Vec<Value> = instances
            .iter()
            .map(|i| Self::registration(service, i))
            .collect();
        for chunk in bodies.chunks(16) {
            let writes = chunk
                .iter()
                .map(|b| self.call("PUT", "/v1/catalog/register", Some(b.clone())));
            futures::future::try_join_all(writes).await?;
        }
        for (node, id) in before {
            if !instances.iter().any(|i| i.id == id) {
                self.deregister_node(&node).await?;
            }
        }
        Ok(())
    }

    async fn delete_service(&self, service: &str) -> anyhow::Result<()> {
        for (node, _) in self.registered(service).await? {
            self.deregister_node(&node).await?;
        }
        Ok(())
    }

    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()> {
        let address = self
            .call("GET", &format!("/v1/health/service/{service}"), None)
            .await?
            .as_array()
            .and_then(|a| a.iter().find(|e| e["Service"]["ID"] == instance_id))
            .map(|e| e["Node"]["Address"].clone())
            .with_context(|| format!("no instance {instance_id} of {service}"))?;
        let body = json!({
            "Node": Self::node(service, instance_id), "Address": address, "SkipNodeUpdate": true,
            "Checks": [Self::check(instance_id, ready)]
        });
        self.call("PUT", "/v1/catalog/register", Some(body))
            .await
            .map(drop)
    }

    async fn begin_outage(&self) -> anyhow::Result<()> {
        match &self.target {
            Target::Double(d) => {
                d.stop();
                Ok(())
            }
            Target::Agent => bail!("a real agent cannot be taken away by the harness"),
        }
    }

    async fn end_outage(&self) -> anyhow::Result<()> {
        match &self.target {
            Target::Double(d) => Ok(d.restart().await?),
            Target::Agent => bail!("a real agent cannot be taken away by the harness"),
        }
    }
}
