//! The adapter's options and how the AWS SDK client is built from them: the rustls + ring HTTP
//! client (the workspace's one TLS crypto provider), timeouts, and the endpoint override with its
//! interceptor.

use std::fmt;
use std::time::Duration;

use aws_sdk_servicediscovery::config::retry::RetryConfig;
use aws_sdk_servicediscovery::config::timeout::TimeoutConfig;
use aws_sdk_servicediscovery::config::{Credentials, Region, SharedHttpClient};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::interceptor::LocalEndpointInterceptor;

/// Default interval of the cheap change check (`DiscoverInstancesRevision`) per watched service.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default interval of the full `DiscoverInstances` re-fetch even when the revision is unchanged.
/// Health changes do not change a Cloud Map revision, so this bounds how late they show.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Default interval of the catalog poll (`ListNamespaces` + `ListServices`).
pub const DEFAULT_CATALOG_INTERVAL: Duration = Duration::from_secs(10);
/// Default limit on one SDK call (connect, send, read), so a hanging endpoint becomes an error item.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Static AWS credentials (tests, LocalStack). The secret never shows in `Debug`.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "** redacted **"),
            )
            .finish()
    }
}

impl StaticCredentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }

    pub(crate) fn to_sdk(&self) -> Credentials {
        Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.clone(),
            self.session_token.clone(),
            None,
            "trellis-cloudmap-static",
        )
    }
}

/// How the adapter reaches Cloud Map and how often it looks.
#[derive(Clone, Debug)]
pub struct CloudMapOptions {
    /// Namespace names the catalog lists services of; empty = every namespace of the account and
    /// region. Watches work for any namespace whatever this says.
    pub namespaces: Vec<String>,
    /// Endpoint override (moto, LocalStack, a VPC endpoint). When set, the `data-` host prefix of
    /// DiscoverInstances is removed (see [`crate::LocalEndpointInterceptor`]).
    pub endpoint_url: Option<String>,
    /// Region; `None` = the standard chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Credentials; `None` = the standard chain (env, profile, web identity, ECS, IMDS).
    pub credentials: Option<StaticCredentials>,
    /// Cheap change check per watched service (`DiscoverInstancesRevision`).
    pub poll_interval: Duration,
    /// Full re-fetch even when the revision is unchanged (health changes; safety net).
    pub refresh_interval: Duration,
    /// Catalog poll interval.
    pub catalog_interval: Duration,
    /// Timeout of one SDK call.
    pub request_timeout: Duration,
}

impl Default for CloudMapOptions {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            endpoint_url: None,
            region: None,
            credentials: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            catalog_interval: DEFAULT_CATALOG_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The SDK's HTTP client on rustls with the ring provider (plain HTTP works too, for local
/// endpoints). Trust roots are the platform's native certificates.
pub fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Applies the options that shape every call to a service config builder: our HTTP client,
/// timeouts, no SDK-level retries (the watch loop is the retry, with the shared backoff), and the
/// endpoint override with its interceptor. Region and credentials are applied only when set, so
/// a builder from the standard chain keeps its own.
pub fn apply_options(
    mut builder: aws_sdk_servicediscovery::config::Builder,
    options: &CloudMapOptions,
) -> aws_sdk_servicediscovery::config::Builder {
    builder = builder
        .http_client(https_client())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(options.request_timeout)
                .operation_attempt_timeout(options.request_timeout)
                .operation_timeout(options.request_timeout)
                .build(),
        )
        .retry_config(RetryConfig::disabled());
    if let Some(region) = &options.region {
        builder = builder.region(Region::new(region.clone()));
    }
    if let Some(credentials) = &options.credentials {
        builder = builder.credentials_provider(credentials.to_sdk());
    }
    if let Some(url) = &options.endpoint_url {
        builder = builder
            .endpoint_url(url.clone())
            .interceptor(LocalEndpointInterceptor);
    }
    builder
}

/// A client with explicit settings only (no standard chain): region and credentials must be in
/// `options`. Used by tests and tools; services use [`crate::CloudMap::connect`].
pub fn explicit_client(options: &CloudMapOptions) -> aws_sdk_servicediscovery::Client {
    let builder = aws_sdk_servicediscovery::config::Builder::new().behavior_version_latest();
    aws_sdk_servicediscovery::Client::from_conf(apply_options(builder, options).build())
}

/// A client from the standard chain (region, credentials, `AWS_ENDPOINT_URL`), with `options`
/// on top.
pub async fn standard_client(options: &CloudMapOptions) -> aws_sdk_servicediscovery::Client {
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(https_client());
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(credentials) = &options.credentials {
        loader = loader.credentials_provider(credentials.to_sdk());
    }
    let sdk_config = loader.load().await;
    let mut options = options.clone();
    // An endpoint from the environment or profile is an override too: it needs the interceptor.
    if options.endpoint_url.is_none() {
        options.endpoint_url = sdk_config.endpoint_url().map(str::to_string);
    }
    let builder = aws_sdk_servicediscovery::config::Builder::from(&sdk_config);
    aws_sdk_servicediscovery::Client::from_conf(apply_options(builder, &options).build())
}
