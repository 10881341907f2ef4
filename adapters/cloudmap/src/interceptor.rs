//! The interceptor that lets DiscoverInstances reach a local endpoint (moto, LocalStack).
//!
//! The SDK prefixes the host of the Cloud Map data-plane calls (`DiscoverInstances`,
//! `DiscoverInstancesRevision`) with `data-`, so `http://127.0.0.1:5000` becomes
//! `http://data-127.0.0.1:5000`, which does not resolve. There is no setting to turn that off. The
//! operation stores an `EndpointPrefix` in the config bag before the endpoint is resolved; unsetting
//! it in `read_before_attempt` (after the operation's own interceptor ran, before the endpoint is
//! applied to the request) sends the call to the configured endpoint as is.
//!
//! Installed **only** when an endpoint override is configured: against real AWS the prefix is
//! required (`data-servicediscovery.<region>.amazonaws.com`).

use aws_sdk_servicediscovery::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_servicediscovery::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;

/// Removes the `data-` host prefix of Cloud Map's data-plane operations (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalEndpointInterceptor;

impl Intercept for LocalEndpointInterceptor {
    fn name(&self) -> &'static str {
        "TrellisCloudMapLocalEndpoint"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}
