//! Test support shared by the integration tests and the churn benchmark: a moto_server process and
//! a [`TestRegistry`] that drives it through the real AWS SDK.
#![allow(dead_code)] // each test binary uses a different part

pub mod moto;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use aws_sdk_servicediscovery::Client;
use aws_sdk_servicediscovery::types::{CustomHealthStatus, HealthCheckCustomConfig};
use trellis_adapter_cloudmap::{CloudMap, CloudMapOptions, StaticCredentials, explicit_client};
use trellis_discovery::Discovery;
use trellis_discovery_suite::{HarnessFeatures, TestInstance, TestRegistry};

pub use moto::MotoServer;

/// The Cloud Map namespace the tests use.
pub const NAMESPACE: &str = "trellis.test";

/// Fake credentials and region: moto accepts anything; nothing here reaches AWS.
pub fn test_options(endpoint_url: &str) -> CloudMapOptions {
    CloudMapOptions {
        namespaces: vec![NAMESPACE.to_string()],
        endpoint_url: Some(endpoint_url.to_string()),
        region: Some("us-east-1".to_string()),
        credentials: Some(StaticCredentials::new("test", "test")),
        poll_interval: Duration::from_millis(100),
        refresh_interval: Duration::from_secs(1),
        catalog_interval: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
    }
}

/// The Cloud Map attributes for a suite instance (what an ECS task or a registration script sets).
pub fn attributes(instance: &TestInstance) -> HashMap<String, String> {
    let mut attrs: HashMap<String, String> = instance.labels.clone().into_iter().collect();
    attrs.insert("AWS_INSTANCE_IPV4".into(), instance.address.to_string());
    attrs.insert("AWS_INSTANCE_PORT".into(), instance.port.to_string());
    if let Some(sa) = &instance.service_account {
        attrs.insert("SERVICE_ACCOUNT".into(), sa.clone());
    }
    if let Some(weight) = instance.weight {
        attrs.insert("weight".into(), weight.to_string());
    }
    if let Some(zone) = &instance.zone {
        attrs.insert("AVAILABILITY_ZONE".into(), zone.clone());
    }
    attrs
}

/// What the harness registered, so it can diff writes and re-create everything after a restart.
#[derive(Debug, Default)]
struct Mirror {
    namespace_id: String,
    /// Service name -> (Cloud Map service id, instances).
    services: BTreeMap<String, (String, Vec<TestInstance>)>,
}

/// The suite's registry: one moto_server process per harness, driven through the real SDK.
#[derive(Debug)]
pub struct MotoRegistry {
    moto: tokio::sync::Mutex<MotoServer>,
    url: String,
    client: Client,
    mirror: tokio::sync::Mutex<Mirror>,
    options: CloudMapOptions,
}

