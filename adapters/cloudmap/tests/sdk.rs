//! The SDK wiring against moto_server: the `data-` host prefix and its interceptor, the
//! standard-chain constructor, and bad options.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_servicediscovery::config::retry::RetryConfig;
use aws_sdk_servicediscovery::config::timeout::TimeoutConfig;
use aws_sdk_servicediscovery::config::{Credentials, Region};
use futures::StreamExt;
use trellis_adapter_cloudmap::{CloudMap, CloudMapOptions, explicit_client, https_client};
use trellis_discovery::{Discovery, ErrorKind, ServiceKey, Snapshot};
use trellis_discovery_suite::{TestInstance, TestRegistry};

use common::{MotoRegistry, NAMESPACE, test_options};

/// Records the URI of every request attempt.
#[derive(Debug)]
struct RecordUri(Arc<Mutex<Vec<String>>>);

impl aws_sdk_servicediscovery::config::Intercept for RecordUri {
    fn name(&self) -> &'static str {
        "RecordUri"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_servicediscovery::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_servicediscovery::config::RuntimeComponents,
        _cfg: &mut aws_sdk_servicediscovery::config::ConfigBag,
    ) -> Result<(), aws_sdk_servicediscovery::error::BoxError> {
        self.0
            .lock()
            .unwrap()
            .push(context.request().uri().to_string());
        Ok(())
    }
}

const INTERCEPTOR: &str = "TrellisCloudMapLocalEndpoint";

fn interceptor_names(client: &aws_sdk_servicediscovery::Client) -> Vec<String> {
    use aws_sdk_servicediscovery::config::Intercept;
    client
        .config()
        .interceptors()
        .map(|i| i.name().to_string())
        .collect()
}

