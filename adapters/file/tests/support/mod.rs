//! The file adapter's [`TestRegistry`]: a YAML file in a temp dir, rewritten whole (write + rename,
//! as an editor or a config tool would) on every change. Outage = the file is moved away (unreadable)
//! and moved back. Shared by the suite test and the churn benchmark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use trellis_adapter_file::FileDiscovery;
use trellis_discovery::{Discovery, VersionSubsets};
use trellis_discovery_suite::{HarnessFeatures, TestInstance, TestRegistry};

pub const NAMESPACE: &str = "suite";

#[derive(Debug)]
pub struct FileRegistry {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    services: Mutex<BTreeMap<String, Vec<TestInstance>>>,
    large_set: usize,
    interval: Duration,
}

#[derive(Serialize)]
struct FileDoc<'a> {
    namespace: &'a str,
    services: Vec<ServiceDoc<'a>>,
}

#[derive(Serialize)]
struct ServiceDoc<'a> {
    name: &'a str,
    endpoints: Vec<EndpointDoc<'a>>,
}

#[derive(Serialize)]
struct EndpointDoc<'a> {
    address: String,
    port: u16,
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
}

impl FileRegistry {
    pub fn new(large_set: usize) -> Self {
        Self::with_poll_interval(large_set, trellis_adapter_file::DEFAULT_POLL_INTERVAL)
    }

    /// A registry whose adapters check the file every `interval`.
    pub fn with_poll_interval(large_set: usize, interval: Duration) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mesh.yaml");
        let registry = Self {
            _dir: dir,
            path,
            services: Mutex::new(BTreeMap::new()),
            large_set,
            interval,
        };
        registry.write().expect("initial file");
        registry
    }

    /// The file's text for the current services.
    pub fn render(&self) -> String {
        let services = self.services.lock().expect("lock");
        let doc = FileDoc {
            namespace: NAMESPACE,
            services: services
                .iter()
                .map(|(name, instances)| ServiceDoc {
                    name,
                    endpoints: instances
                        .iter()
                        .map(|i| EndpointDoc {
                            address: i.address.to_string(),
                            port: i.port,
                            ready: i.ready,
                            service_account: i.service_account.as_deref(),
                            labels: &i.labels,
                            weight: i.weight,
                            zone: i.zone.as_deref(),
                        })
                        .collect(),
                })
                .collect(),
        };
        serde_yaml_ng::to_string(&doc).expect("YAML")
    }

    fn write(&self) -> anyhow::Result<()> {
        write_atomically(&self.path, &self.render())
    }
}

/// Write + rename, so the adapter never reads a half-written file.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[async_trait::async_trait]
impl TestRegistry for FileRegistry {
    fn features(&self) -> HarnessFeatures {
        HarnessFeatures {
            outage: true,
            change_timeout: Duration::from_secs(3),
            large_set: self.large_set,
        }
    }

    fn namespace(&self) -> String {
        NAMESPACE.to_string()
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(VersionSubsets::new(FileDiscovery::with_poll_interval(
            &self.path,
            self.interval,
        )))
    }

    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()> {
        self.services
            .lock()
            .expect("lock")
            .insert(service.to_string(), instances.to_vec());
        self.write()
    }

    async fn delete_service(&self, service: &str) -> anyhow::Result<()> {
        self.services.lock().expect("lock").remove(service);
        self.write()
    }

    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()> {
        {
            let mut services = self.services.lock().expect("lock");
            let instance = services
                .get_mut(service)
                .and_then(|all| all.iter_mut().find(|i| i.id == instance_id))
                .with_context(|| format!("no instance {instance_id} in {service}"))?;
            instance.ready = ready;
        }
        self.write()
    }

    async fn begin_outage(&self) -> anyhow::Result<()> {
        std::fs::rename(&self.path, self.path.with_extension("away"))?;
        Ok(())
    }

    async fn end_outage(&self) -> anyhow::Result<()> {
        std::fs::rename(self.path.with_extension("away"), &self.path)?;
        Ok(())
    }
}