impl MotoRegistry {
    /// Starts moto and creates the test namespace.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`Self::start`] with the adapter options adjusted by `adjust` (the benchmark's intervals).
    pub async fn start_with(adjust: impl FnOnce(&mut CloudMapOptions)) -> Self {
        let moto = MotoServer::start().await;
        let url = moto.url();
        let mut options = test_options(&url);
        adjust(&mut options);
        let client = explicit_client(&options);
        let registry = Self {
            moto: tokio::sync::Mutex::new(moto),
            url,
            client,
            mirror: tokio::sync::Mutex::new(Mirror::default()),
            options,
        };
        let id = registry
            .create_namespace()
            .await
            .expect("creating the test namespace in moto");
        registry.mirror.lock().await.namespace_id = id;
        registry
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn options(&self) -> &CloudMapOptions {
        &self.options
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn create_namespace(&self) -> anyhow::Result<String> {
        self.client
            .create_http_namespace()
            .name(NAMESPACE)
            .send()
            .await
            .context("CreateHttpNamespace")?;
        let page = self
            .client
            .list_namespaces()
            .send()
            .await
            .context("ListNamespaces")?;
        page.namespaces()
            .iter()
            .find(|ns| ns.name() == Some(NAMESPACE))
            .and_then(|ns| ns.id().map(str::to_string))
            .ok_or_else(|| anyhow!("namespace {NAMESPACE} missing after CreateHttpNamespace"))
    }

    async fn create_service(&self, namespace_id: &str, name: &str) -> anyhow::Result<String> {
        let out = self
            .client
            .create_service()
            .name(name)
            .namespace_id(namespace_id)
            // Custom health checks: the only kind an instance's health can be set through the API.
            .health_check_custom_config(HealthCheckCustomConfig::builder().build())
            .send()
            .await
            .with_context(|| format!("CreateService {name}"))?;
        out.service()
            .and_then(|s| s.id())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("CreateService {name} returned no id"))
    }

    async fn register(&self, service_id: &str, instance: &TestInstance) -> anyhow::Result<()> {
        self.client
            .register_instance()
            .service_id(service_id)
            .instance_id(&instance.id)
            .set_attributes(Some(attributes(instance)))
            .send()
            .await
            .with_context(|| format!("RegisterInstance {}", instance.id))?;
        if !instance.ready {
            self.set_health(service_id, &instance.id, false).await?;
        }
        Ok(())
    }

    async fn deregister(&self, service_id: &str, instance_id: &str) -> anyhow::Result<()> {
        self.client
            .deregister_instance()
            .service_id(service_id)
            .instance_id(instance_id)
            .send()
            .await
            .with_context(|| format!("DeregisterInstance {instance_id}"))?;
        Ok(())
    }

    async fn set_health(
        &self,
        service_id: &str,
        instance_id: &str,
        ready: bool,
    ) -> anyhow::Result<()> {
        let status = if ready {
            CustomHealthStatus::Healthy
        } else {
            CustomHealthStatus::Unhealthy
        };
        self.client
            .update_instance_custom_health_status()
            .service_id(service_id)
            .instance_id(instance_id)
            .status(status)
            .send()
            .await
            .with_context(|| format!("UpdateInstanceCustomHealthStatus {instance_id}"))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl TestRegistry for MotoRegistry {
    fn features(&self) -> HarnessFeatures {
        HarnessFeatures {
            outage: true,
            // Poll 100 ms; health changes (no revision change) within the 1 s refresh.
            change_timeout: Duration::from_secs(5),
            // DiscoverInstances returns at most 1,000 instances (Cloud Map's per-service quota).
            large_set: 1000,
        }
    }

    fn namespace(&self) -> String {
        NAMESPACE.to_string()
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        Arc::new(
            CloudMap::with_client(self.client.clone(), self.options.clone())
                .expect("valid test options"),
        )
    }

    async fn put_service(&self, service: &str, instances: &[TestInstance]) -> anyhow::Result<()> {
        let mut mirror = self.mirror.lock().await;
        let (service_id, old) = match mirror.services.get(service) {
            Some((id, old)) => (id.clone(), old.clone()),
            None => (
                self.create_service(&mirror.namespace_id, service).await?,
                Vec::new(),
            ),
        };
        for gone in old
            .iter()
            .filter(|o| !instances.iter().any(|i| i.id == o.id))
        {
            self.deregister(&service_id, &gone.id).await?;
        }
        for instance in instances {
            match old.iter().find(|o| o.id == instance.id) {
                Some(same) if same == instance => {}
                // Only health differs: no re-registration.
                Some(same)
                    if TestInstance {
                        ready: instance.ready,
                        ..same.clone()
                    } == *instance =>
                {
                    self.set_health(&service_id, &instance.id, instance.ready)
                        .await?
                }
                // moto appends a second copy on re-registration; real Cloud Map replaces. Deregister
                // first so both behave the same.
                Some(_) => {
                    self.deregister(&service_id, &instance.id).await?;
                    self.register(&service_id, instance).await?;
                }
                None => self.register(&service_id, instance).await?,
            }
        }
        mirror
            .services
            .insert(service.to_string(), (service_id, instances.to_vec()));
        Ok(())
    }

    async fn delete_service(&self, service: &str) -> anyhow::Result<()> {
        let mut mirror = self.mirror.lock().await;
        let Some((service_id, instances)) = mirror.services.remove(service) else {
            return Ok(());
        };
        // Cloud Map refuses to delete a service that still has instances.
        for instance in &instances {
            self.deregister(&service_id, &instance.id).await?;
        }
        self.client
            .delete_service()
            .id(&service_id)
            .send()
            .await
            .with_context(|| format!("DeleteService {service}"))?;
        Ok(())
    }

    async fn set_ready(&self, service: &str, instance_id: &str, ready: bool) -> anyhow::Result<()> {
        let mut mirror = self.mirror.lock().await;
        let (service_id, instances) = mirror
            .services
            .get_mut(service)
            .ok_or_else(|| anyhow!("set_ready: service {service} was never put"))?;
        let service_id = service_id.clone();
        self.set_health(&service_id, instance_id, ready).await?;
        if let Some(i) = instances.iter_mut().find(|i| i.id == instance_id) {
            i.ready = ready;
        }
        Ok(())
    }

    async fn begin_outage(&self) -> anyhow::Result<()> {
        self.moto.lock().await.stop();
        Ok(())
    }

    /// moto keeps its state in memory: a restart comes back empty, so the harness re-creates the
    /// namespace, services, instances and health (with new ids, as a re-created resource would).
    async fn end_outage(&self) -> anyhow::Result<()> {
        self.moto
            .lock()
            .await
            .restart()
            .await
            .map_err(|e| anyhow!(e))?;
        let mut mirror = self.mirror.lock().await;
        mirror.namespace_id = self.create_namespace().await?;
        let services = std::mem::take(&mut mirror.services);
        for (name, (_, instances)) in services {
            let id = self.create_service(&mirror.namespace_id, &name).await?;
            for instance in &instances {
                self.register(&id, instance).await?;
            }
            mirror.services.insert(name, (id, instances));
        }
        Ok(())
    }
}