#[test]
fn the_prefix_interceptor_is_installed_only_with_an_endpoint_override() {
    let local = explicit_client(&test_options("http://127.0.0.1:9"));
    assert!(interceptor_names(&local).iter().any(|n| n == INTERCEPTOR));

    let aws = explicit_client(&CloudMapOptions {
        endpoint_url: None,
        ..test_options("unused")
    });
    assert!(
        !interceptor_names(&aws).iter().any(|n| n == INTERCEPTOR),
        "against AWS the data- prefix is required: {:?}",
        interceptor_names(&aws)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_instances_needs_the_interceptor_against_a_local_endpoint() {
    let registry = MotoRegistry::start().await;
    registry
        .put_service(
            "prefix-web",
            &[TestInstance::new("p-1", [10, 9, 0, 1].into(), 80)],
        )
        .await
        .unwrap();

    // The same client without the interceptor: the SDK sends DiscoverInstances to data-127.0.0.1.
    let uris = Arc::new(Mutex::new(Vec::new()));
    let bare = aws_sdk_servicediscovery::Client::from_conf(
        aws_sdk_servicediscovery::config::Builder::new()
            .behavior_version_latest()
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(registry.url())
            .http_client(https_client())
            .interceptor(RecordUri(uris.clone()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(Duration::from_secs(5))
                    .build(),
            )
            .build(),
    );
    let without = bare
        .discover_instances()
        .namespace_name(NAMESPACE)
        .service_name("prefix-web")
        .send()
        .await;
    let err = without.expect_err("without the interceptor the call must miss the local endpoint");
    assert!(
        matches!(
            err,
            aws_sdk_servicediscovery::error::SdkError::DispatchFailure(_)
        ),
        "want a dispatch (DNS) failure, got {err:?}"
    );
    let sent = uris.lock().unwrap().clone();
    assert!(
        sent.iter().any(|u| u.contains("//data-127.0.0.1:")),
        "the SDK should have prefixed the host with data-: {sent:?}"
    );

    let with = registry
        .client()
        .discover_instances()
        .namespace_name(NAMESPACE)
        .service_name("prefix-web")
        .send()
        .await
        .expect("DiscoverInstances through the interceptor");
    assert_eq!(with.instances().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_builds_from_the_standard_chain_with_options_on_top() {
    let registry = MotoRegistry::start().await;
    let instance = TestInstance::new("c-1", [10, 9, 0, 2].into(), 8080);
    registry
        .put_service("connect-web", std::slice::from_ref(&instance))
        .await
        .unwrap();

    let discovery = CloudMap::connect(registry.options().clone())
        .await
        .expect("connect");
    assert_eq!(
        discovery.source_id().as_ref(),
        format!("cloudmap:{}", registry.url())
    );
    let mut watch = discovery.watch(ServiceKey::new(NAMESPACE, "connect-web"));
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a first item")
        .expect("streams never end")
        .expect("a snapshot, not an error");
    let Snapshot::Endpoints(set) = first else {
        panic!("want Endpoints, got {first:?}")
    };
    assert_eq!(set.endpoints.len(), 1);
    assert_eq!(
        set.endpoints[0].address,
        std::net::IpAddr::V4(instance.address)
    );

    let mut catalog = discovery.services();
    let listed = tokio::time::timeout(Duration::from_secs(10), catalog.next())
        .await
        .expect("a catalog")
        .expect("streams never end")
        .expect("a catalog, not an error");
    assert_eq!(
        listed.services,
        vec![ServiceKey::new(NAMESPACE, "connect-web")]
    );
}

#[test]
fn a_zero_interval_is_a_configuration_error_naming_the_field() {
    let options = CloudMapOptions {
        poll_interval: Duration::ZERO,
        ..test_options("http://127.0.0.1:9")
    };
    let err = CloudMap::with_client(explicit_client(&options), options).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(err.message.contains("poll_interval"), "{err}");
}

#[test]
fn static_credentials_hide_the_secret_from_debug() {
    let options = test_options("http://127.0.0.1:9");
    let shown = format!("{options:?}");
    assert!(shown.contains("redacted"), "{shown}");
    let secret = trellis_adapter_cloudmap::StaticCredentials::new("AKIDEXAMPLE", "s3cr3t-value");
    assert!(!format!("{secret:?}").contains("s3cr3t-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_beyond_one_discover_instances_answer_is_read_in_full() {
    // DiscoverInstances returns at most 1,000 instances; the adapter then pages the control plane.
    let registry = MotoRegistry::start().await;
    let mut instances: Vec<TestInstance> = (0..1050u32)
        .map(|i| TestInstance::new(format!("big-{i}"), (0x0A30_0000 + i).into(), 8080))
        .collect();
    instances[1049].ready = false;
    registry.put_service("big-web", &instances).await.unwrap();

    let discovery = registry.discovery();
    let mut watch = discovery.watch(ServiceKey::new(NAMESPACE, "big-web"));
    let first = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("a first item")
        .expect("streams never end")
        .expect("a snapshot, not an error");
    let Snapshot::Endpoints(set) = first else {
        panic!("want Endpoints, got {first:?}")
    };
    assert_eq!(set.endpoints.len(), 1050);
    let not_ready: Vec<_> = set
        .endpoints
        .iter()
        .filter(|e| e.readiness != trellis_discovery::Readiness::Ready)
        .map(|e| e.address)
        .collect();
    assert_eq!(
        not_ready,
        vec![std::net::IpAddr::V4(instances[1049].address)],
        "health comes from GetInstancesHealthStatus"
    );
}

#[test]
fn moto_is_killed_when_its_owner_panics() {
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let moto = common::MotoServer::start().await;
            pid_tx.send(moto.pid().expect("running")).unwrap();
            panic!("a failing test");
        })
    })
    .join();
    assert!(panicked.is_err(), "the thread panicked");
    let pid = pid_rx.recv().expect("moto started");
    // Drop killed and reaped it: no process (not even a zombie) is left.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "moto_server {pid} outlived the panic"
    );
}
